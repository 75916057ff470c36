//! Prefill attention, flash-attention style, for GQA and MLA; and MLA decode.
//!
//! One program per ([`FLASH_Q`] query rows, head). The cached keys follow in tiles of
//! [`FLASH_K`]. Per tile the logits `Q Kᵀ` and the update `acc = corr·acc + P V` are f32 MMA
//! tiles ([`mma_tiles`]: 3xTF32 on a GPU's tensor cores) whose operands are read where they
//! lie: the queries from `q` (GQA) or the program's query block (MLA), keys and values from
//! the cache. Only the tile's logits and probabilities (`sc`), the accumulator and the
//! per-row softmax statistics are locals. Between the two products, the online softmax per
//! query row: running max `m` and sum `l`, and the correction `corr` the update applies to the
//! accumulator. The rows of a prefill launch are consecutive positions of one sequence, so the
//! last row sees the most keys, `pos[last] + 1`.
//!
//! MLA decode ([`mla_decode`]) is the same loop with a group of query heads of one decode row
//! as the block's rows, so its products run on tensor cores too (FlashMLA's design).
//!
//! GQA normalises `acc / l` into the output. MLA attends in the absorbed form, as decode does:
//! the query block is `[q_nope·W_UK(h) | q_rope]` (a product straight from `q` and `kv_b`),
//! keys are latent cache rows `[c | k_rope]` shared by every head, values their `c` part, and
//! the output is `W_UV(h)·acc / l`, a product from the accumulator and `kv_b` stored straight
//! into `o`.

use lamina_ir::graph::{NodeIndex, StateId};
use lamina_ir::kernel::build::*;
use lamina_ir::kernel::{Dim, Expr, MmaKind, Stmt};

use super::{a, gqa_params, mla_params, Ctx, Launch};
use crate::kernels::{act, launch};

/// Query rows per program of a flash-style prefill attention.
pub const FLASH_Q: usize = 64;
/// Keys per tile of a flash-style attention (64-key tiles spill on sm_80).
pub const FLASH_K: usize = 32;
// Split decode counts its pieces in tiles of the decode attention's width.
const _: () = assert!(FLASH_K == super::BK);

/// One flash-attention program's shape and its operands.
struct Flash<'a> {
    /// Rows of the program's block: query rows (prefill) or query heads (MLA decode).
    rows: usize,
    /// Logit width: a query row and a key row.
    qk: usize,
    /// Value width: an accumulator row.
    vw: usize,
    scale: f64,
    /// Element `e` of the block's query row `t`.
    query: &'a dyn Fn(Expr, Expr) -> Expr,
    /// Element `e` of key `j` (`j` < `nk`).
    key: &'a dyn Fn(Expr, Expr) -> Expr,
    /// Element `d` of value `j` (`j` < `nk`).
    value: &'a dyn Fn(Expr, Expr) -> Expr,
    /// How many keys block row `t` sees: positions `0..sees(t)`.
    sees: &'a dyn Fn(Expr) -> Expr,
}

/// Prefill: block row `t` (position `pos[r0 + t]`) sees the keys up to its own position.
fn causal(t: Expr) -> Expr {
    ld("pos", [row(t)]) + i(1)
}

/// Row `t` of the program's block.
fn row(t: Expr) -> Expr {
    v("r0") + t
}

