//! `fold-splitk-sums`: a split-K projection's partial products (decode GEMMs with too few
//! column blocks to fill the GPU, `kernels::linear`) are added up by the kernels that read the
//! projection, instead of by a `splitk_sum` launch of their own, where those kernels read it
//! element by element.
//!
//! A consumer qualifies when it reads the projection `x` only through plain loads `x[r, c]`
//! (not as an MMA operand, an attention block's input or a tile operation's view, which stage
//! or vectorise plain loads) and never writes it. Its parameter is then bound to the partials
//! `[R, S·n]` instead and every `x[r, c]` becomes `Σ_(s < S) x[r, s·n + c]`: the sum the
//! `splitk_sum` kernel forms (in f32, where it stored f32). The fold
//! happens when every launch that reads the projection qualifies (at most [`MAX_CONSUMERS`],
//! each adding the pieces itself), and the projection is not the program's output. Sums with
//! a fused residual (the residual stream, which many kernels read) keep their launch.
//!
//! At batch 1 a decode step launches some hundreds of kernels (Kimi-Linear-48B: 858 before this
//! pass), each a few microseconds of launch and drain on a GPU: the q/k/v, gate, β and
//! shared-expert projections' sums are about a fifth of them.

use lamina_ir::kernel::{Dim, Expr, Kernel, ReduceOp, Stmt};
use lamina_ir::Error;

use super::{Pass, Program};
use crate::kernels::{Bind, Launch, Value};

/// Most launches that may each add the pieces of one projection.
pub const MAX_CONSUMERS: usize = 2;

pub struct FoldSplitkSums;

impl Pass for FoldSplitkSums {
    fn name(&self) -> &'static str {
        "fold-splitk-sums"
    }

    fn run(&self, p: &mut Program) -> Result<(), Error> {
        // Debug builds that keep every value keep the sums' outputs too.
        if p.options.keep_values {
            return Ok(());
        }
        let output = Value::Node(p.graph.output);
        for launches in p.schedules.values_mut() {
            let mut i = 0;
            while i < launches.len() {
                if fold(launches, i, output) {
                    launches.remove(i);
                } else {
                    i += 1;
                }
            }
        }
        Ok(())
    }
}

/// `(pieces S, columns n)` when `k` is a plain split-K sum, `y[r, c] = Σ_s part[r, s·n + c]`:
/// a `splitk_sum` kernel with exactly the partials in and the projection out.
pub fn splitk_sum(k: &Kernel) -> Option<(usize, usize)> {
    let [part, y] = &k.params[..] else {
        return None;
    };
    if !k.name.starts_with("splitk_sum") || part.name != "part" || y.name != "y" {
        return None;
    }
    match (&part.shape[..], &y.shape[..]) {
        ([Dim::Rows, Dim::N(pn)], [Dim::Rows, Dim::N(n)]) if *n > 0 && pn % n == 0 => {
            Some((pn / n, *n))
        }
        _ => None,
    }
}

/// Folds launch `i` into the launches reading its output, if it is a split-K sum they can all
/// take; returns whether it did (launch `i` is then to be removed).
fn fold(launches: &mut [Launch], i: usize, output: Value) -> bool {
    let Some((pieces, n)) = splitk_sum(&launches[i].kernel) else {
        return false;
    };
    let (Bind::Act(part), Bind::Act(y)) = (&launches[i].args[0], &launches[i].args[1]) else {
        return false;
    };
    let (part, y) = (*part, *y);
    if y == output {
        return false;
    }
    // Every (launch, parameter) reading y.
    let mut uses = Vec::new();
    for (j, l) in launches.iter().enumerate().filter(|&(j, _)| j != i) {
        for (param, bind) in l.kernel.params.iter().zip(&l.args) {
            if *bind == Bind::Act(y) {
                uses.push((j, param.name.clone()));
            }
        }
    }
    let consumers: std::collections::BTreeSet<usize> = uses.iter().map(|(j, _)| *j).collect();
    let eligible = !uses.is_empty()
        && consumers.len() <= MAX_CONSUMERS
        && uses.iter().all(|(j, x)| {
            *j > i && {
                let k = &launches[*j].kernel;
                let p = k.param(x).expect("bound parameters exist");
                p.access == lamina_ir::kernel::Access::Read
                    && p.shape == [Dim::Rows, Dim::N(n)]
                    && k.body.iter().all(|s| loads_only(s, x))
            }
        });
    if !eligible {
        return false;
    }
    for (j, x) in uses {
        let l = &mut launches[j];
        let at = l.kernel.params.iter().position(|p| p.name == x).unwrap();
        l.kernel.params[at].shape = vec![Dim::Rows, Dim::N(pieces * n)];
        l.args[at] = Bind::Act(part);
        let piece = format!("{x}_piece");
        l.kernel.body = l
            .kernel
            .body
            .iter()
            .map(|s| map_stmt(s, &|e| sum_pieces(e, &x, &piece, pieces, n)))
            .collect();
        let suffix = format!("_sum{pieces}");
        if !l.kernel.name.ends_with(&suffix) {
            l.kernel.name += &suffix;
        }
    }
    true
}

