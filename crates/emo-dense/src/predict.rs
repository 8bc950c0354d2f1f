//! Inference helpers: batching images into normalised tensors, turning detection outputs into
//! boxes (decode, score threshold, top-k, class-aware NMS), segmentation argmax, and drawing.

use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use emo_spec::{DenseConfig, Task};

use crate::DenseError;
use crate::boxes::{BBox, BoxCoder, Detection, batched_nms};
use crate::data::{Resized, normalize_into};
use crate::fast::DenseInfer;
use crate::loss::{bilinear, resize_logits, to_vec};
use crate::model::DenseOutput;

/// Test-time settings (mmdet `test_cfg`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DetTestCfg {
    pub score_thr: f32,
    pub nms_iou: f32,
    pub max_per_img: usize,
    /// The best (anchor, class) pairs above `score_thr` kept from each level before NMS
    /// (mmdet 2.x's `filter_scores_and_topk` per level).
    pub nms_pre: usize,
}

impl DetTestCfg {
    pub fn official(task: Task) -> Self {
        match task {
            Task::SsdLite => DetTestCfg { score_thr: 0.02, nms_iou: 0.45, max_per_img: 200, nms_pre: 1000 },
            _ => DetTestCfg { score_thr: 0.05, nms_iou: 0.5, max_per_img: 100, nms_pre: 1000 },
        }
    }
}

/// Normalised `[B, 3, H, W]` from HWC RGB images of the model input size.
pub fn batch_tensor(images: &[&[u8]], hw: (usize, usize), device: &Device) -> Tensor<4> {
    let mut x = Vec::with_capacity(images.len() * 3 * hw.0 * hw.1);
    for im in images {
        normalize_into(im, hw.0, hw.1, &mut x);
    }
    Tensor::from_data(TensorData::new(x, [images.len(), 3, hw.0, hw.1]), device)
}

/// Normalised images of (H, W) `sizes[i]` in one `(B, 3, H, W)` batch of `hw`, each zero-padded
/// at the bottom and right (mmdet's `Pad` after `Normalize`).
pub fn batch_tensor_padded(
    images: &[&[u8]],
    sizes: &[(usize, usize)],
    hw: (usize, usize),
    device: &Device,
) -> Tensor<4> {
    let plane = hw.0 * hw.1;
    let mut x = vec![0f32; images.len() * 3 * plane];
    let mut one = Vec::new();
    for (i, (im, &(h, w))) in images.iter().zip(sizes).enumerate() {
        assert!(h <= hw.0 && w <= hw.1, "an image of {h}x{w} padded to {hw:?}");
        one.clear();
        normalize_into(im, h, w, &mut one);
        for c in 0..3 {
            for y in 0..h {
                let dst = (i * 3 + c) * plane + y * hw.1;
                x[dst..dst + w].copy_from_slice(&one[c * h * w + y * w..c * h * w + (y + 1) * w]);
            }
        }
    }
    Tensor::from_data(TensorData::new(x, [images.len(), 3, hw.0, hw.1]), device)
}

/// Anchors per input size, each laid out once while it is cached: under a test scale, and in
/// keep-ratio training, images run at their own (padded) sizes. At most
/// [`AnchorsBySize::KEPT`] sizes are kept (a RetinaNet input of 800x1344 has 200k anchors,
/// 3 MB; COCO's images come in hundreds of padded sizes): a new size past that starts afresh.
#[derive(Default)]
pub struct AnchorsBySize(std::collections::HashMap<(usize, usize), Vec<BBox>>);

impl AnchorsBySize {
    /// Sizes kept at once.
    pub const KEPT: usize = 16;

    /// The anchors of `cfg`'s model for an `input` (H, W) input.
    pub fn get(&mut self, cfg: &DenseConfig, input: (usize, usize)) -> &[BBox] {
        if self.0.len() >= Self::KEPT && !self.0.contains_key(&input) {
            self.0.clear();
        }
        self.0.entry(input).or_insert_with(|| crate::anchors::anchors(&DenseConfig { input, ..cfg.clone() }))
    }
}

