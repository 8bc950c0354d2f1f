//! Every kernel against its scalar reference on real EMO layer shapes, at every SIMD level.

use emo_kernels::act::{self, Act};
use emo_kernels::attention::window_attention;
use emo_kernels::conv::{self, ConvWeights, Images, conv2d};
use emo_kernels::dwconv::{self, DwGeom, DwLayer, depthwise};
use emo_kernels::gemm::{Weight, matmul, matmul_reference};
use emo_kernels::isa::{available, with_level};
use emo_kernels::norm::layer_norm;
use emo_kernels::reference;

/// Deterministic pseudo-random values in [-1, 1).
fn rnd(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `len` random labels below `k`, with pixel `i` ignored (255) where `i % every == at`.
fn random_labels(len: usize, k: usize, seed: u64, (every, at): (usize, usize)) -> Vec<u8> {
    rnd(len, seed)
        .iter()
        .enumerate()
        .map(|(i, v)| if i % every == at { 255 } else { (((v + 1.0) * 0.5 * k as f32) as usize).min(k - 1) as u8 })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn activations_match_reference() {
    let xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.01).chain([-100.0, -88.0, 50.0, 90.0]).collect();
    for l in available() {
        for a in [Act::Silu, Act::Gelu] {
            let mut y = xs.clone();
            with_level(l, || act::apply(a, &mut y));
            for (x, y) in xs.iter().zip(&y) {
                let r = reference::act(a, *x);
                assert!((y - r).abs() <= 2e-6 * (1.0 + r.abs()), "{l:?} {a:?}({x}) = {y}, want {r}");
            }
        }
    }
    // exp relative error
    for i in -870..=880 {
        let x = i as f32 * 0.1;
        let (a, b) = (act::exp(x), (x as f64).exp() as f32);
        assert!(((a - b) / b).abs() < 3e-7, "exp({x}) = {a} vs {b}");
    }
}

#[test]
fn gemm_epilogues_on_emo_shapes() {
    // (m = pixels, k = c_in, n = c_out): EMO-1M stage1 v, stage2 proj, stage3 qk, stage4 v; odd m.
    for (m, k, n) in [(3136, 32, 64), (784, 120, 48), (196, 80, 160), (49, 168, 588), (7, 13, 5), (1, 24, 24)] {
        let a = rnd(m * k, 1);
        let w = Weight::from_torch(&rnd(n * k, 2), n, k);
        let bias = rnd(n, 3);
        let res = rnd(m * n, 4);
        for (act, with_res) in [(Act::None, true), (Act::Silu, false), (Act::Gelu, false)] {
            let r = with_res.then_some((&res[..], n));
            let mut want = vec![0.0; m * n];
            matmul_reference(&a, k, m, &w, Some(&bias), act, r, &mut want, n);
            for l in available() {
                let mut got = vec![f32::NAN; m * n];
                with_level(l, || matmul(&a, k, m, &w, Some(&bias), act, r, &mut got, n));
                let d = max_diff(&got, &want);
                assert!(d < 1e-4, "{l:?} m{m} k{k} n{n} {act:?}: {d}");
            }
        }
    }
}

#[test]
fn gemm_with_row_strides() {
    let (m, k, n, lda, ldo) = (50, 20, 30, 33, 41);
    let a = rnd(m * lda, 5);
    let w = Weight::from_torch(&rnd(n * k, 6), n, k);
    let mut want = vec![0.0; m * ldo];
    let mut got = vec![0.0; m * ldo];
    matmul_reference(&a, lda, m, &w, None, Act::None, None, &mut want, ldo);
    matmul(&a, lda, m, &w, None, Act::None, None, &mut got, ldo);
    for r in 0..m {
        assert!(max_diff(&got[r * ldo..r * ldo + n], &want[r * ldo..r * ldo + n]) < 1e-5);
        assert!(got[r * ldo + n..(r + 1) * ldo].iter().all(|&v| v == 0.0), "wrote outside the row");
    }
}

#[test]
fn depthwise_on_emo_shapes() {
    // (batch, h, w, c, k, stride): stem iRMB, stage1 down, stage2 body, stage3 k5 s2 odd, stage4 k5 7x7.
    for (b, h, w, c, k, s) in [
        (1, 112, 112, 24, 3, 1),
        (2, 112, 112, 96, 3, 2),
        (1, 28, 28, 120, 3, 1),
        (1, 15, 29, 288, 5, 2),
        (2, 7, 7, 588, 5, 1),
        (1, 1, 1, 40, 5, 2),
        // run-time kernel path (custom configs): k7 s1 and k7 s2
        (1, 13, 11, 40, 7, 1),
        (1, 13, 11, 48, 7, 2),
    ] {
        let g = DwGeom { k, stride: s, pad: (k - s).div_ceil(2) };
        let x = rnd(b * h * w * c, 7);
        let wt = rnd(c * k * k, 8);
        let bias = rnd(c, 9);
        let packed = dwconv::weight_from_torch(&wt, c, k);
        let (oh, ow) = (g.out_len(h), g.out_len(w));
        assert_eq!((oh, ow), (h.div_ceil(s), w.div_ceil(s)));
        for residual in [false, s == 1] {
            let want = reference::depthwise(&x, b, h, w, c, &wt, &bias, g, Act::Silu, residual);
            for l in available() {
                let mut got = vec![f32::NAN; b * oh * ow * c];
                let dw = DwLayer { weight: &packed, bias: &bias, geom: g, act: Act::Silu, residual };
                with_level(l, || depthwise(&x, b, h, w, dw, &mut got));
                let d = max_diff(&got, &want);
                assert!(d < 2e-5, "{l:?} {b}x{h}x{w}x{c} k{k} s{s} res {residual}: {d}");
            }
        }
    }
}

#[test]
fn stem_conv_matches_reference() {
    // 224: the real shape; 33x17, 12x40 and 1x1: groups of interior pixels cut at the edges.
    for (h, w) in [(224, 224), (33, 17), (12, 40), (1, 1)] {
        let g = DwGeom { k: 3, stride: 2, pad: 1 };
        let x = rnd(2 * h * w * 3, 10);
        let wt = rnd(24 * 3 * 9, 11);
        let bias = rnd(24, 12);
        let want = reference::conv2d(&x, 2, h, w, 3, &wt, &bias, 24, g, Act::None);
        let packed = conv::weight_from_torch(&wt, 24, 3, 3);
        for l in available() {
            let mut got = vec![0.0; want.len()];
            let stem = ConvWeights { weight: &packed, bias: &bias, geom: g };
            let nhwc = Images { data: &x, planar: false, h, w, c: 3 };
            with_level(l, || conv2d(nhwc, 2, stem, Act::None, &mut got));
            assert!(max_diff(&got, &want) < 1e-5, "{l:?} {h}x{w}");
            // the same input in NCHW, read in place
            let mut planar = vec![0.0; x.len()];
            for b in 0..2 {
                for p in 0..h * w {
                    for c in 0..3 {
                        planar[(b * 3 + c) * h * w + p] = x[(b * h * w + p) * 3 + c];
                    }
                }
            }
            let mut got2 = vec![0.0; want.len()];
            let nchw = Images { data: &planar, planar: true, h, w, c: 3 };
            with_level(l, || conv2d(nchw, 2, stem, Act::None, &mut got2));
            assert!(max_diff(&got2, &want) < 1e-5, "{l:?} {h}x{w} planar");
        }
    }
}

#[test]
fn layer_norm_matches_reference() {
    for (p, c) in [(196, 48), (49, 168), (13, 320), (1, 80)] {
        let x: Vec<f32> = rnd(p * c, 13).iter().map(|v| v * 3.0 + 0.5).collect();
        let g = rnd(c, 14);
        let b = rnd(c, 15);
        let want = reference::layer_norm(&x, c, &g, &b, 1e-6);
        for l in available() {
            let mut got = vec![0.0; p * c];
            with_level(l, || layer_norm(&x, p, c, &g, &b, 1e-6, &mut got));
            assert!(max_diff(&got, &want) < 1e-5, "{l:?} {p}x{c}");
        }
    }
}

#[test]
fn window_attention_matches_padded_partition_reference() {
    // (batch, h, w, c, heads, ws): EMO-1M stage3/4 at 224 and 256x192 (padding), global, odd sizes.
    for (b, h, w, c, heads, ws) in [
        (1, 14, 14, 80, 4, 7),
        (2, 16, 12, 80, 4, 7),
        (1, 8, 6, 168, 8, 7),
        (1, 5, 9, 40, 2, 0),
        (1, 3, 11, 32, 2, 4),
        (1, 1, 1, 16, 1, 7),
    ] {
        let x = rnd(b * h * w * c, 16);
        let qk_w: Vec<f32> = rnd(2 * c * c, 17).iter().map(|v| v * 0.3).collect();
        let qk_b = rnd(2 * c, 18);
        let scale = ((c / heads) as f32).powf(-0.5);
        let want = reference::window_attention(&x, &qk_w, &qk_b, b, h, w, c, heads, ws, scale);
        // qk at every real pixel
        let wt = Weight::from_torch(&qk_w, 2 * c, c);
        let mut qk = vec![0.0; b * h * w * 2 * c];
        matmul(&x, c, b * h * w, &wt, Some(&qk_b), Act::None, None, &mut qk, 2 * c);
        for l in available() {
            let mut got = vec![f32::NAN; b * h * w * c];
            with_level(l, || window_attention(&x, &qk, &qk_b, b, h, w, c, heads, ws, scale, &mut got));
            let d = max_diff(&got, &want);
            assert!(d < 2e-5, "{l:?} {b}x{h}x{w}x{c} heads {heads} ws {ws}: {d}");
        }
    }
}

#[test]
fn fused_ln_matmul_and_dw_matmul_match_composed_references() {
    use emo_kernels::fused::{dw_matmul, ln_matmul};
    // LN + qk GEMM (EMO-1M stage3 body at 256x192, batch 2)
    let (p, c, n) = (2 * 16 * 12, 80, 160);
    let x: Vec<f32> = rnd(p * c, 20).iter().map(|v| v * 2.0 + 0.3).collect();
    let (g, b) = (rnd(c, 21), rnd(c, 22));
    let w = Weight::from_torch(&rnd(n * c, 23), n, c);
    let bias = rnd(n, 24);
    let xn_ref = reference::layer_norm(&x, c, &g, &b, 1e-6);
    let mut want = vec![0.0; p * n];
    matmul_reference(&xn_ref, c, p, &w, Some(&bias), Act::Gelu, None, &mut want, n);
    for l in available() {
        let (mut xn, mut got) = (vec![0.0; p * c], vec![0.0; p * n]);
        with_level(l, || ln_matmul(&x, p, c, &g, &b, 1e-6, &mut xn, &w, Some(&bias), Act::Gelu, &mut got));
        assert!(max_diff(&xn, &xn_ref) < 1e-5 && max_diff(&got, &want) < 1e-4, "{l:?}");
    }
    // dw (+inner residual) + proj (+outer residual): stage2 body, and a stride-2 block without residuals
    for (bt, h, w_, c, k, s, out_c) in
        [(2, 28, 28, 120, 3, 1, 48), (1, 29, 15, 96, 3, 2, 32), (1, 7, 7, 588, 5, 1, 168)]
    {
        let skip = s == 1;
        let g = DwGeom { k, stride: s, pad: (k - s).div_ceil(2) };
        let e = rnd(bt * h * w_ * c, 25);
        let (dw_t, dw_b) = (rnd(c * k * k, 26), rnd(c, 27));
        let proj = Weight::from_torch(&rnd(out_c * c, 28), out_c, c);
        let (oh, ow) = (g.out_len(h), g.out_len(w_));
        let res = rnd(bt * oh * ow * out_c, 29);
        let y_ref = reference::depthwise(&e, bt, h, w_, c, &dw_t, &dw_b, g, Act::Silu, skip);
        let mut want = vec![0.0; bt * oh * ow * out_c];
        matmul_reference(
            &y_ref,
            c,
            bt * oh * ow,
            &proj,
            None,
            Act::None,
            skip.then_some((&res[..], out_c)),
            &mut want,
            out_c,
        );
        let dw_w = dwconv::weight_from_torch(&dw_t, c, k);
        for l in available() {
            let mut got = vec![0.0; want.len()];
            with_level(l, || {
                let dw = DwLayer { weight: &dw_w, bias: &dw_b, geom: g, act: Act::Silu, residual: skip };
                dw_matmul(&e, bt, h, w_, dw, &proj, skip.then_some(&res[..]), &mut got)
            });
            assert!(max_diff(&got, &want) < 1e-4, "{l:?} out {h}x{w_}x{c}: {}", max_diff(&got, &want));
        }
    }
}

#[test]
fn fused_stem_matches_composed_references() {
    use emo_kernels::fused::{conv_dw_mean, conv_dw_mean_ranges, matmul_in_place};
    // The stem at 224x224 (3 -> 24, 112x112 out), odd and tiny inputs, and a k = 5 depthwise,
    // in the default split and in 2, 3 and 5 row ranges (range borders, bands, a short last band).
    for (h, w, c, k) in [(224, 224, 24, 3), (37, 11, 24, 3), (1, 1, 8, 3), (3, 5, 16, 3), (45, 27, 24, 5)] {
        let cg = DwGeom { k: 3, stride: 2, pad: 1 };
        let g = DwGeom { k, stride: 1, pad: k / 2 };
        let (oh, ow) = (cg.out_len(h), cg.out_len(w));
        let x = rnd(3 * h * w, 50);
        let (wt, bias) = (rnd(c * 3 * 9, 51), rnd(c, 52));
        let (dw_t, dw_b) = (rnd(c * k * k, 53), rnd(c, 54));
        let proj = Weight::from_torch(&rnd(c * c, 55), c, c);
        // references: NCHW -> NHWC input, conv, depthwise + SiLU, channel means, projection
        let mut nhwc = vec![0.0; x.len()];
        for p in 0..h * w {
            for ch in 0..3 {
                nhwc[p * 3 + ch] = x[ch * h * w + p];
            }
        }
        let conv_out = reference::conv2d(&nhwc, 1, h, w, 3, &wt, &bias, c, cg, Act::None);
        let y_want = reference::depthwise(&conv_out, 1, oh, ow, c, &dw_t, &dw_b, g, Act::Silu, false);
        let mean_want: Vec<f32> =
            (0..c).map(|ch| y_want.iter().skip(ch).step_by(c).sum::<f32>() / (oh * ow) as f32).collect();
        let mut p_want = vec![0.0; y_want.len()];
        matmul_reference(&y_want, c, oh * ow, &proj, None, Act::None, None, &mut p_want, c);
        let packed = conv::weight_from_torch(&wt, c, 3, 3);
        let dw_w = dwconv::weight_from_torch(&dw_t, c, k);
        for l in available() {
            for ranges in [0, 2, 3, 5] {
                let (mut y, mut mean) = (vec![f32::NAN; oh * ow * c], vec![f32::NAN; c]);
                let input = Images { data: &x, planar: true, h, w, c: 3 };
                let stem = ConvWeights { weight: &packed, bias: &bias, geom: cg };
                let dw = ConvWeights { weight: &dw_w, bias: &dw_b, geom: g };
                with_level(l, || {
                    if ranges == 0 {
                        conv_dw_mean(input, stem, dw, Act::Silu, &mut y, &mut mean)
                    } else {
                        conv_dw_mean_ranges(input, stem, dw, Act::Silu, &mut y, &mut mean, ranges)
                    }
                });
                let (dy, dm) = (max_diff(&y, &y_want), max_diff(&mean, &mean_want));
                assert!(dy < 1e-5 && dm < 1e-5, "{l:?} {h}x{w}x{c} k{k} ranges {ranges}: y {dy}, mean {dm}");
                with_level(l, || matmul_in_place(&mut y, oh * ow, &proj));
                let d = max_diff(&y, &p_want);
                assert!(d < 1e-5, "{l:?} {h}x{w}x{c} k{k} ranges {ranges}: projection {d}");
            }
        }
    }
}

#[test]
fn fused_downsampling_block_matches_composed_references() {
    use emo_kernels::fused::v_dw_matmul;
    use emo_kernels::isa::Level;
    if !available().contains(&Level::Avx512) {
        eprintln!("skipping: no AVX-512");
        return;
    }
    // EMO-1M stage1.0 (112 -> 56, 24 -> 96 -> 32) and an odd-sized map, batch 2.
    for (b, h, w, cin, mid, cout) in [(1, 112, 112, 24, 96, 32), (2, 37, 21, 32, 160, 48)] {
        let g = DwGeom { k: 3, stride: 2, pad: 1 };
        let x = rnd(b * h * w * cin, 30);
        let v = Weight::from_torch(&rnd(mid * cin, 31), mid, cin);
        let vb = rnd(mid, 32);
        let (dw_t, dw_b) = (rnd(mid * 9, 33), rnd(mid, 34));
        let proj = Weight::from_torch(&rnd(cout * mid, 35), cout, mid);
        let mut e = vec![0.0; b * h * w * mid];
        matmul_reference(&x, cin, b * h * w, &v, Some(&vb), Act::Silu, None, &mut e, mid);
        let y = reference::depthwise(&e, b, h, w, mid, &dw_t, &dw_b, g, Act::Silu, false);
        let (oh, ow) = (g.out_len(h), g.out_len(w));
        let mut want = vec![0.0; b * oh * ow * cout];
        matmul_reference(&y, mid, b * oh * ow, &proj, None, Act::None, None, &mut want, cout);
        let mut got = vec![f32::NAN; want.len()];
        let dw_w = dwconv::weight_from_torch(&dw_t, mid, 3);
        let dw = DwLayer { weight: &dw_w, bias: &dw_b, geom: g, act: Act::Silu, residual: false };
        assert!(with_level(Level::Avx512, || v_dw_matmul(&x, b, h, w, (&v, &vb, Act::Silu), dw, &proj, &mut got)));
        let d = max_diff(&got, &want);
        assert!(d < 1e-4, "{b}x{h}x{w}: {d}");
        assert!(!with_level(Level::Generic, || v_dw_matmul(&x, b, h, w, (&v, &vb, Act::Silu), dw, &proj, &mut got)));
    }
}

/// The NCHW training kernels (forward, input and weight gradients) against their references
/// on conv_local shapes: 3x3 / 5x5, stride 1 and 2, maps smaller than the kernel (1x1, 2x2),
/// odd sizes, and a dilated layer.
#[test]
fn nchw_depthwise_training_kernels_match_reference() {
    use emo_kernels::dwgrad::{self, DwLayout, DwPlan};
    let cases = [
        // n, c, h, w, k, stride, dilation
        (2, 48, 16, 16, 3, 1, 1),
        (2, 48, 16, 16, 3, 2, 1),
        (3, 20, 9, 7, 3, 2, 1),
        (2, 80, 2, 2, 5, 1, 1),
        (2, 80, 1, 1, 5, 1, 1),
        (1, 16, 4, 4, 5, 2, 1),
        (1, 8, 11, 13, 5, 1, 1),
        (1, 8, 12, 10, 3, 1, 2),
        (2, 6, 24, 24, 3, 2, 2),
        (1, 4, 48, 40, 5, 1, 1),
        (1, 4, 47, 45, 5, 2, 1),
        (2, 3, 33, 35, 3, 2, 1),
    ];
    for (n, c, h, w, k, s, d) in cases {
        let p = DwPlan { n, c, h, w, kh: k, kw: k, stride: [s, s], pad: [d * (k / 2); 2], dilation: [d, d] };
        let x = rnd(p.input_len(), 1);
        let wt = rnd(p.weight_len(), 2);
        let g = rnd(p.output_len(), 3);
        let close = |got: &[f32], want: &[f32], what: &str| {
            assert_eq!(got.len(), want.len());
            for (i, (a, b)) in got.iter().zip(want).enumerate() {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{what} {p:?} [{i}]: {a} vs {b}");
            }
        };
        // Both loop layouts on every shape, and the one the public functions choose.
        for layout in [DwLayout::Planar, DwLayout::ChannelsLast] {
            let mut out = vec![f32::NAN; p.output_len()];
            dwgrad::forward_in(layout, &x, &wt, &p, &mut out);
            close(&out, &reference::depthwise_nchw(&x, &wt, &p), &format!("{layout:?} forward"));
            let mut gx = vec![f32::NAN; p.input_len()];
            dwgrad::x_grad_in(layout, &g, &wt, &p, &mut gx);
            close(&gx, &reference::depthwise_nchw_x_grad(&g, &wt, &p), &format!("{layout:?} x_grad"));
            let mut gw = vec![f32::NAN; p.weight_len()];
            dwgrad::weight_grad_in(layout, &x, &g, &p, &mut gw);
            close(&gw, &reference::depthwise_nchw_weight_grad(&x, &g, &p), &format!("{layout:?} weight_grad"));
        }
        let mut out = vec![f32::NAN; p.output_len()];
        dwgrad::forward(&x, &wt, &p, &mut out);
        close(&out, &reference::depthwise_nchw(&x, &wt, &p), "forward");
    }
    let big = DwPlan { n: 1, c: 1, h: 32, w: 32, kh: 3, kw: 3, stride: [1, 1], pad: [1, 1], dilation: [1, 1] };
    assert_eq!(big.layout(), DwLayout::Planar);
    assert_eq!(DwPlan { h: 12, w: 12, ..big }.layout(), DwLayout::ChannelsLast);
}

/// The NCHW one-group conv training kernels against the f64 reference: EMO's 1x1 shapes
/// (expansion, projection, the dense heads' 1280 -> 256 on a 6x6 map), the stem (3x3 stride 2
/// from 3 channels), a 3x3 head conv, a dilated conv, odd sizes, a 1x1 map.
#[test]
fn nchw_conv_training_kernels_match_reference() {
    use emo_kernels::convgrad::{self, ConvPlan};
    let pw = ConvPlan::pointwise;
    let k = |n, ci, co, h, w, k: usize, s, d: usize| ConvPlan {
        n,
        ci,
        co,
        h,
        w,
        kh: k,
        kw: k,
        stride: [s, s],
        pad: [d * (k / 2); 2],
        dilation: [d, d],
    };
    for p in [
        pw(2, 24, 96, 48 * 48),
        pw(3, 128, 512, 36),
        pw(2, 1280, 256, 36),
        pw(1, 7, 5, 13),
        pw(4, 33, 17, 1),
        k(2, 3, 24, 33, 31, 3, 2, 1),
        k(2, 160, 32, 6, 6, 3, 1, 1),
        k(1, 12, 10, 12, 12, 3, 1, 1),
        k(1, 5, 7, 9, 8, 3, 1, 4),
        k(2, 6, 4, 2, 2, 3, 1, 1),
        ConvPlan { pad: [0, 1], ..k(1, 4, 3, 7, 9, 3, 2, 1) },
    ] {
        let (x, w, g) = (rnd(p.input_len(), 1), rnd(p.weight_len(), 2), rnd(p.output_len(), 3));
        let (y_ref, gx_ref, gw_ref) = reference::conv_nchw(&x, &w, &g, &p);
        let (oh, ow) = p.out_hw();
        // Sums of up to ci·kh·kw (forward), co·kh·kw (input) or n·oh·ow (weight) products of
        // values in [-1, 1].
        let close = |got: &[f32], want: &[f32], terms: usize, what: &str| {
            assert_eq!(got.len(), want.len());
            let tol = 8e-6 * (terms as f32).sqrt().max(1.0);
            for (i, (a, b)) in got.iter().zip(want).enumerate() {
                assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{what} {p:?} [{i}]: {a} vs {b}");
            }
        };
        let kk = p.kh * p.kw;
        let mut y = vec![f32::NAN; p.output_len()];
        convgrad::forward(&x, &w, &p, &mut y);
        close(&y, &y_ref, p.ci * kk, "forward");
        let mut gx = vec![f32::NAN; p.input_len()];
        convgrad::x_grad(&g, &w, &p, &mut gx);
        close(&gx, &gx_ref, p.co * kk, "x_grad");
        let mut gw = vec![f32::NAN; p.weight_len()];
        convgrad::weight_grad(&x, &g, &p, &mut gw);
        close(&gw, &gw_ref, p.n * oh * ow, "weight_grad");
    }
}

/// The training activations (out-of-place forward, derivative times an incoming gradient)
/// against the f64 references, and the derivative against a central difference of the
/// reference activation.
#[test]
fn activation_gradients_match_reference() {
    let xs: Vec<f32> =
        (-2000..=2000).map(|i| i as f32 * 0.005).chain([-100.0, -88.0, -20.0, 20.0, 50.0, 90.0]).collect();
    let gs = rnd(xs.len(), 7);
    for l in available() {
        for a in [Act::Silu, Act::Gelu] {
            let mut y = vec![f32::NAN; xs.len()];
            with_level(l, || act::apply_to(a, &xs, &mut y));
            let mut g = gs.clone();
            with_level(l, || act::backward(a, &xs, &mut g));
            for i in 0..xs.len() {
                let (x, r) = (xs[i], reference::act(a, xs[i]));
                assert!((y[i] - r).abs() <= 2e-6 * (1.0 + r.abs()), "{l:?} {a:?}({x}) = {}, want {r}", y[i]);
                let d = reference::act_derivative(a, x);
                let want = gs[i] * d;
                assert!((g[i] - want).abs() <= 2e-6 * (1.0 + want.abs()), "{l:?} {a:?}'({x}): {} vs {want}", g[i]);
                if x.abs() < 8.0 {
                    let h = 1e-3f64;
                    let f = |v: f64| reference::act(a, v as f32) as f64;
                    let fd = (f(x as f64 + h) - f(x as f64 - h)) / (2.0 * h);
                    assert!((d as f64 - fd).abs() <= 2e-3, "{a:?}'({x}) = {d}, finite difference {fd}");
                }
            }
        }
    }
}

/// The pixel softmax cross-entropy (loss sum, count, gradient) against the f64 reference at
/// every SIMD level: DeepLabv3's 11 classes on a map whose pixel count is not a multiple of the
/// 64-pixel block, ignored (255) and out-of-range labels, large logits (softmax overflow if the
/// max were not subtracted), and one class.
#[test]
fn pixel_cross_entropy_matches_reference() {
    use emo_kernels::xent::softmax_xent_at;
    let cases = [(2, 11, 13 * 11, 1.0), (3, 5, 64, 0.01), (1, 2, 200, 0.5), (2, 1, 7, 1.0), (1, 19, 150, 1.0)];
    for (n, k, p, scale) in cases {
        let mut x: Vec<f32> = rnd(n * k * p, 11).iter().map(|v| v * 8.0).collect();
        x[0] = 95.0;
        x[1] = -120.0;
        let labels: Vec<u8> = rnd(n * p, 12)
            .iter()
            .enumerate()
            .map(|(i, v)| match i % 17 {
                3 => 255,
                9 => k as u8,
                _ => (((v + 1.0) * 0.5 * k as f32) as usize).min(k - 1) as u8,
            })
            .collect();
        for eps in [0.0, 0.1, 1.0] {
            let (want_g, want_loss, want_count) = reference::softmax_xent(&x, &labels, k, p, scale, eps as f64);
            assert!(want_count > 0 && want_count < n * p);
            for l in available() {
                let mut g = vec![f32::NAN; x.len()];
                let got = softmax_xent_at(l, &x, &labels, k, p, scale, eps, &mut g);
                let what = format!("{l:?} n{n} k{k} p{p} eps {eps}");
                same_loss_sum(got, want_loss, want_count, &what);
                let d = max_diff(&g, &want_g);
                assert!(d <= 1e-6 * scale.max(1.0), "{what}: gradient differs by {d}");
            }
        }
    }
}

/// A pixel-loss kernel's sum against the reference's: the same count, the loss to 1e-5.
fn same_loss_sum(got: emo_kernels::xent::XentSum, want_loss: f64, want_count: usize, what: &str) {
    assert_eq!(got.count, want_count, "{what}");
    assert!((got.loss - want_loss).abs() <= 1e-5 * (1.0 + want_loss.abs()), "{what}: loss {} vs {want_loss}", got.loss);
}

/// Label smoothing raises the loss of a confident right answer (the smoothed target is not
/// one-hot) and moves its gradient from the label to the other classes, `eps / k` each.
#[test]
fn label_smoothing_spreads_the_target() {
    use emo_kernels::xent::softmax_xent;
    let k = 11;
    let mut one = vec![0f32; k];
    one[3] = 20.0;
    let (mut g0, mut g1) = (vec![0f32; k], vec![0f32; k]);
    let sharp = softmax_xent(&one, &[3], k, 1, 1.0, 0.0, &mut g0).loss;
    let smooth = softmax_xent(&one, &[3], k, 1, 1.0, 0.1, &mut g1).loss;
    assert!(sharp < 1e-6 && smooth > 1.0, "{sharp} {smooth}");
    for c in 0..k {
        let want = if c == 3 { g0[c] + 0.1 - 0.1 / k as f32 } else { g0[c] - 0.1 / k as f32 };
        assert!((g1[c] - want).abs() <= 1e-6, "class {c}: {} vs {want}", g1[c]);
    }
}

/// Training-mode BatchNorm (statistics, normalisation, backward) against the f64 reference at
/// every SIMD level, on EMO's BN shapes at a 32x32 input (16x16 down to 1x1 planes, a plane
/// length that is not a multiple of 16) and with a large offset (a one-pass variance,
/// E[x^2] - E[x]^2, would lose it).
#[test]
fn batch_norm_training_kernels_match_reference() {
    use emo_kernels::bnorm::{backward_at, normalize_at, stats_at};
    let cases = [(4, 24, 256), (3, 48, 64), (8, 80, 4), (8, 168, 1), (2, 5, 49), (1, 3, 300)];
    for (n, c, hw) in cases {
        let len = n * c * hw;
        let x: Vec<f32> = rnd(len, 21).iter().enumerate().map(|(i, v)| v * 3.0 + (i / hw % c) as f32 * 10.0).collect();
        let g = rnd(len, 22);
        let gamma: Vec<f32> = rnd(c, 23).iter().map(|v| 1.0 + v * 0.5).collect();
        let beta = rnd(c, 24);
        let eps = 1e-6;
        let (want_mean, want_var) = reference::batch_norm_stats(&x, n, c, hw);
        let close = |got: &[f32], want: &[f32], tol: f32, what: &str| {
            assert_eq!(got.len(), want.len());
            for (i, (a, b)) in got.iter().zip(want).enumerate() {
                assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{what} n{n} c{c} hw{hw} [{i}]: {a} vs {b}");
            }
        };
        for l in available() {
            let (mut mean, mut var) = (vec![f32::NAN; c], vec![f32::NAN; c]);
            stats_at(l, &x, n, c, hw, &mut mean, &mut var);
            close(&mean, &want_mean, 1e-6, "mean");
            close(&var, &want_var, 1e-5, "variance");
            // Normalisation and backward take the (f32) statistics of the forward pass, as burn's.
            let want_y = reference::batch_norm_normalize(&x, c, hw, &gamma, &beta, &mean, &var, eps);
            let mut y = vec![f32::NAN; len];
            normalize_at(l, &x, n, c, hw, &gamma, &beta, &mean, &var, eps, &mut y);
            close(&y, &want_y, 2e-5, "output");
            let (want_gx, want_gg, want_gb) =
                reference::batch_norm_train_backward(&x, &g, n, c, hw, &gamma, &mean, &var, eps);
            let (mut gx, mut gg, mut gb) = (vec![f32::NAN; len], vec![f32::NAN; c], vec![f32::NAN; c]);
            backward_at(l, &x, &g, n, c, hw, &gamma, &mean, &var, eps, &mut gx, &mut gg, &mut gb);
            close(&gx, &want_gx, 2e-4, "x_grad");
            close(&gg, &want_gg, 1e-5, "gamma_grad");
            close(&gb, &want_gb, 1e-5, "beta_grad");
        }
    }
}

/// The label probabilities OHEM ranks pixels by, against the f64 reference at every SIMD level:
/// resized (DeepLabv3's 6x6 at 192x192, odd sizes, a shrink) and unresized logits, ignored pixels.
#[test]
fn resized_label_probabilities_match_reference() {
    use emo_kernels::xent::resized_label_prob_at;
    for (n, k, (h, w), (oh, ow)) in
        [(2, 11, (6, 6), (192, 192)), (1, 3, (5, 7), (9, 13)), (1, 5, (9, 7), (4, 3)), (2, 4, (3, 5), (3, 5))]
    {
        let x: Vec<f32> = rnd(n * k * h * w, 41).iter().map(|v| v * 6.0).collect();
        let labels = random_labels(n * oh * ow, k, 42, (11, 3));
        let want = reference::resized_label_prob(&x, (h, w), &labels, (oh, ow), k);
        assert!(want.iter().any(|&p| p < 0.1) && want.iter().any(|&p| p > 0.5 && p < 1.0));
        for l in available() {
            let got = resized_label_prob_at(l, &x, (h, w), &labels, (oh, ow), k);
            assert_eq!(got.len(), want.len());
            for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
                assert!((g as f64 - e).abs() <= 2e-6, "{l:?} n{n} k{k} {h}x{w} -> {oh}x{ow} pixel {i}: {g} vs {e}");
            }
        }
    }
}

