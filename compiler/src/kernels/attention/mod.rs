//! Rotary embeddings, GQA and MLA.
//!
//! Attention is the cache write (`[slots, context, entry]` pool, one program per row) and the
//! attend kernel; decode adds the combine of a split attend, and MLA decode the absorb kernel
//! before the attend. MLA decode attends in the absorbed form: `q̃ = W_UKᵀ q_nope` against
//! the latent cache, the latent-space output mapped back with `W_UV`, so keys and values are
//! never expanded; MLA prefill expands them once per launch into a workspace and attends per
//! head as GQA does (with as many queries as keys, that is the cheaper form).
//!
//! Prefill is flash-attention style ([`flash`], GQA and MLA): 64 query rows per program, the
//! logits and the value products of each 32-key tile as MMA tiles (tensor cores on a GPU).
//!
//! Decode is one program per (row, KV head): a GQA program ([`attend_block`]) attends the KV
//! head's whole group of query heads (up to [`GQA_DECODE_HEADS`]), an MLA program up to [`MLA_DECODE_HEADS`] heads of the
//! one latent head (`flash::mla_decode`, FlashMLA-style: the heads are the rows of the
//! flash loop's MMA tiles; their latent queries come from an absorb kernel, once per row), so
//! each cached key and value is read once per program, not once per query head. An online
//! softmax per head over the cached positions `0..=pos` in tiles of [`BK`] keys: the tile's
//! logits in a local, the running max and sum corrected once per tile, one pass over K and
//! V. With `Ctx::decode_splits = S > 1` (or 0: chosen,
//! see [`DECODE_PROGRAMS`]) the positions are split into `S` pieces of whole key tiles
//! (split-sequence, "flash decoding"): one program per (row, KV head, piece) leaves each
//! head's running max, sum and unnormalised output for its piece; a combine kernel per
//! (row, head) rescales them to the common max and normalises (MLA maps back with `W_UV`
//! there).

use lamina_ir::graph::{NodeIndex, Op};
use lamina_ir::kernel::build::*;
use lamina_ir::kernel::{Dim, Expr, Stmt};
use lamina_ir::spec::RopeStyle;

use super::{act, launch, rows_i64, Bind, Ctx, Launch, Phase, Value};

mod flash;
pub use flash::{FLASH_K, FLASH_Q};

fn a(n: NodeIndex) -> Bind {
    Bind::Act(Value::Node(n))
}

/// Rotary embedding with cos/sin tables `[context, rotary/2]` computed at compile time in f64
/// (YaRN factor included), as serving engines keep a cos/sin cache.
pub fn rope(cx: &Ctx, n: NodeIndex, ins: &[NodeIndex]) -> Launch {
    let g = cx.graph;
    let Op::Rope(r) = &g.node(n).op else {
        unreachable!("rope builder")
    };
    let cols = r.heads * r.head_dim;
    let half = r.rotary_dim / 2;
    let inv = r.inv_freq();
    let mf = r.attention_factor();
    let mut cos = Vec::with_capacity(cx.context * half);
    let mut sin = Vec::with_capacity(cx.context * half);
    for p in 0..cx.context {
        for f in &inv {
            cos.push(((p as f64 * f).cos() * mf) as f32);
            sin.push(((p as f64 * f).sin() * mf) as f32);
        }
    }
    let key = format!(
        "rope.d{}.theta{}.{}",
        r.rotary_dim,
        r.theta,
        match &r.yarn {
            Some(y) => format!("yarn{}x{}", y.factor, y.original_max_position_embeddings),
            None => "plain".into(),
        }
    );
    let (ia, ib): (Expr, Expr) = match r.style {
        RopeStyle::Half => (v("i"), v("i") + i(half)),
        RopeStyle::Interleaved => (v("i") * i(2), v("i") * i(2) + i(1)),
    };
    let base = pid(1) * i(r.head_dim) + i(r.offset);
    let x = |e: Expr| ld("x", [pid(0), base.clone() + e]);
    let body = vec![
        let_("p", ld("pos", [pid(0)])),
        for_(
            "c",
            i(0),
            i(r.head_dim),
            vec![st(
                "y",
                [pid(0), pid(1) * i(r.head_dim) + v("c")],
                ld("x", [pid(0), pid(1) * i(r.head_dim) + v("c")]),
            )],
        ),
        for_(
            "i",
            i(0),
            i(half),
            vec![
                let_("cs", ld("cos", [v("p"), v("i")])),
                let_("sn", ld("sin", [v("p"), v("i")])),
                let_("x1", x(ia.clone())),
                let_("x2", x(ib.clone())),
                st(
                    "y",
                    [pid(0), base.clone() + ia],
                    v("x1") * v("cs") - v("x2") * v("sn"),
                ),
                st(
                    "y",
                    [pid(0), base.clone() + ib],
                    v("x2") * v("cs") + v("x1") * v("sn"),
                ),
            ],
        ),
    ];
    let table = [Dim::N(cx.context), Dim::N(half)];
    launch(
        format!(
            "rope_{}_h{}x{}_off{}_rot{}",
            match r.style {
                RopeStyle::Half => "half",
                RopeStyle::Interleaved => "interleaved",
            },
            r.heads,
            r.head_dim,
            r.offset,
            r.rotary_dim
        ),
        vec![Dim::Rows, Dim::N(r.heads)],
        vec![
            (input("x", &act(cols)), a(ins[0])),
            (rows_i64("pos"), Bind::Pos),
            (input("cos", &table), Bind::Const(format!("{key}.cos"), cos)),
            (input("sin", &table), Bind::Const(format!("{key}.sin"), sin)),
            (output("y", &act(cols)), a(n)),
        ],
        body,
        vec![n],
        g,
    )
}

