//! `emo`: EMO (ICCV 2023) vision models from the command line.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use burn::tensor::{Device, Tensor, TensorData};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use emo_model::Emo;
use emo_model::preprocess::EvalTransform;
use emo_spec::{EmoConfig, Task, Variant};
use emo_weights::npy;

mod backend;
mod bench;
mod dense;

const IMAGENET_CLASSES: &str = include_str!("imagenet_classes.txt");
/// The committed EMO-1M parity fixture (official layout, seeded random weights) and the
/// official model's outputs for it, embedded so `emo verify` needs no files.
const FIXTURE_WEIGHTS: &[u8] = include_bytes!("../../../fixtures/emo/emo_1m.safetensors");
const FIXTURE_IO: &[u8] = include_bytes!("../../../fixtures/emo/emo_1m_224x224.io.safetensors");

#[derive(Parser)]
#[command(name = "emo", version, about = "EMO (ICCV 2023) vision models in Rust: exact, official checkpoints")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// burn backend of the trainable model (train, eval --engine burn, verify, bench-train):
    /// flex (pure Rust), tch (LibTorch; needs a `--features tch` build) or vulkan (a GPU; needs
    /// a `--features vulkan` build).
    #[arg(long, global = true, default_value = "flex")]
    backend: backend::Backend,
}

