//! What a model costs to serve, from its graph alone: memory at a batch and context, bytes and
//! FLOPs per token in decode and prefill, and the roofline bound on a named GPU. This is the
//! table `compile-model report` and `compile-model compare` print; it answers design questions
//! (what does a 3:1 against a 7:1 hybrid cost at 1M context?) before anything is trained.
//!
//! Conventions, stated so the numbers can be checked by hand:
//! - weights, KV and latent caches in their declared dtypes (bf16 in the examples); recurrent
//!   state f32 (the verifier's rule); conv state in its declared dtype;
//! - decode at batch B reads every dense weight once per step, and per MoE layer the experts
//!   the B tokens touch: `E · (1 − (1 − k/E)^B)` expected distinct experts under uniform
//!   routing; each sequence reads and writes its recurrent and conv state and reads its cache at
//!   the given context;
//! - FLOPs count a multiply-add as 2. Projections `2·in·out`; routed experts `k·6·d·I` plus the
//!   router `2·d·E`; a recurrence step `6·H·dk·dv` (decay and `Sᵀk`, the rank-1 update, `Sᵀq`);
//!   attention over `n` cached positions `2·n·H·(d_qk + d_v)`; MLA decode in the absorbed form
//!   `2·n·H·(2r + d_rope)` plus `2·H·r·(d_nope + d_v)` for the absorption, MLA prefill in the
//!   expanded form (`2·r·H·(d_nope + d_v)` to expand a token's latent, then plain attention);
//!   prefill attends to half the context on average, and its chunked recurrences add
//!   `2·H·C·(dk + dv)` per token for the in-chunk products (C = 64).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::graph::{Graph, Op, StateKind};
use crate::stats::model_stats;

/// A GPU's capacity and ceilings.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Gpu {
    pub name: &'static str,
    /// Memory in bytes.
    pub memory: u64,
    /// Memory bandwidth, bytes/s.
    pub bandwidth: f64,
    /// Dense bf16 tensor throughput, FLOP/s (dense TF32 is half of it on every GPU listed).
    pub flops: f64,
    /// FP32 throughput of the CUDA cores (no tensor cores), FLOP/s.
    pub f32_flops: f64,
    /// Where the numbers come from.
    pub source: &'static str,
}

/// Vendor datasheet figures (spec, not measured: pass `--bandwidth`/`--flops` for measured
/// ceilings; DESIGN.md quotes ~4.3 TB/s copy and ~790 TFLOP/s measured on an H200).
pub const GPUS: &[Gpu] = &[
    Gpu {
        name: "a100",
        memory: 80_000_000_000,
        bandwidth: 2.039e12,
        flops: 312e12,
        f32_flops: 19.5e12,
        source: "NVIDIA A100 datasheet (80GB SXM): 2,039 GB/s HBM2e, 312 TFLOPS dense BF16, \
                 156 TF32, 19.5 FP32",
    },
    Gpu {
        name: "h100",
        memory: 80_000_000_000,
        bandwidth: 3.35e12,
        flops: 989e12,
        f32_flops: 67e12,
        source: "NVIDIA H100 datasheet (SXM): 80 GB HBM3 3.35 TB/s, 989 TFLOPS dense BF16, \
                 495 TF32, 67 FP32",
    },
    Gpu {
        name: "h200",
        memory: 141_000_000_000,
        bandwidth: 4.8e12,
        flops: 989e12,
        f32_flops: 67e12,
        source: "NVIDIA H200 datasheet (SXM): 141 GB HBM3e 4.8 TB/s, 989 TFLOPS dense BF16, \
                 495 TF32, 67 FP32",
    },
    Gpu {
        name: "b200",
        memory: 180_000_000_000,
        bandwidth: 8.0e12,
        flops: 2250e12,
        f32_flops: 75e12,
        source: "NVIDIA DGX B200 datasheet, per GPU: 180 GB HBM3e 8 TB/s, 2.25 PFLOPS dense BF16, \
                 1.1 PFLOPS TF32, 75 TFLOPS FP32",
    },
    Gpu {
        name: "l40s",
        memory: 48_000_000_000,
        bandwidth: 0.864e12,
        flops: 362e12,
        f32_flops: 91.6e12,
        source: "NVIDIA L40S datasheet: 48 GB GDDR6 864 GB/s, 362 TFLOPS dense BF16, 183 TF32, \
                 91.6 FP32",
    },
];

