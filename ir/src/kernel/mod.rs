//! Kernel IR: one program per fused kernel, target independent.
//!
//! A [`Kernel`] is launched over a grid of program ids (`pid0, pid1, ...`); every program runs
//! the same body: a structured loop nest over typed buffers (loads and stores addressed by
//! row-major indices), locals (per-program scratch tiles: a state tile, a softmax row, a
//! triangular-solve tile), reductions (`sum`/`max` over a range), loop-carried values (online
//! softmax, register tiles of accumulators), conditionals, and tile operations on locals
//! ([`TileOp`]: `dot`, `cumsum`, `trisolve`), which a target lowers natively or has
//! [`expand`] rewrite into loops.
//!
//! Three value types exist: `f32`, `int` (indices; `i64` buffers load as int) and `bool`.
//! Buffers hold `f32`, `i64` or `bf16` (storage only: loads widen to f32, stores round).
//! The only runtime size is `R`, the rows (tokens) of the launch: a buffer's first dimension may
//! be `R`, every other size is a build-time constant, so all strides are constants.
//!
//! - [`build`]: expression constructors and operators used by the kernel builders;
//! - [`verify`]: scoping, typing and buffer-access rules;
//! - [`expand`]: tile operations as loops (the host target's lowering of them);
//! - [`print`]: the stable text form (`compile-model ir MODEL --stage kernel`).

pub mod build;
pub mod count;
pub mod expand;
pub mod print;
pub mod verify;

/// A dimension: the launch's row count or a constant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dim {
    /// `R`: rows (tokens, or sequences in decode) of this launch.
    Rows,
    N(usize),
    /// `⌈R / b⌉`: blocks of `b` rows (grids only).
    RowBlocks(usize),
}

impl Dim {
    /// The size for `rows` rows.
    pub fn eval(self, rows: usize) -> usize {
        match self {
            Dim::Rows => rows,
            Dim::N(n) => n,
            Dim::RowBlocks(b) => rows.div_ceil(b.max(1)),
        }
    }
}

/// Element types of buffers and locals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Elem {
    F32,
    I64,
    /// Stored as bfloat16, computed as f32: loads widen, stores round to nearest even.
    Bf16,
}

impl Elem {
    pub fn name(self) -> &'static str {
        match self {
            Elem::F32 => "f32",
            Elem::I64 => "i64",
            Elem::Bf16 => "bf16",
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::I64 => 8,
            Elem::Bf16 => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

impl Access {
    pub fn name(self) -> &'static str {
        match self {
            Access::Read => "in",
            Access::Write => "out",
            Access::ReadWrite => "inout",
        }
    }
}

/// A buffer parameter of a kernel.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Param {
    pub name: String,
    pub elem: Elem,
    pub shape: Vec<Dim>,
    pub access: Access,
    /// Cost model only (no effect on code): the ints stored here average `R · num / den` (an
    /// expert's share of the routed assignments, `R · k / E`), for [`count`]'s estimates of
    /// data-dependent guards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_per_row: Option<(u32, u32)>,
}

impl Param {
    pub fn numel(&self, rows: usize) -> usize {
        self.shape.iter().map(|d| d.eval(rows)).product()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    /// Integer remainder (int operands only).
    Rem,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Cos,
    Sin,
    /// `x * sigmoid(x)`
    Silu,
    Sigmoid,
    /// `log(1 + exp(x))`, linear above 20 (as torch).
    Softplus,
    /// `x` rounded to the nearest bfloat16 (ties to even), as f32.
    Bf16,
    /// `x` truncated to TF32 (the low 13 mantissa bits cleared), as f32.
    Tf32,
    /// `x` rounded to the nearest TF32 (ties away from zero: `(bits + 2^12) & !(2^13 − 1)`),
    /// as f32: unbiased, unlike truncation. Infinities and NaNs are only masked (a NaN whose
    /// payload lies in the low 13 bits alone becomes an infinity, as with `Tf32`).
    Tf32Round,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Max,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    F(f64),
    I(i64),
    /// A `let`, a loop variable, a carried value.
    Var(String),
    /// Program id along grid axis `n`.
    Pid(usize),
    /// `R`.
    Rows,
    /// `buf[i, j, ...]` (a parameter, or a local with one index).
    Load(String, Vec<Expr>),
    Bin(BinOp, Box<Expr>, Box<Expr>),
    Un(UnOp, Box<Expr>),
    Cmp(CmpOp, Box<Expr>, Box<Expr>),
    Select(Box<Expr>, Box<Expr>, Box<Expr>),
    /// int → f32.
    ToF(Box<Expr>),
    /// f32 → int (truncation), for ids stored in f32 locals.
    ToI(Box<Expr>),
    /// `sum/max over var in lo..hi of body` (f32).
    Reduce {
        op: ReduceOp,
        var: String,
        lo: Box<Expr>,
        hi: Box<Expr>,
        body: Box<Expr>,
    },
}

impl Expr {
    /// Whether `self` reads variable `name` (anywhere, reduction bounds and bodies included).
    pub fn reads(&self, name: &str) -> bool {
        match self {
            Expr::Var(n) => n == name,
            Expr::F(_) | Expr::I(_) | Expr::Pid(_) | Expr::Rows => false,
            Expr::Load(_, idx) => idx.iter().any(|i| i.reads(name)),
            Expr::Bin(_, a, b) | Expr::Cmp(_, a, b) => a.reads(name) || b.reads(name),
            Expr::Un(_, a) | Expr::ToF(a) | Expr::ToI(a) => a.reads(name),
            Expr::Select(c, a, b) => c.reads(name) || a.reads(name) || b.reads(name),
            Expr::Reduce { lo, hi, body, .. } => {
                lo.reads(name) || hi.reads(name) || body.reads(name)
            }
        }
    }

