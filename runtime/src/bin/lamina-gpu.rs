//! `lamina-gpu`: the GPU half of `scripts/gpu-check`, small enough to carry to a GPU machine
//! that has no Rust or LLVM (it links only the runtime; the CUDA driver is loaded at run time).
//!
//! - `lamina-gpu check ARTIFACT --tokens 1,2,3 --gen N --expected FILE`: greedy generation on
//!   the GPU against the host executor's `--logits-out` file of the same prompt (prefill and
//!   decode logits, tokens), with the arena poisoned first; then the same prompt and a second
//!   one decoded together (a replayed batch-2 graph) against each alone.
//! - `lamina-gpu bench ARTIFACT --prompt-len P --gen N --batch B`: prefill and decode timing,
//!   read against the plan's bytes per decode step and the measured copy bandwidth.
//! - `lamina-gpu copy --mib M`: device-to-device copy bandwidth.
//!
//! Every result is one line starting with `RESULT` (parsed by the script's table).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use lamina_runtime::cuda::{copy_bandwidth, CudaEngine};
use lamina_runtime::reference::argmax;
use lamina_runtime::{compare_generations, Executor, Generation};

#[derive(Parser)]
#[command(
    name = "lamina-gpu",
    about = "Lamina's GPU checks and benchmarks (CUDA executor)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Check {
        artifact: PathBuf,
        /// Where the checkpoint's safetensors files are (default: where the plan was built from).
        #[arg(long)]
        weights: Option<PathBuf>,
        #[arg(long)]
        tokens: String,
        #[arg(long, default_value_t = 6)]
        gen: usize,
        /// `compile-model run --logits-out` of the host plan for the same prompt.
        #[arg(long)]
        expected: PathBuf,
        #[arg(long, default_value_t = 1e-4)]
        tol: f64,
    },
    Bench(BenchArgs),
    Copy {
        #[arg(long, default_value_t = 2048)]
        mib: usize,
    },
    /// One kernel of a plan timed alone (the first whose name contains NAME).
    Kernel {
        artifact: PathBuf,
        name: String,
        #[arg(long)]
        rows: usize,
        /// Positions every row attends up to (decode attention); default: 0, 1, 2, ...
        #[arg(long)]
        pos: Option<usize>,
        #[arg(long, default_value_t = 10)]
        iters: usize,
    },
}

#[derive(clap::Args)]
struct BenchArgs {
    artifact: PathBuf,
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Prompt tokens prefilled per sequence (timed); 0 skips the prefill.
    #[arg(long, default_value_t = 512)]
    prompt_len: usize,
    /// Tokens generated per sequence (the first from the prefill).
    #[arg(long, default_value_t = 64)]
    gen: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Decode from this position (the cache past the prompt holds zeros): long-context decode
    /// without prefilling it. Default: right after the prompt.
    #[arg(long)]
    context: Option<usize>,
    /// Fill a native spec's random weights on the device (full-size plans).
    #[arg(long)]
    device_weights: bool,
    /// More decode measurements after the first, in the same process (the weights loaded
    /// once): `CONTEXT:BATCH` pairs, comma-separated, e.g. `4096:1,4096:8,32768:1`.
    #[arg(long, value_delimiter = ',')]
    decode_at: Vec<String>,
    #[arg(long, default_value_t = 2048)]
    copy_mib: usize,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.cmd {
        Cmd::Check {
            artifact,
            weights,
            tokens,
            gen,
            expected,
            tol,
        } => check(&artifact, weights, &tokens, gen, &expected, tol),
        Cmd::Bench(a) => bench(&a),
        Cmd::Kernel {
            artifact,
            name,
            rows,
            pos,
            iters,
        } => {
            let b = lamina_runtime::cuda::bench_kernel(&artifact, &name, rows, pos, iters)
                .map_err(|e| e.to_string())?;
            println!(
                "RESULT kernel {} rows {}{}: {:.3} ms/launch, buffers {:.2} GB, {:.1} GB/s over them",
                b.kernel,
                b.rows,
                pos.map(|p| format!(" pos {p}")).unwrap_or_default(),
                b.seconds * 1e3,
                b.footprint as f64 / 1e9,
                b.footprint as f64 / b.seconds / 1e9
            );
            Ok(())
        }
        Cmd::Copy { mib } => {
            let bw = copy_bandwidth(mib << 20).map_err(|e| e.to_string())?;
            println!("RESULT copy {mib} MiB: {:.1} GB/s (read + write)", bw / 1e9);
            Ok(())
        }
    }
}

