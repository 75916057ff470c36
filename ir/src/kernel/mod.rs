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
    /// The expressions directly inside `self`: a load's indices, operands, a reduction's
    /// bounds and body.
    pub fn children(&self) -> Vec<&Expr> {
        match self {
            Expr::F(_) | Expr::I(_) | Expr::Var(_) | Expr::Pid(_) | Expr::Rows => vec![],
            Expr::Load(_, idx) => idx.iter().collect(),
            Expr::Bin(_, a, b) | Expr::Cmp(_, a, b) => vec![a, b],
            Expr::Un(_, a) | Expr::ToF(a) | Expr::ToI(a) => vec![a],
            Expr::Select(c, a, b) => vec![c, a, b],
            Expr::Reduce { lo, hi, body, .. } => vec![lo, hi, body],
        }
    }

    /// `self` with each of its [`children`](Expr::children) replaced by `f` of it, the rest of
    /// the node (operators, buffer, reduction variable) kept.
    pub fn map_children(&self, f: &mut dyn FnMut(&Expr) -> Expr) -> Expr {
        let mut go = |e: &Expr| Box::new(f(e));
        match self {
            Expr::F(_) | Expr::I(_) | Expr::Var(_) | Expr::Pid(_) | Expr::Rows => self.clone(),
            Expr::Load(b, idx) => Expr::Load(b.clone(), idx.iter().map(|i| *go(i)).collect()),
            Expr::Bin(op, a, b) => Expr::Bin(*op, go(a), go(b)),
            Expr::Cmp(op, a, b) => Expr::Cmp(*op, go(a), go(b)),
            Expr::Un(op, a) => Expr::Un(*op, go(a)),
            Expr::ToF(a) => Expr::ToF(go(a)),
            Expr::ToI(a) => Expr::ToI(go(a)),
            Expr::Select(c, a, b) => Expr::Select(go(c), go(a), go(b)),
            Expr::Reduce {
                op,
                var,
                lo,
                hi,
                body,
            } => Expr::Reduce {
                op: *op,
                var: var.clone(),
                lo: go(lo),
                hi: go(hi),
                body: go(body),
            },
        }
    }

    /// Whether `self` reads variable `name` (anywhere, reduction bounds and bodies included).
    pub fn reads(&self, name: &str) -> bool {
        matches!(self, Expr::Var(n) if n == name) || self.children().iter().any(|c| c.reads(name))
    }

    /// `self` with the variables named in `with` replaced by their expressions, all at once
    /// (a replacement is not substituted again); a reduction's own variable shadows a
    /// replacement of the same name inside its body.
    pub fn substitute(&self, with: &[(&str, Expr)]) -> Expr {
        match self {
            Expr::Var(n) => with
                .iter()
                .find(|(name, _)| name == n)
                .map_or_else(|| self.clone(), |(_, e)| e.clone()),
            Expr::Reduce {
                op,
                var,
                lo,
                hi,
                body,
            } => {
                let inner: Vec<(&str, Expr)> = with
                    .iter()
                    .filter(|(name, _)| name != var)
                    .cloned()
                    .collect();
                Expr::Reduce {
                    op: *op,
                    var: var.clone(),
                    lo: Box::new(lo.substitute(with)),
                    hi: Box::new(hi.substitute(with)),
                    body: Box::new(body.substitute(&inner)),
                }
            }
            _ => self.map_children(&mut |c| c.substitute(with)),
        }
    }

    /// Whether `self` contains a reduction (which a GPU deals over a warp's lanes).
    pub fn has_reduce(&self) -> bool {
        matches!(self, Expr::Reduce { .. }) || self.children().iter().any(|c| c.has_reduce())
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
    /// A block of flash attention: two products per key tile and an online softmax (see
    /// [`Attend`]).
    Attend(Box<Attend>),
}

