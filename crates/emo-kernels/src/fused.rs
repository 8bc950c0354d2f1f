//! Fused stages of an iRMB that each run as one parallel region over row bands, so the
//! intermediate stays in cache and the threads synchronise once instead of twice:
//!
//! * [`ln_matmul`]: LayerNorm over channels, then a 1x1 conv (GEMM) on the same rows;
//! * [`dw_matmul`]: depthwise conv (+ act, + inner residual), then the 1x1 projection
//!   (+ outer residual) on the rows just produced;
//! * [`v_dw_matmul`]: a whole downsampling iRMB body (expansion, depthwise, projection);
//! * [`conv_dw_mean`] + [`matmul_in_place`]: the stem conv and the stem block (depthwise, SE
//!   means, then the gated projection in place), so the largest map is stored once.

use crate::act::Act;
use crate::conv::{ConvWeights, Images};
use crate::dwconv::{DwLayer, dw_row_level};
use crate::gemm::{Weight, matmul_st};

use crate::pool::{SendPtr, num_threads, parallel_chunks_mut};

fn band_rows(total: usize, min_rows: usize) -> usize {
    let threads = num_threads();
    total.div_ceil(4 * threads).max(min_rows).max(1)
}

/// `xn = LN(x)` (written, as attention needs it) and `out = act(xn · W + bias)`, for `pixels`
/// rows of `c` channels.
#[allow(clippy::too_many_arguments)]
pub fn ln_matmul(
    x: &[f32],
    pixels: usize,
    c: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    xn: &mut [f32],
    w: &Weight,
    bias: Option<&[f32]>,
    act: Act,
    out: &mut [f32],
) {
    assert!(x.len() >= pixels * c && xn.len() >= pixels * c && out.len() >= pixels * w.n && w.k == c);
    let level = crate::isa::level();
    let rows = band_rows(pixels, 8);
    let n = w.n;
    let xp = SendPtr(xn.as_mut_ptr());
    parallel_chunks_mut(&mut out[..pixels * n], rows * n, |i, ob| {
        let xp = xp;
        let r = ob.len() / n;
        // SAFETY: band i owns rows i*rows..i*rows+r of `xn` (asserted in bounds).
        let xb = unsafe { std::slice::from_raw_parts_mut(xp.0.add(i * rows * c), r * c) };
        crate::norm::ln_rows_at(level, &x[i * rows * c..(i * rows + r) * c], c, gamma, beta, eps, xb);
        crate::isa::with_level_unchecked(level, || matmul_st(xb, c, r, w, bias, act, None, ob, n));
    });
}

/// `y = act(dw(e)) (+ e)` then `out = y · P (+ x)`, over bands of output rows (`y` lives in a
/// per-thread band scratch).
///
/// `e`: `[batch, h, w, c]`; the result `out`: `[batch, oh, ow, P.n]`;
/// `residual`: the block input `[batch, oh, ow, P.n]` for the outer residual.
#[allow(clippy::too_many_arguments)]
pub fn dw_matmul(
    e: &[f32],
    batch: usize,
    h: usize,
    w: usize,
    dw: DwLayer<'_>,
    proj: &Weight,
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    let (c, g) = (dw.channels(), dw.geom);
    let (oh, ow) = (g.out_len(h), g.out_len(w));
    let n = proj.n;
    let rows_total = batch * oh;
    assert!(e.len() >= batch * h * w * c && out.len() >= rows_total * ow * n && proj.k == c);
    assert!(!dw.residual || (g.stride == 1 && oh == h && ow == w));
    if let Some(r) = residual {
        assert!(r.len() >= rows_total * ow * n);
    }
    let level = crate::isa::level();
    let band = band_rows(rows_total, 1);
    parallel_chunks_mut(&mut out[..rows_total * ow * n], band * ow * n, |i, ob| {
        let r0 = i * band;
        let nr = ob.len() / (ow * n);
        BAND.with(|sc| {
            let yv = &mut sc.borrow_mut().1;
            crate::grow_exact(yv, nr * ow * c);
            let yb = &mut yv[..nr * ow * c];
            for j in 0..nr {
                let (b, oy) = ((r0 + j) / oh, (r0 + j) % oh);
                let img = &e[b * h * w * c..(b + 1) * h * w * c];
                let row = &mut yb[j * ow * c..(j + 1) * ow * c];
                dw_row_level(level, img, h, w, dw, oy, row);
            }
            let res = residual.map(|r| (&r[r0 * ow * n..], n));
            crate::isa::with_level_unchecked(level, || matmul_st(yb, c, nr * ow, proj, None, Act::None, res, ob, n));
        });
    });
}

