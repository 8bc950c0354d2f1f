//! Evaluation: COCO box mAP computed exactly as pycocotools' `COCOeval` (bbox) does, and
//! mmseg's segmentation metrics (aAcc, mIoU, mAcc).

use std::collections::BTreeMap;

/// A ground-truth box (COCO annotation): `bbox` is `[x, y, w, h]`.
#[derive(Clone, Debug, PartialEq)]
pub struct GtBox {
    pub image_id: u64,
    pub category_id: u64,
    pub bbox: [f64; 4],
    pub area: f64,
    pub iscrowd: bool,
}

/// A detection (COCO result): `bbox` is `[x, y, w, h]`. Serialised, a list of them is a COCO
/// results file (`pycocotools.coco.COCO.loadRes` reads it).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DetBox {
    pub image_id: u64,
    pub category_id: u64,
    pub bbox: [f64; 4],
    pub score: f64,
}

/// The 6 box numbers pycocotools prints first: AP, AP50, AP75, APs, APm, APl (-1 where
/// undefined, e.g. no ground truth in an area range).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CocoStats {
    pub ap: f64,
    pub ap50: f64,
    pub ap75: f64,
    pub ap_s: f64,
    pub ap_m: f64,
    pub ap_l: f64,
}

impl CocoStats {
    pub fn as_array(&self) -> [f64; 6] {
        [self.ap, self.ap50, self.ap75, self.ap_s, self.ap_m, self.ap_l]
    }

    /// From pycocotools' `stats` (its first six numbers).
    pub fn from_array(s: [f64; 6]) -> Self {
        CocoStats { ap: s[0], ap50: s[1], ap75: s[2], ap_s: s[3], ap_m: s[4], ap_l: s[5] }
    }
}

/// A fraction as a percentage with one decimal (`0.8267` -> `82.7`), `-` where undefined
/// (negative, as COCOeval's -1, or NaN, as the IoU of a class with no pixels).
pub fn percent(v: f64) -> String {
    if v < 0.0 || v.is_nan() { "-".to_string() } else { format!("{:.1}", 100.0 * v) }
}

/// `mAP 62.6 AP50 82.7 AP75 75.7 APs 40.1 APm 66.0 APl -`: [`percent`] of each number (`-` where
/// undefined: no ground truth in that area range).
impl std::fmt::Display for CocoStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, v)) in ["mAP", "AP50", "AP75", "APs", "APm", "APl"].iter().zip(self.as_array()).enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{name} {}", percent(v))?;
        }
        Ok(())
    }
}

fn box_iou(d: &[f64; 4], g: &[f64; 4], crowd: bool) -> f64 {
    let w = ((d[0] + d[2]).min(g[0] + g[2]) - d[0].max(g[0])).max(0.0);
    let h = ((d[1] + d[3]).min(g[1] + g[3]) - d[1].max(g[1])).max(0.0);
    let inter = w * h;
    let union = if crowd { d[2] * d[3] } else { d[2] * d[3] + g[2] * g[3] - inter };
    if union > 0.0 { inter / union } else { 0.0 }
}

const AREAS: [(f64, f64); 4] = [(0.0, 1e10), (0.0, 1024.0), (1024.0, 9216.0), (9216.0, 1e10)];
const MAX_DETS: usize = 100;

/// Per (image, category, area range): the matching result at every IoU threshold.
struct EvalImg {
    scores: Vec<f64>,
    /// [threshold][det]: matched to a gt.
    matched: Vec<Vec<bool>>,
    /// [threshold][det]: ignored.
    ignored: Vec<Vec<bool>>,
    num_gt: usize,
}

fn evaluate_img(gts: &[&GtBox], dets: &[&DetBox], rng: (f64, f64), thrs: &[f64]) -> EvalImg {
    let gt_ig: Vec<bool> = gts.iter().map(|g| g.iscrowd || g.area < rng.0 || g.area > rng.1).collect();
    // Non-ignored gts first (stable), dets by score (stable), at most MAX_DETS.
    let mut gi: Vec<usize> = (0..gts.len()).collect();
    gi.sort_by_key(|&i| gt_ig[i]);
    let mut di: Vec<usize> = (0..dets.len()).collect();
    di.sort_by(|&a, &b| dets[b].score.total_cmp(&dets[a].score));
    di.truncate(MAX_DETS);
    let ious: Vec<Vec<f64>> = di
        .iter()
        .map(|&d| gi.iter().map(|&g| box_iou(&dets[d].bbox, &gts[g].bbox, gts[g].iscrowd)).collect())
        .collect();
    let mut matched = vec![vec![false; di.len()]; thrs.len()];
    let mut ignored = vec![vec![false; di.len()]; thrs.len()];
    for (t, &thr) in thrs.iter().enumerate() {
        let mut gt_taken = vec![false; gi.len()];
        for (dn, _) in di.iter().enumerate() {
            let mut best = thr.min(1.0 - 1e-10);
            let mut m: Option<usize> = None;
            for (gn, &g) in gi.iter().enumerate() {
                if gt_taken[gn] && !gts[g].iscrowd {
                    continue;
                }
                if let Some(mm) = m
                    && !gt_ig[gi[mm]]
                    && gt_ig[g]
                {
                    break;
                }
                if ious[dn][gn] < best {
                    continue;
                }
                best = ious[dn][gn];
                m = Some(gn);
            }
            if let Some(gn) = m {
                ignored[t][dn] = gt_ig[gi[gn]];
                matched[t][dn] = true;
                gt_taken[gn] = true;
            }
        }
        for (dn, &d) in di.iter().enumerate() {
            let a = dets[d].bbox[2] * dets[d].bbox[3];
            if !matched[t][dn] && (a < rng.0 || a > rng.1) {
                ignored[t][dn] = true;
            }
        }
    }
    EvalImg {
        scores: di.iter().map(|&d| dets[d].score).collect(),
        matched,
        ignored,
        num_gt: gt_ig.iter().filter(|&&i| !i).count(),
    }
}

