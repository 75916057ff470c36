//! Tile operations and MMA tiles rewritten into the loops they stand for: what the host target
//! lowers (LLVM vectorises the contiguous inner reductions). The loop variables start with `_`,
//! which kernel builders do not use.

use super::build::*;
use super::{Attend, BinOp, Expr, Kernel, Mma, MmaKind, Stmt, TileOp, View};

/// `k` with every [`Stmt::Tile`] and [`Stmt::Mma`] replaced by loops.
pub fn expand_all(k: &Kernel) -> Kernel {
    expand(k, true)
}

/// Rows and columns of the MMA tiles [`dots_on_tensor_cores`] cuts a `dot` into.
pub const DOT_TILE: usize = 32;

/// `k` with every `dot` tile operation whose output is not one of its operands rewritten as
/// [`MmaKind::Tf32x3`] MMA tiles of [`DOT_TILE`]² (loops over the tile grid), and every
/// [`MmaKind::F32`] tile made `Tf32x3`: what a GPU runs on tensor cores. Near-f32 products:
/// the chunked recurrences and attention keep their precision. Dots inside split loops stay
/// (an MMA needs the whole warp; their loops are dealt to its lanes).
pub fn dots_on_tensor_cores(k: &Kernel) -> Kernel {
    dots_as_mma(k, MmaKind::Tf32x3)
}

/// [`dots_on_tensor_cores`] with the products formed as `kind` ([`MmaKind::Tf32x3`] or
/// [`MmaKind::Tf32`]).
pub fn dots_as_mma(k: &Kernel, kind: MmaKind) -> Kernel {
    // f32 tiles wherever they are (split tile loops too, `build::mma_tiles`); `dot`s outside
    // split loops (a lane's iterations cannot share a warp's MMA).
    let body = rewrite(&k.body, true, &|s| match s {
        Stmt::Mma(m) if m.kind == MmaKind::F32 => Some(vec![Stmt::Mma(Box::new(Mma {
            kind,
            ..(**m).clone()
        }))]),
        Stmt::Attend(a) if a.kind == MmaKind::F32 => Some(vec![Stmt::Attend(Box::new(Attend {
            kind,
            ..(**a).clone()
        }))]),
        _ => None,
    });
    let body = dots_in(&body, &mut Vec::new(), kind);
    Kernel { body, ..k.clone() }
}

/// `b` with its `dot`s outside split loops as MMA tiles of `kind`, those whose output does not
/// overlap an operand: a different buffer, or, for an operand in the output's buffer, one that
/// ends before the output begins. `lows` binds names in scope, innermost last: the enclosing
/// sequential loops' variables to their constant non-negative starts (lower bounds), and any
/// other binding of a name (a loop with another start, a carried value, a `let`) to `None`,
/// which hides an outer bound. The bounds place an output at `2048 + 16·a` past an operand at
/// `0..2048` (Kimi-Linear's sub-chunk products).
fn dots_in(b: &[Stmt], lows: &mut Vec<(String, Option<i64>)>, kind: MmaKind) -> Vec<Stmt> {
    let mark = lows.len();
    let mut out = Vec::new();
    for s in b {
        match s {
            Stmt::Tile(TileOp::Dot {
                out: o,
                a,
                b,
                m,
                n,
                depth,
                accumulate,
            }) if dot_apart(o, (a, m), (b, n), *depth, lows) => {
                out.extend(dot_tiles(kind, o, a, b, m, n, *depth, *accumulate))
            }
            Stmt::For {
                var,
                lo,
                hi,
                carried,
                body,
                yields,
                split: false,
            } => {
                let inner = lows.len();
                lows.push((var.clone(), constant(lo).filter(|c| *c >= 0)));
                lows.extend(carried.iter().map(|(n, _)| (n.clone(), None)));
                let body = dots_in(body, lows, kind);
                lows.truncate(inner);
                // Carried values stay bound after the loop.
                lows.extend(carried.iter().map(|(n, _)| (n.clone(), None)));
                out.push(Stmt::For {
                    var: var.clone(),
                    lo: lo.clone(),
                    hi: hi.clone(),
                    carried: carried.clone(),
                    body,
                    yields: yields.clone(),
                    split: false,
                });
            }
            Stmt::If { cond, then } => out.push(Stmt::If {
                cond: cond.clone(),
                then: dots_in(then, lows, kind),
            }),
            Stmt::Let(name, _) => {
                lows.push((name.clone(), None));
                out.push(s.clone());
            }
            other => out.push(other.clone()),
        }
    }
    lows.truncate(mark);
    out
}

