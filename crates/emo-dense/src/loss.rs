//! Training losses of the dense heads, as in mmdet 2.x / mmseg 0.x:
//! - SSD: softmax cross-entropy with hard-negative mining (3 negatives per positive, the
//!   highest-loss ones) plus smooth-L1 (beta 1) on the positives' deltas, both over the number
//!   of positives in the batch;
//! - RetinaNet: sigmoid focal loss (gamma 2, alpha 0.25) over all non-ignored anchors plus L1
//!   on the positives' deltas, both over the number of positives;
//! - segmentation: pixel cross-entropy on logits resized (bilinear) to the label size, with
//!   255 ignored; the auxiliary head's loss is weighted 0.4.

use burn::tensor::activation::{log_softmax, relu, sigmoid, softmax, softplus};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::assign::Targets;

/// A loss and its parts (for logging).
pub struct Loss {
    pub total: Tensor<1>,
    pub parts: Vec<(&'static str, f64)>,
}

impl Loss {
    /// This loss plus `part`, logged as `name`.
    pub fn plus(mut self, name: &'static str, part: Tensor<1>) -> Loss {
        self.parts.push((name, scalar(part.clone())));
        self.total = self.total + part;
        self
    }
}

pub(crate) fn scalar(t: Tensor<1>) -> f64 {
    t.into_data().convert::<f32>().try_into_vec::<f32>().map(|v| v[0] as f64).unwrap_or(f64::NAN)
}

pub(crate) fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data")
}

/// Per-anchor box weights `[B, N, 1]` (1 for positives) and the stacked targets `[B, N, 4]`.
fn box_targets(t: &[Targets], num_classes: usize, device: &Device) -> (Tensor<3>, Tensor<3>, f64) {
    let (b, n) = (t.len(), t[0].labels.len());
    let pos: Vec<f32> =
        t.iter().flat_map(|t| t.labels.iter().map(|&l| (l >= 0 && (l as usize) < num_classes) as u8 as f32)).collect();
    let deltas: Vec<f32> = t.iter().flat_map(|t| t.deltas.iter().flatten().copied()).collect();
    let num_pos = pos.iter().sum::<f32>().max(1.0) as f64;
    (
        Tensor::from_data(TensorData::new(pos, [b, n, 1]), device),
        Tensor::from_data(TensorData::new(deltas, [b, n, 4]), device),
        num_pos,
    )
}

/// The SSD loss. `cls` is `[B, N, classes + 1]` (background last), `reg` `[B, N, 4]`.
pub fn ssd_loss(cls: Tensor<3>, reg: Tensor<3>, t: &[Targets], num_classes: usize, neg_pos_ratio: usize) -> Loss {
    let device = cls.device();
    let [b, n, _] = cls.dims();
    let labels: Vec<i64> =
        t.iter().flat_map(|t| t.labels.iter().map(|&l| if l < 0 { num_classes as i64 } else { l })).collect();
    let idx = Tensor::<3, Int>::from_data(TensorData::new(labels, [b, n, 1]), &device);
    let ce = log_softmax(cls, 2).gather(2, idx).neg(); // [B, N, 1]
    // Hard-negative mining on the detached losses.
    let values = to_vec(ce.clone().detach());
    let mut mask = vec![0f32; b * n];
    for (i, ti) in t.iter().enumerate() {
        let row = i * n..(i + 1) * n;
        let mut negs: Vec<usize> = Vec::new();
        for (j, &l) in ti.labels.iter().enumerate() {
            if l >= 0 && (l as usize) < num_classes {
                mask[i * n + j] = 1.0;
            } else if l == num_classes as i64 {
                negs.push(j);
            }
        }
        let k = (neg_pos_ratio * ti.num_pos).min(negs.len());
        let v = &values[row];
        negs.sort_by(|&a, &c| v[c].total_cmp(&v[a]));
        for &j in &negs[..k] {
            mask[i * n + j] = 1.0;
        }
    }
    let mask = Tensor::<3>::from_data(TensorData::new(mask, [b, n, 1]), &device);
    let (pos, target, num_pos) = box_targets(t, num_classes, &device);
    let loss_cls = (ce * mask).sum().div_scalar(num_pos);
    let d = (reg - target).abs();
    let small = d.clone().lower_elem(1.0).float();
    let smooth =
        small.clone() * d.clone().powi_scalar(2).mul_scalar(0.5) + (small.neg().add_scalar(1.0)) * d.sub_scalar(0.5);
    let loss_box = (smooth * pos).sum().div_scalar(num_pos);
    let parts = vec![("cls", scalar(loss_cls.clone())), ("box", scalar(loss_box.clone()))];
    Loss { total: loss_cls + loss_box, parts }
}

