//! Hugging Face checkpoint import: `config.json` → [`ModelSpec`], and a [`SourceMap`] from
//! Lamina's canonical weight names to the checkpoint's tensors. One module per `model_type`.
//!
//! Every key that changes the math is read and honoured, or rejected with an error naming the
//! file and the key; keys known not to matter for inference are listed per family; any other
//! key is rejected, so a new config option never goes silently unimplemented.

mod deepseek_v3;
mod kimi_linear;
mod minimax;
mod qwen3_next;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::spec::{FfnSpec, MixerSpec, ModelSpec, RopeSpec, RopeStyle, YarnSpec};
use crate::weights::SourceMap;

pub const SUPPORTED: &[&str] = &["qwen3_next", "kimi_linear", "deepseek_v3", "minimax"];

/// A config.json translated to a spec, with the weight-name map of its family.
pub struct Imported {
    pub model_type: String,
    pub spec: ModelSpec,
    pub map: Box<dyn SourceMap>,
}

/// Reads `dir/config.json`.
pub fn import_dir(dir: &Path) -> Result<Imported> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| {
        Error::config(
            &path,
            "",
            format!(
                "invalid JSON at line {} column {}: {e}",
                e.line(),
                e.column()
            ),
        )
    })?;
    let Value::Object(obj) = v else {
        return Err(Error::config(
            &path,
            "",
            "the top level must be a JSON object",
        ));
    };
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    let cfg = Cfg::new(path.clone(), obj);
    let model_type = cfg.str("model_type")?;
    let (spec, map): (ModelSpec, Box<dyn SourceMap>) = match model_type.as_str() {
        "qwen3_next" => qwen3_next::import(&cfg, name)?,
        "kimi_linear" => kimi_linear::import(&cfg, name)?,
        "deepseek_v3" => deepseek_v3::import(&cfg, name)?,
        "minimax" => minimax::import(&cfg, name)?,
        other => {
            return Err(Error::config(
                &path,
                "model_type",
                format!(
                    "unsupported model_type \"{other}\"; supported: {}",
                    SUPPORTED.join(", ")
                ),
            ))
        }
    };
    spec.validate().map_err(|e| match e {
        Error::Spec { field, msg, .. } => {
            Error::config(&path, "", format!("derived spec field `{field}`: {msg}"))
        }
        other => other,
    })?;
    Ok(Imported {
        model_type,
        spec,
        map,
    })
}

/// Keys that never change inference math, in any family.
const COMMON_IGNORED: &[&str] = &[
    "architectures",
    "model_type",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "initializer_range",
    "attention_dropout",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "output_router_logits",
    "router_aux_loss_coef",
    "pretraining_tp",
    "max_position_embeddings",
    "auto_map",
    "_name_or_path",
    "tokenizer_class",
    "aux_loss_alpha",
    "seq_aux",
    "ep_size",
    "model_max_length",
    "router_jitter_noise",
];

/// A config object that remembers which keys were read, so unknown keys can be rejected.
pub(crate) struct Cfg {
    pub path: PathBuf,
    obj: Map<String, Value>,
    used: RefCell<BTreeSet<String>>,
}

impl Cfg {
    fn new(path: PathBuf, obj: Map<String, Value>) -> Self {
        Cfg {
            path,
            obj,
            used: RefCell::new(BTreeSet::new()),
        }
    }

