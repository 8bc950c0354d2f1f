//! 3x3, stride-1, pad-1 dense convolution on channels-last data by Winograd's minimal filtering
//! F(4x4, 3x3) (Lavin & Gray 2016): each 4x4 block of output pixels is computed from a 6x6 input
//! tile with 36 products per (input, output) channel pair instead of 144, so the GEMM work of a
//! wide 3x3 conv (RetinaNet's 256-channel head towers, the segmenters' bottleneck) drops by 4x.
//!
//! * The weight is transformed once at load time (`U = G g Gᵀ`, in f64) into 36 `cin x cout`
//!   matrices, each packed for [`crate::gemm`].
//! * The image is cut into 4x4 output tiles, taken in chunks of up to [`TILES`] tiles; a chunk
//!   is one task on the pool: its input tiles are transformed (`V = Bᵀ d B`, channels
//!   innermost) into 36 `tiles x cin` matrices, multiplied by the 36 weights (`M = V U`, the
//!   single-threaded GEMM), and transformed back (`Y = Aᵀ M A`) with the bias and a clamp
//!   (ReLU / ReLU6) applied before the store, so each chunk's buffers stay in cache.
//!
//! In f32 the result differs from a direct conv by about 1e-6 of the magnitudes summed (the
//! tests bound it on the real head shapes); see `G` for the choice of points.

use std::cell::RefCell;

use crate::gemm::{Weight, matmul_st};
use crate::multiversion;
use crate::pool::{SendPtr, num_threads, parallel_for};

/// Output tiles per task (at most). 16 to 128 timed alike on RetinaNet's P3 / P5 tower convs
/// and DeepLabv3's bottleneck (within the 2-core VM's +-15% noise).
pub const TILES: usize = 64;

/// `G` (6x3) of F(4x4, 3x3) on the points 0, 1, -1, 2, -1/2 (and infinity). With these
/// points f32 results lie about 3x closer to the exact conv than with Lavin's 0, ±1, ±2
/// (Barabasz et al. 2020); `Bᵀ` and `Aᵀ` are written out in [`bt6`] and [`at6`].
const G: [[f64; 3]; 6] = [
    [1.0, 0.0, 0.0],
    [-1.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0],
    [1.0 / 3.0, -1.0 / 3.0, 1.0 / 3.0],
    [1.0 / 15.0, 2.0 / 15.0, 4.0 / 15.0],
    [-16.0 / 15.0, 8.0 / 15.0, -4.0 / 15.0],
    [0.0, 0.0, 1.0],
];

/// A 3x3 conv weight in the Winograd domain: 36 packed `cin x cout` matrices.
#[derive(Clone, Debug, PartialEq)]
pub struct Winograd3x3 {
    pub cin: usize,
    pub cout: usize,
    u: Vec<Weight>,
}

impl Winograd3x3 {
    /// From a weight whose element `(o, i, ky, kx)` is `w[o * o_stride + (ky * 3 + kx) *
    /// tap_stride + i * in_stride]`: PyTorch's `[cout, cin, 3, 3]` is
    /// `(cin * 9, 1, 9)`, a `[cout, 3, 3, cin]` layout `(9 * cin, cin, 1)`.
    pub fn new(w: &[f32], cout: usize, cin: usize, (o_stride, tap_stride, in_stride): (usize, usize, usize)) -> Self {
        assert!(w.len() > (cout - 1) * o_stride + 8 * tap_stride + (cin - 1) * in_stride, "weight size");
        let mut u = vec![vec![0f32; cout * cin]; 36];
        for o in 0..cout {
            for i in 0..cin {
                let tile = weight_tile(|ky, kx| w[o * o_stride + (ky * 3 + kx) * tap_stride + i * in_stride]);
                for (e, v) in tile.into_iter().enumerate() {
                    u[e][o * cin + i] = v;
                }
            }
        }
        Winograd3x3 { cin, cout, u: u.iter().map(|m| Weight::from_torch(m, cout, cin)).collect() }
    }

    /// From PyTorch's `[cout, cin, 3, 3]`.
    pub fn from_torch(w: &[f32], cout: usize, cin: usize) -> Self {
        Self::new(w, cout, cin, (cin * 9, 1, 9))
    }
}

/// `U = G g Gᵀ` of one 3x3 kernel `g(ky, kx)`, in f64, as the 36 values `U[r][c]` at `6 r + c`.
fn weight_tile(g: impl Fn(usize, usize) -> f32) -> [f32; 36] {
    // t = G g (6x3), then U = t Gᵀ (6x6).
    let mut t = [[0f64; 3]; 6];
    for (r, row) in t.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v = (0..3).map(|k| G[r][k] * g(k, c) as f64).sum();
        }
    }
    std::array::from_fn(|e| (0..3).map(|k| t[e / 6][k] * G[e % 6][k]).sum::<f64>() as f32)
}

