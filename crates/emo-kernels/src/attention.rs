//! EMO's strided-window multi-head self-attention ("EW-MHSA", attn_pre) on channels-last data,
//! computed directly from pixel indices: no padding copy, no partition / merge permutes.
//!
//! For a map of `h x w` pixels and window size `ws` (0 = one global window), the map is
//! (virtually) zero-padded on the right/bottom to `hp x wp`, `n1 = hp/wh`, `n2 = wp/ww`; window
//! `(i1, i2)` holds the pixels `(h1*n1 + i1, w1*n2 + i2)` as tokens `h1*ww + w1`. Padded
//! tokens have `x = 0`, so their q / k equal the qk-conv bias and their value is 0; they are
//! keys (not masked, as in the official model) but their query outputs are never computed.

use std::cell::RefCell;

use crate::gemm512::NR;
#[cfg(target_arch = "x86_64")]
use crate::gemm512::band;
use crate::pool::{SendPtr, parallel_for};

use crate::act::{Act, exp, max_lanes, sum_lanes};
use crate::multiversion;

/// Window geometry (same rule as `emo_spec::AttnSpec::windows`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Windows {
    pub wh: usize,
    pub ww: usize,
    pub n1: usize,
    pub n2: usize,
}

impl Windows {
    pub fn new(h: usize, w: usize, ws: usize) -> Self {
        let (wh, ww) = if ws == 0 { (h, w) } else { (ws, ws) };
        let hp = h.div_ceil(wh) * wh;
        let wp = w.div_ceil(ww) * ww;
        Windows { wh, ww, n1: hp / wh, n2: wp / ww }
    }
}

multiversion! {
    /// Row softmax of `s` (`rows x l`) in place.
    fn softmax_rows / softmax_rows_at(s: &mut [f32], l: usize) {
        for row in s.chunks_exact_mut(l) {
            let m = max_lanes(row);
            for i in 0..l {
                row[i] = exp(row[i] - m);
            }
            let sum = sum_lanes(row);
            let inv = 1.0 / sum;
            for i in 0..l {
                row[i] *= inv;
            }
        }
    }
}

/// `c[m, n] = scale * a[m, k] · b[k, n]` (all row-major, contiguous), single-threaded.
fn small_gemm(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32], scale: f32) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    // SAFETY: bounds asserted above; row-major strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// One head of one window: `o = softmax(q · kt * scale) · v` for the `lq` real queries.
/// `q`: `[lq, dh]`, `kt`: `[dh, l]`, `v`: `[l, dh]`, `s`: scratch `[lq, l]`, `o`: `[lq, dh]`.
#[allow(clippy::too_many_arguments)]
fn head_at(
    level: crate::isa::Level,
    q: &[f32],
    kt: &[f32],
    v: &[f32],
    lq: usize,
    l: usize,
    dh: usize,
    scale: f32,
    s: &mut [f32],
    o: &mut [f32],
) {
    small_gemm(lq, l, dh, q, kt, s, scale);
    softmax_rows_at(level, &mut s[..lq * l], l);
    small_gemm(lq, dh, l, s, v, o, 1.0);
}

/// Per-thread scratch: q, kt, v, s, o, pixel indices.
type Scratch = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<usize>);

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Default::default());
}

/// Short copies (one head's channels) as a plain loop: `copy_from_slice` calls memmove,
/// which costs more than the copy at these sizes.
#[inline(always)]
fn copy(dst: &mut [f32], src: &[f32]) {
    let src = &src[..dst.len()];
    for i in 0..dst.len() {
        dst[i] = src[i];
    }
}

