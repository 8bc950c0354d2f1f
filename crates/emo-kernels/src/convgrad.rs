//! Dense (one-group) convolution on channels-first (NCHW) data for *training*: the forward
//! pass and the two gradients, each one GEMM per image. A 1x1 stride-1 conv multiplies the
//! planes as they lie; any other kernel goes through an im2col matrix of the image.
//!
//! burn's autodiff differentiates a conv through the backend's generic
//! `conv2d_weight_backward` (a conv with batch and channels swapped, after transposing both
//! operands) and `conv2d_x_backward` (a transposed conv). Here, with `W` the `[co, ci·kh·kw]`
//! weight, `C_b` image `b`'s `[ci·kh·kw, oh·ow]` im2col matrix (its input itself for 1x1) and
//! `G_b` its `[co, oh·ow]` output gradient:
//!
//! - forward: `Y_b = W · C_b`;
//! - input gradient: `GX_b = col2im(Wᵀ · G_b)`;
//! - weight gradient: `GW = Σ_b G_b · C_bᵀ`.
//!
//! A 3x3, stride-1, pad-1 conv with enough channels and pixels ([`winograd`]) runs its forward
//! pass and input gradient by Winograd's F(4x4, 3x3) instead (the input gradient of such a conv
//! is the same conv with the kernel rotated and transposed): 36 GEMMs over the 4x4 output tiles
//! of all the images, a quarter of the multiplies. The weight gradient stays an im2col GEMM.
//!
//! Single-threaded (the trainer runs one data-parallel replica per core) and in a fixed order,
//! so runs and resumes stay bit-exact.

use crate::dwgrad::{live_run, out_len};
use crate::winograd::{at, bt, weight_tile};

/// Geometry of a one-group conv on `[n, ci, h, w]` with a `[co, ci, kh, kw]` weight
/// (PyTorch / burn layout) and symmetric padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvPlan {
    pub n: usize,
    pub ci: usize,
    pub co: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: [usize; 2],
    pub pad: [usize; 2],
    pub dilation: [usize; 2],
}

impl ConvPlan {
    /// A 1x1, stride-1 conv over `hw` pixels per image.
    pub fn pointwise(n: usize, ci: usize, co: usize, hw: usize) -> Self {
        ConvPlan { n, ci, co, h: 1, w: hw, kh: 1, kw: 1, stride: [1, 1], pad: [0, 0], dilation: [1, 1] }
    }

    /// Output height and width (PyTorch's formula).
    pub fn out_hw(&self) -> (usize, usize) {
        (
            out_len(self.h, self.kh, self.stride[0], self.pad[0], self.dilation[0]),
            out_len(self.w, self.kw, self.stride[1], self.pad[1], self.dilation[1]),
        )
    }

    pub fn input_len(&self) -> usize {
        self.n * self.ci * self.h * self.w
    }
    pub fn output_len(&self) -> usize {
        let (oh, ow) = self.out_hw();
        self.n * self.co * oh * ow
    }
    pub fn weight_len(&self) -> usize {
        self.co * self.ci * self.kh * self.kw
    }

    /// Whether the image's planes are its im2col matrix (1x1, stride 1, no padding).
    fn direct(&self) -> bool {
        (self.kh, self.kw, self.stride, self.pad) == (1, 1, [1, 1], [0, 0])
    }

