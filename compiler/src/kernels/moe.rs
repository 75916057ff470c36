//! Mixture of experts: routing in one kernel (router logits, softmax or sigmoid, correction
//! bias, group-limited top-k, renormalisation, scaling), then the routed SwiGLU experts
//! (gate and up projections with SwiGLU in their epilogue, one program per (row, choice)) and
//! the down projections weighted and summed per row. Expert matrices are stacked
//! `[E, out, in]` when the weights are loaded.

use lamina_ir::graph::{NodeIndex, Op};
use lamina_ir::kernel::build::*;
use lamina_ir::kernel::{Access, Dim, Elem, Expr, Stmt};
use lamina_ir::spec::RouterKind;

use super::{act, launch, Bind, Ctx, Launch, Value};

/// `for x in 0..n` keeping the first index of the largest `val(x)` among those `ok(x)`:
/// binds `best_v`, `best_i`.
fn argmax(n: usize, val: Expr) -> Stmt {
    for_carry(
        "x",
        i(0),
        i(n),
        vec![("best_v", f(f64::NEG_INFINITY)), ("best_i", i(0))],
        vec![
            let_("cand", val),
            let_("better", gt(v("cand"), v("best_v"))),
        ],
        vec![
            select(v("better"), v("cand"), v("best_v")),
            select(v("better"), v("x"), v("best_i")),
        ],
    )
}