pub fn gpu(name: &str) -> Option<Gpu> {
    GPUS.iter()
        .copied()
        .find(|g| g.name == name.to_ascii_lowercase())
}

/// The cost of one model at one operating point.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Cost {
    pub model: String,
    pub batch: usize,
    pub context: usize,
    /// Weights in their dtypes, by kind.
    pub weight_bytes_by_kind: BTreeMap<String, u64>,
    pub weight_bytes: u64,
    /// Per sequence.
    pub recurrent_state_bytes: u64,
    pub conv_state_bytes: u64,
    /// KV + latent cache per token (all layers), and per sequence at `context`.
    pub cache_bytes_per_token: u64,
    pub cache_bytes_at_context: u64,
    /// Weights + batch × (states + cache at context).
    pub total_memory: u64,
    /// Decode, per generated token, at `batch` and a full context (rounded to whole bytes
    /// and FLOPs, so the JSON form is stable across libms).
    pub decode_bytes_per_token: u64,
    pub decode_flops_per_token: u64,
    /// Prefill of `context` tokens, per token.
    pub prefill_flops_per_token: u64,
    /// Context where reading the cache costs as much as the recurrent and conv state traffic
    /// (None without recurrent layers or without a cache).
    pub crossover_context: Option<u64>,
    pub gpu: Option<Bound>,
}

/// Roofline bounds on a GPU.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Bound {
    pub gpu: String,
    pub bandwidth: f64,
    pub flops: f64,
    pub fits: bool,
    /// Tokens/s over the batch (rounded to 0.1).
    pub decode_tokens_per_s: f64,
    pub decode_bound: &'static str,
    pub prefill_tokens_per_s: f64,
}

/// Chunk length of the prefill recurrences (for their FLOPs).
const CHUNK: f64 = 64.0;