    /// Whether `self` contains a reduction (which a GPU deals over a warp's lanes).
    pub fn has_reduce(&self) -> bool {
        match self {
            Expr::Reduce { .. } => true,
            Expr::F(_) | Expr::I(_) | Expr::Var(_) | Expr::Pid(_) | Expr::Rows => false,
            Expr::Load(_, idx) => idx.iter().any(Expr::has_reduce),
            Expr::Bin(_, a, b) | Expr::Cmp(_, a, b) => a.has_reduce() || b.has_reduce(),
            Expr::Un(_, a) | Expr::ToF(a) | Expr::ToI(a) => a.has_reduce(),
            Expr::Select(c, a, b) => c.has_reduce() || a.has_reduce() || b.has_reduce(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Stmt {
    Let(String, Expr),
    /// Per-program scratch of `len` elements; contents undefined until stored.
    Local {
        name: String,
        elem: Elem,
        len: usize,
    },
    Store {
        buf: String,
        idx: Vec<Expr>,
        value: Expr,
    },
    /// `for var in lo..hi` carrying values: inside the body the carried names hold the current
    /// values and `yields` gives the next ones; after the loop they hold the final values.
    ///
    /// A `split` loop may have its iterations spread over the threads of a program (the GPU's
    /// warp lanes; the host runs it in order). It is either
    /// - a sum: every carried value is f32 and yields `itself + term` (the term reading no
    ///   carried value), and the body only binds `let`s (the threads' partial sums are added);
    ///   or
    /// - parallel: nothing carried, and its iterations are independent: each writes only
    ///   elements no other iteration reads or writes (a column map).
    For {
        var: String,
        lo: Expr,
        hi: Expr,
        carried: Vec<(String, Expr)>,
        body: Vec<Stmt>,
        yields: Vec<Expr>,
        split: bool,
    },
    If {
        cond: Expr,
        then: Vec<Stmt>,
    },
    /// An operation on whole tiles held in locals (see [`TileOp`]).
    Tile(TileOp),
    /// A matrix tile on tensor cores (see [`Mma`]).
    Mma(Box<Mma>),
}

/// A product tile on a warp's tensor cores (NVIDIA: `mma.sync`):
///
/// for every `i < m`, `j < n`: `acc = Σ_(k < depth) a·b`, `a` read with `(i, k)` bound and `b`
/// with `(j, k)` (`b` is read transposed, as weights `[out, in]` are stored), the products
/// formed as [`MmaKind`] says and accumulated in f32; then `epilogue` with `i`, `j` and `acc`
/// bound.
///
/// The epilogue runs once per element, in no particular order and on whichever thread holds
/// the element: it may only write outputs of its own element `(i, j)`, and binds lets, stores
/// and conditionals only (no loops, no locals). `a` is only evaluated for `i < m`, `k < depth`
/// and `b` for `j < n`, `k < depth` (a GPU clamps the indices of the padding it loads), so the
/// expressions need no masks of their own; `m` and `n` are at least 1.
///
/// The tile is `rows × cols` (multiples of 16 and 8: `m ≤ rows`, `n ≤ cols`); a GPU lowers
/// it to `rows/16 × cols/8` MMAs per step of [`MmaKind::depth_step`], the host to loops
/// ([`expand`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Mma {
    pub kind: MmaKind,
    pub rows: usize,
    pub cols: usize,
    pub m: Expr,
    pub n: Expr,
    pub depth: usize,
    /// Names bound for the row, column and depth indices, and the accumulated value.
    pub i: String,
    pub j: String,
    pub k: String,
    pub acc: String,
    pub a: Expr,
    pub b: Expr,
    pub epilogue: Vec<Stmt>,
}

impl Mma {
    /// Row and column multiples of one `mma.sync` (m16n8).
    pub const M: usize = 16;
    pub const N: usize = 8;
}

/// How an [`Mma`] forms its products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MmaKind {
    /// `bf16(a)·bf16(b)`: both operands rounded to bfloat16, the product exact in f32
    /// (`mma.sync` m16n8k16 bf16). The projections' precision.
    Bf16,
    /// `a·b` to about 2^-20 relative: each operand split into a TF32 head and a TF32 tail
    /// (`hi = tf32(x)`, `lo = tf32(x − hi)`), `hi·hi + hi·lo + lo·hi` (three `mma.sync`
    /// m16n8k8 tf32). Near-f32 products on tensor cores, for the chunked recurrences.
    Tf32x3,
    /// `a·b` in f32, as a `dot` tile: the host forms the products exactly, a GPU as
    /// [`MmaKind::Tf32x3`] ([`expand::dots_on_tensor_cores`] rewrites the kind). For products
    /// whose operands are not all locals (a `dot` takes views of locals), e.g. attention
    /// reading its keys straight from the cache.
    F32,
    /// `a·b` with both operands rounded to the nearest TF32 (10 mantissa bits, 2^-11 relative
    /// at most), one `mma.sync` m16n8k8 tf32: a third of `Tf32x3`'s MMAs, eight times finer
    /// than bf16 operands. What `dot` tiles and `F32` tiles become in plans built with TF32
    /// products (`passes::Options::tf32_products`).
    Tf32,
}

impl MmaKind {
    /// Depth of one MMA step.
    pub fn depth_step(self) -> usize {
        match self {
            MmaKind::Bf16 => 16,
            MmaKind::Tf32x3 | MmaKind::F32 | MmaKind::Tf32 => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            MmaKind::Bf16 => "bf16",
            MmaKind::Tf32x3 => "tf32x3",
            MmaKind::F32 => "f32",
            MmaKind::Tf32 => "tf32",
        }
    }
}

/// A 2-d window on a local: element `(r, c)` is `buf[off + r·ld + c]`.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub buf: String,
    pub off: Expr,
    pub ld: usize,
}

/// Tile-level operations of the chunked recurrences. Targets may lower them natively (a GPU to
/// tensor-core MMAs, warp scans); [`expand::expand_tiles`] rewrites them into loops, which is
/// what the host target does.
#[derive(Debug, Clone, PartialEq)]
pub enum TileOp {
    /// `out[i, j] (+)= Σ_k a[i, k]·b[j, k]` for `i < m`, `j < n`, `k < depth` (`b` is read
    /// transposed: rows of both operands are contiguous, as keys and weights are stored).
    Dot {
        out: View,
        a: View,
        b: View,
        m: Expr,
        n: Expr,
        depth: usize,
        accumulate: bool,
    },
    /// Inclusive prefix sums down the rows: `x[t, c] += x[t−1, c]` for `0 < t < rows`,
    /// `c < cols`, rows in order.
    Cumsum { x: View, rows: Expr, cols: usize },
    /// Forward substitution with the unit lower-triangular `I + L` (only `L`'s strictly lower
    /// part is read): `x[i, c] −= Σ_(j<i) l[i, j]·x[j, c]`, rows in order.
    TriSolve {
        l: View,
        x: View,
        n: Expr,
        cols: usize,
    },
}

/// One fused kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct Kernel {
    pub name: String,
    /// Graph nodes it computes (for diagnostics and reports); not part of its signature.
    pub nodes: Vec<String>,
    /// Program-id extents.
    pub grid: Vec<Dim>,
    pub params: Vec<Param>,
    pub body: Vec<Stmt>,
}

impl Kernel {
    pub fn param(&self, name: &str) -> Option<&Param> {
        self.params.iter().find(|p| p.name == name)
    }

    /// Programs launched for `rows` rows.
    pub fn programs(&self, rows: usize) -> usize {
        self.grid.iter().map(|d| d.eval(rows)).product()
    }

    /// What makes two kernels interchangeable: grid, parameters and body (not the name).
    pub fn signature(&self) -> String {
        print::print_signature(self)
    }

    /// Bytes of per-program scratch (every `local`, wherever it is declared).
    pub fn local_bytes(&self) -> usize {
        fn walk(body: &[Stmt]) -> usize {
            body.iter()
                .map(|s| match s {
                    Stmt::Local { elem, len, .. } => elem.bytes() * len,
                    Stmt::For { body, .. } | Stmt::If { then: body, .. } => walk(body),
                    Stmt::Mma(mma) => walk(&mma.epilogue),
                    _ => 0,
                })
                .sum()
        }
        walk(&self.body)
    }
}