/// Detections on resized images ([`Resized`]: each `size` of it), run together at the padded
/// (H, W) `hw` with the anchors of that size, each image's boxes clipped to its resized size:
/// in the resized image's pixels (`orig / size` scales them back, as mmdet's
/// `get_bboxes(rescale=True)`).
pub fn detect_resized(
    model: &dyn DenseInfer,
    images: &[Resized],
    hw: (usize, usize),
    anchors: &mut AnchorsBySize,
    cfg: &DetTestCfg,
    device: &Device,
) -> Result<Vec<Vec<Detection>>, DenseError> {
    let rgb: Vec<&[u8]> = images.iter().map(|r| r.rgb.as_slice()).collect();
    let sizes: Vec<(usize, usize)> = images.iter().map(|r| r.size).collect();
    let x = batch_tensor_padded(&rgb, &sizes, hw, device).without_autodiff();
    detect_clipped(model, x, anchors.get(model.dense_config(), hw), cfg, &sizes)
}

/// Detections per image, in input coordinates.
pub fn detect(
    model: &dyn DenseInfer,
    x: Tensor<4>,
    anchors: &[BBox],
    cfg: &DetTestCfg,
) -> Result<Vec<Vec<Detection>>, DenseError> {
    let [b, _, h, w] = x.dims();
    detect_clipped(model, x, anchors, cfg, &vec![(h, w); b])
}

/// [`detect`] with each image's boxes clipped to its own (H, W) `clips[i]` (mmdet's `img_shape`:
/// the resized image inside the padded input).
pub fn detect_clipped(
    model: &dyn DenseInfer,
    x: Tensor<4>,
    anchors: &[BBox],
    cfg: &DetTestCfg,
    clips: &[(usize, usize)],
) -> Result<Vec<Vec<Detection>>, DenseError> {
    let [b, _, h, w] = x.dims();
    if clips.len() != b {
        return Err(DenseError::Data(format!("{} clip sizes for a batch of {b}", clips.len())));
    }
    // mmdet keeps the `nms_pre` best (anchor, class) pairs above the threshold of each level.
    let levels = crate::anchors::level_counts(&DenseConfig { input: (h, w), ..model.dense_config().clone() });
    if levels.iter().sum::<usize>() != anchors.len() {
        return Err(DenseError::Data(format!(
            "{} anchors given for a {h}x{w} input, which has {}",
            anchors.len(),
            levels.iter().sum::<usize>()
        )));
    }
    let DenseOutput::Det { cls, reg } = model.infer(x)? else {
        return Err(DenseError::Data(format!("{} is not a detector", model.dense_config().task)));
    };
    let (ssd, coder) = (model.dense_config().task == Task::SsdLite, BoxCoder::for_task(model.dense_config().task));
    let k = model.dense_config().num_classes;
    let scores = to_vec(if ssd { softmax(cls, 2) } else { sigmoid(cls) });
    let deltas = to_vec(reg);
    let n = anchors.len();
    let per = if ssd { k + 1 } else { k };
    if scores.len() != b * n * per {
        return Err(DenseError::Data(format!(
            "{} anchors, but the model scored {} per image",
            n,
            scores.len() / (b * per).max(1)
        )));
    }
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let mut cand: Vec<(f32, usize, usize)> = Vec::new();
        let mut start = 0;
        for &count in &levels {
            let mut level: Vec<(f32, usize, usize)> = Vec::new();
            for a in start..start + count {
                let row = &scores[(i * n + a) * per..(i * n + a) * per + per];
                for (c, &s) in row[..k].iter().enumerate() {
                    if s > cfg.score_thr {
                        level.push((s, a, c));
                    }
                }
            }
            level.sort_by(|x, y| y.0.total_cmp(&x.0));
            level.truncate(cfg.nms_pre);
            cand.extend(level);
            start += count;
        }
        let dets = cand
            .into_iter()
            .map(|(score, a, label)| {
                let d: [f32; 4] = std::array::from_fn(|j| deltas[(i * n + a) * 4 + j]);
                Detection { bbox: coder.decode(&anchors[a], &d, clips[i]), score, label }
            })
            .collect();
        out.push(batched_nms(dets, cfg.nms_iou, cfg.max_per_img));
    }
    Ok(out)
}

/// Per-pixel class maps `(H * W)` per image at the input size.
pub fn segment(model: &dyn DenseInfer, x: Tensor<4>) -> Result<Vec<Vec<u8>>, DenseError> {
    segment_with(model, x, false)
}

/// [`segment`], optionally with mmseg's flip test augmentation (`flip`, see [`seg_probs`]).
pub fn segment_with(model: &dyn DenseInfer, x: Tensor<4>, flip: bool) -> Result<Vec<Vec<u8>>, DenseError> {
    let b = x.dims()[0];
    // Without flip the argmax needs no softmax.
    let p = if flip { seg_probs(model, x, true)? } else { seg_logits(model, x)? };
    let [_, k, h, w] = p.dims();
    let p = to_vec(p);
    Ok((0..b).map(|i| argmax_map(&p[i * k * h * w..(i + 1) * k * h * w], k)).collect())
}

