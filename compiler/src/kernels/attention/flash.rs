//! Prefill attention, flash-attention style, for GQA and MLA.
//!
//! One program per ([`FLASH_Q`] query rows, head). The query block is staged once in a local
//! (`qt`, a row of logit width per query); the cached keys follow in tiles of [`FLASH_K`], each
//! staged in locals (`kt` key rows, `vt` values transposed, clamped to the last key, zero past
//! it). Per tile the logits `Q Kᵀ` and the update `acc += P V` are `dot` tiles (tensor cores on
//! a GPU), with the online softmax per query row in between: running max and sum, the
//! accumulator rescaled once per tile. The rows of a prefill launch are consecutive positions of
//! one sequence, so the last row sees the most keys, `pos[last] + 1`.
//!
//! GQA stages its query rows and normalises `acc / l` into the output. MLA attends in the
//! absorbed form, as decode does: the query block is `[q_nope·W_UK(h) | q_rope]` (the first part
//! a product over `q_nope` in slabs of [`FLASH_K`] columns), keys are latent cache rows
//! `[c | k_rope]` shared by every head, values their `c` part, and the latent output is mapped
//! back by `W_UV(h)`, also as slabbed products. The slabs of `W_UK` and `W_UV` are staged in the
//! value tile `vt` and the `q_nope` slabs in the logits tile `sc`, so MLA adds no scratch.

use lamina_ir::graph::{NodeIndex, StateId};
use lamina_ir::kernel::build::*;
use lamina_ir::kernel::{Dim, Expr, Stmt};

use super::{a, gqa_params, mla_params, Ctx, Launch};
use crate::kernels::{act, launch};

/// Query rows per program of a flash-style prefill attention.
pub const FLASH_Q: usize = 64;
/// Keys per tile of a flash-style prefill attention (64-key tiles spill on sm_80), and the
/// depth of MLA's slabbed weight products.
pub const FLASH_K: usize = 32;

/// One flash-attention program's shape and its operands.
struct Flash<'a> {
    /// Logit width: a staged query row (`qt`) and key row (`kt`).
    qk: usize,
    /// Value width: an accumulator row (`acc`) and a staged value column block (`vt`).
    vw: usize,
    scale: f64,
    /// Element `e` of key `j` (`j` already clamped to the last key).
    key: &'a dyn Fn(Expr, Expr) -> Expr,
    /// Element `d` of value `j`.
    value: &'a dyn Fn(Expr, Expr) -> Expr,
    /// Allocated width of `qt` and rows of `vt`, at least `qk` and `vw`: room for the caller's
    /// own staging (MLA's weight slabs and output block).
    qt_cols: usize,
    vt_rows: usize,
}

/// Row `t` of the program's block.
fn row() -> Expr {
    v("r0") + v("t")
}

