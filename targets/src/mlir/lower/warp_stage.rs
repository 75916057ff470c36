//! A warp program's [`Stmt::Mma`] with its operands staged through the warp's slice of shared
//! memory by `cp.async`, in a pipeline of 2 to 4 stages: the warp-level counterpart of [`super::staged`]
//! (which stages a whole block's tile), for the tiles inside warp programs (flash attention,
//! the chunked recurrences, MLA decode, split-K projections).
//!
//! - Which operands: a load along the depth of a global buffer (a parameter, or a local that
//!   lives in the scratch buffer), `buf[.., c + k]` with unit stride in `k` and every other
//!   offset a multiple of 16 bytes, of the element the products take (f32 for the TF32 kinds,
//!   bf16 for [`MmaKind::Bf16`]); the depth a whole number of slabs ([`stageable`]). Any other
//!   operand (a `select`, a transposed read, a local already in shared memory) is loaded
//!   straight from its expression per fragment, as [`super::mma`] does without staging.
//! - Slabs: [`SLAB_BYTES`] of depth per operand row (16 f32 or 32 bf16, two MMA steps), rows
//!   padded to [`ROW_BYTES`] so that consecutive rows start 20 banks apart: a fragment load's
//!   32 lanes (8 rows × 4 words) hit 32 distinct banks, and rows stay 16-byte aligned.
//! - Copies: `cp.async.ca` (kept in L1 too, as the direct fragment loads were: MLA reads its
//!   latent rows again as values, flash its query block every key tile); each lane copies
//!   16-byte chunks (row `c / 4`, chunk `c % 4` for `c = 32·round +
//!   lane`): a row's 64 bytes are 4 consecutive lanes, so a round reads 8 whole 64-byte runs.
//!   Rows past the tile's edge copy the last valid row (a valid address; never stored).
//! - Pipeline: `S` stages, from 2 to 4, as many as the warp's staging area holds ([`stages`]:
//!   the decode projections' thin weight slabs get 4, the flash and chunk tiles 2). Slabs
//!   `0 .. S − 1` are issued before the loop; iteration `s` issues slab `s + S − 1` into the stage
//!   slab `s − 1` used, waits for its own copies of slab `s` (`cp.async.wait_group S − 1`), then
//!   a warp barrier makes every lane's copies visible; after the products, a second warp
//!   barrier lets the next iteration overwrite the stage just read. Past the depth, the last
//!   slab is re-issued into a stage no later iteration reads rather than branching; the copies
//!   are drained after the loop.
//!
//! The host runs the same `Stmt::Mma` as loops; this module only decides where the operands
//! wait on the way to the tensor cores, so the products are those of [`super::mma`].

use std::collections::{HashMap, HashSet};

use lamina_ir::kernel::{BinOp, Elem, Expr, Kernel, Mma, MmaKind, Stmt};
use melior::dialect::scf;
use melior::ir::operation::OperationBuilder;
use melior::ir::r#type::IntegerType;
use melior::ir::{Block, BlockLike, Region, RegionLike, Type, Value};

use super::mma::register_variants;
use super::{a_fragment, b_fragment, bug, Env, Lower, Ty, R};

/// Depth bytes of one staged slab row: 16 f32 or 32 bf16 (two MMA steps of either kind).
pub const SLAB_BYTES: usize = 64;
/// Shared-memory bytes per slab row: the slab plus 16 bytes of padding (20 banks apart).
pub const ROW_BYTES: usize = SLAB_BYTES + 16;
/// Stages a tile may use: from 2 (one slab multiplied while the next is copied) to 4 (three
/// in flight), as many as the warp's staging area holds ([`stages`]).
pub const MIN_STAGES: usize = 2;
pub const MAX_STAGES: usize = 4;
/// Bytes of one `cp.async`.
const CHUNK: usize = 16;

/// An operand `cp.async` can stage: `buf[outer.., offset + k]`, each outer index with its
/// stride (elements).
#[derive(Debug)]
pub struct Stageable<'e> {
    pub buf: &'e str,
    pub elem: Elem,
    pub outer: Vec<(&'e Expr, usize)>,
    pub offset: Option<&'e Expr>,
}

/// The element an operand of `kind` is staged as.
fn staged_elem(kind: MmaKind) -> Elem {
    match kind {
        MmaKind::Bf16 => Elem::Bf16,
        MmaKind::Tf32x3 | MmaKind::Tf32 | MmaKind::F32 => Elem::F32,
    }
}

