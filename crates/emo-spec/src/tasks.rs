//! Dense-prediction models on an EMO backbone (spec §12): SSDLite and RetinaNet for detection,
//! DeepLabv3 and PSPNet (each with the auxiliary FCN head on stage 3) for segmentation.
//!
//! Every conv of a neck or head is listed here once, as a [`HeadConv`] under its mmdet / mmseg
//! state-dict key, with its output size at the configured input. The burn heads build their
//! convs from this list, checkpoints are validated against it, and params / FLOPs are counted
//! from it, so the three cannot disagree.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::SpecError;
use crate::config::{EmoConfig, Variant};
use crate::keys::{KeyKind, KeySpec};
use crate::plan::conv_out;

/// A dense-prediction task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    SsdLite,
    RetinaNet,
    DeepLabV3,
    PspNet,
}

impl Task {
    pub const ALL: [Task; 4] = [Task::SsdLite, Task::RetinaNet, Task::DeepLabV3, Task::PspNet];

    pub fn name(self) -> &'static str {
        match self {
            Task::SsdLite => "ssdlite",
            Task::RetinaNet => "retinanet",
            Task::DeepLabV3 => "deeplabv3",
            Task::PspNet => "pspnet",
        }
    }

    pub fn is_detection(self) -> bool {
        matches!(self, Task::SsdLite | Task::RetinaNet)
    }

    /// The input size (H, W) the paper's FLOPs refer to: 320x320 (SSDLite), 1280x800 (mmdet's
    /// `get_flops` default for RetinaNet), 512x512 (segmentation).
    pub fn paper_input(self) -> (usize, usize) {
        match self {
            Task::SsdLite => (320, 320),
            Task::RetinaNet => (1280, 800),
            Task::DeepLabV3 | Task::PspNet => (512, 512),
        }
    }

    /// Classes of the paper's dataset: 80 (COCO) or 150 (ADE20K).
    pub fn paper_classes(self) -> usize {
        if self.is_detection() { 80 } else { 150 }
    }

    /// The paper's (params in M, FLOPs in G) for a variant, if published (no EMO-6M results).
    pub fn paper_params_flops(self, v: Variant) -> Option<(f64, f64)> {
        let i = match v {
            Variant::Emo1M => 0,
            Variant::Emo2M => 1,
            Variant::Emo5M => 2,
            Variant::Emo6M => return None,
        };
        let t: [(f64, f64); 3] = match self {
            Task::SsdLite => [(2.3, 0.6), (3.3, 0.9), (6.0, 1.8)],
            Task::RetinaNet => [(10.4, 163.0), (11.5, 167.0), (14.4, 178.0)],
            Task::DeepLabV3 => [(5.6, 2.4), (6.9, 3.5), (10.3, 5.8)],
            Task::PspNet => [(4.3, 2.1), (5.5, 3.1), (8.5, 5.3)],
        };
        Some(t[i])
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        Task::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(s)).ok_or_else(|| {
            SpecError::Invalid(format!("unknown task `{s}` (expected ssdlite, retinanet, deeplabv3 or pspnet)"))
        })
    }
}

/// Activation after a head conv's norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadAct {
    None,
    Relu,
    Relu6,
}

/// One conv of a neck or head: `key.weight` (and `key.bias`), optionally followed by a BN
/// under `bn` and an activation. `out_hw` is its output size at the configured input.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadConv {
    pub key: String,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub dilation: usize,
    pub groups: usize,
    pub bias: bool,
    /// Key prefix of the BatchNorm that follows, if any.
    pub bn: Option<String>,
    pub act: HeadAct,
    pub out_hw: (usize, usize),
}

/// Output length of a conv along one side of `n` input positions (PyTorch's rule).
pub fn conv_len(n: usize, k: usize, stride: usize, pad: usize, dilation: usize) -> usize {
    (n + 2 * pad - dilation * (k - 1) - 1) / stride + 1
}

/// The kernel offsets `t` (`0..k`) of a conv along one side of `n` input positions that read
/// at least one input position (tap `t` of output `o` reads `o * stride + t * dilation - pad`).
/// The others read only zero padding, so they add exactly zero to every output and get exactly
/// zero gradient: the ASPP branches with dilations 12 / 24 / 36 on a map of fewer positions
/// than their dilation are 1x1 convs. For a stride-1 conv the live taps are one range.
pub fn live_taps(n: usize, k: usize, stride: usize, pad: usize, dilation: usize) -> Vec<usize> {
    let outs = conv_len(n, k, stride, pad, dilation);
    (0..k)
        .filter(|&t| {
            (0..outs).any(|o| {
                let i = (o * stride + t * dilation) as isize - pad as isize;
                (0..n as isize).contains(&i)
            })
        })
        .collect()
}

