//! A block-cooperative tensor-core tile: a kernel whose program is only a large bf16
//! [`Stmt::Mma`] (the prefill projections) runs as one GPU block of [`WARPS_M`] × [`WARPS_N`]
//! warps, the operands staged through shared memory one [`SLAB`]-deep slab at a time.
//!
//! - Staging: each slab of A (`rows × SLAB`) and B (`cols × SLAB`) is written to shared memory
//!   once by the whole block and read by every warp that needs it. An operand that is a plain
//!   bf16 load along the depth (a weight row, `w[row, k]`) is copied by `cp.async` (16 bytes,
//!   L1 bypassed); any other operand (an f32 activation, a fused norm's `x·w·1/rms`) is
//!   evaluated by the threads pair by pair, rounded to bf16 and stored.
//! - Pipeline: two stages. While the warps multiply slab `s` from one stage, slab `s + 1` is in
//!   flight into the other (the copies asynchronously, the evaluated pairs in registers, stored
//!   after the products); one block barrier per slab separates the stages' writers and readers.
//! - Products, sm_80 ([`Layout::Padded`]): each warp owns a `rows/WARPS_M × cols/WARPS_N`
//!   sub-tile, `mma.sync` m16n8k16 bf16, fragments read from shared memory as 32-bit pairs
//!   with the layouts of [`a_fragment`](super::a_fragment) / [`b_fragment`](super::b_fragment);
//!   rows of [`LD`] bf16 (80 bytes: 16-byte aligned for `cp.async`; consecutive rows start 20
//!   banks apart, so a fragment load's 32 lanes hit 32 distinct banks).
//! - Products, sm_90a ([`Layout::CoreMatrices`]): the block is one warpgroup; per 16-deep step
//!   one `wgmma.mma_async` m64nNk16 per 64-row half, both operands read by the tensor cores
//!   through shared-memory [`descriptor`]s (K-major core matrices, no swizzle), the
//!   accumulators one register struct per half; `wgmma.fence` before, commit and wait after
//!   each slab, and `fence.proxy.async` before the barrier that publishes a slab.
//! - Ragged edges: rows and columns past `m`/`n` are loaded from the last valid row (clamped)
//!   and never stored; the depth is a whole number of slabs ([`staged_tile`] requires it).
//!
//! The host runs the same `Stmt::Mma` as loops (the same bf16 products), which is what the
//! tests compare; this module only decides where the operands wait on the way.

use lamina_ir::kernel::{Expr, Kernel, Mma, MmaKind, Stmt};
use melior::dialect::scf;
use melior::ir::attribute::IntegerAttribute;
use melior::ir::operation::OperationBuilder;
use melior::ir::r#type::{IntegerType, MemRefType};
use melior::ir::{
    Attribute, Block, BlockLike, Identifier, Region, RegionLike, Type, Value, ValueLike,
};

use super::warp_stage::Stageable;
use super::{a_fragment, b_fragment, bug, Env, Lower, R};

/// Warps along the tile's rows and columns.
pub const WARPS_M: usize = 2;
pub const WARPS_N: usize = 2;
/// Threads of a block-cooperative program.
pub const LANES: u32 = (WARPS_M * WARPS_N * 32) as u32;
/// Depth of one staged slab (two MMA steps).
pub const SLAB: usize = 32;
/// Shared-memory row stride, in bf16 elements.
pub const LD: usize = SLAB + 8;
/// Slabs in flight: one being multiplied, one being loaded.
pub const STAGES: usize = 2;
/// Least tile a block-cooperative program takes (smaller tiles stay one warp each).
pub const MIN_TILE: usize = 64;
/// Static shared memory a kernel may declare without opting in (48 KiB).
pub const SHARED_BUDGET: usize = 48 << 10;
/// Rows of one `wgmma` (m64nNk16): a tile is one per 64-row half.
pub const WGMMA_M: usize = 64;
/// Core-matrix layout (8 rows × 16 bytes, each 128 contiguous bytes): bytes between core
/// matrices adjacent along the depth (LBO) and along the rows (SBO: a slab's 8-row group).
pub const CORE_LBO: usize = 128;
pub const CORE_SBO: usize = SLAB / 8 * CORE_LBO;

/// How a slab's `rows × SLAB` bf16 elements are laid out in shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Row-major with rows of [`LD`] elements (the `mma.sync` fragment loads).
    Padded,
    /// Core matrices, K-major without swizzle: 8 × 8 blocks of 128 contiguous bytes, [`CORE_LBO`]
    /// apart along the depth and [`CORE_SBO`] apart along the rows (the `wgmma` descriptors).
    CoreMatrices,
}

/// Element offset of `(row, k)` within a slab laid out as `layout`.
pub fn slab_offset(layout: Layout, row: usize, k: usize) -> usize {
    match layout {
        Layout::Padded => row * LD + k,
        Layout::CoreMatrices => {
            (row / 8) * (CORE_SBO / 2) + (k / 8) * (CORE_LBO / 2) + (row % 8) * 8 + k % 8
        }
    }
}

/// A `wgmma` shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format") of a staged
/// slab: [`strided_descriptor`] with rows of core matrices [`CORE_SBO`] apart.
pub fn descriptor(address: u64) -> u64 {
    strided_descriptor(address, CORE_SBO)
}

/// A `wgmma` shared-memory matrix descriptor of K-major core matrices without swizzle: start
/// address `>> 4` in bits 0–13, leading-dimension byte offset (between core matrices adjacent
/// along the depth, [`CORE_LBO`]) `>> 4` in 16–29, stride-dimension byte offset (between 8-row
/// groups, `sbo`) `>> 4` in 32–45, base offset 0, no swizzle (bits 62–63 zero).
pub fn strided_descriptor(address: u64, sbo: usize) -> u64 {
    ((address >> 4) & 0x3FFF) | (((CORE_LBO as u64) >> 4) << 16) | (((sbo as u64) >> 4) << 32)
}

