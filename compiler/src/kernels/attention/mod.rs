//! Rotary embeddings, GQA and MLA.
//!
//! Attention is two kernels: the cache write (`[slots, context, entry]` pool, one program per
//! row) and the attend kernel, one program per (row, head), with an online softmax over the
//! cached positions `0..=pos` in tiles of `BK` keys (the tile's logits in a local, the running
//! max and sum corrected once per tile, one pass over K and V). MLA attends in the
//! absorbed form: `q̃ = W_UKᵀ q_nope` against the latent cache, the latent-space output mapped
//! back with `W_UV`, so keys and values are never expanded.
//!
//! Prefill is flash-attention style instead ([`flash`], GQA and MLA): 64 query rows per
//! program, the logits and the value products of each 32-key tile as `dot` tiles (tensor cores
//! on a GPU). The one-query programs of [`attend_block`] serve decode.
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

/// One term of the logits: `Σ_e query(e) · key(e)` over `e ∈ 0..len`, where `key` reads
/// element `e` of key `j`.
struct Term<'a> {
    query: Box<dyn Fn(Expr) -> Expr + 'a>,
    key: Box<dyn Fn(Expr) -> Expr + 'a>,
    len: usize,
}

/// The attend loop of one decode query (row `rq`, slot `s`, bound by the caller): keys
/// `0..=pos` in tiles of [`BK`], one key per lane for the logits (each term one pass over
/// the key), the running max and sum corrected once per tile, then one value column per lane
/// (`value(j, d)`: element `d` of value `j`), the tile's weighted sum in a register. With a
/// `piece`, only that piece's tiles. Leaves `acc[d]` and `l[0]` in locals.
fn attend_block(
    terms: &[Term],
    scale: f64,
    value: &dyn Fn(Expr, Expr) -> Expr,
    width: usize,
    piece: Option<Piece>,
) -> Vec<Stmt> {
    let key = || let_("j", v("j0") + v("jj"));
    let sc = |jj: Expr| ld("sc", [jj]);
    let mut body = vec![
        local("acc", width),
        local("sc", BK),
        local("m", 1),
        local("l", 1),
        for_par("d", i(0), i(width), vec![st("acc", [v("d")], f(0.0))]),
        st("m", [i(0)], f(f64::NEG_INFINITY)),
        st("l", [i(0)], f(0.0)),
        let_("nk", ld("pos", [v("rq")]) + i(1)),
    ];
    // The logits of key j, one pass per term (every key of a tile is below `nk`).
    let mut logits = vec![key()];
    for (t, term) in terms.iter().enumerate() {
        let name = format!("s{t}");
        logits.push(for_carry(
            "e",
            i(0),
            i(term.len),
            vec![(name.as_str(), f(0.0))],
            vec![let_("kj", (term.key)(v("e")))],
            vec![v(&name) + (term.query)(v("e")) * v("kj")],
        ));
    }
    let total = (0..terms.len())
        .map(|t| v(&format!("s{t}")))
        .reduce(|a, b| a + b)
        .unwrap_or(f(0.0));
    logits.push(st("sc", [v("jj")], f(scale) * total));
    let tile = vec![
        let_("j0", v("jt") * i(BK)),
        let_("nb", min(i(BK), v("nk") - v("j0"))),
        // One key per lane: the logits of different keys are independent.
        for_par("jj", i(0), v("nb"), logits),
        let_(
            "m2",
            max(ld("m", [i(0)]), max_over("jj", i(0), v("nb"), sc(v("jj")))),
        ),
        let_("corr", exp(ld("m", [i(0)]) - v("m2"))),
        for_par(
            "jj",
            i(0),
            v("nb"),
            vec![st("sc", [v("jj")], exp(sc(v("jj")) - v("m2")))],
        ),
        st(
            "l",
            [i(0)],
            ld("l", [i(0)]) * v("corr") + sum("jj", i(0), v("nb"), sc(v("jj"))),
        ),
        st("m", [i(0)], v("m2")),
        // One lane per value column: the tile's weighted values summed in a register, the
        // accumulator rescaled and updated once per tile.
        for_par(
            "d",
            i(0),
            i(width),
            vec![st(
                "acc",
                [v("d")],
                ld("acc", [v("d")]) * v("corr")
                    + sum(
                        "jj",
                        i(0),
                        v("nb"),
                        sc(v("jj")) * value(v("j0") + v("jj"), v("d")),
                    ),
            )],
        ),
    ];
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
    let at = |k: Expr| [v("rq"), (pid(1) * i(pieces) + pid(2)) * i(width + 2) + k];
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

/// A decode program's row `rq` (grid dimension 0) and its slot `s`.
fn decode_row() -> Vec<Stmt> {
    vec![let_("rq", pid(0)), let_("s", ld("slot", [v("rq")]))]
}

/// `o[rq, head·width + d] = value(d)`.
fn store_row(width: usize, value: &dyn Fn(Expr) -> Expr) -> Stmt {
    for_par(
        "d",
        i(0),
        i(width),
        vec![st(
            "o",
            [v("rq"), pid(1) * i(width) + v("d")],
            value(v("d")),
        )],
    )
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
            flash::gqa(cx, n, ins, (hq, hkv, hd, vd), *scale, *cache),
        ];
    }
    let terms = [Term {
        query: Box::new(|e| ld("q", [v("rq"), pid(1) * i(hd) + e])),
        key: Box::new(|e| ld("cache", [v("s"), v("j"), v("kvh") * i(hd) + e])),
        len: hd,
    }];
    let value = |j: Expr, d: Expr| ld("cache", [v("s"), j, i(kw) + v("kvh") * i(vd) + d]);
    let split = decode_split(cx);
    let mut inner = decode_row();
    inner.push(let_("kvh", pid(1) / i(hq / hkv)));
    let piece = split.map(|(_, per)| Piece {
        index: pid(2),
        tiles: per,
    });
    inner.extend(attend_block(&terms, *scale, &value, vd, piece));
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
    inner.push(store_row(vd, &|d| ld("acc", [d]) / ld("l", [i(0)])));
    let attend = launch(
        format!("gqa_attend_h{hq}x{hkv}_d{hd}_v{vd}_q1"),
        vec![Dim::Rows, Dim::N(hq)],
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

/// The parameters of an MLA attend kernel: the queries (`q_cols` wide), `kv_b` (W_UK and
/// W_UV), the latent cache, the rows' slots and positions, then `out`.
fn mla_params(
    cx: &Ctx,
    ins: &[NodeIndex],
    q_cols: usize,
    kv_b: &str,
    cache: lamina_ir::graph::StateId,
    out: (lamina_ir::kernel::Param, Bind),
) -> Vec<(lamina_ir::kernel::Param, Bind)> {
    vec![
        (input("q", &act(q_cols)), a(ins[0])),
        cx.weight("kv_b", kv_b),
        cx.state("cache", cache),
        (rows_i64("slot"), Bind::Slot),
        (rows_i64("pos"), Bind::Pos),
        out,
    ]
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
    if cx.phase == Phase::Prefill {
        let shape = flash::MlaShape {
            heads: h_n,
            rank: r,
            nope: dn,
            rope: dr,
            v_dim: vd,
        };
        return vec![write, flash::mla(cx, n, ins, &shape, *scale, kv_b, *cache)];
    }
    let wrow = |d: Expr| pid(1) * i(dn + vd) + d;
    let terms = [
        Term {
            query: Box::new(|e| ld("qt", [e])),
            key: Box::new(|e| ld("cache", [v("s"), v("j"), e])),
            len: r,
        },
        Term {
            query: Box::new(|e| ld("q", [v("rq"), pid(1) * i(qk) + i(dn) + e])),
            key: Box::new(|e| ld("cache", [v("s"), v("j"), i(r) + e])),
            len: dr,
        },
    ];
    let value = |j: Expr, d: Expr| ld("cache", [v("s"), j, d]);
    let mut body = decode_row();
    body.push(local("qt", r));
    // q̃ = W_UK(h)ᵀ q_nope: [r], one latent column per lane summed in a register (the lanes
    // read consecutive elements of each row of W_UK).
    body.push(for_par(
        "e",
        i(0),
        i(r),
        vec![st(
            "qt",
            [v("e")],
            sum(
                "d",
                i(0),
                i(dn),
                ld("q", [v("rq"), pid(1) * i(qk) + v("d")]) * ld("kv_b", [wrow(v("d")), v("e")]),
            ),
        )],
    ));
    let split = decode_split(cx);
    let piece = split.map(|(_, per)| Piece {
        index: pid(2),
        tiles: per,
    });
    body.extend(attend_block(&terms, *scale, &value, r, piece));
    if let Some((s, _)) = split {
        // Split decode: latent partials per piece; the combine normalises and maps back.
        body.extend(store_piece(s, r));
        let width = h_n * s * (r + 2);
        let part = cx.temp(width);
        let attend = launch(
            format!("mla_attend_h{h_n}_r{r}_nope{dn}_rope{dr}_v{vd}_q1_split{s}"),
            vec![Dim::Rows, Dim::N(h_n), Dim::N(s)],
            mla_params(
                cx,
                ins,
                h_n * qk,
                kv_b,
                *cache,
                (output("part", &act(width)), Bind::Act(part)),
            ),
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
    body.push(store_row(vd, &|d| {
        sum(
            "e",
            i(0),
            i(r),
            ld("kv_b", [wrow(i(dn) + d), v("e")]) * ld("acc", [v("e")]),
        ) / ld("l", [i(0)])
    }));
    let attend = launch(
        format!("mla_attend_h{h_n}_r{r}_nope{dn}_rope{dr}_v{vd}_q1"),
        vec![Dim::Rows, Dim::N(h_n)],
        mla_params(
            cx,
            ins,
            h_n * qk,
            kv_b,
            *cache,
            (output("o", &act(h_n * vd)), a(n)),
        ),
        body,
        vec![n],
        g,
    );
    vec![write, attend]
}
