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
/// 255, is not counted), with label smoothing `eps` (PyTorch's
/// `CrossEntropyLoss(label_smoothing=eps)`; 0: none): the target of a counted pixel is
/// `t = (1 - eps) * onehot(label) + eps / k`. Writes `g = scale * (softmax(x) - t)` for counted
/// pixels and 0 for the others (`g` has `x`'s layout), and returns the unscaled loss sum
/// (`-sum t * log softmax(x)` over counted pixels) and count.
#[allow(clippy::too_many_arguments)]
pub fn softmax_xent(x: &[f32], labels: &[u8], k: usize, p: usize, scale: f32, eps: f32, g: &mut [f32]) -> XentSum {
    softmax_xent_at(crate::isa::level(), x, labels, k, p, scale, eps, g)
}

/// [`softmax_xent`] at an explicit ISA level (one the CPU supports: see `isa::available`).
#[allow(clippy::too_many_arguments)]
pub fn softmax_xent_at(
    level: crate::isa::Level,
    x: &[f32],
    labels: &[u8],
    k: usize,
    p: usize,
    scale: f32,
    eps: f32,
    g: &mut [f32],
) -> XentSum {
    assert!(k > 0 && p > 0, "softmax_xent: {k} classes, {p} pixels");
    assert!((0.0..=1.0).contains(&eps), "softmax_xent: label smoothing {eps} outside [0, 1]");
    // The smoothing's share of each class's target, and what is left for the label.
    let (spread, keep) = (scale * eps / k as f32, 1.0 - eps as f64);
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
                    if eps == 0.0 {
                        sum.loss += (s[j] as f64).ln() - (xi[at] - m[j]) as f64;
                        gi[at] -= scale;
                    } else {
                        let mean = (0..k).map(|c| (xi[c * p + p0 + j] - m[j]) as f64).sum::<f64>() / k as f64;
                        sum.loss += (s[j] as f64).ln() - keep * (xi[at] - m[j]) as f64 - eps as f64 * mean;
                        for c in 0..k {
                            gi[c * p + p0 + j] -= spread;
                        }
                        gi[at] -= scale * (1.0 - eps);
                    }
                    sum.count += 1;
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

/// One output of a bilinear resize (PyTorch's `interpolate(mode="bilinear",
/// align_corners=False)` along one axis): `w0 * in[i0] + w1 * in[i1]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tap {
    pub i0: usize,
    pub i1: usize,
    pub w0: f32,
    pub w1: f32,
}

/// The taps of a resize from `n` inputs to `m` outputs: output `i` reads source position
/// `(i + 0.5) * n / m - 0.5`, clamped at 0, between its two neighbours; past the last input the
/// last one is repeated (`i1 == i0`, the weights merged into `w0`, `w1 == 0`).
pub fn bilinear_taps(n: usize, m: usize) -> Vec<Tap> {
    assert!(n > 0, "bilinear_taps: no inputs");
    let scale = n as f64 / m as f64;
    (0..m)
        .map(|i| {
            let src = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(n - 1);
            let l1 = (src - i0 as f64) as f32;
            if i0 < n - 1 {
                Tap { i0, i1: i0 + 1, w0: 1.0 - l1, w1: l1 }
            } else {
                Tap { i0, i1: i0, w0: (1.0 - l1) + l1, w1: 0.0 }
            }
        })
        .collect()
}

/// [`softmax_xent`] (label smoothing `eps`) of logits computed at `(h, w)` and bilinearly
/// resized to the labels' `(oh, ow)` (the segmentation loss of mmseg: logits resized to the label
/// map, align_corners false), with the gradient of the small logits: `g` has `x`'s layout
/// `[n, k, h * w]`.
///
/// The same numbers as resizing with burn ops, taking the loss and back-propagating through the
/// resize, but one image at a time in two `[k, oh * ow]` scratch planes: the resized logits and
/// their gradient never exist for the whole batch (at 192x192 with 11 classes and a batch of 8,
/// 13 MB each) and the resize is two taps per output instead of a dense matrix product.
#[allow(clippy::too_many_arguments)]
pub fn resized_softmax_xent(
    x: &[f32],
    (h, w): (usize, usize),
    labels: &[u8],
    (oh, ow): (usize, usize),
    k: usize,
    scale: f32,
    eps: f32,
    g: &mut [f32],
) -> XentSum {
    resized_softmax_xent_at(crate::isa::level(), x, (h, w), labels, (oh, ow), k, scale, eps, g)
}

