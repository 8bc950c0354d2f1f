//! The training loop: burn autodiff on any device (flex by default), the paper's recipe, and a
//! run folder that a killed run resumes from exactly.
//!
//! ```text
//! RUN/config.json        resolved TrainConfig
//! RUN/metrics.jsonl      one JSON line per epoch (loss, lr, val top-1/top-5 raw and EMA, time)
//! RUN/checkpoint/        model.safetensors, ema.safetensors, optim.bin, state.json (epoch, iter,
//!                        RNG) -- replaced atomically at the end of every epoch
//! RUN/best.safetensors   the best epoch's weights (EMA or raw, whichever scores higher)
//! RUN/ema.safetensors    the final EMA weights
//! RUN/loss.csv           iteration, running training loss of the epoch, learning rate
//! RUN/curves.png         loss and accuracy curves
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor, TensorData};
use emo_model::Emo;
use emo_spec::{EmoConfig, Variant};
use emo_weights::StateDict;
use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::augment::Pipeline;
use crate::data::Split;
use crate::ema::Ema;
use crate::parallel::{self, DataParallel};
use crate::rng::Rng;
use crate::run::{adamw, append_metrics, last_checkpoint, progress_bar, read_json, replace_checkpoint, write_json};
use crate::schedule::{Cosine, scaled_lr};

/// Everything that defines a run (saved as `config.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub variant: Variant,
    pub num_classes: usize,
    /// Dataset spec as given on the command line (`fashion-mnist[:DIR]`).
    pub data: String,
    pub epochs: usize,
    pub batch: usize,
    /// Base learning rate per 512 images (scaled linearly with the batch).
    pub lr_per_512: f64,
    pub min_lr: f64,
    pub warmup_lr: f64,
    pub warmup_epochs: usize,
    pub weight_decay: f64,
    pub label_smoothing: f64,
    /// Global gradient-norm clipping (0 = off).
    pub clip_grad: f64,
    /// EMA decay per iteration; 0 = automatic: `min(0.9998, 1 - 10 / total iterations)`, i.e.
    /// an average over about the last 10% of the run (0.9998 is the ImageNet value; a short run
    /// with it would still mostly hold its random initialisation at the end).
    pub ema_decay: f64,
    pub drop_path: f64,
    pub seed: u64,
    pub pipeline: Pipeline,
    /// Use only the first N training images (0 = all).
    pub train_limit: usize,
    /// Use only the first N evaluation images (0 = all).
    pub eval_limit: usize,
    /// Initialise from these weights (fine-tuning); the head is replaced when its width differs.
    pub init_weights: Option<PathBuf>,
    /// Data-parallel replicas (threads) each batch is split over ([`crate::parallel`]); part of
    /// the run's definition, since BatchNorm normalises each replica's shard.
    #[serde(default = "one")]
    pub workers: usize,
}

fn one() -> usize {
    1
}

impl TrainConfig {
    /// The paper's recipe (spec §10) adapted to Fashion-MNIST on a CPU.
    pub fn fashion_mnist(variant: Variant) -> Self {
        TrainConfig {
            variant,
            num_classes: 10,
            data: "fashion-mnist".into(),
            // Measured on 2 cores (two workers, 32x32, before the attention shortcut): 10 epochs
            // 92.30% in 48.7 min; 12 epochs 92.18% in 59 min (docs/runs/fmnist-emo1m-10ep,
            // -12ep). With it, 10 epochs take 62.7 min on a 3.5x slower VM (-10ep-intel). With the
            // EmoOps kernels (depthwise conv, activations), 20 epochs: 93.18% in 48.3 min on that
            // VM (docs/runs/fmnist-emo1m-20ep-intel); with the GEMM kernels, 92.91% in 26.9 min on
            // the AMD EPYC VM (docs/runs/fmnist-emo1m-20ep-epyc).
            epochs: 20,
            batch: 64,
            // 10x the paper's 1.5e-3: a 10-epoch run needs it (2-epoch probes on 12,800 images:
            // 76.0 / 80.95 / 82.0% top-1 at 1.5e-3 / 6e-3 / 1.5e-2).
            lr_per_512: 1.5e-2,
            min_lr: 1e-6,
            warmup_lr: 1e-6,
            warmup_epochs: 1,
            weight_decay: 0.05,
            label_smoothing: 0.1,
            clip_grad: 5.0,
            ema_decay: 0.0,
            drop_path: variant.config().drop_path,
            seed: 42,
            pipeline: Pipeline::default(),
            train_limit: 0,
            eval_limit: 0,
            init_weights: None,
            workers: 1,
        }
    }

