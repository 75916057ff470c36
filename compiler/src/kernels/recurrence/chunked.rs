//! The chunked form of the recurrences, for prefill: chunks of [`CHUNK`] tokens, the
//! per-channel (KDA) decay products formed against sub-chunks of [`SUB`] rows. The executable
//! specification is `lamina_runtime::reference::chunked` (the WY / UT-transform form). Per
//! chunk with in-chunk cumulative log-decay `G` (per channel for KDA), state `S` at the chunk
//! start and q pre-scaled:
//!
//! ```text
//! M_qk[t,s] = Σ_c q_tc k_sc e^(G_tc − G_sc)   (s ≤ t)      M_kk likewise with k_t (s < t)
//! delta:    u = U − W S   with  U = (I + L)⁻¹ β v,  W = (I + L)⁻¹ β (k ⊙ e^G),  L = diag(β) M_kk
//! additive: u = U = v
//! o_t = (q_t ⊙ e^G_t)ᵀ S + Σ_(s≤t) M_qk[t,s] u_s
//! S  ← e^G_L ⊙ S + Σ_s (k_s ⊙ e^(G_L − G_s)) u_sᵀ
//! ```
//!
//! Everything but the last three lines depends on the chunk's own tokens only, so the work is
//! split the way flash-linear-attention splits it (launches in this order):
//!
//! 1. [`chunks`]: one program per (chunk, value head), all chunks at once: the chunk's q and k
//!    (convolved and L2-normalised when fused), the gates, the cumulative decay, `M_qk`,
//!    `M_kk`, `T = (I + L)⁻¹` and the products `W`, `U`, and the decayed copies `q ⊙ e^G` and
//!    `k ⊙ e^(G_L − G)`, handed on in row-major temporaries. All the O(C²·d) work is here.
//! 2. [`scan`]: one program per (value head, [`SCAN_COLS`] state columns), walking the chunks
//!    in order: per chunk `u = U − W S`, the outputs, and the state update: the only serial
//!    chain, O(C·dk) per token and column, with the state's columns split over programs
//!    (every row of `u`, `o` and `S` above is separable in value columns).
//! 3. With a fused gated output norm, [`out_norm`] over each (row, head): the scan's programs
//!    hold only a part of a head's output row.
//! 4. With fused short convs, [`conv_commit`]: the conv states after the launch's rows, once
//!    every chunk has read them.
//!
//! The matrix work is written as tile operations (`ir::kernel::TileOp`) and f32 MMA tiles
//! (`mma_tiles`; both 3xTF32 tensor-core tiles on a GPU, loops on the host): the cumulative
//! log-decay is a `cumsum`; the off-diagonal sub-chunk blocks (per-channel decay) are `dot`s;
//! `T` is a `trisolve` on the identity (C columns, not dk + dv); the products `X Kᵀ` (scalar
//! decay, their epilogues applying the decay), `W = T β (k ⊙ e^G)` and `U = T β v` (their
//! right-hand sides staged transposed in the locals q and k leave free) are MMA tiles whose
//! epilogues store the handoff directly, and the scan's products per chunk are MMA tiles reading
//! the handoff where it lies, but for `k ⊙ e^(G_L − G)`, staged transposed so that the host
//! can vectorise the state update's sum over the chunk (the state columns, `u`, the output
//! block and that copy are per-program locals: in a GPU's shared memory where they fit,
//! `lamina_targets::nvptx::warp_layout`).
//!
//! Per-channel decay cannot be factored out of the products. Within a diagonal sub-chunk the
//! factors are formed pairwise; across sub-chunks both sides are rescaled against the query
//! row's sub-chunk start `r`: `e^(G_t − r) e^(r − G_s)`, each exponent ≤ 0 (no overflow).

use lamina_ir::graph::{Decay, NodeIndex, Op, Recurrence, Update};
use lamina_ir::kernel::build::*;
use lamina_ir::kernel::{Dim, Elem, Expr, MmaKind, Param, Stmt};

