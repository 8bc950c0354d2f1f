//! Dense k x k convolution for the stem (few input channels) on channels-last data: a direct
//! kernel whose inner loop runs over output channels. im2col + GEMM is a poor fit for 3 input
//! channels.

use crate::pool::parallel_chunks_mut;

use crate::act::{Act, apply_one};
use crate::dwconv::DwGeom;
use crate::multiversion;

/// Weight `[k, k, cin, cout]` from PyTorch's `[cout, cin, k, k]`.
pub fn weight_from_torch(w: &[f32], cout: usize, cin: usize, k: usize) -> Vec<f32> {
    assert_eq!(w.len(), cout * cin * k * k);
    let mut out = vec![0.0; w.len()];
    for co in 0..cout {
        for ci in 0..cin {
            for t in 0..k * k {
                out[(t * cin + ci) * cout + co] = w[(co * cin + ci) * k * k + t];
            }
        }
    }
    out
}

multiversion! {
    /// Output row `oy` of `conv` over one image, activation applied.
    fn conv_row / conv_row_at(img: Images<'_>, conv: ConvWeights<'_>, oy: usize, act: Act, out: &mut [f32]) {
        let (Images { data: input, h, w, c: cin, .. }, ConvWeights { weight, bias, geom: g }) = (img, conv);
        let ((ps, cs), cout) = (img.strides(), bias.len());
        let ow = out.len() / cout;
        for ox in 0..ow {
            let o = &mut out[ox * cout..(ox + 1) * cout];
            o.copy_from_slice(&bias[..cout]);
            for ky in 0..g.k {
                let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                for kx in 0..g.k {
                    let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                    if ix < 0 || ix >= w as isize {
                        continue;
                    }
                    let base = (iy as usize * w + ix as usize) * ps;
                    for ci in 0..cin {
                        let s = input[base + ci * cs];
                        let wk = &weight[((ky * g.k + kx) * cin + ci) * cout..][..cout];
                        for (o, wv) in o.iter_mut().zip(wk) {
                            *o += s * wv;
                        }
                    }
                }
            }
            o.iter_mut().for_each(|v| *v = apply_one(act, *v));
        }
    }
}

/// Input images of a direct conv: `[batch, h, w, c]` channels-last, or `[batch, c, h, w]` when
/// `planar` (the network input, read in place without a transpose).
#[derive(Clone, Copy, Debug)]
pub struct Images<'a> {
    pub data: &'a [f32],
    pub planar: bool,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl<'a> Images<'a> {
    /// Floats per image.
    pub fn image_len(&self) -> usize {
        self.h * self.w * self.c
    }

    /// Image `b` of the batch.
    pub fn image(&self, b: usize) -> Images<'a> {
        let n = self.image_len();
        Images { data: &self.data[b * n..(b + 1) * n], ..*self }
    }

    /// (pixel, channel) strides within one image.
    fn strides(&self) -> (usize, usize) {
        if self.planar { (1, self.h * self.w) } else { (self.c, 1) }
    }
}

/// A conv's weight, bias (`[cout]`) and geometry. The weight is `[k, k, cin, cout]`
/// ([`weight_from_torch`]) for a dense conv, the depthwise layout for a depthwise one.
#[derive(Clone, Copy, Debug)]
pub struct ConvWeights<'a> {
    pub weight: &'a [f32],
    pub bias: &'a [f32],
    pub geom: DwGeom,
}

/// `out[b, oy, ox, :] = act(bias + sum_{taps, ci} in[b, iy, ix, ci] * w[tap, ci, :])` for
/// `batch` images of `input`; the output is channels-last with `conv.bias.len()` channels.
pub fn conv2d(input: Images, batch: usize, conv: ConvWeights, act: Act, out: &mut [f32]) {
    let (g, cout) = (conv.geom, conv.bias.len());
    let (oh, ow) = (g.out_len(input.h), g.out_len(input.w));
    assert!(input.data.len() >= batch * input.image_len() && out.len() >= batch * oh * ow * cout);
    let level = crate::isa::level();
    parallel_chunks_mut(&mut out[..batch * oh * ow * cout], ow * cout, |r, row| {
        let (b, oy) = (r / oh, r % oh);
        conv_row_level(level, input.image(b), conv, oy, act, row);
    });
}

/// Output row `oy` (`[ow, cout]`) of [`conv2d`] for one image at the given ISA level.
pub(crate) fn conv_row_level(
    level: crate::isa::Level,
    img: Images,
    conv: ConvWeights,
    oy: usize,
    act: Act,
    row: &mut [f32],
) {
    let (Images { data, h, w, c: cin, .. }, ConvWeights { weight, bias, geom: g }) = (img, conv);
    let cout = bias.len();
    assert!(data.len() >= h * w * cin && weight.len() >= g.k * g.k * cin * cout && row.len() == g.out_len(w) * cout);
    #[cfg(target_arch = "x86_64")]
    if level == crate::isa::Level::Avx512 && cout <= 32 {
        // SAFETY: AVX-512F available; sizes asserted above.
        unsafe { conv_row_512(img, conv, oy, row) };
        crate::act::apply_at(level, act, row);
        return;
    }
    conv_row_at(level, img, conv, oy, act, row);
}

