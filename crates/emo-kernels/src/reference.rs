//! Scalar references (f64 accumulation, libm functions) for every kernel. Slow and obvious;
//! the tests compare the fast kernels against these on EMO's real shapes.

use crate::act::Act;
use crate::attention::Windows;
use crate::dwconv::DwGeom;

/// erf to ~1e-12 for |x| <= 4 (Taylor series in f64); ±1 beyond (erfc(4) < f32 epsilon).
pub fn erf(x: f64) -> f64 {
    if x.abs() > 4.0 {
        return x.signum();
    }
    let (mut term, mut sum, x2) = (x, x, x * x);
    for n in 1..200 {
        term *= -x2 / n as f64;
        let add = term / (2 * n + 1) as f64;
        sum += add;
        if add.abs() < 1e-17 {
            break;
        }
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

pub fn act(a: Act, x: f32) -> f32 {
    let x = x as f64;
    (match a {
        Act::None => x,
        Act::Silu => x / (1.0 + (-x).exp()),
        Act::Gelu => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
    }) as f32
}

/// The activation's derivative in f64 (SiLU: s (1 + x (1 - s)); GELU: Phi(x) + x phi(x)).
pub fn act_derivative(a: Act, x: f32) -> f32 {
    let x = x as f64;
    (match a {
        Act::None => 1.0,
        Act::Silu => {
            let s = 1.0 / (1.0 + (-x).exp());
            s * (1.0 + x * (1.0 - s))
        }
        Act::Gelu => {
            0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2))
                + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
        }
    }) as f32
}

/// Reference of `dwconv::depthwise` with a PyTorch `[c, 1, k, k]` weight.
#[allow(clippy::too_many_arguments)]
pub fn depthwise(
    x: &[f32],
    batch: usize,
    h: usize,
    w: usize,
    c: usize,
    wt: &[f32],
    bias: &[f32],
    g: DwGeom,
    a: Act,
    residual: bool,
) -> Vec<f32> {
    let (oh, ow) = (g.out_len(h), g.out_len(w));
    let mut out = vec![0.0; batch * oh * ow * c];
    for b in 0..batch {
        for oy in 0..oh {
            for ox in 0..ow {
                for ch in 0..c {
                    let mut s = bias[ch] as f64;
                    for ky in 0..g.k {
                        for kx in 0..g.k {
                            let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                            let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                            if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                s += x[((b * h + iy as usize) * w + ix as usize) * c + ch] as f64
                                    * wt[(ch * g.k + ky) * g.k + kx] as f64;
                            }
                        }
                    }
                    let mut v = act(a, s as f32);
                    if residual {
                        v += x[((b * h + oy) * w + ox) * c + ch];
                    }
                    out[((b * oh + oy) * ow + ox) * c + ch] = v;
                }
            }
        }
    }
    out
}

/// Reference of `conv::conv2d` with a PyTorch `[cout, cin, k, k]` weight.
#[allow(clippy::too_many_arguments)]
pub fn conv2d(
    x: &[f32],
    batch: usize,
    h: usize,
    w: usize,
    cin: usize,
    wt: &[f32],
    bias: &[f32],
    cout: usize,
    g: DwGeom,
    a: Act,
) -> Vec<f32> {
    let (oh, ow) = (g.out_len(h), g.out_len(w));
    let mut out = vec![0.0; batch * oh * ow * cout];
    for b in 0..batch {
        for oy in 0..oh {
            for ox in 0..ow {
                for co in 0..cout {
                    let mut s = bias[co] as f64;
                    for ci in 0..cin {
                        for ky in 0..g.k {
                            for kx in 0..g.k {
                                let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                                let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    s += x[((b * h + iy as usize) * w + ix as usize) * cin + ci] as f64
                                        * wt[((co * cin + ci) * g.k + ky) * g.k + kx] as f64;
                                }
                            }
                        }
                    }
                    out[((b * oh + oy) * ow + ox) * cout + co] = act(a, s as f32);
                }
            }
        }
    }
    out
}

/// Reference LayerNorm over channels.
pub fn layer_norm(x: &[f32], c: usize, gamma: &[f32], beta: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for (xr, or) in x.chunks(c).zip(out.chunks_mut(c)) {
        let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
        for i in 0..c {
            or[i] = (((xr[i] as f64 - mean) / (var + eps as f64).sqrt()) * gamma[i] as f64 + beta[i] as f64) as f32;
        }
    }
    out
}