/// `Bᵀ a` for one column of six values.
#[inline(always)]
fn bt([a0, a1, a2, a3, a4, a5]: [f32; 6]) -> [f32; 6] {
    [
        a0 + 1.5 * (a1 - a3) - 2.0 * a2 + a4,
        a4 - a1 - 2.5 * a2 - 0.5 * a3,
        a1 + 0.5 * a2 - 2.5 * a3 + a4,
        0.5 * (a3 - a1) - a2 + a4,
        2.0 * (a1 - a3) - a2 + a4,
        a1 + 1.5 * (a2 - a4) - 2.0 * a3 + a5,
    ]
}

/// `Aᵀ m` for one column of six values.
#[inline(always)]
fn at([m0, m1, m2, m3, m4, m5]: [f32; 6]) -> [f32; 4] {
    let (a, b) = (m1 + m2, m1 - m2);
    [m0 + a + m3 + m4, b + 2.0 * m3 - 0.5 * m4, a + 4.0 * m3 + 0.25 * m4, b + 8.0 * m3 - 0.125 * m4 + m5]
}

/// `Bᵀ d` along one axis: six rows `d` (each `n` channels) into six rows `r`.
#[inline(always)]
fn bt6(d: [&[f32]; 6], r: [&mut [f32]; 6], n: usize) {
    let [d0, d1, d2, d3, d4, d5] = d.map(|s| &s[..n]);
    let [r0, r1, r2, r3, r4, r5] = r;
    let (r0, r1, r2, r3, r4, r5) = (&mut r0[..n], &mut r1[..n], &mut r2[..n], &mut r3[..n], &mut r4[..n], &mut r5[..n]);
    for c in 0..n {
        let r = bt([d0[c], d1[c], d2[c], d3[c], d4[c], d5[c]]);
        (r0[c], r1[c], r2[c], r3[c], r4[c], r5[c]) = (r[0], r[1], r[2], r[3], r[4], r[5]);
    }
}

/// `Aᵀ m` along one axis: six rows `m` into four rows `r`.
#[inline(always)]
fn at6(m: [&[f32]; 6], r: [&mut [f32]; 4], n: usize) {
    let [m0, m1, m2, m3, m4, m5] = m.map(|s| &s[..n]);
    let [r0, r1, r2, r3] = r;
    let (r0, r1, r2, r3) = (&mut r0[..n], &mut r1[..n], &mut r2[..n], &mut r3[..n]);
    for c in 0..n {
        let r = at([m0[c], m1[c], m2[c], m3[c], m4[c], m5[c]]);
        (r0[c], r1[c], r2[c], r3[c]) = (r[0], r[1], r[2], r[3]);
    }
}

/// `R` disjoint rows of `n` floats, `stride` rows apart, starting at row `first`.
#[inline(always)]
fn rows_mut<const R: usize>(buf: &mut [f32], first: usize, stride: usize, n: usize) -> [&mut [f32]; R] {
    let mut rest = &mut buf[first * n..];
    std::array::from_fn(|_| {
        let (row, tail) = std::mem::take(&mut rest).split_at_mut(n);
        rest = tail.get_mut((stride - 1) * n..).unwrap_or_default();
        row
    })
}

/// Geometry of one conv call.
#[derive(Clone, Copy)]
struct Geom {
    h: usize,
    w: usize,
    cin: usize,
    /// Tiles per row / per image.
    tw: usize,
    per_image: usize,
}

multiversion! {
    /// Input transform of tiles `t0..t0 + nt` into `v` (`[36][nt][cin]`); `tmp` holds 36 rows.
    fn input_tiles / input_tiles_at(x: &[f32], g: Geom, t0: usize, nt: usize, zeros: &[f32], tmp: &mut [f32], v: &mut [f32]) {
        let c = g.cin;
        for j in 0..nt {
            let t = t0 + j;
            let (b, r) = (t / g.per_image, t % g.per_image);
            let (y0, x0) = ((r / g.tw) * 4, (r % g.tw) * 4);
            let img = &x[b * g.h * g.w * c..(b + 1) * g.h * g.w * c];
            // Input pixel (y0 - 1 + i, x0 - 1 + k), or zeros outside the image.
            let px = |i: usize, k: usize| -> &[f32] {
                let (iy, ix) = ((y0 + i).wrapping_sub(1), (x0 + k).wrapping_sub(1));
                if iy < g.h && ix < g.w { &img[(iy * g.w + ix) * c..(iy * g.w + ix + 1) * c] } else { zeros }
            };
            // Columns first: T[i][k] = sum_l Bᵀ[i][l] d[l][k], row 6 i + k of `tmp`.
            for k in 0..6 {
                bt6(std::array::from_fn(|l| px(l, k)), rows_mut::<6>(tmp, k, 6, c), c);
            }
            // Then rows: V[i][k] = sum_l T[i][l] Bᵀ[k][l], into matrix e = 6 i + k, row j.
            for i in 0..6 {
                let d: [&[f32]; 6] = std::array::from_fn(|l| &tmp[(i * 6 + l) * c..(i * 6 + l + 1) * c]);
                bt6(d, rows_mut::<6>(v, (i * 6) * nt + j, nt, c), c);
            }
        }
    }
}

