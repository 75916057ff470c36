//! The NVPTX targets (sm_80, sm_90a): kernels → `gpu.module` → NVVM → LLVM NVPTX → PTX text,
//! and `ptxas -v` to assemble it and read each kernel's resources.
//!
//! Mapping: one kernel-IR program per [`lanes`] consecutive threads — a whole block of 4 warps
//! for a kernel that is one large tensor-core tile (the prefill projections, staged through
//! shared memory: [`crate::mlir::lower::staged`]), a warp for kernels with reductions or split
//! loops, whose iterations the lanes share (coalesced rows, a shuffle butterfly to combine),
//! one thread otherwise — [`BLOCK`] threads per block (64 for warp programs laid out 2 warps
//! to a block, [`warp_layout`]), `⌈programs · lanes / block⌉` blocks along x. The chunked
//! recurrences' scans, whose few programs each walk all the chunks (and on sm_90a their chunk
//! kernels), are programs of [`PROGRAM_WARPS`] warps, one to a block ([`program_warps`]):
//! their tensor-core tiles are dealt to the warps. A warp
//! program's tensor-core tiles stage their aligned global operands through its warp's slice of
//! the block's shared memory by `cp.async`
//! ([`warp_staging_bytes`], [`crate::mlir::lower::warp_stage`]: flash attention's queries and
//! keys, the chunked recurrences' tiles, MLA decode's queries and latent rows, split-K
//! projections' weights). It keeps its locals in shared memory too, a slice per program
//! ([`warp_layout`]): static when 4 warps' fit [`SHARED_LOCALS_BUDGET`] (GQA decode attention,
//! the decode recurrent steps, split-K norms, routers); dynamic, 2 or 4 warps to a block, when
//! they fit [`dynamic_shared_budget`] (on sm_90a the chunked recurrences' chunk kernels and
//! scans, and MLA decode attention); else in a scratch buffer, one copy per program
//! ([`scratch_bytes`] each, at `program · scratch_bytes`: most of these on sm_80); its lanes
//! write them
//! alike between warp barriers. A thread program keeps them in local memory.
//! Every buffer is one `.u64` pointer parameter (bare-pointer convention) in the kernel's
//! parameter order, then the scratch pointer, then `rows`, all `.u64`. Static shared memory is
//! declared by the kernel (at most 48 KiB); dynamic shared memory is the module's one
//! `.extern .shared` array, sized by the launch ([`dynamic_shared_bytes`], opted into by the
//! runtime). The runtime reads all of this from the plan ([`lamina_ir::plan::GpuLaunch`]).
//!
//! Not yet here (issue 4's remaining work): TMA and swizzled layouts on sm_90a (the staged
//! tiles copy with `cp.async` on both targets), bf16 activations.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lamina_ir::kernel::Kernel;
use melior::ir::attribute::AttributeLike;
use melior::ir::operation::OperationLike;
use melior::ir::BlockLike;

use crate::mlir::context::GPU_PIPELINE;
use crate::mlir::lower::staged::staged_tile;
use crate::mlir::{gpu_module, MlirContext};
use crate::{Target, TargetError};

/// Threads per block of every kernel in this lowering but warp programs whose locals take
/// 2-warp blocks of dynamic shared memory ([`warp_layout`]).
pub const BLOCK: u32 = 128;

/// Most bytes of per-program locals: the architectural per-thread local-memory limit of
/// sm_80 and sm_90 (512 KiB).
pub const LOCAL_BUDGET: usize = 512 << 10;

/// Registers of one SM (sm_80 and sm_90), for the occupancy check.
pub const REGISTERS_PER_SM: u32 = 65536;

/// Shared memory one block may use on the target (opt-in maximum).
pub fn shared_limit(target: Target) -> u32 {
    match target {
        Target::Sm90a => 227 << 10,
        _ => 163 << 10,
    }
}

/// Whether kernel `k` is a block-cooperative program: a large tensor-core tile
/// ([`staged_tile`]) or an attention block with its state in registers
/// ([`attend_block`](crate::mlir::lower::attend::attend_block)), [`staged::LANES`](crate::mlir::lower::staged::LANES) threads each.
pub fn block_program(k: &Kernel) -> bool {
    staged_tile(k).is_some() || crate::mlir::lower::attend::attend_block(k).is_some()
}

