//! Variant configs: the official `EMO_1M` .. `EMO_6M` settings as plain data.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::SpecError;

/// Normalisation layer type of a stage (`bn_2d` / `ln_2d` in the official code). Every norm
/// uses eps = 1e-6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Norm {
    /// BatchNorm2d(eps 1e-6).
    Batch,
    /// LayerNorm over the channels of each pixel (LayerNorm2d, eps 1e-6).
    Layer,
}

/// Activation type of a stage (`silu` / `gelu`; GELU is the exact erf form).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Act {
    Silu,
    Gelu,
}

/// The eps of every BatchNorm and LayerNorm in EMO.
pub const NORM_EPS: f64 = 1e-6;

/// The four released EMO variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Variant {
    Emo1M,
    Emo2M,
    Emo5M,
    Emo6M,
}

impl Variant {
    pub const ALL: [Variant; 4] = [Variant::Emo1M, Variant::Emo2M, Variant::Emo5M, Variant::Emo6M];

    /// The command-line name: `emo-1m`, `emo-2m`, `emo-5m`, `emo-6m`.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Emo1M => "emo-1m",
            Variant::Emo2M => "emo-2m",
            Variant::Emo5M => "emo-5m",
            Variant::Emo6M => "emo-6m",
        }
    }

    /// The paper's name: `EMO-1M` ...
    pub fn paper_name(self) -> &'static str {
        match self {
            Variant::Emo1M => "EMO-1M",
            Variant::Emo2M => "EMO-2M",
            Variant::Emo5M => "EMO-5M",
            Variant::Emo6M => "EMO-6M",
        }
    }

    /// The official config of this variant (1000 ImageNet classes, window 7).
    pub fn config(self) -> EmoConfig {
        match self {
            Variant::Emo1M => EmoConfig::emo_1m(),
            Variant::Emo2M => EmoConfig::emo_2m(),
            Variant::Emo5M => EmoConfig::emo_5m(),
            Variant::Emo6M => EmoConfig::emo_6m(),
        }
    }

    /// ImageNet-1k top-1 / top-5 of the official EMA weights (README).
    pub fn imagenet_top1_top5(self) -> (f64, f64) {
        match self {
            Variant::Emo1M => (71.5, 90.368),
            Variant::Emo2M => (75.1, 92.184),
            Variant::Emo5M => (78.4, 93.970),
            Variant::Emo6M => (79.0, 94.162),
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Variant {
    type Err = SpecError;
    /// Accepts `emo-1m`, `emo_1m`, `EMO_1M`, `EMO-1M`, `1m`.
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let k = s.trim().to_ascii_lowercase().replace('_', "-");
        let k = k.strip_prefix("emo-").unwrap_or(&k);
        match k {
            "1m" => Ok(Variant::Emo1M),
            "2m" => Ok(Variant::Emo2M),
            "5m" => Ok(Variant::Emo5M),
            "6m" => Ok(Variant::Emo6M),
            _ => Err(SpecError::UnknownVariant(s.to_string())),
        }
    }
}

/// Settings of one of the four stages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageConfig {
    pub depth: usize,
    pub dim: usize,
    /// Expansion ratio of the body blocks; the downsampling block uses twice this.
    pub exp_ratio: f64,
    /// Channels per attention head (only used when `attention` is on).
    pub dim_head: usize,
    pub norm: Norm,
    pub act: Act,
    /// Depthwise kernel size (3 or 5).
    pub dw_kernel: usize,
    /// Window size of the strided-window attention; 0 means one global window.
    pub window_size: usize,
    /// Whether the body blocks (not block 0) use window attention.
    pub attention: bool,
}

/// A whole EMO network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmoConfig {
    /// The variant this config derives from, if any (for messages only).
    pub variant: Option<Variant>,
    pub in_chans: usize,
    pub stem_dim: usize,
    /// Kernel of the stem conv (`dw_kss[0]`).
    pub stem_kernel: usize,
    pub stages: [StageConfig; 4],
    /// Number of classifier outputs; 0 builds no head (backbone only).
    pub num_classes: usize,
    /// Maximum drop-path rate (linearly spread over the stage-1..4 blocks).
    pub drop_path: f64,
}

