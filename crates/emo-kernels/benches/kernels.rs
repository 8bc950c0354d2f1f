//! Criterion benches of every kernel on EMO layer shapes, each next to a naive baseline, with
//! GFLOP/s (1 multiply-add = 2 FLOP) and the fraction of this machine's peak. The peak is
//! measured in the same run: independent AVX-512 FMA chains on every pool thread
//! (`EMO_PEAK_GFLOPS` overrides it).
//!
//! `cargo bench -p emo-kernels`

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use emo_kernels::Act;
use emo_kernels::attention::window_attention;
use emo_kernels::conv::{self, ConvWeights, Images, conv2d};
use emo_kernels::dwconv::{self, DwGeom, DwLayer, depthwise};
use emo_kernels::fused::dw_matmul;
use emo_kernels::gemm::{Weight, matmul, matmul_reference};
use emo_kernels::norm::layer_norm;

fn rnd(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.5).collect()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_chains(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(0.0); 12];
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm512_fmadd_ps(*x, a, b);
        }
    }
    let mut s = 0.0;
    for x in acc {
        s += _mm512_reduce_add_ps(x);
    }
    s
}

/// Machine FP32 peak in GFLOP/s on the pool's threads.
fn peak() -> f64 {
    static PEAK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *PEAK.get_or_init(|| {
        if let Some(p) = std::env::var("EMO_PEAK_GFLOPS").ok().and_then(|v| v.parse().ok()) {
            return p;
        }
        #[cfg(target_arch = "x86_64")]
        if emo_kernels::isa::level() == emo_kernels::isa::Level::Avx512 {
            let threads = emo_kernels::pool::num_threads();
            let iters = 20_000_000;
            let t = std::time::Instant::now();
            emo_kernels::pool::parallel_for(threads, |_| {
                // SAFETY: AVX-512F is available at this level.
                black_box(unsafe { fma_chains(iters) });
            });
            let p = (threads * iters * 12 * 16 * 2) as f64 / t.elapsed().as_secs_f64() / 1e9;
            eprintln!("measured FP32 FMA peak: {p:.0} GFLOP/s on {threads} threads");
            return p;
        }
        f64::NAN
    })
}

/// Time `f` outside criterion too, to print GFLOP/s and the fraction of peak.
fn report(name: &str, flops: f64, mut f: impl FnMut()) {
    for _ in 0..3 {
        f();
    }
    let iters = 50;
    let t = std::time::Instant::now();
    for _ in 0..iters {
        f();
    }
    let s = t.elapsed().as_secs_f64() / iters as f64;
    let g = flops / s / 1e9;
    eprintln!("{name:<44} {:>9.1} us {:>8.1} GFLOP/s {:>6.1}% of peak", s * 1e6, g, 100.0 * g / peak());
}

fn gemm(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm_1x1");
    // (pixels, c_in, c_out): EMO-1M stage1.0 v at 112^2, stage2 proj, stage3 v, stage4 v; EMO-5M stage3 v
    for (m, k, n) in [(12544, 24, 96), (784, 120, 48), (196, 80, 240), (49, 168, 588), (196, 160, 640)] {
        let a = rnd(m * k);
        let w = Weight::from_torch(&rnd(n * k), n, k);
        let bias = rnd(n);
        let mut out = vec![0.0; m * n];
        let flops = 2.0 * (m * k * n) as f64;
        g.throughput(Throughput::Elements((m * k * n) as u64));
        let id = format!("{m}x{k}x{n}");
        g.bench_with_input(BenchmarkId::new("emo", &id), &(), |b, _| {
            b.iter(|| matmul(black_box(&a), k, m, &w, Some(&bias), Act::Gelu, None, &mut out, n))
        });
        report(&format!("gemm+bias+gelu {id}"), flops, || {
            matmul(&a, k, m, &w, Some(&bias), Act::Gelu, None, &mut out, n)
        });
        if m * k * n < 5_000_000 {
            g.bench_with_input(BenchmarkId::new("naive", &id), &(), |b, _| {
                b.iter(|| matmul_reference(black_box(&a), k, m, &w, Some(&bias), Act::Gelu, None, &mut out, n))
            });
        }
    }
    g.finish();
}

