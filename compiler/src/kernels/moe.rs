//! Mixture of experts: routing in one kernel (router logits, softmax or sigmoid, correction
//! bias, group-limited top-k, renormalisation, scaling; in decode the logits come from a GEMV
//! kernel of one program per expert, `moe_logits`, and each top-k choice is two warp
//! reductions, the largest score then its least index), then the routed SwiGLU experts
//! (gate and up projections with SwiGLU in their epilogue, one program per (row, choice)) and
//! the down projections weighted and summed per row. Expert matrices are stacked
//! `[E, out, in]` when the weights are loaded.

use lamina_ir::graph::{NodeIndex, Op};
use lamina_ir::kernel::build::*;
use lamina_ir::kernel::{Access, Dim, Elem, Expr, Stmt};
use lamina_ir::spec::RouterKind;

use super::linear::{col_tiles, decode_cols, prefill_tile, register_tile, row_tiles, BN, CB, RB};
use super::{act, launch, Bind, Ctx, Launch, Phase, Value};

/// The first index `x < n` of the largest `val` (which reads `x`), NaNs skipped, as two
/// reductions that a GPU deals over a warp's lanes: `best_v`, the largest value (−∞ when there
/// is none), then `best_i`, the least index holding it (`-max(-x)` over the indices whose value
/// equals it), clamped into `0..n`. The same choice as a scan keeping the first `val > best`
/// from −∞ (index 0 when nothing beats −∞). Binds `best_v` and `best_i`.
fn argmax(n: usize, val: Expr) -> Vec<Stmt> {
    // A NaN never wins (`cand > best` is false for it): as −∞ it loses every comparison.
    let val = select(eq(val.clone(), val.clone()), val, f(f64::NEG_INFINITY));
    let neg_index = select(
        eq(val.clone(), v("best_v")),
        f(0.0) - to_f(v("x")),
        f(f64::NEG_INFINITY),
    );
    let index = f(0.0) - max_over("x", i(0), i(n), neg_index);
    vec![
        let_("best_v", max_over("x", i(0), i(n), val)),
        let_("best_i", to_i(min(max(index, f(0.0)), f((n - 1) as f64)))),
    ]
}