/// [`segment_with`] with each image's class map at its own size `sizes[i]` (H, W), as mmseg's
/// whole-image inference with `rescale=True`: the logits, upsampled to the input size, are
/// resized bilinearly once more to that size (where it differs); with `flip`, the softmax of each
/// pass follows that resize. Sizes equal to the input give exactly [`segment_with`].
pub fn segment_sized(
    model: &dyn DenseInfer,
    x: Tensor<4>,
    flip: bool,
    sizes: &[(usize, usize)],
) -> Result<Vec<Vec<u8>>, DenseError> {
    segment_aug(model, x, &SegAug::flip(flip), sizes)
}

/// Segmentation test-time augmentation, mmseg's `aug_test`: the image is run at each ratio of
/// `scales` (1 = the input size; size `int(side * ratio + 0.5)`, resized bilinearly), and under
/// `flip` also mirrored; every pass's logits, upsampled to its input and then resized to the
/// output size, go through a softmax, and the probabilities of all passes are averaged.
/// `SegAug::flip(false)` is plain single-scale inference, as the paper's numbers.
#[derive(Clone, Debug, PartialEq)]
pub struct SegAug {
    pub flip: bool,
    pub scales: Vec<f32>,
}

impl SegAug {
    /// Single scale, with or without flip.
    pub fn flip(flip: bool) -> Self {
        SegAug { flip, scales: vec![1.0] }
    }

    pub fn is_single_scale(&self) -> bool {
        self.scales == [1.0]
    }

    /// The number of forward passes per image.
    pub fn passes(&self) -> usize {
        self.scales.len() * if self.flip { 2 } else { 1 }
    }

    /// At least one scale, each finite, above 0 and at most 8.
    pub fn validate(&self) -> Result<(), DenseError> {
        if self.scales.is_empty() || self.scales.iter().any(|&r| !(r > 0.0 && r <= 8.0)) {
            return Err(DenseError::Data(format!("test scales must be in (0, 8], got {:?}", self.scales)));
        }
        Ok(())
    }

    /// `(h, w)` scaled by `ratio` as mmcv's `rescale_size` rounds it (at least 1).
    pub fn scaled((h, w): (usize, usize), ratio: f32) -> (usize, usize) {
        let s = |n: usize| ((n as f64 * ratio as f64 + 0.5) as usize).max(1);
        (s(h), s(w))
    }
}

impl Default for SegAug {
    fn default() -> Self {
        SegAug::flip(false)
    }
}

/// Class maps of a batch under test-time augmentation `aug`, each at its own size `sizes[i]`
/// (see [`segment_sized`]); single scale at the input size is [`segment_with`].
pub fn segment_aug(
    model: &dyn DenseInfer,
    x: Tensor<4>,
    aug: &SegAug,
    sizes: &[(usize, usize)],
) -> Result<Vec<Vec<u8>>, DenseError> {
    let [b, _, h, w] = x.dims();
    if sizes.len() != b {
        return Err(DenseError::Data(format!("{} output sizes for a batch of {b}", sizes.len())));
    }
    if aug.is_single_scale() && sizes.iter().all(|&s| s == (h, w)) {
        return segment_with(model, x, aug.flip);
    }
    if aug.is_single_scale() && !aug.flip {
        // One pass: the argmax needs no softmax.
        let logits = seg_logits(model, x)?;
        let k = logits.dims()[1];
        return Ok(sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| argmax_map(&to_vec(resize_logits(logits.clone().narrow(0, i, 1), size)), k))
            .collect());
    }
    Ok(aug_probs(model, x, aug, sizes)?
        .into_iter()
        .map(|p| {
            let k = p.dims()[1];
            argmax_map(&to_vec(p), k)
        })
        .collect())
}

/// Class probabilities `(B, K, H, W)` at `out` (H, W) under test-time augmentation `aug`: the
/// mean of every pass's softmax. Single-scale `aug` at the input size gives [`seg_probs`].
pub fn seg_probs_aug(
    model: &dyn DenseInfer,
    x: Tensor<4>,
    aug: &SegAug,
    out: (usize, usize),
) -> Result<Tensor<4>, DenseError> {
    let b = x.dims()[0];
    Ok(Tensor::cat(aug_probs(model, x, aug, &vec![out; b])?, 0))
}