/// Strided-window attention for a batch of channels-last maps.
///
/// * `x`: `[batch, h, w, c]` normalised input (the values, attn_pre);
/// * `qk`: `[batch, h, w, 2c]` output of the qk 1x1 conv at every real pixel (`[q | k]`, each
///   head-major: channel `t*c + head*dh + d`);
/// * `qk_bias`: `[2c]`, the q / k of a padded pixel;
/// * `out`: `[batch, h, w, c]` attention output (heads merged), before `v`.
#[allow(clippy::too_many_arguments)]
pub fn window_attention(
    x: &[f32],
    qk: &[f32],
    qk_bias: &[f32],
    batch: usize,
    h: usize,
    w: usize,
    c: usize,
    heads: usize,
    ws: usize,
    scale: f32,
    out: &mut [f32],
) {
    assert!(heads > 0 && c.is_multiple_of(heads));
    let n = batch * h * w;
    assert!(x.len() >= n * c && qk.len() >= n * 2 * c && out.len() >= n * c && qk_bias.len() >= 2 * c);
    let g = Windows::new(h, w, ws);
    let (l, dh) = (g.wh * g.ww, c / heads);
    let level = crate::isa::level();
    let dst = SendPtr(out.as_mut_ptr());
    let tasks = batch * g.n1 * g.n2 * heads;
    // At the AVX-512 level, keys and values are gathered straight into the packed panels of
    // the GEMM micro-kernel (and the scale folded into q).
    let packed = cfg!(target_arch = "x86_64") && level == crate::isa::Level::Avx512;
    parallel_for(tasks, |t| {
        SCRATCH.with(|sc| {
            let (q, kt, v, s, o, pix) = &mut *sc.borrow_mut();
            crate::grow_exact(q, l * dh);
            crate::grow_exact(kt, l.div_ceil(NR) * NR * dh);
            crate::grow_exact(v, dh.div_ceil(NR) * NR * l);
            crate::grow_exact(s, l * l);
            crate::grow_exact(o, l * dh);
            crate::grow_exact(pix, l);
            let hd = t % heads;
            let win = t / heads;
            let (b, i1, i2) = (win / (g.n1 * g.n2), (win / g.n2) % g.n1, win % g.n2);
            // Gather: real queries (compacted), all keys, all values.
            let mut lq = 0;
            for h1 in 0..g.wh {
                for w1 in 0..g.ww {
                    let tok = h1 * g.ww + w1;
                    let (y, xx) = (h1 * g.n1 + i1, w1 * g.n2 + i2);
                    if y < h && xx < w {
                        let p = (b * h + y) * w + xx;
                        let qkp = &qk[p * 2 * c..(p + 1) * 2 * c];
                        let qd = &mut q[lq * dh..(lq + 1) * dh];
                        copy(qd, &qkp[hd * dh..(hd + 1) * dh]);
                        if packed {
                            qd.iter_mut().for_each(|v| *v *= scale);
                            let (pk, j) = (tok / NR, tok % NR);
                            let (ks, xv) =
                                (&qkp[c + hd * dh..c + (hd + 1) * dh], &x[p * c + hd * dh..p * c + (hd + 1) * dh]);
                            // SAFETY: kt holds l.div_ceil(NR) panels of [dh, NR] and v
                            // dh.div_ceil(NR) panels of [l, NR] (fitted above); tok < l, d < dh.
                            unsafe {
                                let kp = kt.as_mut_ptr().add(pk * dh * NR + j);
                                for (d, &kv) in ks.iter().enumerate() {
                                    *kp.add(d * NR) = kv;
                                }
                                if dh <= NR {
                                    std::ptr::copy_nonoverlapping(xv.as_ptr(), v.as_mut_ptr().add(tok * NR), dh);
                                } else {
                                    for (d, &xd) in xv.iter().enumerate() {
                                        *v.as_mut_ptr().add(((d / NR) * l + tok) * NR + d % NR) = xd;
                                    }
                                }
                            }
                        } else {
                            for d in 0..dh {
                                kt[d * l + tok] = qkp[c + hd * dh + d];
                            }
                            copy(&mut v[tok * dh..(tok + 1) * dh], &x[p * c + hd * dh..p * c + (hd + 1) * dh]);
                        }
                        pix[lq] = p;
                        lq += 1;
                    } else {
                        if packed {
                            let (pk, j) = (tok / NR, tok % NR);
                            for d in 0..dh {
                                kt[(pk * dh + d) * NR + j] = qk_bias[c + hd * dh + d];
                                v[((d / NR) * l + tok) * NR + d % NR] = 0.0;
                            }
                        } else {
                            for d in 0..dh {
                                kt[d * l + tok] = qk_bias[c + hd * dh + d];
                            }
                            v[tok * dh..(tok + 1) * dh].iter_mut().for_each(|z| *z = 0.0);
                        }
                    }
                }
            }
            if packed {
                // SAFETY: AVX-512F available; q is [lq, dh], kt / v are packed panels of the
                // sizes fitted above, s is [lq, l], o is [lq, dh].
                unsafe {
                    band(
                        lq,
                        dh,
                        l,
                        q.as_ptr(),
                        dh,
                        kt.as_ptr(),
                        0..l.div_ceil(NR),
                        s.as_mut_ptr(),
                        l,
                        None,
                        None,
                        Act::None,
                    );
                    softmax_rows_at(level, &mut s[..lq * l], l);
                    band(
                        lq,
                        l,
                        dh,
                        s.as_ptr(),
                        l,
                        v.as_ptr(),
                        0..dh.div_ceil(NR),
                        o.as_mut_ptr(),
                        dh,
                        None,
                        None,
                        Act::None,
                    );
                }
            } else {
                head_at(level, q, kt, v, lq, l, dh, scale, s, o);
            }
            let dst = dst;
            for (i, &p) in pix[..lq].iter().enumerate() {
                // SAFETY: each (pixel, head) slot is written by exactly one task.
                unsafe {
                    let d = std::slice::from_raw_parts_mut(dst.0.add(p * c + hd * dh), dh);
                    copy(d, &o[i * dh..(i + 1) * dh]);
                }
            }
        })
    });
}
