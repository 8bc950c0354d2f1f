//! The EMO network: stem (`stage0`), four iRMB stages, and the classifier head
//! (LayerNorm2d -> global mean -> Linear).

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use emo_spec::{EmoConfig, StemSpec};
use emo_weights::StateDict;

use crate::ModelError;
use crate::irmb::Irmb;
use crate::layers::{ConvBn, Init, LayerNorm2d, Linear, Sink, Source};

/// `stage0`: conv kxk stride 2 (bias) + BN (no activation) = `stage0.0.convs.0.{0,1}`, then
/// the stem iRMB `stage0.1` (dw3x3 + BN + SiLU, SE, proj; no norm, no v, no residual).
#[derive(Module, Debug)]
pub struct Stem {
    pub conv: ConvBn,
    pub block: Irmb,
}

/// One stage: a downsampling iRMB followed by `depth - 1` body iRMBs.
#[derive(Module, Debug)]
pub struct Stage {
    pub blocks: Vec<Irmb>,
}

/// Classifier head: final `norm` (LayerNorm2d) -> mean over HxW -> `head` (Linear).
#[derive(Module, Debug)]
pub struct Head {
    pub norm: LayerNorm2d,
    pub head: Linear,
}

/// Outputs of a forward pass that keeps features.
#[derive(Debug, Clone)]
pub struct EmoOutput {
    /// The requested stage outputs, `(stage index, tensor)` in increasing order.
    pub features: Vec<(usize, Tensor<4>)>,
    /// Logits `[B, num_classes]` (when the model has a head and they were asked for).
    pub logits: Option<Tensor<2>>,
}

/// EMO: classifier (`num_classes > 0`) or backbone (`num_classes == 0`).
#[derive(Module, Debug)]
pub struct Emo {
    pub stem: Stem,
    pub stages: Vec<Stage>,
    pub head: Option<Head>,
}

impl Emo {
    /// A randomly initialised model, with the official init (PyTorch default for convs,
    /// trunc_normal(0.02) for the Linear, ones/zeros for norms).
    pub fn new(cfg: &EmoConfig, device: &Device) -> Result<Self, ModelError> {
        cfg.validate()?;
        Ok(Self::build(cfg, &Source { device: device.clone(), checkpoint: None, stable_ids: true }))
    }

    /// Build from a state dict with the official key names. Strict: every missing,
    /// unexpected, mis-shaped or mis-typed key is reported in one error. With
    /// `cfg.num_classes == 0` a classification checkpoint's `norm.*` / `head.*` are dropped.
    pub fn from_state_dict(cfg: &EmoConfig, sd: &StateDict, device: &Device) -> Result<Self, ModelError> {
        cfg.validate()?;
        let backbone;
        let sd = if cfg.num_classes == 0 {
            backbone = emo_weights::backbone_only(sd.clone());
            &backbone
        } else {
            sd
        };
        emo_weights::validate(sd, cfg)?;
        Ok(Self::build(cfg, &Source { device: device.clone(), checkpoint: Some(sd), stable_ids: true }))
    }

    /// Load a `.pth` or `.safetensors` checkpoint (see [`Emo::from_state_dict`]). Returns the
    /// model and how the state dict was wrapped in the file.
    pub fn load(
        cfg: &EmoConfig,
        path: impl AsRef<std::path::Path>,
        device: &Device,
    ) -> Result<(Self, emo_weights::Wrapping), ModelError> {
        let sd = emo_weights::load(path)?;
        Ok((Self::from_state_dict(cfg, &sd, device)?, sd.wrapping))
    }

    fn build(cfg: &EmoConfig, src: &Source) -> Self {
        let StemSpec { in_chans, dim, kernel } = cfg.stem();
        let stem_conv = ConvBn {
            conv: src.conv("stage0.0.convs.0.0", in_chans, dim, kernel, 2, 1, true),
            norm: src.bn("stage0.0.convs.0.1", dim),
        };
        let blocks = cfg.blocks();
        let stem = Stem { conv: stem_conv, block: Irmb::build(&blocks[0], src) };
        let stages = (1..=4)
            .map(|s| Stage { blocks: blocks.iter().filter(|b| b.stage == s).map(|b| Irmb::build(b, src)).collect() })
            .collect();
        let head = (cfg.num_classes > 0).then(|| {
            let c4 = cfg.stages[3].dim;
            Head {
                norm: src.ln2d("norm", c4),
                head: Linear {
                    weight: src.param("head.weight", [cfg.num_classes, c4], Init::TruncNormal),
                    bias: src.param("head.bias", [cfg.num_classes], Init::Zeros),
                },
            }
        });
        Emo { stem, stages, head }
    }

