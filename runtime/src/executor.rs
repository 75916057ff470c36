//! What every executor of compiled plans shares: sequence bookkeeping (a position per cache
//! slot), input checks, prefill in pieces, batched decode and greedy generation. An executor
//! ([`crate::host::HostEngine`], `crate::cuda::CudaEngine`) provides only [`Executor::run_rows`]
//! (one schedule over some rows) and [`Executor::clear_slot`].

use std::path::Path;

use lamina_ir::kernel::{Access, Elem};
use lamina_ir::plan::{dtype_elem, Arg, Plan};
use lamina_ir::Error;

/// Time spent in one kernel over the launches of one phase (see [`Executor::profile`]).
#[derive(Debug, Clone)]
pub struct KernelTime {
    pub kernel: String,
    pub launches: usize,
    pub total: std::time::Duration,
}

/// Greedy generation of one sequence (the `--logits-out` contract of `compile-model run`).
pub struct Generation {
    /// `[T, vocab]`.
    pub prefill_logits: Vec<f32>,
    /// `[N, vocab]`: row j is what token j was chosen from.
    pub decode_logits: Vec<f32>,
    pub tokens: Vec<i64>,
}

pub(crate) fn bad_plan(dir: &Path, msg: String) -> Error {
    Error::Input {
        what: dir.join("plan.json").display().to_string(),
        msg,
    }
}

/// The artifact's `constants.bin` as f32, every plan constant checked to lie inside it.
pub(crate) fn load_constants(plan: &Plan, dir: &Path) -> Result<Vec<f32>, Error> {
    let path = dir.join(lamina_ir::plan::CONSTANTS_FILE);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let constants: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if let Some(c) = plan
        .constants
        .iter()
        .find(|c| c.offset + c.len > constants.len())
    {
        return Err(bad_plan(
            dir,
            format!("constant {} lies outside constants.bin", c.name),
        ));
    }
    Ok(constants)
}