/// The tile of `k` when it runs as a block-cooperative program: a body of `let`s without
/// reductions then one bf16 MMA, or an `if` (on such values: the same for the whole block) of
/// such a body; the MMA at least [`MIN_TILE`] × [`MIN_TILE`], rows and columns multiples of 32
/// (whole warp sub-tiles and whole `cp.async` rounds), depth a whole number of slabs, staged
/// within [`SHARED_BUDGET`].
pub fn staged_tile(k: &Kernel) -> Option<&Mma> {
    only_tile(&k.body)
}

fn only_tile(body: &[Stmt]) -> Option<&Mma> {
    let (last, lets) = body.split_last()?;
    let pure = lets
        .iter()
        .all(|s| matches!(s, Stmt::Let(_, e) if !e.has_reduce()));
    let mma = match last {
        Stmt::Mma(mma) => mma,
        Stmt::If { cond, then } if !cond.has_reduce() => only_tile(then)?,
        _ => return None,
    };
    // The extents are evaluated by the whole block, the operands per element pair by each
    // thread: no reductions in them (a block has no cross-warp combine).
    let plain = [&mma.m, &mma.n, &mma.a, &mma.b]
        .into_iter()
        .all(|e| !e.has_reduce());
    let fits = plain
        && mma.kind == MmaKind::Bf16
        && mma.rows >= MIN_TILE
        && mma.cols >= MIN_TILE
        && mma.rows.is_multiple_of(32)
        && mma.cols.is_multiple_of(32)
        && mma.depth.is_multiple_of(SLAB)
        && shared_bytes(mma) <= SHARED_BUDGET;
    (pure && fits).then_some(mma)
}

/// Shared-memory bytes of a staged tile: [`STAGES`] × (A and B slabs).
pub fn shared_bytes(mma: &Mma) -> usize {
    STAGES * stage_bytes(mma)
}

fn stage_bytes(mma: &Mma) -> usize {
    (mma.rows + mma.cols) * LD * 2
}

/// `(row, k)` (k even) of the pair thread `tid` fetches in round `it` of a slab: each warp's
/// 32 pairs are 8 rows × 4 pairs of one 8-deep block (lanes 4 apart, rows apart), so its
/// 32-bit shared stores hit 32 distinct banks in both layouts (a core-matrix row, or padded
/// rows 20 banks apart), and its global loads are 8 runs of 8 consecutive elements.
pub fn slab_pair(tid: usize, it: usize) -> (usize, usize) {
    let p = it * LANES as usize + tid;
    let (lane, w) = (p % 32, p / 32);
    (
        (w / (SLAB / 8)) * 8 + lane / 4,
        (w % (SLAB / 8)) * 8 + 2 * (lane % 4),
    )
}

/// Rounds of [`slab_pair`] for a slab of `rows` rows.
pub fn pair_rounds(rows: usize) -> usize {
    rows * SLAB / 2 / LANES as usize
}

/// `(row, k)` of the 8-element (16-byte) chunk thread `tid` copies in round `it`.
pub fn slab_chunk(tid: usize, it: usize) -> (usize, usize) {
    let c = it * LANES as usize + tid;
    (c / (SLAB / 8), 8 * (c % (SLAB / 8)))
}

/// Rounds of [`slab_chunk`] for a slab of `rows` rows.
pub fn chunk_rounds(rows: usize) -> usize {
    rows * SLAB / 8 / LANES as usize
}

/// First row and column of warp `warp`'s sub-tile.
pub fn warp_origin(mma: &Mma, warp: usize) -> (usize, usize) {
    (
        (warp / WARPS_N) * (mma.rows / WARPS_M),
        (warp % WARPS_N) * (mma.cols / WARPS_N),
    )
}

/// An operand `cp.async` can copy: a load of a bf16 buffer `[.., c]` (`c` a multiple of 8, so
/// that 8 elements are 16 aligned bytes) at `[.., k]`, no other index depending on `k`: the
/// buffer, the indices before `k` and their strides.
fn copyable<'e>(env: &Env, mma: &Mma, e: &'e Expr) -> Option<Stageable<'e>> {
    let Expr::Load(buf, idx) = e else { return None };
    let info = env.bufs.get(buf)?;
    let (Expr::Var(k), rest) = idx.split_last()? else {
        return None;
    };
    let (1, outer) = info.strides.split_last()? else {
        return None;
    };
    let ok = *k == mma.k
        && info.elem == lamina_ir::kernel::Elem::Bf16
        && outer.iter().all(|s| s.is_multiple_of(8))
        && !rest.is_empty()
        && rest.iter().all(|x| !x.reads(&mma.k));
    ok.then(|| Stageable {
        buf: buf.as_str(),
        elem: lamina_ir::kernel::Elem::Bf16,
        outer: rest.iter().zip(outer.iter().copied()).collect(),
        offset: None,
    })
}

/// One operand of the tile: its expression, the name its row index binds, its rows in the
/// tile, its last valid row and whether `cp.async` copies it.
struct Operand<'x, 'c, 'a> {
    e: &'x Expr,
    var: &'x str,
    rows: usize,
    last: Value<'c, 'a>,
    copy: Option<Stageable<'x>>,
    /// Byte offset of its slab within a stage.
    offset: usize,
    layout: Layout,
}