impl Flash<'_> {
    /// The locals, the block's rows (`r0`, `nq` rows, slot `s`, then the caller's `lets`, then
    /// `nk` keys), and per row `t` of the block the caller's `row_init` (which stages the
    /// queries into `qt[t·qk + e]`, or starts to), the accumulator and the running statistics
    /// zeroed.
    fn prologue(&self, lets: Vec<Stmt>, row_init: Vec<Stmt>) -> Vec<Stmt> {
        let (fq, fk, vw) = (FLASH_Q, FLASH_K, self.vw);
        let mut out = vec![
            local("qt", fq * self.qt_cols),
            local("kt", fk * self.qk),
            local("vt", self.vt_rows * fk),
            local("sc", fq * fk),
            local("acc", fq * vw),
            local("m", fq),
            local("l", fq),
            let_("r0", pid(0) * i(fq)),
            let_("nq", min(i(fq), rows() - v("r0"))),
            let_("s", ld("slot", [v("r0")])),
        ];
        out.extend(lets);
        out.push(let_("nk", ld("pos", [v("r0") + v("nq") - i(1)]) + i(1)));
        let mut per_row = row_init;
        per_row.extend([
            for_(
                "d",
                i(0),
                i(vw),
                vec![st("acc", [v("t") * i(vw) + v("d")], f(0.0))],
            ),
            st("m", [v("t")], f(f64::NEG_INFINITY)),
            st("l", [v("t")], f(0.0)),
        ]);
        out.push(for_par("t", i(0), v("nq"), per_row));
        out
    }

    /// The loop over key tiles: leaves the unnormalised output in `acc[t·vw + d]` and the
    /// softmax sum in `l[t]`.
    fn tiles(&self) -> Stmt {
        let (fk, qk, vw) = (FLASH_K, self.qk, self.vw);
        let sc = |jj: Expr| ld("sc", [v("t") * i(fk) + jj]);
        // Key jj of the tile is visible to row t: position j0 + jj < pos[t] + 1.
        let visible = |jj: Expr| lt(v("j0") + jj, v("pt"));
        let softmax = vec![
            let_("pt", ld("pos", [row()]) + i(1)),
            if_(
                lt(v("j0"), v("pt")),
                vec![
                    let_(
                        "m2",
                        max(
                            ld("m", [v("t")]),
                            max_over(
                                "jj",
                                i(0),
                                min(v("nb"), v("pt") - v("j0")),
                                f(self.scale) * sc(v("jj")),
                            ),
                        ),
                    ),
                    let_("corr", exp(ld("m", [v("t")]) - v("m2"))),
                    // Probabilities; zero past the row's position and past the tile (the
                    // product below runs over the whole tile).
                    for_(
                        "jj",
                        i(0),
                        v("nb"),
                        vec![st(
                            "sc",
                            [v("t") * i(fk) + v("jj")],
                            select(
                                visible(v("jj")),
                                exp(f(self.scale) * sc(v("jj")) - v("m2")),
                                f(0.0),
                            ),
                        )],
                    ),
                    for_(
                        "jj",
                        v("nb"),
                        i(fk),
                        vec![st("sc", [v("t") * i(fk) + v("jj")], f(0.0))],
                    ),
                    st(
                        "l",
                        [v("t")],
                        ld("l", [v("t")]) * v("corr") + sum("jj", i(0), v("nb"), sc(v("jj"))),
                    ),
                    st("m", [v("t")], v("m2")),
                    for_(
                        "d",
                        i(0),
                        i(vw),
                        vec![st(
                            "acc",
                            [v("t") * i(vw) + v("d")],
                            ld("acc", [v("t") * i(vw) + v("d")]) * v("corr"),
                        )],
                    ),
                ],
            ),
            if_(
                ge(v("j0"), v("pt")),
                vec![for_(
                    "jj",
                    i(0),
                    i(fk),
                    vec![st("sc", [v("t") * i(fk) + v("jj")], f(0.0))],
                )],
            ),
        ];
        // Key jj of the tile, clamped to the last key (a select below evaluates it past the
        // tile).
        let j = || min(v("j0") + v("jj"), v("nk") - i(1));
        let tile = vec![
            let_("j0", v("jt") * i(fk)),
            let_("nb", min(i(fk), v("nk") - v("j0"))),
            for_par(
                "jj",
                i(0),
                i(fk),
                vec![
                    if_(
                        lt(v("jj"), v("nb")),
                        vec![for_(
                            "e",
                            i(0),
                            i(qk),
                            vec![st(
                                "kt",
                                [v("jj") * i(qk) + v("e")],
                                (self.key)(j(), v("e")),
                            )],
                        )],
                    ),
                    for_(
                        "d",
                        i(0),
                        i(vw),
                        vec![st(
                            "vt",
                            [v("d") * i(fk) + v("jj")],
                            select(lt(v("jj"), v("nb")), (self.value)(j(), v("d")), f(0.0)),
                        )],
                    ),
                ],
            ),
            dot(
                view("sc", i(0), fk),
                view("qt", i(0), qk),
                view("kt", i(0), qk),
                v("nq"),
                v("nb"),
                qk,
                false,
            ),
            for_par("t", i(0), v("nq"), softmax),
            dot(
                view("acc", i(0), vw),
                view("sc", i(0), fk),
                view("vt", i(0), fk),
                v("nq"),
                i(vw),
                fk,
                true,
            ),
        ];
        for_("jt", i(0), (v("nk") + i(fk - 1)) / i(fk), tile)
    }
}

