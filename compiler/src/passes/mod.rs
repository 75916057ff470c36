//! The compiler's passes: typed values in one ordered list ([`pipeline`]), each named, run by
//! [`run_pipeline`], which verifies the program after every pass (debug and test builds),
//! writes `NN-after-<pass>.txt` into `$LAMINA_DUMP_IR` when set, and times each pass.
//!
//! 1. `verify-graph`: the graph IR's type and precision rules;
//! 2. `fuse`: which nodes are computed inside another node's kernel ([`fuse`]);
//! 3. `lower-to-kernels`: per phase, every unfused op (with what it absorbs) to kernel
//!    launches ([`crate::kernels`]);
//! 4. `inline-maps`: row-wise maps (activations, gates, residual adds, split-K projections'
//!    sums) computed by the kernels that read their outputs element-wise, instead of by
//!    launches of their own ([`inline_maps`]);
//! 5. `weight-precision`: weights read as bf16 when the build asks for it ([`precision`]);
//! 6. `activation-precision`: in tensor-core plans, activations that are only ever GEMM
//!    operands stored as bf16 ([`precision::ActivationPrecision`]);
//! 7. `product-precision`: with TF32 products, attention's and the recurrences' f32 products
//!    as TF32 MMA tiles ([`precision::ProductPrecision`]);
//! 8. `fuse-siblings`: independent launches reading the same activation (q, k, v, gate
//!    projections; gate and up; a router and its shared expert) as one launch of one kernel,
//!    their programs side by side ([`siblings`]);
//! 9. `dedupe-kernels`: identical kernels (same signature) shared by every launch;
//! 10. `plan-memory`: liveness-based arena offsets for every activation, per phase.

pub mod dedupe;
pub mod fuse;
pub mod inline_maps;
pub mod lower;
pub mod memory;
pub mod precision;
pub mod siblings;

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::{Duration, Instant};

use lamina_ir::graph::Graph;
use lamina_ir::kernel::print::print_kernel;
use lamina_ir::kernel::verify::verify_kernel;
use lamina_ir::Error;

use crate::kernels::{Bind, Launch, Phase};
pub use memory::MemoryPlan;

/// Build-time sizes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    pub max_batch: usize,
    pub max_context: usize,
    pub max_prefill_rows: usize,
    /// Give every activation its own arena slot (no reuse), so all values can be inspected
    /// after a run (`HostEngine::value`); for debugging.
    pub keep_values: bool,
    /// Store weights as bf16 (GPU plans always do; host plans may).
    pub weights_bf16: bool,
    /// Host target only: run split loops and reductions in this many lanes, one after the
    /// other, as a GPU warp would (1: plainly). Tests use it to check the GPU's split
    /// arithmetic on the CPU.
    pub host_lanes: u32,
    /// Decode attention splits the cached positions into this many pieces, attended by
    /// separate programs and merged by a combine kernel (split-sequence, "flash decoding"):
    /// parallelism when one sequence's heads cannot fill the machine. 1: no split; 0: enough
    /// pieces for about `kernels::attention::DECODE_PROGRAMS` attend programs per row (GPU
    /// targets' default).
    pub decode_splits: usize,
    /// Projections as tensor-core MMA tiles (bf16 operands, f32 accumulation): GPU targets
    /// lower them to `mma.sync`, the host to loops with the same rounding (so tests check the
    /// numerics and the tiling on the CPU).
    pub tensor_cores: bool,
    /// Attention's and the chunked recurrences' f32 products as single TF32 MMAs (operands
    /// rounded to 10 mantissa bits, 2^-11 relative, 8x finer than bf16) instead of 3xTF32
    /// (~2^-20): a third of the tensor-core work. Experimental: end to end within DESIGN's
    /// bf16-operand bound on some tiny models only (`compiled::tf32_products_*` tests).
    pub tf32_products: bool,
    /// The chunked recurrences' products as tiles of 64 rows (`build::Tiling::Warpgroup`),
    /// which sm_90a programs of four warps run as `wgmma` m64nNk8; else tiles of 32 for one
    /// warp. sm_90a builds' default; the host runs the same tiles (tests compare them).
    pub warpgroup_tiles: bool,
    /// The chunked recurrences hand their per-chunk products (`W`, `U`, `q ⊙ e^G`,
    /// `k ⊙ e^(G_L − G)`, `M_qk`) and raw outputs from kernel to kernel as bf16 (the issue's
    /// activation rule) instead of f32: half the bytes of the memory-bound chunk/scan pair.
    /// Experimental, like `tf32_products`.
    pub bf16_handoffs: bool,
    /// KV and latent caches store bf16 (the model's dtype, as serving stacks keep them)
    /// instead of f32: half the cache memory and half the bytes decode attention reads.
    /// Keys, values and latents are rounded once, when written; attention reads them widened
    /// to f32 (the GPU's prefill attention blocks round them to bf16 anyway). GPU builds'
    /// default (`--cache-dtype auto`).
    pub bf16_caches: bool,
    /// Host plans compute f32 without `reassoc, contract` (`Flavor::HostStrict`): sums in
    /// program order, no fused multiply-adds. Slower; for comparing two plans bit for bit.
    /// Needs `host_lanes` 1; GPU targets ignore it.
    pub strict_fp: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_batch: 4,
            max_context: 1024,
            max_prefill_rows: 512,
            keep_values: false,
            weights_bf16: false,
            host_lanes: 1,
            decode_splits: 1,
            tensor_cores: false,
            tf32_products: false,
            warpgroup_tiles: false,
            bf16_handoffs: false,
            bf16_caches: false,
            strict_fp: false,
        }
    }
}

