//! Fixture access shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};

/// The committed fixtures (EMO-1M weights + 224x224 io).
pub fn repo_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/emo").join(name)
}

/// A fixture from `../shared/fixtures/emo` (or `$EMO_SHARED_FIXTURES`). `None` when absent,
/// unless `EMO_REQUIRE_SHARED=1` (set by `.ci/run`), where absence is a failure.
pub fn shared_fixture(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("EMO_SHARED_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/emo"));
    let p = dir.join(name);
    if p.exists() {
        return Some(p);
    }
    let local = repo_fixture(name);
    if local.exists() {
        return Some(local);
    }
    if std::env::var("EMO_REQUIRE_SHARED").as_deref() == Ok("1") {
        panic!("fixture {} is required (EMO_REQUIRE_SHARED=1) but missing", p.display());
    }
    eprintln!("skipping: fixture {} not found", p.display());
    None
}

/// Read every f32 tensor of a safetensors file.
pub fn read_io(path: &PathBuf) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            let data = v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            (k, v.shape().to_vec(), data)
        })
        .collect()
}

pub fn get<'a>(io: &'a [(String, Vec<usize>, Vec<f32>)], key: &str) -> &'a (String, Vec<usize>, Vec<f32>) {
    io.iter().find(|(k, _, _)| k == key).unwrap_or_else(|| panic!("io fixture lacks {key}"))
}

pub fn to_tensor<const D: usize>(shape: &[usize], data: &[f32], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(data.to_vec(), shape.to_vec()), device)
}

pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

/// [`to_vec`] in f64 (for f64 tensors, without rounding them to f32).
pub fn to_vec64<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().convert::<f64>().try_into_vec::<f64>().unwrap()
}

/// The fixtures' input: x[n,c,h,w] = 2 sin(0.37h + 0.23w + 1.1c + 0.5n) cos(0.05(h-w) + 0.3c).
pub fn formula_input(b: usize, h: usize, w: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(b * 3 * h * w);
    for n in 0..b {
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let (n, c, y, x) = (n as f64, c as f64, y as f64, x as f64);
                    let val = 2.0 * (0.37 * y + 0.23 * x + 1.1 * c + 0.5 * n).sin() * (0.05 * (y - x) + 0.3 * c).cos();
                    v.push(val as f32);
                }
            }
        }
    }
    v
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn max_abs(a: &[f32]) -> f32 {
    a.iter().map(|x| x.abs()).fold(0.0, f32::max)
}
