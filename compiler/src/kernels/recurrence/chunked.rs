//! The chunked form of the recurrences, for prefill: chunks of [`CHUNK`] tokens, the
//! per-channel (KDA) decay products formed against sub-chunks of [`SUB`] rows. The executable
//! specification is `lamina_runtime::reference::chunked` (the WY / UT-transform form); this is
//! the same algebra arranged per value column. Per chunk with in-chunk cumulative log-decay
//! `G` (per channel for KDA), state `S` at the chunk start and q pre-scaled:
//!
//! ```text
//! M_qk[t,s] = Σ_c q_tc k_sc e^(G_tc − G_sc)   (s ≤ t)      M_kk likewise with k_t (s < t)
//! delta:    u_t = β_t (v_t − (k_t ⊙ e^G_t)ᵀ S − Σ_(s<t) M_kk[t,s] u_s)   (forward substitution)
//! additive: u_t = v_t
//! o_t = (q_t ⊙ e^G_t)ᵀ S + Σ_(s≤t) M_qk[t,s] u_s
//! S  ← e^G_L ⊙ S + Σ_s (k_s ⊙ e^(G_L − G_s)) u_sᵀ
//! ```
//!
//! Every row of `u`, `o` and `S` above is separable in value columns, so after the `[C, C]`
//! matrices a program walks the head's value columns one by one: three contiguous passes over
//! a state column per chunk instead of two per token. One program per key head: its q and k
//! (convolved, normalised) are loaded once per chunk for the value heads sharing them, whose
//! `M` matrices serve all their columns; with fused short convs the program is the only
//! reader and writer of those channels' conv states, committed at its end. A fused gated
//! output norm is applied per row when the chunk's outputs are written.
//!
//! The matrix work is written as tile operations (`ir::kernel::TileOp`): the cumulative
//! log-decay is a `cumsum`, the products `X Kᵀ` (scalar decay) and the off-diagonal sub-chunk
//! blocks (per-channel decay) are `dot`s, and the forward substitution per value column is a
//! `trisolve` with `L = diag(β) M_kk`. The host expands them into loops; a GPU target can map
//! them to tensor-core MMAs and warp-level scans.
//!
//! Per-channel decay cannot be factored out of the products. Within a diagonal sub-chunk the
//! factors are formed pairwise; across sub-chunks both sides are rescaled against the query
//! row's sub-chunk start `r`: `e^(G_t − r) e^(r − G_s)`, each exponent ≤ 0 (no overflow).

use lamina_ir::graph::{Decay, NodeIndex, Op, Update};
use lamina_ir::kernel::build::*;
use lamina_ir::kernel::{Dim, Expr, Stmt};

use super::{update_name, Operands};
use crate::kernels::{launch, Ctx, Launch};

/// Tokens per chunk.
pub const CHUNK: usize = 64;
/// Rows per sub-chunk of the per-channel decay products.
pub const SUB: usize = 16;