/// Threads per block of kernel `k` on `target`: a block-cooperative program is exactly one
/// block (its static shared memory is the block's); a warp program has its layout's warps
/// ([`warp_layout`]); others [`BLOCK`].
pub fn block_size(k: &Kernel, target: Target) -> u32 {
    if block_program(k) {
        crate::mlir::lower::staged::LANES
    } else {
        warp_layout(k, target).map_or(BLOCK, |l| l.block())
    }
}

/// Threads per program of kernel `k`: a block of warps when it is only a large tensor-core
/// tile ([`staged_tile`]: the block stages the operands in shared memory) or an attention
/// block ([`block_program`]); a warp when it has
/// a reduction or a split loop (after tile expansion) for the lanes to share; else one.
pub fn lanes(k: &Kernel) -> u32 {
    use lamina_ir::kernel::{Expr, Stmt};
    if block_program(k) {
        return crate::mlir::lower::staged::LANES;
    }
    fn block(b: &[Stmt]) -> bool {
        b.iter().any(|s| match s {
            Stmt::Let(_, e) => e.has_reduce(),
            Stmt::Store { idx, value, .. } => {
                idx.iter().any(Expr::has_reduce) || value.has_reduce()
            }
            Stmt::For {
                split,
                body,
                lo,
                hi,
                carried,
                yields,
                ..
            } => {
                *split
                    || lo.has_reduce()
                    || hi.has_reduce()
                    || carried.iter().any(|(_, e)| e.has_reduce())
                    || yields.iter().any(Expr::has_reduce)
                    || block(body)
            }
            Stmt::If { cond, then } => cond.has_reduce() || block(then),
            Stmt::Local { .. } => false,
            // Tiles and attention blocks expand into reductions; MMAs are warp instructions.
            Stmt::Tile(_) | Stmt::Mma(_) | Stmt::Attend(_) => true,
        })
    }
    if block(&k.body) {
        WARP
    } else {
        1
    }
}

/// Threads of a warp: the lanes of a program that shares its reductions.
pub const WARP: u32 = 32;

/// Most static shared memory a block of warp programs gives its locals and MMA staging: the
/// static limit (48 KiB, no opt-in), so a block of [`BLOCK`] threads keeps its 4 warps' locals
/// in shared memory when each has at most 12 KiB.
pub const SHARED_LOCALS_BUDGET: usize = 48 << 10;

/// Most dynamic shared memory a block of warp programs may take for locals too large for
/// [`SHARED_LOCALS_BUDGET`] (the driver's opt-in maximum per block): 227 KiB on sm_90a; for
/// sm_80 plans 99 KiB, the opt-in maximum of sm_86 and sm_89, since an sm_80 plan also runs on
/// those (the A100's own is 163 KiB).
pub fn dynamic_shared_budget(target: Target) -> usize {
    match target {
        Target::Sm90a => lamina_ir::plan::MAX_DYNAMIC_SHARED as usize,
        _ => 99 << 10,
    }
}

/// Where a warp program keeps its locals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalsIn {
    /// A slice per warp of the block's static shared memory (the block's fit
    /// [`SHARED_LOCALS_BUDGET`]).
    StaticShared,
    /// A slice per warp of the block's dynamic shared memory, opted into at load (the block's
    /// fit [`dynamic_shared_budget`] but not the static budget).
    DynamicShared,
    /// The program's slice of the scratch buffer (global memory, cached).
    Scratch,
}

/// How a warp program is laid out in its block: warps per block, where its locals live, their
/// bytes per program (as the GPU lowering lays them out) and the bytes of each warp's MMA
/// staging area ([`warp_staging_bytes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WarpLayout {
    /// Warps per block.
    pub warps: u32,
    /// Warps per program: 1, or [`PROGRAM_WARPS`] for a program whose tensor-core tiles its
    /// warps share ([`program_warps`]).
    pub program_warps: u32,
    pub locals: LocalsIn,
    pub locals_bytes: usize,
    /// Bytes of each warp's staging area.
    pub staging: usize,
    /// Bytes of the program's warpgroup staging area (after its warps'): the B operands of
    /// its `wgmma` tiles, a slab of the depth at a time ([`crate::mlir::lower::group`]); 0
    /// when its tiles all run on `mma.sync`.
    pub group_staging: usize,
}

impl WarpLayout {
    /// Threads per block.
    pub fn block(&self) -> u32 {
        self.warps * WARP
    }

    /// Threads per program.
    pub fn program_threads(&self) -> u32 {
        self.program_warps * WARP
    }