impl Stmt {
    /// `self` with `f` applied to each of its expressions (bounds, indices, values,
    /// conditions, carried and yielded values, tile views' offsets and sizes, MMA and
    /// attention operands and sizes), in nested statements and epilogues too, and every buffer
    /// name it stores to or declares (stores, locals, tile views) passed through `buf`. `f`
    /// gets whole expressions and rewrites inside them itself (loads' buffer names included),
    /// e.g. with [`Expr::map_children`]; variable names bound by the statement are kept.
    pub fn rewrite(&self, f: &mut dyn FnMut(&Expr) -> Expr, buf: &dyn Fn(&str) -> String) -> Stmt {
        let block = |b: &[Stmt], f: &mut dyn FnMut(&Expr) -> Expr| -> Vec<Stmt> {
            b.iter().map(|s| s.rewrite(f, buf)).collect()
        };
        let view = |v: &View, f: &mut dyn FnMut(&Expr) -> Expr| View {
            buf: buf(&v.buf),
            off: f(&v.off),
            ld: v.ld,
        };
        match self {
            Stmt::Let(n, e) => Stmt::Let(n.clone(), f(e)),
            Stmt::Local { name, elem, len } => Stmt::Local {
                name: buf(name),
                elem: *elem,
                len: *len,
            },
            Stmt::Store { buf: b, idx, value } => Stmt::Store {
                buf: buf(b),
                idx: idx.iter().map(&mut *f).collect(),
                value: f(value),
            },
            Stmt::For {
                var,
                lo,
                hi,
                carried,
                body,
                yields,
                split,
            } => Stmt::For {
                var: var.clone(),
                lo: f(lo),
                hi: f(hi),
                carried: carried.iter().map(|(n, e)| (n.clone(), f(e))).collect(),
                body: block(body, f),
                yields: yields.iter().map(&mut *f).collect(),
                split: *split,
            },
            Stmt::If { cond, then } => Stmt::If {
                cond: f(cond),
                then: block(then, f),
            },
            Stmt::Tile(op) => Stmt::Tile(match op {
                TileOp::Dot {
                    out,
                    a,
                    b,
                    m,
                    n,
                    depth,
                    accumulate,
                } => TileOp::Dot {
                    out: view(out, f),
                    a: view(a, f),
                    b: view(b, f),
                    m: f(m),
                    n: f(n),
                    depth: *depth,
                    accumulate: *accumulate,
                },
                TileOp::Cumsum { x, rows, cols } => TileOp::Cumsum {
                    x: view(x, f),
                    rows: f(rows),
                    cols: *cols,
                },
                TileOp::TriSolve { l, x, n, cols } => TileOp::TriSolve {
                    l: view(l, f),
                    x: view(x, f),
                    n: f(n),
                    cols: *cols,
                },
            }),
            Stmt::Mma(mma) => Stmt::Mma(Box::new(Mma {
                m: f(&mma.m),
                n: f(&mma.n),
                a: f(&mma.a),
                b: f(&mma.b),
                epilogue: block(&mma.epilogue, f),
                ..(**mma).clone()
            })),
            Stmt::Attend(a) => Stmt::Attend(Box::new(Attend {
                m: f(&a.m),
                keys: f(&a.keys),
                tiles: (f(&a.tiles.0), f(&a.tiles.1)),
                query: f(&a.query),
                key: f(&a.key),
                value: f(&a.value),
                sees: f(&a.sees),
                epilogue: block(&a.epilogue, f),
                ..(**a).clone()
            })),
        }
    }
}

