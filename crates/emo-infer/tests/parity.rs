//! The fast engine against the official outputs (all variants, 224x224 and 256x192) and
//! against the burn model at odd sizes.

use std::path::PathBuf;

use emo_infer::Engine;
use emo_spec::{EmoConfig, Variant};

fn fixture(name: &str) -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let shared = std::env::var_os("EMO_SHARED_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/fixtures/emo"));
    for d in [shared.clone(), root.join("fixtures/emo")] {
        if d.join(name).exists() {
            return Some(d.join(name));
        }
    }
    if std::env::var("EMO_REQUIRE_SHARED").as_deref() == Ok("1") {
        panic!("fixture {name} required but missing in {}", shared.display());
    }
    eprintln!("skipping: {name} not found");
    None
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn engine_matches_official_outputs_for_all_variants() {
    for v in Variant::ALL {
        let tag = v.name().replace('-', "_");
        let Some(weights) = fixture(&format!("{tag}.safetensors")) else {
            continue;
        };
        let (mut engine, _) = Engine::load(&v.config(), &weights).unwrap();
        for size in ["224x224", "256x192"] {
            let Some(io) = fixture(&format!("{tag}_{size}.io.safetensors")) else {
                continue;
            };
            let io = emo_weights::load(io).unwrap();
            let x = io.get("input").unwrap();
            let [b, _, h, w] = x.shape[..] else { panic!() };
            let out = engine.run_with(x.as_f32().unwrap(), b, h, w, &[0, 1, 2, 3, 4], true).unwrap();
            // The one-shot path for one image (which frees the input and oversized buffers as it
            // goes) gives the same result as a normal run, and so does a normal run after it
            // (its buffers grown again).
            // (Partial sums of several threads may be combined in any order: not bit-exact.)
            let same = |a: &emo_infer::Output, b: &emo_infer::Output, what: &str| {
                assert_eq!(a.features.len(), b.features.len());
                for (fa, fb) in a.features.iter().zip(&b.features) {
                    assert!(fa.1 == fb.1 && max_abs_diff(&fa.2, &fb.2) <= 1e-5, "{v} {size} {what}: stage{}", fa.0);
                }
                let d = max_abs_diff(a.logits.as_ref().unwrap(), b.logits.as_ref().unwrap());
                assert!(d <= 1e-5, "{v} {size} {what}: logits {d}");
            };
            let img0 = &x.as_f32().unwrap()[..3 * h * w];
            let one = engine.run_with(img0, 1, h, w, &[0, 1, 2, 3, 4], true).unwrap();
            let l0 = &out.logits.as_ref().unwrap()[..one.logits.as_ref().unwrap().len()];
            assert!(max_abs_diff(one.logits.as_ref().unwrap(), l0) <= 1e-5, "{v} {size}: batch 1 vs batch {b}");
            let owned = engine.run_owned(img0.to_vec(), 1, h, w, &[0, 1, 2, 3, 4], true).unwrap();
            same(&owned, &one, "run_owned");
            let again = engine.run_with(img0, 1, h, w, &[0, 1, 2, 3, 4], true).unwrap();
            same(&again, &one, "run_with after run_owned");
            for (i, shape, data) in &out.features {
                let want = io.get(&format!("feat.stage{i}")).unwrap();
                assert_eq!(&shape[..], &want.shape[..], "{v} {size} stage{i}");
                let want = want.as_f32().unwrap();
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let rel = max_abs_diff(data, want) / scale;
                assert!(rel <= 1e-4, "{v} {size} stage{i}: {rel}");
            }
            let d = max_abs_diff(&out.logits.unwrap(), io.get("logits").unwrap().as_f32().unwrap());
            eprintln!("{v} {size}: max |logits diff| {d:e}");
            assert!(d <= 1e-4, "{v} {size}: {d}");
        }
    }
}

#[test]
fn engine_matches_burn_model_at_odd_sizes_and_batches() {
    use burn::tensor::{Device, Distribution, Tensor, TensorData};
    let device = Device::flex();
    device.seed(3);
    for cfg in [EmoConfig::emo_1m(), EmoConfig::emo_5m().with_window_size(10).with_num_classes(10)] {
        let model = emo_model::Emo::new(&cfg, &device).unwrap();
        let mut engine = Engine::from_state_dict(&cfg, &model.state_dict()).unwrap();
        for (b, h, w) in [(2, 97, 131), (1, 1, 1), (3, 33, 64)] {
            let x: Tensor<4> = Tensor::random([b, 3, h, w], Distribution::Normal(0.0, 1.0), &device);
            let data = x.to_data().convert::<f32>().try_into_vec::<f32>().unwrap();
            let want = model.forward(x).unwrap().into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
            let got = engine.run(&data, b, h, w).unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(d <= 1e-4, "{} {b}x{h}x{w}: {d}", cfg.name());
            // features only, stopping early
            let f = engine.run_with(&data, b, h, w, &[2], false).unwrap();
            assert_eq!(f.features.len(), 1);
            let _ = TensorData::new(vec![0f32], [1]);
        }
    }
}

#[test]
fn engine_rejects_bad_input() {
    let w = fixture("emo_1m.safetensors").unwrap();
    let (mut e, _) = Engine::load(&EmoConfig::emo_1m(), w).unwrap();
    assert!(e.run(&[0.0; 10], 1, 2, 2).is_err());
    assert!(e.run(&[], 0, 2, 2).is_err());
    assert!(Engine::load(&EmoConfig::emo_2m(), fixture("emo_1m.safetensors").unwrap()).is_err());
}