/// Reference strided-window attention: explicit zero padding, explicit partition, softmax over
/// all tokens of the window (padded keys included), crop. `qk_w` is PyTorch `[2c, c]`.
#[allow(clippy::too_many_arguments)]
pub fn window_attention(
    x: &[f32],
    qk_w: &[f32],
    qk_b: &[f32],
    batch: usize,
    h: usize,
    w: usize,
    c: usize,
    heads: usize,
    ws: usize,
    scale: f32,
) -> Vec<f32> {
    let g = Windows::new(h, w, ws);
    let (hp, wp) = (g.wh * g.n1, g.ww * g.n2);
    let dh = c / heads;
    let l = g.wh * g.ww;
    let mut out = vec![0.0; batch * h * w * c];
    for b in 0..batch {
        // padded map and its q / k
        let mut xp = vec![0f64; hp * wp * c];
        for y in 0..h {
            for xx in 0..w {
                for ch in 0..c {
                    xp[(y * wp + xx) * c + ch] = x[((b * h + y) * w + xx) * c + ch] as f64;
                }
            }
        }
        let mut qk = vec![0f64; hp * wp * 2 * c];
        for p in 0..hp * wp {
            for o in 0..2 * c {
                qk[p * 2 * c + o] =
                    qk_b[o] as f64 + (0..c).map(|i| qk_w[o * c + i] as f64 * xp[p * c + i]).sum::<f64>();
            }
        }
        for i1 in 0..g.n1 {
            for i2 in 0..g.n2 {
                let tok = |t: usize| ((t / g.ww) * g.n1 + i1, (t % g.ww) * g.n2 + i2);
                for hd in 0..heads {
                    for qi in 0..l {
                        let (qy, qx) = tok(qi);
                        if qy >= h || qx >= w {
                            continue;
                        }
                        let qp = qy * wp + qx;
                        let logits: Vec<f64> = (0..l)
                            .map(|kj| {
                                let (ky, kx) = tok(kj);
                                let kp = ky * wp + kx;
                                (0..dh)
                                    .map(|d| qk[qp * 2 * c + hd * dh + d] * qk[kp * 2 * c + c + hd * dh + d])
                                    .sum::<f64>()
                                    * scale as f64
                            })
                            .collect();
                        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = logits.iter().map(|v| (v - m).exp()).collect();
                        let z: f64 = e.iter().sum();
                        for d in 0..dh {
                            let mut s = 0.0;
                            for (kj, ej) in e.iter().enumerate() {
                                let (ky, kx) = tok(kj);
                                s += ej / z * xp[(ky * wp + kx) * c + hd * dh + d];
                            }
                            out[((b * h + qy) * w + qx) * c + hd * dh + d] = s as f32;
                        }
                    }
                }
            }
        }
    }
    out
}

/// Visit every (plane, output pixel, kernel tap) of an NCHW depthwise conv that reads a pixel
/// inside the input: `f(plane, output index, input index, weight index)`.
fn each_nchw_tap(p: &crate::dwgrad::DwPlan, mut f: impl FnMut(usize, usize, usize)) {
    let (oh, ow) = p.out_hw();
    for plane in 0..p.n * p.c {
        for oy in 0..oh {
            for ox in 0..ow {
                for ky in 0..p.kh {
                    for kx in 0..p.kw {
                        let iy = (oy * p.stride[0] + ky * p.dilation[0]) as isize - p.pad[0] as isize;
                        let ix = (ox * p.stride[1] + kx * p.dilation[1]) as isize - p.pad[1] as isize;
                        if iy >= 0 && ix >= 0 && (iy as usize) < p.h && (ix as usize) < p.w {
                            let o = (plane * oh + oy) * ow + ox;
                            let i = (plane * p.h + iy as usize) * p.w + ix as usize;
                            f(o, i, ((plane % p.c) * p.kh + ky) * p.kw + kx);
                        }
                    }
                }
            }
        }
    }
}

/// Reference of `dwgrad::forward` (f64 sums).
pub fn depthwise_nchw(x: &[f32], wt: &[f32], p: &crate::dwgrad::DwPlan) -> Vec<f32> {
    let mut out = vec![0f64; p.output_len()];
    each_nchw_tap(p, |o, i, k| out[o] += x[i] as f64 * wt[k] as f64);
    out.into_iter().map(|v| v as f32).collect()
}

/// Reference of `dwgrad::x_grad`: every output's gradient sent back along each tap.
pub fn depthwise_nchw_x_grad(g: &[f32], wt: &[f32], p: &crate::dwgrad::DwPlan) -> Vec<f32> {
    let mut gx = vec![0f64; p.input_len()];
    each_nchw_tap(p, |o, i, k| gx[i] += g[o] as f64 * wt[k] as f64);
    gx.into_iter().map(|v| v as f32).collect()
}

/// Reference of `dwgrad::weight_grad`.
pub fn depthwise_nchw_weight_grad(x: &[f32], g: &[f32], p: &crate::dwgrad::DwPlan) -> Vec<f32> {
    let mut gw = vec![0f64; p.weight_len()];
    each_nchw_tap(p, |o, i, k| gw[k] += g[o] as f64 * x[i] as f64);
    gw.into_iter().map(|v| v as f32).collect()
}

