//! [`Stmt::Mma`](lamina_ir::kernel::Stmt::Mma) on a warp's tensor cores: `mma.sync.aligned.
//! m16n8k16.row.col.f32.bf16.bf16.f32`, with each lane loading its own fragments straight from
//! the operand expressions (no shared-memory staging yet).
//!
//! A `rows × cols` tile is `rows/16 × cols/8` MMAs; a loop over the depth in steps of 16
//! carries their f32 accumulators (4 per MMA per lane). Padding rows, columns and depth are
//! loaded from clamped indices (a valid address) and, for the depth only, replaced by zero; the
//! epilogue runs on the lane that holds each accumulator, for valid elements only, so the
//! padding never reaches memory.
//!
//! Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"):
//! lane `l` has group `g = l / 4` and thread-in-group `t = l % 4`, see [`a_fragment`],
//! [`b_fragment`], [`c_fragment`]. A 32-bit register holds two bf16, the lower `k` in the low
//! half.

use lamina_ir::kernel::Mma;
use melior::dialect::arith::CmpiPredicate;
use melior::dialect::{arith, scf};
use melior::ir::attribute::IntegerAttribute;
use melior::ir::operation::OperationBuilder;
use melior::ir::r#type::IntegerType;
use melior::ir::{Attribute, Block, BlockLike, Identifier, Region, RegionLike, Type, Value};

use super::{bug, Env, Lower, Ty, R};

/// `(row, k)` of A-fragment register `reg` (0..4), half `h` (0..2), for group `g` and
/// thread-in-group `t`: registers 0 and 2 hold row `g`, 1 and 3 row `g + 8`; registers 2 and 3
/// are 8 further along `k`.
pub fn a_fragment(g: usize, t: usize, reg: usize, h: usize) -> (usize, usize) {
    (g + 8 * (reg % 2), 2 * t + h + 8 * (reg / 2))
}

/// `(column, k)` of B-fragment register `reg` (0..2), half `h`: column `g`, register 1 is 8
/// further along `k`.
pub fn b_fragment(g: usize, t: usize, reg: usize, h: usize) -> (usize, usize) {
    (g, 2 * t + h + 8 * reg)
}

