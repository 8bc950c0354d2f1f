//! Training on a small synthetic task (CI-sized): it learns, resumes bit-exactly, keeps the
//! last good checkpoint, and rejects bad data clearly.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use emo_model::Emo;
use emo_spec::Variant;
use emo_train::data::{Split, parse_idx};
use emo_train::parallel::{DataParallel, add_grads};
use emo_train::schedule::Cosine;
use emo_train::{TrainConfig, TrainError, Trainer};

/// 28x28 grey images whose class (0..4) is the horizontal band (rows 0-6, 7-13, ...) holding a
/// bright square at a random column, plus noise (invariant to the flip augmentation).
fn quadrants(n: usize, seed: u64) -> Split {
    let mut s = seed;
    let mut rnd = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    let (mut images, mut labels) = (vec![0u8; n * 784], Vec::new());
    for i in 0..n {
        let c = (rnd() % 4) as usize;
        let (y0, x0) = (c * 7 + 1 + (rnd() % 2) as usize, 2 + (rnd() % 19) as usize);
        let img = &mut images[i * 784..(i + 1) * 784];
        img.iter_mut().for_each(|p| *p = (rnd() % 40) as u8);
        for y in y0..y0 + 5 {
            for x in x0..x0 + 6 {
                img[y * 28 + x] = 220;
            }
        }
        labels.push(c as u8);
    }
    Split { images, labels, channels: 1, h: 28, w: 28, classes: 4 }
}

fn config(epochs: usize) -> TrainConfig {
    let mut c = TrainConfig::fashion_mnist(Variant::Emo1M);
    c.num_classes = 4;
    c.epochs = epochs;
    c.batch = 32;
    c.lr_per_512 = 2e-2;
    c.warmup_epochs = 1;
    c.ema_decay = 0.9;
    c.data = "synthetic".into();
    c
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("emo-train-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn device() -> Device {
    Device::flex().autodiff()
}

/// burn's device RNG (weight init, drop path) is process-global: runs compared bit for bit must
/// not interleave with other runs, so the training tests take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn it_learns_a_small_task() {
    let _g = serial();
    let dir = tmp("learn");
    let mut c = config(5);
    c.lr_per_512 = 4e-2;
    c.workers = 2;
    // two replicas, each on its own device handle (the GPU code path; on the CPU both are flex)
    let mut t = Trainer::new(c, &dir, quadrants(512, 1), quadrants(128, 2), device())
        .unwrap()
        .with_replica_devices(vec![device(), device()]);
    t.verbose = false;
    let m = t.run(None).unwrap();
    assert_eq!(m.len(), 5);
    assert!(m[4].train_loss < m[0].train_loss, "loss did not drop: {m:?}");
    assert!(m[4].top1 > 60.0, "top-1 {} on a 4-class task: {m:?}", m[4].top1);
    for f in [
        "config.json",
        "metrics.jsonl",
        "loss.csv",
        "curves.png",
        "best.safetensors",
        "ema.safetensors",
        "checkpoint/state.json",
        "checkpoint/optim.bin",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    // the EMA weights are a valid official-layout checkpoint
    let sd = emo_weights::load(dir.join("ema.safetensors")).unwrap();
    emo_weights::validate(&sd, &Variant::Emo1M.config().with_num_classes(4)).unwrap();
}

#[test]
fn a_resumed_run_matches_an_uninterrupted_one_bit_for_bit() {
    let _g = serial();
    for workers in [1, 2] {
        let (a, b) = (tmp(&format!("resume-a{workers}")), tmp(&format!("resume-b{workers}")));
        let mut c = config(2);
        c.workers = workers;
        let mut ta = Trainer::new(c.clone(), &a, quadrants(96, 3), quadrants(32, 4), device()).unwrap();
        ta.verbose = false;
        ta.run(None).unwrap();
        let mut tb = Trainer::new(c, &b, quadrants(96, 3), quadrants(32, 4), device()).unwrap();
        tb.verbose = false;
        tb.run(Some(1)).unwrap();
        drop(tb);
        // a kill during the next save leaves a partial checkpoint.tmp behind: it must be ignored
        std::fs::create_dir_all(b.join("checkpoint.tmp")).unwrap();
        std::fs::write(b.join("checkpoint.tmp/model.safetensors"), b"partial").unwrap();
        let mut tb = Trainer::resume(&b, quadrants(96, 3), quadrants(32, 4), device()).unwrap();
        tb.verbose = false;
        assert_eq!(tb.state.epoch, 1);
        tb.run(None).unwrap();
        for f in ["checkpoint/model.safetensors", "checkpoint/ema.safetensors"] {
            let same = std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap();
            assert!(same, "{f} differs with {workers} workers");
        }
    }
}

/// Compares two gradient sets over a model's parameters: the worst difference as a share of
/// the tolerance `1e-4 * max|a| + 1e-6` (relative, plus an absolute floor for gradients that
/// are zero in exact arithmetic, such as a conv bias before a BatchNorm), and the number of
/// parameters compared.
struct GradDiff<'a>(&'a GradientsParams, &'a GradientsParams, f32, usize);
impl ModuleVisitor for GradDiff<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let (Some(a), Some(b)) = (self.0.get::<D>(param.id), self.1.get::<D>(param.id)) {
            let max = |t: Tensor<D>| t.abs().max().into_data().convert::<f32>().try_into_vec::<f32>().unwrap()[0];
            let tol = 1e-4 * max(a.clone()) + 1e-6;
            self.2 = self.2.max(max(a - b) / tol);
            self.3 += 1;
        }
    }
}