impl HeadConv {
    /// A conv that only training runs: the auxiliary FCN head's and the semantic-encoding
    /// layer ([`SE_LAYER`]); inference engines skip them.
    pub fn training_only(&self) -> bool {
        self.key.starts_with("auxiliary_head") || self.key.starts_with(SE_LAYER)
    }

    /// Output length along one side of `n` input positions.
    pub fn out_len(&self, n: usize) -> usize {
        conv_len(n, self.k, self.stride, self.pad, self.dilation)
    }

    /// [`live_taps`] of this conv along one side of `n` input positions.
    pub fn live_taps(&self, n: usize) -> Vec<usize> {
        live_taps(n, self.k, self.stride, self.pad, self.dilation)
    }

    pub fn params(&self) -> usize {
        self.cout * self.cin / self.groups * self.k * self.k
            + if self.bias { self.cout } else { 0 }
            + if self.bn.is_some() { 2 * self.cout } else { 0 }
    }

    /// MACs plus 2 per element for an eval BN (fvcore's convention).
    pub fn flops(&self) -> u64 {
        let n = (self.out_hw.0 * self.out_hw.1) as u64;
        n * (self.cout * self.cin / self.groups * self.k * self.k) as u64
            + if self.bn.is_some() { 2 * n * self.cout as u64 } else { 0 }
    }
}

/// BatchNorm eps / momentum of the mmdet SSDLite neck and head.
pub const SSD_BN_EPS: f64 = 1e-3;
pub const SSD_BN_MOMENTUM: f64 = 0.03;
/// BatchNorm eps / momentum of mmseg's heads (PyTorch defaults).
pub const SEG_BN_EPS: f64 = 1e-5;
/// Channels of the extra SSDLite levels after (C3, C4).
pub const SSD_EXTRA: [usize; 4] = [512, 256, 256, 128];
/// Channels of the FPN / RetinaNet head and of the segmentation heads.
pub const HEAD_CHANNELS: usize = 256;
/// ASPP dilations of DeepLabv3.
pub const ASPP_DILATIONS: [usize; 4] = [1, 12, 24, 36];
/// PSPNet pool scales.
pub const PSP_SCALES: [usize; 4] = [1, 2, 3, 6];
/// RetinaNet: 3 scales per octave x 3 ratios.
pub const RETINA_ANCHORS: usize = 9;
/// SSD: 2 square anchors + ratios 2, 1/2, 3, 1/3.
pub const SSD_ANCHORS: usize = 6;

/// A dense-prediction model: task, backbone, classes and input size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DenseConfig {
    pub task: Task,
    /// The backbone (no classifier: `num_classes == 0`).
    pub backbone: EmoConfig,
    /// Object classes (detection, without background) or label classes (segmentation).
    pub num_classes: usize,
    /// Input (H, W) the model is trained and evaluated at.
    pub input: (usize, usize),
    /// Segmentation, training only: EncNet's semantic-encoding ("SE") layer,
    /// `decode_head.se_layer`, a linear classifier of stage 4's average-pooled features that
    /// predicts which classes an image holds (`SE_LAYER`); not part of the inference model
    /// (no official DeepLabv3 / PSPNet checkpoint has it).
    #[serde(default)]
    pub se_layer: bool,
}

/// The state-dict key prefix of the training-only semantic-encoding layer
/// ([`DenseConfig::se_layer`]).
pub const SE_LAYER: &str = "decode_head.se_layer";

impl DenseConfig {
    /// The official configuration of `task` on `variant`: EMO-5M uses window 10 for detection
    /// and 16 for segmentation; the other variants keep 7.
    pub fn new(task: Task, variant: Variant, num_classes: usize, input: (usize, usize)) -> Self {
        let mut backbone = variant.config().with_num_classes(0);
        if variant == Variant::Emo5M {
            backbone = backbone.with_window_size(if task.is_detection() { 10 } else { 16 });
        }
        DenseConfig { task, backbone, num_classes, input, se_layer: false }
    }

