//! The dense models on burn: shapes, the state-dict layout, strict loading, backbone loading
//! from a classification checkpoint, norm_eval / frozen stages, and the trainer (learning,
//! exact resume, bad data).

use std::path::{Path, PathBuf};

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use emo_dense::model::DenseHead;
use emo_dense::train::{DenseData, DenseTrainConfig, DenseTrainer, evaluate, index_split, load_split, stream_order};
use emo_dense::{DenseConfig, DenseError, DenseModel, DenseOutput, Task, anchors};
use emo_spec::Variant;
use emo_weights::StateDict;

/// burn's RNG is global: tests that build or train models run one at a time, so a seeded run
/// draws the same numbers as its twin.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The class of the largest score at each pixel of the first image of `(B, K, H, W)` scores
/// (the first class on ties).
fn argmax_map(t: Tensor<4>) -> Vec<u8> {
    let [_, k, h, w] = t.dims();
    let v = to_vec(t);
    (0..h * w)
        .map(|px| (0..k).fold(0, |b, c| if v[c * h * w + px] > v[b * h * w + px] { c } else { b }) as u8)
        .collect()
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn small(task: Task, classes: usize) -> DenseConfig {
    DenseConfig::new(task, Variant::Emo1M, classes, (64, 64))
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

fn outputs(m: &DenseModel, x: Tensor<4>) -> Vec<f32> {
    match m.forward(x, true).unwrap() {
        DenseOutput::Det { cls, reg } => [to_vec(cls), to_vec(reg)].concat(),
        DenseOutput::Seg { logits, aux, .. } => [to_vec(logits), to_vec(aux.unwrap())].concat(),
    }
}

#[test]
fn shapes_layout_and_state_dict_round_trip() {
    let _g = serial();
    let device = Device::flex();
    for task in Task::ALL {
        let cfg = small(task, 3);
        let m = DenseModel::new(&cfg, None, &device).unwrap();
        let x = Tensor::<4>::random([2, 3, 64, 64], Distribution::Uniform(-1.0, 1.0), &device);
        match m.forward(x.clone(), true).unwrap() {
            DenseOutput::Det { cls, reg } => {
                let n = anchors::anchors(&cfg).len();
                let k = if task == Task::SsdLite { 4 } else { 3 };
                assert_eq!((cls.dims(), reg.dims()), ([2, n, k], [2, n, 4]), "{task}");
            }
            DenseOutput::Seg { logits, aux, .. } => {
                assert_eq!(logits.dims(), [2, 3, 2, 2], "{task}");
                assert_eq!(aux.unwrap().dims(), [2, 3, 4, 4], "{task}");
            }
        }
        let sd = m.state_dict();
        emo_weights::validate_keys(&sd, &cfg.state_dict_keys(), "x").unwrap();
        let params: usize = cfg
            .state_dict_keys()
            .iter()
            .filter(|k| k.kind == emo_spec::KeyKind::Param)
            .map(|k| k.shape.iter().product::<usize>())
            .sum();
        assert_eq!(params, cfg.num_params(), "{task}");
        let m2 = DenseModel::from_state_dict(&cfg, &sd, &device).unwrap();
        let (a, b) = (outputs(&m, x.clone()), outputs(&m2, x));
        assert_eq!(a, b, "{task}: reloaded model differs");
    }
}

#[test]
fn loading_is_strict_and_names_the_keys() {
    let _g = serial();
    let device = Device::flex();
    let cfg = small(Task::SsdLite, 3);
    let sd = DenseModel::new(&cfg, None, &device).unwrap().state_dict();
    let mut missing = sd.clone();
    missing.tensors.remove("bbox_head.cls_convs.2.1.weight");
    missing.insert("neck.extra.bogus", emo_weights::Tensor::f32(vec![1], vec![0.0]));
    let e = DenseModel::from_state_dict(&cfg, &missing, &device).unwrap_err().to_string();
    assert!(e.contains("bbox_head.cls_convs.2.1.weight") && e.contains("neck.extra.bogus"), "{e}");
    // Another class count: shape mismatches name the head convs.
    let e = DenseModel::from_state_dict(&small(Task::SsdLite, 5), &sd, &device).unwrap_err().to_string();
    assert!(e.contains("shape mismatch: bbox_head.cls_convs.0.1.weight"), "{e}");
    // A segmentation checkpoint is not a detector.
    let seg = DenseModel::new(&small(Task::PspNet, 3), None, &device).unwrap().state_dict();
    assert!(DenseModel::from_state_dict(&cfg, &seg, &device).is_err());
}

#[test]
fn backbone_loads_from_a_classification_checkpoint() {
    let _g = serial();
    let device = Device::flex();
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/emo/emo_1m.safetensors");
    let cls = emo_weights::load(&p).unwrap();
    assert!(cls.get("head.weight").is_some());
    let m = DenseModel::new(&small(Task::DeepLabV3, 4), Some(&cls), &device).unwrap();
    let sd = m.state_dict();
    for k in ["stage4.2.proj.conv.weight", "stage0.0.convs.0.1.running_var"] {
        assert_eq!(sd.get(&format!("backbone.{k}")).unwrap().as_f32(), cls.get(k).unwrap().as_f32(), "{k}");
    }
    assert!(sd.tensors.keys().all(|k| !k.starts_with("backbone.head") && !k.starts_with("backbone.norm")));
    // Strict about everything but norm/head: a broken backbone key is an error naming it.
    let mut bad = cls.clone();
    bad.tensors.remove("stage2.0.proj.conv.weight");
    let e = DenseModel::new(&small(Task::DeepLabV3, 4), Some(&bad), &device).unwrap_err().to_string();
    assert!(e.contains("stage2.0.proj.conv.weight"), "{e}");
    // A whole detector's weights start a segmenter's backbone (mmcv's prefix 'backbone.'), its
    // neck and heads dropped; strict about the backbone part.
    let det = DenseModel::new(&small(Task::SsdLite, 3), None, &device).unwrap().state_dict();
    let seg = DenseModel::new(&small(Task::PspNet, 4), Some(&det), &device).unwrap().state_dict();
    for (k, t) in &det.tensors {
        if k.starts_with("backbone.") {
            assert_eq!(seg.get(k), Some(t), "{k}");
        }
    }
    let mut bad = det.clone();
    bad.tensors.remove("backbone.stage3.1.proj.conv.weight");
    let e = DenseModel::new(&small(Task::PspNet, 4), Some(&bad), &device).unwrap_err().to_string();
    assert!(e.contains("stage3.1.proj.conv.weight"), "{e}");
}

#[test]
fn fine_tuning_loads_every_weight_and_starts_only_the_classifiers_afresh() {
    let _g = serial();
    let device = Device::flex();
    let names = |n: usize, p: &str| (0..n).map(|i| format!("{p}{i}")).collect::<Vec<_>>();
    for task in Task::ALL {
        // A trained model's weights: every float moved off any fresh init (BN statistics and
        // zero biases included).
        let mut src = DenseModel::new(&small(task, 3), None, &device).unwrap().state_dict();
        for t in src.tensors.values_mut() {
            if let emo_weights::Data::F32(v) = &mut t.data {
                v.iter_mut().for_each(|x| *x += 0.5);
            }
        }
        // The same classes: every weight as it was.
        let same = DenseModel::fine_tune_from(&small(task, 3), &src, &device).unwrap().state_dict();
        assert_eq!(same, src, "{task}");
        // Five classes, none of them the model's: the classifiers are a fresh model's (the
        // official init), the rest as it was.
        let five = small(task, 5);
        let init = DenseModel::new(&five, None, &device).unwrap().state_dict();
        let (laid, found) = DenseModel::carry_classes(&five, &src, &names(3, "old"), &names(5, "new"), &init).unwrap();
        assert_eq!(found, 0);
        let got = DenseModel::fine_tune_from(&five, &laid, &device).unwrap().state_dict();
        emo_weights::validate_keys(&got, &five.state_dict_keys(), "five").unwrap();
        let fresh = five.classifier_keys();
        for (k, t) in &got.tensors {
            let want = if fresh.contains(k) { init.get(k) } else { src.get(k) };
            assert_eq!(Some(t), want, "{task}: {k}");
        }
        if task == Task::RetinaNet {
            // RetinaNet's classifier bias starts at the focal loss prior (mmdet: prior_prob 0.01).
            let prior = -((1.0f32 - 0.01) / 0.01).ln();
            assert!(get(&got, "bbox_head.retina_cls.bias").iter().all(|&b| (b - prior).abs() < 1e-6));
        }
        // Strict: classifiers that do not fit the classes, a missing key.
        let e = DenseModel::fine_tune_from(&five, &src, &device).unwrap_err().to_string();
        assert!(e.contains(&format!("shape mismatch: {}", fresh[0])), "{task}: {e}");
        let mut broken = laid.clone();
        broken.tensors.remove("backbone.stage2.0.proj.conv.weight");
        let e = DenseModel::fine_tune_from(&five, &broken, &device).unwrap_err().to_string();
        assert!(e.contains("backbone.stage2.0.proj.conv.weight"), "{task}: {e}");
    }
    // The training-only semantic-encoding layer starts afresh from weights without it.
    let src = DenseModel::new(&small(Task::DeepLabV3, 3), None, &device).unwrap().state_dict();
    let se = DenseConfig { se_layer: true, ..small(Task::DeepLabV3, 3) };
    let got = DenseModel::fine_tune_from(&se, &src, &device).unwrap().state_dict();
    assert!(got.get("decode_head.se_layer.weight").is_some());
    assert_eq!(get(&got, "decode_head.conv_seg.weight"), get(&src, "decode_head.conv_seg.weight"));
    // Another task's weights are no fine-tune source.
    let e = DenseModel::fine_tune_from(&small(Task::PspNet, 3), &src, &device).unwrap_err().to_string();
    assert!(e.contains("decode_head.psp_modules"), "{e}");
}

#[test]
fn carried_classes_keep_their_classifier_rows() {
    let _g = serial();
    let device = Device::flex();
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (from, to) = (names(&["a", "b", "c"]), names(&["c", "a", "z"]));
    for task in Task::ALL {
        let src = DenseModel::new(&small(task, 3), None, &device).unwrap().state_dict();
        let cfg = small(task, 3);
        let init = DenseModel::new(&cfg, None, &device).unwrap().state_dict();
        let (got, found) = DenseModel::carry_classes(&cfg, &src, &from, &to, &init).unwrap();
        assert_eq!(found, 2, "{task}");
        // SSD's classifiers hold a background row after each anchor's classes.
        let extra = if task == Task::SsdLite { 1 } else { 0 };
        for k in cfg.classifier_keys() {
            let (s, g, i) = (src.get(&k).unwrap(), got.get(&k).unwrap(), init.get(&k).unwrap());
            assert_eq!(g.shape, i.shape, "{task} {k}");
            let row: usize = g.shape[1..].iter().product();
            let rows = |t: &emo_weights::Tensor, r: usize| t.as_f32().unwrap()[r * row..(r + 1) * row].to_vec();
            let block = 3 + extra;
            for a in 0..g.shape[0] / block {
                assert_eq!(rows(g, a * block), rows(s, a * block + 2), "{task} {k}: c");
                assert_eq!(rows(g, a * block + 1), rows(s, a * block), "{task} {k}: a");
                assert_eq!(rows(g, a * block + 2), rows(i, a * block + 2), "{task} {k}: z starts afresh");
                if extra == 1 {
                    assert_eq!(rows(g, a * block + 3), rows(s, a * block + 3), "{task} {k}: background");
                }
            }
        }
        // Every other weight is the source's; the result loads strictly as the model to train.
        for (k, t) in &src.tensors {
            if !cfg.classifier_keys().contains(k) {
                assert_eq!(got.get(k), Some(t), "{task} {k}");
            }
        }
        DenseModel::fine_tune_from(&cfg, &got, &device).unwrap();
        // Three of a model's six classes, in another order.
        let six = names(&["p", "q", "r", "s", "t", "u"]);
        let big = DenseModel::new(&small(task, 6), None, &device).unwrap().state_dict();
        let (got, found) = DenseModel::carry_classes(&cfg, &big, &six, &names(&["u", "p", "r"]), &init).unwrap();
        assert_eq!(found, 3);
        let k = &cfg.classifier_keys()[0];
        let row: usize = got.get(k).unwrap().shape[1..].iter().product();
        let first = |t: &emo_weights::Tensor, r: usize| t.as_f32().unwrap()[r * row..(r + 1) * row].to_vec();
        assert_eq!(first(got.get(k).unwrap(), 0), first(big.get(k).unwrap(), 5), "{task}: u");
        // Weights whose classifier does not have the rows `from` implies: an error naming the key.
        let e = DenseModel::carry_classes(&cfg, &big, &from, &to, &init).unwrap_err().to_string();
        assert!(e.contains(k.as_str()), "{task}: {e}");
    }
}

fn get(sd: &StateDict, k: &str) -> Vec<f32> {
    sd.get(k).unwrap().as_f32().unwrap().to_vec()
}

/// One AdamW step of a detector on a random batch: its weights before, and the stepped model.
fn one_step(m: DenseModel, device: &Device) -> (StateDict, DenseModel) {
    let before = m.state_dict();
    let x = Tensor::<4>::random([2, 3, 64, 64], Distribution::Uniform(-1.0, 1.0), device);
    let DenseOutput::Det { cls, reg } = m.forward(x, true).unwrap() else { panic!() };
    let loss = cls.powi_scalar(2).mean() + reg.powi_scalar(2).mean();
    let grads = GradientsParams::from_grads(loss.backward(), &m);
    (before, AdamWConfig::new().init().step(1e-2, m, grads))
}

#[test]
fn norm_eval_and_frozen_stages() {
    let _g = serial();
    let device = Device::flex().autodiff();
    let cfg = small(Task::SsdLite, 2);
    let m = DenseModel::new(&cfg, None, &device).unwrap().with_frozen_stages(1).with_norm_eval();
    let (before, m) = one_step(m, &device);
    let after = m.state_dict();
    // Frozen: the stem and stage 1 do not move.
    for k in ["backbone.stage0.0.convs.0.0.weight", "backbone.stage1.0.proj.conv.weight"] {
        assert_eq!(get(&before, k), get(&after, k), "{k} moved");
    }
    // Trained: later stages and the head move.
    for k in ["backbone.stage3.1.proj.conv.weight", "bbox_head.cls_convs.0.1.weight"] {
        assert_ne!(get(&before, k), get(&after, k), "{k} did not move");
    }
    // norm_eval: backbone BN statistics stay; the neck's BN (eps 1e-3) does update.
    let bb = "backbone.stage3.1.conv_local.norm.running_mean";
    assert_eq!(get(&before, bb), get(&after, bb));
    let neck = "neck.extra_layers.0.0.bn.running_mean";
    assert_ne!(get(&before, neck), get(&after, neck));
    let DenseHead::Ssd(h) = &m.head else { panic!() };
    assert_eq!(h.extra[0].bn.as_ref().unwrap().epsilon, 1e-3);

    // Frozen stages without norm_eval: their BN statistics stay (mmdet puts them in eval
    // mode), later stages' statistics update.
    let (before, m) = one_step(DenseModel::new(&cfg, None, &device).unwrap().with_frozen_stages(1), &device);
    let after = m.state_dict();
    for k in ["backbone.stage0.0.convs.0.1.running_mean", "backbone.stage1.0.conv_local.norm.running_var"] {
        assert_eq!(get(&before, k), get(&after, k), "{k} moved");
    }
    assert_ne!(get(&before, bb), get(&after, bb), "{bb} did not update");
}

/// A small real-looking dataset: filled rectangles of 2 classes (red, green) with masks, in
/// COCO and mask-folder layout.
fn synthetic_set(dir: &Path, n_train: usize, n_val: usize) {
    let mut seed = 7u64;
    let mut rnd = |m: u64| {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) % m
    };
    for (split, n) in [("train", n_train), ("val", n_val)] {
        std::fs::create_dir_all(dir.join("images").join(split)).unwrap();
        std::fs::create_dir_all(dir.join("labels").join(split)).unwrap();
        std::fs::create_dir_all(dir.join("annotations")).unwrap();
        let (mut images, mut anns) = (vec![], vec![]);
        for i in 0..n {
            let mut img = image::RgbImage::from_pixel(64, 64, image::Rgb([90, 90, 90]));
            let mut lab = image::GrayImage::new(64, 64);
            let c = rnd(2) as u32;
            let (w, h) = (16 + rnd(24) as u32, 16 + rnd(24) as u32);
            let (x0, y0) = (rnd((64 - w) as u64) as u32, rnd((64 - h) as u64) as u32);
            for y in y0..y0 + h {
                for x in x0..x0 + w {
                    img.put_pixel(x, y, image::Rgb(if c == 0 { [220, 40, 40] } else { [40, 220, 40] }));
                    lab.put_pixel(x, y, image::Luma([c as u8 + 1]));
                }
            }
            let f = format!("{i:04}.png");
            img.save(dir.join("images").join(split).join(&f)).unwrap();
            lab.save(dir.join("labels").join(split).join(&f)).unwrap();
            images.push(serde_json::json!({"id": i + 1, "file_name": f, "width": 64, "height": 64}));
            anns.push(serde_json::json!({"id": i + 1, "image_id": i + 1, "category_id": c + 1,
                "bbox": [x0, y0, w, h], "area": w * h, "iscrowd": 0}));
        }
        let cats = serde_json::json!([{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]);
        let coco = serde_json::json!({"images": images, "annotations": anns, "categories": cats});
        std::fs::write(dir.join(format!("annotations/instances_{split}.json")), coco.to_string()).unwrap();
    }
    std::fs::write(dir.join("classes.txt"), "background\nred\ngreen\n").unwrap();
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("emo-dense-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn cfg(task: Task, data: &Path) -> DenseTrainConfig {
    let mut c = DenseTrainConfig::new(task, Variant::Emo1M, data.to_path_buf(), (64, 64));
    (c.epochs, c.batch, c.lr, c.warmup_iters) = (2, 8, 2e-3, 2);
    // Detection learns visibly in 2 tiny epochs only without random crops; segmentation keeps
    // the paper's geometric augmentation, so resume is checked with it too.
    c.geometric_augment = !task.is_detection();
    c
}

/// A trainer that prints nothing.
fn quiet(t: Result<DenseTrainer, DenseError>) -> DenseTrainer {
    let mut t = t.unwrap();
    t.verbose = false;
    t
}

#[test]
fn training_resumes_exactly_and_learns() {
    let _g = serial();
    let data = tmp("data");
    synthetic_set(&data, 24, 8);
    for task in [Task::SsdLite, Task::DeepLabV3] {
        let device = Device::flex().autodiff();
        let (a, b) = (tmp(&format!("{task}-a")), tmp(&format!("{task}-b")));
        // DeepLabv3 (with its dropout) on two data-parallel replicas, SSDLite on one.
        let mut c = cfg(task, &data);
        c.workers = if task == Task::DeepLabV3 { 2 } else { 1 };
        if task == Task::DeepLabV3 {
            // 16 of the 24 images per epoch: epoch 2 (the resumed one) crosses into the
            // stream's second pass.
            c.epoch_images = 16;
            // and keeps an EMA of its weights, which must resume exactly too.
            c.ema_decay = 0.9;
        }
        let mut t = quiet(DenseTrainer::new(c.clone(), &a, device.clone()));
        // By default a split this small (far below `STREAM_ABOVE_BYTES` decoded) is held in memory.
        assert!(c.stream.is_none() && !t.streams());
        let full = t.run(None).unwrap();
        // The twin reads its images (training and validation) another way in each half: decoded
        // in memory for one epoch, then streamed from disk on resume (SSDLite), or the other way
        // round (DeepLabv3); neither the weights nor the evaluations may notice.
        let streamed_first = task == Task::DeepLabV3;
        let mut cb = c.clone();
        cb.stream = Some(streamed_first);
        let first = quiet(DenseTrainer::new(cb, &b, device.clone()));
        assert_eq!((first.streams(), first.streams_val()), (streamed_first, streamed_first));
        let mut first = first;
        let head = first.run(Some(1)).unwrap();
        let resumed = quiet(DenseTrainer::resume_with(&b, device.clone(), Some(!streamed_first)));
        assert_eq!((resumed.streams(), resumed.streams_val()), (!streamed_first, !streamed_first));
        let mut resumed = resumed;
        let rest = resumed.run(None).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(full[1].train_loss, rest[0].train_loss, "{task}: resumed loss differs");
        for (x, y) in full.iter().zip(head.iter().chain(&rest)) {
            let evals = |m: &emo_dense::train::DenseEpoch| format!("{:?}", (m.coco, m.seg, m.ema_coco, m.ema_seg));
            assert_eq!(evals(x), evals(y), "{task}: evaluation of epoch {} differs", x.epoch);
        }
        let (ma, mb) = (
            std::fs::read(a.join("checkpoint/model.safetensors")).unwrap(),
            std::fs::read(b.join("checkpoint/model.safetensors")).unwrap(),
        );
        assert!(ma == mb, "{task}: resumed weights differ");
        if task == Task::DeepLabV3 {
            let ema = |d: &Path| std::fs::read(d.join("checkpoint/ema.safetensors")).unwrap();
            assert!(ema(&a) == ema(&b), "resumed EMA differs");
            assert!(ema(&a) != ma, "EMA equals the raw weights");
            assert!(full.iter().chain(&rest).all(|m| m.ema_seg.is_some()), "EMA not evaluated: {full:?}");
            let e = emo_weights::load(a.join("checkpoint/ema.safetensors")).unwrap();
            let w = emo_weights::load(a.join("checkpoint/model.safetensors")).unwrap();
            assert_eq!(e.tensors.keys().collect::<Vec<_>>(), w.tensors.keys().collect::<Vec<_>>());
        } else {
            assert!(!a.join("checkpoint/ema.safetensors").exists() && full[0].ema_coco.is_none());
        }
        assert!(a.join("best.safetensors").exists() && a.join("model.json").exists());
        assert!(full[1].train_loss < full[0].train_loss, "{task}: loss did not go down: {full:?}");
        // A run folder is never overwritten.
        assert!(DenseTrainer::new(c, &a, device).is_err());
        let _ = std::fs::remove_dir_all(&a);
        let _ = std::fs::remove_dir_all(&b);
    }
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn a_run_fine_tunes_a_trained_model() {
    let _g = serial();
    let data = tmp("ft-data");
    synthetic_set(&data, 16, 8);
    let device = Device::flex().autodiff();
    let (src, same, renamed, wrong) = (tmp("ft-src"), tmp("ft-same"), tmp("ft-renamed"), tmp("ft-wrong"));
    let mut c = cfg(Task::SsdLite, &data);
    c.epochs = 1;
    quiet(DenseTrainer::new(c.clone(), &src, device.clone())).run(None).unwrap();
    let best = src.join("best.safetensors");
    let trained = emo_weights::load(&best).unwrap();
    // The same classes: the run starts from every trained weight, with the paper's settings
    // for a pretrained backbone, and trains on.
    let ft = c.clone().with_init_weights(best.clone());
    assert!(ft.norm_eval && ft.backbone_weights.is_none());
    let t = quiet(DenseTrainer::new(ft.clone(), &same, device.clone()));
    assert!(t.init_note.as_deref().unwrap().contains("the classifiers too"), "{:?}", t.init_note);
    assert_eq!(t.model().state_dict(), trained);
    // Two epochs, the run killed after the first and resumed once the weights it started from
    // are gone (a resume reads its checkpoint only): the same as the uninterrupted run.
    let copy = tmp("ft-copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["best.safetensors", "model.json"] {
        std::fs::copy(src.join(f), copy.join(f)).unwrap();
    }
    let two = DenseTrainConfig { epochs: 2, ..ft.clone() };
    let whole = quiet(DenseTrainer::new(two.clone(), same.join("whole"), device.clone())).run(None).unwrap();
    let cut = same.join("cut");
    let from_copy = DenseTrainConfig { init_weights: Some(copy.join("best.safetensors")), ..two };
    quiet(DenseTrainer::new(from_copy, &cut, device.clone())).run(Some(1)).unwrap();
    std::fs::remove_dir_all(&copy).unwrap();
    let rest = quiet(DenseTrainer::resume(&cut, device.clone())).run(None).unwrap();
    assert_eq!((rest.len(), rest[0].train_loss), (1, whole[1].train_loss));
    assert_eq!(format!("{:?}", rest[0].coco), format!("{:?}", whole[1].coco));
    let read = |d: &Path| std::fs::read(d.join("checkpoint/model.safetensors")).unwrap();
    assert!(read(&cut) == read(&same.join("whole")), "the resumed fine-tune differs");
    // Classes under other names: the classifiers start afresh, the rest as trained.
    let other = tmp("ft-other");
    synthetic_set(&other, 16, 8);
    for split in ["train", "val"] {
        let p = other.join(format!("annotations/instances_{split}.json"));
        std::fs::write(&p, std::fs::read_to_string(&p).unwrap().replace("\"red\"", "\"crimson\"")).unwrap();
    }
    let ft_other = DenseTrainConfig { data: other.clone(), ..ft.clone() };
    let t = quiet(DenseTrainer::new(ft_other, &renamed, device.clone()));
    let note = t.init_note.clone().unwrap();
    let want =
        "laid out for the 2 classes here, the 1 the model knows by name keeping their rows, the others starting afresh";
    assert!(note.contains(want), "{note}");
    let fresh = t.card.model.classifier_keys();
    for (k, v) in &t.model().state_dict().tensors {
        if !fresh.contains(k) {
            assert_eq!(v, trained.get(k).unwrap(), "{k}");
        } else if k.ends_with(".weight") {
            // (A bias starts at 0 and may still be 0 where no anchor of its level learned.)
            assert_ne!(v, trained.get(k).unwrap(), "{k}");
        }
    }
    // An official COCO checkpoint (no model card: inferred from its layout) fine-tuned to this
    // data's two classes.
    let official = tmp("ft-official");
    std::fs::create_dir_all(&official).unwrap();
    let coco = DenseConfig::paper(Task::SsdLite, Variant::Emo1M);
    let coco_sd = DenseModel::new(&coco, None, &Device::flex()).unwrap().state_dict();
    emo_weights::save_safetensors(&coco_sd, official.join("ssdlite_coco.safetensors")).unwrap();
    let ft_coco = DenseTrainConfig { init_weights: Some(official.join("ssdlite_coco.safetensors")), ..ft.clone() };
    // Its card, as the CLI reads it to pick the variant: inferred; a run's: read from beside it.
    let coco_card = emo_dense::train::ModelCard::of_weights(&official.join("ssdlite_coco.safetensors")).unwrap();
    assert_eq!(coco_card, emo_dense::train::ModelCard::infer(&coco_sd).unwrap());
    assert_eq!(
        emo_dense::train::ModelCard::of_weights(&best).unwrap().model,
        DenseTrainer::resume(&src, device.clone()).unwrap().card.model
    );
    let t = quiet(DenseTrainer::new(ft_coco, official.join("run"), device.clone()));
    let note = t.init_note.clone().unwrap();
    let want = "start afresh (2 classes here, none of them the model's)";
    assert!(note.contains("(ssdlite on emo-1m, 80 classes)") && note.contains(want), "{note}");
    assert_eq!(
        get(&t.model().state_dict(), "backbone.stage4.2.proj.conv.weight"),
        get(&coco_sd, "backbone.stage4.2.proj.conv.weight")
    );
    // Another task's run, or weights and backbone weights together: refused before a run folder
    // is made.
    let retina = DenseTrainConfig { task: Task::RetinaNet, ..ft.clone() };
    let e = DenseTrainer::new(retina, &wrong, device.clone()).err().unwrap().to_string();
    assert!(e.contains("a ssdlite model; a retinanet run fine-tunes a retinanet model"), "{e}");
    let both = DenseTrainConfig { backbone_weights: Some(best.clone()), ..ft };
    let e = DenseTrainer::new(both, &wrong, device).err().unwrap().to_string();
    assert!(e.contains("one or the other"), "{e}");
    assert!(!wrong.exists());
    for d in [data, other, src, same, renamed, official] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A DeepLabv3 run with the semantic-encoding loss and label smoothing: the training-only
/// `decode_head.se_layer` is in the checkpoint (raw and EMA) and trains, resume continues
/// exactly, and `best.safetensors` is the plain model, which loads strictly for inference.
#[test]
fn se_loss_layer_trains_resumes_and_stays_out_of_the_exported_weights() {
    let _g = serial();
    let data = tmp("data-se");
    synthetic_set(&data, 24, 8);
    let device = Device::flex().autodiff();
    let (a, b) = (tmp("se-a"), tmp("se-b"));
    let mut c = cfg(Task::DeepLabV3, &data);
    (c.epoch_images, c.ema_decay, c.se_weight, c.label_smoothing) = (16, 0.9, 0.2, 0.1);
    let full = quiet(DenseTrainer::new(c.clone(), &a, device.clone())).run(None).unwrap();
    quiet(DenseTrainer::new(c.clone(), &b, device.clone())).run(Some(1)).unwrap();
    let se = |d: &Path, file: &str| {
        let sd = emo_weights::load(d.join(file)).unwrap();
        sd.get("decode_head.se_layer.weight").map(|t| t.as_f32().unwrap().to_vec())
    };
    let after_one = se(&b, "checkpoint/model.safetensors").expect("the checkpoint keeps the SE layer");
    assert_eq!(after_one.len(), 3 * 168, "SE layer: 3 classes x EMO-1M's 168 stage-4 channels");
    assert!(se(&b, "checkpoint/ema.safetensors").is_some());
    let rest = quiet(DenseTrainer::resume(&b, device.clone())).run(None).unwrap();
    assert_eq!(full[1].train_loss, rest[0].train_loss, "resumed loss differs");
    let read = |d: &Path| std::fs::read(d.join("checkpoint/model.safetensors")).unwrap();
    assert!(read(&a) == read(&b), "resumed weights differ");
    assert_ne!(se(&b, "checkpoint/model.safetensors").unwrap(), after_one, "the SE layer did not train");
    // The exported weights are the card's model: no SE layer, strictly loadable.
    let best = emo_weights::load(a.join("best.safetensors")).unwrap();
    assert!(best.tensors.keys().all(|k| !k.starts_with("decode_head.se_layer")));
    let card: emo_dense::train::ModelCard =
        serde_json::from_str(&std::fs::read_to_string(a.join("model.json")).unwrap()).unwrap();
    assert!(!card.model.se_layer);
    DenseModel::from_state_dict(&card.model, &best, &Device::flex()).unwrap();
    // Detection has no SE layer.
    let mut d = cfg(Task::SsdLite, &data);
    d.se_weight = 0.2;
    assert!(DenseTrainer::new(d, tmp("se-det"), device).is_err());
    for dir in [&a, &b, &data] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// EncNet's SE loss is the mean binary cross-entropy of the class-presence logits against the
/// classes each label map holds (255 holds none), in value and gradient.
#[test]
fn se_loss_is_binary_cross_entropy_of_class_presence() {
    use emo_dense::loss::se_loss;
    let device = Device::flex().autodiff();
    let logits = [0.0f32, 2.0, -1.0, 30.0, -3.0, 0.5];
    let x = Tensor::<2>::from_data(TensorData::new(logits.to_vec(), [2, 3]), &device).require_grad();
    // Image 0 holds classes 0 and 2; image 1 class 1 only (and ignored pixels).
    let labels = [0u8, 2, 2, 0, 1, 255, 1, 255];
    let present = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
    let loss = se_loss(x.clone(), &labels);
    let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
    // -log sigmoid(v) = log(1 + exp(-v)), -log(1 - sigmoid(v)) = log(1 + exp(v)): in f64
    // without forming 1 - sigmoid(30).
    let want: f64 = logits
        .iter()
        .zip(present)
        .map(|(&v, y)| y * (-v as f64).exp().ln_1p() + (1.0 - y) * (v as f64).exp().ln_1p())
        .sum::<f64>()
        / 6.0;
    let got = to_vec(loss.clone())[0] as f64;
    assert!((got - want).abs() <= 1e-5 * want, "{got} vs {want}");
    let g = to_vec(x.grad(&loss.backward()).unwrap());
    for ((&v, y), g) in logits.iter().zip(present).zip(g) {
        let want = (sig(v as f64) - y) / 6.0;
        assert!((g as f64 - want).abs() <= 1e-6, "{g} vs {want}");
    }
}

#[test]
fn epochs_of_a_running_shuffle_cover_each_image_once_per_pass() {
    let (n, seed) = (10, 7);
    let stream = stream_order(seed, n, 0, 35);
    for pass in stream.chunks(n) {
        let mut p = pass.to_vec();
        p.sort_unstable();
        p.dedup();
        assert_eq!(p.len(), pass.len(), "an index repeats within a pass: {pass:?}");
        assert!(p.iter().all(|&i| i < n));
    }
    // Any window of the stream is the same slice, whatever epoch size cuts it.
    assert_eq!(stream_order(seed, n, 13, 9), stream[13..22].to_vec());
    assert_eq!(stream_order(seed, n, 4, 25), stream[4..29].to_vec());
    // Passes differ, and the seed matters.
    assert_ne!(stream[..n], stream[n..2 * n]);
    assert_ne!(stream_order(seed + 1, n, 0, n), stream[..n].to_vec());
}

/// The run's `drop_path` and `head_dropout` reach the model it trains, also when resumed; the
/// model card (what inference builds) keeps the variant's configuration; a config.json written
/// before the two fields existed reads as the defaults.
#[test]
fn drop_path_and_head_dropout_reach_the_trained_model() {
    let _g = serial();
    let data = tmp("data-dp");
    synthetic_set(&data, 8, 4);
    let run = tmp("dp-run");
    let _ = std::fs::remove_dir_all(&run);
    let mut c = cfg(Task::DeepLabV3, &data);
    (c.epochs, c.drop_path, c.head_dropout) = (1, Some(0.2), 0.3);
    let seen = |m: &DenseModel| {
        let last = m.backbone.stages.last().unwrap().blocks.last().unwrap().drop_path;
        let DenseHead::Seg(h) = &m.head else { panic!() };
        (last, h.dropout)
    };
    let mut t = DenseTrainer::new(c.clone(), &run, Device::flex().autodiff()).unwrap();
    t.verbose = false;
    assert_eq!(seen(t.model()), (0.2, 0.3));
    assert_eq!(t.card.model.backbone.drop_path, Variant::Emo1M.config().drop_path);
    t.run(None).unwrap();
    let r = DenseTrainer::resume(&run, Device::flex().autodiff()).unwrap();
    assert_eq!(seen(r.model()), (0.2, 0.3));
    let _ = std::fs::remove_dir_all(&run);
    // The defaults: the variant's drop path, mmseg's 0.1.
    let mut d = cfg(Task::DeepLabV3, &data);
    d.epochs = 1;
    let t = DenseTrainer::new(d.clone(), &run, Device::flex().autodiff()).unwrap();
    assert_eq!(seen(t.model()), (Variant::Emo1M.config().drop_path, 0.1));
    let mut old: serde_json::Value = serde_json::to_value(&d).unwrap();
    old.as_object_mut().unwrap().retain(|k, _| k != "drop_path" && k != "head_dropout");
    let back: DenseTrainConfig = serde_json::from_value(old).unwrap();
    assert_eq!(back, d);
    let _ = std::fs::remove_dir_all(&run);
    let _ = std::fs::remove_dir_all(&data);
}

/// `backbone_lr_mult` scales the backbone's learning rate and nothing else: after the same
/// first step (same seed, batch and dropout), every backbone parameter moved exactly half as far
/// at 0.5 as at 1 (AdamW's step, decoupled decay included, is linear in the learning rate), the
/// head's parameters as far; at 0 the backbone did not move at all while the head did.
#[test]
fn backbone_lr_mult_scales_the_backbone_step() {
    let _g = serial();
    let data = tmp("data-lrm");
    synthetic_set(&data, 8, 4);
    // (key, how far each element moved) for each trained parameter (BN running statistics left out).
    let one_step = |mult: f64| {
        let run = tmp(&format!("lrm-{mult}"));
        let _ = std::fs::remove_dir_all(&run);
        let mut c = cfg(Task::DeepLabV3, &data);
        (c.epochs, c.epoch_images, c.backbone_lr_mult) = (1, c.batch, mult);
        let mut t = DenseTrainer::new(c, &run, Device::flex().autodiff()).unwrap();
        t.verbose = false;
        let before = t.model().state_dict();
        t.run(None).unwrap();
        let after = t.model().state_dict();
        let _ = std::fs::remove_dir_all(&run);
        before
            .tensors
            .iter()
            .filter(|(k, _)| !k.contains("running_") && !k.contains("num_batches_tracked"))
            .map(|(k, b)| {
                let (b, a) = (b.as_f32().unwrap(), after.get(k).unwrap().as_f32().unwrap());
                (k.clone(), a.iter().zip(b).map(|(a, b)| a - b).collect())
            })
            .collect::<Vec<(String, Vec<f32>)>>()
    };
    let (full, half, zero) = (one_step(1.0), one_step(0.5), one_step(0.0));
    let (mut bb, mut head) = (0, 0);
    for (((k, d1), (_, dh)), (_, d0)) in full.iter().zip(&half).zip(&zero) {
        let in_backbone = k.starts_with("backbone.");
        let want = if in_backbone { 0.5 } else { 1.0 };
        for ((a, h), z) in d1.iter().zip(dh).zip(d0) {
            assert!((h - want * a).abs() <= 1e-6 + 1e-3 * a.abs(), "{k}: moved {h} at 0.5, {a} at 1");
            if in_backbone {
                assert_eq!(*z, 0.0, "{k} moved at backbone_lr_mult 0");
            } else {
                assert!((z - a).abs() <= 1e-6 + 1e-3 * a.abs(), "{k}: moved {z} at 0, {a} at 1");
            }
        }
        let moved = d1.iter().any(|d| d.abs() > 1e-6);
        bb += (in_backbone && moved) as usize;
        head += (!in_backbone && moved) as usize;
    }
    assert!(bb > 100 && head > 10, "too few parameters moved: {bb} backbone, {head} head");
    // Rejected before anything is written; old config.json files read as 1.
    let mut c = cfg(Task::DeepLabV3, &data);
    c.backbone_lr_mult = -0.5;
    let run = tmp("lrm-bad");
    let _ = std::fs::remove_dir_all(&run);
    assert!(matches!(DenseTrainer::new(c.clone(), &run, Device::flex().autodiff()), Err(DenseError::Data(_))));
    assert!(!run.exists());
    c.backbone_lr_mult = 1.0;
    let mut old: serde_json::Value = serde_json::to_value(&c).unwrap();
    old.as_object_mut().unwrap().remove("backbone_lr_mult");
    assert_eq!(serde_json::from_value::<DenseTrainConfig>(old).unwrap(), c);
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn retinanet_and_pspnet_train_too() {
    let _g = serial();
    let data = tmp("data-rp");
    synthetic_set(&data, 16, 8);
    for task in [Task::RetinaNet, Task::PspNet] {
        let run = tmp(&format!("{task}-run"));
        let mut c = cfg(task, &data);
        c.epochs = 3;
        if task == Task::RetinaNet {
            // the paper's pretrained-backbone settings (here on a random backbone)
            (c.norm_eval, c.frozen_stages) = (true, 1);
        }
        let mut t = DenseTrainer::new(c, &run, Device::flex().autodiff()).unwrap();
        t.verbose = false;
        let m = t.run(None).unwrap();
        assert!(m.iter().all(|e| e.train_loss.is_finite()), "{task}: {m:?}");
        assert!(m[2].train_loss < m[0].train_loss, "{task}: loss did not go down: {m:?}");
        let _ = std::fs::remove_dir_all(&run);
    }
    let _ = std::fs::remove_dir_all(&data);
}

/// A COCO-layout set of rectangles like [`synthetic_set`]'s, on images of several sizes.
fn varied_size_set(dir: &Path, n_train: usize, n_val: usize) {
    let sizes = [(48u32, 64u32), (64, 48), (40, 80), (72, 56), (64, 64), (56, 96)];
    for (split, n) in [("train", n_train), ("val", n_val)] {
        std::fs::create_dir_all(dir.join("images").join(split)).unwrap();
        std::fs::create_dir_all(dir.join("annotations")).unwrap();
        let (mut images, mut anns) = (vec![], vec![]);
        for i in 0..n {
            let (h, w) = sizes[i % sizes.len()];
            let c = (i % 2) as u32;
            let (bw, bh) = (w / 2 - (i as u32 % 5), h / 2 - (i as u32 % 3));
            let (x0, y0) = ((i as u32 * 7) % (w - bw), (i as u32 * 5) % (h - bh));
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                let inside = (x0..x0 + bw).contains(&x) && (y0..y0 + bh).contains(&y);
                image::Rgb(match (inside, c) {
                    (false, _) => [90, 90, 90],
                    (true, 0) => [220, 40, 40],
                    _ => [40, 220, 40],
                })
            });
            let f = format!("{i:04}.png");
            img.save(dir.join("images").join(split).join(&f)).unwrap();
            images.push(serde_json::json!({"id": i + 1, "file_name": f, "width": w, "height": h}));
            anns.push(serde_json::json!({"id": i + 1, "image_id": i + 1, "category_id": c + 1,
                "bbox": [x0, y0, bw, bh], "area": bw * bh, "iscrowd": 0}));
        }
        let cats = serde_json::json!([{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]);
        let coco = serde_json::json!({"images": images, "annotations": anns, "categories": cats});
        std::fs::write(dir.join(format!("annotations/instances_{split}.json")), coco.to_string()).unwrap();
    }
}

/// RetinaNet as mmdet trains it on COCO, at a small scale: every image read at its own size,
/// resized keeping its aspect ratio, flipped, padded to 32 and batched padded to the largest,
/// then evaluated at the same keep-ratio scale padded to 32; it learns, the card says its test
/// scale, and a run stopped after an epoch resumes exactly.
#[test]
fn retinanet_trains_keep_ratio_on_images_of_several_sizes_and_resumes_exactly() {
    let _g = serial();
    let data = tmp("data-kr");
    varied_size_set(&data, 12, 6);
    let mut c = cfg(Task::RetinaNet, &data);
    (c.epochs, c.batch, c.geometric_augment, c.train_scale) = (3, 4, true, Some((96, 64)));
    // Two data-parallel shards, each padded to its own largest image (as mmdet per GPU).
    c.workers = 2;
    let device = Device::flex().autodiff();
    let (a, b) = (tmp("kr-a"), tmp("kr-b"));
    let mut t = quiet(DenseTrainer::new(c.clone(), &a, device.clone()));
    let scale = emo_dense::data::TestScale { scale: (96, 64), keep_ratio: true, pad: 32 };
    assert_eq!(t.card.test_scale, Some(scale));
    assert!(t.streams() && t.streams_val(), "keep-ratio training reads each image from its file");
    let full = t.run(None).unwrap();
    assert!(full.iter().all(|e| e.train_loss.is_finite() && e.coco.is_some()), "{full:?}");
    assert!(full[2].train_loss < full[0].train_loss, "loss did not go down: {full:?}");
    let mut first = quiet(DenseTrainer::new(c.clone(), &b, device.clone()));
    let head = first.run(Some(1)).unwrap();
    let rest = quiet(DenseTrainer::resume(&b, device.clone())).run(None).unwrap();
    let evals = |m: &emo_dense::train::DenseEpoch| format!("{:?}", (m.train_loss, m.coco));
    assert_eq!(full.iter().map(evals).collect::<Vec<_>>(), head.iter().chain(&rest).map(evals).collect::<Vec<_>>());
    let w = |d: &Path| std::fs::read(d.join("checkpoint/model.safetensors")).unwrap();
    assert!(w(&a) == w(&b), "resumed weights differ");
    // Each epoch is evaluated at the keep-ratio test scale.
    assert!(matches!(t.val(), DenseData::Det(d) if d.test_scale == Some(scale)));
    // SSDLite trains at its input, as mmdet's recipe.
    let mut ssd = cfg(Task::SsdLite, &data);
    ssd.train_scale = Some((96, 64));
    let err = DenseTrainer::new(ssd, tmp("kr-ssd"), device).err().expect("refused").to_string();
    assert!(err.contains("SSDLite trains at its input"), "{err}");
    for d in [&a, &b, &data] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// The validation split of a [`synthetic_set`] at 64x64 and a fresh small model for `task`
/// (the set's 2 categories; segmentation adds the background).
fn eval_setup(task: Task, data: &Path, device: &Device) -> (DenseData, DenseModel) {
    let split = load_split(task, data, "val", (64, 64), false, false, 0).unwrap();
    let classes = if task.is_detection() { 2 } else { 3 };
    (split, DenseModel::new(&small(task, classes), None, device).unwrap())
}

/// Evaluation split over threads (one contiguous run of batches each) gives exactly the
/// single-thread result: the same confusion matrix, the same COCO numbers, with and without flip.
#[test]
fn evaluation_on_threads_equals_one_thread() {
    use emo_dense::predict::SegAug;
    use emo_dense::train::{Eval, evaluate_on};
    let _g = serial();
    let data = tmp("data-eval");
    // 40 validation images: batches of 16, 16 and 8.
    synthetic_set(&data, 1, 40);
    let device = Device::flex();
    for task in [Task::DeepLabV3, Task::SsdLite] {
        let (split, model) = eval_setup(task, &data, &device);
        let multi = SegAug { flip: true, scales: vec![0.75, 1.25] };
        for aug in [SegAug::flip(false), SegAug::flip(true), multi] {
            let one = evaluate_on(&model, &split, &device, &aug, 1).unwrap();
            for threads in [2, 3, 5] {
                let many = evaluate_on(&model, &split, &device, &aug, threads).unwrap();
                match (&one, &many) {
                    (Eval::Seg(a, ma), Eval::Seg(b, mb)) => {
                        assert_eq!(ma.conf.iter().sum::<u64>(), 40 * 64 * 64);
                        assert_eq!(ma.conf, mb.conf, "{task} {aug:?}, {threads} threads");
                        assert_eq!(a, b);
                    }
                    (Eval::Coco(a, ca), Eval::Coco(b, cb)) => {
                        assert_eq!(format!("{a:?} {ca:?}"), format!("{b:?} {cb:?}"), "{task}, {threads} threads");
                    }
                    _ => panic!("{task}: evaluations of different kinds"),
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&data);
}

/// Evaluation through the fast engine (what `emo eval --task` and the trainer use on the CPU)
/// scores what the burn model scores: the same class maps up to pixels where two classes tie
/// within float rounding, the same COCO numbers.
#[test]
fn evaluation_on_the_fast_engine_equals_the_burn_model() {
    use emo_dense::FastDense;
    use emo_dense::predict::SegAug;
    use emo_dense::train::{Eval, evaluate_on};
    let _g = serial();
    let data = tmp("data-fast-eval");
    synthetic_set(&data, 1, 24);
    let device = Device::flex();
    for task in [Task::DeepLabV3, Task::PspNet, Task::SsdLite, Task::RetinaNet] {
        let (split, model) = eval_setup(task, &data, &device);
        let fast = FastDense::from_model(&model).unwrap();
        for aug in [SegAug::flip(false), SegAug { flip: true, scales: vec![0.75, 1.25] }] {
            if task.is_detection() && aug != SegAug::flip(false) {
                continue;
            }
            let burn = evaluate_on(&model, &split, &device, &aug, 1).unwrap();
            let ours = evaluate_on(&fast, &split, &device, &aug, 1).unwrap();
            match (&burn, &ours) {
                (Eval::Seg(a, ma), Eval::Seg(b, mb)) => {
                    let total: u64 = ma.conf.iter().sum();
                    let diff: u64 = ma.conf.iter().zip(&mb.conf).map(|(x, y)| x.abs_diff(*y)).sum();
                    assert!(diff * 10_000 <= total, "{task} {aug:?}: {diff} of {total} counts differ");
                    assert!((a.miou - b.miou).abs() < 0.01, "{task} {aug:?}: {a:?} against {b:?}");
                }
                (Eval::Coco(a, _), Eval::Coco(b, _)) => {
                    for (x, y) in a.as_array().iter().zip(b.as_array()) {
                        assert!((x - y).abs() < 1e-3, "{task}: {a:?} against {b:?}");
                    }
                }
                _ => panic!("{task}: evaluations of different kinds"),
            }
        }
    }
    let _ = std::fs::remove_dir_all(&data);
}

/// mIoU is computed on each label map at its original size, as mmseg does: an evaluation split
/// keeps the original maps where they differ from the input (a training split does not), the
/// class maps are the logits at the input size resized bilinearly once more to the original size
/// (softmax after that resize under flip), and the confusion matrix counts the original pixels.
#[test]
fn segmentation_is_scored_on_the_label_maps_at_their_original_size() {
    use burn::tensor::activation::softmax;
    use emo_dense::loss::resize_logits;
    use emo_dense::predict::{batch_tensor, segment_sized, segment_with};
    use emo_dense::train::{Eval, evaluate_on};

    let _g = serial();
    let data = tmp("data-full");
    // 20 validation maps of 64x64, evaluated at a smaller, non-square input.
    synthetic_set(&data, 2, 20);
    let input = (48, 40);
    let seg = |split: &str, input, training| match load_split(Task::DeepLabV3, &data, split, input, training, false, 0)
    {
        Ok(DenseData::Seg(d)) => d,
        other => panic!("{other:?}"),
    };
    let val = seg("val", input, false);
    assert!(seg("train", input, true).images.iter().all(|i| i.full.is_none()));
    assert!(seg("val", (64, 64), false).images.iter().all(|i| i.full.is_none()));
    for img in &val.images {
        let png = image::open(data.join("labels/val").join(img.file.as_str())).unwrap().to_luma8().into_raw();
        let f = img.full.as_ref().unwrap();
        assert_eq!((f.h, f.w), (64, 64));
        assert!(f.data == png, "{}", img.file);
        assert_eq!(img.label.len(), 48 * 40);
        assert_eq!(img.eval_label(input), (png.as_slice(), (64, 64)));
    }
    let device = Device::flex();
    let model = DenseModel::new(&small(Task::DeepLabV3, 3), None, &device).unwrap();
    let logits = |x: Tensor<4>| match model.forward(x, false).unwrap() {
        DenseOutput::Seg { logits, .. } => resize_logits(logits, input),
        _ => panic!(),
    };
    for flip in [false, true] {
        let mut conf = vec![0u64; 9];
        for chunk in val.images.chunks(16) {
            let x = batch_tensor(&chunk.iter().map(|i| i.rgb.as_slice()).collect::<Vec<_>>(), input, &device);
            let (plain, mirrored) = (logits(x.clone()), logits(x.clone().flip([3])).flip([3]));
            for (i, img) in chunk.iter().enumerate() {
                let at = |t: &Tensor<4>| resize_logits(t.clone().narrow(0, i, 1), (64, 64));
                let pred = if flip {
                    argmax_map(softmax(at(&plain), 1) + softmax(at(&mirrored), 1))
                } else {
                    argmax_map(at(&plain))
                };
                let label = &img.full.as_ref().unwrap().data;
                for (&p, &l) in pred.iter().zip(label) {
                    conf[l as usize * 3 + p as usize] += 1;
                }
            }
            // Sizes equal to the input give segment_with's maps, also next to other sizes.
            let mut sizes = vec![(64, 64); chunk.len()];
            sizes[0] = input;
            assert!(
                segment_sized(&model, x.clone(), flip, &sizes).unwrap()[0] == segment_with(&model, x, flip).unwrap()[0]
            );
        }
        let aug = emo_dense::predict::SegAug::flip(flip);
        let Eval::Seg(_, m) = evaluate_on(&model, &DenseData::Seg(val.clone()), &device, &aug, 2).unwrap() else {
            panic!()
        };
        assert_eq!(conf.iter().sum::<u64>(), 20 * 64 * 64);
        assert_eq!(m.conf, conf, "flip {flip}");
    }
    let _ = std::fs::remove_dir_all(&data);
}

/// Precise BN: the stem BatchNorm's running statistics become the mean over the shards of the
/// batch mean and biased variance of the stem conv's output (computed here with burn's conv2d);
/// images beyond whole shards are left out; every other tensor but the running statistics is
/// unchanged; the deeper BatchNorms move off their initial 0 / 1.
#[test]
fn precise_bn_sets_the_mean_of_the_shards_batch_statistics() {
    use burn::tensor::module::conv2d;
    use burn::tensor::ops::ConvOptions;
    use emo_dense::bn::precise_bn;
    use emo_dense::predict::batch_tensor;

    let _g = serial();
    let device = Device::flex().autodiff();
    let model = DenseModel::new(&small(Task::DeepLabV3, 3), None, &device).unwrap();
    let mut seed = 11u64;
    let images: Vec<Vec<u8>> = (0..14)
        .map(|_| {
            (0..64 * 64 * 3)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (seed >> 56) as u8
                })
                .collect()
        })
        .collect();
    let refs: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
    let before = model.state_dict();
    let after = precise_bn(&model, &refs, (64, 64), 4, &device).unwrap();
    // The stem conv (3x3, stride 2, padding 1, with a bias) and its BatchNorm.
    let plain = Device::flex();
    let w = before.get("backbone.stage0.0.convs.0.0.weight").unwrap();
    let w = Tensor::<4>::from_data(
        burn::tensor::TensorData::new(w.as_f32().unwrap().to_vec(), [w.shape[0], w.shape[1], w.shape[2], w.shape[3]]),
        &plain,
    );
    let b = before.get("backbone.stage0.0.convs.0.0.bias").unwrap().as_f32().unwrap().to_vec();
    let b = Tensor::<1>::from_data(burn::tensor::TensorData::new(b.clone(), [b.len()]), &plain);
    let c = w.dims()[0];
    // The stem BatchNorm's expected statistics: the mean over the shards of each shard's own.
    let expect = |shards: Vec<Tensor<4>>| {
        let (mut mean, mut var) = (vec![0f64; c], vec![0f64; c]);
        let k = shards.len() as f64;
        for x in shards {
            let y = conv2d(x, w.clone(), Some(b.clone()), ConvOptions::new([2, 2], [1, 1], [1, 1], 1));
            let [n, _, h, wd] = y.dims();
            let y = to_vec(y);
            for ch in 0..c {
                let vals: Vec<f64> = (0..n)
                    .flat_map(|i| y[(i * c + ch) * h * wd..(i * c + ch + 1) * h * wd].iter().map(|&v| v as f64))
                    .collect();
                let m = vals.iter().sum::<f64>() / vals.len() as f64;
                mean[ch] += m / k;
                var[ch] += vals.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / vals.len() as f64 / k;
            }
        }
        (mean, var)
    };
    let check = |after: &StateDict, (mean, var): (Vec<f64>, Vec<f64>)| {
        let got = |k: &str| after.get(&format!("backbone.stage0.0.convs.0.1.{k}")).unwrap().as_f32().unwrap().to_vec();
        for (what, ours, want) in [("mean", got("running_mean"), mean), ("var", got("running_var"), var)] {
            let scale = want.iter().fold(1e-3f64, |a, v| a.max(v.abs()));
            for (ch, (o, w)) in ours.iter().zip(&want).enumerate() {
                assert!((*o as f64 - w).abs() <= 1e-4 * scale, "running {what} of channel {ch}: {o} against {w}");
            }
        }
    };
    // 3 whole shards of 4; the last 2 images are not used.
    check(&after, expect(refs.chunks_exact(4).map(|s| batch_tensor(s, (64, 64), &plain)).collect()));
    // Images of their own sizes: each shard zero-padded to its largest, rounded up to 16.
    let sizes: Vec<(usize, usize)> =
        (0..14).map(|i| [(40, 40), (24, 56), (40, 24), (24, 24), (64, 64)][i % 5]).collect();
    let cropped: Vec<Vec<u8>> = images.iter().zip(&sizes).map(|(im, &(h, w))| im[..h * w * 3].to_vec()).collect();
    let crefs: Vec<&[u8]> = cropped.iter().map(Vec::as_slice).collect();
    let sized = emo_dense::bn::precise_bn_sized(&model, &crefs, &sizes, 16, 4, &device).unwrap();
    let shards: Vec<Tensor<4>> = (0..3)
        .map(|s| {
            let sz = &sizes[s * 4..s * 4 + 4];
            let hw = sz.iter().fold((0, 0), |a, x| (a.0.max(x.0.div_ceil(16) * 16), a.1.max(x.1.div_ceil(16) * 16)));
            emo_dense::predict::batch_tensor_padded(&crefs[s * 4..s * 4 + 4], sz, hw, &plain)
        })
        .collect();
    assert_eq!(shards[0].dims()[2..], [48, 64], "the first shard's largest, (40, 56) rounded up to 16");
    check(&sized, expect(shards));
    // Segmentation (no pad): the images in order of size, so that shards of one size pad
    // nothing; here 6 of (24, 56) and 6 of (40, 40), alternating: shards of four (24, 56), two
    // of each (padded to (40, 56)), four (40, 40).
    let sizes: Vec<(usize, usize)> = (0..12).map(|i| [(40, 40), (24, 56)][i % 2]).collect();
    let cropped: Vec<Vec<u8>> = images.iter().zip(&sizes).map(|(im, &(h, w))| im[..h * w * 3].to_vec()).collect();
    let crefs: Vec<&[u8]> = cropped.iter().map(Vec::as_slice).collect();
    let sorted = emo_dense::bn::precise_bn_sized(&model, &crefs, &sizes, 1, 4, &device).unwrap();
    let order: Vec<usize> = [1, 3, 5, 7, 9, 11, 0, 2, 4, 6, 8, 10].to_vec();
    let shards: Vec<Tensor<4>> = order
        .chunks_exact(4)
        .map(|idx| {
            let (imgs, sz): (Vec<&[u8]>, Vec<(usize, usize)>) = idx.iter().map(|&j| (crefs[j], sizes[j])).unzip();
            let hw = sz.iter().fold((0, 0), |a, x| (a.0.max(x.0), a.1.max(x.1)));
            emo_dense::predict::batch_tensor_padded(&imgs, &sz, hw, &plain)
        })
        .collect();
    assert_eq!([shards[0].dims()[2..].to_vec(), shards[1].dims()[2..].to_vec()], [vec![24, 56], vec![40, 56]]);
    check(&sorted, expect(shards));
    for (k, t) in &before.tensors {
        if !k.contains(".running_") {
            assert!(after.get(k) == Some(t), "{k} changed");
        }
    }
    // A deep BatchNorm's statistics leave the fresh model's 0 / 1 (nearly all channels: one may
    // land near 1 by chance).
    for (s, init) in [("running_mean", 0.0f32), ("running_var", 1.0)] {
        let deep = after.get(&format!("decode_head.bottleneck.bn.{s}")).unwrap().as_f32().unwrap();
        let moved = deep.iter().filter(|&&v| (v - init).abs() > 1e-4).count();
        assert!(moved * 10 >= deep.len() * 9, "{s}: {moved} of {} moved: {deep:?}", deep.len());
    }
}

#[test]
fn bad_data_is_skipped_and_counted_or_rejected() {
    let _g = serial();
    let data = tmp("bad");
    synthetic_set(&data, 6, 2);
    let json = data.join("annotations/instances_train.json");
    let mut coco: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let anns = coco["annotations"].as_array_mut().unwrap();
    anns.push(serde_json::json!({"id": 90, "image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5]}));
    anns.push(serde_json::json!({"id": 91, "image_id": 2, "category_id": 1, "bbox": [70, 70, 5, 5]}));
    anns.push(serde_json::json!({"id": 92, "image_id": 3, "category_id": 1, "bbox": [60, 60, 10, 10]}));
    anns.push(serde_json::json!({"id": 93, "image_id": 77, "category_id": 1, "bbox": [1, 1, 5, 5]}));
    anns.push(serde_json::json!({"id": 94, "image_id": 4, "category_id": 1, "bbox": [1, 1, 0, 5]}));
    std::fs::write(&json, coco.to_string()).unwrap();
    std::fs::write(data.join("images/train/0005.png"), b"not a png").unwrap();
    let d = load_split(Task::SsdLite, &data, "train", (64, 64), true, false, 0).unwrap();
    let DenseData::Det(det) = &d else { panic!() };
    let s = &det.skipped;
    assert_eq!(
        (
            s.unknown_category,
            s.box_outside_image,
            s.clipped_box,
            s.unknown_image,
            s.degenerate_box,
            s.unreadable_images
        ),
        (1, 1, 1, 1, 1, 1),
        "{s:?}"
    );
    assert_eq!(det.images.len(), 5);
    assert!(d.skipped_warning().unwrap().contains("1 unreadable images"));
    // A corrupt annotation file and label values beyond the classes are errors that say where.
    std::fs::write(&json, b"{\"images\": [").unwrap();
    let e = load_split(Task::SsdLite, &data, "train", (64, 64), true, false, 0).unwrap_err();
    assert!(matches!(e, DenseError::Data(_)) && e.to_string().contains("instances_train.json"), "{e}");
    let mut lab = image::GrayImage::new(64, 64);
    lab.put_pixel(3, 3, image::Luma([7]));
    lab.save(data.join("labels/val/0001.png")).unwrap();
    let e = load_split(Task::DeepLabV3, &data, "val", (64, 64), false, false, 0).unwrap_err().to_string();
    assert!(e.contains("0001.png") && e.contains("label 7"), "{e}");
    // A streamed split checks its label maps when it is indexed, not mid-run.
    let e = index_split(Task::DeepLabV3, &data, "val", (64, 64), false, false, 0).unwrap_err().to_string();
    assert!(e.contains("0001.png") && e.contains("label 7"), "{e}");
    let _ = std::fs::remove_dir_all(&data);
}

/// A streamed split holds no pixels, reads an image's header to skip and count unreadable ones
/// as a decoded split does, decodes each image as the decoded split holds it, evaluates to the
/// same numbers, and a training image that stops decoding mid-run is left out of its batch while
/// the run goes on.
#[test]
fn streamed_splits_decode_what_loaded_splits_hold() {
    let _g = serial();
    let data = tmp("stream");
    synthetic_set(&data, 16, 4);
    std::fs::write(data.join("images/train/0005.png"), b"not a png").unwrap();
    for task in [Task::SsdLite, Task::DeepLabV3] {
        let loaded = load_split(task, &data, "train", (48, 40), true, false, 0).unwrap();
        let streamed = index_split(task, &data, "train", (48, 40), true, false, 0).unwrap();
        assert!(!loaded.streamed() && streamed.streamed());
        assert_eq!(loaded.skipped_warning(), streamed.skipped_warning(), "{task}");
        assert!(streamed.skipped_warning().unwrap().contains("1 unreadable images"), "{task}");
        assert_eq!(loaded.len(), streamed.len());
        assert_eq!(loaded.decoded_bytes(), streamed.decoded_bytes());
        match (&loaded, &streamed) {
            (DenseData::Det(l), DenseData::Det(s)) => {
                assert!(s.images.iter().all(|i| i.rgb.is_empty()));
                for i in 0..l.images.len() {
                    assert_eq!(l.rgb(i).unwrap(), s.rgb(i).unwrap(), "image {i}");
                    assert_eq!((&l.images[i].boxes, l.images[i].orig), (&s.images[i].boxes, s.images[i].orig));
                }
                assert_eq!(l.gt, s.gt);
            }
            (DenseData::Seg(l), DenseData::Seg(s)) => {
                assert!(s.images.iter().all(|i| i.rgb.is_empty() && i.label.is_empty()));
                for i in 0..l.images.len() {
                    assert_eq!(l.pair(i).unwrap(), s.pair(i).unwrap(), "image {i}");
                }
            }
            _ => unreachable!(),
        }
    }
    // Evaluation: a streamed split, decoded batch by batch on the evaluating threads, scores
    // exactly as the split decoded in memory for evaluation, against the label maps at their
    // original size (64x64 here, the segmentation input 48x40) and with the same detections.
    use emo_dense::predict::SegAug;
    use emo_dense::train::{Eval, detections_on, evaluate_on};
    let device = Device::flex();
    for task in [Task::SsdLite, Task::DeepLabV3] {
        let (_, model) = eval_setup(task, &data, &device);
        let input = if task.is_detection() { (64, 64) } else { (48, 40) };
        let loaded = load_split(task, &data, "val", input, false, false, 0).unwrap();
        let streamed = index_split(task, &data, "val", input, false, false, 0).unwrap();
        let aug = SegAug::flip(true);
        let (a, b) = (
            evaluate_on(&model, &loaded, &device, &aug, 2).unwrap(),
            evaluate_on(&model, &streamed, &device, &aug, 2).unwrap(),
        );
        match (&a, &b) {
            (Eval::Seg(sa, ma), Eval::Seg(sb, mb)) => {
                assert_eq!(ma.conf.iter().sum::<u64>(), 4 * 64 * 64);
                assert_eq!((sa, &ma.conf), (sb, &mb.conf));
            }
            (Eval::Coco(..), Eval::Coco(..)) => {
                assert_eq!(format!("{a:?}"), format!("{b:?}"));
                let (DenseData::Det(l), DenseData::Det(s)) = (&loaded, &streamed) else { unreachable!() };
                let dets = detections_on(&model, l, &device, 2).unwrap();
                assert!(!dets.is_empty());
                assert_eq!(format!("{dets:?}"), format!("{:?}", detections_on(&model, s, &device, 2).unwrap()));
            }
            _ => panic!("{task}: evaluations of different kinds"),
        }
        // A file that no longer decodes when its batch comes is an error that names it.
        let png = data.join("images/val/0002.png");
        let keep = std::fs::read(&png).unwrap();
        std::fs::write(&png, b"truncated").unwrap();
        let e = evaluate(&model, &streamed, &device).unwrap_err().to_string();
        assert!(e.contains("0002.png"), "{e}");
        std::fs::write(&png, keep).unwrap();
    }
    // Mid-run: an image that decoded when the split was indexed and no longer does. A training
    // image is left out of its batch; a validation image stops the run with an error naming it,
    // after the epoch is saved, and the run resumes once the file is back.
    let run = tmp("stream-run");
    let mut c = cfg(Task::DeepLabV3, &data);
    // One batch of all 15 readable images, so the one that breaks is in it.
    (c.stream, c.epochs, c.batch) = (Some(true), 2, 15);
    let mut t = quiet(DenseTrainer::new(c, &run, Device::flex().autodiff()));
    let (train_png, val_png) = (data.join("images/train/0003.png"), data.join("images/val/0001.png"));
    let keep = [std::fs::read(&train_png).unwrap(), std::fs::read(&val_png).unwrap()];
    std::fs::write(&train_png, b"truncated").unwrap();
    std::fs::write(&val_png, b"truncated").unwrap();
    let e = t.run(None).unwrap_err().to_string();
    assert!(e.contains("0001.png") && e.contains("epoch 1 is trained and saved"), "{e}");
    for (p, bytes) in [&train_png, &val_png].into_iter().zip(keep) {
        std::fs::write(p, bytes).unwrap();
    }
    let mut t = quiet(DenseTrainer::resume(&run, Device::flex().autodiff()));
    assert_eq!(t.state.epoch, 1);
    let m = t.run(None).unwrap();
    assert_eq!(m.len(), 1);
    assert!(m[0].epoch == 2 && m[0].train_loss.is_finite() && m[0].seg.is_some(), "{m:?}");
    let _ = std::fs::remove_dir_all(&run);
    let _ = std::fs::remove_dir_all(&data);
}

/// A stride-1 "same" dilated conv whose off-centre taps read only zero padding (the ASPP
/// branches on a small stage-4 map) is computed on its live taps alone: the same outputs and the
/// same gradients (exactly zero on the dead taps) as burn's full dilated conv, whether all, some
/// or none of the off-centre rows and columns are dead.
#[test]
fn dilated_conv_on_its_live_taps_matches_the_full_conv() {
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    use emo_dense::model::ConvModule;
    use emo_spec::HeadAct;

    let _g = serial();
    let device = Device::flex().autodiff();
    // (H, W, dilation, groups): all dead, rows dead, columns dead, none dead, dead at exactly
    // d == H; and depthwise 3x3 convs (SSDLite's head) on 1x1 and 1x3 maps.
    let cases = [(6, 6, 12, 1), (6, 16, 12, 1), (16, 6, 12, 1), (16, 16, 12, 1), (12, 12, 12, 1), (4, 5, 36, 1)];
    for (h, w, d, groups) in cases.into_iter().chain([(1, 1, 1, 4), (1, 3, 1, 4)]) {
        let cin = if groups == 1 { 5 } else { 4 };
        let conv = Conv2dConfig::new([cin, 4], [3, 3])
            .with_dilation([d, d])
            .with_groups(groups)
            .with_padding(PaddingConfig2d::Explicit(d, d, d, d))
            .init(&device);
        let m = ConvModule { conv, bn: None, act: HeadAct::None };
        let x = Tensor::<4>::random([2, cin, h, w], Distribution::Uniform(-1.0, 1.0), &device).require_grad();
        let probe = Tensor::<4>::random([2, 4, h, w], Distribution::Uniform(-1.0, 1.0), &device);
        let fast = m.forward(x.clone());
        let full = m.conv.forward(x.clone());
        assert_eq!(fast.dims(), full.dims());
        let close = |a: Vec<f32>, b: Vec<f64>, what: &str| {
            let err = a.iter().zip(&b).map(|(p, q)| (*p as f64 - q).abs()).fold(0.0, f64::max);
            assert!(err <= 1e-5, "{what} differs by {err} at {h}x{w}, dilation {d}");
        };
        let widen = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
        close(to_vec(fast.clone()), widen(to_vec(full.clone())), "output");
        let gf = (fast * probe.clone()).sum().backward();
        let gr = (full * probe.clone()).sum().backward();
        let w_param = m.conv.weight.val();
        close(to_vec(x.grad(&gf).unwrap()), widen(to_vec(x.grad(&gr).unwrap())), "input gradient");
        // The weight and bias gradients sum 2 * H * W products of magnitude up to ~20, where
        // burn's f32 full conv drifts by up to ~1.2e-5 with its summation order (the live-tap
        // path: ~2e-6); both are checked against exact f64 sums instead.
        let (wt, bt) =
            conv_param_grads_f64(&to_vec(x.clone().inner()), &to_vec(probe.inner()), [2, cin, 4, h, w], groups, d);
        let wf = to_vec(w_param.grad(&gf).unwrap());
        close(wf.clone(), wt, "weight gradient");
        let b_param = m.conv.bias.as_ref().unwrap().val();
        close(to_vec(b_param.grad(&gf).unwrap()), bt, "bias gradient");
        // The dead taps get exactly zero gradient; the centre tap does not.
        let tap = |i: usize| wf.iter().skip(i).step_by(9).map(|v| v.abs()).fold(0.0f32, f32::max);
        let (rows_dead, cols_dead) = (d >= h, d >= w);
        for (i, (r, c)) in (0..3).flat_map(|r| (0..3).map(move |c| (r, c))).enumerate() {
            let dead = (r != 1 && rows_dead) || (c != 1 && cols_dead);
            assert_eq!(tap(i) == 0.0, dead, "tap ({r}, {c}) at {h}x{w}, dilation {d}");
        }
    }
}

/// The weight and bias gradients of `sum(probe * conv(x))` for a 3x3, stride-1 "same" conv with
/// dilation and padding `d`, summed in f64: `[n, cin, cout, h, w]`, weight `[cout, cin / groups, 3, 3]`.
fn conv_param_grads_f64(
    x: &[f32],
    probe: &[f32],
    [n, cin, cout, h, w]: [usize; 5],
    groups: usize,
    d: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (cig, cog) = (cin / groups, cout / groups);
    let mut gw = vec![0f64; cout * cig * 9];
    let mut gb = vec![0f64; cout];
    for b in 0..n {
        for o in 0..cout {
            for y in 0..h {
                for xx in 0..w {
                    let p = probe[((b * cout + o) * h + y) * w + xx] as f64;
                    gb[o] += p;
                    for j in 0..cig {
                        let i = (o / cog) * cig + j;
                        for (t, (ky, kx)) in (0..3).flat_map(|r| (0..3).map(move |c| (r, c))).enumerate() {
                            let (iy, ix) = ((y + ky * d).checked_sub(d), (xx + kx * d).checked_sub(d));
                            if let (Some(iy), Some(ix)) = (iy.filter(|&v| v < h), ix.filter(|&v| v < w)) {
                                gw[(o * cig + j) * 9 + t] += p * x[((b * cin + i) * h + iy) * w + ix] as f64;
                            }
                        }
                    }
                }
            }
        }
    }
    (gw, gb)
}

/// The matrix-product bilinear resize (used because burn's GPU backends have no bilinear
/// backward) gives burn's `interpolate(Bilinear, align_corners = false)`: the same outputs and the
/// same input gradients, up- and downsampling, square or not, from 1x1 (the ASPP image pool).
#[test]
fn bilinear_by_matrix_products_matches_interpolate() {
    use burn::tensor::module::interpolate;
    use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
    use emo_dense::loss::{bilinear, bilinear_weights};

    let _g = serial();
    let device = Device::flex().autodiff();
    let cases = [
        ((6, 6), (192, 192)),
        ((1, 1), (6, 6)),
        ((4, 6), (128, 96)),
        ((13, 7), (5, 3)),
        ((5, 5), (5, 5)),
        ((3, 8), (7, 20)),
    ];
    for ((h, w), (oh, ow)) in cases {
        let x = Tensor::<4>::random([2, 3, h, w], Distribution::Uniform(-1.0, 1.0), &device).require_grad();
        let probe = Tensor::<4>::random([2, 3, oh, ow], Distribution::Uniform(-1.0, 1.0), &device);
        let ours = bilinear(x.clone(), (oh, ow));
        let opts =
            InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(false).with_output_size([oh, ow]);
        let theirs = interpolate(x.clone(), opts);
        assert_eq!(ours.dims(), [2, 3, oh, ow]);
        let close = |a: Vec<f32>, b: Vec<f32>, what: &str| {
            assert_eq!(a.len(), b.len());
            // Relative to the largest value: an input gradient of a 6x6 -> 192x192 resize sums
            // ~1,000 products in another order than burn's kernel (f32 bound ~1000 x 6e-8).
            let err = a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
            let scale = b.iter().map(|v| v.abs()).fold(1.0f32, f32::max);
            assert!(err <= 1e-5 * scale, "{what} differs by {err} (largest {scale}): {h}x{w} -> {oh}x{ow}");
        };
        close(to_vec(ours.clone()), to_vec(theirs.clone()), "output");
        let go = (ours * probe.clone()).sum().backward();
        let gt = (theirs * probe).sum().backward();
        close(to_vec(x.grad(&go).unwrap()), to_vec(x.grad(&gt).unwrap()), "input gradient");
    }
    // Each output is a convex combination of its inputs.
    for (n, m) in [(6, 192), (13, 5), (1, 4)] {
        let a = bilinear_weights(n, m);
        for row in a.chunks(n) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6 && row.iter().all(|&v| v >= 0.0));
        }
    }
}

#[test]
fn flip_test_augmentation_is_mirror_symmetric_and_off_by_default() {
    use emo_dense::predict::{seg_probs, segment, segment_with};
    let _g = serial();
    let device = Device::flex();
    for task in [Task::DeepLabV3, Task::PspNet] {
        let m = DenseModel::new(&small(task, 5), None, &device).unwrap();
        let x = Tensor::<4>::random([2, 3, 64, 64], Distribution::Uniform(-1.0, 1.0), &device);
        assert!(segment_with(&m, x.clone(), false).unwrap() == segment(&m, x.clone()).unwrap(), "{task}");
        let max_diff = |a: Tensor<4>, b: Tensor<4>| to_vec((a - b).abs().max())[0];
        // A randomly initialised model is not mirror-symmetric by itself...
        let plain = seg_probs(&m, x.clone(), false).unwrap();
        let plain_mirrored = seg_probs(&m, x.clone().flip([3]), false).unwrap();
        assert!(max_diff(plain.clone().flip([3]), plain_mirrored.clone()) > 1e-4, "{task}");
        // ...with flip test augmentation the probabilities of the mirrored input are exactly
        // the mirrored probabilities, and they are the mean of the two plain passes.
        let tta = seg_probs(&m, x.clone(), true).unwrap();
        assert_eq!(max_diff(tta.clone().flip([3]), seg_probs(&m, x.flip([3]), true).unwrap()), 0.0, "{task}");
        assert!(max_diff(tta, (plain + plain_mirrored.flip([3])).mul_scalar(0.5)) < 1e-6, "{task}");
    }
}

/// Multi-scale test augmentation (mmseg `aug_test`): each ratio's pass is the model on the
/// bilinearly resized input, its logits upsampled to that input, resized to the output size and
/// put through a softmax; the passes are averaged. Single scale at the input size is exactly
/// `seg_probs` (with and without flip), and `segment_aug` is the argmax of `seg_probs_aug`, also
/// for per-image output sizes.
#[test]
fn multi_scale_test_augmentation_averages_the_resized_passes() {
    use burn::tensor::activation::softmax;
    use emo_dense::loss::{bilinear, resize_logits};
    use emo_dense::predict::{SegAug, seg_probs, seg_probs_aug, segment_aug};
    let _g = serial();
    let device = Device::flex();
    let m = DenseModel::new(&small(Task::DeepLabV3, 5), None, &device).unwrap();
    let x = Tensor::<4>::random([2, 3, 64, 48], Distribution::Uniform(-1.0, 1.0), &device);
    let max_diff = |a: Tensor<4>, b: Tensor<4>| to_vec((a - b).abs().max())[0];
    for flip in [false, true] {
        let single = seg_probs_aug(&m, x.clone(), &SegAug::flip(flip), (64, 48)).unwrap();
        assert_eq!(max_diff(single, seg_probs(&m, x.clone(), flip).unwrap()), 0.0, "flip {flip}");
    }
    // One pass at ratio 1.5 (96x72), computed by hand, scored at an output size of 50x40.
    let logits = |x: Tensor<4>| match m.forward(x, false).unwrap() {
        DenseOutput::Seg { logits, .. } => logits,
        _ => panic!(),
    };
    assert_eq!(SegAug::scaled((64, 48), 1.5), (96, 72));
    assert_eq!(SegAug::scaled((64, 48), 0.75), (48, 36));
    assert_eq!(SegAug::scaled((5, 3), 0.5), (3, 2));
    let big = bilinear(x.clone(), (96, 72));
    let by_hand = softmax(resize_logits(resize_logits(logits(big), (96, 72)), (50, 40)), 1);
    let one = SegAug { flip: false, scales: vec![1.5] };
    let ours = seg_probs_aug(&m, x.clone(), &one, (50, 40)).unwrap();
    assert!(max_diff(ours.clone(), by_hand) < 1e-6);
    let plain = seg_probs_aug(&m, x.clone(), &SegAug { flip: false, scales: vec![1.0] }, (50, 40)).unwrap();
    assert!(max_diff(ours.clone(), plain.clone()) > 1e-3, "a 1.5x pass is not the 1x pass");
    // Two scales with flip: the mean of the four passes, i.e. of the two flip-averaged scales.
    let aug = SegAug { flip: true, scales: vec![1.0, 1.5] };
    let both = seg_probs_aug(&m, x.clone(), &aug, (50, 40)).unwrap();
    let each = |r: f32| seg_probs_aug(&m, x.clone(), &SegAug { flip: true, scales: vec![r] }, (50, 40)).unwrap();
    assert!(max_diff(both.clone(), (each(1.0) + each(1.5)).mul_scalar(0.5)) < 1e-6);
    let sums = to_vec(both.clone().sum_dim(1));
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
    // Mirror-symmetric under flip (up to the rounding of the resizes).
    let mirrored = seg_probs_aug(&m, x.clone().flip([3]), &aug, (50, 40)).unwrap();
    assert!(max_diff(mirrored.flip([3]), both.clone()) < 1e-5);
    // The class maps are the argmax of the probabilities, per image at its own size.
    let maps = segment_aug(&m, x.clone(), &aug, &[(50, 40), (64, 48)]).unwrap();
    assert!(maps[0] == argmax_map(both.narrow(0, 0, 1)));
    let at_input = seg_probs_aug(&m, x.clone(), &aug, (64, 48)).unwrap();
    assert!(maps[1] == argmax_map(at_input.narrow(0, 1, 1)));
    // Bad scales are errors.
    for bad in [vec![], vec![0.0], vec![1.0, -1.0], vec![f32::NAN], vec![9.0]] {
        let err = segment_aug(&m, x.clone(), &SegAug { flip: false, scales: bad.clone() }, &[(8, 8); 2]);
        assert!(err.is_err(), "{bad:?}");
    }
}

/// Asserts that two scalar losses of `x` agree in value (1e-5 relative) and in `x`'s gradient
/// (1e-5 of its largest entry, which must not vanish); returns `theirs`'s value.
fn same_loss_and_gradient(ours: Tensor<1>, theirs: Tensor<1>, x: &Tensor<4>) -> f32 {
    let (lo, lt) = (to_vec(ours.clone())[0], to_vec(theirs.clone())[0]);
    assert!((lo - lt).abs() <= 1e-5 * lt.abs().max(1.0), "loss {lo} vs {lt}");
    let (go, gt) = (ours.backward(), theirs.backward());
    let (go, gt) = (to_vec(x.grad(&go).unwrap()), to_vec(x.grad(&gt).unwrap()));
    let err = go.iter().zip(&gt).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
    let largest = gt.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    assert!(largest > 1e-4 && err <= 1e-5 * largest, "gradient differs by {err} (largest {largest})");
    lt
}

/// The segmentation loss on flex (one host pass for the loss and the logits' gradient) equals
/// the burn-ops version in value and in the gradient of the low-resolution logits (through the
/// bilinear resize), with ignored (255) pixels, and a loss without autodiff is just the value.
#[test]
fn pixel_cross_entropy_on_flex_matches_burn_ops_in_value_and_gradient() {
    use emo_dense::loss::{seg_ce, seg_ce_ops};

    let _g = serial();
    let device = Device::flex().autodiff();
    for ((b, k, h, w), (oh, ow)) in [((2, 11, 6, 6), (48, 48)), ((1, 3, 5, 7), (5, 7)), ((3, 4, 2, 3), (9, 13))] {
        let x = Tensor::<4>::random([b, k, h, w], Distribution::Uniform(-4.0, 4.0), &device).require_grad();
        let labels: Vec<u8> =
            (0..b * oh * ow).map(|i| if i % 7 == 3 { 255 } else { ((i * 31 + i / 5) % k) as u8 }).collect();
        let ours = seg_ce(x.clone(), &labels, (oh, ow));
        let theirs = seg_ce_ops(x.clone(), &labels, (oh, ow));
        let lt = same_loss_and_gradient(ours, theirs, &x);
        let plain = seg_ce(x.clone().detach(), &labels, (oh, ow));
        assert!((to_vec(plain)[0] - lt).abs() <= 1e-5 * lt.abs().max(1.0));
    }
}

/// Label smoothing on flex's fused pass equals the burn-ops loss `(1 - eps) * nll + eps * mean
/// over classes of -log p` in value and gradient, at the logits' size and resized; it changes
/// the loss, and the ops path with 0 is the plain loss.
#[test]
fn label_smoothed_pixel_loss_on_flex_matches_burn_ops() {
    use emo_dense::loss::{seg_ce_ops, seg_ce_ops_smoothed, seg_ce_with};

    let _g = serial();
    let device = Device::flex().autodiff();
    for ((b, k, h, w), (oh, ow)) in [((2, 11, 6, 6), (48, 48)), ((1, 3, 5, 7), (5, 7))] {
        // Logits in [-4, 4) that favour class 0 by 6, and labels mostly 0: the label's term and
        // the mean over classes differ by several nats, so smoothing must show in the loss
        // (with labels unrelated to the logits the two agree in expectation).
        let mut seed = 12345u64;
        let values: Vec<f32> = (0..b * k * h * w)
            .map(|i| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = (seed >> 40) as f32 / (1u64 << 24) as f32 * 8.0 - 4.0;
                if (i / (h * w)) % k == 0 { u + 6.0 } else { u }
            })
            .collect();
        let x = Tensor::<4>::from_data(TensorData::new(values, [b, k, h, w]), &device).require_grad();
        let labels: Vec<u8> = (0..b * oh * ow)
            .map(|i| match (i % 7, i % 5) {
                (3, _) => 255,
                (_, 1) => ((i * 31 + i / 5) % k) as u8,
                _ => 0,
            })
            .collect();
        let ours = seg_ce_with(x.clone(), &labels, (oh, ow), None, 0.1);
        let theirs = seg_ce_ops_smoothed(x.clone(), &labels, (oh, ow), 0.1);
        let smoothed = same_loss_and_gradient(ours, theirs, &x);
        let plain = to_vec(seg_ce_ops(x.clone().detach(), &labels, (oh, ow)))[0];
        let zero = to_vec(seg_ce_ops_smoothed(x.clone().detach(), &labels, (oh, ow), 0.0))[0];
        assert_eq!(plain, zero);
        assert!((smoothed - plain).abs() > 1e-3, "smoothing changed nothing: {smoothed} vs {plain}");
    }
}

/// The segmentation loss is the decode head's pixel loss plus `aux_weight` times the auxiliary
/// head's, in value and in both heads' gradients; at weight 0 the auxiliary head gets none.
#[test]
fn segmentation_loss_weighs_the_auxiliary_head() {
    use emo_dense::loss::{seg_ce, seg_loss};

    let _g = serial();
    let device = Device::flex().autodiff();
    let (hw, k) = ((24, 20), 5);
    let labels: Vec<u8> =
        (0..2 * hw.0 * hw.1).map(|i| if i % 11 == 4 { 255 } else { ((i * 7 + i / 9) % k) as u8 }).collect();
    let x = Tensor::<4>::random([2, k, 6, 5], Distribution::Uniform(-3.0, 3.0), &device).require_grad();
    let a = Tensor::<4>::random([2, k, 12, 10], Distribution::Uniform(-3.0, 3.0), &device).require_grad();
    let main = to_vec(seg_ce(x.clone().detach(), &labels, hw))[0];
    let aux = to_vec(seg_ce(a.clone().detach(), &labels, hw))[0];
    assert!(main > 0.5 && aux > 0.5, "{main} {aux}");
    let grad_of = |t: &Tensor<4>, w: f64| {
        let l = seg_loss(x.clone(), Some(a.clone()), &labels, hw, w);
        let total = to_vec(l.total.clone())[0];
        let g = l.total.backward();
        (total, l.parts, to_vec(t.grad(&g).unwrap()))
    };
    let (_, _, ga1) = grad_of(&a, 1.0);
    let (_, _, gx1) = grad_of(&x, 1.0);
    for w in [0.4, 1.0] {
        let (total, parts, ga) = grad_of(&a, w);
        assert!((total - (main + w as f32 * aux)).abs() <= 1e-5, "w {w}: {total} vs {main} + {w} * {aux}");
        let part = |n: &str| parts.iter().find(|(p, _)| *p == n).unwrap().1;
        assert!((part("seg") - main as f64).abs() <= 1e-5, "{parts:?}");
        assert!((part("aux") - w * aux as f64).abs() <= 1e-5, "{parts:?}");
        // The auxiliary head's gradient scales with the weight; the decode head's does not.
        let (_, _, gx) = grad_of(&x, w);
        assert!(ga.iter().any(|&g| g.abs() > 1e-6));
        for (g, g1) in ga.iter().zip(&ga1) {
            assert!((g - w as f32 * g1).abs() <= 1e-7, "{g} vs {w} * {g1}");
        }
        assert_eq!(gx, gx1);
    }
    let (total, _, ga) = grad_of(&a, 0.0);
    assert!((total - main).abs() <= 1e-6, "{total} vs {main}");
    assert!(ga.iter().all(|&g| g == 0.0), "weight 0 still trains the auxiliary head");
}

/// mmseg's `OHEMPixelSampler.sample` with a threshold, written as it is there: sort the valid
/// pixels' label probabilities, take the one at `min(min_kept * images, n - 1)`, keep the valid
/// pixels below `max(that, thresh)`.
fn mmseg_ohem_keep(prob: &[f32], labels: &[u8], k: usize, thresh: f32, min_kept: usize, images: usize) -> Vec<bool> {
    let mut sorted: Vec<f32> = prob.iter().zip(labels).filter(|&(_, &l)| (l as usize) < k).map(|(&p, _)| p).collect();
    sorted.sort_by(f32::total_cmp);
    let min_threshold = if sorted.is_empty() { 0.0 } else { sorted[(min_kept * images).min(sorted.len() - 1)] };
    let threshold = min_threshold.max(thresh);
    prob.iter().zip(labels).map(|(&p, &l)| (l as usize) < k && p < threshold).collect()
}

/// OHEM pixel selection keeps what mmseg's sampler keeps (the threshold alone, the min_kept
/// floor, more asked for than there are pixels), and the OHEM loss on flex equals the burn-ops
/// loss over the kept pixels divided by all valid pixels, in value and gradient.
#[test]
fn ohem_keeps_the_pixels_mmseg_keeps_and_its_loss_matches_burn_ops() {
    use burn::tensor::activation::softmax;
    use emo_dense::loss::{Ohem, ohem_labels, resize_logits, seg_ce_ops, seg_ce_with};

    let _g = serial();
    let device = Device::flex().autodiff();
    let ((b, k, h, w), (oh, ow)) = ((2, 5, 6, 6), (24, 24));
    let x = Tensor::<4>::random([b, k, h, w], Distribution::Uniform(-4.0, 4.0), &device).require_grad();
    let labels: Vec<u8> =
        (0..b * oh * ow).map(|i| if i % 7 == 3 { 255 } else { ((i * 31 + i / 5) % k) as u8 }).collect();
    let valid = labels.iter().filter(|&&l| l != 255).count();
    let q = oh * ow;
    let probs = to_vec(softmax(resize_logits(x.clone().detach(), (oh, ow)), 1));
    let prob: Vec<f32> = labels
        .iter()
        .enumerate()
        .map(|(i, &l)| if l == 255 { 1.0 } else { probs[(i / q * k + l as usize) * q + i % q] })
        .collect();
    let below = |t: f32| prob.iter().zip(&labels).filter(|&(&p, &l)| l != 255 && p < t).count();
    // (thresh, min_kept): the threshold decides; the floor decides; the floor exceeds the pixels.
    for (thresh, min_kept) in [(0.3, 10), (0.05, 200), (0.5, 10_000)] {
        let ohem = Ohem { thresh, min_kept };
        let want = mmseg_ohem_keep(&prob, &labels, k, thresh, min_kept, b);
        let got = ohem_labels(&prob, &labels, k, ohem, b);
        for (i, (&keep, &g)) in want.iter().zip(&got).enumerate() {
            assert_eq!(g, if keep { labels[i] } else { 255 }, "thresh {thresh} min_kept {min_kept} pixel {i}");
        }
        let kept = want.iter().filter(|&&t| t).count();
        assert!(kept > 0 && kept < valid, "thresh {thresh} min_kept {min_kept}: kept {kept} of {valid}");
        if min_kept == 10 {
            assert_eq!(kept, below(thresh), "the threshold alone decides");
        } else {
            assert!(kept > below(thresh), "the floor keeps more than the threshold");
        }
        let masked: Vec<u8> = want.iter().zip(&labels).map(|(&t, &l)| if t { l } else { 255 }).collect();
        let ours = seg_ce_with(x.clone(), &labels, (oh, ow), Some(ohem), 0.0);
        let theirs = seg_ce_ops(x.clone(), &masked, (oh, ow)).mul_scalar(kept as f64 / valid as f64);
        same_loss_and_gradient(ours, theirs, &x);
    }
}

/// mmcv's `rescale_size` for ADE20K's test scale (2048, 512) and a few others.
#[test]
fn keep_ratio_sizes_are_mmcvs() {
    use emo_dense::data::keep_ratio_size;
    // ADE20K's images: the short side to 512 unless the long one would pass 2048.
    assert_eq!(keep_ratio_size((512, 683), (2048, 512)), (512, 683));
    assert_eq!(keep_ratio_size((256, 341), (2048, 512)), (512, 682)); // 341 * 2 = 682
    assert_eq!(keep_ratio_size((1000, 3000), (2048, 512)), (512, 1536));
    assert_eq!(keep_ratio_size((300, 2400), (2048, 512)), (256, 2048)); // long side bound
    assert_eq!(keep_ratio_size((683, 512), (512, 2048)), (683, 512)); // order of the scale free
    assert_eq!(keep_ratio_size((40, 56), (96, 48)), (48, 67)); // 56 * 1.2 = 67.2
    assert_eq!(keep_ratio_size((30, 30), (96, 48)), (48, 48));
}

/// `resize_bilinear_cv2` is OpenCV's INTER_LINEAR: by hand on one row, and against `cv2.resize`
/// itself when Python has OpenCV (CI installs it: `EMO_REQUIRE_CV2=1`), within 1 per byte.
#[test]
fn bilinear_resize_is_opencvs() {
    use emo_dense::data::resize_bilinear_cv2;
    // One row 0, 100 (each channel) to 4 wide: half-pixel centres at -0.25, 0.25, 0.75, 1.25,
    // clamped at the edges.
    let row: Vec<u8> = [0u8, 100].iter().flat_map(|&v| [v, v, v]).collect();
    let out = resize_bilinear_cv2(&row, (1, 2), (1, 4));
    assert_eq!(out.chunks(3).map(|p| p[0]).collect::<Vec<_>>(), [0, 25, 75, 100]);
    // Shrinking by 2 averages the pairs (no antialiasing beyond the two taps).
    let row: Vec<u8> = [0u8, 100, 200, 40].iter().flat_map(|&v| [v, v, v]).collect();
    let out = resize_bilinear_cv2(&row, (1, 4), (1, 2));
    assert_eq!(out.chunks(3).map(|p| p[0]).collect::<Vec<_>>(), [50, 120]);

    let has_cv2 =
        std::process::Command::new("python3").args(["-c", "import cv2, numpy"]).status().is_ok_and(|s| s.success());
    if !has_cv2 {
        assert!(std::env::var_os("EMO_REQUIRE_CV2").is_none(), "EMO_REQUIRE_CV2 is set but Python has no cv2");
        eprintln!("skipping the cv2 comparison: python3 has no cv2 (pip install opencv-python-headless)");
        return;
    }
    let dir = tmp("cv2-resize");
    std::fs::create_dir_all(&dir).unwrap();
    let mut seed = 11u64;
    let (h, w) = (37usize, 53usize);
    let rgb: Vec<u8> = (0..h * w * 3)
        .map(|_| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 56) as u8
        })
        .collect();
    std::fs::write(dir.join("in.raw"), &rgb).unwrap();
    for to in [(16, 23), (37, 53), (80, 61), (512, 733), (20, 120)] {
        let script = format!(
            "import cv2, numpy as np, sys\n\
             a = np.fromfile(sys.argv[1], np.uint8).reshape({h}, {w}, 3)\n\
             cv2.resize(a, ({}, {}), interpolation=cv2.INTER_LINEAR).tofile(sys.argv[2])",
            to.1, to.0
        );
        let st = std::process::Command::new("python3")
            .args(["-c", &script])
            .arg(dir.join("in.raw"))
            .arg(dir.join("out.raw"))
            .status()
            .unwrap();
        assert!(st.success());
        let want = std::fs::read(dir.join("out.raw")).unwrap();
        let got = resize_bilinear_cv2(&rgb, (h, w), to);
        assert_eq!(got.len(), want.len(), "{to:?}");
        let worst = got.iter().zip(&want).map(|(&a, &b)| (a as i32 - b as i32).abs()).max().unwrap();
        assert!(worst <= 1, "{to:?}: off by {worst} from cv2.resize");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Under a keep-ratio test scale each image runs at its own size, read from its file and resized
/// as mmseg's test pipeline resizes it, and is scored on its label map at the original size:
/// the same confusion matrix as that computed image by image here, from the split in memory or
/// streamed, on 1 or 2 threads.
#[test]
fn segmentation_at_a_keep_ratio_test_scale_runs_each_image_at_its_own_size() {
    use emo_dense::data::{keep_ratio_size, resize_bilinear_cv2};
    use emo_dense::loss::resize_logits;
    use emo_dense::predict::{SegAug, batch_tensor};
    use emo_dense::train::{Eval, evaluate_on};

    let _g = serial();
    let data = tmp("keep-ratio");
    // Images of several sizes (two neighbours of one size share a forward pass).
    let sizes = [(40usize, 56usize), (40, 56), (56, 40), (64, 48), (30, 30), (40, 56)];
    for split in ["train", "val"] {
        std::fs::create_dir_all(data.join("images").join(split)).unwrap();
        std::fs::create_dir_all(data.join("labels").join(split)).unwrap();
        for (i, &(h, w)) in sizes.iter().enumerate() {
            let (y0, x0) = (h / 4 + i % 3, w / 5 + i);
            let inside =
                |x: u32, y: u32| (y0..y0 + h / 2).contains(&(y as usize)) && (x0..x0 + w / 2).contains(&(x as usize));
            let c = (i % 2) as u8;
            let img = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let base = [(x * 4) as u8, (y * 4) as u8, 90];
                if inside(x, y) {
                    image::Rgb(if c == 0 { [220, 40, 40] } else { [40, 220, 40] })
                } else {
                    image::Rgb(base)
                }
            });
            let lab = image::GrayImage::from_fn(w as u32, h as u32, |x, y| {
                image::Luma([if inside(x, y) { c + 1 } else { 0 }])
            });
            img.save(data.join("images").join(split).join(format!("{i:04}.png"))).unwrap();
            lab.save(data.join("labels").join(split).join(format!("{i:04}.png"))).unwrap();
        }
    }
    std::fs::write(data.join("classes.txt"), "background\nred\ngreen\n").unwrap();
    let device = Device::flex();
    let cfg = small(Task::DeepLabV3, 3);
    let model = DenseModel::new(&cfg, None, &device).unwrap();
    // Sharper class scores than the initialisation's, so the class map follows the input.
    let mut sd = model.state_dict();
    for key in ["decode_head.conv_seg.weight", "decode_head.conv_seg.bias"] {
        let t = sd.get(key).unwrap().clone();
        sd.insert(
            key,
            emo_weights::Tensor::f32(t.shape.clone(), t.as_f32().unwrap().iter().map(|v| v * 200.0).collect()),
        );
    }
    let model = DenseModel::from_state_dict(&cfg, &sd, &device).unwrap();
    let scale = (96, 48);
    // By hand: each image resized to its keep-ratio size, one pass, the logits resized to the
    // label map, the largest class.
    let mut conf = vec![0u64; 9];
    for (i, &(h, w)) in sizes.iter().enumerate() {
        let img = image::open(data.join(format!("images/val/{i:04}.png"))).unwrap().to_rgb8();
        let label = image::open(data.join(format!("labels/val/{i:04}.png"))).unwrap().to_luma8().into_raw();
        let to = keep_ratio_size((h, w), scale);
        let x = batch_tensor(&[&resize_bilinear_cv2(img.as_raw(), (h, w), to)], to, &device);
        let DenseOutput::Seg { logits, .. } = model.forward(x, false).unwrap() else { panic!() };
        let pred = argmax_map(resize_logits(resize_logits(logits, to), (h, w)));
        for (&p, &l) in pred.iter().zip(&label) {
            conf[l as usize * 3 + p as usize] += 1;
        }
    }
    assert_eq!(conf.iter().sum::<u64>(), sizes.iter().map(|&(h, w)| (h * w) as u64).sum::<u64>());
    let predicted = (0..3).filter(|&p| (0..3).any(|l| conf[l * 3 + p] > 0)).count();
    assert!(predicted >= 2, "the class map should follow the input: {conf:?}");
    let input = (32, 32);
    let loaded = match load_split(Task::DeepLabV3, &data, "val", input, false, false, 0).unwrap() {
        DenseData::Seg(d) => d,
        _ => panic!(),
    };
    let streamed = match index_split(Task::DeepLabV3, &data, "val", input, false, false, 0).unwrap() {
        DenseData::Seg(d) => d,
        _ => panic!(),
    };
    for (what, d) in [("in memory", loaded), ("streamed", streamed)] {
        let d = d.with_test_scale(Some(emo_dense::data::TestScale::keep_ratio(scale))).unwrap();
        for (i, &hw) in sizes.iter().enumerate() {
            let p = d.eval_pair(i).unwrap();
            assert_eq!((p.input, p.size), (keep_ratio_size(hw, scale), hw), "{what} {i}");
            let img = image::open(data.join(format!("images/val/{i:04}.png"))).unwrap().to_rgb8();
            assert!(p.rgb.as_ref() == resize_bilinear_cv2(img.as_raw(), hw, p.input).as_slice(), "{what} {i}");
        }
        for threads in [1, 2] {
            let e = evaluate_on(&model, &DenseData::Seg(d.clone()), &device, &SegAug::flip(false), threads).unwrap();
            let Eval::Seg(_, m) = e else { panic!() };
            assert_eq!(m.conf, conf, "{what}, {threads} threads");
        }
    }
    let _ = std::fs::remove_dir_all(&data);
}

/// A padded test scale is refused for segmentation (mmseg's 'whole' mode pads nothing).
#[test]
fn a_segmentation_test_scale_pads_nothing() {
    let _g = serial();
    let data = tmp("seg-pad");
    synthetic_set(&data, 1, 2);
    let DenseData::Seg(d) = load_split(Task::DeepLabV3, &data, "val", (64, 64), false, false, 0).unwrap() else {
        panic!()
    };
    let err = d.with_test_scale(Some(emo_dense::data::TestScale::RETINANET)).unwrap_err();
    assert!(err.to_string().contains("pads nothing"), "{err}");
    let _ = std::fs::remove_dir_all(&data);
}

/// mmdet's test pipeline under a test scale: every image resized from its file (keep-ratio
/// here, RetinaNet's rule at a small scale), normalised and zero-padded to a multiple of 32,
/// run with the anchors of its padded size, its boxes clipped to the resized image and scaled
/// back to the original. `detections_on` gives what that computes image by image, from the split
/// in memory or streamed, on 1 or 2 threads; SSDLite's squeeze to a fixed size too.
#[test]
fn detection_at_a_test_scale_runs_each_image_at_its_padded_size() {
    use emo_dense::data::TestScale;
    use emo_dense::predict::{DetTestCfg, batch_tensor_padded, detect_clipped};
    use emo_dense::train::detections_on;

    let _g = serial();
    let data = tmp("det-test-scale");
    let sizes = [(40usize, 56usize), (40, 56), (56, 40), (64, 48), (30, 30)];
    std::fs::create_dir_all(data.join("annotations")).unwrap();
    for split in ["train", "val"] {
        std::fs::create_dir_all(data.join("images").join(split)).unwrap();
        let (mut images, mut anns) = (vec![], vec![]);
        for (i, &(h, w)) in sizes.iter().enumerate() {
            let (x0, y0, bw, bh) = (w / 5 + i, h / 4, w / 2, h / 2);
            let img = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let inside = (x0..x0 + bw).contains(&(x as usize)) && (y0..y0 + bh).contains(&(y as usize));
                if inside { image::Rgb([220, 40, 40]) } else { image::Rgb([(x * 4) as u8, (y * 4) as u8, 90]) }
            });
            let f = format!("{i:04}.png");
            img.save(data.join("images").join(split).join(&f)).unwrap();
            images.push(serde_json::json!({"id": i + 1, "file_name": f, "width": w, "height": h}));
            anns.push(serde_json::json!({"id": i + 1, "image_id": i + 1, "category_id": 1,
                "bbox": [x0, y0, bw, bh], "area": bw * bh, "iscrowd": 0}));
        }
        let cats = serde_json::json!([{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]);
        let coco = serde_json::json!({"images": images, "annotations": anns, "categories": cats});
        std::fs::write(data.join(format!("annotations/instances_{split}.json")), coco.to_string()).unwrap();
    }
    let device = Device::flex();
    for (task, ts) in [
        (Task::RetinaNet, TestScale { scale: (96, 48), keep_ratio: true, pad: 32 }),
        (Task::SsdLite, TestScale { scale: (64, 64), keep_ratio: false, pad: 1 }),
    ] {
        let cfg = small(task, 2);
        let model = DenseModel::new(&cfg, None, &device).unwrap();
        // Class scores well above the test threshold (RetinaNet starts at a 0.01 prior), so
        // every image has detections to compare.
        let mut sd = model.state_dict();
        let key = if task == Task::RetinaNet { "bbox_head.retina_cls.bias" } else { "bbox_head.cls_convs.0.1.bias" };
        let t = sd.get(key).unwrap().clone();
        sd.insert(key, emo_weights::Tensor::f32(t.shape.clone(), vec![0.0; t.numel()]));
        let model = DenseModel::from_state_dict(&cfg, &sd, &device).unwrap();
        let test = DetTestCfg::official(task);
        let mut want = Vec::new();
        for (i, &hw) in sizes.iter().enumerate() {
            let r = ts.load(&data.join(format!("images/val/{i:04}.png"))).unwrap();
            let (rgb, resized, orig) = (r.rgb, r.size, r.orig);
            assert_eq!((orig, resized), (hw, ts.resized(hw)));
            let padded = ts.padded(resized);
            assert!(padded.0 % ts.pad == 0 && padded.1 % ts.pad == 0 && padded.0 >= resized.0 && padded.1 >= resized.1);
            let x = batch_tensor_padded(&[&rgb], &[resized], padded, &device);
            // The padding is zero after normalisation, the image where it was.
            let v = to_vec(x.clone());
            let plane = padded.0 * padded.1;
            for c in 0..3 {
                for y in 0..padded.0 {
                    for xx in 0..padded.1 {
                        let got = v[c * plane + y * padded.1 + xx];
                        if y >= resized.0 || xx >= resized.1 {
                            assert_eq!(got, 0.0);
                        }
                    }
                }
            }
            let mut c2 = cfg.clone();
            c2.input = padded;
            let dets = detect_clipped(&model, x, &anchors::anchors(&c2), &test, &[resized]).unwrap().remove(0);
            assert!(!dets.is_empty(), "{task}: image {i} has no detections");
            let (sx, sy) = (orig.1 as f64 / resized.1 as f64, orig.0 as f64 / resized.0 as f64);
            for d in dets {
                let [x1, y1, x2, y2] = d.bbox.map(f64::from);
                assert!(x2 <= resized.1 as f64 && y2 <= resized.0 as f64, "clipped to the resized image");
                want.push((
                    i as u64 + 1,
                    d.label as u64 + 1,
                    [x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy],
                    d.score as f64,
                ));
            }
        }
        let loaded = match load_split(task, &data, "val", (64, 64), false, false, 0).unwrap() {
            DenseData::Det(d) => d,
            _ => panic!(),
        };
        let streamed = match index_split(task, &data, "val", (64, 64), false, false, 0).unwrap() {
            DenseData::Det(d) => d,
            _ => panic!(),
        };
        for (what, d) in [("in memory", loaded), ("streamed", streamed)] {
            let d = d.with_test_scale(Some(ts));
            for threads in [1, 2] {
                let got = detections_on(&model, &d, &device, threads).unwrap();
                let got: Vec<_> = got.iter().map(|b| (b.image_id, b.category_id, b.bbox, b.score)).collect();
                assert_eq!(got, want, "{task} {what}, {threads} threads");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&data);
}

/// mmdet keeps the `nms_pre` best candidates of each level, not of the whole image: with every
/// score above the threshold and NMS suppressing nothing, `nms_pre` come from each level.
#[test]
fn detection_keeps_nms_pre_candidates_per_level() {
    use emo_dense::predict::{DetTestCfg, batch_tensor, detect};

    let _g = serial();
    let device = Device::flex();
    for task in [Task::SsdLite, Task::RetinaNet] {
        for input in [(64, 64), (96, 64)] {
            let mut cfg = small(task, 2);
            cfg.input = input;
            let counts = anchors::level_counts(&cfg);
            assert_eq!(counts.iter().sum::<usize>(), anchors::anchors(&cfg).len(), "{task} {input:?}");
            let model = DenseModel::new(&cfg, None, &device).unwrap();
            let mut sd = model.state_dict();
            let key =
                if task == Task::RetinaNet { "bbox_head.retina_cls.bias" } else { "bbox_head.cls_convs.0.1.bias" };
            let t = sd.get(key).unwrap().clone();
            sd.insert(key, emo_weights::Tensor::f32(t.shape.clone(), vec![0.0; t.numel()]));
            let model = DenseModel::from_state_dict(&cfg, &sd, &device).unwrap();
            let rgb: Vec<u8> = (0..input.0 * input.1 * 3).map(|i| (i * 7 % 251) as u8).collect();
            let x = batch_tensor(&[&rgb], input, &device);
            // Scores are above 0 everywhere; IoU 1 suppresses nothing.
            let test = DetTestCfg { score_thr: 0.0, nms_iou: 1.0, max_per_img: 100_000, nms_pre: 3 };
            let dets = detect(&model, x.clone(), &anchors::anchors(&cfg), &test).unwrap().remove(0);
            // Every level has more than 3 pairs (a global cap would keep 3 in all).
            assert_eq!(dets.len(), 3 * counts.len(), "{task} {input:?}: {counts:?}");
            // The wrong anchors for the input are an error, not a silent misreading.
            let mut other = cfg.clone();
            other.input = (input.0 + 32, input.1);
            assert!(detect(&model, x, &anchors::anchors(&other), &test).is_err());
        }
    }
}

/// mmseg's keep-ratio training geometry: the image resized keeping its aspect ratio to the
/// scale (times a ratio), then cropped to the input at a whole-pixel offset, padded at the
/// bottom and right where the resized image is smaller than the crop.
#[test]
fn keep_ratio_training_geometry_is_mmsegs_resize_crop_pad() {
    use emo_dense::data::{resize_bilinear_cv2, seg_geometry_keep_ratio};
    use emo_train::rng::Rng;

    let (h, w) = (30usize, 45usize);
    let rgb: Vec<u8> = (0..h * w).flat_map(|i| [(i % w * 5) as u8, (i / w * 8) as u8, 77]).collect();
    let label: Vec<u8> = (0..h * w).map(|i| ((i % w) / 15) as u8).collect();
    let mut rng = Rng::new(5);
    // Ratio 1, scale (3000, 20): the short side to 20 -> 20x30, exactly the crop: offset 0, the
    // whole resized image, as a bilinear resize gives it (within 1) and labels by nearest.
    let (mut r, mut l) = (rgb.clone(), label.clone());
    let resized = seg_geometry_keep_ratio(&mut rng, &mut r, &mut l, (h, w), (20, 30), (3000, 20), (1.0, 1.0), 0.75);
    assert_eq!(resized, (20, 30));
    let want = resize_bilinear_cv2(&rgb, (h, w), (20, 30));
    let worst = r.iter().zip(&want).map(|(&a, &b)| (a as i32 - b as i32).abs()).max().unwrap();
    assert!(worst <= 1, "off by {worst}");
    assert!(l.iter().all(|&v| v < 3));
    assert_eq!(l[0], 0);
    assert_eq!(l[29], 2);
    // A crop larger than the resized image: the image at the top left, padding below and right.
    let (mut r, mut l) = (rgb.clone(), label.clone());
    let resized = seg_geometry_keep_ratio(&mut rng, &mut r, &mut l, (h, w), (32, 40), (3000, 20), (1.0, 1.0), 0.75);
    assert_eq!(resized, (20, 30));
    for y in 0..32 {
        for x in 0..40 {
            assert_eq!(l[y * 40 + x] == 255, y >= 20 || x >= 30, "({y}, {x})");
        }
    }
    // Flip and photometric distortion then touch the image's part only (mmseg pads last): over
    // draws that flip, the padding stays at the bottom and right with its colour and label 255.
    let pad_colour = r[(32 * 40 - 1) * 3..].to_vec();
    for seed in 0..8 {
        let (mut ra, mut la) = (r.clone(), l.clone());
        emo_dense::data::augment_top_left(&mut Rng::new(seed), &mut ra, &mut la, (32, 40), (20, 30));
        for y in 0..32 {
            for x in 0..40 {
                let pad = y >= 20 || x >= 30;
                assert_eq!(la[y * 40 + x] == 255, pad, "seed {seed} ({y}, {x})");
                if pad {
                    assert_eq!(&ra[(y * 40 + x) * 3..(y * 40 + x + 1) * 3], pad_colour.as_slice(), "seed {seed}");
                }
            }
        }
    }
    // A ratio of 2: 40x60 resized, cropped to 20x30 somewhere inside: no padding, and the crops
    // differ from draw to draw.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..8 {
        let (mut r, mut l) = (rgb.clone(), label.clone());
        let resized = seg_geometry_keep_ratio(&mut rng, &mut r, &mut l, (h, w), (20, 30), (3000, 20), (2.0, 2.0), 1.0);
        assert_eq!(resized, (40, 60));
        assert!(l.iter().all(|&v| v != 255));
        seen.insert(r);
    }
    assert!(seen.len() > 1, "the crop offset is drawn");
}
