//! The dense-prediction commands: `info --task`, `train --task`, `eval --task`, `detect`,
//! `segment` and `make-canvas`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use burn::tensor::Device;
use emo_dense::data::{CanvasConfig, Resized, TestScale};
use emo_dense::predict::{
    AnchorsBySize, DetTestCfg, SegAug, batch_tensor, detect_resized, draw_boxes, palette, segment_aug,
};
use emo_dense::train::{DenseTrainConfig, DenseTrainer, ModelCard, describe, evaluate_with, load_split, open_split};
use emo_dense::{DenseConfig, DenseInfer, DenseModel, FastDense, Task};
use emo_spec::Variant;

use crate::{EngineKind, TrainOpts};

pub fn info(task: Task, variant: Option<Variant>, input: Option<(usize, usize)>, classes: Option<usize>) -> Result<()> {
    let input = input.unwrap_or(task.paper_input());
    let classes = classes.unwrap_or(task.paper_classes());
    println!(
        "{task} at {}x{}, {classes} classes (window {}):",
        input.0,
        input.1,
        if task.is_detection() { "10 for EMO-5M" } else { "16 for EMO-5M" }
    );
    println!(
        "{:<8} {:>12} {:>13} {:>13} {:>15} {:>15}",
        "backbone", "params", "FLOPs", "mmcv-like", "paper params", "paper FLOPs"
    );
    let variants: Vec<Variant> = variant.map_or(Variant::ALL.to_vec(), |v| vec![v]);
    for v in variants {
        let cfg = DenseConfig::new(task, v, classes, input);
        let f = cfg.flops();
        let paper = task
            .paper_params_flops(v)
            .filter(|_| input == task.paper_input() && classes == task.paper_classes())
            .map_or(("-".to_string(), "-".to_string()), |(p, g)| (format!("{p:.1}M"), format!("{g:.1}G")));
        println!(
            "{:<8} {:>12} {:>12.3}G {:>12.3}G {:>15} {:>15}",
            v.paper_name(),
            cfg.num_params(),
            f.inference() as f64 / 1e9,
            f.mmcv_like() as f64 / 1e9,
            paper.0,
            paper.1
        );
    }
    println!(
        "params include the auxiliary FCN head (segmentation), as the paper's tables do; FLOPs are one inference\n\
         (fvcore convention); `mmcv-like` leaves out the attention matmuls, which mmcv's counter (the paper's) misses."
    );
    Ok(())
}

