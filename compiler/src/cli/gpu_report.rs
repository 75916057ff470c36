//! `compile-model report MODEL --target sm_80|sm_90a`: every kernel's PTX resources (from
//! `ptxas -v`), its planned launch, and the work of each phase against the GPU's roofline.

use std::collections::BTreeMap;

use lamina_ir::cost::Gpu;
use lamina_ir::kernel::count::{launch_work, Work};
use lamina_ir::kernel::Kernel;
use lamina_ir::model::Model;
use lamina_targets::mlir::lower::staged;
use lamina_targets::nvptx::{self, Resources};
use lamina_targets::Target;

use super::CliResult;
use crate::build::compile_program;
use crate::kernels::Phase;
use crate::passes::Options;

/// One kernel of one phase: launches and work per launch.
pub struct KernelRow<'k> {
    pub kernel: &'k Kernel,
    pub launches: usize,
    pub blocks: usize,
    pub work: Work,
}

impl KernelRow<'_> {
    /// Roofline time of all its launches, seconds: DRAM bytes at the bandwidth, or the
    /// arithmetic ([`Work::compute_seconds`]), whichever is longer.
    pub fn roofline(&self, gpu: &Gpu) -> f64 {
        let w = &self.work;
        self.launches as f64
            * (w.dram_bytes() / gpu.bandwidth).max(w.compute_seconds(gpu.flops, gpu.f32_flops))
    }

    /// What bounds it: the longest of the DRAM time and the arithmetic time, and of the
    /// latter, the kind of arithmetic that takes longest.
    pub fn bound(&self, gpu: &Gpu) -> &'static str {
        let w = &self.work;
        if w.dram_bytes() / gpu.bandwidth >= w.compute_seconds(gpu.flops, gpu.f32_flops) {
            return "memory";
        }
        w.compute_terms(gpu.flops, gpu.f32_flops)
            .into_iter()
            .fold(("memory", -1.0), |a, b| if b.1 > a.1 { b } else { a })
            .0
    }
}