#[derive(Subcommand)]
enum Cmd {
    /// Params and FLOPs of the four variants (fvcore convention, computed from the model definition).
    Info {
        /// Input size HxW for the FLOPs column (default 224x224, or the paper's input with --task).
        #[arg(long, value_parser = parse_hw)]
        input: Option<(usize, usize)>,
        /// Also print the per-stage layout of this variant.
        #[arg(long)]
        variant: Option<Variant>,
        /// Window size override (EMO-5M uses 10 for detection, 16 for segmentation).
        #[arg(long)]
        window_size: Option<usize>,
        /// Params and FLOPs of a detector / segmenter instead (ssdlite, retinanet, deeplabv3,
        /// pspnet), at the paper's input unless --input is given.
        #[arg(long)]
        task: Option<Task>,
        /// Classes of the task's head (default: 80 for COCO, 150 for ADE20K).
        #[arg(long)]
        classes: Option<usize>,
    },
    /// Raw logits for an NCHW f32 .npy tensor (the scripting and testing interface).
    Predict {
        #[arg(long)]
        variant: Variant,
        /// .pth (plain, `net`, or `net_E`) or .safetensors checkpoint.
        #[arg(long)]
        weights: PathBuf,
        /// Input, float32 (B, 3, H, W), any H, W >= 1.
        #[arg(long)]
        input_npy: PathBuf,
        /// Output logits, float32 (B, num_classes).
        #[arg(long)]
        output_npy: PathBuf,
        /// Also write the stage outputs given here (e.g. 2,3,4) as OUTPUT.stageK.npy.
        #[arg(long, value_delimiter = ',')]
        features: Vec<i64>,
        #[arg(long, value_enum, default_value = "fast")]
        engine: EngineKind,
    },
    /// Top-k ImageNet labels for images, with the official eval preprocessing.
    Classify {
        /// Variant of --weights (default emo-1m).
        #[arg(long)]
        variant: Option<Variant>,
        /// Checkpoint (.pth or .safetensors). Default: the embedded EMO-1M trained on
        /// Fashion-MNIST (see assets/emo1m-fashion-mnist.json), with its own grey 32x32 input.
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Image files (JPEG, PNG, ...).
        #[arg(required = true)]
        images: Vec<PathBuf>,
        #[arg(long, default_value_t = 5)]
        top: usize,
        /// Crop size (ImageNet checkpoints).
        #[arg(long, default_value_t = 224)]
        size: usize,
        /// Crop ratio: the shorter side is resized to floor(size / crop_pct) before the crop.
        #[arg(long, default_value_t = 0.875)]
        crop_pct: f64,
        /// Class names, one per line (default: ImageNet-1k for 1000-class checkpoints).
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long, value_enum, default_value = "fast")]
        engine: EngineKind,
    },
    /// Convert an official .pth checkpoint to .safetensors (validated against the variant).
    Convert {
        input: PathBuf,
        output: PathBuf,
        /// Variant to validate against (default: detected from the checkpoint).
        #[arg(long)]
        variant: Option<Variant>,
    },
    /// Check this build against the official PyTorch outputs embedded in the binary (EMO-1M).
    Verify,
    /// Train (or fine-tune) on Fashion-MNIST with the paper's recipe; resumable. With --task,
    /// train a detector (COCO-layout --data) or segmenter (mask-folder --data).
    Train(Box<TrainOpts>),
    /// Top-1 / top-5 of weights on a dataset's test split (the training run's eval transform).
    /// With --task: COCO mAP (detection) or mIoU / aAcc / mAcc (segmentation).
    Eval {
        #[arg(long, default_value = "emo-1m")]
        variant: Variant,
        #[arg(long)]
        weights: PathBuf,
        /// Evaluate a detector / segmenter (its model.json is read from beside the weights).
        #[arg(long)]
        task: Option<Task>,
        /// Dense tasks: the split folder name (`val` also finds COCO 2017's `val2017` and ADE20K's
        /// `validation`).
        #[arg(long, default_value = "val")]
        split: String,
        /// Dense tasks: model card (default: model.json beside the weights).
        #[arg(long)]
        card: Option<PathBuf>,
        /// Dense tasks: evaluate only the first N images (0 = all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// Segmentation: mmseg's flip test augmentation (the class probabilities of each image
        /// and of its mirror image averaged; twice the cost). Default: single scale, no flip,
        /// as the paper's numbers.
        #[arg(long)]
        flip: bool,
        /// Segmentation: multi-scale test augmentation, the image run at each of these ratios
        /// of the input size (mmseg's `img_ratios`) and the class probabilities averaged;
        /// `--scales 0.5,0.75,1,1.25,1.5,1.75 --flip` is mmseg's `--aug-test`. Default: 1.
        #[arg(long, value_delimiter = ',')]
        scales: Vec<f32>,
        /// Dense tasks: precise BN first, every BatchNorm's running statistics replaced by the
        /// mean of its batch statistics over the first N training images (training-mode
        /// forward passes in the run's per-replica batch, no augmentation, no weight change).
        #[arg(long, default_value_t = 0)]
        precise_bn: usize,
        /// With --precise-bn: write the recalibrated weights here (safetensors; a model.json
        /// is written beside them if none is there).
        #[arg(long)]
        save_weights: Option<PathBuf>,
        /// Detection: also write the detections as a COCO results file here (a JSON list of
        /// {image_id, category_id, bbox [x, y, w, h] in the image's pixels, score}, as mmdet's
        /// `--format-only` and pycocotools' `loadRes` use).
        #[arg(long)]
        results: Option<PathBuf>,
        /// Dense tasks: decode the split batch by batch from disk as it is evaluated (true) or
        /// all of it into memory first (false). Default: stream when the decoded split would
        /// take more than 4 GiB. The result is the same.
        #[arg(long)]
        stream: Option<bool>,
        /// Dense tasks: how each image is resized. `paper`: the official test pipeline (mmseg's
        /// ADE20K keep-ratio 2048x512; mmdet's SSDLite 320x320 and RetinaNet keep-ratio 1333x800
        /// padded to 32), with OpenCV's bilinear; `input`: squeezed to the model's input as in
        /// training; LONGxSHORT: keep-ratio (detectors padded to 32). Default: the model card's
        /// (`paper` for an official checkpoint, `input` for a run of `emo train --task`).
        #[arg(long)]
        test_scale: Option<String>,
        /// Dense tasks: which implementation runs the model: `fast` (the fused CPU engine,
        /// emo-infer) or `burn` (the trainable model on --backend). Default: fast, or burn when
        /// --backend names another backend than flex.
        #[arg(long, value_enum)]
        engine: Option<EngineKind>,
        /// `fashion-mnist`, `fashion-mnist:DIR` or `imagefolder:PATH` (its val split).
        #[arg(long, default_value = "fashion-mnist")]
        data: String,
        /// Input side (default: the training pipeline's, read from the run's config.json or
        /// the weights' model card W.json; else 32).
        #[arg(long)]
        size: Option<usize>,
    },
    /// Detect objects in images with a trained SSDLite / RetinaNet: writes OUT/NAME.json (boxes
    /// in image pixels) and OUT/NAME.png (annotated).
    Detect {
        #[arg(long)]
        weights: PathBuf,
        /// Model card (default: model.json beside the weights, as `emo train --task` writes it).
        #[arg(long)]
        card: Option<PathBuf>,
        /// ssdlite or retinanet: checked against the model (its card, or an official
        /// checkpoint's keys), which decides the task either way.
        #[arg(long)]
        task: Option<Task>,
        #[arg(required = true)]
        images: Vec<PathBuf>,
        #[arg(long, default_value = "detections")]
        out: PathBuf,
        #[arg(long, default_value_t = 0.3)]
        score_thr: f32,
        /// `paper` (mmdet's test resize: SSDLite 320x320, RetinaNet keep-ratio 1333x800 padded
        /// to 32; the default for an official checkpoint), `input` (squeezed to the model's input
        /// as in training; the default for a run of `emo train --task`) or LONGxSHORT
        /// (keep-ratio, padded to 32).
        #[arg(long)]
        test_scale: Option<String>,
        /// Which implementation runs the model: `fast` (the fused CPU engine, emo-infer) or
        /// `burn` (the trainable model on --backend). Default: fast, or burn when --backend
        /// names another backend than flex.
        #[arg(long, value_enum)]
        engine: Option<EngineKind>,
    },
    /// Segment images with a trained DeepLabv3 / PSPNet: writes OUT/NAME.png (colour mask).
    Segment {
        #[arg(long)]
        weights: PathBuf,
        /// Model card (default: model.json beside the weights, as `emo train --task` writes it).
        #[arg(long)]
        card: Option<PathBuf>,
        /// deeplabv3 or pspnet: checked against the model (its card, or an official
        /// checkpoint's keys), which decides the task either way.
        #[arg(long)]
        task: Option<Task>,
        #[arg(required = true)]
        images: Vec<PathBuf>,
        #[arg(long, default_value = "masks")]
        out: PathBuf,
        /// Flip test augmentation (see `emo eval --flip`).
        #[arg(long)]
        flip: bool,
        /// Multi-scale test augmentation (see `emo eval --scales`).
        #[arg(long, value_delimiter = ',')]
        scales: Vec<f32>,
        /// `paper`, `input` or a keep-ratio LONGxSHORT (see `emo eval --test-scale`).
        #[arg(long)]
        test_scale: Option<String>,
        /// Also write OUT/NAME-labels.png: the predicted class of each pixel as an 8-bit grey
        /// label map in the layout of the training label maps (with `reduce_zero_label`, as
        /// ADE20K's, class c is written as c + 1), ready to compare with ground truth.
        #[arg(long)]
        label_maps: bool,
        /// Which implementation runs the model: `fast` (the fused CPU engine, emo-infer) or
        /// `burn` (the trainable model on --backend). Default: fast, or burn when --backend
        /// names another backend than flex.
        #[arg(long, value_enum)]
        engine: Option<EngineKind>,
    },
    /// Build the Fashion-MNIST canvas set (real items on larger canvases; boxes and masks from
    /// placement) in COCO and mask-folder layout.
    MakeCanvas {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 128)]
        size: usize,
        #[arg(long, default_value_t = 4000)]
        train: usize,
        #[arg(long, default_value_t = 500)]
        val: usize,
        /// Items per canvas, MIN-MAX.
        #[arg(long, default_value = "1-3")]
        items: String,
        /// Item scale range (x 28 px), MIN-MAX.
        #[arg(long, default_value = "1.5-3.0")]
        scale: String,
        /// 4 coarse classes (top, trouser, footwear, bag) instead of the 10 Fashion-MNIST ones.
        #[arg(long)]
        coarse: bool,
        /// Fashion-MNIST IDX folder (default: Debian's /usr/share/datasets/fashion-mnist).
        #[arg(long)]
        fmnist: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Latency and throughput of the fast engine, optionally against ONNX Runtime and burn.
    Bench {
        #[arg(long, default_value = "emo-1m")]
        variant: Variant,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Input size (default 224x224; with --task, the paper's input of the task).
        #[arg(long, value_parser = parse_hw)]
        size: Option<(usize, usize)>,
        /// Time a detector / segmenter (backbone, neck and heads; weights drawn at random, the
        /// task's paper classes) instead of the classifier.
        #[arg(long)]
        task: Option<Task>,
        /// Threads for our engine (and ONNX Runtime's intra-op pool); default: all cores.
        #[arg(long)]
        threads: Option<usize>,
        /// Timed runs per round and engine.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Interleaved rounds.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Also time this ONNX model with ONNX Runtime (Python `onnxruntime`; see scripts/bench.sh),
        /// interleaved with ours, and print `ratio_vs_onnx`.
        #[arg(long)]
        compare_onnx: Option<PathBuf>,
        /// Also time the burn (flex) model, interleaved.
        #[arg(long)]
        compare_burn: bool,
        /// Also print the time of every step (stem, each block, head).
        #[arg(long)]
        profile: bool,
    },
    /// Training throughput (forward + backward + AdamW step) of the burn model, optionally
    /// interleaved with PyTorch training the same architecture; ends with `ratio_vs_torch: R`
    /// (our median step time / PyTorch's).
    BenchTrain {
        #[arg(long, default_value = "emo-1m")]
        variant: Variant,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Training input side (Fashion-MNIST pipeline).
        #[arg(long, default_value_t = 32)]
        size: usize,
        /// Data-parallel workers (and PyTorch threads); default: as `emo train` (one per core,
        /// each with >= 8 images).
        #[arg(long)]
        workers: Option<usize>,
        /// Timed steps per round and framework.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Interleaved rounds.
        #[arg(long, default_value_t = 4)]
        rounds: usize,
        /// Also time PyTorch (`PYTHON` with `torch`; scripts/torch_train_bench.py).
        #[arg(long)]
        compare_torch: bool,
        /// burn backends to time, interleaved (e.g. `flex,tch`); default: `--backend`'s.
        #[arg(long, value_delimiter = ',')]
        backends: Vec<backend::Backend>,
    },
}