/// Copies this launch's rows into the cache pool at `(slot, pos)`: `parts` are
/// `(param, bind, width)` laid side by side in the entry.
fn cache_write(
    cx: &Ctx,
    n: NodeIndex,
    name: String,
    parts: Vec<(&str, Bind, usize)>,
    cache: lamina_ir::graph::StateId,
) -> Launch {
    let mut params = Vec::new();
    let mut body = vec![
        let_("s", ld("slot", [pid(0)])),
        let_("p", ld("pos", [pid(0)])),
    ];
    let mut off = 0;
    for (nm, b, w) in parts {
        params.push((input(nm, &act(w)), b));
        body.push(for_(
            "c",
            i(0),
            i(w),
            vec![st(
                "cache",
                [v("s"), v("p"), i(off) + v("c")],
                ld(nm, [pid(0), v("c")]),
            )],
        ));
        off += w;
    }
    params.push(cx.state("cache", cache));
    params.push((rows_i64("slot"), Bind::Slot));
    params.push((rows_i64("pos"), Bind::Pos));
    launch(name, vec![Dim::Rows], params, body, vec![n], cx.graph)
}

/// Keys per tile of the decode online softmax.
pub const BK: usize = 32;

/// Most query heads one MLA decode program attends together (they share the one latent KV
/// head): the rows of one 32-row MMA tile, whose accumulator (`heads · kv_lora_rank` floats)
/// is a local.
pub const MLA_DECODE_HEADS: usize = 32;

/// Most query heads one GQA decode program attends together: each lane carries a logit sum
/// and a weighted value sum per head in registers. A KV group of more heads (multi-query
/// attention) is shared between several programs, each reading the group's keys and values.
pub const GQA_DECODE_HEADS: usize = 16;

/// Latent columns per MLA decode absorb program (`q̃ = W_UK(h)ᵀ q_nope`): one per lane.
pub const ABSORB_COLS: usize = 32;

/// Decode attention programs per row that the automatic split (`Ctx::decode_splits == 0`)
/// aims for: about one per SM of an H100/H200 at batch 1.
pub const DECODE_PROGRAMS: usize = 128;

/// Fewest key tiles in one piece of an automatic split: a piece's partial results (per head
/// `width + 2` floats) should stay small next to the keys and values it reads.
pub const DECODE_PIECE_TILES: usize = 4;

/// The logits of a GQA decode program: `Σ_e query(g, e) · key(e)` over `e ∈ 0..len`, where
/// `query` reads element `e` of the program's query head `g` and `key` element `e` of key `j`.
struct Logits<'a> {
    query: &'a dyn Fn(Expr, Expr) -> Expr,
    key: &'a dyn Fn(Expr) -> Expr,
    len: usize,
}

