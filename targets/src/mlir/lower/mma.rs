//! [`Stmt::Mma`](lamina_ir::kernel::Stmt::Mma) on a warp's tensor cores. Operands that are
//! aligned loads along the depth from global memory wait in the warp's slice of shared memory
//! on the way ([`super::warp_stage`], `cp.async`, when the kernel has staging memory); every
//! other operand is loaded by each lane, fragment by fragment, straight from its expression:
//! - [`MmaKind::Bf16`]: `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`, a 32-bit
//!   register holding two bf16 (the lower `k` in the low half);
//! - [`MmaKind::Tf32x3`]: `mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32` three times
//!   (`lo·hi`, `hi·lo`, then `hi·hi`), each operand element split into TF32 head and tail.
//!
//! A `rows × cols` tile is `rows/16 × cols/8` MMAs; a loop over the depth in MMA steps carries
//! their f32 accumulators (4 per MMA per lane). Padding rows, columns and depth are loaded from
//! clamped indices (a valid address) and, for the depth only, replaced by zero; the epilogue
//! runs on the lane that holds each accumulator, for valid elements only, so the padding never
//! reaches memory.
//!
//! Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 / mma.m16n8k8"): lane `l` has
//! group `g = l / 4` and thread-in-group `t = l % 4`; see [`a_fragment`], [`b_fragment`],
//! [`c_fragment`].

use lamina_ir::kernel::{Expr, Mma, MmaKind};
use melior::dialect::arith::CmpiPredicate;
use melior::dialect::{arith, scf};
use melior::ir::attribute::IntegerAttribute;
use melior::ir::operation::OperationBuilder;
use melior::ir::r#type::IntegerType;
use melior::ir::{Attribute, Block, BlockLike, Identifier, Region, RegionLike, Type, Value};

use super::{bug, Env, Lower, Ty, R, TF32_MASK};

/// Elements per 32-bit operand register: two bf16, or one tf32.
fn per_register(kind: MmaKind) -> usize {
    match kind {
        MmaKind::Bf16 => 2,
        MmaKind::Tf32x3 | MmaKind::F32 | MmaKind::Tf32 => 1,
    }
}

/// The attributes of an `nvvm.mma.sync` ([`Lower::mma_attrs`]).
pub(super) type MmaAttrs<'c> = [(Identifier<'c>, Attribute<'c>)];

/// Registers per operand element of `kind` (bf16 and TF32: one; TF32x3: a head and a tail)
/// and the `(A variant, B variant)` pairs multiplied per MMA, small terms first.
pub(super) fn register_variants(kind: MmaKind) -> (usize, &'static [(usize, usize)]) {
    match kind {
        MmaKind::Bf16 | MmaKind::Tf32 => (1, &[(0, 0)]),
        MmaKind::Tf32x3 | MmaKind::F32 => (2, &[(1, 0), (0, 1), (0, 0)]),
    }
}

/// `(row, k)` of A-fragment register `reg` (0..4), element `h` (0..per register), for group
/// `g` and thread-in-group `t`: registers 0 and 2 hold row `g`, 1 and 3 row `g + 8`; registers
/// 2 and 3 are half the MMA's depth further along `k`.
pub fn a_fragment(kind: MmaKind, g: usize, t: usize, reg: usize, h: usize) -> (usize, usize) {
    let e = per_register(kind);
    (
        g + 8 * (reg % 2),
        e * t + h + kind.depth_step() / 2 * (reg / 2),
    )
}

/// Rows of the tiles a warp runs whole: taller TF32 tiles (warpgroup tiles, 64 rows) run
/// as blocks of this many rows ([`row_blocks`]).
const WARP_ROWS: usize = lamina_ir::kernel::expand::DOT_TILE;