    /// Shared-memory bytes of each program's slice: its locals when they live there, then its
    /// warps' staging areas and its warpgroup staging area, rounded to 16 bytes.
    pub fn slice_bytes(&self) -> usize {
        let locals = if self.locals == LocalsIn::Scratch {
            0
        } else {
            self.locals_bytes
        };
        (self.group_offset(locals) + self.group_staging).next_multiple_of(16)
    }

    /// Byte offset in a program's slice of its warpgroup staging area, after `locals` bytes
    /// of locals and its warps' staging areas ([`group_area_at`]).
    pub fn group_offset(&self, locals: usize) -> usize {
        group_area_at(
            locals + self.program_warps as usize * self.staging,
            self.group_staging,
        )
    }

    /// Scratch bytes per program: the locals when they live in the scratch buffer.
    pub fn scratch_bytes(&self) -> usize {
        match self.locals {
            LocalsIn::Scratch => self.locals_bytes,
            _ => 0,
        }
    }

    /// Dynamic shared memory per block: the programs' slices when the locals live there.
    pub fn dynamic_shared_bytes(&self) -> usize {
        match self.locals {
            LocalsIn::DynamicShared => self.block_shared_bytes(),
            _ => 0,
        }
    }

    /// Shared memory of a block (static or dynamic): its programs' slices.
    pub fn block_shared_bytes(&self) -> usize {
        self.slice_bytes() * (self.warps / self.program_warps) as usize
    }
}

/// Where a program's warpgroup staging area of `group_staging` bytes starts in its slice, after
/// `end` bytes of locals and warp staging: rounded up to 128 bytes (a core matrix) from the
/// slice's start when there is an area, which keeps it 16-byte aligned in shared memory, as
/// `wgmma` descriptors without swizzle need (a swizzled layout would need 512 to 1024).
pub fn group_area_at(end: usize, group_staging: usize) -> usize {
    if group_staging > 0 {
        end.next_multiple_of(128)
    } else {
        end
    }
}

/// Most warps per block of a warp program with dynamic shared locals, and the fewest: a block
/// of one warp would leave three of the SM's four schedulers without work, so locals that only
/// fit one warp per block stay in the scratch buffer.
const DYNAMIC_WARPS: [u32; 2] = [(BLOCK / WARP), 2];

