//! `model_type = "qwen3_next"`: Gated DeltaNet + gated attention + MoE with a gated shared
//! expert; zero-centred decoder norms.

use std::collections::BTreeMap;

use serde_json::json;

use super::{common_source, expand_layers, expert_source, letters_from_types, split_layer, Cfg};
use crate::error::Result;
use crate::spec::*;
use crate::weights::{Source, SourceMap};

pub(super) fn import(c: &Cfg, name: String) -> Result<(ModelSpec, Box<dyn SourceMap>)> {
    c.require_silu()?;
    c.require(
        "attention_bias",
        &json!(false),
        "biased q/k/v projections are not supported",
    )?;
    let hidden = c.usize("hidden_size")?;
    let layers = c.usize("num_hidden_layers")?;
    let heads = c.usize("num_attention_heads")?;
    let head_dim = c.usize_or("head_dim", hidden / heads.max(1))?;
    let types = match c.str_list("layer_types")? {
        Some(t) => t,
        None => {
            let every = c.usize_or("full_attention_interval", 4)?;
            (0..layers)
                .map(|i| {
                    if (i + 1) % every.max(1) == 0 {
                        "full_attention"
                    } else {
                        "linear_attention"
                    }
                    .to_string()
                })
                .collect()
        }
    };
    c.ignore(&["full_attention_interval"]);
    let pattern = letters_from_types(
        c,
        "layer_types",
        &types,
        layers,
        &[("linear_attention", 'L'), ("full_attention", 'A')],
    )?;
    let mlp_only: Vec<usize> = match c.get("mlp_only_layers") {
        Some(v) => c.usize_list(v, "mlp_only_layers")?,
        None => vec![],
    };
    let sparse_step = c.usize_or("decoder_sparse_step", 1)?;
    let experts = c.usize_or("num_experts", 0)?;
    let ffn_pattern: String = (0..layers)
        .map(|i| {
            if !mlp_only.contains(&i) && experts > 0 && (i + 1) % sparse_step.max(1) == 0 {
                'M'
            } else {
                'D'
            }
        })
        .collect();
    c.require(
        "sliding_window",
        &json!(null),
        "sliding-window attention is not supported",
    )?;
    c.require(
        "use_sliding_window",
        &json!(false),
        "sliding-window attention is not supported",
    )?;
    c.ignore(&["max_window_layers"]);
    let mut mixer = BTreeMap::new();
    mixer.insert(
        "L".into(),
        MixerSpec::GatedDelta(GatedDeltaSpec {
            key_heads: c.usize("linear_num_key_heads")?,
            value_heads: c.usize("linear_num_value_heads")?,
            key_head_dim: c.usize("linear_key_head_dim")?,
            value_head_dim: c.usize("linear_value_head_dim")?,
            conv_kernel: c.usize_or("linear_conv_kernel_dim", 4)?,
        }),
    );
    mixer.insert(
        "A".into(),
        MixerSpec::Gqa(GqaSpec {
            heads,
            kv_heads: c.usize("num_key_value_heads")?,
            head_dim,
            output_gate: true,
            qk_norm: true,
            rope: Some(c.rope(head_dim, RopeStyle::Half)?),
        }),
    );
    let mut ffn = BTreeMap::new();
    ffn.insert(
        "D".into(),
        FfnSpec::Swiglu {
            intermediate: c.usize("intermediate_size")?,
        },
    );
    if experts > 0 {
        let shared = c.usize_or("shared_expert_intermediate_size", 0)?;
        ffn.insert(
            "M".into(),
            FfnSpec::Moe(MoeSpec {
                experts,
                top_k: c.usize("num_experts_per_tok")?,
                intermediate: c.usize("moe_intermediate_size")?,
                router: RouterKind::Softmax,
                correction_bias: false,
                groups: 1,
                topk_groups: 1,
                renormalize: c.bool_or("norm_topk_prob", true)?,
                routed_scaling: 1.0,
                shared_intermediate: shared,
                shared_gate: shared > 0,
            }),
        );
    }
    let spec = ModelSpec {
        name,
        vocab_size: c.usize("vocab_size")?,
        hidden_size: hidden,
        num_layers: layers,
        tie_embeddings: c.bool_or("tie_word_embeddings", false)?,
        norm: NormSpec {
            eps: c.f64_or("rms_norm_eps", 1e-6)?,
            zero_centred: true,
        },
        residual: ResidualSpec::default(),
        layers: LayersSpec {
            pattern,
            ffn_pattern,
            overrides: vec![],
        },
        mixer,
        ffn,
    };
    c.finish()?;
    let map = QwenMap {
        hidden: spec.hidden_size,
        layers: expand_layers(&spec),
    };
    Ok((spec, Box::new(map)))
}

