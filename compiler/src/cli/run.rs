use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clap::Args;
use lamina_ir::model::Model;
use lamina_runtime::reference::{Generation, Real, Reference};
use safetensors::tensor::{Dtype, TensorView};

use super::{CliResult, Precision};

#[derive(Args)]
pub struct RunArgs {
    /// An artifact directory (from `build`), a spec or a checkpoint directory (compiled for the
    /// host into the cache first).
    model: PathBuf,
    /// Run the reference executor (the golden model) instead of a compiled plan.
    #[arg(long)]
    reference: bool,
    /// Where the compiled plan runs (a model path is compiled for it first).
    #[arg(long, value_enum, default_value = "host")]
    device: super::device::Device,
    /// Where the checkpoint's safetensors files are (default: where the plan was built from).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Run even if a checkpoint file's header changed since the plan was built.
    #[arg(long)]
    allow_weight_mismatch: bool,
    #[command(flatten)]
    sizes: super::build::SizeArgs,
    /// Prompt token ids, comma-separated (e.g. 1,2,3).
    #[arg(
        long,
        allow_hyphen_values = true,
        required_unless_present = "prompt",
        conflicts_with = "prompt"
    )]
    tokens: Option<String>,
    /// The prompt as text, tokenized with the checkpoint's tokenizer.json; the generated text
    /// is streamed (greedy).
    #[arg(long)]
    prompt: Option<String>,
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
    if a.max_new_tokens == 0 {
        return Err("--max-new-tokens must be at least 1".into());
    }
    if let Some(prompt) = &a.prompt {
        return run_text(a, prompt);
    }
    let tokens = parse_tokens(a.tokens.as_deref().unwrap_or_default())?;
    if !a.reference {
        return run_compiled(a, &tokens);
    }
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

fn run_compiled(a: &RunArgs, tokens: &[i64]) -> CliResult {
    if a.precision != Precision::F32 {
        return Err("compiled plans run in f32; --precision f64 needs --reference".into());
    }
    let artifact = artifact_for(&a.model, &a.sizes, a.seed, a.device)?;
    let mut e = super::device::load(
        &artifact,
        a.weights.as_deref(),
        a.allow_weight_mismatch,
        a.device,
    )?;
    let prefill = super::ui::bar(tokens.len(), "prefill");
    e.set_prefill_progress(Box::new(super::ui::track(&prefill)));
    let need = tokens.len() + a.max_new_tokens - 1;
    let max_context = e.plan().limits.max_context;
    if need > max_context {
        return Err(format!(
            "the prompt and {} new tokens need {need} positions; {} was built with --max-context {max_context}",
            a.max_new_tokens,
            artifact.display(),
        ));
    }
    let gens = e.generate(&[tokens.to_vec()], a.max_new_tokens);
    prefill.finish_and_clear();
    let mut gens = gens.map_err(|e| e.to_string())?;
    let g = gens.pop().expect("one sequence");
    let toks: Vec<String> = g.tokens.iter().map(|t| t.to_string()).collect();
    println!("{}", toks.join(","));
    if let Some(path) = &a.logits_out {
        let vocab = e.vocab();
        write_logits_raw(path, &g.prefill_logits, &g.decode_logits, vocab, &g.tokens)?;
    }
    Ok(())
}

/// `run --prompt`: greedy text generation, streamed; the reference executor prints the text
/// at the end.
fn run_text(a: &RunArgs, prompt: &str) -> CliResult {
    let text = super::generate::text_model(&a.model, None)?;
    let ids = text.encode(prompt)?;
    if a.reference {
        let m = Model::open(&a.model).map_err(|e| e.to_string())?;
        let w = m.weights(a.seed).map_err(|e| e.to_string())?;
        let r = Reference::<f64>::new(&m.graph, &w);
        let g = r
            .generate(&ids, a.max_new_tokens)
            .map_err(|e| e.to_string())?;
        let upto = g
            .tokens
            .iter()
            .position(|t| text.eos.contains(t))
            .unwrap_or(g.tokens.len());
        println!("{}", text.decode(&g.tokens[..upto])?);
        return Ok(());
    }
    if a.precision != Precision::F32 {
        return Err("compiled plans run in f32; --precision f64 needs --reference".into());
    }
    let artifact = artifact_for(&a.model, &a.sizes, a.seed, a.device)?;
    let mut greedy = super::generate::Sampler::new(0.0, 1.0, 0)?;
    let e = super::device::load(
        &artifact,
        a.weights.as_deref(),
        a.allow_weight_mismatch,
        a.device,
    )?;
    let s = super::generate::stream(e, &artifact, &text, &ids, a.max_new_tokens, &mut greedy)?;
    if let Some(path) = &a.logits_out {
        let vocab = s.prefill_logits.len() / ids.len();
        // Tokens as chosen, a final EOS included, row for row with decode_logits.
        let mut chosen = s.tokens.clone();
        chosen.extend(s.eos);
        write_logits_raw(path, &s.prefill_logits, &s.decode_logits, vocab, &chosen)?;
    }
    Ok(())
}

