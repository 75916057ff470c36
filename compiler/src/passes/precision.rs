//! `weight-precision`: the element type kernels read weights in. With `Options::weights_bf16`
//! every parameter bound to a weight (or to stacked experts) becomes `bf16` (loads widen to
//! f32: accumulation, states and softmax statistics stay f32); otherwise weights stay f32.
//! Runs before `dedupe-kernels`, so a kernel's signature carries its weights' type.
//!
//! `activation-precision` ([`ActivationPrecision`]): in tensor-core plans, activations read
//! only as bf16 GEMM operands are stored as bf16 (bit for bit the same results).
//!
//! `product-precision` ([`ProductPrecision`]): with `Options::tf32_products`, the f32 products
//! (`dot` tiles and `f32` MMA tiles: attention, the chunked recurrences) become TF32 MMA tiles
//! on every target, the host included (so tests see the GPU's arithmetic); otherwise a GPU runs
//! them as 3xTF32 and the host in f32.

use std::collections::HashMap;

use lamina_ir::kernel::{Access, Elem, Expr, MmaKind, Stmt, TileOp};
use lamina_ir::Error;

use super::{Pass, Program};
use crate::kernels::{Bind, Value};

pub struct WeightPrecision;

pub struct ProductPrecision;

impl Pass for ProductPrecision {
    fn name(&self) -> &'static str {
        "product-precision"
    }

    fn run(&self, p: &mut Program) -> Result<(), Error> {
        if !p.options.tf32_products {
            return Ok(());
        }
        // A kernel whose products changed is named for it (`gqa_flash_..._tf32`).
        for l in p.schedules.values_mut().flatten() {
            let k = lamina_ir::kernel::expand::dots_as_mma(&l.kernel, MmaKind::Tf32);
            if k.body != l.kernel.body {
                l.kernel.body = k.body;
                l.kernel.name += "_tf32";
            }
        }
        Ok(())
    }
}

impl Pass for WeightPrecision {
    fn name(&self) -> &'static str {
        "weight-precision"
    }

    fn run(&self, p: &mut Program) -> Result<(), Error> {
        if !p.options.weights_bf16 {
            return Ok(());
        }
        for l in p.schedules.values_mut().flatten() {
            for (param, bind) in l.kernel.params.iter_mut().zip(&l.args) {
                if matches!(bind, Bind::Weight(_) | Bind::Stacked { .. }) {
                    param.elem = Elem::Bf16;
                }
            }
        }
        Ok(())
    }
}

/// `activation-precision` (tensor-core plans): an activation that kernels only ever write, and
/// read only as a whole `Mma` operand of kind bf16 (a projection's or an expert GEMM's input:
/// the attention output before `o_proj`, a SwiGLU's output before `down`, the experts'
/// intermediate rows) or as the queries of a bf16 attention (prefill GQA's `q`), is stored as
/// bf16. The readers round it to bf16 anyway, and the store
/// rounds the same way (round to nearest even), so the results are bit for bit the same, at
/// half the bytes; on sm_90a the staged GEMMs can then copy such operands by `cp.async`. Values
/// read any other way (a norm, a residual, a router, the logits) stay f32, and plans that keep
/// every value for inspection (`Options::keep_values`) keep them all f32.
pub struct ActivationPrecision;

/// How a kernel uses parameter `buf`: loads that are a whole bf16 `Mma` operand, other loads,
/// and stores.
#[derive(Default)]
struct Uses {
    mma: usize,
    other: usize,
    stores: usize,
}

impl Uses {
    fn of(body: &[Stmt], buf: &str) -> Uses {
        let mut u = Uses::default();
        u.stmts(body, buf);
        u
    }

