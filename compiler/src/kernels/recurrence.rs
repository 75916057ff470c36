//! Linear-attention recurrences (delta rule or additive; decay none, scalar, per-channel or
//! fixed) in their recurrent form.
//!
//! The update is separable in value columns (`u_j = β (v_j − Σ_c S_cj k_c)` only reads column
//! j of S), so a program owns a tile of `BV` value columns of one head's state: it loads the
//! `[dk, BV]` tile into a local (stored column-major so the `dk` reductions are contiguous),
//! runs its tokens, and writes the tile back. Prefill: programs `(head, tile)` walk the
//! sequence's rows in order; decode: programs `(row, head, tile)` take one step each.
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
    let sidx = |c: Expr| v("jj") * i(dk) + c;
    let s_at = |c: Expr| ld("S", [sidx(c)]);
    let kc = ld("k", [v("t"), v("kh") * i(dk) + v("c")]);
    let qc = ld("q", [v("t"), v("kh") * i(dk) + v("c")]);
    let col = v("h") * i(dv) + v("j0") + v("jj");

    // One token: decay, update, output for every column of the tile.
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
    let mut col_body = Vec::new();
    if let Some(d) = decay {
        col_body.push(for_(
            "c",
            i(0),
            i(dk),
            vec![st("S", [sidx(v("c"))], s_at(v("c")) * d)],
        ));
    }
    let vt = ld("v", [v("t"), col.clone()]);
    match rec.update {
        Update::Delta => {
            step.push(let_("b", ld("beta", [v("t"), v("h")])));
            col_body.push(let_("kv", sum("c", i(0), i(dk), s_at(v("c")) * kc.clone())));
            col_body.push(let_("u", v("b") * (vt - v("kv"))));
        }
        Update::Additive => col_body.push(let_("u", vt)),
    }
    col_body.push(for_(
        "c",
        i(0),
        i(dk),
        vec![st("S", [sidx(v("c"))], s_at(v("c")) + kc * v("u"))],
    ));
    col_body.push(st(
        "o",
        [v("t"), col],
        f(rec.scale) * sum("c", i(0), i(dk), s_at(v("c")) * qc),
    ));
    step.push(for_("jj", i(0), i(bv), col_body));

    let state_at = [v("s"), v("h"), v("c"), v("j0") + v("jj")];
    let mut body = vec![
        local("S", dk * bv),
        let_("h", pid(hax)),
        let_("kh", v("h") / i(h_n / hk_n)),
        let_("j0", pid(jax) * i(bv)),
    ];
    if rec.decay == Decay::PerChannel {
        body.insert(1, local("dec", dk));
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
    body.push(for_(
        "jj",
        i(0),
        i(bv),
        vec![for_(
            "c",
            i(0),
            i(dk),
            vec![st("S", [sidx(v("c"))], ld("state", state_at.clone()))],
        )],
    ));
    match cx.phase {
        Phase::Prefill => body.push(for_("t", i(0), rows(), step)),
        Phase::Decode => body.extend(step),
    }
    body.push(for_(
        "jj",
        i(0),
        i(bv),
        vec![for_(
            "c",
            i(0),
            i(dk),
            vec![st("state", state_at.clone(), ld("S", [sidx(v("c"))]))],
        )],
    ));
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
