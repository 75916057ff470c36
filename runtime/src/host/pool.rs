//! The worker pool that runs a launch's programs: one spinning worker per extra core.
//!
//! A decode step is a few hundred launches of a few microseconds each, so waking sleeping
//! threads per launch (a futex round trip, 5–20 µs here) would cost more than the kernels.
//! Workers spin on an epoch counter between launches and park only after [`SPIN`] without
//! work, like OpenMP's active wait policy.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_millis(2);

/// A job: called once per thread with `(thread, threads)`.
type Job<'a> = dyn Fn(usize, usize) + Sync + 'a;

struct Shared {
    /// The current job (a `*const Job` erased to a thin pointer to its fat pointer).
    job: AtomicPtr<&'static Job<'static>>,
    /// Bumped once per job; workers run each epoch once.
    epoch: AtomicUsize,
    /// Workers finished with the current epoch.
    done: AtomicUsize,
    stop: AtomicBool,
    sleeping: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
    /// The first panic of a worker's share in the current job.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// One job at a time (engines on several threads share the pool).
    busy: Mutex<()>,
}

impl Pool {
    /// A pool of `threads` threads in all (the caller's plus `threads - 1` workers).
    pub fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            epoch: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            sleeping: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
            panic: Mutex::new(None),
        });
        let n = threads.max(1);
        let workers = (1..n)
            .map(|t| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("lamina-worker-{t}"))
                    // Kernels keep their locals on the stack (at most 1 MiB per program).
                    .stack_size(16 << 20)
                    .spawn(move || worker(&s, t, n))
                    .expect("spawn a worker thread")
            })
            .collect();
        Pool {
            shared,
            workers,
            busy: Mutex::new(()),
        }
    }

    /// The process-wide pool: `LAMINA_THREADS` threads, default one per available core.
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| {
            let n = std::env::var("LAMINA_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&n: &usize| n >= 1)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            Pool::new(n)
        })
    }

    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(t, threads)` on every thread of the pool and returns when all have finished.
    /// A panic in any share is re-raised here, after every share has finished (the job's
    /// borrows stay valid until then).
    pub fn run(&self, f: &Job<'_>) {
        let n = self.threads();
        if n == 1 {
            f(0, 1);
            return;
        }
        let _one = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: the reference is erased to 'static only while published: this function
        // waits below until every worker has finished with it before returning or unwinding
        // (the caller's own share cannot unwind past the wait: it is caught).
        let fat: &'static Job<'static> = unsafe { std::mem::transmute::<&Job<'_>, _>(f) };
        let slot = &fat as *const &'static Job<'static> as *mut &'static Job<'static>;
        s.job.store(slot, Ordering::Relaxed);
        s.done.store(0, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleeping.load(Ordering::SeqCst) > 0 {
            let _g = s.park.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0, n)));
        while s.done.load(Ordering::Acquire) < n - 1 {
            std::hint::spin_loop();
        }
        let theirs = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if let Some(p) = theirs {
            resume_unwind(p);
        }
    }
}

fn worker(s: &Shared, t: usize, n: usize) {
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.stop.load(Ordering::Relaxed) {
                return;
            }
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
                let mut g = s.park.lock().unwrap_or_else(|e| e.into_inner());
                s.sleeping.fetch_add(1, Ordering::SeqCst);
                while s.epoch.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::SeqCst) {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleeping.fetch_sub(1, Ordering::SeqCst);
            } else {
                std::hint::spin_loop();
            }
        }
        // SAFETY: the publisher keeps the job alive until `done` counts this worker.
        let f: &Job<'_> = unsafe { *s.job.load(Ordering::Relaxed) };
        // A panicking share must still be counted, or the publisher would wait forever; the
        // panic is handed to the publisher, which re-raises it.
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(t, n))) {
            let mut slot = s.panic.lock().unwrap_or_else(|e| e.into_inner());
            slot.get_or_insert(p);
        }
        s.done.fetch_add(1, Ordering::Release);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.park.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_share_reaches_the_caller_and_the_pool_survives() {
        let p = Pool::new(2);
        for culprit in [0, 1] {
            let r = catch_unwind(AssertUnwindSafe(|| {
                p.run(&|t, _| {
                    if t == culprit {
                        panic!("share {t} fails");
                    }
                })
            }));
            assert!(r.is_err(), "the panic of share {culprit} was lost");
        }
        let hits = AtomicUsize::new(0);
        p.run(&|_, _| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.into_inner(), 2);
    }

    #[test]
    fn every_thread_runs_each_job_once() {
        let p = Pool::new(3);
        for round in 0..200 {
            let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            p.run(&|t, n| {
                assert_eq!(n, 3);
                hits[t].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "round {round}"
            );
            if round == 100 {
                // Let the workers park, then wake them.
                std::thread::sleep(SPIN * 3);
            }
        }
    }
}