/// The layout of warp program `k` (`None` for block-cooperative and thread programs):
/// - locals that fit [`SHARED_LOCALS_BUDGET`] four warps to a block live in static shared
///   memory, with staging in what is left of each warp's quarter;
/// - else, locals that fit [`dynamic_shared_budget`] with 4 or 2 warps to a block, each with
///   as many stages of its global operands as a quarter of the static budget holds (what it
///   would have with its locals in scratch, less the locals themselves, which need no
///   staging there), live in dynamic shared memory (without the staging, a warp's
///   fragment loads from global memory cost registers: the sm_80 Kimi-Linear scan spilled),
///   with the block size that keeps the most warps resident on an SM by shared memory (4 on a
///   tie): 2-warp blocks of 33 KiB slices fit 3 to an sm_90 SM, 6 warps, where 4-warp blocks
///   fit 1;
/// - else they stay in the scratch buffer, 4 warps to a block, each staging in its quarter of
///   the static budget.
///
/// A program whose tensor-core tiles are all in split tile loops may instead be one program of
/// [`PROGRAM_WARPS`] warps to a block, the warps sharing one copy of its locals (static, else
/// dynamic shared memory, else scratch) and each with its own staging area: always for a grid of
/// constant axes (the scans), else when its locals then stay in shared memory and at least as
/// many warps fit an SM by shared memory (sm_90a: the chunk kernels, 2 warps an SM as one-warp
/// programs, 8 to 12 as 4-warp programs). MLA decode attention stores outside split loops: one
/// warp.
pub fn warp_layout(k: &Kernel, target: Target) -> Option<WarpLayout> {
    use crate::mlir::lower::warp_stage::{kernel_stage_bytes, stages, MIN_STAGES};
    use lamina_ir::kernel::expand::{dots_on_tensor_cores, expand_tiles};
    if lanes(k) != WARP || block_program(k) {
        return None;
    }
    let expanded = expand_tiles(&dots_on_tensor_cores(k));
    let locals = crate::mlir::lower::local_layout(&expanded).1;
    let quarter = SHARED_LOCALS_BUDGET / (BLOCK / WARP) as usize;
    // Stages of the largest tile that fit `area` bytes (0 when fewer than the minimum do); with
    // `groups_apart`, of the largest but warpgroup tiles (which stage in their own area).
    let staging_of = |area: usize, locals_global: bool, groups_apart: bool| {
        let stage = kernel_stage_bytes(&expanded, locals_global, groups_apart);
        let n = stages(area / 16 * 16, stage);
        if stage > 0 && n >= MIN_STAGES {
            n * stage
        } else {
            0
        }
    };
    let staging = |area: usize, locals_global: bool| staging_of(area, locals_global, false);
    let warps = BLOCK / WARP;
    let one = one_warp_layout(locals, warps, target, &staging);
    if tile_program(&expanded) {
        // One program to a block, its warps sharing its locals and each staging its own tiles
        // (but sm_90a's warpgroup tiles, [`with_group_staging`]): static shared memory when it
        // all fits, else dynamic, else the locals in scratch.
        let bounds = (target == Target::Sm90a)
            .then(|| crate::mlir::lower::group::staging_bounds(&expanded))
            .flatten();
        let four = |groups: bool| {
            let staging =
                |area: usize, locals_global: bool| staging_of(area, locals_global, groups);
            let staged = staging(quarter, false);
            let layout = |locals_in| WarpLayout {
                warps: PROGRAM_WARPS,
                program_warps: PROGRAM_WARPS,
                locals: locals_in,
                locals_bytes: locals,
                staging: if locals_in == LocalsIn::Scratch {
                    staging(quarter, true)
                } else {
                    staged
                },
                group_staging: 0,
            };
            [LocalsIn::StaticShared, LocalsIn::DynamicShared]
                .into_iter()
                .map(layout)
                .find(|l| {
                    let budget = match l.locals {
                        LocalsIn::StaticShared => SHARED_LOCALS_BUDGET,
                        _ => dynamic_shared_budget(target),
                    };
                    l.slice_bytes() <= budget
                })
                .unwrap_or_else(|| layout(LocalsIn::Scratch))
        };
        // A grid of constant axes (the scans: few programs, each walking every chunk) takes 4
        // warps a program whatever; others when their locals stay in shared memory and at
        // least as many warps fit an SM as with one warp a program.
        let constant_grid = expanded
            .grid
            .iter()
            .all(|d| matches!(d, lamina_ir::kernel::Dim::N(_)));
        let takes = |l: &WarpLayout| {
            constant_grid
                || (l.locals != LocalsIn::Scratch
                    && resident_warps(l, target) >= resident_warps(&one, target))
        };
        let apart = four(bounds.is_some());
        if takes(&apart) {
            let Some(bounds) = bounds else {
                return Some(apart);
            };
            if let Some(l) = with_group_staging(bounds, apart, target) {
                return Some(l);
            }
            // No room for a warpgroup area: the warpgroup tiles are dealt to the warps (as
            // their 32-row blocks), so the warps' staging is sized for them too.
            let l = four(false);
            if takes(&l) {
                return Some(l);
            }
        }
    }
    Some(one)
}

/// `four` (a program of [`PROGRAM_WARPS`] warps) with a warpgroup staging area for its
/// `wgmma` tiles on sm_90a ([`crate::mlir::lower::group`]), `(least, most)` bytes as
/// `group::staging_bounds` says: the largest of 16, 8 and 4 KiB (at most `most`) that keeps
/// the block within its shared budget and as many warps resident per SM as without it, else
/// `least` (one depth step of its widest tile) if that fits the budget; `None` if not even that
/// does.
fn with_group_staging(
    (least, most): (usize, usize),
    four: WarpLayout,
    target: Target,
) -> Option<WarpLayout> {
    // Static shared locals that no longer fit with the area move to dynamic shared memory.
    let with = |bytes: usize| {
        let mut l = WarpLayout {
            group_staging: bytes,
            ..four
        };
        if l.locals == LocalsIn::StaticShared && l.slice_bytes() > SHARED_LOCALS_BUDGET {
            l.locals = LocalsIn::DynamicShared;
        }
        let budget = match l.locals {
            LocalsIn::DynamicShared => dynamic_shared_budget(target),
            _ => SHARED_LOCALS_BUDGET,
        };
        (l.slice_bytes() <= budget).then_some(l)
    };
    let resident = resident_warps(&four, target);
    [16 << 10, 8 << 10, 4 << 10]
        .into_iter()
        .map(|b: usize| b.min(most))
        .filter(|&b| b >= least)
        .filter_map(with)
        .find(|l| resident_warps(l, target) >= resident)
        .or_else(|| with(least))
}

/// Warps of an SM's resident blocks by shared memory (at most 64).
fn resident_warps(l: &WarpLayout, target: Target) -> usize {
    let blocks = shared_per_sm(target) as usize / (l.block_shared_bytes() + 1024);
    (blocks * l.warps as usize).min(64)
}