#[allow(clippy::too_many_arguments)]
fn stages(depths: [usize; 4], dims: [usize; 4], exp: [f64; 4], heads: [usize; 4]) -> [StageConfig; 4] {
    let norms = [Norm::Batch, Norm::Batch, Norm::Layer, Norm::Layer];
    let acts = [Act::Silu, Act::Silu, Act::Gelu, Act::Gelu];
    let kernels = [3, 3, 5, 5];
    let attn = [false, false, true, true];
    std::array::from_fn(|i| StageConfig {
        depth: depths[i],
        dim: dims[i],
        exp_ratio: exp[i],
        dim_head: heads[i],
        norm: norms[i],
        act: acts[i],
        dw_kernel: kernels[i],
        window_size: 7,
        attention: attn[i],
    })
}

impl EmoConfig {
    fn base(variant: Variant, stages: [StageConfig; 4], drop_path: f64) -> Self {
        EmoConfig {
            variant: Some(variant),
            in_chans: 3,
            stem_dim: 24,
            stem_kernel: 3,
            stages,
            num_classes: 1000,
            drop_path,
        }
    }

    #[rustfmt::skip]
    pub fn emo_1m() -> Self {
        Self::base(Variant::Emo1M, stages([2, 2, 8, 3], [32, 48, 80, 168], [2.0, 2.5, 3.0, 3.5], [16, 16, 20, 21]), 0.04036)
    }
    #[rustfmt::skip]
    pub fn emo_2m() -> Self {
        Self::base(Variant::Emo2M, stages([3, 3, 9, 3], [32, 48, 120, 200], [2.0, 2.5, 3.0, 3.5], [16, 16, 20, 20]), 0.05)
    }
    #[rustfmt::skip]
    pub fn emo_5m() -> Self {
        Self::base(Variant::Emo5M, stages([3, 3, 9, 3], [48, 72, 160, 288], [2.0, 3.0, 4.0, 4.0], [24, 24, 32, 32]), 0.05)
    }
    #[rustfmt::skip]
    pub fn emo_6m() -> Self {
        Self::base(Variant::Emo6M, stages([3, 3, 9, 3], [48, 72, 160, 320], [2.0, 3.0, 4.0, 5.0], [16, 24, 20, 32]), 0.05)
    }

    /// Replace the classifier width (0 = no head).
    pub fn with_num_classes(mut self, n: usize) -> Self {
        self.num_classes = n;
        self
    }

    /// Set the maximum drop-path rate (0 for inference).
    pub fn with_drop_path(mut self, p: f64) -> Self {
        self.drop_path = p;
        self
    }

    /// Set the attention window of every stage (EMO-5M uses 10 for detection, 16 for
    /// segmentation; 0 = global attention).
    pub fn with_window_size(mut self, ws: usize) -> Self {
        for s in &mut self.stages {
            s.window_size = ws;
        }
        self
    }

    /// A short name for messages: the variant name, or `custom`.
    pub fn name(&self) -> &'static str {
        self.variant.map(Variant::name).unwrap_or("custom")
    }

    /// Check the invariants the model relies on.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.in_chans == 0 || self.stem_dim == 0 {
            return Err(SpecError::Invalid("in_chans and stem_dim must be > 0".into()));
        }
        if !(0.0..1.0).contains(&self.drop_path) {
            return Err(SpecError::Invalid(format!("drop_path {} not in [0, 1)", self.drop_path)));
        }
        for (i, s) in self.stages.iter().enumerate() {
            if s.depth == 0 || s.dim == 0 || s.exp_ratio <= 0.0 {
                return Err(SpecError::Invalid(format!("stage {}: depth, dim and exp_ratio must be > 0", i + 1)));
            }
            if s.dw_kernel % 2 == 0 {
                return Err(SpecError::Invalid(format!("stage {}: dw_kernel must be odd", i + 1)));
            }
            if s.attention && (s.dim_head == 0 || s.dim % s.dim_head != 0) {
                return Err(SpecError::Invalid(format!(
                    "stage {}: dim {} is not divisible by dim_head {}",
                    i + 1,
                    s.dim,
                    s.dim_head
                )));
            }
        }
        Ok(())
    }
}
