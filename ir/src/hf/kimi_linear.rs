//! `model_type = "kimi_linear"`: Kimi Delta Attention + MLA without rotary (NoPE) + MoE with
//! sigmoid routing and a correction bias. Accepts both the transformers layout (`layer_types`,
//! `mlp_layer_types`, `linear_*`) and the original checkpoint's (`linear_attn_config`,
//! `first_k_dense_replace`); tensor names follow the original checkpoint.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::{
    common_source, deepseek_v3::mla_source, expand_layers, expert_source, letters_from_types,
    split_layer, Cfg,
};
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
        "mla_use_nope",
        &json!(true),
        "Kimi Linear's MLA layers use no rotary embedding",
    )?;
    c.require(
        "moe_router_activation_func",
        &json!("sigmoid"),
        "only sigmoid router scores",
    )?;
    c.ignore(&[
        "use_grouped_topk",
        "head_dim",
        "num_key_value_heads",
        "qk_head_dim",
    ]);
    let layers = c.usize("num_hidden_layers")?;
    let hidden = c.usize("hidden_size")?;

    // Layer kinds: transformers `layer_types`, or 1-based lists in `linear_attn_config`.
    let (pattern, lin_heads, lin_dim, conv) =
        if let Some(lac) = c.get("linear_attn_config").cloned() {
            let key = |k: &str| format!("linear_attn_config.{k}");
            let get = |k: &str| -> Result<usize> {
                lac.get(k)
                    .and_then(Value::as_u64)
                    .map(|v| v as usize)
                    .ok_or_else(|| c.err(&key(k), "missing or not an integer"))
            };
            let full: Vec<usize> = c.usize_list(
                lac.get("full_attn_layers").unwrap_or(&json!([])),
                &key("full_attn_layers"),
            )?;
            let kda: Vec<usize> = c.usize_list(
                lac.get("kda_layers").unwrap_or(&json!([])),
                &key("kda_layers"),
            )?;
            let mut p = vec!['?'; layers];
            for (list, letter, k) in [(&kda, 'K', "kda_layers"), (&full, 'A', "full_attn_layers")] {
                for &l in list {
                    if l == 0 || l > layers {
                        return Err(c.err(
                            &key(k),
                            format!("layer {l} is outside 1..={layers} (the lists are 1-based)"),
                        ));
                    }
                    p[l - 1] = letter;
                }
            }
            if let Some(i) = p.iter().position(|&x| x == '?') {
                return Err(c.err(
                    &key("kda_layers"),
                    format!(
                        "layer {} is in neither kda_layers nor full_attn_layers",
                        i + 1
                    ),
                ));
            }
            if let Some(obj) = lac.as_object() {
                for k in obj.keys() {
                    if ![
                        "full_attn_layers",
                        "kda_layers",
                        "num_heads",
                        "head_dim",
                        "short_conv_kernel_size",
                    ]
                    .contains(&k.as_str())
                    {
                        return Err(c.err(&key(k), "unsupported key"));
                    }
                }
            }
            let conv = lac
                .get("short_conv_kernel_size")
                .and_then(Value::as_u64)
                .unwrap_or(4) as usize;
            (
                p.into_iter().collect::<String>(),
                get("num_heads")?,
                get("head_dim")?,
                conv,
            )
        } else {
            let types = c
                .str_list("layer_types")?
                .ok_or_else(|| c.err("layer_types", "missing (and no linear_attn_config)"))?;
            let p = letters_from_types(
                c,
                "layer_types",
                &types,
                layers,
                &[
                    ("linear_attention", 'K'),
                    ("kda", 'K'),
                    ("full_attention", 'A'),
                    ("mla", 'A'),
                ],
            )?;
            (
                p,
                c.usize_any(&["linear_num_heads", "linear_num_key_heads"])?,
                c.usize_any(&["linear_head_dim", "linear_key_head_dim"])?,
                c.usize_or("linear_conv_kernel_dim", 4)?,
            )
        };
    for k in ["linear_num_value_heads", "linear_value_head_dim"] {
        if let Some(v) = c.get(k) {
            let want = if k.ends_with("heads") {
                lin_heads
            } else {
                lin_dim
            };
            if v.as_u64() != Some(want as u64) {
                return Err(c.err(
                    k,
                    format!("{v} differs from the key heads/dims {want}: KDA needs them equal"),
                ));
            }
        }
    }

    // FFN kinds: `mlp_layer_types`, or first_k_dense_replace / moe_layer_freq.
    let ffn_pattern: String = match c.str_list("mlp_layer_types")? {
        Some(t) => letters_from_types(
            c,
            "mlp_layer_types",
            &t,
            layers,
            &[("dense", 'D'), ("sparse", 'M'), ("moe", 'M')],
        )?,
        None => {
            let dense = c.usize_or("first_k_dense_replace", 1)?;
            let freq = c.usize_or("moe_layer_freq", 1)?;
            (0..layers)
                .map(|i| {
                    if i >= dense && i % freq.max(1) == 0 {
                        'M'
                    } else {
                        'D'
                    }
                })
                .collect()
        }
    };
    c.ignore(&["first_k_dense_replace", "moe_layer_freq"]);

    let heads = c.usize("num_attention_heads")?;
    let mut mixer = BTreeMap::new();
    mixer.insert(
        "K".into(),
        MixerSpec::Kda(KdaSpec {
            heads: lin_heads,
            head_dim: lin_dim,
            conv_kernel: conv,
            gate_rank: lin_dim,
            output_gate_rank: lin_dim,
            lower_bound: None,
        }),
    );
    mixer.insert(
        "A".into(),
        MixerSpec::Mla(MlaSpec {
            heads,
            q_lora_rank: c.opt_usize("q_lora_rank")?,
            kv_lora_rank: c.usize("kv_lora_rank")?,
            qk_nope_head_dim: c.usize("qk_nope_head_dim")?,
            qk_rope_head_dim: c.usize("qk_rope_head_dim")?,
            v_head_dim: c.usize("v_head_dim")?,
            rope: None,
            // KimiMLAAttention's latent norms use RMSNorm's default eps, not rms_norm_eps.
            norm_eps: Some(1e-6),
        }),
    );
    c.ignore(&["rope_theta", "rope_scaling", "rope_parameters"]);
    let moe_inter = c.usize("moe_intermediate_size")?;
    let mut ffn = BTreeMap::new();
    ffn.insert(
        "D".into(),
        FfnSpec::Swiglu {
            intermediate: c.usize("intermediate_size")?,
        },
    );
    let renorm = match c.get_any(&["moe_renormalize", "norm_topk_prob"]) {
        Some((_, Value::Bool(b))) => *b,
        Some((k, v)) => return Err(c.err(k, format!("expected true or false, found {v}"))),
        None => true,
    };
    ffn.insert(
        "M".into(),
        FfnSpec::Moe(MoeSpec {
            experts: c.usize_any(&["num_experts", "n_routed_experts", "num_local_experts"])?,
            top_k: c.usize_any(&["num_experts_per_token", "num_experts_per_tok"])?,
            intermediate: moe_inter,
            router: RouterKind::Sigmoid,
            correction_bias: true,
            groups: c
                .opt_usize("num_expert_group")?
                .or(c.opt_usize("n_group")?)
                .unwrap_or(1),
            topk_groups: c.usize_or("topk_group", 1)?,
            renormalize: renorm,
            routed_scaling: c.f64_or("routed_scaling_factor", 1.0)?,
            shared_intermediate: moe_inter
                * c.opt_usize("num_shared_experts")?
                    .or(c.opt_usize("n_shared_experts")?)
                    .unwrap_or(0),
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
    let map = KimiMap {
        layers: expand_layers(&spec),
    };
    Ok((spec, Box::new(map)))
}

struct KimiMap {
    layers: Vec<(MixerSpec, FfnSpec)>,
}

impl SourceMap for KimiMap {
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
            return match mixer {
                MixerSpec::Kda(s) => Some(match m {
                    "q_conv" | "k_conv" | "v_conv" => {
                        Source::whole(format!("{a}.{m}1d.weight"), &[shape[0], 1, shape[1]])
                    }
                    "A_log" => Source::whole(format!("{a}.A_log"), &[1, 1, s.heads, 1]),
                    "dt_bias" => Source::whole(format!("{a}.dt_bias"), shape),
                    _ => Source::whole(format!("{a}.{m}.weight"), shape),
                }),
                MixerSpec::Mla(_) => mla_source(i, m, shape),
                _ => None,
            };
        }
        let f = rest.strip_prefix("ffn.")?;
        // The original checkpoint writes even the dense MLP under `block_sparse_moe`.
        let base = if has(&format!("model.layers.{i}.mlp.gate.weight"))
            || has(&format!("model.layers.{i}.mlp.down_proj.weight"))
        {
            format!("model.layers.{i}.mlp")
        } else {
            format!("model.layers.{i}.block_sparse_moe")
        };
        match ffn {
            FfnSpec::Swiglu { .. } => Some(Source::whole(format!("{base}.{f}.weight"), shape)),
            FfnSpec::Moe(moe) => Some(match f {
                "router" => Source::whole(format!("{base}.gate.weight"), shape),
                "router_bias" => {
                    Source::whole(format!("{base}.gate.e_score_correction_bias"), shape)
                }
                _ => {
                    if let Some(w) = f.strip_prefix("shared.") {
                        Source::whole(format!("{base}.shared_experts.{w}.weight"), shape)
                    } else {
                        let (e, which) = f.strip_prefix("experts.")?.split_once('.')?;
                        return expert_source(
                            &base,
                            e.parse().ok()?,
                            which,
                            ["w1", "w3", "w2"],
                            shape,
                            moe.experts,
                            has,
                        );
                    }
                }
            }),
        }
    }
}
