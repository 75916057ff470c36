//! The chunked (WY / UT-transform) form of the delta rule with scalar or per-channel decay: the
//! executable specification of the prefill kernels (chunk 64; KDA with sub-chunks of 16).
//!
//! Per chunk of C tokens with in-chunk cumulative log-decay `b` (per channel for KDA):
//!
//! ```text
//! A_ij = β_i Σ_c k_ic k_jc e^(b_ic − b_jc)   (i > j)        T = (I + A)⁻¹ (forward substitution)
//! U = T diag(β) V          W = T diag(β) (K ⊙ e^b)          V' = U − W S
//! O = (Q ⊙ e^b) S + [Σ_c q_ic k_jc e^(b_ic − b_jc)]_(i≥j) V'
//! S ← e^(b_C) ⊙ S + (K ⊙ e^(b_C − b))ᵀ V'
//! ```
//!
//! Per-channel decay cannot be factored out of the dot products. Within a diagonal sub-chunk the
//! factors are formed pairwise; across sub-chunks both sides are rescaled against the first
//! row of the query sub-chunk (`e^(b_i − r) e^(r − b_j)`, each ≤ 1), which is what a tensor-core
//! kernel does to keep every exponent non-positive.

use lamina_ir::graph::{Recurrence, Update};

use super::recurrence::Gate;
use super::tensor::Real;

pub const CHUNK: usize = 64;
pub const SUB_CHUNK: usize = 16;

/// Same contract as [`super::recurrence::recurrent`] for the delta rule (Gate: None, Scalar or
/// PerChannel), computed chunk by chunk.
#[allow(clippy::too_many_arguments)]
pub fn chunked_delta<F: Real>(
    rec: &Recurrence,
    t_len: usize,
    q: &[F],
    k: &[F],
    v: &[F],
    gate: Gate<F>,
    beta: &[F],
    state: &mut [F],
    chunk: usize,
    sub: usize,
) -> Vec<F> {
    assert_eq!(
        rec.update,
        Update::Delta,
        "chunked form is for the delta rule"
    );
    assert!(chunk.is_multiple_of(sub));
    let (h_n, hk_n, dk, dv) = (rec.heads, rec.key_heads, rec.dk, rec.dv);
    let group = h_n / hk_n;
    let scale = F::of(rec.scale);
    let mut o = vec![F::zero(); t_len * h_n * dv];
    for h in 0..h_n {
        let kh = h / group;
        let s = &mut state[h * dk * dv..][..dk * dv];
        let mut c0 = 0;
        while c0 < t_len {
            let l = chunk.min(t_len - c0);
            let qs: Vec<F> = (0..l)
                .flat_map(|i| {
                    q[((c0 + i) * hk_n + kh) * dk..][..dk]
                        .iter()
                        .map(move |&x| x * scale)
                })
                .collect();
            let kk: Vec<F> = (0..l)
                .flat_map(|i| k[((c0 + i) * hk_n + kh) * dk..][..dk].to_vec())
                .collect();
            let vv: Vec<F> = (0..l)
                .flat_map(|i| v[((c0 + i) * h_n + h) * dv..][..dv].to_vec())
                .collect();
            let bt: Vec<F> = (0..l).map(|i| beta[(c0 + i) * h_n + h]).collect();
            // Cumulative log-decay per row and channel, [l, dk].
            let mut b = vec![F::zero(); l * dk];
            let mut acc = vec![F::zero(); dk];
            for i in 0..l {
                for c in 0..dk {
                    let g = match gate {
                        Gate::None => F::zero(),
                        Gate::Scalar(g) => g[(c0 + i) * h_n + h],
                        Gate::PerChannel(g) => g[((c0 + i) * h_n + h) * dk + c],
                        Gate::Fixed(g) => g[h],
                    };
                    acc[c] = acc[c] + g;
                    b[i * dk + c] = acc[c];
                }
            }
            // Decay-weighted products M_x[i][j] = Σ_c x_ic k_jc e^(b_ic − b_jc) for j ≤ i.
            let weighted = |x: &[F]| -> Vec<F> {
                let mut m = vec![F::zero(); l * l];
                for i0 in (0..l).step_by(sub) {
                    let i1 = (i0 + sub).min(l);
                    for j0 in (0..=i0).step_by(sub) {
                        let j1 = (j0 + sub).min(l);
                        for i in i0..i1 {
                            for j in j0..j1.min(i + 1) {
                                let mut sum = F::zero();
                                for c in 0..dk {
                                    let f = if j0 < i0 {
                                        // Against the reference row i0: both exponents ≤ 0.
                                        let r = b[i0 * dk + c];
                                        (b[i * dk + c] - r).exp() * (r - b[j * dk + c]).exp()
                                    } else {
                                        (b[i * dk + c] - b[j * dk + c]).exp()
                                    };
                                    sum = sum + x[i * dk + c] * kk[j * dk + c] * f;
                                }
                                m[i * l + j] = sum;
                            }
                        }
                    }
                }
                m
            };
            let mkk = weighted(&kk);
            let mqk = weighted(&qs);
            // Solve (I + A) X = R by forward substitution, A_ij = β_i mkk_ij (j < i).
            let solve = |rhs: &mut Vec<F>, width: usize| {
                for i in 0..l {
                    for j in 0..i {
                        let a = bt[i] * mkk[i * l + j];
                        for c in 0..width {
                            rhs[i * width + c] = rhs[i * width + c] - a * rhs[j * width + c];
                        }
                    }
                }
            };
            let mut u: Vec<F> = (0..l * dv).map(|x| bt[x / dv] * vv[x]).collect();
            solve(&mut u, dv);
            let mut w: Vec<F> = (0..l * dk)
                .map(|x| bt[x / dk] * kk[x] * b[x].exp())
                .collect();
            solve(&mut w, dk);
            // V' = U − W S.
            let mut vn = u;
            for i in 0..l {
                for c in 0..dk {
                    let wic = w[i * dk + c];
                    for j in 0..dv {
                        vn[i * dv + j] = vn[i * dv + j] - wic * s[c * dv + j];
                    }
                }
            }
            // O = (Q ⊙ e^b) S + M_qk V'.
            for i in 0..l {
                let ot = &mut o[((c0 + i) * h_n + h) * dv..][..dv];
                for c in 0..dk {
                    let qc = qs[i * dk + c] * b[i * dk + c].exp();
                    for j in 0..dv {
                        ot[j] = ot[j] + qc * s[c * dv + j];
                    }
                }
                for jj in 0..=i {
                    let m = mqk[i * l + jj];
                    for j in 0..dv {
                        ot[j] = ot[j] + m * vn[jj * dv + j];
                    }
                }
            }
            // S ← e^(b_last) ⊙ S + (K ⊙ e^(b_last − b))ᵀ V'.
            let last = &b[(l - 1) * dk..l * dk];
            for c in 0..dk {
                let d = last[c].exp();
                for j in 0..dv {
                    s[c * dv + j] = s[c * dv + j] * d;
                }
                for i in 0..l {
                    let kc = kk[i * dk + c] * (last[c] - b[i * dk + c]).exp();
                    for j in 0..dv {
                        s[c * dv + j] = s[c * dv + j] + kc * vn[i * dv + j];
                    }
                }
            }
            c0 += l;
        }
    }
    o
}
