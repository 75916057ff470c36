//! Parameter, weight-byte and cache accounting, straight from the graph's declarations.

use std::collections::BTreeMap;

use crate::graph::{DType, Graph, Op, StateKind, WeightKind};

#[derive(Debug, Clone, PartialEq)]
pub struct ModelStats {
    pub total_params: u64,
    /// Parameters touched per token: everything but the routed experts, plus top-k experts per
    /// MoE layer (embeddings and LM head included).
    pub active_params: u64,
    /// The same without embeddings and LM head (how MiniMax and Kimi quote "activated").
    pub active_non_embedding: u64,
    pub params_by_kind: BTreeMap<&'static str, u64>,
    pub weight_bytes_by_dtype: BTreeMap<&'static str, u64>,
    /// Recurrent state (f32) plus conv state per sequence.
    pub recurrent_state_bytes: u64,
    pub conv_state_bytes: u64,
    /// KV cache plus MLA latent cache per token, over all layers.
    pub kv_bytes_per_token: u64,
}

pub fn kind_name(k: WeightKind) -> &'static str {
    match k {
        WeightKind::Embedding => "embedding",
        WeightKind::LmHead => "lm_head",
        WeightKind::Dense => "dense",
        WeightKind::Expert => "experts",
        WeightKind::Small => "norms/gates",
    }
}

/// Inverse of [`kind_name`].
pub fn kind_from_name(s: &str) -> Option<WeightKind> {
    [
        WeightKind::Embedding,
        WeightKind::LmHead,
        WeightKind::Dense,
        WeightKind::Expert,
        WeightKind::Small,
    ]
    .into_iter()
    .find(|&k| kind_name(k) == s)
}

pub fn model_stats(g: &Graph) -> ModelStats {
    let mut s = ModelStats {
        total_params: 0,
        active_params: 0,
        active_non_embedding: 0,
        params_by_kind: BTreeMap::new(),
        weight_bytes_by_dtype: BTreeMap::new(),
        recurrent_state_bytes: 0,
        conv_state_bytes: 0,
        kv_bytes_per_token: 0,
    };
    for w in g.weights.values() {
        let n = w.numel() as u64;
        s.total_params += n;
        if w.kind != WeightKind::Expert {
            s.active_params += n;
        }
        *s.params_by_kind.entry(kind_name(w.kind)).or_default() += n;
        *s.weight_bytes_by_dtype.entry(w.dtype.name()).or_default() += n * w.dtype.bytes() as u64;
    }
    for n in g.schedule() {
        if let Op::Moe { moe, hidden, .. } = &g.node(n).op {
            s.active_params += (moe.top_k * 3 * moe.intermediate * hidden) as u64;
        }
    }
    s.active_non_embedding = s.active_params
        - s.params_by_kind.get("embedding").copied().unwrap_or(0)
        - s.params_by_kind.get("lm_head").copied().unwrap_or(0);
    for st in &g.states {
        let b = st.bytes() as u64;
        match st.kind {
            StateKind::Recurrent => s.recurrent_state_bytes += b,
            StateKind::Conv => s.conv_state_bytes += b,
            StateKind::KvCache | StateKind::MlaLatent => s.kv_bytes_per_token += b,
        }
    }
    debug_assert!(g
        .states
        .iter()
        .all(|s| s.kind != StateKind::Recurrent || s.dtype == DType::F32));
    s
}
