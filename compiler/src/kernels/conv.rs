//! Depthwise causal short conv + SiLU with its rolling state `[slots, C, K-1]`.
//!
//! Prefill: one program per channel walks the sequence's rows in order (window = state then
//! rows), then keeps the last K-1 inputs. Decode: one program per (row, channel), one step.

use lamina_ir::graph::{NodeIndex, Op};
use lamina_ir::kernel::build::*;
use lamina_ir::kernel::Dim;

use super::{act, launch, rows_i64, Bind, Ctx, Launch, Phase, Value};

pub fn build(cx: &Ctx, n: NodeIndex, ins: &[NodeIndex]) -> Launch {
    let g = cx.graph;
    let Op::ShortConv {
        weight,
        channels,
        kernel,
        state,
    } = &g.node(n).op
    else {
        unreachable!("conv builder")
    };
    let (c_n, k) = (*channels, *kernel);
    let hist = k - 1;
    let params = vec![
        (input("x", &act(c_n)), Bind::Act(Value::Node(ins[0]))),
        cx.weight("w", weight),
        cx.state("state", *state),
        (rows_i64("slot"), Bind::Slot),
        (output("y", &act(c_n)), Bind::Act(Value::Node(n))),
    ];
    let (name, grid, body) = match cx.phase {
        Phase::Prefill => {
            // Element `e` of the window: state[e] for e < hist, else x[e - hist]. Both loads are
            // clamped in range; the select picks the live one.
            let window = |e: lamina_ir::kernel::Expr| {
                select(
                    lt(e.clone(), i(hist)),
                    ld("state", [v("s"), v("ch"), min(e.clone(), i(hist - 1))]),
                    ld("x", [max(e - i(hist), i(0)), v("ch")]),
                )
            };
            let body = vec![
                let_("ch", pid(0)),
                let_("s", ld("slot", [i(0)])),
                for_(
                    "t",
                    i(0),
                    rows(),
                    vec![st(
                        "y",
                        [v("t"), v("ch")],
                        silu(sum(
                            "j",
                            i(0),
                            i(k),
                            ld("w", [v("ch"), v("j")]) * window(v("t") + v("j")),
                        )),
                    )],
                ),
                // New state: window elements R..R+hist, written in ascending order (each read
                // is at or ahead of the write, so nothing is overwritten before it is read).
                for_(
                    "e",
                    i(0),
                    i(hist),
                    vec![st(
                        "state",
                        [v("s"), v("ch"), v("e")],
                        window(rows() + v("e")),
                    )],
                ),
            ];
            (
                format!("short_conv_prefill_{c_n}_k{k}"),
                vec![Dim::N(c_n)],
                body,
            )
        }
        Phase::Decode => {
            let body = vec![
                let_("r", pid(0)),
                let_("ch", pid(1)),
                let_("s", ld("slot", [v("r")])),
                let_("xt", ld("x", [v("r"), v("ch")])),
                let_(
                    "acc",
                    sum(
                        "j",
                        i(0),
                        i(hist),
                        ld("w", [v("ch"), v("j")]) * ld("state", [v("s"), v("ch"), v("j")]),
                    ) + ld("w", [v("ch"), i(hist)]) * v("xt"),
                ),
                st("y", [v("r"), v("ch")], silu(v("acc"))),
                for_(
                    "e",
                    i(0),
                    i(hist - 1),
                    vec![st(
                        "state",
                        [v("s"), v("ch"), v("e")],
                        ld("state", [v("s"), v("ch"), v("e") + i(1)]),
                    )],
                ),
                st("state", [v("s"), v("ch"), i(hist - 1)], v("xt")),
            ];
            (
                format!("short_conv_decode_{c_n}_k{k}"),
                vec![Dim::Rows, Dim::N(c_n)],
                body,
            )
        }
    };
    launch(name, grid, params, body, vec![n], g)
}
