//! The DeepLabv3 ASPP branches with dilations 12 / 24 / 36 on EMO-1M's stage-4 map (208
//! channels in, 256 out, batch 8 as one of two training workers holds): computed on their live
//! taps (`ConvModule::forward`) against burn's full dilated conv (`Conv2d::forward`), forward
//! and forward + backward, in the same run. At 192x192 the map is 6x6 and all three branches
//! reduce to their centre tap; at 512x512 (ADE20K) it is 16x16 and dilations 24 / 36 do.
//!
//! `resize` times the bilinear upsampling of segmentation logits to the label size (11 classes,
//! batch 8, 6x6 -> 192x192 and 16x16 -> 512x512) as two matrix products (`loss::bilinear`, what
//! the heads use) against burn's `interpolate`, forward and forward + backward, in the same run.
//!
//! `seg_loss` times the segmentation loss with its backward on those logits (DeepLabv3's 6x6
//! and the FCN head's 12x12 at 192x192 labels, 16x16 at 512x512): resized inside the kernel
//! (`loss::seg_ce` on the small logits, what training uses) against resizing first with burn
//! ops and taking the loss at full size (`seg_ce(bilinear(x))`, the path before), in the same run.
//!
//! `cargo bench -p emo-dense --bench heads`

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2dConfig;
use burn::tensor::{Device, Distribution, Tensor};
use criterion::{BenchmarkId, Criterion, black_box, criterion_group, criterion_main};
use emo_dense::model::ConvModule;
use emo_spec::HeadAct;

fn aspp(c: &mut Criterion) {
    let device = Device::flex().autodiff();
    let mut g = c.benchmark_group("aspp_dilated_branches");
    g.sample_size(20);
    for side in [6, 16] {
        let branches: Vec<ConvModule> = [12, 24, 36]
            .into_iter()
            .map(|d| ConvModule {
                conv: Conv2dConfig::new([208, 256], [3, 3])
                    .with_dilation([d, d])
                    .with_padding(PaddingConfig2d::Explicit(d, d, d, d))
                    .with_bias(false)
                    .init(&device),
                bn: None,
                act: HeadAct::None,
            })
            .collect();
        let x = Tensor::<4>::random([8, 208, side, side], Distribution::Uniform(-1.0, 1.0), &device).require_grad();
        let run = |live: bool, backward: bool| {
            let outs: Vec<Tensor<4>> =
                branches.iter().map(|m| if live { m.forward(x.clone()) } else { m.conv.forward(x.clone()) }).collect();
            let total = Tensor::cat(outs, 1).sum();
            if backward {
                black_box(total.backward());
            } else {
                black_box(total.into_scalar::<f32>());
            }
        };
        for (name, live) in [("live_taps", true), ("full_conv", false)] {
            g.bench_function(BenchmarkId::new(format!("{name}/forward"), side), |b| b.iter(|| run(live, false)));
            g.bench_function(BenchmarkId::new(format!("{name}/forward_backward"), side), |b| {
                b.iter(|| run(live, true))
            });
        }
    }
    g.finish();
}

fn resize(c: &mut Criterion) {
    use burn::tensor::module::interpolate;
    use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
    let device = Device::flex().autodiff();
    let mut g = c.benchmark_group("bilinear_logits");
    g.sample_size(20);
    for (side, out) in [(6, 192), (16, 512)] {
        let x = Tensor::<4>::random([8, 11, side, side], Distribution::Uniform(-1.0, 1.0), &device).require_grad();
        let run = |matmul: bool, backward: bool| {
            let y = if matmul {
                emo_dense::loss::bilinear(x.clone(), (out, out))
            } else {
                let opts = InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(false);
                interpolate(x.clone(), opts.with_output_size([out, out]))
            };
            let total = y.sum();
            if backward {
                black_box(total.backward());
            } else {
                black_box(total.into_scalar::<f32>());
            }
        };
        for (name, matmul) in [("matmul", true), ("interpolate", false)] {
            g.bench_function(BenchmarkId::new(format!("{name}/forward"), side), |b| b.iter(|| run(matmul, false)));
            g.bench_function(BenchmarkId::new(format!("{name}/forward_backward"), side), |b| {
                b.iter(|| run(matmul, true))
            });
        }
    }
    g.finish();
}

fn seg_loss(c: &mut Criterion) {
    use emo_dense::loss::{bilinear, seg_ce};
    let device = Device::flex().autodiff();
    let mut g = c.benchmark_group("seg_loss");
    g.sample_size(20);
    for (side, out) in [(6, 192), (12, 192), (16, 512)] {
        let x = Tensor::<4>::random([8, 11, side, side], Distribution::Uniform(-4.0, 4.0), &device).require_grad();
        let labels: Vec<u8> = (0..8 * out * out).map(|i| if i % 97 == 5 { 255 } else { (i / 61 % 11) as u8 }).collect();
        for (name, fused) in [("resize_in_kernel", true), ("resize_then_loss", false)] {
            g.bench_function(BenchmarkId::new(name, format!("{side}->{out}")), |b| {
                b.iter(|| {
                    let l = if fused {
                        seg_ce(x.clone(), &labels, (out, out))
                    } else {
                        seg_ce(bilinear(x.clone(), (out, out)), &labels, (out, out))
                    };
                    black_box(l.backward())
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, aspp, resize, seg_loss);
criterion_main!(benches);
