//! 1x1 convolution on channels-first (NCHW) data for *training*: the forward pass and the two
//! gradients, each one GEMM per image on the planes as they lie (no copies).
//!
//! burn's autodiff differentiates a 1x1 conv through the backend's generic
//! `conv2d_weight_backward` (a conv with batch and channels swapped, after transposing both
//! operands) and `conv2d_x_backward` (a transposed conv). Here, with `W` the `[co, ci]` weight
//! and `X_b`, `G_b` image `b`'s `[ci, hw]` input and `[co, hw]` output gradient:
//!
//! - forward: `Y_b = W · X_b`;
//! - input gradient: `GX_b = Wᵀ · G_b`;
//! - weight gradient: `GW = Σ_b G_b · X_bᵀ`.
//!
//! Single-threaded (the trainer runs one data-parallel replica per core) and in a fixed order,
//! so runs and resumes stay bit-exact.

/// Geometry of a 1x1, stride-1, ungrouped conv on `[n, ci, hw]` with a `[co, ci]` weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PwPlan {
    pub n: usize,
    pub ci: usize,
    pub co: usize,
    /// Pixels per image (`h * w`).
    pub hw: usize,
}

impl PwPlan {
    pub fn input_len(&self) -> usize {
        self.n * self.ci * self.hw
    }
    pub fn output_len(&self) -> usize {
        self.n * self.co * self.hw
    }
    pub fn weight_len(&self) -> usize {
        self.co * self.ci
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

/// `out = conv1x1(x, weight)` (no bias).
pub fn forward(x: &[f32], weight: &[f32], p: &PwPlan, out: &mut [f32]) {
    check(p, x.len(), weight.len(), out.len());
    let (ci, co, hw) = (p.ci, p.co, p.hw);
    for b in 0..p.n {
        let (xb, ob) = (&x[b * ci * hw..][..ci * hw], &mut out[b * co * hw..][..co * hw]);
        gemm((co, hw, ci), ob, (hw, 1), false, weight, (ci, 1), xb, (hw, 1));
    }
}

/// Gradient of the input for output gradient `g`.
pub fn x_grad(g: &[f32], weight: &[f32], p: &PwPlan, gx: &mut [f32]) {
    check(p, gx.len(), weight.len(), g.len());
    let (ci, co, hw) = (p.ci, p.co, p.hw);
    for b in 0..p.n {
        let (gb, xb) = (&g[b * co * hw..][..co * hw], &mut gx[b * ci * hw..][..ci * hw]);
        // Wᵀ[i, o] = W[o, i]: row stride 1, column stride ci.
        gemm((ci, hw, co), xb, (hw, 1), false, weight, (1, ci), gb, (hw, 1));
    }
}

/// Gradient of the weight for output gradient `g`, summed over the images.
pub fn weight_grad(x: &[f32], g: &[f32], p: &PwPlan, gw: &mut [f32]) {
    check(p, x.len(), gw.len(), g.len());
    let (ci, co, hw) = (p.ci, p.co, p.hw);
    if p.n == 0 {
        gw.fill(0.0);
    }
    for b in 0..p.n {
        let (gb, xb) = (&g[b * co * hw..][..co * hw], &x[b * ci * hw..][..ci * hw]);
        // X_bᵀ[q, i] = X_b[i, q]: row stride 1, column stride hw.
        gemm((co, ci, hw), gw, (ci, 1), b > 0, gb, (hw, 1), xb, (1, hw));
    }
}

fn check(p: &PwPlan, input: usize, weight: usize, output: usize) {
    assert_eq!(input, p.input_len(), "1x1 conv input size");
    assert_eq!(weight, p.weight_len(), "1x1 conv weight size");
    assert_eq!(output, p.output_len(), "1x1 conv output size");
}
