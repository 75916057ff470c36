//! Rotary embeddings, GQA and MLA.
//!
//! Attention is two kernels: the cache write (`[slots, context, entry]` pool, one program per
//! row) and the attend kernel, one program per (row, head), with an online softmax over the
//! cached positions `0..=pos` in tiles of `BK` keys (the tile's logits in a local, the running
//! max and sum corrected once per tile, one pass over K and V). MLA attends in the
//! absorbed form: `q̃ = W_UKᵀ q_nope` against the latent cache, the latent-space output mapped
//! back with `W_UV`, so keys and values are never expanded.
//!
//! GQA prefill is flash-attention style instead ([`gqa_flash`]): 64 query rows per program, the
//! logits and the value products of each 32-key tile as `dot` tiles (tensor cores on a GPU).
//! (MLA prefill still runs the 4-query blocks of [`attend_block`].)
//!
//! Decode with `Ctx::decode_splits = S > 1` splits the cached positions into `S` pieces of
//! whole key tiles (split-sequence, "flash decoding"): one program per (row, head, piece)
//! leaves its piece's running max, sum and unnormalised output; a combine kernel per
//! (row, head) rescales them to the common max and normalises (MLA maps back with `W_UV`
//! there).

use lamina_ir::graph::{NodeIndex, Op};
use lamina_ir::kernel::build::*;
use lamina_ir::kernel::{Dim, Expr, Stmt};
use lamina_ir::spec::RopeStyle;

use super::{act, launch, rows_i64, Bind, Ctx, Launch, Phase, Value};

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

/// Keys per tile of the online softmax.
pub const BK: usize = 32;
/// Queries per prefill program (decode: one row per program, each in its own slot).
pub const BQ: usize = 4;

/// One term of the logits: `Σ_e query(q, e) · key(e)` over `e ∈ 0..len`, where `query` gets
/// the query's index in the block and `key` reads key `j`.
struct Term<'a> {
    query: Box<dyn Fn(usize, Expr) -> Expr + 'a>,
    key: Box<dyn Fn(Expr) -> Expr + 'a>,
    len: usize,
}