/// A TF32 tile of more than [`WARP_ROWS`] rows as its blocks of [`WARP_ROWS`] rows, each
/// `if (32b < m) { mma … }` with the block's row `i` read as `i + 32b` in the operand and the
/// epilogue; `None` for other tiles (and when the epilogue rebinds the row's name).
pub(crate) fn row_blocks(mma: &Mma) -> Option<Vec<lamina_ir::kernel::Stmt>> {
    use lamina_ir::kernel::build::{i, lt, min, v};
    use lamina_ir::kernel::Stmt;
    fn binds(b: &[Stmt], name: &str) -> bool {
        b.iter().any(|s| match s {
            Stmt::Let(n, _) => n == name,
            Stmt::If { then, .. } => binds(then, name),
            _ => false,
        })
    }
    if mma.rows <= WARP_ROWS || mma.kind == MmaKind::Bf16 || binds(&mma.epilogue, &mma.i) {
        return None;
    }
    let blocks = (0..mma.rows.div_ceil(WARP_ROWS)).map(|b| {
        let shift = [(mma.i.as_str(), v(&mma.i) + i(b * WARP_ROWS))];
        let block = Mma {
            rows: WARP_ROWS,
            m: min(i(WARP_ROWS), mma.m.clone() - i(b * WARP_ROWS)),
            a: mma.a.substitute(&shift),
            epilogue: mma
                .epilogue
                .iter()
                .map(|s| s.rewrite(&mut |e| e.substitute(&shift), &|n| n.to_string()))
                .collect(),
            ..mma.clone()
        };
        Stmt::If {
            cond: lt(i(b * WARP_ROWS), mma.m.clone()),
            then: vec![Stmt::Mma(Box::new(block))],
        }
    });
    Some(blocks.collect())
}

/// `(column, k)` of B-fragment register `reg` (0..2), element `h`: column `g`, register 1 half
/// the depth further along `k`.
pub fn b_fragment(kind: MmaKind, g: usize, t: usize, reg: usize, h: usize) -> (usize, usize) {
    let e = per_register(kind);
    (g, e * t + h + kind.depth_step() / 2 * reg)
}

/// `(row, column)` of accumulator `e` (0..4): rows `g` then `g + 8`, columns `2t`, `2t + 1`
/// (both kinds).
pub fn c_fragment(g: usize, t: usize, e: usize) -> (usize, usize) {
    (g + 8 * (e / 2), 2 * t + e % 2)
}

