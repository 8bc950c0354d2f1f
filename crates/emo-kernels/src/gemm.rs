//! 1x1 convolution / linear layer on channels-last data as a GEMM with a fused epilogue:
//! `out = act(in · W + bias) (+ residual)`. The weight is packed once, in panels of 32
//! columns; at the AVX-512 level our micro-kernel ([`crate::gemm512`]) reads the panels and
//! folds bias and residual into its accumulators, elsewhere the `gemm` crate runs on each panel.
//! Work is split into row bands x panel ranges over [`crate::pool`], and each tile's epilogue
//! runs right after its GEMM, while it is still in cache.

use crate::act::{Act, bias_act_rows_at};
use crate::gemm512::{MR, NR};
use crate::isa::Level;
use crate::pool::{SendPtr, num_threads, parallel_for};

/// A weight for `out[m, n] = in[m, k] · W[k, n]`, packed in panels of 32 columns
/// (`[panel][k][32]`, zero-padded).
#[derive(Clone, Debug, PartialEq)]
pub struct Weight {
    pub k: usize,
    pub n: usize,
    pub packed: Vec<f32>,
}

impl Weight {
    /// From a PyTorch conv/linear weight `[n, k]` (a 1x1 conv `[n, k, 1, 1]` is the same).
    pub fn from_torch(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight size");
        let mut packed = vec![0.0; n.div_ceil(NR) * k * NR];
        for o in 0..n {
            let (p, j) = (o / NR, o % NR);
            for i in 0..k {
                packed[(p * k + i) * NR + j] = w[o * k + i];
            }
        }
        Weight { k, n, packed }
    }

    /// Multiply row `i` (input channel `i`) by `f(i)`.
    pub fn scale_rows(&mut self, f: impl Fn(usize) -> f32) {
        for p in 0..self.n.div_ceil(NR) {
            for i in 0..self.k {
                let s = f(i);
                self.packed[(p * self.k + i) * NR..(p * self.k + i + 1) * NR].iter_mut().for_each(|v| *v *= s);
            }
        }
    }

    /// `W[i, j]`.
    pub fn get(&self, i: usize, j: usize) -> f32 {
        self.packed[((j / NR) * self.k + i) * NR + j % NR]
    }
}

fn check(
    a: &[f32],
    lda: usize,
    m: usize,
    w: &Weight,
    bias: Option<&[f32]>,
    residual: Option<(&[f32], usize)>,
    out: &[f32],
    ldo: usize,
) {
    let (k, n) = (w.k, w.n);
    assert!(lda >= k && ldo >= n && a.len() >= (m - 1) * lda + k && out.len() >= (m - 1) * ldo + n);
    if let Some(b) = bias {
        assert!(b.len() >= n);
    }
    if let Some((r, ldr)) = residual {
        assert!(ldr >= n && r.len() >= (m - 1) * ldr + n);
    }
}

/// One band of `rows` rows over the panels `ps`, with its epilogue.
///
/// # Safety
/// `a`, `out` and `residual` must cover the band (checked by the callers), `level` supported.
#[allow(clippy::too_many_arguments)]
unsafe fn run_band(
    level: Level,
    rows: usize,
    a: *const f32,
    lda: usize,
    w: &Weight,
    ps: std::ops::Range<usize>,
    out: *mut f32,
    ldo: usize,
    bias: Option<&[f32]>,
    act: Act,
    residual: Option<(*const f32, usize)>,
) {
    let (k, n) = (w.k, w.n);
    let c0 = ps.start * NR;
    let cols = (ps.end * NR).min(n) - c0;
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 {
        // Bias, residual (when no activation follows it) and activation are all applied in the
        // micro-kernel; a residual after an activation gets a second pass.
        let fold = act == Act::None;
        let res = residual.filter(|_| fold);
        // SAFETY: forwarded contract; AVX-512F available at this level.
        unsafe { crate::gemm512::band(rows, k, n, a, lda, w.packed.as_ptr(), ps.clone(), out, ldo, bias, res, act) };
        if let (false, Some((r, ldr))) = (fold, residual) {
            // SAFETY: the tile lies inside `out` / `residual`.
            let tile = unsafe { std::slice::from_raw_parts_mut(out.add(c0), (rows - 1) * ldo + cols) };
            let res = unsafe { std::slice::from_raw_parts(r.add(c0), (rows - 1) * ldr + cols) };
            bias_act_rows_at(level, tile, ldo, rows, cols, None, Act::None, Some((res, ldr)));
        }
        return;
    }
    for p in ps.clone() {
        let pc = NR.min(n - p * NR);
        // SAFETY: forwarded contract; the panel is `k x 32` row-major.
        unsafe {
            gemm::gemm(
                rows,
                pc,
                k,
                out.add(p * NR),
                1,
                ldo as isize,
                false,
                a,
                1,
                lda as isize,
                w.packed.as_ptr().add(p * k * NR),
                1,
                NR as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
    // SAFETY: the tile lies inside `out` / `residual`.
    let tile = unsafe { std::slice::from_raw_parts_mut(out.add(c0), (rows - 1) * ldo + cols) };
    let res = residual.map(|(r, ldr)| (unsafe { std::slice::from_raw_parts(r.add(c0), (rows - 1) * ldr + cols) }, ldr));
    bias_act_rows_at(level, tile, ldo, rows, cols, bias.map(|b| &b[c0..]), act, res);
}

/// `out[r, :n] = act(a[r, :k] · W + bias) (+ residual[r, :n])` for `r < m`, on the pool.
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
    if m == 0 {
        return;
    }
    check(a, lda, m, w, bias, residual, out, ldo);
    let threads = num_threads();
    let panels = w.n.div_ceil(NR);
    // Bands of rows; split the panels too when there are few bands.
    let bm = (4 * MR).min(m.div_ceil(threads).next_multiple_of(MR)).max(MR);
    let m_bands = m.div_ceil(bm);
    let p_splits = if m_bands >= 2 * threads { 1 } else { (2 * threads).div_ceil(m_bands).min(panels).max(1) };
    let pp = panels.div_ceil(p_splits);
    let level = crate::isa::level();
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
        let res = residual.map(|(r, ldr)| (r[r0 * ldr..].as_ptr(), ldr));
        // SAFETY: bands x panel ranges are disjoint parts of `out`; bounds checked above.
        unsafe { run_band(level, rows, a.as_ptr().add(r0 * lda), lda, w, ps, d.0.add(r0 * ldo), ldo, bias, act, res) };
    });
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
    if m == 0 {
        return;
    }
    check(a, lda, m, w, bias, residual, out, ldo);
    let res = residual.map(|(r, ldr)| (r.as_ptr(), ldr));
    // SAFETY: bounds checked above.
    unsafe {
        run_band(crate::isa::level(), m, a.as_ptr(), lda, w, 0..w.n.div_ceil(NR), out.as_mut_ptr(), ldo, bias, act, res)
    };
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
                s += a[r * lda + i] as f64 * w.get(i, c) as f64;
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
