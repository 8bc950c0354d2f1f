//! mmdet's `MaxIoUAssigner`: anchors with IoU >= `pos` to their best box are positives, those
//! below `neg` negatives, the rest ignored; then every box claims its best anchor (if that IoU is
//! at least `min_pos`), so no box is left without a positive: with `max_assign_all` every anchor
//! tied at that best IoU (mmdet's default `gt_max_assign_all=True`, RetinaNet's), else the first
//! (SSD's configs set `gt_max_assign_all=False`).

use crate::boxes::{BBox, BoxCoder, iou};

/// What an anchor was assigned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Assigned {
    Ignore,
    Negative,
    /// Index of the ground-truth box.
    Positive(usize),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaxIou {
    pub pos: f32,
    pub neg: f32,
    pub min_pos: f32,
    /// mmdet's `gt_max_assign_all`: a box claims every anchor at its best IoU, not just the first.
    pub max_assign_all: bool,
}

impl MaxIou {
    /// SSD: 0.5 / 0.5 / 0, a box claims its first best anchor (`gt_max_assign_all=False`).
    pub const SSD: MaxIou = MaxIou { pos: 0.5, neg: 0.5, min_pos: 0.0, max_assign_all: false };
    /// RetinaNet: 0.5 / 0.4 / 0, a box claims all its best anchors (mmdet's default).
    pub const RETINA: MaxIou = MaxIou { pos: 0.5, neg: 0.4, min_pos: 0.0, max_assign_all: true };

    /// The assigner of a detection task (SSD for SSDLite, RetinaNet's otherwise).
    pub fn for_task(task: emo_spec::Task) -> MaxIou {
        if task == emo_spec::Task::SsdLite { MaxIou::SSD } else { MaxIou::RETINA }
    }

    pub fn assign(&self, anchors: &[BBox], gts: &[BBox]) -> Vec<Assigned> {
        if gts.is_empty() {
            return vec![Assigned::Negative; anchors.len()];
        }
        let mut best_gt = vec![(0usize, -1.0f32); anchors.len()];
        let mut best_anchor = vec![(0usize, -1.0f32); gts.len()];
        for (a, an) in anchors.iter().enumerate() {
            for (g, gt) in gts.iter().enumerate() {
                let o = iou(an, gt);
                if o > best_gt[a].1 {
                    best_gt[a] = (g, o);
                }
                if o > best_anchor[g].1 {
                    best_anchor[g] = (a, o);
                }
            }
        }
        let mut out: Vec<Assigned> = best_gt
            .iter()
            .map(|&(g, o)| {
                if o >= self.pos {
                    Assigned::Positive(g)
                } else if o >= 0.0 && o < self.neg {
                    Assigned::Negative
                } else {
                    Assigned::Ignore
                }
            })
            .collect();
        // Box by box, so a later box takes an anchor two boxes tie on, as mmdet's loop does.
        for (g, &(a, o)) in best_anchor.iter().enumerate() {
            if o < self.min_pos {
                continue;
            }
            if self.max_assign_all {
                // The IoUs recomputed (the same f32s) rather than kept: anchors x boxes of them
                // would be 40 MB for a crowded COCO image at 1333x800.
                for (slot, an) in out.iter_mut().zip(anchors) {
                    if iou(an, &gts[g]) == o {
                        *slot = Assigned::Positive(g);
                    }
                }
            } else {
                out[a] = Assigned::Positive(g);
            }
        }
        out
    }

    /// [`MaxIou::assign`] over the anchors `valid` marks only (mmdet assigns the anchors inside
    /// the image's padded shape, `valid_flags`, and gives the rest no loss): the others come
    /// back [`Assigned::Ignore`].
    pub fn assign_valid(&self, anchors: &[BBox], valid: &[bool], gts: &[BBox]) -> Vec<Assigned> {
        assert_eq!(anchors.len(), valid.len(), "one flag per anchor");
        if valid.iter().all(|&v| v) {
            return self.assign(anchors, gts);
        }
        let inside: Vec<BBox> = anchors.iter().zip(valid).filter(|p| *p.1).map(|p| *p.0).collect();
        let mut it = self.assign(&inside, gts).into_iter();
        valid.iter().map(|&v| if v { it.next().expect("one per valid anchor") } else { Assigned::Ignore }).collect()
    }
}

/// Training targets of one image: per anchor a class (`num_classes` = background, `-1` =
/// ignore) and, for positives, the encoded box.
#[derive(Clone, Debug, PartialEq)]
pub struct Targets {
    pub labels: Vec<i64>,
    pub deltas: Vec<[f32; 4]>,
    pub num_pos: usize,
}

pub fn targets(
    assigner: &MaxIou,
    coder: &BoxCoder,
    anchors: &[BBox],
    gts: &[BBox],
    gt_labels: &[usize],
    num_classes: usize,
) -> Targets {
    targets_valid(assigner, coder, anchors, None, gts, gt_labels, num_classes)
}

/// [`targets`] with the anchors outside `valid` (where given) ignored: an image padded into a
/// larger batch ([`crate::anchors::valid_flags`]).
pub fn targets_valid(
    assigner: &MaxIou,
    coder: &BoxCoder,
    anchors: &[BBox],
    valid: Option<&[bool]>,
    gts: &[BBox],
    gt_labels: &[usize],
    num_classes: usize,
) -> Targets {
    let a = match valid {
        Some(v) => assigner.assign_valid(anchors, v, gts),
        None => assigner.assign(anchors, gts),
    };
    let mut labels = vec![num_classes as i64; anchors.len()];
    let mut deltas = vec![[0.0; 4]; anchors.len()];
    let mut num_pos = 0;
    for (i, s) in a.iter().enumerate() {
        match *s {
            Assigned::Ignore => labels[i] = -1,
            Assigned::Negative => {}
            Assigned::Positive(g) => {
                labels[i] = gt_labels[g] as i64;
                deltas[i] = coder.encode(&anchors[i], &gts[g]);
                num_pos += 1;
            }
        }
    }
    Targets { labels, deltas, num_pos }
}
