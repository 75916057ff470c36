//! `inline-maps`: a row-wise map (`y[r, c] = f(row r's inputs at column c)`: element-wise
//! activations, gates, residual adds, and the sums of split-K projections' partial products)
//! is computed by the kernels that read its output element-wise, instead of by a launch of
//! its own.
//!
//! A producer qualifies when its program is one parallel column loop storing `y[pid0, c] =
//! value`, `value` reading its row's inputs (activations and weights, no pool or workspace) and
//! nothing that depends on the program's column block. A consumer qualifies when it reads `y`
//! only through plain loads `y[r, c]` (not as an MMA operand, an attention block's input or a
//! tile operation's view, which stage or vectorise plain loads), at most
//! [`MAX_READS_PER_ELEMENT`] times per element, and never writes it. The fold happens when
//! every launch reading `y` qualifies (at most [`MAX_CONSUMERS`] of them, each computing the
//! elements it reads) and `y` is not the program's output: the producer's inputs become the
//! consumer's parameters (named `<param>_<input>`) and every `y[r, c]` the producer's `value`
//! at row `r`, column `c`. The consumer then computes the same f32 operations as the two
//! launches did: on the host in the same order, so with `strict_fp` the logits do not change by
//! a bit (`compiled::bf16_gemm_operands_change_no_bit`); a GPU warp program may deal a split-K
//! sum inlined outside its column loop over its lanes, adding the pieces in another order
//! (a few ulps). A consumer that took in a map is not
//! inlined in turn: a chain of maps (the residual stream's adds, layer after layer) would be
//! recomputed whole by every reader.
//!
//! This is what removes most decode launches of split-K projections' sums (decode GEMMs with
//! too few column blocks to fill the GPU split their depth, `kernels::linear`) and of the
//! residual adds after an MoE layer's shared expert: at batch 1 a decode step is some hundreds
//! of launches (Kimi-Linear-48B: 858 before this pass), each a few microseconds of launch and
//! drain on a GPU.

use lamina_ir::kernel::count::param_bytes;
use lamina_ir::kernel::{Access, Dim, Elem, Expr, Kernel, Stmt};
use lamina_ir::Error;

use super::{Pass, Program};
use crate::kernels::{Bind, Launch, Value};

/// Most launches that may each compute a map's elements.
pub const MAX_CONSUMERS: usize = 2;
/// Most loads of one element of a map's output by one consumer (an RMSNorm reads its row
/// three times, a decode recurrence step its gates 4 times at batch 4); more would recompute
/// the map too often (a GEMV's programs each read the whole input row).
pub const MAX_READS_PER_ELEMENT: f64 = 4.0;
/// Largest producer expression inlined (expression nodes).
pub const MAX_VALUE_NODES: usize = 64;

pub struct InlineMaps;

impl Pass for InlineMaps {
    fn name(&self) -> &'static str {
        "inline-maps"
    }

    fn run(&self, p: &mut Program) -> Result<(), Error> {
        // Debug builds that keep every value keep the maps' outputs too.
        if p.options.keep_values {
            return Ok(());
        }
        let output = Value::Node(p.graph.output);
        for (phase, launches) in p.schedules.iter_mut() {
            // The cost model's row count: the phase's rows per launch.
            let rows = match phase {
                crate::kernels::Phase::Prefill => p.options.max_prefill_rows,
                crate::kernels::Phase::Decode => p.options.max_batch,
            }
            .max(1);
            // Launches that computed a map inside: not inlined in turn, so that a chain of
            // maps (a residual stream's adds, layer after layer) is not recomputed whole.
            let mut absorbed = vec![false; launches.len()];
            let mut i = 0;
            while i < launches.len() {
                if !absorbed[i] && fold(launches, i, output, rows, &mut absorbed) {
                    launches.remove(i);
                    absorbed.remove(i);
                } else {
                    i += 1;
                }
            }
        }
        Ok(())
    }
}

/// A row-wise map: `out[pid0, var] = value` for the columns of a parallel split loop over
/// `var`, `value` reading only its own row (`pid0`) of row-indexed parameters and not
/// depending on `pid1`.
pub struct Map<'k> {
    pub out: &'k str,
    pub var: &'k str,
    pub value: &'k Expr,
}