pub fn build(cx: &Ctx, n: NodeIndex, ins: &[NodeIndex]) -> Vec<Launch> {
    let g = cx.graph;
    let Op::Moe {
        moe: m,
        prefix,
        hidden,
    } = &g.node(n).op
    else {
        unreachable!("moe builder")
    };
    let (e_n, k_n, d, inter) = (m.experts, m.top_k, *hidden, m.intermediate);
    let ids = cx.temp(k_n);
    let wts = cx.temp(k_n);
    let hmid = cx.temp(k_n * inter);
    let x = Bind::Act(Value::Node(ins[0]));

    // --- route ---
    let mut body = vec![
        local("sc", e_n),
        local("ch", e_n),
        let_("r", pid(0)),
        for_(
            "e",
            i(0),
            i(e_n),
            vec![st(
                "sc",
                [v("e")],
                sum(
                    "c",
                    i(0),
                    i(d),
                    ld("x", [v("r"), v("c")]) * ld("router", [v("e"), v("c")]),
                ),
            )],
        ),
    ];
    match m.router {
        RouterKind::Softmax => {
            body.push(let_("mx", max_over("e", i(0), i(e_n), ld("sc", [v("e")]))));
            body.push(for_(
                "e",
                i(0),
                i(e_n),
                vec![st("sc", [v("e")], exp(ld("sc", [v("e")]) - v("mx")))],
            ));
            body.push(let_("z", sum("e", i(0), i(e_n), ld("sc", [v("e")]))));
            body.push(for_(
                "e",
                i(0),
                i(e_n),
                vec![st("sc", [v("e")], ld("sc", [v("e")]) / v("z"))],
            ));
        }
        RouterKind::Sigmoid => {
            body.push(for_(
                "e",
                i(0),
                i(e_n),
                vec![st("sc", [v("e")], sigmoid(ld("sc", [v("e")])))],
            ));
        }
    }
    let choice = if m.correction_bias {
        ld("sc", [v("e")]) + ld("bias", [v("e")])
    } else {
        ld("sc", [v("e")])
    };
    body.push(for_("e", i(0), i(e_n), vec![st("ch", [v("e")], choice)]));
    if m.groups > 1 {
        // Group score: the sum of its two best choice values; keep the best topk_groups groups.
        let per = e_n / m.groups;
        body.push(local("gs", m.groups));
        body.push(for_(
            "gi",
            i(0),
            i(m.groups),
            vec![
                for_carry(
                    "e",
                    v("gi") * i(per),
                    v("gi") * i(per) + i(per),
                    vec![("b1", f(f64::NEG_INFINITY)), ("b2", f(f64::NEG_INFINITY))],
                    vec![let_("cv", ld("ch", [v("e")]))],
                    vec![
                        max(v("b1"), v("cv")),
                        select(gt(v("cv"), v("b1")), v("b1"), max(v("b2"), v("cv"))),
                    ],
                ),
                st("gs", [v("gi")], v("b1") + v("b2")),
            ],
        ));
        body.push(local("keep", m.groups));
        body.push(for_(
            "gi",
            i(0),
            i(m.groups),
            vec![st("keep", [v("gi")], f(0.0))],
        ));
        body.push(for_(
            "kk",
            i(0),
            i(m.topk_groups),
            vec![
                argmax(m.groups, ld("gs", [v("x")])),
                st("keep", [v("best_i")], f(1.0)),
                st("gs", [v("best_i")], f(f64::NEG_INFINITY)),
            ],
        ));
        body.push(for_(
            "e",
            i(0),
            i(e_n),
            vec![st(
                "ch",
                [v("e")],
                select(
                    gt(ld("keep", [v("e") / i(per)]), f(0.5)),
                    ld("ch", [v("e")]),
                    f(f64::NEG_INFINITY),
                ),
            )],
        ));
    }
    body.push(for_(
        "kk",
        i(0),
        i(k_n),
        vec![
            argmax(e_n, ld("ch", [v("x")])),
            st("ids", [v("r"), v("kk")], v("best_i")),
            st("w", [v("r"), v("kk")], ld("sc", [v("best_i")])),
            st("ch", [v("best_i")], f(f64::NEG_INFINITY)),
        ],
    ));
    let scale = f(m.routed_scaling);
    if m.renormalize {
        let eps = match m.router {
            RouterKind::Softmax => 0.0,
            RouterKind::Sigmoid => 1e-20,
        };
        body.push(let_(
            "wz",
            sum("kk", i(0), i(k_n), ld("w", [v("r"), v("kk")])) + f(eps),
        ));
        body.push(for_(
            "kk",
            i(0),
            i(k_n),
            vec![st(
                "w",
                [v("r"), v("kk")],
                ld("w", [v("r"), v("kk")]) / v("wz") * scale,
            )],
        ));
    } else if m.routed_scaling != 1.0 {
        body.push(for_(
            "kk",
            i(0),
            i(k_n),
            vec![st(
                "w",
                [v("r"), v("kk")],
                ld("w", [v("r"), v("kk")]) * scale,
            )],
        ));
    }
    let mut params = vec![
        (input("x", &act(d)), x.clone()),
        cx.weight("router", &format!("{prefix}.router")),
    ];
    if m.correction_bias {
        params.push(super::elementwise::flat_weight(
            cx,
            "bias",
            &format!("{prefix}.router_bias"),
        ));
    }
    params.push((
        param("ids", Elem::I64, &act(k_n), Access::Write),
        Bind::Act(ids),
    ));
    params.push((output("w", &act(k_n)), Bind::Act(wts)));
    let router_kind = match m.router {
        RouterKind::Softmax => "softmax",
        RouterKind::Sigmoid => "sigmoid",
    };
    let route = launch(
        format!(
            "moe_route_{router_kind}_e{e_n}_k{k_n}_g{}x{}_d{d}",
            m.groups, m.topk_groups
        ),
        vec![Dim::Rows],
        params,
        body,
        vec![n],
        g,
    );

    // --- experts: h[r, kk, :] = silu(gate_e x) * (up_e x) ---
    let stacked = |leaf: &str, out: usize, inn: usize| {
        (
            input(leaf, &[Dim::N(e_n), Dim::N(out), Dim::N(inn)]),
            Bind::Stacked {
                prefix: prefix.clone(),
                leaf: format!("{leaf}_proj"),
                experts: e_n,
            },
        )
    };
    let dotx = |w: &str| {
        sum(
            "c",
            i(0),
            i(d),
            ld("x", [pid(0), v("c")]) * ld(w, [v("e"), v("j"), v("c")]),
        )
    };
    let experts = launch(
        format!("moe_gate_up_e{e_n}_k{k_n}_d{d}_i{inter}"),
        vec![Dim::Rows, Dim::N(k_n)],
        vec![
            (input("x", &act(d)), x),
            (
                param("ids", Elem::I64, &act(k_n), Access::Read),
                Bind::Act(ids),
            ),
            stacked("gate", inter, d),
            stacked("up", inter, d),
            (output("h", &act(k_n * inter)), Bind::Act(hmid)),
        ],
        vec![
            let_("e", ld("ids", [pid(0), pid(1)])),
            for_(
                "j",
                i(0),
                i(inter),
                vec![st(
                    "h",
                    [pid(0), pid(1) * i(inter) + v("j")],
                    silu(dotx("gate")) * dotx("up"),
                )],
            ),
        ],
        vec![n],
        g,
    );

    // --- down: y[r, o] = Σ_kk w[r, kk] · down_e[o, :] · h[r, kk, :] ---
    let down = launch(
        format!("moe_down_e{e_n}_k{k_n}_d{d}_i{inter}"),
        vec![Dim::Rows],
        vec![
            (input("h", &act(k_n * inter)), Bind::Act(hmid)),
            (
                param("ids", Elem::I64, &act(k_n), Access::Read),
                Bind::Act(ids),
            ),
            (input("w", &act(k_n)), Bind::Act(wts)),
            stacked("down", d, inter),
            (output("y", &act(d)), Bind::Act(Value::Node(n))),
        ],
        vec![
            for_("o", i(0), i(d), vec![st("y", [pid(0), v("o")], f(0.0))]),
            for_(
                "kk",
                i(0),
                i(k_n),
                vec![
                    let_("e", ld("ids", [pid(0), v("kk")])),
                    let_("we", ld("w", [pid(0), v("kk")])),
                    for_(
                        "o",
                        i(0),
                        i(d),
                        vec![st(
                            "y",
                            [pid(0), v("o")],
                            ld("y", [pid(0), v("o")])
                                + v("we")
                                    * sum(
                                        "j",
                                        i(0),
                                        i(inter),
                                        ld("down", [v("e"), v("o"), v("j")])
                                            * ld("h", [pid(0), v("kk") * i(inter) + v("j")]),
                                    ),
                        )],
                    ),
                ],
            ),
        ],
        vec![n],
        g,
    );
    vec![route, experts, down]
}