/// The RetinaNet loss. `cls` is `[B, N, classes]` (sigmoid logits), `reg` `[B, N, 4]`.
pub fn focal_loss(cls: Tensor<3>, reg: Tensor<3>, t: &[Targets], num_classes: usize) -> Loss {
    let (gamma, alpha) = (2.0, 0.25);
    let device = cls.device();
    let [b, n, c] = cls.dims();
    let mut onehot = vec![0f32; b * n * c];
    let mut valid = vec![1f32; b * n];
    for (i, ti) in t.iter().enumerate() {
        for (j, &l) in ti.labels.iter().enumerate() {
            if l < 0 {
                valid[i * n + j] = 0.0;
            } else if (l as usize) < num_classes {
                onehot[(i * n + j) * c + l as usize] = 1.0;
            }
        }
    }
    let tt = Tensor::<3>::from_data(TensorData::new(onehot, [b, n, c]), &device);
    let w = Tensor::<3>::from_data(TensorData::new(valid, [b, n, 1]), &device);
    let p = sigmoid(cls.clone());
    // Binary cross-entropy with logits, stable form.
    let bce = relu(cls.clone()) - cls.clone() * tt.clone() + cls.abs().neg().exp().log1p();
    let pt = p.clone() * tt.clone() + (p.neg().add_scalar(1.0)) * (tt.clone().neg().add_scalar(1.0));
    let a = tt.clone().mul_scalar(alpha) + tt.neg().add_scalar(1.0).mul_scalar(1.0 - alpha);
    let focal = bce * pt.neg().add_scalar(1.0).powf_scalar(gamma) * a;
    let (pos, target, num_pos) = box_targets(t, num_classes, &device);
    let loss_cls = (focal * w).sum().div_scalar(num_pos);
    let loss_box = ((reg - target).abs() * pos).sum().div_scalar(num_pos);
    let parts = vec![("cls", scalar(loss_cls.clone())), ("box", scalar(loss_box.clone()))];
    Loss { total: loss_cls + loss_box, parts }
}

/// Resize `[B, K, h, w]` logits to `(H, W)` (bilinear, align_corners false).
pub fn resize_logits(x: Tensor<4>, hw: (usize, usize)) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    if (h, w) == hw {
        return x;
    }
    bilinear(x, hw)
}

/// Row `i` holds the weights of output `i` over the `n` inputs for PyTorch's bilinear rule with
/// `align_corners=False`: source `(i + 0.5) * n / m - 0.5`, clamped at 0, between its two
/// neighbours (the last input repeated at the edge). `[m, n]`, row-major.
pub fn bilinear_weights(n: usize, m: usize) -> Vec<f32> {
    let mut a = vec![0f32; m * n];
    for (i, t) in emo_kernels::xent::bilinear_taps(n, m).into_iter().enumerate() {
        a[i * n + t.i0] += t.w0;
        a[i * n + t.i1] += t.w1;
    }
    a
}

/// Bilinear resize of `[B, C, h, w]` to `(H, W)` (align_corners false) as two matrix products,
/// `A_h · X · A_wᵀ`: the values of `interpolate(.., Bilinear)` up to rounding, with a backward
/// pass on every backend (burn 0.22's CubeCL backends, the GPU ones, have no bilinear backward).
pub fn bilinear(x: Tensor<4>, (oh, ow): (usize, usize)) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let device = x.device();
    // [n, m]: the transpose of the [m, n] weights.
    let weights = |n: usize, m: usize| {
        Tensor::<2>::from_data(TensorData::new(bilinear_weights(n, m), [m, n]), &device).transpose()
    };
    // Along W: [B*C*h, w] x [w, W].
    let y = x.reshape([b * c * h, w]).matmul(weights(w, ow));
    // Along H: [B*C*W, h] x [h, H].
    let y = y.reshape([b * c, h, ow]).swap_dims(1, 2).reshape([b * c * ow, h]).matmul(weights(h, oh));
    y.reshape([b * c, ow, oh]).swap_dims(1, 2).reshape([b, c, oh, ow])
}

