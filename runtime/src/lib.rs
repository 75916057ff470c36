//! Lamina's runtime. It never depends on MLIR or LLVM (a test checks `cargo tree`).
//!
//! - [`executor`]: what every executor of compiled plans shares (sequences, checks,
//!   generation): the [`Executor`] trait;
//! - [`host`]: executes compiled host plans (`plan.json` + `kernels.so`);
//! - `cuda` (feature `cuda`): executes compiled NVPTX plans (`plan.json` + `kernels.ptx`)
//!   through the CUDA driver, loaded at run time;
//! - [`reference`]: the reference executor, the golden model every compiled path is checked
//!   against.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod executor;
pub mod host;

pub use executor::{compare_generations, Executor, Generation, KernelTime};
pub mod reference;
