//! EMO's strided-window multi-head self-attention ("EW-MHSA", attn_pre) on channels-last data,
//! computed directly from pixel indices: no padding copy, no partition / merge permutes.
//!
//! For a map of `h x w` pixels and window size `ws` (0 = one global window), the map is
//! (virtually) zero-padded on the right/bottom to `hp x wp`, `n1 = hp/wh`, `n2 = wp/ww`; window
//! `(i1, i2)` holds the pixels `(h1*n1 + i1, w1*n2 + i2)` as tokens `h1*ww + w1`. Padded
//! tokens have `x = 0`, so their q / k equal the qk-conv bias and their value is 0; they are
//! keys (not masked, as in the official model) but their query outputs are never computed.

use rayon::prelude::*;

use crate::act::exp;
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
    /// One head of one window: `o[i] = softmax(q[i] · kt * scale) · v` for each real query `i`.
    /// `q`: `[lq, dh]`, `kt`: `[dh, l]`, `v`: `[l, dh]`, `s`: scratch of `l`, `o`: `[lq, dh]`.
    #[allow(clippy::too_many_arguments)]
    fn head / head_at(q: &[f32], kt: &[f32], v: &[f32], lq: usize, l: usize, dh: usize, scale: f32, s: &mut [f32], o: &mut [f32]) {
        for i in 0..lq {
            s.iter_mut().for_each(|x| *x = 0.0);
            let qi = &q[i * dh..(i + 1) * dh];
            for (d, &qd) in qi.iter().enumerate() {
                let krow = &kt[d * l..(d + 1) * l];
                for (sj, kj) in s.iter_mut().zip(krow) {
                    *sj += qd * kj;
                }
            }
            let mut m = f32::NEG_INFINITY;
            for sj in s.iter_mut() {
                *sj *= scale;
                m = m.max(*sj);
            }
            let mut sum = 0.0;
            for sj in s.iter_mut() {
                *sj = exp(*sj - m);
                sum += *sj;
            }
            let inv = 1.0 / sum;
            let oi = &mut o[i * dh..(i + 1) * dh];
            oi.iter_mut().for_each(|x| *x = 0.0);
            for (j, &sj) in s.iter().enumerate() {
                let p = sj * inv;
                for (od, vd) in oi.iter_mut().zip(&v[j * dh..(j + 1) * dh]) {
                    *od += p * vd;
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

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
    assert!(heads > 0 && c % heads == 0);
    let n = batch * h * w;
    assert!(x.len() >= n * c && qk.len() >= n * 2 * c && out.len() >= n * c && qk_bias.len() >= 2 * c);
    let g = Windows::new(h, w, ws);
    let (l, dh) = (g.wh * g.ww, c / heads);
    let level = crate::isa::level();
    let dst = SendPtr(out.as_mut_ptr());
    let tasks = batch * g.n1 * g.n2 * heads;
    (0..tasks).into_par_iter().for_each_init(
        || (vec![0f32; l * dh], vec![0f32; dh * l], vec![0f32; l * dh], vec![0f32; l], vec![0f32; l * dh], vec![0usize; l]),
        |(q, kt, v, s, o, pix), t| {
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
                        q[lq * dh..(lq + 1) * dh].copy_from_slice(&qkp[hd * dh..(hd + 1) * dh]);
                        for d in 0..dh {
                            kt[d * l + tok] = qkp[c + hd * dh + d];
                        }
                        v[tok * dh..(tok + 1) * dh].copy_from_slice(&x[p * c + hd * dh..p * c + (hd + 1) * dh]);
                        pix[lq] = p;
                        lq += 1;
                    } else {
                        for d in 0..dh {
                            kt[d * l + tok] = qk_bias[c + hd * dh + d];
                        }
                        v[tok * dh..(tok + 1) * dh].iter_mut().for_each(|z| *z = 0.0);
                    }
                }
            }
            head_at(level, q, kt, v, lq, l, dh, scale, s, o);
            let dst = dst;
            for (i, &p) in pix[..lq].iter().enumerate() {
                // SAFETY: each (pixel, head) slot is written by exactly one task.
                unsafe {
                    let d = std::slice::from_raw_parts_mut(dst.0.add(p * c + hd * dh), dh);
                    d.copy_from_slice(&o[i * dh..(i + 1) * dh]);
                }
            }
        },
    );
}
