//! Training and evaluating the dense models: AdamW (no decay on 1-D params), cosine with linear
//! warm-up (detection) or poly 0.9 (segmentation) per iteration, flip + photometric
//! augmentation, per-epoch COCO mAP or mIoU on the validation split, and a run folder that
//! resumes exactly at epoch boundaries:
//!
//! ```text
//! RUN/config.json        the resolved DenseTrainConfig
//! RUN/model.json         what `emo detect` / `emo segment` need (task, variant, classes, input)
//! RUN/metrics.jsonl      one line per epoch
//! RUN/best.safetensors   weights of the best epoch (mmdet / mmseg key names; the EMA or the
//!                        raw weights, whichever scored higher)
//! RUN/checkpoint/        model.safetensors, optim.bin, state.json, ema.safetensors (with
//!                        `ema_decay`; the folder is replaced atomically)
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::{Module, ParamGroup};
use burn::optim::ModuleOptimizer;
use burn::optim::lr_scheduler::module_lr_scheduler::{ModuleLearningRate, ModuleLrScheduler};
use burn::tensor::Device;
use emo_spec::{DenseConfig, RETINA_ANCHORS, SSD_ANCHORS, Task, Variant};
use emo_train::ema::Ema;
use emo_train::parallel::{self, DataParallel};
use emo_train::rng::Rng;
use emo_weights::StateDict;
use serde::{Deserialize, Serialize};

use crate::assign::{MaxIou, Targets, targets_valid};
use crate::boxes::{BBox, BoxCoder};
use crate::data::{
    DETECTION_PAD, DetDataset, PAPER_RESCALE, SegDataset, TestScale, augment, augment_top_left, batch_size_padded,
    det_keep_ratio, index_coco, list_seg, pad_to, seg_geometry_keep_ratio, seg_geometry_with, ssd_geometry,
};
use crate::fast::DenseInfer;
use crate::loss::{Ohem, focal_loss, se_loss, seg_loss_with, ssd_loss};
use crate::metrics::{ClassAp, CocoStats, DetBox, SegMetrics, SegStats, coco_eval};
use crate::model::{DenseHead, DenseModel, DenseOutput, SEG_HEAD_DROPOUT};
use crate::names::{ADE20K_CLASSES, COCO_CAT_IDS, COCO_CLASSES};
use crate::predict::{
    AnchorsBySize, DetTestCfg, SegAug, batch_tensor, batch_tensor_padded, detect, detect_resized, segment_aug,
};
use crate::{DenseError, anchors};

/// Everything a dense training run is made of (written to `RUN/config.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DenseTrainConfig {
    pub task: Task,
    pub variant: Variant,
    /// COCO-layout (detection) or mask-folder (segmentation) root.
    pub data: PathBuf,
    pub train_split: String,
    pub val_split: String,
    /// Model input (H, W); images are resized to it.
    pub input: (usize, usize),
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Linear warm-up from lr * 0.001 (detection only).
    pub warmup_iters: usize,
    pub seed: u64,
    /// Initial backbone weights (a classification or backbone checkpoint).
    pub backbone_weights: Option<PathBuf>,
    /// Fine-tune a whole trained model of the same task and variant (mmdet / mmseg's
    /// `load_from`): a run's weights (its `model.json` beside them) or an official mmdet / mmseg
    /// checkpoint. Every weight is loaded, the classifiers too when the classes are the same
    /// (names, in order); otherwise the rows of each class the model knows by name are carried
    /// and the rest start afresh ([`DenseModel::carry_classes`]). Not with `backbone_weights`.
    #[serde(default)]
    pub init_weights: Option<PathBuf>,
    /// Keep the backbone BNs in eval mode (mmdet `norm_eval`).
    pub norm_eval: bool,
    /// mmdet `frozen_stages` (-1: none).
    pub frozen_stages: i64,
    /// ADE20K: label 0 is "other" (ignored), the rest shift down by one.
    pub reduce_zero_label: bool,
    /// Segmentation: weight of the auxiliary FCN head's loss (mmseg's 0.4).
    pub aux_weight: f64,
    pub neg_pos_ratio: usize,
    /// The paper's geometric augmentation too (SSD: Expand + MinIoURandomCrop; segmentation:
    /// rescale 0.5-2 + crop), besides flip and photometric distortion.
    #[serde(default = "yes")]
    pub geometric_augment: bool,
    /// Segmentation: the rescale ratio range of the geometric augmentation (mmseg's
    /// `ratio_range`; the paper's 0.5-2.0).
    #[serde(default = "paper_rescale")]
    pub rescale: (f32, f32),
    /// Keep-ratio training resize (mmseg's / mmdet's `img_scale`): each training image is read
    /// at its own size and resized keeping its aspect ratio. Segmentation (e.g. ADE20K's
    /// (2048, 512)): to this scale times a ratio from `rescale`, cropped to the input
    /// ([`seg_geometry_keep_ratio`]). RetinaNet (COCO's (1333, 800)): to this scale, flipped,
    /// padded to 32 and batched padded to the largest, the anchors over the padding ignored
    /// ([`det_keep_ratio`], [`anchors::valid_flags`]). Evaluation then tests at the same
    /// keep-ratio scale ([`DenseTrainConfig::test_scale`]). `None`: images squeezed to the input
    /// first (the canvas recipes).
    #[serde(default)]
    pub train_scale: Option<(usize, usize)>,
    /// Use at most this many training / validation images (0 = all).
    pub limit_train: usize,
    pub limit_val: usize,
    /// Training images per epoch, drawn from one running shuffle of the whole training set
    /// (`stream_order`), so a large set is seen once over several evaluated epochs; 0: one
    /// full pass per epoch.
    #[serde(default)]
    pub epoch_images: usize,
    /// Data-parallel replicas (threads) each batch is split over (`emo_train::parallel`);
    /// part of the run's definition, since BatchNorm normalises each replica's shard and the
    /// detection losses are normalised per shard (as mmdet does per GPU).
    #[serde(default = "one")]
    pub workers: usize,
    /// Exponential moving average of the weights (parameters and BN statistics) per iteration,
    /// evaluated next to the raw weights each epoch; 0 = off. A decay of `1 - 1/k` averages
    /// over about the last `k` iterations.
    #[serde(default)]
    pub ema_decay: f64,
    /// Segmentation: online hard example mining on the decode head's pixel loss (mmseg's
    /// `OHEMPixelSampler`); `None`: every pixel.
    #[serde(default)]
    pub ohem: Option<Ohem>,
    /// The backbone's stochastic depth (largest rate, spread over the blocks as in
    /// classification); `None`: the variant's (0.04 for EMO-1M), as the official backbones.
    #[serde(default)]
    pub drop_path: Option<f64>,
    /// Segmentation: dropout before the decode and auxiliary classifiers (mmseg's
    /// `dropout_ratio`, 0.1 in the paper's heads).
    #[serde(default = "seg_dropout")]
    pub head_dropout: f64,
    /// The backbone's learning rate as a multiple of `lr` (mmseg / mmdet `paramwise_cfg`
    /// `custom_keys={'backbone': dict(lr_mult=...)}`), weight decay scaled with it as AdamW
    /// does; 1: one learning rate for the whole model, 0: the backbone's weights stay put.
    #[serde(default = "one_f64")]
    pub backbone_lr_mult: f64,
    /// Segmentation: label smoothing of the pixel loss (both heads), PyTorch's
    /// `CrossEntropyLoss(label_smoothing=...)`; 0: none, as mmseg's configs.
    #[serde(default)]
    pub label_smoothing: f64,
    /// Segmentation: weight of EncNet's semantic-encoding loss (`loss::se_loss`, mmseg's
    /// EncHead: 0.2), a class-presence classifier on stage 4's pooled features trained beside
    /// the heads and dropped from the weights that are evaluated and exported; 0: none.
    #[serde(default)]
    pub se_weight: f64,
    /// Keep the splits on disk and decode each batch as it is needed (training: on a thread beside
    /// the training step, one batch ahead; validation: on the evaluating threads) instead of
    /// holding them decoded in memory; `None`: each split streamed when it would take more than
    /// [`STREAM_ABOVE_BYTES`] decoded. The run's result does not depend on it.
    #[serde(default)]
    pub stream: Option<bool>,
}

/// Splits that would take more than this decoded (4 GiB) are streamed by default.
pub const STREAM_ABOVE_BYTES: usize = 4 << 30;

fn one_f64() -> f64 {
    1.0
}