fn load(artifact: &std::path::Path, weights: Option<PathBuf>) -> Result<CudaEngine, String> {
    CudaEngine::load(artifact, weights.as_deref())
        .map_err(|e| format!("{}: {e}", artifact.display()))
}

fn check(
    artifact: &std::path::Path,
    weights: Option<PathBuf>,
    tokens: &str,
    gen: usize,
    expected: &std::path::Path,
    tol: f64,
) -> Result<(), String> {
    let prompt: Vec<i64> = tokens
        .split(',')
        .map(|t| {
            t.trim()
                .parse()
                .map_err(|_| format!("--tokens: bad id {t:?}"))
        })
        .collect::<Result<_, _>>()?;
    let mut e = load(artifact, weights)?;
    e.poison_every_run(true);
    let v = e.vocab();
    let want = read_expected(expected)?;
    let got = e
        .generate(std::slice::from_ref(&prompt), gen)
        .map_err(|e| e.to_string())?;
    let name = e.plan.model.name.clone();
    let (pre, dec) = compare_generations(&got, &[want], v, tol)
        .map_err(|m| format!("{name} ({}) against the host: {m}", e.plan.target))?;
    // Two sequences decoded together (batch-2 graph) against each alone (batch-1 graph).
    let other: Vec<i64> = prompt
        .iter()
        .rev()
        .take(prompt.len().min(41))
        .copied()
        .collect();
    let together = e
        .generate(&[prompt.clone(), other.clone()], gen)
        .map_err(|e| e.to_string())?;
    let mut alone = Vec::new();
    for p in [prompt, other] {
        alone.extend(e.generate(&[p], gen).map_err(|e| e.to_string())?);
    }
    let (bpre, bdec) = compare_generations(&together, &alone, v, tol)
        .map_err(|m| format!("{name}: batched decode against single sequences: {m}"))?;
    println!(
        "RESULT check {name} {}: vs host prefill {pre:.2e} decode {dec:.2e}; batch-2 vs alone {bpre:.2e} / {bdec:.2e} (tol {tol:.0e})",
        e.plan.target
    );
    Ok(())
}

