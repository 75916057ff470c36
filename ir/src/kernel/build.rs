//! Constructors that keep kernel builders close to the math: `ld("x", [r, c]) * f(0.5)`.

use std::ops::{Add, Div, Mul, Neg, Sub};

use super::{
    Access, BinOp, CmpOp, Dim, Elem, Expr, Mma, MmaKind, Param, ReduceOp, Stmt, TileOp, UnOp, View,
};

pub fn f(v: f64) -> Expr {
    Expr::F(v)
}

pub fn i(v: usize) -> Expr {
    Expr::I(v as i64)
}

pub fn v(name: &str) -> Expr {
    Expr::Var(name.to_string())
}

pub fn pid(axis: usize) -> Expr {
    Expr::Pid(axis)
}

pub fn rows() -> Expr {
    Expr::Rows
}

pub fn ld<const N: usize>(buf: &str, idx: [Expr; N]) -> Expr {
    Expr::Load(buf.to_string(), idx.into())
}

pub fn st<const N: usize>(buf: &str, idx: [Expr; N], value: Expr) -> Stmt {
    Stmt::Store {
        buf: buf.to_string(),
        idx: idx.into(),
        value,
    }
}

pub fn let_(name: &str, value: Expr) -> Stmt {
    Stmt::Let(name.to_string(), value)
}

pub fn local(name: &str, len: usize) -> Stmt {
    Stmt::Local {
        name: name.to_string(),
        elem: Elem::F32,
        len,
    }
}

pub fn local_i(name: &str, len: usize) -> Stmt {
    Stmt::Local {
        name: name.to_string(),
        elem: Elem::I64,
        len,
    }
}

/// `for var in lo..hi { body }`.
pub fn for_(var: &str, lo: Expr, hi: Expr, body: Vec<Stmt>) -> Stmt {
    Stmt::For {
        var: var.to_string(),
        lo,
        hi,
        carried: Vec::new(),
        body,
        yields: Vec::new(),
        split: false,
    }
}

/// `for var in lo..hi` carrying `(name, init)` values; `yields` are the next values.
pub fn for_carry(
    var: &str,
    lo: Expr,
    hi: Expr,
    carried: Vec<(&str, Expr)>,
    body: Vec<Stmt>,
    yields: Vec<Expr>,
) -> Stmt {
    Stmt::For {
        var: var.to_string(),
        lo,
        hi,
        carried: carried
            .into_iter()
            .map(|(n, e)| (n.to_string(), e))
            .collect(),
        body,
        yields,
        split: false,
    }
}

/// `for var in lo..hi { body }` marked as a parallel split loop (see [`Stmt::For`]): the
/// iterations must be independent.
pub fn for_par(var: &str, lo: Expr, hi: Expr, body: Vec<Stmt>) -> Stmt {
    split(for_(var, lo, hi, body))
}

/// [`for_carry`] marked as a split sum (see [`Stmt::For`]): `yields[i]` must be
/// `carried[i] + term`.
pub fn for_sum(
    var: &str,
    lo: Expr,
    hi: Expr,
    carried: Vec<(&str, Expr)>,
    body: Vec<Stmt>,
    yields: Vec<Expr>,
) -> Stmt {
    split(for_carry(var, lo, hi, carried, body, yields))
}

/// `s` (a loop) marked split.
fn split(mut s: Stmt) -> Stmt {
    if let Stmt::For { split, .. } = &mut s {
        *split = true;
    }
    s
}

pub fn if_(cond: Expr, then: Vec<Stmt>) -> Stmt {
    Stmt::If { cond, then }
}

pub fn sum(var: &str, lo: Expr, hi: Expr, body: Expr) -> Expr {
    Expr::Reduce {
        op: ReduceOp::Sum,
        var: var.to_string(),
        lo: Box::new(lo),
        hi: Box::new(hi),
        body: Box::new(body),
    }
}

pub fn max_over(var: &str, lo: Expr, hi: Expr, body: Expr) -> Expr {
    Expr::Reduce {
        op: ReduceOp::Max,
        var: var.to_string(),
        lo: Box::new(lo),
        hi: Box::new(hi),
        body: Box::new(body),
    }
}

fn un(op: UnOp, x: Expr) -> Expr {
    Expr::Un(op, Box::new(x))
}

pub fn exp(x: Expr) -> Expr {
    un(UnOp::Exp, x)
}
pub fn log(x: Expr) -> Expr {
    un(UnOp::Log, x)
}
pub fn sqrt(x: Expr) -> Expr {
    un(UnOp::Sqrt, x)
}
pub fn rsqrt(x: Expr) -> Expr {
    un(UnOp::Rsqrt, x)
}
pub fn cos(x: Expr) -> Expr {
    un(UnOp::Cos, x)
}
pub fn sin(x: Expr) -> Expr {
    un(UnOp::Sin, x)
}
pub fn silu(x: Expr) -> Expr {
    un(UnOp::Silu, x)
}
pub fn sigmoid(x: Expr) -> Expr {
    un(UnOp::Sigmoid, x)
}
pub fn softplus(x: Expr) -> Expr {
    un(UnOp::Softplus, x)
}

