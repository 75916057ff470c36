//! Dealing a warp program's split sums and reductions to its lanes in contiguous blocks, so
//! that each lane reads its operands with 16-byte vector loads.
//!
//! The plain deal gives lane `j` the iterations `lo + j, lo + j + 32, ...`: one warp step reads
//! 32 consecutive elements, a 2- or 4-byte load per lane (a decode GEMV over bf16 weights
//! issues eight times the load instructions its bytes need). When the loop's body reads a
//! buffer contiguously along the loop variable, the lanes take blocks of consecutive
//! iterations instead ([`Deal`]):
//!
//! - Blocks: 8 iterations when a contiguous operand is bf16 (8 bf16 are 16 bytes), else 4 (4
//!   f32). Lane `j` takes `lo + b·j .. lo + b·j + b`, then the same a round (`b · lanes`
//!   iterations) further on, and so on while whole rounds remain; the iterations past the last
//!   whole round are dealt one by one as before (lane `j` takes `mid + j, mid + j + 32, ...`).
//!   Within a block the iterations run in order; the lanes' partial results are combined as in
//!   the plain deal.
//! - Trips: a loop trip runs up to [`MAX_TRIP_ROUNDS`] rounds, as many as keep the lane's
//!   contiguous reads within [`TRIP_BYTES`] (at least one round), their loads all issued
//!   before the first iteration; the rounds left over run one per trip.
//! - Loads: each contiguous operand's block is one vector load, 16-byte aligned (one
//!   `ld.global.v4` or `ld.shared.v4` for 8 bf16 or 4 f32, two for 8 f32), the values then
//!   extracted for the block's iterations; every other load stays a scalar load per iteration.
//! - Which operands ([`contiguous`]): `buf[outer.., c + var]` of a kernel parameter or a local,
//!   in f32 or bf16, unit stride along `var`, every outer index and `c` fixed during the loop,
//!   and the element offset of every block a multiple of 16 bytes: `c`, `lo` and the outer
//!   strides are proven multiples of the elements in 16 bytes (the proof of
//!   [`super::warp_stage`]'s `cp.async` operands). Buffers start 16-byte aligned: a parameter
//!   is its own device allocation, an arena slot at a multiple of 64 bytes per row, or a
//!   16-byte aligned constant table; locals are laid out on 16 bytes
//!   ([`super::local_layout`]) in shared memory or in a scratch slice of such.
//! - Stores: in a parallel split loop (each iteration writes only elements no other reads or
//!   writes), a store `buf[outer.., c + var]` of the same form is written after the block's
//!   iterations, their values in one vector store; a buffer the loop also stores element by
//!   element keeps all its stores in place.
//! - Which loops, without a reduction inside: a dealt split sum whose body is only `let`s, a
//!   dealt reduction, or a parallel split loop of `let`s and stores in which no statement reads
//!   a buffer an earlier one stored to (a deferred store would not be seen), with at least one
//!   such operand.
//!
//! Sequential reductions and carried loops of `let`s (a warp program's loops that every lane
//! runs whole, such as a dot product inside a dealt loop) read their contiguous operands in
//! blocks the same way, as one lane would: the same iterations in the same order, each block's
//! operands one vector load. Sequential loops of stores are not blocked.
//!
//! The choice depends only on the kernel IR, and the host's emulation of the lanes
//! ([`super::Flavor::HostLanes`]) runs the same blocks lane by lane (with scalar loads), so the
//! tests that compare it with the plain host build check the deal: every iteration taken
//! once, the trips' and rounds' ends, the ragged remainder.

use lamina_ir::kernel::{BinOp, Elem, Expr, Stmt};
use melior::dialect::arith::CmpiPredicate;
use melior::dialect::{arith, scf};
use melior::ir::attribute::IntegerAttribute;
use melior::ir::operation::OperationBuilder;
use melior::ir::r#type::IntegerType;
use melior::ir::{Attribute, Block, BlockLike, Identifier, Type, Value};

use super::warp_stage::{multiple_of, Lets, Lookup};
use super::{bug, BufInfo, Env, Lower, Ty, R};

/// Alignment and width of one vector load.
const VECTOR_BYTES: usize = 16;
/// Bytes of contiguous operands a lane reads per trip of a blocked loop, in whole rounds: a
/// warp keeps that much in flight (a decode GEMV's dot products are memory-bound, and an SM
/// needs tens of kilobytes in flight to cover HBM latency).
pub const TRIP_BYTES: usize = 256;
/// Most rounds per trip.
pub const MAX_TRIP_ROUNDS: usize = 4;

/// How a dealt loop is blocked: its contiguous loads, its contiguous stores (a parallel
/// loop's, written as one vector per block after the block's iterations), and the iterations
/// per block.
#[derive(Debug, PartialEq)]
pub struct Deal<'e> {
    pub loads: Vec<&'e Expr>,
    pub stores: Vec<&'e Stmt>,
    pub block: usize,
}

