//! The graph's operations and their type rules.

use crate::spec::{MoeSpec, RopeStyle, YarnSpec};

use super::{DType, StateId, TensorType};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unary {
    Silu,
    Sigmoid,
}

/// How the recurrent state is updated by a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// `S = a*S + k vᵀ` (lightning attention, GLA).
    Additive,
    /// Delta rule: `S = a*S; S += k (β (v − Sᵀk))ᵀ` (DeltaNet, Gated DeltaNet, KDA).
    Delta,
}

/// How the state decays between tokens (`a` above).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decay {
    /// a = 1 (DeltaNet).
    None,
    /// Log-decay per (token, head) from an operand `g: f32[T, heads]` (Gated DeltaNet).
    Scalar,
    /// Log-decay per (token, head, key channel) from `g: f32[T, heads * dk]` (KDA).
    PerChannel,
    /// Fixed per-head decay exp(-slope_h) (MiniMax lightning attention, layer `layer` of
    /// `num_layers`); see [`lightning_slopes`].
    Fixed { layer: usize, num_layers: usize },
}

/// Everything that defines one linear-attention recurrence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recurrence {
    /// Value heads (one state per value head).
    pub heads: usize,
    /// Key heads; `heads / key_heads` value heads share a q/k head.
    pub key_heads: usize,
    pub dk: usize,
    pub dv: usize,
    pub update: Update,
    pub decay: Decay,
    /// Multiplies q (dk^-1/2 for the delta family, 1 for lightning).
    pub scale: f64,
}

impl Recurrence {
    /// Operands: q, k, v, then g (Scalar/PerChannel decay), then beta (Delta update).
    pub fn operand_cols(&self) -> Vec<usize> {
        let mut c = vec![
            self.key_heads * self.dk,
            self.key_heads * self.dk,
            self.heads * self.dv,
        ];
        match self.decay {
            Decay::Scalar => c.push(self.heads),
            Decay::PerChannel => c.push(self.heads * self.dk),
            Decay::None | Decay::Fixed { .. } => {}
        }
        if self.update == Update::Delta {
            c.push(self.heads);
        }
        c
    }
}

/// MiniMax-01 per-head decay rates: `slope_h = 2^(-8(h+1)/H) * (1 - l/(L-1+1e-5) + 1e-5)`.
///
/// Computed in f32 like transformers' `slope_rate` buffer (which the checkpoint also stores), so
/// f64 runs agree with it exactly.
pub fn lightning_slopes(heads: usize, layer: usize, num_layers: usize) -> Vec<f64> {
    let base = (1.0 / 2f64.powf(8.0 / heads as f64)) as f32;
    let factor = (1.0 - layer as f64 / (num_layers as f64 - 1.0 + 1e-5) + 1e-5) as f32;
    (0..heads)
        .map(|h| (base.powi(h as i32 + 1) * factor) as f64)
        .collect()
}

/// The decay gate's parametrisation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GateForm {
    /// g = -exp(A_log) * softplus(x + dt_bias) (Gated DeltaNet, KDA).
    Softplus,
    /// g = lower_bound * sigmoid(exp(A_log) * (x + dt_bias)) (fla's bounded KDA gate).
    Bounded { lower_bound: f64 },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    pub heads: usize,
    /// Width of one head's column group.
    pub head_dim: usize,
    /// First rotated column within a head (MLA: after the nope part).
    pub offset: usize,
    pub rotary_dim: usize,
    pub style: RopeStyle,
    pub theta: f64,
    pub yarn: Option<YarnSpec>,
}

impl Rope {
    /// Inverse frequencies of the rotary pairs, with YaRN blending where configured.
    ///
    /// Computed in f32, as transformers does (its `inv_freq` buffer is created in float32 and
    /// only then cast to the model dtype), so f64 runs agree with it to ~1e-15, not ~1e-8.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.rotary_dim;
        let theta = self.theta as f32;
        let pos_freq: Vec<f32> = (0..d / 2)
            .map(|i| theta.powf((2 * i) as f32 / d as f32))
            .collect();
        let Some(y) = self.yarn else {
            return pos_freq.iter().map(|&p| (1.0f32 / p) as f64).collect();
        };
        // transformers `_compute_yarn_parameters` (truncate = true).
        let corr_dim = |rot: f64| {
            d as f64
                * (y.original_max_position_embeddings as f64 / (rot * 2.0 * std::f64::consts::PI))
                    .ln()
                / (2.0 * self.theta.ln())
        };
        let low = corr_dim(y.beta_fast).floor().max(0.0) as f32;
        let high = corr_dim(y.beta_slow).ceil().min(d as f64 - 1.0) as f32;
        let high = if low == high { high + 0.001 } else { high };
        let factor = y.factor as f32;
        pos_freq
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                let extrapolation_weight = 1.0 - ramp;
                let (extra, inter) = (1.0 / p, 1.0 / (factor * p));
                (inter * (1.0 - extrapolation_weight) + extra * extrapolation_weight) as f64
            })
            .collect()
    }

    /// YaRN's cos/sin magnitude: mscale(factor, mscale) / mscale(factor, mscale_all_dim).
    pub fn attention_factor(&self) -> f64 {
        match self.yarn {
            None => 1.0,
            Some(y) => {
                if y.mscale != 0.0 && y.mscale_all_dim != 0.0 {
                    yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
                } else {
                    yarn_mscale(y.factor, 1.0)
                }
            }
        }
    }
}

