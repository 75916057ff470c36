//! Shared by the targets: a scratch directory per process, and the checkpoint the config and
//! safetensors targets complete their input with.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A directory that lives as long as the fuzzing process.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir")).path()
}

/// The tiny Qwen3-Next oracle checkpoint (config.json, model.safetensors).
pub fn oracle() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/oracle/qwen3_next/model")
}