/// Pixel cross-entropy with 255 ignored, of logits resized (bilinear, align_corners false) to the
/// label map `hw`; `labels` is `B * H * W` bytes.
///
/// On flex the loss and the gradient of the (small) logits come from one host pass
/// (`emo_kernels::xent::resized_softmax_xent`: resize, softmax, back through the resize, image by
/// image) and reach autodiff through `sum(x * G) - detach(sum(x * G)) + L`: the value is `L` and
/// the gradient of the logits is `G`. Elsewhere (LibTorch, GPUs) it is [`seg_ce_ops`].
pub fn seg_ce(logits: Tensor<4>, labels: &[u8], hw: (usize, usize)) -> Tensor<1> {
    seg_ce_with(logits, labels, hw, None, 0.0)
}

/// mmseg's `OHEMPixelSampler` with a threshold: of the pixels not ignored, the loss keeps those
/// whose label probability is below `max(thresh, the probability of the min_kept * images-th
/// hardest)`, so at least `min_kept` per image (when there are that many) and every pixel the
/// model is unsure of. Applied to the decode head only, as mmseg's `sampler` is.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Ohem {
    pub thresh: f32,
    /// Pixels kept per image at least (mmseg's Cityscapes configs: 100000 of a 512x1024 crop).
    pub min_kept: usize,
}

/// The labels OHEM trains on: `labels` with every pixel it does not keep set to 255 (ignored).
/// `prob`: each pixel's label probability (`xent::resized_label_prob`); `images`: how many
/// images `labels` holds.
pub fn ohem_labels(prob: &[f32], labels: &[u8], k: usize, ohem: Ohem, images: usize) -> Vec<u8> {
    assert_eq!(prob.len(), labels.len(), "ohem_labels: one probability per pixel");
    let mut valid: Vec<f32> = prob.iter().zip(labels).filter(|&(_, &l)| (l as usize) < k).map(|(&p, _)| p).collect();
    if valid.is_empty() {
        return labels.to_vec();
    }
    let at = (ohem.min_kept * images).min(valid.len() - 1);
    let (_, &mut nth, _) = valid.select_nth_unstable_by(at, f32::total_cmp);
    let threshold = nth.max(ohem.thresh);
    prob.iter().zip(labels).map(|(&p, &l)| if (l as usize) < k && p < threshold { l } else { 255 }).collect()
}

/// [`seg_ce`], with [`Ohem`] pixel selection when `ohem` is set (the loss is still the mean over
/// all pixels not ignored in `labels`, the dropped ones counting 0, as mmseg's weighted mean) and
/// label smoothing `smoothing` (PyTorch's `CrossEntropyLoss(label_smoothing=...)`: the target is
/// `(1 - smoothing) * onehot + smoothing / k`; 0: none).
pub fn seg_ce_with(
    logits: Tensor<4>,
    labels: &[u8],
    hw: (usize, usize),
    ohem: Option<Ohem>,
    smoothing: f32,
) -> Tensor<1> {
    let device = logits.device();
    let [b, k, h, w] = logits.dims();
    let count = counted(labels, k);
    if !emo_model::ops::on_flex(&device) {
        let labels = match ohem {
            Some(o) => {
                let q = hw.0 * hw.1;
                let probs = to_vec(softmax(resize_logits(logits.clone().detach(), hw), 1));
                let prob: Vec<f32> = labels
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| if (l as usize) < k { probs[(i / q * k + l as usize) * q + i % q] } else { 1.0 })
                    .collect();
                ohem_labels(&prob, labels, k, o, b)
            }
            None => labels.to_vec(),
        };
        return seg_ce_ops_over(logits, &labels, hw, count, smoothing);
    }
    let values = to_vec(logits.clone());
    let kept;
    let labels = match ohem {
        Some(o) => {
            let prob = emo_kernels::xent::resized_label_prob(&values, (h, w), labels, hw, k);
            kept = ohem_labels(&prob, labels, k, o, b);
            &kept[..]
        }
        None => labels,
    };
    let scale = 1.0 / count.max(1) as f32;
    let mut grad = vec![0f32; values.len()];
    let sum = if (h, w) == hw {
        emo_kernels::xent::softmax_xent(&values, labels, k, h * w, scale, smoothing, &mut grad)
    } else {
        emo_kernels::xent::resized_softmax_xent(&values, (h, w), labels, hw, k, scale, smoothing, &mut grad)
    };
    let loss = Tensor::<1>::from_data(TensorData::new(vec![(sum.loss * scale as f64) as f32], [1]), &device);
    if !logits.is_tracked() {
        return loss;
    }
    let grad = Tensor::<4>::from_data(TensorData::new(grad, [b, k, h, w]), &device);
    let surrogate = (logits * grad).sum();
    surrogate.clone() - surrogate.detach() + loss
}

