//! Depthwise k x k convolution on channels-last data, BN folded into weight and bias, with the
//! activation and EMO's inner residual (`out = x + act(dw(x))`, stride 1 only) fused in.
//! Rows of the output are spread over the pool; within a row the channels are the
//! vectorised inner loop.

use crate::pool::parallel_chunks_mut;

use crate::act::{Act, gelu, silu};
use crate::multiversion;

/// Geometry of a depthwise conv (square kernel, symmetric padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DwGeom {
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl DwGeom {
    pub fn out_len(&self, n: usize) -> usize {
        (n + 2 * self.pad - self.k) / self.stride + 1
    }
}

/// Weight `[k, k, c]` (taps outer, channels inner) from PyTorch's `[c, 1, k, k]`.
pub fn weight_from_torch(w: &[f32], c: usize, k: usize) -> Vec<f32> {
    assert_eq!(w.len(), c * k * k);
    let mut out = vec![0.0; c * k * k];
    for ch in 0..c {
        for t in 0..k * k {
            out[t * c + ch] = w[ch * k * k + t];
        }
    }
    out
}

/// One depthwise layer as the kernels run it: the folded weight `[k*k, c]` (from
/// [`weight_from_torch`]), the bias `[c]` (its length is the channel count), the geometry, the
/// activation, and whether EMO's inner residual `x + act(dw(x))` is added (stride-1 "same" only).
#[derive(Clone, Copy, Debug)]
pub struct DwLayer<'a> {
    pub weight: &'a [f32],
    pub bias: &'a [f32],
    pub geom: DwGeom,
    pub act: Act,
    pub residual: bool,
}

impl DwLayer<'_> {
    /// Channels (in = out).
    pub fn channels(&self) -> usize {
        self.bias.len()
    }
}

multiversion! {
    /// Output row `oy` of `l` over one `[h, w, c]` image.
    pub(crate) fn dw_row / dw_row_at(input: &[f32], h: usize, w: usize, l: DwLayer<'_>, oy: usize, out: &mut [f32]) {
        let DwLayer { weight, bias, geom: g, act, residual } = l;
        let c = bias.len();
        let ow = out.len() / c;
        for ox in 0..ow {
            let o = &mut out[ox * c..(ox + 1) * c];
            o.copy_from_slice(&bias[..c]);
            for ky in 0..g.k {
                let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                let row = &input[iy as usize * w * c..(iy as usize + 1) * w * c];
                for kx in 0..g.k {
                    let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                    if ix < 0 || ix >= w as isize {
                        continue;
                    }
                    let src = &row[ix as usize * c..(ix as usize + 1) * c];
                    let wk = &weight[(ky * g.k + kx) * c..(ky * g.k + kx + 1) * c];
                    for ((o, s), wv) in o.iter_mut().zip(src).zip(wk) {
                        *o += s * wv;
                    }
                }
            }
            match act {
                Act::None => {}
                Act::Silu => o.iter_mut().for_each(|v| *v = silu(*v)),
                Act::Gelu => o.iter_mut().for_each(|v| *v = gelu(*v)),
            }
            if residual {
                let src = &input[(oy * w + ox) * c..(oy * w + ox + 1) * c];
                for (o, s) in o.iter_mut().zip(src) {
                    *o += s;
                }
            }
        }
    }
}

/// `out[b, oy, ox, :] = act(bias + sum_taps in[b, iy, ix, :] * w[tap, :]) (+ in[b, oy, ox, :])`.
/// `input` is `[batch, h, w, c]`; `out` is `[batch, oh, ow, c]`.
pub fn depthwise(input: &[f32], batch: usize, h: usize, w: usize, l: DwLayer<'_>, out: &mut [f32]) {
    let (c, g) = (l.channels(), l.geom);
    let (oh, ow) = (g.out_len(h), g.out_len(w));
    assert!(input.len() >= batch * h * w * c && out.len() >= batch * oh * ow * c);
    assert!(!l.residual || (g.stride == 1 && oh == h && ow == w), "inner residual needs a shape-preserving conv");
    let level = crate::isa::level();
    parallel_chunks_mut(&mut out[..batch * oh * ow * c], ow * c, |r, row| {
        let (b, oy) = (r / oh, r % oh);
        let img = &input[b * h * w * c..(b + 1) * h * w * c];
        dw_row_level(level, img, h, w, l, oy, row);
    });
}

