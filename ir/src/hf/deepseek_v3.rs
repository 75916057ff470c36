//! `model_type = "deepseek_v3"`: MLA (with YaRN) + sigmoid-routed, group-limited MoE with a
//! correction bias and shared experts; the first `first_k_dense_replace` layers are dense.

use std::collections::BTreeMap;

use serde_json::json;

use super::{common_source, expand_layers, expert_source, layer_of, split_layer, Cfg};
use crate::error::Result;
use crate::spec::*;
use crate::weights::{Source, SourceMap};

pub(super) fn import(c: &Cfg, name: String) -> Result<(ModelSpec, Box<dyn SourceMap>)> {
    c.require_silu()?;
    c.require(
        "attention_bias",
        &json!(false),
        "biased projections are not supported",
    )?;
    c.require(
        "scoring_func",
        &json!("sigmoid"),
        "only sigmoid router scores",
    )?;
    c.require(
        "topk_method",
        &json!("noaux_tc"),
        "only the noaux_tc (correction-bias) router",
    )?;
    let layers = c.usize("num_hidden_layers")?;
    let heads = c.usize("num_attention_heads")?;
    let nope = c.usize("qk_nope_head_dim")?;
    let rope_dim = c.usize("qk_rope_head_dim")?;
    if let Some(qk) = c.opt_usize("qk_head_dim")? {
        if qk != nope + rope_dim {
            return Err(c.err(
                "qk_head_dim",
                format!(
                    "{qk} != qk_nope_head_dim + qk_rope_head_dim = {}",
                    nope + rope_dim
                ),
            ));
        }
    }
    // head_dim is the rotary dim in transformers' DeepseekV3Config; num_key_value_heads equals
    // the head count for MLA. Neither changes the math beyond the keys above.
    c.ignore(&[
        "head_dim",
        "num_key_value_heads",
        "num_nextn_predict_layers",
    ]);
    let interleave = c.bool_or("rope_interleave", true)?;
    let rope = c.rope(
        rope_dim,
        if interleave {
            RopeStyle::Interleaved
        } else {
            RopeStyle::Half
        },
    )?;
    let dense = c.usize_or("first_k_dense_replace", 0)?;
    let freq = c.usize_or("moe_layer_freq", 1)?;
    let experts = c.usize("n_routed_experts")?;
    let ffn_pattern: String = (0..layers)
        .map(|i| {
            if i >= dense && i % freq.max(1) == 0 {
                'M'
            } else {
                'D'
            }
        })
        .collect();
    let mut mixer = BTreeMap::new();
    mixer.insert(
        "A".into(),
        MixerSpec::Mla(MlaSpec {
            heads,
            q_lora_rank: c.opt_usize("q_lora_rank")?,
            kv_lora_rank: c.usize("kv_lora_rank")?,
            qk_nope_head_dim: nope,
            qk_rope_head_dim: rope_dim,
            v_head_dim: c.usize("v_head_dim")?,
            rope: Some(rope),
            norm_eps: None,
        }),
    );
    let moe_inter = c.usize("moe_intermediate_size")?;
    let mut ffn = BTreeMap::new();
    ffn.insert(
        "D".into(),
        FfnSpec::Swiglu {
            intermediate: c.usize("intermediate_size")?,
        },
    );
    ffn.insert(
        "M".into(),
        FfnSpec::Moe(MoeSpec {
            experts,
            top_k: c.usize("num_experts_per_tok")?,
            intermediate: moe_inter,
            router: RouterKind::Sigmoid,
            correction_bias: true,
            groups: c.usize_or("n_group", 1)?,
            topk_groups: c.usize_or("topk_group", 1)?,
            renormalize: c.bool_or("norm_topk_prob", true)?,
            routed_scaling: c.f64_or("routed_scaling_factor", 1.0)?,
            shared_intermediate: moe_inter * c.usize_or("n_shared_experts", 0)?,
            shared_gate: false,
        }),
    );
    let spec = ModelSpec {
        name,
        vocab_size: c.usize("vocab_size")?,
        hidden_size: c.usize("hidden_size")?,
        num_layers: layers,
        tie_embeddings: c.bool_or("tie_word_embeddings", false)?,
        norm: NormSpec {
            eps: c.f64_or("rms_norm_eps", 1e-6)?,
            zero_centred: false,
        },
        residual: ResidualSpec::default(),
        layers: LayersSpec {
            pattern: "A".into(),
            ffn_pattern,
            overrides: vec![],
        },
        mixer,
        ffn,
    };
    c.ignore(&["rope_theta", "rope_scaling", "rope_parameters"]);
    c.finish()?;
    let map = DeepseekMap {
        num_layers: spec.num_layers,
        layers: expand_layers(&spec),
    };
    Ok((spec, Box::new(map)))
}

pub(super) fn mla_source(i: usize, m: &str, shape: &[usize]) -> Option<Source> {
    let a = format!("model.layers.{i}.self_attn");
    let t = match m {
        "q_proj" | "q_a_proj" | "q_b_proj" | "kv_b_proj" | "o_proj" => m.to_string(),
        "q_a_norm" => "q_a_layernorm".into(),
        "kv_a_proj" => "kv_a_proj_with_mqa".into(),
        "kv_a_norm" => "kv_a_layernorm".into(),
        _ => return None,
    };
    Some(Source::whole(format!("{a}.{t}.weight"), shape))
}

struct DeepseekMap {
    num_layers: usize,
    layers: Vec<(MixerSpec, FfnSpec)>,
}

impl SourceMap for DeepseekMap {
    fn source(
        &self,
        canonical: &str,
        shape: &[usize],
        has: &dyn Fn(&str) -> bool,
    ) -> Option<Source> {
        if let Some(t) = common_source(canonical) {
            return Some(Source::whole(t, shape));
        }
        let (i, rest) = split_layer(canonical)?;
        if let Some(m) = rest.strip_prefix("mixer.") {
            return mla_source(i, m, shape);
        }
        let f = rest.strip_prefix("ffn.")?;
        let base = format!("model.layers.{i}.mlp");
        Some(match f {
            "router" => Source::whole(format!("{base}.gate.weight"), shape),
            "router_bias" => Source::whole(format!("{base}.gate.e_score_correction_bias"), shape),
            _ => {
                if let Some(w) = f.strip_prefix("shared.") {
                    Source::whole(format!("{base}.shared_experts.{w}.weight"), shape)
                } else if let Some(x) = f.strip_prefix("experts.") {
                    let (e, which) = x.split_once('.')?;
                    let experts = match &self.layers.get(i)?.1 {
                        FfnSpec::Moe(m) => m.experts,
                        _ => return None,
                    };
                    return expert_source(
                        &base,
                        e.parse().ok()?,
                        which,
                        ["gate_proj", "up_proj", "down_proj"],
                        shape,
                        experts,
                        has,
                    );
                } else {
                    Source::whole(format!("{base}.{f}.weight"), shape)
                }
            }
        })
    }

    /// Multi-token-prediction layers (`model.layers.{num_layers}…`) are not part of the
    /// next-token model.
    fn ignorable(&self, tensor: &str) -> bool {
        layer_of(tensor).is_some_and(|l| l >= self.num_layers)
    }
}
