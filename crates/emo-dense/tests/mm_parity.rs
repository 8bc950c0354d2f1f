//! The necks and heads against mmdet 2.28 / mmseg 0.30's own code (the frameworks of the
//! official EMO detection and segmentation checkpoints).
//!
//! `scripts/mm_dense_reference.py` built SSDLite, RetinaNet, DeepLabv3 and PSPNet on EMO-1M from
//! the real mmdet / mmseg classes, filled every state-dict entry with a deterministic value
//! (`values` below computes the same ones), and stored their state-dict keys and shapes
//! (`fixtures/mm_heads.json`) and their eval-mode outputs on one 160x128 input
//! (`fixtures/mm_heads.safetensors`). So an official checkpoint's keys are exactly ours, and its
//! weights give mmdet / mmseg's numbers here.

use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use emo_dense::train::ModelCard;
use emo_dense::{DenseConfig, DenseInfer, DenseModel, DenseOutput, FastDense, Task};
use emo_spec::Variant;
use emo_weights::{Data, StateDict, Wrapping};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811C_9DC5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

/// `n` values in [-0.5, 0.5): lowbias32(fnv1a(key) ^ (i * 0x9E3779B1)) / 2^32 - 0.5.
fn uniform(key: &str, n: usize) -> Vec<f64> {
    let h = fnv1a(key);
    (0..n as u32)
        .map(|i| {
            let mut x = i.wrapping_mul(0x9E37_79B1) ^ h;
            x ^= x >> 16;
            x = x.wrapping_mul(0x7FEB_352D);
            x ^= x >> 15;
            x = x.wrapping_mul(0x846C_A68B);
            x ^= x >> 16;
            x as f64 / 4_294_967_296.0 - 0.5
        })
        .collect()
}

/// The deterministic value of state-dict entry `key` (as the script's `values`): an affine map
/// `offset + scale * u` of the key's uniform stream, chosen by the kind of entry.
fn values(key: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let (offset, scale) = if key.ends_with("running_var") {
        (1.0, 1.0)
    } else if key.ends_with("running_mean") {
        (0.0, 0.2)
    } else if shape.len() == 1 && key.ends_with("weight") {
        (1.0, 0.2)
    } else if shape.len() <= 1 {
        (0.0, 0.2)
    } else {
        (0.0, (12.0 / (n / shape[0]) as f64).sqrt())
    };
    uniform(key, n).into_iter().map(|u| (offset + scale * u) as f32).collect()
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The fixture: its metadata, its stored tensors and its input (H, W).
struct Fixture {
    meta: serde_json::Value,
    reference: StateDict,
    input: (usize, usize),
}

impl Fixture {
    fn load() -> Self {
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("mm_heads.json")).unwrap()).unwrap();
        let reference = emo_weights::load(fixture("mm_heads.safetensors")).unwrap();
        let input = (meta["input"][0].as_u64().unwrap() as usize, meta["input"][1].as_u64().unwrap() as usize);
        Fixture { meta, reference, input }
    }

    fn f32s(&self, k: &str) -> Vec<f32> {
        self.reference.get(k).unwrap_or_else(|| panic!("fixture lacks {k}")).as_f32().unwrap().to_vec()
    }

    /// The stored input, `[1, 3, H, W]`.
    fn x(&self, device: &Device) -> Tensor<4> {
        Tensor::<4>::from_data(TensorData::new(self.f32s("input"), [1, 3, self.input.0, self.input.1]), device)
    }

    fn classes(&self, task: Task) -> usize {
        self.meta[if task.is_detection() { "det_classes" } else { "seg_classes" }].as_u64().unwrap() as usize
    }
}