/// `out (+)= A·Bᵀ` over a depth of `depth` in slabs of [`FLASH_K`]: per slab starting at `k0`,
/// `stage(k0, width)` stages the slab's operands and `product(k0, width)` multiplies them
/// (accumulating); a loop over the whole slabs, then the ragged last one unrolled.
fn slabs(
    depth: usize,
    stage: &dyn Fn(Expr, usize) -> Vec<Stmt>,
    product: &dyn Fn(Expr, usize) -> Stmt,
) -> Vec<Stmt> {
    let (whole, rest) = (depth / FLASH_K, depth % FLASH_K);
    let mut out = Vec::new();
    if whole > 0 {
        let k0 = || v("ks") * i(FLASH_K);
        let mut body = stage(k0(), FLASH_K);
        body.push(product(k0(), FLASH_K));
        out.push(for_("ks", i(0), i(whole), body));
    }
    if rest > 0 {
        let k0 = i(whole * FLASH_K);
        out.extend(stage(k0.clone(), rest));
        out.push(product(k0, rest));
    }
    out
}

/// GQA prefill: one flash program per (64 query rows, head), keys and values from the
/// `[slot, pos, k | v]` cache of the head's KV group.
pub(super) fn gqa(
    cx: &Ctx,
    n: NodeIndex,
    ins: &[NodeIndex],
    (hq, hkv, hd, vd): (usize, usize, usize, usize),
    scale: f64,
    cache: StateId,
) -> Launch {
    let kw = hkv * hd;
    let key = |j: Expr, e: Expr| ld("cache", [v("s"), j, v("kvh") * i(hd) + e]);
    let value = |j: Expr, d: Expr| ld("cache", [v("s"), j, i(kw) + v("kvh") * i(vd) + d]);
    let fl = Flash {
        qk: hd,
        vw: vd,
        scale,
        key: &key,
        value: &value,
        qt_cols: hd,
        vt_rows: vd,
    };
    let stage_q = for_(
        "e",
        i(0),
        i(hd),
        vec![st(
            "qt",
            [v("t") * i(hd) + v("e")],
            ld("q", [row(), pid(1) * i(hd) + v("e")]),
        )],
    );
    let mut body = fl.prologue(vec![let_("kvh", pid(1) / i(hq / hkv))], vec![stage_q]);
    body.extend([
        fl.tiles(),
        for_par(
            "t",
            i(0),
            v("nq"),
            vec![for_(
                "d",
                i(0),
                i(vd),
                vec![st(
                    "o",
                    [row(), pid(1) * i(vd) + v("d")],
                    ld("acc", [v("t") * i(vd) + v("d")]) / ld("l", [v("t")]),
                )],
            )],
        ),
    ]);
    launch(
        format!(
            "gqa_flash_h{hq}x{hkv}_d{hd}_v{vd}_q{}_k{}",
            FLASH_Q, FLASH_K
        ),
        vec![Dim::RowBlocks(FLASH_Q), Dim::N(hq)],
        gqa_params(cx, ins, hq * hd, cache, (output("o", &act(hq * vd)), a(n))),
        body,
        vec![n],
        cx.graph,
    )
}

/// The shape of an absorbed MLA attention.
pub(super) struct MlaShape {
    pub heads: usize,
    /// `kv_lora_rank`: the latent width, of keys (with the rope part) and values.
    pub rank: usize,
    pub nope: usize,
    pub rope: usize,
    pub v_dim: usize,
}