struct QwenMap {
    hidden: usize,
    layers: Vec<(MixerSpec, FfnSpec)>,
}

impl SourceMap for QwenMap {
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
        let d = self.hidden;
        if let Some(m) = rest.strip_prefix("mixer.") {
            return match mixer {
                MixerSpec::GatedDelta(s) => {
                    let la = format!("model.layers.{i}.linear_attn");
                    let (hk, hv, dk, dv) =
                        (s.key_heads, s.value_heads, s.key_head_dim, s.value_head_dim);
                    let r = hv / hk;
                    // in_proj_qkvz: per key head [q(dk) k(dk) v(r*dv) z(r*dv)].
                    let group = 2 * dk + 2 * r * dv;
                    let qkvz = |off: usize, len: usize| {
                        Source::rows(
                            format!("{la}.in_proj_qkvz.weight"),
                            &[hk * group, d],
                            (0..hk).map(|g| (g * group + off, len)).collect(),
                        )
                    };
                    // in_proj_ba: per key head [b(r) a(r)].
                    let ba = |off: usize| {
                        Source::rows(
                            format!("{la}.in_proj_ba.weight"),
                            &[2 * hv, d],
                            (0..hk).map(|g| (g * 2 * r + off, r)).collect(),
                        )
                    };
                    // conv1d channels: [q (hk*dk) | k (hk*dk) | v (hv*dv)].
                    let conv_dim = 2 * hk * dk + hv * dv;
                    let kern = s.conv_kernel;
                    let conv = |off: usize, len: usize| {
                        Source::rows(
                            format!("{la}.conv1d.weight"),
                            &[conv_dim, 1, kern],
                            vec![(off, len)],
                        )
                    };
                    Some(match m {
                        "q_proj" => qkvz(0, dk),
                        "k_proj" => qkvz(dk, dk),
                        "v_proj" => qkvz(2 * dk, r * dv),
                        "z_proj" => qkvz(2 * dk + r * dv, r * dv),
                        "b_proj" => ba(0),
                        "a_proj" => ba(r),
                        "q_conv" => conv(0, hk * dk),
                        "k_conv" => conv(hk * dk, hk * dk),
                        "v_conv" => conv(2 * hk * dk, hv * dv),
                        "A_log" => Source::whole(format!("{la}.A_log"), shape),
                        "dt_bias" => Source::whole(format!("{la}.dt_bias"), shape),
                        "norm" => Source::whole(format!("{la}.norm.weight"), shape),
                        "o_proj" => Source::whole(format!("{la}.out_proj.weight"), shape),
                        _ => return None,
                    })
                }
                MixerSpec::Gqa(_) => Some(Source::whole(
                    format!("model.layers.{i}.self_attn.{m}.weight"),
                    shape,
                )),
                _ => None,
            };
        }
        let f = rest.strip_prefix("ffn.")?;
        let base = format!("model.layers.{i}.mlp");
        match ffn {
            FfnSpec::Swiglu { .. } => Some(Source::whole(format!("{base}.{f}.weight"), shape)),
            FfnSpec::Moe(moe) => {
                if f == "router" {
                    return Some(Source::whole(format!("{base}.gate.weight"), shape));
                }
                if f == "shared_gate" {
                    return Some(Source::whole(
                        format!("{base}.shared_expert_gate.weight"),
                        shape,
                    ));
                }
                if let Some(w) = f.strip_prefix("shared.") {
                    return Some(Source::whole(
                        format!("{base}.shared_expert.{w}.weight"),
                        shape,
                    ));
                }
                let (e, which) = f.strip_prefix("experts.")?.split_once('.')?;
                expert_source(
                    &base,
                    e.parse().ok()?,
                    which,
                    ["gate_proj", "up_proj", "down_proj"],
                    shape,
                    moe.experts,
                    has,
                )
            }
        }
    }
}
