//! Mixture-of-experts routing (softmax or sigmoid scores, correction bias, group-limited top-k,
//! renormalisation, routed scaling) and the routed SwiGLU experts, exactly.

use lamina_ir::spec::{MoeSpec, RouterKind};

use super::tensor::{dot, sigmoid, silu, Real};
use super::Weights;

/// The experts chosen for one token and their weights, in selection order.
pub fn route<F: Real>(m: &MoeSpec, logits: &[F], bias: Option<&[F]>) -> Vec<(usize, F)> {
    let e_n = m.experts;
    let scores: Vec<F> = match m.router {
        RouterKind::Softmax => {
            let mx = logits.iter().copied().fold(F::neg_infinity(), F::max);
            let ex: Vec<F> = logits.iter().map(|&l| (l - mx).exp()).collect();
            let z: F = ex.iter().copied().sum();
            ex.into_iter().map(|x| x / z).collect()
        }
        RouterKind::Sigmoid => logits.iter().map(|&l| sigmoid(l)).collect(),
    };
    let mut choice: Vec<F> = match bias {
        Some(b) => scores.iter().zip(b).map(|(&s, &b)| s + b).collect(),
        None => scores.clone(),
    };
    if m.groups > 1 {
        // Rank groups by the sum of their two best choice scores; keep topk_groups of them.
        let per = e_n / m.groups;
        let mut gs: Vec<(usize, F)> = (0..m.groups)
            .map(|g| {
                let mut s: Vec<F> = choice[g * per..(g + 1) * per].to_vec();
                s.sort_by(|a, b| b.total_cmp(a));
                (g, s.iter().take(2).copied().sum())
            })
            .collect();
        gs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let keep: Vec<usize> = gs.iter().take(m.topk_groups).map(|x| x.0).collect();
        for (e, c) in choice.iter_mut().enumerate() {
            if !keep.contains(&(e / per)) {
                *c = F::neg_infinity();
            }
        }
    }
    // total_cmp: a NaN score cannot panic here; the executor reports non-finite node outputs.
    let mut order: Vec<usize> = (0..e_n).collect();
    order.sort_by(|&a, &b| choice[b].total_cmp(&choice[a]).then(a.cmp(&b)));
    let sel = &order[..m.top_k];
    let mut w: Vec<F> = sel.iter().map(|&e| scores[e]).collect();
    if m.renormalize {
        let eps = match m.router {
            RouterKind::Softmax => F::zero(),
            RouterKind::Sigmoid => F::of(1e-20),
        };
        let z: F = w.iter().copied().sum::<F>() + eps;
        for x in &mut w {
            *x = *x / z;
        }
    }
    let scale = F::of(m.routed_scaling);
    sel.iter().zip(w).map(|(&e, w)| (e, w * scale)).collect()
}

/// Routed experts of a MoE layer for `x: [T, D]`.
/// The routed experts of `t_len` tokens. With `bf16_operands`, the experts' GEMM inputs (the
/// token, then the activated intermediate) are rounded to bf16 first, as tensor-core plans do;
/// the router always reads the unrounded token.
pub fn moe<F: Real>(
    m: &MoeSpec,
    prefix: &str,
    x: &[F],
    t_len: usize,
    d: usize,
    w: &Weights<F>,
    bf16_operands: bool,
) -> Vec<F> {
    let round = |v: Vec<F>| -> Vec<F> {
        if !bf16_operands {
            return v;
        }
        v.into_iter().map(Real::bf16_rounded).collect()
    };
    let router = w.get(&format!("{prefix}.router"));
    let bias = m
        .correction_bias
        .then(|| w.get(&format!("{prefix}.router_bias")));
    let inter = m.intermediate;
    let mut y = vec![F::zero(); t_len * d];
    for t in 0..t_len {
        let xt = &x[t * d..(t + 1) * d];
        let xr = round(xt.to_vec());
        let logits: Vec<F> = (0..m.experts)
            .map(|e| dot(xt, &router[e * d..(e + 1) * d]))
            .collect();
        for (e, we) in route(m, &logits, bias) {
            let ep = format!("{prefix}.experts.{e}");
            let (g, u, dn) = (
                w.get(&format!("{ep}.gate_proj")),
                w.get(&format!("{ep}.up_proj")),
                w.get(&format!("{ep}.down_proj")),
            );
            let act: Vec<F> = (0..inter)
                .map(|i| silu(dot(&xr, &g[i * d..(i + 1) * d])) * dot(&xr, &u[i * d..(i + 1) * d]))
                .collect();
            let act = round(act);
            let yt = &mut y[t * d..(t + 1) * d];
            for (o, yo) in yt.iter_mut().enumerate() {
                *yo = *yo + we * dot(&act, &dn[o * inter..(o + 1) * inter]);
            }
        }
    }
    y
}
