//! Depthwise convolution on channels-first (NCHW) data for *training*: the forward pass and the
//! two gradients (input and weight) that a depthwise layer needs in backpropagation.
//!
//! burn's CPU backend computes a depthwise conv's input gradient as a grouped transposed
//! convolution and its weight gradient as a grouped convolution, one tiny GEMM per channel
//! and image; for EMO's `conv_local` (hundreds of channels, 3x3 or 5x5 kernels, maps of 1x1
//! to 96x96) that bookkeeping costs more than the arithmetic. Two layouts of the same loops,
//! chosen per layer by [`DwPlan::layout`]:
//!
//! - [`DwLayout::Planar`] (maps with output rows of 20 or more): one channel plane at a time,
//!   each (kernel row, kernel column) pair a contiguous multiply-add over an output row
//!   (stride 1) or a strided one (stride 2), which the compiler vectorises; no copies.
//! - [`DwLayout::ChannelsLast`] (small maps, where rows are too short to vectorise): the
//!   planes are transposed to channels-last and every tap is a multiply-add over all channels.
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
        (
            out_len(self.h, self.kh, self.stride[0], self.pad[0], self.dilation[0]),
            out_len(self.w, self.kw, self.stride[1], self.pad[1], self.dilation[1]),
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

    /// The layout the public functions use for this layer: planar when output rows hold at
    /// least 20 pixels. Forward + both gradients, batch 8 (2-core Xeon, 2026-12-02): planar
    /// 19 against 122 ms at 96x96 (36 channels, 3x3), 17 against 19 ms at 24x24 (128, 5x5),
    /// 1.3 against 1.1 ms at 16x16, 15 against 4.5 ms at 12x12 (256, 5x5).
    pub fn layout(&self) -> DwLayout {
        if self.out_hw().1 >= 20 { DwLayout::Planar } else { DwLayout::ChannelsLast }
    }
}

/// Which loops compute a layer (see the module docs); both give the same values up to the
/// order of the additions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DwLayout {
    Planar,
    ChannelsLast,
}

/// `[n, rows, cols]` -> `[n, cols, rows]`: NCHW planes to channels-last (`rows = c`,
/// `cols = h * w`) or back. A 1-wide side (1x1 maps, the weight of a 1-channel layer) is the
/// same layout both ways: a plain copy.
fn transpose_planes(src: &[f32], n: usize, rows: usize, cols: usize) -> Vec<f32> {
    crate::produce(n * rows * cols, rows * cols, |start, dst| {
        transpose_plane(&src[start..][..rows * cols], rows, cols, dst)
    })
}

/// One `[rows, cols]` plane of `src` written transposed (`[cols, rows]`) into `dst`.
fn transpose_plane(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    if rows == 1 || cols == 1 {
        dst.copy_from_slice(&src[..rows * cols]);
        return;
    }
    const B: usize = 32;
    for r0 in (0..rows).step_by(B) {
        let r1 = (r0 + B).min(rows);
        for c0 in (0..cols).step_by(B) {
            let c1 = (c0 + B).min(cols);
            for r in r0..r1 {
                for (k, v) in src[r * cols + c0..r * cols + c1].iter().enumerate() {
                    dst[(c0 + k) * rows + r] = *v;
                }
            }
        }
    }
}