pub(crate) fn train(task: Task, a: TrainOpts) -> Result<()> {
    let device = crate::backend::device()?.autodiff();
    let mut t = match &a.resume {
        Some(dir) => DenseTrainer::resume_with(dir, device, a.stream)?,
        None => {
            let input = a.input.unwrap_or(task.paper_input());
            ensure!(
                a.init_weights.is_none() || a.backbone_weights.is_none(),
                "--init-weights (a whole trained model) and --backbone-weights: one or the other"
            );
            // A fine-tune runs on its weights' backbone unless --variant says otherwise (the
            // trainer then names the mismatch).
            let variant = match &a.init_weights {
                Some(w) if !a.variant_given => {
                    ModelCard::of_weights(w).ok().and_then(|card| card.model.backbone.variant).unwrap_or(a.variant)
                }
                _ => a.variant,
            };
            let mut cfg = DenseTrainConfig::new(task, variant, PathBuf::from(&a.data), input);
            (cfg.epochs, cfg.batch, cfg.seed) = (a.epochs, a.batch, a.seed);
            (cfg.limit_train, cfg.limit_val) = (a.train_limit, a.eval_limit);
            cfg.epoch_images = a.epoch_images;
            cfg.stream = a.stream;
            cfg.ema_decay = a.ema_decay.unwrap_or(0.0);
            ensure!((0.0..1.0).contains(&cfg.ema_decay), "--ema-decay must be in [0, 1) (0: no EMA)");
            if let Some(w) = &a.backbone_weights {
                cfg = cfg.with_backbone_weights(w.clone());
            }
            if let Some(w) = &a.init_weights {
                cfg = cfg.with_init_weights(w.clone());
            }
            cfg.lr = a.lr.unwrap_or(cfg.lr);
            cfg.weight_decay = a.weight_decay.unwrap_or(cfg.weight_decay);
            cfg.warmup_iters = a.warmup_iters.unwrap_or(cfg.warmup_iters);
            cfg.norm_eval = a.norm_eval.unwrap_or(cfg.norm_eval);
            cfg.frozen_stages = a.frozen_stages.unwrap_or(cfg.frozen_stages);
            cfg.geometric_augment = !a.light_augment;
            if let Some(r) = &a.rescale_range {
                ensure!(
                    !a.light_augment,
                    "--rescale-range sets the geometric augmentation that --light-augment turns off"
                );
                let parsed =
                    r.split_once('-').and_then(|(lo, hi)| Some((lo.parse::<f32>().ok()?, hi.parse::<f32>().ok()?)));
                let (lo, hi) =
                    parsed.with_context(|| format!("--rescale-range expects MIN-MAX (e.g. 0.5-2.0), got {r:?}"))?;
                ensure!(lo > 0.0 && lo <= hi && hi.is_finite(), "--rescale-range: need 0 < MIN <= MAX, got {r}");
                cfg.rescale = (lo, hi);
            }
            ensure!(a.ohem_min_kept.is_none() || a.ohem_thresh.is_some(), "--ohem-min-kept needs --ohem-thresh");
            if let Some(thresh) = a.ohem_thresh {
                ensure!(thresh > 0.0 && thresh <= 1.0, "--ohem-thresh must be in (0, 1]");
                let min_kept = a.ohem_min_kept.unwrap_or(input.0 * input.1 / 5);
                cfg.ohem = Some(emo_dense::loss::Ohem { thresh, min_kept });
            }
            if let Some(p) = a.drop_path {
                ensure!((0.0..1.0).contains(&p), "--drop-path must be in [0, 1)");
                cfg.drop_path = Some(p);
            }
            if let Some(p) = a.head_dropout {
                ensure!((0.0..1.0).contains(&p), "--head-dropout must be in [0, 1)");
                cfg.head_dropout = p;
            }
            if let Some(eps) = a.label_smoothing {
                ensure!(!task.is_detection(), "--label-smoothing is for classification and segmentation tasks");
                ensure!((0.0..1.0).contains(&eps), "--label-smoothing must be in [0, 1)");
                cfg.label_smoothing = eps;
            }
            if let Some(w) = a.se_weight {
                cfg.se_weight = w;
            }
            if let Some(w) = a.aux_weight {
                cfg.aux_weight = w;
            }
            // Both checked (>= 0, finite) by `DenseTrainer::new` before it reads or writes anything.
            cfg.backbone_lr_mult = a.backbone_lr_mult.unwrap_or(cfg.backbone_lr_mult);
            cfg.reduce_zero_label = a.reduce_zero_label;
            let ade20k = !task.is_detection() && emo_dense::data::ade20k_layout(&cfg.data);
            if ade20k && !a.reduce_zero_label {
                eprintln!(
                    "{}: ADE20K's layout (no classes.txt): its 150 classes, label 0 = other (--reduce-zero-label)",
                    cfg.data.display()
                );
                cfg.reduce_zero_label = true;
            }
            let coco2017 = task == Task::RetinaNet && emo_dense::data::coco2017_layout(&cfg.data);
            cfg.train_scale = match a.train_scale.as_deref() {
                Some("input") => None,
                Some(s) => {
                    ensure!(
                        task != Task::SsdLite,
                        "--train-scale is for segmentation and RetinaNet (SSDLite trains at its 320x320 input, as mmdet)"
                    );
                    ensure!(
                        !a.light_augment,
                        "--train-scale sets the geometric augmentation that --light-augment turns off"
                    );
                    Some(parse_scale(s).with_context(|| {
                        format!("--train-scale expects LONGxSHORT (e.g. 2048x512) or `input`, got {s:?}")
                    })?)
                }
                None if ade20k && !a.light_augment => {
                    eprintln!(
                        "{}: mmseg's ADE20K training resize: keep-ratio 2048x512 x {:?}, cropped to the input (--train-scale input: squeezed)",
                        cfg.data.display(),
                        cfg.rescale
                    );
                    Some((2048, 512))
                }
                None if coco2017 && !a.light_augment => {
                    eprintln!(
                        "{}: mmdet's COCO RetinaNet training resize: keep-ratio 1333x800, flipped, padded to 32 (--train-scale input: squeezed)",
                        cfg.data.display()
                    );
                    Some((1333, 800))
                }
                None => None,
            };
            cfg.workers = a.workers.unwrap_or_else(|| crate::backend::chosen().default_workers(a.batch));
            let dir = a.out.clone().unwrap_or_else(|| PathBuf::from(format!("runs/{task}-{variant}")));
            DenseTrainer::new(cfg, &dir, device)?
        }
    };
    if let Some(note) = &t.init_note {
        eprintln!("{note}");
    }
    let (n_train, n_val) = t.data_sizes();
    // A keep-ratio detector has no fixed input: each batch runs at its images' padded size.
    let input = match t.cfg.test_scale() {
        Some(s) if t.cfg.task.is_detection() => s.describe(),
        _ => format!("input {}x{}", t.cfg.input.0, t.cfg.input.1),
    };
    let n = t.card.classes.len();
    eprintln!(
        "run folder: {} ({} on {}, {n} class{}, {input}, {n_train} train / {n_val} val images)",
        t.dir.display(),
        t.cfg.task,
        t.cfg.variant,
        if n == 1 { "" } else { "es" },
    );
    let streamed = match (t.streams(), t.streams_val()) {
        (true, true) => "training and validation splits",
        (true, false) => "training split",
        (false, true) => "validation split",
        (false, false) => "",
    };
    if !streamed.is_empty() {
        eprintln!("streaming the {streamed} from disk (decoded batch by batch; --stream false holds it in memory)");
    }
    for w in t.data_warnings() {
        eprintln!("warning: {w}");
    }
    t.run(a.stop_after)?;
    let best =
        emo_dense::train::read_metrics(&t.dir).into_iter().max_by(|x, y| x.key_metric().total_cmp(&y.key_metric()));
    if let Some(b) = best {
        let what = if t.cfg.task.is_detection() { "mAP50" } else { "mIoU" };
        let v = if t.cfg.task.is_detection() { 100.0 * b.key_metric() } else { b.key_metric() };
        println!("best {what}: {v:.2} at epoch {} ({})", b.epoch, t.dir.join("best.safetensors").display());
    }
    Ok(())
}