impl<'c> Lower<'c> {
    /// Lowers `mma` as a block-cooperative staged tile (a GPU program of [`LANES`] threads,
    /// `env.smem` its shared memory of [`shared_bytes`]).
    pub(super) fn staged_mma<'a>(
        &self,
        blk: &'a Block<'c>,
        env: &Env<'c, 'a>,
        mma: &Mma,
        what: &str,
        line: &mut usize,
    ) -> R<()> {
        let (Some(smem), Some(tid)) = (env.smem, env.lane) else {
            return Err(bug(format!(
                "{what}: a staged tile needs shared memory and a thread id"
            )));
        };
        if !self.gpu || self.lanes != LANES || self.in_split {
            return Err(bug(format!(
                "{what}: a staged tile needs a block-cooperative GPU program of {LANES} threads"
            )));
        }
        let ix = |v: usize| self.const_index(blk, v as i64);
        let int = |name: &str, a: Value<'c, 'a>, b: Value<'c, 'a>| {
            self.op(blk, name, &[a, b], self.index, false)
        };
        let warp = int("arith.divui", tid, ix(32));
        let l32 = int("arith.remui", tid, ix(32));
        let g = int("arith.divui", l32, ix(4));
        let t = int("arith.remui", l32, ix(4));
        let (sub_rows, sub_cols) = (mma.rows / WARPS_M, mma.cols / WARPS_N);
        let (tm, tn) = (sub_rows / Mma::M, sub_cols / Mma::N);
        let row0 = int(
            "arith.muli",
            int("arith.divui", warp, ix(WARPS_N)),
            ix(sub_rows),
        );
        let col0 = int(
            "arith.muli",
            int("arith.remui", warp, ix(WARPS_N)),
            ix(sub_cols),
        );
        let (m, _) = self.expr(blk, env, &mma.m)?;
        let (n, _) = self.expr(blk, env, &mma.n)?;
        let layout = self.layout(mma);
        let a = Operand {
            e: &mma.a,
            var: &mma.i,
            rows: mma.rows,
            last: int("arith.subi", m, ix(1)),
            copy: copyable(env, mma, &mma.a),
            offset: 0,
            layout,
        };
        let b = Operand {
            e: &mma.b,
            var: &mma.j,
            rows: mma.cols,
            last: int("arith.subi", n, ix(1)),
            copy: copyable(env, mma, &mma.b),
            offset: mma.rows * LD * 2,
            layout,
        };
        let asynchronous = a.copy.is_some() || b.copy.is_some();
        let slabs = mma.depth / SLAB;
        let halves = mma.rows / WGMMA_M;
        let acc_struct = Type::parse(
            self.ctx,
            &format!("!llvm.struct<({})>", vec!["f32"; mma.cols / 2].join(", ")),
        )
        .ok_or_else(|| bug("wgmma accumulator type".into()))?;

        // Slab 0 into stage 0.
        let zero = ix(0);
        self.copy_slab(blk, env, [&a, &b], (smem, zero), zero, tid)?;
        if asynchronous {
            self.cp_async_commit(blk)?;
        }
        let pending = self.fetch_slab(blk, env, mma, [&a, &b], zero, tid)?;
        self.deposit_slab(blk, [&a, &b], (smem, zero), &pending, tid)?;

        // The slab loop, carrying the accumulators: tm·tn·4 f32 per lane (mma.sync), or one
        // register struct per 64-row half of the tile (wgmma).
        let (carried, inits): (Vec<Type>, Vec<Value>) = match layout {
            Layout::Padded => {
                let z = self.const_f32(blk, 0.0);
                (vec![self.f32; tm * tn * 4], vec![z; tm * tn * 4])
            }
            Layout::CoreMatrices => {
                let z = self.append(
                    blk,
                    OperationBuilder::new("llvm.mlir.zero", self.loc)
                        .add_results(&[acc_struct])
                        .build()
                        .map_err(|e| bug(format!("{what}: llvm.mlir.zero: {e}")))?,
                );
                (vec![acc_struct; halves], vec![z; halves])
            }
        };
        let mut args = vec![(self.index, self.loc)];
        args.extend(carried.iter().map(|&t| (t, self.loc)));
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
            let next = bint("arith.addi", s, bx(1));
            let here = bint(
                "arith.muli",
                bint("arith.remui", s, bx(2)),
                bx(stage_bytes(mma)),
            );
            let there = bint(
                "arith.muli",
                bint("arith.remui", next, bx(2)),
                bx(stage_bytes(mma)),
            );
            // The last round fetches its own slab again (into the stage nobody reads any
            // more) rather than branching.
            let next_k = bint(
                "arith.muli",
                bint("arith.minui", next, bx(slabs - 1)),
                bx(SLAB),
            );
            // Slab s has landed (this thread's copies, then everyone's writes), and every
            // warp is done with slab s − 1, whose stage the next slab overwrites. wgmma reads
            // shared memory through the async proxy: the generic proxy's writes are fenced
            // for it first.
            if asynchronous {
                self.cp_async_wait(&body, 0)?;
            }
            if layout == Layout::CoreMatrices {
                self.fence_proxy_async(&body)?;
            }
            self.block_barrier(&body)?;
            self.copy_slab(&body, env, [&a, &b], (smem, there), next_k, tid)?;
            if asynchronous {
                self.cp_async_commit(&body)?;
            }
            let pending = self.fetch_slab(&body, env, mma, [&a, &b], next_k, tid)?;
            let acc: Vec<Value> = (0..carried.len()).map(|i| arg(1 + i)).collect::<R<_>>()?;
            let acc = match layout {
                Layout::Padded => {
                    let lane = (row0, col0, g, t);
                    self.mma_sync_slab(&body, (smem, here), mma, b.offset, lane, acc, what)?
                }
                Layout::CoreMatrices => {
                    self.wgmma_slab(&body, (smem, here), mma, b.offset, acc, what)?
                }
            };
            self.deposit_slab(&body, [&a, &b], (smem, there), &pending, tid)?;
            body.append_operation(scf::r#yield(&acc, self.loc));
        }
        let region = Region::new();
        region.append_block(body);
        let op = OperationBuilder::new("scf.for", self.loc)
            .add_operands(&[ix(0), ix(slabs), ix(1)])
            .add_operands(&inits)
            .add_results(&carried)
            .add_regions([region])
            .build()
            .map_err(|e| bug(format!("{what}: staged slab loop: {e}")))?;
        let r = blk.append_operation(op);
        let acc: Vec<Value> = (0..carried.len())
            .map(|i| r.result(i).map(Into::into).map_err(|e| bug(e.to_string())))
            .collect::<R<_>>()?;
        if asynchronous {
            // The last round's redundant copies land before the block exits.
            self.cp_async_wait(blk, 0)?;
        }
        let two_t = int("arith.muli", t, ix(2));
        match layout {
            Layout::Padded => {
                let lane_row = int("arith.addi", row0, g);
                let lane_col = int("arith.addi", col0, two_t);
                self.mma_epilogue(
                    blk,
                    env,
                    mma,
                    &acc,
                    (lane_row, lane_col),
                    (tm, tn),
                    (m, n),
                    what,
                    line,
                )
            }
            // Warp w of the warpgroup holds rows 16w .. 16w + 16 of each 64-row half, every
            // column, in the m16n8 accumulator order (8 columns per 4 registers).
            Layout::CoreMatrices => {
                let warp_row = int("arith.addi", int("arith.muli", warp, ix(16)), g);
                for (h, &half) in acc.iter().enumerate() {
                    let values: Vec<Value> = (0..mma.cols / 2)
                        .map(|e| self.extract(blk, half, e))
                        .collect::<R<_>>()?;
                    let lane_row = int("arith.addi", warp_row, ix(h * WGMMA_M));
                    self.mma_epilogue(
                        blk,
                        env,
                        mma,
                        &values,
                        (lane_row, two_t),
                        (1, mma.cols / Mma::N),
                        (m, n),
                        what,
                        line,
                    )?;
                }
                Ok(())
            }
        }
    }

    /// Where a staged tile's slabs live: padded rows for `mma.sync` fragment loads, core
    /// matrices for `wgmma` descriptors (sm_90a, tiles of whole 64-row halves, at most 256
    /// columns).
    fn layout(&self, mma: &Mma) -> Layout {
        if self.wgmma && mma.rows.is_multiple_of(WGMMA_M) && mma.cols <= 256 {
            Layout::CoreMatrices
        } else {
            Layout::Padded
        }
    }

    /// Slab `(smem, stage)` multiplied into the lane's `mma.sync` accumulators: warp sub-tile
    /// at `(row0, col0)`, the lane's group `g` and thread-in-group `t`.
    #[allow(clippy::too_many_arguments)]
    fn mma_sync_slab<'b>(
        &self,
        body: &'b Block<'c>,
        (smem, stage): (Value<'c, '_>, Value<'c, '_>),
        mma: &Mma,
        b_offset: usize,
        (row0, col0, g, t): (Value<'c, '_>, Value<'c, '_>, Value<'c, '_>, Value<'c, '_>),
        mut acc: Vec<Value<'c, 'b>>,
        what: &str,
    ) -> R<Vec<Value<'c, 'b>>> {
        let bx = |v: usize| self.const_index(body, v as i64);
        let bint = |name: &str, x: Value<'c, '_>, y: Value<'c, '_>| {
            self.op(body, name, &[x, y], self.index, false)
        };
        let (tm, tn) = (mma.rows / WARPS_M / Mma::M, mma.cols / WARPS_N / Mma::N);
        let attrs = self.mma_attrs(mma.kind)?;
        let i32t: Type = IntegerType::new(self.ctx, 32).into();
        let a_view = self.shared_view(body, smem, stage, i32t, mma.rows * LD / 2, 0)?;
        let b_view = self.shared_view(body, smem, stage, i32t, mma.cols * LD / 2, b_offset)?;
        // This lane's first fragment pair in its warp's rows / columns.
        let a_base = bint(
            "arith.addi",
            bint("arith.muli", bint("arith.addi", row0, g), bx(LD / 2)),
            t,
        );
        let b_base = bint(
            "arith.addi",
            bint("arith.muli", bint("arith.addi", col0, g), bx(LD / 2)),
            t,
        );
        let load = |view: Value<'c, '_>, base: Value<'c, '_>, off: usize| -> R<Value> {
            let at = bint("arith.addi", base, bx(off));
            let op = OperationBuilder::new("memref.load", self.loc)
                .add_operands(&[view, at])
                .add_results(&[i32t])
                .build()
                .map_err(|e| bug(format!("{what}: shared load: {e}")))?;
            Ok(self.append(body, op))
        };
        let kind = MmaKind::Bf16;
        for step in 0..SLAB / kind.depth_step() {
            let k_pairs = step * kind.depth_step() / 2;
            let mut a_regs = Vec::new();
            for am in 0..tm {
                let mut regs = Vec::new();
                for reg in 0..4 {
                    let (r, k) = a_fragment(kind, 0, 0, reg, 0);
                    let off = (am * Mma::M + r) * (LD / 2) + k_pairs + k / 2;
                    regs.push(load(a_view, a_base, off)?);
                }
                a_regs.push(regs);
            }
            let mut b_regs = Vec::new();
            for bn in 0..tn {
                let mut regs = Vec::new();
                for reg in 0..2 {
                    let (c, k) = b_fragment(kind, 0, 0, reg, 0);
                    let off = (bn * Mma::N + c) * (LD / 2) + k_pairs + k / 2;
                    regs.push(load(b_view, b_base, off)?);
                }
                b_regs.push(regs);
            }
            let mut next = Vec::new();
            for (am, ar) in a_regs.iter().enumerate() {
                for (bn, br) in b_regs.iter().enumerate() {
                    let c0 = (am * tn + bn) * 4;
                    next.extend(self.mma_sync(body, &attrs, ar, br, &acc[c0..c0 + 4], what)?);
                }
            }
            acc = next;
        }
        Ok(acc)
    }

    /// Slab `(smem, stage)` multiplied into the warpgroup's accumulators (one struct per
    /// 64-row half) by `wgmma.mma_async` m64nNk16, both operands read through shared-memory
    /// descriptors, then waited for (the stage is overwritten after this).
    fn wgmma_slab<'b>(
        &self,
        body: &'b Block<'c>,
        (smem, stage): (Value<'c, '_>, Value<'c, '_>),
        mma: &Mma,
        b_offset: usize,
        mut acc: Vec<Value<'c, 'b>>,
        what: &str,
    ) -> R<Vec<Value<'c, 'b>>> {
        let i64t = self.i64;
        let long = |name: &str, x: Value<'c, '_>, y: Value<'c, '_>| {
            self.op(body, name, &[x, y], i64t, false)
        };
        // The shared-window address of the stage.
        let base = self.shared_address(body, smem, what)?;
        let stage = self.op(body, "arith.index_cast", &[stage], i64t, false);
        let base = long("arith.addi", base, stage);
        let desc = |offset: usize| {
            let addr = long("arith.addi", base, self.const_i64(body, offset as i64));
            self.wgmma_descriptor(body, addr, CORE_SBO)
        };
        let attrs: Vec<(Identifier, Attribute)> = [
            (
                "shape",
                format!("#nvvm.shape<m = {WGMMA_M}, n = {}, k = 16>", mma.cols),
            ),
            ("typeA", "#nvvm.wgmma_type<bf16>".into()),
            ("typeB", "#nvvm.wgmma_type<bf16>".into()),
            ("typeD", "#nvvm.wgmma_type<f32>".into()),
            ("scaleD", "#nvvm.wgmma_scale_out<one>".into()),
            ("scaleA", "#nvvm.wgmma_scale_in<one>".into()),
            ("scaleB", "#nvvm.wgmma_scale_in<one>".into()),
            ("layoutA", "#nvvm.mma_layout<row>".into()),
            ("layoutB", "#nvvm.mma_layout<col>".into()),
        ]
        .into_iter()
        .map(|(k, v)| {
            Attribute::parse(self.ctx, &v)
                .map(|a| (Identifier::new(self.ctx, k), a))
                .ok_or_else(|| bug(format!("wgmma attribute {v}")))
        })
        .collect::<R<_>>()?;
        self.nvvm(body, "nvvm.wgmma.fence.aligned", &[])?;
        for step in 0..SLAB / 16 {
            // 16 more along the depth: two core matrices further.
            let k_bytes = 2 * step * CORE_LBO;
            let db = desc(b_offset + k_bytes);
            for (h, a) in acc.iter_mut().enumerate() {
                let da = desc(h * (WGMMA_M / 8) * CORE_SBO + k_bytes);
                let ty = a.r#type();
                let op = OperationBuilder::new("nvvm.wgmma.mma_async", self.loc)
                    .add_operands(&[*a, da, db])
                    .add_attributes(&attrs)
                    .add_results(&[ty])
                    .build()
                    .map_err(|e| bug(format!("{what}: nvvm.wgmma.mma_async: {e}")))?;
                *a = self.append(body, op);
            }
        }
        self.nvvm(body, "nvvm.wgmma.commit.group.sync.aligned", &[])?;
        let group = IntegerAttribute::new(i64t, 0).into();
        self.nvvm(
            body,
            "nvvm.wgmma.wait.group.sync.aligned",
            &[(Identifier::new(self.ctx, "group"), group)],
        )?;
        Ok(acc)
    }

    /// The shared-window address of `smem`'s first byte, as an i64 (the start address field of
    /// a `wgmma` descriptor).
    pub(super) fn shared_address<'b>(
        &self,
        body: &'b Block<'c>,
        smem: Value<'c, '_>,
        what: &str,
    ) -> R<Value<'c, 'b>> {
        let base = self.append(
            body,
            OperationBuilder::new("memref.extract_aligned_pointer_as_index", self.loc)
                .add_operands(&[smem])
                .add_results(&[self.index])
                .build()
                .map_err(|e| bug(format!("{what}: shared address: {e}")))?,
        );
        Ok(self.op(body, "arith.index_cast", &[base], self.i64, false))
    }

    /// The `wgmma` descriptor of K-major core matrices starting at shared-window address
    /// `addr` (i64), 8-row groups `sbo` bytes apart ([`strided_descriptor`]).
    pub(super) fn wgmma_descriptor<'b>(
        &self,
        body: &'b Block<'c>,
        addr: Value<'c, '_>,
        sbo: usize,
    ) -> Value<'c, 'b> {
        let i64t = self.i64;
        let c64 = |v: u64| {
            self.append(
                body,
                melior::dialect::arith::constant(
                    self.ctx,
                    IntegerAttribute::new(i64t, v as i64).into(),
                    self.loc,
                ),
            )
        };
        let long = |name: &str, x: Value<'c, '_>, y: Value<'c, '_>| {
            self.op(body, name, &[x, y], i64t, false)
        };
        let start = long("arith.andi", long("arith.shrui", addr, c64(4)), c64(0x3FFF));
        long("arith.ori", start, c64(strided_descriptor(0, sbo)))
    }

    /// An NVVM op without operands or results.
    fn nvvm(
        &self,
        body: &Block<'c>,
        name: &str,
        attrs: &[(Identifier<'c>, Attribute<'c>)],
    ) -> R<()> {
        body.append_operation(
            OperationBuilder::new(name, self.loc)
                .add_attributes(attrs)
                .build()
                .map_err(|e| bug(format!("{name}: {e}")))?,
        );
        Ok(())
    }

    /// `fence.proxy.async.shared::cta`: this thread's generic-proxy writes to shared memory
    /// (stores, `cp.async`) become visible to the async proxy (`wgmma` operand reads).
    pub(super) fn fence_proxy_async(&self, body: &Block<'c>) -> R<()> {
        let parse = |t: &str| {
            Attribute::parse(self.ctx, t).ok_or_else(|| bug(format!("fence attribute {t}")))
        };
        self.nvvm(
            body,
            "nvvm.fence.proxy",
            &[
                (
                    Identifier::new(self.ctx, "kind"),
                    parse("#nvvm.proxy_kind<async.shared>")?,
                ),
                (
                    Identifier::new(self.ctx, "space"),
                    parse("#nvvm.shared_space<cta>")?,
                ),
            ],
        )
    }

    /// The pairs of slab `k0` this thread evaluates, per operand (none for copied operands):
    /// each rounded to bf16 and packed, held in registers until [`Self::deposit_slab`].
    fn fetch_slab<'b>(
        &self,
        body: &'b Block<'c>,
        env: &Env<'c, 'b>,
        mma: &Mma,
        ops: [&Operand<'_, 'c, '_>; 2],
        k0: Value<'c, '_>,
        tid: Value<'c, '_>,
    ) -> R<Vec<Vec<Value<'c, 'b>>>> {
        let bx = |v: usize| self.const_index(body, v as i64);
        let int = |name: &str, x: Value<'c, '_>, y: Value<'c, '_>| {
            self.op(body, name, &[x, y], self.index, false)
        };
        let mut out = Vec::new();
        for op in ops {
            let mut regs = Vec::new();
            if op.copy.is_none() {
                for it in 0..pair_rounds(op.rows) {
                    let (row, k) = self.pair_at(body, tid, it);
                    let k = int("arith.addi", k0, k);
                    let row = int("arith.minui", row, op.last);
                    let lo = self.mma_element(body, env, (mma, op.e, op.var), row, k)?;
                    let k1 = int("arith.addi", k, bx(1));
                    let hi = self.mma_element(body, env, (mma, op.e, op.var), row, k1)?;
                    regs.push(self.pack_bf16(body, lo, hi));
                }
            }
            out.push(regs);
        }
        Ok(out)
    }
}