/// Options of `emo train` (classification, or a dense task with `--task`).
#[derive(clap::Args)]
pub(crate) struct TrainOpts {
    #[arg(long, default_value = "emo-1m")]
    pub variant: Variant,
    /// Whether --variant was given on the command line (set from the matches in `main`).
    #[arg(skip)]
    pub variant_given: bool,
    /// ssdlite, retinanet, deeplabv3 or pspnet (default: classification).
    #[arg(long)]
    pub task: Option<Task>,
    /// Dense tasks: model input HxW (default: the paper's).
    #[arg(long, value_parser = parse_hw)]
    pub input: Option<(usize, usize)>,
    /// Dense tasks: initial backbone weights: a classification checkpoint (norm / head dropped)
    /// or the backbone of a trained detector / segmenter (its neck and heads dropped).
    #[arg(long)]
    pub backbone_weights: Option<PathBuf>,
    /// Dense detection tasks: linear warm-up iterations (default 500).
    #[arg(long)]
    pub warmup_iters: Option<usize>,
    /// Dense tasks: keep the backbone's BatchNorms in eval mode (mmdet `norm_eval`).
    /// Default: on for detection from --backbone-weights, off otherwise (a backbone trained
    /// from scratch needs its BN statistics).
    #[arg(long)]
    pub norm_eval: Option<bool>,
    /// Dense tasks: freeze the backbone's stem and stages 1..=K (mmdet `frozen_stages`; -1:
    /// none). Frozen layers get no gradients, and nothing is back-propagated through them.
    /// Default: 1 for RetinaNet from --backbone-weights, -1 otherwise.
    #[arg(long, allow_hyphen_values = true)]
    pub frozen_stages: Option<i64>,
    /// Dense tasks: flip + photometric distortion only, without the paper's geometric
    /// augmentation (SSD Expand + MinIoURandomCrop; segmentation rescale + crop).
    #[arg(long)]
    pub light_augment: bool,
    /// Segmentation: the rescale ratio range MIN-MAX of the geometric augmentation (mmseg's
    /// `ratio_range`; default the paper's 0.5-2.0). Not with --light-augment.
    #[arg(long)]
    pub rescale_range: Option<String>,
    /// Segmentation and RetinaNet: keep-ratio training resize LONGxSHORT, each image read at
    /// its own size. Segmentation (mmseg, e.g. ADE20K's 2048x512): rescaled keeping its aspect
    /// ratio to this scale times a ratio from --rescale-range, cropped to --input. RetinaNet
    /// (mmdet, COCO's 1333x800): resized to it, flipped, padded to 32, batched padded to the
    /// largest (--input then unused). Evaluation tests at the same keep-ratio scale. `input`:
    /// squeeze every image to the input first. Default: 2048x512 for a folder in ADE20K's
    /// layout, 1333x800 for RetinaNet on COCO 2017's, else `input`. Not with --light-augment.
    #[arg(long)]
    pub train_scale: Option<String>,
    /// Segmentation: online hard example mining on the decode head's pixel loss (mmseg's
    /// OHEMPixelSampler): train on the pixels whose label probability is below this threshold
    /// (mmseg configs: 0.7), and on at least --ohem-min-kept per image.
    #[arg(long)]
    pub ohem_thresh: Option<f32>,
    /// Segmentation with --ohem-thresh: pixels kept per image at least (default: a fifth of the
    /// input, as mmseg's 100000 of a 512x1024 Cityscapes crop).
    #[arg(long)]
    pub ohem_min_kept: Option<usize>,
    /// Segmentation: label 0 is "other" (ignored) and the classes are shifted down by one
    /// (ADE20K's layout; set by itself for a folder in that layout without classes.txt);
    /// recorded in model.json so `emo eval --task` reads labels the same way.
    #[arg(long)]
    pub reduce_zero_label: bool,
    /// `fashion-mnist` (Debian's dataset-fashion-mnist), `fashion-mnist:DIR`, or
    /// `imagefolder:PATH` (`PATH/train/<class>/*`, `PATH/val/<class>/*`).
    #[arg(long, default_value = "fashion-mnist")]
    pub data: String,
    /// Run folder (default: runs/VARIANT-DATA).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Epochs (20 for Fashion-MNIST: 92.9-93.2% top-1 in 27-48 minutes on the 2-core VMs of the recorded runs).
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Training / evaluation input side (the 28x28 images are upscaled by an integer factor).
    #[arg(long, default_value_t = 32)]
    pub size: usize,
    /// Classification: learning rate per 512 images (scaled with the batch; default 1.5e-2).
    /// Dense tasks: the learning rate (default: the paper's, 1.2e-3 SSDLite, 2e-4 RetinaNet,
    /// 1.2e-4 segmentation).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Stochastic depth rate of the last block (default: the variant's, 0.04 for EMO-1M; the
    /// per-block rule of the spec scales it down for earlier blocks). Dense tasks: the backbone's.
    #[arg(long)]
    pub drop_path: Option<f64>,
    /// Segmentation: dropout before the decode and auxiliary classifiers (default 0.1, mmseg's
    /// `dropout_ratio`).
    #[arg(long)]
    pub head_dropout: Option<f64>,
    /// Segmentation: weight of the auxiliary FCN head's loss on stage 3 (default 0.4, mmseg's
    /// `loss_weight`).
    #[arg(long)]
    pub aux_weight: Option<f64>,
    /// Segmentation: weight of EncNet's semantic-encoding loss, a class-presence classifier on
    /// stage 4's pooled features trained beside the heads (mmseg's EncHead: 0.2; default 0:
    /// none). Training only: the exported weights are the plain model's.
    #[arg(long)]
    pub se_weight: Option<f64>,
    /// Dense tasks: the backbone's learning rate as a multiple of --lr (default 1; mmseg's
    /// `lr_mult` for the backbone).
    #[arg(long)]
    pub backbone_lr_mult: Option<f64>,
    /// Classification: epochs of linear warm-up from 1e-6 (default 1; 0 when fine-tuning a
    /// trained model for an epoch or two).
    #[arg(long)]
    pub warmup_epochs: Option<usize>,
    /// AdamW weight decay (default 0.05; 0.01 for segmentation).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Label smoothing. Classification: default 0.1. Segmentation: of the pixel loss of both
    /// heads (default 0, as mmseg's configs).
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// EMA decay per iteration. Classification: 0 or unset = automatic (about the last 10% of
    /// the run, at most 0.9998). Dense tasks: unset or 0 = no EMA; with a decay the EMA weights
    /// are evaluated next to the raw ones each epoch and `best.safetensors` keeps the better.
    #[arg(long)]
    pub ema_decay: Option<f64>,
    /// Use only the first N training / evaluation images (0 = all).
    #[arg(long, default_value_t = 0)]
    pub train_limit: usize,
    #[arg(long, default_value_t = 0)]
    pub eval_limit: usize,
    /// Dense tasks: training images per epoch, taken from one running shuffle of the whole set
    /// (a large set seen once over several evaluated epochs; 0 = one full pass per epoch).
    #[arg(long, default_value_t = 0)]
    pub epoch_images: usize,
    /// Dense tasks: keep the training and validation splits on disk and decode each batch as it
    /// is needed (training: one batch ahead on its own thread) (true), or hold them decoded in
    /// memory (false). Default: each split streamed when it would take more than 4 GiB decoded.
    /// The result is the same.
    #[arg(long)]
    pub stream: Option<bool>,
    /// Fine-tune from these weights. Classification: e.g. the official ImageNet weights (the
    /// head is replaced). Dense tasks: a whole trained model of the same task (a run's
    /// `best.safetensors`, its `model.json` beside it, or an official mmdet / mmseg checkpoint;
    /// its variant unless --variant is given): every weight loaded (mmdet's `load_from`), the
    /// classifiers too when the classes are the same; otherwise each class the model knows by
    /// name keeps its classifier rows and the others start afresh.
    #[arg(long)]
    pub init_weights: Option<PathBuf>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Stop after this many epochs of this invocation (the run stays resumable).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Classification: RandomResizedCrop + RandAugment rand-m9-mstd0.5-inc1 (the paper's
    /// training augmentation). Default: on for imagefolder data, off for Fashion-MNIST (a
    /// 10-epoch run on 28x28 items keeps the pad-and-shift crop and flip only).
    #[arg(long)]
    pub rand_augment: Option<bool>,
    /// Fashion-MNIST: black border around the 28x28 image before it is scaled to `--size`, in
    /// source pixels (default 0: the bare image is scaled; 2 frames it in 32x32 first, which
    /// fit the training set better but scored 91.84% against 92.30% in 10 epochs).
    #[arg(long)]
    pub border: Option<usize>,
    /// Classification: random erasing probability (timm's `re_prob`: one rectangle of 2-33% of
    /// the input filled with noise; default 0, as in the paper's recipe).
    #[arg(long)]
    pub random_erasing: Option<f32>,
    /// Data-parallel replicas (threads) per batch (default: one per core, each with >= 8
    /// images). Saved in the run's config: BatchNorm normalises each replica's shard.
    #[arg(long)]
    pub workers: Option<usize>,
}

fn parse_hw(s: &str) -> Result<(usize, usize), String> {
    let (h, w) = s.split_once(['x', 'X']).ok_or("expected HxW, e.g. 224x224")?;
    let h: usize = h.trim().parse().map_err(|_| format!("bad height in `{s}`"))?;
    let w: usize = w.trim().parse().map_err(|_| format!("bad width in `{s}`"))?;
    if h == 0 || w == 0 {
        return Err("sizes must be >= 1".into());
    }
    Ok((h, w))
}

/// The options given on the command line beside `--resume` in `emo train` (`def` its definition,
/// `train` its matches): a resumed run continues with the settings recorded in its
/// `config.json`, so any other option would be silently ignored. `--task` (checked against the
/// recorded one), `--stop-after` (this invocation's length), `--stream` (how the data is read,
/// not what the run computes) and the global `--backend` are allowed.
fn resume_conflicts(def: &clap::Command, train: &clap::ArgMatches) -> Vec<String> {
    if train.value_source("resume") != Some(clap::parser::ValueSource::CommandLine) {
        return Vec::new();
    }
    given_options(def, train, |id| !matches!(id, "resume" | "task" | "stop_after" | "stream" | "backend"))
}

/// The options of `def` that `matches` got from the command line and whose clap id passes
/// `keep`, as `--name`.
fn given_options(def: &clap::Command, matches: &clap::ArgMatches, keep: impl Fn(&str) -> bool) -> Vec<String> {
    def.get_arguments()
        .filter(|a| {
            let id = a.get_id().as_str();
            keep(id) && matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
        })
        .map(|a| format!("--{}", a.get_long().unwrap_or(a.get_id().as_str())))
        .collect()
}

/// Which options of a command serve which kind of run (clap ids): the rest serve both.
struct OptionKinds {
    classification: &'static [&'static str],
    /// What a dense task takes instead of the classification options.
    dense_instead: &'static str,
    dense: &'static [&'static str],
    segmentation: &'static [&'static str],
}

