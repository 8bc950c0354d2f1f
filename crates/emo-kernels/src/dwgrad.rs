//! Depthwise convolution on channels-first (NCHW) data for *training*: the forward pass and the
//! two gradients (input and weight) that a depthwise layer needs in backpropagation.
//!
//! burn's CPU backend computes a depthwise conv's input gradient as a grouped transposed
//! convolution and its weight gradient as a grouped convolution, one tiny GEMM per channel
//! and image; for EMO's `conv_local` (hundreds of channels, 3x3 or 5x5 kernels, maps of 1x1
//! to 96x96) that bookkeeping costs more than the arithmetic. These loops work one channel
//! plane at a time: each (kernel row, kernel column) pair is a contiguous multiply-add over an
//! output row (stride 1) or a strided one (stride 2), which the compiler vectorises.
//!
//! Single-threaded on purpose: the trainer runs one data-parallel replica per core, and a fixed
//! summation order keeps runs (and resumes) bit-exact.

/// Geometry of one depthwise layer on an NCHW tensor `[n, c, h, w]` with a `[c, 1, kh, kw]`
/// weight (PyTorch / burn layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DwPlan {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: [usize; 2],
    pub pad: [usize; 2],
    pub dilation: [usize; 2],
}

impl DwPlan {
    /// Output height and width (PyTorch's formula).
    pub fn out_hw(&self) -> (usize, usize) {
        let len = |i: usize, k: usize, s: usize, p: usize, d: usize| {
            let span = d * (k - 1) + 1;
            if i + 2 * p < span { 0 } else { (i + 2 * p - span) / s + 1 }
        };
        (
            len(self.h, self.kh, self.stride[0], self.pad[0], self.dilation[0]),
            len(self.w, self.kw, self.stride[1], self.pad[1], self.dilation[1]),
        )
    }

    pub fn input_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }

    pub fn output_len(&self) -> usize {
        let (oh, ow) = self.out_hw();
        self.n * self.c * oh * ow
    }

    pub fn weight_len(&self) -> usize {
        self.c * self.kh * self.kw
    }
}

/// `[n, rows, cols]` -> `[n, cols, rows]`: NCHW planes to channels-last (`rows = c`,
/// `cols = h * w`) or back. A 1-wide side (1x1 maps, the weight of a 1-channel layer) is the
/// same layout both ways: a plain copy.
fn transpose_planes(src: &[f32], n: usize, rows: usize, cols: usize) -> Vec<f32> {
    let len = n * rows * cols;
    if rows == 1 || cols == 1 {
        return src[..len].to_vec();
    }
    let mut dst = vec![0.0; len];
    const B: usize = 32;
    for (s, d) in src.chunks_exact(rows * cols).zip(dst.chunks_exact_mut(rows * cols)) {
        for r0 in (0..rows).step_by(B) {
            let r1 = (r0 + B).min(rows);
            for c0 in (0..cols).step_by(B) {
                let c1 = (c0 + B).min(cols);
                for r in r0..r1 {
                    for (k, v) in s[r * cols + c0..r * cols + c1].iter().enumerate() {
                        d[(c0 + k) * rows + r] = *v;
                    }
                }
            }
        }
    }
    dst
}

/// Every kernel tap that reads inside the input, per output pixel: calls
/// `f(output pixel, input pixel, tap)` (pixel indices within one image).
#[inline(always)]
fn for_each_tap(plan: &DwPlan, mut f: impl FnMut(usize, usize, usize)) {
    let (oh, ow) = plan.out_hw();
    let [sy, sx] = plan.stride;
    let [dy, dx] = plan.dilation;
    let [py, px] = plan.pad;
    for oy in 0..oh {
        for ky in 0..plan.kh {
            let iy = (oy * sy + ky * dy) as isize - py as isize;
            if iy < 0 || iy as usize >= plan.h {
                continue;
            }
            for ox in 0..ow {
                for kx in 0..plan.kw {
                    let ix = (ox * sx + kx * dx) as isize - px as isize;
                    if ix >= 0 && (ix as usize) < plan.w {
                        f(oy * ow + ox, iy as usize * plan.w + ix as usize, ky * plan.kw + kx);
                    }
                }
            }
        }
    }
}

