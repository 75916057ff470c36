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
//! right-hand sides staged transposed, [`RHS_COLS`] columns at a time) are MMA tiles whose
//! epilogues store the handoff directly, and the scan's products per chunk are MMA tiles reading
//! the handoff where it lies, but for `k ⊙ e^(G_L − G)`, staged transposed so that the host
//! can vectorise the state update's sum over the chunk (the state columns, `u`, the output
//! block and that copy are per-program locals: in a GPU's shared memory where they fit,
//! `lamina_targets::nvptx::warp_layout`).
//!
//! Per-channel decay cannot be factored out of the products. Within a diagonal sub-chunk the
//! factors are formed pairwise; across sub-chunks both sides are rescaled against the query
//! row's sub-chunk start `r`: `e^(G_t − r) e^(r − G_s)`, each exponent ≤ 0 (no overflow).
//!
//! The chunk program's buffers share locals where their lifetimes do not overlap (`Part`), so
//! that two programs' locals fit a GPU block's shared memory: Kimi-Linear's 108.25 KiB,
//! Qwen3-Next's 64.5 KiB, MiniMax's 64 KiB.

use lamina_ir::graph::{Decay, NodeIndex, Op, Recurrence, Update};
use lamina_ir::kernel::build::*;
use lamina_ir::kernel::{Dim, Elem, Expr, MmaKind, Param, Stmt, View};

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

/// Columns of a product's right-hand side staged (transposed) at a time: one MMA tile's width.
const RHS_COLS: usize = lamina_ir::kernel::expand::DOT_TILE;

/// Where one of the chunk program's buffers lives: element `at` of local `local`. Buffers whose
/// lifetimes do not overlap share a local, declared at the largest size its uses need: that is
/// what keeps a program's locals small enough for two to share a GPU block's shared memory.
#[derive(Clone, Copy)]
struct Part {
    local: &'static str,
    at: usize,
}

impl Part {
    const fn of(local: &'static str, at: usize) -> Part {
        Part { local, at }
    }

    fn idx(self, idx: Expr) -> Expr {
        if self.at == 0 {
            idx
        } else {
            i(self.at) + idx
        }
    }

    fn ld(self, idx: Expr) -> Expr {
        ld(self.local, [self.idx(idx)])
    }

    fn st(self, idx: Expr, value: Expr) -> Stmt {
        st(self.local, [self.idx(idx)], value)
    }

    fn view(self, off: Expr, ld: usize) -> View {
        view(self.local, self.idx(off), ld)
    }
}

