//! The host executor: loads an artifact (`plan.json`, `kernels.so`, `constants.bin`), maps the
//! weights, allocates the arena and pools, and walks the launch lists. Prompts are prefilled
//! one sequence at a time in pieces of at most `max_prefill_rows` tokens; decode steps run up
//! to `max_batch` sequences (each in its own cache slot) together.

mod pool;
pub(crate) mod weights;

pub use pool::Pool;

use std::path::Path;
use std::time::{Duration, Instant};

use lamina_ir::plan::{Arg, Plan, Schedule, HOST_LIBRARY};
use lamina_ir::Error;

use crate::executor::{
    bad_plan, check_finite, check_shapes, load_constants, Executor, Generation, KernelTime,
};

/// `_mlir_<kernel>(void **args)`: see `lamina_targets::host`.
type KernelFn = unsafe extern "C" fn(*mut *mut i64);

/// 64-byte aligned storage.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

struct Aligned(Vec<Line>);

impl Aligned {
    fn zeroed(bytes: usize) -> Self {
        Aligned(vec![Line([0; 64]); bytes.div_ceil(64).max(1)])
    }
    fn ptr(&mut self) -> *mut u8 {
        self.0.as_mut_ptr() as *mut u8
    }
    fn bytes(&self) -> usize {
        self.0.len() * 64
    }
}

/// A raw view passed to kernels.
#[derive(Clone, Copy)]
struct View {
    ptr: *mut u8,
    /// Elements.
    len: usize,
}

/// The pointers of one launch, shared by the threads that run its programs.
struct Call {
    f: KernelFn,
    views: Vec<View>,
    rows: i64,
}

// SAFETY: every program of a launch writes disjoint elements (a property of the kernel
// builders: outputs are indexed by the program's own ids), and the buffers outlive the call.
unsafe impl Sync for Call {}

impl Call {
    fn run(&self, lo: usize, hi: usize) {
        let mut desc: Vec<[i64; 5]> = self
            .views
            .iter()
            .map(|v| [v.ptr as i64, v.ptr as i64, 0, v.len as i64, 1])
            .collect();
        let mut scalars = [self.rows, lo as i64, hi as i64];
        let mut args: Vec<*mut i64> = Vec::with_capacity(desc.len() * 5 + 3);
        for d in desc.iter_mut() {
            for x in d.iter_mut() {
                args.push(x);
            }
        }
        for s in scalars.iter_mut() {
            args.push(s);
        }
        // SAFETY: the kernel's parameter list matches `views` (checked at load), and each view
        // covers the whole buffer the kernel may index for `rows` rows.
        unsafe { (self.f)(args.as_mut_ptr()) }
    }
}

pub struct HostEngine {
    pub plan: Plan,
    _lib: libloading::Library,
    fns: Vec<KernelFn>,
    weights: Vec<weights::Weight>,
    pools: Vec<Vec<f32>>,
    /// f32 words holding each workspace's bytes.
    workspaces: Vec<Vec<f32>>,
    constants: Vec<f32>,
    arena: Aligned,
    /// Next position of each slot.
    pos: Vec<usize>,
    /// Per-kernel time and launch count of each phase (`[prefill, decode]`), when profiling.
    profile: Option<[Vec<(Duration, usize)>; 2]>,
    /// Called with (tokens prefilled, prompt length) after each prefill piece.
    prefill_progress: Option<Box<dyn Fn(usize, usize)>>,
}

/// Greedy generation of one sequence (see [`Generation`]).
pub type HostGeneration = Generation;

impl HostEngine {
    /// Elements (of its dtype) in pool `i`.
    fn pool_len(&self, i: usize) -> usize {
        let p = &self.plan.pools[i];
        p.bytes / p.elem_bytes()
    }

    /// Loads the artifact in `dir`; `weights_dir` overrides where checkpoint files are read.
    pub fn load(dir: &Path, weights_dir: Option<&Path>) -> Result<HostEngine, Error> {
        Self::load_with_progress(dir, weights_dir, false, &|_, _| {})
    }

