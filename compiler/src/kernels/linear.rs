//! `y = x Wᵀ` (W `[out, in]`, as stored by Hugging Face). One program per block of `BN` output
//! columns, looping over the rows inside: the block's weight rows stay in cache while every
//! row of x streams past them, and decode (few rows) still has `out / BN` programs to share
//! between threads. The reduction over `in` is contiguous in both operands (vectorised).
//!
//! Fusions (decided by `passes::fuse`): an RMSNorm of the input in the prologue (each program
//! computes `1/rms` of every row once, the norm weight is folded into the reduction) and a
//! residual add in the epilogue (`y = r + x Wᵀ`, written as the add's value).

use lamina_ir::graph::{NodeIndex, Op};
use lamina_ir::kernel::build::*;
use lamina_ir::kernel::Dim;

use super::{act, launch, Bind, Ctx, Launch, Value};

/// Output columns per program.
pub const BN: usize = 16;

/// The projection `n`; with `residual = Some(add)`, the add `add = r + n` in the epilogue.
pub fn build(cx: &Ctx, n: NodeIndex, residual: Option<NodeIndex>) -> Launch {
    let g = cx.graph;
    let Op::Linear {
        weight,
        in_dim,
        out_dim,
    } = &g.node(n).op
    else {
        unreachable!("linear builder")
    };
    let root = residual.unwrap_or(n);
    let norm = cx.fusion.of(root).norm;
    let (k, nn) = (*in_dim, *out_dim);
    let bn = BN.min(nn);
    let blocks = nn.div_ceil(bn);
    let col = v("n0") + v("j");
    let mut x_in = g.inputs(n)[0];
    let mut params = Vec::new();
    let mut body = vec![
        let_("n0", pid(0) * i(bn)),
        let_("nb", min(i(bn), i(nn) - v("n0"))),
    ];
    let mut prod = ld("x", [v("r"), v("k")]) * ld("w", [col.clone(), v("k")]);
    let mut name = format!("linear_{k}x{nn}");
    if let Some(nm) = norm {
        let Op::RmsNorm {
            weight: nw,
            eps,
            zero_centred,
            ..
        } = &g.node(nm).op
        else {
            unreachable!("fuse: norm prologues are RMSNorms")
        };
        x_in = g.inputs(nm)[0];
        params.push(cx.weight("nw", nw));
        let scale = if *zero_centred {
            f(1.0) + ld("nw", [v("k")])
        } else {
            ld("nw", [v("k")])
        };
        prod = ld("x", [v("r"), v("k")]) * scale * ld("w", [col.clone(), v("k")]);
        body.push(local("inv", cx.rows));
        body.push(for_(
            "r",
            i(0),
            rows(),
            vec![st(
                "inv",
                [v("r")],
                rsqrt(
                    sum(
                        "k",
                        i(0),
                        i(k),
                        ld("x", [v("r"), v("k")]) * ld("x", [v("r"), v("k")]),
                    ) / f(k as f64)
                        + f(*eps),
                ),
            )],
        ));
        name = format!("rms_norm{}_{name}", if *zero_centred { "_zc" } else { "" });
    }
    let mut out = sum("k", i(0), i(k), prod);
    if norm.is_some() {
        out = out * ld("inv", [v("r")]);
    }
    if let Some(add) = residual {
        let other = g.inputs(add).into_iter().find(|&x| x != n).unwrap_or(n);
        params.push((input("res", &act(nn)), Bind::Act(Value::Node(other))));
        out = ld("res", [v("r"), col.clone()]) + out;
        name += "_residual";
    }
    body.push(for_(
        "j",
        i(0),
        v("nb"),
        vec![for_(
            "r",
            i(0),
            rows(),
            vec![st("y", [v("r"), col.clone()], out)],
        )],
    ));
    params.insert(0, (input("x", &act(k)), Bind::Act(Value::Node(x_in))));
    params.insert(1, cx.weight("w", weight));
    params.push((output("y", &act(nn)), Bind::Act(Value::Node(root))));
    let mut nodes = vec![n];
    nodes.extend(norm);
    nodes.extend(residual);
    launch(name, vec![Dim::N(blocks)], params, body, nodes, g)
}