/// One output row of [`depthwise`] for one `[h, w, c]` image at the given ISA level (the
/// AVX-512 kernel or the portable one).
pub(crate) fn dw_row_level(
    level: crate::isa::Level,
    img: &[f32],
    h: usize,
    w: usize,
    l: DwLayer<'_>,
    oy: usize,
    row: &mut [f32],
) {
    let (c, g) = (l.channels(), l.geom);
    assert!(img.len() >= h * w * c && l.weight.len() >= g.k * g.k * c && row.len() == g.out_len(w) * c);
    #[cfg(target_arch = "x86_64")]
    if level == crate::isa::Level::Avx512 {
        // SAFETY: AVX-512F available at this level; sizes asserted above.
        unsafe { dw_row_512(img.as_ptr(), h, w, l, oy, row) };
        return;
    }
    dw_row_at(level, img, h, w, l, oy, row);
}

/// AVX-512 body of one output row, activation and inner residual applied in registers: 32-channel
/// blocks in two zmm accumulators, masked loads / stores for the channel tail. `ip` points at (virtual) row 0 of the `[h, w, c]`
/// input; only the rows this output row needs are read (so a band of rows may be passed with
/// `ip` shifted back by its first row).
///
/// # Safety
/// AVX-512F must be available; `ip` points at a `[h, w, c]` image, `out` is `[ow, c]`,
/// `l.weight` `[k*k, c]`.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn dw_row_512(ip: *const f32, h: usize, w: usize, l: DwLayer<'_>, oy: usize, out: &mut [f32]) {
    // SAFETY: forwarded contract.
    unsafe {
        match (l.geom.k, l.geom.stride) {
            (3, 1) => dw_row_512_k::<3, 1>(ip, h, w, l, oy, out),
            (3, 2) => dw_row_512_k::<3, 2>(ip, h, w, l, oy, out),
            (5, 1) => dw_row_512_k::<5, 1>(ip, h, w, l, oy, out),
            (5, 2) => dw_row_512_k::<5, 2>(ip, h, w, l, oy, out),
            _ => dw_row_512_k::<0, 0>(ip, h, w, l, oy, out),
        }
    }
}