impl<'c> Lower<'c> {
    /// Issues this thread's `cp.async` copies of slab `k0` of the copied operands into the
    /// stage at byte `stage` of `smem` (not yet committed to a group).
    fn copy_slab<'b>(
        &self,
        body: &'b Block<'c>,
        env: &Env<'c, 'b>,
        ops: [&Operand<'_, 'c, '_>; 2],
        (smem, stage): (Value<'c, '_>, Value<'c, '_>),
        k0: Value<'c, '_>,
        tid: Value<'c, '_>,
    ) -> R<()> {
        let bx = |v: usize| self.const_index(body, v as i64);
        let int = |name: &str, x: Value<'c, '_>, y: Value<'c, '_>| {
            self.op(body, name, &[x, y], self.index, false)
        };
        let bf16 = Type::bfloat16(self.ctx);
        for op in ops {
            let Some(copy) = &op.copy else {
                continue;
            };
            let src = env
                .bufs
                .get(copy.buf)
                .ok_or_else(|| bug(format!("cp.async: no buffer {}", copy.buf)))?
                .value;
            let view = self.shared_view(body, smem, stage, bf16, op.rows * LD, op.offset)?;
            for it in 0..chunk_rounds(op.rows) {
                let c = int("arith.addi", tid, bx(it * LANES as usize));
                let row = int("arith.divui", c, bx(SLAB / 8));
                let k8 = int("arith.muli", int("arith.remui", c, bx(SLAB / 8)), bx(8));
                let clamped = int("arith.minui", row, op.last);
                let from = self.copy_source(body, env, (op.var, clamped), copy, k0, k8)?;
                let to = self.slab_index(body, op.layout, row, k8);
                self.async_copy(body, (view, to), (src, from), 8, true)?;
            }
        }
        Ok(())
    }

