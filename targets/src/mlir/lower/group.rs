//! Warpgroup tiles: on sm_90a, an f32 [`Stmt::Mma`](lamina_ir::kernel::Stmt::Mma) of
//! [`Mma::WARPGROUP_ROWS`] rows (`build::Tiling::Warpgroup`) in a program of four warps runs as
//! `wgmma.mma_async` m64nNk8 TF32, the four warps together, instead of `mma.sync` tiles dealt
//! to single warps.
//!
//! - The tile loop's tiles run one after another, each by the whole warpgroup; warp `w` owns
//!   rows `16w .. 16w + 16` of a tile.
//! - A comes from registers: each lane evaluates its m16n8k8 TF32 fragment of its warp's rows
//!   straight from the operand expression (a warpgroup's m64 A fragment is its warps' m16
//!   fragments stacked), split into a TF32 head and tail as `mma.sync` tiles do.
//! - B goes through shared memory, a slab of the depth at a time: the program's 128 threads
//!   evaluate the slab's elements of `b`, split them, and store head and tail as two copies
//!   of K-major core matrices (8 columns × 4 depth elements, 128 contiguous bytes; words in
//!   `attend::core_pair`'s order) in the program's warpgroup staging area
//!   ([`WarpLayout::group_staging`](crate::nvptx::WarpLayout)). After `fence.proxy.async` and
//!   a block barrier, the slab's steps run as one chain of `wgmma`s, three per 8-deep step
//!   (`lo·hi`, `hi·lo`, `hi·hi`, small terms first, as `mma.sync` tiles), each reading B
//!   through a shared-memory descriptor; the chain is committed and waited for, and a second
//!   barrier keeps the next slab's stores from overwriting operands another warp still reads.
//! - The accumulators come back per warp in the m16n8 C layout, one fragment per 8 columns,
//!   so the epilogue is the `mma.sync` tiles' ([`Lower::mma_epilogue`]).
//!
//! Padding is handled as for `mma.sync` tiles: rows past `m` and columns past `n` are loaded
//! from clamped indices and never stored, depth past the end is zero. The host runs the same
//! tiles as loops (`expand`); the fragment bookkeeping is covered by the unit tests below and
//! by ptxas, not by a GPU run.

use lamina_ir::kernel::{Kernel, Mma, MmaKind, Stmt};
use melior::dialect::scf;
use melior::ir::operation::OperationBuilder;
use melior::ir::r#type::IntegerType;
use melior::ir::{Block, BlockLike, RegionLike, Type, Value};

use super::mma::{a_fragment, register_variants};
use super::{bug, Env, Lower, R};

/// Depth of one `wgmma` TF32 step.
const STEP: usize = 8;
/// Threads of a warpgroup.
const THREADS: usize = 128;
/// Deepest slab: its A fragments are all loaded before the chain of `wgmma`s starts (4
/// steps: 16 registers, 32 for TF32x3's heads and tails, beside up to 128 accumulators).
const MAX_SLAB: usize = 32;
/// Bytes of one core matrix (8 rows of 16 bytes), the distance between core matrices adjacent
/// along the depth (the descriptor's leading-dimension offset).
const CORE_BYTES: usize = 128;

/// Whether `mma` runs as a warpgroup tile on sm_90a: [`Mma::WARPGROUP_ROWS`] rows, a TF32 kind
/// (f32 tiles reach a GPU as TF32x3), and 8 to 256 columns in whole groups of 8 (the `wgmma`
/// N).
pub fn group_tile(mma: &Mma) -> bool {
    mma.rows == Mma::WARPGROUP_ROWS
        && matches!(mma.kind, MmaKind::Tf32x3 | MmaKind::Tf32 | MmaKind::F32)
        && mma.cols.is_multiple_of(Mma::N)
        && (Mma::N..=256).contains(&mma.cols)
}

/// Bytes a slab `slab` deep of `mma`'s B operand takes staged: its columns × `slab` words per
/// copy (TF32x3: a head and a tail).
pub fn slab_bytes(mma: &Mma, slab: usize) -> usize {
    mma.cols * slab * register_variants(mma.kind).0 * 4
}

/// The deepest slab of `mma` that fits `bytes` of staging: a multiple of 8 dividing the depth
/// (rounded up to whole steps), at most [`MAX_SLAB`], or `None` when not even one step fits.
pub fn slab(mma: &Mma, bytes: usize) -> Option<usize> {
    let depth = mma.depth.next_multiple_of(STEP);
    (1..=depth.min(MAX_SLAB) / STEP)
        .rev()
        .map(|s| s * STEP)
        .find(|&s| depth.is_multiple_of(s) && slab_bytes(mma, s) <= bytes)
}