/// The routed experts' `{prefix}.experts.*.{leaf}_proj` stacked `[E, out, in]`.
fn stacked(
    prefix: &str,
    experts: usize,
    leaf: &str,
    out: usize,
    inn: usize,
) -> (lamina_ir::kernel::Param, Bind) {
    (
        input(leaf, &[Dim::N(experts), Dim::N(out), Dim::N(inn)]),
        Bind::Stacked {
            prefix: prefix.to_string(),
            leaf: format!("{leaf}_proj"),
            experts,
        },
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

    // --- route: the router logits, then the scores and the top-k choice. Prefill fuses the
    // logits' dot products into the routing program of each row; a decode step (a handful of
    // rows, one program each) reads them from a GEMV kernel of many programs instead, since
    // one warp would stream the whole router matrix alone (`logits`) ---
    let logits = (cx.phase == Phase::Decode).then(|| cx.temp(e_n));
    let scores = match logits {
        Some(_) => for_par(
            "e",
            i(0),
            i(e_n),
            vec![st("sc", [v("e")], ld("logits", [v("r"), v("e")]))],
        ),
        None => for_(
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
    };
    let mut body = vec![
        local("sc", e_n),
        local("ch", e_n),
        let_("r", pid(0)),
        scores,
    ];
    match m.router {
        RouterKind::Softmax => {
            body.push(let_("mx", max_over("e", i(0), i(e_n), ld("sc", [v("e")]))));
            body.push(for_par(
                "e",
                i(0),
                i(e_n),
                vec![st("sc", [v("e")], exp(ld("sc", [v("e")]) - v("mx")))],
            ));
            body.push(let_("z", sum("e", i(0), i(e_n), ld("sc", [v("e")]))));
            body.push(for_par(
                "e",
                i(0),
                i(e_n),
                vec![st("sc", [v("e")], ld("sc", [v("e")]) / v("z"))],
            ));
        }
        RouterKind::Sigmoid => {
            body.push(for_par(
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
    // Per-expert maps are independent: parallel loops (a warp's lanes on a GPU).
    body.push(for_par("e", i(0), i(e_n), vec![st("ch", [v("e")], choice)]));
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
        body.push(for_par(
            "gi",
            i(0),
            i(m.groups),
            vec![st("keep", [v("gi")], f(0.0))],
        ));
        body.push(for_(
            "kk",
            i(0),
            i(m.topk_groups),
            [
                argmax(m.groups, ld("gs", [v("x")])),
                vec![
                    st("keep", [v("best_i")], f(1.0)),
                    st("gs", [v("best_i")], f(f64::NEG_INFINITY)),
                ],
            ]
            .concat(),
        ));
        body.push(for_par(
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
        [
            argmax(e_n, ld("ch", [v("x")])),
            vec![
                st("ids", [v("r"), v("kk")], v("best_i")),
                st("w", [v("r"), v("kk")], ld("sc", [v("best_i")])),
                st("ch", [v("best_i")], f(f64::NEG_INFINITY)),
            ],
        ]
        .concat(),
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
    let mut params = match logits {
        Some(l) => vec![(input("logits", &act(e_n)), Bind::Act(l))],
        None => vec![
            (input("x", &act(d)), x.clone()),
            cx.weight("router", &format!("{prefix}.router")),
        ],
    };
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
    let from = match logits {
        Some(_) => "logits".to_string(),
        None => format!("d{d}"),
    };
    let route = launch(
        format!(
            "moe_route_{router_kind}_e{e_n}_k{k_n}_g{}x{}_{from}",
            m.groups, m.topk_groups
        ),
        vec![Dim::Rows],
        params,
        body,
        vec![n],
        g,
    );

    let logits_launch = logits.map(|l| router_logits(cx, n, prefix, (e_n, d), x.clone(), l));

    // Decode: only the chosen experts' weights are read. Tensor-core plans round the GEMM
    // inputs to bf16 here too, so that decode computes what their prefill tiles compute.
    let round = |e: Expr| if cx.tensor_cores { bf16(e) } else { e };

    // --- experts: h[r, kk, j] = silu(gate_e[j]·x) · (up_e[j]·x), one program per (row,
    // choice, block of `gate_cols` columns j): one pass over x, dealt over the lanes, carries
    // every column's gate and up sums, so each x element is loaded once per block and a lane
    // has 2 · gate_cols weight loads in flight per step. Blocks are narrow enough that a
    // batch-1 step runs DECODE_WARPS programs (decode_cols) ---
    let gate_cols = decode_cols(k_n, inter);
    let down_cols = decode_cols(1, d);
    let stacked = |leaf: &str, out: usize, inn: usize| stacked(prefix, e_n, leaf, out, inn);
    let gate_up = {
        // Column b of the block (clamped into the matrix when the last block is partial).
        let col = |b: usize| {
            if inter.is_multiple_of(gate_cols) {
                v("j0") + i(b)
            } else {
                min(v("j0") + i(b), i(inter - 1))
            }
        };
        let mut loads = vec![let_("xc", round(ld("x", [pid(0), v("c")])))];
        let mut carried = Vec::new();
        let mut yields = Vec::new();
        for b in 0..gate_cols {
            loads.push(let_(
                &format!("gw{b}"),
                ld("gate", [v("e"), col(b), v("c")]),
            ));
            loads.push(let_(&format!("uw{b}"), ld("up", [v("e"), col(b), v("c")])));
        }
        let names: Vec<(String, String)> = (0..gate_cols)
            .map(|b| (format!("g{b}"), format!("u{b}")))
            .collect();
        for (b, (gn, un)) in names.iter().enumerate() {
            carried.push((gn.as_str(), f(0.0)));
            carried.push((un.as_str(), f(0.0)));
            yields.push(v(gn) + v("xc") * v(&format!("gw{b}")));
            yields.push(v(un) + v("xc") * v(&format!("uw{b}")));
        }
        let mut body = vec![
            let_("e", ld("ids", [pid(0), pid(1)])),
            let_("j0", pid(2) * i(gate_cols)),
            for_sum("c", i(0), i(d), carried, loads, yields),
        ];
        for (b, (gn, un)) in names.iter().enumerate() {
            let store = st(
                "h",
                [pid(0), pid(1) * i(inter) + v("j0") + i(b)],
                silu(v(gn)) * v(un),
            );
            body.push(if inter.is_multiple_of(gate_cols) {
                store
            } else {
                if_(lt(v("j0") + i(b), i(inter)), vec![store])
            });
        }
        body
    };
    let experts = launch(
        format!("moe_gate_up_e{e_n}_k{k_n}_d{d}_i{inter}_c{gate_cols}"),
        vec![Dim::Rows, Dim::N(k_n), Dim::N(inter.div_ceil(gate_cols))],
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
        gate_up,
        vec![n],
        g,
    );

    // --- down: y[r, o] = Σ_kk w[r, kk] · down_e[o, :] · h[r, kk, :], one program per (row,
    // block of `down_cols` outputs); per choice kk, one pass over h carries the block's sums ---
    let down_body = {
        let out = |b: usize| {
            if d.is_multiple_of(down_cols) {
                v("o0") + i(b)
            } else {
                min(v("o0") + i(b), i(d - 1))
            }
        };
        let guard = |b: usize, s: Stmt| {
            if d.is_multiple_of(down_cols) {
                s
            } else {
                if_(lt(v("o0") + i(b), i(d)), vec![s])
            }
        };
        let names: Vec<String> = (0..down_cols).map(|b| format!("s{b}")).collect();
        let mut loads = vec![let_(
            "hj",
            round(ld("h", [pid(0), v("kk") * i(inter) + v("j")])),
        )];
        let mut carried = Vec::new();
        let mut yields = Vec::new();
        for (b, name) in names.iter().enumerate() {
            loads.push(let_(
                &format!("dw{b}"),
                ld("down", [v("e"), out(b), v("j")]),
            ));
            carried.push((name.as_str(), f(0.0)));
            yields.push(v(name) + v(&format!("dw{b}")) * v("hj"));
        }
        let mut per_choice = vec![
            let_("e", ld("ids", [pid(0), v("kk")])),
            let_("we", ld("w", [pid(0), v("kk")])),
            for_sum("j", i(0), i(inter), carried, loads, yields),
        ];
        for (b, name) in names.iter().enumerate() {
            let at = [pid(0), v("o0") + i(b)];
            per_choice.push(guard(
                b,
                st("y", at.clone(), ld("y", at) + v("we") * v(name)),
            ));
        }
        let mut body = vec![let_("o0", pid(1) * i(down_cols))];
        for b in 0..down_cols {
            body.push(guard(b, st("y", [pid(0), v("o0") + i(b)], f(0.0))));
        }
        body.push(for_("kk", i(0), i(k_n), per_choice));
        body
    };
    let down = launch(
        format!("moe_down_e{e_n}_k{k_n}_d{d}_i{inter}_c{down_cols}"),
        vec![Dim::Rows, Dim::N(d.div_ceil(down_cols))],
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
        down_body,
        vec![n],
        g,
    );
    match cx.phase {
        Phase::Decode => {
            let logits = logits_launch.expect("decode routes from logits");
            vec![logits, route, experts, down]
        }
        Phase::Prefill if cx.tensor_cores => {
            let mut launches = vec![route];
            launches.extend(grouped_mma(cx, n, m, prefix, d, ids, wts));
            launches
        }
        Phase::Prefill => {
            let (experts, down, combine) = grouped(cx, n, m, prefix, d, ids, wts);
            vec![route, experts, down, combine]
        }
    }
}

/// Decode's router logits `logits[r, e] = x[r, :] · router[e, :]` (f32, as the fused prefill
/// router computes them) for `e_n` experts over `d`: one program per (row, block of
/// [`decode_cols`] experts), a split sum over `d` carrying the block's dot products, so a
/// batch-1 step streams the router matrix with many warps.
fn router_logits(
    cx: &Ctx,
    n: NodeIndex,
    prefix: &str,
    (e_n, d): (usize, usize),
    x: Bind,
    logits: Value,
) -> Launch {
    let cols = decode_cols(1, e_n);
    let ragged = !e_n.is_multiple_of(cols);
    let expert = |b: usize| {
        if ragged {
            min(v("e0") + i(b), i(e_n - 1))
        } else {
            v("e0") + i(b)
        }
    };
    let names: Vec<String> = (0..cols).map(|b| format!("s{b}")).collect();
    let mut loads = vec![let_("xc", ld("x", [pid(0), v("c")]))];
    let mut carried = Vec::new();
    let mut yields = Vec::new();
    for (b, name) in names.iter().enumerate() {
        loads.push(let_(&format!("rw{b}"), ld("router", [expert(b), v("c")])));
        carried.push((name.as_str(), f(0.0)));
        yields.push(v(name) + v("xc") * v(&format!("rw{b}")));
    }
    let mut body = vec![
        let_("e0", pid(1) * i(cols)),
        for_sum("c", i(0), i(d), carried, loads, yields),
    ];
    for (b, name) in names.iter().enumerate() {
        let store = st("logits", [pid(0), v("e0") + i(b)], v(name));
        body.push(if ragged {
            if_(lt(v("e0") + i(b), i(e_n)), vec![store])
        } else {
            store
        });
    }
    launch(
        format!("moe_logits_e{e_n}_d{d}_c{cols}"),
        vec![Dim::Rows, Dim::N(e_n.div_ceil(cols))],
        vec![
            (input("x", &act(d)), x),
            cx.weight("router", &format!("{prefix}.router")),
            (output("logits", &act(e_n)), Bind::Act(logits)),
        ],
        body,
        vec![n],
        cx.graph,
    )
}

/// Prefill's expert GEMMs grouped by expert (without tensor cores): a program owns one expert
/// and a block of output columns, gathers the (row, slot) assignments routed to its expert,
/// and runs them through register tiles, so each expert weight is read once per block instead
/// of once per token.
/// The down projection writes each assignment's weighted output to its own slot, and a last
/// kernel sums a row's slots (programs of different experts never write the same element).
#[allow(clippy::too_many_arguments)]
fn grouped(
    cx: &Ctx,
    n: NodeIndex,
    m: &lamina_ir::spec::MoeSpec,
    prefix: &str,
    d: usize,
    ids: Value,
    wts: Value,
) -> (Launch, Launch, Launch) {
    let g = cx.graph;
    let (e_n, k_n, inter) = (m.experts, m.top_k, m.intermediate);
    let hmid = cx.temp(k_n * inter);
    let yk = cx.temp(k_n * d);
    let x = Bind::Act(Value::Node(g.inputs(n)[0]));
    let stacked = |leaf: &str, out: usize, inn: usize| stacked(prefix, e_n, leaf, out, inn);
    let ids_param = || {
        (
            param("ids", Elem::I64, &act(k_n), Access::Read),
            Bind::Act(ids),
        )
    };
    // rl[0..cnt): the assignments a = row·k + slot routed to expert `e`, in order.
    let gather = vec![
        local_i("rl", cx.rows * k_n),
        let_("e", pid(0)),
        let_("n0", pid(1) * i(BN)),
        for_carry(
            "a",
            i(0),
            rows() * i(k_n),
            vec![("cnt", i(0))],
            vec![st("rl", [v("cnt")], v("a"))],
            vec![
                v("cnt")
                    + select(
                        eq(ld("ids", [v("a") / i(k_n), rem(v("a"), i(k_n))]), v("e")),
                        i(1),
                        i(0),
                    ),
            ],
        ),
    ];
    let (up_body, down_body) = register_tile_bodies(k_n, d, inter, &gather);
    let experts = launch(
        format!("moe_grouped_gate_up_e{e_n}_k{k_n}_d{d}_i{inter}"),
        vec![Dim::N(e_n), Dim::N(inter.div_ceil(BN))],
        vec![
            (input("x", &act(d)), x),
            ids_param(),
            stacked("gate", inter, d),
            stacked("up", inter, d),
            (output("h", &act(k_n * inter)), Bind::Act(hmid)),
        ],
        up_body,
        vec![n],
        g,
    );
    let down = launch(
        format!("moe_grouped_down_e{e_n}_k{k_n}_d{d}_i{inter}"),
        vec![Dim::N(e_n), Dim::N(d.div_ceil(BN))],
        vec![
            (input("h", &act(k_n * inter)), Bind::Act(hmid)),
            ids_param(),
            (input("w", &act(k_n)), Bind::Act(wts)),
            stacked("down", d, inter),
            (output("yk", &act(k_n * d)), Bind::Act(yk)),
        ],
        down_body,
        vec![n],
        g,
    );
    (experts, down, combine(cx, n, k_n, d, yk))
}

/// The bodies of [`grouped`]'s gate/up and down kernels as register tiles over the expert's
/// assignments (`gather` binds them).
fn register_tile_bodies(
    k_n: usize,
    d: usize,
    inter: usize,
    gather: &[Stmt],
) -> (Vec<Stmt>, Vec<Stmt>) {
    let assignment = |p: Expr| ld("rl", [p]);
    // x row of assignment `a`.
    let x_of = |a: Expr| ld("x", [a / i(k_n), v("k")]);

    // gate/up: h[a, j] = silu(gate_e[j]·x) · (up_e[j]·x), through a local of gate values.
    let nb_i = min(i(BN), i(inter) - v("n0"));
    let mut body = gather.to_vec();
    body.push(local("gv", RB * CB));
    let gate_w = |c: Expr| ld("gate", [v("e"), c, v("k")]);
    let up_w = |c: Expr| ld("up", [v("e"), c, v("k")]);
    let tile = |rs: &[Expr], cs: &[Expr]| -> Vec<Stmt> {
        let slot = |r: &Expr, c: &Expr| {
            let a = rs.iter().position(|x| x == r).unwrap_or(0);
            let b = cs.iter().position(|x| x == c).unwrap_or(0);
            i(a * CB + b)
        };
        let store_gate = |r: Expr, c: Expr, val: Expr| st("gv", [slot(&r, &c)], val);
        let store_h = |r: Expr, c: Expr, val: Expr| {
            st(
                "h",
                [
                    r.clone() / i(k_n),
                    rem(r.clone(), i(k_n)) * i(inter) + c.clone(),
                ],
                silu(ld("gv", [slot(&r, &c)])) * val,
            )
        };
        [
            register_tile(rs, cs, d, &x_of, &gate_w, &store_gate),
            register_tile(rs, cs, d, &x_of, &up_w, &store_h),
        ]
        .concat()
    };
    body.extend(col_tiles(v("n0"), nb_i, &|cs: &[Expr]| {
        row_tiles(v("cnt"), &assignment, cs, &tile)
    }));
    // down: yk[a, o] = w[a] · down_e[o]·h[a].
    let h_of = |a: Expr| {
        ld(
            "h",
            [a.clone() / i(k_n), rem(a, i(k_n)) * i(inter) + v("k")],
        )
    };
    let down_w = |c: Expr| ld("down", [v("e"), c, v("k")]);
    let store_y = |a: Expr, c: Expr, val: Expr| {
        st(
            "yk",
            [a.clone() / i(k_n), rem(a.clone(), i(k_n)) * i(d) + c],
            ld("w", [a.clone() / i(k_n), rem(a, i(k_n))]) * val,
        )
    };
    let tile = |rs: &[Expr], cs: &[Expr]| register_tile(rs, cs, inter, &h_of, &down_w, &store_y);
    let up_body = body;
    let mut body = gather.to_vec();
    body.extend(col_tiles(
        v("n0"),
        min(i(BN), i(d) - v("n0")),
        &|cs: &[Expr]| row_tiles(v("cnt"), &assignment, cs, &tile),
    ));
    (up_body, body)
}

/// The sum of a row's slots: `y[r] = Σ_slot yk[r, slot]`.
fn combine(cx: &Ctx, n: NodeIndex, k_n: usize, d: usize, yk: Value) -> Launch {
    launch(
        format!("moe_combine_k{k_n}_d{d}"),
        vec![Dim::Rows],
        vec![
            (input("yk", &act(k_n * d)), Bind::Act(yk)),
            (output("y", &act(d)), Bind::Act(Value::Node(n))),
        ],
        vec![for_(
            "o",
            i(0),
            i(d),
            vec![st(
                "y",
                [pid(0), v("o")],
                sum(
                    "kk",
                    i(0),
                    i(k_n),
                    ld("yk", [pid(0), v("kk") * i(d) + v("o")]),
                ),
            )],
        )],
        vec![n],
        cx.graph,
    )
}

/// Rows of tokens per chunk of the assignment sort: one program scans a chunk's assignments
/// in order.
const SORT_ROWS: usize = 32;

/// Prefill's expert GEMMs on tensor cores, vLLM-style: the (row, slot) assignments sorted by
/// expert, then each GEMM as one [`prefill_tile`] MMA tile per program over a block of one expert's sorted assignments (grid: expert × row block × column
/// block; a block past its expert's count does nothing). Every GEMM program is only its tile,
/// so GPUs run it as a block-cooperative program with staged operands.
///
/// - `moe_count`: per chunk of [`SORT_ROWS`] rows and expert, the assignments routed to it;
/// - `moe_offsets`: per expert, its offset in the sorted list and its count;
/// - `moe_scatter`: per chunk and expert, its assignments written in order from the chunk's
///   offset (the list is sorted by expert, then by assignment: deterministic);
/// - gate, then up with SwiGLU in its epilogue (reading the gate values back), then down
///   weighted by the routing weight, each assignment to its own slot; `combine` sums the slots.
#[allow(clippy::too_many_arguments)]
fn grouped_mma(
    cx: &Ctx,
    n: NodeIndex,
    m: &lamina_ir::spec::MoeSpec,
    prefix: &str,
    d: usize,
    ids: Value,
    wts: Value,
) -> Vec<Launch> {
    let g = cx.graph;
    let (e_n, k_n, inter) = (m.experts, m.top_k, m.intermediate);
    let stacked = |leaf: &str, out: usize, inn: usize| stacked(prefix, e_n, leaf, out, inn);
    let int_act = |name: &str, cols: usize, access: Access, v: Value| {
        (param(name, Elem::I64, &act(cols), access), Bind::Act(v))
    };
    // counts[c, e]: chunk c's assignments to expert e; offs[0, e], cnts[0, e]: expert e's
    // offset in the sorted list and its count (on average R·k/E: a hint for the cost model);
    // sorted: the R·k assignments, flat.
    let counts = cx.temp(e_n);
    let offs = cx.temp(e_n);
    let cnts = cx.temp(e_n);
    let sorted = cx.temp(k_n);
    let cnts_param = |access| {
        let mut p = param("cnts", Elem::I64, &act(e_n), access);
        p.mean_per_row = Some((k_n as u32, e_n as u32));
        (p, Bind::Act(cnts))
    };
    let chunks = || (rows() + i(SORT_ROWS - 1)) / i(SORT_ROWS);
    let routed = |a: Expr, e: Expr| eq(ld("ids", [a.clone() / i(k_n), rem(a, i(k_n))]), e);
    let chunk = vec![
        let_("a0", pid(0) * i(SORT_ROWS * k_n)),
        let_("a1", min(v("a0") + i(SORT_ROWS * k_n), rows() * i(k_n))),
    ];
    let count = launch(
        format!("moe_count_e{e_n}_k{k_n}"),
        vec![Dim::RowBlocks(SORT_ROWS), Dim::N(e_n)],
        vec![
            int_act("ids", k_n, Access::Read, ids),
            int_act("counts", e_n, Access::Write, counts),
        ],
        [
            chunk.clone(),
            vec![st(
                "counts",
                [pid(0), pid(1)],
                to_i(sum(
                    "a",
                    v("a0"),
                    v("a1"),
                    select(routed(v("a"), pid(1)), f(1.0), f(0.0)),
                )),
            )],
        ]
        .concat(),
        vec![n],
        g,
    );
    let counted = |c: Expr, e: Expr| to_f(ld("counts", [c, e]));
    let offsets = launch(
        format!("moe_offsets_e{e_n}"),
        vec![Dim::N(e_n)],
        vec![
            int_act("counts", e_n, Access::Read, counts),
            int_act("offs", e_n, Access::Write, offs),
            cnts_param(Access::Write),
        ],
        vec![
            let_("e", pid(0)),
            // Every chunk's count of the experts before e (flattened: q = chunk · e + expert).
            st(
                "offs",
                [i(0), v("e")],
                to_i(sum(
                    "q",
                    i(0),
                    chunks() * v("e"),
                    counted(v("q") / v("e"), rem(v("q"), v("e"))),
                )),
            ),
            st(
                "cnts",
                [i(0), v("e")],
                to_i(sum("c", i(0), chunks(), counted(v("c"), v("e")))),
            ),
        ],
        vec![n],
        g,
    );
    let scatter = launch(
        format!("moe_scatter_e{e_n}_k{k_n}"),
        vec![Dim::RowBlocks(SORT_ROWS), Dim::N(e_n)],
        vec![
            int_act("ids", k_n, Access::Read, ids),
            int_act("counts", e_n, Access::Read, counts),
            int_act("offs", e_n, Access::Read, offs),
            int_act("sorted", k_n, Access::Write, sorted),
        ],
        [
            chunk,
            vec![
                let_("e", pid(1)),
                let_(
                    "off",
                    ld("offs", [i(0), v("e")])
                        + to_i(sum("c", i(0), pid(0), counted(v("c"), v("e")))),
                ),
                for_carry(
                    "a",
                    v("a0"),
                    v("a1"),
                    vec![("j", v("off"))],
                    vec![if_(
                        routed(v("a"), v("e")),
                        vec![st("sorted", [v("j") / i(k_n), rem(v("j"), i(k_n))], v("a"))],
                    )],
                    vec![v("j") + select(routed(v("a"), v("e")), i(1), i(0))],
                ),
            ],
        ]
        .concat(),
        vec![n],
        g,
    );

    // The GEMM tiles: rows are sorted assignments off + p0 + mi (assignment `asg` = token · k +
    // slot), columns n0 + mj of the expert's weight; row blocks past the expert's count do
    // nothing.
    let tile = |cols: usize, depth: usize, a: Expr, b: Expr, epilogue: Vec<Stmt>| {
        let (tr, tc) = prefill_tile(depth);
        vec![
            let_("e", pid(0)),
            let_("pb", pid(1)),
            let_("n0", pid(2) * i(tc)),
            let_("off", ld("offs", [i(0), v("e")])),
            let_("cnt", ld("cnts", [i(0), v("e")])),
            let_("blocks", (v("cnt") + i(tr - 1)) / i(tr)),
            if_(
                lt(v("pb"), v("blocks")),
                vec![
                    let_("p0", v("pb") * i(tr)),
                    mma(
                        [tr, tc, depth],
                        min(i(tr), v("cnt") - v("p0")),
                        min(i(tc), i(cols) - v("n0")),
                        a,
                        b,
                        epilogue,
                    ),
                ],
            ),
        ]
    };
    let asg = || {
        let at = v("off") + v("p0") + v("mi");
        ld("sorted", [at.clone() / i(k_n), rem(at, i(k_n))])
    };
    let grid = |cols: usize, depth: usize| {
        let (tr, tc) = prefill_tile(depth);
        vec![Dim::N(e_n), Dim::RowBlocks(tr), Dim::N(cols.div_ceil(tc))]
    };
    // Epilogue element (assignment asg, column n0 + mj) of a [R, k·cols] buffer.
    let slot = |cols: usize| {
        [
            v("asg") / i(k_n),
            rem(v("asg"), i(k_n)) * i(cols) + v("n0") + v("mj"),
        ]
    };
    let x = Bind::Act(Value::Node(g.inputs(n)[0]));
    let gate_v = cx.temp(k_n * inter);
    let hmid = cx.temp(k_n * inter);
    let yk = cx.temp(k_n * d);
    let x_row = || ld("x", [asg() / i(k_n), v("k")]);
    let gemm = |name: String, [cols, depth]: [usize; 2], params, body| {
        launch(name, grid(cols, depth), params, body, vec![n], g)
    };
    let gate = gemm(
        format!("moe_mma_gate_e{e_n}_k{k_n}_d{d}_i{inter}"),
        [inter, d],
        vec![
            (input("x", &act(d)), x.clone()),
            int_act("offs", e_n, Access::Read, offs),
            cnts_param(Access::Read),
            int_act("sorted", k_n, Access::Read, sorted),
            stacked("gate", inter, d),
            (output("g", &act(k_n * inter)), Bind::Act(gate_v)),
        ],
        tile(
            inter,
            d,
            x_row(),
            ld("gate", [v("e"), v("n0") + v("mj"), v("k")]),
            vec![let_("asg", asg()), st("g", slot(inter), v("acc"))],
        ),
    );
    let up = gemm(
        format!("moe_mma_up_swiglu_e{e_n}_k{k_n}_d{d}_i{inter}"),
        [inter, d],
        vec![
            (input("x", &act(d)), x),
            int_act("offs", e_n, Access::Read, offs),
            cnts_param(Access::Read),
            int_act("sorted", k_n, Access::Read, sorted),
            stacked("up", inter, d),
            (input("g", &act(k_n * inter)), Bind::Act(gate_v)),
            (output("h", &act(k_n * inter)), Bind::Act(hmid)),
        ],
        tile(
            inter,
            d,
            x_row(),
            ld("up", [v("e"), v("n0") + v("mj"), v("k")]),
            vec![
                let_("asg", asg()),
                st("h", slot(inter), silu(ld("g", slot(inter))) * v("acc")),
            ],
        ),
    );
    let h_row = ld(
        "h",
        [asg() / i(k_n), rem(asg(), i(k_n)) * i(inter) + v("k")],
    );
    let down = gemm(
        format!("moe_mma_down_e{e_n}_k{k_n}_d{d}_i{inter}"),
        [d, inter],
        vec![
            (input("h", &act(k_n * inter)), Bind::Act(hmid)),
            int_act("offs", e_n, Access::Read, offs),
            cnts_param(Access::Read),
            int_act("sorted", k_n, Access::Read, sorted),
            (input("w", &act(k_n)), Bind::Act(wts)),
            stacked("down", d, inter),
            (output("yk", &act(k_n * d)), Bind::Act(yk)),
        ],
        tile(
            d,
            inter,
            h_row,
            ld("down", [v("e"), v("n0") + v("mj"), v("k")]),
            vec![
                let_("asg", asg()),
                st(
                    "yk",
                    slot(d),
                    ld("w", [v("asg") / i(k_n), rem(v("asg"), i(k_n))]) * v("acc"),
                ),
            ],
        ),
    );
    vec![
        count,
        offsets,
        scatter,
        gate,
        up,
        down,
        combine(cx, n, k_n, d, yk),
    ]
}