fn read_expected(path: &std::path::Path) -> Result<Generation, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("{}: {e:?}", path.display()))?;
    let f32s = |name: &str| -> Result<Vec<f32>, String> {
        let t = st
            .tensor(name)
            .map_err(|e| format!("{}: {name}: {e:?}", path.display()))?;
        Ok(t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    let t = st
        .tensor("tokens")
        .map_err(|e| format!("{}: tokens: {e:?}", path.display()))?;
    let tokens = t
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    Ok(Generation {
        prefill_logits: f32s("prefill_logits")?,
        decode_logits: f32s("decode_logits")?,
        tokens,
    })
}

fn bench(a: &BenchArgs) -> Result<(), String> {
    let (batch, gen) = (a.batch, a.gen);
    let load = Instant::now();
    let mut e = CudaEngine::load_with(
        &a.artifact,
        a.weights.as_deref(),
        false,
        a.device_weights,
        &|_, _| {},
    )
    .map_err(|e| format!("{}: {e}", a.artifact.display()))?;
    let load = load.elapsed().as_secs_f64();
    let limits = e.plan.limits;
    let start = a.context.unwrap_or(a.prompt_len);
    if batch == 0
        || batch > limits.max_batch
        || start + gen > limits.max_context
        || gen < 2
        || a.prompt_len > start
    {
        return Err(format!(
            "{} holds batch {} and {} positions; asked for batch {batch}, prompt {} and decode from {start} for {gen} (gen ≥ 2)",
            a.artifact.display(),
            limits.max_batch,
            limits.max_context,
            a.prompt_len
        ));
    }
    // The extra decode measurements, checked before any work.
    let mut extra = Vec::new();
    for spec in &a.decode_at {
        let parsed = spec
            .split_once(':')
            .and_then(|(c, b)| Some((c.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
        match parsed {
            Some((c, b)) if b >= 1 && b <= limits.max_batch && c + gen <= limits.max_context => {
                extra.push((c, b))
            }
            _ => {
                return Err(format!(
                    "--decode-at {spec}: expected CONTEXT:BATCH with batch 1..={} and context + gen ≤ {}",
                    limits.max_batch, limits.max_context
                ))
            }
        }
    }
    let err = |x: lamina_ir::Error| x.to_string();
    let v = e.vocab();
    let prompt = |s: usize, len: usize| -> Vec<i64> {
        (0..len)
            .map(|i| ((i * 7919 + 13 + s * 101) % v) as i64)
            .collect()
    };
    // Warm-up: JIT, first-touch, the decode graph of `batch` sequences.
    let warm: Vec<(usize, i64)> = (0..batch).map(|s| (s, 1)).collect();
    for &(s, _) in &warm {
        e.reset(s).map_err(err)?;
        e.prefill(s, &prompt(s, 4)).map_err(err)?;
    }
    e.decode(&warm).map_err(err)?;
    let name = format!("{} {}", e.plan.model.name, e.plan.target);
    let mut last: Vec<i64> = (0..batch).map(|s| (s as i64 * 31 + 7) % v as i64).collect();
    for s in 0..batch {
        e.reset(s).map_err(err)?;
    }
    if a.prompt_len > 0 {
        let t = Instant::now();
        for (s, tok) in last.iter_mut().enumerate() {
            let logits = e.prefill(s, &prompt(s, a.prompt_len)).map_err(err)?;
            *tok = argmax(&logits[logits.len() - v..]) as i64;
        }
        let prefill = t.elapsed().as_secs_f64();
        println!(
            "RESULT prefill {name} batch {batch} prompt {}: {:.3} ms, {:.0} tokens/s (load {load:.1} s, {})",
            a.prompt_len,
            prefill * 1e3,
            (batch * a.prompt_len) as f64 / prefill,
            e.image
        );
    }
    let bw = copy_bandwidth(a.copy_mib << 20).map_err(err)?;
    decode_timed(&mut e, &name, (start, gen), last, bw)?;
    for (context, b) in extra {
        // The first step of a new batch size captures its graph: untimed.
        let first: Vec<i64> = (0..b).map(|s| (s as i64 * 31 + 7) % v as i64).collect();
        for s in 0..b {
            e.positions_mut()[s] = context;
        }
        let warm: Vec<(usize, i64)> = first.iter().copied().enumerate().collect();
        e.decode(&warm).map_err(err)?;
        decode_timed(&mut e, &name, (context, gen), first, bw)?;
    }
    Ok(())
}

/// `gen − 1` timed decode steps of the sequences `0..last.len()` from position `start`, their
/// tokens fed back, reported against the roofline at copy bandwidth `bw`.
fn decode_timed(
    e: &mut CudaEngine,
    name: &str,
    (start, gen): (usize, usize),
    mut last: Vec<i64>,
    bw: f64,
) -> Result<(), String> {
    let err = |x: lamina_ir::Error| x.to_string();
    let (v, batch) = (e.vocab(), last.len());
    for s in 0..batch {
        e.positions_mut()[s] = start;
    }
    let steps = gen - 1;
    let t = Instant::now();
    for _ in 0..steps {
        let b: Vec<(usize, i64)> = last.iter().copied().enumerate().collect();
        let logits = e.decode(&b).map_err(err)?;
        for (i, tok) in last.iter_mut().enumerate() {
            *tok = argmax(&logits[i * v..(i + 1) * v]) as i64;
        }
    }
    let step = t.elapsed().as_secs_f64() / steps as f64;
    let c = e.plan.cost;
    let mean_ctx = (start + steps / 2) as u64;
    let bytes = c.decode_weight_bytes
        + batch as u64 * 2 * c.state_bytes_per_sequence
        + batch as u64 * c.cache_bytes_per_position * mean_ctx;
    let roofline = bytes as f64 / bw;
    println!(
        "RESULT decode {name} batch {batch} context {mean_ctx}: {:.3} ms/step, {:.1} tokens/s, {:.1} GB/s, roofline {:.3} ms at {:.0} GB/s copy, {:.1}%",
        step * 1e3,
        batch as f64 / step,
        bytes as f64 / step / 1e9,
        roofline * 1e3,
        bw / 1e9,
        100.0 * roofline / step
    );
    Ok(())
}