impl<'c> Lower<'c> {
    /// Lowers `mma` for a warp program (32 lanes, `env.lane` bound).
    pub(super) fn mma<'a>(
        &self,
        blk: &'a Block<'c>,
        env: &Env<'c, 'a>,
        mma: &Mma,
        what: &str,
        line: &mut usize,
    ) -> R<()> {
        if !self.gpu || self.lanes != 32 || self.in_split {
            return Err(bug(format!(
                "{what}: an mma tile needs a whole warp (GPU program of 32 lanes, outside split loops)"
            )));
        }
        // In a program of several warps, a tile not dealt to one warp is all of theirs.
        if self.warps > 1 && !self.in_tiles {
            return self.group_mma(blk, env, mma, what, line);
        }
        // A warpgroup tile that one warp runs (a one-warp program, or one without a warpgroup
        // staging area): its 32-row blocks one after the other, as warp tiles (a 64-row TF32x3
        // tile's fragments and accumulators would not fit a lane's registers).
        if let Some(blocks) = row_blocks(mma) {
            let mut env2 = env.clone();
            return self.block(blk, &mut env2, &blocks, what, line);
        }
        let lane = env
            .lane
            .ok_or_else(|| bug(format!("{what}: mma: no lane id")))?;
        let kind = mma.kind;
        if kind == MmaKind::F32 {
            return Err(bug(format!(
                "{what}: an f32 mma tile reaches a GPU as tf32x3 (dots_on_tensor_cores)"
            )));
        }
        let ix = |v: i64| self.const_index(blk, v);
        let four = ix(4);
        let g = self.op(blk, "arith.divui", &[lane, four], self.index, false);
        let t = self.op(blk, "arith.remui", &[lane, four], self.index, false);
        let (m, _) = self.expr(blk, env, &mma.m)?;
        let (n, _) = self.expr(blk, env, &mma.n)?;
        let one = ix(1);
        let m_last = self.op(blk, "arith.subi", &[m, one], self.index, false);
        let n_last = self.op(blk, "arith.subi", &[n, one], self.index, false);
        let (tm, tn) = (mma.rows / Mma::M, mma.cols / Mma::N);
        // Stores before the tile are visible to every lane's operand loads.
        self.warp_sync(blk);

        let acc = match self.warp_staged(env, mma) {
            Some(copies) => {
                self.warp_staged_mma(blk, env, mma, copies, (lane, g, t), (m, n), what)?
            }
            None => self.direct_mma(blk, env, mma, (g, t), (m_last, n_last), what)?,
        };

        let two_t = self.op(blk, "arith.muli", &[t, ix(2)], self.index, false);
        self.mma_epilogue(
            blk,
            env,
            mma,
            &acc,
            (g, two_t),
            (tm, tn),
            (m, n),
            what,
            line,
        )?;
        // What the epilogue stored is visible to every lane after the tile.
        self.warp_sync(blk);
        Ok(())
    }

    /// The depth loop of `mma` with every lane loading its fragments straight from the operand
    /// expressions: the tile's accumulators, `tm · tn · 4` per lane.
    fn direct_mma<'a>(
        &self,
        blk: &'a Block<'c>,
        env: &Env<'c, 'a>,
        mma: &Mma,
        (g, t): (Value<'c, 'a>, Value<'c, 'a>),
        (m_last, n_last): (Value<'c, 'a>, Value<'c, 'a>),
        what: &str,
    ) -> R<Vec<Value<'c, 'a>>> {
        let kind = mma.kind;
        let step = kind.depth_step();
        let ix = |v: i64| self.const_index(blk, v);
        let (tm, tn) = (mma.rows / Mma::M, mma.cols / Mma::N);
        let steps = mma.depth.div_ceil(step);
        // Steps per iteration of the depth loop: up to 4 for bf16 tiles (their fragments are
        // few registers), dividing the step count so that no step is padding; TF32x3 tiles
        // (twice the fragments, in the register-heavy chunked kernels) are not unrolled.
        let unroll = match kind {
            MmaKind::Bf16 => [4, 2, 1]
                .into_iter()
                .find(|u| steps.is_multiple_of(*u))
                .unwrap_or(1),
            MmaKind::Tf32x3 | MmaKind::F32 | MmaKind::Tf32 => 1,
        };
        let attrs = self.mma_attrs(kind)?;

        // The depth loop: k0 = 0, step, ... carrying tm·tn·4 accumulators.
        let accs = tm * tn * 4;
        let zero = self.const_f32(blk, 0.0);
        let mut args = vec![(self.index, self.loc)];
        args.extend((0..accs).map(|_| (self.f32, self.loc)));
        let body = Block::new(&args);
        {
            let arg = |i: usize| -> R<Value> {
                body.argument(i)
                    .map(Into::into)
                    .map_err(|e| bug(e.to_string()))
            };
            let k0 = arg(0)?;
            let bx = |v: i64| self.const_index(&body, v);
            let badd = |a: Value<'c, '_>, b: Value<'c, '_>| {
                self.op(&body, "arith.addi", &[a, b], self.index, false)
            };
            // One register's worth of operand, as the registers the MMAs take: bf16, one
            // register packing two elements; tf32x3, a head register and a tail register.
            let registers = |e: &Expr, var: &str, idx, last, kk| {
                let idx = self.op(&body, "arith.minui", &[idx, last], self.index, false);
                self.expr_registers(&body, env, (mma, e, var), idx, kk)
            };
            // Lane offsets: g (row/column in a fragment) and t·(elements per register) (depth).
            let e = per_register(kind) as i64;
            let t_k = self.op(&body, "arith.muli", &[t, bx(e)], self.index, false);
            // a_regs[tile][variant][reg], b_regs likewise (variant: bf16 one, tf32x3 hi/lo).
            let (variants, products) = register_variants(kind);
            // Every unrolled step's fragments are loaded before the first MMA, so that `unroll`
            // steps of loads are in flight at once.
            let mut steps_regs = Vec::new();
            for u in 0..unroll {
                let k0 = badd(k0, bx((u * step) as i64));
                let mut a_regs = Vec::new();
                for am in 0..tm {
                    let mut regs = vec![Vec::new(); variants];
                    for reg in 0..4 {
                        let (r0, k_off) = a_fragment(kind, 0, 0, reg, 0);
                        let row = badd(g, bx((am * Mma::M + r0) as i64));
                        let kk = badd(badd(k0, t_k), bx(k_off as i64));
                        for (v, r) in registers(&mma.a, &mma.i, row, m_last, kk)?
                            .into_iter()
                            .enumerate()
                        {
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
                        let col = badd(g, bx((bn * Mma::N + c0) as i64));
                        let kk = badd(badd(k0, t_k), bx(k_off as i64));
                        for (v, r) in registers(&mma.b, &mma.j, col, n_last, kk)?
                            .into_iter()
                            .enumerate()
                        {
                            regs[v].push(r);
                        }
                    }
                    b_regs.push(regs);
                }
                steps_regs.push((a_regs, b_regs));
            }
            let mut acc: Vec<Value> = (0..accs).map(|i| arg(1 + i)).collect::<R<_>>()?;
            for (a_regs, b_regs) in &steps_regs {
                acc = self.step_products(&body, (&attrs, products), a_regs, b_regs, &acc, what)?;
            }
            body.append_operation(scf::r#yield(&acc, self.loc));
        }
        let region = Region::new();
        region.append_block(body);
        let (lo, hi, stride) = (ix(0), ix((steps * step) as i64), ix((unroll * step) as i64));
        let op = OperationBuilder::new("scf.for", self.loc)
            .add_operands(&[lo, hi, stride])
            .add_operands(&vec![zero; accs])
            .add_results(&vec![self.f32; accs])
            .add_regions([region])
            .build()
            .map_err(|e| bug(format!("{what}: mma depth loop: {e}")))?;
        let r = blk.append_operation(op);
        (0..accs)
            .map(|i| r.result(i).map(Into::into).map_err(|e| bug(e.to_string())))
            .collect()
    }

    /// One MMA step of a tile: every (A tile, B tile) pair's `mma.sync`s (`products`: the
    /// (A variant, B variant) pairs, [`register_variants`]) on the accumulators `acc`
    /// (row-major over the pairs, 4 each); returns the new accumulators.
    pub(super) fn step_products<'b>(
        &self,
        body: &'b Block<'c>,
        (attrs, products): (&MmaAttrs<'c>, &[(usize, usize)]),
        a_regs: &[Vec<Vec<Value<'c, 'b>>>],
        b_regs: &[Vec<Vec<Value<'c, 'b>>>],
        acc: &[Value<'c, 'b>],
        what: &str,
    ) -> R<Vec<Value<'c, 'b>>> {
        let tn = b_regs.len();
        let mut next = Vec::new();
        for (am, a) in a_regs.iter().enumerate() {
            for (bn, b) in b_regs.iter().enumerate() {
                let c0 = (am * tn + bn) * 4;
                let mut c: Vec<Value> = acc[c0..c0 + 4].to_vec();
                for &(va, vb) in products {
                    c = self.mma_sync(body, attrs, &a[va], &b[vb], &c, what)?;
                }
                next.extend(c);
            }
        }
        Ok(next)
    }

    /// One register's worth of operand `e` of `mma` (its row bound as `var` at `row`, already
    /// clamped) at depth `k`, evaluated from the expression: bf16, one register packing
    /// elements `k` and `k + 1`; the TF32 kinds, [`Self::tf32_registers`] of element `k`.
    pub(super) fn expr_registers<'b>(
        &self,
        body: &'b Block<'c>,
        env: &Env<'c, 'b>,
        (mma, e, var): (&Mma, &Expr, &str),
        row: Value<'c, 'b>,
        k: Value<'c, 'b>,
    ) -> R<Vec<Value<'c, 'b>>> {
        match mma.kind {
            MmaKind::Bf16 => {
                let lo = self.mma_element(body, env, (mma, e, var), row, k)?;
                let one = self.const_index(body, 1);
                let k1 = self.op(body, "arith.addi", &[k, one], self.index, false);
                let hi = self.mma_element(body, env, (mma, e, var), row, k1)?;
                Ok(vec![self.pack_bf16(body, lo, hi)])
            }
            kind => {
                let x = self.mma_element(body, env, (mma, e, var), row, k)?;
                self.tf32_registers(body, kind, x)
            }
        }
    }

    /// The registers a TF32 kind takes for f32 element `x`: [`MmaKind::Tf32x3`] (and `F32`),
    /// a head `hi = x` with the low 13 mantissa bits cleared and a tail likewise of `x − hi`
    /// (exact in f32); [`MmaKind::Tf32`], `x` rounded to the nearest TF32 (as the host's
    /// `tf32_round`).
    pub(super) fn tf32_registers<'b>(
        &self,
        body: &'b Block<'c>,
        kind: MmaKind,
        x: Value<'c, '_>,
    ) -> R<Vec<Value<'c, 'b>>> {
        let i32t: Type = IntegerType::new(self.ctx, 32).into();
        let mask = || {
            self.append(
                body,
                arith::constant(
                    self.ctx,
                    IntegerAttribute::new(i32t, TF32_MASK).into(),
                    self.loc,
                ),
            )
        };
        match kind {
            MmaKind::Tf32x3 | MmaKind::F32 => {
                let mask = mask();
                let bits = self.op(body, "arith.bitcast", &[x], i32t, false);
                let hi = self.op(body, "arith.andi", &[bits, mask], i32t, false);
                let hi_f = self.op(body, "arith.bitcast", &[hi], self.f32, false);
                let rest = self.op(body, "arith.subf", &[x, hi_f], self.f32, false);
                let rest = self.op(body, "arith.bitcast", &[rest], i32t, false);
                let lo = self.op(body, "arith.andi", &[rest, mask], i32t, false);
                Ok(vec![hi, lo])
            }
            MmaKind::Tf32 => {
                let bits = self.op(body, "arith.bitcast", &[x], i32t, false);
                let bits = self.tf32_half_up(body, bits);
                let mask = mask();
                Ok(vec![self.op(
                    body,
                    "arith.andi",
                    &[bits, mask],
                    i32t,
                    false,
                )])
            }
            MmaKind::Bf16 => Err(bug("tf32 registers of a bf16 tile".into())),
        }
    }

    /// The `nvvm.mma.sync` attributes of `kind` (row-major A, column-major B: both operands'
    /// rows run along the depth).
    pub(super) fn mma_attrs(&self, kind: MmaKind) -> R<Vec<(Identifier<'c>, Attribute<'c>)>> {
        let (ptx_type, shape) = match kind {
            MmaKind::Bf16 => ("bf16", "#nvvm.shape<m = 16, n = 8, k = 16>"),
            MmaKind::Tf32x3 | MmaKind::F32 | MmaKind::Tf32 => {
                ("tf32", "#nvvm.shape<m = 16, n = 8, k = 8>")
            }
        };
        let mma_type = format!("#nvvm.mma_type<{ptx_type}>");
        [
            ("layoutA", "#nvvm.mma_layout<row>"),
            ("layoutB", "#nvvm.mma_layout<col>"),
            ("multiplicandAPtxType", mma_type.as_str()),
            ("multiplicandBPtxType", mma_type.as_str()),
            ("shape", shape),
            ("operandSegmentSizes", "array<i32: 4, 2, 4>"),
        ]
        .into_iter()
        .map(|(k, v)| {
            Attribute::parse(self.ctx, v)
                .map(|a| (Identifier::new(self.ctx, k), a))
                .ok_or_else(|| bug(format!("mma attribute {v}")))
        })
        .collect()
    }

    /// One `mma.sync`: `c + a·b` from the A registers `a` (4), B registers `b` (2) and the four
    /// accumulators `c`.
    pub(super) fn mma_sync<'b>(
        &self,
        body: &'b Block<'c>,
        attrs: &[(Identifier<'c>, Attribute<'c>)],
        a: &[Value<'c, '_>],
        b: &[Value<'c, '_>],
        c: &[Value<'c, '_>],
        what: &str,
    ) -> R<Vec<Value<'c, 'b>>> {
        let struct4 = Type::parse(self.ctx, "!llvm.struct<(f32, f32, f32, f32)>")
            .ok_or_else(|| bug("mma result type".into()))?;
        let mut operands: Vec<Value> = a.to_vec();
        operands.extend(b);
        operands.extend(c);
        let op = OperationBuilder::new("nvvm.mma.sync", self.loc)
            .add_operands(&operands)
            .add_attributes(attrs)
            .add_results(&[struct4])
            .build()
            .map_err(|e| bug(format!("{what}: nvvm.mma.sync: {e}")))?;
        let d = self.append(body, op);
        (0..4).map(|e| self.extract(body, d, e)).collect()
    }

    /// Two f32 rounded to bf16 and packed in one 32-bit register, `lo` in the low half (the
    /// lower `k` of an MMA operand register).
    pub(super) fn pack_bf16<'b>(
        &self,
        body: &'b Block<'c>,
        lo: Value<'c, '_>,
        hi: Value<'c, '_>,
    ) -> Value<'c, 'b> {
        let i32t: Type = IntegerType::new(self.ctx, 32).into();
        let i16t: Type = IntegerType::new(self.ctx, 16).into();
        let half = |x: Value<'c, '_>| {
            let b16 = self.op(body, "arith.truncf", &[x], Type::bfloat16(self.ctx), false);
            let bits = self.op(body, "arith.bitcast", &[b16], i16t, false);
            self.op(body, "arith.extui", &[bits], i32t, false)
        };
        let (lo, hi) = (half(lo), half(hi));
        let sixteen = self.append(
            body,
            arith::constant(self.ctx, IntegerAttribute::new(i32t, 16).into(), self.loc),
        );
        let high = self.op(body, "arith.shli", &[hi, sixteen], i32t, false);
        self.op(body, "arith.ori", &[lo, high], i32t, false)
    }

    /// The epilogue of a lane's `tm × tn` MMAs, accumulators `acc` (4 per MMA, row-major over
    /// the MMAs): element `e` of MMA `(am, bn)` is `(i, j) = (row0 + 16·am + ·, col0 + 8·bn +
    /// ·)` as [`c_fragment`] places it (`row0` includes the lane's group, `col0` twice its
    /// thread-in-group), run for `i < m`, `j < n` only. Lanes differ from here on, so nothing
    /// inside is spread over them (and no warp barrier is issued).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn mma_epilogue<'a>(
        &self,
        blk: &'a Block<'c>,
        env: &Env<'c, 'a>,
        mma: &Mma,
        acc: &[Value<'c, 'a>],
        (row0, col0): (Value<'c, 'a>, Value<'c, 'a>),
        (tm, tn): (usize, usize),
        (m, n): (Value<'c, 'a>, Value<'c, 'a>),
        what: &str,
        line: &mut usize,
    ) -> R<()> {
        let ix = |v: i64| self.const_index(blk, v);
        let add = |a: Value<'c, 'a>, b: Value<'c, 'a>| {
            self.op(blk, "arith.addi", &[a, b], self.index, false)
        };
        let lanes_apart = Lower {
            in_split: true,
            ..*self
        };
        for am in 0..tm {
            for bn in 0..tn {
                for e in 0..4 {
                    let (r0, c0) = c_fragment(0, 0, e);
                    let i = add(row0, ix((am * Mma::M + r0) as i64));
                    let j = add(col0, ix((bn * Mma::N + c0) as i64));
                    let ok_i = self.append(
                        blk,
                        arith::cmpi(self.ctx, CmpiPredicate::Ult, i, m, self.loc),
                    );
                    let ok_j = self.append(
                        blk,
                        arith::cmpi(self.ctx, CmpiPredicate::Ult, j, n, self.loc),
                    );
                    let ok = self.op(blk, "arith.andi", &[ok_i, ok_j], self.i1, false);
                    let then = Block::new(&[]);
                    {
                        let mut env2: Env<'c, '_> = env.clone();
                        env2.vars.insert(mma.i.clone(), (i, Ty::Int));
                        env2.vars.insert(mma.j.clone(), (j, Ty::Int));
                        env2.vars
                            .insert(mma.acc.clone(), (acc[(am * tn + bn) * 4 + e], Ty::F32));
                        lanes_apart.block(&then, &mut env2, &mma.epilogue, what, line)?;
                        then.append_operation(scf::r#yield(&[], self.loc));
                    }
                    let region = Region::new();
                    region.append_block(then);
                    blk.append_operation(scf::r#if(ok, &[], region, Region::new(), self.loc));
                }
            }
        }
        Ok(())
    }

    /// Element `(idx, k)` of operand `e` (bound as `var` and `mma.k`): `k` clamped to the
    /// depth and the value zero past it.
    pub(super) fn mma_element<'b>(
        &self,
        body: &'b Block<'c>,
        env: &Env<'c, 'b>,
        (mma, e, var): (&Mma, &Expr, &str),
        idx: Value<'c, 'b>,
        k: Value<'c, 'b>,
    ) -> R<Value<'c, 'b>> {
        let ragged = !mma.depth.is_multiple_of(mma.kind.depth_step());
        let kc = if ragged {
            let last = self.const_index(body, mma.depth as i64 - 1);
            self.op(body, "arith.minui", &[k, last], self.index, false)
        } else {
            k
        };
        let mut env2 = env.clone();
        env2.vars.insert(var.to_string(), (idx, Ty::Int));
        env2.vars.insert(mma.k.clone(), (kc, Ty::Int));
        // Each lane evaluates its own elements: a reduction inside an operand runs whole on
        // the lane, not dealt over the warp.
        let lane_alone = Lower {
            in_split: true,
            ..*self
        };
        let (mut x, _) = lane_alone.expr(body, &env2, e)?;
        if ragged {
            let depth = self.const_index(body, mma.depth as i64);
            let inside = self.append(
                body,
                arith::cmpi(self.ctx, CmpiPredicate::Ult, k, depth, self.loc),
            );
            let z = self.const_f32(body, 0.0);
            x = self.append(body, arith::select(inside, x, z, self.loc));
        }
        Ok(x)
    }

    /// Field `e` of an LLVM struct value.
    pub(super) fn extract<'a>(
        &self,
        blk: &'a Block<'c>,
        s: Value<'c, '_>,
        e: usize,
    ) -> R<Value<'c, 'a>> {
        let pos = Attribute::parse(self.ctx, &format!("array<i64: {e}>"))
            .ok_or_else(|| bug("extractvalue position".into()))?;
        let op = OperationBuilder::new("llvm.extractvalue", self.loc)
            .add_operands(&[s])
            .add_attributes(&[(Identifier::new(self.ctx, "position"), pos)])
            .add_results(&[self.f32])
            .build()
            .map_err(|e| bug(format!("llvm.extractvalue: {e}")))?;
        Ok(self.append(blk, op))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element of each 16×16 / 16×8 operand and the 16×8 accumulator belongs to exactly
    /// one (lane, register, half), as the PTX layout says.
    #[test]
    fn fragments_cover_their_tiles_once() {
        let mut a = [[0u8; 16]; 16];
        let mut b = [[0u8; 16]; 8];
        let mut c = [[0u8; 8]; 16];
        let kind = MmaKind::Bf16;
        for lane in 0..32 {
            let (g, t) = (lane / 4, lane % 4);
            for reg in 0..4 {
                for h in 0..2 {
                    let (r, k) = a_fragment(kind, g, t, reg, h);
                    a[r][k] += 1;
                }
            }
            for reg in 0..2 {
                for h in 0..2 {
                    let (n, k) = b_fragment(kind, g, t, reg, h);
                    b[n][k] += 1;
                }
            }
            for e in 0..4 {
                let (r, n) = c_fragment(g, t, e);
                c[r][n] += 1;
            }
        }
        assert!(a.iter().flatten().all(|&x| x == 1));
        assert!(b.iter().flatten().all(|&x| x == 1));
        assert!(c.iter().flatten().all(|&x| x == 1));
        // Spot checks against the ISA's tables: lane 5 is group 1, thread 1.
        assert_eq!(a_fragment(kind, 1, 1, 0, 1), (1, 3));
        assert_eq!(a_fragment(kind, 1, 1, 3, 0), (9, 10));
        assert_eq!(b_fragment(kind, 1, 1, 1, 1), (1, 11));
        assert_eq!(c_fragment(1, 1, 2), (9, 2));
    }

    /// The m16n8k8 tf32 layout: A 16×8 in four registers of one element (rows g, g + 8;
    /// columns t, t + 4), B 8×8 in two (k = t, t + 4).
    #[test]
    fn tf32_fragments_cover_their_tiles_once() {
        let kind = MmaKind::Tf32x3;
        let mut a = [[0u8; 8]; 16];
        let mut b = [[0u8; 8]; 8];
        for lane in 0..32 {
            let (g, t) = (lane / 4, lane % 4);
            for reg in 0..4 {
                let (r, k) = a_fragment(kind, g, t, reg, 0);
                a[r][k] += 1;
            }
            for reg in 0..2 {
                let (n, k) = b_fragment(kind, g, t, reg, 0);
                b[n][k] += 1;
            }
        }
        assert!(a.iter().flatten().all(|&x| x == 1));
        assert!(b.iter().flatten().all(|&x| x == 1));
        assert_eq!(a_fragment(kind, 2, 3, 1, 0), (10, 3));
        assert_eq!(a_fragment(kind, 2, 3, 2, 0), (2, 7));
        assert_eq!(b_fragment(kind, 2, 3, 1, 0), (2, 7));
    }
}
