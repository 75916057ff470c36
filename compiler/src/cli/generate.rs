//! Text in, text out: `compile-model generate` (and `run --prompt`) tokenize the prompt with
//! the checkpoint's `tokenizer.json`, run the compiled plan, and stream the generated text token
//! by token until `--max-new-tokens` or an end-of-sequence id from `config.json` /
//! `generation_config.json`. Greedy by default; `--temperature` and `--top-p` sample, seeded.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use lamina_ir::plan::{Plan, PLAN_FILE};
use lamina_runtime::reference::argmax;
use rand::{Rng, SeedableRng};
use tokenizers::Tokenizer;

use super::build::SizeArgs;
use super::CliResult;

#[derive(Args)]
pub struct GenerateArgs {
    /// An artifact directory, or a checkpoint directory (compiled for the host first).
    model: PathBuf,
    /// The prompt, as text.
    #[arg(long)]
    prompt: String,
    /// Where the compiled plan runs (a checkpoint is compiled for it first).
    #[arg(long, value_enum, default_value = "host")]
    device: super::device::Device,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 picks the most likely token (greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches this.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Seed of the sampler (and of the random weights of a spec).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// tokenizer.json to use (default: the one in the checkpoint directory).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Where the checkpoint's safetensors files are (default: where the plan was built from).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Run even if a checkpoint file's header changed since the plan was built.
    #[arg(long)]
    allow_weight_mismatch: bool,
    #[command(flatten)]
    sizes: SizeArgs,
}

/// The text side of a model: its tokenizer and end-of-sequence ids.
pub struct TextModel {
    pub tokenizer: Tokenizer,
    pub path: PathBuf,
    pub eos: Vec<i64>,
}

/// The directory a model path's text files live in: the checkpoint directory itself, or the
/// one an artifact was built from.
fn source_dir(model: &Path) -> Option<PathBuf> {
    if model.join(PLAN_FILE).exists() {
        let plan = Plan::load(model).ok()?;
        let src = PathBuf::from(plan.model.source);
        return src.is_dir().then_some(src);
    }
    model.is_dir().then(|| model.to_path_buf())
}

/// Loads the tokenizer (explicit, or `tokenizer.json` beside the checkpoint) and the EOS ids.
pub fn text_model(model: &Path, explicit: Option<&Path>) -> Result<TextModel, String> {
    let dir = source_dir(model);
    let path = match (explicit, &dir) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(d)) => d.join("tokenizer.json"),
        (None, None) => {
            return Err(format!(
            "--prompt needs a tokenizer: {} is not a checkpoint directory with a tokenizer.json \
                 (pass --tokenizer FILE, or give token ids with --tokens)",
            model.display()
        ))
        }
    };
    if !path.exists() {
        return Err(format!(
            "{}: no tokenizer.json, so --prompt cannot be tokenized (pass --tokenizer FILE, or \
             give token ids with --tokens)",
            path.display()
        ));
    }
    let tokenizer = Tokenizer::from_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut eos = Vec::new();
    for name in ["generation_config.json", "config.json"] {
        let Some(p) = dir.as_ref().map(|d| d.join(name)) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
        match &v["eos_token_id"] {
            serde_json::Value::Number(n) => eos.extend(n.as_i64()),
            serde_json::Value::Array(a) => eos.extend(a.iter().filter_map(|x| x.as_i64())),
            _ => {}
        }
    }
    eos.sort();
    eos.dedup();
    Ok(TextModel {
        tokenizer,
        path,
        eos,
    })
}

impl TextModel {
    pub fn encode(&self, prompt: &str) -> Result<Vec<i64>, String> {
        let enc = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| format!("{}: cannot encode the prompt: {e}", self.path.display()))?;
        let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
        if ids.is_empty() {
            return Err("--prompt: the prompt encodes to no tokens".into());
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[i64]) -> Result<String, String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tokenizer
            .decode(&ids, true)
            .map_err(|e| format!("{}: cannot decode: {e}", self.path.display()))
    }
}

/// Picks the next token: greedy at temperature 0, else temperature + nucleus sampling.
pub struct Sampler {
    temperature: f64,
    top_p: f64,
    rng: rand_chacha::ChaCha8Rng,
}