    /// One 16-byte `cp.async` of `elements` from `src[from]` (global) to `dst[to]` (shared),
    /// not yet committed to a group: `.cg` (`bypass_l1`: cached in L2 only, for data read once)
    /// or `.ca` (also in L1, for data the program reads again).
    pub(super) fn async_copy(
        &self,
        body: &Block<'c>,
        (dst, to): (Value<'c, '_>, Value<'c, '_>),
        (src, from): (Value<'c, '_>, Value<'c, '_>),
        elements: usize,
        bypass_l1: bool,
    ) -> R<()> {
        let token = Type::parse(self.ctx, "!nvgpu.device.async.token")
            .ok_or_else(|| bug("async token type".into()))?;
        let attr = |text: &str| {
            Attribute::parse(self.ctx, text)
                .ok_or_else(|| bug(format!("cp.async attribute {text}")))
        };
        let mut attrs = vec![
            (
                Identifier::new(self.ctx, "dstElements"),
                attr(&format!("{elements} : index"))?,
            ),
            (
                Identifier::new(self.ctx, "operandSegmentSizes"),
                attr("array<i32: 1, 1, 1, 1, 0>")?,
            ),
        ];
        if bypass_l1 {
            attrs.insert(
                1,
                (
                    Identifier::new(self.ctx, "bypassL1"),
                    Attribute::unit(self.ctx),
                ),
            );
        }
        let copy = OperationBuilder::new("nvgpu.device_async_copy", self.loc)
            .add_operands(&[dst, to, src, from])
            .add_attributes(&attrs)
            .add_results(&[token])
            .build()
            .map_err(|e| bug(format!("nvgpu.device_async_copy: {e}")))?;
        body.append_operation(copy);
        Ok(())
    }

