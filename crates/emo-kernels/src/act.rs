//! Vectorisable activations: exp, sigmoid, SiLU, exact-erf GELU.
//!
//! `exp` is a Cephes-style range reduction with a degree-6 polynomial (relative error about
//! 1e-7 over the clamped range [-87.3, 88.3]); `erf` is a rational fit (absolute error
//! <= 4.2e-7), so GELU stays within ~2e-6 of the exact erf form.
//! Both are branch-free so the compiler vectorises the loops in [`apply`].

use crate::multiversion;

/// An activation fused into a kernel's epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    None,
    Silu,
    /// Exact (erf) GELU.
    Gelu,
}

#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    // Round x*log2(e) to the nearest integer n with the 1.5*2^23 trick: the integer then sits
    // in the low mantissa bits of `t`, so 2^n is built with integer ops only (no float->int
    // conversion, which Rust's saturating `as` would scalarise).
    let t = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = t - 12_582_912.0;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23)
}

#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// erf as a rational function of x (odd numerator of degree 13, even denominator of degree 8,
/// x clamped to [-4, 4]; the fit used by Eigen / XLA): max abs error 4.2e-7, no exp.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_600_1e-3;
    p = p * x2 + -1.609_603_3e-2;
    let mut q = -1.456_607_2e-5f32;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329e-3;
    q = q * x2 + -1.426_474e-2;
    // Saturate where erf rounds to +-1 in f32 anyway (the fit's error would otherwise leave
    // a residue of ~6e-8 that GELU multiplies by x).
    if x.abs() >= 3.92 { 1f32.copysign(x) } else { x * p / q }
}

#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Sum with 16 independent lanes (vectorisable, unlike a sequential float sum).
#[inline(always)]
pub fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rem = chunks.remainder();
    for c in chunks {
        for j in 0..16 {
            acc[j] += c[j];
        }
    }
    let mut s = 0.0;
    for a in acc {
        s += a;
    }
    for v in rem {
        s += v;
    }
    s
}

/// Maximum with 16 independent lanes.
#[inline(always)]
pub fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let rem = chunks.remainder();
    for c in chunks {
        for j in 0..16 {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for a in acc.iter().chain(rem) {
        m = if *a > m { *a } else { m };
    }
    m
}

#[inline(always)]
pub fn apply_one(a: Act, x: f32) -> f32 {
    match a {
        Act::None => x,
        Act::Silu => silu(x),
        Act::Gelu => gelu(x),
    }
}

/// `x[i] = act(x[i])` in place.
pub fn apply(a: Act, x: &mut [f32]) {
    apply_at(crate::isa::level(), a, x)
}

/// [`apply`] at an explicit ISA level.
pub fn apply_at(level: crate::isa::Level, a: Act, x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if level == crate::isa::Level::Avx512 {
        // SAFETY: the level is supported by this CPU.
        unsafe { avx512::apply(a, x) };
        return;
    }
    apply_portable_at(level, a, x)
}

multiversion! {
    fn apply_portable / apply_portable_at(a: Act, x: &mut [f32]) {
        match a {
            Act::None => {}
            Act::Silu => {
                for i in 0..x.len() {
                    x[i] = silu(x[i]);
                }
            }
            Act::Gelu => {
                for i in 0..x.len() {
                    x[i] = gelu(x[i]);
                }
            }
        }
    }
}

/// The derivative of the activation at `x`: SiLU' = s (1 + x (1 - s)) with s = sigmoid(x);
/// GELU' = Phi(x) + x phi(x) (exact-erf GELU).
#[inline(always)]
pub fn derivative(a: Act, x: f32) -> f32 {
    match a {
        Act::None => 1.0,
        Act::Silu => {
            let s = sigmoid(x);
            s * (1.0 + x * (1.0 - s))
        }
        Act::Gelu => {
            // 1 / sqrt(2 pi)
            const INV_SQRT_2PI: f32 = 0.398_942_3;
            0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)) + x * INV_SQRT_2PI * exp(-0.5 * x * x)
        }
    }
}