/// The layout of a warp program of one warp a program (see [`warp_layout`]).
fn one_warp_layout(
    locals: usize,
    warps: u32,
    target: Target,
    staging: &dyn Fn(usize, bool) -> usize,
) -> WarpLayout {
    let quarter = SHARED_LOCALS_BUDGET / (BLOCK / WARP) as usize;
    if locals > 0 && locals * warps as usize <= SHARED_LOCALS_BUDGET {
        return WarpLayout {
            warps,
            program_warps: 1,
            locals: LocalsIn::StaticShared,
            locals_bytes: locals,
            staging: staging(quarter.saturating_sub(locals), false),
            group_staging: 0,
        };
    }
    if locals > 0 {
        let budget = dynamic_shared_budget(target);
        let staged = staging(quarter, false);
        let resident =
            |l: &WarpLayout| (l.block_shared_bytes() <= budget).then(|| resident_warps(l, target));
        let best = DYNAMIC_WARPS
            .into_iter()
            .map(|warps| WarpLayout {
                warps,
                program_warps: 1,
                locals: LocalsIn::DynamicShared,
                locals_bytes: locals,
                staging: staged,
                group_staging: 0,
            })
            .filter_map(|l| resident(&l).map(|r| (r, l)))
            .fold(None::<(usize, WarpLayout)>, |best, (r, l)| match best {
                Some((b, _)) if b >= r => best,
                _ => Some((r, l)),
            });
        if let Some((_, l)) = best {
            return l;
        }
    }
    WarpLayout {
        warps,
        program_warps: 1,
        locals: LocalsIn::Scratch,
        locals_bytes: locals,
        staging: staging(quarter, true),
        group_staging: 0,
    }
}

/// Warps of a program that deals its tensor-core tiles to its warps ([`program_warps`]).
pub const PROGRAM_WARPS: u32 = 4;

/// Whether warp program `k` (prepared for a GPU: tiles expanded) can be a program of several
/// warps: every tensor-core tile is in a split tile loop (independent tiles,
/// `build::mma_tiles`), which its warps share, and there is at least one; and it stores only in
/// split loops and tiles (a store elsewhere costs two block barriers). Such a program's
/// warps deal its parallel split loops over all their lanes, each warp runs its sums and
/// reductions over its own 32 lanes (the same arithmetic as a one-warp program), and the
/// warps meet at a block barrier wherever a one-warp program has a warp barrier.
fn tile_program(k: &Kernel) -> bool {
    use lamina_ir::kernel::Stmt;
    /// Tile loops (`None` if a tile is elsewhere).
    fn tiles(b: &[Stmt], in_tiles: bool) -> Option<usize> {
        let mut n = 0;
        for s in b {
            n += match s {
                Stmt::For {
                    split: true,
                    carried,
                    body,
                    ..
                } if carried.is_empty() && crate::mlir::lower::tile_loop(body) => {
                    tiles(body, true)?;
                    1
                }
                Stmt::For { body, .. } | Stmt::If { then: body, .. } => tiles(body, in_tiles)?,
                Stmt::Mma(_) if !in_tiles => return None,
                Stmt::Attend(_) | Stmt::Tile(_) => return None,
                _ => 0,
            };
        }
        Some(n)
    }
    /// Stores outside split loops and tiles: every warp makes them, between two block
    /// barriers each (an in-place triangular solve is thousands of them a program).
    fn program_stores(b: &[Stmt]) -> bool {
        b.iter().any(|s| match s {
            Stmt::Store { .. } => true,
            Stmt::For {
                split: false, body, ..
            }
            | Stmt::If { then: body, .. } => program_stores(body),
            _ => false,
        })
    }
    lanes(k) == WARP
        && !block_program(k)
        && tiles(&k.body, false) > Some(0)
        && !program_stores(&k.body)
}

/// Warps per program of kernel `k` on `target` ([`warp_layout`]): [`PROGRAM_WARPS`] for the
/// chunked recurrences' scans (a grid of constant axes, whose few programs each walk every
/// chunk, so their latency bounds the phase), and for other programs of tile loops whose
/// locals stay in shared memory with at least as many warps resident per SM (the chunk
/// kernels on sm_90a, where the 4 warps share one copy of the locals); else 1.
pub fn program_warps(k: &Kernel, target: Target) -> u32 {
    warp_layout(k, target).map_or(1, |l| l.program_warps)
}