fn dw(c: &mut Criterion) {
    let mut g = c.benchmark_group("depthwise");
    // (h, w, c, k, stride): EMO-1M stage1.0 (s2), stage1.1, stage3 body (k5), stage4 body
    for (h, w, ch, k, s) in [(112, 112, 96, 3, 2), (56, 56, 64, 3, 1), (14, 14, 240, 5, 1), (7, 7, 588, 5, 1)] {
        let geom = DwGeom { k, stride: s, pad: (k - s).div_ceil(2) };
        let x = rnd(h * w * ch);
        let wt = dwconv::weight_from_torch(&rnd(ch * k * k), ch, k);
        let bias = rnd(ch);
        let (oh, ow) = (geom.out_len(h), geom.out_len(w));
        let mut out = vec![0.0; oh * ow * ch];
        let id = format!("{h}x{w}x{ch}_k{k}s{s}");
        let layer = DwLayer { weight: &wt, bias: &bias, geom, act: Act::Silu, residual: s == 1 };
        g.bench_with_input(BenchmarkId::new("emo", &id), &(), |b, _| {
            b.iter(|| depthwise(black_box(&x), 1, h, w, layer, &mut out))
        });
        report(&format!("dw+bias+silu {id}"), 2.0 * (oh * ow * ch * k * k) as f64, || {
            depthwise(&x, 1, h, w, layer, &mut out)
        });
        let wt_t = rnd(ch * k * k);
        g.bench_with_input(BenchmarkId::new("naive", &id), &(), |b, _| {
            b.iter(|| {
                emo_kernels::reference::depthwise(black_box(&x), 1, h, w, ch, &wt_t, &bias, geom, Act::Silu, s == 1)
            })
        });
    }
    g.finish();
}

fn fused(c: &mut Criterion) {
    let mut g = c.benchmark_group("dw_then_proj");
    let (h, w, ch, out_c) = (28, 28, 120, 48);
    let geom = DwGeom { k: 3, stride: 1, pad: 1 };
    let e = rnd(h * w * ch);
    let wt = dwconv::weight_from_torch(&rnd(ch * 9), ch, 3);
    let bias = rnd(ch);
    let proj = Weight::from_torch(&rnd(out_c * ch), out_c, ch);
    let res = rnd(h * w * out_c);
    let (mut y, mut out) = (vec![0.0; h * w * ch], vec![0.0; h * w * out_c]);
    let flops = 2.0 * (h * w * ch * (9 + out_c)) as f64;
    let layer = DwLayer { weight: &wt, bias: &bias, geom, act: Act::Silu, residual: true };
    g.bench_function("fused_28x28x120", |b| {
        b.iter(|| dw_matmul(black_box(&e), 1, h, w, layer, &proj, Some(&res), &mut out))
    });
    report("fused dw+proj 28x28x120->48", flops, || dw_matmul(&e, 1, h, w, layer, &proj, Some(&res), &mut out));
    g.bench_function("separate_28x28x120", |b| {
        b.iter(|| {
            depthwise(black_box(&e), 1, h, w, layer, &mut y);
            matmul(&y, ch, h * w, &proj, None, Act::None, Some((&res, out_c)), &mut out, out_c);
        })
    });
    g.finish();
}

