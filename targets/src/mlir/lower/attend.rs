//! A block of flash attention ([`Stmt::Attend`]) as one GPU block: FlashAttention-2's loop on
//! `mma.sync` m16n8k16 bf16 tensor cores (sm_80) or warpgroup `wgmma` (sm_90a), the running
//! state in registers.
//!
//! - The block is [`WARPS`] warps; warp `w` owns block rows `16w .. 16w + 16`. Each lane
//!   holds its rows' query fragments (bf16 pairs, loaded once), its part of the output
//!   accumulator (`vw / 8` m16n8 accumulators), and for its two rows (`g`, `g + 8`) the
//!   running max and its share of the running sum.
//! - Per key tile of [`KEY_TILE`] keys, the whole block stages the tile's keys (`[key][e]`)
//!   and values transposed (`[d][key]`) in shared memory as bf16, each element evaluated by
//!   one thread from the statement's expressions (so any layout of the cache works) and
//!   rounded. Rows are padded by 8 bf16 so that a warp's fragment loads hit 32 distinct banks.
//! - The logits `S = Q Kᵀ` (16 × 32 per warp) are 4 accumulators; masked keys (past the
//!   row's `sees`, past `keys`) become `−∞`; the tile's row max is combined over the 4 lanes
//!   that share a row by two `shfl.xor`; the probabilities `exp(s − m)` are packed to bf16
//!   straight from the accumulator registers into the A fragments of `P V` (the m16n8 C
//!   layout of two adjacent key groups is the m16n8k16 A layout), and the values' B
//!   fragments are 32-bit loads from the transposed tile.
//! - After the last tile each lane's partial sums are combined over its quad, and the
//!   epilogue runs per output element on the lane holding it, with `out = acc / l`.
//! - On sm_90a ([`wgmma_shapes`]) the block is one warpgroup and both products are `wgmma`
//!   m64nNk16 ([`Lower::wgmma_rs`]): the A operands stay in registers (the query fragments and
//!   the packed probabilities above: a warpgroup's m64 A fragment is its warps' m16 fragments
//!   stacked), the B operands (the keys, the transposed values) are staged as K-major core
//!   matrices ([`core_pair`]: a warp's stores fill 32 consecutive words) and read through
//!   shared-memory descriptors after `fence.proxy.async`, and the accumulators come back in
//!   the m16n8 C layout per warp, so the softmax in registers is the same code.
//!
//! The host runs the same statement as the loops of `expand::attend_loops` (the same tiles,
//! the same bf16 roundings of the queries, keys, values and probabilities), which is what the
//! tests compare; what the host cannot check here is the fragment bookkeeping, which the
//! layout tests of `mma.rs` and ptxas cover as far as they can without a GPU.

use lamina_ir::kernel::{Attend, Expr, Kernel, Mma, MmaKind, Stmt};
use melior::dialect::arith::{self, CmpfPredicate};
use melior::dialect::scf;
use melior::ir::attribute::StringAttribute;
use melior::ir::operation::OperationBuilder;
use melior::ir::r#type::IntegerType;
use melior::ir::{Attribute, Block, BlockLike, Identifier, Type, Value};

use super::staged::{CORE_LBO, WGMMA_M};
use super::{a_fragment, b_fragment, bug, c_fragment, Env, Lower, Ty, R};

/// Warps of a block; each owns 16 of the block's rows.
pub const WARPS: usize = Attend::BLOCK_ROWS / Mma::M;
/// Threads of a block.
pub const LANES: u32 = (WARPS * 32) as u32;
/// Rows of the block.
pub const ROWS: usize = Attend::BLOCK_ROWS;
/// Keys per tile.
pub const KEY_TILE: usize = Attend::BLOCK_KEY_TILE;
/// Lane offsets of the butterfly over a quad: the 4 lanes holding one accumulator row.
const QUAD: [u32; 2] = [1, 2];
/// Padding of a staged row, in bf16 elements (16 bytes).
const PAD: usize = Attend::BLOCK_PAD;

/// The attention block of `k` when a GPU block runs it with its state in registers: a body of
/// `let`s without reductions then one [`Stmt::Attend`] that is a
/// [register block](Attend::register_block).
pub fn attend_block(k: &Kernel) -> Option<&Attend> {
    let (Stmt::Attend(a), lets) = k.body.split_last()? else {
        return None;
    };
    let pure = lets
        .iter()
        .all(|s| matches!(s, Stmt::Let(_, e) if !e.has_reduce()));
    let plain = [
        &a.m, &a.keys, &a.tiles.0, &a.tiles.1, &a.query, &a.key, &a.value, &a.sees,
    ]
    .into_iter()
    .all(|e| !e.has_reduce());
    (pure && plain && a.register_block()).then_some(&**a)
}

/// Bytes of the staged tile: keys `[KEY_TILE][qk + PAD]` and values `[vw][KEY_TILE + PAD]`,
/// bf16.
pub fn shared_bytes(a: &Attend) -> usize {
    a.block_shared_bytes()
}

/// Row stride of the staged keys, in bf16 elements.
fn key_ld(a: &Attend) -> usize {
    a.qk + PAD
}

/// Row stride of the staged values (one row per value column), in bf16 elements.
const VALUE_LD: usize = KEY_TILE + PAD;

/// The 32-bit word of the staged keys holding elements `2·pair` and `2·pair + 1` of the tile's
/// key `key`.
pub fn key_word(a: &Attend, key: usize, pair: usize) -> usize {
    key * key_ld(a) / 2 + pair
}

/// The word of the staged (transposed) values holding the tile's keys `2·pair` and
/// `2·pair + 1` of value column `d`.
pub fn value_word(d: usize, pair: usize) -> usize {
    d * VALUE_LD / 2 + pair
}

/// The word of the staged keys that B-fragment register `reg` of lane `(g, t)` reads for key
/// group `nt` (keys `8·nt ..`) in the 16-deep step starting at element `e0`.
pub fn key_fragment_word(
    a: &Attend,
    (g, t): (usize, usize),
    nt: usize,
    e0: usize,
    reg: usize,
) -> usize {
    let (c, k) = b_fragment(MmaKind::Bf16, g, t, reg, 0);
    key_word(a, nt * 8 + c, (e0 + k) / 2)
}

/// The word of the staged values that B-fragment register `reg` of lane `(g, t)` reads for
/// value column group `dn` (columns `8·dn ..`) in key step `kk` (keys `16·kk ..`).
pub fn value_fragment_word((g, t): (usize, usize), dn: usize, kk: usize, reg: usize) -> usize {
    let (c, k) = b_fragment(MmaKind::Bf16, g, t, reg, 0);
    value_word(dn * 8 + c, (kk * 16 + k) / 2)
}

/// The logit accumulators (key group, element) whose probabilities A-fragment register `reg`
/// of key step `kk` packs, low half first: the m16n8 C layout of key groups `2·kk` and
/// `2·kk + 1` read as the m16n8k16 A layout.
pub fn probability_register(kk: usize, reg: usize) -> [(usize, usize); 2] {
    let (row, k) = a_fragment(MmaKind::Bf16, 0, 0, reg, 0);
    let (group, e) = (2 * kk + k / 8, 2 * (row / 8));
    [(group, e), (group, e + 1)]
}