/// GQA decode's attend loop for one decode row (`rq`, slot `s`, bound by the caller) and the
/// program's `heads` query heads, which share their keys and values (a KV group): keys
/// `0..=pos` in tiles of [`BK`]; one key per lane for the logits, each key element loaded once
/// for every head; per head the
/// running max and sum, corrected once per tile; then one value column per lane, each value
/// element loaded once and weighted for every head in registers (`value(j, d)`: element `d`
/// of value `j`). With a `piece`, only that piece's tiles. Leaves head `g`'s unnormalised
/// output in `acc[g·width + d]` and its sum in `l[g]`.
fn attend_block(
    logits_of: &Logits,
    heads: usize,
    scale: f64,
    value: &dyn Fn(Expr, Expr) -> Expr,
    width: usize,
    piece: Option<Piece>,
) -> Vec<Stmt> {
    let sc = |g: Expr, jj: Expr| ld("sc", [g * i(BK) + jj]);
    let mut body = vec![
        local("acc", heads * width),
        local("sc", heads * BK),
        local("m", heads),
        local("l", heads),
        local("corr", heads),
        for_par(
            "d",
            i(0),
            i(heads * width),
            vec![st("acc", [v("d")], f(0.0))],
        ),
        for_par(
            "g",
            i(0),
            i(heads),
            vec![
                st("m", [v("g")], f(f64::NEG_INFINITY)),
                st("l", [v("g")], f(0.0)),
            ],
        ),
        let_("nk", ld("pos", [v("rq")]) + i(1)),
    ];
    // The logits of key j for every head, one pass over the key (every key of a tile is
    // below `nk`): `s{g}` carries head g's.
    let names: Vec<String> = (0..heads).map(|g| format!("s{g}")).collect();
    let mut logits = vec![
        let_("j", v("j0") + v("jj")),
        for_carry(
            "e",
            i(0),
            i(logits_of.len),
            names.iter().map(|n| (n.as_str(), f(0.0))).collect(),
            vec![let_("kj", (logits_of.key)(v("e")))],
            (0..heads)
                .map(|g| v(&names[g]) + (logits_of.query)(i(g), v("e")) * v("kj"))
                .collect(),
        ),
    ];
    for (g, name) in names.iter().enumerate() {
        logits.push(st("sc", [i(g * BK) + v("jj")], f(scale) * v(name)));
    }
    // Per head: the tile's max, the correction of the running sum and accumulator, the
    // probabilities in place of the logits.
    let softmax = for_(
        "g",
        i(0),
        i(heads),
        vec![
            let_(
                "m2",
                max(
                    ld("m", [v("g")]),
                    max_over("jj", i(0), v("nb"), sc(v("g"), v("jj"))),
                ),
            ),
            let_("c", exp(ld("m", [v("g")]) - v("m2"))),
            for_par(
                "jj",
                i(0),
                v("nb"),
                vec![st(
                    "sc",
                    [v("g") * i(BK) + v("jj")],
                    exp(sc(v("g"), v("jj")) - v("m2")),
                )],
            ),
            st(
                "l",
                [v("g")],
                ld("l", [v("g")]) * v("c") + sum("jj", i(0), v("nb"), sc(v("g"), v("jj"))),
            ),
            st("m", [v("g")], v("m2")),
            st("corr", [v("g")], v("c")),
        ],
    );
    // One lane per value column: the tile's weighted values of every head summed in
    // registers (`pv{g}`), each accumulator rescaled and updated once per tile.
    let pv: Vec<String> = (0..heads).map(|g| format!("pv{g}")).collect();
    let mut column = vec![for_carry(
        "jj",
        i(0),
        v("nb"),
        pv.iter().map(|n| (n.as_str(), f(0.0))).collect(),
        vec![let_("vj", value(v("j0") + v("jj"), v("d")))],
        (0..heads)
            .map(|g| v(&pv[g]) + ld("sc", [i(g * BK) + v("jj")]) * v("vj"))
            .collect(),
    )];
    for (g, name) in pv.iter().enumerate() {
        let at = i(g * width) + v("d");
        column.push(st(
            "acc",
            [at.clone()],
            ld("acc", [at]) * ld("corr", [i(g)]) + v(name),
        ));
    }
    let tile = vec![
        let_("j0", v("jt") * i(BK)),
        let_("nb", min(i(BK), v("nk") - v("j0"))),
        // One key per lane: the logits of different keys are independent.
        for_par("jj", i(0), v("nb"), logits),
        softmax,
        for_par("d", i(0), i(width), column),
    ];
    let (first, end) = tile_range(piece);
    body.push(for_("jt", first, end, tile));
    body
}