/// Whether warp program `k` keeps its locals in the block's shared memory (a slice per program,
/// static or dynamic: [`warp_layout`]). Larger locals stay in the scratch buffer
/// ([`scratch_bytes`]).
pub fn locals_in_shared(k: &Kernel, target: Target) -> bool {
    warp_layout(k, target).is_some_and(|l| l.locals != LocalsIn::Scratch)
}

/// Scratch bytes per program of kernel `k`: its locals when it is a warp program whose locals
/// are not in shared memory, else 0.
pub fn scratch_bytes(k: &Kernel, target: Target) -> usize {
    warp_layout(k, target).map_or(0, |l| l.scratch_bytes())
}

/// Bytes of dynamic shared memory a block of `k` is launched with (the plan's
/// `dynamic_shared_bytes`): the warps' slices when the locals live there, else 0.
pub fn dynamic_shared_bytes(k: &Kernel, target: Target) -> usize {
    warp_layout(k, target).map_or(0, |l| l.dynamic_shared_bytes())
}

/// The launch contract of kernel `k` on `target` that the plan records (one layout decision
/// for the block, the scratch and the dynamic shared memory).
pub fn gpu_launch(k: &Kernel, target: Target) -> lamina_ir::plan::GpuLaunch {
    let layout = warp_layout(k, target);
    lamina_ir::plan::GpuLaunch {
        block: layout.map_or_else(|| block_size(k, target), |l| l.block()),
        lanes: program_threads(k, target),
        scratch_bytes: layout.map_or(0, |l| l.scratch_bytes()) as u64,
        dynamic_shared_bytes: layout.map_or(0, |l| l.dynamic_shared_bytes()) as u32,
        abi: lamina_ir::plan::GPU_ABI.into(),
    }
}

/// Threads per program of `k` on `target`: [`lanes`], times the warps of a program of
/// several warps ([`program_warps`]).
pub fn program_threads(k: &Kernel, target: Target) -> u32 {
    warp_layout(k, target).map_or_else(|| lanes(k), |l| l.program_threads())
}

/// Most scratch bytes one program may use.
pub const SCRATCH_BUDGET: usize = 16 << 20;

/// How kernel `k` is mapped onto `target`: staged tiles use `wgmma` on sm_90a.
pub fn flavor(k: &Kernel, target: Target) -> crate::mlir::Flavor {
    let layout = warp_layout(k, target);
    crate::mlir::Flavor::Gpu {
        block: match layout {
            Some(l) => l.block(),
            None => block_size(k, target),
        },
        lanes: lanes(k),
        warps: layout.map_or(1, |l| l.program_warps),
        wgmma: target == Target::Sm90a,
        shared_locals: layout.map(|l| l.locals),
        staging: layout.map_or(0, |l| l.staging),
        group_staging: layout.map_or(0, |l| l.group_staging),
    }
}

/// Bytes of each warp's slice of shared memory that stage its MMA operands through `cp.async`
/// ([`crate::mlir::lower::warp_stage`]): as many stages of its largest tile as fit (2 to 4)
/// beside its locals (if they live in static shared memory) in a quarter of
/// [`SHARED_LOCALS_BUDGET`] ([`warp_layout`]); 0 when not even 2 fit or no operand is staged
/// from global memory, and the fragments are loaded straight from the operands.
pub fn warp_staging_bytes(k: &Kernel, target: Target) -> usize {
    warp_layout(k, target).map_or(0, |l| l.staging)
}

/// How long a PTX compilation took.
#[derive(Debug, Default, Clone)]
pub struct PtxTimings {
    pub lower: Duration,
    pub passes: Duration,
}

