//! Linear-attention mixers: Gated DeltaNet / DeltaNet, Kimi Delta Attention, lightning attention.
//! Each becomes projections → short conv → (L2 norm, gates) → one `recurrence` node → output
//! norm/gate → output projection; the recurrence node is where prefill (chunked) and decode
//! (recurrent) kernels are generated later.

use petgraph::stable_graph::NodeIndex;

use crate::graph::{DType, Decay, GateForm, Op, Recurrence, StateKind, Unary, Update, WeightKind};
use crate::spec::{GatedDeltaSpec, KdaSpec, LightningSpec};

use super::Builder;

/// q/k L2-norm epsilon used by every delta-rule reference (fla `l2norm`, transformers).
const L2_EPS: f64 = 1e-6;

fn short_conv(
    b: &mut Builder,
    name: &str,
    x: NodeIndex,
    channels: usize,
    kernel: usize,
) -> NodeIndex {
    let weight = b.weight(name, &[channels, kernel], WeightKind::Small);
    let state = b.state(name, StateKind::Conv, DType::F32, &[channels, kernel - 1]);
    b.node(
        name,
        Op::ShortConv {
            weight,
            channels,
            kernel,
            state,
        },
        &[x],
    )
}

fn l2norm(b: &mut Builder, name: &str, x: NodeIndex, group: usize) -> NodeIndex {
    b.node(name, Op::L2Norm { group, eps: L2_EPS }, &[x])
}

fn recurrence(b: &mut Builder, p: &str, rec: Recurrence, operands: &[NodeIndex]) -> NodeIndex {
    let state = b.state(
        &format!("{p}.state"),
        StateKind::Recurrent,
        DType::F32,
        &[rec.heads, rec.dk, rec.dv],
    );
    b.node(
        &format!("{p}.recurrence"),
        Op::Recurrence { rec, state },
        operands,
    )
}

/// Gated DeltaNet (Qwen3-Next) and, with `gated = false`, DeltaNet.
pub(super) fn gated_delta(
    b: &mut Builder,
    p: &str,
    h: NodeIndex,
    s: &GatedDeltaSpec,
    gated: bool,
) -> NodeIndex {
    let (hk, hv, dk, dv) = (s.key_heads, s.value_heads, s.key_head_dim, s.value_head_dim);
    let d = b.spec.hidden_size;
    let q = b.linear(&format!("{p}.q_proj"), h, hk * dk, WeightKind::Dense);
    let k = b.linear(&format!("{p}.k_proj"), h, hk * dk, WeightKind::Dense);
    let v = b.linear(&format!("{p}.v_proj"), h, hv * dv, WeightKind::Dense);
    let z = b.linear(&format!("{p}.z_proj"), h, hv * dv, WeightKind::Dense);
    let bl = b.linear(&format!("{p}.b_proj"), h, hv, WeightKind::Dense);
    let q = short_conv(b, &format!("{p}.q_conv"), q, hk * dk, s.conv_kernel);
    let k = short_conv(b, &format!("{p}.k_conv"), k, hk * dk, s.conv_kernel);
    let v = short_conv(b, &format!("{p}.v_conv"), v, hv * dv, s.conv_kernel);
    let q = l2norm(b, &format!("{p}.q_l2norm"), q, dk);
    let k = l2norm(b, &format!("{p}.k_l2norm"), k, dk);
    let beta = b.unary(&format!("{p}.beta"), Unary::Sigmoid, bl);
    let mut operands = vec![q, k, v];
    let decay = if gated {
        let a = b.linear(&format!("{p}.a_proj"), h, hv, WeightKind::Dense);
        let a_log = b.weight(&format!("{p}.A_log"), &[hv], WeightKind::Small);
        let dt_bias = b.weight(&format!("{p}.dt_bias"), &[hv], WeightKind::Small);
        let g = b.node(
            &format!("{p}.decay_gate"),
            Op::DecayGate {
                a_log,
                dt_bias,
                heads: hv,
                width: 1,
                form: GateForm::Softplus,
            },
            &[a],
        );
        operands.push(g);
        Decay::Scalar
    } else {
        Decay::None
    };
    operands.push(beta);
    let rec = Recurrence {
        heads: hv,
        key_heads: hk,
        dk,
        dv,
        update: Update::Delta,
        decay,
        scale: (dk as f64).powf(-0.5),
    };
    let o = recurrence(b, p, rec, &operands);
    let weight = b.weight(&format!("{p}.norm"), &[dv], WeightKind::Small);
    let o = b.node(
        &format!("{p}.norm"),
        Op::GatedRmsNorm {
            weight,
            eps: b.spec.norm.eps,
            group: dv,
            gate: Unary::Silu,
        },
        &[o, z],
    );
    b.linear(&format!("{p}.o_proj"), o, d, WeightKind::Dense)
}