/// `(row, column)` of accumulator `e` (0..4): rows `g` then `g + 8`, columns `2t`, `2t + 1`.
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
        let lane = env
            .lane
            .ok_or_else(|| bug(format!("{what}: mma: no lane id")))?;
        let ix = |v: i64| self.const_index(blk, v);
        let add = |a: Value<'c, 'a>, b: Value<'c, 'a>| {
            self.op(blk, "arith.addi", &[a, b], self.index, false)
        };
        let four = ix(4);
        let g = self.op(blk, "arith.divui", &[lane, four], self.index, false);
        let t = self.op(blk, "arith.remui", &[lane, four], self.index, false);
        let (m, _) = self.expr(blk, env, &mma.m)?;
        let (n, _) = self.expr(blk, env, &mma.n)?;
        let one = ix(1);
        let m_last = self.op(blk, "arith.subi", &[m, one], self.index, false);
        let n_last = self.op(blk, "arith.subi", &[n, one], self.index, false);
        let (tm, tn) = (mma.rows / Mma::M, mma.cols / Mma::N);
        let steps = mma.depth.div_ceil(Mma::K);
        // Stores before the tile are visible to every lane's operand loads.
        self.warp_sync(blk);

        let i32t: Type = IntegerType::new(self.ctx, 32).into();
        let struct4 = Type::parse(self.ctx, "!llvm.struct<(f32, f32, f32, f32)>")
            .ok_or_else(|| bug("mma result type".into()))?;
        let attrs: Vec<(Identifier, Attribute)> = [
            ("layoutA", "#nvvm.mma_layout<row>"),
            ("layoutB", "#nvvm.mma_layout<col>"),
            ("multiplicandAPtxType", "#nvvm.mma_type<bf16>"),
            ("multiplicandBPtxType", "#nvvm.mma_type<bf16>"),
            ("shape", "#nvvm.shape<m = 16, n = 8, k = 16>"),
            ("operandSegmentSizes", "array<i32: 4, 2, 4>"),
        ]
        .into_iter()
        .map(|(k, v)| {
            Attribute::parse(self.ctx, v)
                .map(|a| (Identifier::new(self.ctx, k), a))
                .ok_or_else(|| bug(format!("mma attribute {v}")))
        })
        .collect::<R<_>>()?;

        // The depth loop: k0 = 0, 16, ... carrying tm·tn·4 accumulators.
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
            let depth_last = bx(mma.depth as i64 - 1);
            let depth = bx(mma.depth as i64);
            let ragged = !mma.depth.is_multiple_of(Mma::K);
            // operand(idx, kk) for index `idx` (row or column, clamped to `last`) and depth
            // `kk`, both halves packed into one i32.
            let pack = |e: &lamina_ir::kernel::Expr,
                        var: &str,
                        idx: Value<'c, '_>,
                        last: Value<'c, '_>,
                        kk: Value<'c, '_>|
             -> R<Value<'c, '_>> {
                let idx = self.op(&body, "arith.minui", &[idx, last], self.index, false);
                let mut halves = Vec::new();
                for h in 0..2 {
                    let k = badd(kk, bx(h));
                    let kc = if ragged {
                        self.op(&body, "arith.minui", &[k, depth_last], self.index, false)
                    } else {
                        k
                    };
                    let mut env2: Env<'c, '_> = env.clone();
                    env2.vars.insert(var.to_string(), (idx, Ty::Int));
                    env2.vars.insert(mma.k.clone(), (kc, Ty::Int));
                    let (mut x, _) = self.expr(&body, &env2, e)?;
                    if ragged {
                        let inside = self.append(
                            &body,
                            arith::cmpi(self.ctx, CmpiPredicate::Ult, k, depth, self.loc),
                        );
                        let z = self.const_f32(&body, 0.0);
                        x = self.append(&body, arith::select(inside, x, z, self.loc));
                    }
                    let b16 = self.op(&body, "arith.truncf", &[x], Type::bfloat16(self.ctx), false);
                    let i16t: Type = IntegerType::new(self.ctx, 16).into();
                    let bits = self.op(&body, "arith.bitcast", &[b16], i16t, false);
                    halves.push(self.op(&body, "arith.extui", &[bits], i32t, false));
                }
                let sixteen = self.append(
                    &body,
                    arith::constant(self.ctx, IntegerAttribute::new(i32t, 16).into(), self.loc),
                );
                let high = self.op(&body, "arith.shli", &[halves[1], sixteen], i32t, false);
                Ok(self.op(&body, "arith.ori", &[halves[0], high], i32t, false))
            };
            // Lane offsets: g (row/column in a fragment) and 2t (depth).
            let two_t = self.op(&body, "arith.muli", &[t, bx(2)], self.index, false);
            let mut a_regs = Vec::new();
            for am in 0..tm {
                let mut regs = Vec::new();
                for reg in 0..4 {
                    let (r0, k_off) = a_fragment(0, 0, reg, 0);
                    let row = badd(g, bx((am * Mma::M + r0) as i64));
                    let kk = badd(badd(k0, two_t), bx(k_off as i64));
                    regs.push(pack(&mma.a, &mma.i, row, m_last, kk)?);
                }
                a_regs.push(regs);
            }
            let mut b_regs = Vec::new();
            for bn in 0..tn {
                let mut regs = Vec::new();
                for reg in 0..2 {
                    let (c0, k_off) = b_fragment(0, 0, reg, 0);
                    let col = badd(g, bx((bn * Mma::N + c0) as i64));
                    let kk = badd(badd(k0, two_t), bx(k_off as i64));
                    regs.push(pack(&mma.b, &mma.j, col, n_last, kk)?);
                }
                b_regs.push(regs);
            }
            let mut next = Vec::new();
            for (am, a) in a_regs.iter().enumerate() {
                for (bn, b) in b_regs.iter().enumerate() {
                    let c0 = 1 + (am * tn + bn) * 4;
                    let mut operands: Vec<Value> = a.clone();
                    operands.extend(b);
                    for e in 0..4 {
                        operands.push(arg(c0 + e)?);
                    }
                    let op = OperationBuilder::new("nvvm.mma.sync", self.loc)
                        .add_operands(&operands)
                        .add_attributes(&attrs)
                        .add_results(&[struct4])
                        .build()
                        .map_err(|e| bug(format!("{what}: nvvm.mma.sync: {e}")))?;
                    let d = self.append(&body, op);
                    for e in 0..4 {
                        next.push(self.extract(&body, d, e)?);
                    }
                }
            }
            body.append_operation(scf::r#yield(&next, self.loc));
        }
        let region = Region::new();
        region.append_block(body);
        let (lo, hi, step) = (ix(0), ix((steps * Mma::K) as i64), ix(Mma::K as i64));
        let op = OperationBuilder::new("scf.for", self.loc)
            .add_operands(&[lo, hi, step])
            .add_operands(&vec![zero; accs])
            .add_results(&vec![self.f32; accs])
            .add_regions([region])
            .build()
            .map_err(|e| bug(format!("{what}: mma depth loop: {e}")))?;
        let r = blk.append_operation(op);
        let acc: Vec<Value> = (0..accs)
            .map(|i| r.result(i).map(Into::into).map_err(|e| bug(e.to_string())))
            .collect::<R<_>>()?;

        // Epilogue: each lane its own accumulators, valid elements only; lanes differ from
        // here on, so nothing inside is spread over them (and no warp barrier is issued).
        let lanes_apart = Lower {
            in_split: true,
            ..*self
        };
        let two_t = self.op(blk, "arith.muli", &[t, ix(2)], self.index, false);
        for am in 0..tm {
            for bn in 0..tn {
                for e in 0..4 {
                    let (r0, c0) = c_fragment(0, 0, e);
                    let i = add(g, ix((am * Mma::M + r0) as i64));
                    let j = add(two_t, ix((bn * Mma::N + c0) as i64));
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
        // What the epilogue stored is visible to every lane after the tile.
        self.warp_sync(blk);
        Ok(())
    }

    /// Field `e` of an LLVM struct value.
    fn extract<'a>(&self, blk: &'a Block<'c>, s: Value<'c, '_>, e: usize) -> R<Value<'c, 'a>> {
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
        for lane in 0..32 {
            let (g, t) = (lane / 4, lane % 4);
            for reg in 0..4 {
                for h in 0..2 {
                    let (r, k) = a_fragment(g, t, reg, h);
                    a[r][k] += 1;
                }
            }
            for reg in 0..2 {
                for h in 0..2 {
                    let (n, k) = b_fragment(g, t, reg, h);
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
        assert_eq!(a_fragment(1, 1, 0, 1), (1, 3));
        assert_eq!(a_fragment(1, 1, 3, 0), (9, 10));
        assert_eq!(b_fragment(1, 1, 1, 1), (1, 11));
        assert_eq!(c_fragment(1, 1, 2), (9, 2));
    }
}
