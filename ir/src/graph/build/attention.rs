//! Softmax-attention mixers: GQA (optionally output-gated, q/k-normed, partial or interleaved
//! rotary) and multi-head latent attention.

use petgraph::stable_graph::NodeIndex;

use crate::graph::{yarn_mscale, DType, Op, Rope, StateKind, Unary, WeightKind};
use crate::spec::{GqaSpec, MlaSpec, RopeSpec};

use super::Builder;

fn rope(
    b: &mut Builder,
    name: &str,
    x: NodeIndex,
    heads: usize,
    head_dim: usize,
    offset: usize,
    r: &RopeSpec,
) -> NodeIndex {
    b.node(
        name,
        Op::Rope(Rope {
            heads,
            head_dim,
            offset,
            rotary_dim: r.rotary_dim,
            style: r.style,
            theta: r.theta,
            yarn: r.yarn,
        }),
        &[x],
    )
}

/// Grouped-query attention. Qwen3-Next's gated attention has `output_gate` and `qk_norm`.
pub(super) fn gqa(b: &mut Builder, p: &str, h: NodeIndex, s: &GqaSpec) -> NodeIndex {
    let (heads, kvh, hd) = (s.heads, s.kv_heads, s.head_dim);
    let d = b.spec.hidden_size;
    let q_cols = if s.output_gate {
        2 * heads * hd
    } else {
        heads * hd
    };
    let q_full = b.linear(&format!("{p}.q_proj"), h, q_cols, WeightKind::Dense);
    let (mut q, gate) = if s.output_gate {
        // Per head the projection holds [query | gate].
        let q = b.slice(&format!("{p}.query"), q_full, 2 * hd, 0, hd);
        let g = b.slice(&format!("{p}.gate"), q_full, 2 * hd, hd, hd);
        (q, Some(g))
    } else {
        (q_full, None)
    };
    let mut k = b.linear(&format!("{p}.k_proj"), h, kvh * hd, WeightKind::Dense);
    let v = b.linear(&format!("{p}.v_proj"), h, kvh * hd, WeightKind::Dense);
    if s.qk_norm {
        q = b.norm(&format!("{p}.q_norm"), q, hd);
        k = b.norm(&format!("{p}.k_norm"), k, hd);
    }
    if let Some(r) = &s.rope {
        q = rope(b, &format!("{p}.q_rope"), q, heads, hd, 0, r);
        k = rope(b, &format!("{p}.k_rope"), k, kvh, hd, 0, r);
    }
    let cache = b.state(
        &format!("{p}.kv_cache"),
        StateKind::KvCache,
        DType::Bf16,
        &[kvh, 2 * hd],
    );
    let mut o = b.node(
        &format!("{p}.attention"),
        Op::Attention {
            heads,
            kv_heads: kvh,
            head_dim: hd,
            v_dim: hd,
            scale: (hd as f64).powf(-0.5),
            cache,
        },
        &[q, k, v],
    );
    if let Some(g) = gate {
        let g = b.unary(&format!("{p}.gate_act"), Unary::Sigmoid, g);
        o = b.node(&format!("{p}.gated"), Op::Mul, &[o, g]);
    }
    b.linear(&format!("{p}.o_proj"), o, d, WeightKind::Dense)
}

/// Multi-head latent attention. The cache holds the normalised latent and the shared rope key;
/// the reference expands keys and values from it with `kv_b` (no absorption: that is a
/// compiler decision for the decode phase).
pub(super) fn mla(b: &mut Builder, p: &str, h: NodeIndex, s: &MlaSpec) -> NodeIndex {
    let (heads, r, nope, rd, vd) = (
        s.heads,
        s.kv_lora_rank,
        s.qk_nope_head_dim,
        s.qk_rope_head_dim,
        s.v_head_dim,
    );
    let d = b.spec.hidden_size;
    let eps = s.norm_eps.unwrap_or(b.spec.norm.eps);
    let qk = nope + rd;
    let mut q = match s.q_lora_rank {
        Some(ql) => {
            let qa = b.linear(&format!("{p}.q_a_proj"), h, ql, WeightKind::Dense);
            let qa = b.norm_eps(&format!("{p}.q_a_norm"), qa, ql, eps);
            b.linear(&format!("{p}.q_b_proj"), qa, heads * qk, WeightKind::Dense)
        }
        None => b.linear(&format!("{p}.q_proj"), h, heads * qk, WeightKind::Dense),
    };
    let kva = b.linear(&format!("{p}.kv_a_proj"), h, r + rd, WeightKind::Dense);
    let c = b.slice(&format!("{p}.latent"), kva, r + rd, 0, r);
    let mut kr = b.slice(&format!("{p}.k_rope_in"), kva, r + rd, r, rd);
    let c = b.norm_eps(&format!("{p}.kv_a_norm"), c, r, eps);
    let mut scale = (qk as f64).powf(-0.5);
    if let Some(rs) = &s.rope {
        q = rope(b, &format!("{p}.q_rope"), q, heads, qk, nope, rs);
        kr = rope(b, &format!("{p}.k_rope"), kr, 1, rd, 0, rs);
        if let Some(y) = rs.yarn {
            if y.mscale_all_dim != 0.0 {
                let m = yarn_mscale(y.factor, y.mscale_all_dim);
                scale *= m * m;
            }
        }
    }
    let kv_b = b.weight(
        &format!("{p}.kv_b_proj"),
        &[heads * (nope + vd), r],
        WeightKind::Dense,
    );
    let cache = b.state(
        &format!("{p}.latent_cache"),
        StateKind::MlaLatent,
        DType::Bf16,
        &[r + rd],
    );
    let o = b.node(
        &format!("{p}.attention"),
        Op::MlaAttention {
            heads,
            kv_lora_rank: r,
            nope,
            rope: rd,
            v_dim: vd,
            scale,
            kv_b,
            cache,
        },
        &[q, c, kr],
    );
    b.linear(&format!("{p}.o_proj"), o, d, WeightKind::Dense)
}