/// The piece of a split decode program (grid axis 2): key tiles `pid(2)·tiles ..< (pid(2) +
/// 1)·tiles`.
#[derive(Clone, Copy)]
struct Piece {
    tiles: usize,
}

/// The key tiles (of [`BK`] keys) a decode program attends: `0..⌈nk / BK⌉`, or its piece's.
fn tile_range(piece: Option<Piece>) -> (Expr, Expr) {
    let all = (v("nk") + i(BK - 1)) / i(BK);
    match piece {
        None => (i(0), all),
        Some(Piece { tiles }) => (pid(2) * i(tiles), min(all, (pid(2) + i(1)) * i(tiles))),
    }
}

/// Split decode: `(pieces, the piece of a program)` when this attention is split, for
/// `programs` attend programs per row without a split. `Ctx::decode_splits == 0` picks the pieces so
/// that a row has about [`DECODE_PROGRAMS`] programs, each piece at least
/// [`DECODE_PIECE_TILES`] tiles; no piece is empty at full context.
fn decode_split(cx: &Ctx, programs: usize) -> Option<(usize, Piece)> {
    if cx.phase != Phase::Decode {
        return None;
    }
    let tiles = cx.context.div_ceil(BK);
    let want = match cx.decode_splits {
        0 => DECODE_PROGRAMS
            .div_ceil(programs.max(1))
            .min(tiles / DECODE_PIECE_TILES),
        s => s,
    };
    let per = tiles.div_ceil(want.clamp(1, tiles.max(1))).max(1);
    let pieces = tiles.div_ceil(per);
    (pieces > 1).then_some((pieces, Piece { tiles: per }))
}

/// The program's pieces' partial results, per head `h = pid(1)·heads + g`: `[m, l,
/// acc[0..width]]` at `part[row, ((h·S + piece)·(width + 2)) ..]`, from the locals
/// `attend_block` leaves.
fn store_piece(heads: usize, pieces: usize, width: usize) -> Stmt {
    let at = |k: Expr| {
        [
            v("rq"),
            ((pid(1) * i(heads) + v("g")) * i(pieces) + pid(2)) * i(width + 2) + k,
        ]
    };
    for_(
        "g",
        i(0),
        i(heads),
        vec![
            st("part", at(i(0)), ld("m", [v("g")])),
            st("part", at(i(1)), ld("l", [v("g")])),
            for_par(
                "d",
                i(0),
                i(width),
                vec![st(
                    "part",
                    at(i(2) + v("d")),
                    ld("acc", [v("g") * i(width) + v("d")]),
                )],
            ),
        ],
    )
}

/// The combine of a split decode attention, per (row, head): binds `mstar` (the common max)
/// and `lsum` (the rescaled sum); `merged(d)` is output element `d` of the latent/value row
/// before normalisation by `lsum`.
fn combine_prelude(pieces: usize, width: usize) -> (Vec<Stmt>, impl Fn(Expr) -> Expr) {
    let p = width + 2;
    let base = move || pid(1) * i(pieces * p);
    let at = move |s: Expr, k: Expr| ld("part", [pid(0), base() + s * i(p) + k]);
    let m_s = move |s: Expr| at(s, i(0));
    let stmts = vec![
        let_("mstar", max_over("sp", i(0), i(pieces), m_s(v("sp")))),
        let_(
            "lsum",
            sum(
                "sp",
                i(0),
                i(pieces),
                at(v("sp"), i(1)) * exp(m_s(v("sp")) - v("mstar")),
            ),
        ),
    ];
    let merged = move |d: Expr| {
        sum(
            "sp",
            i(0),
            i(pieces),
            at(v("sp"), i(2) + d) * exp(m_s(v("sp")) - v("mstar")),
        )
    };
    (stmts, merged)
}

/// A decode program's row `rq` (grid dimension 0) and its slot `s`.
fn decode_row() -> Vec<Stmt> {
    vec![let_("rq", pid(0)), let_("s", ld("slot", [v("rq")]))]
}

