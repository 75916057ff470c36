//! The compiled plan (`plan.json` in an artifact directory): everything the runtime needs to
//! execute a model without the compiler: kernels and their parameters, the launch list of each
//! phase with every argument resolved to an arena offset, pool, weight or constant, the pools
//! (caches and recurrent state), and the weight map (where each tensor lies in the
//! checkpoint, and how it is transformed when loaded).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kernel::{Dim, Elem, Param};

/// 2: GPU launch data per kernel, weight dtypes (session 4).
/// 3: workspaces (`Plan::workspaces`, `Arg::Workspace`).
pub const SCHEMA_VERSION: u32 = 3;
pub const PLAN_FILE: &str = "plan.json";
pub const HOST_LIBRARY: &str = "kernels.so";
/// The PTX module of an NVPTX artifact (one `.entry` per kernel, named as the kernel).
pub const PTX_FILE: &str = "kernels.ptx";
/// The same kernels assembled by `ptxas` for the plan's target (an ELF cubin), when the build
/// found `ptxas`: loading it needs no driver JIT. Optional: the PTX alone runs too.
pub const CUBIN_FILE: &str = "kernels.cubin";
pub const CONSTANTS_FILE: &str = "constants.bin";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub schema_version: u32,
    pub target: String,
    pub model: ModelInfo,
    pub limits: Limits,
    pub kernels: Vec<KernelEntry>,
    pub prefill: Schedule,
    pub decode: Schedule,
    pub pools: Vec<PoolEntry>,
    pub weights: Vec<WeightEntry>,
    pub constants: Vec<ConstEntry>,
    /// Device buffers shared by the launches of a run, their contents meaningless between
    /// runs (MLA prefill's decompressed keys and values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workspaces: Vec<WorkspaceEntry>,
    /// What the compiler planned to move per decode step (read by `compile-model bench`).
    pub cost: Cost,
}

/// Planned memory traffic of one decode step, in the target's storage types (f32 on the host).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Cost {
    /// Weights read at batch 1: every dense weight, the LM head, one embedding row and top-k
    /// experts per MoE layer.
    pub decode_weight_bytes: u64,
    /// Recurrent and conv state per sequence, read and written once per step.
    pub state_bytes_per_sequence: u64,
    /// KV and latent cache per cached position of one sequence, read once per step.
    pub cache_bytes_per_position: u64,
}