impl Sampler {
    pub fn new(temperature: f64, top_p: f64, seed: u64) -> Result<Sampler, String> {
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(format!("--temperature must be ≥ 0, got {temperature}"));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(format!("--top-p must be in (0, 1], got {top_p}"));
        }
        Ok(Sampler {
            temperature,
            top_p,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
        })
    }

    pub fn pick(&mut self, logits: &[f32]) -> i64 {
        if self.temperature == 0.0 {
            return argmax(logits) as i64;
        }
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut p: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i, ((l as f64 - m) / self.temperature).exp()))
            .collect();
        let z: f64 = p.iter().map(|x| x.1).sum();
        p.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut kept = 0.0;
        let mut n = 0;
        for &(_, w) in &p {
            kept += w / z;
            n += 1;
            if kept >= self.top_p {
                break;
            }
        }
        let p = &p[..n];
        let total: f64 = p.iter().map(|x| x.1).sum();
        let mut u = self.rng.random::<f64>() * total;
        for &(i, w) in p {
            if u < w {
                return i as i64;
            }
            u -= w;
        }
        p[p.len() - 1].0 as i64
    }
}

pub fn generate(a: &GenerateArgs) -> CliResult {
    if a.max_new_tokens == 0 {
        return Err("--max-new-tokens must be at least 1".into());
    }
    let text = text_model(&a.model, a.tokenizer.as_deref())?;
    let prompt = text.encode(&a.prompt)?;
    let mut sampler = Sampler::new(a.temperature, a.top_p, a.seed)?;
    let artifact = super::run::artifact_for(&a.model, &a.sizes, a.seed, a.device)?;
    let e = super::device::load(
        &artifact,
        a.weights.as_deref(),
        a.allow_weight_mismatch,
        a.device,
    )?;
    stream(e, &artifact, &text, &prompt, a.max_new_tokens, &mut sampler)?;
    Ok(())
}

/// What a streamed generation produced.
pub struct Streamed {
    pub tokens: Vec<i64>,
    /// `[T, vocab]`.
    pub prefill_logits: Vec<f32>,
    /// The logits each generated token (and a final EOS) was chosen from.
    pub decode_logits: Vec<f32>,
    /// The end-of-sequence id that stopped the generation, if one did.
    pub eos: Option<i64>,
}

/// Prefills `prompt`, then samples up to `max_new` tokens, printing the text as it grows.
/// `e` runs the plan loaded from `artifact`.
pub fn stream(
    mut e: Box<dyn lamina_runtime::Executor>,
    artifact: &Path,
    text: &TextModel,
    prompt: &[i64],
    max_new: usize,
    sampler: &mut Sampler,
) -> Result<Streamed, String> {
    let limit = e.plan().limits.max_context;
    if prompt.len() + max_new - 1 > limit {
        return Err(format!(
            "the prompt ({} tokens) and {max_new} new tokens need {} positions; {} was built with --max-context {limit}",
            prompt.len(),
            prompt.len() + max_new - 1,
            artifact.display()
        ));
    }
    let v = e.vocab();
    e.reset(0).map_err(|e| e.to_string())?;
    let prefill = e.prefill(0, prompt).map_err(|e| e.to_string())?;
    let mut last = prefill[prefill.len() - v..].to_vec();
    let (mut out, mut chosen_from) = (Vec::new(), Vec::new());
    let mut shown = String::new();
    let mut stopped = None;
    let stdout = std::io::stdout();
    for step in 0..max_new {
        let next = sampler.pick(&last);
        chosen_from.extend_from_slice(&last);
        if text.eos.contains(&next) {
            stopped = Some(next);
            break;
        }
        out.push(next);
        // Print what the text gained (decoding the whole continuation keeps multi-byte
        // characters and merged pieces right).
        let now = text.decode(&out)?;
        if let Some(new) = now.strip_prefix(&shown) {
            let mut lock = stdout.lock();
            let _ = lock.write_all(new.as_bytes());
            let _ = lock.flush();
        }
        shown = now;
        if step + 1 < max_new {
            last = e.decode(&[(0, next)]).map_err(|e| e.to_string())?;
        }
    }
    println!();
    Ok(Streamed {
        tokens: out,
        prefill_logits: prefill,
        decode_logits: chosen_from,
        eos: stopped,
    })
}