/// Move a rolling window of map rows `ws..we` (stored from the start of `win`, `rowlen` values
/// each) to start at row `from`: rows before `from` are dropped and the rest moved to the front.
/// The caller then computes the rows from `we` on.
fn slide_window(win: &mut [f32], rowlen: usize, (ws, we): (&mut usize, &mut usize), from: usize) {
    if from > *ws {
        let keep = (*we).max(from) - from;
        win.copy_within((*we - keep - *ws) * rowlen..(*we - *ws) * rowlen, 0);
        (*ws, *we) = (from, from + keep);
    }
}

thread_local! {
    static BAND: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = std::cell::RefCell::new(Default::default());
}

/// Whether [`v_dw_matmul`] runs at the current ISA level (AVX-512 only).
pub fn v_dw_matmul_available() -> bool {
    cfg!(target_arch = "x86_64") && crate::isa::level() == crate::isa::Level::Avx512
}

/// The whole downsampling iRMB body in one region, at the AVX-512 level:
/// `e = act(x · V + b)` on just the input rows a few output rows need (a rolling window of
/// expanded rows per thread), `y = act(dw(e))`, `out = y · P`. The expanded map is never
/// materialised in full. Returns `false` (doing nothing) when not at the AVX-512 level.
///
/// `x`: `[batch, h, w, V.k]`; `out`: `[batch, oh, ow, P.n]`; no residuals (stride-2 blocks).
#[allow(clippy::too_many_arguments)]
pub fn v_dw_matmul(
    x: &[f32],
    batch: usize,
    h: usize,
    w: usize,
    (v, v_bias, v_act): (&Weight, &[f32], Act),
    dw: DwLayer<'_>,
    proj: &Weight,
    out: &mut [f32],
) -> bool {
    if !v_dw_matmul_available() {
        return false;
    }
    let level = crate::isa::level();
    let (cin, c, n, g) = (v.k, v.n, proj.n, dw.geom);
    let (oh, ow) = (g.out_len(h), g.out_len(w));
    assert!(
        x.len() >= batch * h * w * cin
            && out.len() >= batch * oh * ow * n
            && proj.k == c
            && dw.channels() == c
            && dw.weight.len() >= g.k * g.k * c
            && !dw.residual
    );
    // Each task takes a range of output rows of one image and walks it a few rows at a time,
    // keeping the expanded rows it computed in a rolling window: every expanded row is computed
    // once (twice at a range border, for the `k - stride` rows ranges share), and the window
    // holds only the rows a step needs (~3 rows of 43 KB for EMO-1M stage 1).
    let rowlen = w * c;
    let overlap = g.k.saturating_sub(g.stride);
    let fit = (160 * 1024 / (rowlen * 4).max(1)).max(g.k);
    let band = (fit.saturating_sub(overlap) / g.stride).clamp(1, oh.max(1));
    let ranges = num_threads().min(oh.div_ceil(4)).max(1);
    let per = oh.div_ceil(ranges);
    let op = SendPtr(out.as_mut_ptr());
    crate::pool::parallel_for(batch * ranges, |t| {
        let op = op;
        let (b, ri) = (t / ranges, t % ranges);
        let (oy0, oy1) = (ri * per, ((ri + 1) * per).min(oh));
        if oy0 >= oy1 {
            return;
        }
        BAND.with(|sc| {
            let (win, y) = &mut *sc.borrow_mut();
            crate::grow_exact(win, (band * g.stride + overlap) * rowlen);
            crate::grow_exact(y, band * ow * c);
            // The window holds expanded rows ws..we of image b.
            let (mut ws, mut we) = (0, 0);
            let mut a = oy0;
            while a < oy1 {
                let e_ = (a + band).min(oy1);
                let need_s = (a * g.stride).saturating_sub(g.pad);
                let need_e = ((e_ - 1) * g.stride + g.k).saturating_sub(g.pad).min(h);
                slide_window(win, rowlen, (&mut ws, &mut we), need_s);
                if need_e > we {
                    let xs = &x[(b * h + we) * w * cin..(b * h + need_e) * w * cin];
                    let dst = &mut win[(we - ws) * rowlen..(need_e - ws) * rowlen];
                    crate::isa::with_level_unchecked(level, || {
                        matmul_st(xs, cin, (need_e - we) * w, v, Some(v_bias), v_act, None, dst, c)
                    });
                    we = need_e;
                }
                // The window holds rows ws..we: point the kernel at its virtual row 0.
                let base = win.as_ptr().wrapping_sub(ws * rowlen);
                for oy in a..e_ {
                    let row = &mut y[(oy - a) * ow * c..(oy - a + 1) * ow * c];
                    // SAFETY: AVX-512F available; the rows this output row reads
                    // (clipped to 0..h) lie in ws..we, inside the window.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        crate::dwconv::dw_row_512(base, h, w, dw, oy, row)
                    };
                }
                // SAFETY: this task owns output rows a..e_ of image b.
                let ob = unsafe { std::slice::from_raw_parts_mut(op.0.add((b * oh + a) * ow * n), (e_ - a) * ow * n) };
                crate::isa::with_level_unchecked(level, || {
                    matmul_st(&y[..(e_ - a) * ow * c], c, (e_ - a) * ow, proj, None, Act::None, None, ob, n)
                });
                a = e_;
            }
        });
    });
    true
}