/// The attend loop of a block of `bq` queries (rows `rq0..`, bound by the caller, sharing one
/// slot `s`): keys `0..=pos` in tiles of [`BK`]. Per key, one pass over each term computes the
/// logits of every query of the block (each key element loaded once); the running max and sum
/// are corrected once per tile and query; values are accumulated for every query from one
/// load. Leaves `acc[q·width + d]` and `l[q]` in locals.
fn attend_block(
    bq: usize,
    terms: &[Term],
    scale: f64,
    value: &dyn Fn(Expr) -> Expr,
    width: usize,
    piece: Option<Piece>,
) -> Vec<Stmt> {
    let key = || let_("j", v("j0") + v("jj"));
    let sc = |q: usize, jj: Expr| ld("sc", [i(q * BK) + jj]);
    let mut body = vec![
        local("acc", bq * width),
        local("sc", bq * BK),
        local("m", bq),
        local("l", bq),
        local_i("nkq", bq),
        for_par("d", i(0), i(bq * width), vec![st("acc", [v("d")], f(0.0))]),
    ];
    for q in 0..bq {
        body.push(st("nkq", [i(q)], ld("pos", [v(&format!("rq{q}"))]) + i(1)));
        body.push(st("m", [i(q)], f(f64::NEG_INFINITY)));
        body.push(st("l", [i(q)], f(0.0)));
    }
    let nk = (0..bq)
        .map(|q| ld("nkq", [i(q)]))
        .reduce(max)
        .unwrap_or(i(0));
    body.push(let_("nk", nk));
    // Logits of every query for key j, one pass per term.
    let mut logits = vec![key()];
    for (t, term) in terms.iter().enumerate() {
        let names: Vec<String> = (0..bq).map(|q| format!("s{t}_{q}")).collect();
        let carried = names.iter().map(|n| (n.as_str(), f(0.0))).collect();
        logits.push(for_carry(
            "e",
            i(0),
            i(term.len),
            carried,
            vec![let_("kj", (term.key)(v("e")))],
            (0..bq)
                .map(|q| v(&names[q]) + (term.query)(q, v("e")) * v("kj"))
                .collect(),
        ));
    }
    for q in 0..bq {
        let total = (0..terms.len())
            .map(|t| v(&format!("s{t}_{q}")))
            .reduce(|a, b| a + b)
            .unwrap_or(f(0.0));
        logits.push(st(
            "sc",
            [i(q * BK) + v("jj")],
            select(
                lt(v("j"), ld("nkq", [i(q)])),
                f(scale) * total,
                f(f64::NEG_INFINITY),
            ),
        ));
    }
    // Softmax bookkeeping per query: skipped (probabilities zeroed) when the whole tile lies
    // past the query's position.
    let mut per_query = Vec::new();
    for q in 0..bq {
        let live = lt(v("j0"), ld("nkq", [i(q)]));
        per_query.push(if_(
            live.clone(),
            vec![
                let_(
                    "m2",
                    max(
                        ld("m", [i(q)]),
                        max_over("jj", i(0), v("nb"), sc(q, v("jj"))),
                    ),
                ),
                let_("corr", exp(ld("m", [i(q)]) - v("m2"))),
                for_par(
                    "jj",
                    i(0),
                    v("nb"),
                    vec![st(
                        "sc",
                        [i(q * BK) + v("jj")],
                        exp(sc(q, v("jj")) - v("m2")),
                    )],
                ),
                st(
                    "l",
                    [i(q)],
                    ld("l", [i(q)]) * v("corr") + sum("jj", i(0), v("nb"), sc(q, v("jj"))),
                ),
                st("m", [i(q)], v("m2")),
                for_par(
                    "d",
                    i(0),
                    i(width),
                    vec![st(
                        "acc",
                        [i(q * width) + v("d")],
                        ld("acc", [i(q * width) + v("d")]) * v("corr"),
                    )],
                ),
            ],
        ));
        per_query.push(if_(
            ge(v("j0"), ld("nkq", [i(q)])),
            vec![for_par(
                "jj",
                i(0),
                v("nb"),
                vec![st("sc", [i(q * BK) + v("jj")], f(0.0))],
            )],
        ));
    }
    let mut accumulate = vec![let_("vj", value(v("d")))];
    for q in 0..bq {
        accumulate.push(st(
            "acc",
            [i(q * width) + v("d")],
            ld("acc", [i(q * width) + v("d")]) + sc(q, v("jj")) * v("vj"),
        ));
    }
    let tile = [
        vec![
            let_("j0", v("jt") * i(BK)),
            let_("nb", min(i(BK), v("nk") - v("j0"))),
            // One key per lane: the logits of different keys are independent.
            for_par("jj", i(0), v("nb"), logits),
        ],
        per_query,
        vec![for_(
            "jj",
            i(0),
            v("nb"),
            vec![key(), for_par("d", i(0), i(width), accumulate)],
        )],
    ]
    .concat();
    let tiles = (v("nk") + i(BK - 1)) / i(BK);
    let (first, end) = match piece {
        None => (i(0), tiles),
        Some(Piece { index, tiles: per }) => {
            (index.clone() * i(per), min(tiles, (index + i(1)) * i(per)))
        }
    };
    body.push(for_("jt", first, end, tile));
    body
}

/// The key tiles `index·tiles ..< (index + 1)·tiles` of a split decode attention.
struct Piece {
    index: Expr,
    tiles: usize,
}

/// Split decode: `(pieces, key tiles per piece)` when this attention is split.
fn decode_split(cx: &Ctx) -> Option<(usize, usize)> {
    let s = cx.decode_splits;
    if cx.phase != Phase::Decode || s <= 1 {
        return None;
    }
    let per = cx.context.div_ceil(BK).div_ceil(s).max(1);
    Some((s, per))
}

