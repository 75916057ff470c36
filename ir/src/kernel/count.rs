//! Static work estimates of a kernel launch: floating-point operations, and bytes loaded from
//! and stored to its parameters, for a given row count — what `compile-model report --target`
//! prints per kernel and reads against the roofline.
//!
//! Loop trip counts come from interval arithmetic on the bounds: a bound that depends on the
//! program id or an enclosing loop variable is taken at its midpoint (a triangular loop counts
//! half), and one that depends on data (a position, an expert's token count: any int loaded
//! from a buffer) at the middle of the caller's `data` interval, or at the mean a parameter
//! declares ([`Param::mean_per_row`](super::Param)). A comparison `x < y` of a spread value
//! with data holds for the share of `x`'s range below `y`'s mean (and inside `if x < y`, a
//! variable `x` is taken below it); other data-dependent conditions are assumed to hold. Every f32 arithmetic or transcendental operation counts as
//! one FLOP, a multiply-add as two. Bytes are counted as issued (a value loaded twice counts
//! twice): [`Work::dram_bytes`] caps them by the parameters' footprint for the roofline.
//! Bytes loaded from and stored to locals are counted apart ([`Work::scratch_bytes`]): a GPU
//! warp program keeps its locals in a global scratch buffer unless they fit in shared memory,
//! so they may cost memory traffic (cached or not) that the parameters' roofline does not show; a tile operation moves its
//! operands as the GPU's tensor-core tiles read them. Inside a split loop (dealt to a warp's
//! lanes) an access whose index is the same on every lane is one access per warp step.

use std::collections::HashMap;

use super::{Dim, Elem, Expr, Kernel, Mma, MmaKind, Stmt, TileOp};

/// Work of one launch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Work {
    /// Every f32 operation; of them, the products a GPU runs on tensor cores:
    pub flops: f64,
    /// bf16 MMA tiles (the projections);
    pub bf16_mma_flops: f64,
    /// f32 products as 3xTF32 MMAs (`dot` tiles outside split loops, `tf32x3` and `f32` MMA
    /// tiles): three TF32 MMAs each, at half the bf16 rate;
    pub tf32x3_flops: f64,
    /// `tf32` MMA tiles: one TF32 MMA each.
    pub tf32_flops: f64,
    /// Bytes loaded from and stored to parameters, as issued by the programs.
    pub load_bytes: f64,
    pub store_bytes: f64,
    /// DRAM traffic estimate: per parameter, the bytes issued to it, at most its footprint at
    /// this row count (a tile loaded by many programs is read from DRAM once).
    pub dram_bytes: f64,
    /// Bytes loaded from and stored to locals, as issued by the programs.
    pub scratch_bytes: f64,
}

impl Work {
    pub fn dram_bytes(&self) -> f64 {
        self.dram_bytes
    }

    /// FLOPs left to the CUDA cores.
    pub fn cuda_core_flops(&self) -> f64 {
        (self.flops - self.bf16_mma_flops - self.tf32x3_flops - self.tf32_flops).max(0.0)
    }

