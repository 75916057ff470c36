//! Linear-attention recurrences, recurrent (token-by-token) form, and the short causal conv.
//! This is the executable definition every chunked kernel is checked against.
//!
//! Layout (as in flash-linear-attention): q, k `[T, Hk, dk]`, v `[T, H, dv]`, g `[T, H]` or
//! `[T, H, dk]` (natural-log decay), beta `[T, H]`, state `[H, dk, dv]`, `o_t = S_tᵀ (scale q_t)`.

use lamina_ir::graph::{Decay, Recurrence, Update};

use super::tensor::{silu, Real};

/// Decay operand of one call.
#[derive(Clone, Copy)]
pub enum Gate<'a, F> {
    None,
    /// `[T, H]`.
    Scalar(&'a [F]),
    /// `[T, H, dk]`.
    PerChannel(&'a [F]),
    /// Per-head log-decay, constant in t (`-slope_h`).
    Fixed(&'a [F]),
}

/// Runs `rec` over T tokens from `state` (updated in place); returns o `[T, H, dv]`.
#[allow(clippy::too_many_arguments)]
pub fn recurrent<F: Real>(
    rec: &Recurrence,
    t_len: usize,
    q: &[F],
    k: &[F],
    v: &[F],
    gate: Gate<F>,
    beta: Option<&[F]>,
    state: &mut [F],
) -> Vec<F> {
    let (h_n, hk_n, dk, dv) = (rec.heads, rec.key_heads, rec.dk, rec.dv);
    let group = h_n / hk_n;
    let scale = F::of(rec.scale);
    let mut o = vec![F::zero(); t_len * h_n * dv];
    let mut kv = vec![F::zero(); dv];
    let mut decay = vec![F::one(); dk];
    for t in 0..t_len {
        for h in 0..h_n {
            let kh = h / group;
            let qt = &q[(t * hk_n + kh) * dk..][..dk];
            let kt = &k[(t * hk_n + kh) * dk..][..dk];
            let vt = &v[(t * h_n + h) * dv..][..dv];
            let s = &mut state[h * dk * dv..][..dk * dv];
            match gate {
                Gate::None => decay.fill(F::one()),
                Gate::Scalar(g) => decay.fill(g[t * h_n + h].exp()),
                Gate::PerChannel(g) => {
                    for (c, d) in decay.iter_mut().enumerate() {
                        *d = g[(t * h_n + h) * dk + c].exp();
                    }
                }
                Gate::Fixed(g) => decay.fill(g[h].exp()),
            }
            for (c, &d) in decay.iter().enumerate() {
                for x in &mut s[c * dv..(c + 1) * dv] {
                    *x = *x * d;
                }
            }
            match rec.update {
                Update::Additive => {
                    for c in 0..dk {
                        for j in 0..dv {
                            s[c * dv + j] = s[c * dv + j] + kt[c] * vt[j];
                        }
                    }
                }
                Update::Delta => {
                    let b = beta.expect("delta rule needs beta")[t * h_n + h];
                    kv.fill(F::zero());
                    for c in 0..dk {
                        for j in 0..dv {
                            kv[j] = kv[j] + s[c * dv + j] * kt[c];
                        }
                    }
                    for j in 0..dv {
                        kv[j] = b * (vt[j] - kv[j]);
                    }
                    for c in 0..dk {
                        for j in 0..dv {
                            s[c * dv + j] = s[c * dv + j] + kt[c] * kv[j];
                        }
                    }
                }
            }
            let ot = &mut o[(t * h_n + h) * dv..][..dv];
            for c in 0..dk {
                let qc = qt[c] * scale;
                for j in 0..dv {
                    ot[j] = ot[j] + s[c * dv + j] * qc;
                }
            }
        }
    }
    o
}

/// The decay operand for a graph recurrence.
pub fn gate_for<'a, F: Real>(rec: &Recurrence, g: Option<&'a [F]>, fixed: &'a [F]) -> Gate<'a, F> {
    match rec.decay {
        Decay::None => Gate::None,
        Decay::Scalar => Gate::Scalar(g.expect("scalar decay operand")),
        Decay::PerChannel => Gate::PerChannel(g.expect("per-channel decay operand")),
        Decay::Fixed { .. } => Gate::Fixed(fixed),
    }
}

/// Depthwise causal conv (weights `[C, K]`) + SiLU over `x: [T, C]`; `state: [C, K-1]` holds
/// the previous K-1 inputs, oldest first, and is updated.
pub fn short_conv<F: Real>(
    x: &[F],
    t_len: usize,
    channels: usize,
    kernel: usize,
    w: &[F],
    state: &mut [F],
) -> Vec<F> {
    let hist = kernel - 1;
    let mut y = vec![F::zero(); t_len * channels];
    for c in 0..channels {
        let wc = &w[c * kernel..(c + 1) * kernel];
        // Window: previous inputs followed by this call's.
        let mut seq: Vec<F> = state[c * hist..(c + 1) * hist].to_vec();
        seq.extend((0..t_len).map(|t| x[t * channels + c]));
        for t in 0..t_len {
            let acc: F = (0..kernel).map(|j| wc[j] * seq[t + j]).sum();
            y[t * channels + c] = silu(acc);
        }
        state[c * hist..(c + 1) * hist].copy_from_slice(&seq[seq.len() - hist..]);
    }
    y
}