const TRAIN_OPTIONS: OptionKinds = OptionKinds {
    classification: &["size", "rand_augment", "border", "random_erasing", "warmup_epochs"],
    dense_instead: "a dense task takes --input HxW and --warmup-iters",
    dense: &[
        "input",
        "backbone_weights",
        "warmup_iters",
        "norm_eval",
        "frozen_stages",
        "light_augment",
        "train_scale",
        "epoch_images",
        "stream",
        "backbone_lr_mult",
    ],
    segmentation: &[
        "ohem_thresh",
        "ohem_min_kept",
        "rescale_range",
        "head_dropout",
        "aux_weight",
        "se_weight",
        "reduce_zero_label",
    ],
};

const EVAL_OPTIONS: OptionKinds = OptionKinds {
    classification: &["variant", "size"],
    dense_instead: "a dense model's variant and input come from its model card",
    dense: &["split", "card", "limit", "precise_bn", "save_weights", "results", "stream", "test_scale", "engine"],
    segmentation: &["flip", "scales"],
};

/// The options given on the command line (`matches`, of the subcommand `def`) that the kind of
/// run (`task`: from `--task`; None: classification) would ignore, and why: an error names them
/// all. A resumed training run is checked by [`resume_conflicts`] instead.
fn mode_conflicts(
    def: &clap::Command,
    matches: &clap::ArgMatches,
    task: Option<Task>,
    kinds: &OptionKinds,
) -> Option<String> {
    // "--a is" / "--a, --b are".
    let list = |v: Vec<String>| format!("{} {}", v.join(", "), if v.len() == 1 { "is" } else { "are" });
    let given = |ids: &[&str]| given_options(def, matches, |id| ids.contains(&id));
    let (ids, why) = match task {
        None => {
            let dense = given(kinds.dense);
            if !dense.is_empty() {
                return Some(format!("{} for dense tasks (--task ...)", list(dense)));
            }
            (kinds.segmentation, "for segmentation (--task deeplabv3|pspnet)")
        }
        Some(t) => {
            let cls = given(kinds.classification);
            if !cls.is_empty() {
                return Some(format!("{} for classification (without --task); {}", list(cls), kinds.dense_instead));
            }
            (
                if t.is_detection() { kinds.segmentation } else { &[] },
                "for segmentation tasks (--task deeplabv3|pspnet)",
            )
        }
    };
    let found = given(ids);
    (!found.is_empty()).then(|| format!("{} {why}", list(found)))
}

/// What a run folder's `config.json` records: `Some(Some(task))` for a dense run, `Some(None)`
/// for a classification run, None when the file cannot be read (the trainer's resume reports it).
fn recorded_task(dir: &Path) -> Option<Option<Task>> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let cfg: serde_json::Value = serde_json::from_str(&text).ok()?;
    match cfg.get("task") {
        None => Some(None),
        Some(t) => serde_json::from_value(t.clone()).ok().map(Some),
    }
}