/// The segmentation loss on logits smaller than the label map (resized inside the kernel, image
/// by image) against the f64 reference at every SIMD level: DeepLabv3's 6x6 and its auxiliary
/// head's 12x12 logits at a 192x192 label map, odd sizes, a shrinking resize, ignored pixels.
#[test]
fn resized_pixel_cross_entropy_matches_reference() {
    use emo_kernels::xent::resized_softmax_xent_at;
    let cases = [
        (2, 11, (6, 6), (192, 192), 1.0),
        (1, 11, (12, 12), (192, 192), 0.4),
        (1, 3, (5, 7), (9, 13), 1.0),
        (3, 4, (2, 3), (9, 13), 0.01),
        (1, 5, (9, 7), (4, 3), 1.0),
        (2, 2, (1, 1), (3, 5), 1.0),
    ];
    for (n, k, (h, w), (oh, ow), scale) in cases {
        let x: Vec<f32> = rnd(n * k * h * w, 31).iter().map(|v| v * 6.0).collect();
        let labels = random_labels(n * oh * ow, k, 32, (13, 5));
        for eps in [0.0, 0.1] {
            let (want_g, want_loss, want_count) =
                reference::resized_softmax_xent(&x, (h, w), &labels, (oh, ow), k, scale, eps as f64);
            assert!(want_count > 0 && want_count < n * oh * ow);
            let largest = want_g.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            assert!(largest > 0.0);
            for l in available() {
                let mut g = vec![f32::NAN; x.len()];
                let got = resized_softmax_xent_at(l, &x, (h, w), &labels, (oh, ow), k, scale, eps, &mut g);
                let what = format!("{l:?} n{n} k{k} {h}x{w} -> {oh}x{ow} eps {eps}");
                same_loss_sum(got, want_loss, want_count, &what);
                let d = max_diff(&g, &want_g);
                assert!(d <= 1e-5 * largest, "{what}: gradient differs by {d} (largest {largest})");
            }
        }
    }
}

