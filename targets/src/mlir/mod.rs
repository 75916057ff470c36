//! Everything MLIR: the context and pipelines ([`context`]) and the kernel IR lowering
//! ([`lower`]). No other crate touches melior.

pub mod context;
pub mod lower;

use lamina_ir::kernel::verify::verify_kernel;
use lamina_ir::kernel::Kernel;
use melior::ir::{Location, Module};

pub use context::MlirContext;

use crate::TargetError;

/// Lowers `kernels` into one verified module of upstream dialects.
pub fn kernels_module<'c>(
    cx: &'c MlirContext,
    kernels: &[Kernel],
) -> Result<Module<'c>, TargetError> {
    let module = Module::new(Location::unknown(&cx.context));
    for k in kernels {
        verify_kernel(k).map_err(TargetError::Kernel)?;
        // Tile operations become loops here (the host has no tile-level hardware).
        let k = lamina_ir::kernel::expand::expand_tiles(k);
        verify_kernel(&k).map_err(TargetError::Kernel)?;
        lower::lower_kernel(&cx.context, &module, &k)?;
    }
    cx.verify(&module, "kernel module")?;
    Ok(module)
}

/// The MLIR text of `kernels` before any pass (`compile-model ir --stage mlir`), verified.
pub fn print_mlir(kernels: &[Kernel]) -> Result<String, TargetError> {
    let cx = MlirContext::new();
    let module = kernels_module(&cx, kernels)?;
    Ok(module.as_operation().to_string())
}