    /// Rows of the im2col matrix (`ci · kh · kw`).
    fn k(&self) -> usize {
        self.ci * self.kh * self.kw
    }
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` with element strides `(row, column)` for each operand.
#[allow(clippy::too_many_arguments)]
fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_s: (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    lhs_s: (usize, usize),
    rhs: &[f32],
    rhs_s: (usize, usize),
) {
    let last = |s: (usize, usize), r: usize, c: usize| (r - 1) * s.0 + (c - 1) * s.1;
    if m == 0 || n == 0 {
        return;
    }
    assert!(last(dst_s, m, n) < dst.len(), "gemm: destination too short");
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    assert!(last(lhs_s, m, k) < lhs.len() && last(rhs_s, k, n) < rhs.len(), "gemm: operand too short");
    // SAFETY: the asserts above keep every element the strides reach inside its slice, and
    // `dst` does not alias the operands (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_s.1 as isize,
            dst_s.0 as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_s.1 as isize,
            lhs_s.0 as isize,
            rhs.as_ptr(),
            rhs_s.1 as isize,
            rhs_s.0 as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Calls `f(col row, oy, input row iy, ox range, first input column, column stride)` for every
/// run of im2col entries that reads inside the input; everything else is zero padding.
fn for_each_run(p: &ConvPlan, mut f: impl FnMut(usize, usize, usize, (usize, usize), usize)) {
    let (oh, ow) = p.out_hw();
    let ([sy, sx], [dy, dx], [py, px]) = (p.stride, p.dilation, p.pad);
    for i in 0..p.ci {
        for ky in 0..p.kh {
            for kx in 0..p.kw {
                let row = (i * p.kh + ky) * p.kw + kx;
                let Some((lo, hi, ix0)) = live_run(ow, p.w, sx, kx, dx, px) else { continue };
                for oy in 0..oh {
                    let iy = (oy * sy + ky * dy) as isize - py as isize;
                    if iy >= 0 && (iy as usize) < p.h {
                        f(row, oy, i * p.h * p.w + iy as usize * p.w, (lo, hi), ix0);
                    }
                }
            }
        }
    }
}

/// Image `x` (`[ci, h, w]`) as its `[ci·kh·kw, oh·ow]` im2col matrix in `cols`.
fn im2col(p: &ConvPlan, x: &[f32], cols: &mut [f32]) {
    let (oh, ow) = p.out_hw();
    let (ohw, sx) = (oh * ow, p.stride[1]);
    cols.fill(0.0);
    for_each_run(p, |row, oy, src, (lo, hi), ix0| {
        let dst = &mut cols[row * ohw + oy * ow + lo..][..hi - lo];
        dst.iter_mut().zip(x[src + ix0..].iter().step_by(sx)).for_each(|(d, s)| *d = *s);
    });
}

/// Add the `[ci·kh·kw, oh·ow]` matrix `cols` back onto image gradient `gx` (`[ci, h, w]`).
fn col2im(p: &ConvPlan, cols: &[f32], gx: &mut [f32]) {
    let (oh, ow) = p.out_hw();
    let (ohw, sx) = (oh * ow, p.stride[1]);
    gx.fill(0.0);
    for_each_run(p, |row, oy, dst, (lo, hi), ix0| {
        let src = &cols[row * ohw + oy * ow + lo..][..hi - lo];
        gx[dst + ix0..].iter_mut().step_by(sx).zip(src).for_each(|(d, s)| *d += *s);
    });
}

/// Whether [`forward`] and [`x_grad`] run `p` by Winograd F(4x4, 3x3): a 3x3 conv with stride 1,
/// padding 1 and dilation 1, at least 32 channels in and out, on a map where the tiles' 36
/// products per channel pair and tile are at most half the direct conv's 9 per pixel (6x6 and
/// larger maps, 3x3, 4x4; not 2x2 or 5x5).
pub fn winograd(p: &ConvPlan) -> bool {
    let tiles = p.h.div_ceil(4) * p.w.div_ceil(4);
    (p.kh, p.kw, p.stride, p.pad, p.dilation) == (3, 3, [1, 1], [1, 1], [1, 1])
        && p.ci >= 32
        && p.co >= 32
        && 8 * tiles <= p.h * p.w
}

/// The Winograd-domain weight `[36][rows][cols]` of a `[co, ci, 3, 3]` weight: for the forward
/// conv `[36][co][ci]`; for the input gradient (`grad`), the conv from `co` to `ci` channels
/// with the kernel rotated by 180 degrees, `[36][ci][co]`.
fn winograd_weight(w: &[f32], co: usize, ci: usize, grad: bool) -> Vec<f32> {
    let (rows, cols) = if grad { (ci, co) } else { (co, ci) };
    let mut u = vec![0f32; 36 * rows * cols];
    for o in 0..co {
        for i in 0..ci {
            let k = &w[(o * ci + i) * 9..][..9];
            let tile = if grad { weight_tile(|y, x| k[(2 - y) * 3 + 2 - x]) } else { weight_tile(|y, x| k[y * 3 + x]) };
            let at = if grad { i * co + o } else { o * ci + i };
            for (e, v) in tile.into_iter().enumerate() {
                u[e * rows * cols + at] = v;
            }
        }
    }
    u
}

/// A 3x3 stride-1 pad-1 conv of `n` images `[n, cin, h, w]` into `out` (`[n, cout, h, w]`) by
/// Winograd F(4x4, 3x3) with the weight `u` of [`winograd_weight`] (`[36][cout][cin]`).
fn winograd_conv(x: &[f32], n: usize, cin: usize, (h, w): (usize, usize), u: &[f32], cout: usize, out: &mut [f32]) {
    let (th, tw) = (h.div_ceil(4), w.div_ceil(4));
    let per = th * tw;
    let cols = n * per;
    // V[e][c][tile] = (Bᵀ d Bᵀᵀ)[e] of each 6x6 input tile d (zero outside the image).
    let mut v = vec![0f32; 36 * cin * cols];
    for b in 0..n {
        for c in 0..cin {
            let plane = &x[(b * cin + c) * h * w..][..h * w];
            for ty in 0..th {
                for tx in 0..tw {
                    let (y0, x0) = (ty * 4, tx * 4);
                    let mut d = [[0f32; 6]; 6];
                    for (i, row) in d.iter_mut().enumerate() {
                        let iy = (y0 + i).wrapping_sub(1);
                        if iy < h {
                            for (k, v) in row.iter_mut().enumerate() {
                                let ix = (x0 + k).wrapping_sub(1);
                                if ix < w {
                                    *v = plane[iy * w + ix];
                                }
                            }
                        }
                    }
                    // Columns, then rows.
                    let mut t = [[0f32; 6]; 6];
                    for k in 0..6 {
                        let col = bt(std::array::from_fn(|l| d[l][k]));
                        for i in 0..6 {
                            t[i][k] = col[i];
                        }
                    }
                    let col = b * per + ty * tw + tx;
                    for (i, ti) in t.iter().enumerate() {
                        for (k, val) in bt(*ti).into_iter().enumerate() {
                            v[((i * 6 + k) * cin + c) * cols + col] = val;
                        }
                    }
                }
            }
        }
    }
    // M[e] = U[e] · V[e]: `[cout, cin] · [cin, tiles]`.
    let mut m = vec![0f32; 36 * cout * cols];
    for e in 0..36 {
        let (me, ue, ve) = (
            &mut m[e * cout * cols..][..cout * cols],
            &u[e * cout * cin..][..cout * cin],
            &v[e * cin * cols..][..cin * cols],
        );
        gemm((cout, cols, cin), me, (cols, 1), false, ue, (cin, 1), ve, (cols, 1));
    }
    // Y = Aᵀ M A per tile, cropped to the image.
    for b in 0..n {
        for o in 0..cout {
            let plane = &mut out[(b * cout + o) * h * w..][..h * w];
            for ty in 0..th {
                for tx in 0..tw {
                    let (y0, x0) = (ty * 4, tx * 4);
                    let col = b * per + ty * tw + tx;
                    let mut t = [[0f32; 6]; 4];
                    for k in 0..6 {
                        let c4 = at(std::array::from_fn(|l| m[((l * 6 + k) * cout + o) * cols + col]));
                        for i in 0..4 {
                            t[i][k] = c4[i];
                        }
                    }
                    for (i, ti) in t.iter().enumerate().take(h - y0) {
                        let row = at(*ti);
                        let oy = y0 + i;
                        for (q, val) in row.into_iter().enumerate().take(w - x0) {
                            plane[oy * w + x0 + q] = val;
                        }
                    }
                }
            }
        }
    }
}

/// `out = conv(x, weight)` (no bias).
pub fn forward(x: &[f32], weight: &[f32], p: &ConvPlan, out: &mut [f32]) {
    check(p, x.len(), weight.len(), out.len());
    if winograd(p) {
        let u = winograd_weight(weight, p.co, p.ci, false);
        winograd_conv(x, p.n, p.ci, (p.h, p.w), &u, p.co, out);
        return;
    }
    let (oh, ow) = p.out_hw();
    let (chw, ohw, k, co) = (p.ci * p.h * p.w, oh * ow, p.k(), p.co);
    let mut cols = if p.direct() { Vec::new() } else { vec![0f32; k * ohw] };
    for b in 0..p.n {
        let (xb, ob) = (&x[b * chw..][..chw], &mut out[b * co * ohw..][..co * ohw]);
        let c: &[f32] = if p.direct() {
            xb
        } else {
            im2col(p, xb, &mut cols);
            &cols
        };
        gemm((co, ohw, k), ob, (ohw, 1), false, weight, (k, 1), c, (ohw, 1));
    }
}

/// Gradient of the input for output gradient `g`.
pub fn x_grad(g: &[f32], weight: &[f32], p: &ConvPlan, gx: &mut [f32]) {
    check(p, gx.len(), weight.len(), g.len());
    if winograd(p) {
        // The input gradient of a stride-1 "same" 3x3 conv is that conv, kernel rotated, from
        // the output channels back to the input ones.
        let u = winograd_weight(weight, p.co, p.ci, true);
        winograd_conv(g, p.n, p.co, (p.h, p.w), &u, p.ci, gx);
        return;
    }
    let (oh, ow) = p.out_hw();
    let (chw, ohw, k, co) = (p.ci * p.h * p.w, oh * ow, p.k(), p.co);
    let mut cols = if p.direct() { Vec::new() } else { vec![0f32; k * ohw] };
    for b in 0..p.n {
        let (gb, xb) = (&g[b * co * ohw..][..co * ohw], &mut gx[b * chw..][..chw]);
        // Wᵀ[r, o] = W[o, r]: row stride 1, column stride k.
        if p.direct() {
            gemm((k, ohw, co), xb, (ohw, 1), false, weight, (1, k), gb, (ohw, 1));
        } else {
            gemm((k, ohw, co), &mut cols, (ohw, 1), false, weight, (1, k), gb, (ohw, 1));
            col2im(p, &cols, xb);
        }
    }
}

/// Gradient of the weight for output gradient `g`, summed over the images.
pub fn weight_grad(x: &[f32], g: &[f32], p: &ConvPlan, gw: &mut [f32]) {
    check(p, x.len(), gw.len(), g.len());
    let (oh, ow) = p.out_hw();
    let (chw, ohw, k, co) = (p.ci * p.h * p.w, oh * ow, p.k(), p.co);
    let mut cols = if p.direct() { Vec::new() } else { vec![0f32; k * ohw] };
    if p.n == 0 || ohw == 0 {
        gw.fill(0.0);
    }
    for b in 0..p.n {
        let (gb, xb) = (&g[b * co * ohw..][..co * ohw], &x[b * chw..][..chw]);
        let c: &[f32] = if p.direct() {
            xb
        } else {
            im2col(p, xb, &mut cols);
            &cols
        };
        // C_bᵀ[q, r] = C_b[r, q]: row stride 1, column stride oh·ow.
        gemm((co, k, ohw), gw, (k, 1), b > 0, gb, (ohw, 1), c, (1, ohw));
    }
}

fn check(p: &ConvPlan, input: usize, weight: usize, output: usize) {
    assert_eq!(input, p.input_len(), "conv input size");
    assert_eq!(weight, p.weight_len(), "conv weight size");
    assert_eq!(output, p.output_len(), "conv output size");
}