/// Whether a `dot` writing `out` reads no element of it: each operand (a view and its row
/// count) in another buffer, or ending, at its last row's last element read, before `out`'s
/// lowest offset.
fn dot_apart(
    out: &View,
    a: (&View, &Expr),
    b: (&View, &Expr),
    depth: usize,
    lows: &[(String, Option<i64>)],
) -> bool {
    [a, b].into_iter().all(|(op, rows)| {
        if op.buf != out.buf {
            return true;
        }
        let (Some(start), Some(rows), Some(low)) =
            (constant(&op.off), bound(rows), lower(&out.off, lows))
        else {
            return false;
        };
        rows <= 0 || start + (rows - 1) * op.ld as i64 + depth as i64 <= low
    })
}

/// A lower bound on `e`: constants, variables with a bound in `lows`, sums, and products of
/// non-negative bounds.
fn lower(e: &Expr, lows: &[(String, Option<i64>)]) -> Option<i64> {
    match e {
        Expr::Var(v) => lows.iter().rev().find(|(n, _)| n == v)?.1,
        Expr::Bin(BinOp::Add, a, b) => lower(a, lows)?.checked_add(lower(b, lows)?),
        Expr::Bin(BinOp::Mul, a, b) => {
            let (x, y) = (lower(a, lows)?, lower(b, lows)?);
            (x >= 0 && y >= 0).then(|| x.checked_mul(y)).flatten()
        }
        _ => constant(e),
    }
}

/// `out (+)= a bᵀ` over `m × n` as a grid of MMA tiles (uniform loops: every lane of a warp
/// runs them alike).
#[allow(clippy::too_many_arguments)]
fn dot_tiles(
    kind: MmaKind,
    out: &View,
    a: &View,
    b: &View,
    m: &Expr,
    n: &Expr,
    depth: usize,
    accumulate: bool,
) -> Vec<Stmt> {
    vec![mma_tiles(
        kind,
        Tiling::Warp,
        m.clone(),
        n.clone(),
        depth,
        &|r, k| at(a, r, k),
        &|c, k| at(b, c, k),
        &|r, c, acc| {
            let value = if accumulate {
                at(out, r.clone(), c.clone()) + acc
            } else {
                acc
            };
            vec![set(out, r, c, value)]
        },
    )]
}

/// `k` with every [`Stmt::Tile`] and [`Stmt::Attend`] replaced by loops ([`Stmt::Mma`] kept: a
/// GPU lowers it).
pub fn expand_tiles(k: &Kernel) -> Kernel {
    expand(k, false)
}

/// Tiles and attention blocks, and with `mma` the MMA tiles, as loops (an attention block's
/// products become MMA tiles, expanded too with `mma`).
fn expand(k: &Kernel, mma: bool) -> Kernel {
    let body = rewrite(&k.body, true, &|s| match s {
        Stmt::Tile(op) => Some(tile(op)),
        Stmt::Attend(a) if mma => Some(rewrite(&expand_attend(a), true, &|s| match s {
            Stmt::Mma(m) => Some(expand_mma(m)),
            _ => None,
        })),
        Stmt::Attend(a) => Some(expand_attend(a)),
        Stmt::Mma(m) if mma => Some(expand_mma(m)),
        _ => None,
    });
    Kernel { body, ..k.clone() }
}