/// Per image `(1, K, H, W)` probabilities at `sizes[i]` (one per image), averaged over `aug`'s
/// passes.
fn aug_probs(
    model: &dyn DenseInfer,
    x: Tensor<4>,
    aug: &SegAug,
    sizes: &[(usize, usize)],
) -> Result<Vec<Tensor<4>>, DenseError> {
    aug.validate()?;
    let [b, _, h, w] = x.dims();
    let mut acc: Vec<Option<Tensor<4>>> = vec![None; b];
    for &r in &aug.scales {
        let hw = SegAug::scaled((h, w), r);
        let xs = if hw == (h, w) { x.clone() } else { bilinear(x.clone(), hw) };
        let mut passes = vec![seg_logits(model, xs.clone())?];
        if aug.flip {
            passes.push(seg_logits(model, xs.flip([3]))?.flip([3]));
        }
        for logits in passes {
            for (i, &size) in sizes.iter().enumerate() {
                let p = softmax(resize_logits(logits.clone().narrow(0, i, 1), size), 1);
                acc[i] = Some(match acc[i].take() {
                    Some(a) => a + p,
                    None => p,
                });
            }
        }
    }
    let n = aug.passes() as f32;
    Ok(acc.into_iter().map(|a| a.expect("at least one pass").div_scalar(n)).collect())
}

/// The class (0..k) of the largest score at each pixel of one image's `(K, H, W)` scores (the
/// first on ties).
fn argmax_map(p: &[f32], k: usize) -> Vec<u8> {
    let hw = p.len() / k;
    (0..hw)
        .map(|px| {
            let mut best = (f32::NEG_INFINITY, 0u8);
            for c in 0..k {
                let v = p[c * hw + px];
                if v > best.0 {
                    best = (v, c as u8);
                }
            }
            best.1
        })
        .collect()
}

/// Class probabilities `(B, K, H, W)` at the input size (softmax of the upsampled logits).
/// `flip`: mmseg's flip test augmentation, the mean of the input's probabilities and of its
/// mirror image's (mirrored back), at twice the cost; the result is mirror-symmetric (a
/// mirrored input gives the mirrored probabilities).
pub fn seg_probs(model: &dyn DenseInfer, x: Tensor<4>, flip: bool) -> Result<Tensor<4>, DenseError> {
    let probs = |x: Tensor<4>| Ok::<_, DenseError>(softmax(seg_logits(model, x)?, 1));
    Ok(if flip { (probs(x.clone())? + probs(x.flip([3]))?.flip([3])).mul_scalar(0.5) } else { probs(x)? })
}

/// Class logits `(B, K, H, W)` upsampled to the input size.
fn seg_logits(model: &dyn DenseInfer, x: Tensor<4>) -> Result<Tensor<4>, DenseError> {
    let [_, _, h, w] = x.dims();
    let DenseOutput::Seg { logits, .. } = model.infer(x)? else {
        return Err(DenseError::Data(format!("{} is not a segmenter", model.dense_config().task)));
    };
    Ok(resize_logits(logits, (h, w)))
}

/// A distinct colour per class (0 = black background in segmentation maps).
pub fn palette(c: usize) -> [u8; 3] {
    if c == 0 {
        return [0, 0, 0];
    }
    let h = (c as f32 * 0.618_034).fract();
    let f = |n: f32| {
        let k = (n + h * 6.0) % 6.0;
        (255.0 * (1.0 - (k.min(4.0 - k).clamp(0.0, 1.0)) * 0.85)) as u8
    };
    [f(5.0), f(3.0), f(1.0)]
}

/// Draw boxes (2 px outlines in the class colour) on an RGB image.
pub fn draw_boxes(img: &mut image::RgbImage, dets: &[Detection]) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    for d in dets {
        let col = image::Rgb(palette(d.label + 1));
        let [x1, y1, x2, y2] = d.bbox.map(|v| v.round() as i64);
        for t in 0..2 {
            for x in x1..=x2 {
                for y in [y1 + t, y2 - t] {
                    if (0..w).contains(&x) && (0..h).contains(&y) {
                        img.put_pixel(x as u32, y as u32, col);
                    }
                }
            }
            for y in y1..=y2 {
                for x in [x1 + t, x2 - t] {
                    if (0..w).contains(&x) && (0..h).contains(&y) {
                        img.put_pixel(x as u32, y as u32, col);
                    }
                }
            }
        }
    }
}