    /// The weights under their official names (f32; `num_batches_tracked` written as 0).
    pub fn state_dict(&self) -> StateDict {
        let mut sd = StateDict::new();
        let mut out = Sink(&mut sd);
        out.conv("stage0.0.convs.0.0", &self.stem.conv.conv);
        out.bn("stage0.0.convs.0.1", &self.stem.conv.norm);
        self.stem.block.export("stage0.1", &mut out);
        for (i, s) in self.stages.iter().enumerate() {
            for (j, b) in s.blocks.iter().enumerate() {
                b.export(&format!("stage{}.{j}", i + 1), &mut out);
            }
        }
        if let Some(h) = &self.head {
            out.ln2d("norm", &h.norm);
            out.put("head.weight".into(), h.head.weight.val());
            out.put("head.bias".into(), h.head.bias.val());
        }
        sd
    }

    /// Input channels the stem expects.
    pub fn in_chans(&self) -> usize {
        self.stem.conv.conv.weight.dims()[1]
    }

    /// Number of classes (0 for a backbone).
    pub fn num_classes(&self) -> usize {
        self.head.as_ref().map(|h| h.head.bias.dims()[0]).unwrap_or(0)
    }

    fn check_input(&self, x: &Tensor<4>) -> Result<(), ModelError> {
        let [b, c, h, w] = x.dims();
        if c != self.in_chans() || b == 0 || h == 0 || w == 0 {
            return Err(ModelError::Input(format!(
                "expected an NCHW tensor with {} channels and non-zero sizes, got [{b}, {c}, {h}, {w}]",
                self.in_chans()
            )));
        }
        Ok(())
    }

    /// Run the network. `out_indices` selects which stage outputs (0 = stage0 .. 4 = stage4)
    /// are kept; `logits` asks for the classifier output. Stops after the last stage needed.
    pub fn forward_with(&self, x: Tensor<4>, out_indices: &[usize], logits: bool) -> Result<EmoOutput, ModelError> {
        self.check_input(&x)?;
        if logits && self.head.is_none() {
            return Err(ModelError::Input("this model has no classifier head (num_classes = 0)".into()));
        }
        let last = if logits { 4 } else { out_indices.iter().copied().max().unwrap_or(0) };
        let mut features = Vec::new();
        let mut x = self.stem.block.forward(self.stem.conv.forward(x));
        if out_indices.contains(&0) {
            features.push((0, x.clone()));
        }
        for (i, stage) in self.stages.iter().enumerate().take(last) {
            for b in &stage.blocks {
                x = b.forward(x);
            }
            if out_indices.contains(&(i + 1)) {
                features.push((i + 1, x.clone()));
            }
        }
        let logits = if logits { Some(self.forward_head(x)) } else { None };
        Ok(EmoOutput { features, logits })
    }

    /// Classifier logits `[B, num_classes]` for an NCHW batch of any size >= 1x1.
    pub fn forward(&self, x: Tensor<4>) -> Result<Tensor<2>, ModelError> {
        Ok(self.forward_with(x, &[], true)?.logits.expect("logits requested"))
    }

    /// The stage outputs selected by `out_indices` (timm `features_only`).
    pub fn forward_features(&self, x: Tensor<4>, out_indices: &[usize]) -> Result<Vec<Tensor<4>>, ModelError> {
        Ok(self.forward_with(x, out_indices, false)?.features.into_iter().map(|(_, t)| t).collect())
    }

    /// Final norm, pooled features `[B, C4]` (before the Linear).
    pub fn forward_pooled(&self, stage4: Tensor<4>) -> Tensor<2> {
        let h = self.head.as_ref().expect("model has a head");
        let x = h.norm.forward(stage4);
        let [b, c, _, _] = x.dims();
        x.mean_dim(2).mean_dim(3).reshape([b, c])
    }

    fn forward_head(&self, stage4: Tensor<4>) -> Tensor<2> {
        let h = self.head.as_ref().expect("model has a head");
        h.head.forward(self.forward_pooled(stage4))
    }

    /// Replace the classifier by a fresh one with `n` outputs (fine-tuning); `n == 0` removes it.
    pub fn reset_classifier(mut self, n: usize, device: &Device) -> Self {
        let c4 = self.stages[3].blocks[0].proj.weight.dims()[0];
        let src = Source { device: device.clone(), checkpoint: None, stable_ids: true };
        self.head = (n > 0).then(|| Head {
            norm: self.head.take().map(|h| h.norm).unwrap_or_else(|| src.ln2d("norm", c4)),
            head: Linear {
                weight: src.param("head.weight", [n, c4], Init::TruncNormal),
                bias: src.param("head.bias", [n], Init::Zeros),
            },
        });
        self
    }
}