/// Keep freed tensor memory in the process (glibc): heap chunks up to 32 MiB instead of glibc's
/// dynamic mmap threshold, and no trimming of the heap's top. Training allocates and frees the
/// same large activation buffers at every step; with glibc's defaults many of them are fresh
/// mmaps, so every step page-faults and the kernel zeroes them again (README, "Freed memory
/// stays in the process": 2-3x fewer page faults on the DeepLabv3 recipe, the same peak RSS,
/// about +4% throughput, within the test VM's noise). A `GLIBC_TUNABLES` set by the user wins.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

/// Die quietly of SIGPIPE, as command-line tools do, when the reader of stdout goes away
/// (`emo eval ... | head -1`): Rust ignores the signal and `println!` would panic instead.
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> Result<()> {
    default_sigpipe();
    tune_allocator();
    let def = Cli::command();
    let matches = def.clone().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (Some(("train", train)), Some(train_def), Cmd::Train(opts)) =
        (matches.subcommand(), def.find_subcommand("train"), &mut cli.cmd)
    {
        let conflicts = resume_conflicts(train_def, train);
        ensure!(
            conflicts.is_empty(),
            "--resume continues a run with the settings recorded in its config.json; {} cannot be changed on resume \
             (leave them out, or start a new run with --out)",
            conflicts.join(", ")
        );
        if opts.resume.is_none()
            && let Some(why) = mode_conflicts(train_def, train, opts.task, &TRAIN_OPTIONS)
        {
            bail!("{why}");
        }
        opts.variant_given = train.value_source("variant") == Some(clap::parser::ValueSource::CommandLine);
    }
    if let (Some(("eval", eval)), Some(eval_def), Cmd::Eval { task, .. }) =
        (matches.subcommand(), def.find_subcommand("eval"), &cli.cmd)
        && let Some(why) = mode_conflicts(eval_def, eval, *task, &EVAL_OPTIONS)
    {
        bail!("{why}");
    }
    backend::choose(cli.backend);
    match cli.cmd {
        Cmd::Info { input, variant, window_size, task, classes } => match task {
            Some(t) => {
                ensure!(
                    window_size.is_none(),
                    "--window-size is for the classifier (a dense task sets the official one)"
                );
                dense::info(t, variant, input, classes)
            }
            None => {
                ensure!(classes.is_none(), "--classes is for dense tasks (--task ...)");
                info(input.unwrap_or((224, 224)), variant, window_size)
            }
        },
        Cmd::Detect { weights, card, task, images, out, score_thr, test_scale, engine } => {
            let scale = test_scale.as_deref();
            dense::detect_cmd(&weights, card.as_deref(), task, &images, &out, score_thr, scale, dense_engine(engine))
        }
        Cmd::Segment { weights, card, task, images, out, flip, scales, test_scale, label_maps, engine } => {
            let aug = dense::seg_aug(flip, scales)?;
            let how = dense::SegmentHow { aug, test_scale: test_scale.as_deref(), label_maps };
            dense::segment_cmd(&weights, card.as_deref(), task, &images, &out, &how, dense_engine(engine))
        }
        Cmd::MakeCanvas { out, size, train, val, items, scale, coarse, fmnist, seed } => {
            let range = |s: &str, what: &str| -> Result<(f64, f64)> {
                let (a, b) = s.split_once('-').with_context(|| format!("--{what} expects MIN-MAX"))?;
                let (a, b): (f64, f64) = (a.parse()?, b.parse()?);
                ensure!(a > 0.0 && a <= b, "--{what}: need 0 < MIN <= MAX");
                Ok((a, b))
            };
            let (i0, i1) = range(&items, "items")?;
            let (s0, s1) = range(&scale, "scale")?;
            ensure!(size >= 32 && s1 * 28.0 <= size as f64, "--size must be >= 32 and hold the largest item");
            let cfg = emo_dense::data::CanvasConfig {
                size,
                train,
                val,
                items: (i0 as usize, i1 as usize),
                scale: (s0 as f32, s1 as f32),
                coarse,
                seed,
            };
            dense::make_canvas(&out, &cfg, fmnist.as_deref())
        }
        Cmd::Predict { variant, weights, input_npy, output_npy, features, engine } => {
            predict(variant, &weights, &input_npy, &output_npy, &features, engine)
        }
        Cmd::Classify { variant, weights, images, top, size, crop_pct, labels, json, engine } => {
            ensure!(size > 0, "--size must be > 0");
            ensure!(crop_pct > 0.0 && crop_pct <= 1.0, "--crop-pct must be in (0, 1]");
            let (model, input, names) = match &weights {
                Some(w) => {
                    let t = EvalTransform { size, crop_pct, ..Default::default() };
                    (Runner::load(variant.unwrap_or(Variant::Emo1M), w, engine)?, Input::ImageNet(t), None)
                }
                None => {
                    ensure!(
                        variant.is_none_or(|v| v == Variant::Emo1M),
                        "the embedded weights are EMO-1M; pass --weights for {}",
                        variant.map_or(String::new(), |v| v.to_string())
                    );
                    let (runner, pipeline, names) = embedded_fashion(engine)?;
                    (runner, Input::Fashion(pipeline), Some(names))
                }
            };
            classify(model, input, names, &images, top, labels.as_deref(), json)
        }
        Cmd::Convert { input, output, variant } => convert(&input, &output, variant),
        Cmd::Verify => verify(),
        Cmd::Eval {
            weights,
            task: Some(task),
            data,
            split,
            card,
            limit,
            flip,
            scales,
            precise_bn,
            save_weights,
            results,
            stream,
            test_scale,
            engine,
            ..
        } => dense::eval(&dense::EvalArgs {
            task,
            weights: &weights,
            card: card.as_deref(),
            data: Path::new(&data),
            split: &split,
            limit,
            flip,
            scales,
            precise_bn,
            save_weights: save_weights.as_deref(),
            results: results.as_deref(),
            stream,
            test_scale: test_scale.as_deref(),
            engine: dense_engine(engine),
        }),
        Cmd::Eval { variant, weights, data, size, .. } => {
            let pipeline = trained_pipeline(&weights, size)?;
            let (_, test) = load_data(&data, pipeline.size)?;
            let sd = emo_weights::load(&weights).with_context(|| format!("loading {}", weights.display()))?;
            let n = sd.get("head.bias").map_or(0, |t| t.shape[0]);
            ensure!(n == test.classes, "{} has {n} classes, the data {}", weights.display(), test.classes);
            let (top1, top5) = emo_train::evaluate(&variant.config().with_num_classes(n), sd, &test, &pipeline)?;
            println!("{}: top-1 {top1:.2}%  top-5 {top5:.2}%  ({} images of {data})", weights.display(), test.len());
            Ok(())
        }
        Cmd::Train(o) => {
            // A resumed dense run is recognised by the task in its config.json, so `--resume DIR`
            // alone continues any run; a `--task` that contradicts it is refused.
            let recorded = o.resume.as_deref().and_then(recorded_task);
            if let (Some(given), Some(rec), Some(dir)) = (o.task, recorded, o.resume.as_deref()) {
                match rec {
                    Some(rec) => {
                        ensure!(given == rec, "{} is a {rec} run; --task {given} does not match it", dir.display())
                    }
                    None => bail!("{} is a classification run; resume it without --task", dir.display()),
                }
            }
            match o.task.or(recorded.flatten()) {
                Some(task) => dense::train(task, *o),
                None => train_classifier(*o),
            }
        }
        Cmd::BenchTrain { variant, batch, size, workers, steps, rounds, compare_torch, mut backends } => {
            // Flex's data-parallel workers (and PyTorch's threads): one per core by default.
            let workers = workers.unwrap_or_else(|| emo_train::parallel::default_workers(batch));
            if backends.is_empty() {
                backends.push(backend::chosen());
            }
            backends.dedup();
            bench::train(&bench::TrainArgs { variant, batch, size, workers, steps, rounds, compare_torch, backends })
        }
        Cmd::Bench { variant, batch, size, task, threads, runs, rounds, compare_onnx, compare_burn, profile } => {
            if let Some(t) = threads {
                ensure!(t > 0, "--threads must be > 0");
                emo_kernels::pool::set_num_threads(t);
                rayon::ThreadPoolBuilder::new().num_threads(t).build_global()?;
            }
            let size = size.unwrap_or(task.map_or((224, 224), Task::paper_input));
            let a = bench::Args { variant, batch, size, runs, rounds, compare_onnx, compare_burn, profile };
            match task {
                Some(t) => bench::run_dense(&a, t),
                None => bench::run(&a),
            }
        }
    }
}

