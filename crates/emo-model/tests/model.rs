//! Shape properties, batch independence, state-dict round trips and bad input.

mod common;

use burn::tensor::{Device, Tensor};
use common::*;
use emo_model::{Emo, ModelError};
use emo_spec::{EmoConfig, Variant};

fn small_random_model(device: &Device) -> Emo {
    device.seed(7);
    Emo::new(&EmoConfig::emo_1m(), device).unwrap()
}

#[test]
fn any_input_size_gives_ceil_half_stage_shapes() {
    let device = Device::flex();
    let model = small_random_model(&device);
    let cfg = EmoConfig::emo_1m();
    for (h, w) in [(1, 1), (33, 300), (97, 131), (7, 2), (64, 64)] {
        let x = Tensor::<4>::random([1, 3, h, w], burn::tensor::Distribution::Normal(0.0, 1.0), &device);
        let out = model.forward_with(x, &[0, 1, 2, 3, 4], true).unwrap();
        let want = cfg.stage_hw(h, w);
        for (i, f) in &out.features {
            let [_, c, fh, fw] = f.dims();
            assert_eq!((c, fh, fw), (cfg.stage_dims()[*i], want[*i].0, want[*i].1), "{h}x{w} stage{i}");
        }
        let logits = to_vec(out.logits.unwrap());
        assert_eq!(logits.len(), 1000);
        assert!(logits.iter().all(|v| v.is_finite()), "{h}x{w}: non-finite logits");
    }
}

#[test]
fn batch_of_n_equals_n_batches_of_one() {
    let device = Device::flex();
    let (model, _) = Emo::load(&EmoConfig::emo_1m(), repo_fixture("emo_1m.safetensors"), &device).unwrap();
    // 45x61 exercises padding in stage 3 (3x4 -> 7x7 windows) and odd strides.
    let (b, h, w) = (3, 45, 61);
    let x = formula_input(b, h, w);
    let all = to_vec(model.forward(to_tensor(&[b, 3, h, w], &x, &device)).unwrap());
    let per = 3 * h * w;
    for i in 0..b {
        let one = to_vec(model.forward(to_tensor(&[1, 3, h, w], &x[i * per..(i + 1) * per], &device)).unwrap());
        let d = max_abs_diff(&one, &all[i * 1000..(i + 1) * 1000]);
        assert!(d < 1e-5, "image {i}: {d}");
    }
}

#[test]
fn state_dict_round_trips_through_the_model() {
    let device = Device::flex();
    let sd = emo_weights::load(repo_fixture("emo_1m.pth")).unwrap();
    let model = Emo::from_state_dict(&EmoConfig::emo_1m(), &sd, &device).unwrap();
    let back = model.state_dict();
    assert_eq!(back.len(), sd.len());
    for (k, t) in &sd.tensors {
        let b = back.get(k).unwrap_or_else(|| panic!("{k} not exported"));
        assert_eq!(b.shape, t.shape, "{k}");
        if let (Some(x), Some(y)) = (b.as_f32(), t.as_f32()) {
            assert_eq!(x, y, "{k}");
        }
    }
    // A random model exports a state dict that validates and reloads.
    let fresh = small_random_model(&device).state_dict();
    emo_weights::validate(&fresh, &EmoConfig::emo_1m()).unwrap();
}

#[test]
fn backbone_drops_head_and_features_match_classifier() {
    let device = Device::flex();
    let sd = emo_weights::load(repo_fixture("emo_1m.safetensors")).unwrap();
    let cls = Emo::from_state_dict(&EmoConfig::emo_1m(), &sd, &device).unwrap();
    let bb = Emo::from_state_dict(&EmoConfig::emo_1m().with_num_classes(0), &sd, &device).unwrap();
    assert_eq!(bb.num_classes(), 0);
    let x = formula_input(1, 64, 64);
    let a = cls.forward_features(to_tensor(&[1, 3, 64, 64], &x, &device), &[2, 4]).unwrap();
    let b = bb.forward_features(to_tensor(&[1, 3, 64, 64], &x, &device), &[2, 4]).unwrap();
    assert_eq!(a.len(), 2);
    for (x, y) in a.into_iter().zip(b) {
        assert_eq!(to_vec(x), to_vec(y));
    }
    assert!(matches!(bb.forward(to_tensor(&[1, 3, 64, 64], &x, &device)), Err(ModelError::Input(_))));
}

#[test]
fn window_size_override_changes_attention_only_where_it_should() {
    let device = Device::flex();
    let sd = emo_weights::load(repo_fixture("emo_1m.safetensors")).unwrap();
    let w7 = Emo::from_state_dict(&EmoConfig::emo_1m(), &sd, &device).unwrap();
    let w10 = Emo::from_state_dict(&EmoConfig::emo_1m().with_window_size(10), &sd, &device).unwrap();
    let x = formula_input(1, 160, 160); // stage3 10x10: one 10-window vs four 7-windows (padded to 14)
    let a = w7.forward_features(to_tensor(&[1, 3, 160, 160], &x, &device), &[2, 3]).unwrap();
    let b = w10.forward_features(to_tensor(&[1, 3, 160, 160], &x, &device), &[2, 3]).unwrap();
    assert_eq!(to_vec(a[0].clone()), to_vec(b[0].clone()), "stage2 has no attention");
    assert!(max_abs_diff(&to_vec(a[1].clone()), &to_vec(b[1].clone())) > 1e-3);
}

#[test]
fn wrong_input_channels_is_an_error() {
    let device = Device::flex();
    let model = small_random_model(&device);
    let x = Tensor::<4>::zeros([1, 1, 32, 32], &device);
    let e = model.forward(x).unwrap_err();
    assert!(e.to_string().contains("3 channels"), "{e}");
}

#[test]
fn wrong_variant_checkpoint_is_named() {
    let device = Device::flex();
    let e = Emo::load(&Variant::Emo2M.config(), repo_fixture("emo_1m.pth"), &device).unwrap_err();
    assert!(e.to_string().contains("looks like a emo-1m"), "{e}");
}

#[test]
fn reset_classifier_for_fine_tuning() {
    let device = Device::flex();
    let (model, _) = Emo::load(&EmoConfig::emo_1m(), repo_fixture("emo_1m.safetensors"), &device).unwrap();
    let model = model.reset_classifier(10, &device);
    assert_eq!(model.num_classes(), 10);
    let y = model.forward(to_tensor(&[2, 3, 32, 32], &formula_input(2, 32, 32), &device)).unwrap();
    assert_eq!(y.dims(), [2, 10]);
    emo_weights::validate(&model.state_dict(), &EmoConfig::emo_1m().with_num_classes(10)).unwrap();
}
