//! FFNs: dense SwiGLU and mixture of experts (router + routed experts in one `moe` node; the
//! shared expert and its gate as ordinary nodes).

use petgraph::stable_graph::NodeIndex;

use crate::graph::{Op, Unary, WeightKind};
use crate::spec::{FfnSpec, RouterKind};

use super::Builder;

pub(super) fn kind_name(f: &FfnSpec) -> String {
    match f {
        FfnSpec::Swiglu { .. } => "swiglu".into(),
        FfnSpec::Moe(m) => format!("moe{}x{}", m.experts, m.top_k),
    }
}

fn swiglu(b: &mut Builder, p: &str, h: NodeIndex, inter: usize, kind: WeightKind) -> NodeIndex {
    let d = b.spec.hidden_size;
    let gate = b.linear(&format!("{p}.gate_proj"), h, inter, kind);
    let up = b.linear(&format!("{p}.up_proj"), h, inter, kind);
    let act = b.node(&format!("{p}.swiglu"), Op::SwiGlu, &[gate, up]);
    b.linear(&format!("{p}.down_proj"), act, d, kind)
}

pub(super) fn ffn(b: &mut Builder, p: &str, h: NodeIndex, f: &FfnSpec) -> NodeIndex {
    let d = b.spec.hidden_size;
    match f {
        FfnSpec::Swiglu { intermediate } => swiglu(b, p, h, *intermediate, WeightKind::Dense),
        FfnSpec::Moe(m) => {
            b.weight(&format!("{p}.router"), &[m.experts, d], WeightKind::Dense);
            if m.correction_bias {
                b.weight(&format!("{p}.router_bias"), &[m.experts], WeightKind::Small);
            }
            for e in 0..m.experts {
                let ep = format!("{p}.experts.{e}");
                b.weight(
                    &format!("{ep}.gate_proj"),
                    &[m.intermediate, d],
                    WeightKind::Expert,
                );
                b.weight(
                    &format!("{ep}.up_proj"),
                    &[m.intermediate, d],
                    WeightKind::Expert,
                );
                b.weight(
                    &format!("{ep}.down_proj"),
                    &[d, m.intermediate],
                    WeightKind::Expert,
                );
            }
            debug_assert!(m.groups == 1 || m.router == RouterKind::Sigmoid);
            let routed = b.node(
                &format!("{p}.routed"),
                Op::Moe {
                    moe: m.clone(),
                    prefix: p.to_string(),
                    hidden: d,
                },
                &[h],
            );
            if m.shared_intermediate == 0 {
                return routed;
            }
            let sp = format!("{p}.shared");
            let mut shared = swiglu(b, &sp, h, m.shared_intermediate, WeightKind::Dense);
            if m.shared_gate {
                let g = b.linear(&format!("{p}.shared_gate"), h, 1, WeightKind::Dense);
                let g = b.unary(&format!("{p}.shared_gate_act"), Unary::Sigmoid, g);
                // The [T, 1] gate broadcasts over the hidden columns.
                shared = b.node(&format!("{p}.shared_gated"), Op::Mul, &[shared, g]);
            }
            b.add(&format!("{p}.out"), routed, shared)
        }
    }
}
