//! A persistent worker pool for the matrix kernels, cheaper per call than a general scheduler.
//!
//! Decode runs 10-20 matvecs per layer, each a few hundred microseconds, back to back; waking
//! sleeping threads for each (a futex wake, an IPI on a halted core) costs a noticeable share
//! of that. Workers here spin for a while after a job, watching one atomic word, and only then
//! park, so a burst of calls finds them awake.
//!
//! Work is claimed dynamically (chunks from an atomic counter) and a job is *closed* when the
//! caller finishes its own share: a worker that had not started by then (descheduled on a busy
//! machine, or still waking up) skips the job instead of making the caller wait for it. The
//! caller waits only for workers that started, and those are at most one chunk from done.
//!
//! The gate word packs `epoch << 32 | CLOSED | started`: opening a job bumps the epoch with
//! zero started; a worker joins with a compare-exchange that fails once the job is closed.

use std::cell::UnsafeCell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Element-wise work (quantising activations, SwiGLU, gathering rows) below this many values
/// runs on the calling thread: a dispatch costs more than it saves.
pub const PARALLEL_VALUES: usize = 32 * 1024;

/// How long an idle worker watches for the next job before parking.
const SPIN: Duration = Duration::from_micros(500);
const CLOSED: u64 = 1 << 31;
const STARTED: u64 = CLOSED - 1;

/// The job being run, with its lifetime erased: valid from the gate opening until the caller
/// has seen every started worker finish (see `Pool::run`).
type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    gate: AtomicU64,
    /// Workers that finished the current job.
    done: AtomicUsize,
    /// A worker's job panicked.
    panicked: AtomicBool,
    job: UnsafeCell<Option<Job>>,
    /// Parked workers, and what they park on.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
    /// Set by [`Pool::rest`]: idle workers park now instead of spinning. Cleared by the next job.
    rest: AtomicBool,
}

// SAFETY: `job` is written only by the one caller holding `Pool::busy`, while no worker can be
// reading it (the gate is closed and every started worker is done); workers read it only after
// joining the open job through the gate (acquire), which orders it after the write.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// A fixed set of threads running one job at a time (the caller takes part as thread 0).
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Held while a job runs: a second caller (or a nested call) runs its job inline.
    busy: Mutex<()>,
}

impl Pool {
    /// A pool of `threads` threads in all (`threads - 1` workers plus the caller).
    pub fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            gate: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            job: UnsafeCell::new(None),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            rest: AtomicBool::new(false),
        });
        let workers = (1..threads.max(1))
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("matmul-{i}"))
                    .spawn(move || worker(&s, i))
                    .expect("spawn pool worker")
            })
            .collect();
        Pool {
            shared,
            workers,
            busy: Mutex::new(()),
        }
    }

    /// Tells idle workers to park now rather than spin for the next job: for a caller about to
    /// wait on something slow (the network), so spinning threads do not take the cores that
    /// the wait's own threads need. The next job wakes them as usual.
    pub fn rest(&self) {
        self.shared.rest.store(true, Ordering::Relaxed);
    }

    /// Threads that can work on a job, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Calls `f(i)` once for every `i in 0..n`, spread over the pool's threads. Returns when
    /// all calls have returned; a panic in any call is re-raised here.
    pub fn for_each(&self, n: usize, f: impl Fn(usize) + Sync) {
        let next = AtomicUsize::new(0);
        let claim = |_thread: usize| loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            f(i);
        };
        if n <= 1 || self.workers.is_empty() {
            return claim(0);
        }
        match self.busy.try_lock() {
            // A poisoned lock only means an earlier job panicked; the pool itself is intact.
            Ok(_guard) => self.run(&claim),
            Err(TryLockError::Poisoned(_guard)) => self.run(&claim),
            // Another caller (or this thread, nested) owns the workers: do it all here.
            Err(TryLockError::WouldBlock) => claim(0),
        }
    }

    /// Calls `f(i, chunk)` for every `size`-element chunk of `data` (the last one may be
    /// shorter), spread over the pool's threads.
    pub fn for_each_chunk_mut<T: Send>(
        &self,
        data: &mut [T],
        size: usize,
        f: impl Fn(usize, &mut [T]) + Sync,
    ) {
        let size = size.max(1);
        let len = data.len();
        let base = ChunkPtr(data.as_mut_ptr());
        let base = &base;
        self.for_each(len.div_ceil(size), move |i| {
            let start = i * size;
            let n = size.min(len - start);
            // SAFETY: each index gets its own disjoint range of `data`, borrowed mutably for
            // the whole call.
            let chunk = unsafe { std::slice::from_raw_parts_mut(base.0.add(start), n) };
            f(i, chunk)
        });
    }

    /// Runs `f` on the caller and on every worker that joins before the caller is done.
    /// Must be called with `busy` held.
    fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        let s = &*self.shared;
        // SAFETY: the transmute only erases the lifetime; `Close` below does not let this
        // function return (or unwind) before every worker that took the job has finished it.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        // SAFETY: no worker reads `job` now (see `Shared`).
        unsafe { *s.job.get() = Some(job) };
        s.done.store(0, Ordering::Relaxed);
        s.rest.store(false, Ordering::Relaxed);
        let epoch = ((s.gate.load(Ordering::Relaxed) >> 32) + 1) & 0xffff_ffff;
        s.gate.store(epoch << 32, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let close = Close(s);
        f(0);
        drop(close);
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a matrix kernel panicked on a pool thread");
        }
    }
}

