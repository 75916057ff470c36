//! `y = x Wᵀ` (W `[out, in]`, as stored by Hugging Face). One program per block of `BN` output
//! columns, looping over the rows inside: the block's weight rows stay in cache while every
//! row of x streams past them, and decode (few rows) still has `out / BN` programs to share
//! between threads. The reduction over `in` is contiguous in both operands (vectorised).

use lamina_ir::graph::{NodeIndex, Op};
use lamina_ir::kernel::build::*;
use lamina_ir::kernel::Dim;

use super::{act, launch, Bind, Ctx, Launch, Value};

/// Output columns per program.
pub const BN: usize = 16;

pub fn build(cx: &Ctx, n: NodeIndex, ins: &[NodeIndex]) -> Launch {
    let g = cx.graph;
    let Op::Linear {
        weight,
        in_dim,
        out_dim,
    } = &g.node(n).op
    else {
        unreachable!("linear builder")
    };
    let (k, nn) = (*in_dim, *out_dim);
    let bn = BN.min(nn);
    let blocks = nn.div_ceil(bn);
    let col = v("n0") + v("j");
    let body = vec![
        let_("n0", pid(0) * i(bn)),
        let_("nb", min(i(bn), i(nn) - v("n0"))),
        for_(
            "j",
            i(0),
            v("nb"),
            vec![for_(
                "r",
                i(0),
                rows(),
                vec![st(
                    "y",
                    [v("r"), col.clone()],
                    sum(
                        "k",
                        i(0),
                        i(k),
                        ld("x", [v("r"), v("k")]) * ld("w", [col.clone(), v("k")]),
                    ),
                )],
            )],
        ),
    ];
    launch(
        format!("linear_{k}x{nn}"),
        vec![Dim::N(blocks)],
        vec![
            (input("x", &act(k)), Bind::Act(Value::Node(ins[0]))),
            cx.weight("w", weight),
            (output("y", &act(nn)), Bind::Act(Value::Node(n))),
        ],
        body,
        vec![n],
        g,
    )
}