/// A piece's partial result, `[m, l, acc[0..width]]` at `part[row, ((head·S + piece)·(width +
/// 2)) ..]`, from the locals `attend_block` leaves (one query).
fn store_piece(pieces: usize, width: usize) -> Vec<Stmt> {
    let at = |k: Expr| [v("rq0"), (pid(1) * i(pieces) + pid(2)) * i(width + 2) + k];
    vec![
        st("part", at(i(0)), ld("m", [i(0)])),
        st("part", at(i(1)), ld("l", [i(0)])),
        for_par(
            "d",
            i(0),
            i(width),
            vec![st("part", at(i(2) + v("d")), ld("acc", [v("d")]))],
        ),
    ]
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

/// The rows of a block: prefill programs own `BQ` consecutive rows (clamped to the last row;
/// clamped duplicates are computed and not stored), decode programs one row. Binds `rq0..`,
/// `nq` (rows to store) and the slot `s`.
fn block_rows(cx: &Ctx) -> (usize, Vec<Stmt>) {
    let bq = match cx.phase {
        Phase::Prefill => BQ,
        Phase::Decode => 1,
    };
    let mut out = vec![
        let_("r0", pid(0) * i(bq)),
        let_("nq", min(i(bq), rows() - v("r0"))),
    ];
    for q in 0..bq {
        out.push(let_(&format!("rq{q}"), min(v("r0") + i(q), rows() - i(1))));
    }
    out.push(let_("s", ld("slot", [v("rq0")])));
    (bq, out)
}

/// `o[rq_q, head·width + d] = value(q)` (reading `d`) for the block's rows that are stored
/// (`q < nq`; clamped duplicates are not).
fn store_rows(bq: usize, width: usize, value: &dyn Fn(usize) -> Expr) -> Vec<Stmt> {
    (0..bq)
        .map(|q| {
            if_(
                lt(i(q), v("nq")),
                vec![for_par(
                    "d",
                    i(0),
                    i(width),
                    vec![st(
                        "o",
                        [v(&format!("rq{q}")), pid(1) * i(width) + v("d")],
                        value(q),
                    )],
                )],
            )
        })
        .collect()
}

fn block_grid(bq: usize, heads: usize) -> Vec<Dim> {
    if bq == 1 {
        vec![Dim::Rows, Dim::N(heads)]
    } else {
        vec![Dim::RowBlocks(bq), Dim::N(heads)]
    }
}

/// GQA: returns the cache write and the attend launch.
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
            gqa_flash(cx, n, ins, (hq, hkv, hd, vd), *scale, *cache),
        ];
    }
    let (bq, rows_block) = block_rows(cx);
    let terms = [Term {
        query: Box::new(|q, e| ld("q", [v(&format!("rq{q}")), pid(1) * i(hd) + e])),
        key: Box::new(|e| ld("cache", [v("s"), v("j"), v("kvh") * i(hd) + e])),
        len: hd,
    }];
    let value = |d: Expr| ld("cache", [v("s"), v("j"), i(kw) + v("kvh") * i(vd) + d]);
    let split = decode_split(cx);
    let mut inner = rows_block;
    inner.push(let_("kvh", pid(1) / i(hq / hkv)));
    let piece = split.map(|(_, per)| Piece {
        index: pid(2),
        tiles: per,
    });
    inner.extend(attend_block(bq, &terms, *scale, &value, vd, piece));
    if let Some((s, _)) = split {
        // Split decode: partials per piece, then the combine.
        inner.extend(store_piece(s, vd));
        let width = hq * s * (vd + 2);
        let part = cx.temp(width);
        let attend = launch(
            format!("gqa_attend_h{hq}x{hkv}_d{hd}_v{vd}_q1_split{s}"),
            vec![Dim::Rows, Dim::N(hq), Dim::N(s)],
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
    inner.extend(store_rows(bq, vd, &|q| {
        ld("acc", [i(q * vd) + v("d")]) / ld("l", [i(q)])
    }));
    let attend = launch(
        format!("gqa_attend_h{hq}x{hkv}_d{hd}_v{vd}_q{bq}"),
        block_grid(bq, hq),
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

/// Query rows per program of the flash-style GQA prefill.
pub const FLASH_Q: usize = 64;
/// Keys per tile of the flash-style GQA prefill.
pub const FLASH_K: usize = 32;

/// GQA prefill, flash-attention style: one program per ([`FLASH_Q`] query rows, head), keys
/// in tiles of [`FLASH_K`]: the query block and each key tile (values transposed) staged in
/// locals, the logits `Q Kᵀ` and the update `acc += P V` as `dot` tiles (tensor cores on a
/// GPU), the online softmax per query row in between (running max and sum, the accumulator
/// rescaled once per tile). The rows of a prefill launch are consecutive positions of one
/// sequence, so the last row sees the most keys: `pos[last] + 1`.
fn gqa_flash(
    cx: &Ctx,
    n: NodeIndex,
    ins: &[NodeIndex],
    (hq, hkv, hd, vd): (usize, usize, usize, usize),
    scale: f64,
    cache: lamina_ir::graph::StateId,
) -> Launch {
    let (fq, fk) = (FLASH_Q, FLASH_K);
    let kw = hkv * hd;
    let row = || v("r0") + v("t");
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
                            f(scale) * sc(v("jj")),
                        ),
                    ),
                ),
                let_("corr", exp(ld("m", [v("t")]) - v("m2"))),
                // Probabilities; zero past the row's position and past the tile (the product
                // below runs over the whole tile).
                for_(
                    "jj",
                    i(0),
                    v("nb"),
                    vec![st(
                        "sc",
                        [v("t") * i(fk) + v("jj")],
                        select(
                            visible(v("jj")),
                            exp(f(scale) * sc(v("jj")) - v("m2")),
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
                    i(vd),
                    vec![st(
                        "acc",
                        [v("t") * i(vd) + v("d")],
                        ld("acc", [v("t") * i(vd) + v("d")]) * v("corr"),
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
    // Key jj of the tile, clamped to the last key (a select below evaluates it past the tile).
    let j = || min(v("j0") + v("jj"), v("nk") - i(1));
    let key = |e: Expr| ld("cache", [v("s"), j(), v("kvh") * i(hd) + e]);
    let value = |d: Expr| ld("cache", [v("s"), j(), i(kw) + v("kvh") * i(vd) + d]);
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
                        i(hd),
                        vec![st("kt", [v("jj") * i(hd) + v("e")], key(v("e")))],
                    )],
                ),
                for_(
                    "d",
                    i(0),
                    i(vd),
                    vec![st(
                        "vt",
                        [v("d") * i(fk) + v("jj")],
                        select(lt(v("jj"), v("nb")), value(v("d")), f(0.0)),
                    )],
                ),
            ],
        ),
        dot(
            view("sc", i(0), fk),
            view("qt", i(0), hd),
            view("kt", i(0), hd),
            v("nq"),
            v("nb"),
            hd,
            false,
        ),
        for_par("t", i(0), v("nq"), softmax),
        dot(
            view("acc", i(0), vd),
            view("sc", i(0), fk),
            view("vt", i(0), fk),
            v("nq"),
            i(vd),
            fk,
            true,
        ),
    ];
    let body = vec![
        local("qt", fq * hd),
        local("kt", fk * hd),
        local("vt", vd * fk),
        local("sc", fq * fk),
        local("acc", fq * vd),
        local("m", fq),
        local("l", fq),
        let_("r0", pid(0) * i(fq)),
        let_("nq", min(i(fq), rows() - v("r0"))),
        let_("s", ld("slot", [v("r0")])),
        let_("kvh", pid(1) / i(hq / hkv)),
        let_("nk", ld("pos", [v("r0") + v("nq") - i(1)]) + i(1)),
        for_par(
            "t",
            i(0),
            v("nq"),
            vec![
                for_(
                    "e",
                    i(0),
                    i(hd),
                    vec![st(
                        "qt",
                        [v("t") * i(hd) + v("e")],
                        ld("q", [row(), pid(1) * i(hd) + v("e")]),
                    )],
                ),
                for_(
                    "d",
                    i(0),
                    i(vd),
                    vec![st("acc", [v("t") * i(vd) + v("d")], f(0.0))],
                ),
                st("m", [v("t")], f(f64::NEG_INFINITY)),
                st("l", [v("t")], f(0.0)),
            ],
        ),
        for_("jt", i(0), (v("nk") + i(fk - 1)) / i(fk), tile),
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
    ];
    launch(
        format!("gqa_flash_h{hq}x{hkv}_d{hd}_v{vd}_q{fq}_k{fk}"),
        vec![Dim::RowBlocks(fq), Dim::N(hq)],
        gqa_params(cx, ins, hq * hd, cache, (output("o", &act(hq * vd)), a(n))),
        body,
        vec![n],
        cx.graph,
    )
}