#[test]
fn winograd_3x3_matches_direct_conv_on_head_shapes() {
    use emo_kernels::winograd::{Winograd3x3, conv3x3};
    // (batch, h, w, cin, cout): a RetinaNet tower conv on a small map, odd sizes that leave
    // partial tiles, a map smaller than one tile, and more output than input channels.
    for (case, &(batch, h, w, cin, cout)) in
        [(1, 13, 10, 256, 256), (2, 7, 5, 19, 37), (1, 3, 2, 16, 8), (1, 9, 12, 40, 100)].iter().enumerate()
    {
        let x = rnd(batch * h * w * cin, 100 + case as u64);
        let wt = rnd(cout * cin * 9, 200 + case as u64);
        let bias = rnd(cout, 300 + case as u64);
        let g = DwGeom { k: 3, stride: 1, pad: 1 };
        let want = reference::conv2d(&x, batch, h, w, cin, &wt, &bias, cout, g, Act::None);
        // Bound: a few f32 ulps of the magnitude summed per output (sum of |x| |w| over 9 cin taps).
        let scale = 9.0 * cin as f32 * 0.25;
        let wino = Winograd3x3::from_torch(&wt, cout, cin);
        // The same weight laid out [cout, 3, 3, cin] (the dense engine's) transforms the same.
        let mut taps_last = vec![0.0; wt.len()];
        for (j, v) in wt.iter().enumerate() {
            let (o, i, t) = (j / (cin * 9), j / 9 % cin, j % 9);
            taps_last[(o * 9 + t) * cin + i] = *v;
        }
        assert_eq!(Winograd3x3::new(&taps_last, cout, cin, (9 * cin, cin, 1)), wino);
        for l in available() {
            // Written into columns 3..3 + cout of a wider map, with a ReLU clamp, too.
            let ldo = cout + 5;
            for (clamp, relu) in [((f32::NEG_INFINITY, f32::INFINITY), false), ((0.0, f32::INFINITY), true)] {
                let mut out = vec![f32::NAN; batch * h * w * ldo];
                with_level(l, || conv3x3(&x, batch, h, w, &wino, &bias, clamp, &mut out[3..], ldo));
                let mut worst = 0f32;
                for p in 0..batch * h * w {
                    let row = &out[p * ldo..(p + 1) * ldo];
                    assert!(
                        row[..3].iter().chain(&row[3 + cout..]).all(|v| v.is_nan()),
                        "{l:?}: wrote outside its columns"
                    );
                    for c in 0..cout {
                        let r = want[p * cout + c];
                        let r = if relu { r.max(0.0) } else { r };
                        worst = worst.max((row[3 + c] - r).abs());
                    }
                }
                eprintln!("winograd case {case} {l:?} relu {relu}: max diff {worst:e} (scale {scale})");
                assert!(worst <= 1e-6 * scale, "case {case} {l:?}: max diff {worst} vs direct conv");
            }
        }
    }
}