/// Load `weights` with the card from `--card` or `model.json` next to them; without either, an
/// official mmdet / mmseg checkpoint's card is inferred from its keys and shapes.
fn load_model(weights: &Path, card: Option<&Path>, device: &Device) -> Result<(DenseModel, ModelCard)> {
    let (sd, card) = load_checkpoint(weights, card)?;
    let model = DenseModel::from_state_dict(&card.model, &sd, device)?;
    Ok((model, card))
}

/// [`load_model`] on the engine asked for: the fast CPU engine, or the burn model on `device`.
fn load_infer(
    weights: &Path,
    card: Option<&Path>,
    device: &Device,
    engine: EngineKind,
) -> Result<(Box<dyn DenseInfer>, ModelCard)> {
    let (sd, card) = load_checkpoint(weights, card)?;
    Ok((infer_model(&card, &sd, device, engine)?, card))
}

/// The model of `card` with weights `sd` on `engine` (burn's on `device`).
fn infer_model(
    card: &ModelCard,
    sd: &emo_weights::StateDict,
    device: &Device,
    engine: EngineKind,
) -> Result<Box<dyn DenseInfer>> {
    Ok(match engine {
        EngineKind::Fast => Box::new(FastDense::from_state_dict(&card.model, sd)?),
        EngineKind::Burn => Box::new(DenseModel::from_state_dict(&card.model, sd, device)?),
    })
}