/// The artifact of a model path: itself when it is one, else compiled for `device` into the
/// cache.
pub fn artifact_for(
    model: &Path,
    sizes: &super::build::SizeArgs,
    seed: u64,
    device: super::device::Device,
) -> Result<PathBuf, String> {
    if model.join(lamina_ir::plan::PLAN_FILE).exists() {
        Ok(model.to_path_buf())
    } else {
        let target = super::device::target_for(device)?;
        cached_build(model, sizes.options_for(target)?, seed, target)
    }
}

/// Compiles a model path for `target` into `$LAMINA_CACHE_DIR` (default
/// `$HOME/.cache/lamina`), keyed by the model description, sizes, seed, target and compiler
/// build.
pub fn cached_build(
    model: &Path,
    options: crate::passes::Options,
    seed: u64,
    target: lamina_targets::Target,
) -> Result<PathBuf, String> {
    use sha2::{Digest, Sha256};
    let m = Model::open(model).map_err(|e| e.to_string())?;
    let mut h = Sha256::new();
    h.update(crate::build::hash_source(&m).map_err(|e| e.to_string())?);
    // The compiler build: a rebuilt compiler must not reuse artifacts of the previous one.
    let exe = std::env::current_exe()
        .and_then(std::fs::metadata)
        .map(|m| format!("{}:{:?}", m.len(), m.modified().ok()))
        .unwrap_or_default();
    h.update(format!(
        "{:?}|{}|{}|{}|{}|{}",
        options,
        seed,
        target,
        env!("CARGO_PKG_VERSION"),
        exe,
        std::fs::canonicalize(model)
            .unwrap_or(model.to_path_buf())
            .display()
    ));
    let key = format!("{:x}", h.finalize());
    let root = match std::env::var_os("LAMINA_CACHE_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into()))
            .join(".cache/lamina"),
    };
    let dir = root.join(&key[..16]);
    if !dir.join(lamina_ir::plan::PLAN_FILE).exists() {
        tracing::info!("compiling {} into {}", model.display(), dir.display());
        super::build::build_shown(&m, &dir, target, options, seed)?;
    }
    Ok(dir)
}

/// Writes the logits file atomically (temporary file, then rename).
fn write_logits<F: Real>(path: &Path, g: &Generation<F>) -> CliResult {
    let f32s = |v: &[F]| -> Vec<f32> { v.iter().map(|x| x.to_f32().unwrap_or(f32::NAN)).collect() };
    write_logits_raw(
        path,
        &f32s(&g.prefill_logits.data),
        &f32s(&g.decode_logits.data),
        g.prefill_logits.cols,
        &g.tokens,
    )
}

fn write_logits_raw(
    path: &Path,
    prefill: &[f32],
    decode: &[f32],
    vocab: usize,
    tokens: &[i64],
) -> CliResult {
    let bytes_of = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let pre = bytes_of(prefill);
    let dec = bytes_of(decode);
    let toks: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    let err = |e: safetensors::SafeTensorError| format!("{}: {e:?}", path.display());
    let mut tensors = HashMap::new();
    tensors.insert(
        "prefill_logits",
        TensorView::new(Dtype::F32, vec![prefill.len() / vocab, vocab], &pre).map_err(err)?,
    );
    tensors.insert(
        "decode_logits",
        TensorView::new(Dtype::F32, vec![decode.len() / vocab, vocab], &dec).map_err(err)?,
    );
    tensors.insert(
        "tokens",
        TensorView::new(Dtype::I64, vec![tokens.len()], &toks).map_err(err)?,
    );
    let bytes = safetensors::serialize(tensors, None).map_err(err)?;
    let tmp = path.with_extension("safetensors.partial");
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}
