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

/// The official computation: zero-pad to whole windows, attend over every token (padded keys
/// included), crop.
fn attend_padded(qk: &burn::nn::conv::Conv2d, x: Tensor<4>, heads: usize, ws: usize) -> Tensor<4> {
    let (xw, g, [b, _, h, w]) = partition(x, ws);
    let dh = xw.dims()[1] / heads;
    let o = emo_model::blocks::attend(qk, xw.clone(), xw, heads, (dh as f64).powf(-0.5));
    unpartition(o, &g, b, h, w)
}

/// `attend_whole_map` (the padded keys collapsed into one) is the padded computation, in values
/// and in the gradients of the input and of the qk conv, on maps smaller than a window and on a
/// full window. The identity is checked in f64, at 1e-10 of the scale. In f32 (what training
/// runs, through the f32 conv kernels) both ways are compared with the exact values: the outputs
/// at 1e-5, the whole-map gradients at 1e-4, or at twice the padded (official) computation's own
/// f32 error where that is larger. On a 1x1 map the qk-weight gradient is a small difference of
/// large terms: both ways are off the f64 values by up to ~1e-4 of its scale there (measured over
/// 1500 random cases), and comparing the two f32 results with each other at 1e-4 failed now and
/// then. The padded computation's f32 gradients are held to 1e-3 of the exact ones.
#[test]
fn whole_map_attention_equals_the_padded_window_in_values_and_gradients() {
    use burn::module::Param;
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2d;
    use burn::tensor::DType;
    let device = Device::flex().autodiff();
    let (c, heads, ws) = (16, 2, 7);
    let weight = Tensor::<4>::random([2 * c, c, 1, 1], Distribution::Normal(0.0, 0.5), &device);
    let bias = Tensor::<1>::random([2 * c], Distribution::Normal(0.0, 1.0), &device);
    let qk = |dtype: DType| Conv2d {
        weight: Param::from_tensor(weight.clone().cast(dtype)),
        bias: Some(Param::from_tensor(bias.clone().cast(dtype))),
        stride: [1, 1],
        kernel_size: [1, 1],
        dilation: [1, 1],
        groups: 1,
        padding: PaddingConfig2d::Explicit(0, 0, 0, 0),
    };
    // max |a - b| over max |b|, failing on an all-zero b
    let rel = |a: &[f64], b: &[f64], what: &str| {
        let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{what}: all zero");
        a.iter().zip(b).fold(0f64, |m, (p, q)| m.max((p - q).abs())) / scale
    };
    // 1x1 (48 padded tokens), 2x2, 3x5, 6x6 and a full window (no padding)
    for (h, w) in [(1, 1), (2, 2), (3, 5), (6, 6), (7, 7)] {
        let x = randn([2, c, h, w], &device);
        // a loss that weights every output differently, so gradients are not symmetric
        let wts = randn([2, c, h, w], &device);
        let dh = c / heads;
        let n_pad = 49 - h * w;
        // (output, x gradient, qk weight gradient, qk bias gradient)
        let run = |dtype: DType, whole: bool| -> [Vec<f64>; 4] {
            let (qk, x) = (qk(dtype), x.clone().cast(dtype).require_grad());
            let y = if whole {
                emo_model::blocks::attend_whole_map(&qk, x.clone(), heads, (dh as f64).powf(-0.5), n_pad)
            } else {
                attend_padded(&qk, x.clone(), heads, ws)
            };
            let g = (y.clone() * wts.clone().cast(dtype)).sum().backward();
            let bias = qk.bias.as_ref().unwrap().val();
            [
                to_vec64(y.inner()),
                to_vec64(x.grad(&g).unwrap()),
                to_vec64(qk.weight.val().grad(&g).unwrap()),
                to_vec64(bias.grad(&g).unwrap()),
            ]
        };
        let exact = run(DType::F64, false);
        let names = ["output", "x gradient", "qk.weight gradient", "qk.bias gradient"];
        for (i, (a, b)) in run(DType::F64, true).iter().zip(&exact).enumerate() {
            let d = rel(a, b, names[i]);
            assert!(d <= 1e-10, "{h}x{w}: f64 whole-map {} differs by {d} of its scale", names[i]);
        }
        let (whole, padded) = (run(DType::F32, true), run(DType::F32, false));
        for (i, name) in names.iter().enumerate() {
            let (dw, dp) = (rel(&whole[i], &exact[i], name), rel(&padded[i], &exact[i], name));
            let (tol_w, tol_p) = if i == 0 { (1e-5, 1e-5) } else { (1e-4f64.max(2.0 * dp), 1e-3) };
            assert!(dp <= tol_p, "{h}x{w}: f32 padded {name} off by {dp} of its scale");
            assert!(dw <= tol_w, "{h}x{w}: f32 whole-map {name} off by {dw} of its scale (padded: {dp})");
        }
    }
}