// The loops below run channels-last: the planes are transposed to `[n, pixels, c]` and every
// (output pixel, tap) pair is one multiply-add over the channels (48 to 500+ in EMO), so maps
// of any size, down to the 1x1 and 2x2 ones of 32x32 inputs, vectorise the same way, and taps
// that fall in the zero padding cost nothing.

/// `out = depthwise(x, weight)` (no bias): `out` has `plan.output_len()` values.
pub fn forward(x: &[f32], weight: &[f32], plan: &DwPlan, out: &mut [f32]) {
    assert_eq!(x.len(), plan.input_len());
    assert_eq!(weight.len(), plan.weight_len());
    assert_eq!(out.len(), plan.output_len());
    let (c, hw, kk) = (plan.c, plan.h * plan.w, plan.kh * plan.kw);
    let (oh, ow) = plan.out_hw();
    let ohw = oh * ow;
    let xt = transpose_planes(x, plan.n, c, hw);
    let wt = transpose_planes(weight, 1, c, kk);
    let mut ot = vec![0.0; plan.output_len()];
    for b in 0..plan.n {
        let (xb, ob) = (&xt[b * hw * c..][..hw * c], &mut ot[b * ohw * c..][..ohw * c]);
        for_each_tap(plan, |o, i, t| madd(&mut ob[o * c..][..c], &wt[t * c..][..c], &xb[i * c..][..c]));
    }
    out.copy_from_slice(&transpose_planes(&ot, plan.n, ohw, c));
}

/// Gradient of the input: `gx = depthwise_transposed(g, weight)`; `g` has the output's shape.
pub fn x_grad(g: &[f32], weight: &[f32], plan: &DwPlan, gx: &mut [f32]) {
    assert_eq!(g.len(), plan.output_len());
    assert_eq!(weight.len(), plan.weight_len());
    assert_eq!(gx.len(), plan.input_len());
    let (c, hw, kk) = (plan.c, plan.h * plan.w, plan.kh * plan.kw);
    let (oh, ow) = plan.out_hw();
    let ohw = oh * ow;
    let gt = transpose_planes(g, plan.n, c, ohw);
    let wt = transpose_planes(weight, 1, c, kk);
    let mut gxt = vec![0.0; plan.input_len()];
    for b in 0..plan.n {
        let (gb, gxb) = (&gt[b * ohw * c..][..ohw * c], &mut gxt[b * hw * c..][..hw * c]);
        for_each_tap(plan, |o, i, t| madd(&mut gxb[i * c..][..c], &wt[t * c..][..c], &gb[o * c..][..c]));
    }
    gx.copy_from_slice(&transpose_planes(&gxt, plan.n, hw, c));
}

/// Gradient of the weight: `gw[c, ky, kx] = sum over images and outputs of g * x`.
pub fn weight_grad(x: &[f32], g: &[f32], plan: &DwPlan, gw: &mut [f32]) {
    assert_eq!(x.len(), plan.input_len());
    assert_eq!(g.len(), plan.output_len());
    assert_eq!(gw.len(), plan.weight_len());
    let (c, hw, kk) = (plan.c, plan.h * plan.w, plan.kh * plan.kw);
    let (oh, ow) = plan.out_hw();
    let ohw = oh * ow;
    let xt = transpose_planes(x, plan.n, c, hw);
    let gt = transpose_planes(g, plan.n, c, ohw);
    let mut gwt = vec![0.0; kk * c];
    for b in 0..plan.n {
        let (xb, gb) = (&xt[b * hw * c..][..hw * c], &gt[b * ohw * c..][..ohw * c]);
        for_each_tap(plan, |o, i, t| madd(&mut gwt[t * c..][..c], &gb[o * c..][..c], &xb[i * c..][..c]));
    }
    gw.copy_from_slice(&transpose_planes(&gwt, 1, kk, c));
}

/// `acc[i] += a[i] * b[i]`.
#[inline(always)]
fn madd(acc: &mut [f32], a: &[f32], b: &[f32]) {
    let n = acc.len();
    for ((d, x), y) in acc.iter_mut().zip(&a[..n]).zip(&b[..n]) {
        *d += x * y;
    }
}
