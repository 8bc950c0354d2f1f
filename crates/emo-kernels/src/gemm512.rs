//! An AVX-512 GEMM micro-kernel for EMO's 1x1 convolutions, with the weight pre-packed once at
//! load time and the bias / residual folded into the accumulator initialisation.
//!
//! `C[m, n] = A[m, k] · B[k, n] (+ bias[n]) (+ R[m, n])`: `B` is packed in panels of 32
//! columns (`[panel][k][32]`, zero-padded), `A` is read in place (row-major, any row stride).
//! The kernel keeps an `MR x 32` block of `C` in `2 * MR` zmm registers (MR <= 8) and, for each
//! `k`, loads two vectors of `B` and broadcasts `MR` values of `A`.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

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

/// One `rows x 32` tile (`rows <= 8`, `cols <= 32` valid columns).
///
/// # Safety
/// AVX-512F must be available; pointers must cover `rows` rows of `k` (A), the panel
/// (`k * 32`), `cols` columns of `rows` rows (C, R) and `cols` bias values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize>(
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
) {
    unsafe {
        let (m0, m1) = crate::gemm512::masks32(cols);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        if !bias.is_null() {
            let b0 = _mm512_maskz_loadu_ps(m0, bias);
            let b1 = _mm512_maskz_loadu_ps(m1, bias.add(16));
            for r in acc.iter_mut() {
                *r = [b0, b1];
            }
        }
        if !res.is_null() {
            for (i, r) in acc.iter_mut().enumerate() {
                r[0] = _mm512_add_ps(r[0], _mm512_maskz_loadu_ps(m0, res.add(i * ldr)));
                r[1] = _mm512_add_ps(r[1], _mm512_maskz_loadu_ps(m1, res.add(i * ldr + 16)));
            }
        }
        for kk in 0..k {
            let b0 = _mm512_loadu_ps(bp.add(kk * NR));
            let b1 = _mm512_loadu_ps(bp.add(kk * NR + 16));
            for (i, r) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(i * lda + kk));
                r[0] = _mm512_fmadd_ps(av, b0, r[0]);
                r[1] = _mm512_fmadd_ps(av, b1, r[1]);
            }
        }
        for (i, r) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(c.add(i * ldc), m0, r[0]);
            _mm512_mask_storeu_ps(c.add(i * ldc + 16), m1, r[1]);
        }
    }
}

/// `C[rows, cols of panels p0..p1]` for a band of `rows` rows (any count; done 8 at a time).
///
/// # Safety
/// As [`tile`], for the whole band; AVX-512F available.
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
) {
    let mut r0 = 0;
    while r0 < rows {
        let mr = MR.min(rows - r0);
        for p in panels.clone() {
            let cols = NR.min(n - p * NR);
            let (rp, ldr) = match res {
                Some((r, ldr)) => (unsafe { r.add(r0 * ldr + p * NR) }, ldr),
                None => (std::ptr::null(), 0),
            };
            let bptr = bias.map_or(std::ptr::null(), |b| unsafe { b.as_ptr().add(p * NR) });
            let args = (
                k,
                unsafe { a.add(r0 * lda) },
                lda,
                unsafe { packed.add(p * k * NR) },
                unsafe { c.add(r0 * ldc + p * NR) },
                ldc,
                cols,
                bptr,
                rp,
                ldr,
            );
            unsafe {
                match mr {
                    8 => tile::<8>(args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7, args.8, args.9),
                    7 => tile::<7>(args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7, args.8, args.9),
                    6 => tile::<6>(args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7, args.8, args.9),
                    5 => tile::<5>(args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7, args.8, args.9),
                    4 => tile::<4>(args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7, args.8, args.9),
                    3 => tile::<3>(args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7, args.8, args.9),
                    2 => tile::<2>(args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7, args.8, args.9),
                    _ => tile::<1>(args.0, args.1, args.2, args.3, args.4, args.5, args.6, args.7, args.8, args.9),
                }
            }
        }
        r0 += mr;
    }
}
