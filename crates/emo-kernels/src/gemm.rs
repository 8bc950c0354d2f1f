//! 1x1 convolution / linear layer on channels-last data as a GEMM with a fused epilogue:
//! `out = act(in · W + bias) (+ residual)`. The GEMM itself is the `gemm` crate's (runtime
//! AVX-512/AVX2/NEON micro-kernels); the work is split into row x column tiles over the
//! [`crate::pool`], and each tile's epilogue runs right after its GEMM, while it is still in cache.

use crate::pool::{SendPtr, num_threads, parallel_for};

use crate::act::{Act, bias_act_rows_at};

/// A weight laid out for `out[m, n] = in[m, k] · W[k, n]` (row-major `[k, n]`), plus the
/// same weight packed for the AVX-512 kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct Weight {
    pub k: usize,
    pub n: usize,
    pub data: Vec<f32>,
    pub packed: Vec<f32>,
}

impl Weight {
    /// From a PyTorch conv/linear weight `[n, k]` (a 1x1 conv `[n, k, 1, 1]` is the same).
    pub fn from_torch(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight size");
        let mut data = vec![0.0; n * k];
        for o in 0..n {
            for i in 0..k {
                data[i * n + o] = w[o * k + i];
            }
        }
        let packed = crate::gemm512::pack(&data, k, n);
        Weight { k, n, data, packed }
    }
}