    /// Seconds of each kind of arithmetic at the given ceilings (FLOP/s: dense bf16 tensor,
    /// CUDA-core f32), named: bf16 MMAs at the tensor rate, TF32 ones at half of it (3xTF32:
    /// three of them), the rest on the CUDA cores.
    pub fn compute_terms(&self, tensor: f64, cuda_core: f64) -> [(&'static str, f64); 4] {
        [
            ("bf16 mma", self.bf16_mma_flops / tensor),
            ("tf32x3 mma", 6.0 * self.tf32x3_flops / tensor),
            ("tf32 mma", 2.0 * self.tf32_flops / tensor),
            ("cuda cores", self.cuda_core_flops() / cuda_core),
        ]
    }

    /// Seconds of arithmetic: the [`compute_terms`](Self::compute_terms) one after another.
    pub fn compute_seconds(&self, tensor: f64, cuda_core: f64) -> f64 {
        self.compute_terms(tensor, cuda_core)
            .iter()
            .map(|(_, t)| t)
            .sum()
    }
}

/// An int's range, its expected value, and whether it depends on loaded data. A bool is an
/// `Iv` over 0..=1 whose mean is the probability that it holds.
#[derive(Clone, Copy, Debug)]
struct Iv {
    lo: f64,
    hi: f64,
    mean: f64,
    data: bool,
}

impl Iv {
    fn point(v: f64) -> Iv {
        Iv {
            lo: v,
            hi: v,
            mean: v,
            data: false,
        }
    }
    fn range(lo: f64, hi: f64) -> Iv {
        Iv {
            lo,
            hi,
            mean: (lo + hi) / 2.0,
            data: false,
        }
    }
    /// A loop variable over `lo..hi`.
    fn iter(lo: Iv, hi: Iv) -> Iv {
        Iv {
            lo: lo.lo,
            hi: (hi.hi - 1.0).max(lo.lo),
            mean: ((lo.mean + hi.mean - 1.0) / 2.0).max(lo.lo),
            data: lo.data || hi.data,
        }
    }
    fn trips(lo: Iv, hi: Iv) -> f64 {
        (hi.mean - lo.mean).max(0.0)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum T {
    F,
    I,
}

struct Counter<'k> {
    k: &'k Kernel,
    rows: usize,
    data: Iv,
    vars: HashMap<String, (T, Iv)>,
    /// Locals and their element sizes.
    locals: HashMap<String, f64>,
    /// Names whose value differs between the lanes of a split loop (its variable, `let`s and
    /// reduction variables that depend on it), and the lanes sharing one step of the innermost
    /// split loop.
    varying: Vec<String>,
    lanes: Option<f64>,
    work: Work,
    /// Bytes issued per parameter, per program.
    per_buf: HashMap<String, f64>,
    /// Program ids known to lie in a narrower range than their grid axis (inside `if pidN <
    /// c` and the like: a horizontally fused kernel's members).
    pids: HashMap<usize, Iv>,
}

/// The estimated work of launching `k` over `rows` rows; ints loaded from buffers lie in
/// `data` (e.g. `0..context` for positions).
/// Bytes a launch of `k` for `rows` rows issues to parameter `name` (loads and stores), with
/// data-dependent bounds as [`launch_work`] takes them.
pub fn param_bytes(k: &Kernel, rows: usize, data: (f64, f64), name: &str) -> f64 {
    let c = counted(k, rows, data);
    c.per_buf.get(name).copied().unwrap_or(0.0) * k.programs(rows) as f64
}

pub fn launch_work(k: &Kernel, rows: usize, data: (f64, f64)) -> Work {
    let c = counted(k, rows, data);
    let programs = k.programs(rows) as f64;
    let dram_bytes = k
        .params
        .iter()
        .map(|p| {
            let issued = c.per_buf.get(&p.name).copied().unwrap_or(0.0) * programs;
            issued.min((p.numel(rows) * p.elem.bytes()) as f64)
        })
        .sum();
    Work {
        flops: c.work.flops * programs,
        bf16_mma_flops: c.work.bf16_mma_flops * programs,
        tf32x3_flops: c.work.tf32x3_flops * programs,
        tf32_flops: c.work.tf32_flops * programs,
        load_bytes: c.work.load_bytes * programs,
        store_bytes: c.work.store_bytes * programs,
        dram_bytes,
        scratch_bytes: c.work.scratch_bytes * programs,
    }
}

/// A tile loop's grid, as `build::mma_tiles` writes it: `for t in 0..(rows · cols) split {
/// let mb = t / cols; let nb = t − mb · cols; tiles }`: `(rows, cols, mb, nb)`.
fn tile_grid<'b>(
    var: &str,
    hi: &'b Expr,
    body: &'b [Stmt],
) -> Option<(&'b Expr, &'b Expr, &'b str, &'b str)> {
    use super::BinOp::{Div, Mul, Sub};
    let Expr::Bin(Mul, rows, cols) = hi else {
        return None;
    };
    let [Stmt::Let(mb, Expr::Bin(Div, t, c1)), Stmt::Let(nb, Expr::Bin(Sub, t2, prod)), rest @ ..] =
        body
    else {
        return None;
    };
    let is_var = |e: &Expr| matches!(e, Expr::Var(v) if v == var);
    let tiles_only = !rest.is_empty()
        && rest
            .iter()
            .all(|s| matches!(s, Stmt::Mma(_) | Stmt::Let(..)));
    let is_mb = |e: &Expr| matches!(e, Expr::Var(v) if v == mb);
    let nb_ok = matches!(&**prod, Expr::Bin(Mul, m, c2) if is_mb(m) && **c2 == **cols);
    (is_var(t) && is_var(t2) && **c1 == **cols && nb_ok && tiles_only).then_some((
        &**rows,
        &**cols,
        mb.as_str(),
        nb.as_str(),
    ))
}

/// One program of `k` counted.
fn counted<'k>(k: &'k Kernel, rows: usize, data: (f64, f64)) -> Counter<'k> {
    let mut c = Counter {
        k,
        rows,
        data: Iv {
            data: true,
            ..Iv::range(data.0, data.1)
        },
        vars: HashMap::new(),
        locals: Default::default(),
        varying: Vec::new(),
        lanes: None,
        work: Work::default(),
        per_buf: HashMap::new(),
        pids: HashMap::new(),
    };
    c.block(&k.body, 1.0);
    c
}

