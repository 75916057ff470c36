//! Kernel IR → MLIR upstream dialects (func/gpu, scf, arith, math, memref, llvm intrinsics).
//!
//! The program body is lowered the same way for every target; only the frame around it
//! differs ([`Flavor`]):
//! - host: `func.func @name(%buf: memref<?xT>..., %rows: index, %lo: index, %hi: index)`
//!   runs programs `lo..hi` of the flattened grid in a loop (the host runtime splits the grid
//!   between threads);
//! - GPU: `gpu.func @name(%buf: memref<GPU_EXTENTxT>..., %scratch: memref<GPU_EXTENTxi8>,
//!   %rows: index) kernel` runs one program per `lanes` consecutive threads (1, or a warp):
//!   program `(blockIdx.x · blockDim.x + threadIdx.x) / lanes`, masked against the grid's size.
//!   A warp program deals its split loops and reductions to its lanes (see [`Flavor::Gpu`]).
//!   Buffers are statically shaped so that the bare-pointer calling convention applies (one
//!   `.u64` pointer per buffer); the extent is never used for addressing.
//!   Transcendentals become the PTX approximations (`ex2`, `lg2`, `sin`, `cos`, `rsqrt`),
//!   as Triton's fast math does, so no libdevice is needed.
//!
//! Buffers are flat memrefs indexed with constant row-major strides; locals are stack
//! allocations made once at function entry (GPU thread programs: per-thread local memory; GPU
//! warp programs: a slice of the block's static or dynamic shared memory per warp, or a slice
//! of the scratch buffer per program, as [`crate::nvptx::warp_layout`] decides). Every operation
//! carries a location naming the kernel, its graph nodes and the statement, so diagnostics
//! point back at the source.

use std::collections::HashMap;

use lamina_ir::kernel::{BinOp, CmpOp, Dim, Elem, Expr, Kernel, ReduceOp, Stmt, UnOp};
use melior::dialect::arith::{CmpfPredicate, CmpiPredicate};
use melior::dialect::{arith, func, memref, scf};
use melior::ir::attribute::{FloatAttribute, IntegerAttribute, StringAttribute, TypeAttribute};
use melior::ir::operation::OperationBuilder;
use melior::ir::r#type::{FunctionType, IntegerType, MemRefType};
use melior::ir::{
    Attribute, Block, BlockLike, Identifier, Location, Operation, Region, RegionLike, Type, Value,
};
use melior::Context;

use crate::TargetError;

pub mod attend;
mod deal;
pub mod group;
mod mma;
#[cfg(test)]
pub(crate) use mma::row_blocks;
pub mod staged;
pub mod warp_stage;
pub use mma::{a_fragment, b_fragment, c_fragment};

/// The static extent of GPU buffer parameters (2^40 elements): it only makes the memref type
/// static, which the bare-pointer calling convention requires; indices are computed from the
/// kernel's own strides and never checked against it.
pub const GPU_EXTENT: i64 = 1 << 40;

/// The GPU module's external shared array that kernels with dynamic shared memory address
/// (declared by [`super::gpu_module`]).
pub const DYNAMIC_SHARED: &str = "lamina_dynamic_shared";

/// Iterations per trip of a lane's share of a dealt GPU reduction ([`Lower::unrolled_reduce`]).
pub const REDUCE_UNROLL: usize = 8;

/// The bits an f32 keeps as TF32 (sign, exponent, 10 mantissa bits): `0xFFFF_E000`.
const TF32_MASK: i64 = -8192;

/// How programs are mapped onto the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// A loop over a range of programs, called from host threads.
    Host,
    /// As [`Flavor::Host`], its f32 arithmetic without `reassoc, contract`: every sum in
    /// program order, no fused multiply-adds, whatever LLVM vectorises. Slower; for tests that
    /// compare two plans bit for bit (LLVM's reassociation of a reduction depends on the rest
    /// of its loop body, so two kernels computing the same sum may round it differently).
    HostStrict,
    /// `lanes` consecutive GPU threads per program (1, a warp's 32, or a whole block for a
    /// block-cooperative tile: [`staged`]), `block` threads per block; `wgmma`: staged tiles
    /// use sm_90a's warpgroup MMAs (else `mma.sync`). With several lanes, every lane runs the
    /// program's statements (loads of one address are broadcast, stores of one value coincide)
    /// except split loops and reductions, whose iterations are dealt to the lanes (round-robin,
    /// or in blocks of contiguous iterations read by vector loads: [`deal`]) and whose partial
    /// results are combined by a butterfly of warp shuffles, so that every lane holds the same
    /// total after them.
    /// `shared_locals`: where a warp program's locals live (`None` for other programs): a
    /// slice per warp of the block's static or dynamic shared memory, or the scratch buffer
    /// ([`crate::nvptx::warp_layout`]). `staging`: bytes of each warp's slice
    /// that stage its MMA operands ([`warp_stage`]; 0: fragments are loaded from the operands
    /// directly).
    Gpu {
        block: u32,
        lanes: u32,
        /// Warps per program (1, or [`crate::nvptx::PROGRAM_WARPS`]: one program to a block,
        /// its split tile loops dealt to its warps, its parallel split loops to all their
        /// lanes; sums and reductions per warp, over `lanes`; block barriers for warp barriers).
        warps: u32,
        wgmma: bool,
        shared_locals: Option<crate::nvptx::LocalsIn>,
        staging: usize,
        /// Bytes of a program's warpgroup staging area ([`group`]: the B operands of its
        /// `wgmma` tiles; 0: every tile runs on `mma.sync`).
        group_staging: usize,
    },
    /// The host frame, with split loops and reductions run as `lanes` lanes would on a GPU:
    /// lane by lane (each lane's iterations as the GPU deals them), partials added in lane
    /// order. Tests compare it with [`Flavor::Host`] to check the GPU's split arithmetic
    /// on the CPU.
    HostLanes(u32),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ty {
    F32,
    Int,
    Bool,
}

#[derive(Clone)]
struct BufInfo<'c, 'a> {
    value: Value<'c, 'a>,
    elem: Elem,
    /// Row-major strides (a local has `[1]`).
    strides: Vec<usize>,
    /// A local in the block's shared memory (else global: a parameter, a local in scratch, or
    /// a thread's local memory).
    shared: bool,
}

#[derive(Clone)]
struct Env<'c, 'a> {
    vars: HashMap<String, (Value<'c, 'a>, Ty)>,
    bufs: HashMap<String, BufInfo<'c, 'a>>,
    pids: Vec<Value<'c, 'a>>,
    rows: Value<'c, 'a>,
    /// This thread's lane in its program (GPU programs of several lanes; in its warp for a
    /// program of several warps).
    lane: Option<Value<'c, 'a>>,
    /// This thread's warp in its program (programs of several warps).
    warp: Option<Value<'c, 'a>>,
    /// The block's shared memory (block-cooperative programs, [`staged`]).
    smem: Option<Value<'c, 'a>>,
    /// A warp program's MMA staging: the block's shared memory, the byte offset of this warp's
    /// staging area in it, and the area's bytes ([`warp_stage`]).
    warp_stage: Option<(Value<'c, 'a>, Value<'c, 'a>, usize)>,
    /// A program's warpgroup staging area: the block's shared memory, the byte offset of the
    /// area in it, and its bytes ([`group`]).
    group_stage: Option<(Value<'c, 'a>, Value<'c, 'a>, usize)>,
    /// The kernel's `let` definitions (alignment proofs of staged operands).
    lets: std::rc::Rc<warp_stage::Lets>,
    /// Inside a lane's block of a blocked deal ([`deal`]): the values of this iteration's
    /// contiguous loads, already read as vectors.
    blocked: Option<std::rc::Rc<Vec<(Expr, Value<'c, 'a>)>>>,
}

struct Lower<'c> {
    ctx: &'c Context,
    index: Type<'c>,
    f32: Type<'c>,
    i64: Type<'c>,
    i1: Type<'c>,
    fastmath: Attribute<'c>,
    loc: Location<'c>,
    gpu: bool,
    /// Staged tiles on warpgroup MMAs (sm_90a).
    wgmma: bool,
    /// Threads per program (1 on the host), or per warp of a program of several warps: the
    /// lanes its sums and reductions are dealt to.
    lanes: u32,
    /// Warps per program (GPU warp programs: [`Flavor::Gpu`]).
    warps: u32,
    /// Inside a split loop or reduction: lanes already differ, nothing more is split.
    in_split: bool,
    /// Inside a split tile loop of a program of several warps: each warp runs its own tiles,
    /// so barriers are the warp's.
    in_tiles: bool,
}

type R<T> = Result<T, TargetError>;

fn bug(msg: String) -> TargetError {
    TargetError::Mlir(msg)
}