/// A lane's rows (clamped), twice its thread in group, its first word in the staged keys, and
/// the staged keys (32-bit pairs).
type LaneKeys<'c, 'b> = (
    [Value<'c, 'b>; 2],
    Value<'c, 'b>,
    Value<'c, 'b>,
    Value<'c, 'b>,
);

/// A step of the logits: its first element along the depth, the query fragments if already
/// loaded, and the staged keys' shared address when the step is a `wgmma`.
type LogitsStep<'c, 'q, 'b> = (
    Value<'c, 'b>,
    Option<&'q [Value<'c, 'b>]>,
    Option<Value<'c, 'b>>,
);

/// `(key, element pair)` of the key pair thread `tid` stages in round `it`: consecutive
/// threads take consecutive pairs of one key row (coalesced loads).
pub fn key_pair(qk: usize, tid: usize, it: usize) -> (usize, usize) {
    let p = it * LANES as usize + tid;
    (p / (qk / 2), p % (qk / 2))
}

/// `(value column, key pair)` of the value pair thread `tid` stages in round `it`:
/// consecutive threads take consecutive columns of one key pair.
pub fn value_pair(vw: usize, tid: usize, it: usize) -> (usize, usize) {
    let p = it * LANES as usize + tid;
    (p % vw, p / vw)
}

/// Whether the block's products can run as sm_90a `wgmma` ([`Lower::wgmma_rs`]): the block's
/// rows are one m64 warpgroup tile, the keys 16-deep steps, the values whole 8-column groups
/// of at most 256 (the widest `wgmma`).
pub fn wgmma_shapes(a: &Attend) -> bool {
    ROWS == WGMMA_M && a.qk.is_multiple_of(16) && a.vw.is_multiple_of(8) && a.vw <= 256
}

/// `(row, pair)` staged at word `p` of an operand of `depth`-element rows laid out as `wgmma`
/// reads it (sm_90a): K-major core matrices of 8 rows × 8 elements, each 128 contiguous bytes
/// (a row's 16 bytes after another's), [`CORE_LBO`] apart along the depth and [`core_sbo`]
/// apart from one 8-row group to the next. Word `p` is thread `p`'s (mod the block) in a
/// staging round, so a warp's 32 stores fill 32 consecutive words: distinct banks.
pub fn core_pair(depth: usize, p: usize) -> (usize, usize) {
    let (core, w) = (p / 32, p % 32);
    let cores = depth / 8;
    ((core / cores) * 8 + w / 4, (core % cores) * 4 + w % 4)
}

/// Bytes from one 8-row group of core matrices to the next, for `depth`-element rows.
pub fn core_sbo(depth: usize) -> usize {
    depth / 8 * CORE_LBO
}

/// Rounds of [`key_pair`] and [`value_pair`] for a tile (whole for a register block).
pub fn stage_rounds(a: &Attend) -> (usize, usize) {
    let lanes = LANES as usize;
    (KEY_TILE * a.qk / 2 / lanes, KEY_TILE / 2 * a.vw / lanes)
}