impl Counter<'_> {
    fn block(&mut self, b: &[Stmt], times: f64) {
        for s in b {
            self.stmt(s, times);
        }
    }

    /// The bytes an access `buf[idx]` executed `times` times moves: a local's are counted as
    /// scratch (and `None` returned), a parameter's returned. Either is one access per warp
    /// step when every lane of the split loop reads the same element (a broadcast).
    fn elem_bytes(&mut self, buf: &str, idx: &[Expr], times: f64) -> Option<f64> {
        let per_lane = idx.iter().any(|e| self.varying.iter().any(|v| e.reads(v)));
        let steps = match self.lanes {
            Some(l) if !per_lane => times / l,
            _ => times,
        };
        if let Some(bytes) = self.locals.get(buf) {
            self.work.scratch_bytes += bytes * steps;
            return None;
        }
        self.k.param(buf).map(|p| p.elem.bytes() as f64 * steps)
    }

    fn stmt(&mut self, s: &Stmt, times: f64) {
        match s {
            Stmt::Let(n, e) => {
                let (t, iv) = self.expr(e, times);
                self.vars.insert(n.clone(), (t, iv));
                if self.varying.iter().any(|v| e.reads(v)) {
                    self.varying.push(n.clone());
                }
            }
            Stmt::Local { name, elem, .. } => {
                self.locals.insert(name.clone(), elem.bytes() as f64);
            }
            Stmt::Store { buf, idx, value } => {
                for i in idx {
                    self.expr(i, times);
                }
                self.expr(value, times);
                if let Some(b) = self.elem_bytes(buf, idx, times) {
                    self.work.store_bytes += b;
                    *self.per_buf.entry(buf.clone()).or_default() += b;
                }
            }
            // A tile loop (`build::mma_tiles`: one split loop over the tiles, each a warp's,
            // not a lane's): counted as the row blocks × column blocks it enumerates, each tile
            // at its own block.
            Stmt::For {
                var,
                lo,
                hi,
                carried,
                body,
                split: true,
                ..
            } if carried.is_empty() && tile_grid(var, hi, body).is_some() => {
                let (rows, cols, mb, nb) = tile_grid(var, hi, body).expect("a tile grid");
                self.expr(lo, times);
                let zero = Iv::point(0.0);
                let (_, r) = self.expr(rows, times);
                let (_, c) = self.expr(cols, times);
                let trips = Iv::trips(zero, r) * Iv::trips(zero, c);
                self.vars.insert(mb.to_string(), (T::I, Iv::iter(zero, r)));
                self.vars.insert(nb.to_string(), (T::I, Iv::iter(zero, c)));
                for s in &body[2..] {
                    self.stmt(s, times * trips);
                }
            }
            Stmt::For {
                var,
                lo,
                hi,
                carried,
                body,
                yields,
                split,
            } => {
                let (_, l) = self.expr(lo, times);
                let (_, h) = self.expr(hi, times);
                let trips = Iv::trips(l, h);
                let scope = (self.varying.len(), self.lanes);
                if *split {
                    self.varying.push(var.clone());
                    self.lanes = Some(trips.clamp(1.0, 32.0));
                }
                let mut inits = Vec::new();
                for (n, e) in carried {
                    let init = self.expr(e, times);
                    self.vars.insert(n.clone(), init);
                    inits.push(init);
                }
                self.vars.insert(var.clone(), (T::I, Iv::iter(l, h)));
                // A carried int (a running count) grows by its expected increment per trip:
                // measured on a dry run of the yields (their work is counted below).
                let saved = (self.work, self.per_buf.clone());
                let incs: Vec<Option<Iv>> = yields
                    .iter()
                    .zip(&inits)
                    .map(|(y, (t, init))| {
                        (*t == T::I).then(|| {
                            let (_, next) = self.expr(y, 0.0);
                            Iv {
                                lo: next.lo - init.lo,
                                hi: next.hi - init.lo,
                                mean: next.mean - init.mean,
                                data: next.data,
                            }
                        })
                    })
                    .collect();
                (self.work, self.per_buf) = saved;
                let grown = |init: Iv, inc: Iv, n: f64| Iv {
                    lo: init.lo + (inc.lo * n).min(0.0),
                    hi: init.hi + (inc.hi * n).max(0.0),
                    mean: init.mean + inc.mean * n,
                    data: init.data || inc.data,
                };
                for (((n, _), (t, init)), inc) in carried.iter().zip(&inits).zip(&incs) {
                    if let (T::I, Some(inc)) = (t, inc) {
                        // Inside the loop: on average half-way.
                        self.vars
                            .insert(n.clone(), (T::I, grown(*init, *inc, trips / 2.0)));
                    }
                }
                self.block(body, times * trips);
                for y in yields {
                    self.expr(y, times * trips);
                }
                for (((n, _), (t, init)), inc) in carried.iter().zip(&inits).zip(&incs) {
                    if let (T::I, Some(inc)) = (t, inc) {
                        self.vars
                            .insert(n.clone(), (T::I, grown(*init, *inc, trips)));
                    }
                }
                self.varying.truncate(scope.0);
                self.lanes = scope.1;
            }
            Stmt::If { cond, then } => {
                // `if pidN < c` and the like: the programs taking the branch are a share of the
                // axis, and inside it the id lies in the narrower range.
                if let Some((a, inside)) = self.pid_range(cond) {
                    let all = self.pid(a);
                    let p = (inside.hi - inside.lo + 1.0).max(0.0) / (all.hi - all.lo + 1.0);
                    let saved = self.pids.insert(a, inside);
                    let scope = self.varying.len();
                    self.block(then, times * p);
                    self.varying.truncate(scope);
                    match saved {
                        Some(iv) => self.pids.insert(a, iv),
                        None => self.pids.remove(&a),
                    };
                    return;
                }
                let (_, p) = self.expr(cond, times);
                // Inside `if x < y` (y data), x lies below y's mean.
                let refined = match cond {
                    Expr::Cmp(super::CmpOp::Lt, a, b) => match (&**a, self.expr_quiet(b)) {
                        (Expr::Var(x), Some(y)) if y.data => self
                            .vars
                            .get(x)
                            .filter(|(t, iv)| *t == T::I && !iv.data)
                            .map(|&(_, iv)| (x.clone(), iv, y)),
                        _ => None,
                    },
                    _ => None,
                };
                let saved = refined.as_ref().map(|(x, iv, y)| {
                    let hi = (iv.hi + 1.0).min(y.mean).max(iv.lo + 1.0);
                    let inside = Iv::iter(Iv::point(iv.lo), Iv::point(hi));
                    self.vars.insert(x.clone(), (T::I, inside));
                    (x.clone(), *iv)
                });
                let scope = self.varying.len();
                self.block(then, times * p.mean);
                self.varying.truncate(scope);
                if let Some((x, iv)) = saved {
                    self.vars.insert(x, (T::I, iv));
                }
            }
            Stmt::Tile(op) => self.tile(op, times),
            Stmt::Mma(mma) => self.mma(mma, times),
            Stmt::Attend(a) if a.register_block() => self.attend(a, times),
            // What a GPU runs when the block is not a register block: the loops, their
            // state in locals.
            Stmt::Attend(a) => self.block(&super::expand::expand_attend(a), times),
        }
    }

    /// As a GPU register block runs it (accumulators in registers, each tile's keys and
    /// values loaded once for the block): the queries once per block row (per tile when they
    /// are not [resident](super::Attend::resident_queries)), the keys and values of every
    /// visited tile, both products over whole tiles and all the block's rows (masked keys
    /// and clamped rows included), the softmax per logit, the epilogue per valid output
    /// element.
    fn attend(&mut self, a: &super::Attend, times: f64) {
        let (_, m) = self.expr(&a.m, times);
        let (_, first) = self.expr(&a.tiles.0, times);
        let (_, end) = self.expr(&a.tiles.1, times);
        self.expr(&a.keys, times);
        let tiles = (end.mean - first.mean).max(0.0);
        let kt = a.key_tile as f64;
        let keys = tiles * kt;
        let saved = self.vars.clone();
        let (rows, qk, vw) = (a.rows as f64, a.qk as f64, a.vw as f64);
        let span = |lo: f64, hi: f64| (T::I, Iv::iter(Iv::point(lo), Iv::point(hi)));
        self.vars
            .insert(a.t.clone(), (T::I, Iv::iter(Iv::point(0.0), m)));
        self.vars
            .insert(a.j.clone(), span(first.mean * kt, end.mean * kt));
        self.vars.insert(a.e.clone(), span(0.0, qk));
        self.vars.insert(a.d.clone(), span(0.0, vw));
        let query_passes = if a.resident_queries() { 1.0 } else { tiles };
        self.expr(&a.query, times * rows * qk * query_passes);
        self.expr(&a.sees, times * rows);
        self.expr(&a.key, times * keys * qk);
        self.expr(&a.value, times * keys * vw);
        let products = 2.0 * rows * keys * (qk + vw) * times;
        // Scale, max, exp (with its subtraction), sum per logit.
        self.work.flops += products + 5.0 * rows * keys * times;
        self.work.bf16_mma_flops += products;
        self.vars.insert(a.out.clone(), (T::F, Iv::point(0.0)));
        self.block(&a.epilogue, times * m.mean * vw);
        self.vars = saved;
    }

    /// As a GPU runs it: each operand element loaded once per tile (rounded to bf16), the
    /// multiply-adds, then the epilogue per element.
    fn mma(&mut self, mma: &Mma, times: f64) {
        let (_, m) = self.expr(&mma.m, times);
        let (_, n) = self.expr(&mma.n, times);
        let depth = mma.depth as f64;
        let k = Iv::iter(Iv::point(0.0), Iv::point(depth));
        let saved = self.vars.clone();
        self.vars.insert(mma.k.clone(), (T::I, k));
        self.vars
            .insert(mma.i.clone(), (T::I, Iv::iter(Iv::point(0.0), m)));
        self.vars
            .insert(mma.j.clone(), (T::I, Iv::iter(Iv::point(0.0), n)));
        self.expr(&mma.a, times * m.mean * depth);
        self.expr(&mma.b, times * n.mean * depth);
        let flops = 2.0 * m.mean * n.mean * depth * times;
        self.work.flops += flops;
        match mma.kind {
            MmaKind::Bf16 => self.work.bf16_mma_flops += flops,
            MmaKind::Tf32x3 | MmaKind::F32 => self.work.tf32x3_flops += flops,
            MmaKind::Tf32 => self.work.tf32_flops += flops,
        }
        self.vars.insert(mma.acc.clone(), (T::F, Iv::point(0.0)));
        self.block(&mma.epilogue, times * m.mean * n.mean);
        self.vars = saved;
    }

    /// Tiles work on f32 locals: their FLOPs, and their operands' scratch traffic.
    fn tile(&mut self, op: &TileOp, times: f64) {
        let (flops, elems) = match op {
            TileOp::Dot {
                m,
                n,
                depth,
                accumulate,
                ..
            } => {
                let (_, m) = self.expr(m, times);
                let (_, n) = self.expr(n, times);
                let (m, n, d) = (m.mean, n.mean, *depth as f64);
                // As `expand::dots_on_tensor_cores` tiles it: each output tile of DOT_TILE²
                // reads its rows of `a` and of `b` over the depth; `out` written once (and
                // read first when accumulating).
                let t = super::expand::DOT_TILE as f64;
                let out = m * n * if *accumulate { 2.0 } else { 1.0 };
                (
                    2.0 * m * n * d,
                    m * d * (n / t).ceil() + n * d * (m / t).ceil() + out,
                )
            }
            TileOp::Cumsum { rows, cols, .. } => {
                let (_, r) = self.expr(rows, times);
                // Per element: x[t] and x[t − 1] read, x[t] written.
                (r.mean * *cols as f64, 3.0 * r.mean * *cols as f64)
            }
            TileOp::TriSolve { n, cols, .. } => {
                // Row i: its i entries of `l` and i earlier rows of `x`, then row i written.
                let (_, n) = self.expr(n, times);
                let (n, c) = (n.mean, *cols as f64);
                (n * n * c, n * n / 2.0 * (1.0 + c) + 2.0 * n * c)
            }
        };
        self.work.flops += flops * times;
        // A GPU runs a dot on tensor cores unless it sits in a split loop (dealt to the lanes).
        if matches!(op, TileOp::Dot { .. }) && self.lanes.is_none() {
            self.work.tf32x3_flops += flops * times;
        }
        self.work.scratch_bytes += 4.0 * elems * times;
    }

    /// The interval of int `e`, counting no work.
    /// The range of program id `a`: its grid axis, or narrower inside a branch on it.
    fn pid(&self, a: usize) -> Iv {
        self.pids.get(&a).copied().unwrap_or_else(|| {
            let ext = self.k.grid.get(a).map_or(1, |d: &Dim| d.eval(self.rows));
            Iv::range(0.0, ext.saturating_sub(1) as f64)
        })
    }

    /// For a condition `pidN op c` (a constant `c`): `N` and the ids within the current range
    /// that satisfy it (an empty range has `hi < lo`).
    fn pid_range(&self, cond: &Expr) -> Option<(usize, Iv)> {
        use super::CmpOp::*;
        let Expr::Cmp(op, a, b) = cond else {
            return None;
        };
        let (Expr::Pid(axis), Expr::I(c)) = (&**a, &**b) else {
            return None;
        };
        let r = self.pid(*axis);
        let c = *c as f64;
        let (lo, hi) = match op {
            Lt => (r.lo, r.hi.min(c - 1.0)),
            Le => (r.lo, r.hi.min(c)),
            Gt => (r.lo.max(c + 1.0), r.hi),
            Ge => (r.lo.max(c), r.hi),
            Eq => (r.lo.max(c), r.hi.min(c)),
            Ne => return None,
        };
        Some((*axis, Iv::range(lo, hi)))
    }

    fn expr_quiet(&mut self, e: &Expr) -> Option<Iv> {
        let (t, iv) = self.expr(e, 0.0);
        (t == T::I).then_some(iv)
    }

    fn expr(&mut self, e: &Expr, times: f64) -> (T, Iv) {
        let zero = Iv::point(0.0);
        match e {
            Expr::F(_) => (T::F, zero),
            Expr::I(v) => (T::I, Iv::point(*v as f64)),
            Expr::Var(n) => self.vars.get(n).copied().unwrap_or((T::F, zero)),
            Expr::Pid(a) => (T::I, self.pid(*a)),
            Expr::Rows => (T::I, Iv::point(self.rows as f64)),
            Expr::Load(b, idx) => {
                for i in idx {
                    self.expr(i, times);
                }
                if let Some(bytes) = self.elem_bytes(b, idx, times) {
                    self.work.load_bytes += bytes;
                    *self.per_buf.entry(b.clone()).or_default() += bytes;
                }
                let param = self.k.param(b).filter(|_| !self.locals.contains_key(b));
                if let Some(p) = param.filter(|p| p.elem == Elem::I64) {
                    match p.mean_per_row {
                        Some((num, den)) => {
                            let rows = self.rows as f64;
                            let mean = rows * num as f64 / den.max(1) as f64;
                            (
                                T::I,
                                Iv {
                                    lo: 0.0,
                                    hi: rows.max(mean),
                                    mean,
                                    data: true,
                                },
                            )
                        }
                        None => (T::I, self.data),
                    }
                } else {
                    (T::F, zero)
                }
            }
            Expr::Bin(op, a, b) => {
                let (ta, x) = self.expr(a, times);
                let (_, y) = self.expr(b, times);
                if ta == T::F {
                    self.work.flops += times;
                    return (T::F, zero);
                }
                use super::BinOp::*;
                let f: fn(f64, f64) -> f64 = match op {
                    Add => |a, b| a + b,
                    Sub => |a, b| a - b,
                    Mul => |a, b| a * b,
                    Div => |a, b| if b == 0.0 { a } else { (a / b).trunc() },
                    Max => f64::max,
                    Min => f64::min,
                    Rem => |a, b| if b == 0.0 { a } else { a % b },
                };
                let iv = match op {
                    Rem => Iv {
                        lo: 0.0,
                        hi: (y.hi.abs() - 1.0).max(0.0),
                        mean: ((y.mean.abs() - 1.0) / 2.0).max(0.0),
                        data: x.data || y.data,
                    },
                    Sub => Iv {
                        lo: x.lo - y.hi,
                        hi: x.hi - y.lo,
                        mean: x.mean - y.mean,
                        data: x.data || y.data,
                    },
                    _ => {
                        let c = [f(x.lo, y.lo), f(x.lo, y.hi), f(x.hi, y.lo), f(x.hi, y.hi)];
                        Iv {
                            lo: c.iter().copied().fold(f64::INFINITY, f64::min),
                            hi: c.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                            mean: f(x.mean, y.mean),
                            data: x.data || y.data,
                        }
                    }
                };
                // A quotient of data that truncates to zero keeps its fraction: an expert whose
                // rows average 0.25 runs a row block a quarter of the time, not never.
                let iv = match op {
                    Div if iv.data && iv.mean == 0.0 && y.mean != 0.0 => Iv {
                        mean: (x.mean / y.mean).max(0.0),
                        ..iv
                    },
                    _ => iv,
                };
                (T::I, iv)
            }
            Expr::Un(_, a) => {
                let (t, iv) = self.expr(a, times);
                if t == T::F {
                    self.work.flops += times;
                }
                (t, iv)
            }
            Expr::Cmp(op, a, b) => {
                let (_, x) = self.expr(a, times);
                let (_, y) = self.expr(b, times);
                // Equality of loaded data with a value ranging over n possibilities (a
                // token's expert against this program's expert) holds once in n; any other
                // comparison (bounds, masks) is taken as holding.
                use super::CmpOp::*;
                // The share of a spread int below a data value's mean.
                let below = |spread: Iv, data: f64| {
                    ((data - spread.lo) / (spread.hi - spread.lo + 1.0)).clamp(0.0, 1.0)
                };
                let p = match (op, x.data, y.data) {
                    (Eq, true, false) => 1.0 / (y.hi - y.lo + 1.0),
                    (Eq, false, true) => 1.0 / (x.hi - x.lo + 1.0),
                    (Lt, false, true) => below(x, y.mean),
                    (Le, false, true) => below(x, y.mean + 1.0),
                    (Gt, true, false) => below(y, x.mean),
                    (Ge, true, false) => below(y, x.mean + 1.0),
                    _ => 1.0,
                };
                (
                    T::I,
                    Iv {
                        lo: 0.0,
                        hi: 1.0,
                        mean: p,
                        data: x.data || y.data,
                    },
                )
            }
            Expr::Select(c, a, b) => {
                let (_, p) = self.expr(c, times);
                let (t, x) = self.expr(a, times);
                let (_, y) = self.expr(b, times);
                (
                    t,
                    Iv {
                        lo: x.lo.min(y.lo),
                        hi: x.hi.max(y.hi),
                        mean: p.mean * x.mean + (1.0 - p.mean) * y.mean,
                        data: p.data || x.data || y.data,
                    },
                )
            }
            Expr::ToF(a) => {
                self.expr(a, times);
                (T::F, zero)
            }
            Expr::ToI(a) => {
                self.expr(a, times);
                (T::I, self.data)
            }
            Expr::Reduce {
                var, lo, hi, body, ..
            } => {
                let (_, l) = self.expr(lo, times);
                let (_, h) = self.expr(hi, times);
                let trips = Iv::trips(l, h);
                let saved = self.vars.insert(var.clone(), (T::I, Iv::iter(l, h)));
                // A GPU deals a reduction over the lanes, unless it runs inside a split loop
                // (each lane then runs its own whole): only a dealt one varies between lanes.
                let scope = (self.varying.len(), self.lanes);
                if self.lanes.is_none() {
                    self.varying.push(var.clone());
                    self.lanes = Some(trips.clamp(1.0, 32.0));
                }
                self.expr(body, times * trips);
                self.varying.truncate(scope.0);
                self.lanes = scope.1;
                self.work.flops += times * trips;
                match saved {
                    Some(v) => self.vars.insert(var.clone(), v),
                    None => self.vars.remove(var),
                };
                (T::F, zero)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::build::*;
    use crate::kernel::{Access, Param};

    fn param(name: &str, shape: Vec<Dim>, access: Access) -> Param {
        Param {
            name: name.into(),
            elem: Elem::F32,
            shape,
            access,
            mean_per_row: None,
        }
    }

    #[test]
    fn counts_a_matrix_vector_product() {
        // y[r, n] = Σ_k x[r, k]·w[n, k]: per program 64 multiply-adds and 128 loads.
        let k = Kernel {
            name: "mv".into(),
            nodes: vec![],
            grid: vec![Dim::Rows, Dim::N(32)],
            params: vec![
                param("x", vec![Dim::Rows, Dim::N(64)], Access::Read),
                param("w", vec![Dim::N(32), Dim::N(64)], Access::Read),
                param("y", vec![Dim::Rows, Dim::N(32)], Access::Write),
            ],
            body: vec![st(
                "y",
                [pid(0), pid(1)],
                sum(
                    "k",
                    i(0),
                    i(64),
                    ld("x", [pid(0), v("k")]) * ld("w", [pid(1), v("k")]),
                ),
            )],
        };
        let w = launch_work(&k, 2, (0.0, 0.0));
        assert_eq!(w.flops, 2.0 * 32.0 * (64.0 * 2.0));
        assert_eq!(w.load_bytes, 2.0 * 32.0 * 128.0 * 4.0);
        assert_eq!(w.store_bytes, 2.0 * 32.0 * 4.0);
        // Each buffer once: x is re-read by all 32 column programs, but from cache.
        assert_eq!(
            w.dram_bytes(),
            (2.0 * 64.0 + 32.0 * 64.0 + 2.0 * 32.0) * 4.0
        );
    }

    #[test]
    fn triangular_and_data_dependent_loops_count_half() {
        // for t in 0..pos (pos loaded): counts pos at the middle of the data interval.
        let k = Kernel {
            name: "tri".into(),
            nodes: vec![],
            grid: vec![Dim::N(1)],
            params: vec![
                Param {
                    name: "pos".into(),
                    elem: Elem::I64,
                    shape: vec![Dim::N(1)],
                    access: Access::Read,
                    mean_per_row: None,
                },
                param("y", vec![Dim::N(1)], Access::Write),
            ],
            body: vec![
                Stmt::Let("n".into(), ld("pos", [i(0)])),
                st("y", [i(0)], sum("t", i(0), v("n"), f(1.0) + f(2.0))),
            ],
        };
        let w = launch_work(&k, 1, (0.0, 100.0));
        // 50 trips × (one add in the body + one accumulate).
        assert_eq!(w.flops, 100.0);
    }

    /// A tile loop (`mma_tiles`: one split loop over the tiles) costs what the row-block ×
    /// column-block loops it enumerates cost: the tiles are a warp's each, not lanes, and each
    /// tile is counted at its own block (a causal product's ragged last blocks included).
    #[test]
    fn tile_loops_count_as_their_grid() {
        let a = |r: Expr, k: Expr| ld("a", [r * i(16) + k]);
        let b = |c: Expr, k: Expr| ld("b", [c * i(16) + k]);
        let epi = |r: Expr, c: Expr, acc: Expr| {
            vec![if_(
                le(c.clone(), r.clone()),
                vec![st("y", [r * i(48) + c], acc * ld("g", [i(0)]))],
            )]
        };
        let flat = crate::kernel::build::mma_tiles(
            MmaKind::F32,
            crate::kernel::build::Tiling::Warp,
            i(48),
            i(40),
            16,
            &a,
            &b,
            &epi,
        );
        // The same tiles as nested loops.
        let Stmt::For { body, .. } = &flat else {
            unreachable!()
        };
        let tile = body[2].clone();
        let t = super::super::expand::DOT_TILE;
        let nested = for_(
            "_mb",
            i(0),
            (i(48) + i(t - 1)) / i(t),
            vec![for_("_nb", i(0), (i(40) + i(t - 1)) / i(t), vec![tile])],
        );
        let kernel = |s: Stmt| Kernel {
            name: "tiles".into(),
            nodes: vec![],
            grid: vec![Dim::N(1)],
            params: vec![
                param("a", vec![Dim::N(48 * 16)], Access::Read),
                param("b", vec![Dim::N(40 * 16)], Access::Read),
                param("g", vec![Dim::N(1)], Access::Read),
                param("y", vec![Dim::N(48 * 48)], Access::Write),
            ],
            body: vec![s],
        };
        let (wf, wn) = (
            launch_work(&kernel(flat), 1, (0.0, 0.0)),
            launch_work(&kernel(nested), 1, (0.0, 0.0)),
        );
        assert!(wn.tf32x3_flops > 0.0);
        assert_eq!(wf.tf32x3_flops, wn.tf32x3_flops);
        assert_eq!(wf.flops, wn.flops);
        assert_eq!(wf.load_bytes, wn.load_bytes);
        assert_eq!(wf.store_bytes, wn.store_bytes);
    }

    #[test]
    fn products_are_classed_by_the_units_that_run_them() {
        // A bf16 MMA tile (16 × 8 × 32), the same as a TF32 tile, the same dot twice (outside
        // and inside a split loop), and one exp per program.
        let dot_ = || {
            dot(
                view("c", i(0), 8),
                view("a", i(0), 32),
                view("b", i(0), 32),
                i(16),
                i(8),
                32,
                false,
            )
        };
        let tile = |kind| match mma(
            [16, 8, 32],
            i(16),
            i(8),
            ld("a", [v("mi") * i(32) + v("k")]),
            ld("b", [v("mj") * i(32) + v("k")]),
            vec![],
        ) {
            Stmt::Mma(m) => Stmt::Mma(Box::new(Mma { kind, ..*m })),
            _ => unreachable!(),
        };
        let k = Kernel {
            name: "classes".into(),
            nodes: vec![],
            grid: vec![Dim::N(1)],
            params: vec![param("y", vec![Dim::N(1)], Access::Write)],
            body: vec![
                local("a", 16 * 32),
                local("b", 8 * 32),
                local("c", 16 * 8),
                tile(MmaKind::Bf16),
                tile(MmaKind::Tf32),
                dot_(),
                for_par("p", i(0), i(1), vec![dot_()]),
                st("y", [i(0)], exp(f(1.0))),
            ],
        };
        let w = launch_work(&k, 1, (0.0, 0.0));
        let product = 2.0 * 16.0 * 8.0 * 32.0;
        assert_eq!(w.bf16_mma_flops, product);
        assert_eq!(w.tf32x3_flops, product);
        assert_eq!(w.tf32_flops, product);
        assert_eq!(w.cuda_core_flops(), product + 1.0);
        // bf16 at the tensor rate, TF32 at half of it (3xTF32: three times), the rest on the
        // CUDA cores.
        let t = w.compute_seconds(1e12, 1e11);
        let want = (1.0 + 6.0 + 2.0) * product / 1e12 + (product + 1.0) / 1e11;
        assert!((t - want).abs() < 1e-18, "{t} vs {want}");
    }

    #[test]
    fn locals_and_tiles_count_as_scratch_traffic() {
        // A local store, then `c += a·bᵀ` over 64 × 32 × 16: as 32 × 32 tensor-core tiles, `a`
        // is read once (one column tile), `b` twice (two row tiles), `c` read and written.
        let k = Kernel {
            name: "tile".into(),
            nodes: vec![],
            grid: vec![Dim::N(3)],
            params: vec![param("y", vec![Dim::N(3)], Access::Write)],
            body: vec![
                local("a", 64 * 16),
                local("b", 32 * 16),
                local("c", 64 * 32),
                st("a", [i(0)], f(1.0)),
                dot(
                    view("c", i(0), 32),
                    view("a", i(0), 16),
                    view("b", i(0), 16),
                    i(64),
                    i(32),
                    16,
                    true,
                ),
                st("y", [pid(0)], ld("c", [i(0)])),
            ],
        };
        let w = launch_work(&k, 1, (0.0, 0.0));
        let elems = 1.0 + 64.0 * 16.0 + 2.0 * 32.0 * 16.0 + 2.0 * 64.0 * 32.0 + 1.0;
        assert_eq!(w.scratch_bytes, 3.0 * 4.0 * elems);
        assert_eq!(w.flops, 3.0 * 2.0 * 64.0 * 32.0 * 16.0);
        // All on tensor cores, as 3xTF32.
        assert_eq!(w.tf32x3_flops, w.flops);
        assert_eq!(w.cuda_core_flops(), 0.0);
        // Only the parameter's bytes reach the roofline.
        assert_eq!(
            (w.load_bytes, w.store_bytes, w.dram_bytes()),
            (0.0, 12.0, 12.0)
        );
    }

    #[test]
    fn uniform_local_reads_in_split_loops_count_once_per_warp_step() {
        // for_par c in 0..64 (2 warp steps): a[c] per lane, b[0] the same on every lane, and
        // b[d] via a `let` of the lane's index.
        let k = Kernel {
            name: "lanes".into(),
            nodes: vec![],
            grid: vec![Dim::N(1)],
            params: vec![param("y", vec![Dim::N(64)], Access::Write)],
            body: vec![
                local("a", 64),
                local("b", 64),
                for_par(
                    "c",
                    i(0),
                    i(64),
                    vec![
                        Stmt::Let("d".into(), v("c") + i(0)),
                        st(
                            "y",
                            [v("c")],
                            ld("a", [v("c")]) + ld("b", [i(0)]) + ld("b", [v("d")]),
                        ),
                    ],
                ),
            ],
        };
        let w = launch_work(&k, 1, (0.0, 0.0));
        assert_eq!(w.scratch_bytes, 4.0 * (64.0 + 2.0 + 64.0));
    }
}