multiversion! {
    /// `y[i] = act(x[i])` (out of place; the training forward pass keeps `x` for the gradient).
    pub fn apply_to / apply_to_at(a: Act, x: &[f32], y: &mut [f32]) {
        let n = y.len();
        let x = &x[..n];
        match a {
            Act::None => y.copy_from_slice(x),
            Act::Silu => {
                for i in 0..n {
                    y[i] = silu(x[i]);
                }
            }
            Act::Gelu => {
                for i in 0..n {
                    y[i] = gelu(x[i]);
                }
            }
        }
    }
}

multiversion! {
    /// `g[i] *= act'(x[i])`: the activation's backward pass, in place on the output gradient.
    pub fn backward / backward_at(a: Act, x: &[f32], g: &mut [f32]) {
        let n = g.len();
        let x = &x[..n];
        match a {
            Act::None => {}
            Act::Silu => {
                for i in 0..n {
                    g[i] *= derivative(Act::Silu, x[i]);
                }
            }
            Act::Gelu => {
                for i in 0..n {
                    g[i] *= derivative(Act::Gelu, x[i]);
                }
            }
        }
    }
}

multiversion! {
    /// `acc[i] += sum over pixels of px[i]` for `x` = `[pixels, acc.len()]` (channel sums).
    pub fn add_pixels / add_pixels_at(acc: &mut [f32], x: &[f32]) {
        let n = acc.len();
        for px in x.chunks_exact(n) {
            for i in 0..n {
                acc[i] += px[i];
            }
        }
    }
}

/// Per-channel sums that parallel tasks add their partial sums into, read out as means.
pub(crate) struct ChannelSums(std::sync::Mutex<Vec<f32>>);

impl ChannelSums {
    pub(crate) fn new(c: usize) -> Self {
        ChannelSums(std::sync::Mutex::new(vec![0.0; c]))
    }

    /// Add one task's partial sums.
    pub(crate) fn add(&self, level: crate::isa::Level, partial: &[f32]) {
        add_at(level, &mut self.0.lock().unwrap(), partial);
    }

    /// The means over `count` pixels, into `out` (`[c]`).
    pub(crate) fn means_into(self, count: usize, out: &mut [f32]) {
        for (o, s) in out.iter_mut().zip(self.0.into_inner().unwrap()) {
            *o = s / count as f32;
        }
    }
}

multiversion! {
    /// `y += x` elementwise.
    pub fn add / add_at(y: &mut [f32], x: &[f32]) {
        let n = y.len();
        let x = &x[..n];
        for i in 0..n {
            y[i] += x[i];
        }
    }
}

/// Row-wise epilogue on a `rows x n` block with row stride `ld`:
/// `y = act(y + bias) (+ residual)`, the residual having row stride `ldr`.
pub fn bias_act_rows(
    y: &mut [f32],
    ld: usize,
    rows: usize,
    n: usize,
    bias: Option<&[f32]>,
    a: Act,
    residual: Option<(&[f32], usize)>,
) {
    bias_act_rows_at(crate::isa::level(), y, ld, rows, n, bias, a, residual)
}

/// [`bias_act_rows`] at an explicit ISA level.
#[allow(clippy::too_many_arguments)]
pub fn bias_act_rows_at(
    level: crate::isa::Level,
    y: &mut [f32],
    ld: usize,
    rows: usize,
    n: usize,
    bias: Option<&[f32]>,
    a: Act,
    residual: Option<(&[f32], usize)>,
) {
    for r in 0..rows {
        let row = &mut y[r * ld..r * ld + n];
        if let Some(b) = bias {
            add_at(level, row, &b[..n]);
        }
        apply_at(level, a, row);
        if let Some((res, ldr)) = residual {
            add_at(level, row, &res[r * ldr..r * ldr + n]);
        }
    }
}