    /// Stores the pairs [`Self::fetch_slab`] returned into the stage at byte `stage`.
    fn deposit_slab(
        &self,
        body: &Block<'c>,
        ops: [&Operand<'_, 'c, '_>; 2],
        (smem, stage): (Value<'c, '_>, Value<'c, '_>),
        pending: &[Vec<Value<'c, '_>>],
        tid: Value<'c, '_>,
    ) -> R<()> {
        let bx = |v: usize| self.const_index(body, v as i64);
        let int = |name: &str, x: Value<'c, '_>, y: Value<'c, '_>| {
            self.op(body, name, &[x, y], self.index, false)
        };
        let i32t: Type = IntegerType::new(self.ctx, 32).into();
        for (op, regs) in ops.into_iter().zip(pending) {
            if regs.is_empty() {
                continue;
            }
            let view = self.shared_view(body, smem, stage, i32t, op.rows * LD / 2, op.offset)?;
            for (it, &x) in regs.iter().enumerate() {
                let (row, k) = self.pair_at(body, tid, it);
                let at = int(
                    "arith.divui",
                    self.slab_index(body, op.layout, row, k),
                    bx(2),
                );
                body.append_operation(
                    OperationBuilder::new("memref.store", self.loc)
                        .add_operands(&[x, view, at])
                        .build()
                        .map_err(|e| bug(format!("shared store: {e}")))?,
                );
            }
        }
        Ok(())
    }

    /// [`slab_pair`] in MLIR.
    fn pair_at<'b>(
        &self,
        body: &'b Block<'c>,
        tid: Value<'c, '_>,
        it: usize,
    ) -> (Value<'c, 'b>, Value<'c, 'b>) {
        let bx = |v: usize| self.const_index(body, v as i64);
        let int = |name: &str, x: Value<'c, '_>, y: Value<'c, '_>| {
            self.op(body, name, &[x, y], self.index, false)
        };
        let p = int("arith.addi", tid, bx(it * LANES as usize));
        let lane = int("arith.remui", p, bx(32));
        let w = int("arith.divui", p, bx(32));
        let row = int(
            "arith.addi",
            int("arith.muli", int("arith.divui", w, bx(SLAB / 8)), bx(8)),
            int("arith.divui", lane, bx(4)),
        );
        let k = int(
            "arith.addi",
            int("arith.muli", int("arith.remui", w, bx(SLAB / 8)), bx(8)),
            int("arith.muli", int("arith.remui", lane, bx(4)), bx(2)),
        );
        (row, k)
    }

