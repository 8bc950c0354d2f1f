//! EMO (ICCV 2023, "Rethinking Mobile Block for Efficient Attention-based Models") on burn 0.22:
//! a trainable, backend-agnostic model (the backend is chosen by the [`burn::tensor::Device`];
//! `flex` by default) whose parameter names follow the official `state_dict` keys.
//!
//! ```no_run
//! use burn::tensor::{Device, Tensor};
//! use emo_model::Emo;
//! use emo_spec::Variant;
//!
//! let device = Device::flex();
//! let (model, _wrapping) = Emo::load(&Variant::Emo1M.config(), "net.pth", &device).unwrap();
//! let x = Tensor::<4>::zeros([1, 3, 224, 224], &device);
//! let logits = model.forward(x).unwrap(); // [1, 1000]
//! ```
//!
//! Building blocks for your own networks live in [`blocks`] (the Meta Mobile Block and its
//! instantiations) and [`Irmb`].

pub mod blocks;
mod irmb;
mod layers;
mod model;
pub mod ops;
pub mod preprocess;

pub use emo_spec::{EmoConfig, Variant};
pub use irmb::Irmb;
pub use layers::{
    ConvBn, LayerNorm2d, Linear, Norm2d, SqueezeExcite, act, drop_path, dropout, param_id, seed_stochastic, stored,
};
pub use model::{Emo, EmoOutput, Head, Stage, Stem};

/// Errors of model construction and forward.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Spec(#[from] emo_spec::SpecError),
    #[error(transparent)]
    Weights(#[from] emo_weights::WeightsError),
    #[error("bad input: {0}")]
    Input(String),
}
