//! RMSNorm (plain or zero-centred), gated RMSNorm and L2 norm: one program per (row, group).

use lamina_ir::graph::{NodeIndex, Op, Unary};
use lamina_ir::kernel::build::*;
use lamina_ir::kernel::{Dim, Expr};

use super::{act, launch, Bind, Ctx, Launch, Value};

pub fn build(cx: &Ctx, n: NodeIndex, ins: &[NodeIndex]) -> Launch {
    let g = cx.graph;
    let cols = cx.cols(n);
    let x = |c: Expr| ld("x", [pid(0), v("base") + c]);
    let (name, group, mut params, inv, scale): (String, usize, _, Expr, Box<dyn Fn() -> Expr>) =
        match &g.node(n).op {
            Op::RmsNorm {
                weight,
                eps,
                zero_centred,
                group,
            } => {
                let zc = *zero_centred;
                (
                    format!("rms_norm{}_{cols}_g{group}", if zc { "_zc" } else { "" }),
                    *group,
                    vec![cx.weight("w", weight)],
                    rsqrt(v("ss") / f(*group as f64) + f(*eps)),
                    Box::new(move || {
                        if zc {
                            f(1.0) + ld("w", [v("c")])
                        } else {
                            ld("w", [v("c")])
                        }
                    }),
                )
            }
            Op::GatedRmsNorm {
                weight,
                eps,
                group,
                gate,
            } => {
                let act_fn: fn(Expr) -> Expr = match gate {
                    Unary::Silu => silu,
                    Unary::Sigmoid => sigmoid,
                };
                (
                    format!(
                        "gated_rms_norm_{}_{cols}_g{group}",
                        if *gate == Unary::Silu {
                            "silu"
                        } else {
                            "sigmoid"
                        }
                    ),
                    *group,
                    vec![cx.weight("w", weight)],
                    rsqrt(v("ss") / f(*group as f64) + f(*eps)),
                    Box::new(move || {
                        ld("w", [v("c")]) * act_fn(ld("gate", [pid(0), v("base") + v("c")]))
                    }),
                )
            }
            Op::L2Norm { group, eps } => (
                format!("l2_norm_{cols}_g{group}"),
                *group,
                vec![],
                rsqrt(v("ss") + f(*eps)),
                Box::new(|| f(1.0)),
            ),
            op => unreachable!("norm builder given {}", op.mnemonic()),
        };
    params.insert(0, (input("x", &act(cols)), Bind::Act(Value::Node(ins[0]))));
    if ins.len() > 1 {
        params.push((input("gate", &act(cols)), Bind::Act(Value::Node(ins[1]))));
    }
    params.push((output("y", &act(cols)), Bind::Act(Value::Node(n))));
    let body = vec![
        let_("base", pid(1) * i(group)),
        let_("ss", sum("c", i(0), i(group), x(v("c")) * x(v("c")))),
        let_("inv", inv),
        for_par(
            "c",
            i(0),
            i(group),
            vec![st(
                "y",
                [pid(0), v("base") + v("c")],
                x(v("c")) * v("inv") * scale(),
            )],
        ),
    ];
    launch(
        name,
        vec![Dim::Rows, Dim::N(cols / group)],
        params,
        body,
        vec![n],
        g,
    )
}