/// [`dw_row_512`] for a kernel / stride known at compile time (`K, S > 0`: interior pixels run a
/// fully unrolled tap loop without bounds checks) or at run time (`K = S = 0`: `g` is used).
/// Border pixels take the checked path.
///
/// # Safety
/// As [`dw_row_512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dw_row_512_k<const K: usize, const S: usize>(
    ip: *const f32,
    h: usize,
    w: usize,
    l: DwLayer<'_>,
    oy: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let DwLayer { weight, bias, geom: g, act, residual } = l;
    let c = bias.len();
    const PX: usize = 4;
    let (k, st, pad) = if K == 0 { (g.k, g.stride, g.pad) } else { (K, S, g.pad) };
    let ow = out.len() / c;
    let (wp, op) = (weight.as_ptr(), out.as_mut_ptr());
    let ky0 = pad.saturating_sub(oy * st);
    let ky1 = k.min((h + pad).saturating_sub(oy * st));
    let rows_full = K > 0 && ky0 == 0 && ky1 == k;
    // interior columns: every kx in range
    let ox_lo = pad.div_ceil(st);
    let ox_hi = if w + pad >= k { ((w + pad - k) / st + 1).min(ow) } else { 0 };
    let mut cb = 0;
    while cb < c {
        let n = (c - cb).min(32);
        let full = n == 32;
        let (m0, m1) = crate::gemm512::masks32(n);
        unsafe {
            let b0 = _mm512_maskz_loadu_ps(m0, bias.as_ptr().add(cb));
            let b1 = _mm512_maskz_loadu_ps(m1, bias.as_ptr().add(cb + 16));
            // Activation, inner residual and store of output pixel `ox`.
            let finish = |ox: usize, a0: __m512, a1: __m512| {
                let a0 = crate::act::avx512::act(act, a0);
                let a1 = crate::act::avx512::act(act, a1);
                let (a0, a1) = if residual {
                    let src = ip.add((oy * w + ox) * c + cb);
                    (
                        _mm512_add_ps(a0, _mm512_maskz_loadu_ps(m0, src)),
                        _mm512_add_ps(a1, _mm512_maskz_loadu_ps(m1, src.add(16))),
                    )
                } else {
                    (a0, a1)
                };
                _mm512_mask_storeu_ps(op.add(ox * c + cb), m0, a0);
                _mm512_mask_storeu_ps(op.add(ox * c + cb + 16), m1, a1);
            };
            let mut ox = 0;
            while ox < ow {
                // Interior columns in groups of PX pixels: 2 * PX independent accumulators
                // instead of one dependent FMA chain per 16 channels.
                if K > 0 && ox >= ox_lo && ox + PX <= ox_hi {
                    let mut a0 = [b0; PX];
                    let mut a1 = [b1; PX];
                    for ky in ky0..ky1 {
                        let rowp = ip.add(((oy * S + ky - pad) * w + ox * S - pad) * c + cb);
                        for kx in 0..K {
                            let wk = wp.add((ky * K + kx) * c + cb);
                            let (w0, w1) = (_mm512_maskz_loadu_ps(m0, wk), _mm512_maskz_loadu_ps(m1, wk.add(16)));
                            for j in 0..PX {
                                let src = rowp.add((j * S + kx) * c);
                                a0[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m0, src), w0, a0[j]);
                                a1[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m1, src.add(16)), w1, a1[j]);
                            }
                        }
                    }
                    for j in 0..PX {
                        finish(ox + j, a0[j], a1[j]);
                    }
                    ox += PX;
                    continue;
                }
                let (mut a0, mut a1) = (b0, b1);
                if rows_full && full && ox >= ox_lo && ox < ox_hi {
                    let base = ip.add(((oy * S - pad) * w + ox * S - pad) * c + cb);
                    for ky in 0..K {
                        for kx in 0..K {
                            let src = base.add((ky * w + kx) * c);
                            let wk = wp.add((ky * K + kx) * c + cb);
                            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(src), _mm512_loadu_ps(wk), a0);
                            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(src.add(16)), _mm512_loadu_ps(wk.add(16)), a1);
                        }
                    }
                } else {
                    let kx0 = pad.saturating_sub(ox * st);
                    let kx1 = k.min((w + pad).saturating_sub(ox * st));
                    for ky in ky0..ky1 {
                        let iy = oy * st + ky - pad;
                        for kx in kx0..kx1 {
                            let ix = ox * st + kx - pad;
                            let src = ip.add((iy * w + ix) * c + cb);
                            let wk = wp.add((ky * k + kx) * c + cb);
                            let (s0, s1) = (_mm512_maskz_loadu_ps(m0, src), _mm512_maskz_loadu_ps(m1, src.add(16)));
                            a0 = _mm512_fmadd_ps(s0, _mm512_maskz_loadu_ps(m0, wk), a0);
                            a1 = _mm512_fmadd_ps(s1, _mm512_maskz_loadu_ps(m1, wk.add(16)), a1);
                        }
                    }
                }
                finish(ox, a0, a1);
                ox += 1;
            }
        }
        cb += 32;
    }
}