/// [`transpose_planes`] into an existing buffer.
fn transpose_planes_into(src: &[f32], n: usize, rows: usize, cols: usize, dst: &mut [f32]) {
    let plane = rows * cols;
    for (s, d) in src[..n * plane].chunks_exact(plane.max(1)).zip(dst[..n * plane].chunks_exact_mut(plane.max(1))) {
        transpose_plane(s, rows, cols, d);
    }
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

/// `out = depthwise(x, weight)` (no bias): `out` has `plan.output_len()` values.
pub fn forward(x: &[f32], weight: &[f32], plan: &DwPlan, out: &mut [f32]) {
    forward_in(plan.layout(), x, weight, plan, out)
}

/// Gradient of the input: `gx = depthwise_transposed(g, weight)`; `g` has the output's shape.
pub fn x_grad(g: &[f32], weight: &[f32], plan: &DwPlan, gx: &mut [f32]) {
    x_grad_in(plan.layout(), g, weight, plan, gx)
}

/// Gradient of the weight: `gw[c, ky, kx] = sum over images and outputs of g * x`.
pub fn weight_grad(x: &[f32], g: &[f32], plan: &DwPlan, gw: &mut [f32]) {
    weight_grad_in(plan.layout(), x, g, plan, gw)
}

/// [`forward`] with the given loops.
pub fn forward_in(layout: DwLayout, x: &[f32], weight: &[f32], plan: &DwPlan, out: &mut [f32]) {
    match layout {
        DwLayout::Planar => forward_planar(x, weight, plan, out),
        DwLayout::ChannelsLast => forward_cl(x, weight, plan, out),
    }
}

/// [`x_grad`] with the given loops.
pub fn x_grad_in(layout: DwLayout, g: &[f32], weight: &[f32], plan: &DwPlan, gx: &mut [f32]) {
    match layout {
        DwLayout::Planar => x_grad_planar(g, weight, plan, gx),
        DwLayout::ChannelsLast => x_grad_cl(g, weight, plan, gx),
    }
}

/// [`weight_grad`] with the given loops.
pub fn weight_grad_in(layout: DwLayout, x: &[f32], g: &[f32], plan: &DwPlan, gw: &mut [f32]) {
    match layout {
        DwLayout::Planar => weight_grad_planar(x, g, plan, gw),
        DwLayout::ChannelsLast => weight_grad_cl(x, g, plan, gw),
    }
}

/// Output length along one axis (PyTorch's formula) for input length `i`, kernel `k`, stride
/// `s`, padding `p` on each side and dilation `d`.
pub(crate) fn out_len(i: usize, k: usize, s: usize, p: usize, d: usize) -> usize {
    let span = d * (k - 1) + 1;
    if i + 2 * p < span { 0 } else { (i + 2 * p - span) / s + 1 }
}

/// The outputs `lo..hi` along one axis whose tap (offset `k * d - p` from `o * s`) reads inside
/// an input of length `len`.
#[inline(always)]
pub(crate) fn live(out: usize, len: usize, s: usize, k: usize, d: usize, p: usize) -> (usize, usize) {
    let off = (k * d) as isize - p as isize;
    let lo = if off < 0 { ((-off) as usize).div_ceil(s) } else { 0 };
    let last = len as isize - 1 - off;
    let hi = if last < 0 { 0 } else { (last as usize / s + 1).min(out) };
    (lo, hi.max(lo))
}

/// [`live`] as a run: `Some((lo, hi, first input index))`, or `None` when no output reads inside.
#[inline(always)]
pub(crate) fn live_run(
    out: usize,
    len: usize,
    s: usize,
    k: usize,
    d: usize,
    p: usize,
) -> Option<(usize, usize, usize)> {
    let (lo, hi) = live(out, len, s, k, d, p);
    (lo < hi).then(|| (lo, hi, lo * s + k * d - p))
}

/// For each (image, channel) plane and each output row: calls `f(plane, oy, iy, ky)` for every
/// kernel row that reads inside the input.
#[inline(always)]
fn for_each_row(plan: &DwPlan, mut f: impl FnMut(usize, usize, usize, usize)) {
    let (oh, _) = plan.out_hw();
    for plane in 0..plan.n * plan.c {
        for oy in 0..oh {
            for ky in 0..plan.kh {
                let iy = (oy * plan.stride[0] + ky * plan.dilation[0]) as isize - plan.pad[0] as isize;
                if iy >= 0 && (iy as usize) < plan.h {
                    f(plane, oy, iy as usize, ky);
                }
            }
        }
    }
}

fn forward_planar(x: &[f32], weight: &[f32], plan: &DwPlan, out: &mut [f32]) {
    check(plan, x.len(), weight.len(), out.len());
    let (oh, ow) = plan.out_hw();
    let (hw, ohw, kk, w) = (plan.h * plan.w, oh * ow, plan.kh * plan.kw, plan.w);
    let (sx, dx, px) = (plan.stride[1], plan.dilation[1], plan.pad[1]);
    out.fill(0.0);
    for_each_row(plan, |plane, oy, iy, ky| {
        let wt = &weight[(plane % plan.c) * kk + ky * plan.kw..][..plan.kw];
        let irow = &x[plane * hw + iy * w..][..w];
        let orow = &mut out[plane * ohw + oy * ow..][..ow];
        for (kx, &wv) in wt.iter().enumerate() {
            let Some((lo, hi, i0)) = live_run(ow, w, sx, kx, dx, px) else { continue };
            if sx == 1 {
                orow[lo..hi].iter_mut().zip(&irow[i0..i0 + hi - lo]).for_each(|(o, i)| *o += wv * i);
            } else {
                orow[lo..hi].iter_mut().zip(irow[i0..].iter().step_by(sx)).for_each(|(o, i)| *o += wv * i);
            }
        }
    });
}

fn x_grad_planar(g: &[f32], weight: &[f32], plan: &DwPlan, gx: &mut [f32]) {
    check(plan, gx.len(), weight.len(), g.len());
    let (oh, ow) = plan.out_hw();
    let (hw, ohw, kk, w) = (plan.h * plan.w, oh * ow, plan.kh * plan.kw, plan.w);
    let (sx, dx, px) = (plan.stride[1], plan.dilation[1], plan.pad[1]);
    gx.fill(0.0);
    for_each_row(plan, |plane, oy, iy, ky| {
        let wt = &weight[(plane % plan.c) * kk + ky * plan.kw..][..plan.kw];
        let grow = &g[plane * ohw + oy * ow..][..ow];
        let xrow = &mut gx[plane * hw + iy * w..][..w];
        for (kx, &wv) in wt.iter().enumerate() {
            let Some((lo, hi, i0)) = live_run(ow, w, sx, kx, dx, px) else { continue };
            if sx == 1 {
                xrow[i0..i0 + hi - lo].iter_mut().zip(&grow[lo..hi]).for_each(|(d, g)| *d += wv * g);
            } else {
                xrow[i0..].iter_mut().step_by(sx).zip(&grow[lo..hi]).for_each(|(d, g)| *d += wv * g);
            }
        }
    });
}

fn weight_grad_planar(x: &[f32], g: &[f32], plan: &DwPlan, gw: &mut [f32]) {
    check(plan, x.len(), gw.len(), g.len());
    let (oh, ow) = plan.out_hw();
    let (hw, ohw, kk, w) = (plan.h * plan.w, oh * ow, plan.kh * plan.kw, plan.w);
    let (sx, dx, px) = (plan.stride[1], plan.dilation[1], plan.pad[1]);
    gw.fill(0.0);
    for_each_row(plan, |plane, oy, iy, ky| {
        let gwt = &mut gw[(plane % plan.c) * kk + ky * plan.kw..][..plan.kw];
        let grow = &g[plane * ohw + oy * ow..][..ow];
        let irow = &x[plane * hw + iy * w..][..w];
        for (kx, acc) in gwt.iter_mut().enumerate() {
            let Some((lo, hi, i0)) = live_run(ow, w, sx, kx, dx, px) else { continue };
            *acc += if sx == 1 {
                dot(&grow[lo..hi], &irow[i0..i0 + hi - lo])
            } else {
                grow[lo..hi].iter().zip(irow[i0..].iter().step_by(sx)).map(|(a, b)| a * b).sum()
            };
        }
    });
}

/// A dot product in 8 interleaved partial sums (vectorisable; fixed order).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn check(plan: &DwPlan, input: usize, weight: usize, output: usize) {
    assert_eq!(input, plan.input_len());
    assert_eq!(weight, plan.weight_len());
    assert_eq!(output, plan.output_len());
}

// The channels-last loops: the planes are transposed to `[n, pixels, c]` and every (output
// pixel, tap) pair is one multiply-add over the channels (48 to 500+ in EMO), so maps of any
// size, down to the 1x1 and 2x2 ones of 32x32 inputs, vectorise the same way, and taps that
// fall in the zero padding cost nothing.
fn forward_cl(x: &[f32], weight: &[f32], plan: &DwPlan, out: &mut [f32]) {
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
    transpose_planes_into(&ot, plan.n, ohw, c, out);
}

fn x_grad_cl(g: &[f32], weight: &[f32], plan: &DwPlan, gx: &mut [f32]) {
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
    transpose_planes_into(&gxt, plan.n, hw, c, gx);
}

fn weight_grad_cl(x: &[f32], g: &[f32], plan: &DwPlan, gw: &mut [f32]) {
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
    transpose_planes_into(&gwt, 1, kk, c, gw);
}

/// `acc[i] += a[i] * b[i]`.
#[inline(always)]
fn madd(acc: &mut [f32], a: &[f32], b: &[f32]) {
    let n = acc.len();
    for ((d, x), y) in acc.iter_mut().zip(&a[..n]).zip(&b[..n]) {
        *d += x * y;
    }
}
