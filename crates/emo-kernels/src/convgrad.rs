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
//! Single-threaded (the trainer runs one data-parallel replica per core) and in a fixed order,
//! so runs and resumes stay bit-exact.

use crate::dwgrad::{live_run, out_len};

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

/// `out = conv(x, weight)` (no bias).
pub fn forward(x: &[f32], weight: &[f32], p: &ConvPlan, out: &mut [f32]) {
    check(p, x.len(), weight.len(), out.len());
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