impl Flash<'_> {
    /// The locals: the tile's logits and probabilities `sc`, the accumulator `acc`, the
    /// running max `m` and sum `l` and the tile's correction `corr` per block row.
    fn locals(&self) -> Vec<Stmt> {
        let (rows, fk, vw) = (self.rows, FLASH_K, self.vw);
        vec![
            local("sc", rows * fk),
            local("acc", rows * vw),
            local("m", rows),
            local("l", rows),
            local("corr", rows),
        ]
    }

    /// Per row `t < nq` of the block, the accumulator and the running statistics zeroed.
    fn zero(&self) -> Stmt {
        let vw = self.vw;
        for_par(
            "t",
            i(0),
            v("nq"),
            vec![
                for_(
                    "d",
                    i(0),
                    i(vw),
                    vec![st("acc", [v("t") * i(vw) + v("d")], f(0.0))],
                ),
                st("m", [v("t")], f(f64::NEG_INFINITY)),
                st("l", [v("t")], f(0.0)),
            ],
        )
    }

    /// Prefill: the locals, the block's rows (`r0`, `nq` rows, slot `s`, then the caller's
    /// `lets`, then `nk` keys), and the accumulators zeroed.
    fn prologue(&self, lets: Vec<Stmt>) -> Vec<Stmt> {
        let fq = FLASH_Q;
        let mut out = self.locals();
        out.extend([
            let_("r0", pid(0) * i(fq)),
            let_("nq", min(i(fq), rows() - v("r0"))),
            let_("s", ld("slot", [v("r0")])),
        ]);
        out.extend(lets);
        out.push(let_("nk", ld("pos", [v("r0") + v("nq") - i(1)]) + i(1)));
        out.push(self.zero());
        out
    }

    /// Every key tile, `0..⌈nk / FLASH_K⌉`.
    fn tiles(&self) -> Stmt {
        self.tiles_in(i(0), (v("nk") + i(FLASH_K - 1)) / i(FLASH_K))
    }

    /// The loop over key tiles `first..end`: leaves the unnormalised output in
    /// `acc[t·vw + d]` and the softmax sum in `l[t]`.
    fn tiles_in(&self, first: Expr, end: Expr) -> Stmt {
        let (fk, qk, vw) = (FLASH_K, self.qk, self.vw);
        let sc = |jj: Expr| ld("sc", [v("t") * i(fk) + jj]);
        let zero_sc = |lo: Expr| {
            for_(
                "jj",
                lo,
                i(fk),
                vec![st("sc", [v("t") * i(fk) + v("jj")], f(0.0))],
            )
        };
        // Key jj of the tile is visible to row t: position j0 + jj < pos[t] + 1.
        let visible = |jj: Expr| lt(v("j0") + jj, v("pt"));
        let softmax = vec![
            let_("pt", (self.sees)(v("t"))),
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
                    let_("c", exp(ld("m", [v("t")]) - v("m2"))),
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
                    zero_sc(v("nb")),
                    st(
                        "l",
                        [v("t")],
                        ld("l", [v("t")]) * v("c") + sum("jj", i(0), v("nb"), sc(v("jj"))),
                    ),
                    st("m", [v("t")], v("m2")),
                    st("corr", [v("t")], v("c")),
                ],
            ),
            // No key of the tile is visible: the update adds nothing.
            if_(
                ge(v("j0"), v("pt")),
                vec![zero_sc(i(0)), st("corr", [v("t")], f(1.0))],
            ),
        ];
        let tile = vec![
            let_("j0", v("jt") * i(fk)),
            let_("nb", min(i(fk), v("nk") - v("j0"))),
            mma_tiles(
                MmaKind::F32,
                v("nq"),
                v("nb"),
                qk,
                self.query,
                &|c, e| (self.key)(v("j0") + c, e),
                &|t, c, acc| vec![st("sc", [t * i(fk) + c], acc)],
            ),
            for_par("t", i(0), v("nq"), softmax),
            // Keys past the tile's last are clamped to it (their probabilities are zero).
            mma_tiles(
                MmaKind::F32,
                v("nq"),
                i(vw),
                fk,
                &|t, jj| ld("sc", [t * i(fk) + jj]),
                &|d, jj| (self.value)(min(v("j0") + jj, v("nk") - i(1)), d),
                &|t, d, acc| {
                    let at = t.clone() * i(vw) + d;
                    vec![st(
                        "acc",
                        [at.clone()],
                        ld("acc", [at]) * ld("corr", [t]) + acc,
                    )]
                },
            ),
        ];
        for_("jt", first, end, tile)
    }
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
    let query = |t: Expr, e: Expr| ld("q", [row(t), pid(1) * i(hd) + e]);
    let key = |j: Expr, e: Expr| ld("cache", [v("s"), j, v("kvh") * i(hd) + e]);
    let value = |j: Expr, d: Expr| ld("cache", [v("s"), j, i(kw) + v("kvh") * i(vd) + d]);
    let fl = Flash {
        rows: FLASH_Q,
        qk: hd,
        vw: vd,
        scale,
        query: &query,
        key: &key,
        value: &value,
        sees: &causal,
    };
    let mut body = fl.prologue(vec![let_("kvh", pid(1) / i(hq / hkv))]);
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
                    [row(v("t")), pid(1) * i(vd) + v("d")],
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
/// applied to the latent output, both as MMA tiles reading `kv_b` in place.
pub(super) fn mla(
    cx: &Ctx,
    n: NodeIndex,
    ins: &[NodeIndex],
    sh: &MlaShape,
    scale: f64,
    kv_b: &str,
    cache: StateId,
) -> Launch {
    let (r, dn, dr, vd) = (sh.rank, sh.nope, sh.rope, sh.v_dim);
    let (qk, qw) = (r + dr, dn + dr);
    // Row `d` of head h's W_UK (d < dn) or W_UV (dn ≤ d), `r` wide.
    let wrow = |d: Expr| pid(1) * i(dn + vd) + d;
    // Column `e` of the head's q (q_nope then q_rope) for block row `t`.
    let q = |t: Expr, e: Expr| ld("q", [row(t), pid(1) * i(qw) + e]);
    let query = |t: Expr, e: Expr| ld("qt", [t * i(qk) + e]);
    let key = |j: Expr, e: Expr| ld("cache", [v("s"), j, e]);
    let value = |j: Expr, d: Expr| ld("cache", [v("s"), j, d]);
    let fl = Flash {
        rows: FLASH_Q,
        qk,
        vw: r,
        scale,
        query: &query,
        key: &key,
        value: &value,
        sees: &causal,
    };
    let mut body = vec![local("qt", FLASH_Q * qk)];
    body.extend(fl.prologue(vec![]));
    // The query block: q̃ = q_nope·W_UK(h) in its first r columns, q_rope after them.
    body.extend([
        mma_tiles(
            MmaKind::F32,
            v("nq"),
            i(r),
            dn,
            &q,
            &|c, d| ld("kv_b", [wrow(d), c]),
            &|t, c, acc| vec![st("qt", [t * i(qk) + c], acc)],
        ),
        for_par(
            "t",
            i(0),
            v("nq"),
            vec![for_(
                "e",
                i(0),
                i(dr),
                vec![st(
                    "qt",
                    [v("t") * i(qk) + i(r) + v("e")],
                    q(v("t"), i(dn) + v("e")),
                )],
            )],
        ),
        fl.tiles(),
        // o = W_UV(h)·acc / l.
        mma_tiles(
            MmaKind::F32,
            v("nq"),
            i(vd),
            r,
            &|t, c| ld("acc", [t * i(r) + c]),
            &|d, c| ld("kv_b", [wrow(i(dn) + d), c]),
            &|t, d, acc| {
                vec![st(
                    "o",
                    [row(t.clone()), pid(1) * i(vd) + d],
                    acc / ld("l", [t]),
                )]
            },
        ),
    ]);
    let h = sh.heads;
    launch(
        format!(
            "mla_flash_h{h}_r{r}_nope{dn}_rope{dr}_v{vd}_q{}_k{}",
            FLASH_Q, FLASH_K
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

/// MLA decode, flash-style over the latent cache: the program's block rows are a group of
/// `group` query heads of one decode row (`rq`, slot `s`, bound by the caller), program
/// `(row, group pid(1)[, piece])`, all of which see the row's keys `0..=pos`. The queries
/// `[q̃ | q_rope]` per head come from `qt` (`[rows, heads·(r + dr)]`, the absorb kernel's
/// output), keys are latent cache rows `[c | k_rope]` and values their `c` part, so the
/// logits (group × 32 keys, depth `r + dr`) and the update `P·V` (group × `r`, depth 32 keys)
/// are f32 MMA tiles: on a GPU's tensor cores, as FlashMLA computes them, where one head per
/// program would leave them to the CUDA cores. With a `piece`, only that piece's key tiles. Leaves head `g`'s unnormalised latent output in `acc[g·r + c]`, its sum
/// in `l[g]` and its max in `m[g]`.
pub(super) fn mla_decode(
    sh: &MlaShape,
    group: usize,
    scale: f64,
    piece: Option<super::Piece>,
) -> Vec<Stmt> {
    let (r, qk) = (sh.rank, sh.rank + sh.rope);
    let query = |t: Expr, e: Expr| ld("qt", [v("rq"), (pid(1) * i(group) + t) * i(qk) + e]);
    let key = |j: Expr, e: Expr| ld("cache", [v("s"), j, e]);
    let value = |j: Expr, d: Expr| ld("cache", [v("s"), j, d]);
    let sees = |_: Expr| v("nk");
    let fl = Flash {
        rows: group,
        qk,
        vw: r,
        scale,
        query: &query,
        key: &key,
        value: &value,
        sees: &sees,
    };
    let mut body = fl.locals();
    body.extend([
        let_("nq", i(group)),
        let_("nk", ld("pos", [v("rq")]) + i(1)),
        fl.zero(),
    ]);
    let (first, end) = super::tile_range(piece);
    body.push(fl.tiles_in(first, end));
    body
}
