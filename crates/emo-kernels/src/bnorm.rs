//! Training-mode BatchNorm on NCHW data: batch statistics, the normalisation, and the backward
//! pass, each plane-by-plane.
//!
//! burn's generic `batch_norm_train` (what flex runs) swaps the batch and channel axes to reduce
//! over them: a transposing copy of the activation for the mean, another for the variance, and
//! two more in the backward pass, around ten passes in all. In NCHW each `(image, channel)`
//! plane is contiguous, so every reduction here is a vectorised sum over whole planes (16 f32
//! lanes per plane, accumulated across planes in f64) and nothing is transposed.

use crate::act::sum_lanes;
use crate::multiversion;

/// `sum((x - m)^2)` with 16 independent lanes.
#[inline(always)]
fn sum_sq_dev(x: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rem = chunks.remainder();
    for ch in chunks {
        for j in 0..16 {
            let d = ch[j] - m;
            acc[j] += d * d;
        }
    }
    let mut s = 0.0;
    for a in acc {
        s += a;
    }
    for v in rem {
        s += (v - m) * (v - m);
    }
    s
}

/// `(sum g, sum g (x - m))` with 16 independent lanes each.
#[inline(always)]
fn sum_g_gx(g: &[f32], x: &[f32], m: f32) -> (f32, f32) {
    let (mut a, mut b) = ([0f32; 16], [0f32; 16]);
    let n = g.len() / 16 * 16;
    for i in (0..n).step_by(16) {
        let (gc, xc) = (&g[i..i + 16], &x[i..i + 16]);
        for j in 0..16 {
            a[j] += gc[j];
            b[j] += gc[j] * (xc[j] - m);
        }
    }
    let (mut sa, mut sb) = (0.0, 0.0);
    for j in 0..16 {
        sa += a[j];
        sb += b[j];
    }
    for i in n..g.len() {
        sa += g[i];
        sb += g[i] * (x[i] - m);
    }
    (sa, sb)
}

/// The contiguous `hw` values of `(image, channel)`.
#[inline(always)]
fn plane(c: usize, hw: usize, img: usize, ch: usize) -> std::ops::Range<usize> {
    let start = (img * c + ch) * hw;
    start..start + hw
}

multiversion! {
    /// Per-channel batch mean and biased variance of `x` (`[n, c, hw]`): the mean first, then
    /// the mean squared deviation from it (as burn's `batch_norm_train`).
    pub fn stats / stats_at(x: &[f32], n: usize, c: usize, hw: usize, mean: &mut [f32], var: &mut [f32]) {
        let count = (n * hw) as f64;
        for ch in 0..c {
            let mut s = 0f64;
            for img in 0..n {
                s += sum_lanes(&x[plane(c, hw, img, ch)]) as f64;
            }
            let m = (s / count) as f32;
            let mut v = 0f64;
            for img in 0..n {
                v += sum_sq_dev(&x[plane(c, hw, img, ch)], m) as f64;
            }
            mean[ch] = m;
            var[ch] = (v / count) as f32;
        }
    }
}

multiversion! {
    /// `y = (x - mean) / sqrt(var + eps) * gamma + beta`, per channel of `x` (`[n, c, hw]`).
    pub fn normalize / normalize_at(
        x: &[f32],
        n: usize,
        c: usize,
        hw: usize,
        gamma: &[f32],
        beta: &[f32],
        mean: &[f32],
        var: &[f32],
        eps: f32,
        y: &mut [f32],
    ) {
        for ch in 0..c {
            // (x - mean) * scale + beta, not x * scale + shift: with a large mean the folded
            // shift would cancel most of x * scale.
            let (m, b, scale) = (mean[ch], beta[ch], gamma[ch] / (var[ch] + eps).sqrt());
            for img in 0..n {
                let r = plane(c, hw, img, ch);
                let (xs, ys) = (&x[r.clone()], &mut y[r]);
                for j in 0..hw {
                    ys[j] = (xs[j] - m) * scale + b;
                }
            }
        }
    }
}

multiversion! {
    /// The backward pass for output gradient `g`: `beta_grad = sum g`,
    /// `gamma_grad = sum g * xhat`, and
    /// `x_grad = gamma / std * (g - mean(g) - xhat * mean(g * xhat))` with
    /// `xhat = (x - mean) / std`, `std = sqrt(var + eps)`, sums over the batch and the pixels.
    pub fn backward / backward_at(
        x: &[f32],
        g: &[f32],
        n: usize,
        c: usize,
        hw: usize,
        gamma: &[f32],
        mean: &[f32],
        var: &[f32],
        eps: f32,
        x_grad: &mut [f32],
        gamma_grad: &mut [f32],
        beta_grad: &mut [f32],
    ) {
        let count = (n * hw) as f64;
        for ch in 0..c {
            let (m, inv_std) = (mean[ch], 1.0 / (var[ch] + eps).sqrt());
            let (mut sg, mut sgx) = (0f64, 0f64);
            for img in 0..n {
                let r = plane(c, hw, img, ch);
                let (a, b) = sum_g_gx(&g[r.clone()], &x[r], m);
                sg += a as f64;
                sgx += b as f64;
            }
            beta_grad[ch] = sg as f32;
            gamma_grad[ch] = (sgx * inv_std as f64) as f32;
            let a = gamma[ch] * inv_std;
            let mean_g = (sg / count) as f32;
            // xhat * mean(g * xhat) = (x - m) * sum(g (x - m)) / std^2 / count
            let k = (sgx * (inv_std as f64) * (inv_std as f64) / count) as f32;
            for img in 0..n {
                let r = plane(c, hw, img, ch);
                let (xs, gs, out) = (&x[r.clone()], &g[r.clone()], &mut x_grad[r]);
                for j in 0..hw {
                    out[j] = a * (gs[j] - mean_g - (xs[j] - m) * k);
                }
            }
        }
    }
}
