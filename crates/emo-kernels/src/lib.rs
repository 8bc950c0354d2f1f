//! CPU kernels for EMO inference on channels-last (NHWC) data.
//!
//! | kernel | what | where EMO uses it |
//! |---|---|---|
//! | [`gemm::matmul`] | 1x1 conv / linear as GEMM + fused bias, activation, residual | v, qk, proj |
//! | [`dwconv::depthwise`] | depthwise kxk, stride 1/2, fused BN bias + SiLU + inner residual | conv_local |
//! | [`dwgrad`] | NCHW depthwise forward, input and weight gradients (single-threaded) | training: conv_local |
//! | [`convgrad`] | NCHW one-group conv forward, input and weight gradients as per-image GEMMs (im2col beyond 1x1) | training: v, qk, proj, stem, dense heads |
//! | [`conv::conv2d`] | direct dense conv for few input channels | stem |
//! | [`winograd::conv3x3`] | 3x3 stride-1 "same" conv by Winograd F(4x4, 3x3): transforms + 36 GEMMs per tile chunk | dense heads: FPN, RetinaNet towers, segmenter bottleneck |
//! | [`norm::layer_norm`] | LayerNorm over channels per pixel | LN stages, head |
//! | [`fused`] | LN + 1x1, depthwise + 1x1, whole stride-2 blocks, stem conv + stem block | every iRMB |
//! | [`attention::window_attention`] | strided-window MHSA from pixel indices (no permutes) | stages 3-4 |
//! | [`act`] | vectorisable exp / SiLU / erf-GELU | everywhere |
//! | [`xent::softmax_xent`] | pixel softmax cross-entropy and its gradient (NCHW) | training: segmentation loss |
//! | [`xent::resized_softmax_xent`] | the same on logits bilinearly resized to the label map, gradient of the small logits | training: segmentation loss (DeepLabv3, PSPNet, FCN aux) |
//! | [`bnorm`] | training-mode BatchNorm: batch statistics, normalisation, backward (NCHW) | training: every BN |
//!
//! Every kernel has a scalar reference in [`reference`](mod@reference); the tests compare them on EMO's real
//! layer shapes (odd sizes and stride 2 included) at every SIMD level the CPU supports
//! ([`isa`]: AVX-512, AVX2+FMA, generic).
// Kernels take their geometry as flat arguments, keep index loops where they vectorise (and a
// hand-written copy where memcpy's call costs more than the copy), and move whole `SendPtr`s into
// pool closures with `let p = p;` (edition 2021 closures would capture the raw pointer field).
#![allow(clippy::too_many_arguments, clippy::needless_range_loop, clippy::manual_memcpy, clippy::redundant_locals)]

/// Grow a scratch vector to exactly `n` values (never shrink): the default doubling growth
/// would keep up to twice the largest need resident.
pub fn grow_exact<T: Clone + Default>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.reserve_exact(n - v.len());
        v.resize(n, T::default());
    }
}

/// A fresh vector of `len` values written chunk by chunk: `fill(start, chunk)` gets elements
/// `start..start + chunk.len()` (chunks of `chunk_len`, the last one shorter), zeroed just
/// before the call. A kernel's large output then costs one pass through memory, not two: the
/// zeros go into cache lines the kernel overwrites right away, where `vec![0.0; len]` first
/// streams the whole buffer's zeros out to memory and the kernel reads it back.
pub fn produce<T: Clone + Default>(len: usize, chunk_len: usize, mut fill: impl FnMut(usize, &mut [T])) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    let step = chunk_len.max(1);
    let mut start = 0;
    while start < len {
        let end = (start + step).min(len);
        v.resize(end, T::default());
        fill(start, &mut v[start..end]);
        start = end;
    }
    v
}

pub mod act;
pub mod attention;
pub mod bnorm;
pub mod conv;
pub mod convgrad;
pub mod dwconv;
pub mod dwgrad;
pub mod fused;
pub mod gemm;
pub mod gemm512;
pub mod isa;
pub mod norm;
pub mod pool;
pub mod reference;
pub mod winograd;
pub mod xent;

pub use act::Act;

#[cfg(test)]
mod tests {
    use super::produce;

    #[test]
    fn produce_hands_out_zeroed_chunks_that_cover_the_vector_once() {
        let mut seen = Vec::new();
        let v = produce(10, 4, |start, chunk: &mut [f32]| {
            assert!(chunk.iter().all(|&x| x == 0.0));
            seen.push((start, chunk.len()));
            chunk.iter_mut().enumerate().for_each(|(i, x)| *x = (start + i) as f32);
        });
        assert_eq!(seen, [(0, 4), (4, 4), (8, 2)]);
        assert_eq!(v, (0..10).map(|i| i as f32).collect::<Vec<_>>());
        assert!(produce(0, 4, |_, _: &mut [f32]| panic!("no chunk for an empty vector")).is_empty());
        assert_eq!(produce(3, 0, |s, c: &mut [u8]| c.fill(s as u8 + 1)), [1, 2, 3]);
    }
}