use super::{update_name, Operands, CONV_CHANNELS};
use crate::kernels::{act, launch, tile, Bind, Ctx, Launch, Value};

/// Tokens per chunk.
pub const CHUNK: usize = 64;
/// Rows per sub-chunk of the per-channel decay products.
pub const SUB: usize = 16;
/// State (value) columns per program of the scan.
pub const SCAN_COLS: usize = 16;
/// Row stride (elements) of a chunk-long operand staged transposed (a column of the chunk per
/// row): [`CHUNK`] plus 4, so that rows stay 16-byte aligned (`cp.async`) and a GPU's MMA
/// fragment reads (8 rows × 4 consecutive elements per instruction) fall in 32 distinct
/// shared-memory banks, where a stride of 64 puts 4 rows in each bank. The copies are dealt
/// along the columns, so they read their sources' rows in order.
pub const TRANSPOSED_LD: usize = CHUNK + 4;

/// The recurrence's sizes and kind.
struct Shape {
    rec: Recurrence,
    h_n: usize,
    hk_n: usize,
    dk: usize,
    dv: usize,
    group: usize,
    delta: bool,
    channel: bool,
    /// Decay columns per token and head: dk for per-channel decay, else one.
    w: usize,
}

impl Shape {
    fn of(rec: &Recurrence) -> Shape {
        let channel = rec.decay == Decay::PerChannel;
        Shape {
            rec: *rec,
            h_n: rec.heads,
            hk_n: rec.key_heads,
            dk: rec.dk,
            dv: rec.dv,
            group: rec.heads / rec.key_heads,
            delta: rec.update == Update::Delta,
            channel,
            w: if channel { rec.dk } else { 1 },
        }
    }
}

/// What [`chunks`] hands [`scan`], per token row and value head (`[R, heads · width]`).
struct Handoff {
    /// `W` (delta rule only), width dk.
    w: Option<Value>,
    /// `U`, width dv.
    u: Value,
    /// `q ⊙ e^G`, width dk.
    qg: Value,
    /// `k ⊙ e^(G_L − G)`, width dk.
    kd: Value,
    /// Row t of the chunk's `M_qk` (columns `s ≤ t` written), width [`CHUNK`].
    mq: Value,
    /// `e^G_L` of each chunk, in the chunk's first row, width `w`.
    eg: Value,
}

impl Handoff {
    /// The handoff as parameters: written by [`chunks`], read by [`scan`]; with `bf16`, all
    /// but `e^G_L` (one row per chunk) stored as bf16.
    fn params(&self, sh: &Shape, write: bool, bf16: bool) -> Vec<(Param, Bind)> {
        let h_n = sh.h_n;
        let mut p: Vec<(Param, Bind)> = self
            .w
            .map(|w| temp_param("w", h_n * sh.dk, w, write))
            .into_iter()
            .collect();
        p.extend([
            temp_param("u", h_n * sh.dv, self.u, write),
            temp_param("qg", h_n * sh.dk, self.qg, write),
            temp_param("kd", h_n * sh.dk, self.kd, write),
            temp_param("mq", h_n * CHUNK, self.mq, write),
        ]);
        if bf16 {
            for (param, _) in &mut p {
                param.elem = Elem::Bf16;
            }
        }
        p.push(temp_param("eg", h_n * sh.w, self.eg, write));
        p
    }
}

pub fn build(cx: &Ctx, n: NodeIndex, ins: &[NodeIndex]) -> Vec<Launch> {
    let Op::Recurrence { rec, .. } = &cx.graph.node(n).op else {
        unreachable!("recurrence builder")
    };
    let io = Operands::new(cx, n, ins);
    let sh = Shape::of(rec);
    let hand = Handoff {
        w: sh.delta.then(|| cx.temp(sh.h_n * sh.dk)),
        u: cx.temp(sh.h_n * sh.dv),
        qg: cx.temp(sh.h_n * sh.dk),
        kd: cx.temp(sh.h_n * sh.dk),
        mq: cx.temp(sh.h_n * CHUNK),
        eg: cx.temp(sh.h_n * sh.w),
    };
    // With a fused output norm the scan writes the raw outputs here.
    let raw = io.norm.map(|_| cx.temp(sh.h_n * sh.dv));
    let mut launches = vec![
        chunks(cx, n, &io, &sh, &hand),
        scan(cx, n, &io, &sh, &hand, raw),
    ];
    if let Some(raw) = raw {
        launches.push(out_norm(cx, n, &io, &sh, raw));
    }
    if io.conv.is_some() {
        launches.push(conv_commit(cx, n, &io, &sh));
    }
    launches
}