/// `o[rq, h·width + d] = value(g, d)` for each of the program's `heads` heads, head
/// `h = pid(1)·heads + g`.
fn store_rows(heads: usize, width: usize, value: &dyn Fn(Expr, Expr) -> Expr) -> Stmt {
    for_(
        "g",
        i(0),
        i(heads),
        vec![for_par(
            "d",
            i(0),
            i(width),
            vec![st(
                "o",
                [v("rq"), (pid(1) * i(heads) + v("g")) * i(width) + v("d")],
                value(v("g"), v("d")),
            )],
        )],
    )
}

/// GQA: returns the cache write and the attend launch(es). Decode: one program per (row, KV
/// head[, piece]) attends the KV head's whole group of query heads, so each key and value is
/// read once per group (not once per query head).
pub fn gqa(cx: &Ctx, n: NodeIndex, ins: &[NodeIndex]) -> Vec<Launch> {
    let g = cx.graph;
    let Op::Attention {
        heads,
        kv_heads,
        head_dim,
        v_dim,
        scale,
        cache,
    } = &g.node(n).op
    else {
        unreachable!("gqa builder")
    };
    let (hq, hkv, hd, vd) = (*heads, *kv_heads, *head_dim, *v_dim);
    let kw = hkv * hd;
    let write = cache_write(
        cx,
        n,
        format!("kv_write_{kw}_{}", hkv * vd),
        vec![("k", a(ins[1]), kw), ("v", a(ins[2]), hkv * vd)],
        *cache,
    );
    if cx.phase == Phase::Prefill {
        return vec![
            write,
            flash::gqa(cx, n, ins, (hq, hkv, hd, vd), *scale, *cache),
        ];
    }
    // Program (row, pid(1)[, piece]) attends `group` query heads of one KV group (the whole
    // group, or a share of at most GQA_DECODE_HEADS of it): its head g is pid(1)·group + g,
    // its KV head pid(1) / shares.
    let shares = (1..=hq / hkv)
        .find(|s| (hq / hkv) % s == 0 && (hq / hkv) / s <= GQA_DECODE_HEADS)
        .unwrap_or(hq / hkv);
    let group = hq / hkv / shares;
    let kvh = || match shares {
        1 => pid(1),
        s => pid(1) / i(s),
    };
    let query = |g, e| ld("q", [v("rq"), (pid(1) * i(group) + g) * i(hd) + e]);
    let key = |e| ld("cache", [v("s"), v("j"), kvh() * i(hd) + e]);
    let logits = Logits {
        query: &query,
        key: &key,
        len: hd,
    };
    let value = |j: Expr, d: Expr| ld("cache", [v("s"), j, i(kw) + kvh() * i(vd) + d]);
    let split = decode_split(cx, hkv * shares);
    let mut inner = decode_row();
    let piece = split.map(|(_, piece)| piece);
    inner.extend(attend_block(&logits, group, *scale, &value, vd, piece));
    if let Some((s, _)) = split {
        // Split decode: partials per piece, then the combine.
        inner.push(store_piece(group, s, vd));
        let width = hq * s * (vd + 2);
        let part = cx.temp(width);
        let attend = launch(
            format!("gqa_attend_h{hq}x{hkv}_d{hd}_v{vd}_q1_split{s}"),
            vec![Dim::Rows, Dim::N(hkv * shares), Dim::N(s)],
            gqa_params(
                cx,
                ins,
                hq * hd,
                *cache,
                (output("part", &act(width)), Bind::Act(part)),
            ),
            inner,
            vec![n],
            g,
        );
        let (mut body, merged) = combine_prelude(s, vd);
        body.push(for_par(
            "d",
            i(0),
            i(vd),
            vec![st(
                "o",
                [pid(0), pid(1) * i(vd) + v("d")],
                merged(v("d")) / v("lsum"),
            )],
        ));
        let combine = launch(
            format!("attend_combine_h{hq}_w{vd}_s{s}"),
            vec![Dim::Rows, Dim::N(hq)],
            vec![
                (input("part", &act(width)), Bind::Act(part)),
                (output("o", &act(hq * vd)), a(n)),
            ],
            body,
            vec![n],
            g,
        );
        return vec![write, attend, combine];
    }
    inner.push(store_rows(group, vd, &|g, d| {
        ld("acc", [g.clone() * i(vd) + d]) / ld("l", [g])
    }));
    let attend = launch(
        format!("gqa_attend_h{hq}x{hkv}_d{hd}_v{vd}_q1"),
        vec![Dim::Rows, Dim::N(hkv * shares)],
        gqa_params(cx, ins, hq * hd, *cache, (output("o", &act(hq * vd)), a(n))),
        inner,
        vec![n],
        g,
    );
    vec![write, attend]
}