/// `k` as a [`Map`], if it is one.
pub fn map_of(k: &Kernel) -> Option<Map<'_>> {
    let [Stmt::For {
        var,
        carried,
        body,
        split: true,
        ..
    }] = &k.body[..]
    else {
        return None;
    };
    let [Stmt::Store { buf, idx, value }] = &body[..] else {
        return None;
    };
    let column = matches!(&idx[..], [Expr::Pid(0), Expr::Var(c)] if c == var);
    let writes: Vec<_> = k
        .params
        .iter()
        .filter(|p| p.access != Access::Read)
        .collect();
    // One f32 output, only written (an inlined value skips the store's rounding), one row a
    // program (`pid0`), every column of the program's range computed from inputs alone.
    let one_output = matches!(&writes[..], [p] if p.name == *buf
        && p.access == Access::Write
        && p.elem == Elem::F32
        && p.shape.len() == 2
        && p.shape[0] == Dim::Rows);
    let (Stmt::For { lo, hi, .. }, Some(Dim::Rows)) = (&k.body[0], k.grid.first()) else {
        return None;
    };
    let range = !mentions_pid0(lo) && !mentions_pid0(hi);
    let row_wise = |name: &str, idx: &[Expr]| {
        let rows = k
            .param(name)
            .is_some_and(|p| p.shape.first() == Some(&Dim::Rows));
        !rows || idx.first() == Some(&Expr::Pid(0))
    };
    (carried.is_empty()
        && column
        && one_output
        && range
        && !loads(value, buf)
        && size(value) <= MAX_VALUE_NODES
        && pure(value, var, &mut Vec::new(), &row_wise))
    .then_some(Map {
        out: buf,
        var,
        value,
    })
}

/// Whether `e` reads only variable `var` (and its own reductions' variables, `bound`), no
/// `pid1`, and its loads are `row_wise`.
fn pure(
    e: &Expr,
    var: &str,
    bound: &mut Vec<String>,
    row_wise: &dyn Fn(&str, &[Expr]) -> bool,
) -> bool {
    let here = match e {
        Expr::Pid(p) => *p == 0,
        Expr::Var(n) => n == var || bound.contains(n),
        Expr::Load(b, idx) => row_wise(b, idx),
        Expr::Reduce {
            var: v,
            lo,
            hi,
            body,
            ..
        } => {
            if !(pure(lo, var, bound, row_wise) && pure(hi, var, bound, row_wise)) {
                return false;
            }
            bound.push(v.clone());
            let ok = pure(body, var, bound, row_wise);
            bound.pop();
            return ok;
        }
        _ => true,
    };
    here && e
        .children()
        .into_iter()
        .all(|c| pure(c, var, bound, row_wise))
}

/// Whether `e` reads `pid0`.
fn mentions_pid0(e: &Expr) -> bool {
    let mut found = false;
    visit(e, &mut |e| found |= matches!(e, Expr::Pid(0)));
    found
}

/// Whether `e` loads from `buf`.
fn loads(e: &Expr, buf: &str) -> bool {
    let mut found = false;
    visit(e, &mut |e| {
        found |= matches!(e, Expr::Load(b, _) if b == buf)
    });
    found
}

/// `f` on `e` and every expression inside it.
fn visit(e: &Expr, f: &mut dyn FnMut(&Expr)) {
    f(e);
    for c in e.children() {
        visit(c, f);
    }
}

/// Expression nodes of `e`.
fn size(e: &Expr) -> usize {
    1 + e.children().into_iter().map(size).sum::<usize>()
}

