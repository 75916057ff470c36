//! `compile-model build` and `compile-model report`.

use std::path::{Path, PathBuf};

use clap::Args;
use lamina_ir::model::Model;
use lamina_targets::Target;

use super::check::bytes;
use super::CliResult;
use crate::build::{build_with_progress, compile_program, make_plan};
use crate::kernels::Phase;
use crate::passes::Options;

/// Sizes fixed at build time.
#[derive(Args, Clone)]
pub struct SizeArgs {
    /// Sequences decoded together (cache and state slots).
    #[arg(long, default_value_t = 4)]
    pub max_batch: usize,
    /// Positions per sequence, prompt and generated tokens together.
    #[arg(long, default_value_t = 1024)]
    pub max_context: usize,
    /// Tokens per prefill launch; longer prompts are prefilled in pieces.
    #[arg(long, default_value_t = 512)]
    pub max_prefill_rows: usize,
    /// How kernels read weights: auto is bf16 for GPU targets (their rule), f32 on the host.
    #[arg(long, value_enum, default_value = "auto")]
    pub weight_dtype: WeightDtype,
    /// Pieces of the cached positions one decode attention is split into (merged by a combine
    /// kernel); 0 = auto: on GPU targets enough pieces that the attend programs (per KV head
    /// or MLA head group, per piece) fill the SMs at batch 1, none on the host.
    #[arg(long, default_value_t = 0)]
    pub decode_splits: usize,
    /// Projections as tensor-core MMA tiles (bf16 operands, f32 accumulation): auto is on for
    /// GPU targets; on the host, `on` runs the same arithmetic as loops.
    #[arg(long, value_enum, default_value = "auto")]
    pub tensor_cores: Switch,
    /// How attention and the chunked recurrences form their f32 products on tensor cores
    /// (tensor-core plans' prefill attention is bf16 flash attention either way): f32
    /// (3xTF32 on GPUs, ~2^-20 relative; exact on the host) or tf32 (experimental: one TF32
    /// MMA, operands rounded to 10 mantissa bits, a third of the work; the host rounds alike;
    /// each recurrence and attention op within 6e-4 of the f64 reference, but end to end the
    /// DeepSeek-V3 and MiniMax tiny models amplify that past 1e-2).
    #[arg(long, value_enum, default_value = "f32")]
    pub products: Products,
    /// How the chunked recurrences hand their per-chunk products and raw outputs from kernel
    /// to kernel: f32, or bf16 (experimental: half the bytes of the memory-bound chunk/scan
    /// pair; each recurrence op within 1e-2 of the f64 reference, see issue 4).
    #[arg(long, value_enum, default_value = "f32")]
    pub handoffs: Handoffs,
    /// How the KV and latent caches store keys, values and latents: auto is bf16 for GPU
    /// targets and tensor-core host plans (half the cache memory and decode's cache reads),
    /// f32 on the host.
    #[arg(long, value_enum, default_value = "auto")]
    pub cache_dtype: WeightDtype,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Handoffs {
    F32,
    Bf16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Products {
    F32,
    Tf32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightDtype {
    Auto,
    F32,
    Bf16,
}

impl SizeArgs {
    /// The build options for `target`.
    pub fn options_for(&self, target: Target) -> Result<Options, String> {
        for (name, v) in [
            ("--max-batch", self.max_batch),
            ("--max-context", self.max_context),
            ("--max-prefill-rows", self.max_prefill_rows),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.max_context > 1 << 24 || self.max_batch > 1 << 16 {
            return Err("--max-context is limited to 2^24 and --max-batch to 2^16".into());
        }
        let gpu = target != Target::Host;
        let tensor_cores = match self.tensor_cores {
            Switch::Auto => gpu,
            Switch::On => true,
            Switch::Off => false,
        };
        Ok(Options {
            max_batch: self.max_batch,
            max_context: self.max_context,
            max_prefill_rows: self.max_prefill_rows.min(self.max_context),
            keep_values: false,
            // GPU targets' rule; tensor-core operands are bf16 too.
            weights_bf16: match self.weight_dtype {
                WeightDtype::Auto => gpu || tensor_cores,
                WeightDtype::F32 => false,
                WeightDtype::Bf16 => true,
            },
            host_lanes: 1,
            // 0 stays automatic on GPU targets (the attention builders choose).
            decode_splits: match self.decode_splits {
                0 if !gpu => 1,
                s => s,
            },
            tensor_cores,
            tf32_products: self.products == Products::Tf32,
            warpgroup_tiles: target == Target::Sm90a,
            bf16_handoffs: self.handoffs == Handoffs::Bf16,
            bf16_caches: match self.cache_dtype {
                WeightDtype::Auto => gpu || tensor_cores,
                WeightDtype::F32 => false,
                WeightDtype::Bf16 => true,
            },
            strict_fp: false,
        })
    }
}

#[derive(Args)]
pub struct BuildArgs {
    model: PathBuf,
    /// host (x86-64 shared library), sm_80 or sm_90a (PTX module `kernels.ptx`).
    #[arg(long, default_value = "host")]
    target: String,
    /// Artifact directory to write (replaced atomically when complete).
    #[arg(short, long)]
    out: PathBuf,
    #[command(flatten)]
    sizes: SizeArgs,
    /// Seed of the random weights of a native spec (recorded in the plan).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Builds with a progress bar over the kernels compiled.
pub fn build_shown(
    m: &Model,
    out: &Path,
    target: Target,
    options: Options,
    seed: u64,
) -> Result<crate::build::BuildReport, String> {
    let bar = super::ui::bar(0, "kernels");
    let r = build_with_progress(m, out, target, options, seed, &super::ui::track(&bar));
    bar.finish_and_clear();
    r.map_err(|e| e.to_string())
}

pub fn parse_target(s: &str) -> Result<Target, String> {
    Target::parse(s).ok_or_else(|| format!("--target {s:?}: expected host, sm_80 or sm_90a"))
}

pub fn build_cmd(a: &BuildArgs) -> CliResult {
    let target = parse_target(&a.target)?;
    let options = a.sizes.options_for(target)?;
    let m = Model::open(&a.model).map_err(|e| e.to_string())?;
    let r = build_shown(&m, &a.out, target, options, a.seed)?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    for (name, t) in &r.pass_times {
        tracing::info!("pass {name:<18} {:>9.3} ms", ms(*t));
    }
    let c = &r.codegen;
    let codegen = if r.plan.target == "host" {
        "codegen (CPU time over all kernels and both workers)"
    } else {
        "codegen (one GPU module, one thread)"
    };
    tracing::info!("{codegen}");
    tracing::info!("  lower-to-mlir        {:>9.3} ms", ms(c.lower));
    tracing::info!("  mlir-passes          {:>9.3} ms", ms(c.passes));
    tracing::info!("  llvm-O3+object       {:>9.3} ms", ms(c.llvm));
    tracing::info!("  link                 {:>9.3} ms", ms(c.link));
    if let Some((bytes, t)) = r.cubin {
        tracing::info!(
            "  ptxas                {:>9.3} ms ({bytes} bytes of cubin)",
            ms(t)
        );
    }
    if let Some(dir) = &r.kernel_cache {
        tracing::info!(
            "kernel cache {}: {} of {} kernels compiled before",
            dir.display(),
            c.cached,
            c.per_kernel.len()
        );
    }
    let mut per = c.per_kernel.clone();
    per.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
    tracing::debug!("per kernel (lower + MLIR passes + LLVM):");
    for (name, t) in per {
        tracing::debug!("  {:>9.3} ms  {name}", ms(t));
    }
    println!(
        "wrote {} ({} kernels, {} prefill / {} decode launches) in {:.2} s",
        a.out.display(),
        r.plan.kernels.len(),
        r.plan.prefill.launches.len(),
        r.plan.decode.launches.len(),
        r.total.as_secs_f64()
    );
    Ok(())
}

#[derive(Args)]
pub struct ReportArgs {
    model: PathBuf,
    /// host: the host plan's buffers; sm_80 or sm_90a: every kernel's ptxas resources and
    /// each phase's work against the roofline (of --gpu, default h200).
    #[arg(long, default_value = "host")]
    target: String,
    #[command(flatten)]
    cost: super::cost::CostArgs,
    #[command(flatten)]
    sizes: SizeArgs,
}

/// The model's serving cost (memory, traffic, FLOPs, roofline), then every buffer of its host
/// plan (weights, pools, arenas), or for a GPU target its kernels' resources and roofline.
pub fn report(a: &ReportArgs) -> CliResult {
    let target = parse_target(&a.target)?;
    if target != Target::Host && a.cost.json {
        return Err("--json is for the host report".into());
    }
    let c = super::cost::model_cost(&a.model, &a.cost)?;
    if a.cost.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&c).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    super::cost::print_cost(&c);
    println!();
    let options = a.sizes.options_for(target)?;
    let m = Model::open(&a.model).map_err(|e| e.to_string())?;
    if target != Target::Host {
        let gpu = match a.cost.gpu()? {
            Some(g) => g,
            None => lamina_ir::cost::gpu("h200").expect("h200 is in the table"),
        };
        return super::gpu_report::gpu_report(
            &m,
            target,
            options,
            a.cost.batch,
            a.cost.context,
            &gpu,
        );
    }
    println!("host plan");
    report_model(&m, &a.model, options)
}

fn report_model(m: &Model, path: &Path, options: Options) -> CliResult {
    let (p, _) = compile_program(m, options).map_err(|e| e.to_string())?;
    let (plan, consts) = make_plan(m, &p, Target::Host, 0).map_err(|e| e.to_string())?;
    println!("{}: {}", path.display(), m.describe_source());
    println!(
        "limits: max_batch {}, max_context {}, max_prefill_rows {}",
        options.max_batch, options.max_context, options.max_prefill_rows
    );
    let weights: u64 = plan
        .weights
        .iter()
        .map(|w| w.shape.iter().product::<usize>() as u64 * 4)
        .sum();
    println!("weights (f32 as loaded): {}", bytes(weights));
    let mut total_pools = 0u64;
    let mut by_kind: std::collections::BTreeMap<&str, (u64, usize)> = Default::default();
    for pool in &plan.pools {
        let e = by_kind.entry(pool.kind.as_str()).or_default();
        e.0 += pool.bytes as u64;
        e.1 += 1;
        total_pools += pool.bytes as u64;
    }
    println!("pools: {}", bytes(total_pools));
    for (k, (b, n)) in by_kind {
        println!("  {k:<11} {n:>3} layers  {}", bytes(b));
    }
    for w in &plan.workspaces {
        println!("workspace {}: {}", w.name, bytes(w.bytes as u64));
    }
    for (phase, s) in [
        (Phase::Prefill, &plan.prefill),
        (Phase::Decode, &plan.decode),
    ] {
        let kernels: std::collections::BTreeSet<usize> =
            s.launches.iter().map(|l| l.kernel).collect();
        println!(
            "{}: {} launches, {} distinct kernels, arena {} ({} per row x {} rows)",
            phase.name(),
            s.launches.len(),
            kernels.len(),
            bytes((s.arena_bytes_per_row * s.rows) as u64),
            bytes(s.arena_bytes_per_row as u64),
            s.rows
        );
    }
    println!(
        "constants (rope tables, slopes): {}",
        bytes(consts.len() as u64 * 4)
    );
    println!("kernels: {}", plan.kernels.len());
    let c = plan.cost;
    println!(
        "decode step, batch 1: weights {} read, state {} read and written, cache {} per cached position",
        bytes(c.decode_weight_bytes),
        bytes(2 * c.state_bytes_per_sequence),
        bytes(c.cache_bytes_per_position)
    );
    println!(
        "  at {} positions: {} per token",
        plan.limits.max_context,
        bytes(c.decode_bytes(plan.limits.max_context))
    );
    Ok(())
}