/// The parameters of a GQA attend kernel: the queries (`q_cols` wide), the cache, the rows'
/// slots and positions, then `out`.
fn gqa_params(
    cx: &Ctx,
    ins: &[NodeIndex],
    q_cols: usize,
    cache: lamina_ir::graph::StateId,
    out: (lamina_ir::kernel::Param, Bind),
) -> Vec<(lamina_ir::kernel::Param, Bind)> {
    vec![
        (input("q", &act(q_cols)), a(ins[0])),
        cx.state("cache", cache),
        (rows_i64("slot"), Bind::Slot),
        (rows_i64("pos"), Bind::Pos),
        out,
    ]
}

/// MLA: returns the latent cache write and the attend launch(es). Prefill: the keys and
/// values decompressed, then flash attention ([`flash::mla`]). Decode (absorbed): one
/// program per (row, group of up to [`MLA_DECODE_HEADS`] heads[, piece]), FlashMLA-style:
/// the group's heads share each latent cache row `[c | k_rope]` as their key and its `c` as
/// their value, read once per group.
pub fn mla(cx: &Ctx, n: NodeIndex, ins: &[NodeIndex]) -> Vec<Launch> {
    let g = cx.graph;
    let Op::MlaAttention {
        heads,
        kv_lora_rank,
        nope,
        rope,
        v_dim,
        scale,
        kv_b,
        cache,
    } = &g.node(n).op
    else {
        unreachable!("mla builder")
    };
    let (h_n, r, dn, dr, vd) = (*heads, *kv_lora_rank, *nope, *rope, *v_dim);
    let qk = dn + dr;
    let write = cache_write(
        cx,
        n,
        format!("latent_write_{r}_{dr}"),
        vec![("c", a(ins[1]), r), ("kr", a(ins[2]), dr)],
        *cache,
    );
    let shape = flash::MlaShape {
        heads: h_n,
        rank: r,
        nope: dn,
        rope: dr,
        v_dim: vd,
    };
    if cx.phase == Phase::Prefill {
        let mut launches = vec![write];
        launches.extend(flash::mla(cx, n, ins, &shape, *scale, kv_b, *cache));
        return launches;
    }
    // Program (row, head group pid(1)[, piece]) of `group` heads; its head g is
    // pid(1)·group + g. Row `d` of head h's W_UK (d < dn) or W_UV (dn ≤ d), `r` wide:
    let group = (1..=MLA_DECODE_HEADS.min(h_n))
        .rev()
        .find(|g| h_n % g == 0)
        .unwrap_or(1);
    let head = |g: Expr| pid(1) * i(group) + g;
    let wrow = |h: Expr, d: Expr| h * i(dn + vd) + d;
    // The queries in latent space, [rows, heads·(r + dr)], once per row and head (not per
    // piece): q̃ = W_UK(h)ᵀ q_nope, one latent column per lane summed in a register (the
    // lanes read consecutive elements of each row of W_UK), then q_rope. One program per
    // (row, head, block of ABSORB_COLS latent columns), so that a batch-1 step reads W_UK
    // with many warps; the first block of each head also copies q_rope.
    let lq = r + dr;
    let qt = cx.temp(h_n * lq);
    let cols = ABSORB_COLS.min(r);
    let ragged = !r.is_multiple_of(cols);
    let column = |b: Expr| {
        let e = pid(2) * i(cols) + b;
        if ragged {
            min(e, i(r - 1))
        } else {
            e
        }
    };
    let latent = st(
        "qt",
        [pid(0), pid(1) * i(lq) + column(v("e"))],
        sum(
            "d",
            i(0),
            i(dn),
            ld("q", [pid(0), pid(1) * i(qk) + v("d")])
                * ld("kv_b", [wrow(pid(1), v("d")), column(v("e"))]),
        ),
    );
    let absorb = launch(
        format!("mla_absorb_h{h_n}_r{r}_nope{dn}_rope{dr}_c{cols}"),
        vec![Dim::Rows, Dim::N(h_n), Dim::N(r.div_ceil(cols))],
        vec![
            (input("q", &act(h_n * qk)), a(ins[0])),
            cx.weight("kv_b", kv_b),
            (output("qt", &act(h_n * lq)), Bind::Act(qt)),
        ],
        vec![
            for_par(
                "e",
                i(0),
                i(cols),
                vec![if ragged {
                    if_(lt(pid(2) * i(cols) + v("e"), i(r)), vec![latent])
                } else {
                    latent
                }],
            ),
            if_(
                eq(pid(2), i(0)),
                vec![for_par(
                    "e",
                    i(0),
                    i(dr),
                    vec![st(
                        "qt",
                        [pid(0), pid(1) * i(lq) + i(r) + v("e")],
                        ld("q", [pid(0), pid(1) * i(qk) + i(dn) + v("e")]),
                    )],
                )],
            ),
        ],
        vec![n],
        g,
    );
    // The attend kernel's parameters: the latent queries, kv_b where it maps back, the
    // cache, the rows' slots and positions, then `out`.
    let attend_params = |kv_b_too: bool, out| {
        let mut ps = vec![(input("qt", &act(h_n * lq)), Bind::Act(qt))];
        if kv_b_too {
            ps.push(cx.weight("kv_b", kv_b));
        }
        ps.extend([
            cx.state("cache", *cache),
            (rows_i64("slot"), Bind::Slot),
            (rows_i64("pos"), Bind::Pos),
            out,
        ]);
        ps
    };
    let mut body = decode_row();
    let split = decode_split(cx, h_n / group);
    body.extend(flash::mla_decode(
        &shape,
        group,
        *scale,
        split.map(|(_, piece)| piece),
    ));
    if let Some((s, _)) = split {
        // Split decode: latent partials per piece; the combine normalises and maps back.
        body.push(store_piece(group, s, r));
        let width = h_n * s * (r + 2);
        let part = cx.temp(width);
        let attend = launch(
            format!("mla_attend_h{h_n}_g{group}_r{r}_nope{dn}_rope{dr}_v{vd}_q1_split{s}"),
            vec![Dim::Rows, Dim::N(h_n / group), Dim::N(s)],
            attend_params(false, (output("part", &act(width)), Bind::Act(part))),
            body,
            vec![n],
            g,
        );
        let (mut comb, merged) = combine_prelude(s, r);
        comb.push(local("ol", r));
        comb.push(for_par(
            "e",
            i(0),
            i(r),
            vec![st("ol", [v("e")], merged(v("e")) / v("lsum"))],
        ));
        comb.push(for_par(
            "d",
            i(0),
            i(vd),
            vec![st(
                "o",
                [pid(0), pid(1) * i(vd) + v("d")],
                sum(
                    "e",
                    i(0),
                    i(r),
                    ld("kv_b", [wrow(pid(1), i(dn) + v("d")), v("e")]) * ld("ol", [v("e")]),
                ),
            )],
        ));
        let combine = launch(
            format!("mla_combine_h{h_n}_r{r}_v{vd}_s{s}"),
            vec![Dim::Rows, Dim::N(h_n)],
            vec![
                (input("part", &act(width)), Bind::Act(part)),
                cx.weight("kv_b", kv_b),
                (output("o", &act(h_n * vd)), a(n)),
            ],
            comb,
            vec![n],
            g,
        );
        return vec![write, absorb, attend, combine];
    }
    // o = W_UV(h) (acc / l) per head.
    body.push(store_rows(group, vd, &|g, d| {
        sum(
            "e",
            i(0),
            i(r),
            ld("kv_b", [wrow(head(g.clone()), i(dn) + d), v("e")])
                * ld("acc", [g.clone() * i(r) + v("e")]),
        ) / ld("l", [g])
    }));
    let attend = launch(
        format!("mla_attend_h{h_n}_g{group}_r{r}_nope{dn}_rope{dr}_v{vd}_q1"),
        vec![Dim::Rows, Dim::N(h_n / group)],
        attend_params(true, (output("o", &act(h_n * vd)), a(n))),
        body,
        vec![n],
        g,
    );
    vec![write, absorb, attend]
}