/// Folds launch `i` into the launches reading its output, if it is a [`Map`] they can all
/// take; returns whether it did (launch `i` is then to be removed).
fn fold(
    launches: &mut [Launch],
    i: usize,
    output: Value,
    rows: usize,
    absorbed: &mut [bool],
) -> bool {
    if map_of(&launches[i].kernel).is_none() {
        return false;
    }
    let producer = launches[i].clone();
    let map = map_of(&producer.kernel).expect("a map");
    let at_out = producer
        .kernel
        .params
        .iter()
        .position(|p| p.name == map.out)
        .expect("a map stores to a parameter");
    let Bind::Act(y) = producer.args[at_out] else {
        return false;
    };
    let n = producer.kernel.params[at_out].shape.clone();
    // Inputs: activations, weights and constants only (nothing another launch may change).
    let inputs: Vec<_> = producer
        .kernel
        .params
        .iter()
        .zip(&producer.args)
        .filter(|(p, _)| p.name != map.out)
        .collect();
    if y == output
        || !inputs.iter().all(|(_, b)| {
            matches!(
                b,
                Bind::Act(_) | Bind::Weight(_) | Bind::Stacked { .. } | Bind::Const(..)
            )
        })
    {
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
    let last = consumers.iter().copied().max().unwrap_or(i);
    // The names the fold adds to a consumer: its parameters `<x>_<input>` and the value's
    // reduction variables `<x>_<var>`.
    let mut reductions = Vec::new();
    visit(map.value, &mut |e| {
        if let Expr::Reduce { var, .. } = e {
            reductions.push(var.clone());
        }
    });
    let added = |x: &str| -> Vec<String> {
        let names = inputs.iter().map(|(q, _)| &q.name).chain(&reductions);
        names.map(|n| format!("{x}_{n}")).collect()
    };
    let eligible = !uses.is_empty()
        && consumers.len() <= MAX_CONSUMERS
        && uses.iter().all(|(j, x)| {
            let k = &launches[*j].kernel;
            let p = k.param(x).expect("bound parameters exist");
            let elems = p.numel(rows) as f64;
            let reads = param_bytes(k, rows, (0.0, 1.0), x) / (elems * p.elem.bytes() as f64);
            // Every name the kernel mentions, quoted (params, locals, variables, tiles).
            let text = format!("{k:?}");
            *j > i
                && p.access == Access::Read
                && p.elem == Elem::F32
                && p.shape == n
                && k.body.iter().all(|s| loads_only(s, x))
                && reads <= MAX_READS_PER_ELEMENT
                && added(x).iter().all(|n| !text.contains(&format!("{n:?}")))
        })
        // The inputs are read at the consumers' launch instead: nothing in between writes them.
        && launches[i + 1..=last].iter().all(|l| {
            l.kernel.params.iter().zip(&l.args).all(|(q, b)| {
                q.access == Access::Read || !inputs.iter().any(|(_, ib)| *ib == b)
            })
        });
    if !eligible {
        return false;
    }
    let tag = tag(&producer.kernel.name);
    for (j, x) in uses {
        absorbed[j] = true;
        let l = &mut launches[j];
        // The producer's value in the consumer's names: its inputs `x_<input>`, its
        // reductions' variables `x_<var>` (no capture of the consumer's variables).
        let renamed = rename(
            map.value,
            &x,
            &inputs
                .iter()
                .map(|(q, _)| q.name.as_str())
                .collect::<Vec<_>>(),
        );
        let at = l.kernel.params.iter().position(|p| p.name == x).unwrap();
        l.kernel.params.remove(at);
        l.args.remove(at);
        for (k, (q, b)) in inputs.iter().enumerate() {
            let mut q = (*q).clone();
            q.name = format!("{x}_{}", q.name);
            q.access = Access::Read;
            l.kernel.params.insert(at + k, q);
            l.args.insert(at + k, (*b).clone());
        }
        l.kernel.body = l
            .kernel
            .body
            .iter()
            .map(|s| {
                s.rewrite(&mut |e| inline(e, &x, &renamed, map.var), &|b| {
                    b.to_string()
                })
            })
            .collect();
        let suffix = format!("_{tag}");
        if !l.kernel.name.ends_with(&suffix) {
            l.kernel.name += &suffix;
        }
        for node in &producer.kernel.nodes {
            if !l.kernel.nodes.contains(node) {
                l.kernel.nodes.push(node.clone());
            }
        }
        for node in &producer.nodes {
            if !l.nodes.contains(node) {
                l.nodes.push(*node);
            }
        }
    }
    true
}

/// A short name for a folded producer in its consumers' names: `sum8` for
/// `splitk_sum8_2304_residual`, else the first word (`add`, `silu`, `swiglu`).
fn tag(name: &str) -> String {
    match name.strip_prefix("splitk_") {
        Some(rest) => rest.split('_').next().unwrap_or(rest).to_string(),
        None => name.split('_').next().unwrap_or(name).to_string(),
    }
}

/// `value` with the loads of `inputs` reading `<x>_<input>` and every reduction variable `v`
/// named `<x>_<v>`.
fn rename(value: &Expr, x: &str, inputs: &[&str]) -> Expr {
    match value {
        Expr::Load(b, idx) if inputs.contains(&b.as_str()) => Expr::Load(
            format!("{x}_{b}"),
            idx.iter().map(|i| rename(i, x, inputs)).collect(),
        ),
        Expr::Reduce {
            op,
            var,
            lo,
            hi,
            body,
        } => {
            let named = format!("{x}_{var}");
            let body = body.substitute(&[(var.as_str(), Expr::Var(named.clone()))]);
            Expr::Reduce {
                op: *op,
                var: named,
                lo: Box::new(rename(lo, x, inputs)),
                hi: Box::new(rename(hi, x, inputs)),
                body: Box::new(rename(&body, x, inputs)),
            }
        }
        _ => value.map_children(&mut |c| rename(c, x, inputs)),
    }
}

/// `e` with every load `x[r, c]` replaced by `value` at row `r` (its `pid0`) and column `c`
/// (its variable `var`).
fn inline(e: &Expr, x: &str, value: &Expr, var: &str) -> Expr {
    let e = e.map_children(&mut |c| inline(c, x, value, var));
    match &e {
        Expr::Load(b, idx) if b == x => at(value, var, (&idx[0], &idx[1])),
        _ => e,
    }
}

/// `e` (a map's value) at row `row` and column `col`: its `pid0` and its column variable `var`
/// replaced at once (neither replacement is substituted again).
fn at(e: &Expr, var: &str, (row, col): (&Expr, &Expr)) -> Expr {
    match e {
        Expr::Pid(0) => row.clone(),
        Expr::Var(v) if v == var => col.clone(),
        _ => e.map_children(&mut |c| at(c, var, (row, col))),
    }
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
    let mut ok = true;
    visit(e, &mut |e| {
        ok &= !matches!(e, Expr::Load(b, idx) if b == x && idx.len() != 2)
    });
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use lamina_ir::kernel::build::*;

    fn row(cols: usize) -> [Dim; 2] {
        [Dim::Rows, Dim::N(cols)]
    }

    /// `y[pid0, c] = value` over the columns of block `pid1`, with inputs `a` and `b`.
    fn map(value: Expr) -> Kernel {
        Kernel {
            name: "add_8".into(),
            nodes: vec![],
            grid: vec![Dim::Rows, Dim::N(1)],
            params: vec![
                input("a", &row(8)),
                input("b", &row(8)),
                output("y", &row(8)),
            ],
            body: vec![for_par(
                "c",
                pid(1) * i(8),
                i(8),
                vec![st("y", [pid(0), v("c")], value)],
            )],
        }
    }

    #[test]
    fn maps_are_one_row_wise_store() {
        let sum = ld("a", [pid(0), v("c")]) + sum("s", i(0), i(2), ld("b", [pid(0), v("s")]));
        assert!(map_of(&map(sum)).is_some());
        // Another row, the column block, the map's own output, a read-write output: no.
        assert!(map_of(&map(ld("a", [pid(0) + i(1), v("c")]))).is_none());
        assert!(map_of(&map(ld("a", [pid(0), v("c")]) * to_f(pid(1)))).is_none());
        assert!(map_of(&map(ld("y", [pid(0), v("c")]))).is_none());
        let mut rw = map(ld("a", [pid(0), v("c")]));
        rw.params[2].access = Access::ReadWrite;
        assert!(map_of(&rw).is_none());
        let mut narrow = map(ld("a", [pid(0), v("c")]));
        narrow.params[2].elem = Elem::Bf16;
        assert!(map_of(&narrow).is_none());
    }

    /// The value at (row, column) replaces `pid0` and the column variable at once: a consumer
    /// column that mentions `pid0`, or a row that mentions a variable named like the map's
    /// column, stays as the consumer wrote it.
    #[test]
    fn values_are_placed_at_the_consumers_element() {
        let value = ld("x_a", [pid(0), v("c")]) + ld("x_b", [pid(0), v("c")]);
        let consumer = ld("x", [v("c"), pid(0) * i(8) + v("e")]);
        let got = inline(&consumer, "x", &value, "c");
        let col = pid(0) * i(8) + v("e");
        let want = ld("x_a", [v("c"), col.clone()]) + ld("x_b", [v("c"), col]);
        assert_eq!(got, want);
    }

    /// A reduction in the value is renamed after the consumer's parameter, so it captures none
    /// of the consumer's variables.
    #[test]
    fn reductions_are_renamed() {
        let value = sum(
            "s",
            i(0),
            i(4),
            ld("part", [pid(0), v("s") * i(8) + v("c")]),
        );
        let renamed = rename(&value, "q", &["part"]);
        let want = sum(
            "q_s",
            i(0),
            i(4),
            ld("q_part", [pid(0), v("q_s") * i(8) + v("c")]),
        );
        assert_eq!(renamed, want);
    }
}