/// The weights and their model card (see [`load_model`]).
fn load_checkpoint(weights: &Path, card: Option<&Path>) -> Result<(emo_weights::StateDict, ModelCard)> {
    let (sd, card, inferred) =
        ModelCard::with_weights(weights, card).with_context(|| format!("loading {}", weights.display()))?;
    if inferred {
        eprintln!("{}: no model card; {}", weights.display(), official_card(&card));
    }
    Ok((sd, card))
}

/// "an official retinanet checkpoint: EMO-1M, 80 classes, input 800x1333".
fn official_card(c: &ModelCard) -> String {
    format!(
        "an official {} checkpoint: {}, {} classes, input {}x{}",
        c.model.task,
        c.model.backbone.name(),
        c.classes.len(),
        c.model.input.0,
        c.model.input.1
    )
}

/// `emo eval --task`: what to evaluate and how.
pub struct EvalArgs<'a> {
    pub task: Task,
    pub weights: &'a Path,
    pub card: Option<&'a Path>,
    pub data: &'a Path,
    pub split: &'a str,
    pub limit: usize,
    pub flip: bool,
    /// Multi-scale test ratios (empty: single scale).
    pub scales: Vec<f32>,
    /// Recalibrate the BatchNorm statistics on this many training images first (0: no).
    pub precise_bn: usize,
    /// Write the (recalibrated) weights here.
    pub save_weights: Option<&'a Path>,
    /// Detection: write the detections here as a COCO results file.
    pub results: Option<&'a Path>,
    /// Decode the split batch by batch from disk (`None`: when it would take more than 4 GiB).
    pub stream: Option<bool>,
    /// `--test-scale`: `paper`, `input` or LONGxSHORT (`None`: the model card's).
    pub test_scale: Option<&'a str>,
    pub engine: EngineKind,
}

/// "AxB" with both sides > 0.
fn parse_scale(s: &str) -> Option<(usize, usize)> {
    let (a, b) = s.split_once('x')?;
    Some((a.parse().ok()?, b.parse().ok()?)).filter(|&(a, b)| a > 0 && b > 0)
}

/// `--test-scale` over the card's: `paper` (the official test pipeline of the task), `input`
/// (none: squeezed to the input as in training), `LONGxSHORT` (keep-ratio; a detector's padded
/// to 32, as mmdet's test pipeline pads).
fn test_scale(asked: Option<&str>, card: &ModelCard) -> Result<Option<TestScale>> {
    let task = card.model.task;
    match asked {
        None => Ok(card.test_scale),
        Some("input") => Ok(None),
        Some("paper") => Ok(Some(TestScale::paper(task))),
        Some(s) => {
            let scale = parse_scale(s).with_context(|| {
                format!("--test-scale expects LONGxSHORT (e.g. 2048x512), `paper` or `input`, got {s:?}")
            })?;
            Ok(Some(TestScale::keep_ratio_for(task, scale)))
        }
    }
}

/// ", test scale keep-ratio 2048x512" (empty without one).
fn scale_description(scale: Option<TestScale>) -> String {
    scale.map_or_else(String::new, |t| format!(", test scale {}", t.describe()))
}

/// The test-time augmentation of `--flip` and `--scales` (none given: single scale).
pub fn seg_aug(flip: bool, scales: Vec<f32>) -> Result<SegAug> {
    let aug = SegAug { flip, scales: if scales.is_empty() { vec![1.0] } else { scales } };
    aug.validate().context("--scales")?;
    Ok(aug)
}