impl Cost {
    /// Bytes one decode step of one sequence moves with `context` cached positions.
    pub fn decode_bytes(&self, context: usize) -> u64 {
        self.decode_weight_bytes
            + 2 * self.state_bytes_per_sequence
            + self.cache_bytes_per_position * context as u64
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    pub name: String,
    /// The spec file or checkpoint directory the plan was compiled from.
    pub source: String,
    /// sha256 of the model description (spec text, or config.json).
    pub hash: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    /// sha256 of each checkpoint file's safetensors header (names, dtypes, shapes, offsets)
    /// when the plan was built; the runtime refuses files whose header changed.
    #[serde(default)]
    pub weight_headers: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Sequences decoded together (cache slots).
    pub max_batch: usize,
    /// Positions per sequence (prompt + generated).
    pub max_context: usize,
    /// Rows of one prefill launch; longer prompts are prefilled in pieces.
    pub max_prefill_rows: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KernelEntry {
    pub name: String,
    /// Exported symbol (host: `_mlir_<name>`, packed arguments; GPU: the `.entry` name).
    pub symbol: String,
    pub grid: Vec<Dim>,
    pub params: Vec<Param>,
    /// How a GPU target launches it (absent for the host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuLaunch>,
}

/// The launch contract of one GPU kernel.
///
/// Blocks: `⌈programs(rows) · lanes / block⌉` along x, exactly `block` threads each (a multiple
/// of `lanes`; kernels size their shared memory for it); program `p` is threads `p · lanes ..< (p + 1) · lanes` of the grid, counted
/// `blockIdx.x · block + threadIdx.x` (threads past the last program return at once).
/// Parameters (`abi = "ptr-per-buffer+scratch+rows"`): one `.u64` device pointer per entry of
/// the kernel's `params`, in order, then the scratch pointer, then `rows`, all `.u64`. Program
/// `p` uses scratch bytes `p · scratch_bytes ..< (p + 1) · scratch_bytes`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GpuLaunch {
    pub block: u32,
    /// Threads per program (1; 32: a warp sharing the program's reductions; or the whole
    /// block: a block-cooperative tile, or a program of 4 warps dealing its tensor-core tiles
    /// to them, the chunked recurrences' scans).
    pub lanes: u32,
    /// Scratch bytes per program (a warp program's locals, unless they fit the block's shared
    /// memory: then 0).
    pub scratch_bytes: u64,
    /// Dynamic shared memory per block: warp programs whose locals are too large for static
    /// shared memory keep them there, a slice per program. The runtime opts each such function
    /// into it (the driver's default ceiling is 48 KiB) and refuses a device that allows less.
    pub dynamic_shared_bytes: u32,
    pub abi: String,
}

/// The kernel of GPU plans that fills a bf16 tensor with uniform values on the device
/// (`out: bf16[R]`, `p: f32[4] = [seed, centre, half-width, 0]`), for full-size benchmarks.
pub const FILL_KERNEL: &str = "fill_uniform_bf16";

/// Most dynamic shared memory a block may opt into on any supported GPU (sm_90: 227 KiB).
pub const MAX_DYNAMIC_SHARED: u32 = 227 << 10;

/// The only GPU parameter layout so far (see [`GpuLaunch`]).
pub const GPU_ABI: &str = "ptr-per-buffer+scratch+rows";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Arena bytes needed at `rows` rows = `arena_bytes_per_row * rows`.
    pub arena_bytes_per_row: usize,
    pub rows: usize,
    pub launches: Vec<LaunchEntry>,
    /// Where the logits `[rows, vocab]` are when the launches are done.
    pub logits: Arg,
    /// Arena place of every graph node's output (valid until reused: plans built with
    /// `keep_values` never reuse, so every value can be read after a run, for debugging).
    pub values: Vec<(String, Arg)>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LaunchEntry {
    pub kernel: usize,
    /// Graph nodes computed (for errors and profiles).
    pub nodes: Vec<String>,
    pub args: Vec<Arg>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Arg {
    /// Activation in the arena: byte offset `offset_per_row * rows`, `bytes_per_row * rows` long.
    Arena {
        offset_per_row: usize,
        bytes_per_row: usize,
    },
    Weight {
        index: usize,
    },
    Pool {
        index: usize,
    },
    Workspace {
        index: usize,
    },
    Const {
        index: usize,
    },
    Tokens,
    Slot,
    Pos,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolEntry {
    pub name: String,
    /// conv, recurrent, kv_cache, mla_latent.
    pub kind: String,
    pub layer: usize,
    /// `[slots, ...]` elements of `dtype`.
    pub shape: Vec<usize>,
    pub bytes: usize,
    /// Element type: `f32`, or `bf16` for the KV and latent caches of plans built with bf16
    /// caches (states are always f32).
    #[serde(default = "f32_name")]
    pub dtype: String,
}

/// The element type a plan's `dtype` field names: `bf16`, else f32 (`Plan::check` refuses
/// other names where they matter).
pub fn dtype_elem(dtype: &str) -> Elem {
    if dtype == "bf16" {
        Elem::Bf16
    } else {
        Elem::F32
    }
}

impl PoolEntry {
    /// Bytes of one element: 4 (f32) or 2 (bf16).
    pub fn elem_bytes(&self) -> usize {
        dtype_elem(&self.dtype).bytes()
    }
}

/// A buffer the launches of one run share (written before it is read within the run), sized
/// by the plan's limits, not per sequence: unlike a pool it holds nothing between runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceEntry {
    pub name: String,
    /// Elements of `dtype`.
    pub shape: Vec<usize>,
    pub bytes: usize,
    /// `f32` or `bf16`.
    pub dtype: String,
}

impl WorkspaceEntry {
    /// Bytes of one element: 4 (f32) or 2 (bf16).
    pub fn elem_bytes(&self) -> usize {
        dtype_elem(&self.dtype).bytes()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WeightEntry {
    pub name: String,
    /// Shape as the kernels see it.
    pub shape: Vec<usize>,
    pub source: WeightSource,
    /// Element type as the kernels read it: `f32` or `bf16` (converted from the source at load,
    /// rounding to nearest even, unless the source already is).
    #[serde(default = "f32_name")]
    pub dtype: String,
}

/// Bytes of a `shape` of `elem_bytes` elements, `None` past `usize` (an edited plan).
fn byte_size(shape: &[usize], elem_bytes: usize) -> Option<usize> {
    shape
        .iter()
        .try_fold(elem_bytes, |acc, &d| acc.checked_mul(d))
}

fn f32_name() -> String {
    "f32".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum WeightSource {
    /// Deterministic random weights (`lamina_ir::weights::random_tensor`): native specs.
    Random {
        tensor: String,
        seed: u64,
        kind: String,
    },
    /// A checkpoint tensor, cast to f32; `rows` (over `[numel/last, last]`) selects and
    /// concatenates row ranges (fused projections cut apart), empty = the whole tensor.
    File {
        file: String,
        /// The tensor's name in the file (found again by name when the file was rewritten and
        /// the run allows a weight mismatch).
        #[serde(default)]
        tensor: String,
        offset: usize,
        bytes: usize,
        dtype: String,
        shape: Vec<usize>,
        rows: Vec<(usize, usize)>,
    },
    /// Routed experts stacked along a new first axis.
    Stack { parts: Vec<WeightSource> },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConstEntry {
    pub name: String,
    /// f32 elements at `offset` (elements) in constants.bin.
    pub offset: usize,
    pub len: usize,
}

impl Plan {
    pub fn load(dir: &Path) -> Result<Plan> {
        let path = dir.join(PLAN_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        // The version first: an artifact of another version gets "rebuild", not a field error.
        let version = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("schema_version").and_then(|s| s.as_u64()));
        if let Some(found) = version.filter(|&v| v != SCHEMA_VERSION as u64) {
            return Err(Error::Input {
                what: path.display().to_string(),
                msg: format!(
                    "field schema_version is {found}, this build reads {SCHEMA_VERSION}; rebuild the artifact"
                ),
            });
        }
        let plan: Plan = serde_json::from_str(&text).map_err(|e| Error::Input {
            what: path.display().to_string(),
            msg: format!("not a Lamina plan: {e}"),
        })?;
        if plan.schema_version != SCHEMA_VERSION {
            return Err(Error::Input {
                what: path.display().to_string(),
                msg: format!(
                    "field schema_version is {}, this build reads {SCHEMA_VERSION}; rebuild the artifact",
                    plan.schema_version
                ),
            });
        }
        plan.check().map_err(|msg| Error::Input {
            what: path.display().to_string(),
            msg,
        })?;
        Ok(plan)
    }

    /// Internal consistency: every index in range, every argument list matching its kernel.
    pub fn check(&self) -> std::result::Result<(), String> {
        let gpu = self.target != "host";
        for (wi, w) in self.weights.iter().enumerate() {
            if w.dtype != "f32" && w.dtype != "bf16" {
                return Err(format!(
                    "weights[{wi}].dtype {:?} is not f32 or bf16",
                    w.dtype
                ));
            }
            // The GPU precision rule: bf16 weights, f32 accumulation and state.
            if gpu && w.dtype != "bf16" {
                return Err(format!(
                    "weights[{wi}] ({}) is {}: {} plans store weights in bf16",
                    w.name, w.dtype, self.target
                ));
            }
        }
        for (pi, p) in self.pools.iter().enumerate() {
            let cache = p.kind == "kv_cache" || p.kind == "mla_latent";
            let ok = p.dtype == "f32" || (cache && p.dtype == "bf16");
            if !ok {
                return Err(format!(
                    "pools[{pi}] ({}).dtype {:?}: states are f32, caches f32 or bf16",
                    p.name, p.dtype
                ));
            }
            let bytes = byte_size(&p.shape, p.elem_bytes());
            if bytes != Some(p.bytes) {
                return Err(format!(
                    "pools[{pi}] ({}): {} bytes for shape {:?} of {}",
                    p.name, p.bytes, p.shape, p.dtype
                ));
            }
        }
        for (wi, w) in self.workspaces.iter().enumerate() {
            let bytes = byte_size(&w.shape, w.elem_bytes());
            if !(w.dtype == "f32" || w.dtype == "bf16") || bytes != Some(w.bytes) {
                return Err(format!(
                    "workspaces[{wi}] ({}): {} bytes of {:?} for shape {:?}",
                    w.name, w.bytes, w.dtype, w.shape
                ));
            }
        }
        for (ki, k) in self.kernels.iter().enumerate() {
            match (&k.gpu, gpu) {
                (None, false) => {}
                (Some(_), false) => {
                    return Err(format!("kernels[{ki}].gpu is set in a host plan"));
                }
                (None, true) => {
                    return Err(format!(
                        "kernels[{ki}].gpu is missing in a {} plan",
                        self.target
                    ));
                }
                (Some(g), true) => {
                    if g.block == 0
                        || g.block > 1024
                        || g.lanes == 0
                        || g.block % g.lanes != 0
                        || g.abi != GPU_ABI
                    {
                        return Err(format!(
                            "kernels[{ki}].gpu: block {} must be 1..=1024 and a multiple of lanes {}, abi {:?} must be {GPU_ABI:?}",
                            g.block, g.lanes, g.abi
                        ));
                    }
                    if g.dynamic_shared_bytes > MAX_DYNAMIC_SHARED {
                        return Err(format!(
                            "kernels[{ki}].gpu: dynamic_shared_bytes {} is over {MAX_DYNAMIC_SHARED}, the most any supported GPU gives a block",
                            g.dynamic_shared_bytes
                        ));
                    }
                }
            }
        }
        for (pname, s) in [("prefill", &self.prefill), ("decode", &self.decode)] {
            for (li, l) in s.launches.iter().enumerate() {
                let k = self.kernels.get(l.kernel).ok_or_else(|| {
                    format!(
                        "{pname}.launches[{li}].kernel = {} is out of range",
                        l.kernel
                    )
                })?;
                if k.params.len() != l.args.len() {
                    return Err(format!(
                        "{pname}.launches[{li}] passes {} arguments to kernel {} of {} parameters",
                        l.args.len(),
                        k.name,
                        k.params.len()
                    ));
                }
                for (ai, a) in l.args.iter().enumerate() {
                    let ok = match a {
                        Arg::Weight { index } => *index < self.weights.len(),
                        Arg::Pool { index } => *index < self.pools.len(),
                        Arg::Workspace { index } => *index < self.workspaces.len(),
                        Arg::Const { index } => *index < self.constants.len(),
                        Arg::Arena {
                            offset_per_row,
                            bytes_per_row,
                        } => offset_per_row + bytes_per_row <= s.arena_bytes_per_row,
                        Arg::Tokens | Arg::Slot | Arg::Pos => true,
                    };
                    if !ok {
                        return Err(format!("{pname}.launches[{li}].args[{ai}] is out of range"));
                    }
                }
            }
            // The logits (rows × vocab f32) and inspectable values lie in the arena.
            let in_arena = |a: &Arg, min_bytes: usize| match *a {
                Arg::Arena {
                    offset_per_row,
                    bytes_per_row,
                } => {
                    bytes_per_row >= min_bytes
                        && offset_per_row
                            .checked_add(bytes_per_row)
                            .is_some_and(|end| end <= s.arena_bytes_per_row)
                }
                _ => false,
            };
            if !in_arena(&s.logits, self.model.vocab_size * 4) {
                return Err(format!(
                    "{pname}.logits must be an arena slot of vocab_size f32 per row"
                ));
            }
            if let Some((name, _)) = s.values.iter().find(|(_, a)| !in_arena(a, 0)) {
                return Err(format!("{pname}.values[{name}] is not an arena slot"));
            }
        }
        if self.limits.max_batch == 0
            || self.limits.max_context == 0
            || self.limits.max_prefill_rows == 0
        {
            return Err(
                "limits: max_batch, max_context and max_prefill_rows must be positive".into(),
            );
        }
        Ok(())
    }
}
