//! Kernel verifier: every name is bound before use, every expression is well typed, loads and
//! stores use the right number of int indices, read-only parameters are never stored to, and
//! `R` appears only as a parameter's first dimension.

use std::collections::HashMap;

use super::{Access, Attend, BinOp, Dim, Elem, Expr, Kernel, Mma, Stmt, TileOp, UnOp, View};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    F32,
    Int,
    Bool,
}

impl Ty {
    fn of(e: Elem) -> Ty {
        match e {
            Elem::F32 | Elem::Bf16 => Ty::F32,
            Elem::I64 => Ty::Int,
        }
    }
}

enum Buf {
    Param {
        rank: usize,
        elem: Elem,
        access: Access,
    },
    Local {
        elem: Elem,
    },
}

struct Scope<'k> {
    k: &'k Kernel,
    vars: Vec<HashMap<String, Ty>>,
    bufs: Vec<HashMap<String, Buf>>,
    /// Every local declared so far, wherever: one name, one element type and length.
    locals: HashMap<String, (Elem, usize)>,
}

/// Checks `k`; the error names the kernel and the offending statement or expression.
pub fn verify_kernel(k: &Kernel) -> Result<(), String> {
    let fail = |msg: String| Err(format!("kernel {}: {msg}", k.name));
    if k.grid.is_empty() {
        return fail("empty grid".into());
    }
    if k.grid.contains(&Dim::RowBlocks(0)) {
        return fail("grid of row blocks of 0 rows".into());
    }
    let mut params = HashMap::new();
    for p in &k.params {
        if p.shape.iter().skip(1).any(|d| *d == Dim::Rows) {
            return fail(format!(
                "parameter {}: R may only be the first dimension",
                p.name
            ));
        }
        if p.shape.iter().any(|d| matches!(d, Dim::RowBlocks(_))) {
            return fail(format!(
                "parameter {}: row blocks are for grids, not shapes",
                p.name
            ));
        }
        if p.shape.contains(&Dim::N(0)) {
            return fail(format!("parameter {} has a zero dimension", p.name));
        }
        let prev = params.insert(
            p.name.clone(),
            Buf::Param {
                rank: p.shape.len(),
                elem: p.elem,
                access: p.access,
            },
        );
        if prev.is_some() {
            return fail(format!("parameter {} declared twice", p.name));
        }
    }
    let mut s = Scope {
        k,
        vars: vec![HashMap::new()],
        bufs: vec![params],
        locals: HashMap::new(),
    };
    s.block(&k.body).or_else(fail)
}