/// Reference of `convgrad::forward`, `x_grad` and `weight_grad` (f64 accumulation):
/// `(y, gx, gw)` for input `x`, weight `w` and output gradient `g`.
pub fn conv_nchw(x: &[f32], w: &[f32], g: &[f32], p: &crate::convgrad::ConvPlan) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (oh, ow) = p.out_hw();
    let (mut y, mut gx, mut gw) = (vec![0f64; p.output_len()], vec![0f64; p.input_len()], vec![0f64; p.weight_len()]);
    for b in 0..p.n {
        for o in 0..p.co {
            for i in 0..p.ci {
                for ky in 0..p.kh {
                    for kx in 0..p.kw {
                        let wi = ((o * p.ci + i) * p.kh + ky) * p.kw + kx;
                        for oy in 0..oh {
                            for ox in 0..ow {
                                let iy = (oy * p.stride[0] + ky * p.dilation[0]) as isize - p.pad[0] as isize;
                                let ix = (ox * p.stride[1] + kx * p.dilation[1]) as isize - p.pad[1] as isize;
                                if iy < 0 || ix < 0 || iy as usize >= p.h || ix as usize >= p.w {
                                    continue;
                                }
                                let xi = ((b * p.ci + i) * p.h + iy as usize) * p.w + ix as usize;
                                let yo = ((b * p.co + o) * oh + oy) * ow + ox;
                                y[yo] += w[wi] as f64 * x[xi] as f64;
                                gx[xi] += w[wi] as f64 * g[yo] as f64;
                                gw[wi] += g[yo] as f64 * x[xi] as f64;
                            }
                        }
                    }
                }
            }
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
    (f(y), f(gx), f(gw))
}

/// Reference of `xent::softmax_xent` (f64, libm exp / ln): the gradient
/// `scale * (softmax - target)` with `target = (1 - eps) * onehot + eps / k` (0 on uncounted
/// pixels), the loss sum `-sum target * log softmax` and the count.
pub fn softmax_xent(x: &[f32], labels: &[u8], k: usize, p: usize, scale: f32, eps: f64) -> (Vec<f32>, f64, usize) {
    let n = labels.len() / p;
    let mut g = vec![0f32; x.len()];
    let (mut loss, mut count) = (0f64, 0usize);
    for img in 0..n {
        for j in 0..p {
            let l = labels[img * p + j] as usize;
            if l >= k {
                continue;
            }
            let at = |c: usize| img * k * p + c * p + j;
            let m = (0..k).map(|c| x[at(c)] as f64).fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = (0..k).map(|c| (x[at(c)] as f64 - m).exp()).sum();
            let target = |c: usize| (1.0 - eps) * (c == l) as u8 as f64 + eps / k as f64;
            for c in 0..k {
                let prob = (x[at(c)] as f64 - m).exp() / s;
                g[at(c)] = (scale as f64 * (prob - target(c))) as f32;
                loss += target(c) * (s.ln() + m - x[at(c)] as f64);
            }
            count += 1;
        }
    }
    (g, loss, count)
}

/// Reference of `bnorm::stats` (f64): per-channel mean and biased variance.
pub fn batch_norm_stats(x: &[f32], n: usize, c: usize, hw: usize) -> (Vec<f32>, Vec<f32>) {
    let count = (n * hw) as f64;
    let (mut mean, mut var) = (vec![0f32; c], vec![0f32; c]);
    for ch in 0..c {
        let vals = || (0..n).flat_map(move |img| (0..hw).map(move |j| x[(img * c + ch) * hw + j] as f64));
        let m = vals().sum::<f64>() / count;
        let v = vals().map(|a| (a - m) * (a - m)).sum::<f64>() / count;
        (mean[ch], var[ch]) = (m as f32, v as f32);
    }
    (mean, var)
}

/// Reference of `bnorm::normalize` (f64, for the given f32 statistics).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_normalize(
    x: &[f32],
    c: usize,
    hw: usize,
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f32,
) -> Vec<f32> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let ch = i / hw % c;
            let std = (var[ch] as f64 + eps as f64).sqrt();
            ((v as f64 - mean[ch] as f64) / std * gamma[ch] as f64 + beta[ch] as f64) as f32
        })
        .collect()
}

