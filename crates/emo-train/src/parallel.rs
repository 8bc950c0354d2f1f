//! Data-parallel training: a batch is split into contiguous shards, each shard's forward and
//! backward pass runs on its own replica of the model (burn's `Module::fork`: the same
//! parameters as fresh autodiff leaves, so the replicas' graphs are independent) on its own
//! persistent thread, and the gradients are summed into one optimiser step.
//!
//! This is burn's multi-device recipe (fork per device, gradients gathered on the main
//! device); on the CPU every replica runs on the one `flex` device, and the gain comes from
//! the cores (burn's CPU ops run on one thread each). Each replica normalises its own shard
//! (BatchNorm statistics per shard, as with DistributedDataParallel without SyncBN); burn's
//! `RunningState` averages the replicas' running statistics. Threads are persistent because
//! that averaging is keyed by thread: replica `i` always runs on the same thread, replica 0 on
//! the caller's.
//!
//! Everything is deterministic for a given number of workers: shard boundaries depend only on
//! the batch size, each replica's drop path / dropout draws come from a thread-local source
//! seeded per step and replica ([`emo_model::seed_stochastic`]), and the gradients are summed
//! in replica order.

use std::ops::Range;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};

type Job = Box<dyn FnOnce() + Send>;

/// A pool of `n` data-parallel workers: worker 0 is the calling thread, workers 1.. are
/// persistent threads.
pub struct DataParallel {
    workers: Vec<(Sender<Job>, JoinHandle<()>)>,
}

impl DataParallel {
    /// `n` workers (at least one).
    pub fn new(n: usize) -> Self {
        let workers = (1..n.max(1))
            .map(|i| {
                let (tx, rx): (Sender<Job>, Receiver<Job>) = channel();
                let h = std::thread::Builder::new()
                    .name(format!("emo-replica-{i}"))
                    .spawn(move || {
                        while let Ok(job) = rx.recv() {
                            job();
                        }
                    })
                    .expect("spawn a data-parallel worker thread");
                (tx, h)
            })
            .collect();
        DataParallel { workers }
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.workers.len() + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Run job `i` on worker `i` (job 0 on the calling thread) and return the results in order.
    /// At most `len()` jobs.
    pub fn run<R: Send + 'static>(&self, jobs: Vec<Box<dyn FnOnce() -> R + Send>>) -> Vec<R> {
        assert!(jobs.len() <= self.len(), "{} jobs for {} workers", jobs.len(), self.len());
        let mut jobs = jobs.into_iter();
        let Some(first) = jobs.next() else { return Vec::new() };
        let receivers: Vec<Receiver<std::thread::Result<R>>> = jobs
            .zip(&self.workers)
            .map(|(job, (tx, _))| {
                let (rtx, rrx) = channel();
                let wrapped: Job = Box::new(move || {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    let _ = rtx.send(r);
                });
                tx.send(wrapped).expect("data-parallel worker thread is gone");
                rrx
            })
            .collect();
        let mut out = vec![first()];
        for rx in receivers {
            match rx.recv().expect("data-parallel worker thread is gone") {
                Ok(r) => out.push(r),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    }
}

impl Drop for DataParallel {
    fn drop(&mut self) {
        for (tx, h) in self.workers.drain(..) {
            drop(tx);
            let _ = h.join();
        }
    }
}

/// The workers a batch of `batch` gets by default: one per core, each with at least 8 images.
pub fn default_workers(batch: usize) -> usize {
    cores().min(batch / 8).max(1)
}

/// `n` items split into `k` contiguous near-equal shards (the first `n % k` one longer); no
/// empty shard (fewer shards when `n < k`).
pub fn shards(n: usize, k: usize) -> Vec<Range<usize>> {
    let k = k.clamp(1, n.max(1));
    let (q, r) = (n / k, n % k);
    let mut start = 0;
    (0..k)
        .map(|i| {
            let len = q + usize::from(i < r);
            let s = start..start + len;
            start += len;
            s
        })
        .collect()
}

/// `f` over `threads` contiguous parts of `items` ([`shards`]), each on a scoped thread; the
/// results in order (one thread: `f(items)` on the caller's). A panic in `f` is re-raised.
pub fn map_parts<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&[T]) -> R + Sync) -> Vec<R> {
    let parts = shards(items.len(), threads);
    if parts.len() <= 1 {
        return vec![f(items)];
    }
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = parts.into_iter().map(|r| s.spawn(move || f(&items[r]))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    })
}

/// `f` on each item, over `threads` contiguous parts ([`map_parts`]); the results in item order.
pub fn map_each<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    map_parts(items, threads, |part| part.iter().map(&f).collect::<Vec<_>>()).into_iter().flatten().collect()
}

/// The cores this process may run on (1 if unknown).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Add the gradients `b` into `a`, parameter by parameter of `model`.
pub fn add_grads<M: Module>(model: &M, a: &mut GradientsParams, mut b: GradientsParams) {
    struct Add<'a>(&'a mut GradientsParams, &'a mut GradientsParams);
    impl ModuleVisitor for Add<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(gb) = self.1.remove::<D>(param.id) {
                let sum = match self.0.remove::<D>(param.id) {
                    Some(ga) => ga.add(gb),
                    None => gb,
                };
                self.0.register(param.id, sum);
            }
        }
    }
    model.visit(&mut Add(a, &mut b));
}