/// Per-image channel means of `[batch, pixels, c]` into `[batch, c]` (pixel chunks summed on
/// the pool, then combined).
pub fn channel_mean(x: &[f32], batch: usize, pixels: usize, c: usize, out: &mut [f32]) {
    let level = crate::isa::level();
    let chunks = (pixels / 512).clamp(1, 4 * crate::pool::num_threads());
    let per = pixels.div_ceil(chunks);
    for b in 0..batch {
        let sums = crate::act::ChannelSums::new(c);
        crate::pool::parallel_for(chunks, |i| {
            let mut acc = vec![0f32; c];
            let (p0, p1) = (i * per, ((i + 1) * per).min(pixels));
            crate::act::add_pixels_at(level, &mut acc, &x[(b * pixels + p0) * c..(b * pixels + p1) * c]);
            sums.add(level, &acc);
        });
        sums.means_into(pixels, &mut out[b * c..(b + 1) * c]);
    }
}

/// Small dense layer `y = act(W x + b)` with a PyTorch `[n, k]` weight (SE convs, classifier).
pub fn linear(x: &[f32], w: &[f32], b: &[f32], n: usize, k: usize, act: Act, y: &mut [f32]) {
    for o in 0..n {
        let s: f32 = w[o * k..(o + 1) * k].iter().zip(x).map(|(a, b)| a * b).sum();
        y[o] = apply_one(act, s + b[o]);
    }
}

/// AVX-512 body of one output row for `cout <= 32`: the output channels live in two zmm
/// accumulators; each input value is broadcast against a weight vector.
///
/// # Safety
/// AVX-512F must be available; `img` is `[h, w, cin]`, `out` `[ow, cout]`, weight `[k*k*cin, cout]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn conv_row_512(img: Images<'_>, conv: ConvWeights<'_>, oy: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (strides, cout) = (img.strides(), conv.bias.len());
    let (Images { data: img, h, w, c: cin, .. }, ConvWeights { weight, bias, geom: g }) = (img, conv);
    let ow = out.len() / cout;
    let (m0, m1) = crate::gemm512::masks32(cout);
    let (ip, wp, op) = (img.as_ptr(), weight.as_ptr(), out.as_mut_ptr());
    let ky0 = g.pad.saturating_sub(oy * g.stride);
    let ky1 = g.k.min((h + g.pad).saturating_sub(oy * g.stride));
    unsafe {
        let b0 = _mm512_maskz_loadu_ps(m0, bias.as_ptr());
        let b1 = _mm512_maskz_loadu_ps(m1, bias.as_ptr().add(16));
        // Interior pixels in groups of PIX: 2 * PIX independent accumulators hide the FMA
        // latency (one pixel alone is a chain of k*k*cin dependent FMAs per accumulator).
        const PIX: usize = 8;
        let mut ox = 0;
        while ox < ow {
            let interior = ox * g.stride >= g.pad && (ox + PIX - 1) * g.stride + g.k <= w + g.pad && ox + PIX <= ow;
            if interior {
                let mut a0 = [b0; PIX];
                let mut a1 = [b1; PIX];
                for ky in ky0..ky1 {
                    let iy = oy * g.stride + ky - g.pad;
                    for kx in 0..g.k {
                        let ix = ox * g.stride + kx - g.pad;
                        let src = ip.add((iy * w + ix) * strides.0);
                        for ci in 0..cin {
                            let wk = wp.add(((ky * g.k + kx) * cin + ci) * cout);
                            let w0 = _mm512_maskz_loadu_ps(m0, wk);
                            let w1 = _mm512_maskz_loadu_ps(m1, wk.add(16));
                            let s = src.add(ci * strides.1);
                            for j in 0..PIX {
                                let v = _mm512_set1_ps(*s.add(j * g.stride * strides.0));
                                a0[j] = _mm512_fmadd_ps(v, w0, a0[j]);
                                a1[j] = _mm512_fmadd_ps(v, w1, a1[j]);
                            }
                        }
                    }
                }
                for j in 0..PIX {
                    _mm512_mask_storeu_ps(op.add((ox + j) * cout), m0, a0[j]);
                    _mm512_mask_storeu_ps(op.add((ox + j) * cout + 16), m1, a1[j]);
                }
                ox += PIX;
                continue;
            }
            let (mut a0, mut a1) = (b0, b1);
            let kx0 = g.pad.saturating_sub(ox * g.stride);
            let kx1 = g.k.min((w + g.pad).saturating_sub(ox * g.stride));
            for ky in ky0..ky1 {
                let iy = oy * g.stride + ky - g.pad;
                for kx in kx0..kx1 {
                    let ix = ox * g.stride + kx - g.pad;
                    let src = ip.add((iy * w + ix) * strides.0);
                    for ci in 0..cin {
                        let v = _mm512_set1_ps(*src.add(ci * strides.1));
                        let wk = wp.add(((ky * g.k + kx) * cin + ci) * cout);
                        a0 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m0, wk), a0);
                        a1 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m1, wk.add(16)), a1);
                    }
                }
            }
            _mm512_mask_storeu_ps(op.add(ox * cout), m0, a0);
            _mm512_mask_storeu_ps(op.add(ox * cout + 16), m1, a1);
            ox += 1;
        }
    }
}