fn others(c: &mut Criterion) {
    let mut g = c.benchmark_group("others");
    // stem conv 3x3 s2, 3 -> 24 on 224^2
    let geom = DwGeom { k: 3, stride: 2, pad: 1 };
    let x = rnd(224 * 224 * 3);
    let wt = conv::weight_from_torch(&rnd(24 * 27), 24, 3, 3);
    let bias = rnd(24);
    let mut out = vec![0.0; 112 * 112 * 24];
    let stem = ConvWeights { weight: &wt, bias: &bias, geom };
    let input = Images { data: &x, planar: true, h: 224, w: 224, c: 3 };
    g.bench_function("stem_conv_224", |b| b.iter(|| conv2d(black_box(input), 1, stem, Act::None, &mut out)));
    report("stem conv 224x224x3 -> 24", 2.0 * (112 * 112 * 24 * 27) as f64, || {
        conv2d(input, 1, stem, Act::None, &mut out)
    });
    // LayerNorm over 80 channels at 14x14 (stage 3)
    let x = rnd(196 * 80);
    let (gm, bt) = (rnd(80), rnd(80));
    let mut o = vec![0.0; 196 * 80];
    g.bench_function("layernorm_196x80", |b| b.iter(|| layer_norm(black_box(&x), 196, 80, &gm, &bt, 1e-6, &mut o)));
    // strided-window attention: EMO-1M stage3 at 224 (4 windows of 7x7, 4 heads of 20)
    let (h, w, ch, heads) = (14, 14, 80, 4);
    let x = rnd(h * w * ch);
    let qk = rnd(h * w * 2 * ch);
    let qb = rnd(2 * ch);
    let mut o = vec![0.0; h * w * ch];
    let flops = 2.0 * 2.0 * (4 * 49 * 49 * ch) as f64;
    g.bench_function("window_attention_14x14x80", |b| {
        b.iter(|| window_attention(black_box(&x), &qk, &qb, 1, h, w, ch, heads, 7, 0.2236, &mut o))
    });
    report("window attention 14x14x80 (4 heads, ws 7)", flops, || {
        window_attention(&x, &qk, &qb, 1, h, w, ch, heads, 7, 0.2236, &mut o)
    });
    g.finish();
}

/// `[h, w, c]` -> `[h * w, 9 * c]` columns of a 3x3 pad-1 conv (the im2col baseline).
fn im2col3x3(x: &[f32], h: usize, w: usize, c: usize, cols: &mut [f32]) {
    for oy in 0..h {
        for ox in 0..w {
            for t in 0..9 {
                let (iy, ix) = ((oy + t / 3).wrapping_sub(1), (ox + t % 3).wrapping_sub(1));
                let dst = &mut cols[((oy * w + ox) * 9 + t) * c..][..c];
                if iy < h && ix < w {
                    dst.copy_from_slice(&x[(iy * w + ix) * c..][..c]);
                } else {
                    dst.fill(0.0);
                }
            }
        }
    }
}

fn conv3x3(c: &mut Criterion) {
    use emo_kernels::winograd::{Winograd3x3, conv3x3};
    let mut g = c.benchmark_group("conv3x3");
    // (h, w, c_in, c_out): RetinaNet-EMO-1M's tower conv on P5 at 1280x800, DeepLabv3's bottleneck
    // at 512x512. GFLOP/s below count the direct conv's multiply-adds for both.
    for (h, w, cin, cout) in [(100, 160, 256, 256), (25, 40, 256, 256), (16, 16, 1280, 256)] {
        let x = rnd(h * w * cin);
        let wt = rnd(cout * cin * 9);
        let bias = rnd(cout);
        let wino = Winograd3x3::from_torch(&wt, cout, cin);
        // The im2col weight: [cout][tap][cin].
        let mut t = vec![0.0; wt.len()];
        for o in 0..cout {
            for i in 0..cin {
                for k in 0..9 {
                    t[(o * 9 + k) * cin + i] = wt[(o * cin + i) * 9 + k];
                }
            }
        }
        let packed = Weight::from_torch(&t, cout, 9 * cin);
        let mut cols = vec![0.0; h * w * 9 * cin];
        let mut out = vec![0.0; h * w * cout];
        let flops = 2.0 * (h * w * cin * cout * 9) as f64;
        let id = format!("{h}x{w}x{cin}x{cout}");
        let relu = (0.0, f32::INFINITY);
        g.bench_with_input(BenchmarkId::new("winograd", &id), &(), |b, _| {
            b.iter(|| conv3x3(black_box(&x), 1, h, w, &wino, &bias, relu, &mut out, cout))
        });
        report(&format!("conv3x3 winograd {id}"), flops, || conv3x3(&x, 1, h, w, &wino, &bias, relu, &mut out, cout));
        let mut im2col = || {
            im2col3x3(&x, h, w, cin, &mut cols);
            matmul(&cols, 9 * cin, h * w, &packed, Some(&bias), Act::None, None, &mut out, cout);
        };
        g.bench_with_input(BenchmarkId::new("im2col_gemm", &id), &(), |b, _| b.iter(&mut im2col));
        report(&format!("conv3x3 im2col+gemm {id}"), flops, im2col);
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = gemm, dw, fused, others, conv3x3
}
criterion_main!(benches);
