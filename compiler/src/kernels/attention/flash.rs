//! Prefill attention, flash-attention style, for GQA and MLA; and MLA decode.
//!
//! One program per ([`FLASH_Q`] query rows, head), one [`Attend`] statement: the cached keys
//! in tiles of [`FLASH_K`], per tile the logits `Q Kᵀ`, the online softmax per query row
//! (running max and sum, the correction applied to the accumulator), and the update
//! `acc = corr·acc + P V`, operands read where they lie: the queries from `q` (GQA) or the
//! program's query block (MLA), keys and values from the cache. The rows of a prefill launch
//! are consecutive positions of one sequence, so the last row sees the most keys,
//! `pos[last] + 1`.
//!
//! GQA's statement is the whole program: with tensor cores its products are bf16 and a GPU
//! runs it as one block with its state in registers (`lower/attend.rs` in `lamina-targets`),
//! else f32. MLA needs the unnormalised accumulator afterwards (the `W_UV` product), so it
//! builds on the statement's loops ([`attend_loops`]: f32 locals, 3xTF32 tiles on a GPU).
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
use lamina_ir::kernel::expand::attend_loops;
use lamina_ir::kernel::{Attend, Dim, Expr, MmaKind, Stmt};

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
    /// The program's attention block over key tiles `first..end`, with `m` valid rows and
    /// `nk` keys, products as `kind`: the closures applied to the variables `t`, `j`, `e`,
    /// `d` the statement binds.
    fn attend(&self, kind: MmaKind, (m, nk): (Expr, Expr), (first, end): (Expr, Expr)) -> Attend {
        Attend {
            kind,
            rows: self.rows,
            m,
            keys: nk,
            tiles: (first, end),
            key_tile: FLASH_K,
            qk: self.qk,
            vw: self.vw,
            scale: self.scale,
            t: "t".into(),
            j: "j".into(),
            e: "e".into(),
            d: "d".into(),
            out: "out".into(),
            query: (self.query)(v("t"), v("e")),
            key: (self.key)(v("j"), v("e")),
            value: (self.value)(v("j"), v("d")),
            sees: (self.sees)(v("t")),
            epilogue: vec![],
        }
    }

    /// Prefill: the block's rows (`r0`, `nq` rows, slot `s`, then the caller's `lets`, then
    /// `nk` keys).
    fn prologue(lets: Vec<Stmt>) -> Vec<Stmt> {
        let fq = FLASH_Q;
        let mut out = vec![
            let_("r0", pid(0) * i(fq)),
            let_("nq", min(i(fq), rows() - v("r0"))),
            let_("s", ld("slot", [v("r0")])),
        ];
        out.extend(lets);
        out.push(let_("nk", ld("pos", [v("r0") + v("nq") - i(1)]) + i(1)));
        out
    }

    /// Every key tile of the block's `nk` keys, `0..⌈nk / FLASH_K⌉`.
    fn all_tiles() -> (Expr, Expr) {
        (i(0), (v("nk") + i(FLASH_K - 1)) / i(FLASH_K))
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
    // Bf16 products on tensor cores (FlashAttention's precision), else f32 products.
    let kind = if cx.tensor_cores {
        MmaKind::Bf16
    } else {
        MmaKind::F32
    };
    let mut body = Flash::prologue(vec![let_("kvh", pid(1) / i(hq / hkv))]);
    let mut block = fl.attend(kind, (v("nq"), v("nk")), Flash::all_tiles());
    block.epilogue = vec![st("o", [row(v("t")), pid(1) * i(vd) + v("d")], v("out"))];
    body.push(Stmt::Attend(Box::new(block)));
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
    body.extend(Flash::prologue(vec![]));
    // The attention's state declared and zeroed, its tile loop after the query block.
    let mut loops = attend_loops(&fl.attend(MmaKind::F32, (v("nq"), v("nk")), Flash::all_tiles()));
    let tiles = loops.pop().expect("attend_loops ends with the tile loop");
    body.extend(loops);
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
        tiles,
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
    let mut body = vec![
        let_("nq", i(group)),
        let_("nk", ld("pos", [v("rq")]) + i(1)),
    ];
    body.extend(attend_loops(&fl.attend(
        MmaKind::F32,
        (v("nq"), v("nk")),
        super::tile_range(piece),
    )));
    body
}
