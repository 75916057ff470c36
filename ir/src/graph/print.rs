//! The stable text form of a graph: one line per node, `%N = op operands {attrs} : type  // name`.
//! Numbering follows the schedule, so the text does not depend on petgraph indices.

use std::collections::HashMap;
use std::fmt::Write;

use crate::graph::{Decay, GateForm, Graph, NodeIndex, Op, StateKind, Unary, Update};
use crate::spec::{RopeStyle, RouterKind};

/// Shortest round-tripping form of a float (`1e-6`, `0.5`, `2.446`).
pub fn fmt_f64(v: f64) -> String {
    let s = format!("{v}");
    if s.len() > 8 {
        format!("{v:e}")
    } else {
        s
    }
}

fn attrs(op: &Op) -> String {
    let st = |id: &crate::graph::StateId| format!("#{}", id.0);
    match op {
        Op::Tokens | Op::Mul | Op::SwiGlu | Op::Unary(_) => String::new(),
        Op::Embed { weight, .. } => format!("weight = {weight}"),
        Op::RmsNorm { weight, eps, zero_centred, group } => format!(
            "weight = {weight}, group = {group}, eps = {}{}",
            fmt_f64(*eps),
            if *zero_centred { ", zero_centred" } else { "" }
        ),
        Op::GatedRmsNorm { weight, eps, group, gate } => format!(
            "weight = {weight}, group = {group}, eps = {}, gate = {}",
            fmt_f64(*eps),
            match gate {
                Unary::Silu => "silu",
                Unary::Sigmoid => "sigmoid",
            }
        ),
        Op::Linear { weight, .. } => format!("weight = {weight}"),
        Op::Slice { group, start, len } => format!("group = {group}, cols = {start}..{}", start + len),
        Op::ShortConv { weight, kernel, state, .. } => {
            format!("weight = {weight}, kernel = {kernel}, act = silu, state = {}", st(state))
        }
        Op::L2Norm { group, eps } => format!("group = {group}, eps = {}", fmt_f64(*eps)),
        Op::Add { alpha, beta } => {
            if *alpha == 1.0 && *beta == 1.0 {
                String::new()
            } else {
                format!("alpha = {}, beta = {}", fmt_f64(*alpha), fmt_f64(*beta))
            }
        }
        Op::DecayGate { a_log, dt_bias, heads, width, form } => format!(
            "A_log = {a_log}, dt_bias = {dt_bias}, heads = {heads}, width = {width}, form = {}",
            match form {
                GateForm::Softplus => "-exp(A_log)*softplus(x+dt_bias)".to_string(),
                GateForm::Bounded { lower_bound } =>
                    format!("{}*sigmoid(exp(A_log)*(x+dt_bias))", fmt_f64(*lower_bound)),
            }
        ),
        Op::Recurrence { rec, state } => format!(
            "heads = {}, key_heads = {}, dk = {}, dv = {}, update = {}, decay = {}, scale = {}, state = {}",
            rec.heads,
            rec.key_heads,
            rec.dk,
            rec.dv,
            match rec.update {
                Update::Additive => "additive",
                Update::Delta => "delta",
            },
            match rec.decay {
                Decay::None => "none".to_string(),
                Decay::Scalar => "scalar".to_string(),
                Decay::PerChannel => "per_channel".to_string(),
                Decay::Fixed { layer, num_layers } => format!("fixed(layer {layer} of {num_layers})"),
            },
            fmt_f64(rec.scale),
            st(state)
        ),
        Op::Rope(r) => {
            let mut s = format!(
                "heads = {}, head_dim = {}, cols = {}..{}, style = {}, theta = {}",
                r.heads,
                r.head_dim,
                r.offset,
                r.offset + r.rotary_dim,
                match r.style {
                    RopeStyle::Half => "half",
                    RopeStyle::Interleaved => "interleaved",
                },
                fmt_f64(r.theta)
            );
            if let Some(y) = r.yarn {
                let _ = write!(
                    s,
                    ", yarn(factor = {}, original = {}, beta_fast = {}, beta_slow = {}, mscale = {}, mscale_all_dim = {})",
                    fmt_f64(y.factor),
                    y.original_max_position_embeddings,
                    fmt_f64(y.beta_fast),
                    fmt_f64(y.beta_slow),
                    fmt_f64(y.mscale),
                    fmt_f64(y.mscale_all_dim)
                );
            }
            s
        }
        Op::Attention { heads, kv_heads, head_dim, v_dim, scale, cache } => format!(
            "heads = {heads}, kv_heads = {kv_heads}, head_dim = {head_dim}, v_dim = {v_dim}, scale = {}, causal, cache = {}",
            fmt_f64(*scale),
            st(cache)
        ),
        Op::MlaAttention { heads, kv_lora_rank, nope, rope, v_dim, scale, kv_b, cache } => format!(
            "heads = {heads}, kv_lora_rank = {kv_lora_rank}, nope = {nope}, rope = {rope}, v_dim = {v_dim}, scale = {}, kv_b = {kv_b}, causal, cache = {}",
            fmt_f64(*scale),
            st(cache)
        ),
        Op::Moe { moe, prefix, .. } => {
            let mut s = format!(
                "experts = {}, top_k = {}, intermediate = {}, router = {}",
                moe.experts,
                moe.top_k,
                moe.intermediate,
                match moe.router {
                    RouterKind::Softmax => "softmax",
                    RouterKind::Sigmoid => "sigmoid",
                }
            );
            if moe.correction_bias {
                s.push_str(", correction_bias");
            }
            if moe.groups > 1 {
                let _ = write!(s, ", groups = {}, topk_groups = {}", moe.groups, moe.topk_groups);
            }
            if moe.renormalize {
                s.push_str(", renormalize");
            }
            if moe.routed_scaling != 1.0 {
                let _ = write!(s, ", scaling = {}", fmt_f64(moe.routed_scaling));
            }
            let _ = write!(s, ", weights = {prefix}.{{router,experts.*}}");
            s
        }
    }
}

