//! Linear-attention recurrences (delta rule or additive; decay none, scalar, per-channel or
//! fixed): the recurrent form for decode (here) and the chunked form for prefill
//! ([`chunked`]).
//!
//! Both keep each head's state in its pool transposed, `[dv, dk]` (see [`super::pool_shape`]),
//! so a value column is contiguous, and both rely on the update being separable in value
//! columns: `u_j = β (v_j − Σ_c S_cj k_c)` only reads column j of S.
//!
//! Decode: programs `(row, head, tile of BV value columns)` take one step each, updating the
//! state in place in two passes per column. Fused short convs run first, in their own kernel
//! ([`conv_step`]: one program per (row, block of channels) convolves the token and shifts
//! the conv states), so that the step's programs need not own a key head's conv channels: two
//! launches per layer, and `heads × dv/BV` programs per row for the state's latency chain.
//!
//! Fusions (decided by `passes::fuse`, shared by both forms): in the prologue, the L2 norms of
//! q and k, β's sigmoid and the decay gate are computed from their inputs; in the epilogue, the
//! gated RMSNorm over the head's output row (decode: then a program owns the whole head;
//! prefill: its own launch after the scan, see [`chunked`]).

pub mod chunked;

use lamina_ir::graph::{lightning_slopes, Decay, GateForm, NodeIndex, Op, Unary, Update};
use lamina_ir::kernel::build::*;
use lamina_ir::kernel::{Dim, Expr, Param, Stmt};

use super::{act, launch, rows_i64, tile, Bind, Ctx, Launch, Phase, Value};

/// Value columns per decode program.
pub const BV: usize = 32;

/// Parameters and fused prologue/epilogue facts shared by both forms.
pub struct Operands {
    pub params: Vec<(Param, Bind)>,
    /// Kernel size of the fused short convs: then `q`, `k`, `v` are the projections before
    /// them, `wq`.. their weights and `cq`.. their states `[slots, channels, K-1]`.
    pub conv: Option<usize>,
    /// The decay gate computed in the prologue from the raw projection (`g` holds it).
    pub gate: Option<GateForm>,
    /// ε of the fused L2 norms of q and k.
    pub l2_q: Option<f64>,
    pub l2_k: Option<f64>,
    /// β is `sigmoid(beta)`.
    pub beta_sigmoid: bool,
    /// The fused gated output norm: ε and gate activation (`nw`, `z` hold its weight and gate).
    pub norm: Option<(f64, Unary)>,
    /// Graph nodes the kernel computes.
    pub nodes: Vec<NodeIndex>,
    /// Kernel-name suffix naming the fusions.
    pub suffix: String,
    pub decay_name: &'static str,
}

impl Operands {
    pub fn new(cx: &Ctx, n: NodeIndex, ins: &[NodeIndex]) -> Operands {
        Operands::with(cx, n, ins, None)
    }