impl Deal<'_> {
    /// Whether a loop over `lo..hi` dealt to `lanes` may have a whole round: not when both ends
    /// are constants less than a round apart (the blocks would be dead code).
    pub fn has_rounds(&self, lo: &Expr, hi: &Expr, lanes: u32) -> bool {
        match (lo, hi) {
            (Expr::I(a), Expr::I(b)) => b - a >= (self.block * lanes as usize) as i64,
            _ => true,
        }
    }
}

/// Elements of `elem` in one vector load.
fn per_vector(elem: Elem) -> usize {
    VECTOR_BYTES / elem.bytes()
}

/// Whether `load` reads a buffer contiguously along `var` in 16-byte aligned blocks (see the
/// module docs): `lookup` gives a buffer's element and row-major strides; `bound` names the
/// loop binds itself (besides `var`), whose values change between iterations; `lo` is the
/// loop's start.
pub fn contiguous(
    load: &Expr,
    var: &str,
    lo: &Expr,
    bound: &[&str],
    lookup: &Lookup,
    lets: &Lets,
) -> bool {
    match load {
        Expr::Load(buf, idx) => contiguous_at(buf, idx, var, lo, bound, lookup, lets),
        _ => false,
    }
}

/// [`contiguous`] for element `buf[idx]` (a load's or a store's).
fn contiguous_at(
    buf: &str,
    idx: &[Expr],
    var: &str,
    lo: &Expr,
    bound: &[&str],
    lookup: &Lookup,
    lets: &Lets,
) -> bool {
    let Some((elem, strides)) = lookup(buf) else {
        return false;
    };
    if !matches!(elem, Elem::F32 | Elem::Bf16) || strides.len() != idx.len() {
        return false;
    }
    let per = per_vector(elem);
    let (Some((last, outer)), Some((&1, outer_strides))) = (idx.split_last(), strides.split_last())
    else {
        return false;
    };
    let offset = match last {
        Expr::Var(v) if v == var => None,
        Expr::Bin(BinOp::Add, a, b) => match (&**a, &**b) {
            (Expr::Var(v), c) | (c, Expr::Var(v)) if v == var => Some(c),
            _ => return false,
        },
        _ => return false,
    };
    let fixed = |e: &Expr| !e.has_reduce() && !e.reads(var) && bound.iter().all(|n| !e.reads(n));
    offset.is_none_or(|c| fixed(c) && multiple_of(c, per, lets, 0))
        && outer.iter().all(fixed)
        && outer_strides.iter().all(|s| s.is_multiple_of(per))
        && multiple_of(lo, per, lets, 0)
}

/// Every load in `e`, outermost first (a load inside another's index after it).
fn loads<'e>(e: &'e Expr, out: &mut Vec<&'e Expr>) {
    match e {
        Expr::Load(_, idx) => {
            out.push(e);
            idx.iter().for_each(|x| loads(x, out));
        }
        Expr::Bin(_, a, b) | Expr::Cmp(_, a, b) => {
            loads(a, out);
            loads(b, out);
        }
        Expr::Un(_, a) | Expr::ToF(a) | Expr::ToI(a) => loads(a, out),
        Expr::Select(c, a, b) => [c, a, b].into_iter().for_each(|x| loads(x, out)),
        Expr::Reduce { lo, hi, body, .. } => [lo, hi, body].into_iter().for_each(|x| loads(x, out)),
        Expr::F(_) | Expr::I(_) | Expr::Var(_) | Expr::Pid(_) | Expr::Rows => {}
    }
}

/// The blocked deal of a loop over `var` from `lo` whose body evaluates `exprs`: the distinct
/// loads in them that are [`contiguous`] along `var` (in order of appearance), blocks as wide
/// as the widest vector of them; `None` when there is none.
pub fn deal<'e>(
    exprs: &[&'e Expr],
    var: &str,
    lo: &Expr,
    bound: &[&str],
    lookup: &Lookup,
    lets: &Lets,
) -> Option<Deal<'e>> {
    let mut all = Vec::new();
    exprs.iter().for_each(|e| loads(e, &mut all));
    let mut out: Vec<&Expr> = Vec::new();
    let mut block = 0;
    for e in all {
        if !out.contains(&e) && contiguous(e, var, lo, bound, lookup, lets) {
            let Expr::Load(buf, _) = e else { continue };
            block = lookup(buf).map_or(block, |(elem, _)| block.max(per_vector(elem)));
            out.push(e);
        }
    }
    (!out.is_empty()).then_some(Deal {
        loads: out,
        stores: Vec::new(),
        block,
    })
}