fn seg_dropout() -> f64 {
    SEG_HEAD_DROPOUT
}

fn one() -> usize {
    1
}

fn paper_rescale() -> (f32, f32) {
    PAPER_RESCALE
}

impl DenseTrainConfig {
    /// The paper's recipe for `task` (spec §12), on data at `data`: AdamW lr 1.2e-3 / wd 0.05
    /// with 500 warm-up iterations (detection), lr 1.2e-4 / wd 0.01 poly (segmentation).
    pub fn new(task: Task, variant: Variant, data: PathBuf, input: (usize, usize)) -> Self {
        let det = task.is_detection();
        DenseTrainConfig {
            task,
            variant,
            data,
            train_split: "train".into(),
            val_split: "val".into(),
            input,
            epochs: 12,
            batch: 16,
            lr: if task == Task::RetinaNet {
                2e-4
            } else if det {
                1.2e-3
            } else {
                1.2e-4
            },
            weight_decay: if det { 0.05 } else { 0.01 },
            warmup_iters: if det { 500 } else { 0 },
            seed: 0,
            backbone_weights: None,
            init_weights: None,
            // From scratch: the backbone's BN statistics must learn, and nothing is frozen.
            // `with_backbone_weights` sets the paper's pretrained-backbone settings.
            norm_eval: false,
            frozen_stages: -1,
            reduce_zero_label: false,
            aux_weight: 0.4,
            neg_pos_ratio: 3,
            geometric_augment: true,
            rescale: PAPER_RESCALE,
            train_scale: None,
            limit_train: 0,
            limit_val: 0,
            epoch_images: 0,
            workers: 1,
            ema_decay: 0.0,
            ohem: None,
            drop_path: None,
            head_dropout: SEG_HEAD_DROPOUT,
            backbone_lr_mult: 1.0,
            label_smoothing: 0.0,
            se_weight: 0.0,
            stream: None,
        }
    }

    /// Start the backbone from `weights` (a classification or backbone checkpoint) with the
    /// paper's settings for a pretrained backbone: BN statistics kept (`norm_eval`) for
    /// detection, and RetinaNet's first stage frozen (`frozen_stages = 1`).
    pub fn with_backbone_weights(self, weights: PathBuf) -> Self {
        DenseTrainConfig { backbone_weights: Some(weights), ..self.pretrained_settings() }
    }

    /// Fine-tune the whole model from `weights` (see [`DenseTrainConfig::init_weights`]), with
    /// the paper's settings for a pretrained backbone, as [`Self::with_backbone_weights`].
    pub fn with_init_weights(self, weights: PathBuf) -> Self {
        DenseTrainConfig { init_weights: Some(weights), ..self.pretrained_settings() }
    }

    /// The paper's settings for a pretrained backbone: BN statistics kept (`norm_eval`) for
    /// detection, and RetinaNet's first stage frozen (`frozen_stages = 1`).
    fn pretrained_settings(self) -> Self {
        let norm_eval = self.task.is_detection();
        let frozen_stages = if self.task == Task::RetinaNet { 1 } else { -1 };
        DenseTrainConfig { norm_eval, frozen_stages, ..self }
    }

    /// What a keep-ratio-trained run tests at: its training scale, keep-ratio, a detector's
    /// input padded to 32 as mmdet's `Pad(size_divisor=32)`; `None` without `train_scale`.
    pub fn test_scale(&self) -> Option<TestScale> {
        self.train_scale.map(|scale| TestScale::keep_ratio_for(self.task, scale))
    }

    /// Learning rate at iteration `t` of `total`.
    pub fn lr_at(&self, t: usize, total: usize) -> f64 {
        if self.task.is_detection() {
            let warm = self.warmup_iters.min(total / 2);
            let cos = 0.5 * self.lr * (1.0 + (std::f64::consts::PI * t as f64 / total.max(1) as f64).cos());
            if t < warm {
                let k = (1.0 - t as f64 / warm as f64) * (1.0 - 0.001);
                cos * (1.0 - k)
            } else {
                cos
            }
        } else {
            self.lr * (1.0 - t as f64 / total.max(1) as f64).max(0.0).powf(0.9)
        }
    }
}

fn yes() -> bool {
    true
}

/// What `emo detect` / `emo segment` need to rebuild a trained model (`RUN/model.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    pub model: DenseConfig,
    pub classes: Vec<String>,
    /// COCO category ids of the classes (detection).
    #[serde(default)]
    pub cat_ids: Vec<u64>,
    /// Segmentation: the label maps it was trained on have 0 = "other" (ignored) and the
    /// classes shifted by one (ADE20K); evaluation reads them the same way.
    #[serde(default)]
    pub reduce_zero_label: bool,
    /// How evaluation, `emo detect` and `emo segment` resize each image (mmdet / mmseg's test
    /// pipeline; [`TestScale`]) instead of squeezing it to `model.input` as training does. An
    /// official checkpoint's: the paper's (ADE20K keep-ratio 2048x512, SSDLite 320x320,
    /// RetinaNet keep-ratio 1333x800 padded to 32); the runs of `emo train --task` test at
    /// their input (unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_scale: Option<TestScale>,
}

impl ModelCard {
    /// The card of an official mmdet / mmseg EMO checkpoint (which has none), from its keys and
    /// shapes: the task from the neck / head keys, the variant from the backbone's shapes, the
    /// classes from the classifier conv, the paper's input size, and the COCO / ADE20K class
    /// names when the class count is theirs (ADE20K label maps read with `reduce_zero_label`).
    pub fn infer(sd: &StateDict) -> Result<ModelCard, DenseError> {
        let has = |k: &str| sd.get(k).is_some();
        let rows = |k: &str| sd.get(k).map(|t| t.shape[0]);
        let (task, classes) = if has("decode_head.aspp_modules.0.conv.weight") {
            (Task::DeepLabV3, rows("decode_head.conv_seg.weight"))
        } else if has("decode_head.psp_modules.0.1.conv.weight") {
            (Task::PspNet, rows("decode_head.conv_seg.weight"))
        } else if has("neck.extra_layers.0.0.conv.weight") {
            let per = rows("bbox_head.cls_convs.0.1.weight");
            (Task::SsdLite, per.filter(|n| n % SSD_ANCHORS == 0 && *n > SSD_ANCHORS).map(|n| n / SSD_ANCHORS - 1))
        } else if has("bbox_head.retina_cls.weight") {
            let per = rows("bbox_head.retina_cls.weight");
            (Task::RetinaNet, per.filter(|n| n % RETINA_ANCHORS == 0 && *n > 0).map(|n| n / RETINA_ANCHORS))
        } else {
            return Err(DenseError::Data(
                "no model card, and the weights are not an mmdet / mmseg EMO checkpoint (no SSDLite, RetinaNet, \
                 ASPP or PSP head keys); pass --card"
                    .into(),
            ));
        };
        let classes =
            classes.ok_or_else(|| DenseError::Data(format!("{task} checkpoint without a usable classifier")))?;
        let fits = |cfg: &DenseConfig| {
            cfg.backbone
                .state_dict_keys()
                .iter()
                .all(|k| sd.get(&format!("backbone.{}", k.name)).is_some_and(|t| t.shape == k.shape))
        };
        let model = Variant::ALL
            .into_iter()
            .map(|v| DenseConfig::new(task, v, classes, task.paper_input()))
            .find(fits)
            .ok_or_else(|| {
                DenseError::Data(format!("{task} checkpoint whose backbone is none of EMO-1M/2M/5M/6M; pass --card"))
            })?;
        let det = task.is_detection();
        let (names, cat_ids, reduce_zero_label): (Vec<String>, Vec<u64>, bool) = match (det, classes) {
            (true, 80) => (COCO_CLASSES.map(String::from).to_vec(), COCO_CAT_IDS.to_vec(), false),
            (false, 150) => (ADE20K_CLASSES.map(String::from).to_vec(), vec![], true),
            _ => (
                (0..classes).map(|i| format!("class{i}")).collect(),
                if det { (1..=classes as u64).collect() } else { vec![] },
                false,
            ),
        };
        // The test pipelines of the official configs (spec §12).
        let test_scale = Some(TestScale::paper(task));
        Ok(ModelCard { model, classes: names, cat_ids, reduce_zero_label, test_scale })
    }