    /// [`Operands::new`]; with `convolved`, the fused convs' outputs `[q, k, v]` were computed
    /// by [`conv_step`]: they are bound in place of the projections and no conv is fused.
    pub fn with(
        cx: &Ctx,
        n: NodeIndex,
        ins: &[NodeIndex],
        convolved: Option<[Value; 3]>,
    ) -> Operands {
        let g = cx.graph;
        let Op::Recurrence { rec, state } = &g.node(n).op else {
            unreachable!("recurrence builder")
        };
        let mut fused = cx.fusion.of(n).clone();
        if convolved.is_some() {
            fused.conv = None;
        }
        let (h_n, hk_n, dk, dv) = (rec.heads, rec.key_heads, rec.dk, rec.dv);
        // An operand, or the input of the node absorbed in its place.
        let operand = |i: usize, absorbed: Option<NodeIndex>| {
            Bind::Act(Value::Node(match absorbed {
                Some(a) => g.inputs(a)[0],
                None => ins[i],
            }))
        };
        let l2_eps = |a: Option<NodeIndex>| match a.map(|a| &g.node(a).op) {
            Some(Op::L2Norm { eps, .. }) => Some(*eps),
            _ => None,
        };
        let mut params = match fused.conv {
            // The projections before the convs, the conv weights and states.
            Some(convs) => {
                let mut p = Vec::new();
                for (name, c, cols) in [
                    ("q", convs[0], hk_n * dk),
                    ("k", convs[1], hk_n * dk),
                    ("v", convs[2], h_n * dv),
                ] {
                    let Op::ShortConv { weight, state, .. } = &g.node(c).op else {
                        unreachable!("fuse: convs are short convs")
                    };
                    p.push((
                        input(name, &act(cols)),
                        Bind::Act(Value::Node(g.inputs(c)[0])),
                    ));
                    p.push(cx.weight(&format!("w{name}"), weight));
                    p.push(cx.state(&format!("c{name}"), *state));
                }
                p
            }
            None => match convolved {
                Some([q, k, v]) => vec![
                    (input("q", &act(hk_n * dk)), Bind::Act(q)),
                    (input("k", &act(hk_n * dk)), Bind::Act(k)),
                    (input("v", &act(h_n * dv)), Bind::Act(v)),
                ],
                None => vec![
                    (input("q", &act(hk_n * dk)), operand(0, fused.l2_q)),
                    (input("k", &act(hk_n * dk)), operand(1, fused.l2_k)),
                    (input("v", &act(h_n * dv)), operand(2, None)),
                ],
            },
        };
        let conv = fused.conv.map(|c| match g.node(c[0]).op {
            Op::ShortConv { kernel, .. } => kernel,
            _ => unreachable!("fuse: convs are short convs"),
        });
        let mut next = 3;
        let gate = fused.gate.map(|a| match &g.node(a).op {
            Op::DecayGate {
                a_log,
                dt_bias,
                form,
                ..
            } => (a_log.clone(), dt_bias.clone(), *form),
            _ => unreachable!("fuse: gates are decay gates"),
        });
        let decay_name = match rec.decay {
            Decay::None => "none",
            Decay::Scalar | Decay::PerChannel => {
                let cols = if rec.decay == Decay::Scalar {
                    h_n
                } else {
                    h_n * dk
                };
                params.push((input("g", &act(cols)), operand(next, fused.gate)));
                if let Some((a_log, dt_bias, _)) = &gate {
                    params.push(super::elementwise::flat_weight(cx, "a_log", a_log));
                    params.push(super::elementwise::flat_weight(cx, "dt_bias", dt_bias));
                }
                next += 1;
                if rec.decay == Decay::Scalar {
                    "scalar"
                } else {
                    "channel"
                }
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
            params.push((input("beta", &act(h_n)), operand(next, fused.beta)));
        }
        params.push(cx.state("state", *state));
        params.push((rows_i64("slot"), Bind::Slot));
        let norm = fused.out_norm.map(|nm| {
            let Op::GatedRmsNorm {
                weight, eps, gate, ..
            } = &g.node(nm).op
            else {
                unreachable!("fuse: output norms are gated RMSNorms")
            };
            params.push(cx.weight("nw", weight));
            params.push((
                input("z", &act(h_n * dv)),
                Bind::Act(Value::Node(g.inputs(nm)[1])),
            ));
            (*eps, *gate)
        });
        params.push((
            output("o", &act(h_n * dv)),
            Bind::Act(Value::Node(fused.out_norm.unwrap_or(n))),
        ));
        let mut suffix = String::new();
        if conv.is_some() {
            suffix += "_conv";
        }
        if fused.l2_q.is_some() || fused.l2_k.is_some() {
            suffix += "_l2";
        }
        if fused.gate.is_some() || fused.beta.is_some() {
            suffix += "_gates";
        }
        if norm.is_some() {
            suffix += "_gnorm";
        }
        let mut nodes: Vec<NodeIndex> = fused.conv.map(Vec::from).unwrap_or_default();
        nodes.extend(
            [fused.l2_q, fused.l2_k, fused.gate, fused.beta]
                .into_iter()
                .flatten(),
        );
        nodes.push(n);
        nodes.extend(fused.out_norm);
        Operands {
            params,
            conv,
            gate: gate.map(|g| g.2),
            l2_q: l2_eps(fused.l2_q),
            l2_k: l2_eps(fused.l2_k),
            beta_sigmoid: fused.beta.is_some(),
            norm,
            nodes,
            suffix,
            decay_name,
        }
    }

    /// The log-decay of head column `col` (`width` columns per head) at token `t`.
    pub fn g_at(&self, t: Expr, col: Expr, width: usize) -> Expr {
        let x = ld("g", [t, col.clone()]);
        match self.gate {
            Some(form) => super::elementwise::decay_gate(form, x, col, width).1,
            None => x,
        }
    }

    /// Prefill: the SiLU conv output of channel `ch` of `x` (`q`, `k` or `v`) at launch row
    /// `t`, over the window `state ++ rows` (element `e` is state `e` while `e < K-1`, else row
    /// `e - (K-1)`; both loads are clamped in range and the select picks the live one). Without
    /// a fused conv, the projection value itself.
    pub fn conv_prefill(&self, x: &str, t: Expr, ch: Expr) -> Expr {
        let Some(kn) = self.conv else {
            return ld(x, [t, ch]);
        };
        silu(sum(
            "tap",
            i(0),
            i(kn),
            ld(&format!("w{x}"), [ch.clone(), v("tap")]) * window(x, kn, t + v("tap"), ch.clone()),
        ))
    }

    /// Decode: the same at row `t`, from the state and the row's value.
    pub fn conv_decode(&self, x: &str, t: Expr, ch: Expr) -> Expr {
        let Some(kn) = self.conv else {
            return ld(x, [t, ch]);
        };
        let (w, c) = (format!("w{x}"), format!("c{x}"));
        silu(
            sum(
                "tap",
                i(0),
                i(kn - 1),
                ld(&w, [ch.clone(), v("tap")]) * ld(&c, [v("s"), ch.clone(), v("tap")]),
            ) + ld(&w, [ch.clone(), i(kn - 1)]) * ld(x, [t, ch]),
        )
    }

    /// Prefill: the conv state of channel `ch` of `x` after the launch's rows (the window's
    /// last K-1 elements, written in ascending order: each read is at or ahead of the write).
    /// (Decode shifts the states in [`conv_step`].)
    pub fn conv_commit(&self, x: &str, ch: Expr) -> Vec<Stmt> {
        let Some(kn) = self.conv else {
            return Vec::new();
        };
        vec![for_(
            "e",
            i(0),
            i(kn - 1),
            vec![st(
                &format!("c{x}"),
                [v("s"), ch.clone(), v("e")],
                window(x, kn, rows() + v("e"), ch),
            )],
        )]
    }

    /// β at token `t` of head `h`.
    pub fn beta_at(&self, t: Expr) -> Expr {
        let b = ld("beta", [t, v("h")]);
        if self.beta_sigmoid {
            sigmoid(b)
        } else {
            b
        }
    }

    /// `act(z)` of the output norm's gate at `[t, col]`.
    pub fn norm_gate(&self, t: Expr, col: Expr) -> Expr {
        let z = ld("z", [t, col]);
        match self.norm {
            Some((_, Unary::Sigmoid)) => sigmoid(z),
            _ => silu(z),
        }
    }
}

/// Element `e` of the prefill conv window of channel `ch` of `x`: state `e` while `e < K-1`,
/// else launch row `e - (K-1)`.
fn window(x: &str, kn: usize, e: Expr, ch: Expr) -> Expr {
    let hist = kn - 1;
    select(
        lt(e.clone(), i(hist)),
        ld(
            &format!("c{x}"),
            [v("s"), ch.clone(), min(e.clone(), i(hist - 1))],
        ),
        ld(x, [max(e - i(hist), i(0)), ch]),
    )
}

pub fn build(cx: &Ctx, n: NodeIndex, ins: &[NodeIndex]) -> Vec<Launch> {
    match cx.phase {
        Phase::Prefill => chunked::build(cx, n, ins),
        Phase::Decode => match cx.fusion.of(n).conv {
            Some(_) => {
                let (conv, convolved) = conv_step(cx, n, ins);
                vec![conv, decode(cx, n, ins, Some(convolved))]
            }
            None => vec![decode(cx, n, ins, None)],
        },
    }
}

/// Channels per program of [`conv_step`].
pub const CONV_CHANNELS: usize = 256;

/// Decode's fused short convs as their own kernel: per (row, block of [`CONV_CHANNELS`]
/// channels of each of q, k, v), the SiLU conv of the row's token over the conv state, then
/// the state shifted by the token (each channel read, then written, by one iteration). Returns
/// the launch and the convolved `[q, k, v]`.
fn conv_step(cx: &Ctx, n: NodeIndex, ins: &[NodeIndex]) -> (Launch, [Value; 3]) {
    let g = cx.graph;
    let Op::Recurrence { rec, .. } = &g.node(n).op else {
        unreachable!("recurrence builder")
    };
    let io = Operands::new(cx, n, ins);
    let kn = io.conv.expect("conv_step: the convs are fused");
    let convs = cx
        .fusion
        .of(n)
        .conv
        .expect("conv_step: the convs are fused");
    let (hk_n, h_n, dk, dv) = (rec.key_heads, rec.heads, rec.dk, rec.dv);
    let widths = [hk_n * dk, hk_n * dk, h_n * dv];
    let outs = widths.map(|w| cx.temp(w));
    // q, wq, cq, k, wk, ck, v, wv, cv: the conv operands as the step binds them.
    let mut params: Vec<_> = io.params[..9].to_vec();
    params.push((rows_i64("slot"), Bind::Slot));
    let mut body = vec![
        let_("t", pid(0)),
        let_("s", ld("slot", [v("t")])),
        let_("b0", pid(1) * i(CONV_CHANNELS)),
    ];
    for ((x, width), out) in ["q", "k", "v"].into_iter().zip(widths).zip(outs) {
        let y = format!("{x}c");
        params.push((output(&y, &act(width)), Bind::Act(out)));
        let c = format!("c{x}");
        let ch = || v("ch");
        body.push(Stmt::If {
            cond: lt(v("b0"), i(width)),
            then: vec![for_par(
                "ch",
                v("b0"),
                min(v("b0") + i(CONV_CHANNELS), i(width)),
                vec![
                    st(&y, [v("t"), ch()], io.conv_decode(x, v("t"), ch())),
                    for_(
                        "e",
                        i(0),
                        i(kn - 2),
                        vec![st(
                            &c,
                            [v("s"), ch(), v("e")],
                            ld(&c, [v("s"), ch(), v("e") + i(1)]),
                        )],
                    ),
                    st(&c, [v("s"), ch(), i(kn - 2)], ld(x, [v("t"), ch()])),
                ],
            )],
        });
    }
    let blocks = widths
        .iter()
        .max()
        .copied()
        .unwrap_or(1)
        .div_ceil(CONV_CHANNELS);
    let launch = launch(
        format!("short_conv_step_k{kn}_q{}_v{}", widths[0], widths[2]),
        vec![Dim::Rows, Dim::N(blocks)],
        params,
        body,
        convs.to_vec(),
        g,
    );
    (launch, outs)
}

fn update_name(u: Update) -> &'static str {
    match u {
        Update::Delta => "delta",
        Update::Additive => "additive",
    }
}