/// Prints the whole graph.
pub fn print_graph(g: &Graph) -> String {
    let mut out = String::new();
    let params: usize = g.weights.values().map(|w| w.numel()).sum();
    let _ = writeln!(
        out,
        "graph \"{}\" {{vocab = {}, hidden = {}, layers = {}}}",
        g.name, g.vocab_size, g.hidden_size, g.num_layers
    );
    for (i, (m, f)) in g.layer_kinds.iter().enumerate() {
        let _ = writeln!(out, "  // layer {i}: {m} + {f}");
    }
    let _ = writeln!(
        out,
        "  // weights: {} tensors, {} parameters",
        g.weights.len(),
        params
    );
    for (i, s) in g.states.iter().enumerate() {
        let kind = match s.kind {
            StateKind::Conv => "conv",
            StateKind::Recurrent => "recurrent",
            StateKind::KvCache => "kv_cache",
            StateKind::MlaLatent => "mla_latent",
        };
        let per = if s.per_token() { "token" } else { "sequence" };
        let _ = writeln!(
            out,
            "  state #{i} = {kind} {}{:?} per {per}  // {}",
            s.dtype.name(),
            s.shape,
            s.name
        );
    }
    let mut num = HashMap::new();
    for (k, n) in g.schedule().into_iter().enumerate() {
        num.insert(n, k);
        let node = g.node(n);
        let operands: Vec<String> = g.inputs(n).iter().map(|i| format!("%{}", num[i])).collect();
        let ty = match node.ty.cols {
            None => format!("{}[T]", node.ty.dtype.name()),
            Some(c) => format!("{}[T, {c}]", node.ty.dtype.name()),
        };
        let a = attrs(&node.op);
        let mut line = format!("  %{k} = {}", node.op.mnemonic());
        if !operands.is_empty() {
            let _ = write!(line, " {}", operands.join(", "));
        }
        if !a.is_empty() {
            let _ = write!(line, " {{{a}}}");
        }
        let _ = writeln!(out, "{line} : {ty}  // {}", node.name);
    }
    let _ = writeln!(out, "  return %{}", num[&g.output]);
    out
}

/// Graphviz text of the graph: one box per node (name, op, type), an edge per operand, one
/// cluster per layer. `compile-model ir MODEL --stage graph --format dot|svg`.
pub fn print_dot(g: &Graph) -> String {
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let layer_of = |name: &str| -> Option<usize> {
        name.strip_prefix("layers.")?
            .split('.')
            .next()?
            .parse()
            .ok()
    };
    let mut out = String::new();
    let _ = writeln!(out, "digraph \"{}\" {{", esc(&g.name));
    let _ = writeln!(out, "  rankdir=TB;");
    let _ = writeln!(
        out,
        "  node [shape=box, fontname=\"monospace\", fontsize=10];"
    );
    let mut by_layer: std::collections::BTreeMap<Option<usize>, Vec<NodeIndex>> =
        Default::default();
    for n in g.schedule() {
        by_layer
            .entry(layer_of(&g.node(n).name))
            .or_default()
            .push(n);
    }
    for (layer, nodes) in &by_layer {
        let pad = if layer.is_some() { "    " } else { "  " };
        if let Some(l) = layer {
            let (m, f) = &g.layer_kinds[*l];
            let _ = writeln!(out, "  subgraph cluster_{l} {{");
            let _ = writeln!(out, "    label=\"layer {l}: {} + {}\";", esc(m), esc(f));
        }
        for &n in nodes {
            let node = g.node(n);
            let cols = node.ty.cols.map_or(String::new(), |c| format!(", {c}"));
            let _ = writeln!(
                out,
                "{pad}n{} [label=\"{}\\n{} : {}[T{cols}]\"];",
                n.index(),
                esc(&node.name),
                node.op.mnemonic(),
                node.ty.dtype.name()
            );
        }
        if layer.is_some() {
            let _ = writeln!(out, "  }}");
        }
    }
    for n in g.schedule() {
        for i in g.inputs(n) {
            let _ = writeln!(out, "  n{} -> n{};", i.index(), n.index());
        }
    }
    out.push_str("}\n");
    out
}