    pub fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::config(&self.path, key, msg)
    }

    /// The value, treating JSON null as absent.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.used.borrow_mut().insert(key.to_string());
        self.obj.get(key).filter(|v| !v.is_null())
    }

    /// The first of several alias keys that is present.
    pub fn get_any<'a>(&'a self, keys: &[&'a str]) -> Option<(&'a str, &'a Value)> {
        let mut found = None;
        for k in keys {
            // Read every alias so none of them is reported as unknown.
            if let Some(v) = self.get(k) {
                found = found.or(Some((*k, v)));
            }
        }
        found
    }

    pub fn usize_any(&self, keys: &[&str]) -> Result<usize> {
        match self.get_any(keys) {
            Some((k, v)) => as_usize(v)
                .ok_or_else(|| self.err(k, format!("expected a non-negative integer, found {v}"))),
            None => Err(self.err(keys[0], "missing")),
        }
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.usize_any(&[key])
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => as_usize(v).map(Some).ok_or_else(|| {
                self.err(
                    key,
                    format!("expected a non-negative integer or null, found {v}"),
                )
            }),
        }
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a number, found {v}"))),
        }
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(key, format!("expected true or false, found {v}"))),
        }
    }

    pub fn str(&self, key: &str) -> Result<String> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.err(key, format!("expected a string, found {v}"))),
            None => Err(self.err(key, "missing")),
        }
    }

    pub fn str_list(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| self.err(key, "expected a list of strings"))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(self.err(key, "expected a list of strings")),
        }
    }

    pub fn usize_list(&self, v: &Value, key: &str) -> Result<Vec<usize>> {
        v.as_array()
            .and_then(|a| a.iter().map(as_usize).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.err(key, "expected a list of non-negative integers"))
    }

    /// Requires `key` to be absent, null, or `allowed`.
    pub fn require(&self, key: &str, allowed: &Value, why: &str) -> Result<()> {
        match self.get(key) {
            None => Ok(()),
            Some(v) if v == allowed => Ok(()),
            Some(v) => Err(self.err(key, format!("unsupported value {v} ({why})"))),
        }
    }

    /// Marks keys as read without using them (known not to change inference).
    pub fn ignore(&self, keys: &[&str]) {
        for k in keys {
            self.used.borrow_mut().insert(k.to_string());
        }
    }

    /// Rejects every key that was neither read nor ignored.
    pub fn finish(&self) -> Result<()> {
        self.ignore(COMMON_IGNORED);
        let used = self.used.borrow();
        let unknown: Vec<&String> = self.obj.keys().filter(|k| !used.contains(*k)).collect();
        if let Some(k) = unknown.first() {
            return Err(self.err(
                k,
                format!(
                    "unsupported config key{} ({}): Lamina does not know whether {} the math",
                    if unknown.len() > 1 { "s" } else { "" },
                    unknown
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    if unknown.len() > 1 {
                        "they change"
                    } else {
                        "it changes"
                    }
                ),
            ));
        }
        Ok(())
    }

    /// `hidden_act` must be SiLU everywhere in scope.
    pub fn require_silu(&self) -> Result<()> {
        match self.get("hidden_act") {
            None => Ok(()),
            Some(Value::String(s)) if s == "silu" || s == "swish" => Ok(()),
            Some(v) => Err(self.err(
                "hidden_act",
                format!("unsupported activation {v} (only silu)"),
            )),
        }
    }

    /// Rotary settings from `rope_parameters` (transformers v5), `rope_scaling` and top-level
    /// `rope_theta` / `partial_rotary_factor` (older configs). `rotary_dim` is the default.
    pub fn rope(&self, rotary_dim: usize, style: RopeStyle) -> Result<RopeSpec> {
        let params = self
            .get("rope_parameters")
            .and_then(|v| v.as_object())
            .cloned();
        let scaling = self
            .get("rope_scaling")
            .and_then(|v| v.as_object())
            .cloned();
        // Both present (transformers v5 keeps rope_scaling for compatibility): they must agree
        // on the rope type, or one of them would be silently ignored.
        if let (Some(p), Some(sc)) = (&params, &scaling) {
            let ty = |m: &Map<String, Value>| {
                m.get("rope_type")
                    .or(m.get("type"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("default")
                    .to_string()
            };
            if ty(p) != ty(sc) {
                return Err(self.err(
                    "rope_scaling.rope_type",
                    format!(
                        "\"{}\" disagrees with rope_parameters.rope_type \"{}\"",
                        ty(sc),
                        ty(p)
                    ),
                ));
            }
        }
        let merged: Map<String, Value> = params.clone().or(scaling.clone()).unwrap_or_default();
        let pkey = if params.is_some() {
            "rope_parameters"
        } else {
            "rope_scaling"
        };
        let num = |k: &str| merged.get(k).and_then(|v| v.as_f64());
        let theta = num("rope_theta")
            .or(self.opt_f64("rope_theta")?)
            .unwrap_or(10000.0);
        let rope_type = merged
            .get("rope_type")
            .or(merged.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default")
            .to_string();
        let yarn = match rope_type.as_str() {
            "default" => None,
            "yarn" => Some(YarnSpec {
                factor: num("factor")
                    .ok_or_else(|| self.err(&format!("{pkey}.factor"), "missing for yarn"))?,
                original_max_position_embeddings: num("original_max_position_embeddings")
                    .ok_or_else(|| {
                        self.err(
                            &format!("{pkey}.original_max_position_embeddings"),
                            "missing for yarn",
                        )
                    })? as usize,
                beta_fast: num("beta_fast").unwrap_or(32.0),
                beta_slow: num("beta_slow").unwrap_or(1.0),
                mscale: num("mscale").unwrap_or(1.0),
                mscale_all_dim: num("mscale_all_dim").unwrap_or(0.0),
            }),
            other => {
                return Err(self.err(
                    &format!("{pkey}.rope_type"),
                    format!("unsupported rope type \"{other}\" (supported: default, yarn)"),
                ))
            }
        };
        if let Some(t) = merged.get("truncate") {
            if t != &Value::Bool(true) {
                return Err(self.err(
                    &format!("{pkey}.truncate"),
                    "only truncate = true is supported",
                ));
            }
        }
        if let Some(f) = merged.get("attention_factor").filter(|v| !v.is_null()) {
            return Err(self.err(
                &format!("{pkey}.attention_factor"),
                format!("explicit attention_factor {f} is not supported"),
            ));
        }
        let factor = num("partial_rotary_factor").or(self.opt_f64("partial_rotary_factor")?);
        let rotary_dim = match factor {
            Some(f) => (rotary_dim as f64 * f).round() as usize,
            None => rotary_dim,
        };
        Ok(RopeSpec {
            theta,
            rotary_dim,
            style,
            yarn,
        })
    }
}

fn as_usize(v: &Value) -> Option<usize> {
    v.as_u64().map(|u| u as usize)
}

/// Layer index parsed from `model.layers.{i}.…`.
pub(crate) fn layer_of(tensor: &str) -> Option<usize> {
    tensor
        .strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Splits `layers.{i}.{rest}` into `(i, rest)`.
pub(crate) fn split_layer(canonical: &str) -> Option<(usize, &str)> {
    let rest = canonical.strip_prefix("layers.")?;
    let (i, rest) = rest.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

/// Names shared by the families: embeddings, final norm, LM head, the two layer norms.
pub(crate) fn common_source(canonical: &str) -> Option<String> {
    Some(match canonical {
        "embed" => "model.embed_tokens.weight".into(),
        "final_norm" => "model.norm.weight".into(),
        "lm_head" => "lm_head.weight".into(),
        _ => {
            let (i, rest) = split_layer(canonical)?;
            match rest {
                "mixer_norm" => format!("model.layers.{i}.input_layernorm.weight"),
                "ffn_norm" => format!("model.layers.{i}.post_attention_layernorm.weight"),
                _ => return None,
            }
        }
    })
}

/// Expert weights: per-expert tensors `{base}.experts.{e}.{gate,up,down}` (names given), or the
/// fused transformers-v5 layout `{base}.experts.gate_up_proj [E, 2I, D]`, `down_proj [E, D, I]`.
pub(crate) fn expert_source(
    base: &str,
    e: usize,
    which: &str,
    names: [&str; 3],
    shape: &[usize],
    experts: usize,
    has: &dyn Fn(&str) -> bool,
) -> Option<crate::weights::Source> {
    use crate::weights::Source;
    let idx = match which {
        "gate_proj" => 0,
        "up_proj" => 1,
        "down_proj" => 2,
        _ => return None,
    };
    let per = format!("{base}.experts.{e}.{}.weight", names[idx]);
    if has(&per) || !has(&format!("{base}.experts.gate_up_proj")) {
        return Some(Source::whole(per, shape));
    }
    let (r, c) = (shape[0], shape[1]);
    Some(match idx {
        0 => Source::rows(
            format!("{base}.experts.gate_up_proj"),
            &[experts, 2 * r, c],
            vec![(e * 2 * r, r)],
        ),
        1 => Source::rows(
            format!("{base}.experts.gate_up_proj"),
            &[experts, 2 * r, c],
            vec![(e * 2 * r + r, r)],
        ),
        _ => Source::rows(
            format!("{base}.experts.down_proj"),
            &[experts, r, c],
            vec![(e * r, r)],
        ),
    })
}

/// Each layer's mixer and FFN, expanded once when a source map is made (not per weight).
pub(crate) fn expand_layers(spec: &ModelSpec) -> Vec<(MixerSpec, FfnSpec)> {
    spec.layer_plan()
        .into_iter()
        .map(|l| (l.mixer.clone(), l.ffn.clone()))
        .collect()
}

/// A per-layer type list (`layer_types`, `mlp_layer_types`) as spec letters, checking its
/// length against `layers` and naming the offending entry.
pub(crate) fn letters_from_types(
    c: &Cfg,
    key: &str,
    types: &[String],
    layers: usize,
    letters: &[(&str, char)],
) -> Result<String> {
    if types.len() != layers {
        return Err(c.err(
            key,
            format!("has {} entries for {layers} layers", types.len()),
        ));
    }
    types
        .iter()
        .enumerate()
        .map(|(i, t)| {
            letters
                .iter()
                .find(|(name, _)| name == t)
                .map(|(_, l)| *l)
                .ok_or_else(|| c.err(&format!("{key}[{i}]"), format!("unknown type \"{t}\"")))
        })
        .collect()
}