/// `np.linspace(a, b, n)` to the bit (the thresholds are compared with `<`).
fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    let step = (b - a) / (n - 1) as f64;
    (0..n).map(|i| if i == n - 1 { b } else { a + i as f64 * step }).collect()
}

/// One category's AP (IoU 0.5:0.95) and AP50 over all areas, as mmdet's `classwise` table
/// (pycocotools' `precision[:, :, k, 0, -1]`); -1 for a category without ground truth.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassAp {
    pub category_id: u64,
    pub ap: f64,
    pub ap50: f64,
}

/// pycocotools `COCOeval(iouType='bbox')` on `image_ids` and `category_ids` (both as in the
/// ground-truth file): evaluate, accumulate, and the first six numbers of `summarize`.
pub fn coco_map(gts: &[GtBox], dets: &[DetBox], image_ids: &[u64], category_ids: &[u64]) -> CocoStats {
    coco_eval(gts, dets, image_ids, category_ids).0
}

/// [`coco_map`] and the per-category AP / AP50 (sorted by category id).
pub fn coco_eval(gts: &[GtBox], dets: &[DetBox], image_ids: &[u64], category_ids: &[u64]) -> (CocoStats, Vec<ClassAp>) {
    let thrs = linspace(0.5, 0.95, 10);
    let rec_thrs = linspace(0.0, 1.0, 101);
    let mut imgs: Vec<u64> = image_ids.to_vec();
    imgs.sort_unstable();
    imgs.dedup();
    let mut cats: Vec<u64> = category_ids.to_vec();
    cats.sort_unstable();
    cats.dedup();
    let mut g_by: BTreeMap<(u64, u64), Vec<&GtBox>> = BTreeMap::new();
    for g in gts {
        g_by.entry((g.image_id, g.category_id)).or_default().push(g);
    }
    let mut d_by: BTreeMap<(u64, u64), Vec<&DetBox>> = BTreeMap::new();
    for d in dets {
        d_by.entry((d.image_id, d.category_id)).or_default().push(d);
    }
    // precision[t][area][cat] averaged over the 101 recall points, or None (no gt).
    let mut prec: Vec<Vec<Vec<Option<f64>>>> = vec![vec![Vec::new(); AREAS.len()]; thrs.len()];
    for (ai, &rng) in AREAS.iter().enumerate() {
        for &c in &cats {
            let per_img: Vec<EvalImg> = imgs
                .iter()
                .filter_map(|&i| {
                    let g = g_by.get(&(i, c)).map(Vec::as_slice).unwrap_or(&[]);
                    let d = d_by.get(&(i, c)).map(Vec::as_slice).unwrap_or(&[]);
                    (!g.is_empty() || !d.is_empty()).then(|| evaluate_img(g, d, rng, &thrs))
                })
                .collect();
            let npig: usize = per_img.iter().map(|e| e.num_gt).sum();
            // All dets of this category, stable-sorted by score.
            let mut all: Vec<(f64, usize, usize)> = Vec::new();
            for (k, e) in per_img.iter().enumerate() {
                all.extend(e.scores.iter().enumerate().map(|(j, &s)| (s, k, j)));
            }
            all.sort_by(|a, b| b.0.total_cmp(&a.0));
            #[allow(clippy::needless_range_loop)] // t indexes thrs, prec and the matches alike
            for t in 0..thrs.len() {
                if npig == 0 {
                    prec[t][ai].push(None);
                    continue;
                }
                let (mut tp, mut fp) = (0f64, 0f64);
                let mut rc = Vec::new();
                let mut pr = Vec::new();
                for &(_, k, j) in &all {
                    if per_img[k].ignored[t][j] {
                        continue;
                    }
                    if per_img[k].matched[t][j] {
                        tp += 1.0
                    } else {
                        fp += 1.0
                    }
                    rc.push(tp / npig as f64);
                    pr.push(tp / (fp + tp + f64::EPSILON));
                }
                for i in (1..pr.len()).rev() {
                    if pr[i] > pr[i - 1] {
                        pr[i - 1] = pr[i];
                    }
                }
                let mut q = 0.0;
                for &thr in &rec_thrs {
                    let pos = rc.partition_point(|&x| x < thr);
                    if pos < pr.len() {
                        q += pr[pos];
                    }
                }
                prec[t][ai].push(Some(q / 101.0));
            }
        }
    }
    let mean = |ts: &[usize], a: usize| {
        let v: Vec<f64> = ts.iter().flat_map(|&t| prec[t][a].iter().flatten().copied()).collect();
        if v.is_empty() { -1.0 } else { v.iter().sum::<f64>() / v.len() as f64 }
    };
    let all_t: Vec<usize> = (0..thrs.len()).collect();
    let stats = CocoStats {
        ap: mean(&all_t, 0),
        ap50: mean(&[0], 0),
        ap75: mean(&[5], 0),
        ap_s: mean(&all_t, 1),
        ap_m: mean(&all_t, 2),
        ap_l: mean(&all_t, 3),
    };
    let per_class = cats
        .iter()
        .enumerate()
        .map(|(k, &c)| {
            let v: Vec<f64> = all_t.iter().filter_map(|&t| prec[t][0][k]).collect();
            let ap = if v.is_empty() { -1.0 } else { v.iter().sum::<f64>() / v.len() as f64 };
            ClassAp { category_id: c, ap, ap50: prec[0][0][k].unwrap_or(-1.0) }
        })
        .collect();
    (stats, per_class)
}