pub fn max(a: Expr, b: Expr) -> Expr {
    Expr::Bin(BinOp::Max, Box::new(a), Box::new(b))
}
pub fn min(a: Expr, b: Expr) -> Expr {
    Expr::Bin(BinOp::Min, Box::new(a), Box::new(b))
}
pub fn rem(a: Expr, b: Expr) -> Expr {
    Expr::Bin(BinOp::Rem, Box::new(a), Box::new(b))
}

fn cmp(op: CmpOp, a: Expr, b: Expr) -> Expr {
    Expr::Cmp(op, Box::new(a), Box::new(b))
}
pub fn lt(a: Expr, b: Expr) -> Expr {
    cmp(CmpOp::Lt, a, b)
}
pub fn le(a: Expr, b: Expr) -> Expr {
    cmp(CmpOp::Le, a, b)
}
pub fn gt(a: Expr, b: Expr) -> Expr {
    cmp(CmpOp::Gt, a, b)
}
pub fn ge(a: Expr, b: Expr) -> Expr {
    cmp(CmpOp::Ge, a, b)
}
pub fn eq(a: Expr, b: Expr) -> Expr {
    cmp(CmpOp::Eq, a, b)
}
pub fn ne(a: Expr, b: Expr) -> Expr {
    cmp(CmpOp::Ne, a, b)
}
pub fn select(c: Expr, a: Expr, b: Expr) -> Expr {
    Expr::Select(Box::new(c), Box::new(a), Box::new(b))
}
pub fn to_f(x: Expr) -> Expr {
    Expr::ToF(Box::new(x))
}
pub fn to_i(x: Expr) -> Expr {
    Expr::ToI(Box::new(x))
}

macro_rules! binop {
    ($tr:ident, $m:ident, $op:expr) => {
        impl $tr for Expr {
            type Output = Expr;
            fn $m(self, rhs: Expr) -> Expr {
                Expr::Bin($op, Box::new(self), Box::new(rhs))
            }
        }
    };
}
binop!(Add, add, BinOp::Add);
binop!(Sub, sub, BinOp::Sub);
binop!(Mul, mul, BinOp::Mul);
binop!(Div, div, BinOp::Div);

impl Neg for Expr {
    type Output = Expr;
    fn neg(self) -> Expr {
        un(UnOp::Neg, self)
    }
}

/// Buffer parameters.
pub fn input(name: &str, shape: &[Dim]) -> Param {
    param(name, Elem::F32, shape, Access::Read)
}
pub fn output(name: &str, shape: &[Dim]) -> Param {
    param(name, Elem::F32, shape, Access::Write)
}
pub fn inout(name: &str, shape: &[Dim]) -> Param {
    param(name, Elem::F32, shape, Access::ReadWrite)
}
pub fn param(name: &str, elem: Elem, shape: &[Dim], access: Access) -> Param {
    Param {
        name: name.to_string(),
        elem,
        shape: shape.to_vec(),
        access,
        mean_per_row: None,
    }
}

/// A window on local `buf`: element `(r, c)` is `buf[off + r·ld + c]`.
pub fn view(buf: &str, off: Expr, ld: usize) -> View {
    View {
        buf: buf.to_string(),
        off,
        ld,
    }
}

/// `out[i, j] = Σ_k a[i, k]·b[j, k]` (`+=` with `accumulate`), `i < m`, `j < n`, `k < depth`.
pub fn dot(out: View, a: View, b: View, m: Expr, n: Expr, depth: usize, accumulate: bool) -> Stmt {
    Stmt::Tile(TileOp::Dot {
        out,
        a,
        b,
        m,
        n,
        depth,
        accumulate,
    })
}

/// A tensor-core tile `[rows, cols, depth]` with `m × n` valid elements: `acc = Σ_k
/// bf16(a)·bf16(b)`, `a` over (`mi`, `k`), `b` over (`mj`, `k`), then `epilogue` with `mi`,
/// `mj` and `acc` bound (see [`Mma`]).
pub fn mma(
    [rows, cols, depth]: [usize; 3],
    m: Expr,
    n: Expr,
    a: Expr,
    b: Expr,
    epilogue: Vec<Stmt>,
) -> Stmt {
    Stmt::Mma(Box::new(Mma {
        kind: MmaKind::Bf16,
        rows,
        cols,
        m,
        n,
        depth,
        i: "mi".into(),
        j: "mj".into(),
        k: "k".into(),
        acc: "acc".into(),
        a,
        b,
        epilogue,
    }))
}