/// The attention block as loops: [`attend_loops`], then per valid row `t` and value column
/// `d` the epilogue with `out = acc[t·vw + d] / l[t]`.
pub fn expand_attend(a: &Attend) -> Vec<Stmt> {
    let mut out = attend_loops(a);
    let mut element = vec![let_(
        &a.out,
        ld("acc", [v(&a.t) * i(a.vw) + v(&a.d)]) / ld("l", [v(&a.t)]),
    )];
    element.extend(a.epilogue.iter().cloned());
    out.push(for_par(
        &a.t,
        i(0),
        a.m.clone(),
        vec![for_(&a.d, i(0), i(a.vw), element)],
    ));
    out
}

/// The loops of an attention block, as f32 locals hold its state: the tile's logits and
/// probabilities `sc` (`rows × key_tile`), the accumulator `acc` (`rows × vw`), and per block
/// row the running max `m`, sum `l` and the tile's correction `corr`. Declares them, zeroes
/// the rows `t < m`, then per key tile: the logits as an MMA tile, the online softmax per row
/// (probabilities zero past the row's keys and the tile's), the update `acc = corr·acc + P·V`
/// as an MMA tile. Leaves row `t`'s unnormalised output in `acc[t·vw + d]`, its sum in `l[t]`
/// and its max in `m[t]`: what an attention whose epilogue needs more than `out` (a split
/// piece's partial results, MLA's `W_UV` product) builds on.
pub fn attend_loops(a: &Attend) -> Vec<Stmt> {
    let (rows, fk, qk, vw) = (a.rows, a.key_tile, a.qk, a.vw);
    let query = |t: Expr, e: Expr| a.query.substitute(&[(&a.t, t), (&a.e, e)]);
    let key = |j: Expr, e: Expr| a.key.substitute(&[(&a.j, j), (&a.e, e)]);
    let value = |j: Expr, d: Expr| a.value.substitute(&[(&a.j, j), (&a.d, d)]);
    let sees = |t: Expr| a.sees.substitute(&[(&a.t, t)]);
    let sc = |jj: Expr| ld("sc", [v("t") * i(fk) + jj]);
    let zero_sc = |lo: Expr| {
        for_(
            "jj",
            lo,
            i(fk),
            vec![st("sc", [v("t") * i(fk) + v("jj")], f(0.0))],
        )
    };
    // Key jj of the tile is visible to row t: position j0 + jj < pt.
    let visible = |jj: Expr| lt(v("j0") + jj, v("pt"));
    let softmax = vec![
        let_("pt", sees(v("t"))),
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
                            f(a.scale) * sc(v("jj")),
                        ),
                    ),
                ),
                let_("c", exp(ld("m", [v("t")]) - v("m2"))),
                // Probabilities; zero past the row's keys and past the tile (the product
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
                            exp(f(a.scale) * sc(v("jj")) - v("m2")),
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
        let_("nb", min(i(fk), a.keys.clone() - v("j0"))),
        mma_tiles(
            a.kind,
            Tiling::Warp,
            a.m.clone(),
            v("nb"),
            qk,
            &query,
            &|c, e| key(v("j0") + c, e),
            &|t, c, acc| vec![st("sc", [t * i(fk) + c], acc)],
        ),
        for_par("t", i(0), a.m.clone(), softmax),
        // Keys past the tile's last are clamped to it (their probabilities are zero).
        mma_tiles(
            a.kind,
            Tiling::Warp,
            a.m.clone(),
            i(vw),
            fk,
            &|t, jj| ld("sc", [t * i(fk) + jj]),
            &|d, jj| value(min(v("j0") + jj, a.keys.clone() - i(1)), d),
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
    vec![
        local("sc", rows * fk),
        local("acc", rows * vw),
        local("m", rows),
        local("l", rows),
        local("corr", rows),
        for_par(
            "t",
            i(0),
            a.m.clone(),
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
        ),
        for_("jt", a.tiles.0.clone(), a.tiles.1.clone(), tile),
    ]
}