pub fn cost(g: &Graph, batch: usize, context: usize, gpu: Option<Gpu>) -> Cost {
    let st = model_stats(g);
    let (b, n) = (batch.max(1) as f64, context as f64);
    let mut weight_bytes_by_kind: BTreeMap<String, u64> = BTreeMap::new();
    let mut weight_bytes = 0u64;
    for w in g.weights.values() {
        let bytes = (w.numel() * w.dtype.bytes()) as u64;
        weight_bytes += bytes;
        *weight_bytes_by_kind
            .entry(crate::stats::kind_name(w.kind).to_string())
            .or_default() += bytes;
    }
    let kind_bytes = |k| weight_bytes_by_kind.get(k).copied().unwrap_or(0);
    let embed_bytes = kind_bytes("embedding");
    let expert_bytes = kind_bytes("experts");
    let has_head = kind_bytes("lm_head") > 0;
    let cache_per_token: u64 = g
        .states
        .iter()
        .filter(|s| matches!(s.kind, StateKind::KvCache | StateKind::MlaLatent))
        .map(|s| s.bytes() as u64)
        .sum();

    // Per-token FLOPs, and the experts a decode step touches.
    let (mut dense_flops, mut dec_mix, mut pre_mix) = (0f64, 0f64, 0f64);
    let mut touched_fraction = 0f64;
    for node in g.schedule() {
        match &g.node(node).op {
            Op::Linear {
                in_dim, out_dim, ..
            } => dense_flops += 2.0 * (*in_dim * *out_dim) as f64,
            Op::Moe { moe, hidden, .. } => {
                let (e, k, d, i) = (
                    moe.experts as f64,
                    moe.top_k as f64,
                    *hidden as f64,
                    moe.intermediate as f64,
                );
                dense_flops += 2.0 * d * e + k * 6.0 * d * i;
                // Expected distinct experts of this layer a step touches, as a fraction.
                touched_fraction += 1.0 - (1.0 - k / e).powf(b);
            }
            Op::Recurrence { rec, .. } => {
                let (h, dk, dv) = (rec.heads as f64, rec.dk as f64, rec.dv as f64);
                dec_mix += 6.0 * h * dk * dv;
                pre_mix += 6.0 * h * dk * dv + 2.0 * h * CHUNK * (dk + dv);
            }
            Op::Attention {
                heads,
                head_dim,
                v_dim,
                ..
            } => {
                let per = 2.0 * (*heads * (*head_dim + *v_dim)) as f64;
                dec_mix += per * n;
                pre_mix += per * n / 2.0;
            }
            Op::MlaAttention {
                heads,
                kv_lora_rank,
                nope,
                rope,
                v_dim,
                ..
            } => {
                let (h, r) = (*heads as f64, *kv_lora_rank as f64);
                let (dn, dr, dv) = (*nope as f64, *rope as f64, *v_dim as f64);
                // Decode: absorbed (attend in the latent space, map back once).
                let absorb = 2.0 * h * r * (dn + dv);
                dec_mix += 2.0 * h * (2.0 * r + dr) * n + absorb;
                // Prefill: each token's latent expanded to keys and values once, then plain
                // attention over half the context on average.
                pre_mix += 2.0 * h * (dn + dr + dv) * n / 2.0 + 2.0 * r * h * (dn + dv);
            }
            _ => {}
        }
    }
    // Expert bytes touched per step: the fraction of each MoE layer's experts, summed; the
    // layers are alike in the examples, so the mean fraction applies to all expert bytes.
    let moe_layers = g
        .schedule()
        .into_iter()
        .filter(|&x| matches!(g.node(x).op, Op::Moe { .. }))
        .count();
    let touched = if moe_layers > 0 {
        expert_bytes as f64 * touched_fraction / moe_layers as f64
    } else {
        0.0
    };
    // One embedding row per token unless the LM head is the (tied) embedding.
    let embed_read = if has_head {
        b * embed_bytes as f64 / g.vocab_size as f64
    } else {
        embed_bytes as f64
    };
    let step_weights = (weight_bytes - expert_bytes - embed_bytes) as f64 + touched + embed_read;
    let per_seq =
        2.0 * (st.recurrent_state_bytes + st.conv_state_bytes) as f64 + cache_per_token as f64 * n;
    let decode_bytes_per_token = (step_weights / b + per_seq).round();
    let decode_flops_per_token = (dense_flops + dec_mix).round();
    let prefill_flops_per_token = (dense_flops + pre_mix).round();
    let cache_at = cache_per_token * context as u64;
    let total_memory =
        weight_bytes + batch as u64 * (st.recurrent_state_bytes + st.conv_state_bytes + cache_at);
    let crossover_context = (cache_per_token > 0 && st.recurrent_state_bytes > 0)
        .then(|| 2 * (st.recurrent_state_bytes + st.conv_state_bytes) / cache_per_token);
    let gpu = gpu.map(|p| {
        let by_bw = p.bandwidth / decode_bytes_per_token;
        let by_flops = p.flops / decode_flops_per_token;
        Bound {
            gpu: p.name.to_string(),
            bandwidth: p.bandwidth,
            flops: p.flops,
            fits: total_memory <= p.memory,
            decode_tokens_per_s: (by_bw.min(by_flops) * 10.0).round() / 10.0,
            decode_bound: if by_bw <= by_flops {
                "memory"
            } else {
                "compute"
            },
            prefill_tokens_per_s: (p.flops / prefill_flops_per_token * 10.0).round() / 10.0,
        }
    });
    Cost {
        model: g.name.clone(),
        batch,
        context,
        weight_bytes_by_kind,
        weight_bytes,
        recurrent_state_bytes: st.recurrent_state_bytes,
        conv_state_bytes: st.conv_state_bytes,
        cache_bytes_per_token: cache_per_token,
        cache_bytes_at_context: cache_at,
        total_memory,
        decode_bytes_per_token: decode_bytes_per_token as u64,
        decode_flops_per_token: decode_flops_per_token as u64,
        prefill_flops_per_token: prefill_flops_per_token as u64,
        crossover_context,
        gpu,
    }
}