/// One step per (row, head, tile of value columns), reading the convolved q, k, v from
/// [`conv_step`] when the convs are fused.
fn decode(cx: &Ctx, n: NodeIndex, ins: &[NodeIndex], convolved: Option<[Value; 3]>) -> Launch {
    let g = cx.graph;
    let Op::Recurrence { rec, .. } = &g.node(n).op else {
        unreachable!("recurrence builder")
    };
    let io = Operands::with(cx, n, ins, convolved);
    let (h_n, hk_n, dk, dv) = (rec.heads, rec.key_heads, rec.dk, rec.dv);
    let group = h_n / hk_n;
    debug_assert!(io.conv.is_none(), "decode runs fused convs in conv_step");
    // A fused output norm needs the whole head's output row.
    let bv = if io.norm.is_some() { dv } else { tile(dv, BV) };
    let s_at = || ld("state", [v("s"), v("h"), v("j0") + v("jj"), v("c")]);
    let kc = ld("kn", [v("c")]);
    let qc = ld("qn", [v("c")]);
    let col = v("h") * i(dv) + v("j0") + v("jj");

    // Prologue: the key head's q and k (convolved and L2-normalised when fused).
    let mut pro: Vec<Stmt> = Vec::new();
    for (buf, local_buf, eps) in [("q", "qn", io.l2_q), ("k", "kn", io.l2_k)] {
        let at = || ld(local_buf, [v("c")]);
        // Key channels are independent: parallel loops (a GPU deals them to a warp's lanes).
        pro.push(for_par(
            "c",
            i(0),
            i(dk),
            vec![st(
                local_buf,
                [v("c")],
                io.conv_decode(buf, v("t"), v("kh") * i(dk) + v("c")),
            )],
        ));
        if let Some(e) = eps {
            let inv = format!("inv_{buf}");
            pro.push(let_(&inv, rsqrt(sum("c", i(0), i(dk), at() * at()) + f(e))));
            pro.push(for_par(
                "c",
                i(0),
                i(dk),
                vec![st(local_buf, [v("c")], at() * v(&inv))],
            ));
        }
    }
    pro.push(let_("kq", sum("c", i(0), i(dk), kc.clone() * qc.clone())));

    // One head. With S' = diag(d) S + k uᵀ the output is o_j = scale (Σ_c S_cj d_c q_c + u_j kq):
    // one pass reads the column for a = Σ S d k and b = Σ S d q, a second writes S'.
    let mut step: Vec<Stmt> = Vec::new();
    let decay: Option<Expr> = match rec.decay {
        Decay::None => None,
        Decay::Scalar => {
            step.push(let_("d", exp(io.g_at(v("t"), v("h"), 1))));
            Some(v("d"))
        }
        Decay::PerChannel => {
            step.push(for_par(
                "c",
                i(0),
                i(dk),
                vec![st(
                    "dec",
                    [v("c")],
                    exp(io.g_at(v("t"), v("h") * i(dk) + v("c"), dk)),
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
    if rec.update == Update::Delta {
        step.push(let_("b", io.beta_at(v("t"))));
    }
    let vt = io.conv_decode("v", v("t"), col.clone());
    let u = match rec.update {
        Update::Delta => v("b") * (vt - v("a")),
        Update::Additive => vt,
    };
    let o_val = f(rec.scale) * (v("bq") + v("u") * v("kq"));
    // Per value column: a split sum over the key channels (coalesced state reads on a GPU),
    // then the channels' independent writes.
    let col_body = vec![
        for_sum(
            "c",
            i(0),
            i(dk),
            vec![("a", f(0.0)), ("bq", f(0.0))],
            vec![let_("sd", decayed.clone())],
            vec![v("a") + v("sd") * kc.clone(), v("bq") + v("sd") * qc],
        ),
        let_("u", u),
        for_par(
            "c",
            i(0),
            i(dk),
            vec![st(
                "state",
                [v("s"), v("h"), v("j0") + v("jj"), v("c")],
                decayed + kc * v("u"),
            )],
        ),
        match io.norm {
            Some(_) => st("ot", [v("jj")], o_val),
            None => st("o", [v("t"), col], o_val),
        },
    ];
    step.push(for_("jj", i(0), i(bv), col_body));
    // Epilogue: the gated RMSNorm of the head's output row.
    if let Some((eps, _)) = io.norm {
        let ot = || ld("ot", [v("jj")]);
        step.push(let_(
            "inv_o",
            rsqrt(sum("jj", i(0), i(dv), ot() * ot()) / f(dv as f64) + f(eps)),
        ));
        step.push(for_par(
            "jj",
            i(0),
            i(dv),
            vec![st(
                "o",
                [v("t"), v("h") * i(dv) + v("jj")],
                ot() * v("inv_o")
                    * ld("nw", [v("jj")])
                    * io.norm_gate(v("t"), v("h") * i(dv) + v("jj")),
            )],
        ));
    }

    let mut body = vec![local("qn", dk), local("kn", dk)];
    if rec.decay == Decay::PerChannel {
        body.push(local("dec", dk));
    }
    if io.norm.is_some() {
        body.push(local("ot", dv));
    }
    body.extend([let_("t", pid(0)), let_("s", ld("slot", [v("t")]))]);
    body.extend([
        let_("h", pid(1)),
        let_("kh", v("h") / i(group)),
        let_("j0", pid(2) * i(bv)),
    ]);
    body.extend(pro);
    body.extend(step);
    let grid = vec![Dim::Rows, Dim::N(h_n), Dim::N(dv / bv)];
    launch(
        format!(
            "recurrence_{}_{}{}_decode_h{h_n}x{hk_n}_dk{dk}_dv{dv}",
            update_name(rec.update),
            io.decay_name,
            io.suffix
        ),
        grid,
        io.params,
        body,
        io.nodes,
        g,
    )
}
