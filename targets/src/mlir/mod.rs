//! Everything MLIR: the context and pipelines ([`context`]) and the kernel IR lowering
//! ([`lower`]). No other crate touches melior.
//!
//! - [`kernels_module`]: host kernels, `func.func`s in a plain module;
//! - [`gpu_module`]: GPU kernels, `gpu.func`s in one `gpu.module` carrying the NVVM target.

pub mod context;
pub mod lower;

use lamina_ir::kernel::verify::verify_kernel;
use lamina_ir::kernel::Kernel;
use melior::ir::operation::OperationLike;
use melior::ir::{BlockLike, Location, Module, RegionLike};

pub use context::MlirContext;
pub use lower::Flavor;

use crate::{Target, TargetError};

/// `k` verified and prepared for `flavor`, verified again: GPUs run `dot` tiles as TF32x3
/// MMA tiles and expand the other tile operations into loops; the host expands everything into
/// loops, with the `dot` tiles first rewritten as the GPU's MMAs when it emulates the GPU's
/// lanes (so that tests run the GPU's tiling and products on the CPU).
fn prepared(k: &Kernel, flavor: Flavor) -> Result<Kernel, TargetError> {
    use lamina_ir::kernel::expand::{dots_on_tensor_cores, expand_all, expand_tiles};
    verify_kernel(k).map_err(TargetError::Kernel)?;
    let k = match flavor {
        // An attention block a GPU block runs whole (its state in registers).
        Flavor::Gpu { .. } if lower::attend::attend_block(k).is_some() => k.clone(),
        Flavor::Gpu { .. } => expand_tiles(&dots_on_tensor_cores(k)),
        Flavor::HostLanes(_) => expand_all(&dots_on_tensor_cores(k)),
        Flavor::Host | Flavor::HostStrict => expand_all(k),
    };
    verify_kernel(&k).map_err(TargetError::Kernel)?;
    Ok(k)
}

/// Lowers `kernels` into one verified module of upstream dialects.
pub fn kernels_module<'c>(
    cx: &'c MlirContext,
    kernels: &[Kernel],
) -> Result<Module<'c>, TargetError> {
    host_module(cx, kernels, Flavor::Host)
}

/// [`kernels_module`] with a host flavor: [`Flavor::Host`], or [`Flavor::HostLanes`] (the
/// GPU's split arithmetic emulated, for tests).
pub fn host_module<'c>(
    cx: &'c MlirContext,
    kernels: &[Kernel],
    flavor: Flavor,
) -> Result<Module<'c>, TargetError> {
    let module = Module::new(Location::unknown(&cx.context));
    for k in kernels {
        lower::lower_kernel(&cx.context, &module.body(), &prepared(k, flavor)?, flavor)?;
    }
    cx.verify(&module, "kernel module")?;
    Ok(module)
}

/// Lowers `kernels` into one verified `gpu.module @kernels` for `target` (an NVPTX target),
/// each kernel mapped as `flavor(kernel)` says (block size, lanes per program).
pub fn gpu_module<'c>(
    cx: &'c MlirContext,
    kernels: &[Kernel],
    target: Target,
    flavor: &dyn Fn(&Kernel) -> Flavor,
) -> Result<Module<'c>, TargetError> {
    let (chip, features) = target
        .nvptx()
        .ok_or_else(|| TargetError::Unavailable(format!("{target} is not an NVPTX target")))?;
    // Kernels with dynamic shared memory address it through one external, zero-sized,
    // 16-byte aligned shared array (PTX `.extern .shared .align 16 .b8 NAME[]`): the upstream
    // `gpu.dynamic_shared_memory` lowering declares an internal one that LLVM demotes into a
    // 1-byte static variable of the function.
    let flavors: Vec<Flavor> = kernels.iter().map(flavor).collect();
    let dynamic = flavors.iter().any(|f| {
        matches!(
            f,
            Flavor::Gpu {
                shared_locals: Some(crate::nvptx::LocalsIn::DynamicShared),
                ..
            }
        )
    });
    let global = if dynamic {
        format!(
            "memref.global \"public\" @{} : memref<0xi8, #gpu.address_space<workgroup>> {{alignment = 16 : i64}}\n",
            lower::DYNAMIC_SHARED
        )
    } else {
        String::new()
    };
    let text = format!(
        "module attributes {{gpu.container_module}} {{\n\
         gpu.module @kernels [#nvvm.target<chip = \"{chip}\", features = \"{features}\", O = 3>] {{\n{global}}}\n}}"
    );
    let module = Module::parse(&cx.context, &text).ok_or_else(|| {
        TargetError::Mlir(format!("gpu.module skeleton: {}", cx.take_diagnostics()))
    })?;
    {
        let body = module.body();
        let gm = body
            .first_operation()
            .ok_or_else(|| TargetError::Mlir("gpu.module skeleton has no gpu.module".into()))?;
        let region = gm.region(0).map_err(|e| TargetError::Mlir(e.to_string()))?;
        let block_ref = region
            .first_block()
            .ok_or_else(|| TargetError::Mlir("gpu.module has no body".into()))?;
        for (k, &f) in kernels.iter().zip(&flavors) {
            lower::lower_kernel(&cx.context, &block_ref, &prepared(k, f)?, f)?;
        }
    }
    cx.verify(&module, "GPU kernel module")?;
    Ok(module)
}

/// The MLIR text of `kernels` before any pass (`compile-model ir --stage mlir`), verified.
pub fn print_mlir(kernels: &[Kernel]) -> Result<String, TargetError> {
    let cx = MlirContext::new();
    let module = kernels_module(&cx, kernels)?;
    Ok(module.as_operation().to_string())
}

/// The MLIR text of `kernels` as a verified `gpu.module` for `target`, before any pass.
pub fn print_gpu_mlir(
    kernels: &[Kernel],
    target: Target,
    flavor: &dyn Fn(&Kernel) -> Flavor,
) -> Result<String, TargetError> {
    let cx = MlirContext::new();
    let module = gpu_module(&cx, kernels, target, flavor)?;
    Ok(module.as_operation().to_string())
}