impl Scope<'_> {
    fn var(&self, n: &str) -> Option<Ty> {
        self.vars.iter().rev().find_map(|m| m.get(n).copied())
    }

    fn buf(&self, n: &str) -> Option<&Buf> {
        self.bufs.iter().rev().find_map(|m| m.get(n))
    }

    fn push(&mut self) {
        self.vars.push(HashMap::new());
        self.bufs.push(HashMap::new());
    }

    fn pop(&mut self) {
        self.vars.pop();
        self.bufs.pop();
    }

    fn bind(&mut self, n: &str, t: Ty) {
        self.vars
            .last_mut()
            .expect("scope")
            .insert(n.to_string(), t);
    }

    fn block(&mut self, b: &[Stmt]) -> Result<(), String> {
        for s in b {
            self.stmt(s)?;
        }
        Ok(())
    }

    fn index(&mut self, buf: &str, idx: &[Expr]) -> Result<Elem, String> {
        let (rank, elem) = match self.buf(buf) {
            Some(Buf::Param { rank, elem, .. }) => (*rank, *elem),
            Some(Buf::Local { elem }) => (1, *elem),
            None => return Err(format!("unknown buffer {buf}")),
        };
        if idx.len() != rank {
            return Err(format!(
                "{buf} has rank {rank}, indexed with {} indices",
                idx.len()
            ));
        }
        for e in idx {
            if self.expr(e)? != Ty::Int {
                return Err(format!("index of {buf} is not an int"));
            }
        }
        Ok(elem)
    }

    fn stmt(&mut self, s: &Stmt) -> Result<(), String> {
        match s {
            Stmt::Let(n, e) => {
                let t = self.expr(e).map_err(|m| format!("let {n}: {m}"))?;
                self.bind(n, t);
            }
            Stmt::Local { name, elem, len } => {
                if *len == 0 {
                    return Err(format!("local {name} has no elements"));
                }
                // Targets give each local name one allocation for the whole program.
                if self.k.param(name).is_some() {
                    return Err(format!("local {name} has the name of a parameter"));
                }
                if let Some((e, l)) = self.locals.insert(name.clone(), (*elem, *len)) {
                    if (e, l) != (*elem, *len) {
                        return Err(format!(
                            "local {name} declared again as {}[{len}] (was {}[{l}])",
                            elem.name(),
                            e.name()
                        ));
                    }
                }
                self.bufs
                    .last_mut()
                    .expect("scope")
                    .insert(name.clone(), Buf::Local { elem: *elem });
            }
            Stmt::Store { buf, idx, value } => {
                if let Some(Buf::Param {
                    access: Access::Read,
                    ..
                }) = self.buf(buf)
                {
                    return Err(format!("store to read-only parameter {buf}"));
                }
                let elem = self.index(buf, idx)?;
                let t = self.expr(value).map_err(|m| format!("store {buf}: {m}"))?;
                if t != Ty::of(elem) {
                    return Err(format!("store of {t:?} into {} buffer {buf}", elem.name()));
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
                if self.expr(lo)? != Ty::Int || self.expr(hi)? != Ty::Int {
                    return Err(format!("loop {var}: bounds must be ints"));
                }
                if *split && !carried.is_empty() {
                    split_sum(var, carried, body, yields)?;
                }
                if *split && carried.is_empty() && declares_local(body) {
                    return Err(format!(
                        "parallel split loop {var}: declares a local (its iterations run on \
                         different threads that share the program's locals)"
                    ));
                }
                let mut tys = Vec::new();
                for (n, init) in carried {
                    tys.push((n.clone(), self.expr(init)?));
                }
                if yields.len() != carried.len() {
                    return Err(format!(
                        "loop {var}: {} carried values, {} yielded",
                        carried.len(),
                        yields.len()
                    ));
                }
                self.push();
                self.bind(var, Ty::Int);
                for (n, t) in &tys {
                    self.bind(n, *t);
                }
                self.block(body)?;
                for (y, (n, t)) in yields.iter().zip(&tys) {
                    if self.expr(y)? != *t {
                        return Err(format!("loop {var}: yield for {n} changes its type"));
                    }
                }
                self.pop();
                for (n, t) in tys {
                    self.bind(&n, t);
                }
            }
            Stmt::If { cond, then } => {
                if self.expr(cond)? != Ty::Bool {
                    return Err("if: condition is not a bool".into());
                }
                self.push();
                self.block(then)?;
                self.pop();
            }
            Stmt::Tile(op) => self.tile(op)?,
            Stmt::Mma(mma) => self.mma(mma).map_err(|m| format!("mma: {m}"))?,
            Stmt::Attend(a) => self.attend(a).map_err(|m| format!("attend: {m}"))?,
        }
        Ok(())
    }

    /// Tile sizes in MMA multiples, int extents, f32 operands over their own indices, and an
    /// epilogue of lets, stores and conditionals only.
    fn mma(&mut self, mma: &Mma) -> Result<(), String> {
        let Mma {
            kind: _,
            rows,
            cols,
            m,
            n,
            depth,
            i,
            j,
            k,
            acc,
            a,
            b,
            epilogue,
        } = mma;
        if *rows == 0 || rows % Mma::M != 0 || *cols == 0 || cols % Mma::N != 0 || *depth == 0 {
            return Err(format!(
                "a {rows} x {cols} x {depth} tile (rows a multiple of {}, columns of {}, depth at least 1)",
                Mma::M,
                Mma::N
            ));
        }
        if self.expr(m)? != Ty::Int || self.expr(n)? != Ty::Int {
            return Err("the valid rows and columns must be ints".into());
        }
        for (what, e, idx) in [("a", a, i), ("b", b, j)] {
            self.push();
            self.bind(idx, Ty::Int);
            self.bind(k, Ty::Int);
            let t = self.expr(e).map_err(|m| format!("operand {what}: {m}"))?;
            self.pop();
            if t != Ty::F32 {
                return Err(format!("operand {what} is {t:?}, not f32"));
            }
        }
        self.epilogue(epilogue, [(i, Ty::Int), (j, Ty::Int), (acc, Ty::F32)])
    }

    /// An epilogue of lets, stores and conditionals, checked with `bound` bound.
    fn epilogue(&mut self, epilogue: &[Stmt], bound: [(&String, Ty); 3]) -> Result<(), String> {
        fn plain(b: &[Stmt]) -> bool {
            b.iter().all(|s| match s {
                Stmt::Let(..) | Stmt::Store { .. } => true,
                Stmt::If { then, .. } => plain(then),
                _ => false,
            })
        }
        if !plain(epilogue) {
            return Err("the epilogue may only bind lets, store and branch".into());
        }
        self.push();
        for (name, ty) in bound {
            self.bind(name, ty);
        }
        self.block(epilogue).map_err(|m| format!("epilogue: {m}"))?;
        self.pop();
        Ok(())
    }

    /// Block rows and key tiles in MMA multiples, int extents, f32 operands over their own
    /// indices, an int `sees`, and an epilogue with an MMA epilogue's rules.
    fn attend(&mut self, a: &Attend) -> Result<(), String> {
        if a.rows == 0
            || !a.rows.is_multiple_of(Mma::M)
            || a.key_tile == 0
            || !a.key_tile.is_multiple_of(16)
        {
            return Err(format!(
                "{} rows and key tiles of {} (multiples of {} and 16)",
                a.rows,
                a.key_tile,
                Mma::M
            ));
        }
        // (Any widths: the loops' MMA tiles take ragged edges; a GPU register block needs
        // more, see `Attend::register_block`.)
        if a.qk == 0 || a.vw == 0 {
            return Err(format!(
                "query width {} and value width {} (at least 1)",
                a.qk, a.vw
            ));
        }
        for (what, e) in [
            ("valid rows", &a.m),
            ("keys", &a.keys),
            ("first tile", &a.tiles.0),
            ("end tile", &a.tiles.1),
        ] {
            if self.expr(e)? != Ty::Int {
                return Err(format!("the {what} must be an int"));
            }
        }
        for (what, e, idx, want) in [
            ("query", &a.query, [&a.t, &a.e], Ty::F32),
            ("key", &a.key, [&a.j, &a.e], Ty::F32),
            ("value", &a.value, [&a.j, &a.d], Ty::F32),
            ("sees", &a.sees, [&a.t, &a.t], Ty::Int),
        ] {
            self.push();
            for n in idx {
                self.bind(n, Ty::Int);
            }
            let t = self.expr(e).map_err(|m| format!("{what}: {m}"))?;
            self.pop();
            if t != want {
                return Err(format!("{what} is {t:?}, not {want:?}"));
            }
        }
        self.epilogue(
            &a.epilogue,
            [(&a.t, Ty::Int), (&a.d, Ty::Int), (&a.out, Ty::F32)],
        )
    }

    /// Tile operands are f32 locals with int offsets; sizes are ints.
    fn tile(&mut self, op: &TileOp) -> Result<(), String> {
        let (what, views, sizes): (&str, Vec<&View>, Vec<&Expr>) = match op {
            TileOp::Dot {
                out, a, b, m, n, ..
            } => ("dot", vec![out, a, b], vec![m, n]),
            TileOp::Cumsum { x, rows, .. } => ("cumsum", vec![x], vec![rows]),
            TileOp::TriSolve { l, x, n, .. } => ("trisolve", vec![l, x], vec![n]),
        };
        for w in views {
            match self.buf(&w.buf) {
                Some(Buf::Local { elem: Elem::F32 }) => {}
                _ => return Err(format!("{what}: {} is not an f32 local", w.buf)),
            }
            if self.expr(&w.off)? != Ty::Int {
                return Err(format!("{what}: offset into {} is not an int", w.buf));
            }
        }
        for e in sizes {
            if self.expr(e)? != Ty::Int {
                return Err(format!("{what}: a size is not an int"));
            }
        }
        Ok(())
    }

    fn expr(&mut self, e: &Expr) -> Result<Ty, String> {
        Ok(match e {
            Expr::F(_) => Ty::F32,
            Expr::I(_) | Expr::Rows => Ty::Int,
            Expr::Var(n) => self.var(n).ok_or_else(|| format!("unbound name {n}"))?,
            Expr::Pid(a) => {
                if *a >= self.k.grid.len() {
                    return Err(format!("pid{a} outside the {}-d grid", self.k.grid.len()));
                }
                Ty::Int
            }
            Expr::Load(b, idx) => Ty::of(self.index(b, idx)?),
            Expr::Bin(op, a, b) => {
                let (ta, tb) = (self.expr(a)?, self.expr(b)?);
                if ta != tb || ta == Ty::Bool {
                    return Err(format!("{op:?} of {ta:?} and {tb:?}"));
                }
                if *op == BinOp::Rem && ta != Ty::Int {
                    return Err("% of floats".into());
                }
                ta
            }
            Expr::Un(op, a) => {
                let t = self.expr(a)?;
                if t != Ty::F32 && !(*op == UnOp::Neg && t == Ty::Int) {
                    return Err(format!("{op:?} of {t:?}"));
                }
                t
            }
            Expr::Cmp(_, a, b) => {
                let (ta, tb) = (self.expr(a)?, self.expr(b)?);
                if ta != tb || ta == Ty::Bool {
                    return Err(format!("comparison of {ta:?} and {tb:?}"));
                }
                Ty::Bool
            }
            Expr::Select(c, a, b) => {
                if self.expr(c)? != Ty::Bool {
                    return Err("select: condition is not a bool".into());
                }
                let (ta, tb) = (self.expr(a)?, self.expr(b)?);
                if ta != tb {
                    return Err(format!("select of {ta:?} and {tb:?}"));
                }
                ta
            }
            Expr::ToF(a) => {
                if self.expr(a)? != Ty::Int {
                    return Err("f32() of a non-int".into());
                }
                Ty::F32
            }
            Expr::ToI(a) => {
                if self.expr(a)? != Ty::F32 {
                    return Err("int() of a non-f32".into());
                }
                Ty::Int
            }
            Expr::Reduce {
                var, lo, hi, body, ..
            } => {
                if self.expr(lo)? != Ty::Int || self.expr(hi)? != Ty::Int {
                    return Err(format!("reduction over {var}: bounds must be ints"));
                }
                self.push();
                self.bind(var, Ty::Int);
                let t = self.expr(body)?;
                self.pop();
                if t != Ty::F32 {
                    return Err(format!("reduction over {var} of {t:?}"));
                }
                Ty::F32
            }
        })
    }
}