/// `out[r, :n] = act(a[r, :k] · W + bias) (+ residual[r, :n])` for `r < m`.
///
/// Row strides: `lda` for `a`, `ldo` for `out`, and the one given with `residual`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    a: &[f32],
    lda: usize,
    m: usize,
    w: &Weight,
    bias: Option<&[f32]>,
    act: Act,
    residual: Option<(&[f32], usize)>,
    out: &mut [f32],
    ldo: usize,
) {
    let (k, n) = (w.k, w.n);
    if m == 0 {
        return;
    }
    assert!(lda >= k && ldo >= n && a.len() >= (m - 1) * lda + k && out.len() >= (m - 1) * ldo + n);
    if let Some(b) = bias {
        assert!(b.len() >= n);
    }
    if let Some((r, ldr)) = residual {
        assert!(ldr >= n && r.len() >= (m - 1) * ldr + n);
    }
    let threads = num_threads();
    #[cfg(target_arch = "x86_64")]
    if crate::isa::level() == crate::isa::Level::Avx512 {
        matmul512(a, lda, m, w, bias, act, residual, out, ldo, threads);
        return;
    }
    // Row tiles of ~64 rows; split columns too when there are few row tiles.
    let mt = 64usize.min(m.div_ceil(threads)).max(8);
    let m_tiles = m.div_ceil(mt);
    let n_splits = if m_tiles >= 2 * threads || n < 64 { 1 } else { (2 * threads).div_ceil(m_tiles).min(n / 32).max(1) };
    let nt = n.div_ceil(n_splits).next_multiple_of(16).min(n);
    let n_tiles = n.div_ceil(nt);
    let level = crate::isa::level();
    let dst = SendPtr(out.as_mut_ptr());
    parallel_for(m_tiles * n_tiles, |t| {
        let (mi, ni) = (t / n_tiles, t % n_tiles);
        let (r0, c0) = (mi * mt, ni * nt);
        let rows = mt.min(m - r0);
        let cols = nt.min(n - c0);
        let d = dst;
        // SAFETY: tiles cover disjoint (row, column) ranges of `out`, all in bounds (asserted).
        unsafe {
            gemm::gemm(
                rows,
                cols,
                k,
                d.0.add(r0 * ldo + c0),
                1,
                ldo as isize,
                false,
                a.as_ptr().add(r0 * lda),
                1,
                lda as isize,
                w.data.as_ptr().add(c0),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
            let tile = std::slice::from_raw_parts_mut(d.0.add(r0 * ldo + c0), (rows - 1) * ldo + cols);
            let res = residual.map(|(r, ldr)| (&r[r0 * ldr + c0..], ldr));
            bias_act_rows_at(level, tile, ldo, rows, cols, bias.map(|b| &b[c0..]), act, res);
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn matmul512(
    a: &[f32],
    lda: usize,
    m: usize,
    w: &Weight,
    bias: Option<&[f32]>,
    act: Act,
    residual: Option<(&[f32], usize)>,
    out: &mut [f32],
    ldo: usize,
    threads: usize,
) {
    use crate::gemm512::{MR, NR, band};
    let (k, n) = (w.k, w.n);
    let panels = n.div_ceil(NR);
    // Bands of rows; split the panels too when there are few bands.
    let bm = (4 * MR).min(m.div_ceil(threads).next_multiple_of(MR)).max(MR);
    let m_bands = m.div_ceil(bm);
    let p_splits = if m_bands >= 2 * threads { 1 } else { (2 * threads).div_ceil(m_bands).min(panels).max(1) };
    let pp = panels.div_ceil(p_splits);
    let level = crate::isa::level();
    // Bias and residual go into the accumulators when there is no activation between them.
    let fold_res = act == Act::None;
    let dst = SendPtr(out.as_mut_ptr());
    parallel_for(m_bands * p_splits, |t| {
        let (bi, pi) = (t / p_splits, t % p_splits);
        let r0 = bi * bm;
        let rows = bm.min(m - r0);
        let ps = (pi * pp).min(panels)..((pi + 1) * pp).min(panels);
        if ps.is_empty() {
            return;
        }
        let d = dst;
        let res = residual.filter(|_| fold_res).map(|(r, ldr)| (r[r0 * ldr..].as_ptr(), ldr));
        // SAFETY: AVX-512F is available (level check); bands x panel ranges are disjoint parts
        // of `out`; all slices were bounds-checked in `matmul`.
        unsafe {
            band(rows, k, n, a.as_ptr().add(r0 * lda), lda, w.packed.as_ptr(), ps.clone(), d.0.add(r0 * ldo), ldo, bias, res);
        }
        if !fold_res {
            let c0 = ps.start * NR;
            let cols = (ps.end * NR).min(n) - c0;
            // SAFETY: the same disjoint tile.
            let tile = unsafe { std::slice::from_raw_parts_mut(d.0.add(r0 * ldo + c0), (rows - 1) * ldo + cols) };
            let res = residual.map(|(r, ldr)| (&r[r0 * ldr + c0..], ldr));
            bias_act_rows_at(level, tile, ldo, rows, cols, None, act, res);
        }
    });
}

/// Scalar reference of [`matmul`].
#[allow(clippy::too_many_arguments)]
pub fn matmul_reference(
    a: &[f32],
    lda: usize,
    m: usize,
    w: &Weight,
    bias: Option<&[f32]>,
    act: Act,
    residual: Option<(&[f32], usize)>,
    out: &mut [f32],
    ldo: usize,
) {
    for r in 0..m {
        for c in 0..w.n {
            let mut s = 0f64;
            for i in 0..w.k {
                s += a[r * lda + i] as f64 * w.data[i * w.n + c] as f64;
            }
            let mut v = s as f32 + bias.map_or(0.0, |b| b[c]);
            v = crate::reference::act(act, v);
            if let Some((res, ldr)) = residual {
                v += res[r * ldr + c];
            }
            out[r * ldo + c] = v;
        }
    }
}

/// Single-threaded [`matmul`], for use inside an already parallel task.
#[allow(clippy::too_many_arguments)]
pub fn matmul_st(
    a: &[f32],
    lda: usize,
    m: usize,
    w: &Weight,
    bias: Option<&[f32]>,
    act: Act,
    residual: Option<(&[f32], usize)>,
    out: &mut [f32],
    ldo: usize,
) {
    let (k, n) = (w.k, w.n);
    if m == 0 {
        return;
    }
    assert!(lda >= k && ldo >= n && a.len() >= (m - 1) * lda + k && out.len() >= (m - 1) * ldo + n);
    if let Some((r, ldr)) = residual {
        assert!(ldr >= n && r.len() >= (m - 1) * ldr + n);
    }
    let level = crate::isa::level();
    #[cfg(target_arch = "x86_64")]
    if level == crate::isa::Level::Avx512 {
        let fold = act == Act::None;
        let res = residual.filter(|_| fold).map(|(r, ldr)| (r.as_ptr(), ldr));
        // SAFETY: AVX-512F available; bounds asserted above.
        unsafe {
            crate::gemm512::band(m, k, n, a.as_ptr(), lda, w.packed.as_ptr(), 0..n.div_ceil(crate::gemm512::NR), out.as_mut_ptr(), ldo, bias, res);
        }
        if !fold {
            bias_act_rows_at(level, out, ldo, m, n, None, act, residual);
        }
        return;
    }
    // SAFETY: bounds asserted above; row-major strides.
    unsafe {
        gemm::gemm(
            m, n, k, out.as_mut_ptr(), 1, ldo as isize, false, a.as_ptr(), 1, lda as isize, w.data.as_ptr(), 1, n as isize,
            0.0, 1.0, false, false, false, gemm::Parallelism::None,
        );
    }
    bias_act_rows_at(level, out, ldo, m, n, bias, act, residual);
}
