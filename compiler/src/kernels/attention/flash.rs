//! Prefill attention, flash-attention style, for GQA and MLA; and MLA decode.
//!
//! One program per ([`FLASH_Q`] query rows, head), one [`Attend`] statement: the cached keys
//! in tiles of [`FLASH_K`], per tile the logits `Q Kᵀ`, the online softmax per query row
//! (running max and sum, the correction applied to the accumulator), and the update
//! `acc = corr·acc + P V`, operands read where they lie: the queries from `q`, keys and values
//! from the KV cache (GQA) or the expand kernel's workspace and the latent cache's rope part
//! (MLA). The rows of a prefill launch
//! are consecutive positions of one sequence, so the last row sees the most keys,
//! `pos[last] + 1`.
//!
//! The prefill statement is the whole program, normalising `acc / l` into the output: with
//! tensor cores its products are bf16 and a GPU runs it as one block with its state in
//! registers (`lower/attend.rs` in `lamina-targets`), else f32. GQA reads its keys and values
//! from the KV cache; MLA ([`mla`]) from a workspace its expand kernel decompresses from the
//! latent cache first (the prefill is not absorbed).
//!
//! MLA decode ([`mla_decode`]) is absorbed: the statement's loops ([`attend_loops`]: f32
//! locals, 3xTF32 tiles on a GPU) with a group of query heads of one decode row as the
//! block's rows, so its products run on tensor cores too (FlashMLA's design), leaving the
//! unnormalised latent accumulator for the `W_UV` product.

use lamina_ir::graph::{NodeIndex, StateId};
use lamina_ir::kernel::build::*;
use lamina_ir::kernel::expand::attend_loops;
use lamina_ir::kernel::{Access, Attend, Dim, Elem, Expr, MmaKind, Stmt};

use super::{a, gqa_params, Bind, Ctx, Launch};
use crate::kernels::linear::{prefill_tile, MMA_COLS, MMA_ROWS};
use crate::kernels::{act, launch, rows_i64};

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