    /// A dense model's weights and their card: `card` if given, else `model.json` beside the
    /// weights (what `emo train --task` writes), else the card of an official mmdet / mmseg
    /// checkpoint ([`ModelCard::infer`]; the flag is then true).
    pub fn with_weights(weights: &Path, card: Option<&Path>) -> Result<(StateDict, ModelCard, bool), DenseError> {
        let sd = emo_weights::load(weights)?;
        let beside = Self::beside(weights);
        match card.map(Path::to_path_buf).or_else(|| beside.exists().then_some(beside)) {
            Some(p) => Ok((sd, Self::read(&p)?, false)),
            None => {
                let card = Self::infer(&sd)?;
                Ok((sd, card, true))
            }
        }
    }

    /// The card of `weights` as [`Self::with_weights`] finds it, the weights read only where no
    /// `model.json` is beside them (an official checkpoint's card is inferred from them).
    pub fn of_weights(weights: &Path) -> Result<ModelCard, DenseError> {
        let beside = Self::beside(weights);
        if beside.exists() { Self::read(&beside) } else { Self::infer(&emo_weights::load(weights)?) }
    }

    /// Where the card of `weights` is kept: `model.json` beside them.
    pub fn beside(weights: &Path) -> PathBuf {
        weights.with_file_name("model.json")
    }

    /// A model card file (`model.json`).
    fn read(p: &Path) -> Result<ModelCard, DenseError> {
        let text = std::fs::read_to_string(p).map_err(|e| {
            DenseError::Io(format!("{} (the model card written by `emo train --task`): {e}", p.display()))
        })?;
        serde_json::from_str(&text).map_err(|e| DenseError::Data(format!("{}: not a model card: {e}", p.display())))
    }
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DenseEpoch {
    pub epoch: usize,
    pub iter: usize,
    pub train_loss: f64,
    pub lr: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub coco: Option<CocoStats>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub seg: Option<SegStats>,
    /// The same numbers for the EMA weights (runs with `ema_decay`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ema_coco: Option<CocoStats>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ema_seg: Option<SegStats>,
    pub seconds: f64,
    pub images_per_s: f64,
}

impl DenseEpoch {
    /// The number "best" is chosen by: mAP50 (detection) or mIoU (segmentation), of the raw
    /// or the EMA weights, whichever is higher.
    pub fn key_metric(&self) -> f64 {
        self.raw_metric().max(self.ema_metric().unwrap_or(f64::NEG_INFINITY))
    }

    /// mAP50 or mIoU of the raw weights.
    pub fn raw_metric(&self) -> f64 {
        self.coco.map(|c| c.ap50).or(self.seg.map(|s| s.miou)).unwrap_or(f64::NAN)
    }

    /// mAP50 or mIoU of the EMA weights, where the run keeps them.
    pub fn ema_metric(&self) -> Option<f64> {
        self.ema_coco.map(|c| c.ap50).or(self.ema_seg.map(|s| s.miou))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DenseState {
    pub epoch: usize,
    pub iter: usize,
    pub rng: Rng,
    /// The best key metric so far; -inf (written `null` in JSON) before the first evaluation.
    #[serde(deserialize_with = "null_as_neg_inf")]
    pub best: f64,
}

/// serde_json writes a non-finite f64 as `null`: read it back as -inf (a run saved before its
/// first evaluation finished, see [`DenseTrainer::run`]).
fn null_as_neg_inf<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NEG_INFINITY))
}

/// A loaded dataset of either kind.
#[derive(Debug)]
pub enum DenseData {
    Det(DetDataset),
    Seg(SegDataset),
}

