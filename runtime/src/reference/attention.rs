//! Rotary embeddings and causal softmax attention: GQA over a KV cache and MLA over a latent
//! cache (keys and values expanded from the latent with `kv_b`: the unabsorbed, obvious form).

use lamina_ir::graph::Rope;
use lamina_ir::spec::RopeStyle;

use super::tensor::{dot, Real};

/// Rotates `x: [T, heads * head_dim]` in place for absolute positions `pos0..pos0 + T`.
pub fn rope<F: Real>(r: &Rope, x: &mut [F], t_len: usize, pos0: usize) {
    let inv = r.inv_freq();
    let mf = r.attention_factor();
    let half = r.rotary_dim / 2;
    for t in 0..t_len {
        let p = (pos0 + t) as f64;
        let (cos, sin): (Vec<F>, Vec<F>) = inv
            .iter()
            .map(|f| (F::of((p * f).cos() * mf), F::of((p * f).sin() * mf)))
            .unzip();
        for h in 0..r.heads {
            let base = (t * r.heads + h) * r.head_dim + r.offset;
            for i in 0..half {
                let (a, b) = match r.style {
                    RopeStyle::Half => (base + i, base + i + half),
                    RopeStyle::Interleaved => (base + 2 * i, base + 2 * i + 1),
                };
                let (x1, x2) = (x[a], x[b]);
                x[a] = x1 * cos[i] - x2 * sin[i];
                x[b] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
}

fn softmax_in_place<F: Real>(s: &mut [F]) {
    let m = s.iter().copied().fold(F::neg_infinity(), F::max);
    let mut z = F::zero();
    for x in s.iter_mut() {
        *x = (*x - m).exp();
        z = z + *x;
    }
    for x in s.iter_mut() {
        *x = *x / z;
    }
}

/// Keys per tile of tensor-core plans' prefill flash attention (the compiler's `FLASH_K`).
pub const FLASH_KEY_TILE: usize = 32;

/// Query row `q` attending keys `0..n` as a tensor-core plan's prefill flash attention does:
/// tiles of [`FLASH_KEY_TILE`] keys from key 0, per tile the logits of the bf16-rounded query
/// and keys, the running max `m`, `c = exp(m_old − m)`, `p = exp(s − m)`, the sum `l = c·l +
/// Σ p` (p unrounded) and `acc = c·acc + Σ bf16(p)·bf16(v)`; then `acc / l` into `out`.
#[allow(clippy::too_many_arguments)]
fn flash_row<'a, F: Real>(
    q: &[F],
    n: usize,
    scale: F,
    k: &impl Fn(usize) -> &'a [F],
    v: &impl Fn(usize) -> &'a [F],
    out: &mut [F],
) {
    let b = |x: F| x.bf16_rounded();
    let q: Vec<F> = q.iter().map(|&x| b(x)).collect();
    let (mut m, mut l) = (F::neg_infinity(), F::zero());
    let mut acc = vec![F::zero(); out.len()];
    for j0 in (0..n).step_by(FLASH_KEY_TILE) {
        let keys = j0..(j0 + FLASH_KEY_TILE).min(n);
        let s: Vec<F> = keys
            .clone()
            .map(|j| {
                let kj = k(j);
                q.iter().zip(kj).fold(F::zero(), |a, (&x, &y)| a + x * b(y)) * scale
            })
            .collect();
        let m2 = s.iter().copied().fold(m, F::max);
        let c = (m - m2).exp();
        let p: Vec<F> = s.iter().map(|&x| (x - m2).exp()).collect();
        l = l * c + p.iter().copied().fold(F::zero(), |a, x| a + x);
        for x in acc.iter_mut() {
            *x = *x * c;
        }
        for (j, &pj) in keys.zip(&p) {
            for (x, &vv) in acc.iter_mut().zip(v(j)) {
                *x = *x + b(pj) * b(vv);
            }
        }
        m = m2;
    }
    for (o, &x) in out.iter_mut().zip(&acc) {
        *o = x / l;
    }
}

/// Causal attention of `T` queries at positions `pos0..` over `n_ctx = pos0 + T` cached keys.
/// `k(j, kvh)` and `v(j, kvh)` give cached key/value rows. With `flash`, in a tensor-core
/// plan's prefill arithmetic ([`flash_row`]).
#[allow(clippy::too_many_arguments)]
fn attend<'a, F: Real>(
    q: &[F],
    t_len: usize,
    pos0: usize,
    heads: usize,
    kv_heads: usize,
    qk_dim: usize,
    v_dim: usize,
    scale: F,
    k: impl Fn(usize, usize) -> &'a [F],
    v: impl Fn(usize, usize) -> &'a [F],
    flash: bool,
) -> Vec<F> {
    let group = heads / kv_heads;
    let mut o = vec![F::zero(); t_len * heads * v_dim];
    for t in 0..t_len {
        let n = pos0 + t + 1;
        for h in 0..heads {
            let g = h / group;
            let qh = &q[(t * heads + h) * qk_dim..][..qk_dim];
            if flash {
                let oh = &mut o[(t * heads + h) * v_dim..][..v_dim];
                flash_row(qh, n, scale, &|j| k(j, g), &|j| v(j, g), oh);
                continue;
            }
            let mut s: Vec<F> = (0..n).map(|j| dot(qh, k(j, g)) * scale).collect();
            softmax_in_place(&mut s);
            let oh = &mut o[(t * heads + h) * v_dim..][..v_dim];
            for (j, &p) in s.iter().enumerate() {
                for (x, &vv) in oh.iter_mut().zip(v(j, g)) {
                    *x = *x + p * vv;
                }
            }
        }
    }
    o
}

/// GQA: appends this call's k/v (`[T, kvh*hd]`, `[T, kvh*vd]`) to `cache` (per token:
/// `[kvh, hd]` keys then `[kvh, vd]` values) and attends.
#[allow(clippy::too_many_arguments)]
pub fn gqa<F: Real>(
    q: &[F],
    k: &[F],
    v: &[F],
    t_len: usize,
    pos0: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    v_dim: usize,
    scale: f64,
    cache: &mut Vec<F>,
    flash: bool,
) -> Vec<F> {
    let kw = kv_heads * head_dim;
    let vw = kv_heads * v_dim;
    for t in 0..t_len {
        cache.extend_from_slice(&k[t * kw..(t + 1) * kw]);
        cache.extend_from_slice(&v[t * vw..(t + 1) * vw]);
    }
    let cache: &[F] = cache;
    let entry = kw + vw;
    attend(
        q,
        t_len,
        pos0,
        heads,
        kv_heads,
        head_dim,
        v_dim,
        F::of(scale),
        |j, g| &cache[j * entry + g * head_dim..][..head_dim],
        |j, g| &cache[j * entry + kw + g * v_dim..][..v_dim],
        flash,
    )
}

/// MLA: appends `[c | k_rope]` per token to the latent cache, expands every cached latent to
/// per-head keys `[k_nope | k_rope]` and values with `kv_b: [H*(nope+v), r]`, and attends.
/// With `flash`, the expansion reads the latents rounded to bf16 and rounds its results to
/// bf16, as a tensor-core plan's expand kernel does, and the attention is [`flash_row`]'s.
#[allow(clippy::too_many_arguments)]
pub fn mla<F: Real>(
    q: &[F],
    c: &[F],
    kr: &[F],
    t_len: usize,
    pos0: usize,
    heads: usize,
    r: usize,
    nope: usize,
    rope: usize,
    v_dim: usize,
    scale: f64,
    kv_b: &[F],
    cache: &mut Vec<F>,
    flash: bool,
) -> Vec<F> {
    for t in 0..t_len {
        cache.extend_from_slice(&c[t * r..(t + 1) * r]);
        cache.extend_from_slice(&kr[t * rope..(t + 1) * rope]);
    }
    let n = pos0 + t_len;
    let entry = r + rope;
    let qk = nope + rope;
    // keys[j][h] = [W_UK(h) c_j | k_rope_j]; values[j][h] = W_UV(h) c_j.
    let mut keys = vec![F::zero(); n * heads * qk];
    let mut vals = vec![F::zero(); n * heads * v_dim];
    let round = |x: F| if flash { x.bf16_rounded() } else { x };
    let kv_b: std::borrow::Cow<[F]> = if flash {
        kv_b.iter().map(|&x| round(x)).collect()
    } else {
        kv_b.into()
    };
    let mut cj = vec![F::zero(); r];
    for j in 0..n {
        for (x, &y) in cj.iter_mut().zip(&cache[j * entry..][..r]) {
            *x = round(y);
        }
        let krj = &cache[j * entry + r..][..rope];
        for h in 0..heads {
            let wk = &kv_b[h * (nope + v_dim) * r..];
            let w = |d: usize| &wk[d * r..(d + 1) * r];
            let kj = &mut keys[(j * heads + h) * qk..][..qk];
            for (d, x) in kj[..nope].iter_mut().enumerate() {
                *x = round(dot(w(d), &cj));
            }
            kj[nope..].copy_from_slice(krj);
            let vj = &mut vals[(j * heads + h) * v_dim..][..v_dim];
            for (d, x) in vj.iter_mut().enumerate() {
                *x = round(dot(w(nope + d), &cj));
            }
        }
    }
    attend(
        q,
        t_len,
        pos0,
        heads,
        heads,
        qk,
        v_dim,
        F::of(scale),
        |j, h| &keys[(j * heads + h) * qk..][..qk],
        |j, h| &vals[(j * heads + h) * v_dim..][..v_dim],
        flash,
    )
}