    /// Iterations of the whole run over `train_len` images (drop_last).
    pub fn total_iters(&self, train_len: usize) -> usize {
        (train_len / self.batch.max(1)) * self.epochs
    }

    /// The EMA decay in use for `iters` total iterations.
    pub fn effective_ema_decay(&self, iters: usize) -> f64 {
        if self.ema_decay > 0.0 { self.ema_decay } else { (1.0 - 10.0 / iters.max(1) as f64).clamp(0.0, 0.9998) }
    }

    fn model_config(&self) -> EmoConfig {
        self.variant.config().with_num_classes(self.num_classes).with_drop_path(self.drop_path)
    }
}

/// Progress that survives a restart (`checkpoint/state.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Epochs completed.
    pub epoch: usize,
    /// Iterations completed.
    pub iter: usize,
    pub rng: Rng,
    /// Best top-1 so far (of the EMA or the raw weights).
    pub best_ema_top1: f64,
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub iter: usize,
    pub train_loss: f64,
    pub lr: f64,
    pub top1: f64,
    pub top5: f64,
    pub ema_top1: f64,
    pub ema_top5: f64,
    pub seconds: f64,
    pub images_per_s: f64,
}

/// Sum of squares of all gradients.
struct GradNorm<'a>(&'a GradientsParams, f64);
impl ModuleVisitor for GradNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.0.get::<D>(param.id) {
            self.1 += scalar(g.powi_scalar(2).sum()) as f64;
        }
    }
}

/// Multiply all gradients by a factor.
struct GradScale<'a>(&'a mut GradientsParams, f64);
impl ModuleVisitor for GradScale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.0.remove::<D>(param.id) {
            self.0.register(param.id, g.mul_scalar(self.1));
        }
    }
}

fn scalar(t: Tensor<1>) -> f32 {
    t.into_data().convert::<f32>().try_into_vec::<f32>().map(|v| v[0]).unwrap_or(f32::NAN)
}

fn optimizer(cfg: &TrainConfig, model: &Emo) -> ModuleOptimizer {
    adamw(model, cfg.weight_decay)
}

/// A training run bound to its folder.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub dir: PathBuf,
    pub state: TrainState,
    device: Device,
    /// The device of each data-parallel replica (replica `i` on `replica_devices[i % len]`);
    /// the main device by default. Gradients are gathered on the main device.
    replica_devices: Vec<Device>,
    model: Option<Emo>,
    optim: ModuleOptimizer,
    ema: Ema,
    train: Split,
    eval: Split,
    pool: DataParallel,
    /// Print progress lines.
    pub verbose: bool,
}