/// Every launch argument is as large as its kernel parameter needs at the schedule's rows, of
/// the right element type, and read-only arguments are bound to read-only parameters.
/// `weight_len(i)` and `pool_len(i)` are the loaded lengths in f32 elements.
pub(crate) fn check_shapes(
    plan: &Plan,
    dir: &Path,
    weight_len: &dyn Fn(usize) -> usize,
    pool_len: &dyn Fn(usize) -> usize,
) -> Result<(), Error> {
    for (sname, s) in [("prefill", &plan.prefill), ("decode", &plan.decode)] {
        for (li, l) in s.launches.iter().enumerate() {
            let k = &plan.kernels[l.kernel];
            for (p, a) in k.params.iter().zip(&l.args) {
                let need = p.numel(s.rows);
                let have = match a {
                    Arg::Weight { index } => weight_len(*index),
                    Arg::Pool { index } => pool_len(*index),
                    // Each runtime allocates a workspace's declared bytes.
                    Arg::Workspace { index } => {
                        let w = &plan.workspaces[*index];
                        w.bytes / w.elem_bytes()
                    }
                    Arg::Const { index } => plan.constants[*index].len,
                    Arg::Arena { bytes_per_row, .. } => bytes_per_row * s.rows / p.elem.bytes(),
                    Arg::Tokens | Arg::Slot | Arg::Pos => s.rows,
                };
                let elem_ok = match a {
                    Arg::Tokens | Arg::Slot | Arg::Pos => p.elem == Elem::I64,
                    Arg::Arena { .. } => true,
                    Arg::Weight { index } => p.elem == dtype_elem(&plan.weights[*index].dtype),
                    Arg::Pool { index } => p.elem == dtype_elem(&plan.pools[*index].dtype),
                    Arg::Workspace { index } => {
                        p.elem == dtype_elem(&plan.workspaces[*index].dtype)
                    }
                    _ => p.elem == Elem::F32,
                };
                // Weights (possibly a read-only file mapping), constants and the row indices
                // are shared, never written.
                let read_only = matches!(
                    a,
                    Arg::Weight { .. } | Arg::Const { .. } | Arg::Tokens | Arg::Slot | Arg::Pos
                );
                if read_only && p.access != Access::Read {
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

/// A loaded plan that runs sequences. Implementors provide the first five methods; the rest is
/// shared.
pub trait Executor {
    fn plan(&self) -> &Plan;

    /// Next position of each cache slot.
    fn positions(&self) -> &[usize];
    fn positions_mut(&mut self) -> &mut [usize];

    /// Runs one schedule (`decode`, or prefill) for `tokens.len()` rows (at most the
    /// schedule's rows) and returns the logits `[rows, vocab]`, all finite.
    fn run_rows(
        &mut self,
        decode: bool,
        tokens: &[i64],
        slots: &[i64],
        pos: &[i64],
    ) -> Result<Vec<f32>, Error>;

    /// Zeroes slot `slot`'s recurrent state, conv state and caches.
    fn clear_slot(&mut self, slot: usize) -> Result<(), Error>;

    /// Called with (tokens prefilled, prompt length) after each prefill piece.
    fn prefill_progress(&self, _done: usize, _total: usize) {}

    /// Sets what [`Executor::prefill_progress`] calls.
    fn set_prefill_progress(&mut self, f: Box<dyn Fn(usize, usize)>);

    /// Starts (or, with `false`, stops and clears) timing every launch by kernel.
    fn set_profiling(&mut self, _on: bool) -> Result<(), Error> {
        Err(Error::Device(
            "per-kernel profiling is not available on this executor".into(),
        ))
    }

    /// Kernels by time spent in `decode` (or prefill) launches since profiling started,
    /// longest first.
    fn profile(&self, _decode: bool) -> Vec<KernelTime> {
        Vec::new()
    }

    fn vocab(&self) -> usize {
        self.plan().model.vocab_size
    }

    /// Forgets slot `slot`'s sequence: zero state and caches, position 0.
    fn reset(&mut self, slot: usize) -> Result<(), Error> {
        self.clear_slot(slot)?;
        self.positions_mut()[slot] = 0;
        Ok(())
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
        let b = self.plan().limits.max_batch;
        if slot >= b {
            return Err(Error::input(
                "slot",
                format!("slot {slot} outside 0..{b} (--max-batch)"),
            ));
        }
        let ctx = self.plan().limits.max_context;
        let at = self.positions()[slot];
        if at + extra > ctx {
            return Err(Error::input(
                "tokens",
                format!(
                    "sequence in slot {slot} would reach {} positions; the plan was built with --max-context {ctx}",
                    at + extra
                ),
            ));
        }
        Ok(())
    }

    /// Prefills `tokens` into slot `slot` (after its current position); returns the logits
    /// `[T, vocab]` of every prompt position.
    fn prefill(&mut self, slot: usize, tokens: &[i64]) -> Result<Vec<f32>, Error> {
        if tokens.is_empty() {
            return Err(Error::input("tokens", "the prompt is empty"));
        }
        self.check_tokens(tokens)?;
        self.check_slot(slot, tokens.len())?;
        let mut out = Vec::with_capacity(tokens.len() * self.vocab());
        for piece in tokens.chunks(self.plan().limits.max_prefill_rows) {
            let p0 = self.positions()[slot] as i64;
            let pos: Vec<i64> = (0..piece.len() as i64).map(|i| p0 + i).collect();
            let slots = vec![slot as i64; piece.len()];
            let logits = self.run_rows(false, piece, &slots, &pos)?;
            out.extend(logits);
            self.positions_mut()[slot] += piece.len();
            self.prefill_progress(out.len() / self.vocab(), tokens.len());
        }
        Ok(out)
    }

    /// One decode step of several sequences: `(slot, token)` each; returns `[B, vocab]`.
    fn decode(&mut self, batch: &[(usize, i64)]) -> Result<Vec<f32>, Error> {
        let max = self.plan().limits.max_batch;
        if batch.is_empty() || batch.len() > max {
            return Err(Error::input(
                "batch",
                format!("{} sequences; the plan decodes 1..={max}", batch.len()),
            ));
        }
        let mut seen = vec![false; max];
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
        let pos: Vec<i64> = batch.iter().map(|b| self.positions()[b.0] as i64).collect();
        let logits = self.run_rows(true, &tokens, &slots, &pos)?;
        for &(s, _) in batch {
            self.positions_mut()[s] += 1;
        }
        Ok(logits)
    }

    /// Greedy generation for each prompt (each in its own slot, decoded together).
    fn generate(&mut self, prompts: &[Vec<i64>], max_new: usize) -> Result<Vec<Generation>, Error> {
        let max = self.plan().limits.max_batch;
        if prompts.len() > max {
            return Err(Error::input(
                "prompts",
                format!(
                    "{} prompts; the plan holds {max} sequences (--max-batch)",
                    prompts.len()
                ),
            ));
        }
        let v = self.vocab();
        let mut gens = Vec::new();
        for (slot, p) in prompts.iter().enumerate() {
            self.reset(slot)?;
            let pre = self.prefill(slot, p)?;
            let last = pre[pre.len() - v..].to_vec();
            gens.push((
                Generation {
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

/// The logits of a run are finite (a NaN never passes silently).
pub(crate) fn check_finite(logits: &[f32], vocab: usize) -> Result<(), Error> {
    if let Some(i) = logits.iter().position(|x| !x.is_finite()) {
        return Err(Error::input(
            "forward",
            format!("row {} produced NaN or infinite logits", i / vocab),
        ));
    }
    Ok(())
}

/// Root-mean-square relative error `‖a − b‖ / ‖b‖` (∞ when either holds a non-finite value).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.iter().chain(b).any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum::<f64>().sqrt();
    num / den.max(f64::MIN_POSITIVE)
}

/// Compares generations of two executors of the same model (e.g. GPU against host): prefill
/// logits within `tol`, decode logits within `tol` up to the first differing greedy token, and
/// a differing token only where the reference's top two logits were within `10·tol` of each
/// other. Returns the worst prefill and decode errors.
pub fn compare_generations(
    got: &[Generation],
    want: &[Generation],
    vocab: usize,
    tol: f64,
) -> Result<(f64, f64), String> {
    if got.len() != want.len() {
        return Err(format!("{} sequences, expected {}", got.len(), want.len()));
    }
    let (mut pre, mut dec) = (0f64, 0f64);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = rel_err(&g.prefill_logits, &w.prefill_logits);
        if e > tol {
            return Err(format!("sequence {i} prefill: rel err {e:.3e} > {tol:.0e}"));
        }
        pre = pre.max(e);
        let n = w
            .tokens
            .iter()
            .zip(&g.tokens)
            .take_while(|(a, b)| a == b)
            .count();
        let rows = (n + 1).min(w.tokens.len());
        if g.decode_logits.len() < rows * vocab || w.decode_logits.len() < rows * vocab {
            return Err(format!("sequence {i}: decode logits missing"));
        }
        let e = rel_err(
            &g.decode_logits[..rows * vocab],
            &w.decode_logits[..rows * vocab],
        );
        if e > tol {
            return Err(format!("sequence {i} decode: rel err {e:.3e} > {tol:.0e}"));
        }
        dec = dec.max(e);
        if n < w.tokens.len() {
            let mut row = w.decode_logits[n * vocab..(n + 1) * vocab].to_vec();
            row.sort_by(|a, b| b.total_cmp(a));
            let margin = ((row[0] - row[1]) / row[0].abs().max(1.0)) as f64;
            if margin > 10.0 * tol {
                return Err(format!(
                    "sequence {i}: greedy token {n} differs ({} vs {}) with a margin of {margin:.2e}",
                    g.tokens[n], w.tokens[n]
                ));
            }
        }
    }
    Ok((pre, dec))
}