/// `b` with every statement `f` rewrites (`Some`) replaced by the statements it returns,
/// looking inside loop and branch bodies (inside split loops only with `into_split`); the
/// replacements themselves are not rewritten again.
fn rewrite(b: &[Stmt], into_split: bool, f: &dyn Fn(&Stmt) -> Option<Vec<Stmt>>) -> Vec<Stmt> {
    b.iter()
        .flat_map(|s| {
            if let Some(r) = f(s) {
                return r;
            }
            match s {
                Stmt::For {
                    var,
                    lo,
                    hi,
                    carried,
                    body,
                    yields,
                    split,
                } if into_split || !split => vec![Stmt::For {
                    var: var.clone(),
                    lo: lo.clone(),
                    hi: hi.clone(),
                    carried: carried.clone(),
                    body: rewrite(body, into_split, f),
                    yields: yields.clone(),
                    split: *split,
                }],
                Stmt::If { cond, then } => vec![Stmt::If {
                    cond: cond.clone(),
                    then: rewrite(then, into_split, f),
                }],
                other => vec![other.clone()],
            }
        })
        .collect()
}

/// The MMA tile as loops: rows in parallel (each element's epilogue writes only its own
/// outputs), columns in order, the sum over the depth with the products formed as the kind
/// says.
fn expand_mma(m: &Mma) -> Vec<Stmt> {
    let product = match m.kind {
        MmaKind::Bf16 => bf16(m.a.clone()) * bf16(m.b.clone()),
        MmaKind::Tf32x3 => {
            let (a, b) = (m.a.clone(), m.b.clone());
            let (a_hi, b_hi) = (tf32(a.clone()), tf32(b.clone()));
            let a_lo = tf32(a - a_hi.clone());
            let b_lo = tf32(b - b_hi.clone());
            a_hi.clone() * b_hi.clone() + a_hi * b_lo + a_lo * b_hi
        }
        MmaKind::F32 => m.a.clone() * m.b.clone(),
        MmaKind::Tf32 => tf32_round(m.a.clone()) * tf32_round(m.b.clone()),
    };
    let mut body = vec![let_(&m.acc, sum(&m.k, i(0), i(m.depth), product))];
    body.extend(m.epilogue.iter().cloned());
    vec![for_par(
        &m.i,
        i(0),
        m.m.clone(),
        vec![for_(&m.j, i(0), m.n.clone(), body)],
    )]
}

/// Element `(r, c)` of a view.
/// Whether a triangular solve's `l` (read strictly below the diagonal, rows `< n`) may share
/// elements with its `x` (rows `< n`, `cols` columns): when they are views of one buffer, unless
/// constant offsets and a constant bound on `n` (`n` is a constant or a `min` with one) place
/// them apart, as in a chunk kernel that keeps `M_kk` and `T` in one local.
fn solve_overlaps(l: &View, x: &View, n: &Expr, cols: usize) -> bool {
    if l.buf != x.buf {
        return false;
    }
    let (Some(lo), Some(xo), Some(rows)) = (constant(&l.off), constant(&x.off), bound(n)) else {
        return true;
    };
    if rows <= 0 {
        return false;
    }
    // Elements [start, end) each view touches.
    let l_end = lo + (rows - 1) * l.ld as i64 + (rows - 1);
    let x_end = xo + (rows - 1) * x.ld as i64 + cols as i64;
    !(l_end <= xo || x_end <= lo)
}