/// Channel means of `act(dw(e))` for each image, computed band by band without storing the
/// depthwise output (the SE of the stem block needs them before its projection).
pub fn dw_channel_mean(e: &[f32], batch: usize, h: usize, w: usize, dw: DwLayer<'_>, out: &mut [f32]) {
    let (c, g) = (dw.channels(), dw.geom);
    let (oh, ow) = (g.out_len(h), g.out_len(w));
    assert!(e.len() >= batch * h * w * c && out.len() >= batch * c);
    let level = crate::isa::level();
    let bands = oh.clamp(1, 4 * num_threads());
    let band = oh.div_ceil(bands);
    for b in 0..batch {
        let img = &e[b * h * w * c..(b + 1) * h * w * c];
        let sums = crate::act::ChannelSums::new(c);
        crate::pool::parallel_for(oh.div_ceil(band), |bi| {
            let mut acc = vec![0f32; c];
            let mut row = vec![0f32; ow * c];
            for oy in bi * band..((bi + 1) * band).min(oh) {
                dw_row_level(level, img, h, w, dw, oy, &mut row);
                crate::act::add_pixels_at(level, &mut acc, &row);
            }
            sums.add(level, &acc);
        });
        sums.means_into(oh * ow, &mut out[b * c..(b + 1) * c]);
    }
}

/// The stem conv and the depthwise half of the stem block in one pass over one image:
/// `y = act(dw(conv(x)))` and the channel means of `y` (for the block's SE). The conv's output
/// is never stored in full: each thread takes a range of output rows and computes the conv rows
/// it needs into a rolling window of `band + k - 1` rows (one halo of `pad` rows recomputed at
/// each range border).
///
/// `input`: one image (the first of `input.data`); `conv`: the dense conv, `[k, k, cin, c]`;
/// `dw`: the depthwise conv over its `c` channels, stride-1 "same"; `y`: `[ch, cw, c]` with
/// `ch x cw` the conv's output size; `mean`: `[c]`.
pub fn conv_dw_mean(input: Images, conv: ConvWeights, dw: ConvWeights, act: Act, y: &mut [f32], mean: &mut [f32]) {
    let ch = conv.geom.out_len(input.h);
    let ranges = num_threads().min(ch.div_ceil(16)).max(1);
    conv_dw_mean_ranges(input, conv, dw, act, y, mean, ranges)
}