/// `emo train` without `--task`: classification on Fashion-MNIST or an image folder.
fn train_classifier(o: TrainOpts) -> Result<()> {
    let TrainOpts {
        variant,
        data,
        out,
        resume,
        epochs,
        batch,
        size,
        lr,
        ema_decay,
        train_limit,
        eval_limit,
        init_weights,
        seed,
        stop_after,
        workers,
        rand_augment,
        border,
        drop_path,
        weight_decay,
        label_smoothing,
        warmup_epochs,
        random_erasing,
        ..
    } = o;
    // A resumed run reads its data spec and input size from its own config.
    let (data, size) = match &resume {
        Some(dir) => {
            let p = dir.join("config.json");
            let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            let cfg: emo_train::TrainConfig =
                serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
            (cfg.data, cfg.pipeline.size)
        }
        None => (data, size),
    };
    let (train, eval) = load_data(&data, size)?;
    let device = backend::device()?.autodiff();
    let mut t = match resume {
        Some(dir) => emo_train::Trainer::resume(&dir, train, eval, device)?,
        None => {
            let mut cfg = emo_train::TrainConfig::fashion_mnist(variant);
            cfg.data = data.clone();
            cfg.num_classes = train.classes;
            (cfg.epochs, cfg.batch, cfg.ema_decay, cfg.seed) = (epochs, batch, ema_decay.unwrap_or(0.0), seed);
            cfg.lr_per_512 = lr.unwrap_or(cfg.lr_per_512);
            cfg.drop_path = drop_path.unwrap_or(cfg.drop_path);
            cfg.weight_decay = weight_decay.unwrap_or(cfg.weight_decay);
            cfg.label_smoothing = label_smoothing.unwrap_or(cfg.label_smoothing);
            cfg.warmup_epochs = warmup_epochs.unwrap_or(cfg.warmup_epochs);
            (cfg.train_limit, cfg.eval_limit, cfg.init_weights) = (train_limit, eval_limit, init_weights);
            cfg.pipeline.size = size;
            cfg.pipeline.border = border.unwrap_or(cfg.pipeline.border);
            cfg.pipeline.random_erasing = random_erasing.unwrap_or(cfg.pipeline.random_erasing);
            if rand_augment.unwrap_or(data.starts_with("imagefolder:")) {
                cfg.pipeline.rand_augment = Some(emo_train::randaug::RandAugment::default());
                cfg.pipeline.random_resized_crop = true;
            }
            cfg.workers = workers.unwrap_or_else(|| backend::chosen().default_workers(batch));
            if cfg.warmup_epochs >= cfg.epochs {
                eprintln!(
                    "warning: the {} warm-up epoch(s) take the whole {}-epoch run, so the learning rate only rises \
                     and never decays; for a short run or fine-tune use --warmup-epochs 0",
                    cfg.warmup_epochs, cfg.epochs
                );
            }
            let dir = out.unwrap_or_else(|| PathBuf::from(format!("runs/{variant}-{}", data.replace([':', '/'], "_"))));
            emo_train::Trainer::new(cfg, &dir, train, eval, device)?
        }
    };
    eprintln!("run folder: {}", t.dir.display());
    t.run(stop_after)?;
    println!("best top-1: {:.2}% ({})", t.state.best_ema_top1, t.dir.join("best.safetensors").display());
    Ok(())
}

/// The input pipeline a classifier was trained with: the `pipeline` of its model card (`W.json`
/// beside `W.safetensors`) or of its run's `config.json` (beside the weights), else the default;
/// `size` overrides the input side.
fn trained_pipeline(weights: &Path, size: Option<usize>) -> Result<emo_train::augment::Pipeline> {
    let mut pipeline = emo_train::augment::Pipeline::default();
    let card = weights.with_extension("json");
    let config = weights.with_file_name("config.json");
    for p in [card, config] {
        let Ok(text) = std::fs::read_to_string(&p) else { continue };
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        if let Some(pv) = v.get("pipeline") {
            pipeline =
                serde_json::from_value(pv.clone()).with_context(|| format!("the pipeline in {}", p.display()))?;
            eprintln!("input pipeline from {}", p.display());
            break;
        }
    }
    if let Some(size) = size {
        pipeline.size = size;
    }
    Ok(pipeline)
}