/// MLA (absorbed): returns the latent cache write and the attend launch.
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
    let wrow = |d: Expr| pid(1) * i(dn + vd) + d;
    let (bq, rows_block) = block_rows(cx);
    let terms = [
        Term {
            query: Box::new(|q, e| ld("qt", [i(q * r) + e])),
            key: Box::new(|e| ld("cache", [v("s"), v("j"), e])),
            len: r,
        },
        Term {
            query: Box::new(|q, e| ld("q", [v(&format!("rq{q}")), pid(1) * i(qk) + i(dn) + e])),
            key: Box::new(|e| ld("cache", [v("s"), v("j"), i(r) + e])),
            len: dr,
        },
    ];
    let value = |d: Expr| ld("cache", [v("s"), v("j"), d]);
    let mut body = rows_block;
    body.push(local("qt", bq * r));
    // q̃ = W_UK(h)ᵀ q_nope: [r] per query, accumulated row by row of W_UK (contiguous).
    for q in 0..bq {
        let qt = |e: Expr| ld("qt", [i(q * r) + e]);
        body.push(for_par(
            "e",
            i(0),
            i(r),
            vec![st("qt", [i(q * r) + v("e")], f(0.0))],
        ));
        body.push(for_(
            "d",
            i(0),
            i(dn),
            vec![
                let_(
                    "qd",
                    ld("q", [v(&format!("rq{q}")), pid(1) * i(qk) + v("d")]),
                ),
                for_par(
                    "e",
                    i(0),
                    i(r),
                    vec![st(
                        "qt",
                        [i(q * r) + v("e")],
                        qt(v("e")) + v("qd") * ld("kv_b", [wrow(v("d")), v("e")]),
                    )],
                ),
            ],
        ));
    }
    let split = decode_split(cx);
    let piece = split.map(|(_, per)| Piece {
        index: pid(2),
        tiles: per,
    });
    body.extend(attend_block(bq, &terms, *scale, &value, r, piece));
    if let Some((s, _)) = split {
        // Split decode: latent partials per piece; the combine normalises and maps back.
        body.extend(store_piece(s, r));
        let width = h_n * s * (r + 2);
        let part = cx.temp(width);
        let attend = launch(
            format!("mla_attend_h{h_n}_r{r}_nope{dn}_rope{dr}_v{vd}_q1_split{s}"),
            vec![Dim::Rows, Dim::N(h_n), Dim::N(s)],
            vec![
                (input("q", &act(h_n * qk)), a(ins[0])),
                cx.weight("kv_b", kv_b),
                cx.state("cache", *cache),
                (rows_i64("slot"), Bind::Slot),
                (rows_i64("pos"), Bind::Pos),
                (output("part", &act(width)), Bind::Act(part)),
            ],
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
                    ld("kv_b", [wrow(i(dn) + v("d")), v("e")]) * ld("ol", [v("e")]),
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
        return vec![write, attend, combine];
    }
    // o = W_UV(h) (acc / l).
    body.extend(store_rows(bq, vd, &|q| {
        sum(
            "e",
            i(0),
            i(r),
            ld("kv_b", [wrow(i(dn) + v("d")), v("e")]) * ld("acc", [i(q * r) + v("e")]),
        ) / ld("l", [i(q)])
    }));
    let attend = launch(
        format!("mla_attend_h{h_n}_r{r}_nope{dn}_rope{dr}_v{vd}_q{bq}"),
        block_grid(bq, h_n),
        vec![
            (input("q", &act(h_n * qk)), a(ins[0])),
            cx.weight("kv_b", kv_b),
            cx.state("cache", *cache),
            (rows_i64("slot"), Bind::Slot),
            (rows_i64("pos"), Bind::Pos),
            (output("o", &act(h_n * vd)), a(n)),
        ],
        body,
        vec![n],
        g,
    );
    vec![write, attend]
}
