//! The stable text form of kernels.
//!
//! ```text
//! kernel rms_norm_64 grid(R)  // layers.0.mixer_norm
//!   in  x: f32[R, 64]
//!   out y: f32[R, 64]
//! {
//!   let inv = rsqrt(((sum c in 0..64: (x[pid0, c] * x[pid0, c])) / 64) + 1e-6)
//!   for c in 0..64 {
//!     y[pid0, c] = (x[pid0, c] * inv)
//!   }
//! }
//! ```

use std::fmt::Write;

use super::{BinOp, CmpOp, Dim, Expr, Kernel, ReduceOp, Stmt, TileOp, UnOp, View};
use crate::graph::print::fmt_f64;

pub fn fmt_dim(d: Dim) -> String {
    match d {
        Dim::Rows => "R".into(),
        Dim::N(n) => n.to_string(),
        Dim::RowBlocks(b) => format!("cdiv(R, {b})"),
    }
}

pub fn fmt_shape(s: &[Dim]) -> String {
    s.iter().map(|&d| fmt_dim(d)).collect::<Vec<_>>().join(", ")
}

/// The kernel with its name and graph nodes.
pub fn print_kernel(k: &Kernel) -> String {
    let mut out = format!("kernel {} ", k.name);
    out += &print_signature(k);
    if !k.nodes.is_empty() {
        // The node list goes on the header line, after the grid.
        let first = out.find('\n').unwrap_or(out.len());
        let shown: Vec<&str> = k.nodes.iter().take(3).map(|s| s.as_str()).collect();
        let more = if k.nodes.len() > 3 {
            format!(" (+{} more)", k.nodes.len() - 3)
        } else {
            String::new()
        };
        out.insert_str(first, &format!("  // {}{more}", shown.join(", ")));
    }
    out
}