/// The blocked deal of a loop over `var` (from `lo`) carrying values: a dealt split sum, or a
/// sequential carried loop. None unless its body is only `let`s, without reductions.
pub fn carried_deal<'e>(
    var: &str,
    lo: &Expr,
    carried: &[(String, Expr)],
    body: &'e [Stmt],
    yields: &'e [Expr],
    lookup: &Lookup,
    lets: &Lets,
) -> Option<Deal<'e>> {
    let mut bound: Vec<&str> = carried.iter().map(|(n, _)| n.as_str()).collect();
    let mut exprs: Vec<&Expr> = yields.iter().collect();
    for s in body {
        match s {
            Stmt::Let(n, e) => {
                bound.push(n);
                exprs.push(e);
            }
            _ => return None,
        }
    }
    if carried.is_empty() || exprs.iter().any(|e| e.has_reduce()) {
        return None;
    }
    deal(&exprs, var, lo, &bound, lookup, lets)
}

/// The blocked deal of a dealt reduction over `var` (from `lo`) of `body`: none if the body
/// has a reduction of its own.
pub fn reduction_deal<'e>(
    var: &str,
    lo: &Expr,
    body: &'e Expr,
    lookup: &Lookup,
    lets: &Lets,
) -> Option<Deal<'e>> {
    if body.has_reduce() {
        return None;
    }
    deal(&[body], var, lo, &[], lookup, lets)
}

/// The blocked deal of a dealt parallel loop over `var` (from `lo`; each iteration writes only
/// elements no other iteration reads or writes): its contiguous loads, read as vectors before
/// the block's iterations, and its contiguous stores, written as vectors after them. None
/// unless the body is only `let`s and stores, without reductions, and no statement reads a
/// buffer the body stored to before it (a deferred store would not be seen).
pub fn parallel_deal<'e>(
    var: &str,
    lo: &Expr,
    body: &'e [Stmt],
    lookup: &Lookup,
    lets: &Lets,
) -> Option<Deal<'e>> {
    let mut bound: Vec<&str> = Vec::new();
    let mut exprs: Vec<&Expr> = Vec::new();
    let mut stored: Vec<&str> = Vec::new();
    let mut stores = Vec::new();
    for s in body {
        let (reads, writes): (Vec<&Expr>, _) = match s {
            Stmt::Let(n, e) => {
                bound.push(n);
                (vec![e], None)
            }
            Stmt::Store { buf, idx, value } => {
                (idx.iter().chain([value]).collect(), Some((s, buf, idx)))
            }
            _ => return None,
        };
        for e in &reads {
            if e.has_reduce() || stored.iter().any(|b| reads_buffer(e, b)) {
                return None;
            }
        }
        exprs.extend(reads);
        if let Some((s, buf, idx)) = writes {
            stored.push(buf);
            stores.push((s, buf.as_str(), idx.as_slice()));
        }
    }
    let loads = deal(&exprs, var, lo, &bound, lookup, lets);
    let mut block = loads.as_ref().map_or(0, |d| d.block);
    // A buffer also stored element by element keeps all its stores in order: none deferred.
    let contiguous_store =
        |buf: &str, idx: &[Expr]| contiguous_at(buf, idx, var, lo, &bound, lookup, lets);
    let scalar: Vec<&str> = stores
        .iter()
        .filter(|(_, buf, idx)| !contiguous_store(buf, idx))
        .map(|(_, buf, _)| *buf)
        .collect();
    let mut out = Vec::new();
    for (s, buf, idx) in stores {
        if contiguous_store(buf, idx) && !scalar.contains(&buf) {
            block = lookup(buf).map_or(block, |(e, _)| block.max(per_vector(e)));
            out.push(s);
        }
    }
    let loads = loads.map_or(Vec::new(), |d| d.loads);
    (!loads.is_empty() || !out.is_empty()).then_some(Deal {
        loads,
        stores: out,
        block,
    })
}

/// Whether `e` loads from `buf`.
fn reads_buffer(e: &Expr, buf: &str) -> bool {
    let mut all = Vec::new();
    loads(e, &mut all);
    all.iter()
        .any(|l| matches!(l, Expr::Load(b, _) if b == buf))
}

/// One iteration of a blocked loop: given the environment (the loop variable bound) and the
/// carried values, emits the iteration into the block and returns the next carried values and
/// (GPU) the values of the deal's contiguous stores, in order, left for the block to write.
pub(super) type Step<'s, 'c> = dyn for<'x> FnMut(
        &Lower<'c>,
        &'x Block<'c>,
        &Env<'c, 'x>,
        &[Value<'c, 'x>],
    ) -> R<(Vec<Value<'c, 'x>>, Vec<Value<'c, 'x>>)>
    + 's;

impl<'c> Lower<'c> {
    /// `lookup` for [`contiguous`]: the kernel's parameters and locals.
    pub(super) fn buffer(&self, env: &Env<'c, '_>, name: &str) -> Option<(Elem, Vec<usize>)> {
        let info = env.bufs.get(name)?;
        Some((info.elem, info.strides.clone()))
    }