/// `fashion-mnist[:DIR]` or `imagefolder:PATH` -> (train, test); `size` is the network input
/// side (folder images are stored at size / 0.875 for cropping).
fn load_data(spec: &str, size: usize) -> Result<(emo_train::data::Split, emo_train::data::Split)> {
    match spec.split_once(':') {
        None if spec == "fashion-mnist" => Ok(emo_train::data::fashion_mnist(None)?),
        Some(("fashion-mnist", dir)) => Ok(emo_train::data::fashion_mnist(Some(Path::new(dir)))?),
        Some(("imagefolder", dir)) => {
            let store = (size as f64 / 0.875).round() as usize;
            let (train, val, classes, skipped) = emo_train::data::image_folder(Path::new(dir), store)?;
            eprintln!(
                "{dir}: {} classes, {} train / {} val images{}",
                classes.len(),
                train.len(),
                val.len(),
                if skipped > 0 { format!(", {skipped} unreadable images skipped") } else { String::new() }
            );
            Ok((train, val))
        }
        _ => bail!("unknown --data `{spec}` (supported: fashion-mnist, fashion-mnist:DIR, imagefolder:PATH)"),
    }
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn info(input: (usize, usize), variant: Option<Variant>, window_size: Option<usize>) -> Result<()> {
    let (h, w) = input;
    let cfg_of = |v: Variant| {
        let c = v.config();
        match window_size {
            Some(ws) => c.with_window_size(ws),
            None => c,
        }
    };
    let fl = format!("FLOPs@{h}x{w}");
    println!("{:<8} {:>11} {:>15} {:>14} {:>12}", "variant", "params", fl, "attn matmuls", "top-1 (paper)");
    for v in Variant::ALL {
        let c = cfg_of(v);
        let f = c.flops(h, w);
        println!(
            "{:<8} {:>11} {:>14.2}M {:>13.2}M {:>12}",
            v.paper_name(),
            thousands(c.num_params()),
            f.total() as f64 / 1e6,
            f.attention as f64 / 1e6,
            format!("{:.1}", v.imagenet_top1_top5().0)
        );
    }
    println!(
        "FLOPs as fvcore counts them (the paper's counter): 1 multiply-add = 1 FLOP, both attention matmuls counted."
    );
    if let Some(v) = variant {
        let c = cfg_of(v);
        println!("\n{} stages at {h}x{w}:", v.paper_name());
        let hw = c.stage_hw(h, w);
        for (fi, (fh, fw)) in c.feature_info().iter().zip(hw) {
            println!("  {:<7} {:>4} ch  stride {:>2}  {fh}x{fw}", fi.name, fi.channels, fi.reduction);
        }
        println!(
            "\n{:<10} {:>6} {:>6} {:>6} {:>6} {:>5} {:>5} {:>12}",
            "block", "in", "mid", "out", "stride", "k", "skip", "attention"
        );
        for b in c.blocks() {
            let a =
                b.attention.map(|a| format!("{}x{} w{}", a.num_heads, a.dim_head, a.window_size)).unwrap_or_default();
            println!(
                "{:<10} {:>6} {:>6} {:>6} {:>6} {:>5} {:>5} {:>12}",
                b.name, b.dim_in, b.dim_mid, b.dim_out, b.stride, b.dw_kernel, b.skip, a
            );
        }
    }
    Ok(())
}

/// Give the memory freed while loading (file bytes, the checkpoint's tensors) back to the OS
/// (glibc keeps freed heap memory otherwise), so the forward pass starts from the engine alone.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it has no other effect.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The engine of a dense command: as asked, else the fast one unless `--backend` chose another
/// backend than flex (whose device the burn model then runs on).
fn dense_engine(asked: Option<EngineKind>) -> EngineKind {
    asked.unwrap_or(if backend::chosen() == backend::Backend::Flex { EngineKind::Fast } else { EngineKind::Burn })
}

/// Which implementation runs the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum EngineKind {
    /// The fused CPU engine (emo-infer).
    Fast,
    /// The burn model (flex backend).
    Burn,
}

/// A loaded network, either engine.
enum Runner {
    Fast(Box<emo_infer::Engine>),
    Burn(Box<Emo>, Device),
}

use emo_infer::Features;

impl Runner {
    /// Load weights for `variant`, taking the head width from the checkpoint.
    fn load(variant: Variant, weights: &Path, kind: EngineKind) -> Result<Self> {
        let sd = emo_weights::load(weights).with_context(|| format!("loading {}", weights.display()))?;
        let mut cfg = variant.config().with_drop_path(0.0);
        if let Some(h) = sd.get("head.bias").filter(|t| t.shape.len() == 1) {
            cfg.num_classes = h.shape[0];
        }
        let wrapping = sd.wrapping;
        let ctx = || format!("loading {}", weights.display());
        let r = match kind {
            EngineKind::Fast => Runner::Fast(Box::new(emo_infer::Engine::from_owned(&cfg, sd).with_context(ctx)?)),
            EngineKind::Burn => Self::from_state_dict(&cfg, &sd, kind).with_context(ctx)?,
        };
        release_freed_memory();
        eprintln!(
            "loaded {} ({wrapping}) as {} with {} classes ({kind:?} engine)",
            weights.display(),
            variant,
            cfg.num_classes
        );
        Ok(r)
    }

    fn from_state_dict(cfg: &EmoConfig, sd: &emo_weights::StateDict, kind: EngineKind) -> Result<Self> {
        Ok(match kind {
            EngineKind::Fast => Runner::Fast(Box::new(emo_infer::Engine::from_state_dict(cfg, sd)?)),
            EngineKind::Burn => {
                let device = backend::device()?;
                Runner::Burn(Box::new(Emo::from_state_dict(cfg, sd, &device)?), device)
            }
        })
    }

    fn num_classes(&self) -> usize {
        match self {
            Runner::Fast(e) => e.num_classes(),
            Runner::Burn(m, _) => m.num_classes(),
        }
    }

    /// Logits (row-major `[B, classes]`) and the selected NCHW stage outputs.
    fn run(&mut self, x: Vec<f32>, shape: [usize; 4], out_indices: &[usize]) -> Result<(Vec<f32>, Features)> {
        let [b, _, h, w] = shape;
        match self {
            Runner::Fast(e) => {
                let o = e.run_owned(x, b, h, w, out_indices, true)?;
                Ok((o.logits.expect("logits"), o.features))
            }
            Runner::Burn(m, device) => {
                let t = Tensor::<4>::from_data(TensorData::new(x, shape), &*device);
                let o = m.forward_with(t, out_indices, true)?;
                let feats = o.features.into_iter().map(|(i, f)| (i, f.dims(), to_vec(f))).collect();
                Ok((to_vec(o.logits.expect("logits")), feats))
            }
        }
    }
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data")
}

fn predict(
    variant: Variant,
    weights: &Path,
    input: &Path,
    output: &Path,
    features: &[i64],
    kind: EngineKind,
) -> Result<()> {
    let x = npy::read(input).with_context(|| format!("reading {}", input.display()))?;
    ensure!(x.shape.len() == 4, "{}: expected a 4-D (B, C, H, W) array, got shape {:?}", input.display(), x.shape);
    ensure!(x.shape.iter().all(|&d| d > 0), "{}: empty dimension in shape {:?}", input.display(), x.shape);
    ensure!(x.shape[1] == 3, "{}: expected 3 channels (RGB), got shape {:?}", input.display(), x.shape);
    ensure!(x.data.iter().all(|v| v.is_finite()), "{}: input contains NaN or inf", input.display());
    let mut model = Runner::load(variant, weights, kind)?;
    let out_indices = emo_spec::resolve_out_indices(features)?;
    let shape = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
    let start = Instant::now();
    let (logits, feats) = model.run(x.data, shape, &out_indices)?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let oshape = vec![shape[0], logits.len() / shape[0]];
    npy::write(output, &npy::Array { shape: oshape.clone(), data: logits })?;
    for (i, fshape, data) in feats {
        let p = PathBuf::from(format!("{}.stage{i}.npy", output.display()));
        npy::write(&p, &npy::Array { shape: fshape.to_vec(), data })?;
        eprintln!("wrote {}", p.display());
    }
    eprintln!("wrote {} {:?} in {ms:.1} ms", output.display(), oshape);
    Ok(())
}