pub fn yarn_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale * factor.ln() + 1.0
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// The token ids of this call: `i64[T]`.
    Tokens,
    Embed {
        weight: String,
        dim: usize,
    },
    /// RMSNorm of every `group`-wide column group (group = cols for a whole-row norm).
    RmsNorm {
        weight: String,
        eps: f64,
        zero_centred: bool,
        group: usize,
    },
    /// `rmsnorm(x) * w * act(gate)` per `group` columns (GDN: silu, KDA: sigmoid).
    GatedRmsNorm {
        weight: String,
        eps: f64,
        group: usize,
        gate: Unary,
    },
    /// `x Wᵀ` with W `[out, in]`.
    Linear {
        weight: String,
        in_dim: usize,
        out_dim: usize,
    },
    /// From every `group`-wide column group take columns `start..start + len`.
    Slice {
        group: usize,
        start: usize,
        len: usize,
    },
    /// Depthwise causal conv over time (kernel `kernel`) followed by SiLU; keeps the last
    /// `kernel - 1` inputs in `state`.
    ShortConv {
        weight: String,
        channels: usize,
        kernel: usize,
        state: StateId,
    },
    /// `x * rsqrt(sum(x^2) + eps)` per `group` columns.
    L2Norm {
        group: usize,
        eps: f64,
    },
    Unary(Unary),
    Mul,
    /// `alpha * a + beta * b`.
    Add {
        alpha: f64,
        beta: f64,
    },
    /// Log-decay gate per (token, head[, channel]): `width` columns per head.
    DecayGate {
        a_log: String,
        dt_bias: String,
        heads: usize,
        width: usize,
        form: GateForm,
    },
    Recurrence {
        rec: Recurrence,
        state: StateId,
    },
    /// Rotary embedding at the call's absolute positions.
    Rope(Rope),
    /// Causal softmax attention over the KV cache plus this call's keys (GQA).
    Attention {
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        v_dim: usize,
        scale: f64,
        cache: StateId,
    },
    /// Multi-head latent attention over the latent cache. Operands: q `[T, H*(nope+rope)]`,
    /// normalised latent c `[T, r]`, shared rope key `[T, rope]`.
    MlaAttention {
        heads: usize,
        kv_lora_rank: usize,
        nope: usize,
        rope: usize,
        v_dim: usize,
        scale: f64,
        kv_b: String,
        cache: StateId,
    },
    /// `silu(gate) * up`.
    SwiGlu,
    /// Router + routed SwiGLU experts (weights under `prefix`); shared experts are separate
    /// nodes.
    Moe {
        moe: MoeSpec,
        prefix: String,
        hidden: usize,
    },
}

