//! The one place that sets up MLIR: the context (all upstream dialects, LLVM translations,
//! diagnostics captured as errors) and the pass pipelines of every target.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Once;

use melior::dialect::DialectRegistry;
use melior::ir::operation::OperationLike;
use melior::ir::Module;
use melior::pass::PassManager;
use melior::utility::{parse_pass_pipeline, register_all_dialects, register_all_llvm_translations};
use melior::Context;

use crate::TargetError;

/// Host: structured control flow and memrefs straight to the LLVM dialect; LLVM's O3 (run by
/// the execution engine's optimizing transformer, with the host CPU's features) vectorises the
/// inner loops, whose floating-point ops carry `reassoc, contract` (f32 → bf16 roundings are
/// integer ops already: see `Lower::bf16_bits_host`).
pub const HOST_PIPELINE: &str = "builtin.module(\
    canonicalize, cse, loop-invariant-code-motion, \
    convert-scf-to-cf, convert-to-llvm, reconcile-unrealized-casts)";

/// NVPTX: inside the `gpu.module`, structured control flow to branches and everything to the
/// NVVM/LLVM dialects with bare-pointer kernel arguments (nvgpu's async copies to NVVM first;
/// NVVM ops without an LLVM intrinsic, such as `wgmma`, to inline PTX last); then LLVM's NVPTX backend (O3, from
/// the module's `#nvvm.target`) writes PTX text into a `gpu.binary` (`format=isa`: PTX, not
/// a cubin, so no CUDA toolkit is needed to build).
pub const GPU_PIPELINE: &str = "builtin.module(\
    gpu.module(canonicalize, cse, loop-invariant-code-motion, convert-scf-to-cf, \
    convert-nvgpu-to-nvvm, convert-gpu-to-nvvm{use-bare-ptr-memref-call-conv=1}, \
    convert-nvvm-to-llvm, canonicalize, cse), \
    reconcile-unrealized-casts, gpu-module-to-binary{format=isa})";

/// An MLIR context with every upstream dialect loaded and diagnostics collected.
///
/// MLIR contexts are not `Send`: make one per compilation worker.
pub struct MlirContext {
    pub context: Context,
    diagnostics: Rc<RefCell<Vec<String>>>,
}

extern "C" {
    // LLVM's C API (linked with MLIR).
    fn LLVMInitializeNVPTXTargetInfo();
    fn LLVMInitializeNVPTXTarget();
    fn LLVMInitializeNVPTXTargetMC();
    fn LLVMInitializeNVPTXAsmPrinter();
    #[cfg(target_arch = "x86_64")]
    fn LLVMInitializeX86TargetInfo();
    #[cfg(target_arch = "x86_64")]
    fn LLVMInitializeX86Target();
    #[cfg(target_arch = "x86_64")]
    fn LLVMInitializeX86TargetMC();
    #[cfg(target_arch = "x86_64")]
    fn LLVMInitializeX86AsmPrinter();
    #[cfg(target_arch = "x86_64")]
    fn LLVMInitializeX86AsmParser();
}

/// Registers the LLVM targets the builds use, once, before any build runs. LLVM's target
/// registry is an unsynchronised list that MLIR's execution engine (the host target) and its
/// NVVM serialisation (the GPU targets) each fill on first use from their own once-guards; a
/// host build and a GPU build starting together in one process (the tests, a future parallel
/// CLI) could race on it. Registered here first, later registrations find each target
/// present and return.
fn init_llvm_targets() {
    // SAFETY: LLVM's target initialisers take no arguments and are idempotent; this runs once
    // (inside a `Once`), before any other thread of this crate touches LLVM.
    unsafe {
        LLVMInitializeNVPTXTargetInfo();
        LLVMInitializeNVPTXTarget();
        LLVMInitializeNVPTXTargetMC();
        LLVMInitializeNVPTXAsmPrinter();
        #[cfg(target_arch = "x86_64")]
        {
            LLVMInitializeX86TargetInfo();
            LLVMInitializeX86Target();
            LLVMInitializeX86TargetMC();
            LLVMInitializeX86AsmPrinter();
            LLVMInitializeX86AsmParser();
        }
    }
}

impl MlirContext {
    pub fn new() -> Self {
        static PASSES: Once = Once::new();
        PASSES.call_once(|| {
            melior::utility::register_all_passes();
            init_llvm_targets();
        });
        let registry = DialectRegistry::new();
        register_all_dialects(&registry);
        let context = Context::new();
        context.append_dialect_registry(&registry);
        context.load_all_available_dialects();
        register_all_llvm_translations(&context);
        // The kernels are small and many: one thread per context, workers in parallel.
        context.enable_multi_threading(false);
        let diagnostics = Rc::new(RefCell::new(Vec::new()));
        let sink = diagnostics.clone();
        context.attach_diagnostic_handler(move |d| {
            sink.borrow_mut().push(format!("{}: {}", d.location(), d));
            true
        });
        MlirContext {
            context,
            diagnostics,
        }
    }

    /// Diagnostics emitted since the last call, joined.
    pub fn take_diagnostics(&self) -> String {
        self.diagnostics
            .borrow_mut()
            .drain(..)
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Verifies `module`; the error carries MLIR's diagnostics (which name kernel and node).
    pub fn verify(&self, module: &Module, what: &str) -> Result<(), TargetError> {
        if module.as_operation().verify() {
            self.take_diagnostics();
            Ok(())
        } else {
            Err(TargetError::Mlir(format!(
                "{what}: the generated MLIR does not verify: {}",
                self.take_diagnostics()
            )))
        }
    }

    /// Runs `pipeline` (textual pass pipeline) on `module` with the verifier on.
    pub fn run_pipeline(
        &self,
        module: &mut Module,
        pipeline: &str,
        what: &str,
    ) -> Result<(), TargetError> {
        let pm = PassManager::new(&self.context);
        pm.enable_verifier(true);
        parse_pass_pipeline(pm.as_operation_pass_manager(), pipeline)
            .map_err(|e| TargetError::Mlir(format!("bad pass pipeline {pipeline}: {e}")))?;
        pm.run(module).map_err(|_| {
            TargetError::Mlir(format!(
                "{what}: MLIR pass pipeline failed: {}",
                self.take_diagnostics()
            ))
        })
    }
}

impl Default for MlirContext {
    fn default() -> Self {
        Self::new()
    }
}
