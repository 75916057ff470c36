use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clap::Args;
use lamina_ir::model::Model;
use lamina_runtime::reference::{Generation, Real, Reference};
use safetensors::tensor::{Dtype, TensorView};

use super::{CliResult, Precision};

#[derive(Args)]
pub struct RunArgs {
    model: PathBuf,
    /// Run the reference executor (the golden model). Compiled plans are not implemented yet.
    #[arg(long)]
    reference: bool,
    /// Prompt token ids, comma-separated (e.g. 1,2,3).
    #[arg(long, required = true, allow_hyphen_values = true)]
    tokens: String,
    #[arg(long, default_value_t = 8)]
    max_new_tokens: usize,
    /// Write prefill_logits, decode_logits (f32) and tokens (i64) to this safetensors file.
    #[arg(long)]
    logits_out: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "f32")]
    precision: Precision,
    /// Seed for the random weights of a spec without a checkpoint.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(a: &RunArgs) -> CliResult {
    if !a.reference {
        return Err(
            "compiled plans cannot run yet (the compiler core is pending): pass --reference".into(),
        );
    }
    if a.max_new_tokens == 0 {
        return Err("--max-new-tokens must be at least 1".into());
    }
    let tokens = parse_tokens(&a.tokens)?;
    let m = Model::open(&a.model).map_err(|e| e.to_string())?;
    let weights = m.weights(a.seed).map_err(|e| e.to_string())?;
    match a.precision {
        Precision::F32 => go::<f32>(&m, &weights, &tokens, a),
        Precision::F64 => go::<f64>(&m, &weights, &tokens, a),
    }
}

/// `"1,2,3"` → ids; the vocabulary range is checked by the executor.
pub fn parse_tokens(s: &str) -> Result<Vec<i64>, String> {
    if s.trim().is_empty() {
        return Err("--tokens: the prompt is empty".into());
    }
    s.split(',')
        .enumerate()
        .map(|(i, t)| {
            t.trim().parse::<i64>().map_err(|_| {
                format!(
                    "--tokens: entry {i} ({:?}) is not an integer token id",
                    t.trim()
                )
            })
        })
        .collect()
}

fn go<F: Real>(
    m: &Model,
    w: &lamina_ir::weights::WeightStore,
    tokens: &[i64],
    a: &RunArgs,
) -> CliResult {
    let r = Reference::<F>::new(&m.graph, w);
    let gen = r
        .generate(tokens, a.max_new_tokens)
        .map_err(|e| e.to_string())?;
    let bad = gen
        .prefill_logits
        .data
        .iter()
        .chain(&gen.decode_logits.data)
        .any(|x| !x.is_finite());
    if bad {
        return Err("the model produced NaN or infinite logits".into());
    }
    let toks: Vec<String> = gen.tokens.iter().map(|t| t.to_string()).collect();
    println!("{}", toks.join(","));
    if let Some(path) = &a.logits_out {
        write_logits(path, &gen)?;
    }
    Ok(())
}

/// Writes the logits file atomically (temporary file, then rename).
fn write_logits<F: Real>(path: &Path, g: &Generation<F>) -> CliResult {
    let f32s = |v: &[F]| -> Vec<u8> {
        v.iter()
            .flat_map(|x| x.to_f32().unwrap_or(f32::NAN).to_le_bytes())
            .collect()
    };
    let pre = f32s(&g.prefill_logits.data);
    let dec = f32s(&g.decode_logits.data);
    let toks: Vec<u8> = g.tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    let vocab = g.prefill_logits.cols;
    let err = |e: safetensors::SafeTensorError| format!("{}: {e:?}", path.display());
    let mut tensors = HashMap::new();
    tensors.insert(
        "prefill_logits",
        TensorView::new(Dtype::F32, vec![g.prefill_logits.rows, vocab], &pre).map_err(err)?,
    );
    tensors.insert(
        "decode_logits",
        TensorView::new(Dtype::F32, vec![g.decode_logits.rows, vocab], &dec).map_err(err)?,
    );
    tensors.insert(
        "tokens",
        TensorView::new(Dtype::I64, vec![g.tokens.len()], &toks).map_err(err)?,
    );
    let bytes = safetensors::serialize(tensors, None).map_err(err)?;
    let tmp = path.with_extension("safetensors.partial");
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}