#[test]
fn necks_and_heads_match_mmdet_and_mmseg() {
    let fx = Fixture::load();
    let (meta, input) = (&fx.meta, fx.input);
    let f32s = |k: &str| fx.f32s(k);
    let device = Device::flex();
    let x = fx.x(&device);
    for (task, name) in [
        (Task::SsdLite, "ssdlite"),
        (Task::RetinaNet, "retinanet"),
        (Task::DeepLabV3, "deeplabv3"),
        (Task::PspNet, "pspnet"),
    ] {
        let cfg = DenseConfig::new(task, Variant::Emo1M, fx.classes(task), input);
        // The same keys and shapes as mmdet / mmseg's state_dict, in the same order.
        let theirs: Vec<(String, Vec<usize>)> = meta["keys"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let shape = e[1].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
                (e[0].as_str().unwrap().to_string(), shape)
            })
            .collect();
        let ours: Vec<(String, Vec<usize>)> = cfg.state_dict_keys().into_iter().map(|k| (k.name, k.shape)).collect();
        let missing: Vec<_> = theirs.iter().filter(|k| !ours.contains(k)).collect();
        let extra: Vec<_> = ours.iter().filter(|k| !theirs.contains(k)).collect();
        assert!(missing.is_empty() && extra.is_empty(), "{task}: not in ours {missing:?}; not in theirs {extra:?}");
        if let Some(i) = (0..ours.len()).find(|&i| ours[i] != theirs[i]) {
            panic!("{task}: same keys, other order: ours[{i}] = {:?}, theirs[{i}] = {:?}", ours[i].0, theirs[i].0);
        }
        // Their weights, loaded strictly; eval-mode outputs within 1e-4.
        let mut sd = StateDict::new();
        for (k, shape) in &theirs {
            let t = if k.ends_with("num_batches_tracked") {
                emo_weights::Tensor { shape: shape.clone(), data: Data::I64(vec![0]) }
            } else {
                emo_weights::Tensor::f32(shape.clone(), values(k, shape))
            };
            sd.insert(k.clone(), t);
        }
        let model = DenseModel::from_state_dict(&cfg, &sd, &device).unwrap();
        let outs: Vec<(&str, Vec<f32>)> = match model.forward(x.clone(), true).unwrap() {
            DenseOutput::Det { cls, reg } => vec![("cls", to_vec(cls)), ("reg", to_vec(reg))],
            DenseOutput::Seg { logits, aux, .. } => vec![("logits", to_vec(logits)), ("aux", to_vec(aux.unwrap()))],
        };
        for (part, got) in outs {
            let want = f32s(&format!("{name}.{part}"));
            let d = max_diff(&got, &want);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            eprintln!("{task} {part}: max |ours - mm| = {d:.2e} (max |mm| {scale:.2})");
            assert!(d <= 1e-4, "{task} {part}: max diff {d} against mmdet / mmseg");
        }
    }
}

/// A state dict with `cfg`'s keys and shapes filled with the script's deterministic values.
fn filled(cfg: &DenseConfig) -> StateDict {
    let mut sd = StateDict::new();
    for k in cfg.state_dict_keys() {
        let t = if k.shape.is_empty() {
            emo_weights::Tensor { shape: k.shape, data: Data::I64(vec![0]) }
        } else {
            emo_weights::Tensor::f32(k.shape.clone(), values(&k.name, &k.shape))
        };
        sd.insert(k.name, t);
    }
    sd
}

fn outputs(o: DenseOutput) -> Vec<(&'static str, Vec<f32>)> {
    match o {
        DenseOutput::Det { cls, reg } => vec![("cls", to_vec(cls)), ("reg", to_vec(reg))],
        DenseOutput::Seg { logits, .. } => vec![("logits", to_vec(logits))],
    }
}

#[test]
fn the_fast_engine_matches_mmdet_and_mmseg() {
    // The same weights and input as above, through `emo-infer`'s dense engine (BN folded,
    // channels-last kernels, live-tap im2col): the same outputs as mmdet / mmseg.
    let fx = Fixture::load();
    let x = fx.x(&Device::flex());
    for (task, name) in [
        (Task::SsdLite, "ssdlite"),
        (Task::RetinaNet, "retinanet"),
        (Task::DeepLabV3, "deeplabv3"),
        (Task::PspNet, "pspnet"),
    ] {
        let cfg = DenseConfig::new(task, Variant::Emo1M, fx.classes(task), fx.input);
        let fast = FastDense::from_state_dict(&cfg, &filled(&cfg)).unwrap();
        for (part, got) in outputs(fast.infer(x.clone()).unwrap()) {
            let want = fx.f32s(&format!("{name}.{part}"));
            let d = max_diff(&got, &want);
            eprintln!("fast {task} {part}: max |ours - mm| = {d:.2e}");
            assert!(d <= 1e-4, "fast {task} {part}: max diff {d} against mmdet / mmseg");
        }
    }
}

#[test]
fn the_fast_engine_matches_the_burn_model_at_other_sizes() {
    // A batch of two odd-sized inputs (stage maps 7x5 .. 1x1 and RetinaNet's P7), EMO-1M and
    // EMO-5M with its per-task window (10 / 16): the engine against the burn model in eval mode.
    let device = Device::flex();
    for (variant, (h, w)) in [(Variant::Emo1M, (97, 131)), (Variant::Emo5M, (224, 160))] {
        let x: Vec<f32> = uniform("input", 2 * 3 * h * w).into_iter().map(|v| 4.0 * v as f32).collect();
        let x = Tensor::<4>::from_data(TensorData::new(x, [2, 3, h, w]), &device);
        for task in Task::ALL {
            let cfg = DenseConfig::new(task, variant, 5, (h, w));
            let sd = filled(&cfg);
            let model = DenseModel::from_state_dict(&cfg, &sd, &device).unwrap();
            let fast = FastDense::from_state_dict(&cfg, &sd).unwrap();
            let want = outputs(model.infer(x.clone()).unwrap());
            for ((part, got), (_, want)) in outputs(fast.infer(x.clone()).unwrap()).into_iter().zip(want) {
                let d = max_diff(&got, &want);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                eprintln!("{variant:?} {task} {part} at {h}x{w}: max |fast - burn| = {d:.2e} (max {scale:.2})");
                assert!(d <= 1e-4 * scale.max(1.0), "{variant:?} {task} {part}: max diff {d}");
            }
        }
    }
}

