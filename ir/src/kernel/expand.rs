//! Tile operations and MMA tiles rewritten into the loops they stand for: what the host target
//! lowers (LLVM vectorises the contiguous inner reductions). The loop variables start with `_`,
//! which kernel builders do not use.

use super::build::*;
use super::{Expr, Kernel, Mma, MmaKind, Stmt, TileOp, View};

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
    let body = rewrite(&k.body, false, &|s| match s {
        Stmt::Mma(m) if m.kind == MmaKind::F32 => Some(vec![Stmt::Mma(Box::new(Mma {
            kind,
            ..(**m).clone()
        }))]),
        Stmt::Tile(TileOp::Dot {
            out,
            a,
            b,
            m,
            n,
            depth,
            accumulate,
        }) if out.buf != a.buf && out.buf != b.buf => {
            Some(dot_tiles(kind, out, a, b, m, n, *depth, *accumulate))
        }
        _ => None,
    });
    Kernel { body, ..k.clone() }
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

/// `k` with every [`Stmt::Tile`] replaced by loops ([`Stmt::Mma`] kept: a GPU lowers it).
pub fn expand_tiles(k: &Kernel) -> Kernel {
    expand(k, false)
}

/// Tiles, and with `mma` the MMA tiles, as loops.
fn expand(k: &Kernel, mma: bool) -> Kernel {
    let body = rewrite(&k.body, true, &|s| match s {
        Stmt::Tile(op) => Some(tile(op)),
        Stmt::Mma(m) if mma => Some(expand_mma(m)),
        _ => None,
    });
    Kernel { body, ..k.clone() }
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
            vec![(if l.buf != x.buf { for_par } else { for_ })(
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
