//! Boxes as `[x1, y1, x2, y2]` in input pixels (mmdet 2.x conventions: width = x2 - x1, no +1):
//! IoU, the delta box coder, and (class-aware) NMS.

/// A box `[x1, y1, x2, y2]`.
pub type BBox = [f32; 4];

pub fn area(b: &BBox) -> f32 {
    (b[2] - b[0]).max(0.0) * (b[3] - b[1]).max(0.0)
}

pub fn iou(a: &BBox, b: &BBox) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let union = area(a) + area(b) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// mmdet's `DeltaXYWHBBoxCoder` (means 0): deltas `(dx, dy, dw, dh) / stds`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BoxCoder {
    pub stds: [f32; 4],
}

/// `|log(16 / 1000)|`: the clamp on decoded log-sizes.
const MAX_RATIO: f32 = 4.135_166_6;

impl BoxCoder {
    /// SSD: stds (0.1, 0.1, 0.2, 0.2).
    pub const SSD: BoxCoder = BoxCoder { stds: [0.1, 0.1, 0.2, 0.2] };
    /// RetinaNet: stds (1, 1, 1, 1).
    pub const RETINA: BoxCoder = BoxCoder { stds: [1.0, 1.0, 1.0, 1.0] };

    /// The coder of a detection task (SSD for SSDLite, RetinaNet's otherwise).
    pub fn for_task(task: emo_spec::Task) -> BoxCoder {
        if task == emo_spec::Task::SsdLite { BoxCoder::SSD } else { BoxCoder::RETINA }
    }

    pub fn encode(&self, anchor: &BBox, gt: &BBox) -> [f32; 4] {
        let (pw, ph) = (anchor[2] - anchor[0], anchor[3] - anchor[1]);
        let (px, py) = (anchor[0] + 0.5 * pw, anchor[1] + 0.5 * ph);
        let (gw, gh) = (gt[2] - gt[0], gt[3] - gt[1]);
        let (gx, gy) = (gt[0] + 0.5 * gw, gt[1] + 0.5 * gh);
        let d = [(gx - px) / pw, (gy - py) / ph, (gw / pw).ln(), (gh / ph).ln()];
        std::array::from_fn(|i| d[i] / self.stds[i])
    }

    /// Decode deltas on an anchor and clip to an image of `(h, w)`.
    pub fn decode(&self, anchor: &BBox, d: &[f32; 4], hw: (usize, usize)) -> BBox {
        let d: [f32; 4] = std::array::from_fn(|i| d[i] * self.stds[i]);
        let (pw, ph) = (anchor[2] - anchor[0], anchor[3] - anchor[1]);
        let (px, py) = (anchor[0] + 0.5 * pw, anchor[1] + 0.5 * ph);
        let (dw, dh) = (d[2].clamp(-MAX_RATIO, MAX_RATIO), d[3].clamp(-MAX_RATIO, MAX_RATIO));
        let (gw, gh) = (pw * dw.exp(), ph * dh.exp());
        let (gx, gy) = (px + pw * d[0], py + ph * d[1]);
        let (w, h) = (hw.1 as f32, hw.0 as f32);
        [
            (gx - 0.5 * gw).clamp(0.0, w),
            (gy - 0.5 * gh).clamp(0.0, h),
            (gx + 0.5 * gw).clamp(0.0, w),
            (gy + 0.5 * gh).clamp(0.0, h),
        ]
    }
}

/// One detection.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Detection {
    pub bbox: BBox,
    pub score: f32,
    /// 0-based class index.
    pub label: usize,
}

/// Class-aware greedy NMS (mmcv `batched_nms`): boxes of different classes never suppress each
/// other. Returns the kept detections sorted by score (descending), at most `max`.
pub fn batched_nms(mut dets: Vec<Detection>, iou_thr: f32, max: usize) -> Vec<Detection> {
    dets.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut keep: Vec<Detection> = Vec::new();
    for d in dets {
        if keep.len() == max {
            break;
        }
        if keep.iter().all(|k| k.label != d.label || iou(&k.bbox, &d.bbox) <= iou_thr) {
            keep.push(d);
        }
    }
    keep
}