impl<'c> Lower<'c> {
    /// Lowers `a` as a block of [`LANES`] threads (`env.lane` the thread, `env.smem` the
    /// block's [`shared_bytes`]).
    pub(super) fn attend_block<'a>(
        &self,
        blk: &'a Block<'c>,
        env: &Env<'c, 'a>,
        a: &Attend,
        what: &str,
        line: &mut usize,
    ) -> R<()> {
        let (Some(smem), Some(tid)) = (env.smem, env.lane) else {
            return Err(bug(format!(
                "{what}: an attention block needs shared memory and a thread id"
            )));
        };
        if !self.gpu || self.lanes != LANES || self.in_split || a.kind != MmaKind::Bf16 {
            return Err(bug(format!(
                "{what}: an attention block needs a bf16 GPU program of {LANES} threads"
            )));
        }
        let ix = |v: usize| self.const_index(blk, v as i64);
        let int = |name: &str, x: Value<'c, 'a>, y: Value<'c, 'a>| {
            self.op(blk, name, &[x, y], self.index, false)
        };
        let i32t: Type = IntegerType::new(self.ctx, 32).into();
        let (qk, vw, fk) = (a.qk, a.vw, KEY_TILE);
        let (kld, vld) = (key_ld(a), VALUE_LD);
        // sm_90a: the products as warpgroup MMAs reading the staged tiles through descriptors
        // (the keys' at the start of the shared memory, the values' after them).
        let wg = self.wgmma && wgmma_shapes(a);
        let key_addr = if wg {
            Some(self.shared_address(blk, smem, what)?)
        } else {
            None
        };
        let warp = int("arith.divui", tid, ix(32));
        let lane = int("arith.remui", tid, ix(32));
        let g = int("arith.divui", lane, ix(4));
        let tq = int("arith.remui", lane, ix(4));
        let (m, _) = self.expr(blk, env, &a.m)?;
        let (nk, _) = self.expr(blk, env, &a.keys)?;
        let (first, _) = self.expr(blk, env, &a.tiles.0)?;
        let (end, _) = self.expr(blk, env, &a.tiles.1)?;
        // Signed, as the host compares: clamps that hold for empty blocks too.
        let last_row = int("arith.maxsi", int("arith.subi", m, ix(1)), ix(0));
        let last_key = int("arith.maxsi", int("arith.subi", nk, ix(1)), ix(0));
        // The lane's rows (g and g + 8 of its warp's 16), clamped to the valid rows, and
        // how many keys each sees.
        let row_lo = int("arith.addi", int("arith.muli", warp, ix(Mma::M)), g);
        let row_hi = int("arith.addi", row_lo, ix(8));
        let rows = [row_lo, row_hi].map(|r| int("arith.minsi", r, last_row));
        let mut sees = Vec::new();
        for r in rows {
            let s = self.eval_at(blk, env, &a.sees, &[(&a.t, r)])?;
            sees.push(int("arith.minsi", int("arith.maxsi", s, ix(0)), nk));
        }
        // The query fragments of 16-deep step ks: 4 registers of bf16 pairs. Loaded once when
        // they fit beside the accumulators, else again for every key tile.
        let two_t = int("arith.muli", tq, ix(2));
        let resident = a.resident_queries();
        let q: Vec<Vec<Value>> = if resident {
            (0..qk / 16)
                .map(|ks| self.query_fragments(blk, env, a, (rows, two_t), ix(ks * 16)))
                .collect::<R<_>>()?
        } else {
            Vec::new()
        };
        // The staged keys and values, as 32-bit pairs.
        let k_view = self.shared_view(blk, smem, ix(0), i32t, fk * kld / 2, 0)?;
        let v_view = self.shared_view(blk, smem, ix(0), i32t, vw * vld / 2, fk * kld * 2)?;
        // The tile loop carries the output accumulators (vw/8 × 4), then per row the running
        // max and the lane's share of the running sum.
        let n_acc = vw / 8 * 4;
        let zero = self.const_f32(blk, 0.0);
        let ninf = self.const_f32(blk, f64::NEG_INFINITY);
        let mut inits = vec![zero; n_acc];
        inits.extend([ninf, ninf, zero, zero]);
        let tys = vec![self.f32; inits.len()];
        let mut args = vec![(self.index, self.loc)];
        args.extend(tys.iter().map(|&t| (t, self.loc)));
        let body = Block::new(&args);
        {
            let arg = |i: usize| -> R<Value> {
                body.argument(i)
                    .map(Into::into)
                    .map_err(|e| bug(e.to_string()))
            };
            let bx = |v: usize| self.const_index(&body, v as i64);
            let bint = |name: &str, x: Value<'c, '_>, y: Value<'c, '_>| {
                self.op(&body, name, &[x, y], self.index, false)
            };
            let f = self.f32;
            let fop = |name: &str, x: Value<'c, '_>, y: Value<'c, '_>| {
                self.op(&body, name, &[x, y], f, false)
            };
            let jt = arg(0)?;
            let mut acc: Vec<Value> = (0..n_acc).map(|i| arg(1 + i)).collect::<R<_>>()?;
            let m_old = [arg(1 + n_acc)?, arg(2 + n_acc)?];
            let l_old = [arg(3 + n_acc)?, arg(4 + n_acc)?];
            let j0 = bint("arith.muli", jt, bx(fk));
            // Every warp is done with the previous tile.
            self.block_barrier(&body)?;
            // Pairs tid, tid + LANES, ... of a tile (as `key_pair` / `value_pair` number them),
            // whole rounds in a loop so that the staging loads do not all wait in registers at
            // once. A register block's tiles are whole rounds: 16·qk key pairs (qk a multiple
            // of 16) and 16·vw value pairs (vw a multiple of 8).
            let staged = |count: usize, f: &dyn Fn(&Block<'c>, Value<'c, '_>) -> R<()>| -> R<()> {
                let lanes = LANES as usize;
                if !count.is_multiple_of(lanes) {
                    return Err(bug(format!(
                        "{what}: {count} pairs per tile, not whole rounds of {lanes}"
                    )));
                }
                let round = Block::new(&[(self.index, self.loc)]);
                let it: Value = round.argument(0).map_err(|e| bug(e.to_string()))?.into();
                let lanes_ix = self.const_index(&round, lanes as i64);
                let base = self.op(&round, "arith.muli", &[it, lanes_ix], self.index, false);
                let p = self.op(&round, "arith.addi", &[base, tid], self.index, false);
                f(&round, p)?;
                round.append_operation(scf::r#yield(&[], self.loc));
                self.scf_for(
                    &body,
                    (bx(0), bx(count / lanes), bx(1)),
                    &[],
                    &[],
                    round,
                    what,
                )?;
                Ok(())
            };
            // Keys: `[key][e]`, pairs along e (for `wgmma`: core matrices, [`core_pair`]).
            {
                staged(fk * qk / 2, &|b, p| {
                    let bx = |v: usize| self.const_index(b, v as i64);
                    let int = |name: &str, x: Value<'c, '_>, y: Value<'c, '_>| {
                        self.op(b, name, &[x, y], self.index, false)
                    };
                    let (key, pair, at) = if wg {
                        let (key, pair) = self.core_pair_at(b, p, qk);
                        (key, pair, p)
                    } else {
                        let key = int("arith.divui", p, bx(qk / 2));
                        let pair = int("arith.remui", p, bx(qk / 2));
                        let at = int("arith.muli", key, bx(key_word(a, 1, 0)));
                        (key, pair, int("arith.addi", at, pair))
                    };
                    let j = int("arith.minsi", int("arith.addi", j0, key), last_key);
                    let e = int("arith.muli", pair, bx(2));
                    let e1 = int("arith.addi", e, bx(1));
                    let lo = self.eval_at(b, env, &a.key, &[(&a.j, j), (&a.e, e)])?;
                    let hi = self.eval_at(b, env, &a.key, &[(&a.j, j), (&a.e, e1)])?;
                    let x = self.pack_bf16(b, lo, hi);
                    let st = OperationBuilder::new("memref.store", self.loc)
                        .add_operands(&[x, k_view, at])
                        .build()
                        .map_err(|e| bug(format!("{what}: shared store: {e}")))?;
                    b.append_operation(st);
                    Ok(())
                })?;
            }
            // Values transposed: `[d][key]`, pairs along the keys (likewise).
            {
                staged(fk / 2 * vw, &|b, p| {
                    let bx = |v: usize| self.const_index(b, v as i64);
                    let int = |name: &str, x: Value<'c, '_>, y: Value<'c, '_>| {
                        self.op(b, name, &[x, y], self.index, false)
                    };
                    let (d, pair, at) = if wg {
                        let (d, pair) = self.core_pair_at(b, p, fk);
                        (d, pair, p)
                    } else {
                        let d = int("arith.remui", p, bx(vw));
                        let pair = int("arith.divui", p, bx(vw));
                        let at = int("arith.muli", d, bx(value_word(1, 0)));
                        (d, pair, int("arith.addi", at, pair))
                    };
                    let j = int("arith.addi", j0, int("arith.muli", pair, bx(2)));
                    let ja = int("arith.minsi", j, last_key);
                    let jb = int("arith.minsi", int("arith.addi", j, bx(1)), last_key);
                    let lo = self.eval_at(b, env, &a.value, &[(&a.j, ja), (&a.d, d)])?;
                    let hi = self.eval_at(b, env, &a.value, &[(&a.j, jb), (&a.d, d)])?;
                    let x = self.pack_bf16(b, lo, hi);
                    let st = OperationBuilder::new("memref.store", self.loc)
                        .add_operands(&[x, v_view, at])
                        .build()
                        .map_err(|e| bug(format!("{what}: shared store: {e}")))?;
                    b.append_operation(st);
                    Ok(())
                })?;
            }
            // The tile is staged (and visible to the tensor cores' reads).
            if wg {
                self.fence_proxy_async(&body)?;
            }
            self.block_barrier(&body)?;
            let load = |view: Value<'c, '_>, at: Value<'c, '_>| -> R<Value> {
                let op = OperationBuilder::new("memref.load", self.loc)
                    .add_operands(&[view, at])
                    .add_results(&[i32t])
                    .build()
                    .map_err(|e| bug(format!("{what}: shared load: {e}")))?;
                Ok(self.append(&body, op))
            };
            let attrs = self.mma_attrs(MmaKind::Bf16)?;
            // S = Q Kᵀ: key group nt (8 keys) per accumulator.
            // The lane's words: linear in its group and thread (`key_fragment_word`).
            let key_base = bint(
                "arith.addi",
                bint("arith.muli", g, bx(key_word(a, 1, 0))),
                tq,
            );
            let lane = (rows, two_t, key_base, k_view);
            let zero = self.const_f32(&body, 0.0);
            let mut flat = vec![zero; fk / 8 * 4];
            if let (Some(addr), true) = (key_addr, resident) {
                // One chain of warpgroup MMAs over the whole depth.
                let steps: Vec<_> = q
                    .iter()
                    .enumerate()
                    .map(|(ks, qa)| {
                        let at = self.const_i64(&body, (ks * 2 * CORE_LBO) as i64);
                        let at = self.op(&body, "arith.addi", &[addr, at], self.i64, false);
                        (
                            qa.as_slice(),
                            self.wgmma_descriptor(&body, at, core_sbo(qk)),
                        )
                    })
                    .collect();
                flat = self.wgmma_rs(&body, MmaKind::Bf16, fk, &flat, &steps, what)?;
            } else if resident {
                for (ks, qa) in q.iter().enumerate() {
                    let e0 = bx(ks * 16);
                    let step = (e0, Some(qa.as_slice()), None);
                    flat = self.logits_step(&body, env, a, lane, step, &flat, what)?;
                }
            } else {
                // One 16-deep step per iteration: its query fragments are loaded just
                // before their products, not all at once.
                let mut step_args = vec![(self.index, self.loc)];
                step_args.extend(flat.iter().map(|_| (f, self.loc)));
                let step = Block::new(&step_args);
                let e0: Value = step.argument(0).map_err(|e| bug(e.to_string()))?.into();
                let carried: Vec<Value> = (0..flat.len())
                    .map(|i| {
                        step.argument(1 + i)
                            .map(Into::into)
                            .map_err(|e| bug(e.to_string()))
                    })
                    .collect::<R<_>>()?;
                let at = (e0, None, key_addr);
                let next = self.logits_step(&step, env, a, lane, at, &carried, what)?;
                step.append_operation(scf::r#yield(&next, self.loc));
                let tys = vec![f; flat.len()];
                flat = self.scf_for(&body, (bx(0), bx(qk), bx(16)), &flat, &tys, step, what)?;
            }
            let mut s: Vec<Vec<Value>> = flat.chunks(4).map(<[Value]>::to_vec).collect();
            // Scaled and masked logits: key j0 + column, visible below the row's sees.
            let scale = self.const_f32(&body, a.scale);
            let ninf = self.const_f32(&body, f64::NEG_INFINITY);
            let two_t = bint("arith.muli", tq, bx(2));
            for (nt, c) in s.iter_mut().enumerate() {
                for (e, x) in c.iter_mut().enumerate() {
                    let (r, col) = c_fragment(0, 0, e);
                    let key = bint(
                        "arith.addi",
                        bint("arith.addi", j0, two_t),
                        bx(nt * 8 + col),
                    );
                    let seen = self.append(
                        &body,
                        arith::cmpi(
                            self.ctx,
                            arith::CmpiPredicate::Slt,
                            key,
                            sees[r / 8],
                            self.loc,
                        ),
                    );
                    let scaled = fop("arith.mulf", *x, scale);
                    *x = self.append(&body, arith::select(seen, scaled, ninf, self.loc));
                }
            }
            // Per row (h: 0 for g, 1 for g + 8): the tile's max over the quad, the new max,
            // the correction, the probabilities and the lane's share of the sum.
            let mut m_new = Vec::new();
            let mut l_new = Vec::new();
            let mut corr = Vec::new();
            for h in 0..2 {
                let mut mx = m_old[h];
                for c in &s {
                    for e in [2 * h, 2 * h + 1] {
                        mx = fop("arith.maximumf", mx, c[e]);
                    }
                }
                let mx = self.shuffle_combine(&body, mx, "arith.maximumf", 32, &QUAD)?;
                // A row that has seen no key yet keeps −∞; its exponents are taken from 0.
                let none = self.append(
                    &body,
                    arith::cmpf(self.ctx, CmpfPredicate::Oeq, mx, ninf, self.loc),
                );
                let zero = self.const_f32(&body, 0.0);
                let base = self.append(&body, arith::select(none, zero, mx, self.loc));
                let cr = self.gpu_math(&body, "math.exp", fop("arith.subf", m_old[h], base));
                let mut sum = fop("arith.mulf", l_old[h], cr);
                for c in s.iter_mut() {
                    for e in [2 * h, 2 * h + 1] {
                        c[e] = self.gpu_math(&body, "math.exp", fop("arith.subf", c[e], base));
                        sum = fop("arith.addf", sum, c[e]);
                    }
                }
                m_new.push(mx);
                l_new.push(sum);
                corr.push(cr);
            }
            for (i, x) in acc.iter_mut().enumerate() {
                *x = fop("arith.mulf", *x, corr[(i % 4) / 2]);
            }
            // P as A fragments: key step kk is key groups 2kk and 2kk + 1.
            let p: Vec<Vec<Value>> = (0..fk / 16)
                .map(|kk| {
                    (0..4)
                        .map(|reg| {
                            let [(g0, e0), (g1, e1)] = probability_register(kk, reg);
                            self.pack_bf16(&body, s[g0][e0], s[g1][e1])
                        })
                        .collect()
                })
                .collect();
            // acc += P V: value column group dn per accumulator; on sm_90a one chain of
            // warpgroup MMAs over the tile's keys, the values' descriptors after the keys.
            if let Some(addr) = key_addr {
                let steps: Vec<_> = p
                    .iter()
                    .enumerate()
                    .map(|(kk, pa)| {
                        let off = fk * kld * 2 + kk * 2 * CORE_LBO;
                        let at = self.const_i64(&body, off as i64);
                        let at = self.op(&body, "arith.addi", &[addr, at], self.i64, false);
                        (
                            pa.as_slice(),
                            self.wgmma_descriptor(&body, at, core_sbo(fk)),
                        )
                    })
                    .collect();
                acc = self.wgmma_rs(&body, MmaKind::Bf16, vw, &acc, &steps, what)?;
            }
            let value_base = bint(
                "arith.addi",
                bint("arith.muli", g, bx(value_word(1, 0))),
                tq,
            );
            for dn in (0..vw / 8).filter(|_| !wg) {
                let mut c: Vec<Value> = acc[dn * 4..dn * 4 + 4].to_vec();
                for (kk, pa) in p.iter().enumerate() {
                    let mut b = Vec::new();
                    for reg in 0..2 {
                        let off = value_fragment_word((0, 0), dn, kk, reg);
                        b.push(load(v_view, bint("arith.addi", value_base, bx(off)))?);
                    }
                    c = self.mma_sync(&body, &attrs, pa, &b, &c, what)?;
                }
                acc.splice(dn * 4..dn * 4 + 4, c);
            }
            let mut ys = acc;
            ys.extend(m_new);
            ys.extend(l_new);
            body.append_operation(scf::r#yield(&ys, self.loc));
        }
        let out = self.scf_for(blk, (first, end, ix(1)), &inits, &tys, body, what)?;
        // The rows' sums over their quads; the normalised outputs through the epilogue.
        let f = self.f32;
        let mut l = Vec::new();
        for h in 0..2 {
            l.push(self.shuffle_combine(blk, out[n_acc + 2 + h], "arith.addf", 32, &QUAD)?);
        }
        let values: Vec<Value> = (0..n_acc)
            .map(|i| self.op(blk, "arith.divf", &[out[i], l[(i % 4) / 2]], f, false))
            .collect();
        let tile = Mma {
            kind: MmaKind::Bf16,
            rows: ROWS,
            cols: vw,
            m: a.m.clone(),
            n: lamina_ir::kernel::build::i(vw),
            depth: 1,
            i: a.t.clone(),
            j: a.d.clone(),
            k: String::new(),
            acc: a.out.clone(),
            a: Expr::F(0.0),
            b: Expr::F(0.0),
            epilogue: a.epilogue.clone(),
        };
        let two_t = int("arith.muli", tq, ix(2));
        self.mma_epilogue(
            blk,
            env,
            &tile,
            &values,
            (row_lo, two_t),
            (1, vw / 8),
            (m, ix(vw)),
            what,
            line,
        )
    }

    /// The logits of one 16-deep step starting at element `e0`: the lane's 4 accumulators of
    /// each 8-key group (`s`, flat) plus the products of the step's query fragments (`qa`, or
    /// evaluated here) and the staged keys' B fragments, or with `key_addr` (the staged keys'
    /// shared address, sm_90a) one warpgroup MMA reading the keys through a descriptor.
    #[allow(clippy::too_many_arguments)]
    fn logits_step<'b>(
        &self,
        b: &'b Block<'c>,
        env: &Env<'c, 'b>,
        a: &Attend,
        (rows, two_t, key_base, k_view): LaneKeys<'c, 'b>,
        (e0, qa, key_addr): LogitsStep<'c, '_, 'b>,
        s: &[Value<'c, 'b>],
        what: &str,
    ) -> R<Vec<Value<'c, 'b>>> {
        let i32t: Type = IntegerType::new(self.ctx, 32).into();
        let loaded;
        let qa = match qa {
            Some(q) => q,
            None => {
                loaded = self.query_fragments(b, env, a, (rows, two_t), e0)?;
                &loaded
            }
        };
        if let Some(addr) = key_addr {
            // e0 elements along the depth: e0 / 8 core matrices of 128 bytes.
            let e0 = self.op(b, "arith.index_cast", &[e0], self.i64, false);
            let bytes = self.const_i64(b, (CORE_LBO / 8) as i64);
            let off = self.op(b, "arith.muli", &[e0, bytes], self.i64, false);
            let at = self.op(b, "arith.addi", &[addr, off], self.i64, false);
            let desc = self.wgmma_descriptor(b, at, core_sbo(a.qk));
            return self.wgmma_rs(b, MmaKind::Bf16, KEY_TILE, s, &[(qa, desc)], what);
        }
        let attrs = self.mma_attrs(MmaKind::Bf16)?;
        let two = self.const_index(b, 2);
        let step_words = self.op(b, "arith.divui", &[e0, two], self.index, false);
        let base = self.op(b, "arith.addi", &[key_base, step_words], self.index, false);
        let mut out = Vec::new();
        for (nt, c) in s.chunks(4).enumerate() {
            let mut regs = Vec::new();
            for reg in 0..2 {
                let off = key_fragment_word(a, (0, 0), nt, 0, reg);
                let at = self.const_index(b, off as i64);
                let at = self.op(b, "arith.addi", &[base, at], self.index, false);
                let op = OperationBuilder::new("memref.load", self.loc)
                    .add_operands(&[k_view, at])
                    .add_results(&[i32t])
                    .build()
                    .map_err(|e| bug(format!("{what}: shared load: {e}")))?;
                regs.push(self.append(b, op));
            }
            out.extend(self.mma_sync(b, &attrs, qa, &regs, c, what)?);
        }
        Ok(out)
    }

    /// [`core_pair`] of word `p` of a `depth`-deep operand, as index values.
    pub(super) fn core_pair_at<'b>(
        &self,
        b: &'b Block<'c>,
        p: Value<'c, '_>,
        depth: usize,
    ) -> (Value<'c, 'b>, Value<'c, 'b>) {
        let bx = |v: usize| self.const_index(b, v as i64);
        let int = |name: &str, x: Value<'c, '_>, y: Value<'c, '_>| {
            self.op(b, name, &[x, y], self.index, false)
        };
        let (core, w) = (int("arith.divui", p, bx(32)), int("arith.remui", p, bx(32)));
        let cores = bx(depth / 8);
        let group = int("arith.muli", int("arith.divui", core, cores), bx(8));
        let row = int("arith.addi", group, int("arith.divui", w, bx(4)));
        let first = int("arith.muli", int("arith.remui", core, cores), bx(4));
        (row, int("arith.addi", first, int("arith.remui", w, bx(4))))
    }

    /// A warpgroup's `acc + Σ_s A_s B_s` by `wgmma.mma_async` m64n`n` (f32 accumulators), one
    /// step per `(a, b)` of `steps`: A from registers (the lane's 4 registers of the m16n8
    /// A fragment of its warp's 16 rows: a warpgroup's m64 A fragment is its 4 warps'
    /// stacked), B (`n` × the step's depth, K-major) through the shared-memory descriptor
    /// `b`. `kind`: [`MmaKind::Bf16`], k16 steps of bf16 pairs; the TF32 kinds, k8 steps of
    /// one TF32 a register (B read as TF32: the low 13 mantissa bits ignored).
    /// `acc`: the lane's `n / 2` accumulators, in the order of `n / 8` m16n8 C fragments
    /// (the m64nN accumulator layout per warp). One inline-asm statement: `wgmma.fence`, the
    /// chained MMAs, commit and wait, so the outputs are complete when it returns.
    pub(super) fn wgmma_rs<'b>(
        &self,
        body: &'b Block<'c>,
        kind: MmaKind,
        n: usize,
        acc: &[Value<'c, '_>],
        steps: &[(&[Value<'c, '_>], Value<'c, '_>)],
        what: &str,
    ) -> R<Vec<Value<'c, 'b>>> {
        let na = acc.len();
        // Shape, operand types, and the immediates after the scale-d predicate (scale A and B,
        // and for 16-bit types B's transpose: none, B is K-major).
        let (shape, types, imms) = match kind {
            MmaKind::Bf16 => (format!("m64n{n}k16"), "f32.bf16.bf16", "1, 1, 0"),
            MmaKind::Tf32x3 | MmaKind::Tf32 | MmaKind::F32 => {
                (format!("m64n{n}k8"), "f32.tf32.tf32", "1, 1")
            }
        };
        if na != n / 2 || steps.iter().any(|(a, _)| a.len() != 4) {
            return Err(bug(format!(
                "{what}: wgmma {shape} takes {} accumulators and 4 A registers a step",
                n / 2
            )));
        }
        let (first_a, first_desc) = (2 * na, 2 * na + 4 * steps.len());
        let one = first_desc + steps.len();
        let d: Vec<String> = (0..na).map(|i| format!("${i}")).collect();
        let mut asm =
            format!("{{\n.reg .pred p;\nsetp.ne.b32 p, ${one}, 0;\nwgmma.fence.sync.aligned;\n");
        for s in 0..steps.len() {
            let r: Vec<String> = (0..4)
                .map(|i| format!("${}", first_a + 4 * s + i))
                .collect();
            asm += &format!(
                "wgmma.mma_async.sync.aligned.{shape}.{types} {{{}}}, {{{}}}, ${}, p, {imms};\n",
                d.join(", "),
                r.join(", "),
                first_desc + s
            );
        }
        asm += "wgmma.commit_group.sync.aligned;\nwgmma.wait_group.sync.aligned 0;\n}";
        let mut constraints: Vec<String> = vec!["=f".into(); na];
        constraints.extend((0..na).map(|i| i.to_string()));
        constraints.extend(vec!["r".to_string(); 4 * steps.len()]);
        constraints.extend(vec!["l".to_string(); steps.len()]);
        constraints.extend(["r".to_string(), "~{memory}".to_string()]);
        let mut operands: Vec<Value> = acc.to_vec();
        operands.extend(steps.iter().flat_map(|(a, _)| a.iter().copied()));
        operands.extend(steps.iter().map(|(_, b)| *b));
        operands.push(self.const_i32(body, 1));
        let fields = vec!["f32"; na].join(", ");
        let result = melior::ir::Type::parse(self.ctx, &format!("!llvm.struct<({fields})>"))
            .ok_or_else(|| bug("wgmma result type".into()))?;
        let attr = |k: &str, v: Attribute<'c>| (Identifier::new(self.ctx, k), v);
        let op = OperationBuilder::new("llvm.inline_asm", self.loc)
            .add_operands(&operands)
            .add_attributes(&[
                attr("asm_string", StringAttribute::new(self.ctx, &asm).into()),
                attr(
                    "constraints",
                    StringAttribute::new(self.ctx, &constraints.join(",")).into(),
                ),
                attr("has_side_effects", Attribute::unit(self.ctx)),
            ])
            .add_results(&[result])
            .build()
            .map_err(|e| bug(format!("{what}: wgmma inline asm: {e}")))?;
        let d = self.append(body, op);
        (0..na).map(|e| self.extract(body, d, e)).collect()
    }

    /// The A fragments of the queries' 16-deep step starting at element `e0` for the lane's
    /// rows `rows` (`two_t`: twice its thread in group): 4 registers of bf16 pairs.
    fn query_fragments<'b>(
        &self,
        b: &'b Block<'c>,
        env: &Env<'c, 'b>,
        a: &Attend,
        (rows, two_t): ([Value<'c, 'b>; 2], Value<'c, 'b>),
        e0: Value<'c, 'b>,
    ) -> R<Vec<Value<'c, 'b>>> {
        let mut regs = Vec::new();
        for reg in 0..4 {
            let (r0, k0) = a_fragment(MmaKind::Bf16, 0, 0, reg, 0);
            let row = rows[r0 / 8];
            let at = self.const_index(b, k0 as i64);
            let at = self.op(b, "arith.addi", &[e0, at], self.index, false);
            let e = self.op(b, "arith.addi", &[two_t, at], self.index, false);
            let one = self.const_index(b, 1);
            let e1 = self.op(b, "arith.addi", &[e, one], self.index, false);
            let lo = self.eval_at(b, env, &a.query, &[(&a.t, row), (&a.e, e)])?;
            let hi = self.eval_at(b, env, &a.query, &[(&a.t, row), (&a.e, e1)])?;
            regs.push(self.pack_bf16(b, lo, hi));
        }
        Ok(regs)
    }

    /// `e` evaluated by this thread alone (no reduction dealt over lanes) with `binds` bound
    /// as ints.
    fn eval_at<'b>(
        &self,
        b: &'b Block<'c>,
        env: &Env<'c, 'b>,
        e: &Expr,
        binds: &[(&str, Value<'c, 'b>)],
    ) -> R<Value<'c, 'b>> {
        let alone = Lower {
            in_split: true,
            ..*self
        };
        let mut env2 = env.clone();
        for (n, x) in binds {
            env2.vars.insert(n.to_string(), (*x, Ty::Int));
        }
        Ok(alone.expr(b, &env2, e)?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The staging rounds cover every key pair and value pair of a tile exactly once.
    #[test]
    fn staging_covers_each_pair_once() {
        for (qk, vw) in [
            (16, 8),
            (64, 64),
            (128, 128),
            (192, 128),
            (256, 256),
            (48, 24),
        ] {
            let a = attend(qk, vw);
            let (kr, vr) = stage_rounds(&a);
            let mut keys = vec![0; KEY_TILE * qk / 2];
            let mut values = vec![0; KEY_TILE / 2 * vw];
            for it in 0..kr {
                for tid in 0..LANES as usize {
                    let (key, pair) = key_pair(qk, tid, it);
                    if key < KEY_TILE {
                        keys[key * qk / 2 + pair] += 1;
                    }
                }
            }
            for it in 0..vr {
                for tid in 0..LANES as usize {
                    let (d, pair) = value_pair(vw, tid, it);
                    if pair < KEY_TILE / 2 {
                        values[pair * vw + d] += 1;
                    }
                }
            }
            assert!(keys.iter().all(|&n| n == 1), "keys {qk}");
            assert!(values.iter().all(|&n| n == 1), "values {vw}");
        }
    }

    /// The words a lane's fragment loads read are its word for key group 0 (value group 0) of
    /// step 0 plus a constant: what the lowering computes once per lane and adds to.
    #[test]
    fn fragment_words_are_linear_in_the_lane() {
        let a = attend(192, 128);
        for (g, t) in (0..8).flat_map(|g| (0..4).map(move |t| (g, t))) {
            for nt in 0..KEY_TILE / 8 {
                for reg in 0..2 {
                    for e0 in [0, 16, 176] {
                        assert_eq!(
                            key_fragment_word(&a, (g, t), nt, e0, reg),
                            key_fragment_word(&a, (0, 0), nt, 0, reg)
                                + g * key_word(&a, 1, 0)
                                + t
                                + e0 / 2
                        );
                    }
                    for (dn, kk) in [(0, 0), (3, 1), (15, 1)] {
                        assert_eq!(
                            value_fragment_word((g, t), dn, kk, reg),
                            value_fragment_word((0, 0), dn, kk, reg) + g * value_word(1, 0) + t
                        );
                    }
                }
            }
        }
    }

    /// The block's algorithm, lane by lane as the lowering emits it (the same staging rounds,
    /// shared-memory words, fragment registers, masks, quad combines and probability packing),
    /// with `mma.sync` m16n8k16 emulated from the PTX fragment layouts of `mma.rs`, against
    /// softmax attention in f64 on the same bf16-rounded queries, keys and values: ragged
    /// rows, ragged key tiles, causal and chunked-prefill visibility, rows that see past the
    /// keys, a tile range not starting at 0, a row that sees nothing (NaN, as the host's loops
    /// give), the head widths of the examples and the real models.
    #[test]
    fn block_algorithm_matches_softmax_attention() {
        // Row t is position first_pos + t: it sees the keys up to its own.
        let causal = |m: usize, first_pos: usize| -> Vec<usize> {
            (0..m).map(|t| first_pos + t + 1).collect()
        };
        let mut blind = causal(20, 0);
        blind[3] = 0;
        for (qk, vw, nk, sees, tiles) in [
            (16, 16, 64usize, causal(64, 0), None),
            (32, 32, 37, causal(37, 0), None),
            (32, 32, 150, causal(64, 86), None),
            (128, 128, 83, causal(50, 33), None),
            (256, 256, 96, causal(64, 32), None),
            (192, 128, 17, causal(17, 0), None),
            (32, 32, 70, vec![75; 64], None),
            (64, 64, 96, causal(40, 56), Some((1, 3))),
            (16, 24, 20, blind, None),
        ] {
            let m = sees.len();
            let tiles = tiles.unwrap_or((0, nk.div_ceil(KEY_TILE)));
            let a = attend(qk, vw);
            let mut seed = (qk * 7 + vw * 13 + m * 31 + nk) as u64;
            let mut rnd = move || {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
            };
            let q: Vec<Vec<f32>> = (0..m).map(|_| (0..qk).map(|_| rnd()).collect()).collect();
            let k: Vec<Vec<f32>> = (0..nk).map(|_| (0..qk).map(|_| rnd()).collect()).collect();
            let v: Vec<Vec<f32>> = (0..nk).map(|_| (0..vw).map(|_| rnd()).collect()).collect();
            let scale = 1.0 / (qk as f32).sqrt() * 2.0;
            // As sm_80 runs it, then as sm_90a (warpgroup MMAs) where the shapes allow.
            for wgmma in [false, true]
                .into_iter()
                .filter(|&w| !w || wgmma_shapes(&a))
            {
                let got = simulate(&a, scale, (&q, &k, &v), &sees, tiles, wgmma);
                let (mut err, mut norm) = (0f64, 0f64);
                for t in 0..m {
                    let keys = tiles.0 * KEY_TILE..(tiles.1 * KEY_TILE).min(nk).min(sees[t]);
                    let logit = |j: usize| {
                        (0..qk)
                            .map(|e| round(q[t][e]) as f64 * round(k[j][e]) as f64)
                            .sum::<f64>()
                            * scale as f64
                    };
                    let top = keys.clone().map(logit).fold(f64::NEG_INFINITY, f64::max);
                    let p: Vec<(usize, f64)> = keys.map(|j| (j, (logit(j) - top).exp())).collect();
                    let sum: f64 = p.iter().map(|(_, p)| p).sum();
                    for d in 0..vw {
                        let g = got[t][d].expect("every valid output element is written") as f64;
                        if p.is_empty() {
                            assert!(g.is_nan(), "{qk}x{vw}: row {t} sees no key but gave {g}");
                            continue;
                        }
                        let want = p
                            .iter()
                            .map(|&(j, p)| p * round(v[j][d]) as f64)
                            .sum::<f64>();
                        let want = want / sum;
                        assert!(g.is_finite(), "{qk}x{vw}: row {t} column {d} is {g}");
                        err += (g - want).powi(2);
                        norm += want * want;
                    }
                }
                let rel = (err / norm).sqrt();
                assert!(
                    rel < 1e-2,
                    "{qk}x{vw} m {m} nk {nk} wgmma {wgmma}: relative error {rel:.3e}"
                );
            }
        }
    }

    fn attend(qk: usize, vw: usize) -> Attend {
        Attend {
            kind: MmaKind::Bf16,
            rows: ROWS,
            m: Expr::I(1),
            keys: Expr::I(1),
            tiles: (Expr::I(0), Expr::I(1)),
            key_tile: KEY_TILE,
            qk,
            vw,
            scale: 1.0,
            t: "t".into(),
            j: "j".into(),
            e: "e".into(),
            d: "d".into(),
            out: "out".into(),
            query: Expr::F(0.0),
            key: Expr::F(0.0),
            value: Expr::F(0.0),
            sees: Expr::I(1),
            epilogue: vec![],
        }
    }

    /// `x` rounded to bf16 (nearest, ties to even), as f32.
    fn round(x: f32) -> f32 {
        f32::from_bits((bits(x) as u32) << 16)
    }

    fn bits(x: f32) -> u16 {
        let b = x.to_bits();
        ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }

    fn pack(lo: f32, hi: f32) -> u32 {
        bits(lo) as u32 | (bits(hi) as u32) << 16
    }

    fn half(w: u32, h: usize) -> f32 {
        f32::from_bits((w >> (16 * h)) << 16)
    }

    /// One warp's `mma.sync` m16n8k16 bf16, `c + a·b`, from per-lane registers as the PTX
    /// fragment layouts place the elements.
    #[allow(clippy::needless_range_loop)]
    fn mma(a: &[[u32; 4]], b: &[[u32; 2]], c: &[[f32; 4]]) -> Vec<[f32; 4]> {
        let (mut am, mut bm) = ([[0f32; 16]; 16], [[0f32; 16]; 8]);
        for lane in 0..32 {
            let (g, t) = (lane / 4, lane % 4);
            for h in 0..2 {
                for reg in 0..4 {
                    let (r, k) = a_fragment(MmaKind::Bf16, g, t, reg, h);
                    am[r][k] = half(a[lane][reg], h);
                }
                for reg in 0..2 {
                    let (col, k) = b_fragment(MmaKind::Bf16, g, t, reg, h);
                    bm[col][k] = half(b[lane][reg], h);
                }
            }
        }
        (0..32)
            .map(|lane| {
                let mut d = c[lane];
                for (e, x) in d.iter_mut().enumerate() {
                    let (r, col) = c_fragment(lane / 4, lane % 4, e);
                    *x += (0..16).map(|k| am[r][k] * bm[col][k]).sum::<f32>();
                }
                d
            })
            .collect()
    }

    /// Rows of a matrix.
    type Rows<'m> = &'m [Vec<f32>];

    /// What a `wgmma` reading B (N × 16, K-major) through the descriptor of 16-deep step
    /// `step` of an operand of `depth`-element rows staged as [`core_pair`] lays it out gives
    /// the m16n8k16 B-fragment register `reg` of lane `(g, t)` for 8-row group `group`: the
    /// elements at the descriptor's addresses (PTX ISA, shared-memory matrix layout: start
    /// `step · 2 · LBO`, row `n` of the group at `(n / 8) · SBO + (n % 8) · 16` bytes, depth
    /// `k` at `(k / 8) · LBO + (k % 8) · 2`), packed as the fragment holds them.
    fn descriptor_read(
        words: &[u32],
        depth: usize,
        (group, step): (usize, usize),
        (g, t): (usize, usize),
        reg: usize,
    ) -> u32 {
        let half_at = |byte: usize| (words[byte / 4] >> (16 * ((byte % 4) / 2))) & 0xffff;
        let mut w = 0;
        for h in 0..2 {
            let (col, k) = b_fragment(MmaKind::Bf16, g, t, reg, h);
            let n = group * 8 + col;
            let byte = step * 2 * CORE_LBO
                + (n / 8) * core_sbo(depth)
                + (n % 8) * 16
                + (k / 8) * CORE_LBO
                + (k % 8) * 2;
            w |= half_at(byte) << (16 * h);
        }
        w
    }

    /// The block run lane by lane: `out[t][d]` for the valid rows (`None`: never written).
    #[allow(clippy::needless_range_loop)]
    fn simulate(
        a: &Attend,
        scale: f32,
        (q, k, v): (Rows, Rows, Rows),
        sees: &[usize],
        (first, end): (usize, usize),
        wgmma: bool,
    ) -> Vec<Vec<Option<f32>>> {
        let (qk, vw, m, nk) = (a.qk, a.vw, q.len(), k.len());
        let (groups, steps) = (KEY_TILE / 8, KEY_TILE / 16);
        let mut out = vec![vec![None; vw]; m];
        for w in 0..WARPS {
            let lanes: Vec<(usize, usize)> = (0..32).map(|l| (l / 4, l % 4)).collect();
            let rows: Vec<[usize; 2]> = lanes
                .iter()
                .map(|&(g, _)| [w * 16 + g, w * 16 + g + 8].map(|r| r.min(m - 1)))
                .collect();
            let see: Vec<[usize; 2]> = rows.iter().map(|r| r.map(|r| sees[r].min(nk))).collect();
            let qf: Vec<Vec<[u32; 4]>> = (0..qk / 16)
                .map(|ks| {
                    (0..32)
                        .map(|l| {
                            [0, 1, 2, 3].map(|reg| {
                                let (r0, k0) = a_fragment(MmaKind::Bf16, 0, 0, reg, 0);
                                let (row, e) = (rows[l][r0 / 8], ks * 16 + 2 * lanes[l].1 + k0);
                                pack(q[row][e], q[row][e + 1])
                            })
                        })
                        .collect()
                })
                .collect();
            let mut acc = vec![vec![[0f32; 4]; 32]; vw / 8];
            let mut mx = vec![[f32::NEG_INFINITY; 2]; 32];
            let mut sum = vec![[0f32; 2]; 32];
            for jt in first..end {
                let j0 = jt * KEY_TILE;
                let (kr, vr) = stage_rounds(a);
                let mut kw = vec![0u32; KEY_TILE * key_ld(a) / 2];
                let mut vwd = vec![0u32; vw * VALUE_LD / 2];
                // sm_90a: word p of a staging round is thread p's, in core-matrix layout.
                for p in (0..KEY_TILE * qk / 2).filter(|_| wgmma) {
                    let (key, pair) = core_pair(qk, p);
                    let j = (j0 + key).min(nk - 1);
                    kw[p] = pack(k[j][2 * pair], k[j][2 * pair + 1]);
                }
                for p in (0..KEY_TILE / 2 * vw).filter(|_| wgmma) {
                    let (d, pair) = core_pair(KEY_TILE, p);
                    let ja = (j0 + 2 * pair).min(nk - 1);
                    let jb = (j0 + 2 * pair + 1).min(nk - 1);
                    vwd[p] = pack(v[ja][d], v[jb][d]);
                }
                for tid in (0..LANES as usize).filter(|_| !wgmma) {
                    for it in 0..kr {
                        let (key, pair) = key_pair(qk, tid, it);
                        if key < KEY_TILE {
                            let j = (j0 + key).min(nk - 1);
                            kw[key_word(a, key, pair)] = pack(k[j][2 * pair], k[j][2 * pair + 1]);
                        }
                    }
                    for it in 0..vr {
                        let (d, pair) = value_pair(vw, tid, it);
                        if pair < KEY_TILE / 2 {
                            let ja = (j0 + 2 * pair).min(nk - 1);
                            let jb = (j0 + 2 * pair + 1).min(nk - 1);
                            vwd[value_word(d, pair)] = pack(v[ja][d], v[jb][d]);
                        }
                    }
                }
                let mut s = vec![vec![[0f32; 4]; 32]; groups];
                for (ks, qa) in qf.iter().enumerate() {
                    for (nt, c) in s.iter_mut().enumerate() {
                        let b: Vec<[u32; 2]> = lanes
                            .iter()
                            .map(|&gt| {
                                [0, 1].map(|reg| {
                                    if wgmma {
                                        descriptor_read(&kw, qk, (nt, ks), gt, reg)
                                    } else {
                                        kw[key_fragment_word(a, gt, nt, ks * 16, reg)]
                                    }
                                })
                            })
                            .collect();
                        *c = mma(qa, &b, c);
                    }
                }
                let mut p = vec![vec![[0u32; 4]; 32]; steps];
                for l in 0..32 {
                    for (nt, c) in s.iter_mut().enumerate() {
                        for e in 0..4 {
                            let (r, col) = c_fragment(0, 0, e);
                            let key = j0 + 2 * lanes[l].1 + nt * 8 + col;
                            c[l][e] = if key < see[l][r / 8] {
                                c[l][e] * scale
                            } else {
                                f32::NEG_INFINITY
                            };
                        }
                    }
                }
                let mut corr = vec![[1f32; 2]; 32];
                let mut tile_max = vec![[f32::NEG_INFINITY; 2]; 32];
                for l in 0..32 {
                    for h in 0..2 {
                        let mut x = mx[l][h];
                        for c in &s {
                            x = x.max(c[l][2 * h]).max(c[l][2 * h + 1]);
                        }
                        tile_max[l][h] = x;
                    }
                }
                for l in 0..32 {
                    for h in 0..2 {
                        // The quad's combine: the lanes sharing the row.
                        let quad = (l / 4) * 4..(l / 4) * 4 + 4;
                        let top = quad
                            .map(|o| tile_max[o][h])
                            .fold(f32::NEG_INFINITY, f32::max);
                        let base = if top == f32::NEG_INFINITY { 0.0 } else { top };
                        corr[l][h] = (mx[l][h] - base).exp();
                        sum[l][h] *= corr[l][h];
                        for c in s.iter_mut() {
                            for e in [2 * h, 2 * h + 1] {
                                c[l][e] = (c[l][e] - base).exp();
                                sum[l][h] += c[l][e];
                            }
                        }
                        mx[l][h] = top;
                    }
                    for dn in acc.iter_mut() {
                        for e in 0..4 {
                            dn[l][e] *= corr[l][e / 2];
                        }
                    }
                    for (kk, pk) in p.iter_mut().enumerate() {
                        for reg in 0..4 {
                            let [(g0, e0), (g1, e1)] = probability_register(kk, reg);
                            pk[l][reg] = pack(s[g0][l][e0], s[g1][l][e1]);
                        }
                    }
                }
                for (dn, c) in acc.iter_mut().enumerate() {
                    for (kk, pk) in p.iter().enumerate() {
                        let b: Vec<[u32; 2]> = lanes
                            .iter()
                            .map(|&gt| {
                                [0, 1].map(|reg| {
                                    if wgmma {
                                        descriptor_read(&vwd, KEY_TILE, (dn, kk), gt, reg)
                                    } else {
                                        vwd[value_fragment_word(gt, dn, kk, reg)]
                                    }
                                })
                            })
                            .collect();
                        *c = mma(pk, &b, c);
                    }
                }
            }
            for l in 0..32 {
                let quad = (l / 4) * 4..(l / 4) * 4 + 4;
                let total = [0, 1].map(|h| quad.clone().map(|o| sum[o][h]).sum::<f32>());
                for (dn, c) in acc.iter().enumerate() {
                    for e in 0..4 {
                        let (r, col) = c_fragment(lanes[l].0, lanes[l].1, e);
                        let (row, d) = (w * 16 + r, dn * 8 + col);
                        if row < m {
                            out[row][d] = Some(c[l][e] / total[e / 2]);
                        }
                    }
                }
            }
        }
        out
    }

    /// A warp's fragment loads from the staged tiles (lanes: group g, thread t) hit 32
    /// distinct banks, for the key widths of the examples and the real models.
    #[test]
    fn fragment_loads_are_conflict_free() {
        for qk in [16, 32, 64, 128, 192, 256] {
            let kld = qk + PAD;
            let banks: std::collections::HashSet<usize> = (0..32)
                .map(|lane| ((lane / 4) * (kld / 2) + lane % 4) % 32)
                .collect();
            assert_eq!(banks.len(), 32, "keys {qk}");
        }
        let banks: std::collections::HashSet<usize> = (0..32)
            .map(|lane| ((lane / 4) * (VALUE_LD / 2) + lane % 4) % 32)
            .collect();
        assert_eq!(banks.len(), 32, "values");
    }
}