    /// `lo + ⌊max(hi − lo, 0) / round⌋ · round`: where the whole rounds of `round` iterations
    /// from `lo` end.
    pub(super) fn rounds_end<'a>(
        &self,
        blk: &'a Block<'c>,
        (lo, hi): (Value<'c, 'a>, Value<'c, 'a>),
        round: i64,
    ) -> Value<'c, 'a> {
        let int = |name: &str, a: Value<'c, 'a>, b: Value<'c, 'a>| {
            self.op(blk, name, &[a, b], self.index, false)
        };
        let ahead = self.append(
            blk,
            arith::cmpi(self.ctx, CmpiPredicate::Sgt, hi, lo, self.loc),
        );
        let span = int("arith.subi", hi, lo);
        let zero = self.const_index(blk, 0);
        let span = self.append(blk, arith::select(ahead, span, zero, self.loc));
        let round = self.const_index(blk, round);
        int(
            "arith.addi",
            lo,
            int("arith.muli", int("arith.divui", span, round), round),
        )
    }

    /// Rounds per trip of a blocked loop: enough for [`TRIP_BYTES`] of its contiguous loads
    /// per lane (at least one, at most [`MAX_TRIP_ROUNDS`]).
    fn trip_rounds(&self, env: &Env<'c, '_>, deal: &Deal) -> usize {
        let per_round: usize = deal
            .loads
            .iter()
            .filter_map(|l| match l {
                Expr::Load(b, _) => env.bufs.get(b).map(|i| deal.block * i.elem.bytes()),
                _ => None,
            })
            .sum();
        (TRIP_BYTES / per_round.max(1)).clamp(1, MAX_TRIP_ROUNDS)
    }

    /// A lane's whole rounds of a blocked deal over `var` from `lo` (`hi`: the loop's end),
    /// carrying `inits` (of types `tys`) through `step`: trips of [`Self::trip_rounds`] rounds,
    /// then the rounds left one per trip. Returns the carried values and where the whole rounds
    /// end (the remainder starts there).
    #[allow(clippy::too_many_arguments)]
    fn lane_rounds<'a>(
        &self,
        blk: &'a Block<'c>,
        env: &Env<'c, 'a>,
        var: &str,
        (lo, hi): (Value<'c, 'a>, Value<'c, 'a>),
        lane: Value<'c, 'a>,
        inits: &[Value<'c, 'a>],
        tys: &[Ty],
        deal: &Deal,
        step: &mut Step<'_, 'c>,
    ) -> R<(Vec<Value<'c, 'a>>, Value<'c, 'a>)> {
        let round = (deal.block * self.lanes as usize) as i64;
        let rounds = self.trip_rounds(env, deal);
        let mid = self.rounds_end(blk, (lo, hi), round);
        let mut accs = inits.to_vec();
        let mut from = lo;
        if rounds > 1 {
            let end = self.rounds_end(blk, (lo, hi), rounds as i64 * round);
            let first = self.lane_block(blk, lo, lane, deal.block);
            accs =
                self.blocked_trips(blk, env, var, (first, end), rounds, &accs, tys, deal, step)?;
            from = end;
        }
        let first = self.lane_block(blk, from, lane, deal.block);
        accs = self.blocked_trips(blk, env, var, (first, mid), 1, &accs, tys, deal, step)?;
        Ok((accs, mid))
    }

    /// `scf.for start in first..end step rounds · block · lanes` carrying `inits` (of types
    /// `tys`): each trip runs `step` for `var` over the lane's `rounds` blocks from `start`
    /// (`block · lanes` apart), in order. `first` is the lane's first block. On a GPU each of
    /// the deal's loads is read as one vector per block, all of a trip's before its first
    /// iteration, and the iterations take their elements from them; the host reads them one
    /// by one.
    #[allow(clippy::too_many_arguments)]
    fn blocked_trips<'a>(
        &self,
        blk: &'a Block<'c>,
        env: &Env<'c, 'a>,
        var: &str,
        (first, end): (Value<'c, 'a>, Value<'c, 'a>),
        rounds: usize,
        inits: &[Value<'c, 'a>],
        tys: &[Ty],
        deal: &Deal,
        step: &mut Step<'_, 'c>,
    ) -> R<Vec<Value<'c, 'a>>> {
        let round = (deal.block * self.lanes as usize) as i64;
        let mut args = vec![(self.index, self.loc)];
        args.extend(tys.iter().map(|&t| (self.ty(t), self.loc)));
        let inner = Block::new(&args);
        {
            let a = |i: usize| -> R<Value> {
                inner
                    .argument(i)
                    .map(Into::into)
                    .map_err(|e| bug(e.to_string()))
            };
            let start = a(0)?;
            let mut accs = (1..args.len()).map(a).collect::<R<Vec<_>>>()?;
            // Each block's start, and (GPU) per block each load's values.
            let mut blocks = Vec::new();
            for r in 0..rounds {
                let off = self.const_index(&inner, r as i64 * round);
                let at = self.op(&inner, "arith.addi", &[start, off], self.index, false);
                let mut vectors = Vec::new();
                if self.gpu {
                    let mut there: Env<'c, '_> = env.clone();
                    there.vars.insert(var.to_string(), (at, Ty::Int));
                    for &load in &deal.loads {
                        vectors.push((load, self.vector_load(&inner, &there, load, deal.block)?));
                    }
                }
                blocks.push((at, vectors));
            }
            for (at, vectors) in &blocks {
                // GPU: each contiguous store's values, written as one vector after the block.
                let mut stored = vec![Vec::new(); deal.stores.len()];
                for u in 0..deal.block {
                    let mut here: Env<'c, '_> = env.clone();
                    let off = self.const_index(&inner, u as i64);
                    let it = self.op(&inner, "arith.addi", &[*at, off], self.index, false);
                    here.vars.insert(var.to_string(), (it, Ty::Int));
                    if !vectors.is_empty() {
                        here.blocked = Some(std::rc::Rc::new(
                            vectors.iter().map(|(e, v)| ((*e).clone(), v[u])).collect(),
                        ));
                    }
                    let (next, values) = step(self, &inner, &here, &accs)?;
                    accs = next;
                    for (s, v) in stored.iter_mut().zip(values) {
                        s.push(v);
                    }
                }
                if self.gpu && !deal.stores.is_empty() {
                    let mut there: Env<'c, '_> = env.clone();
                    there.vars.insert(var.to_string(), (*at, Ty::Int));
                    for (store, values) in deal.stores.iter().zip(&stored) {
                        self.vector_store(&inner, &there, store, values)?;
                    }
                }
            }
            inner.append_operation(scf::r#yield(&accs, self.loc));
        }
        let trip = self.const_index(blk, rounds as i64 * round);
        let tys: Vec<Type> = tys.iter().map(|&t| self.ty(t)).collect();
        self.scf_for(blk, (first, end, trip), inits, &tys, inner, "blocked deal")
    }

    /// A lane's share of a dealt split sum over `var` in `lo..hi` (`step`: the lanes), the carried
    /// partials (of types `tys`) from `zeros`; with one lane, a sequential loop's iterations. Blocked (`deal`): its blocks ([`Self::lane_rounds`]), then the
    /// remainder (less than a round) one by one from where the rounds end, plus the lane;
    /// else `lo + lane, lo + lane + lanes, ...`. Returns the lane's partials.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn lane_split_sum<'a>(
        &self,
        blk: &'a Block<'c>,
        env: &Env<'c, 'a>,
        var: &str,
        (lo, hi): (Value<'c, 'a>, Value<'c, 'a>),
        (lane, step): (Value<'c, 'a>, Value<'c, 'a>),
        (zeros, tys): (&[Value<'c, 'a>], &[Ty]),
        (carried, body, yields): (&[(String, Expr)], &[Stmt], &[Expr]),
        deal: Option<&Deal>,
        what: &str,
        line: &mut usize,
    ) -> R<Vec<Value<'c, 'a>>> {
        let Some(deal) = deal else {
            let from = self.op(blk, "arith.addi", &[lo, lane], self.index, false);
            return self.carried_loop(
                blk,
                env,
                var,
                (from, hi, step),
                zeros,
                tys,
                carried,
                body,
                yields,
                what,
                line,
            );
        };
        // Each emitted copy of the body numbers its statements from where the loop starts (the
        // remainder loop after the blocks advances `line` once).
        let first_line = *line;
        let (partials, mid) = self.lane_rounds(
            blk,
            env,
            var,
            (lo, hi),
            lane,
            zeros,
            tys,
            deal,
            &mut |l, b, e, accs| {
                let mut line = first_line;
                let line = &mut line;
                let mut e = e.clone();
                for (((n, _), &v), &t) in carried.iter().zip(accs).zip(tys) {
                    e.vars.insert(n.clone(), (v, t));
                }
                // The body, its contiguous stores' values kept for the block's vector stores
                // (GPU); a parallel loop's other statements as they are.
                let mut stored = Vec::new();
                for s in body {
                    *line += 1;
                    match s {
                        Stmt::Store { buf, value, .. }
                            if l.gpu && deal.stores.iter().any(|x| std::ptr::eq(*x, s)) =>
                        {
                            let (v, t) = l.with_loc(what, *line).expr(b, &e, value)?;
                            if t != Ty::F32 {
                                return Err(bug(format!("{what}: store of {t:?} into {buf}")));
                            }
                            stored.push(v);
                        }
                        _ => l.stmt(b, &mut e, s, what, line)?,
                    }
                }
                let next = yields
                    .iter()
                    .map(|y| Ok(l.expr(b, &e, y)?.0))
                    .collect::<R<Vec<_>>>()?;
                Ok((next, stored))
            },
        )?;
        let from = self.op(blk, "arith.addi", &[mid, lane], self.index, false);
        self.carried_loop(
            blk,
            env,
            var,
            (from, hi, step),
            &partials,
            tys,
            carried,
            body,
            yields,
            what,
            line,
        )
    }

    /// A lane's share of a dealt reduction of `body` over `var` in `lo..hi` (`step`: the lanes) with
    /// `combine` from `init`. Blocked (`deal`): its blocks ([`Self::lane_rounds`]), then the
    /// remainder (less than a round) one by one from where the rounds end, plus the lane; else
    /// `lo + lane, lo + lane + lanes, ...` ([`Self::unrolled_reduce`] on a GPU when the body
    /// has no reduction of its own: the same order).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn lane_reduction<'a>(
        &self,
        blk: &'a Block<'c>,
        env: &Env<'c, 'a>,
        var: &str,
        (lo, hi): (Value<'c, 'a>, Value<'c, 'a>),
        (lane, step): (Value<'c, 'a>, Value<'c, 'a>),
        init: Value<'c, 'a>,
        combine: &str,
        body: &Expr,
        deal: Option<&Deal>,
    ) -> R<Value<'c, 'a>> {
        let Some(deal) = deal else {
            let from = self.op(blk, "arith.addi", &[lo, lane], self.index, false);
            return if self.gpu && !body.has_reduce() {
                self.unrolled_reduce(blk, env, var, (from, hi), init, combine, body)
            } else {
                self.reduce_loop(blk, env, var, (from, hi, step), init, combine, body)
            };
        };
        let (partial, mid) = self.lane_rounds(
            blk,
            env,
            var,
            (lo, hi),
            lane,
            &[init],
            &[Ty::F32],
            deal,
            &mut |l, b, e, accs| {
                let (x, _) = l.expr(b, e, body)?;
                Ok((
                    vec![l.op(b, combine, &[accs[0], x], l.f32, true)],
                    Vec::new(),
                ))
            },
        )?;
        let from = self.op(blk, "arith.addi", &[mid, lane], self.index, false);
        self.reduce_loop(blk, env, var, (from, hi, step), partial[0], combine, body)
    }

    /// `first + block · lane`: a lane's first block.
    fn lane_block<'a>(
        &self,
        blk: &'a Block<'c>,
        first: Value<'c, 'a>,
        lane: Value<'c, 'a>,
        block: usize,
    ) -> Value<'c, 'a> {
        let b = self.const_index(blk, block as i64);
        let off = self.op(blk, "arith.muli", &[lane, b], self.index, false);
        self.op(blk, "arith.addi", &[first, off], self.index, false)
    }

    /// A vector access to `buf[idx]` in `env`: the buffer, the flat index, and the
    /// `alignment` attribute (16 bytes) every blocked vector access carries.
    fn vector_at<'a>(
        &self,
        blk: &'a Block<'c>,
        env: &Env<'c, 'a>,
        buf: &str,
        idx: &[Expr],
    ) -> R<(
        BufInfo<'c, 'a>,
        Value<'c, 'a>,
        (Identifier<'c>, Attribute<'c>),
    )> {
        let info = env
            .bufs
            .get(buf)
            .cloned()
            .ok_or_else(|| bug(format!("unknown buffer {buf}")))?;
        let at = self.linear(blk, env, &info, idx)?;
        let i64t: Type = IntegerType::new(self.ctx, 64).into();
        let align = (
            Identifier::new(self.ctx, "alignment"),
            IntegerAttribute::new(i64t, VECTOR_BYTES as i64).into(),
        );
        Ok((info, at, align))
    }

    /// Writes the values of contiguous `store` for a block's iterations, collected while they
    /// ran (the step's second result), as one `vector.store` (16-byte aligned) at its index in `env`,
    /// narrowed to bf16 if need be.
    fn vector_store<'a>(
        &self,
        blk: &'a Block<'c>,
        env: &Env<'c, 'a>,
        store: &Stmt,
        values: &[Value<'c, 'a>],
    ) -> R<()> {
        let Stmt::Store { buf, idx, .. } = store else {
            return Err(bug(format!("blocked deal: {store:?} is not a store")));
        };
        let (info, at, align) = self.vector_at(blk, env, buf, idx)?;
        let parse =
            |text: &str| Type::parse(self.ctx, text).ok_or_else(|| bug(format!("type {text}")));
        let n = values.len();
        let wide = parse(&format!("vector<{n}xf32>"))?;
        let op = OperationBuilder::new("vector.from_elements", self.loc)
            .add_operands(values)
            .add_results(&[wide])
            .build()
            .map_err(|e| bug(format!("vector.from_elements for {buf}: {e}")))?;
        let mut v = self.append(blk, op);
        match info.elem {
            Elem::F32 => {}
            Elem::Bf16 => {
                v = self.op(
                    blk,
                    "arith.truncf",
                    &[v],
                    parse(&format!("vector<{n}xbf16>"))?,
                    false,
                )
            }
            Elem::I64 => return Err(bug(format!("blocked deal: vector store of i64 {buf}"))),
        }
        let op = OperationBuilder::new("vector.store", self.loc)
            .add_operands(&[v, info.value, at])
            .add_attributes(&[align])
            .build()
            .map_err(|e| bug(format!("vector.store of {buf}: {e}")))?;
        blk.append_operation(op);
        Ok(())
    }

    /// The `block` f32 values of contiguous `load` from its index in `env` on: one
    /// `vector.load` (16-byte aligned), widened from bf16 if need be, then extracted.
    fn vector_load<'a>(
        &self,
        blk: &'a Block<'c>,
        env: &Env<'c, 'a>,
        load: &Expr,
        block: usize,
    ) -> R<Vec<Value<'c, 'a>>> {
        let Expr::Load(buf, idx) = load else {
            return Err(bug(format!("blocked deal: {load:?} is not a load")));
        };
        let (info, at, align) = self.vector_at(blk, env, buf, idx)?;
        let parse =
            |text: &str| Type::parse(self.ctx, text).ok_or_else(|| bug(format!("type {text}")));
        let elem = match info.elem {
            Elem::F32 => "f32",
            Elem::Bf16 => "bf16",
            Elem::I64 => return Err(bug(format!("blocked deal: vector load of i64 {buf}"))),
        };
        let raw = parse(&format!("vector<{block}x{elem}>"))?;
        let wide = parse(&format!("vector<{block}xf32>"))?;
        let op = OperationBuilder::new("vector.load", self.loc)
            .add_operands(&[info.value, at])
            .add_attributes(&[align])
            .add_results(&[raw])
            .build()
            .map_err(|e| bug(format!("vector.load of {buf}: {e}")))?;
        let mut v = self.append(blk, op);
        if info.elem == Elem::Bf16 {
            v = self.op(blk, "arith.extf", &[v], wide, false);
        }
        (0..block)
            .map(|u| {
                let pos = Attribute::parse(self.ctx, &format!("array<i64: {u}>"))
                    .ok_or_else(|| bug("vector position".into()))?;
                let op = OperationBuilder::new("vector.extract", self.loc)
                    .add_operands(&[v])
                    .add_attributes(&[(Identifier::new(self.ctx, "static_position"), pos)])
                    .add_results(&[self.f32])
                    .build()
                    .map_err(|e| bug(format!("vector.extract: {e}")))?;
                Ok(self.append(blk, op))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lamina_ir::kernel::Expr as E;

    fn lookup(name: &str) -> Option<(Elem, Vec<usize>)> {
        match name {
            "w" => Some((Elem::Bf16, vec![1024 * 2304, 2304, 1])),
            "x" => Some((Elem::F32, vec![2304, 1])),
            "odd" => Some((Elem::Bf16, vec![2300, 1])),
            "ids" => Some((Elem::I64, vec![8, 1])),
            "acc" => Some((Elem::F32, vec![1])),
            _ => None,
        }
    }

    fn var(n: &str) -> E {
        E::Var(n.into())
    }

    fn add(a: E, b: E) -> E {
        E::Bin(BinOp::Add, Box::new(a), Box::new(b))
    }

    fn mul(a: E, b: E) -> E {
        E::Bin(BinOp::Mul, Box::new(a), Box::new(b))
    }

    #[test]
    fn contiguous_operands_are_aligned_rows() {
        let lets = Lets::default();
        let c = var("c");
        let yes = [
            E::Load("x".into(), vec![E::Pid(0), c.clone()]),
            E::Load(
                "w".into(),
                vec![var("e"), add(var("j0"), E::I(3)), c.clone()],
            ),
            E::Load(
                "x".into(),
                vec![E::Pid(0), add(mul(E::Pid(1), E::I(144)), c.clone())],
            ),
            // A local (strides [1]).
            E::Load("acc".into(), vec![add(c.clone(), E::I(128))]),
        ];
        for e in &yes {
            assert!(contiguous(e, "c", &E::I(0), &[], &lookup, &lets), "{e:?}");
        }
        // The start must keep blocks aligned too: 144 bf16 are 288 bytes, 4 bf16 only 8.
        let w = &yes[1];
        assert!(contiguous(
            w,
            "c",
            &mul(E::Pid(1), E::I(144)),
            &[],
            &lookup,
            &lets
        ));
        assert!(!contiguous(w, "c", &E::I(4), &[], &lookup, &lets));
        let no = [
            // A row stride that is not a multiple of 16 bytes.
            E::Load("odd".into(), vec![var("r"), c.clone()]),
            // Strided along the loop variable.
            E::Load("x".into(), vec![c.clone(), E::I(0)]),
            E::Load("x".into(), vec![E::Pid(0), mul(c.clone(), E::I(2))]),
            // An offset not proven aligned.
            E::Load("x".into(), vec![E::Pid(0), add(c.clone(), E::I(2))]),
            E::Load("x".into(), vec![E::Pid(0), add(c.clone(), var("k"))]),
            // Not a float, or not a known buffer.
            E::Load("ids".into(), vec![E::Pid(0), c.clone()]),
            E::Load("nowhere".into(), vec![c.clone()]),
            // An outer index the loop itself binds.
            E::Load("w".into(), vec![var("g"), E::I(0), c.clone()]),
        ];
        for e in &no {
            assert!(
                !contiguous(e, "c", &E::I(0), &["g"], &lookup, &lets),
                "{e:?}"
            );
        }
    }

    #[test]
    fn blocks_are_as_wide_as_the_widest_vector() {
        let lets = Lets::default();
        let x = E::Load("x".into(), vec![E::Pid(0), var("c")]);
        let w = E::Load("w".into(), vec![E::I(0), E::I(1), var("c")]);
        let f32_only = mul(x.clone(), x.clone());
        let d = reduction_deal("c", &E::I(0), &f32_only, &lookup, &lets).unwrap();
        assert_eq!(
            d,
            Deal {
                loads: vec![&x],
                stores: vec![],
                block: 4
            }
        );
        // Rounds of 4 × 32: a constant span of 64 has none (no blocks are emitted).
        assert!(d.has_rounds(&E::I(0), &E::I(128), 32));
        assert!(!d.has_rounds(&E::I(0), &E::I(64), 32));
        assert!(d.has_rounds(&E::I(0), &E::Rows, 32));
        let mixed = mul(x.clone(), w.clone());
        let d = reduction_deal("c", &E::I(0), &mixed, &lookup, &lets).unwrap();
        assert_eq!(
            d,
            Deal {
                loads: vec![&x, &w],
                stores: vec![],
                block: 8
            }
        );
        assert!(!d.has_rounds(&E::I(0), &E::I(128), 32));
    }

    #[test]
    fn split_sums_block_only_plain_bodies() {
        let lets = Lets::default();
        let load = E::Load("x".into(), vec![E::Pid(0), var("c")]);
        let carried = vec![("s".to_string(), E::F(0.0))];
        let body = vec![Stmt::Let("xc".into(), load.clone())];
        let yields = vec![add(var("s"), mul(var("xc"), var("xc")))];
        let found = carried_deal("c", &E::I(0), &carried, &body, &yields, &lookup, &lets);
        assert_eq!(found.map(|d| d.loads), Some(vec![&load]));
        // A store in the body, or nothing carried (a parallel loop): not blocked.
        let stored = vec![Stmt::Store {
            buf: "y".into(),
            idx: vec![var("c")],
            value: load.clone(),
        }];
        assert!(carried_deal("c", &E::I(0), &carried, &stored, &yields, &lookup, &lets).is_none());
        assert!(carried_deal("c", &E::I(0), &[], &body, &[], &lookup, &lets).is_none());
        // A reduction inside: not blocked.
        let nested = E::Reduce {
            op: lamina_ir::kernel::ReduceOp::Sum,
            var: "k".into(),
            lo: Box::new(E::I(0)),
            hi: Box::new(E::I(4)),
            body: Box::new(load.clone()),
        };
        assert!(reduction_deal("c", &E::I(0), &nested, &lookup, &lets).is_none());
        // Nothing contiguous: not blocked.
        let strided = E::Load("x".into(), vec![var("c"), E::I(0)]);
        assert!(reduction_deal("c", &E::I(0), &strided, &lookup, &lets).is_none());
    }

    #[test]
    fn parallel_loops_defer_contiguous_stores() {
        let lets = Lets::default();
        let st = |buf: &str, idx: Vec<E>, value: E| Stmt::Store {
            buf: buf.into(),
            idx,
            value,
        };
        let x = E::Load("x".into(), vec![E::Pid(0), var("c")]);
        let acc = E::Load("acc".into(), vec![var("c")]);
        // acc[c] = acc[c] · x[c]: read then written, both contiguous.
        let body = vec![st("acc", vec![var("c")], mul(acc.clone(), x.clone()))];
        let d = parallel_deal("c", &E::I(0), &body, &lookup, &lets).unwrap();
        assert_eq!(
            (d.loads, d.stores, d.block),
            (vec![&acc, &x], vec![&body[0]], 4)
        );
        // A bf16 store widens the blocks to 8.
        let body = vec![st("w", vec![E::I(0), E::I(0), var("c")], x.clone())];
        let d = parallel_deal("c", &E::I(0), &body, &lookup, &lets).unwrap();
        assert_eq!((d.stores.len(), d.block), (1, 8));
        // Read after a store to the same buffer: not blocked.
        let body = vec![
            st("acc", vec![var("c")], x.clone()),
            Stmt::Let("a".into(), acc.clone()),
        ];
        assert!(parallel_deal("c", &E::I(0), &body, &lookup, &lets).is_none());
        // A buffer also stored element by element (strided) keeps its contiguous store in place.
        let body = vec![
            st("acc", vec![var("c")], x.clone()),
            st("acc", vec![mul(var("c"), E::I(2))], x.clone()),
        ];
        let d = parallel_deal("c", &E::I(0), &body, &lookup, &lets).unwrap();
        assert_eq!((d.loads, d.stores), (vec![&x], vec![]));
    }
}