/// Everything but the name and nodes: equal signatures mean interchangeable kernels.
pub fn print_signature(k: &Kernel) -> String {
    let mut out = format!(
        "grid({})\n",
        k.grid
            .iter()
            .map(|&d| fmt_dim(d))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for p in &k.params {
        let _ = writeln!(
            out,
            "  {:<5} {}: {}[{}]",
            p.access.name(),
            p.name,
            p.elem.name(),
            fmt_shape(&p.shape)
        );
    }
    out += "{\n";
    block(&mut out, &k.body, 1);
    out += "}\n";
    out
}

fn block(out: &mut String, b: &[Stmt], depth: usize) {
    for s in b {
        stmt(out, s, depth);
    }
}

fn stmt(out: &mut String, s: &Stmt, depth: usize) {
    let pad = "  ".repeat(depth);
    match s {
        Stmt::Let(n, e) => {
            let _ = writeln!(out, "{pad}let {n} = {}", expr(e));
        }
        Stmt::Local { name, elem, len } => {
            let _ = writeln!(out, "{pad}local {name}: {}[{len}]", elem.name());
        }
        Stmt::Store { buf, idx, value } => {
            let _ = writeln!(out, "{pad}{buf}[{}] = {}", exprs(idx), expr(value));
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
            let carry = if carried.is_empty() {
                String::new()
            } else {
                format!(
                    " carry({})",
                    carried
                        .iter()
                        .map(|(n, e)| format!("{n} = {}", expr(e)))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            let _ = writeln!(
                out,
                "{pad}for {var} in {}..{}{}{carry} {{",
                expr(lo),
                expr(hi),
                if *split { " split" } else { "" }
            );
            block(out, body, depth + 1);
            if !yields.is_empty() {
                let _ = writeln!(out, "{pad}  yield {}", exprs(yields));
            }
            let _ = writeln!(out, "{pad}}}");
        }
        Stmt::If { cond, then } => {
            let _ = writeln!(out, "{pad}if {} {{", expr(cond));
            block(out, then, depth + 1);
            let _ = writeln!(out, "{pad}}}");
        }
        Stmt::Mma(mma) => {
            let _ = writeln!(
                out,
                "{pad}mma {} {}x{} tile, {} < {}, {} < {}: {} = Σ_({} < {}) ({})·({}) {{",
                mma.kind.name(),
                mma.rows,
                mma.cols,
                mma.i,
                expr(&mma.m),
                mma.j,
                expr(&mma.n),
                mma.acc,
                mma.k,
                mma.depth,
                expr(&mma.a),
                expr(&mma.b),
            );
            block(out, &mma.epilogue, depth + 1);
            let _ = writeln!(out, "{pad}}}");
        }
        Stmt::Attend(a) => {
            let _ = writeln!(
                out,
                "{pad}attend {} {} rows, {} < {}, key tiles {}..{} of {}, {} < {}, scale {}:",
                a.kind.name(),
                a.rows,
                a.t,
                expr(&a.m),
                expr(&a.tiles.0),
                expr(&a.tiles.1),
                a.key_tile,
                a.j,
                expr(&a.keys),
                expr(&Expr::F(a.scale)),
            );
            let inner = "  ".repeat(depth + 1);
            let _ = writeln!(out, "{inner}sees({}) = {}", a.t, expr(&a.sees));
            let _ = writeln!(
                out,
                "{inner}query({}, {} < {}) = {}",
                a.t,
                a.e,
                a.qk,
                expr(&a.query)
            );
            let _ = writeln!(out, "{inner}key({}, {}) = {}", a.j, a.e, expr(&a.key));
            let _ = writeln!(
                out,
                "{inner}value({}, {} < {}) = {}",
                a.j,
                a.d,
                a.vw,
                expr(&a.value)
            );
            let _ = writeln!(out, "{inner}{} = softmax·value {{", a.out);
            block(out, &a.epilogue, depth + 2);
            let _ = writeln!(out, "{inner}}}");
        }
        Stmt::Tile(op) => {
            let w = |v: &View| format!("{}[off {}, ld {}]", v.buf, expr(&v.off), v.ld);
            let _ = match op {
                TileOp::Dot {
                    out: o,
                    a,
                    b,
                    m,
                    n,
                    depth: k,
                    accumulate,
                } => writeln!(
                    out,
                    "{pad}{} {}= dot({}, {}ᵀ) [{} x {} x {k}]",
                    w(o),
                    if *accumulate { "+" } else { "" },
                    w(a),
                    w(b),
                    expr(m),
                    expr(n)
                ),
                TileOp::Cumsum { x, rows, cols } => {
                    writeln!(out, "{pad}cumsum {} [{} x {cols}]", w(x), expr(rows))
                }
                TileOp::TriSolve { l, x, n, cols } => writeln!(
                    out,
                    "{pad}trisolve {} with unit-lower {} [{} x {cols}]",
                    w(x),
                    w(l),
                    expr(n)
                ),
            };
        }
    }
}

fn exprs(es: &[Expr]) -> String {
    es.iter().map(expr).collect::<Vec<_>>().join(", ")
}

pub fn expr(e: &Expr) -> String {
    match e {
        Expr::F(v) => {
            let s = fmt_f64(*v);
            if s.contains(['.', 'e', 'i', 'N']) {
                s
            } else {
                format!("{s}.0")
            }
        }
        Expr::I(v) => v.to_string(),
        Expr::Var(n) => n.clone(),
        Expr::Pid(a) => format!("pid{a}"),
        Expr::Rows => "R".into(),
        Expr::Load(b, idx) => format!("{b}[{}]", exprs(idx)),
        Expr::Bin(op, a, b) => {
            let sym = match op {
                BinOp::Add => "+",
                BinOp::Sub => "-",
                BinOp::Mul => "*",
                BinOp::Div => "/",
                BinOp::Rem => "%",
                BinOp::Max => return format!("max({}, {})", expr(a), expr(b)),
                BinOp::Min => return format!("min({}, {})", expr(a), expr(b)),
            };
            format!("({} {sym} {})", expr(a), expr(b))
        }
        Expr::Un(UnOp::Neg, a) => format!("-{}", expr(a)),
        Expr::Un(op, a) => {
            let name = match op {
                UnOp::Neg => unreachable!(),
                UnOp::Exp => "exp",
                UnOp::Log => "log",
                UnOp::Sqrt => "sqrt",
                UnOp::Rsqrt => "rsqrt",
                UnOp::Cos => "cos",
                UnOp::Sin => "sin",
                UnOp::Silu => "silu",
                UnOp::Sigmoid => "sigmoid",
                UnOp::Softplus => "softplus",
                UnOp::Bf16 => "bf16",
                UnOp::Tf32 => "tf32",
                UnOp::Tf32Round => "tf32_round",
            };
            format!("{name}({})", expr(a))
        }
        Expr::Cmp(op, a, b) => {
            let sym = match op {
                CmpOp::Lt => "<",
                CmpOp::Le => "<=",
                CmpOp::Gt => ">",
                CmpOp::Ge => ">=",
                CmpOp::Eq => "==",
                CmpOp::Ne => "!=",
            };
            format!("({} {sym} {})", expr(a), expr(b))
        }
        Expr::Select(c, a, b) => format!("select({}, {}, {})", expr(c), expr(a), expr(b)),
        Expr::ToF(a) => format!("f32({})", expr(a)),
        Expr::ToI(a) => format!("int({})", expr(a)),
        Expr::Reduce {
            op,
            var,
            lo,
            hi,
            body,
        } => format!(
            "({} {var} in {}..{}: {})",
            match op {
                ReduceOp::Sum => "sum",
                ReduceOp::Max => "max",
            },
            expr(lo),
            expr(hi),
            expr(body)
        ),
    }
}