    /// The paper's setting: COCO/ADE20K classes at the paper's input size.
    pub fn paper(task: Task, variant: Variant) -> Self {
        Self::new(task, variant, task.paper_classes(), task.paper_input())
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        self.backbone.validate()?;
        if self.backbone.num_classes != 0 {
            return Err(SpecError::Invalid("a dense model's backbone has no classifier (num_classes 0)".into()));
        }
        if self.num_classes == 0 || self.input.0 == 0 || self.input.1 == 0 {
            return Err(SpecError::Invalid("a dense model needs classes > 0 and a non-empty input".into()));
        }
        if self.se_layer && self.task.is_detection() {
            return Err(SpecError::Invalid("the semantic-encoding layer is for segmentation models".into()));
        }
        Ok(())
    }

    /// Backbone stages used by the head (spec §12).
    pub fn out_indices(&self) -> Vec<usize> {
        match self.task {
            Task::SsdLite => vec![3, 4],
            _ => vec![1, 2, 3, 4],
        }
    }

    /// Feature-map sizes of the detection levels (SSDLite: 6 levels, RetinaNet: P3-P7).
    pub fn level_sizes(&self) -> Vec<(usize, usize)> {
        let hw = self.backbone.stage_hw(self.input.0, self.input.1);
        let down = |(h, w): (usize, usize)| (conv_out(h, 3, 2), conv_out(w, 3, 2));
        // (backbone levels, total levels): SSDLite C3, C4 + 4 extra; RetinaNet P3-P5 + P6, P7.
        let (mut v, levels) = match self.task {
            Task::SsdLite => (vec![hw[3], hw[4]], 6),
            Task::RetinaNet => (vec![hw[2], hw[3], hw[4]], 5),
            _ => return vec![],
        };
        while v.len() < levels {
            let last = *v.last().expect("levels");
            v.push(down(last));
        }
        v
    }