    /// [`HostEngine::load`], calling `progress(done, total)` as weights are mapped or converted.
    /// Checkpoint files whose header changed since the build are refused unless
    /// `allow_weight_mismatch`.
    pub fn load_with_progress(
        dir: &Path,
        weights_dir: Option<&Path>,
        allow_weight_mismatch: bool,
        progress: &dyn Fn(usize, usize),
    ) -> Result<HostEngine, Error> {
        let plan = Plan::load(dir)?;
        if plan.target != "host" {
            return Err(bad_plan(
                dir,
                format!(
                    "field target is {:?}: this is the host executor; run the plan with \
                     --device cuda, or build it with --target host to run on the CPU",
                    plan.target
                ),
            ));
        }
        let so = dir.join(HOST_LIBRARY);
        if !so.exists() {
            return Err(Error::Io {
                path: so.display().to_string(),
                msg: "missing: not a complete host artifact".into(),
            });
        }
        // SAFETY: loading a library runs its initialisers; kernels.so is produced by
        // `compile-model build` and has none beyond the C runtime's.
        let lib = unsafe { libloading::Library::new(&so) }.map_err(|e| Error::Io {
            path: so.display().to_string(),
            msg: format!("cannot load the kernel library: {e}"),
        })?;
        let mut fns = Vec::new();
        for k in &plan.kernels {
            // SAFETY: the symbol is a packed kernel entry of the declared signature.
            let f: libloading::Symbol<KernelFn> =
                unsafe { lib.get(k.symbol.as_bytes()) }.map_err(|e| Error::Io {
                    path: so.display().to_string(),
                    msg: format!("kernel {} (symbol {}): {e}", k.name, k.symbol),
                })?;
            fns.push(*f);
        }
        let constants = load_constants(&plan, dir)?;
        let weights = weights::load_all(&plan, weights_dir, allow_weight_mismatch, progress)?;
        // f32 words holding each pool's bytes (a bf16 cache packs two elements per word).
        let pools = plan
            .pools
            .iter()
            .map(|p| vec![0f32; p.bytes.div_ceil(4)])
            .collect();
        let workspaces = plan
            .workspaces
            .iter()
            .map(|w| vec![0f32; w.bytes.div_ceil(4)])
            .collect();
        let arena_bytes = [&plan.prefill, &plan.decode]
            .iter()
            .map(|s| s.arena_bytes_per_row * s.rows)
            .max()
            .unwrap_or(0);
        let e = HostEngine {
            arena: Aligned::zeroed(arena_bytes),
            pos: vec![0; plan.limits.max_batch],
            plan,
            _lib: lib,
            fns,
            weights,
            pools,
            workspaces,
            constants,
            profile: None,
            prefill_progress: None,
        };
        check_shapes(&e.plan, dir, &|i| e.weights[i].len(), &|i| e.pool_len(i))?;
        Ok(e)
    }

    /// Calls `f(tokens done, prompt length)` after every prefill piece (for progress bars).
    pub fn on_prefill_progress(&mut self, f: impl Fn(usize, usize) + 'static) {
        self.prefill_progress = Some(Box::new(f));
    }

    /// Starts (or, with `false`, stops and clears) timing every launch by kernel.
    pub fn set_profiling(&mut self, on: bool) {
        let n = self.plan.kernels.len();
        self.profile = on.then(|| [vec![(Duration::ZERO, 0); n], vec![(Duration::ZERO, 0); n]]);
    }

    /// Kernels by time spent in `decode` (or prefill) launches since profiling started,
    /// longest first.
    pub fn profile(&self, decode: bool) -> Vec<KernelTime> {
        let Some(p) = &self.profile else {
            return Vec::new();
        };
        let mut v: Vec<KernelTime> = p[decode as usize]
            .iter()
            .zip(&self.plan.kernels)
            .filter(|((_, n), _)| *n > 0)
            .map(|(&(total, launches), k)| KernelTime {
                kernel: k.name.clone(),
                launches,
                total,
            })
            .collect();
        v.sort_by_key(|k| std::cmp::Reverse(k.total));
        v
    }

