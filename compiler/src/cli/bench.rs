//! `compile-model bench`: prefill and decode throughput of a compiled plan, read against the
//! memory-bandwidth roofline measured in the same run (host: a large multi-threaded memcpy and
//! a streaming read; GPU: a device-to-device copy).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use lamina_ir::model::Model;
use lamina_ir::plan::PLAN_FILE;
use lamina_runtime::host::Pool;
use lamina_runtime::reference::{argmax, Reference};

use super::device::Device;

use super::CliResult;
use crate::passes::Options;

#[derive(Args)]
pub struct BenchArgs {
    /// An artifact directory, or a spec / checkpoint directory (compiled for the host into the
    /// cache first, sized for this run).
    model: PathBuf,
    /// Where the checkpoint's safetensors files are (default: where the plan was built from).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Where the plan runs (a model path is compiled for it first).
    #[arg(long, value_enum, default_value = "host")]
    device: Device,
    /// Run even if a checkpoint file's header changed since the plan was built.
    #[arg(long)]
    allow_weight_mismatch: bool,
    /// Prompt tokens prefilled per sequence.
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Tokens generated per sequence (the first comes from the prefill's logits).
    #[arg(long, default_value_t = 64)]
    gen: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Also time the reference executor's f32 prefill of the same prompt (slow).
    #[arg(long)]
    reference: bool,
    /// Seed of the random weights when compiling a spec.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also print the time spent in each kernel (the top 12 of each phase).
    #[arg(long)]
    profile: bool,
    /// MiB copied by the bandwidth measurement.
    #[arg(long, default_value_t = 512)]
    memcpy_mib: usize,
    /// Attention's and the recurrences' f32 products: f32 (3xTF32 on GPUs) or tf32 (one TF32
    /// MMA, as `build --products tf32`).
    #[arg(long, value_enum, default_value = "f32")]
    products: super::build::Products,
    /// The chunked recurrences' handoffs: f32 or bf16 (as `build --handoffs bf16`).
    #[arg(long, value_enum, default_value = "f32")]
    handoffs: super::build::Handoffs,
}

pub fn bench(a: &BenchArgs) -> CliResult {
    if a.prompt_len == 0 || a.gen < 2 || a.batch == 0 {
        return Err("bench needs --prompt-len ≥ 1, --gen ≥ 2 and --batch ≥ 1".into());
    }
    let artifact = if a.model.join(PLAN_FILE).exists() {
        a.model.clone()
    } else {
        let target = super::device::target_for(a.device)?;
        let options = Options {
            max_batch: a.batch,
            max_context: a.prompt_len + a.gen,
            max_prefill_rows: 512.min(a.prompt_len + a.gen),
            keep_values: false,
            weights_bf16: target != lamina_targets::Target::Host,
            host_lanes: 1,
            // Host: no split; GPU: automatic.
            decode_splits: usize::from(target == lamina_targets::Target::Host),
            tensor_cores: target != lamina_targets::Target::Host,
            tf32_products: a.products == super::build::Products::Tf32,
            warpgroup_tiles: target == lamina_targets::Target::Sm90a,
            bf16_handoffs: a.handoffs == super::build::Handoffs::Bf16,
            bf16_caches: target != lamina_targets::Target::Host,
            strict_fp: false,
        };
        super::run::cached_build(&a.model, options, a.seed, target)?
    };
    if a.profile && a.device != Device::Host {
        return Err("--profile is for --device host (GPU kernel timing is not implemented)".into());
    }
    let load = Instant::now();
    let mut e = super::device::load(
        &artifact,
        a.weights.as_deref(),
        a.allow_weight_mismatch,
        a.device,
    )?;
    let load = load.elapsed();
    let limits = e.plan().limits;
    if a.batch > limits.max_batch || a.prompt_len + a.gen > limits.max_context {
        return Err(format!(
            "{} was built for --max-batch {} and --max-context {}; this bench needs {} and {}",
            artifact.display(),
            limits.max_batch,
            limits.max_context,
            a.batch,
            a.prompt_len + a.gen
        ));
    }
    let vocab = e.vocab() as i64;
    let prompt = |s: usize| -> Vec<i64> {
        (0..a.prompt_len as i64)
            .map(|i| (i * 7919 + 13 + s as i64 * 101) % vocab)
            .collect()
    };
    let err = |x: lamina_ir::Error| x.to_string();

    // The bandwidth is measured before and after the timed runs (best of both): this machine's
    // share of memory bandwidth varies with its neighbours.
    let ceilings = |dev: Device| -> Result<(f64, f64), String> {
        Ok(match dev {
            Device::Host => (
                memcpy_bandwidth(a.memcpy_mib << 20),
                read_bandwidth(a.memcpy_mib << 20),
            ),
            Device::Cuda => {
                // A copy reads and writes: as a read ceiling, the same figure.
                let (_, bw) = super::device::gpu_copy_bandwidth(a.memcpy_mib << 20)?;
                (bw, bw)
            }
        })
    };
    let (bw_before, read_before) = ceilings(a.device)?;
    // Warm-up: page the weights in and start the worker threads (capture the decode graph).
    e.reset(0).map_err(err)?;
    e.prefill(0, &prompt(0)[..a.prompt_len.min(16)])
        .map_err(err)?;
    e.decode(&[(0, 1)]).map_err(err)?;
    if a.profile {
        e.set_profiling(true).map_err(err)?;
    }

    let mut last = Vec::new();
    let t = Instant::now();
    for s in 0..a.batch {
        e.reset(s).map_err(err)?;
        let logits = e.prefill(s, &prompt(s)).map_err(err)?;
        last.push(argmax(&logits[logits.len() - vocab as usize..]) as i64);
    }
    let prefill = t.elapsed();
    let steps = a.gen - 1;
    let t = Instant::now();
    for _ in 0..steps {
        let batch: Vec<(usize, i64)> = last.iter().copied().enumerate().collect();
        let logits = e.decode(&batch).map_err(err)?;
        for (b, tok) in last.iter_mut().enumerate() {
            *tok = argmax(&logits[b * vocab as usize..(b + 1) * vocab as usize]) as i64;
        }
    }
    let decode = t.elapsed();

    let (bw_after, read_after) = ceilings(a.device)?;
    let (bw, read_bw) = (bw_after.max(bw_before), read_after.max(read_before));
    let cost = e.plan().cost;
    let mean_ctx = a.prompt_len + steps / 2;
    let step_bytes = cost.decode_weight_bytes
        + a.batch as u64 * (2 * cost.state_bytes_per_sequence)
        + a.batch as u64 * cost.cache_bytes_per_position * mean_ctx as u64;
    let step_s = decode.as_secs_f64() / steps as f64;
    let roofline_s = step_bytes as f64 / bw;
    let prefill_tps = (a.batch * a.prompt_len) as f64 / prefill.as_secs_f64();

    let (machine, copier) = match a.device {
        Device::Host => (
            format!("host: {}, {} threads", cpu_name(), Pool::global().threads()),
            format!("{} threads", Pool::global().threads()),
        ),
        Device::Cuda => {
            let (name, _) = super::device::gpu_copy_bandwidth(1 << 20)?;
            (
                format!("cuda: {name}, plan {}", e.plan().target),
                "device-to-device".to_string(),
            )
        }
    };
    println!(
        "bench {} ({machine}); prompt {}, gen {}, batch {}",
        e.plan().model.name,
        a.prompt_len,
        a.gen,
        a.batch
    );
    println!("  load       {}", secs(load));
    println!(
        "  prefill    {:>9.1} tokens/s  ({} tokens in {})",
        prefill_tps,
        a.batch * a.prompt_len,
        secs(prefill)
    );
    println!(
        "  decode     {:>9.1} tokens/s  ({} steps of {} in {}; {:.2} ms/step)",
        (a.batch * steps) as f64 / decode.as_secs_f64(),
        steps,
        a.batch,
        secs(decode),
        step_s * 1e3
    );
    println!(
        "  planned    {} per decode step: weights {}, state {} read+written, cache {} ({} B/position × {} positions, mean)",
        mb(step_bytes as f64),
        mb(cost.decode_weight_bytes as f64),
        mb((2 * a.batch as u64 * cost.state_bytes_per_sequence) as f64),
        mb((a.batch as u64 * cost.cache_bytes_per_position * mean_ctx as u64) as f64),
        a.batch as u64 * cost.cache_bytes_per_position,
        mean_ctx
    );
    println!(
        "  memcpy     {:.2} GB/s ({} MiB, {copier}, best of 5 before and 5 after; read + write bytes)",
        bw / 1e9,
        a.memcpy_mib,
    );
    println!(
        "  roofline   decode step ≥ {:.2} ms at memcpy bandwidth; achieved {:.2} GB/s = {:.0}% of it",
        roofline_s * 1e3,
        step_bytes as f64 / step_s / 1e9,
        100.0 * roofline_s / step_s
    );
    if a.device == Device::Host {
        println!(
            "  read       {:.2} GB/s streaming reads ({} MiB, {copier}); decode achieves {:.0}% of it",
            read_bw / 1e9,
            a.memcpy_mib,
            100.0 * (step_bytes as f64 / step_s) / read_bw
        );
    }
    if a.profile {
        for (phase, decode) in [("prefill", false), ("decode", true)] {
            let p = e.profile(decode);
            let total: Duration = p.iter().map(|k| k.total).sum();
            println!("  {phase} kernels (total {}):", secs(total));
            for k in p.iter().take(12) {
                println!(
                    "    {:>5.1}%  {:>9.3} ms  {:>5} launches  {}",
                    100.0 * k.total.as_secs_f64() / total.as_secs_f64(),
                    k.total.as_secs_f64() * 1e3,
                    k.launches,
                    k.kernel
                );
            }
        }
    }
    if a.reference {
        let source = e.plan().model.source.clone();
        reference_prefill(a, &source, &prompt(0), prefill_tps)?;
    }
    Ok(())
}

/// Times the reference executor's f32 prefill of the same prompt.
fn reference_prefill(a: &BenchArgs, source: &str, prompt: &[i64], compiled_tps: f64) -> CliResult {
    let path = if a.model.join(PLAN_FILE).exists() {
        Path::new(source).to_path_buf()
    } else {
        a.model.clone()
    };
    let m = Model::open(&path).map_err(|e| e.to_string())?;
    let w = m.weights(a.seed).map_err(|e| e.to_string())?;
    let r = Reference::<f32>::new(&m.graph, &w);
    let mut sess = r.new_session();
    let t = Instant::now();
    r.forward(&mut sess, prompt, &[])
        .map_err(|e| e.to_string())?;
    let took = t.elapsed();
    let tps = prompt.len() as f64 / took.as_secs_f64();
    println!(
        "  reference  {:>9.1} tokens/s  (f32 prefill of {} tokens in {}); compiled prefill is {:.1}× faster",
        tps,
        prompt.len(),
        secs(took),
        compiled_tps / tps
    );
    Ok(())
}

/// Bytes moved per second (read + write) by copying `bytes` with every worker thread.
fn memcpy_bandwidth(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let pool = Pool::global();
    let chunk = bytes.div_ceil(pool.threads()).max(1);
    let dst_ptr = dst.as_mut_ptr() as usize;
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        pool.run(&|t, _| {
            let lo = (t * chunk).min(bytes);
            let hi = ((t + 1) * chunk).min(bytes);
            // SAFETY: threads write disjoint ranges of `dst`, which outlives the run.
            let d =
                unsafe { std::slice::from_raw_parts_mut((dst_ptr as *mut u8).add(lo), hi - lo) };
            d.copy_from_slice(&src[lo..hi]);
        });
        best = best.min(t.elapsed());
    }
    std::hint::black_box(&dst);
    2.0 * bytes as f64 / best.as_secs_f64()
}

/// Bytes read per second by summing `bytes` with every worker thread (best of 5): decode is
/// almost all reads, and a copy also pays write-allocate traffic it does not count.
fn read_bandwidth(bytes: usize) -> f64 {
    let words = vec![1u64; bytes / 8];
    let pool = Pool::global();
    let chunk = words.len().div_ceil(pool.threads()).max(1);
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let total = std::sync::atomic::AtomicU64::new(0);
        pool.run(&|t, _| {
            let lo = (t * chunk).min(words.len());
            let hi = ((t + 1) * chunk).min(words.len());
            let s = words[lo..hi].iter().fold(0u64, |a, &w| a.wrapping_add(w));
            total.fetch_add(s, std::sync::atomic::Ordering::Relaxed);
        });
        best = best.min(t.elapsed());
        std::hint::black_box(total.into_inner());
    }
    (words.len() * 8) as f64 / best.as_secs_f64()
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn mb(b: f64) -> String {
    format!("{:.2} MB", b / 1e6)
}
