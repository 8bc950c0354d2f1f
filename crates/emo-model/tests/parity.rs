//! Parity with the official PyTorch model (fixtures made by zhangzjn/EMO@27d9b40 with seeded
//! random weights and randomised norm statistics): logits within 1e-4 absolute, every stage
//! output within 1e-4 relative to its max, for all four variants at 224x224 and 256x192.

mod common;

use burn::tensor::Device;
use common::*;
use emo_model::Emo;
use emo_spec::Variant;

fn check(variant: Variant, weights: std::path::PathBuf, io: std::path::PathBuf) {
    let device = Device::flex();
    let (model, _) = Emo::load(&variant.config(), &weights, &device).unwrap();
    let io = read_io(&io);
    let (_, shape, input) = get(&io, "input");
    // The committed input is the documented formula.
    assert!(max_abs_diff(input, &formula_input(shape[0], shape[2], shape[3])) < 1e-6);
    let out = model.forward_with(to_tensor(shape, input, &device), &[0, 1, 2, 3, 4], true).unwrap();
    for (i, feat) in out.features {
        let (_, fshape, want) = get(&io, &format!("feat.stage{i}"));
        assert_eq!(&feat.dims().to_vec(), fshape, "{variant} stage{i} shape");
        let got = to_vec(feat);
        let rel = max_abs_diff(&got, want) / max_abs(want);
        assert!(rel <= 1e-4, "{variant} {shape:?} stage{i}: rel diff {rel}");
    }
    let (_, _, want) = get(&io, "logits");
    let diff = max_abs_diff(&to_vec(out.logits.unwrap()), want);
    eprintln!("{variant} {shape:?}: max |logits diff| = {diff:e}");
    assert!(diff <= 1e-4, "{variant} {shape:?}: logits diff {diff}");
}

#[test]
fn emo_1m_224_from_committed_pth_and_safetensors() {
    for w in ["emo_1m.pth", "emo_1m.safetensors"] {
        check(Variant::Emo1M, repo_fixture(w), repo_fixture("emo_1m_224x224.io.safetensors"));
    }
}

#[test]
fn all_variants_both_sizes_from_shared_fixtures() {
    for v in Variant::ALL {
        let tag = v.name().replace('-', "_");
        for size in ["224x224", "256x192"] {
            let (Some(w), Some(io)) = (
                shared_fixture(&format!("{tag}.safetensors")),
                shared_fixture(&format!("{tag}_{size}.io.safetensors")),
            ) else {
                continue;
            };
            check(v, w, io);
        }
    }
}
