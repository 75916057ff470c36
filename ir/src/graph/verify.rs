//! The graph verifier: types re-inferred, operands defined before use, weights declared with the
//! shapes their ops need, and the precision rules (recurrent and conv state, decay gates and
//! router scores in f32). Every error names the offending node.

use crate::error::{Error, Result};
use crate::graph::{DType, Decay, Graph, Op, StateId, StateKind};

fn err(node: &str, msg: impl Into<String>) -> Error {
    Error::Graph {
        node: node.to_string(),
        msg: msg.into(),
    }
}

pub fn verify(g: &Graph) -> Result<()> {
    for n in g.schedule() {
        let node = g.node(n);
        let name = node.name.as_str();
        let inputs = g.inputs(n);
        for &i in &inputs {
            if i >= n {
                return Err(err(
                    name,
                    format!("operand {} is defined after its use", g.node(i).name),
                ));
            }
        }
        let tys: Vec<_> = inputs.iter().map(|&i| g.node(i).ty).collect();
        let ty = node.op.infer(&tys).map_err(|m| err(name, m))?;
        if ty != node.ty {
            return Err(err(
                name,
                format!("recorded type {:?} but operands give {:?}", node.ty, ty),
            ));
        }
        let weight = |w: &str, shape: &[usize]| -> Result<()> {
            match g.weights.get(w) {
                None => Err(err(name, format!("weight {w} is not declared"))),
                Some(d) if d.shape != shape => Err(err(
                    name,
                    format!(
                        "weight {w} is declared {:?}, the op needs {:?}",
                        d.shape, shape
                    ),
                )),
                Some(_) => Ok(()),
            }
        };
        let state = |id: StateId, kind: StateKind, dtype: Option<DType>| -> Result<()> {
            let Some(s) = g.states.get(id.0) else {
                return Err(err(name, format!("state #{} is not declared", id.0)));
            };
            if s.kind != kind {
                return Err(err(
                    name,
                    format!("state {} is {:?}, expected {kind:?}", s.name, s.kind),
                ));
            }
            if let Some(dt) = dtype {
                if s.dtype != dt {
                    return Err(err(
                        name,
                        format!(
                            "state {} is {}: the precision rule requires {}",
                            s.name,
                            s.dtype.name(),
                            dt.name()
                        ),
                    ));
                }
            }
            Ok(())
        };
        match &node.op {
            Op::Embed { weight: w, dim } => weight(w, &[g.vocab_size, *dim])?,
            Op::RmsNorm {
                weight: w, group, ..
            }
            | Op::GatedRmsNorm {
                weight: w, group, ..
            } => weight(w, &[*group])?,
            Op::Linear {
                weight: w,
                in_dim,
                out_dim,
            } => weight(w, &[*out_dim, *in_dim])?,
            Op::ShortConv {
                weight: w,
                channels,
                kernel,
                state: s,
            } => {
                weight(w, &[*channels, *kernel])?;
                state(*s, StateKind::Conv, Some(DType::F32))?;
                let want = vec![*channels, kernel - 1];
                if g.state(*s).shape != want {
                    return Err(err(name, format!("conv state shape must be {want:?}")));
                }
            }
            Op::DecayGate {
                a_log,
                dt_bias,
                heads,
                width,
                ..
            } => {
                weight(a_log, &[*heads])?;
                weight(dt_bias, &[heads * width])?;
                if node.ty.dtype != DType::F32 {
                    return Err(err(name, "decay gates must be computed in f32"));
                }
            }
            Op::Recurrence { rec, state: s } => {
                state(*s, StateKind::Recurrent, Some(DType::F32))?;
                let want = vec![rec.heads, rec.dk, rec.dv];
                if g.state(*s).shape != want {
                    return Err(err(name, format!("recurrent state shape must be {want:?}")));
                }
                if let Decay::Scalar | Decay::PerChannel = rec.decay {
                    if tys[3].dtype != DType::F32 {
                        return Err(err(name, "the log-decay operand must be f32"));
                    }
                }
            }
            Op::Attention {
                kv_heads,
                head_dim,
                v_dim,
                cache,
                ..
            } => {
                state(*cache, StateKind::KvCache, None)?;
                if g.state(*cache).numel() != kv_heads * (head_dim + v_dim) {
                    return Err(err(name, "KV cache entry size does not match the heads"));
                }
            }
            Op::MlaAttention {
                heads,
                kv_lora_rank,
                nope,
                rope,
                v_dim,
                kv_b,
                cache,
                ..
            } => {
                weight(kv_b, &[heads * (nope + v_dim), *kv_lora_rank])?;
                state(*cache, StateKind::MlaLatent, None)?;
                if g.state(*cache).numel() != kv_lora_rank + rope {
                    return Err(err(
                        name,
                        "latent cache entry must be kv_lora_rank + rope dims",
                    ));
                }
            }
            Op::Moe {
                moe,
                prefix,
                hidden,
            } => {
                weight(&format!("{prefix}.router"), &[moe.experts, *hidden])?;
                if moe.correction_bias {
                    weight(&format!("{prefix}.router_bias"), &[moe.experts])?;
                }
                for e in 0..moe.experts {
                    let ep = format!("{prefix}.experts.{e}");
                    weight(&format!("{ep}.gate_proj"), &[moe.intermediate, *hidden])?;
                    weight(&format!("{ep}.up_proj"), &[moe.intermediate, *hidden])?;
                    weight(&format!("{ep}.down_proj"), &[*hidden, moe.intermediate])?;
                }
            }
            Op::Tokens
            | Op::Slice { .. }
            | Op::L2Norm { .. }
            | Op::Unary(_)
            | Op::Mul
            | Op::Add { .. }
            | Op::Rope(_)
            | Op::SwiGlu => {}
        }
    }
    let out = g.node(g.output);
    if out.ty.cols != Some(g.vocab_size) {
        return Err(err(&out.name, "the graph output must be [T, vocab] logits"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::verify;
    use crate::graph::build::build_graph;
    use crate::graph::{DType, Op};
    use crate::spec::ModelSpec;

    fn graph() -> crate::graph::Graph {
        let text = include_str!("../../../examples/qwen3-next-tiny.toml");
        build_graph(&ModelSpec::from_toml_str(text, Path::new("qwen3-next-tiny.toml")).unwrap())
            .unwrap()
    }

    #[test]
    fn rejects_bf16_recurrent_state() {
        let mut g = graph();
        let id =
            g.g.node_indices()
                .find_map(|n| match &g.g[n].op {
                    Op::Recurrence { state, .. } => Some(*state),
                    _ => None,
                })
                .unwrap();
        g.states[id.0].dtype = DType::Bf16;
        let e = verify(&g).unwrap_err().to_string();
        assert!(
            e.contains("layers.0.mixer.recurrence") && e.contains("precision rule"),
            "{e}"
        );
    }

    #[test]
    fn rejects_undeclared_weight_and_bad_shapes() {
        let mut g = graph();
        g.weights.remove("layers.1.mixer.q_proj");
        let e = verify(&g).unwrap_err().to_string();
        assert!(
            e.contains("node layers.1.mixer.q_proj") && e.contains("not declared"),
            "{e}"
        );

        let mut g = graph();
        let n =
            g.g.node_indices()
                .find(|&n| g.g[n].name == "layers.3.mixer.o_proj")
                .unwrap();
        if let Op::Linear { in_dim, .. } = &mut g.g[n].op {
            *in_dim += 1;
        }
        let e = verify(&g).unwrap_err().to_string();
        assert!(e.contains("layers.3.mixer.o_proj"), "{e}");
    }

    #[test]
    fn rejects_f32_decay_rule_violation() {
        let mut g = graph();
        let n =
            g.g.node_indices()
                .find(|&n| matches!(g.g[n].op, Op::DecayGate { .. }))
                .unwrap();
        g.g[n].ty.dtype = DType::Bf16;
        let e = verify(&g).unwrap_err().to_string();
        assert!(e.contains("layers.0.mixer.decay_gate"), "{e}");
    }
}