/// The gradients of `fast` and `slow` (the same conv of `x`, computed two ways, times the same
/// random weights) with respect to the input, the weight and the bias agree to 1e-5 relative
/// to the largest, and none of them is all zero.
fn assert_same_conv_grads(case: &str, conv: &burn::nn::conv::Conv2d, x: &Tensor<4>, fast: Tensor<4>, slow: Tensor<4>) {
    let gf = fast.sum().backward();
    let gs = slow.sum().backward();
    let mut grads = vec![
        ("x", to_vec(x.grad(&gf).unwrap()), to_vec(x.grad(&gs).unwrap())),
        ("weight", to_vec(conv.weight.val().grad(&gf).unwrap()), to_vec(conv.weight.val().grad(&gs).unwrap())),
    ];
    if let Some(b) = &conv.bias {
        grads.push(("bias", to_vec(b.val().grad(&gf).unwrap()), to_vec(b.val().grad(&gs).unwrap())));
    }
    for (name, a, b) in grads {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(&b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(scale > 0.0, "{case}: zero gradient for {name}");
        assert!(diff <= 1e-5 * scale.max(1.0), "{case}: grad {name} diff {diff} (scale {scale})");
    }
}

/// `emo_model::ops::conv2d` (the depthwise extension with its own backward on flex) gives
/// burn's `Conv2d::forward` values and gradients (input, weight, bias) on conv_local shapes:
/// 3x3 / 5x5, stride 1 and 2, maps smaller than the kernel, odd sizes, a dilated layer.
#[test]
fn depthwise_extension_equals_conv2d_in_values_and_gradients() {
    use burn::module::Param;
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2d;
    let device = Device::flex().autodiff();
    for (n, c, h, w, k, s, d, bias) in [
        (2, 48, 16, 16, 3, 1, 1, false),
        (2, 48, 9, 7, 3, 2, 1, true),
        (2, 80, 2, 2, 5, 1, 1, false),
        (3, 80, 1, 1, 5, 1, 1, false),
        (1, 16, 11, 13, 5, 2, 1, true),
        (1, 8, 12, 10, 3, 1, 2, false),
        // Rows of 20+ pixels: the planar loops.
        (2, 8, 40, 36, 3, 1, 1, true),
        (1, 6, 47, 45, 5, 2, 1, false),
    ] {
        let p = d * (k / 2);
        let conv = Conv2d {
            weight: Param::from_tensor(Tensor::random([c, 1, k, k], Distribution::Normal(0.0, 0.5), &device)),
            bias: bias.then(|| Param::from_tensor(Tensor::random([c], Distribution::Normal(0.0, 1.0), &device))),
            stride: [s, s],
            kernel_size: [k, k],
            dilation: [d, d],
            groups: c,
            padding: PaddingConfig2d::Explicit(p, p, p, p),
        };
        let x = randn([n, c, h, w], &device).require_grad();
        let fast = emo_model::ops::conv2d(&conv, x.clone());
        let slow = conv.forward(x.clone());
        assert_eq!(fast.dims(), slow.dims());
        let wts = randn(slow.dims(), &device);
        let (f, sl) = (to_vec(fast.clone().inner()), to_vec(slow.clone().inner()));
        let diff = f.iter().zip(&sl).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-5, "{n}x{c}x{h}x{w} k{k} s{s} d{d}: output diff {diff}");
        assert_same_conv_grads(&format!("{n}x{c}x{h}x{w} k{k} s{s} d{d}"), &conv, &x, fast * wts.clone(), slow * wts);
    }
}