/// The warpgroup tiles of kernel `k` (prepared for a GPU: `dot`s expanded), those alone in
/// split tile loops as `build::mma_tiles` makes them.
pub fn group_tiles(k: &Kernel) -> Vec<&Mma> {
    fn walk<'k>(b: &'k [Stmt], out: &mut Vec<&'k Mma>) {
        for s in b {
            match s {
                Stmt::For {
                    split: true,
                    carried,
                    body,
                    ..
                } if carried.is_empty() && super::tile_loop(body) => {
                    out.extend(body.iter().filter_map(|s| match s {
                        Stmt::Mma(m) if group_tile(m) => Some(&**m),
                        _ => None,
                    }))
                }
                Stmt::For { body, .. } | Stmt::If { then: body, .. } => walk(body, out),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(&k.body, &mut out);
    out
}

/// The least and the most warpgroup staging kernel `k`'s tiles can use: one 8-deep step of
/// its widest tile, and its largest slab (its whole depth up to [`MAX_SLAB`]); `None` without
/// warpgroup tiles.
pub fn staging_bounds(k: &Kernel) -> Option<(usize, usize)> {
    let tiles = group_tiles(k);
    let least = tiles.iter().map(|m| slab_bytes(m, STEP)).max()?;
    let most = tiles
        .iter()
        .map(|m| slab_bytes(m, m.depth.next_multiple_of(STEP).min(MAX_SLAB)))
        .max()?;
    Some((least, most))
}

impl<'c> Lower<'c> {
    /// Lowers warpgroup tile `mma` for a program of four warps (`env.lane` and `env.warp`
    /// bound, its warpgroup staging area in `env.group_stage`); see the module comment.
    pub(super) fn group_mma<'a>(
        &self,
        blk: &'a Block<'c>,
        env: &Env<'c, 'a>,
        mma: &Mma,
        what: &str,
        line: &mut usize,
    ) -> R<()> {
        let (Some(lane), Some(warp), Some((smem, base, bytes))) =
            (env.lane, env.warp, env.group_stage)
        else {
            return Err(bug(format!(
                "{what}: a warpgroup tile needs a program of four warps with a staging area"
            )));
        };
        if !self.wgmma || self.warps as usize * 32 != THREADS || !group_tile(mma) {
            return Err(bug(format!(
                "{what}: a {}x{} {} tile is no warpgroup tile here",
                mma.rows,
                mma.cols,
                mma.kind.name()
            )));
        }
        let slab = slab(mma, bytes).ok_or_else(|| {
            bug(format!(
                "{what}: {bytes} bytes of warpgroup staging hold no step of a {}-column tile",
                mma.cols
            ))
        })?;
        let kind = mma.kind;
        let ix = |v: usize| self.const_index(blk, v as i64);
        let int = |name: &str, x: Value<'c, 'a>, y: Value<'c, 'a>| {
            self.op(blk, name, &[x, y], self.index, false)
        };
        let g = int("arith.divui", lane, ix(4));
        let t = int("arith.remui", lane, ix(4));
        let tid = int("arith.addi", int("arith.muli", warp, ix(32)), lane);
        let row0 = int("arith.addi", int("arith.muli", warp, ix(Mma::M)), g);
        let (m, _) = self.expr(blk, env, &mma.m)?;
        let (n, _) = self.expr(blk, env, &mma.n)?;
        let m_last = int("arith.subi", m, ix(1));
        let n_last = int("arith.subi", n, ix(1));
        let i32t: Type = IntegerType::new(self.ctx, 32).into();
        let (variants, products) = register_variants(kind);
        let words = mma.cols * slab;
        let view = self.shared_view(blk, smem, base, i32t, words * variants, 0)?;
        let base_addr = {
            let at = self.shared_address(blk, smem, what)?;
            let off = self.op(blk, "arith.index_cast", &[base], self.i64, false);
            self.op(blk, "arith.addi", &[at, off], self.i64, false)
        };
        // Stores before the tile are visible to every thread's operand loads.
        self.block_barrier(blk)?;

        // The depth loop, a slab an iteration, carrying the lane's cols / 2 accumulators.
        let na = mma.cols / 2;
        let mut args = vec![(self.index, self.loc)];
        args.extend((0..na).map(|_| (self.f32, self.loc)));
        let body = Block::new(&args);
        {
            let b = &body;
            let bx = |v: usize| self.const_index(b, v as i64);
            let bint = |name: &str, x: Value<'c, '_>, y: Value<'c, '_>| {
                self.op(b, name, &[x, y], self.index, false)
            };
            let k0: Value = b.argument(0).map_err(|e| bug(e.to_string()))?.into();
            let acc: Vec<Value> = (0..na)
                .map(|i| {
                    b.argument(1 + i)
                        .map(Into::into)
                        .map_err(|e| bug(e.to_string()))
                })
                .collect::<R<_>>()?;
            // 1. The slab of B, each thread its words of every round.
            for round in 0..words.div_ceil(THREADS) {
                let p = bint("arith.addi", tid, bx(round * THREADS));
                let store = |sb: &Block<'c>| -> R<()> {
                    // Word p's (column, k): a TF32 core matrix is a bf16 one's shape in
                    // 32-bit words, so the attention blocks' pairs of a twice-as-deep slab.
                    let (col, k) = self.core_pair_at(sb, p, 2 * slab);
                    let col = self.op(sb, "arith.minui", &[col, n_last], self.index, false);
                    let k = self.op(sb, "arith.addi", &[k0, k], self.index, false);
                    let x = self.mma_element(sb, env, (mma, &mma.b, &mma.j), col, k)?;
                    for (v, r) in self.tf32_registers(sb, kind, x)?.into_iter().enumerate() {
                        let off = self.const_index(sb, (v * words) as i64);
                        let at = self.op(sb, "arith.addi", &[p, off], self.index, false);
                        let st = OperationBuilder::new("memref.store", self.loc)
                            .add_operands(&[r, view, at])
                            .build()
                            .map_err(|e| bug(format!("{what}: staging store: {e}")))?;
                        sb.append_operation(st);
                    }
                    Ok(())
                };
                if (round + 1) * THREADS <= words {
                    store(b)?;
                } else {
                    let inside = self.append(
                        b,
                        melior::dialect::arith::cmpi(
                            self.ctx,
                            melior::dialect::arith::CmpiPredicate::Ult,
                            p,
                            bx(words),
                            self.loc,
                        ),
                    );
                    let then = Block::new(&[]);
                    store(&then)?;
                    then.append_operation(scf::r#yield(&[], self.loc));
                    let region = melior::ir::Region::new();
                    region.append_block(then);
                    b.append_operation(scf::r#if(
                        inside,
                        &[],
                        region,
                        melior::ir::Region::new(),
                        self.loc,
                    ));
                }
            }
            // The stores reach the async proxy that `wgmma` reads through, in every warp.
            self.fence_proxy_async(b)?;
            self.block_barrier(b)?;
            // 2. The lane's A fragments, a head and a tail per register, per step.
            let mut a_steps = Vec::new();
            for s in 0..slab / STEP {
                let mut regs = vec![Vec::new(); variants];
                for reg in 0..4 {
                    let (r, k_off) = a_fragment(kind, 0, 0, reg, 0);
                    let row = bint("arith.addi", row0, bx(r));
                    let row = bint("arith.minui", row, m_last);
                    let k = bint(
                        "arith.addi",
                        bint("arith.addi", k0, t),
                        bx(s * STEP + k_off),
                    );
                    let x = self.mma_element(b, env, (mma, &mma.a, &mma.i), row, k)?;
                    for (v, x) in self.tf32_registers(b, kind, x)?.into_iter().enumerate() {
                        regs[v].push(x);
                    }
                }
                a_steps.push(regs);
            }
            // 3. One chain of warpgroup MMAs over the slab: B copy `vb` of step `s` starts
            //    `vb · words` words and `s` pairs of core matrices into the area; 8-column
            //    groups are slab / 4 core matrices apart.
            let sbo = slab / 4 * CORE_BYTES;
            let mut chain = Vec::new();
            for (s, regs) in a_steps.iter().enumerate() {
                for &(va, vb) in products {
                    let off = self.const_i64(b, (4 * vb * words + s * 2 * CORE_BYTES) as i64);
                    let at = self.op(b, "arith.addi", &[base_addr, off], self.i64, false);
                    chain.push((regs[va].as_slice(), self.wgmma_descriptor(b, at, sbo)));
                }
            }
            let acc = self.wgmma_rs(b, kind, mma.cols, &acc, &chain, what)?;
            // Every warp is done reading the slab before the next one overwrites it.
            self.block_barrier(b)?;
            b.append_operation(scf::r#yield(&acc, self.loc));
        }
        let depth = mma.depth.next_multiple_of(STEP);
        let zero = self.const_f32(blk, 0.0);
        let acc = self.scf_for(
            blk,
            (ix(0), ix(depth), ix(slab)),
            &vec![zero; na],
            &vec![self.f32; na],
            body,
            what,
        )?;
        let two_t = int("arith.muli", t, ix(2));
        self.mma_epilogue(
            blk,
            env,
            mma,
            &acc,
            (row0, two_t),
            (1, mma.cols / Mma::N),
            (m, n),
            what,
            line,
        )?;
        // What the epilogue stored is visible to every thread after the tile.
        self.block_barrier(blk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lamina_ir::kernel::build::{i, v};

    fn tile(cols: usize, depth: usize, kind: MmaKind) -> Mma {
        Mma {
            kind,
            rows: 64,
            cols,
            m: v("m"),
            n: i(cols),
            depth,
            i: "i".into(),
            j: "j".into(),
            k: "k".into(),
            acc: "acc".into(),
            a: i(0),
            b: i(0),
            epilogue: Vec::new(),
        }
    }

    /// Every (column, k) of a slab is one word of the staging ([`attend::core_pair`] of twice
    /// the slab, as the lowering maps them), at the byte the descriptor addresses: `(j / 8)·SBO
    /// + (k / 4)·128 + (j % 8)·16 + (k % 4)·4`, SBO = slab / 4 core matrices.
    #[test]
    fn staged_words_are_k_major_core_matrices() {
        use super::super::attend;
        for (cols, slab) in [(8, 8), (16, 32), (64, 16), (32, 128), (64, 24)] {
            let mut seen = vec![0u8; cols * slab];
            for p in 0..cols * slab {
                let (j, k) = attend::core_pair(2 * slab, p);
                assert!(
                    j < cols && k < slab,
                    "{cols}x{slab}: word {p} at ({j}, {k})"
                );
                seen[j * slab + k] += 1;
                let sbo = slab / 4 * CORE_BYTES;
                let byte = j / 8 * sbo + k / 4 * CORE_BYTES + j % 8 * 16 + k % 4 * 4;
                assert_eq!(byte, 4 * p, "{cols}x{slab}: ({j}, {k})");
            }
            assert!(seen.iter().all(|&x| x == 1), "{cols}x{slab}");
        }
    }

    /// Each warp's lanes hold its 16 rows' A fragment of one 8-deep step once: rows 16w + g
    /// (+ 8), depth t (+ 4).
    #[test]
    fn warpgroup_a_fragments_cover_64_rows() {
        let mut a = [[0u8; STEP]; 64];
        for warp in 0..4 {
            for lane in 0..32 {
                let (g, t) = (lane / 4, lane % 4);
                for reg in 0..4 {
                    let (r, k) = a_fragment(MmaKind::Tf32x3, g, t, reg, 0);
                    a[warp * 16 + r][k] += 1;
                }
            }
        }
        assert!(a.iter().flatten().all(|&x| x == 1));
    }

    /// Slabs divide the depth in whole steps and fit their staging; a tile wider than the
    /// area has none.
    #[test]
    fn slabs_fit_the_staging_area() {
        let t = tile(64, 128, MmaKind::Tf32x3);
        assert_eq!(slab_bytes(&t, 8), 4096);
        assert_eq!(slab(&t, 4096), Some(8));
        assert_eq!(slab(&t, 16 << 10), Some(32));
        assert_eq!(slab(&t, 1 << 20), Some(MAX_SLAB));
        assert_eq!(slab(&t, 4095), None);
        assert_eq!(slab(&tile(32, 64, MmaKind::Tf32), 4096), Some(32));
        // A ragged depth is padded to whole steps: 20 → 24, slabs of 8 or 24.
        assert_eq!(slab(&tile(16, 20, MmaKind::Tf32x3), 16 << 10), Some(24));
        assert_eq!(slab(&tile(16, 20, MmaKind::Tf32x3), 2048), Some(8));
        assert!(group_tile(&t));
        assert!(!group_tile(&Mma {
            rows: 32,
            ..t.clone()
        }));
        assert!(!group_tile(&Mma {
            kind: MmaKind::Bf16,
            ..t.clone()
        }));
        assert!(!group_tile(&Mma { cols: 264, ..t }));
    }
}