/// What flows through the pipeline.
pub struct Program<'g> {
    pub graph: &'g Graph,
    pub options: Options,
    /// Fusion decisions (after `fuse`).
    pub fusion: fuse::Fusion,
    /// Launch lists per phase (after `lower-to-kernels`).
    pub schedules: BTreeMap<Phase, Vec<Launch>>,
    /// Memory plans per phase (after `plan-memory`).
    pub memory: BTreeMap<Phase, MemoryPlan>,
}

impl<'g> Program<'g> {
    pub fn new(graph: &'g Graph, options: Options) -> Self {
        Program {
            graph,
            options,
            fusion: fuse::Fusion::default(),
            schedules: BTreeMap::new(),
            memory: BTreeMap::new(),
        }
    }

    /// Distinct kernels in first-use order (prefill first).
    pub fn kernels(&self) -> Vec<&lamina_ir::kernel::Kernel> {
        distinct(self.schedules.values().flatten())
    }

    /// Distinct kernels of one phase, in first-launch order.
    pub fn phase_kernels(&self, phase: Phase) -> Vec<&lamina_ir::kernel::Kernel> {
        distinct(self.schedules.get(&phase).into_iter().flatten())
    }

    /// Checks every kernel and that launches bind one argument per parameter.
    pub fn verify(&self) -> Result<(), String> {
        lamina_ir::graph::verify::verify(self.graph).map_err(|e| e.to_string())?;
        for (phase, launches) in &self.schedules {
            for l in launches {
                verify_kernel(&l.kernel)?;
                if l.args.len() != l.kernel.params.len() {
                    return Err(format!(
                        "{} launch of {}: {} arguments for {} parameters",
                        phase.name(),
                        l.kernel.name,
                        l.args.len(),
                        l.kernel.params.len()
                    ));
                }
            }
        }
        Ok(())
    }

    /// The launch list of `phase`, one comment line per launch: its index, kernel and
    /// arguments (`%n` graph values, `%tmpN` temporaries, `@` weights, `#` layer states).
    pub fn print_launches(&self, phase: Phase) -> String {
        let mut out = String::new();
        for (i, l) in self.schedules.get(&phase).into_iter().flatten().enumerate() {
            let args: Vec<String> = l.args.iter().map(print_bind).collect();
            let _ = writeln!(out, "//   {i:3}: {}({})", l.kernel.name, args.join(", "));
        }
        out
    }

