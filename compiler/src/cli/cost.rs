//! The cost report (`report`'s first part, `compare`): memory, traffic and FLOPs per token from
//! the graph (`lamina_ir::cost`), with roofline bounds on a named GPU.

use std::path::{Path, PathBuf};

use clap::Args;
use lamina_ir::cost::{cost, gpu, Cost, Gpu, GPUS};
use lamina_ir::model::Model;

use super::check::bytes;
use super::CliResult;

/// The operating point and the hardware of a cost report.
#[derive(Args, Clone)]
pub struct CostArgs {
    /// Sequences served together.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Tokens of context per sequence (cache size, decode attention span, prefill length).
    #[arg(long, default_value_t = 32768)]
    pub context: usize,
    /// GPU for the roofline bound: a100, h100, h200, b200, l40s.
    #[arg(long)]
    pub gpu: Option<String>,
    /// Measured memory bandwidth in GB/s (replaces the GPU's spec figure).
    #[arg(long)]
    pub bandwidth: Option<f64>,
    /// Measured dense bf16 throughput in TFLOP/s (replaces the GPU's spec figure).
    #[arg(long)]
    pub flops: Option<f64>,
    /// Print the cost as JSON (stable field order) instead of text.
    #[arg(long)]
    pub json: bool,
}

impl CostArgs {
    pub fn gpu(&self) -> Result<Option<Gpu>, String> {
        let mut g = match &self.gpu {
            None if self.bandwidth.is_none() && self.flops.is_none() => return Ok(None),
            None => Gpu {
                name: "custom",
                memory: u64::MAX,
                bandwidth: f64::NAN,
                flops: f64::NAN,
                f32_flops: f64::NAN,
                source: "--bandwidth / --flops (CUDA-core FP32 taken at H100's ratio to BF16)",
            },
            Some(name) => gpu(name).ok_or_else(|| {
                let known: Vec<&str> = GPUS.iter().map(|g| g.name).collect();
                format!("--gpu {name:?}: expected one of {}", known.join(", "))
            })?,
        };
        for (flag, v) in [("--bandwidth", self.bandwidth), ("--flops", self.flops)] {
            if let Some(x) = v {
                if !(x.is_finite() && x > 0.0) {
                    return Err(format!("{flag} must be a positive number, got {x}"));
                }
            }
        }
        if let Some(bw) = self.bandwidth {
            g.bandwidth = bw * 1e9;
        }
        if let Some(fl) = self.flops {
            // A measured tensor throughput scales the CUDA cores' ceiling alike; a custom GPU
            // gets H100's ratio (67 / 989).
            let ratio = if g.flops.is_nan() {
                67.0 / 989.0
            } else {
                g.f32_flops / g.flops
            };
            g.flops = fl * 1e12;
            g.f32_flops = g.flops * ratio;
        }
        if g.bandwidth.is_nan() || g.flops.is_nan() {
            return Err("without --gpu, give both --bandwidth and --flops".into());
        }
        Ok(Some(g))
    }

    pub fn check(&self) -> CliResult {
        if self.batch == 0 || self.context == 0 {
            return Err("--batch and --context must be at least 1".into());
        }
        Ok(())
    }
}

pub fn model_cost(path: &Path, a: &CostArgs) -> Result<Cost, String> {
    a.check()?;
    let m = Model::open(path).map_err(|e| e.to_string())?;
    Ok(cost(&m.graph, a.batch, a.context, a.gpu()?))
}

fn gb(x: f64) -> String {
    if x >= 1e9 {
        format!("{:.2} GB", x / 1e9)
    } else {
        format!("{:.2} MB", x / 1e6)
    }
}

fn gflop(x: f64) -> String {
    format!("{:.2} GFLOP", x / 1e9)
}

fn rate(x: f64) -> String {
    if x >= 1e4 {
        format!("{:.0}", x)
    } else {
        format!("{:.1}", x)
    }
}