impl Trainer {
    /// Start a new run in `dir` (created; must not hold a run already).
    pub fn new(
        cfg: TrainConfig,
        dir: impl AsRef<Path>,
        train: Split,
        eval: Split,
        device: Device,
    ) -> Result<Self, TrainError> {
        let dir = dir.as_ref().to_path_buf();
        if dir.join("config.json").exists() {
            return Err(TrainError::Config(format!("{} already holds a run (use --resume)", dir.display())));
        }
        if cfg.batch == 0 || cfg.epochs == 0 || cfg.workers == 0 {
            return Err(TrainError::Config("batch, epochs and workers must be > 0".into()));
        }
        if !(0.0..=1.0).contains(&cfg.pipeline.random_erasing) {
            return Err(TrainError::Config("random erasing (--random-erasing) must be a probability in 0..=1".into()));
        }
        if train.classes != cfg.num_classes {
            return Err(TrainError::Config(format!("data has {} classes, config {}", train.classes, cfg.num_classes)));
        }
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::Io(format!("{}: {e}", dir.display())))?;
        let (train, eval) = limit(&cfg, train, eval);
        device.seed(cfg.seed);
        let mcfg = cfg.model_config();
        let model = match &cfg.init_weights {
            Some(w) => {
                let sd = emo_weights::load(w)?;
                let n = sd.get("head.bias").map_or(0, |t| t.shape[0]);
                let m = Emo::from_state_dict(&mcfg.clone().with_num_classes(n), &sd, &device)?;
                if n == cfg.num_classes { m } else { m.reset_classifier(cfg.num_classes, &device) }
            }
            None => Emo::new(&mcfg, &device)?,
        };
        let optim = optimizer(&cfg, &model);
        let ema = Ema::new(cfg.effective_ema_decay(cfg.total_iters(train.len())), &model.state_dict());
        write_json(&dir.join("config.json"), &cfg)?;
        let state = TrainState { epoch: 0, iter: 0, rng: Rng::new(cfg.seed), best_ema_top1: 0.0 };
        Ok(Self::assemble(cfg, dir, state, device, model, optim, ema, (train, eval)))
    }

    /// The trainer around its parts (new and resumed runs alike): one worker pool, every
    /// replica on the main device until `with_replica_devices`.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        cfg: TrainConfig,
        dir: PathBuf,
        state: TrainState,
        device: Device,
        model: Emo,
        optim: ModuleOptimizer,
        ema: Ema,
        (train, eval): (Split, Split),
    ) -> Self {
        let pool = DataParallel::new(cfg.workers);
        let replica_devices = vec![device.clone()];
        Trainer {
            cfg,
            dir,
            state,
            device,
            replica_devices,
            model: Some(model),
            optim,
            ema,
            train,
            eval,
            pool,
            verbose: true,
        }
    }

    /// Reopen a run folder and continue from its last complete checkpoint.
    pub fn resume(dir: impl AsRef<Path>, train: Split, eval: Split, device: Device) -> Result<Self, TrainError> {
        let dir = dir.as_ref().to_path_buf();
        let cfg: TrainConfig = read_json(&dir.join("config.json"))?;
        let (train, eval) = limit(&cfg, train, eval);
        let ck = last_checkpoint(&dir)?;
        let state: TrainState = read_json(&ck.join("state.json"))?;
        let sd = emo_weights::load(ck.join("model.safetensors"))?;
        let model = Emo::from_state_dict(&cfg.model_config(), &sd, &device)?;
        let optim = optimizer(&cfg, &model)
            .load(ck.join("optim.bin"))
            .map_err(|e| TrainError::Io(format!("optim.bin: {e:?}")))?;
        let ema = Ema::from_state_dict(
            cfg.effective_ema_decay(cfg.total_iters(train.len())),
            &emo_weights::load(ck.join("ema.safetensors"))?,
        );
        Ok(Self::assemble(cfg, dir, state, device, model, optim, ema, (train, eval)))
    }

    pub fn model(&self) -> &Emo {
        self.model.as_ref().expect("model")
    }

    /// Run the data-parallel replicas on these devices (replica `i` on `devices[i % len]`,
    /// e.g. one per GPU), gathering the gradients on the main device: burn's multi-device
    /// recipe (`Module::fork`, `GradientsParams::to_device`). On the CPU every replica shares
    /// the one flex device and the parallelism comes from the worker threads.
    pub fn with_replica_devices(mut self, devices: Vec<Device>) -> Self {
        if !devices.is_empty() {
            self.replica_devices = devices;
        }
        self
    }

    /// The EMA weights.
    pub fn ema_state_dict(&self) -> StateDict {
        self.ema.state_dict(&self.model().state_dict())
    }

    fn iters_per_epoch(&self) -> usize {
        self.cfg.total_iters(self.train.len()) / self.cfg.epochs.max(1)
    }

    fn schedule(&self) -> Cosine {
        let ipe = self.iters_per_epoch().max(1);
        Cosine {
            lr: scaled_lr(self.cfg.lr_per_512, self.cfg.batch),
            min_lr: self.cfg.min_lr,
            warmup_lr: self.cfg.warmup_lr,
            warmup_iters: self.cfg.warmup_epochs * ipe,
            total_iters: self.cfg.epochs * ipe,
        }
    }

    /// One optimisation step on a batch; returns the loss. The batch is split over the
    /// data-parallel replicas; their gradients (each of the shard's mean loss weighted by the
    /// shard's share of the batch) add up to the gradient of the batch's mean loss.
    fn step(&mut self, x: Vec<f32>, labels: &[u8], lr: f64) -> Result<f64, TrainError> {
        let (b, s, c) = (labels.len(), self.cfg.pipeline.size, self.cfg.num_classes);
        let eps = self.cfg.label_smoothing;
        let mut t = vec![(eps / c as f64) as f32; b * c];
        for (i, &l) in labels.iter().enumerate() {
            t[i * c + l as usize] += (1.0 - eps) as f32;
        }
        let per = 3 * s * s;
        let model = self.model.as_ref().expect("model");
        let (value, _, mut grads) = parallel::step(
            &self.pool,
            model,
            &self.replica_devices,
            &self.device,
            b,
            (self.cfg.seed, self.state.iter),
            |r| {
                let n = r.len();
                let xs = x[r.start * per..r.end * per].to_vec();
                let ts = t[r.start * c..r.end * c].to_vec();
                Box::new(move |replica: &Emo, device: &Device| {
                    let xt = Tensor::<4>::from_data(TensorData::new(xs, [n, 3, s, s]), device);
                    let tt = Tensor::<2>::from_data(TensorData::new(ts, [n, c]), device);
                    let logits = replica.forward(xt)?;
                    Ok::<_, TrainError>(((tt * log_softmax(logits, 1)).sum_dim(1).mean().neg(), ()))
                })
            },
        )?;
        let model = self.model.take().expect("model");
        if !value.is_finite() {
            self.model = Some(model);
            return Err(TrainError::Diverged { iter: self.state.iter, loss: value });
        }
        if self.cfg.clip_grad > 0.0 {
            let mut norm = GradNorm(&grads, 0.0);
            model.visit(&mut norm);
            let total = norm.1.sqrt();
            if total > self.cfg.clip_grad {
                model.visit(&mut GradScale(&mut grads, self.cfg.clip_grad / (total + 1e-6)));
            }
        }
        let model = self.optim.step(lr, model, grads);
        self.ema.update(&model.state_dict());
        self.model = Some(model);
        Ok(value)
    }

    /// Time `n` training steps (batch assembly with augmentation, forward, backward, clipping,
    /// AdamW, EMA) on the first `batch` training images, in seconds per step; for
    /// `emo bench-train`. The run's weights change; nothing is written.
    pub fn time_steps(&mut self, n: usize) -> Result<Vec<f64>, TrainError> {
        let (b, per) = (self.cfg.batch, 3 * self.cfg.pipeline.size * self.cfg.pipeline.size);
        if self.train.len() < b {
            return Err(TrainError::Config(format!("{} images < batch {b}", self.train.len())));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let mut x = vec![0f32; b * per];
            for (j, chunk) in x.chunks_mut(per).enumerate() {
                self.cfg.pipeline.apply_split(&self.train, j, Some(&mut self.state.rng), chunk);
            }
            let labels = self.train.labels[..b].to_vec();
            self.step(x, &labels, 1e-4)?;
            self.state.iter += 1;
            out.push(t.elapsed().as_secs_f64());
        }
        Ok(out)
    }

    /// Top-1 / top-5 (%) of a state dict on the evaluation split, with the fast engine.
    pub fn evaluate(&self, sd: StateDict) -> Result<(f64, f64), TrainError> {
        evaluate(&self.cfg.model_config(), sd, &self.eval, &self.cfg.pipeline)
    }

    /// Write the checkpoint folder atomically: `checkpoint.tmp` is filled and synced, the old
    /// checkpoint is moved to `checkpoint.old`, the new one renamed into place, the old removed.
    /// A kill at any point leaves a complete `checkpoint` or `checkpoint.old`.
    fn save_checkpoint(&self) -> Result<(), TrainError> {
        replace_checkpoint(&self.dir, |tmp| {
            emo_weights::save_safetensors(&self.model().state_dict(), tmp.join("model.safetensors"))?;
            emo_weights::save_safetensors(&self.ema_state_dict(), tmp.join("ema.safetensors"))?;
            self.optim.save(tmp.join("optim.bin")).map_err(|e| TrainError::Io(format!("optim.bin: {e:?}")))?;
            write_json(&tmp.join("state.json"), &self.state)
        })
    }

    /// Train until `cfg.epochs` (or `stop_after` more epochs), evaluating and checkpointing
    /// after every epoch. Returns the metrics of the epochs run.
    pub fn run(&mut self, stop_after: Option<usize>) -> Result<Vec<EpochMetrics>, TrainError> {
        let ipe = self.iters_per_epoch();
        if ipe == 0 {
            return Err(TrainError::Config(format!("{} training images < batch {}", self.train.len(), self.cfg.batch)));
        }
        let sched = self.schedule();
        let s = self.cfg.pipeline.size;
        let per = 3 * s * s;
        let mut out = Vec::new();
        let last = stop_after.map_or(self.cfg.epochs, |n| (self.state.epoch + n).min(self.cfg.epochs));
        while self.state.epoch < last {
            let start = Instant::now();
            let order = self.state.rng.permutation(self.train.len());
            let (mut loss_sum, mut lr) = (0.0, 0.0);
            for it in 0..ipe {
                let idx = &order[it * self.cfg.batch..(it + 1) * self.cfg.batch];
                let mut x = vec![0f32; idx.len() * per];
                let mut labels = Vec::with_capacity(idx.len());
                for (j, &i) in idx.iter().enumerate() {
                    self.cfg.pipeline.apply_split(
                        &self.train,
                        i,
                        Some(&mut self.state.rng),
                        &mut x[j * per..(j + 1) * per],
                    );
                    labels.push(self.train.labels[i]);
                }
                lr = sched.at(self.state.iter);
                loss_sum += self.step(x, &labels, lr)?;
                self.state.iter += 1;
                if it % 20 == 19 || it + 1 == ipe {
                    let line = format!("{},{:.5},{lr:.3e}\n", self.state.iter, loss_sum / (it + 1) as f64);
                    let _ = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(self.dir.join("loss.csv"))
                        .and_then(|mut f| f.write_all(line.as_bytes()));
                }
                if self.verbose && (it % 20 == 0 || it + 1 == ipe) {
                    let ips = ((it + 1) * self.cfg.batch) as f64 / start.elapsed().as_secs_f64();
                    eprint!(
                        "\repoch {}/{} {} {}/{ipe} loss {:.4} lr {lr:.2e} {ips:.0} img/s   ",
                        self.state.epoch + 1,
                        self.cfg.epochs,
                        progress_bar(it + 1, ipe, 20),
                        it + 1,
                        loss_sum / (it + 1) as f64
                    );
                }
            }
            let train_secs = start.elapsed().as_secs_f64();
            self.state.epoch += 1;
            let (top1, top5) = self.evaluate(self.model().state_dict())?;
            let ema_sd = self.ema_state_dict();
            let (ema_top1, ema_top5) = self.evaluate(ema_sd.clone())?;
            // best.safetensors: the better of the EMA and the raw weights of the best epoch.
            let best = top1.max(ema_top1);
            if best >= self.state.best_ema_top1 {
                self.state.best_ema_top1 = best;
                let sd = if ema_top1 >= top1 { ema_sd.clone() } else { self.model().state_dict() };
                emo_weights::save_safetensors(&sd, self.dir.join("best.safetensors"))?;
            }
            let m = EpochMetrics {
                epoch: self.state.epoch,
                iter: self.state.iter,
                train_loss: loss_sum / ipe as f64,
                lr,
                top1,
                top5,
                ema_top1,
                ema_top5,
                seconds: start.elapsed().as_secs_f64(),
                images_per_s: (ipe * self.cfg.batch) as f64 / train_secs,
            };
            if self.verbose {
                eprintln!(
                    "\repoch {}: loss {:.4}  val top-1 {top1:.2} top-5 {top5:.2}  EMA top-1 {ema_top1:.2} top-5 {ema_top5:.2}  ({:.0} s)",
                    m.epoch, m.train_loss, m.seconds
                );
            }
            append_metrics(&self.dir, &m)?;
            self.save_checkpoint()?;
            out.push(m);
            crate::plot::write(&self.dir, &read_metrics(&self.dir), self.cfg.epochs * ipe)?;
        }
        if self.state.epoch == self.cfg.epochs {
            emo_weights::save_safetensors(&self.ema_state_dict(), self.dir.join("ema.safetensors"))?;
            // (also redraws the curves of a finished run that is resumed)
            crate::plot::write(&self.dir, &read_metrics(&self.dir), self.cfg.epochs * ipe)?;
        }
        Ok(out)
    }
}