    /// Text form for dumps: the graph before lowering, then per phase the launch list and
    /// the distinct kernels.
    pub fn print(&self) -> String {
        if self.schedules.is_empty() {
            return self.fusion.print(self.graph)
                + &lamina_ir::graph::print::print_graph(self.graph);
        }
        let mut out = self.fusion.print(self.graph);
        for (phase, launches) in &self.schedules {
            let _ = writeln!(
                out,
                "// phase {}: {} launches",
                phase.name(),
                launches.len()
            );
            out += &self.print_launches(*phase);
            if let Some(m) = self.memory.get(phase) {
                let _ = writeln!(
                    out,
                    "//   arena: {} bytes per row x {} rows",
                    m.bytes_per_row, m.rows
                );
            }
        }
        for k in self.kernels() {
            out += "\n";
            out += &print_kernel(k);
        }
        out
    }
}

fn distinct<'a>(launches: impl Iterator<Item = &'a Launch>) -> Vec<&'a lamina_ir::kernel::Kernel> {
    let mut seen = std::collections::HashSet::new();
    launches
        .filter(|l| seen.insert(l.kernel.name.as_str()))
        .map(|l| &l.kernel)
        .collect()
}

pub fn print_bind(b: &Bind) -> String {
    match b {
        Bind::Act(crate::kernels::Value::Node(n)) => format!("%{}", n.index()),
        Bind::Act(crate::kernels::Value::Temp(t, _)) => format!("%tmp{t}"),
        Bind::Weight(w) => format!("@{w}"),
        Bind::Stacked { prefix, leaf, .. } => format!("@{prefix}.experts.*.{leaf}"),
        Bind::State(s) => format!("#{}", s.0),
        Bind::Workspace { name, .. } => format!("&{name}"),
        Bind::Const(name, _) => format!("${name}"),
        Bind::Tokens => "tokens".into(),
        Bind::Slot => "slot".into(),
        Bind::Pos => "pos".into(),
    }
}

pub trait Pass {
    fn name(&self) -> &'static str;
    fn run(&self, p: &mut Program) -> Result<(), Error>;
}

/// The passes, in order.
pub fn pipeline() -> Vec<Box<dyn Pass>> {
    vec![
        Box::new(VerifyGraph),
        Box::new(fuse::Fuse),
        Box::new(lower::LowerToKernels),
        Box::new(inline_maps::InlineMaps),
        Box::new(precision::WeightPrecision),
        Box::new(precision::ActivationPrecision),
        Box::new(precision::ProductPrecision),
        Box::new(siblings::FuseSiblings),
        Box::new(dedupe::DedupeKernels),
        Box::new(memory::PlanMemory),
    ]
}

struct VerifyGraph;

impl Pass for VerifyGraph {
    fn name(&self) -> &'static str {
        "verify-graph"
    }
    fn run(&self, p: &mut Program) -> Result<(), Error> {
        lamina_ir::graph::verify::verify(p.graph)
    }
}

/// Wall time of each pass, in order.
pub type PassTimes = Vec<(&'static str, Duration)>;

/// Runs `passes` in order; returns each pass's wall time.
pub fn run_pipeline(p: &mut Program, passes: &[Box<dyn Pass>]) -> Result<PassTimes, Error> {
    let dump = std::env::var_os("LAMINA_DUMP_IR").map(std::path::PathBuf::from);
    if let Some(d) = &dump {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let mut times = Vec::new();
    for (i, pass) in passes.iter().enumerate() {
        let start = Instant::now();
        pass.run(p)?;
        times.push((pass.name(), start.elapsed()));
        if cfg!(debug_assertions) {
            p.verify()
                .map_err(|m| Error::Compile(format!("after pass {}: {m}", pass.name())))?;
        }
        if let Some(d) = &dump {
            let path = d.join(format!("{:02}-after-{}.txt", i + 1, pass.name()));
            std::fs::write(&path, p.print()).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(times)
}