/// Flash attention for a block of query rows (FlashAttention-2's loop):
///
/// for every block row `t < m`: `out(t, d) = Σ_j p(t, j)·value(j, d) / Σ_j p(t, j)` over the
/// keys `j < min(keys, sees(t))` of the key tiles `tiles.0 .. tiles.1` (each [`Attend::key_tile`]
/// keys), with `p(t, j) = exp(scale·s(t, j) − max_j scale·s(t, j))` and the logit `s(t, j) =
/// Σ_(e < qk) query(t, e)·key(j, e)`; then `epilogue` per `(t, d)` with `out` bound.
///
/// `query` is read with `t` and `e` bound, `key` with `j` and `e`, `value` with `j` and `d`,
/// `sees` with `t`; each only for `t < m` and `j < keys`. The products are formed as `kind`
/// says (with [`MmaKind::Bf16`] the probabilities are rounded to bf16 too, as the second
/// product's operand), accumulated in f32; the softmax statistics are f32. The keys are
/// visited tile by tile in order, the running max and sum corrected once per tile, so a host
/// and a GPU running the same tiles form the same sums. The epilogue has the rules of an
/// [`Mma`] epilogue (lets, stores and conditionals writing only its element's outputs).
///
/// A GPU runs it as one block of warps whose accumulators stay in registers (`lower/attend.rs`
/// in `lamina-targets`) when the kernel is only `let`s and this statement, else as the loops of
/// [`expand::attend_loops`] with f32 locals, which is what the host runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Attend {
    pub kind: MmaKind,
    /// Rows of the block: a multiple of [`Mma::M`].
    pub rows: usize,
    /// Valid rows (`m ≤ rows`).
    pub m: Expr,
    /// Keys that exist: indices at or past it are never read.
    pub keys: Expr,
    /// The key tiles visited, `first .. end`, within the keys: `end ≤ ⌈keys / key_tile⌉`.
    pub tiles: (Expr, Expr),
    /// Keys per tile: a multiple of 16.
    pub key_tile: usize,
    /// Width of a query and a key row.
    pub qk: usize,
    /// Width of a value row (and an output row).
    pub vw: usize,
    pub scale: f64,
    /// Names bound for the block row, the key, the query/key element, the value element and
    /// the output.
    pub t: String,
    pub j: String,
    pub e: String,
    pub d: String,
    pub out: String,
    pub query: Expr,
    pub key: Expr,
    pub value: Expr,
    /// How many keys row `t` sees (keys `0 .. sees`).
    pub sees: Expr,
    pub epilogue: Vec<Stmt>,
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
    /// Rows of a warpgroup tile (sm_90a `wgmma` m64nN: 16 rows per warp of four).
    pub const WARPGROUP_ROWS: usize = 64;
}

impl Attend {
    /// Rows of a register block: 4 warps of 16.
    pub const BLOCK_ROWS: usize = 64;
    /// Keys per tile of a register block.
    pub const BLOCK_KEY_TILE: usize = 32;
    /// Most output accumulators a lane of a register block holds (`vw / 2` registers).
    pub const BLOCK_ACC_REGISTERS: usize = 128;
    /// Most registers a lane gives its query fragments and accumulators together (`qk / 4 +
    /// vw / 2`) for the query fragments to stay resident across the key tiles.
    pub const RESIDENT_REGISTERS: usize = 128;
    /// Static shared memory (48 KiB) the staged tile of a register block must fit.
    pub const BLOCK_SHARED_BUDGET: usize = 48 << 10;
    /// bf16 elements of padding per staged row of a register block.
    pub const BLOCK_PAD: usize = 8;

    /// Whether a GPU runs this attention as a register block when it is a kernel's whole
    /// program (after `let`s; `lower/attend.rs` in `lamina-targets`): bf16 products,
    /// [`Self::BLOCK_ROWS`] rows, key tiles of [`Self::BLOCK_KEY_TILE`], query width a
    /// multiple of 16, value width a multiple of 8 with its accumulators within
    /// [`Self::BLOCK_ACC_REGISTERS`], the staged keys and values within
    /// [`Self::BLOCK_SHARED_BUDGET`]. The cost model counts such blocks as a GPU runs them.
    pub fn register_block(&self) -> bool {
        self.kind == MmaKind::Bf16
            && self.rows == Self::BLOCK_ROWS
            && self.key_tile == Self::BLOCK_KEY_TILE
            && self.qk.is_multiple_of(16)
            && self.vw.is_multiple_of(8)
            && self.vw / 2 <= Self::BLOCK_ACC_REGISTERS
            && self.block_shared_bytes() <= Self::BLOCK_SHARED_BUDGET
    }

    /// Bytes of a register block's staged tile: keys `[key_tile][qk + pad]` and values
    /// transposed `[vw][key_tile + pad]`, bf16.
    pub fn block_shared_bytes(&self) -> usize {
        let pad = Self::BLOCK_PAD;
        2 * (self.key_tile * (self.qk + pad) + self.vw * (self.key_tile + pad))
    }

    /// Whether a register block keeps its query fragments in registers across the key tiles
    /// (else it loads them again for every tile).
    pub fn resident_queries(&self) -> bool {
        self.qk / 4 + self.vw / 2 <= Self::RESIDENT_REGISTERS
    }
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