/// [`conv_dw_mean`] split into `ranges` row ranges (tasks), whatever the thread count.
#[doc(hidden)]
pub fn conv_dw_mean_ranges(
    input: Images,
    conv: ConvWeights,
    dw: ConvWeights,
    act: Act,
    y: &mut [f32],
    mean: &mut [f32],
    ranges: usize,
) {
    let c = conv.bias.len();
    let (ch, cw) = (conv.geom.out_len(input.h), conv.geom.out_len(input.w));
    let g = dw.geom;
    let dw = DwLayer { weight: dw.weight, bias: dw.bias, geom: g, act, residual: false };
    let p = g.pad;
    assert!(
        g.stride == 1 && g.k == 2 * p + 1 && dw.channels() == c && mean.len() == c,
        "the fused stem needs a stride-1 'same' depthwise conv over the conv's channels"
    );
    assert!(input.data.len() >= input.image_len() && y.len() >= ch * cw * c);
    let level = crate::isa::level();
    let rowlen = cw * c;
    let band = 8usize.max(p);
    let per = ch.div_ceil(ranges.clamp(1, ch.max(1)));
    let sums = crate::act::ChannelSums::new(c);
    parallel_chunks_mut(&mut y[..ch * rowlen], per * rowlen, |i, yr| {
        let (r0, r1) = (i * per, i * per + yr.len() / rowlen);
        let mut acc = vec![0f32; c];
        BAND.with(|sc| {
            let win = &mut sc.borrow_mut().0;
            crate::grow_exact(win, (band + 2 * p) * rowlen);
            // The window holds conv rows ws..we.
            let (mut ws, mut we) = (r0.saturating_sub(p), r0.saturating_sub(p));
            let mut a = r0;
            while a < r1 {
                let b = (a + band).min(r1);
                let (need_s, need_e) = (a.saturating_sub(p), (b + p).min(ch));
                slide_window(win, rowlen, (&mut ws, &mut we), need_s);
                for r in we..need_e {
                    let row = &mut win[(r - ws) * rowlen..(r - ws + 1) * rowlen];
                    crate::conv::conv_row_level(level, input, conv, r, Act::None, row);
                }
                we = need_e;
                let img = &win[..(we - ws) * rowlen];
                for oy in a..b {
                    let row = &mut yr[(oy - r0) * rowlen..(oy - r0 + 1) * rowlen];
                    dw_row_level(level, img, we - ws, cw, dw, oy - ws, row);
                    crate::act::add_pixels_at(level, &mut acc, row);
                }
                a = b;
            }
        });
        sums.add(level, &acc);
    });
    sums.means_into(ch * cw, mean);
}

/// `x = x · P` in place for `pixels` rows of `P.k == P.n` channels (a 1x1 conv), band by band
/// through a per-thread scratch.
pub fn matmul_in_place(x: &mut [f32], pixels: usize, proj: &Weight) {
    let c = proj.k;
    assert!(proj.n == c && x.len() >= pixels * c);
    let level = crate::isa::level();
    let rows = band_rows(pixels, 64).min(512);
    parallel_chunks_mut(&mut x[..pixels * c], rows * c, |_, xb| {
        BAND.with(|sc| {
            let tmp = &mut sc.borrow_mut().1;
            crate::grow_exact(tmp, xb.len());
            let r = xb.len() / c;
            crate::isa::with_level_unchecked(level, || matmul_st(xb, c, r, proj, None, Act::None, None, tmp, c));
            xb.copy_from_slice(&tmp[..xb.len()]);
        });
    });
}