/// The epoch lines of a run's `metrics.jsonl`.
pub fn read_metrics(dir: &Path) -> Vec<EpochMetrics> {
    crate::run::read_metrics(dir)
}

fn limit(cfg: &TrainConfig, train: Split, eval: Split) -> (Split, Split) {
    let t = if cfg.train_limit > 0 { train.take(cfg.train_limit) } else { train };
    let e = if cfg.eval_limit > 0 { eval.take(cfg.eval_limit) } else { eval };
    (t, e)
}

/// Top-1 / top-5 (%) of the weights `sd` (for `cfg`) on `split`, with the evaluation transform
/// of `pipeline`, on the fast engine.
pub fn evaluate(cfg: &EmoConfig, sd: StateDict, split: &Split, pipeline: &Pipeline) -> Result<(f64, f64), TrainError> {
    let cfg = cfg.clone().with_drop_path(0.0);
    let c = cfg.num_classes;
    let mut engine = emo_infer::Engine::from_owned(&cfg, sd)?;
    let s = pipeline.size;
    let (mut top1, mut top5) = (0usize, 0usize);
    let chunk = 256;
    for start in (0..split.len()).step_by(chunk) {
        let n = chunk.min(split.len() - start);
        let mut x = vec![0f32; n * 3 * s * s];
        for i in 0..n {
            pipeline.apply_split(split, start + i, None, &mut x[i * 3 * s * s..(i + 1) * 3 * s * s]);
        }
        let logits = engine.run(&x, n, s, s)?;
        for i in 0..n {
            let row = &logits[i * c..(i + 1) * c];
            let label = split.labels[start + i] as usize;
            let better = row.iter().filter(|&&v| v > row[label]).count();
            top1 += (better == 0) as usize;
            top5 += (better < 5) as usize;
        }
    }
    let n = split.len().max(1) as f64;
    Ok((100.0 * top1 as f64 / n, 100.0 * top5 as f64 / n))
}