fn softmax(v: &[f32]) -> Vec<f32> {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = v.iter().map(|x| (x - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// The embedded default classifier: EMO-1M trained on Fashion-MNIST by `emo train` (its run is
/// recorded in docs/runs/; the card says how it was made and how well it does).
const FASHION_WEIGHTS: &[u8] = include_bytes!("../../../assets/emo1m-fashion-mnist.safetensors");
const FASHION_CARD: &str = include_str!("../../../assets/emo1m-fashion-mnist.json");

/// The card of the embedded Fashion-MNIST weights.
#[derive(serde::Deserialize)]
struct FashionCard {
    variant: Variant,
    classes: Vec<String>,
    pipeline: emo_train::augment::Pipeline,
    test_top1: f64,
    run: String,
}

/// The embedded Fashion-MNIST classifier, its input pipeline and class names.
fn embedded_fashion(kind: EngineKind) -> Result<(Runner, emo_train::augment::Pipeline, Vec<String>)> {
    let card: FashionCard = serde_json::from_str(FASHION_CARD).context("embedded model card")?;
    let sd = emo_weights::load_safetensors_bytes(FASHION_WEIGHTS).context("embedded weights")?;
    let cfg = card.variant.config().with_num_classes(card.classes.len()).with_drop_path(0.0);
    let runner = Runner::from_state_dict(&cfg, &sd, kind)?;
    eprintln!(
        "embedded {} trained on Fashion-MNIST ({:.2}% test top-1, {}); --weights for ImageNet checkpoints",
        card.variant, card.test_top1, card.run
    );
    Ok((runner, card.pipeline, card.classes))
}

/// How `classify` turns an image file into the network input.
enum Input {
    /// The official ImageNet evaluation transform.
    ImageNet(EvalTransform),
    /// Fashion-MNIST style: grey, light on black, 28x28, then the training pipeline's
    /// evaluation transform.
    Fashion(emo_train::augment::Pipeline),
}

impl Input {
    fn size(&self) -> usize {
        match self {
            Input::ImageNet(t) => t.size,
            Input::Fashion(p) => p.size,
        }
    }

    fn load(&self, path: &Path) -> Result<Vec<f32>, String> {
        match self {
            Input::ImageNet(t) => t.load(path).map_err(|e| e.to_string()),
            Input::Fashion(p) => {
                let img = image::open(path).map_err(|e| format!("cannot read image {}: {e}", path.display()))?;
                let grey = emo_train::augment::fashion_like(&img, 28);
                let mut x = vec![0f32; 3 * p.size * p.size];
                p.apply(&grey, 28, 28, None, &mut x);
                Ok(x)
            }
        }
    }
}

fn classify(
    mut model: Runner,
    input: Input,
    names: Option<Vec<String>>,
    images: &[PathBuf],
    top: usize,
    labels: Option<&Path>,
    json: bool,
) -> Result<()> {
    let n = model.num_classes();
    let names: Vec<String> = match (labels, names) {
        (Some(p), _) => std::fs::read_to_string(p)
            .with_context(|| format!("reading labels {}", p.display()))?
            .lines()
            .map(str::to_string)
            .collect(),
        (None, Some(names)) => names,
        (None, None) if n == 1000 => IMAGENET_CLASSES.lines().map(str::to_string).collect(),
        (None, None) => (0..n).map(|i| format!("class {i}")).collect(),
    };
    ensure!(names.len() >= n, "{} labels for {n} classes", names.len());
    let s = input.size();
    let mut results = Vec::new();
    let mut failed = 0;
    for path in images {
        let x = match input.load(path) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
                continue;
            }
        };
        let probs = softmax(&model.run(x, [1, 3, s, s], &[])?.0);
        let mut idx: Vec<usize> = (0..probs.len()).collect();
        idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let best: Vec<(usize, f32)> = idx.into_iter().take(top).map(|i| (i, probs[i])).collect();
        if !json {
            println!("{}", path.display());
            for (i, p) in &best {
                println!("  {:>6.2}%  {:>4}  {}", p * 100.0, i, names[*i]);
            }
        }
        results.push(serde_json::json!({
            "image": path.display().to_string(),
            "top": best.iter().map(|(i, p)| serde_json::json!({"index": i, "label": names[*i], "prob": p})).collect::<Vec<_>>(),
        }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    if failed > 0 {
        bail!("{failed} of {} images could not be read", images.len());
    }
    Ok(())
}

fn convert(input: &Path, output: &Path, variant: Option<Variant>) -> Result<()> {
    let sd = emo_weights::load(input).with_context(|| format!("loading {}", input.display()))?;
    let v = match variant {
        Some(v) => v,
        None => emo_weights::detect_variant(&sd).with_context(|| {
            format!("{} does not match any EMO variant; pass --variant to see why", input.display())
        })?,
    };
    let mut cfg = v.config();
    cfg.num_classes = sd.get("head.bias").map(|t| t.shape[0]).unwrap_or(0);
    emo_weights::validate(&sd, &cfg)?;
    emo_weights::save_safetensors(&sd, output)?;
    println!("{} ({}, {}, {} tensors) -> {}", input.display(), v, sd.wrapping, sd.len(), output.display());
    Ok(())
}

fn verify() -> Result<()> {
    let sd = emo_weights::load_safetensors_bytes(FIXTURE_WEIGHTS)?;
    let io = emo_weights::load_safetensors_bytes(FIXTURE_IO)?;
    let get =
        |k: &str| io.get(k).and_then(|t| t.as_f32().map(|d| (t.shape.clone(), d.to_vec()))).context(k.to_string());
    let (shape, input) = get("input")?;
    let (_, want) = get("logits")?;
    let shape4 = [shape[0], shape[1], shape[2], shape[3]];
    let mut ok = true;
    for kind in [EngineKind::Fast, EngineKind::Burn] {
        let mut model = Runner::from_state_dict(&EmoConfig::emo_1m(), &sd, kind)?;
        model.run(input.clone(), shape4, &[])?; // warm-up
        let start = Instant::now();
        let (logits, feats) = model.run(input.clone(), shape4, &[0, 1, 2, 3, 4])?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let on = if kind == EngineKind::Burn { format!(" on {}", backend::chosen()) } else { String::new() };
        println!("EMO-1M on the official fixture, input {shape:?}, {kind:?} engine{on} ({ms:.1} ms):");
        for (i, _, got) in feats {
            let (_, w) = get(&format!("feat.stage{i}"))?;
            let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = got.iter().zip(&w).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
            ok &= d <= 1e-4;
            println!("  stage{i}: max relative diff {d:.2e}");
        }
        let d = logits.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        ok &= d <= 1e-4;
        println!("  logits: max abs diff {d:.2e} (tolerance 1e-4)");
    }
    ensure!(ok, "parity check FAILED");
    println!("parity OK: both engines reproduce the official PyTorch EMO-1M");
    Ok(())
}