impl DenseData {
    pub fn len(&self) -> usize {
        match self {
            DenseData::Det(d) => d.images.len(),
            DenseData::Seg(d) => d.images.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn classes(&self) -> &[String] {
        match self {
            DenseData::Det(d) => &d.classes,
            DenseData::Seg(d) => &d.classes,
        }
    }
    pub fn skipped_warning(&self) -> Option<String> {
        match self {
            DenseData::Det(d) => d.skipped.warning(),
            DenseData::Seg(d) => d.skipped.warning(),
        }
    }
    /// Whether the pixels stay on disk ([`index_split`]).
    pub fn streamed(&self) -> bool {
        match self {
            DenseData::Det(d) => d.streamed,
            DenseData::Seg(d) => d.streamed,
        }
    }
    /// Bytes the split takes (or would take) decoded in memory.
    pub fn decoded_bytes(&self) -> usize {
        match self {
            DenseData::Det(d) => d.decoded_bytes(),
            DenseData::Seg(d) => d.decoded_bytes(),
        }
    }
    /// Where each image is read from, in order.
    pub fn image_paths(&self) -> Vec<&Path> {
        match self {
            DenseData::Det(d) => d.images.iter().map(|i| i.path.as_path()).collect(),
            DenseData::Seg(d) => d.images.iter().map(|i| i.path.as_path()).collect(),
        }
    }
    /// Each image's RGB at the model input size, in order (empty slices in a streamed split).
    pub fn decoded_rgb(&self) -> Vec<&[u8]> {
        match self {
            DenseData::Det(d) => d.images.iter().map(|i| i.rgb.as_slice()).collect(),
            DenseData::Seg(d) => d.images.iter().map(|i| i.rgb.as_slice()).collect(),
        }
    }
    /// A streamed split with its label maps checked ([`SegDataset::checked`]; detection splits
    /// have none).
    fn checked(self) -> Result<Self, DenseError> {
        Ok(match self {
            DenseData::Det(d) => DenseData::Det(d),
            DenseData::Seg(d) => DenseData::Seg(d.checked()?),
        })
    }
    /// Decode a streamed split into memory (`keep_full`: see [`SegDataset::into_decoded`]).
    pub fn into_decoded(self, keep_full: bool) -> Result<Self, DenseError> {
        Ok(match self {
            DenseData::Det(d) => DenseData::Det(d.into_decoded()?),
            DenseData::Seg(d) => DenseData::Seg(d.into_decoded(keep_full)?),
        })
    }
    /// Training sample `i` before augmentation (decoded from disk in a streamed split);
    /// `full`: the image at its own size, for keep-ratio training.
    fn sample(&self, i: usize, full: bool) -> Result<Sample, DenseError> {
        Ok(match self {
            DenseData::Det(d) if full => {
                let (rgb, hw, boxes) = d.full(i)?;
                Sample::Det { rgb, hw, boxes, labels: d.images[i].labels.clone() }
            }
            DenseData::Det(d) => {
                let im = &d.images[i];
                Sample::Det {
                    rgb: d.rgb(i)?.into_owned(),
                    hw: d.input,
                    boxes: im.boxes.clone(),
                    labels: im.labels.clone(),
                }
            }
            DenseData::Seg(d) if full => {
                let (rgb, label, hw) = d.pair_full(i)?;
                Sample::Seg { rgb, label, hw }
            }
            DenseData::Seg(d) => {
                let (rgb, label) = d.pair(i)?;
                Sample::Seg { rgb: rgb.into_owned(), label: label.into_owned(), hw: d.input }
            }
        })
    }
    /// The samples of a batch, and the errors of those that no longer decode (skipped).
    fn batch(&self, idx: &[usize], full: bool) -> (Vec<Sample>, Vec<DenseError>) {
        let (mut ok, mut failed) = (Vec::with_capacity(idx.len()), Vec::new());
        for &i in idx {
            match self.sample(i, full) {
                Ok(s) => ok.push(s),
                Err(e) => failed.push(e),
            }
        }
        (ok, failed)
    }
}

/// One training image and its targets, before augmentation.
enum Sample {
    /// At (H, W) `hw`: the input size, or the image's own under keep-ratio training; boxes in
    /// its pixels.
    Det { rgb: Vec<u8>, hw: (usize, usize), boxes: Vec<BBox>, labels: Vec<usize> },
    /// At (H, W) `hw`: the input size, or the image's own under keep-ratio training.
    Seg { rgb: Vec<u8>, label: Vec<u8>, hw: (usize, usize) },
}

/// Load a split for `task` (detection: COCO; segmentation: mask folders), decoded in memory.
pub fn load_split(
    task: Task,
    root: &Path,
    split: &str,
    input: (usize, usize),
    training: bool,
    reduce_zero_label: bool,
    limit: usize,
) -> Result<DenseData, DenseError> {
    open_split(task, root, split, input, training, reduce_zero_label, limit, Some(false))
}

/// [`load_split`] as a streamed split: indexed and checked, its pixels left on disk
/// ([`index_coco`], [`index_seg`](crate::data::index_seg)).
pub fn index_split(
    task: Task,
    root: &Path,
    split: &str,
    input: (usize, usize),
    training: bool,
    reduce_zero_label: bool,
    limit: usize,
) -> Result<DenseData, DenseError> {
    open_split(task, root, split, input, training, reduce_zero_label, limit, Some(true))
}

/// A split for `task`, streamed or decoded in memory as `stream` says (`None`: streamed when it
/// would take more than [`STREAM_ABOVE_BYTES`] decoded). The images are listed first (headers
/// read), then each label map is read once: checked for a streamed split, decoded for one in
/// memory. `train` / `val` also find COCO 2017's and ADE20K's own names for them
/// ([`resolve_split`](crate::data::resolve_split)).
#[allow(clippy::too_many_arguments)]
pub fn open_split(
    task: Task,
    root: &Path,
    split: &str,
    input: (usize, usize),
    training: bool,
    reduce_zero_label: bool,
    limit: usize,
    stream: Option<bool>,
) -> Result<DenseData, DenseError> {
    let split = &crate::data::resolve_split(root, split, task.is_detection());
    let listed = if task.is_detection() {
        DenseData::Det(index_coco(root, split, input, !training, limit)?)
    } else {
        DenseData::Seg(list_seg(root, split, input, reduce_zero_label, None, limit)?)
    };
    match stream.unwrap_or(listed.decoded_bytes() > STREAM_ABOVE_BYTES) {
        true => listed.checked(),
        false => listed.into_decoded(!training),
    }
}

/// Images per forward pass in evaluation.
const EVAL_BATCH: usize = 16;

/// The detections of `model` on every image of `d`, in the images' original pixels and the
/// dataset's category ids (COCO results: what [`coco_of`] scores and `emo eval --results`
/// writes), on `threads` threads (batches of 16 in one contiguous part per thread, joined in
/// image order: the result does not depend on `threads`). A streamed split's images are decoded
/// as their batch comes.
pub fn detections_on(
    model: &dyn DenseInfer,
    d: &DetDataset,
    device: &Device,
    threads: usize,
) -> Result<Vec<DetBox>, DenseError> {
    let test = DetTestCfg::official(model.dense_config().task);
    let idx: Vec<usize> = (0..d.images.len()).collect();
    let chunks: Vec<_> = idx.chunks(EVAL_BATCH).collect();
    if let Some(ts) = d.test_scale {
        return detections_at_test_scale(model, d, ts, &test, &chunks, device, threads);
    }
    // The anchors are laid out for the model's input size.
    let hw = model.dense_config().input;
    if d.input != hw {
        return Err(DenseError::Data(format!("detection images loaded at {:?}, the model's input is {hw:?}", d.input)));
    }
    let anchors = anchors::anchors(model.dense_config());
    let parts = parallel::map_parts(&chunks, threads, |part| {
        let mut dets = Vec::new();
        for chunk in part {
            // A streamed split's images are decoded here, on this part's thread.
            let rgb = chunk.iter().map(|&i| d.rgb(i)).collect::<Result<Vec<_>, _>>()?;
            let x = batch_tensor(&rgb.iter().map(|r| r.as_ref()).collect::<Vec<_>>(), hw, device).without_autodiff();
            for (img, ds) in chunk.iter().map(|&i| &d.images[i]).zip(detect(model, x, &anchors, &test)?) {
                let (sx, sy) = (img.orig.1 as f64 / hw.1 as f64, img.orig.0 as f64 / hw.0 as f64);
                for det in ds {
                    let [x1, y1, x2, y2] = det.bbox.map(f64::from);
                    dets.push(DetBox {
                        image_id: img.id,
                        category_id: d.cat_ids[det.label],
                        bbox: [x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy],
                        score: det.score as f64,
                    });
                }
            }
        }
        Ok::<_, DenseError>(dets)
    });
    let mut dets = Vec::new();
    for part in parts {
        dets.extend(part?);
    }
    Ok(dets)
}

/// [`detections_on`] under a test scale: each image read from its file and resized by `ts`,
/// padded, run with the anchors of its padded size (images of one padded size share a pass),
/// its boxes clipped to the resized image and scaled back to the original.
fn detections_at_test_scale(
    model: &dyn DenseInfer,
    d: &DetDataset,
    ts: TestScale,
    test: &DetTestCfg,
    chunks: &[&[usize]],
    device: &Device,
    threads: usize,
) -> Result<Vec<DetBox>, DenseError> {
    let parts = parallel::map_parts(chunks, threads, |part| {
        let mut dets = Vec::new();
        let mut anchors = AnchorsBySize::default();
        for chunk in part {
            let loaded =
                chunk.iter().map(|&i| d.images[i].path.as_path()).map(|p| ts.load(p)).collect::<Result<Vec<_>, _>>()?;
            let mut start = 0;
            while start < loaded.len() {
                let hw = ts.padded(loaded[start].size);
                let end = start + loaded[start..].iter().take_while(|l| ts.padded(l.size) == hw).count();
                let group = &loaded[start..end];
                let found = detect_resized(model, group, hw, &mut anchors, test, device)?;
                for ((l, &i), ds) in group.iter().zip(&chunk[start..end]).zip(found) {
                    let (resized, orig) = (l.size, l.orig);
                    let (sx, sy) = (orig.1 as f64 / resized.1 as f64, orig.0 as f64 / resized.0 as f64);
                    for det in ds {
                        let [x1, y1, x2, y2] = det.bbox.map(f64::from);
                        dets.push(DetBox {
                            image_id: d.images[i].id,
                            category_id: d.cat_ids[det.label],
                            bbox: [x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy],
                            score: det.score as f64,
                        });
                    }
                }
                start = end;
            }
        }
        Ok::<_, DenseError>(dets)
    });
    let mut dets = Vec::new();
    for part in parts {
        dets.extend(part?);
    }
    Ok(dets)
}

/// COCO mAP (and the per-category table) of `dets` against `d`'s ground truth.
pub fn coco_of(d: &DetDataset, dets: &[DetBox]) -> Eval {
    let ids: Vec<u64> = d.images.iter().map(|i| i.id).collect();
    let (stats, per_class) = coco_eval(&d.gt, dets, &ids, &d.cat_ids);
    Eval::Coco(stats, per_class)
}

/// Evaluation result of one split.
#[derive(Clone, Debug)]
pub enum Eval {
    /// COCO numbers and the per-category AP / AP50.
    Coco(CocoStats, Vec<ClassAp>),
    /// mmseg's numbers and the confusion matrix they come from (per-class IoU / accuracy).
    Seg(SegStats, SegMetrics),
}

/// Evaluate a model on a split (COCO mAP in original coordinates, or mIoU on the label maps at
/// their original size, the logits resized to it as mmseg does). A streamed split is decoded
/// batch by batch on the evaluating threads and scores exactly as the split decoded in memory
/// for evaluation; a file that no longer decodes is an error naming it. `model` should be a
/// validation copy (`Module::valid`); inputs are made without autodiff, so no training-only layer
/// (drop path, dropout) runs.
pub fn evaluate(model: &dyn DenseInfer, data: &DenseData, device: &Device) -> Result<Eval, DenseError> {
    evaluate_with(model, data, device, &SegAug::default())
}

/// [`evaluate`]; `aug`: segmentation with mmseg's test-time augmentation, flip and / or several
/// scales ([`crate::predict::segment_aug`]; detection ignores it).
///
/// Batches of 16 are split into one contiguous part per core, each run on its own thread (burn's
/// CPU ops run on one thread each): see [`evaluate_on`].
pub fn evaluate_with(
    model: &dyn DenseInfer,
    data: &DenseData,
    device: &Device,
    aug: &SegAug,
) -> Result<Eval, DenseError> {
    evaluate_on(model, data, device, aug, model.eval_threads())
}

/// [`evaluate_with`] on `threads` threads: the batches of 16 in one contiguous part per thread;
/// the parts' detections are joined in image order and their confusion matrices added, so the
/// result does not depend on `threads`.
pub fn evaluate_on(
    model: &dyn DenseInfer,
    data: &DenseData,
    device: &Device,
    aug: &SegAug,
    threads: usize,
) -> Result<Eval, DenseError> {
    match data {
        DenseData::Det(d) => Ok(coco_of(d, &detections_on(model, d, device, threads)?)),
        DenseData::Seg(d) => {
            // Fully convolutional: the images' input size need not be the model card's.
            let idx: Vec<usize> = (0..d.images.len()).collect();
            let chunks: Vec<_> = idx.chunks(EVAL_BATCH).collect();
            let parts = parallel::map_parts(&chunks, threads, |part| {
                let mut m = SegMetrics::new(model.dense_config().num_classes);
                for chunk in part {
                    // A streamed split's pairs are decoded here, on this part's thread.
                    let pairs = chunk.iter().map(|&i| d.eval_pair(i)).collect::<Result<Vec<_>, _>>()?;
                    // One forward pass per run of images of one input size (all of them, unless
                    // a keep-ratio test scale gives each image its own).
                    for same in pairs.chunk_by(|a, b| a.input == b.input) {
                        let rgb: Vec<&[u8]> = same.iter().map(|p| p.rgb.as_ref()).collect();
                        let x = batch_tensor(&rgb, same[0].input, device).without_autodiff();
                        let sizes: Vec<_> = same.iter().map(|p| p.size).collect();
                        for (pair, pred) in same.iter().zip(segment_aug(model, x, aug, &sizes)?) {
                            m.add(&pred, &pair.label, 255);
                        }
                    }
                }
                Ok::<_, DenseError>(m)
            });
            let mut m = SegMetrics::new(model.dense_config().num_classes);
            for part in parts {
                m.merge(&part?);
            }
            Ok(Eval::Seg(m.stats(), m))
        }
    }
}

fn optimizer(cfg: &DenseTrainConfig, model: &DenseModel) -> ModuleOptimizer {
    emo_train::run::adamw(model, cfg.weight_decay)
}

fn write_json(path: &Path, v: &impl Serialize) -> Result<(), DenseError> {
    Ok(emo_train::run::write_json(path, v)?)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, DenseError> {
    Ok(emo_train::run::read_json(path)?)
}

/// A dense training run bound to its folder.
pub struct DenseTrainer {
    pub cfg: DenseTrainConfig,
    pub card: ModelCard,
    pub dir: PathBuf,
    pub state: DenseState,
    device: Device,
    model: Option<DenseModel>,
    optim: ModuleOptimizer,
    /// The backbone's parameters, when they train at their own learning rate.
    backbone_params: Option<ParamGroup>,
    /// Shared with the thread that decodes the next batch of a streamed split.
    train: Arc<DenseData>,
    val: DenseData,
    /// The anchors of each batch size (one, the input, unless training keep-ratio).
    anchors: AnchorsBySize,
    pool: DataParallel,
    ema: Option<Ema>,
    pub verbose: bool,
    /// What a fine-tune loaded from [`DenseTrainConfig::init_weights`] (set by [`Self::new`]).
    pub init_note: Option<String>,
}

impl DenseTrainer {
    fn card(cfg: &DenseTrainConfig, train: &DenseData) -> ModelCard {
        let classes = train.classes().to_vec();
        let model = DenseConfig::new(cfg.task, cfg.variant, classes.len(), cfg.input);
        let cat_ids = match train {
            DenseData::Det(d) => d.cat_ids.clone(),
            DenseData::Seg(_) => vec![],
        };
        let test_scale = cfg.test_scale();
        ModelCard { model, classes, cat_ids, reduce_zero_label: cfg.reduce_zero_label, test_scale }
    }

    fn prepare(model: DenseModel, cfg: &DenseTrainConfig) -> DenseModel {
        let mut m = model.with_frozen_stages(cfg.frozen_stages);
        if let DenseHead::Seg(h) = &mut m.head {
            h.dropout = cfg.head_dropout;
        }
        if cfg.norm_eval { m.with_norm_eval() } else { m }
    }

    /// The model's configuration for training: the card's, with the run's drop-path rate.
    fn training_model(card: &ModelCard, cfg: &DenseTrainConfig) -> DenseConfig {
        let mut m = card.model.clone();
        if let Some(p) = cfg.drop_path {
            m.backbone.drop_path = p;
        }
        m.se_layer = cfg.se_weight > 0.0;
        m
    }

    /// The training and validation splits, each streamed or decoded in memory (`cfg.stream`).
    fn load_data(cfg: &DenseTrainConfig) -> Result<(DenseData, DenseData), DenseError> {
        // Keep-ratio training reads every image from its file at its own size: both splits are
        // only indexed.
        let stream = if cfg.train_scale.is_some() { Some(true) } else { cfg.stream };
        let train = open_split(
            cfg.task,
            &cfg.data,
            &cfg.train_split,
            cfg.input,
            true,
            cfg.reduce_zero_label,
            cfg.limit_train,
            stream,
        )?;
        let val = open_split(
            cfg.task,
            &cfg.data,
            &cfg.val_split,
            cfg.input,
            false,
            cfg.reduce_zero_label,
            cfg.limit_val,
            stream,
        )?;
        let val = match (val, cfg.test_scale()) {
            (DenseData::Seg(d), Some(scale)) => DenseData::Seg(d.with_test_scale(Some(scale))?),
            (DenseData::Det(d), Some(scale)) => DenseData::Det(d.with_test_scale(Some(scale))),
            (val, _) => val,
        };
        Ok((train, val))
    }

    /// Start a new run in `dir` (which must not hold one). `device` must support autodiff.
    pub fn new(cfg: DenseTrainConfig, dir: impl AsRef<Path>, device: Device) -> Result<Self, DenseError> {
        let dir = dir.as_ref().to_path_buf();
        if dir.join("config.json").exists() {
            return Err(DenseError::Data(format!("{} already holds a run (use --resume)", dir.display())));
        }
        if cfg.batch == 0 || cfg.epochs == 0 || cfg.workers == 0 {
            return Err(DenseError::Data("batch, epochs and workers must be > 0".into()));
        }
        if !(cfg.backbone_lr_mult >= 0.0 && cfg.backbone_lr_mult.is_finite()) {
            return Err(DenseError::Data(format!("backbone_lr_mult must be >= 0, got {}", cfg.backbone_lr_mult)));
        }
        if !(0.0..1.0).contains(&cfg.label_smoothing) {
            return Err(DenseError::Data(format!("label_smoothing must be in [0, 1), got {}", cfg.label_smoothing)));
        }
        if !(cfg.se_weight >= 0.0 && cfg.se_weight.is_finite()) {
            return Err(DenseError::Data(format!("se_weight must be >= 0, got {}", cfg.se_weight)));
        }
        if cfg.se_weight > 0.0 && cfg.task.is_detection() {
            return Err(DenseError::Data("se_weight is for segmentation tasks".into()));
        }
        if !(cfg.aux_weight >= 0.0 && cfg.aux_weight.is_finite()) {
            return Err(DenseError::Data(format!("aux_weight must be >= 0, got {}", cfg.aux_weight)));
        }
        if let Some((a, b)) = cfg.train_scale
            && (cfg.task == Task::SsdLite || !cfg.geometric_augment || a == 0 || b == 0)
        {
            return Err(DenseError::Data(format!(
                "train_scale {a}x{b}: a setting of the geometric augmentation of segmentation and RetinaNet \
                 (SSDLite trains at its input; not with light augmentation), both sides > 0"
            )));
        }
        let (train, val) = Self::load_data(&cfg)?;
        if train.classes() != val.classes() {
            return Err(DenseError::Data("train and val splits have different classes".into()));
        }
        let card = Self::card(&cfg, &train);
        device.seed(cfg.seed);
        let model_cfg = Self::training_model(&card, &cfg);
        let (model, init_note) = match (&cfg.backbone_weights, &cfg.init_weights) {
            (Some(_), Some(_)) => {
                return Err(DenseError::Data(
                    "backbone_weights and init_weights: one or the other (a whole model's weights hold its backbone)"
                        .into(),
                ));
            }
            (Some(p), None) => (DenseModel::new(&model_cfg, Some(&emo_weights::load(p)?), &device)?, None),
            (None, Some(p)) => {
                let (model, note) = Self::fine_tune_model(p, &model_cfg, &card, &device)?;
                (model, Some(note))
            }
            (None, None) => (DenseModel::new(&model_cfg, None, &device)?, None),
        };
        let model = Self::prepare(model, &cfg);
        let optim = optimizer(&cfg, &model);
        // Only once the weights have loaded: a run that cannot start leaves no folder behind.
        std::fs::create_dir_all(&dir).map_err(|e| DenseError::Io(format!("{}: {e}", dir.display())))?;
        write_json(&dir.join("config.json"), &cfg)?;
        write_json(&dir.join("model.json"), &card)?;
        let state = DenseState { epoch: 0, iter: 0, rng: Rng::new(cfg.seed), best: f64::NEG_INFINITY };
        let ema = (cfg.ema_decay > 0.0).then(|| Ema::new(cfg.ema_decay, &model.state_dict()));
        let mut t = Self::assemble(cfg, card, dir, state, device, model, optim, ema, (train, val));
        t.init_note = init_note;
        Ok(t)
    }

    /// The model of a fine-tune from `weights` (see [`DenseTrainConfig::init_weights`]) and a
    /// line that says what was loaded: same task and backbone required, the classifiers kept
    /// when `card`'s classes are the source's.
    fn fine_tune_model(
        weights: &Path,
        model_cfg: &DenseConfig,
        card: &ModelCard,
        device: &Device,
    ) -> Result<(DenseModel, String), DenseError> {
        let task = model_cfg.task;
        let (sd, src, _) = ModelCard::with_weights(weights, None).map_err(|e| match e {
            // Neither a card beside them nor an official checkpoint's layout.
            DenseError::Data(_) if !ModelCard::beside(weights).exists() => DenseError::Data(format!(
                "{}: not a trained {task} model (no model.json beside it, and not an official mmdet / mmseg \
                 checkpoint); a classification or backbone checkpoint starts the backbone alone (backbone_weights)",
                weights.display()
            )),
            e => e,
        })?;
        let (from, to) = (src.model.backbone.name(), model_cfg.backbone.name());
        if src.model.task != task {
            return Err(DenseError::Data(format!(
                "{}: a {} model; a {task} run fine-tunes a {task} model (the backbone of any model or classifier \
                 can start one: backbone_weights)",
                weights.display(),
                src.model.task
            )));
        }
        if from != to {
            return Err(DenseError::Data(format!(
                "{}: a {task} on {from}; this run's backbone is {to}",
                weights.display()
            )));
        }
        let classes = |n: usize| format!("{n} class{}", if n == 1 { "" } else { "es" });
        let what = format!("fine-tuning {} ({task} on {from}, {})", weights.display(), classes(src.classes.len()));
        if src.classes == card.classes {
            let model = DenseModel::fine_tune_from(model_cfg, &sd, device)?;
            return Ok((model, format!("{what}: every weight loaded, the classifiers too (the same classes)")));
        }
        // Other classes: each classifier laid out for this data's, the rows of the classes the
        // model knows by name carried over, the rest from a fresh model.
        let init = DenseModel::new(model_cfg, None, device)?.state_dict();
        let (carried, found) = DenseModel::carry_classes(model_cfg, &sd, &src.classes, &card.classes, &init)?;
        let model = DenseModel::fine_tune_from(model_cfg, &carried, device)?;
        let se = format!("{}.", emo_spec::SE_LAYER);
        let mut layers: Vec<String> = model_cfg
            .classifier_keys()
            .into_iter()
            .filter(|k| !k.starts_with(&se))
            .map(|k| k.rsplit_once('.').map_or(k.clone(), |(l, _)| l.to_string()))
            .collect();
        layers.dedup();
        let here = classes(card.classes.len());
        let note = match found {
            0 if src.classes.len() == card.classes.len() => format!(
                "{what}: every weight loaded but the classifiers {}, which start afresh (the {here} here have other names)",
                layers.join(", ")
            ),
            0 => format!(
                "{what}: every weight loaded but the classifiers {}, which start afresh ({here} here, none of them the model's)",
                layers.join(", ")
            ),
            n => format!(
                "{what}: every weight loaded; the classifiers {} laid out for the {here} here, the {n} the model knows by name \
                 keeping their rows{}",
                layers.join(", "),
                if n < card.classes.len() { ", the others starting afresh" } else { "" }
            ),
        };
        Ok((model, note))
    }

    /// The trainer around its parts (the anchors derive from the model card).
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        cfg: DenseTrainConfig,
        card: ModelCard,
        dir: PathBuf,
        state: DenseState,
        device: Device,
        model: DenseModel,
        optim: ModuleOptimizer,
        ema: Option<Ema>,
        (train, val): (DenseData, DenseData),
    ) -> Self {
        let anchors = AnchorsBySize::default();
        let pool = DataParallel::new(cfg.workers);
        let backbone_params =
            (cfg.backbone_lr_mult != 1.0).then(|| ParamGroup::ids_from_module(model.backbone.clone()));
        DenseTrainer {
            cfg,
            card,
            dir,
            state,
            device,
            model: Some(model),
            optim,
            backbone_params,
            train: Arc::new(train),
            val,
            anchors,
            pool,
            ema,
            verbose: true,
            init_note: None,
        }
    }

    /// Reopen a run and continue from its last complete checkpoint.
    pub fn resume(dir: impl AsRef<Path>, device: Device) -> Result<Self, DenseError> {
        Self::resume_with(dir, device, None)
    }

    /// [`Self::resume`]; `stream`, if given, replaces the recorded [`DenseTrainConfig::stream`]
    /// for this invocation (how the training split is read, not what the run computes).
    pub fn resume_with(dir: impl AsRef<Path>, device: Device, stream: Option<bool>) -> Result<Self, DenseError> {
        let dir = dir.as_ref().to_path_buf();
        let mut cfg: DenseTrainConfig = read_json(&dir.join("config.json"))?;
        cfg.stream = stream.or(cfg.stream);
        let card: ModelCard = read_json(&dir.join("model.json"))?;
        let (train, val) = Self::load_data(&cfg)?;
        let ck = emo_train::run::last_checkpoint(&dir)?;
        let state: DenseState = read_json(&ck.join("state.json"))?;
        let sd = emo_weights::load(ck.join("model.safetensors"))?;
        let model = Self::prepare(DenseModel::from_state_dict(&Self::training_model(&card, &cfg), &sd, &device)?, &cfg);
        let optim = optimizer(&cfg, &model)
            .load(ck.join("optim.bin"))
            .map_err(|e| DenseError::Io(format!("optim.bin: {e:?}")))?;
        let ema = match cfg.ema_decay > 0.0 {
            true => Some(Ema::from_state_dict(cfg.ema_decay, &emo_weights::load(ck.join("ema.safetensors"))?)),
            false => None,
        };
        Ok(Self::assemble(cfg, card, dir, state, device, model, optim, ema, (train, val)))
    }

    /// The validation split each epoch is evaluated on (with its test scale, if any).
    pub fn val(&self) -> &DenseData {
        &self.val
    }

    pub fn model(&self) -> &DenseModel {
        self.model.as_ref().expect("model")
    }

    /// What was skipped while loading each split (`"train: skipped: 3 unknown category"`).
    pub fn data_warnings(&self) -> Vec<String> {
        [("train", &*self.train), ("val", &self.val)]
            .into_iter()
            .filter_map(|(n, d)| d.skipped_warning().map(|w| format!("{n}: {w}")))
            .collect()
    }

    /// Number of (training, validation) images.
    pub fn data_sizes(&self) -> (usize, usize) {
        (self.train.len(), self.val.len())
    }

    /// Whether the training split is streamed from disk (see [`DenseTrainConfig::stream`]).
    pub fn streams(&self) -> bool {
        self.train.streamed()
    }

    /// Whether the validation split is streamed from disk (see [`DenseTrainConfig::stream`]).
    pub fn streams_val(&self) -> bool {
        self.val.streamed()
    }

    pub fn iters_per_epoch(&self) -> usize {
        if self.train.len() < self.cfg.batch {
            return 0;
        }
        match self.cfg.epoch_images {
            0 => self.train.len() / self.cfg.batch,
            n => n / self.cfg.batch,
        }
    }

    /// The training images of the current epoch, in order: a fresh shuffle of the whole set
    /// (from the run's RNG), or with `epoch_images` the epoch's slice of the running stream.
    fn epoch_order(&mut self) -> Vec<usize> {
        let n = self.train.len();
        if self.cfg.epoch_images == 0 {
            return self.state.rng.permutation(n);
        }
        let len = self.iters_per_epoch() * self.cfg.batch;
        stream_order(self.cfg.seed, n, self.state.epoch * len, len)
    }

    /// Augment a batch and take one optimiser step; returns the named loss parts.
    fn step(&mut self, batch: Vec<Sample>, lr: f64) -> Result<Vec<(&'static str, f64)>, DenseError> {
        let hw = self.cfg.input;
        let mut rgbs = Vec::with_capacity(batch.len());
        let mut labels = Vec::new();
        let mut tgts = Vec::new();
        let k = self.card.model.num_classes;
        let (assigner, coder) = (MaxIou::for_task(self.cfg.task), BoxCoder::for_task(self.cfg.task));
        // Each image's (H, W) in the batch and, for detection, its boxes and labels.
        let mut sizes = Vec::with_capacity(batch.len());
        let mut gts = Vec::new();
        for sample in batch {
            match sample {
                Sample::Det { rgb, hw: src, mut boxes, mut labels } => {
                    if let Some(scale) = self.cfg.train_scale {
                        let (rgb, size) = det_keep_ratio(&mut self.state.rng, &rgb, src, &mut boxes, scale);
                        rgbs.push(rgb);
                        sizes.push(size);
                    } else {
                        let mut rgb = rgb;
                        if self.cfg.geometric_augment {
                            ssd_geometry(&mut self.state.rng, &mut rgb, &mut boxes, &mut labels, hw);
                        }
                        augment(&mut self.state.rng, &mut rgb, None, Some(&mut boxes), hw.0, hw.1);
                        rgbs.push(rgb);
                        sizes.push(hw);
                    }
                    gts.push((boxes, labels));
                }
                Sample::Seg { mut rgb, label: mut lab, hw: src } => {
                    if let Some(scale) = self.cfg.train_scale {
                        let rng = &mut self.state.rng;
                        let resized =
                            seg_geometry_keep_ratio(rng, &mut rgb, &mut lab, src, hw, scale, self.cfg.rescale, 0.75);
                        // Flip and distort the image's part of the crop, not its padding.
                        let valid = (resized.0.min(hw.0), resized.1.min(hw.1));
                        augment_top_left(&mut self.state.rng, &mut rgb, &mut lab, hw, valid);
                    } else {
                        if self.cfg.geometric_augment {
                            seg_geometry_with(&mut self.state.rng, &mut rgb, &mut lab, hw, self.cfg.rescale, 0.75);
                        }
                        augment(&mut self.state.rng, &mut rgb, Some(&mut lab), None, hw.0, hw.1);
                    }
                    labels.extend(lab);
                    rgbs.push(rgb);
                    sizes.push(hw);
                }
            }
        }
        // Keep-ratio detection pads each data-parallel shard as mmdet pads each GPU's batch, and
        // assigns its images on that size's anchors ([`keep_ratio_targets`]); otherwise every
        // image is at the input, assigned on its anchors here.
        let keep_ratio_det = self.cfg.task.is_detection() && self.cfg.train_scale.is_some();
        if !keep_ratio_det && !gts.is_empty() {
            let anchors = self.anchors.get(&self.card.model, hw);
            tgts.extend(gts.iter().map(|(b, l)| targets_valid(&assigner, &coder, anchors, None, b, l, k)));
        }
        let (card_model, anchor_cache) = (&self.card.model, &mut self.anchors);
        // Forward and backward per data-parallel shard (`emo_train::parallel::step`); each
        // replica hands back its named loss parts, weighted by its share of the batch.
        let (task, npr, aux_w, ohem) = (self.cfg.task, self.cfg.neg_pos_ratio, self.cfg.aux_weight, self.cfg.ohem);
        let (smoothing, se_w) = (self.cfg.label_smoothing as f32, self.cfg.se_weight);
        let b = rgbs.len();
        let model = self.model.as_ref().expect("model");
        let (value, shard_parts, grads) = parallel::step(
            &self.pool,
            model,
            std::slice::from_ref(&self.device),
            &self.device,
            b,
            (self.cfg.seed, self.state.iter),
            |r| {
                let share = r.len() as f64 / b as f64;
                let imgs: Vec<Vec<u8>> = rgbs[r.clone()].to_vec();
                let sz: Vec<(usize, usize)> = sizes[r.clone()].to_vec();
                let (bhw, t): ((usize, usize), Vec<Targets>) = if keep_ratio_det {
                    keep_ratio_targets(card_model, anchor_cache, &sz, &gts[r.clone()])
                } else if tgts.is_empty() {
                    (hw, vec![])
                } else {
                    (hw, tgts[r.clone()].to_vec())
                };
                let lab: Vec<u8> = if labels.is_empty() {
                    vec![]
                } else {
                    labels[r.start * hw.0 * hw.1..r.end * hw.0 * hw.1].to_vec()
                };
                Box::new(move |replica: &DenseModel, device: &Device| {
                    let x = batch_tensor_padded(&imgs.iter().map(Vec::as_slice).collect::<Vec<_>>(), &sz, bhw, device);
                    let loss = match replica.forward(x, true)? {
                        DenseOutput::Det { cls, reg } if task == Task::SsdLite => ssd_loss(cls, reg, &t, k, npr),
                        DenseOutput::Det { cls, reg } => focal_loss(cls, reg, &t, k),
                        DenseOutput::Seg { logits, aux, se } => {
                            let l = seg_loss_with(logits, aux, &lab, hw, aux_w, ohem, smoothing);
                            match se {
                                Some(se) => l.plus("se", se_loss(se, &lab).mul_scalar(se_w)),
                                None => l,
                            }
                        }
                    };
                    let parts: Vec<(&'static str, f64)> = loss.parts.iter().map(|&(n, v)| (n, v * share)).collect();
                    Ok::<_, DenseError>((loss.total, parts))
                })
            },
        )?;
        let mut parts: Vec<(&'static str, f64)> = Vec::new();
        for p in shard_parts {
            if parts.is_empty() {
                parts = p;
            } else {
                parts.iter_mut().zip(p).for_each(|(a, (_, v))| a.1 += v);
            }
        }
        let model = self.model.take().expect("model");
        if !value.is_finite() {
            self.model = Some(model);
            return Err(DenseError::Diverged { iter: self.state.iter, loss: value });
        }
        // One learning rate for the model, `backbone_lr_mult` times it for the backbone.
        let lr: ModuleLearningRate = match &self.backbone_params {
            Some(g) => ModuleLrScheduler::new(lr).with_group(g.clone(), lr * self.cfg.backbone_lr_mult).step(),
            None => lr.into(),
        };
        let model = self.optim.step(lr, model, grads);
        if let Some(ema) = &mut self.ema {
            ema.update(&model.state_dict());
        }
        self.model = Some(model);
        Ok(parts)
    }

    /// Evaluate the current weights on the validation split.
    pub fn evaluate(&self) -> Result<Eval, DenseError> {
        if emo_model::ops::on_flex(&self.device) {
            return self.evaluate_weights(&inference_weights(self.model().state_dict()));
        }
        evaluate(&self.model().valid(), &self.val, &self.device)
    }

    /// Evaluate weights of the card's model (no training-only layer: see [`inference_weights`])
    /// under the model's key names: on the CPU with the fast engine (the same numbers to float
    /// rounding, in about half the time), else with the burn model on the run's device.
    fn evaluate_weights(&self, sd: &StateDict) -> Result<Eval, DenseError> {
        if emo_model::ops::on_flex(&self.device) {
            let fast = crate::fast::FastDense::from_state_dict(&self.card.model, sd)?;
            return evaluate(&fast, &self.val, &self.device);
        }
        let m = DenseModel::from_state_dict(&self.card.model, sd, &self.device)?.valid();
        evaluate(&m, &self.val, &self.device)
    }

    /// The EMA weights (runs with `ema_decay`), under the model's key names.
    pub fn ema_state_dict(&self) -> Option<StateDict> {
        self.ema.as_ref().map(|e| e.state_dict(&self.model().state_dict()))
    }

    /// Evaluate the EMA weights on the validation split (runs with `ema_decay`); returns them
    /// as [`inference_weights`], what `best.safetensors` keeps.
    pub fn evaluate_ema(&self) -> Result<Option<(Eval, StateDict)>, DenseError> {
        let Some(sd) = self.ema_state_dict() else { return Ok(None) };
        let sd = inference_weights(sd);
        Ok(Some((self.evaluate_weights(&sd)?, sd)))
    }

    fn save_checkpoint(&self) -> Result<(), DenseError> {
        Ok(emo_train::run::replace_checkpoint(&self.dir, |tmp| {
            emo_weights::save_safetensors(&self.model().state_dict(), tmp.join("model.safetensors"))?;
            if let Some(sd) = self.ema_state_dict() {
                emo_weights::save_safetensors(&sd, tmp.join("ema.safetensors"))?;
            }
            self.optim
                .save(tmp.join("optim.bin"))
                .map_err(|e| emo_train::TrainError::Io(format!("optim.bin: {e:?}")))?;
            emo_train::run::write_json(&tmp.join("state.json"), &self.state)
        })?)
    }

    /// Train to `cfg.epochs` (or `stop_after` more epochs), evaluating and checkpointing after
    /// every epoch.
    pub fn run(&mut self, stop_after: Option<usize>) -> Result<Vec<DenseEpoch>, DenseError> {
        let ipe = self.iters_per_epoch();
        if ipe == 0 {
            return Err(DenseError::Data(format!(
                "{} training images ({} per epoch) < batch {}",
                self.train.len(),
                self.cfg.epoch_images,
                self.cfg.batch
            )));
        }
        let total = ipe * self.cfg.epochs;
        let last = stop_after.map_or(self.cfg.epochs, |n| (self.state.epoch + n).min(self.cfg.epochs));
        let mut out = Vec::new();
        while self.state.epoch < last {
            let start = Instant::now();
            let order = self.epoch_order();
            let bs = self.cfg.batch;
            let batch_idx = |it: usize| order[it * bs..(it + 1) * bs].to_vec();
            let full = self.cfg.train_scale.is_some();
            let (mut loss_sum, mut lr) = (0.0, 0.0);
            // A streamed split's next batch is decoded on its own thread while this one trains.
            let mut next: Option<std::thread::JoinHandle<(Vec<Sample>, Vec<DenseError>)>> = None;
            for it in 0..ipe {
                let (batch, failed) = match next.take() {
                    Some(h) => h.join().map_err(|_| DenseError::Data("the batch decoding thread panicked".into()))?,
                    None => self.train.batch(&batch_idx(it), full),
                };
                if self.train.streamed() && it + 1 < ipe {
                    let (train, idx) = (Arc::clone(&self.train), batch_idx(it + 1));
                    next = Some(std::thread::spawn(move || train.batch(&idx, full)));
                }
                // An image that decoded when the split was indexed but no longer does is left out
                // of its batch, with a warning; the run goes on.
                for e in &failed {
                    eprintln!("\nwarning: skipped a training image: {e}");
                }
                if batch.is_empty() {
                    return Err(DenseError::Data(format!("no image of batch {} decodes", self.state.iter)));
                }
                lr = self.cfg.lr_at(self.state.iter, total);
                let loss = self.step(batch, lr)?;
                loss_sum += loss.iter().map(|p| p.1).sum::<f64>();
                self.state.iter += 1;
                if self.verbose && (it % 10 == 0 || it + 1 == ipe) {
                    let ips = ((it + 1) * self.cfg.batch) as f64 / start.elapsed().as_secs_f64();
                    let parts: Vec<String> = loss.iter().map(|(n, v)| format!("{n} {v:.3}")).collect();
                    let bar = emo_train::progress_bar(it + 1, ipe, 20);
                    eprint!(
                        "\repoch {}/{} {bar} {}/{ipe} loss {:.4} ({}) lr {lr:.2e} {ips:.1} img/s   ",
                        self.state.epoch + 1,
                        self.cfg.epochs,
                        it + 1,
                        loss_sum / (it + 1) as f64,
                        parts.join(", ")
                    );
                }
            }
            let train_secs = start.elapsed().as_secs_f64();
            self.state.epoch += 1;
            // An evaluation that fails (a streamed validation image that no longer decodes)
            // loses no training: the epoch is saved first, and the error says so.
            let (ev, ema_ev) = match self.evaluate().and_then(|ev| Ok((ev, self.evaluate_ema()?))) {
                Ok(evs) => evs,
                Err(e) => {
                    self.save_checkpoint()?;
                    return Err(DenseError::Data(format!(
                        "epoch {} is trained and saved (--resume continues after it), but its evaluation failed: {e}",
                        self.state.epoch
                    )));
                }
            };
            let split = |e: &Eval| match e {
                Eval::Coco(c, _) => (Some(*c), None),
                Eval::Seg(s, _) => (None, Some(*s)),
            };
            let (coco, seg) = split(&ev);
            let (ema_coco, ema_seg) = ema_ev.as_ref().map_or((None, None), |(e, _)| split(e));
            let m = DenseEpoch {
                epoch: self.state.epoch,
                iter: self.state.iter,
                train_loss: loss_sum / ipe as f64,
                lr,
                coco,
                seg,
                ema_coco,
                ema_seg,
                seconds: start.elapsed().as_secs_f64(),
                images_per_s: (ipe * self.cfg.batch) as f64 / train_secs,
            };
            if m.key_metric() >= self.state.best {
                self.state.best = m.key_metric();
                let best = self.dir.join("best.safetensors");
                match ema_ev.as_ref().filter(|_| m.ema_metric().is_some_and(|e| e > m.raw_metric())) {
                    Some((_, sd)) => emo_weights::save_safetensors(sd, best)?,
                    None => emo_weights::save_safetensors(&inference_weights(self.model().state_dict()), best)?,
                }
            }
            if self.verbose {
                let ema = ema_ev.as_ref().map_or(String::new(), |(e, _)| format!("  EMA: {}", describe(e)));
                eprintln!(
                    "\repoch {}: loss {:.4}  {}{ema}  ({:.0} s)          ",
                    m.epoch,
                    m.train_loss,
                    describe(&ev),
                    m.seconds
                );
            }
            emo_train::run::append_metrics(&self.dir, &m)?;
            self.save_checkpoint()?;
            out.push(m);
        }
        Ok(out)
    }
}

/// The batch (H, W) and training targets of images resized keeping their aspect ratio (their
/// (H, W) `sizes`, `gts` their boxes and labels) for `model`: each padded to 32, the batch to
/// its largest (mmdet's `Pad(size_divisor=32)`, then collate, per GPU: here per data-parallel
/// shard), and each image assigned on the anchors of the batch's size within its own padded
/// size only ([`anchors::valid_flags`]): the anchors over the rest of the batch's padding get no
/// loss.
pub fn keep_ratio_targets(
    model: &DenseConfig,
    anchors: &mut AnchorsBySize,
    sizes: &[(usize, usize)],
    gts: &[(Vec<BBox>, Vec<usize>)],
) -> ((usize, usize), Vec<Targets>) {
    let bhw = batch_size_padded(sizes, DETECTION_PAD);
    let (assigner, coder) = (MaxIou::for_task(model.task), BoxCoder::for_task(model.task));
    let at = DenseConfig { input: bhw, ..model.clone() };
    let all = anchors.get(model, bhw);
    let t = gts
        .iter()
        .zip(sizes)
        .map(|((boxes, labels), &size)| {
            let valid = anchors::valid_flags(&at, pad_to(size, DETECTION_PAD));
            targets_valid(&assigner, &coder, all, Some(&valid), boxes, labels, model.num_classes)
        })
        .collect();
    (bhw, t)
}

/// Positions `start..start + len` of an endless stream of indices `0..n`: pass after pass, each
/// pass a permutation of `0..n` seeded by `seed` and the pass number. Depends on nothing but its
/// arguments, so a resumed run continues the stream exactly; every pass holds each index once.
pub fn stream_order(seed: u64, n: usize, start: usize, len: usize) -> Vec<usize> {
    assert!(n > 0, "stream over an empty set");
    let mut out = Vec::with_capacity(len);
    let mut pos = start;
    let mut pass: Option<(usize, Vec<usize>)> = None;
    while out.len() < len {
        let k = pos / n;
        if pass.as_ref().is_none_or(|p| p.0 != k) {
            let s = seed ^ 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(k as u64 + 1);
            pass = Some((k, Rng::new(s).permutation(n)));
        }
        let perm = &pass.as_ref().expect("pass").1;
        let off = pos % n;
        let take = (n - off).min(len - out.len());
        out.extend_from_slice(&perm[off..off + take]);
        pos += take;
    }
    out
}

/// One line for an evaluation result (percentages).
pub fn describe(e: &Eval) -> String {
    match e {
        Eval::Coco(c, _) => c.to_string(),
        Eval::Seg(s, _) => format!("mIoU {:.2} aAcc {:.2} mAcc {:.2}", s.miou, s.a_acc, s.m_acc),
    }
}

/// Read a run's `metrics.jsonl`.
pub fn read_metrics(dir: &Path) -> Vec<DenseEpoch> {
    emo_train::run::read_metrics(dir)
}

/// `sd` without the training-only semantic-encoding layer ([`emo_spec::SE_LAYER`]): the weights
/// of the model the run's card describes, which evaluation and `best.safetensors` use.
pub fn inference_weights(mut sd: StateDict) -> StateDict {
    let prefix = format!("{}.", emo_spec::SE_LAYER);
    sd.tensors.retain(|k, _| !k.starts_with(&prefix));
    sd
}