/// The text form of one model's cost.
pub fn print_cost(c: &Cost) {
    println!(
        "cost of {} at batch {}, context {} (weights and caches in their dtypes, state f32)",
        c.model, c.batch, c.context
    );
    let kinds: Vec<String> = c
        .weight_bytes_by_kind
        .iter()
        .map(|(k, b)| format!("{k} {}", bytes(*b)))
        .collect();
    println!(
        "  weights        {} ({})",
        bytes(c.weight_bytes),
        kinds.join(", ")
    );
    println!(
        "  per sequence   recurrent state {}, conv state {}",
        bytes(c.recurrent_state_bytes),
        bytes(c.conv_state_bytes)
    );
    println!(
        "  cache          {} per token, {} at {} tokens",
        bytes(c.cache_bytes_per_token),
        bytes(c.cache_bytes_at_context),
        c.context
    );
    println!(
        "  memory         {} at batch {}",
        bytes(c.total_memory),
        c.batch
    );
    println!(
        "  decode/token   {} read, {}",
        gb(c.decode_bytes_per_token as f64),
        gflop(c.decode_flops_per_token as f64)
    );
    println!(
        "  prefill/token  {}",
        gflop(c.prefill_flops_per_token as f64)
    );
    match c.crossover_context {
        Some(n) => println!(
            "  crossover      cache reads exceed state traffic beyond {n} tokens of context"
        ),
        None => println!("  crossover      none (no recurrent state, or no cache)"),
    }
    if let Some(b) = &c.gpu {
        println!(
            "  roofline {}  decode {} tokens/s ({}-bound), prefill {} tokens/s [{:.2} TB/s, {:.0} TFLOP/s]{}",
            b.gpu,
            rate(b.decode_tokens_per_s),
            b.decode_bound,
            rate(b.prefill_tokens_per_s),
            b.bandwidth / 1e12,
            b.flops / 1e12,
            if b.fits { "" } else { "; DOES NOT FIT in its memory" }
        );
    }
}

#[derive(Args)]
pub struct CompareArgs {
    /// Two or more models (specs or checkpoint directories).
    #[arg(required = true, num_args = 2..)]
    models: Vec<PathBuf>,
    #[command(flatten)]
    cost: CostArgs,
}

/// Several models side by side: the table an architecture comparison needs.
pub fn compare(a: &CompareArgs) -> CliResult {
    let costs = a
        .models
        .iter()
        .map(|p| model_cost(p, &a.cost))
        .collect::<Result<Vec<_>, _>>()?;
    if a.cost.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&costs).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    let mut rows: Vec<(String, Vec<String>)> = vec![
        (
            "weights".into(),
            costs.iter().map(|c| bytes(c.weight_bytes)).collect(),
        ),
        (
            "recurrent state / seq".into(),
            costs
                .iter()
                .map(|c| bytes(c.recurrent_state_bytes))
                .collect(),
        ),
        (
            "conv state / seq".into(),
            costs.iter().map(|c| bytes(c.conv_state_bytes)).collect(),
        ),
        (
            "cache / token".into(),
            costs
                .iter()
                .map(|c| bytes(c.cache_bytes_per_token))
                .collect(),
        ),
        (
            format!("cache @ {}", a.cost.context),
            costs
                .iter()
                .map(|c| bytes(c.cache_bytes_at_context))
                .collect(),
        ),
        (
            format!("memory @ batch {}", a.cost.batch),
            costs.iter().map(|c| bytes(c.total_memory)).collect(),
        ),
        (
            "decode bytes / token".into(),
            costs
                .iter()
                .map(|c| gb(c.decode_bytes_per_token as f64))
                .collect(),
        ),
        (
            "decode FLOPs / token".into(),
            costs
                .iter()
                .map(|c| gflop(c.decode_flops_per_token as f64))
                .collect(),
        ),
        (
            "prefill FLOPs / token".into(),
            costs
                .iter()
                .map(|c| gflop(c.prefill_flops_per_token as f64))
                .collect(),
        ),
        (
            "crossover context".into(),
            costs
                .iter()
                .map(|c| c.crossover_context.map_or("-".into(), |n| n.to_string()))
                .collect(),
        ),
    ];
    if costs.iter().all(|c| c.gpu.is_some()) {
        let g = |c: &Cost| c.gpu.clone().expect("checked");
        rows.push((
            format!("fits {}", g(&costs[0]).gpu),
            costs
                .iter()
                .map(|c| if g(c).fits { "yes" } else { "no" }.to_string())
                .collect(),
        ));
        rows.push((
            "decode tokens/s bound".into(),
            costs
                .iter()
                .map(|c| format!("{} ({})", rate(g(c).decode_tokens_per_s), g(c).decode_bound))
                .collect(),
        ));
        rows.push((
            "prefill tokens/s bound".into(),
            costs
                .iter()
                .map(|c| rate(g(c).prefill_tokens_per_s))
                .collect(),
        ));
    }
    let names: Vec<String> = costs.iter().map(|c| c.model.clone()).collect();
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..costs.len())
        .map(|i| {
            rows.iter()
                .map(|r| r.1[i].len())
                .chain([names[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut line = format!("{:w0$}", "");
    for (n, w) in names.iter().zip(&widths) {
        line += &format!("  {n:>w$}");
    }
    println!("{line}");
    for (label, cells) in rows {
        let mut line = format!("{label:w0$}");
        for (c, w) in cells.iter().zip(&widths) {
            line += &format!("  {c:>w$}");
        }
        println!("{line}");
    }
    Ok(())
}
