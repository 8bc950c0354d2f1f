//! A tiny fork-join pool for the engine's many short parallel regions.
//!
//! EMO at batch 1 runs ~50 parallel regions of 20-200 µs each; a general work-stealing pool
//! that puts idle workers to sleep pays a wake-up (futex + scheduler) on most of them. Here the
//! workers spin on an epoch counter for a short while after each region (then park), the
//! caller takes part in the work, and tasks are handed out with one atomic counter.
//!
//! Nested calls (from inside a task) and concurrent callers run their tasks inline, so the pool
//! is always safe to use; only the first caller at a time gets the workers.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

type Task<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// Incremented to publish a job.
    epoch: AtomicUsize,
    /// `(epoch << 32) | next task`: tasks are claimed with a CAS that also checks the epoch,
    /// so a late worker can never run a task of a newer job with an older closure.
    claim: AtomicU64,
    done: AtomicUsize,
    n: AtomicUsize,
    /// The current job (epoch, `Task` with its lifetime erased), valid while `done < n`.
    job: Mutex<(usize, Option<Task<'static>>)>,
    workers: OnceLock<Vec<Thread>>,
}

struct Pool {
    shared: &'static Shared,
    lock: Mutex<()>,
}

static THREADS: AtomicUsize = AtomicUsize::new(0);
static POOL: OnceLock<Pool> = OnceLock::new();

thread_local! {
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// Set the number of threads (the caller included) before the first parallel region.
/// Returns false if the pool was already started with another count.
pub fn set_num_threads(n: usize) -> bool {
    THREADS.store(n.max(1), Ordering::Relaxed);
    POOL.get().is_none_or(|p| p.shared.workers.get().map_or(0, Vec::len) + 1 == n.max(1))
}

/// The number of threads regions run on (the caller included).
pub fn num_threads() -> usize {
    match POOL.get() {
        Some(p) => p.shared.workers.get().map_or(0, Vec::len) + 1,
        None => match THREADS.load(Ordering::Relaxed) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        },
    }
}

/// How long an idle worker spins before parking. Long enough to bridge the serial gaps of a
/// forward pass and back-to-back requests; call [`release`] to park the workers at once.
const SPIN: Duration = Duration::from_millis(20);

static RELEASE: AtomicUsize = AtomicUsize::new(0);

/// Let the workers park now instead of spinning (e.g. before handing the cores to other work).
pub fn release() {
    RELEASE.fetch_add(1, Ordering::AcqRel);
}

fn run_tasks(s: &Shared, epoch: usize, n: usize, f: Task) {
    IN_TASK.with(|t| t.set(true));
    let tag = (epoch as u64 & 0xffff_ffff) << 32;
    let mut cur = s.claim.load(Ordering::Acquire);
    loop {
        if cur & !0xffff_ffff != tag || (cur & 0xffff_ffff) as usize >= n {
            break;
        }
        match s.claim.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                f((cur & 0xffff_ffff) as usize);
                s.done.fetch_add(1, Ordering::AcqRel);
                cur = s.claim.load(Ordering::Acquire);
            }
            Err(now) => cur = now,
        }
    }
    IN_TASK.with(|t| t.set(false));
}

fn worker(s: &'static Shared) {
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let released = RELEASE.load(Ordering::Acquire);
        let mut spins = 0u32;
        loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && (RELEASE.load(Ordering::Acquire) != released || start.elapsed() > SPIN) {
                std::thread::park_timeout(Duration::from_millis(50));
            } else if spins.is_multiple_of(64) {
                // Let other runnable threads in now and then (an oversubscribed machine).
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        let (e, job) = *s.job.lock().unwrap();
        if let Some(f) = job {
            run_tasks(s, e, s.n.load(Ordering::Acquire), f);
        }
    }
}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        let n = num_threads();
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            epoch: AtomicUsize::new(0),
            claim: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            n: AtomicUsize::new(0),
            job: Mutex::new((0, None)),
            workers: OnceLock::new(),
        }));
        let handles = (1..n)
            .map(|i| {
                std::thread::Builder::new()
                    .name(format!("emo-worker-{i}"))
                    .spawn(move || worker(shared))
                    .expect("spawn worker")
                    .thread()
                    .clone()
            })
            .collect();
        let _ = shared.workers.set(handles);
        Pool { shared, lock: Mutex::new(()) }
    })
}

/// Run `f(0..n)` on the pool (the caller works too) and return when all are done.
pub fn parallel_for(n: usize, f: impl Fn(usize) + Sync) {
    if n == 0 {
        return;
    }
    if n == 1 || num_threads() == 1 || IN_TASK.with(|t| t.get()) {
        (0..n).for_each(f);
        return;
    }
    let p = pool();
    let Ok(_guard) = p.lock.try_lock() else {
        (0..n).for_each(f);
        return;
    };
    let s = p.shared;
    let fr: Task = &f;
    // SAFETY: the job is removed below, after every task has finished (done == n), before
    // `f` goes out of scope; workers only call it while tasks remain.
    let fr: Task<'static> = unsafe { std::mem::transmute::<Task<'_>, Task<'static>>(fr) };
    let epoch = s.epoch.load(Ordering::Acquire).wrapping_add(1);
    {
        let mut job = s.job.lock().unwrap();
        s.n.store(n, Ordering::Release);
        s.done.store(0, Ordering::Release);
        s.claim.store((epoch as u64 & 0xffff_ffff) << 32, Ordering::Release);
        *job = (epoch, Some(fr));
    }
    s.epoch.store(epoch, Ordering::Release);
    for w in s.workers.get().into_iter().flatten() {
        w.unpark();
    }
    run_tasks(s, epoch, n, fr);
    // Wait for the stragglers: spin briefly, then yield so that a descheduled worker (busy
    // machine) gets the core back instead of us burning its time slice.
    let mut spins = 0u32;
    while s.done.load(Ordering::Acquire) < n {
        spins = spins.wrapping_add(1);
        if spins < 4096 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    *s.job.lock().unwrap() = (epoch, None);
}

/// A raw pointer that tasks may share; each task must touch a disjoint part.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Split `out` into chunks of `chunk` elements (the last may be shorter) and run
/// `f(chunk index, chunk)` for each on the pool.
pub fn parallel_chunks_mut(out: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let len = out.len();
    let chunk = chunk.max(1);
    let p = SendPtr(out.as_mut_ptr());
    parallel_for(len.div_ceil(chunk), move |i| {
        let p = p;
        let start = i * chunk;
        let n = chunk.min(len - start);
        // SAFETY: chunks are disjoint and inside `out`, which outlives the call.
        f(i, unsafe { std::slice::from_raw_parts_mut(p.0.add(start), n) });
    });
}