/// The parameters of `io` named in `names`, in `io`'s order.
fn pick(io: &Operands, names: &[&str]) -> Vec<(Param, Bind)> {
    io.params
        .iter()
        .filter(|(p, _)| names.contains(&p.name.as_str()))
        .cloned()
        .collect()
}

/// The scan's raw output (before the fused norm) as a parameter: bf16 with bf16 handoffs.
fn raw_param(cx: &Ctx, name: &str, width: usize, t: Value, write: bool) -> (Param, Bind) {
    let (mut p, b) = temp_param(name, width, t, write);
    if cx.bf16_handoffs {
        p.elem = Elem::Bf16;
    }
    (p, b)
}

/// Kernels handing over bf16 are named for it.
fn handoff_suffix(cx: &Ctx) -> &'static str {
    if cx.bf16_handoffs {
        "_bf16handoff"
    } else {
        ""
    }
}

/// `name` as an `[R, width]` parameter bound to temporary `t`.
fn temp_param(name: &str, width: usize, t: Value, write: bool) -> (Param, Bind) {
    let p = if write {
        output(name, &act(width))
    } else {
        input(name, &act(width))
    };
    (p, Bind::Act(t))
}

/// Step 1: one program per (chunk, value head).
fn chunks(cx: &Ctx, n: NodeIndex, io: &Operands, sh: &Shape, hand: &Handoff) -> Launch {
    let rec = &sh.rec;
    let (dk, dv, w, c_n) = (sh.dk, sh.dv, sh.w, CHUNK);
    let (delta, channel) = (sh.delta, sh.channel);
    let wc = |c: Expr| if channel { c } else { i(0) };
    let gl = |name: &str, t: Expr, c: Expr| ld(name, [t * i(w) + wc(c)]);
    let at = |name: &str, t: Expr, c: Expr| ld(name, [t * i(dk) + c]);
    let r_of = |t: Expr| v("c0") + t;
    let r = || r_of(v("t"));
    let last = || v("l") - i(1);

    // With the delta rule, `qs` and `ks` are reused once their rows are no longer needed for
    // the products' right-hand sides, transposed with rows of TRANSPOSED_LD ≥ C (step 5): each
    // is sized for both uses.
    let ldt = TRANSPOSED_LD;
    let mut body = vec![
        local("qs", if delta { dk * ldt } else { c_n * dk }),
        local("ks", if delta { dk.max(dv) * ldt } else { c_n * dk }),
        local("G", c_n * w),
    ];
    if delta {
        body.extend([
            local("bt", c_n),
            local("mkk", c_n * c_n),
            local("tm", c_n * c_n),
        ]);
    }
    if channel {
        // One sub-chunk's rescaled rows and the keys before it (see step 4).
        body.extend([local("mqk", c_n * c_n), local("qt", SUB * dk)]);
        if delta {
            body.push(local("kt", SUB * dk));
        }
        body.push(local("kb", (c_n - SUB) * dk));
    }
    body.extend([
        let_("c0", pid(0) * i(c_n)),
        let_("h", pid(1)),
        let_("kh", v("h") / i(sh.group)),
        let_("l", min(i(c_n), rows() - v("c0"))),
    ]);
    if io.conv.is_some() {
        body.push(let_("s", ld("slot", [i(0)])));
    }

    // 1. The chunk's q (scaled) and k of the key head (convolved and L2-normalised when
    //    fused): tokens are independent, so the lanes of a warp take one each.
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
    body.push(for_par("t", i(0), v("l"), load));

    // 2. β and the cumulative log-decay of the value head.
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
    body.push(for_par("t", i(0), v("l"), gates));
    body.push(cumsum(view("G", i(0), w), v("l"), w));

    // 3. Handed on: e^G_L (in the chunk's first row), q ⊙ e^G, k ⊙ e^(G_L − G); without the
    //    delta rule U = v.
    body.push(for_par(
        "e",
        i(0),
        i(w),
        vec![st(
            "eg",
            [v("c0"), v("h") * i(w) + v("e")],
            exp(ld("G", [last() * i(w) + v("e")])),
        )],
    ));
    let hc = || v("h") * i(dk) + v("c");
    let decayed = vec![
        let_("ge", exp(gl("G", v("t"), v("c")))),
        st("qg", [r(), hc()], at("qs", v("t"), v("c")) * v("ge")),
        st(
            "kd",
            [r(), hc()],
            at("ks", v("t"), v("c")) * exp(gl("G", last(), v("c")) - gl("G", v("t"), v("c"))),
        ),
    ];
    let hj = || v("h") * i(dv) + v("j");
    let mut per_token = vec![for_("c", i(0), i(dk), decayed)];
    if !delta {
        per_token.push(for_(
            "j",
            i(0),
            i(dv),
            vec![st("u", [r(), hj()], io.conv_prefill("v", r(), hj()))],
        ));
    }
    body.push(for_par("t", i(0), v("l"), per_token));

    // 4. The decay-weighted products M_qk (s ≤ t) and, for the delta rule, M_kk (s < t).
    if !channel {
        // M = (X Kᵀ) ⊙ e^(G_t − G_s) on the causal part, in the products' epilogues: M_qk
        // (s ≤ t) handed on, M_kk (s < t) kept as L = diag(β) M_kk. `store(t, s, m)` writes
        // the kept elements.
        let causal =
            |x: &str, keep: fn(Expr, Expr) -> Expr, store: &dyn Fn(Expr, Expr, Expr) -> Stmt| {
                mma_tiles(
                    MmaKind::F32,
                    v("l"),
                    v("l"),
                    dk,
                    &|t, c| at(x, t, c),
                    &|s, c| at("ks", s, c),
                    &|t, s, acc| {
                        let m = exp(ld("G", [t.clone()]) - ld("G", [s.clone()])) * acc;
                        vec![if_(keep(s.clone(), t.clone()), vec![store(t, s, m)])]
                    },
                )
            };
        body.push(causal("qs", le, &|t, s, m| {
            st("mq", [r_of(t), v("h") * i(c_n) + s], m)
        }));
        if delta {
            body.push(causal("ks", lt, &|t, s, m| {
                st("mkk", [t.clone() * i(c_n) + s], ld("bt", [t]) * m)
            }));
        }
    } else {
        // (matrix, its row operand, that operand's rescaled sub-chunk copy)
        let mats: Vec<(&str, &str, &str)> = if delta {
            vec![("mqk", "qs", "qt"), ("mkk", "ks", "kt")]
        } else {
            vec![("mqk", "qs", "qt")]
        };
        // Off-diagonal blocks, one sub-chunk b ≥ 1 (rows r0 .. r0 + SUB) at a time: its rows
        // rescaled against its start, qt[y] = q_(r0+y) ⊙ e^(G_(r0+y) − G_r0) (kt likewise),
        // the keys before it rescaled against the same start, kb[s] = k_s ⊙ e^(G_r0 − G_s)
        // (s < r0), then one dot per matrix. Scratch for one sub-chunk, not the chunk's four.
        let mut block = vec![
            let_("r0", v("b") * i(SUB)),
            for_par(
                "x",
                i(0),
                v("r0"),
                vec![for_(
                    "c",
                    i(0),
                    i(dk),
                    vec![st(
                        "kb",
                        [v("x") * i(dk) + v("c")],
                        at("ks", v("x"), v("c"))
                            * exp(gl("G", v("r0"), v("c")) - gl("G", v("x"), v("c"))),
                    )],
                )],
            ),
        ];
        let rows = || min(i(SUB), v("l") - v("r0"));
        let t = || v("r0") + v("y");
        let mut rescale = vec![let_(
            "e",
            exp(gl("G", t(), v("c")) - gl("G", v("r0"), v("c"))),
        )];
        for (_, x, scaled) in &mats {
            rescale.push(st(
                scaled,
                [v("y") * i(dk) + v("c")],
                at(x, t(), v("c")) * v("e"),
            ));
        }
        block.push(for_par(
            "y",
            i(0),
            rows(),
            vec![for_("c", i(0), i(dk), rescale)],
        ));
        let mut diag = Vec::new();
        for (m, x, scaled) in &mats {
            block.push(dot(
                view(m, v("r0") * i(c_n), c_n),
                view(scaled, i(0), dk),
                view("kb", i(0), dk),
                rows(),
                v("r0"),
                dk,
                false,
            ));
            // Diagonal blocks pairwise.
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
        body.push(for_("b", i(1), (v("l") + i(SUB - 1)) / i(SUB), block));
        body.push(for_par(
            "t",
            i(0),
            v("l"),
            vec![
                let_("t0", (v("t") / i(SUB)) * i(SUB)),
                for_("x", v("t0"), v("t") + i(1), diag),
            ],
        ));
    }
    if channel {
        // M_qk's causal rows handed on; L = diag(β) M_kk.
        body.push(for_par(
            "t",
            i(0),
            v("l"),
            vec![for_(
                "x",
                i(0),
                v("t") + i(1),
                vec![st(
                    "mq",
                    [r(), v("h") * i(c_n) + v("x")],
                    ld("mqk", [v("t") * i(c_n) + v("x")]),
                )],
            )],
        ));
        if delta {
            body.push(for_par(
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
    }

    // 5. Delta rule: T = (I + L)⁻¹ (the solve reads L's strictly lower part) by forward
    //    substitution on the identity, then W = T β (k ⊙ e^G) and U = T β v as products
    //    (tensor cores on a GPU) stored straight into the handoff. Their right-hand sides are
    //    staged transposed (rows of both operands contiguous along the chunk, which the host
    //    vectorises), zero past the chunk's end (the products run over the whole chunk), in
    //    the locals whose rows are no longer read: `qs` (q is dead once M_qk is formed) takes
    //    (β k ⊙ e^G)ᵀ, then `ks` (k is dead once that is formed) takes (β v)ᵀ. This keeps the
    //    program's locals at q, k and two C × C tiles (Qwen3-Next: 100 KiB), which lets a GPU
    //    hold two programs' in a block's shared memory.
    if delta {
        body.push(for_par(
            "q",
            i(0),
            i(c_n * c_n),
            vec![st(
                "tm",
                [v("q")],
                select(eq(v("q") / i(c_n), rem(v("q"), i(c_n))), f(1.0), f(0.0)),
            )],
        ));
        body.push(trisolve(
            view("mkk", i(0), c_n),
            view("tm", i(0), c_n),
            v("l"),
            c_n,
        ));
        // Element (x, c) of a right-hand side, chunk row x (clamped into the chunk, where it
        // is read; zero past it) and column c, stored at row c of the transpose.
        let x = || v("x");
        let xc = || min(x(), last());
        let transposed = |buf: &str, width: usize, value: Expr| {
            for_par(
                "q",
                i(0),
                i(c_n * width),
                vec![
                    let_("x", v("q") / i(width)),
                    let_("c", rem(v("q"), i(width))),
                    st(
                        buf,
                        [v("c") * i(ldt) + x()],
                        select(lt(x(), v("l")), value, f(0.0)),
                    ),
                ],
            )
        };
        body.push(transposed(
            "qs",
            dk,
            ld("bt", [xc()]) * at("ks", xc(), v("c")) * exp(gl("G", xc(), v("c"))),
        ));
        body.push(transposed(
            "ks",
            dv,
            ld("bt", [xc()]) * io.conv_prefill("v", r_of(xc()), v("h") * i(dv) + v("c")),
        ));
        for (out, rhs, width) in [("w", "qs", dk), ("u", "ks", dv)] {
            body.push(mma_tiles(
                MmaKind::F32,
                v("l"),
                i(width),
                c_n,
                &|t, x| ld("tm", [t * i(c_n) + x]),
                &|c, x| ld(rhs, [c * i(ldt) + x]),
                &|t, c, acc| vec![st(out, [r_of(t), v("h") * i(width) + c], acc)],
            ));
        }
    }

    // Everything but the state, the output and its norm; then the handoff.
    let mut params: Vec<(Param, Bind)> = io
        .params
        .iter()
        .filter(|(p, _)| {
            !["state", "nw", "z", "o"].contains(&p.name.as_str())
                && (p.name != "slot" || io.conv.is_some())
        })
        .cloned()
        .collect();
    params.extend(hand.params(sh, true, cx.bf16_handoffs));
    let h_n = sh.h_n;
    let mut nodes = io.nodes.clone();
    nodes.retain(|&m| Some(m) != cx.fusion.of(n).out_norm);
    let suffix = io.suffix.trim_end_matches("_gnorm");
    launch(
        format!(
            "recurrence_{}_{}{suffix}_chunk{c_n}_h{h_n}x{}_dk{dk}_dv{dv}{}",
            update_name(rec.update),
            io.decay_name,
            sh.hk_n,
            handoff_suffix(cx),
        ),
        vec![Dim::RowBlocks(c_n), Dim::N(h_n)],
        params,
        body,
        nodes,
        cx.graph,
    )
}

/// Step 2: one program per (value head, [`SCAN_COLS`] state columns), over the chunks in
/// order. Writes the outputs to `o`, or to `raw` when a norm follows.
fn scan(
    cx: &Ctx,
    n: NodeIndex,
    io: &Operands,
    sh: &Shape,
    hand: &Handoff,
    raw: Option<Value>,
) -> Launch {
    let rec = &sh.rec;
    let (h_n, dk, dv, w, c_n) = (sh.h_n, sh.dk, sh.dv, sh.w, CHUNK);
    let bv = tile(dv, SCAN_COLS);
    let wc = |c: Expr| if sh.channel { c } else { i(0) };
    let row = |t: Expr| v("c0") + t;
    let hk = |c: Expr| v("h") * i(dk) + c;
    let hv = |jj: Expr| v("h") * i(dv) + v("j0") + jj;
    // Flattened index `q` of a `[rows, cols]` local as (r, c).
    let rc = |r: &str, c: &str, cols: usize| {
        vec![let_(r, v("q") / i(cols)), let_(c, v("q") - v(r) * i(cols))]
    };
    let with = |mut pre: Vec<Stmt>, s: Stmt| {
        pre.push(s);
        pre
    };
    let state_at = || ld("state", [v("s"), v("h"), v("j0") + v("jj"), v("c")]);

    // Per chunk, the products are f32 MMA tiles (tensor cores on a GPU) reading the chunk's
    // handoff where it lies, but for `kd` (see the state update); the state columns, `u`, the
    // output block and `kd` transposed are locals.
    let last = || v("l") - i(1);
    let mut chunk = vec![
        let_("c0", v("ci") * i(c_n)),
        let_("l", min(i(c_n), rows() - v("c0"))),
    ];
    // u = U − W S (delta rule) or U, transposed: ut[jj, x], zero past the chunk (the products
    // below run over the whole chunk).
    let u_at = |jj: Expr, x: Expr| ld("u", [row(x), hv(jj)]);
    if sh.delta {
        chunk.extend([
            mma_tiles(
                MmaKind::F32,
                i(bv),
                v("l"),
                dk,
                &|jj, c| ld("sl", [jj * i(dk) + c]),
                &|x, c| ld("w", [row(x), hk(c)]),
                &|jj, x, acc| {
                    vec![st(
                        "ut",
                        [jj.clone() * i(c_n) + x.clone()],
                        u_at(jj, x) - acc,
                    )]
                },
            ),
            for_par(
                "q",
                i(0),
                i(bv * c_n),
                with(
                    rc("jj", "x", c_n),
                    if_(ge(v("x"), v("l")), vec![st("ut", [v("q")], f(0.0))]),
                ),
            ),
        ]);
    } else {
        chunk.push(for_par(
            "q",
            i(0),
            i(bv * c_n),
            with(
                rc("jj", "x", c_n),
                st(
                    "ut",
                    [v("q")],
                    select(
                        lt(v("x"), v("l")),
                        u_at(v("jj"), min(v("x"), last())),
                        f(0.0),
                    ),
                ),
            ),
        ));
    }
    // o = (Q ⊙ e^G) S + M_qk u (M_qk's causal part; the rest of its rows is never written).
    chunk.extend([
        mma_tiles(
            MmaKind::F32,
            v("l"),
            i(bv),
            dk,
            &|t, c| ld("qg", [row(t), hk(c)]),
            &|jj, c| ld("sl", [jj * i(dk) + c]),
            &|t, jj, acc| vec![st("ol", [t * i(bv) + jj], acc)],
        ),
        mma_tiles(
            MmaKind::F32,
            v("l"),
            i(bv),
            c_n,
            &|t, x| {
                select(
                    le(x.clone(), t.clone()),
                    ld("mq", [row(t), v("h") * i(c_n) + x]),
                    f(0.0),
                )
            },
            &|jj, x| ld("ut", [jj * i(c_n) + x]),
            &|t, jj, acc| {
                vec![st(
                    "o",
                    [row(t.clone()), hv(jj.clone())],
                    ld("ol", [t * i(bv) + jj]) + acc,
                )]
            },
        ),
    ]);
    // S ← e^G_L ⊙ S + (K ⊙ e^(G_L − G))ᵀ u, as Sᵀ[jj, c] = Sᵀ[jj, c]·e^G_L[c] + Σ_x ut[jj, x]
    // kd[x, c]. `kd` is staged transposed (zero past the chunk): read in place, the sum over
    // the chunk's keys would stride across rows, which the host cannot vectorise.
    chunk.push(for_par(
        "q",
        i(0),
        i(c_n * dk),
        with(
            rc("x", "c", dk),
            st(
                "kdt",
                [v("c") * i(TRANSPOSED_LD) + v("x")],
                select(
                    lt(v("x"), v("l")),
                    ld("kd", [row(min(v("x"), last())), hk(v("c"))]),
                    f(0.0),
                ),
            ),
        ),
    ));
    chunk.push(mma_tiles(
        MmaKind::F32,
        i(bv),
        i(dk),
        c_n,
        &|jj, x| ld("ut", [jj * i(c_n) + x]),
        &|c, x| ld("kdt", [c * i(TRANSPOSED_LD) + x]),
        &|jj, c, acc| {
            let q = jj * i(dk) + c.clone();
            vec![st(
                "sl",
                [q.clone()],
                ld("sl", [q]) * ld("eg", [v("c0"), v("h") * i(w) + wc(c)]) + acc,
            )]
        },
    ));

    let body = vec![
        local("sl", bv * dk),
        local("ut", bv * c_n),
        local("ol", c_n * bv),
        local("kdt", dk * TRANSPOSED_LD),
        let_("h", pid(0)),
        let_("j0", pid(1) * i(bv)),
        let_("s", ld("slot", [i(0)])),
        // The state's columns j0.. as rows of sl (contiguous in the pool).
        for_par(
            "q",
            i(0),
            i(bv * dk),
            with(rc("jj", "c", dk), st("sl", [v("q")], state_at())),
        ),
        for_("ci", i(0), (rows() + i(c_n - 1)) / i(c_n), chunk),
        for_par(
            "q",
            i(0),
            i(bv * dk),
            with(
                rc("jj", "c", dk),
                st(
                    "state",
                    [v("s"), v("h"), v("j0") + v("jj"), v("c")],
                    ld("sl", [v("q")]),
                ),
            ),
        ),
    ];

    let mut params = pick(io, &["state", "slot"]);
    params.extend(hand.params(sh, false, cx.bf16_handoffs));
    params.push(match raw {
        Some(t) => raw_param(cx, "o", h_n * dv, t, true),
        None => pick(io, &["o"]).remove(0),
    });
    launch(
        format!(
            "recurrence_{}_{}_scan{c_n}_h{h_n}_dk{dk}_dv{dv}_bv{bv}{}",
            update_name(rec.update),
            io.decay_name,
            handoff_suffix(cx),
        ),
        vec![Dim::N(h_n), Dim::N(dv / bv)],
        params,
        body,
        vec![n],
        cx.graph,
    )
}

/// Step 3 (fused gated output norm): per (row, value head), the RMSNorm of the head's raw
/// output row times the gate.
fn out_norm(cx: &Ctx, n: NodeIndex, io: &Operands, sh: &Shape, raw: Value) -> Launch {
    let (eps, act_fn) = io.norm.expect("out_norm: a fused norm");
    let (h_n, dv) = (sh.h_n, sh.dv);
    let raw_at = || ld("raw", [v("t"), v("h") * i(dv) + v("jj")]);
    let col = || v("h") * i(dv) + v("jj");
    let body = vec![
        let_("t", pid(0)),
        let_("h", pid(1)),
        let_(
            "inv_o",
            rsqrt(sum("jj", i(0), i(dv), raw_at() * raw_at()) / f(dv as f64) + f(eps)),
        ),
        for_par(
            "jj",
            i(0),
            i(dv),
            vec![st(
                "o",
                [v("t"), col()],
                raw_at() * v("inv_o") * ld("nw", [v("jj")]) * io.norm_gate(v("t"), col()),
            )],
        ),
    ];
    let mut params = vec![raw_param(cx, "raw", h_n * dv, raw, false)];
    params.extend(pick(io, &["nw", "z", "o"]));
    launch(
        format!(
            "recurrence_out_norm_{}_h{h_n}_d{dv}{}",
            match act_fn {
                lamina_ir::graph::Unary::Sigmoid => "sigmoid",
                _ => "silu",
            },
            handoff_suffix(cx),
        ),
        vec![Dim::Rows, Dim::N(h_n)],
        params,
        body,
        cx.fusion.of(n).out_norm.into_iter().collect(),
        cx.graph,
    )
}

/// Step 4 (fused short convs): each channel's conv state after the launch's rows (the window's
/// last K−1 elements, in ascending order: each read is at or ahead of the write), per block of
/// [`CONV_CHANNELS`] channels of q, k and v.
fn conv_commit(cx: &Ctx, n: NodeIndex, io: &Operands, sh: &Shape) -> Launch {
    let kn = io.conv.expect("conv_commit: fused convs");
    let widths = [sh.hk_n * sh.dk, sh.hk_n * sh.dk, sh.h_n * sh.dv];
    let mut body = vec![
        let_("s", ld("slot", [i(0)])),
        let_("b0", pid(0) * i(CONV_CHANNELS)),
    ];
    for (x, width) in ["q", "k", "v"].into_iter().zip(widths) {
        body.push(if_(
            lt(v("b0"), i(width)),
            vec![for_par(
                "ch",
                v("b0"),
                min(v("b0") + i(CONV_CHANNELS), i(width)),
                io.conv_commit(x, v("ch")),
            )],
        ));
    }
    let blocks = widths
        .iter()
        .max()
        .copied()
        .unwrap_or(1)
        .div_ceil(CONV_CHANNELS);
    let convs = cx.fusion.of(n).conv.map(Vec::from).unwrap_or_default();
    launch(
        format!("short_conv_commit_k{kn}_q{}_v{}", widths[0], widths[2]),
        vec![Dim::N(blocks)],
        pick(io, &["q", "cq", "k", "ck", "v", "cv", "slot"]),
        body,
        convs,
        cx.graph,
    )
}
