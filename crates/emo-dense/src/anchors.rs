//! Anchor grids in mmdet 2.x order: level by level, row-major over the feature map, the base
//! anchors of a location innermost. The heads flatten their outputs in the same order.

use emo_spec::DenseConfig;

use crate::boxes::BBox;

/// Place the `(w, h)` base anchors at every location of a `size` (H, W) grid, centred at
/// `(i + offset) * stride`, row-major with the base anchors innermost.
fn grid(out: &mut Vec<BBox>, size: (usize, usize), stride: (f64, f64), offset: f64, base: &[(f64, f64)]) {
    for y in 0..size.0 {
        for x in 0..size.1 {
            let (cy, cx) = ((y as f64 + offset) * stride.0, (x as f64 + offset) * stride.1);
            for &(w, h) in base {
                out.push([(cx - w / 2.0) as f32, (cy - h / 2.0) as f32, (cx + w / 2.0) as f32, (cy + h / 2.0) as f32]);
            }
        }
    }
}

/// SSD anchors (`SSDAnchorGenerator`): per location, the square `min` box, the square
/// `sqrt(min * max)` box, then `min` boxes of ratios 2, 1/2, 3, 1/3 (ratio = h / w); centred at
/// `(i + 0.5) * stride`.
pub fn ssd_anchors(cfg: &DenseConfig) -> Vec<BBox> {
    let mut out = Vec::new();
    for lv in cfg.ssd_anchor_levels() {
        let big = (lv.min_size * lv.max_size).sqrt();
        let mut base: Vec<(f64, f64)> = vec![(lv.min_size, lv.min_size), (big, big)];
        for r in [2.0f64, 0.5, 3.0, 1.0 / 3.0] {
            base.push((lv.min_size / r.sqrt(), lv.min_size * r.sqrt()));
        }
        grid(&mut out, lv.size, lv.stride, 0.5, &base);
    }
    out
}

/// RetinaNet anchors (`AnchorGenerator`, octave base scale 4, 3 scales per octave, ratios
/// 0.5/1/2, strides 8..128, centre offset 0): per location, ratio-major then scale.
pub fn retina_anchors(cfg: &DenseConfig) -> Vec<BBox> {
    let mut out = Vec::new();
    for (l, size) in cfg.level_sizes().into_iter().enumerate() {
        let stride = (8usize << l) as f64;
        let mut base = Vec::new();
        for r in [0.5f64, 1.0, 2.0] {
            for s in 0..3 {
                let scale = 4.0 * 2f64.powf(s as f64 / 3.0);
                let (hr, wr) = (r.sqrt(), 1.0 / r.sqrt());
                base.push((stride * wr * scale, stride * hr * scale));
            }
        }
        grid(&mut out, size, (stride, stride), 0.0, &base);
    }
    out
}

/// One anchor level: its grid (H, W), (y, x) stride and anchors per location.
struct Level {
    size: (usize, usize),
    stride: (f64, f64),
    per: usize,
}

/// The anchor levels of a detection config.
fn levels(cfg: &DenseConfig) -> Vec<Level> {
    match cfg.task {
        emo_spec::Task::SsdLite => {
            cfg.ssd_anchor_levels().iter().map(|lv| Level { size: lv.size, stride: lv.stride, per: 6 }).collect()
        }
        _ => {
            let sizes = cfg.level_sizes().into_iter().enumerate();
            sizes
                .map(|(l, size)| Level { size, stride: ((8usize << l) as f64, (8usize << l) as f64), per: 9 })
                .collect()
        }
    }
}

/// mmdet's `valid_flags` for an image padded to `pad` (H, W) (its own size padded to 32) in a
/// batch of `cfg.input`: per level, the anchors of the locations within `ceil(pad / stride)`
/// rows and columns are valid, those over the rest of the batch's padding are not (no loss).
/// One flag per anchor, in [`anchors`]' order.
pub fn valid_flags(cfg: &DenseConfig, pad: (usize, usize)) -> Vec<bool> {
    let mut out = Vec::new();
    for Level { size: (h, w), stride: (sy, sx), per } in levels(cfg) {
        let vh = ((pad.0 as f64 / sy).ceil() as usize).min(h);
        let vw = ((pad.1 as f64 / sx).ceil() as usize).min(w);
        for y in 0..h {
            for x in 0..w {
                out.extend(std::iter::repeat_n(y < vh && x < vw, per));
            }
        }
    }
    out
}

/// Anchors per level, in the order [`anchors`] lays them out (each level's positions times its
/// anchors per position): where mmdet's test keeps the `nms_pre` best of each level.
pub fn level_counts(cfg: &DenseConfig) -> Vec<usize> {
    levels(cfg).into_iter().map(|lv| lv.size.0 * lv.size.1 * lv.per).collect()
}

/// The anchors of a detection config.
pub fn anchors(cfg: &DenseConfig) -> Vec<BBox> {
    match cfg.task {
        emo_spec::Task::SsdLite => ssd_anchors(cfg),
        _ => retina_anchors(cfg),
    }
}
