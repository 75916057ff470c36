//! Row-parallel maps: embedding lookup, column slices, activations, products (with a `[R, 1]`
//! column broadcast), weighted residual adds, SwiGLU and the decay gates. One program per row;
//! its column loops are parallel split loops (a GPU deals the columns to a warp's lanes).

use lamina_ir::graph::{GateForm, NodeIndex, Op, Unary};
use lamina_ir::kernel::build::*;
use lamina_ir::kernel::{Dim, Elem, Expr};

use super::{act, launch, Bind, Ctx, Launch, Value};

fn a(n: NodeIndex) -> Bind {
    Bind::Act(Value::Node(n))
}

/// Columns per program of a row-wise map wider than this: a row of a decode batch of one is
/// still spread over several programs (warps on a GPU).
pub const MAP_COLS: usize = 256;

/// The grid of a row-wise map over `cols` columns, and the column range of a program: one
/// program per row up to [`MAP_COLS`] columns, else per (row, block of `MAP_COLS`).
pub fn map_grid(cols: usize) -> (Vec<Dim>, Expr, Expr) {
    if cols <= MAP_COLS {
        (vec![Dim::Rows], i(0), i(cols))
    } else {
        (
            vec![Dim::Rows, Dim::N(cols.div_ceil(MAP_COLS))],
            pid(1) * i(MAP_COLS),
            min(pid(1) * i(MAP_COLS) + i(MAP_COLS), i(cols)),
        )
    }
}

pub fn build(cx: &Ctx, n: NodeIndex, ins: &[NodeIndex]) -> Launch {
    let g = cx.graph;
    let cols = cx.cols(n);
    let xin = |name: &str, i: usize| (input(name, &act(cx.cols(ins[i]))), a(ins[i]));
    let out = (output("y", &act(cols)), a(n));
    let x = |name: &str| ld(name, [pid(0), v("c")]);
    let mut grid = vec![Dim::Rows];
    let (map_grid, lo, hi) = map_grid(cols);
    let map = |value: Expr| {
        vec![for_par(
            "c",
            lo.clone(),
            hi.clone(),
            vec![st("y", [pid(0), v("c")], value)],
        )]
    };
    let (name, params, body) = match &g.node(n).op {
        Op::Embed { weight, dim } => (
            format!("embed_{dim}"),
            vec![
                (rows_tokens(), Bind::Tokens),
                cx.weight("table", weight),
                out,
            ],
            vec![
                let_("t", ld("tokens", [pid(0)])),
                for_par(
                    "c",
                    lo.clone(),
                    hi.clone(),
                    vec![st("y", [pid(0), v("c")], ld("table", [v("t"), v("c")]))],
                ),
            ],
        ),
        Op::Slice { group, start, len } => (
            format!("slice_{}_g{group}_{start}_{len}", cx.cols(ins[0])),
            vec![xin("x", 0), out],
            vec![for_(
                "gi",
                i(0),
                i(cols / len),
                vec![for_par(
                    "c",
                    i(0),
                    i(*len),
                    vec![st(
                        "y",
                        [pid(0), v("gi") * i(*len) + v("c")],
                        ld("x", [pid(0), v("gi") * i(*group) + i(*start) + v("c")]),
                    )],
                )],
            )],
        ),
        Op::Unary(u) => {
            let (nm, e) = match u {
                Unary::Silu => ("silu", silu(x("x"))),
                Unary::Sigmoid => ("sigmoid", sigmoid(x("x"))),
            };
            (format!("{nm}_{cols}"), vec![xin("x", 0), out], map(e))
        }
        Op::Mul => {
            let bcast = cx.cols(ins[1]) == 1 && cols != 1;
            let b = if bcast {
                ld("b", [pid(0), i(0)])
            } else {
                x("b")
            };
            (
                format!("mul_{cols}{}", if bcast { "_bcast" } else { "" }),
                vec![xin("a", 0), xin("b", 1), out],
                map(x("a") * b),
            )
        }
        Op::Add { alpha, beta } => {
            let term = |name: &str, w: f64| if w == 1.0 { x(name) } else { f(w) * x(name) };
            (
                if *alpha == 1.0 && *beta == 1.0 {
                    format!("add_{cols}")
                } else {
                    format!("add_scaled_{cols}")
                },
                vec![xin("a", 0), xin("b", 1), out],
                map(term("a", *alpha) + term("b", *beta)),
            )
        }
        Op::SwiGlu => (
            format!("swiglu_{cols}"),
            vec![xin("gate", 0), xin("up", 1), out],
            map(silu(x("gate")) * x("up")),
        ),
        Op::DecayGate {
            a_log,
            dt_bias,
            width,
            form,
            ..
        } => {
            let (nm, e) = decay_gate(*form, x("x"), v("c"), *width);
            (
                format!("decay_gate_{nm}_{cols}_w{width}"),
                vec![
                    xin("x", 0),
                    flat_weight(cx, "a_log", a_log),
                    flat_weight(cx, "dt_bias", dt_bias),
                    out,
                ],
                map(e),
            )
        }
        op => unreachable!("elementwise builder given {}", op.mnemonic()),
    };
    if !matches!(g.node(n).op, Op::Slice { .. }) {
        grid = map_grid;
    }
    launch(name, grid, params, body, vec![n], g)
}

/// The log-decay gate of column `col` (`width` columns per head) from the projection value
/// `x`, reading the `a_log` and `dt_bias` parameters; returns the form's name and the value.
pub fn decay_gate(form: GateForm, x: Expr, col: Expr, width: usize) -> (&'static str, Expr) {
    let al = ld("a_log", [col.clone() / i(width)]);
    let xb = x + ld("dt_bias", [col]);
    match form {
        GateForm::Softplus => ("softplus", -exp(al) * softplus(xb)),
        GateForm::Bounded { lower_bound } => ("bounded", f(lower_bound) * sigmoid(exp(al) * xb)),
    }
}

fn rows_tokens() -> lamina_ir::kernel::Param {
    param(
        "tokens",
        Elem::I64,
        &[Dim::Rows],
        lamina_ir::kernel::Access::Read,
    )
}

/// A small weight seen as a flat vector (Kimi stores A_log as `[1, 1, H, 1]`).
pub fn flat_weight(cx: &Ctx, local: &str, name: &str) -> (lamina_ir::kernel::Param, Bind) {
    let numel = cx.graph.weights[name].numel();
    (input(local, &[Dim::N(numel)]), Bind::Weight(name.into()))
}