/// The pixels the pixel loss counts: labels below `k` (255 and any other value `>= k` ignored).
fn counted(labels: &[u8], k: usize) -> usize {
    labels.iter().filter(|&&l| (l as usize) < k).count()
}

/// [`seg_ce`] as burn ops (log-softmax, gather, mask), for every backend.
pub fn seg_ce_ops(logits: Tensor<4>, labels: &[u8], hw: (usize, usize)) -> Tensor<1> {
    seg_ce_ops_smoothed(logits, labels, hw, 0.0)
}

/// [`seg_ce_ops`] with label smoothing (see [`seg_ce_with`]).
pub fn seg_ce_ops_smoothed(logits: Tensor<4>, labels: &[u8], hw: (usize, usize), smoothing: f32) -> Tensor<1> {
    let k = logits.dims()[1];
    let count = counted(labels, k);
    seg_ce_ops_over(logits, labels, hw, count, smoothing)
}

/// [`seg_ce_ops_smoothed`] summed over the pixels `labels` does not ignore, divided by `count`.
fn seg_ce_ops_over(logits: Tensor<4>, labels: &[u8], hw: (usize, usize), count: usize, smoothing: f32) -> Tensor<1> {
    let device = logits.device();
    let [b, k, _, _] = logits.dims();
    let x = resize_logits(logits, hw);
    let idx: Vec<i64> = labels.iter().map(|&l| if (l as usize) < k { l as i64 } else { 0 }).collect();
    let valid: Vec<f32> = labels.iter().map(|&l| ((l as usize) < k) as u8 as f32).collect();
    let idx = Tensor::<4, Int>::from_data(TensorData::new(idx, [b, 1, hw.0, hw.1]), &device);
    let valid = Tensor::<4>::from_data(TensorData::new(valid, [b, 1, hw.0, hw.1]), &device);
    let logp = log_softmax(x, 1);
    let target = if smoothing == 0.0 {
        logp.gather(1, idx)
    } else {
        let eps = smoothing as f64;
        logp.clone().gather(1, idx).mul_scalar(1.0 - eps) + logp.mean_dim(1).mul_scalar(eps)
    };
    (target * valid).sum().neg().div_scalar(count.max(1) as f64)
}

/// Decode + auxiliary (weight `aux_weight`) segmentation loss.
pub fn seg_loss(logits: Tensor<4>, aux: Option<Tensor<4>>, labels: &[u8], hw: (usize, usize), aux_weight: f64) -> Loss {
    seg_loss_with(logits, aux, labels, hw, aux_weight, None, 0.0)
}

/// [`seg_loss`] with [`Ohem`] on the decode head's loss when `ohem` is set, and label smoothing
/// `smoothing` on both heads' losses (see [`seg_ce_with`]).
pub fn seg_loss_with(
    logits: Tensor<4>,
    aux: Option<Tensor<4>>,
    labels: &[u8],
    hw: (usize, usize),
    aux_weight: f64,
    ohem: Option<Ohem>,
    smoothing: f32,
) -> Loss {
    let main = seg_ce_with(logits, labels, hw, ohem, smoothing);
    let loss = Loss { parts: vec![("seg", scalar(main.clone()))], total: main };
    match aux {
        Some(a) => loss.plus("aux", seg_ce_with(a, labels, hw, None, smoothing).mul_scalar(aux_weight)),
        None => loss,
    }
}

/// EncNet's semantic-encoding loss: binary cross-entropy (mean over images and classes, mmseg's
/// `CrossEntropyLoss(use_sigmoid=True)`) of each image's class-presence logits `se`
/// (`[batch, k]`) against which classes its label map holds (`labels`: `batch` maps; labels
/// `>= k`, such as the ignore index 255, hold none).
pub fn se_loss(se: Tensor<2>, labels: &[u8]) -> Tensor<1> {
    let device = se.device();
    let [b, k] = se.dims();
    assert!(b > 0 && labels.len().is_multiple_of(b), "se_loss: {} labels for {b} images", labels.len());
    let mut present = vec![0f32; b * k];
    for (img, map) in labels.chunks_exact(labels.len() / b).enumerate() {
        for &l in map {
            if (l as usize) < k {
                present[img * k + l as usize] = 1.0;
            }
        }
    }
    let y = Tensor::<2>::from_data(TensorData::new(present, [b, k]), &device);
    // -y log sigmoid(x) - (1 - y) log(1 - sigmoid(x)) = softplus(x) - x y (burn's softplus:
    // log1p(exp(x)), x itself past 20, so its gradient is sigmoid(x) everywhere, 0 included).
    (softplus(se.clone(), 1.0) - se * y).mean()
}