#[test]
fn the_fast_engine_is_strict_about_its_checkpoint() {
    let cfg = DenseConfig::new(Task::DeepLabV3, Variant::Emo1M, 5, (64, 64));
    let mut sd = filled(&cfg);
    sd.tensors.remove("decode_head.bottleneck.bn.running_var");
    let e = FastDense::from_state_dict(&cfg, &sd).err().expect("a missing key");
    assert!(matches!(e, emo_dense::DenseError::Weights(_)), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("decode_head.bottleneck.bn.running_var"), "{e}");
    let other = DenseConfig::new(Task::PspNet, Variant::Emo1M, 5, (64, 64));
    let e = FastDense::from_state_dict(&other, &filled(&cfg)).err().expect("the wrong head").to_string();
    assert!(e.contains("psp_modules"), "{e}");
}

#[test]
fn an_mmcv_checkpoint_loads_its_state_dict() {
    // mmcv.runner.save_checkpoint: {"meta": {...}, "state_dict": ..., "optimizer": {...}}.
    let sd = emo_weights::load(fixture("mmcv_checkpoint.pth")).unwrap();
    assert_eq!(sd.wrapping, Wrapping::Mmcv);
    let keys: Vec<&str> = sd.tensors.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["bn.bias", "bn.num_batches_tracked", "bn.running_mean", "bn.running_var", "bn.weight", "conv.weight"]
    );
    for (k, t) in &sd.tensors {
        if let Some(v) = t.as_f32() {
            assert_eq!(v, values(k, &t.shape).as_slice(), "{k}");
        }
    }
    assert_eq!(sd.get("conv.weight").unwrap().shape, [4, 3, 3, 3]);
}

/// A state dict with `cfg`'s keys and shapes (zeros): what an official checkpoint holds.
fn zeros(cfg: &DenseConfig) -> StateDict {
    let mut sd = StateDict::new();
    for k in cfg.state_dict_keys() {
        let n = k.shape.iter().product();
        let data = if k.shape.is_empty() { Data::I64(vec![0]) } else { Data::F32(vec![0.0; n]) };
        sd.insert(k.name, emo_weights::Tensor { shape: k.shape, data });
    }
    sd
}

#[test]
fn an_official_checkpoint_needs_no_model_card() {
    for task in Task::ALL {
        for variant in [Variant::Emo1M, Variant::Emo2M, Variant::Emo5M] {
            let paper = DenseConfig::paper(task, variant);
            let card = ModelCard::infer(&zeros(&paper)).unwrap();
            assert_eq!(card.model, paper, "{task} {variant:?}");
            if task.is_detection() {
                assert_eq!(card.classes.len(), 80);
                assert_eq!((card.classes[0].as_str(), card.cat_ids[79]), ("person", 90));
            } else {
                assert_eq!((card.classes.len(), card.classes[0].as_str()), (150, "wall"));
                assert!(card.reduce_zero_label, "ADE20K label maps: 0 is `other`");
            }
        }
        // Another class count: generic names, the paper's input.
        let own = DenseConfig::new(task, Variant::Emo6M, 7, task.paper_input());
        let card = ModelCard::infer(&zeros(&own)).unwrap();
        assert_eq!((card.model.clone(), card.classes[6].as_str()), (own, "class6"), "{task}");
    }
    // Not a dense checkpoint, or a backbone that is no EMO variant: clear errors.
    let backbone_only: StateDict = {
        let mut sd = zeros(&DenseConfig::paper(Task::DeepLabV3, Variant::Emo1M));
        sd.tensors.retain(|k, _| k.starts_with("backbone."));
        sd
    };
    let e = ModelCard::infer(&backbone_only).unwrap_err().to_string();
    assert!(e.contains("not an mmdet / mmseg EMO checkpoint"), "{e}");
    let mut odd = zeros(&DenseConfig::paper(Task::PspNet, Variant::Emo1M));
    odd.insert("backbone.stage4.2.proj.conv.weight", emo_weights::Tensor::f32(vec![100, 588, 1, 1], vec![0.0; 58800]));
    let e = ModelCard::infer(&odd).unwrap_err().to_string();
    assert!(e.contains("none of EMO-1M/2M/5M/6M"), "{e}");
}
