//! The native model description: one TOML file that can describe any hybrid stack in scope.
//!
//! A spec names a set of mixers (token mixers: linear-attention or attention layers) and FFNs by
//! a single letter each, then lays them out over the layers with a pattern string repeated to
//! `num_layers`, plus explicit per-layer overrides. `examples/*.toml` show every mixer kind.
//!
//! Hugging Face `config.json` files are translated into this same structure by [`crate::hf`].

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    #[serde(default)]
    pub tie_embeddings: bool,
    pub norm: NormSpec,
    #[serde(default)]
    pub residual: ResidualSpec,
    pub layers: LayersSpec,
    /// Token mixers by letter.
    pub mixer: BTreeMap<String, MixerSpec>,
    /// FFNs by letter.
    pub ffn: BTreeMap<String, FfnSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NormSpec {
    pub eps: f64,
    /// Qwen3-Next style `x / rms * (1 + w)` instead of `x / rms * w`.
    #[serde(default)]
    pub zero_centred: bool,
}

/// How a layer's sublayer output joins the residual stream.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ResidualSpec {
    #[serde(default)]
    pub style: ResidualStyle,
    /// MiniMax: `x = alpha * norm(x) + beta * sublayer(norm(x))`; the factors differ for
    /// linear-attention mixers, softmax-attention mixers and the FFN.
    #[serde(default = "one")]
    pub linear_alpha: f64,
    #[serde(default = "one")]
    pub linear_beta: f64,
    #[serde(default = "one")]
    pub attention_alpha: f64,
    #[serde(default = "one")]
    pub attention_beta: f64,
    #[serde(default = "one")]
    pub ffn_alpha: f64,
    #[serde(default = "one")]
    pub ffn_beta: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ResidualStyle {
    /// `x = x + sublayer(norm(x))`.
    #[default]
    PreNorm,
    /// MiniMax-01: the residual branch is the *normalised* input, both branches scaled.
    ScaledPostNorm,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayersSpec {
    /// Mixer letters, repeated cyclically up to `num_layers` (a string of `num_layers` letters is
    /// an explicit per-layer list).
    pub pattern: String,
    /// FFN letters, repeated the same way.
    pub ffn_pattern: String,
    /// Explicit per-layer exceptions, applied after the patterns.
    #[serde(default, rename = "override")]
    pub overrides: Vec<LayerOverride>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerOverride {
    /// 0-based layer indices.
    pub layers: Vec<usize>,
    #[serde(default)]
    pub mixer: Option<String>,
    #[serde(default)]
    pub ffn: Option<String>,
}

/// Rotary position embedding of an attention mixer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeSpec {
    pub theta: f64,
    /// Rotated dimensions per head (Qwen3-Next: 25% of the head dim; MLA: qk_rope_head_dim).
    pub rotary_dim: usize,
    #[serde(default)]
    pub style: RopeStyle,
    #[serde(default)]
    pub yarn: Option<YarnSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RopeStyle {
    /// Pairs (i, i + d/2): Llama / Qwen `rotate_half`.
    #[default]
    Half,
    /// Pairs (2i, 2i + 1): DeepSeek-V3 `rope_interleave`.
    Interleaved,
}

/// YaRN context extension as in the DeepSeek-V3 configs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct YarnSpec {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    #[serde(default = "yarn_beta_fast")]
    pub beta_fast: f64,
    #[serde(default = "one")]
    pub beta_slow: f64,
    #[serde(default = "one")]
    pub mscale: f64,
    #[serde(default)]
    pub mscale_all_dim: f64,
}

fn yarn_beta_fast() -> f64 {
    32.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum MixerSpec {
    /// Gated DeltaNet (Qwen3-Next linear attention).
    GatedDelta(GatedDeltaSpec),
    /// DeltaNet: the delta rule without decay (alpha = 1; no A_log, dt_bias or a projection).
    Delta(GatedDeltaSpec),
    /// Kimi Delta Attention: per-key-channel decay.
    Kda(KdaSpec),
    /// MiniMax-01 lightning attention: additive update, fixed per-head decay.
    Lightning(LightningSpec),
    /// Softmax attention with grouped KV heads.
    Gqa(GqaSpec),
    /// Multi-head latent attention (DeepSeek-V3, Kimi Linear).
    Mla(MlaSpec),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatedDeltaSpec {
    pub key_heads: usize,
    pub value_heads: usize,
    pub key_head_dim: usize,
    pub value_head_dim: usize,
    pub conv_kernel: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdaSpec {
    pub heads: usize,
    pub head_dim: usize,
    pub conv_kernel: usize,
    /// Rank of the low-rank decay-gate projection (f_a, f_b). Kimi Linear: head_dim.
    pub gate_rank: usize,
    /// Rank of the low-rank output-gate projection (g_a, g_b). Kimi Linear: head_dim.
    pub output_gate_rank: usize,
    /// fla's bounded gate: g = lower_bound * sigmoid(exp(A_log) * (x + dt_bias)).
    #[serde(default)]
    pub lower_bound: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LightningSpec {
    pub heads: usize,
    pub head_dim: usize,
    /// eps of the RMSNorm over all heads' outputs (transformers MiniMax: 1e-6, whatever the
    /// model's norm eps). Defaults to the model's.
    #[serde(default)]
    pub norm_eps: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GqaSpec {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Qwen3-Next: q_proj also yields a per-head sigmoid gate on the attention output.
    #[serde(default)]
    pub output_gate: bool,
    /// Per-head RMSNorm of q and k (uses the model's norm style).
    #[serde(default)]
    pub qk_norm: bool,
    #[serde(default)]
    pub rope: Option<RopeSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlaSpec {
    pub heads: usize,
    /// None: q comes straight from one projection (Kimi Linear, DeepSeek-V2-Lite).
    #[serde(default)]
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// None: NoPE (Kimi Linear); the rope slots are still part of q and the cache.
    #[serde(default)]
    pub rope: Option<RopeSpec>,
    /// eps of the q/kv latent RMSNorms. Defaults to the model's.
    #[serde(default)]
    pub norm_eps: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FfnSpec {
    /// Dense SwiGLU MLP: down(silu(gate(x)) * up(x)).
    Swiglu {
        intermediate: usize,
    },
    Moe(MoeSpec),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeSpec {
    pub experts: usize,
    pub top_k: usize,
    /// Intermediate size of each routed expert.
    pub intermediate: usize,
    pub router: RouterKind,
    /// DeepSeek-V3 `e_score_correction_bias`: added to the scores for selection only.
    #[serde(default)]
    pub correction_bias: bool,
    #[serde(default = "one_usize")]
    pub groups: usize,
    #[serde(default = "one_usize")]
    pub topk_groups: usize,
    /// Divide the selected weights by their sum.
    #[serde(default)]
    pub renormalize: bool,
    #[serde(default = "one")]
    pub routed_scaling: f64,
    /// Intermediate size of the always-on shared expert (0: none).
    #[serde(default)]
    pub shared_intermediate: usize,
    /// Qwen3-Next: the shared expert's output is scaled by sigmoid(shared_gate(x)).
    #[serde(default)]
    pub shared_gate: bool,
}

fn one_usize() -> usize {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterKind {
    Softmax,
    Sigmoid,
}

/// One decoder layer after the pattern is expanded.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPlan<'a> {
    pub index: usize,
    pub mixer_letter: String,
    pub mixer: &'a MixerSpec,
    pub ffn_letter: String,
    pub ffn: &'a FfnSpec,
}

impl MixerSpec {
    pub fn kind_name(&self) -> &'static str {
        match self {
            MixerSpec::Delta(_) => "delta",
            MixerSpec::GatedDelta(_) => "gated_delta",
            MixerSpec::Kda(_) => "kda",
            MixerSpec::Lightning(_) => "lightning",
            MixerSpec::Gqa(_) => "gqa",
            MixerSpec::Mla(_) => "mla",
        }
    }

    /// Linear-attention mixers keep a fixed-size recurrent state instead of a KV cache.
    pub fn is_linear(&self) -> bool {
        matches!(
            self,
            MixerSpec::GatedDelta(_)
                | MixerSpec::Delta(_)
                | MixerSpec::Kda(_)
                | MixerSpec::Lightning(_)
        )
    }
}

impl ModelSpec {
    /// Parses and validates a TOML spec. Errors name the file, and the field where known.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text, path)
    }

    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self> {
        let spec: ModelSpec = toml::from_str(text).map_err(|e| {
            let location = e
                .span()
                .map(|s| {
                    let line = text[..s.start].matches('\n').count() + 1;
                    format!(":{line}")
                })
                .unwrap_or_default();
            let msg = e.message().replace('\n', " ");
            Error::Spec {
                file: format!("{}{location}", path.display()),
                field: String::new(),
                msg,
            }
        })?;
        spec.validate().map_err(|e| e.in_file(path))?;
        Ok(spec)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a validated spec always serialises")
    }

    /// The layers with patterns and overrides applied.
    pub fn layer_plan(&self) -> Vec<LayerPlan<'_>> {
        let mixers: Vec<char> = self.layers.pattern.chars().collect();
        let ffns: Vec<char> = self.layers.ffn_pattern.chars().collect();
        let mut letters: Vec<(String, String)> = (0..self.num_layers)
            .map(|i| {
                (
                    mixers[i % mixers.len()].to_string(),
                    ffns[i % ffns.len()].to_string(),
                )
            })
            .collect();
        for o in &self.layers.overrides {
            for &l in &o.layers {
                if let Some(m) = &o.mixer {
                    letters[l].0 = m.clone();
                }
                if let Some(f) = &o.ffn {
                    letters[l].1 = f.clone();
                }
            }
        }
        letters
            .into_iter()
            .enumerate()
            .map(|(index, (m, f))| LayerPlan {
                index,
                mixer: &self.mixer[&m],
                ffn: &self.ffn[&f],
                mixer_letter: m,
                ffn_letter: f,
            })
            .collect()
    }

    /// Checks every dimension and cross-reference. The error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| Error::spec_field(field, msg);
        let positive = |field: &str, v: usize| {
            if v == 0 {
                Err(bad(field, "must be positive".into()))
            } else {
                Ok(())
            }
        };
        positive("vocab_size", self.vocab_size)?;
        positive("hidden_size", self.hidden_size)?;
        positive("num_layers", self.num_layers)?;
        if self.name.trim().is_empty() {
            return Err(bad("name", "is empty".into()));
        }
        // Token ids travel as i64 and are indexed as i32 by GPU kernels; sizes beyond these
        // bounds are typos, not models.
        for (field, v, max) in [
            ("vocab_size", self.vocab_size, (1usize << 31) - 1),
            ("hidden_size", self.hidden_size, 1 << 20),
            ("num_layers", self.num_layers, 1 << 12),
        ] {
            if v > max {
                return Err(bad(
                    field,
                    format!("{v} is larger than the supported {max}"),
                ));
            }
        }
        if !(self.norm.eps > 0.0 && self.norm.eps < 1.0) {
            return Err(bad(
                "norm.eps",
                format!("{} is not in (0, 1)", self.norm.eps),
            ));
        }
        let r = &self.residual;
        check_finite(&[
            ("residual.linear_alpha", r.linear_alpha),
            ("residual.linear_beta", r.linear_beta),
            ("residual.attention_alpha", r.attention_alpha),
            ("residual.attention_beta", r.attention_beta),
            ("residual.ffn_alpha", r.ffn_alpha),
            ("residual.ffn_beta", r.ffn_beta),
        ])?;
        if self.layers.pattern.is_empty() {
            return Err(bad("layers.pattern", "is empty".into()));
        }
        if self.layers.ffn_pattern.is_empty() {
            return Err(bad("layers.ffn_pattern", "is empty".into()));
        }
        for c in self.layers.pattern.chars() {
            if !self.mixer.contains_key(&c.to_string()) {
                return Err(bad(
                    "layers.pattern",
                    format!("letter '{c}' has no [mixer.{c}] table"),
                ));
            }
        }
        for c in self.layers.ffn_pattern.chars() {
            if !self.ffn.contains_key(&c.to_string()) {
                return Err(bad(
                    "layers.ffn_pattern",
                    format!("letter '{c}' has no [ffn.{c}] table"),
                ));
            }
        }
        for (i, o) in self.layers.overrides.iter().enumerate() {
            let field = format!("layers.override[{i}]");
            for &l in &o.layers {
                if l >= self.num_layers {
                    return Err(bad(
                        &format!("{field}.layers"),
                        format!(
                            "layer {l} is out of range (num_layers = {})",
                            self.num_layers
                        ),
                    ));
                }
            }
            if let Some(m) = &o.mixer {
                if !self.mixer.contains_key(m) {
                    return Err(bad(
                        &format!("{field}.mixer"),
                        format!("no [mixer.{m}] table"),
                    ));
                }
            }
            if let Some(f) = &o.ffn {
                if !self.ffn.contains_key(f) {
                    return Err(bad(&format!("{field}.ffn"), format!("no [ffn.{f}] table")));
                }
            }
        }
        for (letter, m) in &self.mixer {
            if letter.chars().count() != 1 {
                return Err(bad(
                    &format!("mixer.{letter}"),
                    "mixer names must be a single letter".into(),
                ));
            }
            m.validate(&format!("mixer.{letter}"))?;
        }
        for (letter, f) in &self.ffn {
            if letter.chars().count() != 1 {
                return Err(bad(
                    &format!("ffn.{letter}"),
                    "ffn names must be a single letter".into(),
                ));
            }
            f.validate(&format!("ffn.{letter}"))?;
        }
        Ok(())
    }
}

/// Rejects NaN and infinities (TOML accepts `nan` and `inf`).
fn check_finite(fields: &[(&str, f64)]) -> Result<()> {
    for (name, v) in fields {
        if !v.is_finite() {
            return Err(Error::spec_field(
                name,
                format!("{v} is not a finite number"),
            ));
        }
    }
    Ok(())
}

/// An optional norm epsilon must be in (0, 1).
fn check_eps(field: &str, eps: Option<f64>) -> Result<()> {
    match eps {
        Some(e) if !(e > 0.0 && e < 1.0) => {
            Err(Error::spec_field(field, format!("{e} is not in (0, 1)")))
        }
        _ => Ok(()),
    }
}

fn check_positive(prefix: &str, fields: &[(&str, usize)]) -> Result<()> {
    for (name, v) in fields {
        if *v == 0 {
            return Err(Error::spec_field(
                &format!("{prefix}.{name}"),
                "must be positive".into(),
            ));
        }
    }
    Ok(())
}

impl RopeSpec {
    fn validate(&self, prefix: &str, head_dim: usize) -> Result<()> {
        let field = format!("{prefix}.rope.rotary_dim");
        check_finite(&[(&format!("{prefix}.rope.theta"), self.theta)])?;
        if let Some(y) = &self.yarn {
            let f = |k: &str| format!("{prefix}.rope.yarn.{k}");
            check_finite(&[
                (&f("factor"), y.factor),
                (&f("beta_fast"), y.beta_fast),
                (&f("beta_slow"), y.beta_slow),
                (&f("mscale"), y.mscale),
                (&f("mscale_all_dim"), y.mscale_all_dim),
            ])?;
        }
        if self.rotary_dim == 0 || !self.rotary_dim.is_multiple_of(2) || self.rotary_dim > head_dim
        {
            return Err(Error::spec_field(
                &field,
                format!(
                    "{} must be even, positive and at most the rotated head dim {head_dim}",
                    self.rotary_dim
                ),
            ));
        }
        if self.theta <= 1.0 {
            return Err(Error::spec_field(
                &format!("{prefix}.rope.theta"),
                format!("{} must be > 1", self.theta),
            ));
        }
        if let Some(y) = &self.yarn {
            if y.factor < 1.0
                || y.original_max_position_embeddings == 0
                || y.beta_fast <= y.beta_slow
            {
                return Err(Error::spec_field(
                    &format!("{prefix}.rope.yarn"),
                    "needs factor >= 1, original_max_position_embeddings > 0 and beta_fast > beta_slow"
                        .into(),
                ));
            }
        }
        Ok(())
    }
}

impl MixerSpec {
    fn validate(&self, p: &str) -> Result<()> {
        match self {
            MixerSpec::GatedDelta(s) | MixerSpec::Delta(s) => {
                check_positive(
                    p,
                    &[
                        ("key_heads", s.key_heads),
                        ("value_heads", s.value_heads),
                        ("key_head_dim", s.key_head_dim),
                        ("value_head_dim", s.value_head_dim),
                        ("conv_kernel", s.conv_kernel),
                    ],
                )?;
                if s.value_heads % s.key_heads != 0 {
                    return Err(Error::spec_field(
                        &format!("{p}.value_heads"),
                        format!(
                            "{} is not a multiple of key_heads = {}",
                            s.value_heads, s.key_heads
                        ),
                    ));
                }
            }
            MixerSpec::Kda(s) => {
                check_positive(
                    p,
                    &[
                        ("heads", s.heads),
                        ("head_dim", s.head_dim),
                        ("conv_kernel", s.conv_kernel),
                        ("gate_rank", s.gate_rank),
                        ("output_gate_rank", s.output_gate_rank),
                    ],
                )?;
                if let Some(lb) = s.lower_bound {
                    if !(lb < 0.0 && lb.is_finite()) {
                        return Err(Error::spec_field(
                            &format!("{p}.lower_bound"),
                            format!("{lb} must be a negative number (the gate is a log-decay)"),
                        ));
                    }
                }
            }
            MixerSpec::Lightning(s) => {
                check_positive(p, &[("heads", s.heads), ("head_dim", s.head_dim)])?;
                check_eps(&format!("{p}.norm_eps"), s.norm_eps)?;
            }
            MixerSpec::Gqa(s) => {
                check_positive(
                    p,
                    &[
                        ("heads", s.heads),
                        ("kv_heads", s.kv_heads),
                        ("head_dim", s.head_dim),
                    ],
                )?;
                if s.heads % s.kv_heads != 0 {
                    return Err(Error::spec_field(
                        &format!("{p}.heads"),
                        format!("{} is not a multiple of kv_heads = {}", s.heads, s.kv_heads),
                    ));
                }
                if let Some(r) = &s.rope {
                    r.validate(p, s.head_dim)?;
                }
            }
            MixerSpec::Mla(s) => {
                check_positive(
                    p,
                    &[
                        ("heads", s.heads),
                        ("kv_lora_rank", s.kv_lora_rank),
                        ("qk_nope_head_dim", s.qk_nope_head_dim),
                        ("qk_rope_head_dim", s.qk_rope_head_dim),
                        ("v_head_dim", s.v_head_dim),
                    ],
                )?;
                check_eps(&format!("{p}.norm_eps"), s.norm_eps)?;
                if s.q_lora_rank == Some(0) {
                    return Err(Error::spec_field(
                        &format!("{p}.q_lora_rank"),
                        "must be positive (leave it out for no q compression)".into(),
                    ));
                }
                if let Some(r) = &s.rope {
                    r.validate(p, s.qk_rope_head_dim)?;
                    if r.rotary_dim != s.qk_rope_head_dim {
                        return Err(Error::spec_field(
                            &format!("{p}.rope.rotary_dim"),
                            format!(
                                "{} must equal qk_rope_head_dim = {}",
                                r.rotary_dim, s.qk_rope_head_dim
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

impl FfnSpec {
    fn validate(&self, p: &str) -> Result<()> {
        match self {
            FfnSpec::Swiglu { intermediate } => {
                check_positive(p, &[("intermediate", *intermediate)])
            }
            FfnSpec::Moe(m) => {
                check_positive(
                    p,
                    &[
                        ("experts", m.experts),
                        ("top_k", m.top_k),
                        ("intermediate", m.intermediate),
                        ("groups", m.groups),
                        ("topk_groups", m.topk_groups),
                    ],
                )?;
                if m.top_k > m.experts {
                    return Err(Error::spec_field(
                        &format!("{p}.top_k"),
                        format!("{} exceeds experts = {}", m.top_k, m.experts),
                    ));
                }
                if m.experts % m.groups != 0 {
                    return Err(Error::spec_field(
                        &format!("{p}.groups"),
                        format!("experts = {} is not a multiple of {}", m.experts, m.groups),
                    ));
                }
                if m.topk_groups > m.groups {
                    return Err(Error::spec_field(
                        &format!("{p}.topk_groups"),
                        format!("{} exceeds groups = {}", m.topk_groups, m.groups),
                    ));
                }
                if m.top_k > m.topk_groups * (m.experts / m.groups) {
                    return Err(Error::spec_field(
                        &format!("{p}.top_k"),
                        format!(
                            "{} exceeds the experts in the {} selected groups",
                            m.top_k, m.topk_groups
                        ),
                    ));
                }
                if m.groups > 1 && m.router == RouterKind::Softmax {
                    // Group-limited routing is defined on sigmoid scores (DeepSeek-V3) here.
                    return Err(Error::spec_field(
                        &format!("{p}.groups"),
                        "group-limited top-k needs router = \"sigmoid\"".into(),
                    ));
                }
                if m.shared_gate && m.shared_intermediate == 0 {
                    return Err(Error::spec_field(
                        &format!("{p}.shared_gate"),
                        "needs a shared expert (shared_intermediate > 0)".into(),
                    ));
                }
                if !(m.routed_scaling.is_finite() && m.routed_scaling > 0.0) {
                    return Err(Error::spec_field(
                        &format!("{p}.routed_scaling"),
                        "must be positive".into(),
                    ));
                }
                Ok(())
            }
        }
    }
}