    /// Runs one schedule for `tokens.len()` rows; returns the logits.
    fn run(
        &mut self,
        decode: bool,
        tokens: &[i64],
        slots: &[i64],
        pos: &[i64],
    ) -> Result<Vec<f32>, Error> {
        let rows = tokens.len();
        let sched: &Schedule = if decode {
            &self.plan.decode
        } else {
            &self.plan.prefill
        };
        debug_assert!(rows <= sched.rows);
        let arena = self.arena.ptr();
        let arena_len = self.arena.bytes();
        let pool = Pool::global();
        let mut tokens = tokens.to_vec();
        let mut slots = slots.to_vec();
        let mut pos = pos.to_vec();
        for l in &sched.launches {
            let k = &self.plan.kernels[l.kernel];
            let mut views = Vec::with_capacity(l.args.len());
            for (p, a) in k.params.iter().zip(&l.args) {
                let view = match a {
                    Arg::Arena {
                        offset_per_row,
                        bytes_per_row,
                    } => {
                        let off = offset_per_row * rows;
                        assert!(off + bytes_per_row * rows <= arena_len, "arena overflow");
                        View {
                            // SAFETY: in bounds (asserted above).
                            ptr: unsafe { arena.add(off) },
                            len: bytes_per_row * rows / p.elem.bytes(),
                        }
                    }
                    Arg::Weight { index } => View {
                        ptr: self.weights[*index].bytes().as_ptr() as *mut u8,
                        len: self.weights[*index].len(),
                    },
                    Arg::Pool { index } => View {
                        ptr: self.pools[*index].as_mut_ptr() as *mut u8,
                        len: self.pool_len(*index),
                    },
                    Arg::Workspace { index } => {
                        let w = &self.plan.workspaces[*index];
                        View {
                            ptr: self.workspaces[*index].as_mut_ptr() as *mut u8,
                            len: w.bytes / w.elem_bytes(),
                        }
                    }
                    Arg::Const { index } => {
                        let c = &self.plan.constants[*index];
                        View {
                            ptr: self.constants[c.offset..].as_ptr() as *mut u8,
                            len: c.len,
                        }
                    }
                    Arg::Tokens => View {
                        ptr: tokens.as_mut_ptr() as *mut u8,
                        len: rows,
                    },
                    Arg::Slot => View {
                        ptr: slots.as_mut_ptr() as *mut u8,
                        len: rows,
                    },
                    Arg::Pos => View {
                        ptr: pos.as_mut_ptr() as *mut u8,
                        len: rows,
                    },
                };
                views.push(view);
            }
            let programs: usize = k.grid.iter().map(|d| d.eval(rows)).product();
            let call = Call {
                f: self.fns[l.kernel],
                views,
                rows: rows as i64,
            };
            let started = self.profile.is_some().then(Instant::now);
            if programs == 1 || pool.threads() == 1 {
                call.run(0, programs);
            } else {
                // Contiguous shares: neighbouring programs touch neighbouring weights.
                pool.run(&|t, n| {
                    let per = programs.div_ceil(n);
                    let (lo, hi) = (t * per, ((t + 1) * per).min(programs));
                    if lo < hi {
                        call.run(lo, hi);
                    }
                });
            }
            if let (Some(t), Some(p)) = (started, &mut self.profile) {
                let e = &mut p[decode as usize][l.kernel];
                e.0 += t.elapsed();
                e.1 += 1;
            }
        }
        let Arg::Arena { offset_per_row, .. } = sched.logits else {
            unreachable!("plan check: logits live in the arena")
        };
        let v = self.vocab();
        // SAFETY: the logits slot holds rows × vocab f32 written by the last launch.
        let logits = unsafe {
            std::slice::from_raw_parts(arena.add(offset_per_row * rows) as *const f32, rows * v)
        }
        .to_vec();
        check_finite(&logits, v)?;
        Ok(logits)
    }

    /// The value of graph node `name` from the last run with `rows` rows (meaningful for
    /// plans built with `keep_values`, where nothing is overwritten).
    pub fn value(&mut self, decode: bool, name: &str, rows: usize) -> Option<Vec<f32>> {
        let s = if decode {
            &self.plan.decode
        } else {
            &self.plan.prefill
        };
        let (_, arg) = s.values.iter().find(|(n, _)| n == name)?;
        let Arg::Arena {
            offset_per_row,
            bytes_per_row,
        } = *arg
        else {
            return None;
        };
        let ptr = self.arena.ptr();
        // SAFETY: the plan check keeps every value inside the arena.
        let v = unsafe {
            std::slice::from_raw_parts(
                ptr.add(offset_per_row * rows) as *const f32,
                bytes_per_row * rows / 4,
            )
        };
        Some(v.to_vec())
    }
}

impl Executor for HostEngine {
    fn plan(&self) -> &Plan {
        &self.plan
    }

    fn positions(&self) -> &[usize] {
        &self.pos
    }

    fn positions_mut(&mut self) -> &mut [usize] {
        &mut self.pos
    }

    fn run_rows(
        &mut self,
        decode: bool,
        tokens: &[i64],
        slots: &[i64],
        pos: &[i64],
    ) -> Result<Vec<f32>, Error> {
        self.run(decode, tokens, slots, pos)
    }

    fn clear_slot(&mut self, slot: usize) -> Result<(), Error> {
        for (p, pool) in self.plan.pools.iter().zip(&mut self.pools) {
            let per = p.bytes / p.shape[0];
            // SAFETY: the pool's words hold at least `p.bytes` bytes; any bit pattern of the
            // f32 words is valid.
            let bytes =
                unsafe { std::slice::from_raw_parts_mut(pool.as_mut_ptr() as *mut u8, p.bytes) };
            bytes[slot * per..(slot + 1) * per].fill(0);
        }
        Ok(())
    }

    fn prefill_progress(&self, done: usize, total: usize) {
        if let Some(f) = &self.prefill_progress {
            f(done, total);
        }
    }

    fn set_prefill_progress(&mut self, f: Box<dyn Fn(usize, usize)>) {
        self.prefill_progress = Some(f);
    }

    fn set_profiling(&mut self, on: bool) -> Result<(), Error> {
        HostEngine::set_profiling(self, on);
        Ok(())
    }

    fn profile(&self, decode: bool) -> Vec<KernelTime> {
        HostEngine::profile(self, decode)
    }
}