/// Whether `s` reads buffer `x` only through two-index loads in plain statements and never
/// stores to it.
fn loads_only(s: &Stmt, x: &str) -> bool {
    let e = |e: &Expr| expr_loads_only(e, x);
    match s {
        Stmt::Let(_, v) => e(v),
        Stmt::Local { name, .. } => name != x,
        Stmt::Store { buf, idx, value } => buf != x && idx.iter().all(e) && e(value),
        Stmt::For {
            lo,
            hi,
            carried,
            body,
            yields,
            ..
        } => {
            e(lo)
                && e(hi)
                && carried.iter().all(|(_, v)| e(v))
                && yields.iter().all(e)
                && body.iter().all(|s| loads_only(s, x))
        }
        Stmt::If { cond, then } => e(cond) && then.iter().all(|s| loads_only(s, x)),
        // Staged and vectorised operands: not mentioning x at all.
        Stmt::Tile(_) | Stmt::Mma(_) | Stmt::Attend(_) => {
            !format!("{s:?}").contains(&format!("{x:?}"))
        }
    }
}

fn expr_loads_only(e: &Expr, x: &str) -> bool {
    let go = |e: &Expr| expr_loads_only(e, x);
    match e {
        Expr::F(_) | Expr::I(_) | Expr::Var(_) | Expr::Pid(_) | Expr::Rows => true,
        Expr::Load(b, idx) => (b != x || idx.len() == 2) && idx.iter().all(go),
        Expr::Bin(_, a, b) | Expr::Cmp(_, a, b) => go(a) && go(b),
        Expr::Un(_, a) | Expr::ToF(a) | Expr::ToI(a) => go(a),
        Expr::Select(c, a, b) => go(c) && go(a) && go(b),
        Expr::Reduce { lo, hi, body, .. } => go(lo) && go(hi) && go(body),
    }
}

/// `e` with every `x[r, c]` replaced by `Σ_(piece < pieces) x[r, piece·n + c]`.
fn sum_pieces(e: &Expr, x: &str, piece: &str, pieces: usize, n: usize) -> Expr {
    let go = |e: &Expr| Box::new(sum_pieces(e, x, piece, pieces, n));
    match e {
        Expr::Load(b, idx) => {
            let idx: Vec<Expr> = idx.iter().map(|i| *go(i)).collect();
            if b != x {
                return Expr::Load(b.clone(), idx);
            }
            let col = Expr::Bin(
                lamina_ir::kernel::BinOp::Add,
                Box::new(Expr::Bin(
                    lamina_ir::kernel::BinOp::Mul,
                    Box::new(Expr::Var(piece.into())),
                    Box::new(Expr::I(n as i64)),
                )),
                Box::new(idx[1].clone()),
            );
            Expr::Reduce {
                op: ReduceOp::Sum,
                var: piece.into(),
                lo: Box::new(Expr::I(0)),
                hi: Box::new(Expr::I(pieces as i64)),
                body: Box::new(Expr::Load(b.clone(), vec![idx[0].clone(), col])),
            }
        }
        Expr::F(_) | Expr::I(_) | Expr::Var(_) | Expr::Pid(_) | Expr::Rows => e.clone(),
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

/// `s` with `f` applied to each of its expressions (plain statements; [`loads_only`] keeps the
/// others from reading the folded buffer, so they are left as they are).
fn map_stmt(s: &Stmt, f: &dyn Fn(&Expr) -> Expr) -> Stmt {
    match s {
        Stmt::Let(n, v) => Stmt::Let(n.clone(), f(v)),
        Stmt::Store { buf, idx, value } => Stmt::Store {
            buf: buf.clone(),
            idx: idx.iter().map(f).collect(),
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
            carried: carried.iter().map(|(n, v)| (n.clone(), f(v))).collect(),
            body: body.iter().map(|s| map_stmt(s, f)).collect(),
            yields: yields.iter().map(f).collect(),
            split: *split,
        },
        Stmt::If { cond, then } => Stmt::If {
            cond: f(cond),
            then: then.iter().map(|s| map_stmt(s, f)).collect(),
        },
        Stmt::Local { .. } | Stmt::Tile(_) | Stmt::Mma(_) | Stmt::Attend(_) => s.clone(),
    }
}