/// Step 1: one program per (chunk, value head).
///
/// Its buffers, by lifetime (`Part`s of fewer locals; Kimi-Linear's sizes, dk = dv = 128):
/// - `ks` (32 KiB), the chunk's keys, and `G` (32 KiB per channel, 256 B per head), the
///   cumulative log-decay: read until the products' right-hand sides are formed;
/// - scalar decay: `qs` (32 KiB), the queries until `M_qk` is formed, then `M_kk` and `T`
///   side by side, then the right-hand-side blocks where `M_kk` was;
/// - per-channel decay: the queries are loaded a sub-chunk at a time (`M_qk` rows are
///   formed and handed on per sub-chunk), so `sub` holds that sub-chunk's rescaled rows of q
///   and k (16 KiB), then `T`; `blk` the rescaled keys of one earlier sub-chunk and the
///   sub-chunk's `M_qk` rows (12 KiB), then the right-hand-side blocks; `mkk` (16 KiB) is
///   built across the sub-chunks.
///
/// Kimi-Linear's program holds 108 KiB, Qwen3-Next's 64.5 KiB.
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
    let ldt = TRANSPOSED_LD;
    let rhs_len = RHS_COLS * ldt;

    let ks = Part::of("ks", 0);
    let (mkk, tm, rhs) = if channel {
        (Part::of("mkk", 0), Part::of("sub", 0), Part::of("blk", 0))
    } else {
        (
            Part::of("qs", 0),
            Part::of("qs", c_n * c_n),
            Part::of("qs", 0),
        )
    };
    // Per-channel decay: a sub-chunk's rescaled query and key rows, the rescaled keys of one
    // earlier sub-chunk, and the sub-chunk's M_qk rows.
    let (qt, kt) = (Part::of("sub", 0), Part::of("sub", SUB * dk));
    let (kb, mqr) = (Part::of("blk", 0), Part::of("blk", SUB * dk));

    let mut body = vec![local("ks", c_n * dk), local("G", c_n * w)];
    if channel {
        let sub = if delta {
            (2 * SUB * dk).max(c_n * c_n)
        } else {
            SUB * dk
        };
        let blk = (SUB * (dk + c_n)).max(if delta { rhs_len } else { 0 });
        body.extend([local("sub", sub), local("blk", blk)]);
        if delta {
            body.push(local("mkk", c_n * c_n));
        }
    } else {
        let qs = (c_n * dk).max(if delta { 2 * c_n * c_n } else { 0 });
        body.push(local("qs", qs));
    }
    if delta {
        body.push(local("bt", c_n));
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

    // 1. The chunk's k and (scalar decay) q of the key head, scaled, convolved and
    //    L2-normalised when fused: tokens are independent, so the lanes of a warp take one
    //    each. Token `t`'s row of `buf` into row `y` of `dst`.
    let load = |buf: &str, dst: Part, y: Expr, t: Expr| {
        let (eps, scale) = if buf == "q" {
            (io.l2_q, rec.scale)
        } else {
            (io.l2_k, 1.0)
        };
        let at = |c: Expr| dst.ld(y.clone() * i(dk) + c);
        let mut s = vec![for_(
            "c",
            i(0),
            i(dk),
            vec![dst.st(
                y.clone() * i(dk) + v("c"),
                io.conv_prefill(buf, r_of(t.clone()), v("kh") * i(dk) + v("c")),
            )],
        )];
        let mut scale_by = if scale != 1.0 { Some(f(scale)) } else { None };
        if let Some(e) = eps {
            let inv = format!("inv_{buf}");
            s.push(let_(
                &inv,
                rsqrt(sum("c", i(0), i(dk), at(v("c")) * at(v("c"))) + f(e)),
            ));
            scale_by = Some(match scale_by {
                Some(sc) => v(&inv) * sc,
                None => v(&inv),
            });
        }
        if let Some(sc) = scale_by {
            s.push(for_(
                "c",
                i(0),
                i(dk),
                vec![dst.st(y.clone() * i(dk) + v("c"), at(v("c")) * sc)],
            ));
        }
        s
    };
    let mut rows_in = load("k", ks, v("t"), v("t"));
    if !channel {
        rows_in.extend(load("q", Part::of("qs", 0), v("t"), v("t")));
    }
    body.push(for_par("t", i(0), v("l"), rows_in));

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

    // 3. Handed on: e^G_L (in the chunk's first row), k ⊙ e^(G_L − G), q ⊙ e^G (per-channel
    //    decay: in step 4, as each sub-chunk's queries are loaded); without the delta rule
    //    U = v.
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
    let mut decayed = vec![st(
        "kd",
        [r(), hc()],
        at("ks", v("t"), v("c")) * exp(gl("G", last(), v("c")) - gl("G", v("t"), v("c"))),
    )];
    if !channel {
        decayed.push(st(
            "qg",
            [r(), hc()],
            at("qs", v("t"), v("c")) * exp(gl("G", v("t"), v("c"))),
        ));
    }
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

    // 4. The decay-weighted products M_qk (s ≤ t, handed on) and, for the delta rule, M_kk
    //    (s < t, kept as L = diag(β) M_kk).
    if !channel {
        // M = (X Kᵀ) ⊙ e^(G_t − G_s) on the causal part, in the products' epilogues;
        // `store(t, s, m)` writes the kept elements. M_kk goes where q was.
        let causal =
            |x: &str, keep: fn(Expr, Expr) -> Expr, store: &dyn Fn(Expr, Expr, Expr) -> Stmt| {
                mma_tiles(
                    MmaKind::F32,
                    cx.tiling,
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
                mkk.st(t.clone() * i(c_n) + s, ld("bt", [t]) * m)
            }));
        }
    } else {
        body.push(for_(
            "b",
            i(0),
            (v("l") + i(SUB - 1)) / i(SUB),
            channel_block(sh, &load, [qt, kt, kb, mqr, mkk]),
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
                    vec![mkk.st(
                        v("t") * i(c_n) + v("x"),
                        ld("bt", [v("t")]) * mkk.ld(v("t") * i(c_n) + v("x")),
                    )],
                )],
            ));
        }
    }

    // 5. Delta rule: T = (I + L)⁻¹ (the solve reads L's strictly lower part) by forward
    //    substitution on the identity, then W = T β (k ⊙ e^G) and U = T β v as products
    //    (tensor cores on a GPU) stored straight into the handoff, [`RHS_COLS`] columns at a
    //    time: each block of a right-hand side is staged transposed (rows of both operands
    //    contiguous along the chunk, which the host vectorises) and zero past the chunk's end
    //    (the products run over the whole chunk), where M_kk was (scalar decay) or in `blk`.
    if delta {
        body.push(for_par(
            "q",
            i(0),
            i(c_n * c_n),
            vec![tm.st(
                v("q"),
                select(eq(v("q") / i(c_n), rem(v("q"), i(c_n))), f(1.0), f(0.0)),
            )],
        ));
        // `l` is at most a chunk: the bound tells the expansion that M_kk and T, one local
        // apart with scalar decay, do not overlap (so the columns are solved in parallel).
        body.push(trisolve(
            mkk.view(i(0), c_n),
            tm.view(i(0), c_n),
            min(i(c_n), v("l")),
            c_n,
        ));
        // Element (x, col) of a right-hand side, chunk row x (clamped into the chunk, where it
        // is read; zero past it), stored at row col − cb·RHS_COLS of the block.
        let xc = || min(v("x"), last());
        let col = || v("cb") * i(RHS_COLS) + v("c");
        let w_rhs = ld("bt", [xc()]) * at("ks", xc(), col()) * exp(gl("G", xc(), col()));
        let u_rhs = ld("bt", [xc()]) * io.conv_prefill("v", r_of(xc()), v("h") * i(dv) + col());
        for (out, width, value) in [("w", dk, w_rhs), ("u", dv, u_rhs)] {
            let mut stage = vec![
                let_("x", v("q") / i(RHS_COLS)),
                let_("c", rem(v("q"), i(RHS_COLS))),
            ];
            let store = rhs.st(
                v("c") * i(ldt) + v("x"),
                select(lt(v("x"), v("l")), value, f(0.0)),
            );
            stage.push(if width % RHS_COLS == 0 {
                store
            } else {
                if_(lt(col(), i(width)), vec![store])
            });
            let product = mma_tiles(
                MmaKind::F32,
                cx.tiling,
                v("l"),
                min(i(RHS_COLS), i(width) - v("cb") * i(RHS_COLS)),
                c_n,
                &|t, x| tm.ld(t * i(c_n) + x),
                &|c, x| rhs.ld(c * i(ldt) + x),
                &|t, c, acc| {
                    vec![st(
                        out,
                        [r_of(t), v("h") * i(width) + v("cb") * i(RHS_COLS) + c],
                        acc,
                    )]
                },
            );
            body.push(for_(
                "cb",
                i(0),
                i(width.div_ceil(RHS_COLS)),
                vec![for_par("q", i(0), i(c_n * RHS_COLS), stage), product],
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

/// Step 4 of [`chunks`] with per-channel decay, which cannot be factored out of the products:
/// the body of the loop over the chunk's sub-chunks `b` (rows `r0 .. r0 + SUB`), forming
/// their rows of `M_qk` (handed on) and of `M_kk` (kept in `mkk`):
/// - the sub-chunk's queries are loaded into `qt`, and `q ⊙ e^G` handed on;
/// - the diagonal block pairwise, `Σ_c q_tc k_sc e^(G_tc − G_sc)` for `s ≤ t` in the
///   sub-chunk (and `k_t` likewise, `s < t`, sharing the factors);
/// - the off-diagonal blocks against each earlier sub-chunk `a`: the rows rescaled against the
///   sub-chunk's start, `qt[y] = q_(r0+y) ⊙ e^(G_(r0+y) − G_r0)` (in place; `kt` likewise),
///   the keys of sub-chunk `a` against the same start, `kb[x] = k_s ⊙ e^(G_r0 − G_s)` (`s`
///   = `a·SUB + x < r0`), then one dot per matrix. Every exponent is ≤ 0 (no overflow).
fn channel_block(
    sh: &Shape,
    load: &dyn Fn(&str, Part, Expr, Expr) -> Vec<Stmt>,
    [qt, kt, kb, mqr, mkk]: [Part; 5],
) -> Vec<Stmt> {
    let (dk, c_n, delta) = (sh.dk, CHUNK, sh.delta);
    let g = |t: Expr, c: Expr| ld("G", [t * i(dk) + c]);
    let k = |t: Expr, c: Expr| ld("ks", [t * i(dk) + c]);
    let t = || v("r0") + v("y");
    let rows = || min(i(SUB), v("l") - v("r0"));
    let mut block = vec![let_("r0", v("b") * i(SUB))];

    let mut queries = load("q", qt, v("y"), t());
    queries.push(for_(
        "c",
        i(0),
        i(dk),
        vec![st(
            "qg",
            [v("c0") + t(), v("h") * i(dk) + v("c")],
            qt.ld(v("y") * i(dk) + v("c")) * exp(g(t(), v("c"))),
        )],
    ));
    block.push(for_par("y", i(0), rows(), queries));

    // The diagonal block, a pair (y, x) of its rows per iteration.
    let s = || v("r0") + v("x");
    let e = || exp(g(t(), v("c")) - g(s(), v("c")));
    let q_at = || qt.ld(v("y") * i(dk) + v("c"));
    let mq_at = mqr.idx(v("y") * i(c_n) + s());
    let mut pair = vec![let_("y", v("p") / i(SUB)), let_("x", rem(v("p"), i(SUB)))];
    let kept = if delta {
        vec![
            for_carry(
                "c",
                i(0),
                i(dk),
                vec![("aq", f(0.0)), ("ak", f(0.0))],
                vec![let_("ks_e", k(s(), v("c")) * e())],
                vec![
                    v("aq") + q_at() * v("ks_e"),
                    v("ak") + k(t(), v("c")) * v("ks_e"),
                ],
            ),
            st(mqr.local, [mq_at], v("aq")),
            if_(
                lt(v("x"), v("y")),
                vec![mkk.st(t() * i(c_n) + s(), v("ak"))],
            ),
        ]
    } else {
        vec![st(
            mqr.local,
            [mq_at],
            sum("c", i(0), i(dk), q_at() * k(s(), v("c")) * e()),
        )]
    };
    pair.push(if_(lt(v("y"), rows()), vec![if_(le(v("x"), v("y")), kept)]));
    block.push(for_par("p", i(0), i(SUB * SUB), pair));

    // The rows rescaled against the sub-chunk's start.
    let mut rescale = vec![
        let_("e", exp(g(t(), v("c")) - g(v("r0"), v("c")))),
        qt.st(v("y") * i(dk) + v("c"), q_at() * v("e")),
    ];
    if delta {
        rescale.push(kt.st(v("y") * i(dk) + v("c"), k(t(), v("c")) * v("e")));
    }
    block.push(for_par(
        "y",
        i(0),
        rows(),
        vec![for_("c", i(0), i(dk), rescale)],
    ));

    // Against each earlier sub-chunk.
    let a0 = || v("a") * i(SUB);
    let mut earlier = vec![for_par(
        "x",
        i(0),
        i(SUB),
        vec![for_(
            "c",
            i(0),
            i(dk),
            vec![kb.st(
                v("x") * i(dk) + v("c"),
                k(a0() + v("x"), v("c")) * exp(g(v("r0"), v("c")) - g(a0() + v("x"), v("c"))),
            )],
        )],
    )];
    earlier.push(dot(
        mqr.view(a0(), c_n),
        qt.view(i(0), dk),
        kb.view(i(0), dk),
        rows(),
        i(SUB),
        dk,
        false,
    ));
    if delta {
        earlier.push(dot(
            mkk.view(v("r0") * i(c_n) + a0(), c_n),
            kt.view(i(0), dk),
            kb.view(i(0), dk),
            rows(),
            i(SUB),
            dk,
            false,
        ));
    }
    block.push(for_("a", i(0), v("b"), earlier));

    // The sub-chunk's causal rows of M_qk handed on.
    block.push(for_par(
        "y",
        i(0),
        rows(),
        vec![for_(
            "x",
            i(0),
            t() + i(1),
            vec![st(
                "mq",
                [v("c0") + t(), v("h") * i(c_n) + v("x")],
                mqr.ld(v("y") * i(c_n) + v("x")),
            )],
        )],
    ));
    block
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
    // below run over the whole chunk). Every product has the chunk's rows or the key width
    // as its rows and the state columns as its columns: 64-row warpgroup tiles on sm_90a.
    let u_at = |jj: Expr, x: Expr| ld("u", [row(x), hv(jj)]);
    if sh.delta {
        chunk.extend([
            mma_tiles(
                MmaKind::F32,
                cx.tiling,
                v("l"),
                i(bv),
                dk,
                &|x, c| ld("w", [row(x), hk(c)]),
                &|jj, c| ld("sl", [jj * i(dk) + c]),
                &|x, jj, acc| {
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
            cx.tiling,
            v("l"),
            i(bv),
            dk,
            &|t, c| ld("qg", [row(t), hk(c)]),
            &|jj, c| ld("sl", [jj * i(dk) + c]),
            &|t, jj, acc| vec![st("ol", [t * i(bv) + jj], acc)],
        ),
        mma_tiles(
            MmaKind::F32,
            cx.tiling,
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
        cx.tiling,
        i(dk),
        i(bv),
        c_n,
        &|c, x| ld("kdt", [c * i(TRANSPOSED_LD) + x]),
        &|jj, x| ld("ut", [jj * i(c_n) + x]),
        &|c, jj, acc| {
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
