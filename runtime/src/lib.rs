//! Lamina's runtime. It never depends on MLIR or LLVM (a test checks `cargo tree`).
//!
//! - [`host`]: executes compiled host plans (`plan.json` + `kernels.so`);
//! - [`reference`]: the reference executor, the golden model every compiled path is checked
//!   against.

pub mod host;
pub mod reference;