/// Segmentation metrics over a confusion matrix (mmseg `mean_iou`): pixels labelled
/// `ignore_index` are skipped.
#[derive(Clone, Debug)]
pub struct SegMetrics {
    pub num_classes: usize,
    /// `conf[gt * n + pred]` pixel counts.
    pub conf: Vec<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SegStats {
    /// Overall pixel accuracy (%).
    pub a_acc: f64,
    /// Mean IoU over classes present in the ground truth or predictions (%).
    pub miou: f64,
    /// Mean per-class accuracy over classes present in the ground truth (%).
    pub m_acc: f64,
}

impl SegMetrics {
    pub fn new(num_classes: usize) -> Self {
        SegMetrics { num_classes, conf: vec![0; num_classes * num_classes] }
    }

    /// Add another evaluation's counts (of the same classes).
    pub fn merge(&mut self, other: &SegMetrics) {
        assert_eq!(self.num_classes, other.num_classes, "SegMetrics::merge: class counts differ");
        self.conf.iter_mut().zip(&other.conf).for_each(|(a, b)| *a += b);
    }

    /// Add one image: `pred` and `gt` are label maps of the same size.
    pub fn add(&mut self, pred: &[u8], gt: &[u8], ignore_index: u8) {
        assert_eq!(pred.len(), gt.len(), "SegMetrics::add: prediction and label map sizes differ");
        let n = self.num_classes;
        for (&p, &g) in pred.iter().zip(gt) {
            if g == ignore_index || (g as usize) >= n {
                continue;
            }
            self.conf[g as usize * n + (p as usize).min(n - 1)] += 1;
        }
    }

    /// Per-class IoU (NaN for a class absent from both gt and predictions).
    pub fn class_iou(&self) -> Vec<f64> {
        let n = self.num_classes;
        (0..n)
            .map(|c| {
                let tp = self.conf[c * n + c] as f64;
                let gt: u64 = (0..n).map(|p| self.conf[c * n + p]).sum();
                let pr: u64 = (0..n).map(|g| self.conf[g * n + c]).sum();
                let union = gt as f64 + pr as f64 - tp;
                if union > 0.0 { tp / union } else { f64::NAN }
            })
            .collect()
    }

    /// Per-class pixel accuracy (NaN for a class absent from the ground truth).
    pub fn class_acc(&self) -> Vec<f64> {
        let n = self.num_classes;
        (0..n)
            .map(|c| {
                let gt: u64 = (0..n).map(|p| self.conf[c * n + p]).sum();
                if gt > 0 { self.conf[c * n + c] as f64 / gt as f64 } else { f64::NAN }
            })
            .collect()
    }

    pub fn stats(&self) -> SegStats {
        let n = self.num_classes;
        let total: u64 = self.conf.iter().sum();
        let correct: u64 = (0..n).map(|c| self.conf[c * n + c]).sum();
        let nanmean = |v: Vec<f64>| {
            let v: Vec<f64> = v.into_iter().filter(|x| !x.is_nan()).collect();
            if v.is_empty() { f64::NAN } else { 100.0 * v.iter().sum::<f64>() / v.len() as f64 }
        };
        SegStats {
            a_acc: if total > 0 { 100.0 * correct as f64 / total as f64 } else { f64::NAN },
            miou: nanmean(self.class_iou()),
            m_acc: nanmean(self.class_acc()),
        }
    }
}