/// How prefill attention and MLA's expand form their products: bf16 on tensor cores
/// (FlashAttention's precision), else f32.
fn products(cx: &Ctx) -> MmaKind {
    if cx.tensor_cores {
        MmaKind::Bf16
    } else {
        MmaKind::F32
    }
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
    let mut body = Flash::prologue(vec![let_("kvh", pid(1) / i(hq / hkv))]);
    let mut block = fl.attend(products(cx), (v("nq"), v("nk")), Flash::all_tiles());
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

/// The shape of an MLA attention.
pub(super) struct MlaShape {
    pub heads: usize,
    /// `kv_lora_rank`: the latent width, of keys (with the rope part) and values.
    pub rank: usize,
    pub nope: usize,
    pub rope: usize,
    pub v_dim: usize,
}

/// MLA prefill, not absorbed (as FlashMLA's and vLLM's prefill: a prefill has as many queries
/// as keys, so attending in the `rank + rope` latent space would cost 3.4× the products of
/// Kimi Linear's `nope + rope` heads). Two launches after the latent cache write:
///
/// 1. `mla_expand`: every cached position `j < nk` of the sequence decompressed once,
///    `kv[j, h·(nope + v) + x] = c_j · kv_b[h·(nope + v) + x]` (head h's `k_nope` then `v`: the
///    rows of `kv_b`), one GEMM over the latent cache into a workspace of `context` rows (bf16
///    with tensor cores), a [`prefill_tile`](crate::kernels::linear::prefill_tile) MMA tile per
///    program; tiles past `nk` do nothing.
/// 2. `mla_flash`: GQA-style flash attention per (64 query rows, head): queries `q`, keys
///    `[k_nope(h) | k_rope]` (the rope part shared by every head, from the cache), values
///    `v(h)`, normalised into `o`. With tensor cores its products are bf16, and Kimi Linear's
///    and DeepSeek-V3's heads (192-deep logits, 128-wide values) run as a GPU register block.
#[allow(clippy::too_many_arguments)]
pub(super) fn mla(
    cx: &Ctx,
    n: NodeIndex,
    ins: &[NodeIndex],
    sh: &MlaShape,
    scale: f64,
    kv_b: &str,
    cache: StateId,
) -> Vec<Launch> {
    let (h, r, dn, dr, vd) = (sh.heads, sh.rank, sh.nope, sh.rope, sh.v_dim);
    let (qk, hw) = (dn + dr, dn + vd);
    let width = h * hw;
    let elem = if cx.tensor_cores {
        Elem::Bf16
    } else {
        Elem::F32
    };
    let kv_name = format!("mla_kv_{}x{width}_{}", cx.context, elem.name());
    let kv = |access| cx.workspace("kv", &kv_name, &[cx.context, width], elem, access);

    let (tr, tc) = if cx.tensor_cores {
        prefill_tile(r)
    } else {
        (MMA_ROWS, MMA_COLS)
    };
    let mut tile = mma(
        [tr, tc, r],
        min(i(tr), v("nk") - v("j0")),
        min(i(tc), i(width) - v("n0")),
        ld("cache", [v("s"), v("j0") + v("mi"), v("k")]),
        ld("kv_b", [v("n0") + v("mj"), v("k")]),
        vec![st("kv", [v("j0") + v("mi"), v("n0") + v("mj")], v("acc"))],
    );
    if let Stmt::Mma(m) = &mut tile {
        m.kind = products(cx);
    }
    let body = vec![
        let_("n0", pid(0) * i(tc)),
        let_("j0", pid(1) * i(tr)),
        // The sequence's slot and key count: the rows of a prefill launch are consecutive
        // positions of one sequence, the last sees the most keys.
        let_("s", ld("slot", [i(0)])),
        let_("nk", ld("pos", [rows() - i(1)]) + i(1)),
        if_(lt(v("j0"), v("nk")), vec![tile]),
    ];
    let expand = launch(
        format!("mla_expand_h{h}_r{r}_nope{dn}_v{vd}_{tr}x{tc}"),
        vec![Dim::N(width.div_ceil(tc)), Dim::N(cx.context.div_ceil(tr))],
        vec![
            cx.weight("kv_b", kv_b),
            cx.state("cache", cache),
            (rows_i64("slot"), Bind::Slot),
            (rows_i64("pos"), Bind::Pos),
            kv(Access::Write),
        ],
        body,
        vec![n],
        cx.graph,
    );

    // Key element e of head pid(1): k_nope from the workspace, then the shared k_rope from
    // the cache (both indices clamped: a select evaluates both loads).
    let query = |t: Expr, e: Expr| ld("q", [row(t), pid(1) * i(qk) + e]);
    let key = |j: Expr, e: Expr| {
        select(
            lt(e.clone(), i(dn)),
            ld(
                "kv",
                [j.clone(), pid(1) * i(hw) + min(e.clone(), i(dn - 1))],
            ),
            ld("cache", [v("s"), j, i(r) + max(e - i(dn), i(0))]),
        )
    };
    let value = |j: Expr, d: Expr| ld("kv", [j, pid(1) * i(hw) + i(dn) + d]);
    let fl = Flash {
        rows: FLASH_Q,
        qk,
        vw: vd,
        scale,
        query: &query,
        key: &key,
        value: &value,
        sees: &causal,
    };
    let mut body = Flash::prologue(vec![]);
    let mut block = fl.attend(products(cx), (v("nq"), v("nk")), Flash::all_tiles());
    block.epilogue = vec![st("o", [row(v("t")), pid(1) * i(vd) + v("d")], v("out"))];
    body.push(Stmt::Attend(Box::new(block)));
    let attend = launch(
        format!(
            "mla_flash_h{h}_nope{dn}_rope{dr}_v{vd}_q{}_k{}",
            FLASH_Q, FLASH_K
        ),
        vec![Dim::RowBlocks(FLASH_Q), Dim::N(h)],
        vec![
            (input("q", &act(h * qk)), a(ins[0])),
            kv(Access::Read),
            cx.state("cache", cache),
            (rows_i64("slot"), Bind::Slot),
            (rows_i64("pos"), Bind::Pos),
            (output("o", &act(h * vd)), a(n)),
        ],
        body,
        vec![n],
        cx.graph,
    );
    vec![expand, attend]
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
