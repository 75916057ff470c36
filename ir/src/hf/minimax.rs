//! `model_type = "minimax"`: lightning attention + softmax GQA + softmax-routed MoE, with
//! MiniMax's scaled post-norm residuals.

use std::collections::BTreeMap;

use serde_json::json;

use super::{common_source, expand_layers, expert_source, letters_from_types, split_layer, Cfg};
use crate::error::Result;
use crate::spec::*;
use crate::weights::{Source, SourceMap};

/// Persistent buffers transformers saves next to the weights; functions of the config.
const DECAY_BUFFERS: &[&str] = &["slope_rate", "query_decay", "key_decay", "diagonal_decay"];

pub(super) fn import(c: &Cfg, name: String) -> Result<(ModelSpec, Box<dyn SourceMap>)> {
    c.require_silu()?;
    c.require(
        "sliding_window",
        &json!(null),
        "sliding-window attention is not supported",
    )?;
    c.require(
        "postnorm",
        &json!(true),
        "MiniMax-01's residual scheme is post-norm",
    )?;
    c.ignore(&[
        "block_size",
        "layernorm_full_attention_alpha",
        "layernorm_full_attention_beta",
        "layernorm_linear_attention_alpha",
        "layernorm_linear_attention_beta",
        "layernorm_mlp_alpha",
        "layernorm_mlp_beta",
    ]);
    let layers = c.usize("num_hidden_layers")?;
    let hidden = c.usize("hidden_size")?;
    let heads = c.usize("num_attention_heads")?;
    let head_dim = c.usize_or("head_dim", hidden / heads.max(1))?;
    // transformers: layer_types; the original config: attn_type_list (0 = lightning, 1 = softmax).
    let pattern: String = if let Some(t) = c.str_list("layer_types")? {
        letters_from_types(
            c,
            "layer_types",
            &t,
            layers,
            &[("linear_attention", 'L'), ("full_attention", 'A')],
        )?
    } else if let Some(v) = c.get("attn_type_list") {
        let l = c.usize_list(v, "attn_type_list")?;
        if l.len() != layers {
            return Err(c.err(
                "attn_type_list",
                format!("has {} entries for {layers} layers", l.len()),
            ));
        }
        l.iter().map(|&x| if x == 1 { 'A' } else { 'L' }).collect()
    } else {
        return Err(c.err("layer_types", "missing (and no attn_type_list)"));
    };
    // Partial rotary: `rotary_dim` (original) or `partial_rotary_factor`.
    let rotary = c.usize_or("rotary_dim", head_dim)?;
    let rope = c.rope(rotary, RopeStyle::Half)?;
    let factor = |k: &str| c.f64_or(k, 1.0);
    let residual = ResidualSpec {
        style: ResidualStyle::ScaledPostNorm,
        linear_alpha: factor("linear_attn_alpha_factor")?,
        linear_beta: factor("linear_attn_beta_factor")?,
        attention_alpha: factor("full_attn_alpha_factor")?,
        attention_beta: factor("full_attn_beta_factor")?,
        ffn_alpha: factor("mlp_alpha_factor")?,
        ffn_beta: factor("mlp_beta_factor")?,
    };
    let mut mixer = BTreeMap::new();
    mixer.insert(
        "L".into(),
        MixerSpec::Lightning(LightningSpec {
            heads,
            head_dim,
            // transformers' MiniMaxLightningAttention norm uses RMSNorm's default eps.
            norm_eps: Some(1e-6),
        }),
    );
    mixer.insert(
        "A".into(),
        MixerSpec::Gqa(GqaSpec {
            heads,
            kv_heads: c.usize("num_key_value_heads")?,
            head_dim,
            output_gate: false,
            qk_norm: false,
            rope: Some(rope),
        }),
    );
    let mut ffn = BTreeMap::new();
    ffn.insert(
        "M".into(),
        FfnSpec::Moe(MoeSpec {
            experts: c.usize("num_local_experts")?,
            top_k: c.usize("num_experts_per_tok")?,
            intermediate: c.usize("intermediate_size")?,
            router: RouterKind::Softmax,
            correction_bias: false,
            groups: 1,
            topk_groups: 1,
            renormalize: true,
            routed_scaling: 1.0,
            shared_intermediate: 0,
            shared_gate: false,
        }),
    );
    let spec = ModelSpec {
        name,
        vocab_size: c.usize("vocab_size")?,
        hidden_size: hidden,
        num_layers: layers,
        tie_embeddings: c.bool_or("tie_word_embeddings", false)?,
        norm: NormSpec {
            eps: c.f64_or("rms_norm_eps", 1e-5)?,
            zero_centred: false,
        },
        residual,
        layers: LayersSpec {
            pattern,
            ffn_pattern: "M".into(),
            overrides: vec![],
        },
        mixer,
        ffn,
    };
    c.finish()?;
    let map = MiniMaxMap {
        layers: expand_layers(&spec),
    };
    Ok((spec, Box::new(map)))
}

struct MiniMaxMap {
    layers: Vec<(MixerSpec, FfnSpec)>,
}

impl SourceMap for MiniMaxMap {
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
        let (mixer, ffn) = self.layers.get(i)?;
        if let Some(m) = rest.strip_prefix("mixer.") {
            let a = format!("model.layers.{i}.self_attn");
            let t = match (mixer, m) {
                (MixerSpec::Lightning(_), "o_proj") => "out_proj",
                _ => m,
            };
            return Some(Source::whole(format!("{a}.{t}.weight"), shape));
        }
        let f = rest.strip_prefix("ffn.")?;
        let base = format!("model.layers.{i}.block_sparse_moe");
        let FfnSpec::Moe(moe) = ffn else {
            return None;
        };
        if f == "router" {
            return Some(Source::whole(format!("{base}.gate.weight"), shape));
        }
        let (e, which) = f.strip_prefix("experts.")?.split_once('.')?;
        expert_source(
            &base,
            e.parse().ok()?,
            which,
            ["w1", "w3", "w2"],
            shape,
            moe.experts,
            has,
        )
    }

    fn ignorable(&self, tensor: &str) -> bool {
        tensor.starts_with("model.layers.")
            && DECAY_BUFFERS
                .iter()
                .any(|b| tensor.ends_with(&format!("self_attn.{b}")))
    }
}