/// `emo_model::ops::conv2d` and `conv2d_with` on one-group convs in training (the extension's
/// GEMM kernels with their own backward on flex) give burn's values and gradients (input,
/// weight, bias): iRMB expansion / projection shapes, a dense head's 1280 -> 256 on a 6x6 map,
/// the stem (3x3 stride 2 from 3 channels), a 3x3 head conv, a dilated conv, odd sizes.
#[test]
fn dense_conv_extension_equals_conv2d_in_values_and_gradients() {
    use burn::module::Param;
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2d;
    use burn::tensor::ops::ConvOptions;
    let device = Device::flex().autodiff();
    for (n, ci, co, h, w, k, s, d, bias) in [
        (2, 24, 96, 20, 20, 1, 1, 1, true),
        (3, 128, 64, 6, 6, 1, 1, 1, false),
        (2, 1280, 256, 6, 6, 1, 1, 1, false),
        (1, 7, 5, 3, 11, 1, 1, 1, true),
        (2, 3, 24, 33, 32, 3, 2, 1, false),
        (2, 64, 32, 12, 12, 3, 1, 1, false),
        (1, 6, 5, 9, 8, 3, 1, 4, true),
    ] {
        let p = d * (k / 2);
        let conv = Conv2d {
            weight: Param::from_tensor(Tensor::random([co, ci, k, k], Distribution::Normal(0.0, 0.5), &device)),
            bias: bias.then(|| Param::from_tensor(Tensor::random([co], Distribution::Normal(0.0, 1.0), &device))),
            stride: [s, s],
            kernel_size: [k, k],
            dilation: [d, d],
            groups: 1,
            padding: PaddingConfig2d::Explicit(p, p, p, p),
        };
        let x = randn([n, ci, h, w], &device).require_grad();
        let options = ConvOptions::new([s, s], [p, p], [d, d], 1);
        assert!(emo_model::ops::dense_training(&x, &conv.weight.val(), &options));
        let b = conv.bias.as_ref().map(|b| b.val());
        for (what, fast) in [
            ("conv2d", emo_model::ops::conv2d(&conv, x.clone())),
            ("conv2d_with", emo_model::ops::conv2d_with(x.clone(), conv.weight.val(), b, options.clone())),
        ] {
            let slow = conv.forward(x.clone());
            assert_eq!(fast.dims(), slow.dims());
            let wts = randn(slow.dims(), &device);
            let (f, sl) = (to_vec(fast.clone().inner()), to_vec(slow.clone().inner()));
            let scale = sl.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = f.iter().zip(&sl).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            let case = format!("{what} {n}x{ci}x{h}x{w} -> {co} k{k} s{s} d{d}");
            assert!(diff <= 1e-5 * scale.max(1.0), "{case}: output diff {diff}");
            assert_same_conv_grads(&case, &conv, &x, fast * wts.clone(), slow * wts);
        }
    }
    // Not the GEMM kernels: without autodiff, grouped, asymmetric padding.
    let o = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
    assert!(!emo_model::ops::dense_training(
        &randn([1, 4, 8, 8], &Device::flex()),
        &randn([4, 4, 1, 1], &Device::flex()),
        &o
    ));
    let x = randn([1, 4, 8, 8], &device);
    assert!(!emo_model::ops::dense_training(
        &x,
        &randn([4, 2, 3, 3], &device),
        &ConvOptions::new([1, 1], [1, 1], [1, 1], 2)
    ));
    let asym = ConvOptions::new_with_padding([1, 1], [(0, 1), (1, 1)], [1, 1], 1);
    assert!(!emo_model::ops::dense_training(&x, &randn([4, 4, 3, 3], &device), &asym));
}

/// `emo_model::ops::activation` (vectorised SiLU / GELU with their own derivative on flex)
/// gives burn's `silu` / `gelu` values and input gradients, including far in the tails.
#[test]
fn activation_extension_equals_burn_activations_in_values_and_gradients() {
    use burn::tensor::activation::{gelu, silu};
    let device = Device::flex().autodiff();
    // The second shape spans several of the forward pass's output chunks (the last one short).
    for (act, shape) in [(Act::Silu, [2, 24, 9, 7]), (Act::Gelu, [2, 24, 9, 7]), (Act::Silu, [2, 24, 20, 19])] {
        let x = (randn(shape, &device) * 4.0).require_grad();
        let wts = randn(shape, &device);
        let fast = emo_model::ops::activation(act, x.clone());
        let slow = match act {
            Act::Silu => silu(x.clone()),
            Act::Gelu => gelu(x.clone()),
        };
        let (f, s) = (to_vec(fast.clone().inner()), to_vec(slow.clone().inner()));
        let diff = f.iter().zip(&s).fold(0f32, |m, (a, b)| m.max((a - b).abs() / (1.0 + b.abs())));
        assert!(diff <= 2e-6, "{act:?}: relative output diff {diff}");
        let gf = (fast * wts.clone()).sum().backward();
        let gs = (slow * wts).sum().backward();
        let (a, b) = (to_vec(x.grad(&gf).unwrap()), to_vec(x.grad(&gs).unwrap()));
        let diff = a.iter().zip(&b).fold(0f32, |m, (p, q)| m.max((p - q).abs() / (1.0 + q.abs())));
        assert!(diff <= 5e-6, "{act:?}: relative gradient diff {diff}");
    }
}

