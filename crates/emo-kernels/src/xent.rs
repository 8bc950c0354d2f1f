//! Softmax cross-entropy over the channel axis of NCHW logits (the segmentation loss), with its
//! gradient, in one pass over blocks of pixels.
//!
//! As burn ops, the pixel loss is a log-softmax (max, subtract, exp, sum, log, subtract), a
//! gather, a mask and a sum, each a pass over `[n, k, h, w]` with its own backward; at 192x192
//! with 11 classes that was ~10% of a DeepLabv3 training step on flex. Here each block of 64
//! pixels is read three times (max, exp and sum, normalise) while it sits in L1, the exps are the
//! vectorised [`crate::act::exp`], and the gradient `scale * (softmax - onehot)` comes out of the
//! same pass, ready to be the logits' gradient.

use crate::act::exp;
use crate::multiversion;

/// Pixels per block (per channel row: 256 bytes).
const BLOCK: usize = 64;

/// The loss of a batch: the sum of `-log softmax(x)[label]` over the counted pixels, and how
/// many pixels were counted.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct XentSum {
    pub loss: f64,
    pub count: usize,
}

/// Pixel softmax cross-entropy of logits `x` (`[n, k, p]`: `n` images, `k` classes, `p` pixels
/// per image, NCHW order) against `labels` (`[n, p]`; a label `>= k`, such as the ignore index
/// 255, is not counted). Writes `g = scale * (softmax(x) - onehot(label))` for counted pixels
/// and 0 for the others (`g` has `x`'s layout), and returns the unscaled loss sum and count.
pub fn softmax_xent(x: &[f32], labels: &[u8], k: usize, p: usize, scale: f32, g: &mut [f32]) -> XentSum {
    softmax_xent_at(crate::isa::level(), x, labels, k, p, scale, g)
}

/// [`softmax_xent`] at an explicit ISA level (one the CPU supports: see `isa::available`).
pub fn softmax_xent_at(
    level: crate::isa::Level,
    x: &[f32],
    labels: &[u8],
    k: usize,
    p: usize,
    scale: f32,
    g: &mut [f32],
) -> XentSum {
    assert!(k > 0 && p > 0, "softmax_xent: {k} classes, {p} pixels");
    let n = labels.len() / p;
    assert!(labels.len() == n * p && x.len() == n * k * p && g.len() == x.len(), "softmax_xent: shapes");
    let mut sum = XentSum::default();
    for img in 0..n {
        let span = img * k * p..(img + 1) * k * p;
        let li = &labels[img * p..(img + 1) * p];
        let (xi, gi) = (&x[span.clone()], &mut g[span]);
        for p0 in (0..p).step_by(BLOCK) {
            let len = BLOCK.min(p - p0);
            let mut m = [0f32; BLOCK];
            let mut s = [0f32; BLOCK];
            block_softmax_at(level, xi, k, p, p0, len, scale, &mut m, &mut s, gi);
            // Per pixel: the label's term (scalar; one in k values).
            for j in 0..len {
                let l = li[p0 + j] as usize;
                if l < k {
                    let at = l * p + p0 + j;
                    // -log softmax = log(sum exp(x - m)) - (x_l - m): no log of a tiny probability.
                    sum.loss += (s[j] as f64).ln() - (xi[at] - m[j]) as f64;
                    sum.count += 1;
                    gi[at] -= scale;
                } else {
                    for c in 0..k {
                        gi[c * p + p0 + j] = 0.0;
                    }
                }
            }
        }
    }
    sum
}

multiversion! {
    /// Pixels `p0..p0 + len` of one image: `m` = max over classes, `s` = sum of exp(x - m),
    /// `g` = scale * exp(x - m) / s.
    fn block_softmax / block_softmax_at(
        x: &[f32],
        k: usize,
        p: usize,
        p0: usize,
        len: usize,
        scale: f32,
        m: &mut [f32; BLOCK],
        s: &mut [f32; BLOCK],
        g: &mut [f32],
    ) {
        let m = &mut m[..len];
        let s = &mut s[..len];
        m.copy_from_slice(&x[p0..p0 + len]);
        for c in 1..k {
            let row = &x[c * p + p0..c * p + p0 + len];
            for j in 0..len {
                m[j] = if row[j] > m[j] { row[j] } else { m[j] };
            }
        }
        s.fill(0.0);
        for c in 0..k {
            let row = &x[c * p + p0..c * p + p0 + len];
            let out = &mut g[c * p + p0..c * p + p0 + len];
            for j in 0..len {
                let e = exp(row[j] - m[j]);
                out[j] = e;
                s[j] += e;
            }
        }
        let mut inv = [0f32; BLOCK];
        let inv = &mut inv[..len];
        for j in 0..len {
            inv[j] = scale / s[j];
        }
        for c in 0..k {
            let out = &mut g[c * p + p0..c * p + p0 + len];
            for j in 0..len {
                out[j] *= inv[j];
            }
        }
    }
}