/// What a replica runs: the model's forward pass and its loss (the shard's mean) on the
/// replica and its device, plus anything else to hand back (e.g. named loss parts).
pub type ReplicaFn<M, P, E> = Box<dyn FnOnce(&M, &Device) -> Result<(Tensor<1>, P), E> + Send>;

/// One data-parallel forward and backward pass over a batch of `batch` items: shard `r` (of
/// `pool.len()`) runs `make(r)` on a fork of `model` on `devices[w % len]`, with its stochastic
/// layers seeded by [`step_seed`]`(seed, iter, w)`. Each shard's loss is weighted by its share of
/// the batch, so the gradients, summed on `main` in replica order, are those of the mean over
/// shards. Returns the summed loss (not finite: no gradients were taken), each replica's extra
/// value, and the gradients.
#[allow(clippy::too_many_arguments)]
pub fn step<M, P, E>(
    pool: &DataParallel,
    model: &M,
    devices: &[Device],
    main: &Device,
    batch: usize,
    (seed, iter): (u64, usize),
    mut make: impl FnMut(Range<usize>) -> ReplicaFn<M, P, E>,
) -> Result<(f64, Vec<P>, GradientsParams), E>
where
    M: Module + 'static,
    P: Send + 'static,
    E: Send + 'static,
{
    type Out<P, E> = Result<(f64, P, GradientsParams), E>;
    let jobs: Vec<Box<dyn FnOnce() -> Out<P, E> + Send>> = shards(batch, pool.len())
        .into_iter()
        .enumerate()
        .map(|(w, r)| {
            let device = devices[w % devices.len()].clone();
            let replica = model.clone().fork(&device);
            let share = r.len() as f64 / batch as f64;
            let seed = step_seed(seed, iter, w);
            let f = make(r);
            Box::new(move || -> Out<P, E> {
                emo_model::seed_stochastic(seed);
                let (loss, extra) = f(&replica, &device)?;
                let total = loss.mul_scalar(share);
                let value = total.clone().into_data().convert::<f64>().try_into_vec::<f64>().map_or(f64::NAN, |v| v[0]);
                if !value.is_finite() {
                    return Ok((value, extra, GradientsParams::new()));
                }
                Ok((value, extra, GradientsParams::from_grads(total.backward(), &replica)))
            }) as _
        })
        .collect();
    let (mut value, mut extras, mut grads) = (0.0, Vec::new(), GradientsParams::new());
    for r in pool.run(jobs) {
        let (v, extra, g) = r?;
        value += v;
        extras.push(extra);
        add_grads(model, &mut grads, g.to_device(main, model));
    }
    Ok((value, extras, grads))
}

/// The seed of replica `worker`'s stochastic layers at iteration `iter` of a run seeded `seed`.
pub fn step_seed(seed: u64, iter: usize, worker: usize) -> u64 {
    let mut z =
        seed ^ (iter as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (worker as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_in_order() {
        assert_eq!(shards(10, 3), vec![0..4, 4..7, 7..10]);
        assert_eq!(shards(64, 2), vec![0..32, 32..64]);
        assert_eq!(shards(2, 4), vec![0..1, 1..2]);
        assert_eq!(shards(5, 1), vec![0..5]);
    }

    #[test]
    fn map_each_keeps_item_order_on_any_thread_count() {
        let items: Vec<u32> = (0..11).collect();
        let want: Vec<u32> = items.iter().map(|v| v * v).collect();
        for threads in [1, 2, 3, 11, 20] {
            assert_eq!(map_each(&items, threads, |v| v * v), want, "{threads} threads");
        }
        assert!(map_each(&[] as &[u32], 4, |v| *v).is_empty());
    }

    #[test]
    fn jobs_run_on_their_own_persistent_threads_in_order() {
        let pool = DataParallel::new(3);
        let ids = |pool: &DataParallel| {
            let jobs: Vec<Box<dyn FnOnce() -> (usize, std::thread::ThreadId) + Send>> =
                (0..3usize).map(|i| Box::new(move || (i * 10, std::thread::current().id())) as _).collect();
            pool.run(jobs)
        };
        let a = ids(&pool);
        let b = ids(&pool);
        assert_eq!(a.iter().map(|r| r.0).collect::<Vec<_>>(), vec![0, 10, 20]);
        assert_eq!(a, b, "replica i runs on the same thread every step");
        assert_eq!(a[0].1, std::thread::current().id());
        assert_ne!(a[1].1, a[2].1);
    }

    #[test]
    fn a_panicking_job_panics_the_caller_and_the_pool_survives() {
        let pool = DataParallel::new(2);
        let jobs: Vec<Box<dyn FnOnce() -> u32 + Send>> = vec![Box::new(|| 1), Box::new(|| panic!("boom"))];
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.run(jobs)));
        assert!(r.is_err());
        let jobs: Vec<Box<dyn FnOnce() -> u32 + Send>> = vec![Box::new(|| 1), Box::new(|| 2)];
        assert_eq!(pool.run(jobs), vec![1, 2]);
    }
}