/// Training-mode BatchNorm through the extension (flex: emo-kernels' plane-wise statistics and
/// backward) on EMO's BN shapes (planes from 16x16 down to 1x1), with a channel offset that a
/// one-pass variance would lose. The output and the gradients of the input, gamma and beta are
/// checked against the f64 reference (`emo_kernels::reference`) at 1e-5 of their scale, and so
/// is burn's `BatchNorm::forward` at 1e-4: burn's own f32 arithmetic is off the exact values by
/// up to ~1.3e-5 of the scale on these inputs (the offset costs it digits), so comparing the two
/// f32 results directly at 1e-5 failed now and then. The running statistics (momentum, unbiased
/// variance) must equal burn's.
#[test]
fn batch_norm_extension_equals_burn_batch_norm_in_values_gradients_and_running_stats() {
    use burn::module::Param;
    use burn::nn::{BatchNorm, BatchNormConfig};
    use burn::tensor::TensorData;
    use emo_kernels::reference as exact;
    let device = Device::flex().autodiff();
    for (n, c, h, w) in [(4, 24, 16, 16), (3, 48, 8, 8), (8, 80, 2, 2), (8, 168, 1, 1), (2, 5, 7, 7)] {
        let case = format!("{n}x{c}x{h}x{w}");
        let gamma = Tensor::<1>::random([c], Distribution::Normal(1.0, 0.3), &device).into_data();
        let beta = Tensor::<1>::random([c], Distribution::Normal(0.0, 1.0), &device).into_data();
        let bn = |g: &TensorData, b: &TensorData| -> BatchNorm {
            let mut m = BatchNormConfig::new(c).with_epsilon(1e-6).init(&device);
            m.gamma = Param::from_tensor(Tensor::from_data(g.clone(), &device));
            m.beta = Param::from_tensor(Tensor::from_data(b.clone(), &device));
            m
        };
        let (ours, theirs) = (bn(&gamma, &beta), bn(&gamma, &beta));
        let offset =
            Tensor::<1, burn::tensor::Int>::arange(0..c as i64, &device).float().reshape([1, c, 1, 1]).mul_scalar(0.5);
        let x = (randn([n, c, h, w], &device) * 2.0 + offset).require_grad();
        let fast = emo_model::ops::batch_norm(&ours, x.clone());
        let slow = theirs.forward(x.clone());
        let close = |a: Vec<f32>, b: &[f32], tol: f32, what: &str| {
            let (scale, diff) = (max_abs(b), max_abs_diff(&a, b));
            assert!(scale > 0.0, "{case}: {what}: all zero");
            assert!(diff <= tol * scale.max(1.0), "{case}: {what} differs by {diff} (scale {scale})");
        };
        // The exact values, from the same inputs.
        let (xv, gam, bet) = (
            to_vec(x.clone().inner()),
            gamma.clone().try_into_vec::<f32>().unwrap(),
            beta.clone().try_into_vec::<f32>().unwrap(),
        );
        let wts = randn([n, c, h, w], &device);
        let (mean, var) = exact::batch_norm_stats(&xv, n, c, h * w);
        let y = exact::batch_norm_normalize(&xv, c, h * w, &gam, &bet, &mean, &var, 1e-6);
        let (gx, gg, gb) =
            exact::batch_norm_train_backward(&xv, &to_vec(wts.clone().inner()), n, c, h * w, &gam, &mean, &var, 1e-6);
        close(to_vec(fast.clone().inner()), &y, 1e-5, "output");
        close(to_vec(slow.clone().inner()), &y, 1e-4, "burn's output");
        close(to_vec(ours.running_mean.value_sync()), &to_vec(theirs.running_mean.value_sync()), 1e-6, "running mean");
        close(
            to_vec(ours.running_var.value_sync()),
            &to_vec(theirs.running_var.value_sync()),
            1e-5,
            "running variance",
        );
        let gf = (fast * wts.clone()).sum().backward();
        let gs = (slow * wts).sum().backward();
        for (what, g, exact_g, burn_g) in [
            ("x gradient", to_vec(x.grad(&gf).unwrap()), &gx, to_vec(x.grad(&gs).unwrap())),
            (
                "gamma gradient",
                to_vec(ours.gamma.val().grad(&gf).unwrap()),
                &gg,
                to_vec(theirs.gamma.val().grad(&gs).unwrap()),
            ),
            (
                "beta gradient",
                to_vec(ours.beta.val().grad(&gf).unwrap()),
                &gb,
                to_vec(theirs.beta.val().grad(&gs).unwrap()),
            ),
        ] {
            close(g, exact_g, 1e-5, what);
            close(burn_g, exact_g, 1e-4, &format!("burn's {what}"));
        }
    }
}