    /// [`slab_offset`] in MLIR.
    fn slab_index<'b>(
        &self,
        body: &'b Block<'c>,
        layout: Layout,
        row: Value<'c, '_>,
        k: Value<'c, '_>,
    ) -> Value<'c, 'b> {
        let bx = |v: usize| self.const_index(body, v as i64);
        let int = |name: &str, x: Value<'c, '_>, y: Value<'c, '_>| {
            self.op(body, name, &[x, y], self.index, false)
        };
        match layout {
            Layout::Padded => int("arith.addi", int("arith.muli", row, bx(LD)), k),
            Layout::CoreMatrices => {
                let group = int(
                    "arith.muli",
                    int("arith.divui", row, bx(8)),
                    bx(CORE_SBO / 2),
                );
                let along = int("arith.muli", int("arith.divui", k, bx(8)), bx(CORE_LBO / 2));
                let inner = int(
                    "arith.addi",
                    int("arith.muli", int("arith.remui", row, bx(8)), bx(8)),
                    int("arith.remui", k, bx(8)),
                );
                int("arith.addi", int("arith.addi", group, along), inner)
            }
        }
    }

    /// `count` elements of `elem` at byte `stage + offset` of the block's shared memory.
    pub(super) fn shared_view<'b>(
        &self,
        body: &'b Block<'c>,
        smem: Value<'c, '_>,
        stage: Value<'c, '_>,
        elem: Type<'c>,
        count: usize,
        offset: usize,
    ) -> R<Value<'c, 'b>> {
        let off = self.const_index(body, offset as i64);
        let at = self.op(body, "arith.addi", &[stage, off], self.index, false);
        let space = workgroup_space(self.ctx)?;
        let ty = MemRefType::new(elem, &[count as i64], None, Some(space));
        let op = OperationBuilder::new("memref.view", self.loc)
            .add_operands(&[smem, at])
            .add_results(&[ty.into()])
            .build()
            .map_err(|e| bug(format!("shared memref.view: {e}")))?;
        Ok(self.append(body, op))
    }

    pub(super) fn cp_async_commit(&self, body: &Block<'c>) -> R<()> {
        body.append_operation(
            OperationBuilder::new("nvvm.cp.async.commit.group", self.loc)
                .build()
                .map_err(|e| bug(format!("cp.async.commit.group: {e}")))?,
        );
        Ok(())
    }

    /// Waits until at most `n` of this thread's committed `cp.async` groups are pending.
    pub(super) fn cp_async_wait(&self, body: &Block<'c>, n: i64) -> R<()> {
        let i32t: Type = IntegerType::new(self.ctx, 32).into();
        body.append_operation(
            OperationBuilder::new("nvvm.cp.async.wait.group", self.loc)
                .add_attributes(&[(
                    Identifier::new(self.ctx, "n"),
                    IntegerAttribute::new(i32t, n).into(),
                )])
                .build()
                .map_err(|e| bug(format!("cp.async.wait.group: {e}")))?,
        );
        Ok(())
    }

    /// `bar.sync 0`: every thread of the block arrives; shared and global writes before it are
    /// visible to the block after it.
    pub(super) fn block_barrier(&self, body: &Block<'c>) -> R<()> {
        body.append_operation(
            OperationBuilder::new("gpu.barrier", self.loc)
                .build()
                .map_err(|e| bug(format!("gpu.barrier: {e}")))?,
        );
        Ok(())
    }
}

