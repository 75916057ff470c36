//! The CUDA executor (feature `cuda`): without a driver, every entry point fails with the
//! runtime's own error and nothing panics; with a GPU, the GPU plan of every tiny example and
//! oracle family matches the host plan (f32 paths: 1e-4 relative), greedy tokens agree, and
//! batched decode (replayed CUDA graphs) matches single sequences.
//!
//! The GPU comparisons skip with a visible message when no device is present and fail when
//! `LAMINA_REQUIRE_GPU=1` (`scripts/gpu-check` sets it).

use std::path::{Path, PathBuf};
use std::process::Command;

use lamina_compiler::build::build;
use lamina_compiler::passes::Options;
use lamina_ir::model::Model;
use lamina_runtime::cuda::{driver_available, CudaEngine, Device};
use lamina_runtime::host::HostEngine;
use lamina_runtime::Executor;
use lamina_targets::Target;

use crate::common::repo;

/// f32 paths on both sides; the GPU's exp/log/sin/cos are PTX approximations.
const TOL: f64 = 1e-4;

fn gpu_or_skip(what: &str) -> Option<Device> {
    match Device::open(0) {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(
                std::env::var("LAMINA_REQUIRE_GPU").as_deref() != Ok("1"),
                "{what}: LAMINA_REQUIRE_GPU=1 but {e}"
            );
            crate::common::skip(&format!("{what}: {e}"));
            None
        }
    }
}

#[test]
fn without_a_driver_every_entry_point_says_so() {
    if driver_available().is_ok() {
        crate::common::skip("without_a_driver_every_entry_point_says_so: a CUDA driver is present");
        return;
    }
    let msg = "no CUDA driver found";
    let e = Device::open(0).unwrap_err().to_string();
    assert!(e.contains(msg), "{e}");
    let e = lamina_runtime::cuda::copy_bandwidth(1 << 20)
        .unwrap_err()
        .to_string();
    assert!(e.contains(msg), "{e}");
    // A GPU artifact: the plan loads, the device does not.
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("a");
    let m = Model::open(&repo().join("examples/minimax-tiny.toml")).unwrap();
    let gpu = Options {
        weights_bf16: true,
        host_lanes: 1,
        decode_splits: 8,
        tensor_cores: true,
        tf32_products: false,
        bf16_handoffs: false,
        bf16_caches: true,
        strict_fp: false,
        ..Options::default()
    };
    build(&m, &art, Target::Sm80, gpu, 0).unwrap();
    let e = match CudaEngine::load(&art, None) {
        Ok(_) => panic!("loaded without a driver"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(msg), "{e}");
    // The CLI: exit 1, one line, no panic, for an artifact and for a model path.
    let bin = env!("CARGO_BIN_EXE_compile-model");
    let example = repo().join("examples/minimax-tiny.toml");
    for args in [
        vec![
            "run",
            art.to_str().unwrap(),
            "--device",
            "cuda",
            "--tokens",
            "1,2",
        ],
        vec![
            "run",
            example.to_str().unwrap(),
            "--device",
            "cuda",
            "--tokens",
            "1",
        ],
        vec!["bench", art.to_str().unwrap(), "--device", "cuda"],
    ] {
        let o = Command::new(bin).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(msg) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

/// A host plan given to the CUDA executor is refused by name before any device call.
#[test]
fn host_plans_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("a");
    let m = Model::open(&repo().join("examples/minimax-tiny.toml")).unwrap();
    build(&m, &art, Target::Host, Options::default(), 0).unwrap();
    let e = match CudaEngine::load(&art, None) {
        Ok(_) => panic!("the CUDA executor loaded a host plan"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("field target is \"host\""), "{e}");
}

fn prompt(len: usize, vocab: usize, salt: usize) -> Vec<i64> {
    (0..len)
        .map(|i| ((i * 7919 + salt * 104729 + 13) % vocab) as i64)
        .collect()
}

/// The GPU plan of `model` against its host plan: prefill over two pieces, greedy decode, and
/// a batch of two sequences decoded together (a replayed graph) against single runs.
fn gpu_matches_host(model: &Path) {
    let what = model.display().to_string();
    let Some(dev) = gpu_or_skip(&what) else {
        return;
    };
    let target = Target::parse(dev.native_target().expect("sm_80 or newer")).unwrap();
    let options = Options {
        max_batch: 2,
        max_context: 160,
        max_prefill_rows: 96,
        keep_values: false,
        weights_bf16: true,
        host_lanes: 1,
        decode_splits: 8,
        tensor_cores: true,
        tf32_products: false,
        warpgroup_tiles: target == Target::Sm90a,
        bf16_handoffs: false,
        bf16_caches: true,
        strict_fp: false,
    };
    let m = Model::open(model).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let (host_art, gpu_art) = (dir.path().join("host"), dir.path().join("gpu"));
    build(&m, &host_art, Target::Host, options, 1).unwrap();
    build(&m, &gpu_art, target, options, 1).unwrap();
    let mut host = HostEngine::load(&host_art, None).unwrap();
    let mut gpu = CudaEngine::load(&gpu_art, None).unwrap_or_else(|e| panic!("{what}: {e}"));
    gpu.poison_every_run(true);
    let v = m.graph.vocab_size;
    // 130 tokens: two prefill pieces (96 + 34), partial chunks of the chunked recurrences.
    let prompts = vec![prompt(130, v, 1), prompt(41, v, 2)];
    let want = host.generate(&prompts, 6).unwrap();
    let got = gpu
        .generate(&prompts, 6)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let (pre, dec) = lamina_runtime::compare_generations(&got, &want, v, TOL)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    crate::common::note(&format!(
        "{what}: GPU ({target}) vs host rel err prefill {pre:.2e}, decode {dec:.2e}"
    ));
}

fn oracle_model(family: &str) -> PathBuf {
    repo()
        .join("tests/fixtures/oracle")
        .join(family)
        .join("model")
}

#[test]
fn gpu_kimi_linear_tiny() {
    gpu_matches_host(&repo().join("examples/kimi-linear-tiny.toml"));
}

#[test]
fn gpu_qwen3_next_tiny() {
    gpu_matches_host(&repo().join("examples/qwen3-next-tiny.toml"));
}

#[test]
fn gpu_minimax_tiny() {
    gpu_matches_host(&repo().join("examples/minimax-tiny.toml"));
}

#[test]
fn gpu_deepseek_v3_tiny() {
    gpu_matches_host(&repo().join("examples/deepseek-v3-tiny.toml"));
}

#[test]
fn gpu_oracle_families() {
    for family in [
        "kimi_linear",
        "qwen3_next",
        "minimax",
        "deepseek_v3",
        "deepseek_v3_yarn",
    ] {
        gpu_matches_host(&oracle_model(family));
    }
}
