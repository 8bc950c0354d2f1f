//! Dense k x k convolution for the stem (few input channels) on channels-last data: a direct
//! kernel whose inner loop runs over output channels. im2col + GEMM is a poor fit for 3 input
//! channels.

use rayon::prelude::*;

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
    #[allow(clippy::too_many_arguments)]
    fn conv_row / conv_row_at(input: &[f32], h: usize, w: usize, cin: usize, weight: &[f32], bias: &[f32], cout: usize, g: DwGeom, oy: usize, act: Act, out: &mut [f32]) {
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
                    let src = &input[(iy as usize * w + ix as usize) * cin..][..cin];
                    for (ci, &s) in src.iter().enumerate() {
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

/// `out[b, oy, ox, :] = act(bias + sum_{taps, ci} in[b, iy, ix, ci] * w[tap, ci, :])`.
#[allow(clippy::too_many_arguments)]
pub fn conv2d(
    input: &[f32],
    batch: usize,
    h: usize,
    w: usize,
    cin: usize,
    weight: &[f32],
    bias: &[f32],
    cout: usize,
    g: DwGeom,
    act: Act,
    out: &mut [f32],
) {
    let (oh, ow) = (g.out_len(h), g.out_len(w));
    assert!(input.len() >= batch * h * w * cin && out.len() >= batch * oh * ow * cout);
    let level = crate::isa::level();
    out[..batch * oh * ow * cout].par_chunks_mut(ow * cout).enumerate().for_each(|(r, row)| {
        let (b, oy) = (r / oh, r % oh);
        conv_row_at(level, &input[b * h * w * cin..(b + 1) * h * w * cin], h, w, cin, weight, bias, cout, g, oy, act, row);
    });
}

/// Per-image channel means of `[batch, pixels, c]` into `[batch, c]`.
pub fn channel_mean(x: &[f32], batch: usize, pixels: usize, c: usize, out: &mut [f32]) {
    for b in 0..batch {
        let o = &mut out[b * c..(b + 1) * c];
        o.iter_mut().for_each(|v| *v = 0.0);
        for p in 0..pixels {
            for (v, s) in o.iter_mut().zip(&x[(b * pixels + p) * c..(b * pixels + p + 1) * c]) {
                *v += s;
            }
        }
        o.iter_mut().for_each(|v| *v /= pixels as f32);
    }
}

/// Small dense layer `y = act(W x + b)` with a PyTorch `[n, k]` weight (SE convs, classifier).
pub fn linear(x: &[f32], w: &[f32], b: &[f32], n: usize, k: usize, act: Act, y: &mut [f32]) {
    for o in 0..n {
        let s: f32 = w[o * k..(o + 1) * k].iter().zip(x).map(|(a, b)| a * b).sum();
        y[o] = apply_one(act, s + b[o]);
    }
}