/// Depth elements of one slab of `kind`.
pub fn slab_depth(kind: MmaKind) -> usize {
    SLAB_BYTES / staged_elem(kind).bytes()
}

/// A global buffer's element and row-major strides, by name (`None`: not in global memory).
pub type Lookup<'l> = dyn Fn(&str) -> Option<(Elem, Vec<usize>)> + 'l;

/// The kernel's `let` definitions, for [`stageable`]'s alignment proofs: every definition of
/// each name (a name may be bound in several scopes, MMA epilogues included), and the names
/// also bound some other way (loop variables, carried values, reduction variables, MMA
/// indices), which prove nothing.
#[derive(Debug, Default)]
pub struct Lets {
    defs: HashMap<String, Vec<Expr>>,
    other: HashSet<String>,
}

impl Lets {
    /// Every definition of `name`, when `let`s are its only bindings.
    fn only_lets(&self, name: &str) -> Option<&[Expr]> {
        if self.other.contains(name) {
            return None;
        }
        self.defs.get(name).map(Vec::as_slice)
    }
}

/// The `let` definitions of `k`.
pub fn lets(k: &Kernel) -> Lets {
    fn expr(e: &Expr, out: &mut Lets) {
        match e {
            Expr::Reduce {
                var, lo, hi, body, ..
            } => {
                out.other.insert(var.clone());
                for x in [lo, hi, body] {
                    expr(x, out);
                }
            }
            Expr::Load(_, idx) => idx.iter().for_each(|x| expr(x, out)),
            Expr::Bin(_, a, b) | Expr::Cmp(_, a, b) => {
                expr(a, out);
                expr(b, out);
            }
            Expr::Un(_, a) | Expr::ToF(a) | Expr::ToI(a) => expr(a, out),
            Expr::Select(c, a, b) => [c, a, b].into_iter().for_each(|x| expr(x, out)),
            Expr::F(_) | Expr::I(_) | Expr::Var(_) | Expr::Pid(_) | Expr::Rows => {}
        }
    }
    fn walk(b: &[Stmt], out: &mut Lets) {
        for s in b {
            match s {
                Stmt::Let(n, e) => {
                    out.defs.entry(n.clone()).or_default().push(e.clone());
                    expr(e, out);
                }
                Stmt::For {
                    var,
                    lo,
                    hi,
                    carried,
                    body,
                    yields,
                    ..
                } => {
                    out.other.insert(var.clone());
                    for (n, e) in carried {
                        out.other.insert(n.clone());
                        expr(e, out);
                    }
                    [lo, hi]
                        .into_iter()
                        .chain(yields)
                        .for_each(|x| expr(x, out));
                    walk(body, out);
                }
                Stmt::If { cond, then } => {
                    expr(cond, out);
                    walk(then, out);
                }
                Stmt::Mma(m) => {
                    for n in [&m.i, &m.j, &m.k, &m.acc] {
                        out.other.insert(n.clone());
                    }
                    [&m.m, &m.n, &m.a, &m.b]
                        .into_iter()
                        .for_each(|x| expr(x, out));
                    walk(&m.epilogue, out);
                }
                Stmt::Attend(a) => {
                    for n in [&a.t, &a.j, &a.e, &a.d, &a.out] {
                        out.other.insert(n.clone());
                    }
                    [&a.m, &a.keys, &a.tiles.0, &a.tiles.1]
                        .into_iter()
                        .chain([&a.query, &a.key, &a.value, &a.sees])
                        .for_each(|x| expr(x, out));
                    walk(&a.epilogue, out);
                }
                Stmt::Store { idx, value, .. } => {
                    idx.iter().chain([value]).for_each(|x| expr(x, out));
                }
                Stmt::Local { .. } | Stmt::Tile(_) => {}
            }
        }
    }
    let mut out = Lets::default();
    walk(&k.body, &mut out);
    out
}