/// [`resized_softmax_xent`] at an explicit ISA level (one the CPU supports: see `isa::available`).
#[allow(clippy::too_many_arguments)]
pub fn resized_softmax_xent_at(
    level: crate::isa::Level,
    x: &[f32],
    (h, w): (usize, usize),
    labels: &[u8],
    (oh, ow): (usize, usize),
    k: usize,
    scale: f32,
    eps: f32,
    g: &mut [f32],
) -> XentSum {
    let n = resized_images("resized_softmax_xent", x.len(), labels.len(), k, (h, w), (oh, ow));
    assert!(g.len() == x.len(), "resized_softmax_xent: shapes");
    let (p, q) = (h * w, oh * ow);
    let mut resize = PlaneResize::new(k, (h, w), (oh, ow));
    let mut gu = vec![0f32; k * q];
    let mut sum = XentSum::default();
    for img in 0..n {
        let up = resize.up(level, &x[img * k * p..(img + 1) * k * p]);
        let s = softmax_xent_at(level, up, &labels[img * q..(img + 1) * q], k, q, scale, eps, &mut gu);
        sum.loss += s.loss;
        sum.count += s.count;
        resize.back(level, &gu, &mut g[img * k * p..(img + 1) * k * p]);
    }
    sum
}

/// How many images `[n, k, h * w]` logits and `[n, oh * ow]` labels of lengths `x_len` and
/// `labels_len` hold; panics, naming `what`, on sizes that do not fit.
fn resized_images(
    what: &str,
    x_len: usize,
    labels_len: usize,
    k: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> usize {
    let (p, q) = (h * w, oh * ow);
    assert!(k > 0 && p > 0 && q > 0, "{what}: {k} classes, {h}x{w} -> {oh}x{ow}");
    let n = labels_len / q;
    assert!(labels_len == n * q && x_len == n * k * p, "{what}: shapes");
    n
}

/// The bilinear resize of one image's `k` planes from `(h, w)` to `(oh, ow)` into a scratch
/// reused image after image, and its transpose for the gradient.
struct PlaneResize {
    w: usize,
    p: usize,
    q: usize,
    th: Vec<Tap>,
    tw: Vec<Tap>,
    rows: Vec<f32>,
    up: Vec<f32>,
}

impl PlaneResize {
    fn new(k: usize, (h, w): (usize, usize), (oh, ow): (usize, usize)) -> Self {
        let (th, tw) = (bilinear_taps(h, oh), bilinear_taps(w, ow));
        PlaneResize { w, p: h * w, q: oh * ow, th, tw, rows: vec![0.0; h * ow], up: vec![0.0; k * oh * ow] }
    }

    /// `xi` (`[k, h * w]`) resized: `[k, oh * ow]`.
    fn up(&mut self, level: crate::isa::Level, xi: &[f32]) -> &[f32] {
        let (p, q) = (self.p, self.q);
        for (src, dst) in xi.chunks_exact(p).zip(self.up.chunks_exact_mut(q)) {
            resize_up_at(level, src, self.w, &self.th, &self.tw, &mut self.rows, dst);
        }
        &self.up
    }

    /// The gradient `gu` (`[k, oh * ow]`) of [`Self::up`]'s output back onto its source: `gi`
    /// (`[k, h * w]`, overwritten).
    fn back(&mut self, level: crate::isa::Level, gu: &[f32], gi: &mut [f32]) {
        let (p, q) = (self.p, self.q);
        for (src, dst) in gu.chunks_exact(q).zip(gi.chunks_exact_mut(p)) {
            resize_back_at(level, src, self.w, &self.th, &self.tw, &mut self.rows, dst);
        }
    }
}

/// The softmax probability of each pixel's label under logits computed at `(h, w)` and
/// bilinearly resized to the labels' `(oh, ow)`, as [`resized_softmax_xent`] resizes them
/// (`[n, oh * ow]`; 1.0 where the label is `>= k`, e.g. ignored). With `(h, w) == (oh, ow)` the
/// logits are taken as they are. What mmseg's `OHEMPixelSampler` ranks pixels by.
pub fn resized_label_prob(
    x: &[f32],
    (h, w): (usize, usize),
    labels: &[u8],
    (oh, ow): (usize, usize),
    k: usize,
) -> Vec<f32> {
    resized_label_prob_at(crate::isa::level(), x, (h, w), labels, (oh, ow), k)
}

/// [`resized_label_prob`] at an explicit ISA level (one the CPU supports: see `isa::available`).
pub fn resized_label_prob_at(
    level: crate::isa::Level,
    x: &[f32],
    (h, w): (usize, usize),
    labels: &[u8],
    (oh, ow): (usize, usize),
    k: usize,
) -> Vec<f32> {
    let n = resized_images("resized_label_prob", x.len(), labels.len(), k, (h, w), (oh, ow));
    let (p, q) = (h * w, oh * ow);
    let mut resize = PlaneResize::new(k, (h, w), (oh, ow));
    let mut gu = vec![0f32; k * q];
    let mut prob = vec![1f32; n * q];
    for img in 0..n {
        let xi = &x[img * k * p..(img + 1) * k * p];
        let logits = if (h, w) == (oh, ow) { xi } else { resize.up(level, xi) };
        // The fused pass writes softmax - onehot: at the label's channel that is p - 1.
        let li = &labels[img * q..(img + 1) * q];
        softmax_xent_at(level, logits, li, k, q, 1.0, 0.0, &mut gu);
        for (j, (&l, pr)) in li.iter().zip(&mut prob[img * q..(img + 1) * q]).enumerate() {
            if (l as usize) < k {
                *pr = (gu[l as usize * q + j] + 1.0).clamp(0.0, 1.0);
            }
        }
    }
    prob
}

multiversion! {
    /// One `[h, w]` plane resized to `[oh, ow]` (`th.len()`, `tw.len()`): along W into `rows`
    /// (`[h, ow]`), then along H into `out`.
    fn resize_up / resize_up_at(x: &[f32], w: usize, th: &[Tap], tw: &[Tap], rows: &mut [f32], out: &mut [f32]) {
        let ow = tw.len();
        for (src, dst) in x.chunks_exact(w).zip(rows.chunks_exact_mut(ow)) {
            for (d, t) in dst.iter_mut().zip(tw) {
                *d = t.w0 * src[t.i0] + t.w1 * src[t.i1];
            }
        }
        for (t, dst) in th.iter().zip(out.chunks_exact_mut(ow)) {
            let (r0, r1) = (&rows[t.i0 * ow..(t.i0 + 1) * ow], &rows[t.i1 * ow..(t.i1 + 1) * ow]);
            for j in 0..ow {
                dst[j] = t.w0 * r0[j] + t.w1 * r1[j];
            }
        }
    }
}

multiversion! {
    /// The transpose of [`resize_up`]: the gradient `gu` of one `[oh, ow]` plane back onto its
    /// `[h, w]` source, written to `out` (overwritten).
    fn resize_back / resize_back_at(gu: &[f32], w: usize, th: &[Tap], tw: &[Tap], rows: &mut [f32], out: &mut [f32]) {
        let ow = tw.len();
        rows.fill(0.0);
        for (t, src) in th.iter().zip(gu.chunks_exact(ow)) {
            let r0 = &mut rows[t.i0 * ow..(t.i0 + 1) * ow];
            for j in 0..ow {
                r0[j] += t.w0 * src[j];
            }
            let r1 = &mut rows[t.i1 * ow..(t.i1 + 1) * ow];
            for j in 0..ow {
                r1[j] += t.w1 * src[j];
            }
        }
        out.fill(0.0);
        for (src, dst) in rows.chunks_exact(ow).zip(out.chunks_exact_mut(w)) {
            for (v, t) in src.iter().zip(tw) {
                dst[t.i0] += t.w0 * v;
                dst[t.i1] += t.w1 * v;
            }
        }
    }
}
