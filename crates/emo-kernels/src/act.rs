//! Vectorisable activations: exp, sigmoid, SiLU, exact-erf GELU.
//!
//! `exp` is a Cephes-style range reduction with a degree-6 polynomial (relative error about
//! 1e-7 over the clamped range [-87.3, 88.3]); `erf` is Abramowitz & Stegun 7.1.26 (absolute
//! error <= 1.5e-7), so GELU stays within ~1e-6 of the exact erf form for the values EMO sees.
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

#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
pub fn apply_one(a: Act, x: f32) -> f32 {
    match a {
        Act::None => x,
        Act::Silu => silu(x),
        Act::Gelu => gelu(x),
    }
}

multiversion! {
    /// `x[i] = act(x[i])` in place.
    pub fn apply / apply_at(a: Act, x: &mut [f32]) {
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

multiversion! {
    /// Row-wise epilogue on a `rows x n` block with row stride `ld`:
    /// `y = act(y + bias) (+ residual)`, the residual having row stride `ldr`.
    pub fn bias_act_rows / bias_act_rows_at(y: &mut [f32], ld: usize, rows: usize, n: usize, bias: Option<&[f32]>, a: Act, residual: Option<(&[f32], usize)>) {
        for r in 0..rows {
            let row = &mut y[r * ld..r * ld + n];
            if let Some(b) = bias {
                let b = &b[..n];
                for i in 0..n {
                    row[i] += b[i];
                }
            }
            match a {
                Act::None => {}
                Act::Silu => {
                    for i in 0..n {
                        row[i] = silu(row[i]);
                    }
                }
                Act::Gelu => {
                    for i in 0..n {
                        row[i] = gelu(row[i]);
                    }
                }
            }
            if let Some((res, ldr)) = residual {
                let res = &res[r * ldr..r * ldr + n];
                for i in 0..n {
                    row[i] += res[i];
                }
            }
        }
    }
}
