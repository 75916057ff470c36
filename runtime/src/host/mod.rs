//! The host executor: loads an artifact (`plan.json`, `kernels.so`, `constants.bin`), maps the
//! weights, allocates the arena and pools, and walks the launch lists. Prompts are prefilled
//! one sequence at a time in pieces of at most `max_prefill_rows` tokens; decode steps run up
//! to `max_batch` sequences (each in its own cache slot) together.

mod pool;
mod weights;

pub use pool::Pool;

use std::path::Path;
use std::time::{Duration, Instant};

use lamina_ir::kernel::Elem;
use lamina_ir::plan::{Arg, Plan, Schedule, CONSTANTS_FILE, HOST_LIBRARY};
use lamina_ir::Error;

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
    constants: Vec<f32>,
    arena: Aligned,
    /// Next position of each slot.
    pos: Vec<usize>,
    /// Per-kernel time and launch count of each phase (`[prefill, decode]`), when profiling.
    profile: Option<[Vec<(Duration, usize)>; 2]>,
    /// Called with (tokens prefilled, prompt length) after each prefill piece.
    prefill_progress: Option<Box<dyn Fn(usize, usize)>>,
}

/// Time spent in one kernel over the launches of one phase (see [`HostEngine::profile`]).
#[derive(Debug, Clone)]
pub struct KernelTime {
    pub kernel: String,
    pub launches: usize,
    pub total: Duration,
}

/// Greedy generation of one sequence (the `--logits-out` contract of `compile-model run`).
pub struct HostGeneration {
    /// `[T, vocab]`.
    pub prefill_logits: Vec<f32>,
    /// `[N, vocab]`: row j is what token j was chosen from.
    pub decode_logits: Vec<f32>,
    pub tokens: Vec<i64>,
}

fn bad_plan(dir: &Path, msg: String) -> Error {
    Error::Input {
        what: dir.join("plan.json").display().to_string(),
        msg,
    }
}