/// Closes the open job and waits for the workers that took it (also when unwinding).
struct Close<'a>(&'a Shared);

impl Drop for Close<'_> {
    fn drop(&mut self) {
        let s = self.0;
        let started = (s.gate.fetch_or(CLOSED, Ordering::AcqRel) & STARTED) as usize;
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < started {
            spins += 1;
            if spins < 1 << 10 {
                std::hint::spin_loop();
            } else {
                // A started worker lost its core: let it have ours.
                std::thread::yield_now();
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.shutdown.store(true, Ordering::SeqCst);
        s.gate.fetch_add(1 << 32, Ordering::SeqCst);
        {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(s: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        wait_for_job(s, seen);
        if s.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let mut g = s.gate.load(Ordering::Acquire);
        seen = g >> 32;
        while g & CLOSED == 0 && g >> 32 == seen {
            match s
                .gate
                .compare_exchange_weak(g, g + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    // SAFETY: joined the open job: the caller keeps it alive until `done`
                    // counts this worker.
                    let job = unsafe { (*s.job.get()).expect("an open job is set") };
                    let f = unsafe { &*job };
                    if panic::catch_unwind(AssertUnwindSafe(|| f(index))).is_err() {
                        s.panicked.store(true, Ordering::Relaxed);
                    }
                    s.done.fetch_add(1, Ordering::Release);
                    break;
                }
                Err(cur) => g = cur,
            }
        }
    }
}

/// Returns once the gate's epoch differs from `seen` (or on shutdown): spins for `SPIN`,
/// then parks.
fn wait_for_job(s: &Shared, seen: u64) {
    let start = Instant::now();
    let mut spins = 0u32;
    while s.gate.load(Ordering::Acquire) >> 32 == seen && !s.shutdown.load(Ordering::Relaxed) {
        std::hint::spin_loop();
        spins += 1;
        if spins.is_multiple_of(256) && (start.elapsed() > SPIN || s.rest.load(Ordering::Relaxed)) {
            let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            while s.gate.load(Ordering::SeqCst) >> 32 == seen && !s.shutdown.load(Ordering::SeqCst)
            {
                g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            return;
        }
    }
}

/// A base pointer shared by the tasks of `for_each_chunk_mut`.
struct ChunkPtr<T>(*mut T);

// SAFETY: tasks only form disjoint slices from it (see `for_each_chunk_mut`).
unsafe impl<T: Send> Sync for ChunkPtr<T> {}

static GLOBAL: RwLock<Option<Arc<Pool>>> = RwLock::new(None);

/// The pool the matrix kernels use: `set_threads`'s size, else one thread per CPU.
pub fn global() -> Arc<Pool> {
    if let Some(p) = GLOBAL.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return p.clone();
    }
    let mut g = GLOBAL.write().unwrap_or_else(|e| e.into_inner());
    g.get_or_insert_with(|| {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        Arc::new(Pool::new(n))
    })
    .clone()
}

/// Replaces the kernels' pool with one of `threads` threads (calls in flight finish on the
/// old one).
pub fn set_threads(threads: usize) {
    let p = Arc::new(Pool::new(threads.max(1)));
    *GLOBAL.write().unwrap_or_else(|e| e.into_inner()) = Some(p);
}

/// Threads the kernels' pool runs.
pub fn threads() -> usize {
    global().threads()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once() {
        let pool = Pool::new(3);
        for n in [0, 1, 2, 7, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.for_each(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n={n}");
        }
    }

    /// After `rest`, idle workers park at once (long before `SPIN`), and the next job still
    /// runs on all of them.
    #[test]
    fn rest_parks_idle_workers_and_jobs_still_run() {
        let pool = Pool::new(3);
        pool.for_each(4, |_| {});
        pool.rest();
        let t0 = Instant::now();
        while pool.shared.sleepers.load(Ordering::SeqCst) < 2 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "workers did not park"
            );
            std::thread::yield_now();
        }
        let hits: Vec<AtomicUsize> = (0..64).map(|_| AtomicUsize::new(0)).collect();
        pool.for_each(64, |i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn many_short_jobs_and_parked_workers() {
        let pool = Pool::new(2);
        let total = AtomicUsize::new(0);
        for k in 0..2000 {
            if k % 500 == 0 {
                std::thread::sleep(SPIN * 3);
            }
            pool.for_each(4, |i| {
                total.fetch_add(i, Ordering::Relaxed);
            });
        }
        assert_eq!(total.load(Ordering::Relaxed), 2000 * 6);
    }

    #[test]
    fn nested_calls_run_inline() {
        let pool = Pool::new(2);
        let total = AtomicUsize::new(0);
        pool.for_each(4, |_| {
            pool.for_each(3, |_| {
                total.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(total.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn a_panic_reaches_the_caller_and_the_pool_survives() {
        let pool = Pool::new(2);
        let r = panic::catch_unwind(AssertUnwindSafe(|| {
            pool.for_each(64, |i| {
                if i == 40 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        let total = AtomicUsize::new(0);
        pool.for_each(10, |_| {
            total.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(total.load(Ordering::Relaxed), 10);
    }
}
