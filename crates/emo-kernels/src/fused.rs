//! Fused stages of an iRMB that each run as one parallel region over row bands, so the
//! intermediate stays in cache and the threads synchronise once instead of twice:
//!
//! * [`ln_matmul`]: LayerNorm over channels, then a 1x1 conv (GEMM) on the same rows;
//! * [`dw_matmul`]: depthwise conv (+ act, + inner residual), then the 1x1 projection
//!   (+ outer residual) on the rows just produced.

use crate::act::{Act, bias_act_rows_at};
use crate::dwconv::{DwGeom, dw_row_at};
use crate::gemm::{Weight, matmul_st};

use crate::pool::{SendPtr, num_threads, parallel_chunks_mut};

fn band_rows(total: usize, min_rows: usize) -> usize {
    let threads = num_threads();
    total.div_ceil(4 * threads).max(min_rows).max(1)
}

/// `xn = LN(x)` (written, as attention needs it) and `out = act(xn · W + bias)`, for `pixels`
/// rows of `c` channels.
#[allow(clippy::too_many_arguments)]
pub fn ln_matmul(
    x: &[f32],
    pixels: usize,
    c: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    xn: &mut [f32],
    w: &Weight,
    bias: Option<&[f32]>,
    act: Act,
    out: &mut [f32],
) {
    assert!(x.len() >= pixels * c && xn.len() >= pixels * c && out.len() >= pixels * w.n && w.k == c);
    let level = crate::isa::level();
    let rows = band_rows(pixels, 8);
    let n = w.n;
    let xp = SendPtr(xn.as_mut_ptr());
    parallel_chunks_mut(&mut out[..pixels * n], rows * n, |i, ob| {
        let xp = xp;
        let r = ob.len() / n;
        // SAFETY: band i owns rows i*rows..i*rows+r of `xn` (asserted in bounds).
        let xb = unsafe { std::slice::from_raw_parts_mut(xp.0.add(i * rows * c), r * c) };
        crate::norm::ln_rows_at(level, &x[i * rows * c..(i * rows + r) * c], c, gamma, beta, eps, xb);
        crate::isa::with_level_unchecked(level, || matmul_st(xb, c, r, w, bias, act, None, ob, n));
    });
}

/// `y = act(dw(e)) (+ e)` then `out = y · P (+ x)`, over bands of output rows.
///
/// `e`: `[batch, h, w, c]`; `y` (scratch) and the result `out`: `[batch, oh, ow, *]`;
/// `residual`: the block input `[batch, oh, ow, P.n]` for the outer residual.
#[allow(clippy::too_many_arguments)]
pub fn dw_matmul(
    e: &[f32],
    batch: usize,
    h: usize,
    w: usize,
    c: usize,
    dw_w: &[f32],
    dw_b: &[f32],
    g: DwGeom,
    act: Act,
    inner_residual: bool,
    y: &mut [f32],
    proj: &Weight,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    let (oh, ow) = (g.out_len(h), g.out_len(w));
    let n = proj.n;
    let rows_total = batch * oh;
    assert!(e.len() >= batch * h * w * c && y.len() >= rows_total * ow * c && out.len() >= rows_total * ow * n && proj.k == c);
    assert!(!inner_residual || (g.stride == 1 && oh == h && ow == w));
    if let Some(r) = residual {
        assert!(r.len() >= rows_total * ow * n);
    }
    let level = crate::isa::level();
    let band = band_rows(rows_total, 1);
    let yp = SendPtr(y.as_mut_ptr());
    parallel_chunks_mut(&mut out[..rows_total * ow * n], band * ow * n, |i, ob| {
        let r0 = i * band;
        let nr = ob.len() / (ow * n);
        let yp = yp;
        // SAFETY: each band owns rows r0..r0+nr of `y` (asserted in bounds).
        let yb = unsafe { std::slice::from_raw_parts_mut(yp.0.add(r0 * ow * c), nr * ow * c) };
        for j in 0..nr {
            let (b, oy) = ((r0 + j) / oh, (r0 + j) % oh);
            let img = &e[b * h * w * c..(b + 1) * h * w * c];
            let row = &mut yb[j * ow * c..(j + 1) * ow * c];
            let res = inner_residual.then(|| (&img[oy * w * c..], w * c));
            #[cfg(target_arch = "x86_64")]
            if level == crate::isa::Level::Avx512 {
                // SAFETY: AVX-512F available; sizes asserted above.
                unsafe { crate::dwconv::dw_row_512(img, h, w, c, dw_w, dw_b, g, oy, row) };
                bias_act_rows_at(level, row, ow * c, 1, ow * c, None, act, res);
                continue;
            }
            dw_row_at(level, img, h, w, c, dw_w, dw_b, g, oy, act, inner_residual, row);
        }
        let res = residual.map(|r| (&r[r0 * ow * n..], n));
        crate::isa::with_level_unchecked(level, || matmul_st(yb, c, nr * ow, proj, None, Act::None, res, ob, n));
    });
}