/// How [`mma_tiles`] cuts a product into tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tiling {
    /// Tiles of one warp: [`DOT_TILE`](super::expand::DOT_TILE) rows and columns, or
    /// [`Mma::M`] along a side that is a constant of at most [`Mma::M`] (a scan's 16 state
    /// rows: a 32-wide tile would multiply as much padding as data).
    #[default]
    Warp,
    /// Tiles of a warpgroup (sm_90a `wgmma` m64nN): [`Mma::WARPGROUP_ROWS`] rows, and columns
    /// the least of 16, 32 and 64 that covers the side's upper bound (a `min` of a constant
    /// bounds it); a product of at most 32 rows (a constant bound) keeps warp tiles. A
    /// program of four warps runs a tile of 64 rows as one `wgmma` per depth step, other tiles as
    /// `mma.sync`, one warp each.
    Warpgroup,
}

impl Tiling {
    /// Rows and columns of the tiles of an `m × n` product.
    pub fn tile(self, m: &Expr, n: &Expr) -> (usize, usize) {
        let small = |e: &Expr| matches!(e, Expr::I(x) if (1..=Mma::M as i64).contains(x));
        let warp = |e: &Expr| {
            if small(e) {
                Mma::M
            } else {
                super::expand::DOT_TILE
            }
        };
        match self {
            // Up to 32 rows (a constant bound) would be half padding or more as 64.
            Tiling::Warpgroup if super::expand::bound(m).is_none_or(|b| b > 32) => {
                let cols = match super::expand::bound(n) {
                    Some(b) if b <= 16 => 16,
                    Some(b) if b <= 32 => 32,
                    _ => 64,
                };
                (Mma::WARPGROUP_ROWS, cols)
            }
            Tiling::Warp | Tiling::Warpgroup => (warp(m), warp(n)),
        }
    }
}

/// An `m × n` product as a grid of MMA tiles of `kind`, shaped as `tiling` says. One split
/// loop over the tiles, `_t`, row blocks outer: a GPU program of several warps deals warp
/// tiles to its warps and runs warpgroup tiles with all of them, a one-warp program and the
/// host run them in order; each tile is a whole warp's (or warpgroup's), its lanes run it
/// alike. Per output row `r` and column `c` of the whole product: `acc = Σ_(k < depth)
/// a(r, k)·b(c, k)`, then `epilogue(r, c, acc)`, which may write only element `(r, c)`'s
/// outputs. `a` is evaluated only for `r < m` and `b` only for `c < n` (see [`Mma`]). The
/// grid and tile variables start with `_`.
#[allow(clippy::too_many_arguments)]
pub fn mma_tiles(
    kind: MmaKind,
    tiling: Tiling,
    m: Expr,
    n: Expr,
    depth: usize,
    a: &dyn Fn(Expr, Expr) -> Expr,
    b: &dyn Fn(Expr, Expr) -> Expr,
    epilogue: &dyn Fn(Expr, Expr, Expr) -> Vec<Stmt>,
) -> Stmt {
    let (tr, tc) = tiling.tile(&m, &n);
    let (r, c) = (v("_mb") * i(tr) + v("_mi"), v("_nb") * i(tc) + v("_mj"));
    let tile = Stmt::Mma(Box::new(Mma {
        kind,
        rows: tr,
        cols: tc,
        m: min(i(tr), m.clone() - v("_mb") * i(tr)),
        n: min(i(tc), n.clone() - v("_nb") * i(tc)),
        depth,
        i: "_mi".into(),
        j: "_mj".into(),
        k: "_mk".into(),
        acc: "_acc".into(),
        a: a(r.clone(), v("_mk")),
        b: b(c.clone(), v("_mk")),
        epilogue: epilogue(r, c, v("_acc")),
    }));
    // One split loop over the tiles, row blocks outer: the tiles are independent (each writes
    // its own elements), so a GPU program of several warps deals them to its warps.
    let nb = (n + i(tc - 1)) / i(tc);
    for_par(
        "_t",
        i(0),
        (m + i(tr - 1)) / i(tr) * nb.clone(),
        vec![
            let_("_mb", v("_t") / nb.clone()),
            let_("_nb", v("_t") - v("_mb") * nb),
            tile,
        ],
    )
}

/// `x` truncated to TF32 (as f32).
pub fn tf32(x: Expr) -> Expr {
    un(UnOp::Tf32, x)
}

/// `x` rounded to the nearest TF32, ties away from zero (as f32).
pub fn tf32_round(x: Expr) -> Expr {
    un(UnOp::Tf32Round, x)
}

/// `x` rounded to bfloat16 (as f32).
pub fn bf16(x: Expr) -> Expr {
    un(UnOp::Bf16, x)
}

/// Inclusive prefix sums of `x` down `rows` rows of `cols` columns.
pub fn cumsum(x: View, rows: Expr, cols: usize) -> Stmt {
    Stmt::Tile(TileOp::Cumsum { x, rows, cols })
}

/// `x ← (I + L)⁻¹ x` for the strictly lower part of `l`, `n` rows of `cols` columns.
pub fn trisolve(l: View, x: View, n: Expr, cols: usize) -> Stmt {
    Stmt::Tile(TileOp::TriSolve { l, x, n, cols })
}
