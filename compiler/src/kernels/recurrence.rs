//! Linear-attention recurrences (delta rule or additive; decay none, scalar, per-channel or
//! fixed) in their recurrent form.
//!
//! The update is separable in value columns (`u_j = β (v_j − Σ_c S_cj k_c)` only reads column
//! j of S), so a program owns a tile of `BV` value columns of one head's state, updated in
//! place in the pool, which stores each head's state transposed (`[dv, dk]`, see
//! [`super::pool_shape`]) so that every reduction over `dk` is contiguous. Prefill: programs
//! `(head, tile)` walk the sequence's rows in order (the 16 KiB tile stays in L1); decode:
//! programs `(row, head, tile)` take one step each.
//!
//! Still missing: the chunked prefill form (chunk 64, KDA sub-chunk 16, lightning block form)
//! for which `lamina_runtime::reference::chunked` is the executable specification.

use lamina_ir::graph::{lightning_slopes, Decay, NodeIndex, Op, Update};
use lamina_ir::kernel::build::*;
use lamina_ir::kernel::{Dim, Expr, Stmt};

use super::{act, launch, rows_i64, tile, Bind, Ctx, Launch, Phase, Value};

/// Value columns per program.
pub const BV: usize = 32;

pub fn build(cx: &Ctx, n: NodeIndex, ins: &[NodeIndex]) -> Launch {
    let g = cx.graph;
    let Op::Recurrence { rec, state } = &g.node(n).op else {
        unreachable!("recurrence builder")
    };
    let (h_n, hk_n, dk, dv) = (rec.heads, rec.key_heads, rec.dk, rec.dv);
    let bv = tile(dv, BV);
    let node = |i: usize| Bind::Act(Value::Node(ins[i]));
    let mut params = vec![
        (input("q", &act(hk_n * dk)), node(0)),
        (input("k", &act(hk_n * dk)), node(1)),
        (input("v", &act(h_n * dv)), node(2)),
    ];
    let mut next = 3;
    let decay_name = match rec.decay {
        Decay::None => "none",
        Decay::Scalar => {
            params.push((input("g", &act(h_n)), node(next)));
            next += 1;
            "scalar"
        }
        Decay::PerChannel => {
            params.push((input("g", &act(h_n * dk)), node(next)));
            next += 1;
            "channel"
        }
        Decay::Fixed { layer, num_layers } => {
            let slopes = lightning_slopes(h_n, layer, num_layers);
            params.push((
                input("slopes", &[Dim::N(h_n)]),
                Bind::Const(
                    format!("lightning_slopes.{layer}"),
                    slopes.iter().map(|&s| s as f32).collect(),
                ),
            ));
            "fixed"
        }
    };
    if rec.update == Update::Delta {
        params.push((input("beta", &act(h_n)), node(next)));
    }
    params.push(cx.state("state", *state));
    params.push((rows_i64("slot"), Bind::Slot));
    params.push((output("o", &act(h_n * dv)), Bind::Act(Value::Node(n))));

    let (hax, jax) = match cx.phase {
        Phase::Prefill => (0, 1),
        Phase::Decode => (1, 2),
    };
    // The pool stores each head's state transposed, `[dv, dk]`: a value column is contiguous.
    let s_at = || ld("state", [v("s"), v("h"), v("j0") + v("jj"), v("c")]);
    let kc = ld("k", [v("t"), v("kh") * i(dk) + v("c")]);
    let qc = ld("q", [v("t"), v("kh") * i(dk) + v("c")]);
    let col = v("h") * i(dv) + v("j0") + v("jj");

    // One token. With S' = diag(d) S + k uᵀ the output is
    // o_j = scale (Σ_c S_cj d_c q_c + u_j kq), kq = k·q: one pass reads the column for
    // a = Σ S d k and b = Σ S d q, a second writes S'.
    let mut step: Vec<Stmt> = Vec::new();
    let decay: Option<Expr> = match rec.decay {
        Decay::None => None,
        Decay::Scalar => {
            step.push(let_("d", exp(ld("g", [v("t"), v("h")]))));
            Some(v("d"))
        }
        Decay::PerChannel => {
            step.push(for_(
                "c",
                i(0),
                i(dk),
                vec![st(
                    "dec",
                    [v("c")],
                    exp(ld("g", [v("t"), v("h") * i(dk) + v("c")])),
                )],
            ));
            Some(ld("dec", [v("c")]))
        }
        Decay::Fixed { .. } => {
            step.push(let_("d", exp(-ld("slopes", [v("h")]))));
            Some(v("d"))
        }
    };
    let decayed = match &decay {
        Some(d) => s_at() * d.clone(),
        None => s_at(),
    };
    step.push(let_("kq", sum("c", i(0), i(dk), kc.clone() * qc.clone())));
    if rec.update == Update::Delta {
        step.push(let_("b", ld("beta", [v("t"), v("h")])));
    }
    let vt = ld("v", [v("t"), col.clone()]);
    let u = match rec.update {
        Update::Delta => v("b") * (vt - v("a")),
        Update::Additive => vt,
    };
    let col_body = vec![
        for_carry(
            "c",
            i(0),
            i(dk),
            vec![("a", f(0.0)), ("bq", f(0.0))],
            vec![let_("sd", decayed.clone())],
            vec![v("a") + v("sd") * kc.clone(), v("bq") + v("sd") * qc],
        ),
        let_("u", u),
        for_(
            "c",
            i(0),
            i(dk),
            vec![st(
                "state",
                [v("s"), v("h"), v("j0") + v("jj"), v("c")],
                decayed + kc * v("u"),
            )],
        ),
        st(
            "o",
            [v("t"), col],
            f(rec.scale) * (v("bq") + v("u") * v("kq")),
        ),
    ];
    step.push(for_("jj", i(0), i(bv), col_body));

    let mut body = vec![
        let_("h", pid(hax)),
        let_("kh", v("h") / i(h_n / hk_n)),
        let_("j0", pid(jax) * i(bv)),
    ];
    if rec.decay == Decay::PerChannel {
        body.insert(0, local("dec", dk));
    }
    let grid = match cx.phase {
        Phase::Prefill => {
            body.push(let_("s", ld("slot", [i(0)])));
            vec![Dim::N(h_n), Dim::N(dv / bv)]
        }
        Phase::Decode => {
            body.push(let_("t", pid(0)));
            body.push(let_("s", ld("slot", [v("t")])));
            vec![Dim::Rows, Dim::N(h_n), Dim::N(dv / bv)]
        }
    };
    match cx.phase {
        Phase::Prefill => body.push(for_("t", i(0), rows(), step)),
        Phase::Decode => body.extend(step),
    }
    let update = match rec.update {
        Update::Delta => "delta",
        Update::Additive => "additive",
    };
    launch(
        format!(
            "recurrence_{update}_{decay_name}_{}_h{h_n}x{hk_n}_dk{dk}_dv{dv}",
            cx.phase.name()
        ),
        grid,
        params,
        body,
        vec![n],
        g,
    )
}
