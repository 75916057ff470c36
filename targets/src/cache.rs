//! The kernel cache: host kernel objects kept between builds, in a directory named by
//! `LAMINA_KERNEL_CACHE` (off when unset).
//!
//! A host kernel's object is a function of its MLIR module (what the kernel IR lowers to,
//! printed), the MLIR pass pipeline, the LLVM optimisation level and version, and the CPU
//! whose features LLVM compiles for. The cache key is the SHA-256 of all of them, so a hit
//! is the object LLVM would produce again: rebuilding a model with other limits or options
//! recompiles only the kernels that changed, and a kernel shared by several models compiles
//! once. Entries are written to a temporary file and renamed into place, so concurrent builds
//! (processes or threads) never read a partial object. Nothing is evicted: the directory
//! grows until it is removed (every entry is a plain `<key>.o`).
//!
//! GPU builds are not cached: their PTX is one module per model, compiled once per build.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// What a build reads to find its cache directory.
pub const CACHE_ENV: &str = "LAMINA_KERNEL_CACHE";

/// Bumped whenever what an entry holds changes meaning.
const FORMAT: u32 = 1;

/// A kernel object cache directory.
#[derive(Debug, Clone)]
pub struct KernelCache {
    dir: PathBuf,
    /// The compiler and machine half of every key.
    machine: String,
}

impl KernelCache {
    /// The cache in `dir` (created on the first store).
    pub fn new(dir: impl Into<PathBuf>) -> KernelCache {
        KernelCache {
            dir: dir.into(),
            machine: machine(),
        }
    }

    /// The cache named by [`CACHE_ENV`], if set and not empty.
    pub fn from_env() -> Option<KernelCache> {
        std::env::var_os(CACHE_ENV)
            .filter(|d| !d.is_empty())
            .map(KernelCache::new)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key of a kernel whose MLIR module prints as `mlir`, compiled through `pipeline`
    /// at LLVM level `opt`.
    pub fn key(&self, mlir: &str, pipeline: &str, opt: usize) -> String {
        let mut h = Sha256::new();
        for part in [
            format!("lamina kernel cache {FORMAT}"),
            self.machine.clone(),
            format!("opt {opt}"),
            pipeline.to_string(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.update((mlir.len() as u64).to_le_bytes());
        h.update(mlir.as_bytes());
        h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    }

    fn entry(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.o"))
    }

    /// Copies the object of `key` to `dest`; false when there is none, or it cannot be read
    /// or is not an ELF object (the kernel compiles again, and `dest` is removed).
    pub fn fetch(&self, key: &str, dest: &Path) -> bool {
        let Ok(bytes) = std::fs::read(self.entry(key)) else {
            return false;
        };
        let ok = bytes.starts_with(b"\x7fELF") && std::fs::write(dest, &bytes).is_ok();
        if !ok {
            let _ = std::fs::remove_file(dest);
        }
        ok
    }

    /// Keeps the object at `obj` as the entry of `key`.
    pub fn store(&self, key: &str, obj: &Path) -> Result<(), String> {
        let fail = |what: &str, e: std::io::Error| {
            format!("kernel cache {}: {what}: {e}", self.dir.display())
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| fail("creating it", e))?;
        // A uniquely named temporary file in the directory (never a `.o`, so never read),
        // written in full and synced, then renamed into place: readers see a whole entry or
        // none. The temporary is removed if anything fails.
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&self.dir)
            .map_err(|e| fail("a temporary file", e))?;
        let mut src = std::fs::File::open(obj).map_err(|e| fail("reading the object", e))?;
        std::io::copy(&mut src, tmp.as_file_mut()).map_err(|e| fail("writing an entry", e))?;
        tmp.as_file()
            .sync_all()
            .map_err(|e| fail("writing an entry", e))?;
        tmp.persist(self.entry(key))
            .map(|_| ())
            .map_err(|e| fail("renaming an entry into place", e.error))
    }
}

extern "C" {
    // LLVM's C API (linked with MLIR): what the execution engine compiles for.
    fn LLVMGetVersion(major: *mut u32, minor: *mut u32, patch: *mut u32);
    fn LLVMGetHostCPUName() -> *mut std::ffi::c_char;
    fn LLVMGetHostCPUFeatures() -> *mut std::ffi::c_char;
    fn LLVMDisposeMessage(message: *mut std::ffi::c_char);
}

/// The LLVM version and the host CPU with its features, as LLVM detects them.
fn machine() -> String {
    let take = |p: *mut std::ffi::c_char| {
        if p.is_null() {
            return String::new();
        }
        // SAFETY: LLVM returns a NUL-terminated string that the caller owns and disposes.
        unsafe {
            let s = std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned();
            LLVMDisposeMessage(p);
            s
        }
    };
    let (mut major, mut minor, mut patch) = (0, 0, 0);
    // SAFETY: plain LLVM C API queries with no preconditions.
    let (cpu, features) = unsafe {
        LLVMGetVersion(&mut major, &mut minor, &mut patch);
        (take(LLVMGetHostCPUName()), take(LLVMGetHostCPUFeatures()))
    };
    format!("llvm {major}.{minor}.{patch}; cpu {cpu}; features {features}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_machine_and_every_input() {
        let dir = tempfile::tempdir().unwrap();
        let c = KernelCache::new(dir.path());
        assert!(c.machine.starts_with("llvm 22."), "{}", c.machine);
        assert!(
            !c.machine.contains("cpu ;"),
            "no host CPU name: {}",
            c.machine
        );
        let k = c.key("module {}", "p", 3);
        assert_eq!(k.len(), 64);
        assert_eq!(k, c.key("module {}", "p", 3));
        assert_ne!(k, c.key("module { }", "p", 3));
        assert_ne!(k, c.key("module {}", "q", 3));
        assert_ne!(k, c.key("module {}", "p", 2));
    }

    #[test]
    fn entries_round_trip_and_misses_are_misses() {
        let dir = tempfile::tempdir().unwrap();
        let c = KernelCache::new(dir.path().join("cache"));
        let obj = dir.path().join("k.o");
        std::fs::write(&obj, b"\x7fELF object bytes").unwrap();
        let out = dir.path().join("out.o");
        assert!(!c.fetch("abc", &out));
        c.store("abc", &obj).unwrap();
        assert!(c.fetch("abc", &out));
        assert_eq!(std::fs::read(&out).unwrap(), b"\x7fELF object bytes");
        // An entry that is not an object is a miss, and leaves nothing behind.
        std::fs::write(c.dir().join("bad.o"), b"truncated").unwrap();
        let out2 = dir.path().join("out2.o");
        assert!(!c.fetch("bad", &out2));
        assert!(!out2.exists());
        std::fs::remove_file(c.dir().join("bad.o")).unwrap();
        // Only entries are left behind.
        let names: Vec<_> = std::fs::read_dir(c.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["abc.o"]);
    }

    #[test]
    fn an_unwritable_cache_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"").unwrap();
        let c = KernelCache::new(&file);
        let obj = dir.path().join("k.o");
        std::fs::write(&obj, b"x").unwrap();
        let e = c.store("abc", &obj).unwrap_err();
        assert!(e.contains("not-a-dir"), "{e}");
    }
}
