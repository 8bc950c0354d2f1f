//! An AVX-512 GEMM micro-kernel for EMO's 1x1 convolutions, with the weight pre-packed once at
//! load time and the bias / residual folded into the accumulator initialisation.
//!
//! `C[m, n] = A[m, k] · B[k, n] (+ bias[n]) (+ R[m, n])`: `B` is packed in panels of 32
//! columns (`[panel][k][32]`, zero-padded), `A` is read in place (row-major, any row stride).
//! The kernel keeps an `MR x 32` block of `C` in `2 * MR` zmm registers (MR <= 8) and, for each
//! `k`, loads two vectors of `B` and broadcasts `MR` values of `A`.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::act::Act;

/// Load / store masks for the first `n` (<= 32) lanes of a pair of zmm registers.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn masks32(n: usize) -> (__mmask16, __mmask16) {
    let lanes = |n: usize| if n >= 16 { 0xffff } else { ((1u32 << n) - 1) as u16 };
    (lanes(n), lanes(n.saturating_sub(16)))
}

/// Columns per packed panel.
pub const NR: usize = 32;
/// Rows per micro-tile.
pub const MR: usize = 8;

/// Everything one micro-tile needs (all pointers at the tile's origin).
#[derive(Clone, Copy)]
struct Tile {
    k: usize,
    a: *const f32,
    lda: usize,
    bp: *const f32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    bias: *const f32,
    res: *const f32,
    ldr: usize,
    act: Act,
}

/// One `R x 32` tile (`R <= 8`, `cols <= 32` valid columns): bias and residual initialise
/// the accumulators, the activation is applied in registers before the store.
///
/// # Safety
/// AVX-512F must be available; pointers must cover `R` rows of `k` (A), the panel
/// (`k * 32`), `cols` columns of `R` rows (C, R) and `cols` bias values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize>(t: Tile) {
    unsafe {
        let (m0, m1) = crate::gemm512::masks32(t.cols);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        if !t.bias.is_null() {
            let b0 = _mm512_maskz_loadu_ps(m0, t.bias);
            let b1 = _mm512_maskz_loadu_ps(m1, t.bias.add(16));
            for r in acc.iter_mut() {
                *r = [b0, b1];
            }
        }
        if !t.res.is_null() {
            for (i, r) in acc.iter_mut().enumerate() {
                r[0] = _mm512_add_ps(r[0], _mm512_maskz_loadu_ps(m0, t.res.add(i * t.ldr)));
                r[1] = _mm512_add_ps(r[1], _mm512_maskz_loadu_ps(m1, t.res.add(i * t.ldr + 16)));
            }
        }
        for kk in 0..t.k {
            let b0 = _mm512_loadu_ps(t.bp.add(kk * NR));
            let b1 = _mm512_loadu_ps(t.bp.add(kk * NR + 16));
            for (i, r) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*t.a.add(i * t.lda + kk));
                r[0] = _mm512_fmadd_ps(av, b0, r[0]);
                r[1] = _mm512_fmadd_ps(av, b1, r[1]);
            }
        }
        for (i, r) in acc.iter().enumerate() {
            let (v0, v1) = (crate::act::avx512::act(t.act, r[0]), crate::act::avx512::act(t.act, r[1]));
            _mm512_mask_storeu_ps(t.c.add(i * t.ldc), m0, v0);
            _mm512_mask_storeu_ps(t.c.add(i * t.ldc + 16), m1, v1);
        }
    }
}

/// `C = act(A · B + bias (+ R))` for a band of `rows` rows (any count; done 8 at a time) over
/// the panels `panels`. The residual, when given, is added before the activation.
///
/// # Safety
/// As `tile`, for the whole band; AVX-512F available.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn band(
    rows: usize,
    k: usize,
    n: usize,
    a: *const f32,
    lda: usize,
    packed: *const f32,
    panels: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
    bias: Option<&[f32]>,
    res: Option<(*const f32, usize)>,
    act: Act,
) {
    let mut r0 = 0;
    while r0 < rows {
        let mr = MR.min(rows - r0);
        for p in panels.clone() {
            // SAFETY: offsets inside the band (caller's contract).
            let t = unsafe {
                Tile {
                    k,
                    a: a.add(r0 * lda),
                    lda,
                    bp: packed.add(p * k * NR),
                    c: c.add(r0 * ldc + p * NR),
                    ldc,
                    cols: NR.min(n - p * NR),
                    bias: bias.map_or(std::ptr::null(), |b| b.as_ptr().add(p * NR)),
                    res: res.map_or(std::ptr::null(), |(r, ldr)| r.add(r0 * ldr + p * NR)),
                    ldr: res.map_or(0, |(_, ldr)| ldr),
                    act,
                }
            };
            // SAFETY: as above; AVX-512F available.
            unsafe {
                match mr {
                    8 => tile::<8>(t),
                    7 => tile::<7>(t),
                    6 => tile::<6>(t),
                    5 => tile::<5>(t),
                    4 => tile::<4>(t),
                    3 => tile::<3>(t),
                    2 => tile::<2>(t),
                    _ => tile::<1>(t),
                }
            }
        }
        r0 += mr;
    }
}