/// Whether `operand` of `mma` can be staged: see the module docs. `lookup(buf)` gives a global
/// buffer's element and row-major strides (`None` for a buffer that is not in global memory,
/// such as locals kept in shared memory); `lets` the kernel's `let` definitions.
pub fn stageable<'e>(
    mma: &Mma,
    operand: &'e Expr,
    lookup: &Lookup,
    lets: &Lets,
) -> Option<Stageable<'e>> {
    let Expr::Load(buf, idx) = operand else {
        return None;
    };
    let (elem, strides) = lookup(buf)?;
    let per_chunk = CHUNK / elem.bytes();
    if elem != staged_elem(mma.kind)
        || !mma.depth.is_multiple_of(slab_depth(mma.kind))
        || strides.len() != idx.len()
    {
        return None;
    }
    let (last, outer) = idx.split_last()?;
    let (1, outer_strides) = strides.split_last()? else {
        return None;
    };
    let k = mma.k.as_str();
    let offset = match last {
        Expr::Var(v) if v == k => None,
        Expr::Bin(BinOp::Add, a, b) => match (&**a, &**b) {
            (Expr::Var(v), c) | (c, Expr::Var(v)) if v == k && !c.reads(k) => Some(c),
            _ => return None,
        },
        _ => return None,
    };
    // Every lane computes its own rows' addresses: no reduction (dealt over the lanes) in them.
    let aligned = !idx.iter().any(Expr::has_reduce)
        && offset.is_none_or(|c| multiple_of(c, per_chunk, lets, 0))
        && outer_strides.iter().all(|s| s.is_multiple_of(per_chunk))
        && outer.iter().all(|x| !x.reads(k));
    aligned.then(|| Stageable {
        buf: buf.as_str(),
        elem,
        outer: outer.iter().zip(outer_strides.iter().copied()).collect(),
        offset,
    })
}

/// Whether integer expression `e` is a multiple of `n` whatever its variables hold: constants,
/// sums and products of such, and `let`s every definition of which is one (`depth` bounds
/// the chase through `let`s).
pub(super) fn multiple_of(e: &Expr, n: usize, lets: &Lets, depth: usize) -> bool {
    match e {
        Expr::I(c) => c.rem_euclid(n as i64) == 0,
        Expr::Bin(BinOp::Add | BinOp::Sub, a, b) => {
            multiple_of(a, n, lets, depth) && multiple_of(b, n, lets, depth)
        }
        Expr::Bin(BinOp::Mul, a, b) => {
            multiple_of(a, n, lets, depth) || multiple_of(b, n, lets, depth)
        }
        Expr::Var(v) if depth < 8 => lets
            .only_lets(v)
            .is_some_and(|defs| defs.iter().all(|d| multiple_of(d, n, lets, depth + 1))),
        _ => false,
    }
}

/// Shared-memory bytes of one stage of `mma`: a slab of each staged operand (0 when neither
/// operand can be staged).
pub fn stage_bytes(mma: &Mma, lookup: &Lookup, lets: &Lets) -> usize {
    let rows = stageable(mma, &mma.a, lookup, lets).map_or(0, |_| mma.rows)
        + stageable(mma, &mma.b, lookup, lets).map_or(0, |_| mma.cols);
    rows * ROW_BYTES
}

/// Stages a tile of `stage` bytes per stage uses in a staging area of `area` bytes: as many as
/// fit, at most [`MAX_STAGES`] (the area holds at least [`MIN_STAGES`] of the kernel's largest).
pub fn stages(area: usize, stage: usize) -> usize {
    (area / stage.max(1)).min(MAX_STAGES)
}

/// Shared-memory bytes of one stage of the largest MMA of a warp program of `k` (tiles
/// expanded, products on tensor cores); `locals_global`: its locals live in the scratch buffer
/// (so they can be staged), rather than in shared memory; `groups_apart`: warpgroup tiles
/// ([`super::group`]) have their own staging area and are left out.
pub fn kernel_stage_bytes(k: &Kernel, locals_global: bool, groups_apart: bool) -> usize {
    let locals = if locals_global {
        super::local_layout(k).0
    } else {
        Vec::new()
    };
    let lookup = |name: &str| -> Option<(Elem, Vec<usize>)> {
        if let Some(p) = k.params.iter().find(|p| p.name == name) {
            let mut strides = vec![1usize; p.shape.len()];
            for d in (0..p.shape.len().saturating_sub(1)).rev() {
                let lamina_ir::kernel::Dim::N(next) = p.shape[d + 1] else {
                    return None;
                };
                strides[d] = strides[d + 1] * next;
            }
            return Some((p.elem, strides));
        }
        locals
            .iter()
            .find(|(n, ..)| n == name)
            .map(|(_, e, ..)| (*e, vec![1]))
    };
    let lets = lets(k);
    let mut most = 0;
    visit_mmas(&k.body, &mut |m| {
        if !(groups_apart && super::group::group_tile(m)) {
            most = most.max(stage_bytes(m, &lookup, &lets))
        }
    });
    most
}