pub fn build(cx: &Ctx, n: NodeIndex, ins: &[NodeIndex]) -> Launch {
    let g = cx.graph;
    let Op::Recurrence { rec, .. } = &g.node(n).op else {
        unreachable!("recurrence builder")
    };
    let io = Operands::new(cx, n, ins);
    let (h_n, hk_n, dk, dv) = (rec.heads, rec.key_heads, rec.dk, rec.dv);
    let c_n = CHUNK;
    let group = h_n / hk_n;
    let delta = rec.update == Update::Delta;
    let channel = rec.decay == Decay::PerChannel;
    // Decay columns per token: dk for per-channel decay, else one.
    let w = if channel { dk } else { 1 };
    let wc = |c: Expr| if channel { c } else { i(0) };
    let gl = |name: &str, t: Expr, c: Expr| ld(name, [t * i(w) + wc(c)]);
    let at = |name: &str, t: Expr, c: Expr| ld(name, [t * i(dk) + c]);
    let s_col = |c: Expr| ld("state", [v("s"), v("h"), v("jj"), c]);
    let r = || v("c0") + v("t");

    let mut chunk: Vec<Stmt> = vec![
        let_("c0", v("ci") * i(c_n)),
        let_("l", min(i(c_n), rows() - v("c0"))),
    ];

    // 1. This chunk's q (scaled) and k of the key head (convolved and L2-normalised when
    //    fused), shared by the group's value heads.
    let mut load: Vec<Stmt> = Vec::new();
    for (buf, local_buf, eps, scale) in [("q", "qs", io.l2_q, rec.scale), ("k", "ks", io.l2_k, 1.0)]
    {
        let at = |c: Expr| ld(local_buf, [v("t") * i(dk) + c]);
        load.push(for_(
            "c",
            i(0),
            i(dk),
            vec![st(
                local_buf,
                [v("t") * i(dk) + v("c")],
                io.conv_prefill(buf, r(), v("kh") * i(dk) + v("c")),
            )],
        ));
        let mut scale_by = if scale != 1.0 { Some(f(scale)) } else { None };
        if let Some(e) = eps {
            let inv = format!("inv_{buf}");
            load.push(let_(
                &inv,
                rsqrt(sum("c", i(0), i(dk), at(v("c")) * at(v("c"))) + f(e)),
            ));
            scale_by = Some(match scale_by {
                Some(sc) => v(&inv) * sc,
                None => v(&inv),
            });
        }
        if let Some(sc) = scale_by {
            load.push(for_(
                "c",
                i(0),
                i(dk),
                vec![st(local_buf, [v("t") * i(dk) + v("c")], at(v("c")) * sc)],
            ));
        }
    }
    chunk.push(for_("t", i(0), v("l"), load));

    // Per value head of the group: β and the cumulative log-decay.
    let mut head: Vec<Stmt> = vec![let_("h", v("kh") * i(group) + v("hh"))];
    let mut gates: Vec<Stmt> = Vec::new();
    if delta {
        gates.push(st("bt", [v("t")], io.beta_at(r())));
    }
    let g_tok = match rec.decay {
        Decay::None => f(0.0),
        Decay::Scalar => io.g_at(r(), v("h"), 1),
        Decay::PerChannel => io.g_at(r(), v("h") * i(dk) + v("e"), dk),
        Decay::Fixed { .. } => -ld("slopes", [v("h")]),
    };
    gates.push(for_(
        "e",
        i(0),
        i(w),
        vec![st("G", [v("t") * i(w) + v("e")], g_tok)],
    ));
    head.push(for_("t", i(0), v("l"), gates));
    head.push(cumsum(view("G", i(0), w), v("l"), w));

    // 2. Decayed copies: q ⊙ e^G, k ⊙ e^G, (k ⊙ e^(G_L − G))ᵀ, e^G_L.
    let last = v("l") - i(1);
    head.push(for_(
        "e",
        i(0),
        i(w),
        vec![st(
            "eg",
            [v("e")],
            exp(ld("G", [last.clone() * i(w) + v("e")])),
        )],
    ));
    head.push(for_(
        "t",
        i(0),
        v("l"),
        vec![for_(
            "c",
            i(0),
            i(dk),
            [
                vec![let_("ge", exp(gl("G", v("t"), v("c"))))],
                scaled_copies(dk, [("qs", "qg"), ("ks", "kg")], "ge"),
                vec![st(
                    "kd",
                    [v("c") * i(c_n) + v("t")],
                    at("ks", v("t"), v("c"))
                        * exp(gl("G", last.clone(), v("c")) - gl("G", v("t"), v("c"))),
                )],
            ]
            .concat(),
        )],
    ));

    // 3. The decay-weighted products M_qk (s ≤ t) and, for the delta rule, M_kk (s < t).
    let mats: Vec<(&str, &str)> = if delta {
        vec![("mqk", "qs"), ("mkk", "ks")]
    } else {
        vec![("mqk", "qs")]
    };
    if !channel {
        // M = (X Kᵀ) ⊙ e^(G_t − G_s) on the causal part.
        let mut row = vec![let_("e", exp(ld("G", [v("t")]) - ld("G", [v("x")])))];
        for (m, x) in &mats {
            head.push(dot(
                view(m, i(0), c_n),
                view(x, i(0), dk),
                view("ks", i(0), dk),
                v("l"),
                v("l"),
                dk,
                false,
            ));
            row.push(st(
                m,
                [v("t") * i(c_n) + v("x")],
                v("e") * ld(m, [v("t") * i(c_n) + v("x")]),
            ));
        }
        head.push(for_(
            "t",
            i(0),
            v("l"),
            vec![for_("x", i(0), v("t") + i(1), row)],
        ));
    } else {
        // Rows rescaled against their sub-chunk start, and for every sub-chunk start r0 the
        // earlier keys rescaled against it: kb[b][s] = k_s ⊙ e^(G_r0 − G_s), s < r0.
        head.push(for_(
            "t",
            i(0),
            v("l"),
            vec![
                let_("t0", (v("t") / i(SUB)) * i(SUB)),
                for_(
                    "c",
                    i(0),
                    i(dk),
                    [
                        vec![let_(
                            "e",
                            exp(gl("G", v("t"), v("c")) - gl("G", v("t0"), v("c"))),
                        )],
                        scaled_copies(dk, [("qs", "qt"), ("ks", "kt")], "e"),
                    ]
                    .concat(),
                ),
            ],
        ));
        head.push(for_(
            "b",
            i(1),
            (v("l") + i(SUB - 1)) / i(SUB),
            vec![
                let_("r0", v("b") * i(SUB)),
                for_(
                    "x",
                    i(0),
                    v("r0"),
                    vec![for_(
                        "c",
                        i(0),
                        i(dk),
                        vec![st(
                            "kb",
                            [(v("b") * i(c_n) + v("x")) * i(dk) + v("c")],
                            at("ks", v("x"), v("c"))
                                * exp(gl("G", v("r0"), v("c")) - gl("G", v("x"), v("c"))),
                        )],
                    )],
                ),
            ],
        ));
        // Off-diagonal blocks: the rows of sub-chunk b against the keys before it, one dot
        // each; diagonal blocks pairwise.
        let mut cross = vec![let_("r0", v("b") * i(SUB))];
        let mut diag = Vec::new();
        for (m, x) in &mats {
            let scaled = if *x == "qs" { "qt" } else { "kt" };
            cross.push(dot(
                view(m, v("r0") * i(c_n), c_n),
                view(scaled, v("r0") * i(dk), dk),
                view("kb", v("b") * i(c_n * dk), dk),
                min(i(SUB), v("l") - v("r0")),
                v("r0"),
                dk,
                false,
            ));
            diag.push(st(
                m,
                [v("t") * i(c_n) + v("x")],
                sum(
                    "c",
                    i(0),
                    i(dk),
                    at(x, v("t"), v("c"))
                        * at("ks", v("x"), v("c"))
                        * exp(gl("G", v("t"), v("c")) - gl("G", v("x"), v("c"))),
                ),
            ));
        }
        head.push(for_("b", i(1), (v("l") + i(SUB - 1)) / i(SUB), cross));
        head.push(for_(
            "t",
            i(0),
            v("l"),
            vec![
                let_("t0", (v("t") / i(SUB)) * i(SUB)),
                for_("x", v("t0"), v("t") + i(1), diag),
            ],
        ));
    }
    if delta {
        // L = diag(β) M_kk: the strictly lower part of I + L is what the solve reads.
        head.push(for_(
            "t",
            i(0),
            v("l"),
            vec![for_(
                "x",
                i(0),
                v("t"),
                vec![st(
                    "mkk",
                    [v("t") * i(c_n) + v("x")],
                    ld("bt", [v("t")]) * ld("mkk", [v("t") * i(c_n) + v("x")]),
                )],
            )],
        ));
    }

    // 4. Value columns: solve for u, emit the outputs, advance the state.
    let col = v("h") * i(dv) + v("jj");
    let vt = io.conv_prefill("v", r(), col.clone());
    // Delta rule: u = (I + L)⁻¹ β ⊙ (v − (K ⊙ e^G) S), the right-hand side first.
    let u = if delta {
        ld("bt", [v("t")]) * (vt - sum("c", i(0), i(dk), s_col(v("c")) * at("kg", v("t"), v("c"))))
    } else {
        vt
    };
    let mut solve = vec![for_("t", i(0), v("l"), vec![st("ul", [v("t")], u)])];
    if delta {
        solve.push(trisolve(
            view("mkk", i(0), c_n),
            view("ul", i(0), 1),
            v("l"),
            1,
        ));
    }
    let mut column = solve;
    column.extend([
        for_(
            "t",
            i(0),
            v("l"),
            vec![st(
                "ot",
                [v("t") * i(dv) + v("jj")],
                sum("c", i(0), i(dk), s_col(v("c")) * at("qg", v("t"), v("c")))
                    + sum(
                        "x",
                        i(0),
                        v("t") + i(1),
                        ld("mqk", [v("t") * i(c_n) + v("x")]) * ld("ul", [v("x")]),
                    ),
            )],
        ),
        for_(
            "c",
            i(0),
            i(dk),
            vec![st(
                "state",
                [v("s"), v("h"), v("jj"), v("c")],
                s_col(v("c")) * ld("eg", [wc(v("c"))])
                    + sum(
                        "x",
                        i(0),
                        v("l"),
                        ld("kd", [v("c") * i(c_n) + v("x")]) * ld("ul", [v("x")]),
                    ),
            )],
        ),
    ]);
    head.push(for_("jj", i(0), i(dv), column));

    // 5. The chunk's outputs, through the fused gated norm when there is one.
    let ot = || ld("ot", [v("t") * i(dv) + v("jj")]);
    let out_col = v("h") * i(dv) + v("jj");
    let write = match io.norm {
        Some((eps, _)) => vec![
            let_(
                "inv_o",
                rsqrt(sum("jj", i(0), i(dv), ot() * ot()) / f(dv as f64) + f(eps)),
            ),
            for_(
                "jj",
                i(0),
                i(dv),
                vec![st(
                    "o",
                    [r(), out_col.clone()],
                    ot() * v("inv_o") * ld("nw", [v("jj")]) * io.norm_gate(r(), out_col.clone()),
                )],
            ),
        ],
        None => vec![for_("jj", i(0), i(dv), vec![st("o", [r(), out_col], ot())])],
    };
    head.push(for_("t", i(0), v("l"), write));

    chunk.push(for_("hh", i(0), i(group), head));

    let mut body = vec![
        local("qs", c_n * dk),
        local("ks", c_n * dk),
        local("qg", c_n * dk),
        local("kg", c_n * dk),
        local("kd", dk * c_n),
        local("G", c_n * w),
        local("eg", w),
        local("mqk", c_n * c_n),
        local("ul", c_n),
        local("ot", c_n * dv),
    ];
    if delta {
        body.extend([local("bt", c_n), local("mkk", c_n * c_n)]);
    }
    if channel {
        body.extend([
            local("qt", c_n * dk),
            local("kt", c_n * dk),
            local("kb", c_n * c_n / SUB * dk),
        ]);
    }
    body.extend([
        let_("kh", pid(0)),
        let_("s", ld("slot", [i(0)])),
        for_("ci", i(0), (rows() + i(c_n - 1)) / i(c_n), chunk),
    ]);
    // The fused convs' states, after every read of them: this key head's q and k channels and
    // its value heads' v channels.
    body.extend(io.conv_commit("q", v("kh") * i(dk), dk));
    body.extend(io.conv_commit("k", v("kh") * i(dk), dk));
    body.extend(io.conv_commit("v", v("kh") * i(group * dv), group * dv));
    launch(
        format!(
            "recurrence_{}_{}{}_chunked{c_n}_h{h_n}x{hk_n}_dk{dk}_dv{dv}",
            update_name(rec.update),
            io.decay_name,
            io.suffix
        ),
        vec![Dim::N(hk_n)],
        io.params,
        body,
        io.nodes,
        g,
    )
}

/// `to[t, c] = from[t, c] · factor` for each `(from, to)` pair of `[C, dk]` locals, inside
/// the caller's `t`, `c` loops.
fn scaled_copies(dk: usize, pairs: [(&str, &str); 2], factor: &str) -> Vec<Stmt> {
    let idx = || v("t") * i(dk) + v("c");
    pairs
        .iter()
        .map(|(from, to)| st(to, [idx()], ld(from, [idx()]) * v(factor)))
        .collect()
}
