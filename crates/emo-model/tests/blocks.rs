//! The public building blocks on arbitrary feature maps.

mod common;

use burn::tensor::{Device, Distribution, Tensor};
use common::*;
use emo_model::blocks::{IrmbConfig, MetaMobileBlock, Operator, partition, unpartition};
use emo_spec::{Act, Norm};

fn randn(shape: [usize; 4], device: &Device) -> Tensor<4> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

#[test]
fn strided_partition_is_a_grid_and_inverts() {
    let device = Device::flex();
    let (h, w) = (10, 9); // window 4: padded to 12x12, n1 = n2 = 3
    let vals: Vec<f32> = (0..h * w).map(|i| (i / w * 100 + i % w) as f32).collect();
    let x = to_tensor::<4>(&[1, 1, h, w], &vals, &device);
    let (xw, g, _) = partition(x.clone(), 4);
    assert_eq!((g.n1, g.n2, g.hp, g.wp), (3, 3, 12, 12));
    let win = to_vec(xw.clone());
    for i1 in 0..3 {
        for i2 in 0..3 {
            for h1 in 0..4 {
                for w1 in 0..4 {
                    let (y, x) = (h1 * 3 + i1, w1 * 3 + i2);
                    let want = if y < h && x < w { (y * 100 + x) as f32 } else { 0.0 };
                    assert_eq!(win[(i1 * 3 + i2) * 16 + h1 * 4 + w1], want, "window ({i1},{i2}) token ({h1},{w1})");
                }
            }
        }
    }
    assert_eq!(to_vec(unpartition(xw, &g, 1, h, w)), vals);
}

#[test]
fn irmb_runs_on_any_size_and_downsamples_by_ceil() {
    let device = Device::flex();
    let down = IrmbConfig::new(24, 32).with_stride(2).with_exp_ratio(2.0).init(&device);
    let attn = IrmbConfig::new(32, 32)
        .with_norm(Some(Norm::Layer))
        .with_act(Act::Gelu)
        .with_kernel(5)
        .with_attention(8, 7)
        .init(&device);
    for (h, w) in [(1, 1), (13, 29), (40, 7)] {
        let y = down.forward(randn([2, 24, h, w], &device));
        assert_eq!(y.dims(), [2, 32, h.div_ceil(2), w.div_ceil(2)]);
        let z = attn.forward(y.clone());
        assert_eq!(z.dims(), y.dims());
        assert!(to_vec(z).iter().all(|v| v.is_finite()));
    }
}

#[test]
fn irmb_with_zero_projection_is_the_identity() {
    let device = Device::flex();
    let mut b = IrmbConfig::new(16, 16).with_attention(8, 0).init(&device);
    b.proj.weight = b.proj.weight.map(|w| w.zeros_like());
    let x = randn([1, 16, 9, 11], &device);
    assert_eq!(to_vec(b.forward(x.clone())), to_vec(x));
}

#[test]
fn mhsa_global_equals_one_window_covering_the_map() {
    let device = Device::flex();
    let a = MetaMobileBlock::mhsa(32, 4, 0, &device);
    let mut b = a.clone();
    let Operator::Attention(att) = &mut b.operator else { panic!() };
    att.window_size = 12;
    let x = randn([2, 32, 12, 12], &device);
    let d = max_abs_diff(&to_vec(a.forward(x.clone())), &to_vec(b.forward(x)));
    assert!(d < 1e-5, "{d}");
}

#[test]
fn irb_and_ffn_shapes_and_residuals() {
    let device = Device::flex();
    let irb = MetaMobileBlock::irb(16, 24, 6.0, 3, 2, Act::Silu, &device);
    assert!(!irb.skip);
    assert_eq!(irb.forward(randn([1, 16, 15, 15], &device)).dims(), [1, 24, 8, 8]);
    let mut ffn = MetaMobileBlock::ffn(16, 4.0, &device);
    ffn.shrink.weight = ffn.shrink.weight.map(|w| w.zeros_like());
    ffn.shrink.bias = ffn.shrink.bias.map(|b| b.map(|b| b.zeros_like()));
    let x = randn([1, 16, 5, 6], &device);
    assert_eq!(to_vec(ffn.forward(x.clone())), to_vec(x));
}