/// ", flip and scales 1, 1.5 test augmentation" (empty for single-scale inference).
fn aug_description(aug: &SegAug) -> String {
    let scales = (!aug.is_single_scale())
        .then(|| format!("scales {}", aug.scales.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ")));
    match (aug.flip, scales) {
        (false, None) => String::new(),
        (true, None) => ", flip test augmentation".into(),
        (false, Some(s)) => format!(", {s} test augmentation"),
        (true, Some(s)) => format!(", flip and {s} test augmentation"),
    }
}

pub fn eval(a: &EvalArgs) -> Result<()> {
    let EvalArgs { task, weights, card, data, split, limit, flip, .. } = *a;
    ensure!(
        a.results.is_none() || task.is_detection(),
        "--results writes detections (COCO results); for segmentation `emo segment --label-maps` writes the predicted label maps"
    );
    let aug = seg_aug(flip, a.scales.clone())?;
    ensure!(
        a.save_weights.is_none() || a.precise_bn > 0,
        "--save-weights writes the weights --precise-bn recalibrates"
    );
    let device = dense_device(a.engine)?;
    let (model, card) = if a.precise_bn > 0 {
        // Precise BN runs the burn model in training mode; the recalibrated weights then run
        // on the engine asked for.
        let bdev = crate::backend::device()?;
        let (model, card) = load_model(weights, card, &bdev)?;
        ensure!(card.model.task == task, "{} is a {} model, not {task}", weights.display(), card.model.task);
        let scale = test_scale(a.test_scale, &card)?;
        let sd = recalibrate(&model, &bdev, &card, scale, weights, data, a.precise_bn, a.save_weights)?;
        (infer_model(&card, &sd, &device, a.engine)?, card)
    } else {
        load_infer(weights, card, &device, a.engine)?
    };
    ensure!(card.model.task == task, "{} is a {} model, not {task}", weights.display(), card.model.task);
    let scale = test_scale(a.test_scale, &card)?;
    // Under a test scale each image is read from its file as it is evaluated: index only.
    let stream = if scale.is_some() { a.stream.or(Some(true)) } else { a.stream };
    let d = open_split(card.model.task, data, split, card.model.input, false, card.reduce_zero_label, limit, stream)?;
    let d = match d {
        emo_dense::train::DenseData::Seg(s) => emo_dense::train::DenseData::Seg(s.with_test_scale(scale)?),
        emo_dense::train::DenseData::Det(s) => emo_dense::train::DenseData::Det(s.with_test_scale(scale)),
    };
    if let Some(w) = d.skipped_warning() {
        eprintln!("{}: {w}", data.display());
    }
    ensure!(
        d.classes() == card.classes.as_slice(),
        "{} has classes {:?}, the model {:?}",
        data.display(),
        d.classes(),
        card.classes
    );
    let e = match (a.results, &d) {
        (Some(path), emo_dense::train::DenseData::Det(det)) => {
            let dets = emo_dense::train::detections_on(model.as_ref(), det, &device, model.eval_threads())?;
            let json = serde_json::to_vec(&dets).context("serialising the detections")?;
            emo_weights::write_atomic(path, &json).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {} detections on {} images to {} (COCO results)", dets.len(), d.len(), path.display());
            emo_dense::train::coco_of(det, &dets)
        }
        _ => evaluate_with(model.as_ref(), &d, &device, &aug)?,
    };
    let how = format!("{}{}", scale_description(scale), aug_description(&aug));
    let split = emo_dense::data::resolve_split(data, split, task.is_detection());
    println!("{} on {} ({split}, {} images{how}): {}", card.model.task, data.display(), d.len(), describe(&e));
    // Per-class table, as mmdet's `classwise` / mmseg's evaluation print it.
    let pct = emo_dense::metrics::percent;
    match (&e, &d) {
        (emo_dense::train::Eval::Coco(_, per_class), emo_dense::train::DenseData::Det(det)) => {
            println!("{:<16} {:>6} {:>6}", "class", "AP", "AP50");
            for c in per_class {
                let name = det.cat_ids.iter().position(|&id| id == c.category_id).map_or("?", |i| &det.classes[i]);
                println!("{name:<16} {:>6} {:>6}", pct(c.ap), pct(c.ap50));
            }
        }
        (emo_dense::train::Eval::Seg(_, m), _) => {
            println!("{:<16} {:>6} {:>6}", "class", "IoU", "Acc");
            for ((name, iou), acc) in d.classes().iter().zip(m.class_iou()).zip(m.class_acc()) {
                println!("{name:<16} {:>6} {:>6}", pct(iou), pct(acc));
            }
        }
        _ => {}
    }
    Ok(())
}

/// Precise BN on the first `n` images of `data`'s training split (no augmentation), in shards of
/// the run's per-replica batch (its config.json beside the weights; else 8); optionally saved.
/// The images are squeezed to the input, or under a test `scale` (a keep-ratio run's, an
/// official checkpoint's) read as evaluation reads them, each shard padded to its largest.
#[allow(clippy::too_many_arguments)]
fn recalibrate(
    model: &DenseModel,
    device: &Device,
    card: &ModelCard,
    scale: Option<TestScale>,
    weights: &Path,
    data: &Path,
    n: usize,
    save: Option<&Path>,
) -> Result<emo_weights::StateDict> {
    let run_cfg = weights.with_file_name("config.json");
    let shard = std::fs::read_to_string(&run_cfg)
        .ok()
        .and_then(|t| serde_json::from_str::<DenseTrainConfig>(&t).ok())
        .map_or(8, |c| (c.batch / c.workers.max(1)).max(1));
    let start = std::time::Instant::now();
    let (task, input, rzl) = (card.model.task, card.model.input, card.reduce_zero_label);
    let autodiff = device.clone().autodiff();
    let (sd, used) = match scale {
        None => {
            let train = load_split(task, data, "train", input, true, rzl, n)?;
            let images = train.decoded_rgb();
            (emo_dense::bn::precise_bn(model, &images, input, shard, &autodiff)?, images.len())
        }
        Some(s) => {
            let train = emo_dense::train::index_split(task, data, "train", input, true, rzl, n)?;
            let paths = train.image_paths();
            let loaded = emo_train::parallel::map_each(&paths, emo_train::parallel::cores(), |p| s.load(p));
            let loaded = loaded.into_iter().collect::<Result<Vec<_>, _>>()?;
            let images: Vec<&[u8]> = loaded.iter().map(|r| r.rgb.as_slice()).collect();
            let sizes: Vec<(usize, usize)> = loaded.iter().map(|r| r.size).collect();
            eprintln!("precise BN on the training images at test scale {}", s.describe());
            (emo_dense::bn::precise_bn_sized(model, &images, &sizes, s.pad, shard, &autodiff)?, images.len())
        }
    };
    eprintln!(
        "precise BN: the BatchNorm statistics from {} training images in shards of {shard} ({:.1} s)",
        used / shard * shard,
        start.elapsed().as_secs_f64()
    );
    if let Some(p) = save {
        emo_weights::save_safetensors(&sd, p).with_context(|| format!("writing {}", p.display()))?;
        let card_path = ModelCard::beside(p);
        if !card_path.exists() {
            emo_weights::write_atomic(&card_path, serde_json::to_string_pretty(card)?.as_bytes())?;
        }
        eprintln!("wrote {}", p.display());
    }
    Ok(sd)
}

/// The device inputs are made on: the CPU for the fast engine, `--backend`'s for burn.
fn dense_device(engine: EngineKind) -> Result<Device> {
    match engine {
        EngineKind::Fast => Ok(Device::flex()),
        EngineKind::Burn => crate::backend::device(),
    }
}

/// Run `f` on every readable image; unreadable ones are reported and skipped, and it is an error
/// only when none could be read.
fn for_each_image(images: &[PathBuf], mut f: impl FnMut(&Path, image::RgbImage) -> Result<()>) -> Result<()> {
    let mut failed = 0;
    for p in images {
        match image::open(p).with_context(|| format!("reading {}", p.display())) {
            Ok(img) => f(p, img.to_rgb8())?,
            Err(e) => {
                eprintln!("skipping: {e:#}");
                failed += 1;
            }
        }
    }
    ensure!(failed < images.len(), "no image could be read");
    Ok(())
}

fn out_name(out: &Path, img: &Path, ext: &str) -> PathBuf {
    out.join(format!("{}.{ext}", img.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default()))
}

/// The command's name, the other dense command's, and the tasks `--task` takes for it.
fn dense_cmd_names(detection: bool) -> (&'static str, &'static str, &'static str) {
    if detection { ("detect", "segment", "ssdlite|retinanet") } else { ("segment", "detect", "deeplabv3|pspnet") }
}

/// `--task` of `emo detect` / `emo segment`, checked before any weights are read: a task of the
/// command's kind.
fn check_asked_task(asked: Option<Task>, detection: bool) -> Result<()> {
    let (cmd, other, tasks) = dense_cmd_names(detection);
    match asked {
        Some(t) if t.is_detection() != detection => bail!("`emo {cmd}` takes --task {tasks}; {t} is for `emo {other}`"),
        _ => Ok(()),
    }
}

/// The loaded model is of the command's kind and, with `--task`, that task.
fn check_model_task(weights: &Path, card: &ModelCard, asked: Option<Task>, detection: bool) -> Result<()> {
    let (_, other, _) = dense_cmd_names(detection);
    let has = card.model.task;
    ensure!(has.is_detection() == detection, "{} is a {has} model; use `emo {other}`", weights.display());
    match asked {
        Some(t) if t != has => bail!("{} is a {has} model, not {t}", weights.display()),
        _ => Ok(()),
    }
}

#[allow(clippy::too_many_arguments)]
pub fn detect_cmd(
    weights: &Path,
    card: Option<&Path>,
    task: Option<Task>,
    images: &[PathBuf],
    out: &Path,
    score_thr: f32,
    test_scale_arg: Option<&str>,
    engine: EngineKind,
) -> Result<()> {
    check_asked_task(task, true)?;
    let device = dense_device(engine)?;
    let (model, card) = load_infer(weights, card, &device, engine)?;
    check_model_task(weights, &card, task, true)?;
    let scale = test_scale(test_scale_arg, &card)?;
    if let Some(t) = scale {
        eprintln!(
            "images resized to {} as the paper's test pipeline (--test-scale input: as in training)",
            t.describe()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut test = DetTestCfg::official(card.model.task);
    test.score_thr = score_thr;
    let input = card.model.input;
    let mut anchors = AnchorsBySize::default();
    for_each_image(images, |p, mut orig| {
        // The image resized (under a test scale, then padded to `hw`) or squeezed to the input.
        let own = (orig.height() as usize, orig.width() as usize);
        let (r, hw) = match scale {
            Some(t) => {
                let (rgb, size) = t.apply(&orig);
                (Resized { rgb, size, orig: own }, t.padded(size))
            }
            None => (Resized { rgb: emo_dense::data::squeeze_rgb(&orig, input), size: input, orig: own }, input),
        };
        let (sx, sy) = (own.1 as f32 / r.size.1 as f32, own.0 as f32 / r.size.0 as f32);
        let mut dets =
            detect_resized(model.as_ref(), std::slice::from_ref(&r), hw, &mut anchors, &test, &device)?.remove(0);
        for d in &mut dets {
            d.bbox = [d.bbox[0] * sx, d.bbox[1] * sy, d.bbox[2] * sx, d.bbox[3] * sy];
        }
        let json: Vec<_> = dets
            .iter()
            .map(|d| {
                serde_json::json!({
                    "bbox_xyxy": d.bbox, "score": d.score, "label": d.label,
                    "class": card.classes.get(d.label), "category_id": card.cat_ids.get(d.label),
                })
            })
            .collect();
        let jp = out_name(out, p, "json");
        emo_weights::write_atomic(&jp, serde_json::to_string_pretty(&json)?.as_bytes())?;
        draw_boxes(&mut orig, &dets);
        let pp = out_name(out, p, "png");
        orig.save(&pp).with_context(|| format!("writing {}", pp.display()))?;
        let top: Vec<String> = dets
            .iter()
            .take(5)
            .map(|d| format!("{} {:.2}", card.classes.get(d.label).map_or("?", String::as_str), d.score))
            .collect();
        let noun = if dets.len() == 1 { "detection" } else { "detections" };
        println!("{}: {} {noun} [{}] -> {}", p.display(), dets.len(), top.join(", "), pp.display());
        Ok(())
    })
}

/// How `emo segment` runs: test-time augmentation, `--test-scale`, `--label-maps`.
pub struct SegmentHow<'a> {
    pub aug: SegAug,
    pub test_scale: Option<&'a str>,
    pub label_maps: bool,
}

pub fn segment_cmd(
    weights: &Path,
    card: Option<&Path>,
    task: Option<Task>,
    images: &[PathBuf],
    out: &Path,
    how: &SegmentHow,
    engine: EngineKind,
) -> Result<()> {
    let SegmentHow { aug, label_maps, .. } = how;
    check_asked_task(task, false)?;
    let device = dense_device(engine)?;
    let (model, card) = load_infer(weights, card, &device, engine)?;
    check_model_task(weights, &card, task, false)?;
    let shift = u8::from(card.reduce_zero_label);
    ensure!(
        !label_maps || card.classes.len() + usize::from(shift) <= 255,
        "--label-maps writes 8-bit label maps (255 is the ignore label): {} classes do not fit",
        card.classes.len()
    );
    let scale = test_scale(how.test_scale, &card)?;
    if let Some(t) = scale {
        ensure!(t.pad <= 1, "a segmentation test scale pads nothing");
        eprintln!(
            "images resized to {} as the paper's test pipeline (--test-scale input: as in training)",
            t.describe()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let input = card.model.input;
    for_each_image(images, |p, orig| {
        let x = match scale {
            Some(t) => {
                let (rgb, to) = t.apply(&orig);
                batch_tensor(&[&rgb], to, &device)
            }
            None => batch_tensor(&[&emo_dense::data::squeeze_rgb(&orig, input)], input, &device),
        };
        // The class map at the image's own size: the logits resized to it (mmseg's `rescale`).
        let pred = segment_aug(model.as_ref(), x, aug, &[(orig.height() as usize, orig.width() as usize)])?.remove(0);
        let mask = image::GrayImage::from_raw(orig.width(), orig.height(), pred).context("mask size")?;
        let mut colour = image::RgbImage::new(orig.width(), orig.height());
        let mut counts = vec![0usize; card.classes.len()];
        for (c, m) in colour.pixels_mut().zip(mask.pixels()) {
            *c = image::Rgb(palette(m.0[0] as usize));
            if let Some(n) = counts.get_mut(m.0[0] as usize) {
                *n += 1;
            }
        }
        let pp = out_name(out, p, "png");
        colour.save(&pp).with_context(|| format!("writing {}", pp.display()))?;
        if *label_maps {
            let labels = image::GrayImage::from_fn(mask.width(), mask.height(), |x, y| {
                image::Luma([mask.get_pixel(x, y).0[0] + shift])
            });
            let stem = p.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default();
            let lp = out.join(format!("{stem}-labels.png"));
            labels.save(&lp).with_context(|| format!("writing {}", lp.display()))?;
        }
        let total = (orig.width() * orig.height()) as f64;
        let present: Vec<String> = counts
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n > 0)
            .map(|(c, &n)| format!("{} {:.0}%", card.classes[c], 100.0 * n as f64 / total))
            .collect();
        println!("{}: [{}] -> {}", p.display(), present.join(", "), pp.display());
        Ok(())
    })
}

pub fn make_canvas(out: &Path, cfg: &CanvasConfig, fmnist: Option<&Path>) -> Result<()> {
    if out.join("annotations").exists() {
        bail!("{} already holds a dataset", out.display());
    }
    emo_dense::data::make_canvas(out, cfg, fmnist)?;
    println!(
        "{}: {} train + {} val canvases of {}x{} (COCO: annotations/instances_*.json; masks: labels/*; classes.txt)",
        out.display(),
        cfg.train,
        cfg.val,
        cfg.size,
        cfg.size
    );
    Ok(())
}
