//! LayerNorm over the channels of every pixel of a channels-last map (EMO's LayerNorm2d),
//! without any transpose: each pixel's channels are contiguous.

use rayon::prelude::*;

use crate::multiversion;

multiversion! {
    pub(crate) fn ln_rows / ln_rows_at(x: &[f32], c: usize, gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
        for (xr, or) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
            let mean = xr.iter().sum::<f32>() / c as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for (((o, v), g), b) in or.iter_mut().zip(xr).zip(gamma).zip(beta) {
                *o = (v - mean) * rstd * g + b;
            }
        }
    }
}

/// `out[p, :] = (x[p, :] - mean) / sqrt(var + eps) * gamma + beta` for `pixels` rows of `c`.
pub fn layer_norm(x: &[f32], pixels: usize, c: usize, gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    assert!(x.len() >= pixels * c && out.len() >= pixels * c && gamma.len() == c && beta.len() == c);
    let level = crate::isa::level();
    let chunk = 64 * c;
    x[..pixels * c].par_chunks(chunk).zip(out[..pixels * c].par_chunks_mut(chunk)).for_each(|(xs, os)| {
        ln_rows_at(level, xs, c, gamma, beta, eps, os);
    });
}