/// The shape of a split loop (see `Stmt::For`): lets only, and each yield `carried + term` with
/// a term that reads no carried value.
fn split_sum(
    var: &str,
    carried: &[(String, Expr)],
    body: &[Stmt],
    yields: &[Expr],
) -> Result<(), String> {
    if let Some(s) = body.iter().find(|s| !matches!(s, Stmt::Let(..))) {
        return Err(format!(
            "split loop {var}: its body may only bind lets, found {}",
            match s {
                Stmt::Store { buf, .. } => format!("a store to {buf}"),
                _ => "a nested statement".into(),
            }
        ));
    }
    let names: Vec<&str> = carried.iter().map(|(n, _)| n.as_str()).collect();
    for s in body {
        if let Stmt::Let(l, _) = s {
            if names.contains(&l.as_str()) || l == var {
                return Err(format!(
                    "split loop {var}: let {l} shadows a carried value or the loop variable"
                ));
            }
        }
        if let Stmt::Let(l, e) = s {
            if let Some(m) = names.iter().find(|m| e.reads(m)) {
                return Err(format!(
                    "split loop {var}: let {l} reads the carried value {m} (partial sums differ per thread)"
                ));
            }
        }
    }
    for ((n, _), y) in carried.iter().zip(yields) {
        let ok = match y {
            Expr::Bin(BinOp::Add, a, term) => {
                **a == Expr::Var(n.clone()) && !names.iter().any(|m| term.reads(m))
            }
            _ => false,
        };
        if !ok {
            return Err(format!(
                "split loop {var}: the yield of {n} must be `{n} + term` with a term that reads no carried value"
            ));
        }
    }
    Ok(())
}