pub fn gpu_report(
    m: &Model,
    target: Target,
    options: Options,
    batch: usize,
    context: usize,
    gpu: &Gpu,
) -> CliResult {
    let (p, _) = compile_program(m, options).map_err(|e| e.to_string())?;
    let kernels: Vec<Kernel> = p.kernels().into_iter().cloned().collect();
    let (ptx, _) = nvptx::compile_ptx(&kernels, target).map_err(|e| e.to_string())?;
    let resources: BTreeMap<String, Resources> = match nvptx::ptxas(&ptx, target) {
        Ok(r) => r.into_iter().map(|r| (r.kernel.clone(), r)).collect(),
        Err(e) => {
            println!("(no ptxas resources: {e})");
            BTreeMap::new()
        }
    };
    println!(
        "{target} kernels: one program per block of {} warps (prefill projections: tiles staged in \
         static shared memory by cp.async), per warp (kernels with reductions; their tensor-core tiles \
         stage aligned global operands in the warp's slice of shared memory by cp.async; \
         locals too large for static shared memory in dynamic shared memory, 2 or 4 warps to a \
         block, smem marked *, else in the scratch buffer; the recurrences' scans: 4 warps a \
         program, {}) or per thread, {} threads per block \
         otherwise; weights bf16, state f32, activations f32 but those only GEMMs read (bf16, `_bf16<param>`); \
         projections (linear_mma_*) on tensor cores with bf16 operands: {}",
        staged::LANES / nvptx::WARP,
        match target {
            Target::Sm90a => {
                "as the chunk kernels; their 64-row f32 products as 3xTF32 wgmma m64nNk8, B \
                 staged in a warpgroup area"
            }
            _ => "their tiles (3xTF32 mma.sync m16n8k8) dealt to the warps",
        },
        nvptx::BLOCK,
        match target {
            Target::Sm90a => "prefill wgmma m64n64k16 from shared memory, decode mma.sync m16n8k16",
            _ => "mma.sync m16n8k16",
        }
    );
    println!(
        "{:<64} {:>5} {:>5} {:>8} {:>11} {:>8} {:>7} {:>9} {:>10}",
        "kernel",
        "lanes",
        "regs",
        "stack B",
        "spill st/ld",
        "smem",
        "blk/SM",
        "local GB",
        "scratch B"
    );
    // The driver reserves a kernel's local memory (its stack frame) for every thread the GPU
    // can hold: 2048 per SM on sm_80 and sm_90, times the SMs (132 on an H100/H200).
    let reserve = |stack: u32| stack as f64 * 2048.0 * 132.0;
    let mut heavy = Vec::new();
    for k in &kernels {
        match resources.get(&k.name) {
            Some(r) => {
                let launch = nvptx::gpu_launch(k, target);
                let dynamic = launch.dynamic_shared_bytes;
                let smem = if dynamic > 0 {
                    format!("{}*", r.shared + dynamic)
                } else {
                    r.shared.to_string()
                };
                println!(
                    "{:<64} {:>5} {:>5} {:>8} {:>5}/{:<5} {:>8} {:>7} {:>9.2} {:>10}",
                    k.name,
                    launch.lanes,
                    r.registers,
                    r.stack,
                    r.spill_stores,
                    r.spill_loads,
                    smem,
                    r.blocks_per_sm(launch.block, dynamic, target),
                    reserve(r.stack) / 1e9,
                    launch.scratch_bytes
                );
                if reserve(r.stack) > 0.1 * gpu.memory as f64 {
                    heavy.push(k.name.as_str());
                }
            }
            None => println!("{:<64} {:>5}", k.name, "?"),
        }
    }
    if !heavy.is_empty() {
        println!(
            "warning: the local memory of {} would take over 10% of the {}'s memory at full \
             occupancy (per-program locals live per thread in this lowering)",
            heavy.join(", "),
            gpu.name
        );
    }
    // Workspaces (shared by the launches of a run, not per sequence).
    let mut workspaces = BTreeMap::new();
    for launches in p.schedules.values() {
        for l in launches {
            for b in &l.args {
                if let crate::kernels::Bind::Workspace { name, shape, elem } = b {
                    let bytes = shape.iter().product::<usize>() * elem.bytes();
                    workspaces.insert(name.clone(), bytes);
                }
            }
        }
    }
    for (name, bytes) in &workspaces {
        println!(
            "workspace {name}: {:.1} MiB (`--max-context` rows)",
            *bytes as f64 / (1 << 20) as f64
        );
    }
    // Decode attends the positions the plan holds: `--context` beyond `--max-context` would
    // price keys that the plan's caches and split pieces do not have.
    if context > options.max_context {
        println!(
            "decode positions: --context {context} is capped at the plan's --max-context {}",
            options.max_context
        );
    }
    let context = context.min(options.max_context);
    if batch > options.max_batch {
        println!(
            "decode rows: --batch {batch} is capped at the plan's --max-batch {}",
            options.max_batch
        );
    }
    let batch = batch.min(options.max_batch);
    let data = (0.0, context as f64);
    for (phase, rows, what) in [
        (
            Phase::Prefill,
            options.max_prefill_rows,
            format!("{} rows per launch", options.max_prefill_rows),
        ),
        (
            Phase::Decode,
            batch,
            format!("batch {batch}, positions up to {context}"),
        ),
    ] {
        let mut rows_by: BTreeMap<&str, KernelRow> = BTreeMap::new();
        for l in &p.schedules[&phase] {
            let k = &l.kernel;
            let e = rows_by.entry(k.name.as_str()).or_insert_with(|| KernelRow {
                kernel: k,
                launches: 0,
                blocks: (k.programs(rows) * nvptx::program_threads(k, target) as usize)
                    .div_ceil(nvptx::block_size(k, target) as usize),
                work: launch_work(k, rows, data),
            });
            e.launches += 1;
        }
        let mut rows_v: Vec<KernelRow> = rows_by.into_values().collect();
        rows_v.sort_by(|a, b| b.roofline(gpu).total_cmp(&a.roofline(gpu)));
        println!();
        println!(
            "{} ({what}): roofline on {} ({:.2} TB/s; {:.0} TFLOP/s bf16 MMA, 3xTF32 products \
             at a sixth of it, {:.1} TFLOP/s f32 on CUDA cores)",
            phase.name(),
            gpu.name,
            gpu.bandwidth / 1e12,
            gpu.flops / 1e12,
            gpu.f32_flops / 1e12
        );
        println!(
            "{:<64} {:>8} {:>9} {:>12} {:>12} {:>11} {:>12} {:>17} {:>12}  bound",
            "kernel",
            "launches",
            "blocks",
            "MFLOP/launch",
            "MB/launch",
            "KB/program",
            "roofline µs",
            "scratch MB/launch",
            "scratch µs"
        );
        let (mut t, mut flops, mut bytes, mut scratch_t) = (0.0, 0.0, 0.0, 0.0);
        for r in &rows_v {
            let time = r.roofline(gpu);
            t += time;
            flops += r.work.flops * r.launches as f64;
            bytes += r.work.dram_bytes() * r.launches as f64;
            // Warp programs whose locals do not fit in shared memory keep them in global
            // scratch: its traffic per launch, and
            // the time it takes over all launches (as the roofline column) if none of it stays
            // in L1/L2 (an upper bound).
            let (scratch, scratch_time) = if nvptx::scratch_bytes(r.kernel, target) > 0 {
                let s = r.work.scratch_bytes;
                let time = r.launches as f64 * s / gpu.bandwidth;
                scratch_t += time;
                (format!("{:.3}", s / 1e6), format!("{:.2}", time * 1e6))
            } else {
                ("-".into(), "-".into())
            };
            // What one program (a warp, a block or a thread) moves in sequence: hundreds of KB
            // per program at few programs bind a kernel by its programs' latency, not by HBM.
            let programs = r.kernel.programs(rows).max(1) as f64;
            println!(
                "{:<64} {:>8} {:>9} {:>12.3} {:>12.3} {:>11.1} {:>12.2} {:>17} {:>12}  {}",
                r.kernel.name,
                r.launches,
                r.blocks,
                r.work.flops / 1e6,
                r.work.dram_bytes() / 1e6,
                r.work.dram_bytes() / programs / 1e3,
                time * 1e6,
                scratch,
                scratch_time,
                r.bound(gpu)
            );
        }
        println!(
            "{} total: {} launches, {:.2} GFLOP, {:.3} GB, roofline {:.1} µs; warp programs' scratch traffic \
             {:.1} µs more if it all reached HBM (an upper bound: a program's scratch that fits \
             L1 with its neighbours on the SM, scratch B × programs per SM above, moves at L1 \
             speed; locals staged in shared memory or registers remove it)",
            phase.name(),
            p.schedules[&phase].len(),
            flops / 1e9,
            bytes / 1e9,
            t * 1e6,
            scratch_t * 1e6
        );
    }
    Ok(())
}
