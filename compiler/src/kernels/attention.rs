//! Rotary embeddings, GQA and MLA.
//!
//! Attention is two kernels: the cache write (`[slots, context, entry]` pool, one program per
//! row) and the attend kernel, one program per (row, head), with an online softmax over the
//! cached positions `0..=pos` in tiles of `BK` keys (the tile's logits in a local, the running
//! max and sum corrected once per tile, one pass over K and V). MLA attends in the
//! absorbed form: `q̃ = W_UKᵀ q_nope` against the latent cache, the latent-space output mapped
//! back with `W_UV`, so keys and values are never expanded.

use lamina_ir::graph::{NodeIndex, Op};
use lamina_ir::kernel::build::*;
use lamina_ir::kernel::{Dim, Expr, Stmt};
use lamina_ir::spec::RopeStyle;

use super::{act, launch, rows_i64, Bind, Ctx, Launch, Value};

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

/// Online softmax over positions `0..=pos` in tiles of [`BK`] keys: a tile's logits
/// (`score`, with the key index bound as `j`) go to the local `sc`, the running max and sum are
/// corrected once per tile, and `acc` (a local of `width`) accumulates `Σ p_j value(j, d)`;
/// leaves `l` (the sum) bound. Needs locals `acc[width]` and `sc[BK]`.
fn online_softmax(score: Expr, value: impl Fn(Expr) -> Expr, width: usize) -> Vec<Stmt> {
    let key = || let_("j", v("j0") + v("jj"));
    vec![
        for_("d", i(0), i(width), vec![st("acc", [v("d")], f(0.0))]),
        let_("nk", ld("pos", [pid(0)]) + i(1)),
        for_carry(
            "jt",
            i(0),
            (v("nk") + i(BK - 1)) / i(BK),
            vec![("m", f(f64::NEG_INFINITY)), ("l", f(0.0))],
            vec![
                let_("j0", v("jt") * i(BK)),
                let_("nb", min(i(BK), v("nk") - v("j0"))),
                for_("jj", i(0), v("nb"), vec![key(), st("sc", [v("jj")], score)]),
                let_(
                    "m2",
                    max(v("m"), max_over("jj", i(0), v("nb"), ld("sc", [v("jj")]))),
                ),
                let_("corr", exp(v("m") - v("m2"))),
                for_(
                    "jj",
                    i(0),
                    v("nb"),
                    vec![st("sc", [v("jj")], exp(ld("sc", [v("jj")]) - v("m2")))],
                ),
                for_(
                    "d",
                    i(0),
                    i(width),
                    vec![st("acc", [v("d")], ld("acc", [v("d")]) * v("corr"))],
                ),
                for_(
                    "jj",
                    i(0),
                    v("nb"),
                    vec![
                        key(),
                        let_("pj", ld("sc", [v("jj")])),
                        for_(
                            "d",
                            i(0),
                            i(width),
                            vec![st(
                                "acc",
                                [v("d")],
                                ld("acc", [v("d")]) + v("pj") * value(v("d")),
                            )],
                        ),
                    ],
                ),
            ],
            vec![
                v("m2"),
                v("l") * v("corr") + sum("jj", i(0), v("nb"), ld("sc", [v("jj")])),
            ],
        ),
    ]
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
    let score = f(*scale)
        * sum(
            "e",
            i(0),
            i(hd),
            ld("q", [pid(0), pid(1) * i(hd) + v("e")])
                * ld("cache", [v("s"), v("j"), v("kvh") * i(hd) + v("e")]),
        );
    let value = |d: Expr| ld("cache", [v("s"), v("j"), i(kw) + v("kvh") * i(vd) + d]);
    let mut body = vec![
        local("acc", vd),
        local("sc", BK),
        let_("s", ld("slot", [pid(0)])),
        let_("kvh", pid(1) / i(hq / hkv)),
    ];
    body.extend(online_softmax(score, value, vd));
    body.push(for_(
        "d",
        i(0),
        i(vd),
        vec![st(
            "o",
            [pid(0), pid(1) * i(vd) + v("d")],
            ld("acc", [v("d")]) / v("l"),
        )],
    ));
    let attend = launch(
        format!("gqa_attend_h{hq}x{hkv}_d{hd}_v{vd}"),
        vec![Dim::Rows, Dim::N(hq)],
        vec![
            (input("q", &act(hq * hd)), a(ins[0])),
            cx.state("cache", *cache),
            (rows_i64("slot"), Bind::Slot),
            (rows_i64("pos"), Bind::Pos),
            (output("o", &act(hq * vd)), a(n)),
        ],
        body,
        vec![n],
        g,
    );
    vec![write, attend]
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
    let score = f(*scale)
        * (sum(
            "e",
            i(0),
            i(r),
            ld("qt", [v("e")]) * ld("cache", [v("s"), v("j"), v("e")]),
        ) + sum(
            "e",
            i(0),
            i(dr),
            ld("q", [pid(0), pid(1) * i(qk) + i(dn) + v("e")])
                * ld("cache", [v("s"), v("j"), i(r) + v("e")]),
        ));
    let value = |d: Expr| ld("cache", [v("s"), v("j"), d]);
    let mut body = vec![
        local("qt", r),
        local("acc", r),
        local("sc", BK),
        let_("s", ld("slot", [pid(0)])),
        // q̃ = W_UK(h)ᵀ q_nope: [r].
        for_(
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
                    ld("q", [pid(0), pid(1) * i(qk) + v("d")]) * ld("kv_b", [wrow(v("d")), v("e")]),
                ),
            )],
        ),
    ];
    body.extend(online_softmax(score, value, r));
    // o = W_UV(h) (acc / l).
    body.push(for_(
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
                ld("kv_b", [wrow(i(dn) + v("d")), v("e")]) * ld("acc", [v("e")]),
            ) / v("l"),
        )],
    ));
    let attend = launch(
        format!("mla_attend_h{h_n}_r{r}_nope{dn}_rope{dr}_v{vd}"),
        vec![Dim::Rows, Dim::N(h_n)],
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