/// MLA prefill in the absorbed form: one flash program per (64 query rows, head) over the
/// latent cache `[slot, pos, c | k_rope]`, with `W_UK(h)` folded into the queries and `W_UV(h)`
/// applied to the latent output, both as slabbed `dot` products.
pub(super) fn mla(
    cx: &Ctx,
    n: NodeIndex,
    ins: &[NodeIndex],
    sh: &MlaShape,
    scale: f64,
    kv_b: &str,
    cache: StateId,
) -> Launch {
    let (fk, r, dn, dr, vd) = (FLASH_K, sh.rank, sh.nope, sh.rope, sh.v_dim);
    let (qk, qw) = (r + dr, dn + dr);
    // Row `d` of head h's W_UK (d < dn) or W_UV (dn ≤ d), `r` wide.
    let wrow = |d: Expr| pid(1) * i(dn + vd) + d;
    let key = |j: Expr, e: Expr| ld("cache", [v("s"), j, e]);
    let value = |j: Expr, d: Expr| ld("cache", [v("s"), j, d]);
    let fl = Flash {
        qk,
        vw: r,
        scale,
        key: &key,
        value: &value,
        qt_cols: qk.max(vd),
        vt_rows: r.max(vd),
    };
    // Columns `lo..hi` of row `t`.
    let cols = |lo: usize, hi: usize, body: &dyn Fn(Expr) -> Stmt| {
        for_("e", i(lo), i(hi), vec![body(v("e"))])
    };
    let per_row = |lo: usize, hi: usize, body: &dyn Fn(Expr) -> Stmt| {
        for_par("t", i(0), v("nq"), vec![cols(lo, hi, body)])
    };
    // The query block: [0 | q_rope], then q̃ = q_nope·W_UK(h) accumulated into its first r
    // columns slab by slab (q_nope's slab in `sc`, W_UK's rows transposed into `vt`).
    let row_init = vec![
        cols(0, r, &|e| st("qt", [v("t") * i(qk) + e], f(0.0))),
        cols(r, qk, &|e| {
            st(
                "qt",
                [v("t") * i(qk) + e.clone()],
                ld("q", [row(), pid(1) * i(qw) + i(dn) + e - i(r)]),
            )
        }),
    ];
    let mut body = fl.prologue(vec![], row_init);
    let stage_q = |k0: Expr, w: usize| {
        vec![
            per_row(0, w, &|d| {
                st(
                    "sc",
                    [v("t") * i(fk) + d.clone()],
                    ld("q", [row(), pid(1) * i(qw) + k0.clone() + d]),
                )
            }),
            for_par(
                "c",
                i(0),
                i(r),
                vec![for_(
                    "d",
                    i(0),
                    i(w),
                    vec![st(
                        "vt",
                        [v("c") * i(fk) + v("d")],
                        ld("kv_b", [wrow(k0.clone() + v("d")), v("c")]),
                    )],
                )],
            ),
        ]
    };
    let absorb_q = |_: Expr, w: usize| {
        dot(
            view("qt", i(0), qk),
            view("sc", i(0), fk),
            view("vt", i(0), fk),
            v("nq"),
            i(r),
            w,
            true,
        )
    };
    body.extend(slabs(dn, &stage_q, &absorb_q));
    body.push(fl.tiles());
    // o = W_UV(h)·acc / l: the product into `qt` (now free, `vd` wide), W_UV's rows staged in
    // `vt` slab by slab of the latent width.
    body.push(per_row(0, vd, &|d| st("qt", [v("t") * i(vd) + d], f(0.0))));
    let stage_o = |k0: Expr, w: usize| {
        vec![for_par(
            "d",
            i(0),
            i(vd),
            vec![for_(
                "c",
                i(0),
                i(w),
                vec![st(
                    "vt",
                    [v("d") * i(fk) + v("c")],
                    ld("kv_b", [wrow(i(dn) + v("d")), k0.clone() + v("c")]),
                )],
            )],
        )]
    };
    let unabsorb = |k0: Expr, w: usize| {
        dot(
            view("qt", i(0), vd),
            view("acc", k0, r),
            view("vt", i(0), fk),
            v("nq"),
            i(vd),
            w,
            true,
        )
    };
    body.extend(slabs(r, &stage_o, &unabsorb));
    body.push(per_row(0, vd, &|d| {
        st(
            "o",
            [row(), pid(1) * i(vd) + d.clone()],
            ld("qt", [v("t") * i(vd) + d]) / ld("l", [v("t")]),
        )
    }));
    let h = sh.heads;
    launch(
        format!(
            "mla_flash_h{h}_r{r}_nope{dn}_rope{dr}_v{vd}_q{}_k{fk}",
            FLASH_Q
        ),
        vec![Dim::RowBlocks(FLASH_Q), Dim::N(h)],
        mla_params(
            cx,
            ins,
            h * qw,
            kv_b,
            cache,
            (output("o", &act(h * vd)), a(n)),
        ),
        body,
        vec![n],
        cx.graph,
    )
}