impl HostEngine {
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
                    "field target is {:?}: this executor runs host plans (GPU plans need the \
                     CUDA executor; build with --target host to run on the CPU)",
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
        let cpath = dir.join(CONSTANTS_FILE);
        let cbytes = std::fs::read(&cpath).map_err(|e| Error::io(&cpath, e))?;
        let constants: Vec<f32> = cbytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        for c in &plan.constants {
            if c.offset + c.len > constants.len() {
                return Err(bad_plan(
                    dir,
                    format!("constant {} lies outside constants.bin", c.name),
                ));
            }
        }
        let wdir = match weights_dir {
            Some(d) => d.to_path_buf(),
            None => Path::new(&plan.model.source).to_path_buf(),
        };
        let mut changed = Vec::new();
        for (file, want) in &plan.model.weight_headers {
            let path = wdir.join(file);
            let got = lamina_ir::weights::header_digest(&path)?;
            if &got != want {
                changed.push(file.clone());
                if !allow_weight_mismatch {
                    return Err(Error::Weights {
                        file: path.display().to_string(),
                        msg: format!(
                            "the safetensors header changed since the plan was built (sha256 {} \
                             then, {} now): rebuild the plan, or pass --allow-weight-mismatch",
                            &want[..12.min(want.len())],
                            &got[..12]
                        ),
                    });
                }
            }
        }
        let mut loader = weights::Loader::new(&wdir);
        loader.relocate(changed);
        let total = plan.weights.len();
        let weights = plan
            .weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let r = loader.load(w);
                progress(i + 1, total);
                r
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pools = plan
            .pools
            .iter()
            .map(|p| vec![0f32; p.shape.iter().product()])
            .collect();
        let arena_bytes = [&plan.prefill, &plan.decode]
            .iter()
            .map(|s| s.arena_bytes_per_row * s.rows)
            .max()
            .unwrap_or(0);
        let mut e = HostEngine {
            arena: Aligned::zeroed(arena_bytes),
            pos: vec![0; plan.limits.max_batch],
            plan,
            _lib: lib,
            fns,
            weights,
            pools,
            constants,
            profile: None,
            prefill_progress: None,
        };
        e.check_shapes(dir)?;
        Ok(e)
    }

    /// Every bound buffer is as large as its kernel parameter requires.
    fn check_shapes(&mut self, dir: &Path) -> Result<(), Error> {
        for (sname, s) in [
            ("prefill", &self.plan.prefill),
            ("decode", &self.plan.decode),
        ] {
            for (li, l) in s.launches.iter().enumerate() {
                let k = &self.plan.kernels[l.kernel];
                for (p, a) in k.params.iter().zip(&l.args) {
                    let need = p.numel(s.rows);
                    let have = match a {
                        Arg::Weight { index } => self.weights[*index].as_slice().len(),
                        Arg::Pool { index } => self.pools[*index].len(),
                        Arg::Const { index } => self.plan.constants[*index].len,
                        Arg::Arena { bytes_per_row, .. } => bytes_per_row * s.rows / p.elem.bytes(),
                        Arg::Tokens | Arg::Slot | Arg::Pos => s.rows,
                    };
                    let elem_ok = match a {
                        Arg::Tokens | Arg::Slot | Arg::Pos => p.elem == Elem::I64,
                        Arg::Arena { .. } => true,
                        _ => p.elem == Elem::F32,
                    };
                    // Weights (possibly a read-only file mapping), constants and the row
                    // indices are shared, never written.
                    let read_only = matches!(
                        a,
                        Arg::Weight { .. } | Arg::Const { .. } | Arg::Tokens | Arg::Slot | Arg::Pos
                    );
                    if read_only && p.access != lamina_ir::kernel::Access::Read {
                        return Err(bad_plan(
                            dir,
                            format!(
                                "{sname}.launches[{li}] ({}): parameter {} may be written, but its argument is read-only",
                                k.name, p.name
                            ),
                        ));
                    }
                    if have < need || !elem_ok {
                        return Err(bad_plan(
                            dir,
                            format!(
                                "{sname}.launches[{li}] ({}): parameter {} needs {need} {} elements, its argument has {have}",
                                k.name,
                                p.name,
                                p.elem.name()
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
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

    pub fn vocab(&self) -> usize {
        self.plan.model.vocab_size
    }

    /// Forgets slot `slot`'s sequence: zero state and caches, position 0.
    pub fn reset(&mut self, slot: usize) {
        for (p, pool) in self.plan.pools.iter().zip(&mut self.pools) {
            let per = pool.len() / p.shape[0];
            pool[slot * per..(slot + 1) * per].fill(0.0);
        }
        self.pos[slot] = 0;
    }

    fn check_tokens(&self, tokens: &[i64]) -> Result<(), Error> {
        let v = self.vocab() as i64;
        if let Some((i, t)) = tokens.iter().enumerate().find(|(_, &t)| t < 0 || t >= v) {
            return Err(Error::input(
                "tokens",
                format!("token {i} has id {t}, outside the vocabulary 0..{v}"),
            ));
        }
        Ok(())
    }

    fn check_slot(&self, slot: usize, extra: usize) -> Result<(), Error> {
        let b = self.plan.limits.max_batch;
        if slot >= b {
            return Err(Error::input(
                "slot",
                format!("slot {slot} outside 0..{b} (--max-batch)"),
            ));
        }
        let ctx = self.plan.limits.max_context;
        if self.pos[slot] + extra > ctx {
            return Err(Error::input(
                "tokens",
                format!(
                    "sequence in slot {slot} would reach {} positions; the plan was built with --max-context {ctx}",
                    self.pos[slot] + extra
                ),
            ));
        }
        Ok(())
    }

    /// Prefills `tokens` into slot `slot` (after its current position); returns the logits
    /// `[T, vocab]` of every prompt position.
    pub fn prefill(&mut self, slot: usize, tokens: &[i64]) -> Result<Vec<f32>, Error> {
        if tokens.is_empty() {
            return Err(Error::input("tokens", "the prompt is empty"));
        }
        self.check_tokens(tokens)?;
        self.check_slot(slot, tokens.len())?;
        let mut out = Vec::with_capacity(tokens.len() * self.vocab());
        for piece in tokens.chunks(self.plan.limits.max_prefill_rows) {
            let p0 = self.pos[slot] as i64;
            let pos: Vec<i64> = (0..piece.len() as i64).map(|i| p0 + i).collect();
            let slots = vec![slot as i64; piece.len()];
            let logits = self.run(false, piece, &slots, &pos)?;
            out.extend(logits);
            self.pos[slot] += piece.len();
            if let Some(f) = &self.prefill_progress {
                f(out.len() / self.vocab(), tokens.len());
            }
        }
        Ok(out)
    }

    /// One decode step of several sequences: `(slot, token)` each; returns `[B, vocab]`.
    pub fn decode(&mut self, batch: &[(usize, i64)]) -> Result<Vec<f32>, Error> {
        if batch.is_empty() || batch.len() > self.plan.limits.max_batch {
            return Err(Error::input(
                "batch",
                format!(
                    "{} sequences; the plan decodes 1..={}",
                    batch.len(),
                    self.plan.limits.max_batch
                ),
            ));
        }
        let mut seen = vec![false; self.plan.limits.max_batch];
        for &(s, _) in batch {
            self.check_slot(s, 1)?;
            if std::mem::replace(&mut seen[s], true) {
                return Err(Error::input(
                    "batch",
                    format!("slot {s} appears twice in one step"),
                ));
            }
        }
        let tokens: Vec<i64> = batch.iter().map(|b| b.1).collect();
        self.check_tokens(&tokens)?;
        let slots: Vec<i64> = batch.iter().map(|b| b.0 as i64).collect();
        let pos: Vec<i64> = batch.iter().map(|b| self.pos[b.0] as i64).collect();
        let logits = self.run(true, &tokens, &slots, &pos)?;
        for &(s, _) in batch {
            self.pos[s] += 1;
        }
        Ok(logits)
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
                        ptr: self.weights[*index].as_slice().as_ptr() as *mut u8,
                        len: self.weights[*index].as_slice().len(),
                    },
                    Arg::Pool { index } => View {
                        ptr: self.pools[*index].as_mut_ptr() as *mut u8,
                        len: self.pools[*index].len(),
                    },
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
        if let Some(i) = logits.iter().position(|x| !x.is_finite()) {
            return Err(Error::input(
                "forward",
                format!("row {} produced NaN or infinite logits", i / v),
            ));
        }
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

    /// Greedy generation for each prompt (each in its own slot, decoded together).
    pub fn generate(
        &mut self,
        prompts: &[Vec<i64>],
        max_new: usize,
    ) -> Result<Vec<HostGeneration>, Error> {
        if prompts.len() > self.plan.limits.max_batch {
            return Err(Error::input(
                "prompts",
                format!(
                    "{} prompts; the plan holds {} sequences (--max-batch)",
                    prompts.len(),
                    self.plan.limits.max_batch
                ),
            ));
        }
        let v = self.vocab();
        let mut gens = Vec::new();
        for (slot, p) in prompts.iter().enumerate() {
            self.reset(slot);
            let pre = self.prefill(slot, p)?;
            let last = pre[pre.len() - v..].to_vec();
            gens.push((
                HostGeneration {
                    prefill_logits: pre,
                    decode_logits: Vec::new(),
                    tokens: Vec::new(),
                },
                last,
            ));
        }
        for step in 0..max_new {
            let mut batch = Vec::new();
            for (slot, (g, last)) in gens.iter_mut().enumerate() {
                let next = crate::reference::argmax(last) as i64;
                g.decode_logits.extend_from_slice(last);
                g.tokens.push(next);
                batch.push((slot, next));
            }
            if step + 1 < max_new {
                let logits = self.decode(&batch)?;
                for (b, (_, last)) in gens.iter_mut().enumerate() {
                    *last = logits[b * v..(b + 1) * v].to_vec();
                }
            }
        }
        Ok(gens.into_iter().map(|(g, _)| g).collect())
    }
}