#[test]
fn replicas_on_identical_halves_give_the_whole_batch_gradient() {
    // Each replica normalises its own shard; with two identical shards the batch statistics
    // equal the whole batch's, so the summed, share-weighted replica gradients must equal the
    // gradient of one replica on the whole batch (and the running statistics must agree).
    let _g = serial();
    let device = device();
    device.seed(7);
    let cfg = Variant::Emo1M.config().with_num_classes(4).with_drop_path(0.0);
    let model = Emo::new(&cfg, &device).unwrap();
    let model2 = Emo::from_state_dict(&cfg, &model.state_dict(), &device).unwrap();
    let (n, s) = (4, 64);
    let half: Vec<f32> = (0..n * 3 * s * s).map(|i| ((i * 7919 % 1013) as f32 / 1013.0) - 0.5).collect();
    let whole: Vec<f32> = half.iter().chain(&half).copied().collect();
    type Job = Box<dyn FnOnce() -> GradientsParams + Send>;
    let job = |m: Emo, x: Vec<f32>, b: usize, share: f32, device: Device| -> Job {
        Box::new(move || {
            let logits = m.forward(Tensor::<4>::from_data(TensorData::new(x, [b, 3, s, s]), &device)).unwrap();
            let w = Tensor::<2>::from_data(
                TensorData::new((0..4 * b).map(|i| (i % 4) as f32 - 1.5).collect::<Vec<f32>>(), [b, 4]),
                &device,
            );
            let loss = (logits * w).sum().div_scalar(b as f32).mul_scalar(share);
            GradientsParams::from_grads(loss.backward(), &m)
        })
    };
    let one = DataParallel::new(1);
    let g1 = one.run(vec![job(model.clone().fork(&device), whole, 2 * n, 1.0, device.clone())]).remove(0);
    let key = "stage0.0.convs.0.1.running_mean";
    let mean_one = model.state_dict().get(key).map(|t| t.as_f32().unwrap().to_vec());
    let two = DataParallel::new(2);
    let jobs = (0..2).map(|_| job(model2.clone().fork(&device), half.clone(), n, 0.5, device.clone())).collect();
    let mut gs = two.run(jobs).into_iter();
    let mut g2 = gs.next().unwrap();
    add_grads(&model2, &mut g2, gs.next().unwrap());
    let mut d = GradDiff(&g1, &g2, 0.0, 0);
    model.visit(&mut d);
    assert!(d.3 > 100, "only {} parameters compared", d.3);
    assert!(d.2 <= 1.0, "replica gradients differ from the whole batch's by {}x the tolerance", d.2);
    let mean_two = model2.state_dict().get(key).map(|t| t.as_f32().unwrap().to_vec());
    let (a, b) = (mean_one.unwrap(), mean_two.unwrap());
    assert!(a.iter().any(|&v| v != 0.0), "the running mean was not updated");
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-6), "running statistics differ: {a:?} vs {b:?}");
}