    /// Every conv of the neck and heads, in state-dict order, with mmdet / mmseg keys.
    pub fn head_convs(&self) -> Vec<HeadConv> {
        let dims = self.backbone.stage_dims();
        let hw = self.backbone.stage_hw(self.input.0, self.input.1);
        let mut v = Vec::new();
        let mut conv = |key: String, cin, cout, k, stride, dilation, groups, bias, bn: bool, act, out_hw| {
            let bn = bn
                .then(|| format!("{}.bn", key.strip_suffix(".conv").expect("a conv with BN is keyed `<module>.conv`")));
            v.push(HeadConv {
                pad: dilation * (k - 1) / 2,
                key,
                cin,
                cout,
                k,
                stride,
                dilation,
                groups,
                bias,
                bn,
                act,
                out_hw,
            })
        };
        let levels = self.level_sizes();
        match self.task {
            Task::SsdLite => {
                let chans: Vec<usize> = [dims[3], dims[4]].into_iter().chain(SSD_EXTRA).collect();
                for i in 0..4 {
                    let (cin, cout, mid) = (chans[i + 1], chans[i + 2], chans[i + 2] / 2);
                    let p = format!("neck.extra_layers.{i}");
                    let (r, out) = (HeadAct::Relu6, levels[i + 2]);
                    conv(format!("{p}.0.conv"), cin, mid, 1, 1, 1, 1, false, true, r, levels[i + 1]);
                    conv(format!("{p}.1.depthwise_conv.conv"), mid, mid, 3, 2, 1, mid, false, true, r, out);
                    conv(format!("{p}.1.pointwise_conv.conv"), mid, cout, 1, 1, 1, 1, false, true, r, out);
                }
                for (branch, per) in
                    [("cls_convs", (self.num_classes + 1) * SSD_ANCHORS), ("reg_convs", 4 * SSD_ANCHORS)]
                {
                    for (l, (&c, &out)) in chans.iter().zip(&levels).enumerate() {
                        let p = format!("bbox_head.{branch}.{l}");
                        conv(format!("{p}.0.conv"), c, c, 3, 1, 1, c, false, true, HeadAct::Relu6, out);
                        conv(format!("{p}.1"), c, per, 1, 1, 1, 1, true, false, HeadAct::None, out);
                    }
                }
            }
            Task::RetinaNet => {
                let c = HEAD_CHANNELS;
                for (i, s) in (2..=4).enumerate() {
                    conv(
                        format!("neck.lateral_convs.{i}.conv"),
                        dims[s],
                        c,
                        1,
                        1,
                        1,
                        1,
                        true,
                        false,
                        HeadAct::None,
                        hw[s],
                    );
                }
                for (i, s) in (2..=4).enumerate() {
                    conv(format!("neck.fpn_convs.{i}.conv"), c, c, 3, 1, 1, 1, true, false, HeadAct::None, hw[s]);
                }
                conv("neck.fpn_convs.3.conv".into(), dims[4], c, 3, 2, 1, 1, true, false, HeadAct::None, levels[3]);
                conv("neck.fpn_convs.4.conv".into(), c, c, 3, 2, 1, 1, true, false, HeadAct::None, levels[4]);
                // The head is shared across levels: its FLOPs are those of every level.
                let lv: Vec<(usize, usize)> = levels.clone();
                let area: usize = lv.iter().map(|(h, w)| h * w).sum();
                let shared = (area, 1);
                for branch in ["cls_convs", "reg_convs"] {
                    for i in 0..4 {
                        conv(
                            format!("bbox_head.{branch}.{i}.conv"),
                            c,
                            c,
                            3,
                            1,
                            1,
                            1,
                            true,
                            false,
                            HeadAct::Relu,
                            shared,
                        );
                    }
                }
                conv(
                    "bbox_head.retina_cls".into(),
                    c,
                    self.num_classes * RETINA_ANCHORS,
                    3,
                    1,
                    1,
                    1,
                    true,
                    false,
                    HeadAct::None,
                    shared,
                );
                conv(
                    "bbox_head.retina_reg".into(),
                    c,
                    4 * RETINA_ANCHORS,
                    3,
                    1,
                    1,
                    1,
                    true,
                    false,
                    HeadAct::None,
                    shared,
                );
            }
            Task::DeepLabV3 | Task::PspNet => {
                let (c, c4, h4) = (HEAD_CHANNELS, dims[4], hw[4]);
                let r = HeadAct::Relu;
                // mmseg's BaseDecodeHead makes `conv_seg` before the subclass's own modules.
                conv("decode_head.conv_seg".into(), c, self.num_classes, 1, 1, 1, 1, true, false, HeadAct::None, h4);
                if self.task == Task::DeepLabV3 {
                    conv("decode_head.image_pool.1.conv".into(), c4, c, 1, 1, 1, 1, false, true, r, (1, 1));
                    for (i, &d) in ASPP_DILATIONS.iter().enumerate() {
                        let k = if d == 1 { 1 } else { 3 };
                        conv(format!("decode_head.aspp_modules.{i}.conv"), c4, c, k, 1, d, 1, false, true, r, h4);
                    }
                    conv("decode_head.bottleneck.conv".into(), 5 * c, c, 3, 1, 1, 1, false, true, r, h4);
                } else {
                    for (i, &s) in PSP_SCALES.iter().enumerate() {
                        conv(format!("decode_head.psp_modules.{i}.1.conv"), c4, c, 1, 1, 1, 1, false, true, r, (s, s));
                    }
                    conv("decode_head.bottleneck.conv".into(), c4 + 4 * c, c, 3, 1, 1, 1, false, true, r, h4);
                }
                conv(
                    "auxiliary_head.conv_seg".into(),
                    c,
                    self.num_classes,
                    1,
                    1,
                    1,
                    1,
                    true,
                    false,
                    HeadAct::None,
                    hw[3],
                );
                conv("auxiliary_head.convs.0.conv".into(), dims[3], c, 3, 1, 1, 1, false, true, r, hw[3]);
                if self.se_layer {
                    // A linear layer on the pooled features, as a 1x1 conv.
                    let (k, none) = (self.num_classes, HeadAct::None);
                    conv(SE_LAYER.into(), c4, k, 1, 1, 1, 1, true, false, none, (1, 1));
                }
            }
        }
        v
    }

    /// The head conv under `key` (panics on an unknown key: a bug in the head's layout).
    pub fn head_conv(&self, key: &str) -> HeadConv {
        self.head_convs()
            .into_iter()
            .find(|c| c.key == key)
            .unwrap_or_else(|| panic!("no head conv `{key}` in the {} layout", self.task))
    }