/// Emits `kernel` into `into`: a `func.func` (host; `into` is a module's body) or a
/// `gpu.func` (GPU; `into` is a `gpu.module`'s body).
pub fn lower_kernel<'c>(ctx: &'c Context, into: &Block<'c>, k: &Kernel, flavor: Flavor) -> R<()> {
    let what = if k.nodes.is_empty() {
        k.name.clone()
    } else {
        format!("{} [{}]", k.name, k.nodes.join(", "))
    };
    let loc = Location::new(ctx, &format!("kernel {what}"), 1, 0);
    let l = Lower {
        ctx,
        index: Type::index(ctx),
        f32: Type::float32(ctx),
        i64: IntegerType::new(ctx, 64).into(),
        i1: IntegerType::new(ctx, 1).into(),
        fastmath: Attribute::parse(
            ctx,
            if flavor == Flavor::HostStrict {
                "#arith.fastmath<none>"
            } else {
                "#arith.fastmath<reassoc,contract>"
            },
        )
        .ok_or_else(|| bug("fastmath attribute".into()))?,
        loc,
        gpu: matches!(flavor, Flavor::Gpu { .. }),
        wgmma: matches!(flavor, Flavor::Gpu { wgmma: true, .. }),
        lanes: match flavor {
            Flavor::Host | Flavor::HostStrict => 1,
            Flavor::Gpu { lanes, .. } | Flavor::HostLanes(lanes) => lanes.max(1),
        },
        warps: match flavor {
            Flavor::Gpu { warps, .. } => warps.max(1),
            _ => 1,
        },
        in_split: false,
        in_tiles: false,
    };
    let mut arg_types = Vec::new();
    for p in &k.params {
        arg_types.push(l.memref(p.elem));
    }
    if l.gpu {
        // GPU: the scratch buffer (locals of warp programs), then rows.
        arg_types.push(MemRefType::new(l.i8(), &[GPU_EXTENT], None, None).into());
        arg_types.push(l.index);
    } else {
        // Host: rows, then the program range lo..hi.
        arg_types.extend([l.index, l.index, l.index]);
    }
    // Locals, sized for their largest use.
    let (layout, per_program) = local_layout(k);
    // A warp program's slice of the block's shared memory: its locals (when they live there),
    // then its warps' MMA staging areas; (bytes per slice, per block, of locals). Dynamic
    // shared memory (sized by the launch) holds the slices when the locals were placed there.
    use crate::nvptx::LocalsIn;
    let dynamic_shared = matches!(
        flavor,
        Flavor::Gpu {
            lanes: crate::nvptx::WARP,
            shared_locals: Some(LocalsIn::DynamicShared),
            ..
        }
    );
    let warp_slice = match flavor {
        Flavor::Gpu {
            block,
            lanes,
            warps,
            shared_locals,
            staging,
            group_staging,
            ..
        } if lanes == crate::nvptx::WARP => {
            let locals = match shared_locals {
                Some(LocalsIn::StaticShared | LocalsIn::DynamicShared) => per_program,
                Some(LocalsIn::Scratch) | None => 0,
            };
            // A program's slice: its locals, then each of its warps' staging areas, then its
            // warpgroup staging area (`WarpLayout::slice_bytes`).
            let group_at =
                crate::nvptx::group_area_at(locals + warps as usize * staging, group_staging);
            let per_slice = (group_at + group_staging).next_multiple_of(16);
            if warps > 1 && block != lanes * warps {
                return Err(bug(format!(
                    "{what}: a program of {warps} warps must be its whole block, not {block} threads"
                )));
            }
            let bytes = per_slice * (block / (lanes * warps)) as usize;
            let budget = if dynamic_shared {
                lamina_ir::plan::MAX_DYNAMIC_SHARED as usize
            } else {
                crate::nvptx::SHARED_LOCALS_BUDGET
            };
            if bytes > budget {
                return Err(bug(format!(
                    "{what}: {bytes} bytes of locals and staging per block, over the shared budget of {budget}"
                )));
            }
            (per_slice > 0).then_some((per_slice, bytes, locals, group_at))
        }
        _ => None,
    };
    let shared_locals = warp_slice.is_some_and(|(_, _, locals, _)| locals > 0);
    // A block-cooperative program: its shared memory, a workgroup attribution (an entry-block
    // argument after the function's); or a warp program's slices, likewise.
    let staged_program = l.gpu && l.lanes == staged::LANES;
    let shared: Option<Type> = if dynamic_shared {
        None
    } else if let Some((_, bytes, _, _)) = warp_slice {
        let space = staged::workgroup_space(ctx)?;
        Some(MemRefType::new(l.i8(), &[bytes as i64], None, Some(space)).into())
    } else if staged_program {
        let bytes = match (staged::staged_tile(k), attend::attend_block(k)) {
            (Some(tile), _) => staged::shared_bytes(tile),
            (None, Some(a)) => attend::shared_bytes(a),
            (None, None) => {
                return Err(bug(format!(
                    "{what}: {} threads per program, but neither a block-cooperative tile nor an attention block",
                    l.lanes
                )))
            }
        } as i64;
        if !matches!(flavor, Flavor::Gpu { block, .. } if block == staged::LANES) {
            return Err(bug(format!(
                "{what}: a block-cooperative program must be its whole block ({} threads)",
                staged::LANES
            )));
        }
        let space = staged::workgroup_space(ctx)?;
        Some(MemRefType::new(l.i8(), &[bytes], None, Some(space)).into())
    } else {
        None
    };
    let mut block_types: Vec<Type> = arg_types.clone();
    block_types.extend(shared);
    let entry = Block::new(&block_types.iter().map(|&t| (t, loc)).collect::<Vec<_>>());
    let n = k.params.len();
    let arg = |i: usize| -> R<Value> {
        entry
            .argument(i)
            .map(Into::into)
            .map_err(|e| bug(format!("argument {i}: {e}")))
    };
    let rows = arg(if l.gpu { n + 1 } else { n })?;
    // The warp slices' shared memory: the workgroup attribution, or the dynamic shared memory.
    let warp_smem = match warp_slice {
        Some(_) if dynamic_shared => {
            let space = staged::workgroup_space(ctx)?;
            let ty = MemRefType::new(l.i8(), &[0], None, Some(space));
            let op = OperationBuilder::new("memref.get_global", loc)
                .add_attributes(&[(
                    Identifier::new(ctx, "name"),
                    Attribute::parse(ctx, &format!("@{DYNAMIC_SHARED}"))
                        .ok_or_else(|| bug("dynamic shared symbol".into()))?,
                )])
                .add_results(&[ty.into()])
                .build()
                .map_err(|e| bug(format!("{what}: memref.get_global: {e}")))?;
            Some(l.append(&entry, op))
        }
        Some(_) => Some(arg(n + 2)?),
        None => None,
    };
    let mut bufs = HashMap::new();
    for (i, p) in k.params.iter().enumerate() {
        let mut strides = vec![1usize; p.shape.len()];
        for d in (0..p.shape.len().saturating_sub(1)).rev() {
            let next = match p.shape[d + 1] {
                Dim::N(s) => s,
                Dim::Rows | Dim::RowBlocks(_) => {
                    return Err(bug(format!("{}: R inside a shape", p.name)))
                }
            };
            strides[d] = strides[d + 1] * next;
        }
        bufs.insert(
            p.name.clone(),
            BufInfo {
                value: arg(i)?,
                elem: p.elem,
                strides,
                shared: false,
            },
        );
    }
    // Host: for p in lo..hi. GPU: p = blockIdx.x · blockDim.x + threadIdx.x, if p < programs.
    let gpu_pid = if l.gpu {
        let bid = l.gpu_index(&entry, "gpu.block_id")?;
        let bdim = l.gpu_index(&entry, "gpu.block_dim")?;
        let tid = l.gpu_index(&entry, "gpu.thread_id")?;
        let base = l.op(&entry, "arith.muli", &[bid, bdim], l.index, false);
        let thread = l.op(&entry, "arith.addi", &[base, tid], l.index, false);
        if l.lanes > 1 {
            let lanes = l.const_index(&entry, l.lanes as i64);
            let threads = l.const_index(&entry, (l.lanes * l.warps) as i64);
            let p = l.op(&entry, "arith.divui", &[thread, threads], l.index, false);
            let lane = l.op(&entry, "arith.remui", &[thread, lanes], l.index, false);
            Some((p, Some(lane)))
        } else {
            Some((thread, None))
        }
    } else {
        None
    };
    // Host and thread programs: locals are stack slots allocated at entry (an alloca inside
    // the program loop would grow the stack every iteration). Warp programs: one copy per
    // program (per-lane local memory would be reserved for every resident thread), which all
    // lanes write alike between warp barriers: the warp's slice of the block's shared memory,
    // or the program's slice of the scratch buffer.
    // The program's slot in its block, and (programs of several warps) the thread's warp in
    // its program.
    let warp_in_program = match gpu_pid {
        Some((_, Some(_))) if l.warps > 1 => {
            let tid = l.gpu_index(&entry, "gpu.thread_id")?;
            let lanes = l.const_index(&entry, l.lanes as i64);
            let w = l.op(&entry, "arith.divui", &[tid, lanes], l.index, false);
            let warps = l.const_index(&entry, l.warps as i64);
            Some(l.op(&entry, "arith.remui", &[w, warps], l.index, false))
        }
        _ => None,
    };
    let warp_base = match (gpu_pid, warp_slice) {
        (Some((_, Some(_))), Some((per_slice, _, _, _))) => {
            let tid = l.gpu_index(&entry, "gpu.thread_id")?;
            let threads = l.const_index(&entry, (l.lanes * l.warps) as i64);
            let slot = l.op(&entry, "arith.divui", &[tid, threads], l.index, false);
            let size = l.const_index(&entry, per_slice as i64);
            Some(l.op(&entry, "arith.muli", &[slot, size], l.index, false))
        }
        _ => None,
    };
    let scratch_base = match gpu_pid {
        Some((_, Some(_))) if shared_locals => warp_base,
        Some((p, Some(_))) if per_program > 0 => {
            let size = l.const_index(&entry, per_program as i64);
            Some(l.op(&entry, "arith.muli", &[p, size], l.index, false))
        }
        _ => None,
    };
    let (space, source) = if shared_locals {
        (
            Some(staged::workgroup_space(ctx)?),
            warp_smem.ok_or_else(|| bug(format!("{what}: shared locals without a slice")))?,
        )
    } else {
        (None, arg(n)?)
    };
    let warp_stage = match (warp_base, flavor) {
        (Some(base), Flavor::Gpu { staging, .. }) if staging > 0 => {
            let locals = warp_slice.map_or(0, |(_, _, locals, _)| locals);
            let off = l.const_index(&entry, locals as i64);
            let mut at = l.op(&entry, "arith.addi", &[base, off], l.index, false);
            // Each warp of a program stages its own tiles.
            if let Some(w) = warp_in_program {
                let size = l.const_index(&entry, staging as i64);
                let skip = l.op(&entry, "arith.muli", &[w, size], l.index, false);
                at = l.op(&entry, "arith.addi", &[at, skip], l.index, false);
            }
            Some((
                warp_smem.ok_or_else(|| bug(format!("{what}: staging without a slice")))?,
                at,
                staging,
            ))
        }
        _ => None,
    };
    let group_stage = match (warp_base, warp_slice, flavor) {
        (Some(base), Some((_, _, _, group_at)), Flavor::Gpu { group_staging, .. })
            if group_staging > 0 =>
        {
            let off = l.const_index(&entry, group_at as i64);
            Some((
                warp_smem.ok_or_else(|| bug(format!("{what}: group staging without a slice")))?,
                l.op(&entry, "arith.addi", &[base, off], l.index, false),
                group_staging,
            ))
        }
        _ => None,
    };
    for (name, elem, len, offset) in &layout {
        let ty = MemRefType::new(l.elem(*elem), &[*len as i64], None, space);
        let value: Value = match scratch_base {
            Some(base) => {
                let off = l.const_index(&entry, *offset as i64);
                let at = l.op(&entry, "arith.addi", &[base, off], l.index, false);
                let view = OperationBuilder::new("memref.view", loc)
                    .add_operands(&[source, at])
                    .add_results(&[ty.into()])
                    .build()
                    .map_err(|e| bug(format!("{what}: memref.view: {e}")))?;
                entry
                    .append_operation(view)
                    .result(0)
                    .map_err(|e| bug(e.to_string()))?
                    .into()
            }
            None => entry
                .append_operation(memref::alloca(ctx, ty, &[], &[], None, loc))
                .result(0)
                .map_err(|e| bug(e.to_string()))?
                .into(),
        };
        bufs.insert(
            name.clone(),
            BufInfo {
                value,
                elem: *elem,
                strides: vec![1],
                shared: shared_locals,
            },
        );
    }
    let loop_var = [(l.index, loc)];
    let body = Block::new(if l.gpu { &[] } else { &loop_var[..] });
    {
        let (p, lane): (Value, _) = match gpu_pid {
            Some(p) => p,
            None => (
                body.argument(0).map_err(|e| bug(e.to_string()))?.into(),
                None,
            ),
        };
        let mut env = Env {
            vars: HashMap::new(),
            bufs: bufs.clone(),
            pids: Vec::new(),
            rows,
            lane,
            warp: warp_in_program,
            smem: match shared {
                Some(_) if staged_program => Some(arg(n + 2)?),
                _ => None,
            },
            warp_stage,
            group_stage,
            lets: std::rc::Rc::new(warp_stage::lets(k)),
            blocked: None,
        };
        // pids from p, last axis fastest.
        let mut pids = vec![p; k.grid.len()];
        let mut rest = p;
        for ax in (1..k.grid.len()).rev() {
            let ext = l.dim(&body, k.grid[ax], rows);
            pids[ax] = l.op(&body, "arith.remui", &[rest, ext], l.index, false);
            rest = l.op(&body, "arith.divui", &[rest, ext], l.index, false);
        }
        pids[0] = rest;
        env.pids = pids;
        let mut line = 1;
        l.block(&body, &mut env, &k.body, &what, &mut line)?;
        body.append_operation(scf::r#yield(&[], loc));
    }
    let region = Region::new();
    region.append_block(body);
    let fregion = Region::new();
    match flavor {
        Flavor::Host | Flavor::HostStrict | Flavor::HostLanes(_) => {
            let (lo, hi) = (arg(n + 1)?, arg(n + 2)?);
            let one = l.const_index(&entry, 1);
            entry.append_operation(scf::r#for(lo, hi, one, region, loc));
            entry.append_operation(func::r#return(&[], loc));
            fregion.append_block(entry);
            let fty = FunctionType::new(ctx, &arg_types, &[]);
            into.append_operation(func::func(
                ctx,
                StringAttribute::new(ctx, &k.name),
                TypeAttribute::new(fty.into()),
                fregion,
                &[],
                loc,
            ));
        }
        // No `known_block_size`: its `.maxntid` makes ptxas trade registers for local-memory
        // spills in the chunked kernels. The block size must be the plan's nonetheless: a
        // block-cooperative tile is exactly one block, and a warp program with shared locals
        // finds its slice at `(threadIdx.x / threads per program) · slice` of shared memory
        // sized for the plan's block (more threads would address past it).
        Flavor::Gpu { .. } => {
            let mut total = l.const_index(&entry, 1);
            for &d in &k.grid {
                let e = l.dim(&entry, d, rows);
                total = l.op(&entry, "arith.muli", &[total, e], l.index, false);
            }
            let (p, _) = gpu_pid.expect("GPU flavor has a pid");
            let inside = l.append(&entry, arith::cmpi(ctx, CmpiPredicate::Ult, p, total, loc));
            entry.append_operation(scf::r#if(inside, &[], region, Region::new(), loc));
            entry.append_operation(
                OperationBuilder::new("gpu.return", loc)
                    .build()
                    .map_err(|e| bug(format!("gpu.return: {e}")))?,
            );
            fregion.append_block(entry);
            let fty = FunctionType::new(ctx, &arg_types, &[]);
            let unit = Attribute::unit(ctx);
            let mut attrs = vec![
                (
                    Identifier::new(ctx, "sym_name"),
                    StringAttribute::new(ctx, &k.name).into(),
                ),
                (
                    Identifier::new(ctx, "function_type"),
                    TypeAttribute::new(fty.into()).into(),
                ),
                (Identifier::new(ctx, "gpu.kernel"), unit),
            ];
            if shared.is_some() {
                // One workgroup attribution, 16-byte aligned (cp.async writes 16 bytes).
                let parse = |text: &str| {
                    Attribute::parse(ctx, text).ok_or_else(|| bug(format!("attribute {text}")))
                };
                attrs.push((
                    Identifier::new(ctx, "workgroup_attributions"),
                    parse("1 : i64")?,
                ));
                attrs.push((
                    Identifier::new(ctx, "workgroup_attrib_attrs"),
                    parse("[{llvm.align = 16 : i64}]")?,
                ));
            }
            let op = OperationBuilder::new("gpu.func", loc)
                .add_attributes(&attrs)
                .add_regions([fregion])
                .build()
                .map_err(|e| bug(format!("{what}: gpu.func: {e}")))?;
            into.append_operation(op);
        }
    }
    Ok(())
}

/// Whether a split loop's body is a tile loop's: `let`s and tensor-core tiles only (at least
/// one), as `build::mma_tiles` makes them.
pub fn tile_loop(body: &[Stmt]) -> bool {
    body.iter().any(|s| matches!(s, Stmt::Mma(_)))
        && body
            .iter()
            .all(|s| matches!(s, Stmt::Let(..) | Stmt::Mma(_)))
}

/// Every local of `k` (after tile expansion) with its byte offset in a program's copy
/// (16-byte aligned, as a `cp.async` source must be), and the bytes per program: the GPU's warp programs lay out their locals so,
/// in a slice of the block's shared memory or of the scratch buffer.
pub fn local_layout(k: &Kernel) -> (Vec<(String, Elem, usize, usize)>, usize) {
    let mut locals = Vec::new();
    collect_locals(&k.body, &mut locals);
    let mut offset = 0;
    let layout = locals
        .into_iter()
        .map(|(name, elem, len)| {
            let at = offset;
            offset += (len * elem.bytes()).next_multiple_of(16);
            (name, elem, len, at)
        })
        .collect();
    (layout, offset)
}

fn collect_locals(b: &[Stmt], out: &mut Vec<(String, Elem, usize)>) {
    for s in b {
        match s {
            Stmt::Local { name, elem, len } => {
                if let Some(e) = out.iter_mut().find(|e| &e.0 == name && e.1 == *elem) {
                    e.2 = e.2.max(*len);
                } else {
                    out.push((name.clone(), *elem, *len));
                }
            }
            Stmt::For { body, .. } => collect_locals(body, out),
            Stmt::If { then, .. } => collect_locals(then, out),
            Stmt::Let(..) | Stmt::Store { .. } | Stmt::Tile(_) | Stmt::Mma(_) | Stmt::Attend(_) => {
            }
        }
    }
}

impl<'c> Lower<'c> {
    fn memref(&self, e: Elem) -> Type<'c> {
        let extent = if self.gpu { GPU_EXTENT } else { i64::MIN };
        MemRefType::new(self.elem(e), &[extent], None, None).into()
    }

    /// `gpu.block_id x` and friends.
    fn gpu_index<'a>(&self, blk: &'a Block<'c>, name: &str) -> R<Value<'c, 'a>> {
        let dim = Attribute::parse(self.ctx, "#gpu<dim x>")
            .ok_or_else(|| bug("#gpu<dim x> attribute".into()))?;
        let op = OperationBuilder::new(name, self.loc)
            .add_attributes(&[(Identifier::new(self.ctx, "dimension"), dim)])
            .add_results(&[self.index])
            .build()
            .map_err(|e| bug(format!("{name}: {e}")))?;
        Ok(self.append(blk, op))
    }

    /// A call of the LLVM intrinsic `name` on one f32 (the GPU's transcendentals).
    fn intrinsic<'a>(&self, blk: &'a Block<'c>, name: &str, x: Value<'c, '_>) -> Value<'c, 'a> {
        let segments = Attribute::parse(self.ctx, "array<i32: 1, 0>").expect("segment sizes");
        let bundles = Attribute::parse(self.ctx, "array<i32>").expect("bundle sizes");
        let op = OperationBuilder::new("llvm.call_intrinsic", self.loc)
            .add_operands(&[x])
            .add_results(&[self.f32])
            .add_attributes(&[
                (
                    Identifier::new(self.ctx, "intrin"),
                    StringAttribute::new(self.ctx, name).into(),
                ),
                (Identifier::new(self.ctx, "op_bundle_sizes"), bundles),
                (Identifier::new(self.ctx, "operandSegmentSizes"), segments),
            ])
            .build()
            .expect("valid llvm.call_intrinsic");
        self.append(blk, op)
    }

    fn i8(&self) -> Type<'c> {
        IntegerType::new(self.ctx, 8).into()
    }

    fn elem(&self, e: Elem) -> Type<'c> {
        match e {
            Elem::F32 => self.f32,
            Elem::I64 => self.i64,
            // The host keeps bf16 as its bits ([`Self::bf16_bits_host`]).
            Elem::Bf16 if self.gpu => Type::bfloat16(self.ctx),
            Elem::Bf16 => IntegerType::new(self.ctx, 16).into(),
        }
    }

    fn ty(&self, t: Ty) -> Type<'c> {
        match t {
            Ty::F32 => self.f32,
            Ty::Int => self.index,
            Ty::Bool => self.i1,
        }
    }

    /// Appends a one-result op; float arithmetic gets `reassoc, contract`.
    fn op<'a>(
        &self,
        blk: &'a Block<'c>,
        name: &str,
        operands: &[Value<'c, '_>],
        result: Type<'c>,
        fast: bool,
    ) -> Value<'c, 'a> {
        let mut b = OperationBuilder::new(name, self.loc)
            .add_operands(operands)
            .add_results(&[result]);
        if fast {
            b = b.add_attributes(&[(Identifier::new(self.ctx, "fastmath"), self.fastmath)]);
        }
        self.append(blk, b.build().expect("valid operation"))
    }

    fn append<'a>(&self, blk: &'a Block<'c>, op: Operation<'c>) -> Value<'c, 'a> {
        blk.append_operation(op)
            .result(0)
            .expect("one result")
            .into()
    }

    fn const_index<'a>(&self, blk: &'a Block<'c>, v: i64) -> Value<'c, 'a> {
        self.append(
            blk,
            arith::constant(
                self.ctx,
                IntegerAttribute::new(self.index, v).into(),
                self.loc,
            ),
        )
    }

    fn const_i64<'a>(&self, blk: &'a Block<'c>, v: i64) -> Value<'c, 'a> {
        self.append(
            blk,
            arith::constant(
                self.ctx,
                IntegerAttribute::new(self.i64, v).into(),
                self.loc,
            ),
        )
    }

    fn const_i32<'a>(&self, blk: &'a Block<'c>, v: i64) -> Value<'c, 'a> {
        let i32t: Type = IntegerType::new(self.ctx, 32).into();
        self.append(
            blk,
            arith::constant(self.ctx, IntegerAttribute::new(i32t, v).into(), self.loc),
        )
    }

    fn const_f32<'a>(&self, blk: &'a Block<'c>, v: f64) -> Value<'c, 'a> {
        self.append(
            blk,
            arith::constant(
                self.ctx,
                FloatAttribute::new(self.ctx, self.f32, v).into(),
                self.loc,
            ),
        )
    }

    fn dim<'a>(&self, blk: &'a Block<'c>, d: Dim, rows: Value<'c, 'a>) -> Value<'c, 'a> {
        match d {
            Dim::Rows => rows,
            Dim::N(n) => self.const_index(blk, n as i64),
            Dim::RowBlocks(b) => {
                let b = b as i64;
                let bm1 = self.const_index(blk, b - 1);
                let sum = self.op(blk, "arith.addi", &[rows, bm1], self.index, false);
                let bv = self.const_index(blk, b);
                self.op(blk, "arith.divui", &[sum, bv], self.index, false)
            }
        }
    }

    fn block<'a>(
        &self,
        blk: &'a Block<'c>,
        env: &mut Env<'c, 'a>,
        stmts: &[Stmt],
        what: &str,
        line: &mut usize,
    ) -> R<()> {
        for s in stmts {
            *line += 1;
            self.stmt(blk, env, s, what, line)?;
        }
        Ok(())
    }

    fn with_loc(&self, what: &str, line: usize) -> Lower<'c> {
        Lower {
            loc: Location::new(self.ctx, &format!("kernel {what}"), line, 0),
            ..*self
        }
    }

    fn stmt<'a>(
        &self,
        blk: &'a Block<'c>,
        env: &mut Env<'c, 'a>,
        s: &Stmt,
        what: &str,
        line: &mut usize,
    ) -> R<()> {
        let l = self.with_loc(what, *line);
        match s {
            Stmt::Let(n, e) => {
                let v = l.expr(blk, env, e)?;
                env.vars.insert(n.clone(), v);
            }
            Stmt::Local { .. } => {}
            Stmt::Store { buf, idx, value } => {
                let (v, t) = l.expr(blk, env, value)?;
                let info = env
                    .bufs
                    .get(buf)
                    .cloned()
                    .ok_or_else(|| bug(format!("{what}: unknown buffer {buf}")))?;
                let at = l.linear(blk, env, &info, idx)?;
                // Warp programs: every lane stores the same value; barriers on both sides keep
                // a lane from overwriting what another still reads, and make the value visible.
                let fence = l.gpu && l.lanes > 1 && !l.in_split;
                if fence {
                    l.warp_sync(blk);
                }
                let v = match (info.elem, t) {
                    (Elem::F32, Ty::F32) => v,
                    (Elem::Bf16, Ty::F32) => l.to_bf16(blk, v),
                    (Elem::I64, Ty::Int) => l.op(blk, "arith.index_cast", &[v], l.i64, false),
                    _ => return Err(bug(format!("{what}: store of {t:?} into {buf}"))),
                };
                blk.append_operation(memref::store(v, info.value, &[at], l.loc));
                if fence {
                    l.warp_sync(blk);
                }
            }
            Stmt::For {
                var,
                lo: lo_expr,
                hi: hi_expr,
                carried,
                body,
                yields,
                split,
            } => {
                let (lo, _) = l.expr(blk, env, lo_expr)?;
                let (hi, _) = l.expr(blk, env, hi_expr)?;
                let mut inits = Vec::new();
                let mut tys = Vec::new();
                for (_, e) in carried {
                    let (v, t) = l.expr(blk, env, e)?;
                    inits.push(v);
                    tys.push(t);
                }
                let starts = inits.clone();
                // A split tile loop (independent tensor-core tiles, `build::mma_tiles`): a warp
                // program runs its tiles in order; a program of several warps deals them to its
                // warps (tile `t` to warp `t mod warps`), block barriers around, or runs them
                // in order with all its warps when they are warpgroup tiles.
                if *split && carried.is_empty() && l.gpu && l.lanes > 1 && !l.in_split && tile_loop(body) {
                    // Warpgroup tiles (sm_90a `wgmma`, [`group`]) are each all the warps'.
                    let group = l.wgmma
                        && l.warps > 1
                        && env.group_stage.is_some()
                        && body
                            .iter()
                            .any(|s| matches!(s, Stmt::Mma(m) if group::group_tile(m)));
                    let (start, step, inner) = match env.warp {
                        Some(w) if l.warps > 1 && !group => {
                            l.warp_sync(blk);
                            (
                                l.op(blk, "arith.addi", &[lo, w], l.index, false),
                                l.const_index(blk, l.warps as i64),
                                Lower { in_tiles: true, ..l },
                            )
                        }
                        _ => (lo, l.const_index(blk, 1), Lower { ..l }),
                    };
                    inner.carried_loop(
                        blk,
                        env,
                        var,
                        (start, hi, step),
                        &[],
                        &[],
                        carried,
                        body,
                        yields,
                        what,
                        line,
                    )?;
                    if l.warps > 1 {
                        l.warp_sync(blk);
                    }
                    return Ok(());
                }
                // A split sum over the lanes: each lane takes its share of the iterations (lo + j,
                // lo + j + lanes, ..., or blocks: [`deal`]) from zero partials; the totals are
                // added to the initial values after.
                let spread = *split && l.lanes > 1 && !l.in_split;
                let results = if !spread {
                    let step = l.const_index(blk, 1);
                    // A warp program's sequential loop reads contiguous operands in blocks too.
                    let lookup = |n: &str| l.buffer(env, n);
                    let deal = (l.lanes > 1)
                        .then(|| {
                            deal::carried_deal(
                                var, lo_expr, carried, body, yields, &lookup, &env.lets,
                            )
                        })
                        .flatten()
                        .filter(|d| d.has_rounds(lo_expr, hi_expr, 1));
                    if deal.is_some() {
                        let zero = l.const_index(blk, 0);
                        Lower { lanes: 1, ..l }.lane_split_sum(
                            blk,
                            env,
                            var,
                            (lo, hi),
                            (zero, step),
                            (&inits, &tys),
                            (carried, body, yields),
                            deal.as_ref(),
                            what,
                            line,
                        )?
                    } else {
                        l.carried_loop(
                            blk,
                            env,
                            var,
                            (lo, hi, step),
                            &inits,
                            &tys,
                            carried,
                            body,
                            yields,
                            what,
                            line,
                        )?
                    }
                } else {
                    // A program of several warps deals a parallel loop to all their lanes (a sum
                    // stays each warp's, as in a one-warp program).
                    let all = carried.is_empty() && l.warps > 1;
                    let l = if all {
                        Lower {
                            lanes: l.lanes * l.warps,
                            ..l
                        }
                    } else {
                        l
                    };
                    let inner = Lower {
                        in_split: true,
                        ..l
                    };
                    let step = l.const_index(blk, l.lanes as i64);
                    let zeros: Vec<Value> = inits.iter().map(|_| l.const_f32(blk, 0.0)).collect();
                    // A parallel loop's lanes write different elements: barriers before (no lane
                    // overwrites what another still reads) and after (all see every element).
                    let parallel = l.gpu && carried.is_empty();
                    if parallel {
                        l.warp_sync(blk);
                    }
                    // Blocks of contiguous iterations per lane when the body reads (or, in a
                    // parallel loop, writes) buffers contiguously ([`deal`]).
                    let lookup = |n: &str| l.buffer(env, n);
                    let deal = if carried.is_empty() {
                        deal::parallel_deal(var, lo_expr, body, &lookup, &env.lets)
                    } else {
                        deal::carried_deal(var, lo_expr, carried, body, yields, &lookup, &env.lets)
                    }
                    .filter(|d| d.has_rounds(lo_expr, hi_expr, l.lanes));
                    let totals = if l.gpu {
                        let mut lane =
                            env.lane.ok_or_else(|| bug(format!("{what}: no lane id")))?;
                        if all {
                            let w = env.warp.ok_or_else(|| bug(format!("{what}: no warp id")))?;
                            let lanes = l.const_index(blk, crate::nvptx::WARP as i64);
                            let first = l.op(blk, "arith.muli", &[w, lanes], l.index, false);
                            lane = l.op(blk, "arith.addi", &[first, lane], l.index, false);
                        }
                        let partials = inner.lane_split_sum(
                            blk,
                            env,
                            var,
                            (lo, hi),
                            (lane, step),
                            (&zeros, &tys),
                            (carried, body, yields),
                            deal.as_ref(),
                            what,
                            line,
                        )?;
                        partials
                            .into_iter()
                            .map(|v| l.lanes_combine(blk, v, "arith.addf"))
                            .collect::<R<Vec<_>>>()?
                    } else {
                        // Host emulation: for lane in 0..lanes, totals += that lane's partials.
                        let mut args = vec![(l.index, l.loc)];
                        args.extend(tys.iter().map(|_| (l.f32, l.loc)));
                        let outer = Block::new(&args);
                        {
                            let lane: Value =
                                outer.argument(0).map_err(|e| bug(e.to_string()))?.into();
                            let zeros: Vec<Value> =
                                tys.iter().map(|_| l.const_f32(&outer, 0.0)).collect();
                            let env2: Env<'c, '_> = env.clone();
                            let partials = inner.lane_split_sum(
                                &outer,
                                &env2,
                                var,
                                (lo, hi),
                                (lane, step),
                                (&zeros, &tys),
                                (carried, body, yields),
                                deal.as_ref(),
                                what,
                                line,
                            )?;
                            let mut next = Vec::new();
                            for (i, p) in partials.into_iter().enumerate() {
                                let t: Value = outer
                                    .argument(i + 1)
                                    .map_err(|e| bug(e.to_string()))?
                                    .into();
                                next.push(l.op(&outer, "arith.addf", &[t, p], l.f32, true));
                            }
                            outer.append_operation(scf::r#yield(&next, l.loc));
                        }
                        l.lane_loop(blk, outer, &zeros, what)?
                    };
                    if parallel {
                        l.warp_sync(blk);
                    }
                    starts
                        .iter()
                        .zip(totals)
                        .map(|(&s0, t)| l.op(blk, "arith.addf", &[s0, t], l.f32, false))
                        .collect()
                };
                for ((n, _), (v, t)) in carried.iter().zip(results.into_iter().zip(&tys)) {
                    env.vars.insert(n.clone(), (v, *t));
                }
            }
            Stmt::If { cond, then } => {
                let (c, _) = l.expr(blk, env, cond)?;
                let inner = Block::new(&[]);
                {
                    let mut env2: Env<'c, '_> = env.clone();
                    l.block(&inner, &mut env2, then, what, line)?;
                    inner.append_operation(scf::r#yield(&[], l.loc));
                }
                let then_r = Region::new();
                then_r.append_block(inner);
                blk.append_operation(scf::r#if(c, &[], then_r, Region::new(), l.loc));
            }
            Stmt::Tile(_) => {
                return Err(bug(format!(
                    "{what}: tile operations are expanded into loops before lowering"
                )))
            }
            Stmt::Mma(m) if l.lanes == staged::LANES => l.staged_mma(blk, env, m, what, line)?,
            Stmt::Mma(m) => l.mma(blk, env, m, what, line)?,
            Stmt::Attend(a) if l.lanes == attend::LANES && l.gpu => {
                l.attend_block(blk, env, a, what, line)?
            }
            Stmt::Attend(_) => {
                return Err(bug(format!(
                    "{what}: attention blocks are expanded into loops unless a block of warps runs them"
                )))
            }
        }
        Ok(())
    }

    fn linear<'a>(
        &self,
        blk: &'a Block<'c>,
        env: &Env<'c, 'a>,
        info: &BufInfo<'c, 'a>,
        idx: &[Expr],
    ) -> R<Value<'c, 'a>> {
        let mut acc: Option<Value> = None;
        for (e, &s) in idx.iter().zip(&info.strides) {
            let (v, _) = self.expr(blk, env, e)?;
            let term = if s == 1 {
                v
            } else {
                let c = self.const_index(blk, s as i64);
                self.op(blk, "arith.muli", &[v, c], self.index, false)
            };
            acc = Some(match acc {
                None => term,
                Some(a) => self.op(blk, "arith.addi", &[a, term], self.index, false),
            });
        }
        Ok(acc.unwrap_or_else(|| self.const_index(blk, 0)))
    }

    fn expr<'a>(&self, blk: &'a Block<'c>, env: &Env<'c, 'a>, e: &Expr) -> R<(Value<'c, 'a>, Ty)> {
        Ok(match e {
            Expr::F(v) => (self.const_f32(blk, *v), Ty::F32),
            Expr::I(v) => (self.const_index(blk, *v), Ty::Int),
            Expr::Var(n) => *env
                .vars
                .get(n)
                .ok_or_else(|| bug(format!("unbound {n} (the verifier should have caught it)")))?,
            Expr::Pid(a) => (env.pids[*a], Ty::Int),
            Expr::Rows => (env.rows, Ty::Int),
            Expr::Load(b, idx) => {
                // A blocked deal's contiguous load: already read, as a vector.
                if let Some((_, v)) = env
                    .blocked
                    .as_ref()
                    .and_then(|v| v.iter().find(|l| &l.0 == e))
                {
                    return Ok((*v, Ty::F32));
                }
                let info = env
                    .bufs
                    .get(b)
                    .cloned()
                    .ok_or_else(|| bug(format!("unknown buffer {b}")))?;
                let at = self.linear(blk, env, &info, idx)?;
                let v = self.append(blk, memref::load(info.value, &[at], self.loc));
                match info.elem {
                    Elem::F32 => (v, Ty::F32),
                    Elem::Bf16 if self.gpu => {
                        (self.op(blk, "arith.extf", &[v], self.f32, false), Ty::F32)
                    }
                    Elem::Bf16 => (self.widen_bf16_host(blk, v), Ty::F32),
                    Elem::I64 => (
                        self.op(blk, "arith.index_cast", &[v], self.index, false),
                        Ty::Int,
                    ),
                }
            }
            Expr::Bin(op, a, b) => {
                let (a, ta) = self.expr(blk, env, a)?;
                let (b, _) = self.expr(blk, env, b)?;
                let f = ta == Ty::F32;
                let name = match (op, f) {
                    (BinOp::Add, true) => "arith.addf",
                    (BinOp::Sub, true) => "arith.subf",
                    (BinOp::Mul, true) => "arith.mulf",
                    (BinOp::Div, true) => "arith.divf",
                    (BinOp::Max, true) => "arith.maximumf",
                    (BinOp::Min, true) => "arith.minimumf",
                    (BinOp::Rem, true) => "arith.remf",
                    (BinOp::Add, false) => "arith.addi",
                    (BinOp::Sub, false) => "arith.subi",
                    (BinOp::Mul, false) => "arith.muli",
                    (BinOp::Div, false) => "arith.divsi",
                    (BinOp::Max, false) => "arith.maxsi",
                    (BinOp::Min, false) => "arith.minsi",
                    (BinOp::Rem, false) => "arith.remsi",
                };
                (self.op(blk, name, &[a, b], self.ty(ta), f), ta)
            }
            Expr::Un(op, a) => {
                let (x, t) = self.expr(blk, env, a)?;
                (self.unary(blk, *op, x, t), t)
            }
            Expr::Cmp(op, a, b) => {
                let (a, ta) = self.expr(blk, env, a)?;
                let (b, _) = self.expr(blk, env, b)?;
                let op = if ta == Ty::F32 {
                    let p = match op {
                        CmpOp::Lt => CmpfPredicate::Olt,
                        CmpOp::Le => CmpfPredicate::Ole,
                        CmpOp::Gt => CmpfPredicate::Ogt,
                        CmpOp::Ge => CmpfPredicate::Oge,
                        CmpOp::Eq => CmpfPredicate::Oeq,
                        CmpOp::Ne => CmpfPredicate::Une,
                    };
                    arith::cmpf(self.ctx, p, a, b, self.loc)
                } else {
                    let p = match op {
                        CmpOp::Lt => CmpiPredicate::Slt,
                        CmpOp::Le => CmpiPredicate::Sle,
                        CmpOp::Gt => CmpiPredicate::Sgt,
                        CmpOp::Ge => CmpiPredicate::Sge,
                        CmpOp::Eq => CmpiPredicate::Eq,
                        CmpOp::Ne => CmpiPredicate::Ne,
                    };
                    arith::cmpi(self.ctx, p, a, b, self.loc)
                };
                (self.append(blk, op), Ty::Bool)
            }
            Expr::Select(c, a, b) => {
                let (c, _) = self.expr(blk, env, c)?;
                let (a, t) = self.expr(blk, env, a)?;
                let (b, _) = self.expr(blk, env, b)?;
                (self.append(blk, arith::select(c, a, b, self.loc)), t)
            }
            Expr::ToF(a) => {
                let (x, _) = self.expr(blk, env, a)?;
                let i = self.op(blk, "arith.index_cast", &[x], self.i64, false);
                (self.op(blk, "arith.sitofp", &[i], self.f32, false), Ty::F32)
            }
            Expr::ToI(a) => {
                let (x, _) = self.expr(blk, env, a)?;
                let i = self.op(blk, "arith.fptosi", &[x], self.i64, false);
                (
                    self.op(blk, "arith.index_cast", &[i], self.index, false),
                    Ty::Int,
                )
            }
            Expr::Reduce {
                op,
                var,
                lo: lo_expr,
                hi: hi_expr,
                body,
            } => {
                let (lo, _) = self.expr(blk, env, lo_expr)?;
                let (hi, _) = self.expr(blk, env, hi_expr)?;
                let init = self.const_f32(
                    blk,
                    match op {
                        ReduceOp::Sum => 0.0,
                        ReduceOp::Max => f64::NEG_INFINITY,
                    },
                );
                // Over several lanes: each lane reduces its share (lo + j, lo + j + lanes, ...,
                // or blocks: [`deal`]); a butterfly combines the partials (GPU), or they are
                // combined in lane order (host emulation).
                let spread = self.lanes > 1 && !self.in_split;
                let combine = match op {
                    ReduceOp::Sum => "arith.addf",
                    ReduceOp::Max => "arith.maximumf",
                };
                if !spread {
                    let step = self.const_index(blk, 1);
                    // A warp program's sequential reduction reads contiguous operands in blocks
                    // too ([`deal`], as one lane).
                    let lookup = |n: &str| self.buffer(env, n);
                    let deal = (self.lanes > 1)
                        .then(|| deal::reduction_deal(var, lo_expr, body, &lookup, &env.lets))
                        .flatten()
                        .filter(|d| d.has_rounds(lo_expr, hi_expr, 1));
                    let v = if deal.is_some() {
                        let zero = self.const_index(blk, 0);
                        Lower { lanes: 1, ..*self }.lane_reduction(
                            blk,
                            env,
                            var,
                            (lo, hi),
                            (zero, step),
                            init,
                            combine,
                            body,
                            deal.as_ref(),
                        )?
                    } else {
                        self.reduce_loop(blk, env, var, (lo, hi, step), init, combine, body)?
                    };
                    return Ok((v, Ty::F32));
                }
                let inner = Lower {
                    in_split: true,
                    ..*self
                };
                let step = self.const_index(blk, self.lanes as i64);
                // Blocks of contiguous iterations per lane when the body reads buffers
                // contiguously ([`deal`]).
                let lookup = |n: &str| self.buffer(env, n);
                let deal = deal::reduction_deal(var, lo_expr, body, &lookup, &env.lets)
                    .filter(|d| d.has_rounds(lo_expr, hi_expr, self.lanes));
                if self.gpu {
                    let lane = env
                        .lane
                        .ok_or_else(|| bug("reduction: no lane id".into()))?;
                    let partial = inner.lane_reduction(
                        blk,
                        env,
                        var,
                        (lo, hi),
                        (lane, step),
                        init,
                        combine,
                        body,
                        deal.as_ref(),
                    )?;
                    return Ok((self.lanes_combine(blk, partial, combine)?, Ty::F32));
                }
                let outer = Block::new(&[(self.index, self.loc), (self.f32, self.loc)]);
                {
                    let lane: Value = outer.argument(0).map_err(|e| bug(e.to_string()))?.into();
                    let total: Value = outer.argument(1).map_err(|e| bug(e.to_string()))?.into();
                    let env2: Env<'c, '_> = env.clone();
                    let partial = inner.lane_reduction(
                        &outer,
                        &env2,
                        var,
                        (lo, hi),
                        (lane, step),
                        init,
                        combine,
                        body,
                        deal.as_ref(),
                    )?;
                    let next = self.op(&outer, combine, &[total, partial], self.f32, true);
                    outer.append_operation(scf::r#yield(&[next], self.loc));
                }
                let v = self.lane_loop(blk, outer, &[init], "reduction")?;
                (v[0], Ty::F32)
            }
        })
    }

    /// `scf.for var in lo..hi step` reducing `body` with `combine` from `init`.
    #[allow(clippy::too_many_arguments)]
    fn reduce_loop<'a>(
        &self,
        blk: &'a Block<'c>,
        env: &Env<'c, 'a>,
        var: &str,
        (lo, hi, step): (Value<'c, 'a>, Value<'c, 'a>, Value<'c, 'a>),
        init: Value<'c, 'a>,
        combine: &str,
        body: &Expr,
    ) -> R<Value<'c, 'a>> {
        let inner = Block::new(&[(self.index, self.loc), (self.f32, self.loc)]);
        {
            let mut env2: Env<'c, '_> = env.clone();
            let iv: Value = inner.argument(0).map_err(|e| bug(e.to_string()))?.into();
            let acc: Value = inner.argument(1).map_err(|e| bug(e.to_string()))?.into();
            env2.vars.insert(var.to_string(), (iv, Ty::Int));
            let (x, _) = self.expr(&inner, &env2, body)?;
            let next = self.op(&inner, combine, &[acc, x], self.f32, true);
            inner.append_operation(scf::r#yield(&[next], self.loc));
        }
        Ok(self.scf_for(
            blk,
            (lo, hi, step),
            &[init],
            &[self.f32],
            inner,
            "reduction",
        )?[0])
    }

    /// A lane's share of a dealt reduction, `var` in `lo, lo + lanes, ... < hi`, combined in
    /// that order as [`Self::reduce_loop`] does, but [`REDUCE_UNROLL`] iterations per trip
    /// (every one's loads issued before the first combine), then the rest one by one: a warp
    /// keeps that many loads in flight instead of waiting out each one's latency (a decode
    /// GEMV's dot products are such reductions). The same values combined in the same order
    /// (as the plain loop, up to the reassociation its `reassoc` flags already allow).
    #[allow(clippy::too_many_arguments)]
    fn unrolled_reduce<'a>(
        &self,
        blk: &'a Block<'c>,
        env: &Env<'c, 'a>,
        var: &str,
        (lo, hi): (Value<'c, 'a>, Value<'c, 'a>),
        init: Value<'c, 'a>,
        combine: &str,
        body: &Expr,
    ) -> R<Value<'c, 'a>> {
        let step = self.lanes as i64;
        let ix = |v: i64| self.const_index(blk, v);
        // Whole trips of U · lanes iterations, ending at `mid`.
        let mid = self.rounds_end(blk, (lo, hi), REDUCE_UNROLL as i64 * step);
        let trip = ix(REDUCE_UNROLL as i64 * step);
        let inner = Block::new(&[(self.index, self.loc), (self.f32, self.loc)]);
        {
            let mut env2: Env<'c, '_> = env.clone();
            let iv: Value = inner.argument(0).map_err(|e| bug(e.to_string()))?.into();
            let mut acc: Value = inner.argument(1).map_err(|e| bug(e.to_string()))?.into();
            let mut xs = Vec::new();
            for u in 0..REDUCE_UNROLL as i64 {
                let off = self.const_index(&inner, u * step);
                let at = self.op(&inner, "arith.addi", &[iv, off], self.index, false);
                env2.vars.insert(var.to_string(), (at, Ty::Int));
                xs.push(self.expr(&inner, &env2, body)?.0);
            }
            for x in xs {
                acc = self.op(&inner, combine, &[acc, x], self.f32, true);
            }
            inner.append_operation(scf::r#yield(&[acc], self.loc));
        }
        let whole = self.scf_for(
            blk,
            (lo, mid, trip),
            &[init],
            &[self.f32],
            inner,
            "reduction",
        )?[0];
        self.reduce_loop(blk, env, var, (mid, hi, ix(step)), whole, combine, body)
    }

    /// `scf.for var in lo..hi step` carrying `inits`; the body's statements, then `yields`.
    /// Returns the final carried values.
    #[allow(clippy::too_many_arguments)]
    fn carried_loop<'a>(
        &self,
        blk: &'a Block<'c>,
        env: &Env<'c, 'a>,
        var: &str,
        (lo, hi, step): (Value<'c, 'a>, Value<'c, 'a>, Value<'c, 'a>),
        inits: &[Value<'c, 'a>],
        tys: &[Ty],
        carried: &[(String, Expr)],
        body: &[Stmt],
        yields: &[Expr],
        what: &str,
        line: &mut usize,
    ) -> R<Vec<Value<'c, 'a>>> {
        let mut args = vec![(self.index, self.loc)];
        args.extend(tys.iter().map(|&t| (self.ty(t), self.loc)));
        let inner = Block::new(&args);
        {
            let mut env2: Env<'c, '_> = env.clone();
            let a = |i: usize| -> R<Value> {
                inner
                    .argument(i)
                    .map(Into::into)
                    .map_err(|e| bug(e.to_string()))
            };
            env2.vars.insert(var.to_string(), (a(0)?, Ty::Int));
            for (i, ((n, _), t)) in carried.iter().zip(tys).enumerate() {
                env2.vars.insert(n.clone(), (a(i + 1)?, *t));
            }
            self.block(&inner, &mut env2, body, what, line)?;
            let mut ys = Vec::new();
            for y in yields {
                ys.push(self.expr(&inner, &env2, y)?.0);
            }
            inner.append_operation(scf::r#yield(&ys, self.loc));
        }
        let tys: Vec<Type> = tys.iter().map(|&t| self.ty(t)).collect();
        self.scf_for(blk, (lo, hi, step), inits, &tys, inner, what)
    }

    /// `scf.for` over `lo..hi` by `step` with `body` (which takes the induction variable and
    /// the carried values, of types `tys`), from `inits`. Returns the final carried values.
    pub(super) fn scf_for<'a>(
        &self,
        blk: &'a Block<'c>,
        (lo, hi, step): (Value<'c, 'a>, Value<'c, 'a>, Value<'c, 'a>),
        inits: &[Value<'c, 'a>],
        tys: &[Type<'c>],
        body: Block<'c>,
        what: &str,
    ) -> R<Vec<Value<'c, 'a>>> {
        let region = Region::new();
        region.append_block(body);
        let op = OperationBuilder::new("scf.for", self.loc)
            .add_operands(&[lo, hi, step])
            .add_operands(inits)
            .add_results(tys)
            .add_regions([region])
            .build()
            .map_err(|e| bug(format!("{what}: scf.for: {e}")))?;
        let r = blk.append_operation(op);
        (0..tys.len())
            .map(|i| r.result(i).map(Into::into).map_err(|e| bug(e.to_string())))
            .collect()
    }

    /// `scf.for lane in 0..lanes` over `body` (which takes the lane and the carried f32
    /// values), from `inits`: the host emulation of a split over the lanes.
    fn lane_loop<'a>(
        &self,
        blk: &'a Block<'c>,
        body: Block<'c>,
        inits: &[Value<'c, 'a>],
        what: &str,
    ) -> R<Vec<Value<'c, 'a>>> {
        let zero = self.const_index(blk, 0);
        let lanes = self.const_index(blk, self.lanes as i64);
        let one = self.const_index(blk, 1);
        let tys = vec![self.f32; inits.len()];
        self.scf_for(
            blk,
            (zero, lanes, one),
            inits,
            &tys,
            body,
            &format!("{what}: lane loop"),
        )
    }

    /// An f32's bits (as i32) plus half a TF32 step (2^12): masked to TF32 afterwards, the
    /// nearest TF32 value, ties away from zero (the carry may round up into the exponent, a
    /// finite value to infinity). Infinities and NaNs are left alone: a NaN's carry could
    /// reach the sign bit and leave ±0 after the mask (NVIDIA's canonical NaN is 0x7fffffff).
    pub(super) fn tf32_half_up<'a>(
        &self,
        blk: &'a Block<'c>,
        bits: Value<'c, 'a>,
    ) -> Value<'c, 'a> {
        let i32t: Type = IntegerType::new(self.ctx, 32).into();
        let c = |v: i64| {
            self.append(
                blk,
                arith::constant(self.ctx, IntegerAttribute::new(i32t, v).into(), self.loc),
            )
        };
        let (half, exponent) = (c(1 << 12), c(0x7f80_0000));
        let up = self.op(blk, "arith.addi", &[bits, half], i32t, false);
        let e = self.op(blk, "arith.andi", &[bits, exponent], i32t, false);
        let special = self.append(
            blk,
            arith::cmpi(self.ctx, CmpiPredicate::Eq, e, exponent, self.loc),
        );
        self.append(blk, arith::select(special, bits, up, self.loc))
    }

    /// The f32 bits of `x` rounded to bf16 (nearest even, a NaN kept a quiet NaN), in the high
    /// half of an i32 (the low half is garbage): integer ops, for the host. The host never makes
    /// a bf16 value: its bf16 buffers are i16 bits, widened and rounded by integer ops. LLVM's
    /// x86 backend calls `__truncsfbf2` for an f32 → bf16 conversion, or for any bf16 value it
    /// keeps in a register (InstCombine turns a `select` of two widened bf16 loads into one of
    /// bf16 values), on CPUs without AVX512-BF16, and neither the JIT nor Debian 12's libgcc
    /// provides it.
    fn bf16_bits_host<'a>(&self, blk: &'a Block<'c>, x: Value<'c, 'a>) -> Value<'c, 'a> {
        let i32t: Type = IntegerType::new(self.ctx, 32).into();
        let c = |v: i64| self.const_i32(blk, v);
        let bits = self.op(blk, "arith.bitcast", &[x], i32t, false);
        let lsb = self.op(blk, "arith.shrui", &[bits, c(16)], i32t, false);
        let lsb = self.op(blk, "arith.andi", &[lsb, c(1)], i32t, false);
        let bias = self.op(blk, "arith.addi", &[lsb, c(0x7fff)], i32t, false);
        let rounded = self.op(blk, "arith.addi", &[bits, bias], i32t, false);
        let quiet = self.op(blk, "arith.ori", &[bits, c(0x0040_0000)], i32t, false);
        let nan = self.append(
            blk,
            arith::cmpf(self.ctx, CmpfPredicate::Uno, x, x, self.loc),
        );
        self.append(blk, arith::select(nan, quiet, rounded, self.loc))
    }

    /// `x` (f32) rounded to a bf16 element ([`Self::elem`]): `cvt.rn.bf16.f32` on a GPU, its
    /// bits by integer ops on the host ([`Self::bf16_bits_host`]).
    fn to_bf16<'a>(&self, blk: &'a Block<'c>, x: Value<'c, 'a>) -> Value<'c, 'a> {
        if self.gpu {
            return self.op(blk, "arith.truncf", &[x], Type::bfloat16(self.ctx), false);
        }
        let i32t: Type = IntegerType::new(self.ctx, 32).into();
        let i16t: Type = IntegerType::new(self.ctx, 16).into();
        let bits = self.bf16_bits_host(blk, x);
        let high = self.op(
            blk,
            "arith.shrui",
            &[bits, self.const_i32(blk, 16)],
            i32t,
            false,
        );
        self.op(blk, "arith.trunci", &[high], i16t, false)
    }

    /// The f32 value of bf16 bits `b` (i16): exact, on the host.
    fn widen_bf16_host<'a>(&self, blk: &'a Block<'c>, b: Value<'c, 'a>) -> Value<'c, 'a> {
        let i32t: Type = IntegerType::new(self.ctx, 32).into();
        let wide = self.op(blk, "arith.extui", &[b], i32t, false);
        let bits = self.op(
            blk,
            "arith.shli",
            &[wide, self.const_i32(blk, 16)],
            i32t,
            false,
        );
        self.op(blk, "arith.bitcast", &[bits], self.f32, false)
    }

    fn unary<'a>(&self, blk: &'a Block<'c>, op: UnOp, x: Value<'c, 'a>, t: Ty) -> Value<'c, 'a> {
        let f = self.f32;
        let m = |name: &str, x: Value<'c, 'a>| {
            if self.gpu {
                self.gpu_math(blk, name, x)
            } else {
                self.op(blk, name, &[x], f, true)
            }
        };
        match op {
            UnOp::Neg if t == Ty::Int => {
                let z = self.const_index(blk, 0);
                self.op(blk, "arith.subi", &[z, x], self.index, false)
            }
            UnOp::Neg => m("arith.negf", x),
            UnOp::Bf16 if self.gpu => {
                let b = self.op(blk, "arith.truncf", &[x], Type::bfloat16(self.ctx), false);
                self.op(blk, "arith.extf", &[b], f, false)
            }
            UnOp::Bf16 => {
                let i32t: Type = IntegerType::new(self.ctx, 32).into();
                let bits = self.bf16_bits_host(blk, x);
                let mask = self.const_i32(blk, 0xffff_0000u32 as i32 as i64);
                let kept = self.op(blk, "arith.andi", &[bits, mask], i32t, false);
                self.op(blk, "arith.bitcast", &[kept], f, false)
            }
            UnOp::Tf32 | UnOp::Tf32Round => {
                let i32t: Type = IntegerType::new(self.ctx, 32).into();
                let mut bits = self.op(blk, "arith.bitcast", &[x], i32t, false);
                if op == UnOp::Tf32Round {
                    bits = self.tf32_half_up(blk, bits);
                }
                let mask = self.append(
                    blk,
                    arith::constant(
                        self.ctx,
                        IntegerAttribute::new(i32t, TF32_MASK).into(),
                        self.loc,
                    ),
                );
                let kept = self.op(blk, "arith.andi", &[bits, mask], i32t, false);
                self.op(blk, "arith.bitcast", &[kept], f, false)
            }
            UnOp::Exp => m("math.exp", x),
            UnOp::Log => m("math.log", x),
            UnOp::Sqrt => m("math.sqrt", x),
            UnOp::Rsqrt => m("math.rsqrt", x),
            UnOp::Cos => m("math.cos", x),
            UnOp::Sin => m("math.sin", x),
            UnOp::Sigmoid | UnOp::Silu => {
                // 1 / (1 + exp(-x)), times x for SiLU.
                let one = self.const_f32(blk, 1.0);
                let nx = m("arith.negf", x);
                let e = m("math.exp", nx);
                let d = self.op(blk, "arith.addf", &[one, e], f, true);
                if op == UnOp::Sigmoid {
                    self.op(blk, "arith.divf", &[one, d], f, true)
                } else {
                    self.op(blk, "arith.divf", &[x, d], f, true)
                }
            }
            UnOp::Softplus => {
                // torch: x above 20, else log1p(exp(x)).
                let e = m("math.exp", x);
                let l1p = if self.gpu {
                    // log(1 + e): exact enough here (e ≥ 0), and lg2 has no log1p form.
                    let one = self.const_f32(blk, 1.0);
                    let s = self.op(blk, "arith.addf", &[one, e], f, true);
                    m("math.log", s)
                } else {
                    m("math.log1p", e)
                };
                let th = self.const_f32(blk, 20.0);
                let big = self.append(
                    blk,
                    arith::cmpf(self.ctx, CmpfPredicate::Ogt, x, th, self.loc),
                );
                self.append(blk, arith::select(big, x, l1p, self.loc))
            }
        }
    }

    /// `bar.warp.sync` over the full warp (a barrier and a memory fence among its lanes); in a
    /// program of several warps (one to a block), outside its warps' own tiles, `bar.sync 0`
    /// over the block.
    fn warp_sync(&self, blk: &Block<'c>) {
        if self.warps > 1 && !self.in_tiles {
            blk.append_operation(
                OperationBuilder::new("gpu.barrier", self.loc)
                    .build()
                    .expect("valid gpu.barrier"),
            );
            return;
        }
        let i32t: Type = IntegerType::new(self.ctx, 32).into();
        let all = self.append(
            blk,
            arith::constant(self.ctx, IntegerAttribute::new(i32t, -1).into(), self.loc),
        );
        blk.append_operation(
            OperationBuilder::new("nvvm.bar.warp.sync", self.loc)
                .add_operands(&[all])
                .build()
                .expect("valid nvvm.bar.warp.sync"),
        );
    }

    /// `x` combined (`arith.addf` or `arith.maximumf`) over the lanes of a program by a
    /// butterfly of `gpu.shuffle xor`: every lane ends with the same value, bit for bit (each
    /// step combines a pair in both orders, and both operations are commutative).
    fn lanes_combine<'a>(
        &self,
        blk: &'a Block<'c>,
        x: Value<'c, 'a>,
        combine: &str,
    ) -> R<Value<'c, 'a>> {
        let offsets: Vec<u32> = std::iter::successors(Some(self.lanes / 2), |o| Some(o / 2))
            .take_while(|&o| o >= 1)
            .collect();
        self.shuffle_combine(blk, x, combine, self.lanes, &offsets)
    }

    /// `x` combined (`arith.addf` or `arith.maximumf`) with the value of the lane `offset`
    /// away, for each of `offsets` in turn, by `gpu.shuffle xor` within groups of `width`
    /// lanes: over the offsets 1, 2, 4, .. up to half a group (in any order), every lane of the
    /// group ends with the same value, bit for bit (each step combines a pair in both orders, and both operations
    /// are commutative).
    pub(super) fn shuffle_combine<'a>(
        &self,
        blk: &'a Block<'c>,
        x: Value<'c, 'a>,
        combine: &str,
        width: u32,
        offsets: &[u32],
    ) -> R<Value<'c, 'a>> {
        let i32t: Type = IntegerType::new(self.ctx, 32).into();
        let c = |v: u32| {
            self.append(
                blk,
                arith::constant(
                    self.ctx,
                    IntegerAttribute::new(i32t, v as i64).into(),
                    self.loc,
                ),
            )
        };
        let mode = Attribute::parse(self.ctx, "#gpu<shuffle_mode xor>")
            .ok_or_else(|| bug("#gpu<shuffle_mode xor> attribute".into()))?;
        let width = c(width);
        let mut acc = x;
        for &offset in offsets {
            let shuffle = OperationBuilder::new("gpu.shuffle", self.loc)
                .add_operands(&[acc, c(offset), width])
                .add_attributes(&[(Identifier::new(self.ctx, "mode"), mode)])
                .add_results(&[self.f32, self.i1])
                .build()
                .map_err(|e| bug(format!("gpu.shuffle: {e}")))?;
            let other = self.append(blk, shuffle);
            // No fast-math flags: a contraction into one lane's combine would make the lanes'
            // totals differ in the last bit, and the program relies on them being identical.
            acc = self.op(blk, combine, &[acc, other], self.f32, false);
        }
        Ok(acc)
    }

    /// A `math` op on the GPU, as PTX approximations (relative error ~2^-22 for `ex2`/`lg2`,
    /// absolute ~2^-20.5 for `sin`/`cos` after reduction to [-π, π]).
    fn gpu_math<'a>(&self, blk: &'a Block<'c>, name: &str, x: Value<'c, 'a>) -> Value<'c, 'a> {
        let f = self.f32;
        let scaled = |x: Value<'c, 'a>, c: f64| {
            let c = self.const_f32(blk, c);
            self.op(blk, "arith.mulf", &[x, c], f, true)
        };
        match name {
            "math.exp" => {
                let y = scaled(x, std::f64::consts::LOG2_E);
                self.intrinsic(blk, "llvm.nvvm.ex2.approx.ftz.f", y)
            }
            "math.log" => {
                let y = self.intrinsic(blk, "llvm.nvvm.lg2.approx.f", x);
                scaled(y, std::f64::consts::LN_2)
            }
            "math.sqrt" => self.intrinsic(blk, "llvm.sqrt.f32", x),
            "math.rsqrt" => self.intrinsic(blk, "llvm.nvvm.rsqrt.approx.f", x),
            "math.sin" | "math.cos" => {
                // x − 2π·round(x / 2π), with 2π split in two (Cody–Waite) so that rotary
                // angles of long contexts keep their precision.
                let k = scaled(x, 1.0 / std::f64::consts::TAU);
                let k = self.intrinsic(blk, "llvm.roundeven.f32", k);
                let hi = self.const_f32(blk, 6.28125);
                let lo = self.const_f32(blk, std::f64::consts::TAU - 6.28125);
                let a = self.op(blk, "arith.mulf", &[k, hi], f, false);
                let r = self.op(blk, "arith.subf", &[x, a], f, false);
                let b = self.op(blk, "arith.mulf", &[k, lo], f, false);
                let r = self.op(blk, "arith.subf", &[r, b], f, false);
                let which = if name == "math.sin" {
                    "llvm.nvvm.sin.approx.f"
                } else {
                    "llvm.nvvm.cos.approx.f"
                };
                self.intrinsic(blk, which, r)
            }
            other => self.op(blk, other, &[x], f, true),
        }
    }
}
