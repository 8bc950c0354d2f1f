//! LayerNorm over the channels of every pixel of a channels-last map (EMO's LayerNorm2d),
//! without any transpose: each pixel's channels are contiguous.

use crate::pool::parallel_chunks_mut;

use crate::act::sum_lanes;
use crate::multiversion;

multiversion! {
    pub(crate) fn ln_rows / ln_rows_at(x: &[f32], c: usize, gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
        for (xr, or) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
            let mean = sum_lanes(xr) / c as f32;
            for i in 0..c {
                or[i] = xr[i] - mean;
            }
            let mut sq = [0f32; 16];
            let chunks = or.chunks_exact(16);
            let rem: f32 = chunks.remainder().iter().map(|d| d * d).sum();
            for ch in chunks {
                for j in 0..16 {
                    sq[j] += ch[j] * ch[j];
                }
            }
            let var = (sum_lanes(&sq) + rem) / c as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            let (gamma, beta) = (&gamma[..c], &beta[..c]);
            for i in 0..c {
                or[i] = or[i] * rstd * gamma[i] + beta[i];
            }
        }
    }
}

/// `out[p, :] = (x[p, :] - mean) / sqrt(var + eps) * gamma + beta` for `pixels` rows of `c`.
pub fn layer_norm(x: &[f32], pixels: usize, c: usize, gamma: &[f32], beta: &[f32], eps: f32, out: &mut [f32]) {
    assert!(x.len() >= pixels * c && out.len() >= pixels * c && gamma.len() == c && beta.len() == c);
    let level = crate::isa::level();
    let chunk = 64 * c;
    parallel_chunks_mut(&mut out[..pixels * c], chunk, |i, os| {
        ln_rows_at(level, &x[i * chunk..i * chunk + os.len()], c, gamma, beta, eps, os);
    });
}
