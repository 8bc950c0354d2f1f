//! EMO ("Rethinking Mobile Block for Efficient Attention-based Models", Zhang et al., ICCV 2023)
//! as plain data: the four variants, their configs, the expansion of a config into per-block
//! specs, the official state-dict layout, and params / FLOPs counted as the paper counts them.
//!
//! Framework-free: the burn model, the checkpoint validator and the fast engine all build
//! from [`EmoConfig::blocks`], so they cannot disagree about the architecture.

mod config;
mod features;
mod flops;
mod keys;
mod plan;
mod tasks;

pub use config::{Act, EmoConfig, NORM_EPS, Norm, StageConfig, Variant};
pub use features::{FeatureInfo, resolve_out_indices};
pub use flops::Flops;
pub use keys::{KeyKind, KeySpec};
pub use plan::{AttnSpec, BlockSpec, StemSpec, WindowGeom, conv_out, conv_pad};
pub use tasks::{
    ASPP_DILATIONS, DenseConfig, DenseFlops, HEAD_CHANNELS, HeadAct, HeadConv, PSP_SCALES, RETINA_ANCHORS, SE_LAYER,
    SEG_BN_EPS, SSD_ANCHORS, SSD_BN_EPS, SSD_BN_MOMENTUM, SSD_EXTRA, SsdLevel, Task, conv_len, live_taps,
};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("unknown EMO variant `{0}` (expected one of emo-1m, emo-2m, emo-5m, emo-6m)")]
    UnknownVariant(String),
    #[error("invalid EMO config: {0}")]
    Invalid(String),
    #[error("out index {index} is out of range for the 5 stages stage0..stage4")]
    OutIndex { index: i64 },
}