fn visit_mmas(b: &[Stmt], f: &mut dyn FnMut(&Mma)) {
    for s in b {
        match s {
            Stmt::Mma(m) => f(m),
            Stmt::For { body, .. } => visit_mmas(body, f),
            Stmt::If { then, .. } => visit_mmas(then, f),
            _ => {}
        }
    }
}

/// `(row, byte)` of the 16-byte chunk lane `lane` copies in round `it` of a slab.
pub fn chunk_at(lane: usize, it: usize) -> (usize, usize) {
    let c = it * 32 + lane;
    let per_row = SLAB_BYTES / CHUNK;
    (c / per_row, CHUNK * (c % per_row))
}

/// Rounds of [`chunk_at`] for a slab of `rows` rows.
pub fn chunk_rounds(rows: usize) -> usize {
    (rows * SLAB_BYTES / CHUNK).div_ceil(32)
}

/// One operand of a staged warp tile.
struct Operand<'x, 'c, 'a> {
    e: &'x Expr,
    var: &'x str,
    rows: usize,
    last: Value<'c, 'a>,
    copy: Option<Stageable<'x>>,
    /// Byte offset of its slab within a stage.
    offset: usize,
}

impl<'c> Lower<'c> {
    /// `lookup` for [`stageable`] from the environment: parameters and locals in global memory.
    fn global_buffer(&self, env: &Env<'c, '_>, name: &str) -> Option<(Elem, Vec<usize>)> {
        let info = env.bufs.get(name)?;
        (!info.shared).then(|| (info.elem, info.strides.clone()))
    }