/// PTX for `kernels` (one module, one `.entry` per kernel) for `target`.
pub fn compile_ptx(
    kernels: &[Kernel],
    target: Target,
) -> Result<(String, PtxTimings), TargetError> {
    for k in kernels {
        if scratch_bytes(k, target) > SCRATCH_BUDGET {
            return Err(TargetError::Kernel(format!(
                "{}: {} bytes of per-program scratch, over the budget of {SCRATCH_BUDGET}",
                k.name,
                scratch_bytes(k, target)
            )));
        }
        if lanes(k) == 1 && k.local_bytes() > LOCAL_BUDGET {
            return Err(TargetError::Kernel(format!(
                "{}: {} bytes of per-program locals, over the {target} per-thread local memory \
                 limit of {LOCAL_BUDGET}",
                k.name,
                k.local_bytes()
            )));
        }
    }
    let mut t = PtxTimings::default();
    let cx = MlirContext::new();
    let start = Instant::now();
    let mut module = gpu_module(&cx, kernels, target, &|k| flavor(k, target))?;
    t.lower = start.elapsed();
    let start = Instant::now();
    cx.run_pipeline(&mut module, GPU_PIPELINE, &format!("{target} lowering"))?;
    t.passes = start.elapsed();
    let body = module.body();
    let binary = body
        .first_operation()
        .filter(|op| op.name().as_string_ref().as_str() == Ok("gpu.binary"))
        .ok_or_else(|| TargetError::Mlir("the NVVM pipeline produced no gpu.binary".into()))?;
    let objects = binary
        .attribute("objects")
        .map_err(|e| TargetError::Mlir(format!("gpu.binary: {e}")))?;
    // SAFETY: plain C API reads of attributes owned by `module`, which outlives them; the
    // string is copied before the module is dropped.
    let ptx = unsafe {
        let object = mlir_sys::mlirArrayAttrGetElement(objects.to_raw(), 0);
        if !mlir_sys::mlirAttributeIsAGPUObjectAttr(object) {
            return Err(TargetError::Mlir("gpu.binary holds no #gpu.object".into()));
        }
        let s = mlir_sys::mlirGPUObjectAttrGetObject(object);
        let bytes = std::slice::from_raw_parts(s.data as *const u8, s.length);
        String::from_utf8_lossy(bytes).into_owned()
    };
    if !ptx.contains(".entry") && !kernels.is_empty() {
        return Err(TargetError::Mlir("the PTX holds no kernel entry".into()));
    }
    Ok((ptx, t))
}

/// What `ptxas -v` reports for one kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Resources {
    pub kernel: String,
    pub registers: u32,
    /// Bytes of stack frame (local memory: per-program locals and spills).
    pub stack: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    /// Static shared memory, bytes.
    pub shared: u32,
    /// Constant bank 0 bytes (parameters).
    pub cmem: u32,
}

impl Resources {
    /// Blocks of `block` threads launched with `dynamic` bytes of dynamic shared memory
    /// resident on one SM of `target`: the fewest that its registers (ignoring the allocation
    /// granularity, which can only lower it by one warp's worth), its shared memory (each
    /// block's static and dynamic bytes plus the 1 KiB the driver reserves), its 2048 threads
    /// and its 32 blocks allow.
    pub fn blocks_per_sm(&self, block: u32, dynamic: u32, target: Target) -> u32 {
        let by_registers = match self.registers {
            0 => u32::MAX,
            r => REGISTERS_PER_SM / (r * block.max(1)),
        };
        let by_shared = match self.shared + dynamic {
            0 => u32::MAX,
            s => shared_per_sm(target) / (s + 1024),
        };
        by_registers.min(by_shared).min(2048 / block.max(1)).min(32)
    }
}

/// Shared memory of one SM on the target (sm_90: 228 KiB, sm_80: 164 KiB).
pub fn shared_per_sm(target: Target) -> u32 {
    match target {
        Target::Sm90a => 228 << 10,
        _ => 164 << 10,
    }
}

/// `ptxas`: `$LAMINA_PTXAS`, the bootstrap's `.tools/bin/ptxas`, or one on `PATH`.
pub fn ptxas_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LAMINA_PTXAS") {
        return Some(PathBuf::from(p));
    }
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/ptxas");
    if bundled.exists() {
        return Some(bundled);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("ptxas"))
        .find(|p| p.exists())
}

/// Assembles `ptx` for `target` with `ptxas -v` and returns every kernel's resources. Errors
/// carry ptxas's own messages.
pub fn ptxas(ptx: &str, target: Target) -> Result<Vec<Resources>, TargetError> {
    assemble(ptx, target).map(|(_, resources)| resources)
}