/// Whether `body` declares a local anywhere inside.
fn declares_local(body: &[Stmt]) -> bool {
    body.iter().any(|s| match s {
        Stmt::Local { .. } => true,
        Stmt::For { body, .. } | Stmt::If { then: body, .. } => declares_local(body),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::super::build::*;
    use super::super::*;
    use super::verify_kernel;

    fn kernel(body: Vec<Stmt>) -> Kernel {
        Kernel {
            name: "k".into(),
            nodes: vec![],
            grid: vec![Dim::Rows],
            params: vec![
                input("x", &[Dim::Rows, Dim::N(8)]),
                output("y", &[Dim::Rows, Dim::N(8)]),
            ],
            body,
        }
    }

    #[test]
    fn locals_keep_one_shape_and_do_not_shadow_parameters() {
        let shadow = kernel(vec![local("x", 4)]);
        assert!(verify_kernel(&shadow)
            .unwrap_err()
            .contains("name of a parameter"));
        let twice = kernel(vec![
            for_("a", i(0), i(2), vec![local("t", 4)]),
            for_("b", i(0), i(2), vec![local("t", 8)]),
        ]);
        assert!(verify_kernel(&twice)
            .unwrap_err()
            .contains("declared again"));
        let same = kernel(vec![
            for_("a", i(0), i(2), vec![local("t", 4)]),
            for_("b", i(0), i(2), vec![local("t", 4)]),
        ]);
        assert!(verify_kernel(&same).is_ok());
    }

    #[test]
    fn tile_operands_must_be_f32_locals() {
        let ok = kernel(vec![
            local("m", 16),
            local("a", 16),
            dot(
                view("m", i(0), 4),
                view("a", i(0), 4),
                view("a", i(0), 4),
                i(4),
                i(4),
                4,
                false,
            ),
            cumsum(view("a", i(0), 4), i(4), 4),
            trisolve(view("m", i(0), 4), view("a", i(0), 4), i(4), 4),
        ]);
        assert!(verify_kernel(&ok).is_ok());
        let on_param = kernel(vec![cumsum(view("y", i(0), 8), rows(), 8)]);
        let e = verify_kernel(&on_param).unwrap_err();
        assert!(e.contains("cumsum: y is not an f32 local"), "{e}");
        let float_size = kernel(vec![local("a", 16), cumsum(view("a", i(0), 4), f(4.0), 4)]);
        assert!(verify_kernel(&float_size).is_err());
    }

    #[test]
    fn row_blocks_are_for_grids_only() {
        let mut k = kernel(vec![]);
        k.grid = vec![Dim::RowBlocks(4), Dim::N(2)];
        assert!(verify_kernel(&k).is_ok());
        assert_eq!(Dim::RowBlocks(4).eval(9), 3);
        k.params[0] = input("x", &[Dim::RowBlocks(4), Dim::N(8)]);
        let e = verify_kernel(&k).unwrap_err();
        assert!(e.contains("row blocks are for grids"), "{e}");
        k.params[0] = input("x", &[Dim::Rows, Dim::N(8)]);
        k.grid = vec![Dim::RowBlocks(0)];
        assert!(verify_kernel(&k).is_err());
    }

    #[test]
    fn accepts_a_norm() {
        let k = kernel(vec![
            let_(
                "ss",
                sum(
                    "c",
                    i(0),
                    i(8),
                    ld("x", [pid(0), v("c")]) * ld("x", [pid(0), v("c")]),
                ),
            ),
            for_(
                "c",
                i(0),
                i(8),
                vec![st(
                    "y",
                    [pid(0), v("c")],
                    ld("x", [pid(0), v("c")]) * rsqrt(v("ss")),
                )],
            ),
        ]);
        verify_kernel(&k).unwrap();
    }

    #[test]
    fn rejects_bad_kernels() {
        let cases = [
            (vec![st("x", [pid(0), i(0)], f(1.0))], "read-only"),
            (vec![st("y", [pid(0)], f(1.0))], "rank 2"),
            (
                vec![st("y", [pid(0), i(0)], v("nope"))],
                "unbound name nope",
            ),
            (vec![st("y", [pid(0), f(0.0)], f(1.0))], "not an int"),
            (vec![st("y", [pid(1), i(0)], f(1.0))], "pid1"),
            (vec![st("y", [pid(0), i(0)], i(1))], "store of Int"),
            (vec![st("y", [pid(0), i(0)], exp(i(1)))], "Exp of Int"),
        ];
        for (body, want) in cases {
            let err = verify_kernel(&kernel(body)).unwrap_err();
            assert!(err.contains(want), "{err} should mention {want}");
        }
    }

    #[test]
    fn split_loops_are_sums_of_lets() {
        let sum_loop = |body: Vec<Stmt>, y: Expr| {
            kernel(vec![
                for_sum("k", i(0), i(8), vec![("acc", f(1.0))], body, vec![y]),
                st("y", [pid(0), i(0)], v("acc")),
            ])
        };
        let x = || ld("x", [pid(0), v("k")]);
        verify_kernel(&sum_loop(vec![let_("t", x())], v("acc") + v("t") * v("t"))).unwrap();
        let cases = [
            (
                sum_loop(vec![st("y", [pid(0), v("k")], x())], v("acc") + x()),
                "may only bind lets",
            ),
            (sum_loop(vec![], v("acc") * x()), "must be `acc + term`"),
            (
                sum_loop(vec![], v("acc") + v("acc") * x()),
                "must be `acc + term`",
            ),
            (
                sum_loop(vec![let_("t", v("acc") * x())], v("acc") + v("t")),
                "reads the carried value acc",
            ),
            (
                sum_loop(vec![let_("acc", x())], v("acc") + f(1.0)),
                "shadows a carried value",
            ),
            (
                kernel(vec![for_par(
                    "k",
                    i(0),
                    i(8),
                    vec![
                        local("t", 1),
                        st("t", [i(0)], x()),
                        st("y", [pid(0), v("k")], ld("t", [i(0)])),
                    ],
                )]),
                "declares a local",
            ),
        ];
        for (k, want) in cases {
            let err = verify_kernel(&k).unwrap_err();
            assert!(err.contains(want), "{err} should mention {want}");
        }
    }
}