    /// The operands of `mma` this warp program stages, when it has staging memory, at least
    /// one operand qualifies, and [`MIN_STAGES`] of them fit the area (else the fragments are
    /// loaded from the operands directly).
    pub(super) fn warp_staged<'x>(
        &self,
        env: &Env<'c, '_>,
        mma: &'x Mma,
    ) -> Option<[Option<Stageable<'x>>; 2]> {
        let (_, _, area) = env.warp_stage?;
        let lookup = |n: &str| self.global_buffer(env, n);
        let a = stageable(mma, &mma.a, &lookup, &env.lets);
        let b = stageable(mma, &mma.b, &lookup, &env.lets);
        let stage =
            (usize::from(a.is_some()) * mma.rows + usize::from(b.is_some()) * mma.cols) * ROW_BYTES;
        (stage > 0 && stages(area, stage) >= MIN_STAGES).then_some([a, b])
    }

    /// Lowers `mma` for a warp program with the operands `copies` staged (see the module docs).
    /// `(g, t)`: the lane's group and thread in group; `(m, n)` the tile's extents.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn warp_staged_mma<'a>(
        &self,
        blk: &'a Block<'c>,
        env: &Env<'c, 'a>,
        mma: &Mma,
        [ca, cb]: [Option<Stageable<'_>>; 2],
        (lane, g, t): (Value<'c, 'a>, Value<'c, 'a>, Value<'c, 'a>),
        (m, n): (Value<'c, 'a>, Value<'c, 'a>),
        what: &str,
    ) -> R<Vec<Value<'c, 'a>>> {
        let (smem, base, area) = env
            .warp_stage
            .ok_or_else(|| bug(format!("{what}: staged warp tile without shared memory")))?;
        let kind = mma.kind;
        let step = kind.depth_step();
        let slab = slab_depth(kind);
        let slabs = mma.depth / slab;
        let ix = |v: usize| self.const_index(blk, v as i64);
        let int = |name: &str, a: Value<'c, 'a>, b: Value<'c, 'a>| {
            self.op(blk, name, &[a, b], self.index, false)
        };
        let a = Operand {
            e: &mma.a,
            var: &mma.i,
            rows: mma.rows,
            last: int("arith.subi", m, ix(1)),
            copy: ca,
            offset: 0,
        };
        let b_offset = if a.copy.is_some() {
            mma.rows * ROW_BYTES
        } else {
            0
        };
        let b = Operand {
            e: &mma.b,
            var: &mma.j,
            rows: mma.cols,
            last: int("arith.subi", n, ix(1)),
            copy: cb,
            offset: b_offset,
        };
        let stage_bytes = b.offset + b.copy.as_ref().map_or(0, |_| mma.cols * ROW_BYTES);
        let n_stages = stages(area, stage_bytes);
        if n_stages < MIN_STAGES {
            return Err(bug(format!(
                "{what}: {area} bytes of staging hold {n_stages} stages of {stage_bytes}"
            )));
        }
        let (tm, tn) = (mma.rows / Mma::M, mma.cols / Mma::N);
        let accs = tm * tn * 4;

        // Slabs 0 .. stages − 1 into stages 0 .. stages − 1 (a short depth re-copies its last
        // slab), one commit group each.
        for p in 0..n_stages - 1 {
            let at = int("arith.addi", base, ix(p * stage_bytes));
            let k0 = ix(p.min(slabs - 1) * slab);
            self.copy_warp_slab(blk, env, [&a, &b], (smem, at), k0, lane)?;
            self.cp_async_commit(blk)?;
        }

        let mut args = vec![(self.index, self.loc)];
        args.extend((0..accs).map(|_| (self.f32, self.loc)));
        let body = Block::new(&args);
        {
            let arg = |i: usize| -> R<Value> {
                body.argument(i)
                    .map(Into::into)
                    .map_err(|e| bug(e.to_string()))
            };
            let s = arg(0)?;
            let bx = |v: usize| self.const_index(&body, v as i64);
            let bint = |name: &str, x: Value<'c, '_>, y: Value<'c, '_>| {
                self.op(&body, name, &[x, y], self.index, false)
            };
            // Slab s + stages − 1 goes into the stage slab s − 1 left (every lane finished it:
            // the barrier ending the last iteration); past the depth, the last slab again, into
            // a stage no later iteration reads.
            let next = bint("arith.addi", s, bx(n_stages - 1));
            let stage_at = |which: Value<'c, '_>| {
                bint(
                    "arith.addi",
                    base,
                    bint(
                        "arith.muli",
                        bint("arith.remui", which, bx(n_stages)),
                        bx(stage_bytes),
                    ),
                )
            };
            let (here, there) = (stage_at(s), stage_at(next));
            let next_k = bint(
                "arith.muli",
                bint("arith.minui", next, bx(slabs - 1)),
                bx(slab),
            );
            self.copy_warp_slab(&body, env, [&a, &b], (smem, there), next_k, lane)?;
            self.cp_async_commit(&body)?;
            // This lane's copies of slab s have landed (the stages − 1 later groups may still
            // be in flight); the barrier publishes every lane's.
            self.cp_async_wait(&body, n_stages as i64 - 1)?;
            self.warp_sync(&body);
            let k0 = bint("arith.muli", s, bx(slab));
            let attrs = self.mma_attrs(kind)?;
            let i32t: Type = IntegerType::new(self.ctx, 32).into();
            let f32_view = |op: &Operand, rows: usize| {
                self.shared_view(&body, smem, here, self.f32, rows * ROW_BYTES / 4, op.offset)
            };
            let i32_view = |op: &Operand, rows: usize| {
                self.shared_view(&body, smem, here, i32t, rows * ROW_BYTES / 4, op.offset)
            };
            let views = [&a, &b].map(|op| match (&op.copy, kind) {
                (None, _) => Ok(None),
                (Some(_), MmaKind::Bf16) => i32_view(op, op.rows).map(Some),
                (Some(_), _) => f32_view(op, op.rows).map(Some),
            });
            let [va, vb] = views;
            let (va, vb) = (va?, vb?);
            let words_per_row = ROW_BYTES / 4;
            let per_register = match kind {
                MmaKind::Bf16 => 2,
                _ => 1,
            };
            // One register's worth of operand at fragment (row, k-in-slab): from the stage, or
            // evaluated from the operand expression.
            let register = |op: &Operand<'_, 'c, 'a>,
                            view: Option<Value<'c, '_>>,
                            row: Value<'c, '_>,
                            kl: Value<'c, '_>|
             -> R<Vec<Value<'c, '_>>> {
                let row = bint("arith.minui", row, op.last);
                match view {
                    Some(view) => {
                        let word = bint(
                            "arith.addi",
                            bint("arith.muli", row, bx(words_per_row)),
                            bint("arith.divui", kl, bx(per_register)),
                        );
                        let ty = if kind == MmaKind::Bf16 {
                            i32t
                        } else {
                            self.f32
                        };
                        let x = self.append(
                            &body,
                            OperationBuilder::new("memref.load", self.loc)
                                .add_operands(&[view, word])
                                .add_results(&[ty])
                                .build()
                                .map_err(|e| bug(format!("{what}: shared load: {e}")))?,
                        );
                        match kind {
                            MmaKind::Bf16 => Ok(vec![x]),
                            _ => self.tf32_registers(&body, kind, x),
                        }
                    }
                    None => {
                        let k = bint("arith.addi", k0, kl);
                        self.expr_registers(&body, env, (mma, op.e, op.var), row, k)
                    }
                }
            };
            let t_k = bint("arith.muli", t, bx(per_register));
            let (variants, products) = register_variants(kind);
            let mut acc: Vec<Value> = (0..accs).map(|i| arg(1 + i)).collect::<R<_>>()?;
            for u in 0..slab / step {
                let kl = bint("arith.addi", t_k, bx(u * step));
                let mut a_regs = Vec::new();
                for am in 0..tm {
                    let mut regs = vec![Vec::new(); variants];
                    for reg in 0..4 {
                        let (r0, k_off) = a_fragment(kind, 0, 0, reg, 0);
                        let row = bint("arith.addi", g, bx(am * Mma::M + r0));
                        let kk = bint("arith.addi", kl, bx(k_off));
                        for (v, r) in register(&a, va, row, kk)?.into_iter().enumerate() {
                            regs[v].push(r);
                        }
                    }
                    a_regs.push(regs);
                }
                let mut b_regs = Vec::new();
                for bn in 0..tn {
                    let mut regs = vec![Vec::new(); variants];
                    for reg in 0..2 {
                        let (c0, k_off) = b_fragment(kind, 0, 0, reg, 0);
                        let col = bint("arith.addi", g, bx(bn * Mma::N + c0));
                        let kk = bint("arith.addi", kl, bx(k_off));
                        for (v, r) in register(&b, vb, col, kk)?.into_iter().enumerate() {
                            regs[v].push(r);
                        }
                    }
                    b_regs.push(regs);
                }
                acc =
                    self.step_products(&body, (&attrs, products), &a_regs, &b_regs, &acc, what)?;
            }
            // Every lane is done with this stage before the next iteration copies into it.
            self.warp_sync(&body);
            body.append_operation(scf::r#yield(&acc, self.loc));
        }
        let region = Region::new();
        region.append_block(body);
        let zero = self.const_f32(blk, 0.0);
        let op = OperationBuilder::new("scf.for", self.loc)
            .add_operands(&[ix(0), ix(slabs), ix(1)])
            .add_operands(&vec![zero; accs])
            .add_results(&vec![self.f32; accs])
            .add_regions([region])
            .build()
            .map_err(|e| bug(format!("{what}: staged mma slab loop: {e}")))?;
        let r = blk.append_operation(op);
        // The last iteration's redundant copies land (each lane's own, then every lane's)
        // before the epilogue stores or the stage is reused.
        self.cp_async_wait(blk, 0)?;
        self.warp_sync(blk);
        (0..accs)
            .map(|i| r.result(i).map(Into::into).map_err(|e| bug(e.to_string())))
            .collect()
    }

    /// The element index in `copy`'s buffer of its row `row` (bound as `var`) at depth
    /// `k0 + k`: `k0 + k + offset + Σ index · stride`.
    pub(super) fn copy_source<'b>(
        &self,
        body: &'b Block<'c>,
        env: &Env<'c, 'b>,
        (var, row): (&str, Value<'c, 'b>),
        copy: &Stageable<'_>,
        k0: Value<'c, 'b>,
        k: Value<'c, 'b>,
    ) -> R<Value<'c, 'b>> {
        let int = |name: &str, x: Value<'c, 'b>, y: Value<'c, 'b>| {
            self.op(body, name, &[x, y], self.index, false)
        };
        let mut env2 = env.clone();
        env2.vars.insert(var.to_string(), (row, Ty::Int));
        let mut from = int("arith.addi", k0, k);
        if let Some(c) = copy.offset {
            let (c, _) = self.expr(body, &env2, c)?;
            from = int("arith.addi", from, c);
        }
        for &(x, stride) in &copy.outer {
            let (x, _) = self.expr(body, &env2, x)?;
            let stride = self.const_index(body, stride as i64);
            from = int("arith.addi", from, int("arith.muli", x, stride));
        }
        Ok(from)
    }

    /// Issues this lane's `cp.async` copies of slab `k0` (depth elements) of the staged
    /// operands into the stage at byte `stage` of `smem` (not yet committed).
    fn copy_warp_slab<'b>(
        &self,
        body: &'b Block<'c>,
        env: &Env<'c, 'b>,
        ops: [&Operand<'_, 'c, '_>; 2],
        (smem, stage): (Value<'c, '_>, Value<'c, '_>),
        k0: Value<'c, '_>,
        lane: Value<'c, '_>,
    ) -> R<()> {
        let bx = |v: usize| self.const_index(body, v as i64);
        let int = |name: &str, x: Value<'c, '_>, y: Value<'c, '_>| {
            self.op(body, name, &[x, y], self.index, false)
        };
        for op in ops {
            let Some(copy) = &op.copy else {
                continue;
            };
            let src = env
                .bufs
                .get(copy.buf)
                .ok_or_else(|| bug(format!("cp.async: no buffer {}", copy.buf)))?
                .value;
            let ebytes = copy.elem.bytes();
            let elem = self.elem(copy.elem);
            let view = self.shared_view(
                body,
                smem,
                stage,
                elem,
                op.rows * ROW_BYTES / ebytes,
                op.offset,
            )?;
            for it in 0..chunk_rounds(op.rows) {
                let c = int("arith.addi", lane, bx(it * 32));
                let per_row = SLAB_BYTES / CHUNK;
                let row = int("arith.divui", c, bx(per_row));
                let kc = int(
                    "arith.muli",
                    int("arith.remui", c, bx(per_row)),
                    bx(CHUNK / ebytes),
                );
                let clamped = int("arith.minui", row, op.last);
                let from = self.copy_source(body, env, (op.var, clamped), copy, k0, kc)?;
                let to = int(
                    "arith.addi",
                    int("arith.muli", row, bx(ROW_BYTES / ebytes)),
                    kc,
                );
                // Whole rounds only (tile rows are multiples of 8).
                if (it + 1) * 32 * CHUNK > op.rows * SLAB_BYTES {
                    return Err(bug(format!(
                        "cp.async: {} rows are not whole rounds of 32 chunks",
                        op.rows
                    )));
                }
                // `.ca`: the program reads much of it again (MLA's values are its keys' rows,
                // the queries and the chunk's tiles recur), as the fragment loads did.
                self.async_copy(body, (view, to), (src, from), CHUNK / ebytes, false)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lamina_ir::kernel::build::*;

    fn tile(kind: MmaKind, depth: usize, a: Expr, b: Expr) -> Mma {
        let Stmt::Mma(mut m) = mma([32, 32, depth], i(32), i(32), a, b, vec![]) else {
            unreachable!()
        };
        m.kind = kind;
        *m
    }

    /// `q: f32[R, 128]`, `cache: f32[4, 64, 96]`, `w: bf16[64, 256]`, a scratch local `sc`.
    fn lookup(name: &str) -> Option<(Elem, Vec<usize>)> {
        match name {
            "q" => Some((Elem::F32, vec![128, 1])),
            "cache" => Some((Elem::F32, vec![64 * 96, 96, 1])),
            "w" => Some((Elem::Bf16, vec![256, 1])),
            "sc" => Some((Elem::F32, vec![1])),
            _ => None,
        }
    }

    /// Loads along the depth with 16-byte aligned offsets are staged; transposed reads,
    /// `select`s, misaligned offsets, buffers outside global memory, a mismatched element and
    /// a depth that is not whole slabs are not.
    #[test]
    fn stages_aligned_loads_along_the_depth() {
        let mut lets = Lets::default();
        lets.defs.insert("k0".into(), vec![pid(1) * i(32)]);
        lets.defs
            .insert("odd".into(), vec![pid(1) * i(32), pid(1) * i(3)]);
        // From a kernel: a name bound only by `let`s keeps its definitions; one also bound
        // as a loop variable (or carried, reduced over, an MMA index) proves nothing.
        let k = Kernel {
            name: "k".into(),
            nodes: vec![],
            grid: vec![lamina_ir::kernel::Dim::Rows],
            params: vec![],
            body: vec![
                let_("k0", pid(1) * i(32)),
                let_("t", i(32)),
                for_("t", i(0), i(4), vec![let_("k0", v("t") * i(64))]),
            ],
        };
        let found = super::lets(&k);
        assert_eq!(found.only_lets("k0").map(<[Expr]>::len), Some(2));
        assert!(found.only_lets("t").is_none());
        // `t` is a `let` somewhere and a loop variable elsewhere: it proves nothing.
        lets.defs.insert("t".into(), vec![i(32)]);
        lets.other.insert("t".into());
        let tf = MmaKind::Tf32x3;
        let q = ld("q", [v("r0") + v("mi"), pid(1) * i(32) + v("k")]);
        let k = ld("cache", [v("s"), v("j0") + v("mj"), v("k") + i(64)]);
        let m = tile(tf, 32, q.clone(), k.clone());
        let a = stageable(&m, &m.a, &lookup, &lets).expect("q is staged");
        assert_eq!((a.buf, a.elem, a.outer.len()), ("q", Elem::F32, 1));
        assert!(stageable(&m, &m.b, &lookup, &lets).is_some(), "cache");
        assert_eq!(stage_bytes(&m, &lookup, &lets), 64 * ROW_BYTES);
        let local = ld("sc", [v("mi") * i(32) + v("k")]);
        assert!(stageable(
            &tile(tf, 32, local.clone(), k.clone()),
            &local,
            &lookup,
            &lets
        )
        .is_some());
        let rejected = [
            // The depth along a row of the cache (P·V's values).
            ld("cache", [v("s"), min(v("j0") + v("k"), i(63)), v("mj")]),
            select(le(v("k"), v("mi")), q.clone(), f(0.0)),
            ld("q", [v("mi"), pid(1) * i(3) + v("k")]),
            ld("q", [v("mi"), v("odd") + v("k")]),
            ld("q", [v("mi"), v("t") + v("k")]),
            ld("q", [sum("r", i(0), i(4), v("r")), v("k")]),
            ld("shared_local", [v("mi") * i(32) + v("k")]),
            ld("w", [v("mi"), v("k")]),
        ];
        for e in &rejected {
            let m = tile(tf, 32, e.clone(), k.clone());
            assert!(stageable(&m, e, &lookup, &lets).is_none(), "{e:?}");
        }
        // Depth 40 is not whole 16-element slabs.
        let m = tile(tf, 40, q.clone(), k.clone());
        assert_eq!(stage_bytes(&m, &lookup, &lets), 0);
        // bf16 weights at an offset proven through a `let`.
        let w = ld("w", [v("mj"), v("k0") + v("k")]);
        let m = tile(MmaKind::Bf16, 64, ld("q", [v("mi"), v("k")]), w.clone());
        assert!(
            stageable(&m, &m.a, &lookup, &lets).is_none(),
            "f32 into a bf16 tile"
        );
        assert!(stageable(&m, &w, &lookup, &lets).is_some());
        assert_eq!(stage_bytes(&m, &lookup, &lets), 32 * ROW_BYTES);
        assert_eq!(stages(4 * 32 * ROW_BYTES + 100, 32 * ROW_BYTES), 4);
        assert_eq!(stages(12 << 10, 48 * ROW_BYTES), 3);
        assert_eq!(stages(12 << 10, 64 * ROW_BYTES), MIN_STAGES);
    }

    /// Every 16-byte chunk of a slab is copied by exactly one (lane, round), a round's copies
    /// are whole 64-byte rows, and the fragment loads of both kinds hit 32 distinct banks.
    #[test]
    fn warp_slabs_are_covered_once_and_conflict_free() {
        for rows in [16, 32, 64] {
            let mut seen = vec![[0u8; SLAB_BYTES / CHUNK]; rows];
            for it in 0..chunk_rounds(rows) {
                for lane in 0..32 {
                    let (r, byte) = chunk_at(lane, it);
                    seen[r][byte / CHUNK] += 1;
                }
            }
            assert!(seen.iter().flatten().all(|&c| c == 1), "{rows} rows");
        }
        assert_eq!(ROW_BYTES % CHUNK, 0, "rows stay 16-byte aligned");
        let words = ROW_BYTES / 4;
        for kind in [MmaKind::Tf32x3, MmaKind::Bf16] {
            let per_word = if kind == MmaKind::Bf16 { 2 } else { 1 };
            for reg in 0..4 {
                let mut banks = [0u8; 32];
                for lane in 0..32 {
                    let (r, k) = a_fragment(kind, lane / 4, lane % 4, reg, 0);
                    banks[(r * words + k / per_word) % 32] += 1;
                }
                assert!(banks.iter().all(|&b| b == 1), "{kind:?} A register {reg}");
            }
            for reg in 0..2 {
                let mut banks = [0u8; 32];
                for lane in 0..32 {
                    let (c, k) = b_fragment(kind, lane / 4, lane % 4, reg, 0);
                    banks[(c * words + k / per_word) % 32] += 1;
                }
                // B's 8 columns × 4 words: 32 distinct banks as well.
                assert!(banks.iter().all(|&b| b == 1), "{kind:?} B register {reg}");
            }
            assert_eq!(slab_depth(kind) % kind.depth_step(), 0);
        }
    }
}