/// Reference of `bnorm::backward` (f64 sums, for the given f32 statistics):
/// `(x_grad, gamma_grad, beta_grad)`.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_train_backward(
    x: &[f32],
    g: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    gamma: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let at = |img: usize, ch: usize, j: usize| (img * c + ch) * hw + j;
    let count = (n * hw) as f64;
    let (mut gx, mut gg, mut gb) = (vec![0f32; x.len()], vec![0f32; c], vec![0f32; c]);
    for ch in 0..c {
        let idx: Vec<usize> = (0..n).flat_map(|img| (0..hw).map(move |j| at(img, ch, j))).collect();
        let (m, v) = (mean[ch] as f64, var[ch] as f64);
        let std = (v + eps as f64).sqrt();
        let xhat = |i: usize| (x[i] as f64 - m) / std;
        let sg: f64 = idx.iter().map(|&i| g[i] as f64).sum();
        let sgx: f64 = idx.iter().map(|&i| g[i] as f64 * xhat(i)).sum();
        for &i in &idx {
            gx[i] = (gamma[ch] as f64 / std * (g[i] as f64 - sg / count - xhat(i) * sgx / count)) as f32;
        }
        (gg[ch], gb[ch]) = (sgx as f32, sg as f32);
    }
    (gx, gg, gb)
}

/// The two source positions and weights of output `i` of a bilinear resize from `n` to `m`
/// (PyTorch, align_corners false), in f64.
fn bilinear_taps(n: usize, m: usize, i: usize) -> [(usize, f64); 2] {
    let src = ((i as f64 + 0.5) * n as f64 / m as f64 - 0.5).max(0.0);
    let i0 = (src.floor() as usize).min(n - 1);
    let l1 = src - i0 as f64;
    [(i0, 1.0 - l1), ((i0 + 1).min(n - 1), l1)]
}

/// The four source pixels (index in a `[h, w]` plane) and weights of output pixel `(yy, xx)` of
/// a bilinear resize from `(h, w)` to `(oh, ow)`.
fn pixel_taps((h, w): (usize, usize), (oh, ow): (usize, usize), yy: usize, xx: usize) -> Vec<(usize, f64)> {
    let mut wts = Vec::with_capacity(4);
    for (y, a) in bilinear_taps(h, oh, yy) {
        for (x_, b) in bilinear_taps(w, ow, xx) {
            wts.push((y * w + x_, a * b));
        }
    }
    wts
}

/// Image `img`'s `k` logits at one output pixel: each plane's weighted sum over `wts` (`p`
/// pixels per plane), in f64.
fn resized_pixel_logits(x: &[f32], img: usize, k: usize, p: usize, wts: &[(usize, f64)]) -> Vec<f64> {
    (0..k).map(|c| wts.iter().map(|&(j, wt)| wt * x[img * k * p + c * p + j] as f64).sum()).collect()
}

/// Reference of `xent::resized_softmax_xent` (f64): each output pixel's logits written out as
/// PyTorch's bilinear sum over its four source pixels (align_corners false), `softmax_xent`'s
/// loss on them (label smoothing `eps`), and the gradient scattered back through the same four
/// weights.
pub fn resized_softmax_xent(
    x: &[f32],
    (h, w): (usize, usize),
    labels: &[u8],
    (oh, ow): (usize, usize),
    k: usize,
    scale: f32,
    eps: f64,
) -> (Vec<f32>, f64, usize) {
    let (p, q) = (h * w, oh * ow);
    let n = labels.len() / q;
    let mut g = vec![0f64; x.len()];
    let (mut loss, mut count) = (0f64, 0usize);
    for img in 0..n {
        for yy in 0..oh {
            for xx in 0..ow {
                let l = labels[img * q + yy * ow + xx] as usize;
                if l >= k {
                    continue;
                }
                let wts = pixel_taps((h, w), (oh, ow), yy, xx);
                let z = resized_pixel_logits(x, img, k, p, &wts);
                let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
                count += 1;
                for c in 0..k {
                    let target = (1.0 - eps) * (c == l) as u8 as f64 + eps / k as f64;
                    loss += target * (s.ln() + m - z[c]);
                    let d = scale as f64 * ((z[c] - m).exp() / s - target);
                    for &(j, wt) in &wts {
                        g[img * k * p + c * p + j] += d * wt;
                    }
                }
            }
        }
    }
    (g.into_iter().map(|v| v as f32).collect(), loss, count)
}

/// The label's softmax probability at each pixel of the bilinearly resized logits (1.0 where
/// the label is `>= k`), each pixel's four-tap sum written out in f64.
pub fn resized_label_prob(
    x: &[f32],
    (h, w): (usize, usize),
    labels: &[u8],
    (oh, ow): (usize, usize),
    k: usize,
) -> Vec<f64> {
    let (p, q) = (h * w, oh * ow);
    let mut out = vec![1f64; labels.len()];
    for (i, (&l, o)) in labels.iter().zip(&mut out).enumerate() {
        let (img, yy, xx) = (i / q, (i % q) / ow, i % ow);
        if l as usize >= k {
            continue;
        }
        let z = resized_pixel_logits(x, img, k, p, &pixel_taps((h, w), (oh, ow), yy, xx));
        let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
        *o = (z[l as usize] - m).exp() / s;
    }
    out
}