/// Assembles `ptx` for `target` with `ptxas -v`: the cubin (SASS for the target's chip, what
/// a GPU artifact ships beside its PTX so that loading it needs no driver JIT) and every
/// kernel's resources. Errors carry ptxas's own messages.
pub fn assemble(ptx: &str, target: Target) -> Result<(Vec<u8>, Vec<Resources>), TargetError> {
    let (chip, _) = target
        .nvptx()
        .ok_or_else(|| TargetError::Unavailable(format!("{target} is not an NVPTX target")))?;
    let exe = ptxas_path().ok_or_else(|| {
        TargetError::Unavailable(
            "ptxas not found (set LAMINA_PTXAS, run scripts/bootstrap, or put it on PATH)".into(),
        )
    })?;
    let dir = tempfile_dir()?;
    let input = dir.join("kernels.ptx");
    let cubin = dir.join("kernels.cubin");
    let run = || -> Result<(Vec<u8>, Vec<Resources>), TargetError> {
        std::fs::write(&input, ptx)
            .map_err(|e| TargetError::Assemble(format!("{}: {e}", input.display())))?;
        let output = Command::new(&exe)
            .arg(format!("-arch={chip}"))
            .arg("-v")
            .arg("-warn-spills")
            .arg(&input)
            .arg("-o")
            .arg(&cubin)
            .output()
            .map_err(|e| TargetError::Assemble(format!("running {}: {e}", exe.display())))?;
        let log = String::from_utf8_lossy(&output.stderr).into_owned()
            + &String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            return Err(TargetError::Assemble(format!(
                "ptxas -arch={chip} rejected the PTX: {}",
                log.trim()
            )));
        }
        let bytes = std::fs::read(&cubin).map_err(|e| {
            TargetError::Assemble(format!("ptxas's output {}: {e}", cubin.display()))
        })?;
        if !bytes.starts_with(b"\x7fELF") {
            return Err(TargetError::Assemble(format!(
                "ptxas -arch={chip} wrote {} bytes that are not an ELF cubin",
                bytes.len()
            )));
        }
        Ok((bytes, parse_ptxas(&log)))
    };
    let r = run();
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn tempfile_dir() -> Result<PathBuf, TargetError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "lamina-ptxas-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)
        .map_err(|e| TargetError::Link(format!("{}: {e}", dir.display())))?;
    Ok(dir)
}

/// Parses `ptxas -v` output: per kernel, "Compiling entry function 'k'", "N bytes stack
/// frame, N bytes spill stores, N bytes spill loads", "Used N registers, ... N bytes smem,
/// N bytes cmem[0]".
pub fn parse_ptxas(log: &str) -> Vec<Resources> {
    let mut out: Vec<Resources> = Vec::new();
    let num = |line: &str, before: &str| -> u32 {
        let Some(at) = line.find(before) else {
            return 0;
        };
        line[..at]
            .trim_end()
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|d| d.parse().ok())
            .unwrap_or(0)
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(Resources {
                kernel: name,
                ..Resources::default()
            });
            continue;
        }
        let Some(r) = out.last_mut() else { continue };
        if line.contains("stack frame") {
            r.stack = num(line, " bytes stack frame");
            r.spill_stores = num(line, " bytes spill stores");
            r.spill_loads = num(line, " bytes spill loads");
        } else if line.contains("Used ") && line.contains("registers") {
            r.registers = num(line, " registers");
            r.shared = num(line, " bytes smem");
            r.cmem = num(line, " bytes cmem[0]");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_verbose_output() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'rmsnorm_0' for 'sm_90a'\n\
ptxas info    : Function properties for rmsnorm_0\n\
    64 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 40 registers, used 0 barriers, 1024 bytes smem, 392 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'add_1' for 'sm_90a'\n\
ptxas info    : Function properties for add_1\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 10 registers, used 0 barriers, 376 bytes cmem[0]\n";
        let r = parse_ptxas(log);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            Resources {
                kernel: "rmsnorm_0".into(),
                registers: 40,
                stack: 64,
                spill_stores: 8,
                spill_loads: 12,
                shared: 1024,
                cmem: 392,
            }
        );
        assert_eq!(
            (r[1].kernel.as_str(), r[1].registers, r[1].shared),
            ("add_1", 10, 0)
        );
        // 10 registers would allow 51 blocks of 128 threads: the SM's 2048 threads allow 16.
        assert_eq!(r[1].blocks_per_sm(128, 0, Target::Sm90a), 16);
        assert_eq!(r[0].blocks_per_sm(128, 0, Target::Sm90a), 12);
        // 48 KiB of shared memory per block: 4 fit an sm_90 SM's 228 KiB, 3 an sm_80's 164.
        let shared = Resources {
            shared: 48 << 10,
            ..r[1].clone()
        };
        assert_eq!(shared.blocks_per_sm(128, 0, Target::Sm90a), 4);
        assert_eq!(shared.blocks_per_sm(128, 0, Target::Sm80), 3);
        // Dynamic shared memory counts alike: 48 KiB static and 64 KiB dynamic, 2 per sm_90 SM.
        assert_eq!(shared.blocks_per_sm(128, 64 << 10, Target::Sm90a), 2);
    }
}