multiversion! {
    /// Output transform of `nt` tiles from `m` (`[36][nt][cout]`) with bias and clamp into
    /// `out` (pixel stride `ldo`); `tmp` holds 28 rows.
    fn output_tiles / output_tiles_at(
        m: &[f32],
        g: Geom,
        t0: usize,
        nt: usize,
        bias: &[f32],
        clamp: (f32, f32),
        tmp: &mut [f32],
        out: SendPtr,
        ldo: usize,
    ) {
        let n = bias.len();
        let (first, y) = tmp.split_at_mut(24 * n);
        for j in 0..nt {
            let t = t0 + j;
            let (b, r) = (t / g.per_image, t % g.per_image);
            let (y0, x0) = ((r / g.tw) * 4, (r % g.tw) * 4);
            // Columns first: T[i][k] = sum_l Aᵀ[i][l] M[l][k] (i < 4, k < 6), row 4 k + i.
            for k in 0..6 {
                let rows: [&[f32]; 6] = std::array::from_fn(|l| &m[((l * 6 + k) * nt + j) * n..][..n]);
                at6(rows, rows_mut::<4>(first, k * 4, 1, n), n);
            }
            for i in 0..4 {
                let oy = y0 + i;
                if oy >= g.h {
                    break;
                }
                // Then rows: Y[i][q] = sum_k T[i][k] Aᵀ[q][k], the four output pixels of row i.
                let rows: [&[f32]; 6] = std::array::from_fn(|k| &first[(k * 4 + i) * n..][..n]);
                at6(rows, rows_mut::<4>(y, 0, 1, n), n);
                let base = (b * g.h + oy) * g.w + x0;
                for q in 0..4.min(g.w - x0) {
                    // SAFETY: pixel (oy, x0 + q) of image b is inside the output and belongs to
                    // this tile alone; `n <= ldo`.
                    let o = unsafe { std::slice::from_raw_parts_mut(out.0.add((base + q) * ldo), n) };
                    let yq = &y[q * n..(q + 1) * n];
                    for c in 0..n {
                        o[c] = (yq[c] + bias[c]).max(clamp.0).min(clamp.1);
                    }
                }
            }
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out[b, y, x, :cout] = clamp(conv3x3(x)[b, y, x, :] + bias)` for a 3x3, stride-1, pad-1 conv
/// of `x` (`[batch, h, w, cin]`); output pixels are `ldo` floats apart (a concatenation's
/// columns when `ldo > cout`). `clamp = (lo, hi)`: `(-inf, inf)` for none, `(0, inf)` ReLU.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3(
    x: &[f32],
    batch: usize,
    h: usize,
    w: usize,
    wt: &Winograd3x3,
    bias: &[f32],
    clamp: (f32, f32),
    out: &mut [f32],
    ldo: usize,
) {
    let (cin, cout) = (wt.cin, wt.cout);
    assert!(x.len() >= batch * h * w * cin && bias.len() == cout && ldo >= cout, "conv3x3 sizes");
    if batch * h * w == 0 {
        return;
    }
    assert!(out.len() >= (batch * h * w - 1) * ldo + cout, "conv3x3 output size");
    let (tw, th) = (w.div_ceil(4), h.div_ceil(4));
    let g = Geom { h, w, cin, tw, per_image: tw * th };
    let total = batch * g.per_image;
    // Chunks of up to TILES tiles, at least two per thread when the map allows.
    let per = total.div_ceil(2 * num_threads()).next_multiple_of(8).clamp(8, TILES);
    let chunks = total.div_ceil(per);
    let level = crate::isa::level();
    let dst = SendPtr(out.as_mut_ptr());
    let zeros = vec![0f32; cin];
    parallel_for(chunks, |ci| {
        let dst = dst;
        let t0 = ci * per;
        let nt = per.min(total - t0);
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let (vn, mn, tn) = (36 * nt * cin, 36 * nt * cout, 36 * cin.max(cout));
            crate::grow_exact(&mut s, vn + mn + tn);
            let (v, rest) = s.split_at_mut(vn);
            let (m, tmp) = rest.split_at_mut(mn);
            input_tiles_at(level, x, g, t0, nt, &zeros, tmp, v);
            crate::isa::with_level_unchecked(level, || {
                for (e, u) in wt.u.iter().enumerate() {
                    let (a, o) = (&v[e * nt * cin..(e + 1) * nt * cin], &mut m[e * nt * cout..(e + 1) * nt * cout]);
                    matmul_st(a, cin, nt, u, None, crate::Act::None, None, o, cout);
                }
            });
            output_tiles_at(level, m, g, t0, nt, bias, clamp, tmp, dst, ldo);
        });
    });
}