/// Kimi Delta Attention: per-channel decay from a low-rank gate, sigmoid-gated output norm.
pub(super) fn kda(b: &mut Builder, p: &str, h: NodeIndex, s: &KdaSpec) -> NodeIndex {
    let (heads, dh) = (s.heads, s.head_dim);
    let d = b.spec.hidden_size;
    let q = b.linear(&format!("{p}.q_proj"), h, heads * dh, WeightKind::Dense);
    let k = b.linear(&format!("{p}.k_proj"), h, heads * dh, WeightKind::Dense);
    let v = b.linear(&format!("{p}.v_proj"), h, heads * dh, WeightKind::Dense);
    let q = short_conv(b, &format!("{p}.q_conv"), q, heads * dh, s.conv_kernel);
    let k = short_conv(b, &format!("{p}.k_conv"), k, heads * dh, s.conv_kernel);
    let v = short_conv(b, &format!("{p}.v_conv"), v, heads * dh, s.conv_kernel);
    let q = l2norm(b, &format!("{p}.q_l2norm"), q, dh);
    let k = l2norm(b, &format!("{p}.k_l2norm"), k, dh);
    let f = b.linear(&format!("{p}.f_a_proj"), h, s.gate_rank, WeightKind::Dense);
    let f = b.linear(&format!("{p}.f_b_proj"), f, heads * dh, WeightKind::Dense);
    let a_log = b.weight(&format!("{p}.A_log"), &[heads], WeightKind::Small);
    let dt_bias = b.weight(&format!("{p}.dt_bias"), &[heads * dh], WeightKind::Small);
    let form = match s.lower_bound {
        None => GateForm::Softplus,
        Some(lower_bound) => GateForm::Bounded { lower_bound },
    };
    let g = b.node(
        &format!("{p}.decay_gate"),
        Op::DecayGate {
            a_log,
            dt_bias,
            heads,
            width: dh,
            form,
        },
        &[f],
    );
    let bl = b.linear(&format!("{p}.b_proj"), h, heads, WeightKind::Dense);
    let beta = b.unary(&format!("{p}.beta"), Unary::Sigmoid, bl);
    let rec = Recurrence {
        heads,
        key_heads: heads,
        dk: dh,
        dv: dh,
        update: Update::Delta,
        decay: Decay::PerChannel,
        scale: (dh as f64).powf(-0.5),
    };
    let o = recurrence(b, p, rec, &[q, k, v, g, beta]);
    let gate = b.linear(
        &format!("{p}.g_a_proj"),
        h,
        s.output_gate_rank,
        WeightKind::Dense,
    );
    let gate = b.linear(
        &format!("{p}.g_b_proj"),
        gate,
        heads * dh,
        WeightKind::Dense,
    );
    let weight = b.weight(&format!("{p}.o_norm"), &[dh], WeightKind::Small);
    let o = b.node(
        &format!("{p}.o_norm"),
        Op::GatedRmsNorm {
            weight,
            eps: b.spec.norm.eps,
            group: dh,
            gate: Unary::Sigmoid,
        },
        &[o, gate],
    );
    b.linear(&format!("{p}.o_proj"), o, d, WeightKind::Dense)
}

/// MiniMax-01 lightning attention: silu(qkv), additive update with fixed per-head decay,
/// RMSNorm over all heads, sigmoid output gate.
pub(super) fn lightning(b: &mut Builder, p: &str, h: NodeIndex, s: &LightningSpec) -> NodeIndex {
    let (heads, dh) = (s.heads, s.head_dim);
    let d = b.spec.hidden_size;
    let qkv = b.linear(
        &format!("{p}.qkv_proj"),
        h,
        3 * heads * dh,
        WeightKind::Dense,
    );
    let qkv = b.unary(&format!("{p}.qkv_act"), Unary::Silu, qkv);
    // Per head the projection holds [q | k | v].
    let q = b.slice(&format!("{p}.q"), qkv, 3 * dh, 0, dh);
    let k = b.slice(&format!("{p}.k"), qkv, 3 * dh, dh, dh);
    let v = b.slice(&format!("{p}.v"), qkv, 3 * dh, 2 * dh, dh);
    let rec = Recurrence {
        heads,
        key_heads: heads,
        dk: dh,
        dv: dh,
        update: Update::Additive,
        decay: Decay::Fixed {
            layer: b.layer,
            num_layers: b.spec.num_layers,
        },
        scale: 1.0,
    };
    let o = recurrence(b, p, rec, &[q, k, v]);
    let eps = s.norm_eps.unwrap_or(b.spec.norm.eps);
    let o = b.norm_eps(&format!("{p}.norm"), o, heads * dh, eps);
    let gate = b.linear(
        &format!("{p}.output_gate"),
        h,
        heads * dh,
        WeightKind::Dense,
    );
    let gate = b.unary(&format!("{p}.output_gate_act"), Unary::Sigmoid, gate);
    let o = b.node(&format!("{p}.gated"), Op::Mul, &[o, gate]);
    b.linear(&format!("{p}.o_proj"), o, d, WeightKind::Dense)
}