impl Op {
    pub fn mnemonic(&self) -> &'static str {
        match self {
            Op::Tokens => "tokens",
            Op::Embed { .. } => "embed",
            Op::RmsNorm { .. } => "rms_norm",
            Op::GatedRmsNorm { .. } => "gated_rms_norm",
            Op::Linear { .. } => "linear",
            Op::Slice { .. } => "slice",
            Op::ShortConv { .. } => "short_conv",
            Op::L2Norm { .. } => "l2_norm",
            Op::Unary(Unary::Silu) => "silu",
            Op::Unary(Unary::Sigmoid) => "sigmoid",
            Op::Mul => "mul",
            Op::Add { .. } => "add",
            Op::DecayGate { .. } => "decay_gate",
            Op::Recurrence { .. } => "recurrence",
            Op::Rope(_) => "rope",
            Op::Attention { .. } => "attention",
            Op::MlaAttention { .. } => "mla_attention",
            Op::SwiGlu => "swiglu",
            Op::Moe { .. } => "moe",
        }
    }

    /// Type rule: the result type from the operand types, or why they do not fit.
    pub fn infer(&self, operands: &[TensorType]) -> Result<TensorType, String> {
        let cols = |i: usize| -> Result<usize, String> {
            operands
                .get(i)
                .ok_or_else(|| format!("missing operand {i}"))?
                .cols
                .ok_or_else(|| format!("operand {i} is a token vector, expected [T, n]"))
        };
        let arity = |n: usize| -> Result<(), String> {
            if operands.len() == n {
                Ok(())
            } else {
                Err(format!("expects {n} operands, has {}", operands.len()))
            }
        };
        let divides = |c: usize, g: usize, what: &str| -> Result<(), String> {
            if g == 0 || !c.is_multiple_of(g) {
                Err(format!(
                    "{what}: {c} columns are not a multiple of group {g}"
                ))
            } else {
                Ok(())
            }
        };
        let expect = |i: usize, want: usize| -> Result<(), String> {
            let c = cols(i)?;
            if c == want {
                Ok(())
            } else {
                Err(format!("operand {i} has {c} columns, expected {want}"))
            }
        };
        Ok(match self {
            Op::Tokens => {
                arity(0)?;
                TensorType {
                    dtype: DType::I64,
                    cols: None,
                }
            }
            Op::Embed { dim, .. } => {
                arity(1)?;
                if operands[0].dtype != DType::I64 || operands[0].cols.is_some() {
                    return Err("embed takes the i64[T] token vector".into());
                }
                TensorType::act(*dim)
            }
            Op::RmsNorm { group, .. } | Op::L2Norm { group, .. } => {
                arity(1)?;
                let c = cols(0)?;
                divides(c, *group, "norm")?;
                TensorType::act(c)
            }
            Op::GatedRmsNorm { group, .. } => {
                arity(2)?;
                let c = cols(0)?;
                divides(c, *group, "norm")?;
                expect(1, c)?;
                TensorType::act(c)
            }
            Op::Linear {
                in_dim, out_dim, ..
            } => {
                arity(1)?;
                expect(0, *in_dim)?;
                TensorType::act(*out_dim)
            }
            Op::Slice { group, start, len } => {
                arity(1)?;
                let c = cols(0)?;
                divides(c, *group, "slice")?;
                if start + len > *group || *len == 0 {
                    return Err(format!(
                        "slice {start}..{} outside group {group}",
                        start + len
                    ));
                }
                TensorType::act(c / group * len)
            }
            Op::ShortConv { channels, .. } => {
                arity(1)?;
                expect(0, *channels)?;
                TensorType::act(*channels)
            }
            Op::Unary(_) => {
                arity(1)?;
                TensorType {
                    dtype: operands[0].dtype,
                    cols: Some(cols(0)?),
                }
            }
            Op::Mul => {
                // The second operand may be a [T, 1] column that broadcasts.
                arity(2)?;
                let c = cols(0)?;
                if cols(1)? != 1 {
                    expect(1, c)?;
                }
                TensorType::act(c)
            }
            Op::Add { .. } => {
                arity(2)?;
                let c = cols(0)?;
                expect(1, c)?;
                TensorType::act(c)
            }
            Op::DecayGate { heads, width, .. } => {
                arity(1)?;
                expect(0, heads * width)?;
                TensorType::f32(heads * width)
            }
            Op::Recurrence { rec, .. } => {
                let want = rec.operand_cols();
                arity(want.len())?;
                for (i, w) in want.iter().enumerate() {
                    expect(i, *w)?;
                }
                if matches!(rec.decay, Decay::Scalar | Decay::PerChannel)
                    && operands[3].dtype != DType::F32
                {
                    return Err("the decay operand g must be f32".into());
                }
                if rec.heads % rec.key_heads != 0 {
                    return Err(format!(
                        "{} value heads do not share {} key heads evenly",
                        rec.heads, rec.key_heads
                    ));
                }
                TensorType::act(rec.heads * rec.dv)
            }
            Op::Rope(r) => {
                arity(1)?;
                expect(0, r.heads * r.head_dim)?;
                if r.offset + r.rotary_dim > r.head_dim || r.rotary_dim % 2 != 0 {
                    return Err("rotary columns outside the head".into());
                }
                TensorType::act(r.heads * r.head_dim)
            }
            Op::Attention {
                heads,
                kv_heads,
                head_dim,
                v_dim,
                ..
            } => {
                arity(3)?;
                expect(0, heads * head_dim)?;
                expect(1, kv_heads * head_dim)?;
                expect(2, kv_heads * v_dim)?;
                if heads % kv_heads != 0 {
                    return Err(format!(
                        "{heads} heads do not share {kv_heads} KV heads evenly"
                    ));
                }
                TensorType::act(heads * v_dim)
            }
            Op::MlaAttention {
                heads,
                kv_lora_rank,
                nope,
                rope,
                v_dim,
                ..
            } => {
                arity(3)?;
                expect(0, heads * (nope + rope))?;
                expect(1, *kv_lora_rank)?;
                expect(2, *rope)?;
                TensorType::act(heads * v_dim)
            }
            Op::SwiGlu => {
                arity(2)?;
                let c = cols(0)?;
                expect(1, c)?;
                TensorType::act(c)
            }
            Op::Moe { hidden, .. } => {
                arity(1)?;
                expect(0, *hidden)?;
                TensorType::act(*hidden)
            }
        })
    }
}
