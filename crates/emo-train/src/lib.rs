//! Training EMO in Rust on burn (autodiff on any device; `flex` on the CPU by default) with
//! the recipe of the paper (spec §10): AdamW (betas 0.9/0.999, wd 0.05, no decay on 1-D
//! parameters), learning rate scaled from 1.5e-3 per 512 images, per-iteration cosine schedule
//! with linear warm-up, label smoothing 0.1, global gradient-norm clipping 5.0, EMA of the whole
//! state, drop path. Evaluation runs on the fast engine (`emo-infer`) with the EMA weights.
//!
//! Runs resume exactly: the checkpoint holds the model, the EMA, the optimizer state, the
//! iteration count and the RNG that drives data order and augmentation.

pub mod augment;
pub mod data;
pub mod ema;
pub mod parallel;
pub mod plot;
pub mod randaug;
pub mod rng;
pub mod run;
pub mod schedule;
pub mod trainer;

pub use parallel::DataParallel;
pub use run::progress_bar;
pub use trainer::{EpochMetrics, TrainConfig, TrainState, Trainer, evaluate};

/// Errors of training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("data: {0}")]
    Data(String),
    #[error("config: {0}")]
    Config(String),
    #[error("I/O: {0}")]
    Io(String),
    #[error("training diverged: loss {loss} at iteration {iter}; the last good checkpoint is kept")]
    Diverged { iter: usize, loss: f64 },
    #[error(transparent)]
    Model(#[from] emo_model::ModelError),
    #[error(transparent)]
    Infer(#[from] emo_infer::InferError),
    #[error(transparent)]
    Weights(#[from] emo_weights::WeightsError),
}