    /// Every key of the model's state dict: `backbone.*` then the neck and heads.
    pub fn state_dict_keys(&self) -> Vec<KeySpec> {
        let mut keys: Vec<KeySpec> = self
            .backbone
            .state_dict_keys()
            .into_iter()
            .map(|k| KeySpec { name: format!("backbone.{}", k.name), ..k })
            .collect();
        let mut push = |name: String, shape: Vec<usize>, kind| keys.push(KeySpec { name, shape, kind });
        for c in self.head_convs() {
            push(format!("{}.weight", c.key), vec![c.cout, c.cin / c.groups, c.k, c.k], KeyKind::Param);
            if c.bias {
                push(format!("{}.bias", c.key), vec![c.cout], KeyKind::Param);
            }
            if let Some(bn) = &c.bn {
                push(format!("{bn}.weight"), vec![c.cout], KeyKind::Param);
                push(format!("{bn}.bias"), vec![c.cout], KeyKind::Param);
                push(format!("{bn}.running_mean"), vec![c.cout], KeyKind::Buffer);
                push(format!("{bn}.running_var"), vec![c.cout], KeyKind::Buffer);
                push(format!("{bn}.num_batches_tracked"), vec![], KeyKind::Counter);
            }
        }
        keys
    }

    /// The state-dict keys whose shape depends on the class count: the classifier convs (and the
    /// training-only semantic-encoding layer), the layers a fine-tune to other classes starts
    /// afresh, as mmdet's `load_from` skips what no longer fits.
    pub fn classifier_keys(&self) -> Vec<String> {
        let other = DenseConfig { num_classes: self.num_classes + 1, ..self.clone() }.state_dict_keys();
        self.state_dict_keys().into_iter().zip(other).filter(|(a, b)| a.shape != b.shape).map(|(a, _)| a.name).collect()
    }

    /// Trainable parameters of backbone, neck and heads (the auxiliary head included, as the
    /// paper's tables count it).
    pub fn num_params(&self) -> usize {
        self.backbone.num_params() + self.head_convs().iter().map(HeadConv::params).sum::<usize>()
    }

    /// FLOPs of one image at `self.input`, by part (see [`DenseFlops`]).
    pub fn flops(&self) -> DenseFlops {
        let convs = self.head_convs();
        let sum = |aux: bool| convs.iter().filter(|c| c.training_only() == aux).map(HeadConv::flops).sum();
        DenseFlops { backbone: self.backbone.flops(self.input.0, self.input.1), head: sum(false), aux: sum(true) }
    }

    /// SSD anchor levels: the official 320x320 min / max sizes scaled to this input (by its
    /// larger side), centred on each level's grid (the official strides at 320x320).
    pub fn ssd_anchor_levels(&self) -> Vec<SsdLevel> {
        const STRIDES: [f64; 6] = [16.0, 32.0, 64.0, 107.0, 160.0, 320.0];
        const MIN: [f64; 6] = [48.0, 100.0, 150.0, 202.0, 253.0, 304.0];
        const MAX: [f64; 6] = [100.0, 150.0, 202.0, 253.0, 304.0, 320.0];
        let s = self.input.0.max(self.input.1) as f64 / 320.0;
        let official = self.input == (320, 320);
        self.level_sizes()
            .into_iter()
            .enumerate()
            .map(|(i, size)| SsdLevel {
                size,
                stride: if official {
                    (STRIDES[i], STRIDES[i])
                } else {
                    (self.input.0 as f64 / size.0 as f64, self.input.1 as f64 / size.1 as f64)
                },
                min_size: MIN[i] * s,
                max_size: MAX[i] * s,
            })
            .collect()
    }
}

/// One SSD anchor level.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SsdLevel {
    /// Feature-map size (H, W).
    pub size: (usize, usize),
    /// Grid step (y, x) in input pixels; anchors are centred at `(i + 0.5) * stride`.
    pub stride: (f64, f64),
    pub min_size: f64,
    pub max_size: f64,
}

/// FLOPs of a dense model (fvcore convention: MACs, BN 2 and LN 5 per element).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DenseFlops {
    pub backbone: crate::Flops,
    /// Neck and (decode / detection) head.
    pub head: u64,
    /// The training-only heads: the auxiliary FCN head (0 for detection) and, when configured,
    /// the semantic-encoding layer.
    pub aux: u64,
}

impl DenseFlops {
    /// One inference (the auxiliary head does not run).
    pub fn inference(&self) -> u64 {
        self.backbone.total() + self.head
    }

    /// What mmcv's module-hook counter (the paper's `get_flops`) sees: it misses the
    /// functional attention matmuls.
    pub fn mmcv_like(&self) -> u64 {
        self.inference() - self.backbone.attention
    }
}