/// `#gpu.address_space<workgroup>`: shared memory.
pub(super) fn workgroup_space(ctx: &melior::Context) -> R<Attribute<'_>> {
    Attribute::parse(ctx, "#gpu.address_space<workgroup>")
        .ok_or_else(|| bug("workgroup address space attribute".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lamina_ir::kernel::build::*;

    fn tile(rows: usize, cols: usize, depth: usize) -> Mma {
        let Stmt::Mma(m) = mma(
            [rows, cols, depth],
            i(rows),
            i(cols),
            ld("x", [v("mi"), v("k")]),
            ld("w", [v("mj"), v("k")]),
            vec![],
        ) else {
            unreachable!()
        };
        *m
    }

    /// Every pair and every 16-byte chunk of a slab is fetched by exactly one (thread, round),
    /// and the warps' sub-tiles cover the tile once.
    #[test]
    fn staging_covers_each_slab_and_tile_once() {
        for rows in [64, 128, 96] {
            let mut pairs = vec![vec![0u8; SLAB / 2]; rows];
            for it in 0..pair_rounds(rows) {
                for tid in 0..LANES as usize {
                    let (r, k) = slab_pair(tid, it);
                    pairs[r][k / 2] += 1;
                }
            }
            assert!(
                pairs.iter().flatten().all(|&c| c == 1),
                "pairs, {rows} rows"
            );
            let mut chunks = vec![vec![0u8; SLAB / 8]; rows];
            for it in 0..chunk_rounds(rows) {
                for tid in 0..LANES as usize {
                    let (r, k) = slab_chunk(tid, it);
                    chunks[r][k / 8] += 1;
                }
            }
            assert!(
                chunks.iter().flatten().all(|&c| c == 1),
                "chunks, {rows} rows"
            );
        }
        let m = tile(128, 64, 256);
        let mut cover = vec![vec![0u8; 64]; 128];
        for warp in 0..WARPS_M * WARPS_N {
            let (r0, c0) = warp_origin(&m, warp);
            for row in cover.iter_mut().skip(r0).take(128 / WARPS_M) {
                for c in row.iter_mut().skip(c0).take(64 / WARPS_N) {
                    *c += 1;
                }
            }
        }
        assert!(cover.iter().flatten().all(|&c| c == 1));
    }

    /// Shared-memory rows are 16-byte aligned (for `cp.async`), a fragment load's 32 lanes
    /// and a warp's pair stores hit 32 distinct banks, and two stages of a prefill tile fit
    /// the static budget.
    #[test]
    fn shared_layout_is_aligned_and_conflict_free() {
        assert_eq!((LD * 2) % 16, 0);
        for layout in [Layout::Padded, Layout::CoreMatrices] {
            for it in 0..pair_rounds(128) {
                for warp in 0..LANES as usize / 32 {
                    let mut banks = [0u8; 32];
                    for lane in 0..32 {
                        let (r, k) = slab_pair(warp * 32 + lane, it);
                        banks[(slab_offset(layout, r, k) * 2 / 4) % 32] += 1;
                    }
                    assert!(banks.iter().all(|&b| b == 1), "{layout:?} {it} {warp}");
                }
            }
        }
        for reg in 0..4 {
            let mut banks = [0u8; 32];
            for lane in 0..32 {
                let (r, k) = a_fragment(MmaKind::Bf16, lane / 4, lane % 4, reg, 0);
                banks[((r * LD + k) * 2 / 4) % 32] += 1;
            }
            assert!(banks.iter().all(|&b| b == 1), "A register {reg}");
        }
        let m = tile(128, 64, 2304);
        assert_eq!(shared_bytes(&m), 30720);
        assert!(shared_bytes(&m) <= SHARED_BUDGET);
    }

    /// The core-matrix layout is a bijection of a slab onto its `rows · SLAB` elements; each
    /// 8-element chunk along the depth is 16 contiguous bytes (one `cp.async`) and one row of a
    /// core matrix; and a descriptor's LBO/SBO step from core matrix to core matrix as the
    /// layout places them.
    #[test]
    fn core_matrix_layout_matches_the_descriptors() {
        let rows = 128;
        let mut seen = vec![0u8; rows * SLAB];
        for r in 0..rows {
            for k in 0..SLAB {
                seen[slab_offset(Layout::CoreMatrices, r, k)] += 1;
            }
            for k8 in (0..SLAB).step_by(8) {
                let at = slab_offset(Layout::CoreMatrices, r, k8);
                assert_eq!(at % 8, 0);
                for e in 0..8 {
                    assert_eq!(slab_offset(Layout::CoreMatrices, r, k8 + e), at + e);
                }
            }
        }
        assert!(seen.iter().all(|&c| c == 1));
        // Core matrix (row group g, depth block d) starts g·SBO + d·LBO bytes in; within it,
        // row i is 16 bytes after row i − 1.
        for g in 0..rows / 8 {
            for d in 0..SLAB / 8 {
                for i in 0..8 {
                    let bytes = 2 * slab_offset(Layout::CoreMatrices, 8 * g + i, 8 * d);
                    assert_eq!(bytes, g * CORE_SBO + d * CORE_LBO + 16 * i);
                }
            }
        }
        let d = descriptor(0x1_2340);
        assert_eq!(d & 0x3FFF, 0x1234);
        assert_eq!((d >> 16) & 0x3FFF, (CORE_LBO >> 4) as u64);
        assert_eq!((d >> 32) & 0x3FFF, (CORE_SBO >> 4) as u64);
        assert_eq!(d >> 62, 0, "no swizzle");
        // Stage and operand offsets keep descriptors' 16-byte granularity.
        let m = tile(128, 64, 2304);
        assert_eq!(stage_bytes(&m) % 16, 0);
        assert_eq!((m.rows * LD * 2) % 16, 0);
    }
}