/// AVX-512 versions of the activations: same polynomials as the scalar code, with the
/// divisions replaced by `rcp14` plus one Newton step (relative error ~1e-7).
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::Act;

    #[inline(always)]
    unsafe fn exp(x: __m512) -> __m512 {
        unsafe {
            let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3)), _mm512_set1_ps(88.3));
            let magic = _mm512_set1_ps(12_582_912.0);
            let t = _mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), magic);
            let n = _mm512_sub_ps(t, magic);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
            let mut p = _mm512_set1_ps(1.987_569_1e-4);
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.166_666_65));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
            let y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0));
            let bits =
                _mm512_slli_epi32(_mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(0x4B40_0000 - 127)), 23);
            _mm512_mul_ps(y, _mm512_castsi512_ps(bits))
        }
    }

    /// 1 / d with one Newton step.
    #[inline(always)]
    unsafe fn recip(d: __m512) -> __m512 {
        unsafe {
            let r = _mm512_rcp14_ps(d);
            _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0)))
        }
    }

    /// `act(x)` on one vector.
    #[inline(always)]
    pub(crate) unsafe fn act(a: Act, x: __m512) -> __m512 {
        unsafe {
            match a {
                Act::None => x,
                Act::Silu => silu(x),
                Act::Gelu => gelu(x),
            }
        }
    }

    #[inline(always)]
    unsafe fn silu(x: __m512) -> __m512 {
        unsafe {
            let d = _mm512_add_ps(_mm512_set1_ps(1.0), exp(_mm512_sub_ps(_mm512_setzero_ps(), x)));
            _mm512_mul_ps(x, recip(d))
        }
    }

    #[inline(always)]
    unsafe fn gelu(x: __m512) -> __m512 {
        unsafe {
            let z = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
            let z = _mm512_min_ps(_mm512_max_ps(z, _mm512_set1_ps(-4.0)), _mm512_set1_ps(4.0));
            let x2 = _mm512_mul_ps(z, z);
            let mut p = _mm512_set1_ps(-2.726_142_3e-10);
            for c in [2.770_681_4e-8, -2.101_024e-6, -5.692_506_4e-5, -7.349_906_3e-4, -2.954_600_1e-3, -1.609_603_3e-2]
            {
                p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(c));
            }
            let mut q = _mm512_set1_ps(-1.456_607_2e-5);
            for c in [-2.133_740_6e-4, -1.682_827e-3, -7.373_329e-3, -1.426_474e-2] {
                q = _mm512_fmadd_ps(q, x2, _mm512_set1_ps(c));
            }
            let erf = _mm512_mul_ps(_mm512_mul_ps(z, p), recip(q));
            let sat = _mm512_cmp_ps_mask(_mm512_abs_ps(z), _mm512_set1_ps(3.92), _CMP_GE_OQ);
            let one = _mm512_castsi512_ps(_mm512_or_si512(
                _mm512_castps_si512(_mm512_set1_ps(1.0)),
                _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32(i32::MIN)),
            ));
            let erf = _mm512_mask_blend_ps(sat, erf, one);
            _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5)), _mm512_add_ps(erf, _mm512_set1_ps(1.0)))
        }
    }

    /// `x = act(x)` in place.
    ///
    /// # Safety
    /// AVX-512F must be available.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn apply(a: Act, x: &mut [f32]) {
        let n = x.len();
        let p = x.as_mut_ptr();
        let mut i = 0;
        unsafe {
            while i < n {
                let m: __mmask16 = if n - i >= 16 { 0xffff } else { ((1u32 << (n - i)) - 1) as u16 };
                let v = _mm512_maskz_loadu_ps(m, p.add(i));
                let y = act(a, v);
                _mm512_mask_storeu_ps(p.add(i), m, y);
                i += 16;
            }
        }
    }
}