    fn stmts(&mut self, body: &[Stmt], buf: &str) {
        for s in body {
            match s {
                Stmt::Let(_, e) => self.expr(e, buf),
                Stmt::Local { .. } => {}
                Stmt::Store { buf: b, idx, value } => {
                    if b == buf {
                        self.stores += 1;
                    }
                    idx.iter().for_each(|e| self.expr(e, buf));
                    self.expr(value, buf);
                }
                Stmt::For {
                    lo,
                    hi,
                    carried,
                    body,
                    yields,
                    ..
                } => {
                    self.expr(lo, buf);
                    self.expr(hi, buf);
                    carried.iter().for_each(|(_, e)| self.expr(e, buf));
                    self.stmts(body, buf);
                    yields.iter().for_each(|e| self.expr(e, buf));
                }
                Stmt::If { cond, then } => {
                    self.expr(cond, buf);
                    self.stmts(then, buf);
                }
                // Tile operands are locals; only their sizes can read a parameter.
                Stmt::Tile(op) => match op {
                    TileOp::Dot { m, n, .. } => {
                        self.expr(m, buf);
                        self.expr(n, buf);
                    }
                    TileOp::Cumsum { rows, .. } => self.expr(rows, buf),
                    TileOp::TriSolve { n, .. } => self.expr(n, buf),
                },
                Stmt::Mma(mma) => {
                    self.expr(&mma.m, buf);
                    self.expr(&mma.n, buf);
                    for operand in [&mma.a, &mma.b] {
                        match operand {
                            Expr::Load(b, idx) if b == buf && mma.kind == MmaKind::Bf16 => {
                                self.mma += 1;
                                idx.iter().for_each(|e| self.expr(e, buf));
                            }
                            e => self.expr(e, buf),
                        }
                    }
                    self.stmts(&mma.epilogue, buf);
                }
                // A bf16 attention rounds its queries to bf16 as product operands (a GPU packs
                // them into fragments, the host's loops round them).
                Stmt::Attend(a) => {
                    for e in [&a.m, &a.keys, &a.tiles.0, &a.tiles.1] {
                        self.expr(e, buf);
                    }
                    match &a.query {
                        Expr::Load(b, idx) if b == buf && a.kind == MmaKind::Bf16 => {
                            self.mma += 1;
                            idx.iter().for_each(|e| self.expr(e, buf));
                        }
                        e => self.expr(e, buf),
                    }
                    for e in [&a.key, &a.value, &a.sees] {
                        self.expr(e, buf);
                    }
                    self.stmts(&a.epilogue, buf);
                }
            }
        }
    }

    fn expr(&mut self, e: &Expr, buf: &str) {
        match e {
            Expr::F(_) | Expr::I(_) | Expr::Var(_) | Expr::Pid(_) | Expr::Rows => {}
            Expr::Load(b, idx) => {
                if b == buf {
                    self.other += 1;
                }
                idx.iter().for_each(|e| self.expr(e, buf));
            }
            Expr::Bin(_, a, b) | Expr::Cmp(_, a, b) => {
                self.expr(a, buf);
                self.expr(b, buf);
            }
            Expr::Un(_, a) | Expr::ToF(a) | Expr::ToI(a) => self.expr(a, buf),
            Expr::Select(c, a, b) => {
                self.expr(c, buf);
                self.expr(a, buf);
                self.expr(b, buf);
            }
            Expr::Reduce { lo, hi, body, .. } => {
                self.expr(lo, buf);
                self.expr(hi, buf);
                self.expr(body, buf);
            }
        }
    }
}

impl Pass for ActivationPrecision {
    fn name(&self) -> &'static str {
        "activation-precision"
    }

    fn run(&self, p: &mut Program) -> Result<(), Error> {
        if !p.options.tensor_cores || p.options.keep_values {
            return Ok(());
        }
        let output = Value::Node(p.graph.output);
        for launches in p.schedules.values_mut() {
            // value → (still eligible, read as an MMA operand, written)
            let mut verdict: HashMap<Value, (bool, bool, bool)> = HashMap::new();
            for l in launches.iter() {
                for (param, bind) in l.kernel.params.iter().zip(&l.args) {
                    let Bind::Act(v) = bind else { continue };
                    let u = Uses::of(&l.kernel.body, &param.name);
                    let e = verdict.entry(*v).or_insert((*v != output, false, false));
                    let fits = param.elem == Elem::F32
                        && match param.access {
                            Access::Read => u.other == 0 && u.stores == 0,
                            Access::Write => u.other == 0 && u.mma == 0,
                            Access::ReadWrite => false,
                        };
                    e.0 &= fits;
                    e.1 |= param.access == Access::Read && u.mma > 0;
                    e.2 |= param.access == Access::Write && u.stores > 0;
                }
            }
            // A kernel with bf16 activations is named for them (`linear_mma_..._bf16x`), since
            // the same builder's f32 variant may serve other launches.
            for l in launches.iter_mut() {
                let mut suffix = String::new();
                for (param, bind) in l.kernel.params.iter_mut().zip(&l.args) {
                    if let Bind::Act(v) = bind {
                        if verdict[v] == (true, true, true) {
                            param.elem = Elem::Bf16;
                            suffix += &format!("_bf16{}", param.name);
                        }
                    }
                }
                l.kernel.name += &suffix;
            }
        }
        Ok(())
    }
}