/// `e`'s value when it is made of integer constants.
fn constant(e: &Expr) -> Option<i64> {
    match e {
        Expr::I(c) => Some(*c),
        Expr::Bin(op, a, b) => {
            let (a, b) = (constant(a)?, constant(b)?);
            match op {
                BinOp::Add => a.checked_add(b),
                BinOp::Sub => a.checked_sub(b),
                BinOp::Mul => a.checked_mul(b),
                BinOp::Min => Some(a.min(b)),
                BinOp::Max => Some(a.max(b)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// An upper bound on `e`: a constant, or the least bound of a `min`'s operands.
pub(crate) fn bound(e: &Expr) -> Option<i64> {
    match e {
        Expr::Bin(BinOp::Min, a, b) => match (bound(a), bound(b)) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        },
        _ => constant(e),
    }
}

fn at(w: &View, r: Expr, c: Expr) -> Expr {
    ld(&w.buf, [w.off.clone() + r * i(w.ld) + c])
}

fn set(w: &View, r: Expr, c: Expr, value: Expr) -> Stmt {
    st(&w.buf, [w.off.clone() + r * i(w.ld) + c], value)
}

fn tile(op: &TileOp) -> Vec<Stmt> {
    match op {
        TileOp::Dot {
            out,
            a,
            b,
            m,
            n,
            depth,
            accumulate,
        } => {
            let dot = sum(
                "_tk",
                i(0),
                i(*depth),
                at(a, v("_ti"), v("_tk")) * at(b, v("_tj"), v("_tk")),
            );
            let value = if *accumulate {
                at(out, v("_ti"), v("_tj")) + dot
            } else {
                dot
            };
            // Rows of the output are independent unless it overlaps an operand.
            let rows = if out.buf != a.buf && out.buf != b.buf {
                for_par
            } else {
                for_
            };
            vec![rows(
                "_ti",
                i(0),
                m.clone(),
                vec![for_(
                    "_tj",
                    i(0),
                    n.clone(),
                    vec![set(out, v("_ti"), v("_tj"), value)],
                )],
            )]
        }
        // Columns are independent (rows in order).
        TileOp::Cumsum { x, rows, cols } => vec![for_(
            "_tt",
            i(1),
            rows.clone(),
            vec![for_par(
                "_tc",
                i(0),
                i(*cols),
                vec![set(
                    x,
                    v("_tt"),
                    v("_tc"),
                    at(x, v("_tt"), v("_tc")) + at(x, v("_tt") - i(1), v("_tc")),
                )],
            )],
        )],
        // Columns are independent (rows in order) unless `l` overlaps `x`.
        TileOp::TriSolve { l, x, n, cols } => vec![for_(
            "_ti",
            i(0),
            n.clone(),
            vec![(if !solve_overlaps(l, x, n, *cols) {
                for_par
            } else {
                for_
            })(
                "_tc",
                i(0),
                i(*cols),
                vec![set(
                    x,
                    v("_ti"),
                    v("_tc"),
                    at(x, v("_ti"), v("_tc"))
                        - sum(
                            "_tj",
                            i(0),
                            v("_ti"),
                            at(l, v("_ti"), v("_tj")) * at(x, v("_tj"), v("_tc")),
                        ),
                )],
            )],
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_columns(l: View, x: View, n: Expr) -> bool {
        let solve = tile(&TileOp::TriSolve { l, x, n, cols: 64 });
        let [Stmt::For { body, .. }] = &solve[..] else {
            panic!("a row loop")
        };
        matches!(&body[..], [Stmt::For { split: true, .. }])
    }

    fn kernel(body: Vec<Stmt>) -> Kernel {
        Kernel {
            name: "k".into(),
            nodes: vec![],
            grid: vec![super::super::Dim::N(1)],
            params: vec![],
            body,
        }
    }

    /// A `dot` whose output shares a buffer with an operand becomes MMA tiles when the operand
    /// ends before the output begins, by the bounds of the loops around it; else it stays a
    /// `dot` (expanded as sequential loops).
    #[test]
    fn dots_writing_past_their_operand_become_tiles() {
        let dot_at = |out_off: Expr, rows: Expr| {
            dot(
                view("blk", out_off, 64),
                view("sub", i(0), 128),
                view("blk", i(0), 128),
                rows,
                i(16),
                128,
                false,
            )
        };
        let tiles = |s: Stmt| {
            let k = dots_on_tensor_cores(&kernel(vec![for_("a", i(0), i(4), vec![s])]));
            let Stmt::For { body, .. } = &k.body[0] else {
                panic!("the loop")
            };
            !matches!(&body[0], Stmt::Tile(_))
        };
        // Rows 0..16 of a 128-wide operand end at 2048: an output at 2048 + 16a is past them.
        assert!(tiles(dot_at(i(2048) + v("a") * i(16), min(i(16), v("l")))));
        // One element lower, or below the operand, or a variable without a bound: a `dot`.
        assert!(!tiles(dot_at(i(2047) + v("a") * i(16), min(i(16), v("l")))));
        assert!(!tiles(dot_at(i(0), min(i(16), v("l")))));
        assert!(!tiles(dot_at(i(2048) + v("z") * i(16), min(i(16), v("l")))));
        // A let of the loop's name hides its bound.
        let k = dots_on_tensor_cores(&kernel(vec![for_(
            "a",
            i(0),
            i(4),
            vec![
                let_("a", i(0) - i(64)),
                dot_at(i(2048) + v("a") * i(16), i(16)),
            ],
        )]));
        let Stmt::For { body, .. } = &k.body[0] else {
            panic!("the loop")
        };
        assert!(matches!(&body[1], Stmt::Tile(_)));
        // So do an inner loop of the same name from a negative start, a carried value of the
        // name (inside its loop and after it), and nothing leaks out of an inner block.
        let still_a_dot = |body: Vec<Stmt>| {
            let k = dots_on_tensor_cores(&kernel(vec![for_("a", i(0), i(4), body)]));
            format!("{:?}", k.body).contains("Tile(Dot")
        };
        let d = || dot_at(i(2048) + v("a") * i(16), i(16));
        assert!(!still_a_dot(vec![d()]));
        assert!(still_a_dot(vec![for_("a", i(0) - i(64), i(0), vec![d()])]));
        let carry = |body: Vec<Stmt>| {
            for_carry(
                "s",
                i(0),
                i(1),
                vec![("a", i(0) - i(64))],
                body,
                vec![v("a")],
            )
        };
        assert!(still_a_dot(vec![carry(vec![d()])]));
        assert!(still_a_dot(vec![carry(vec![]), d()]));
        let leak = kernel(vec![
            let_("b", i(0) - i(64)),
            for_("b", i(0), i(1), vec![let_("a", i(0))]),
            dot_at(i(2048) + v("b") * i(16), i(16)),
        ]);
        assert!(format!("{:?}", dots_on_tensor_cores(&leak).body).contains("Tile(Dot"));
    }

    /// A triangular solve's columns are solved in parallel unless `l` may overlap `x`: two
    /// views of one local far enough apart for the bound on the rows (a chunk kernel's `M_kk`
    /// and `T`) do not.
    #[test]
    fn solves_of_disjoint_views_split_their_columns() {
        let rows = || min(i(64), v("l"));
        assert!(split_columns(
            view("a", i(0), 64),
            view("b", i(0), 64),
            v("l")
        ));
        assert!(split_columns(
            view("q", i(0), 64),
            view("q", i(4096) + i(0), 64),
            rows()
        ));
        // One element of overlap, an unbounded row count, a variable offset: in order.
        assert!(!split_columns(
            view("q", i(0), 64),
            view("q", i(4031), 64),
            rows()
        ));
        assert!(!split_columns(
            view("q", i(0), 64),
            view("q", i(4096), 64),
            v("l")
        ));
        assert!(!split_columns(
            view("q", v("o"), 64),
            view("q", i(4096), 64),
            rows()
        ));
    }
}