#[test]
fn resume_falls_back_to_the_previous_checkpoint_after_a_kill_mid_swap() {
    let _g = serial();
    let dir = tmp("swap");
    let mut t = Trainer::new(config(2), &dir, quadrants(64, 5), quadrants(32, 6), device()).unwrap();
    t.verbose = false;
    t.run(Some(1)).unwrap();
    drop(t);
    // killed between "move checkpoint to checkpoint.old" and "move tmp into place"
    std::fs::rename(dir.join("checkpoint"), dir.join("checkpoint.old")).unwrap();
    let t = Trainer::resume(&dir, quadrants(64, 5), quadrants(32, 6), device()).unwrap();
    assert_eq!(t.state.epoch, 1);
}

#[test]
fn divergence_stops_with_a_clear_error_and_keeps_the_last_checkpoint() {
    let _g = serial();
    let dir = tmp("nan");
    let mut c = config(3);
    c.lr_per_512 = 1e9;
    c.clip_grad = 0.0;
    c.warmup_epochs = 0;
    let mut t = Trainer::new(c, &dir, quadrants(96, 7), quadrants(32, 8), device()).unwrap();
    t.verbose = false;
    let e = t.run(None).unwrap_err();
    assert!(matches!(e, TrainError::Diverged { .. }), "{e}");
    assert!(e.to_string().contains("last good checkpoint"));
}

#[test]
fn a_run_folder_is_never_overwritten() {
    let _g = serial();
    let dir = tmp("twice");
    Trainer::new(config(1), &dir, quadrants(64, 9), quadrants(32, 9), device()).unwrap();
    let e = Trainer::new(config(1), &dir, quadrants(64, 9), quadrants(32, 9), device()).err().unwrap();
    assert!(e.to_string().contains("--resume"), "{e}");
}

#[test]
fn cosine_schedule_warms_up_then_decays() {
    let s = Cosine { lr: 1e-3, min_lr: 1e-6, warmup_lr: 1e-6, warmup_iters: 10, total_iters: 110 };
    assert_eq!(s.at(0), 1e-6);
    assert!((s.at(5) - (1e-6 + (1e-3 - 1e-6) * 0.5)).abs() < 1e-12);
    assert!((s.at(10) - 1e-3).abs() < 1e-12);
    assert!((s.at(60) - (1e-6 + (1e-3 - 1e-6) * 0.5)).abs() < 1e-9);
    assert!((s.at(110) - 1e-6).abs() < 1e-12);
    assert!(s.at(30) > s.at(31));
    // Without warm-up (`--warmup-epochs 0`, fine-tuning): the peak at once, then the cosine.
    let s = Cosine { warmup_iters: 0, ..s };
    assert_eq!(s.at(0), 1e-3);
    assert!((s.at(55) - (1e-6 + (1e-3 - 1e-6) * 0.5)).abs() < 1e-9);
    assert!((s.at(110) - 1e-6).abs() < 1e-12);
}

#[test]
fn idx_errors_are_clear() {
    let mut img = vec![0u8, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2];
    img.extend([0u8; 8]);
    let lbl = vec![0u8, 0, 8, 1, 0, 0, 0, 2, 1, 9];
    assert_eq!(parse_idx(&img, &lbl, 10).unwrap().len(), 2);
    assert!(parse_idx(&img[..20], &lbl, 10).unwrap_err().to_string().contains("truncated"));
    assert!(parse_idx(&img, &lbl, 5).unwrap_err().to_string().contains("out of range"));
    assert!(parse_idx(&lbl, &img, 10).is_err());
}

#[test]
fn fashion_mnist_from_debian_when_installed() {
    match emo_train::data::fashion_mnist(None) {
        Ok((train, test)) => {
            assert_eq!((train.len(), test.len(), train.h, train.w), (60_000, 10_000, 28, 28));
            let mut counts = [0usize; 10];
            test.labels.iter().for_each(|&l| counts[l as usize] += 1);
            assert!(counts.iter().all(|&c| c == 1000));
        }
        Err(e) => {
            assert!(e.to_string().contains("apt-get install"), "{e}");
            eprintln!("skipping: {e}");
        }
    }
}
