//! COCO mAP against pycocotools (a committed case, and fresh random cases when Python has
//! pycocotools), segmentation metrics, and the box / anchor / assigner helpers.

use std::path::{Path, PathBuf};
use std::process::Command;

use emo_dense::assign::{Assigned, MaxIou, targets, targets_valid};
use emo_dense::boxes::{BoxCoder, Detection, batched_nms, iou};
use emo_dense::metrics::{ClassAp, DetBox, GtBox, SegMetrics, coco_eval, coco_map};
use emo_dense::{DenseConfig, Task, anchors};
use emo_spec::Variant;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn bbox(v: &Value) -> [f64; 4] {
    std::array::from_fn(|i| v["bbox"][i].as_f64().unwrap())
}

/// Our stats for a case folder (gt.json + dets.json).
fn ours(dir: &Path) -> [f64; 6] {
    ours_classwise(dir).0.as_array()
}

fn ours_classwise(dir: &Path) -> (emo_dense::metrics::CocoStats, Vec<ClassAp>) {
    let gt = read(&dir.join("gt.json"));
    let dets = read(&dir.join("dets.json"));
    let g: Vec<GtBox> = gt["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| GtBox {
            image_id: a["image_id"].as_u64().unwrap(),
            category_id: a["category_id"].as_u64().unwrap(),
            bbox: bbox(a),
            area: a["area"].as_f64().unwrap(),
            iscrowd: a["iscrowd"].as_u64().unwrap() != 0,
        })
        .collect();
    let d: Vec<DetBox> = dets
        .as_array()
        .unwrap()
        .iter()
        .map(|a| DetBox {
            image_id: a["image_id"].as_u64().unwrap(),
            category_id: a["category_id"].as_u64().unwrap(),
            bbox: bbox(a),
            score: a["score"].as_f64().unwrap(),
        })
        .collect();
    let ids: Vec<u64> = gt["images"].as_array().unwrap().iter().map(|i| i["id"].as_u64().unwrap()).collect();
    let cats: Vec<u64> = gt["categories"].as_array().unwrap().iter().map(|c| c["id"].as_u64().unwrap()).collect();
    coco_eval(&g, &d, &ids, &cats)
}

/// The per-class numbers average to the overall AP and AP50 (over classes with ground truth).
fn assert_classwise_consistent(stats: &emo_dense::metrics::CocoStats, per_class: &[ClassAp]) {
    let with_gt: Vec<&ClassAp> = per_class.iter().filter(|c| c.ap >= 0.0).collect();
    assert!(!with_gt.is_empty());
    let n = with_gt.len() as f64;
    let (ap, ap50) = (with_gt.iter().map(|c| c.ap).sum::<f64>() / n, with_gt.iter().map(|c| c.ap50).sum::<f64>() / n);
    assert!((ap - stats.ap).abs() < 1e-9 && (ap50 - stats.ap50).abs() < 1e-9, "{per_class:?} vs {stats:?}");
}

fn assert_close(a: [f64; 6], b: &[f64], what: &str) {
    for i in 0..6 {
        assert!(
            (a[i] - b[i]).abs() < 1e-9,
            "{what}: stat {i}: ours {} pycocotools {}\nours {a:?}\nref  {b:?}",
            a[i],
            b[i]
        );
    }
}

#[test]
fn coco_map_matches_pycocotools_on_the_committed_case() {
    let dir = root().join("fixtures/coco");
    let expected: Vec<f64> = serde_json::from_value(read(&dir.join("expected.json"))).unwrap();
    assert_close(ours(&dir), &expected, "fixtures/coco");
    let (stats, per_class) = ours_classwise(&dir);
    assert_classwise_consistent(&stats, &per_class);
}

fn python_has_pycocotools() -> bool {
    Command::new("python3").args(["-c", "import pycocotools, numpy"]).status().is_ok_and(|s| s.success())
}

#[test]
fn coco_map_matches_pycocotools_on_fresh_cases() {
    if !python_has_pycocotools() {
        assert!(
            std::env::var("EMO_REQUIRE_PYCOCOTOOLS").is_err(),
            "EMO_REQUIRE_PYCOCOTOOLS is set but pycocotools is missing"
        );
        eprintln!("pycocotools not installed: only the committed case is checked");
        return;
    }
    let script = root().join("scripts/coco_reference.py");
    for seed in 100..106 {
        let dir = std::env::temp_dir().join(format!("emo-coco-{}-{seed}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok =
            Command::new("python3").arg(&script).args(["--make-case", &seed.to_string()]).arg(&dir).status().unwrap();
        assert!(ok.success());
        let out =
            Command::new("python3").arg(&script).arg(dir.join("gt.json")).arg(dir.join("dets.json")).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let expected: Vec<f64> = serde_json::from_slice(&out.stdout).unwrap();
        assert_close(ours(&dir), &expected, &format!("seed {seed}"));
        // Per-class AP / AP50 against pycocotools' precision array (mmdet's classwise table).
        let out = Command::new("python3")
            .arg(&script)
            .arg("--classwise")
            .arg(dir.join("gt.json"))
            .arg(dir.join("dets.json"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let expected: std::collections::BTreeMap<String, [f64; 2]> = serde_json::from_slice(&out.stdout).unwrap();
        let (stats, per_class) = ours_classwise(&dir);
        assert_eq!(per_class.len(), expected.len());
        for c in &per_class {
            let e = expected[&c.category_id.to_string()];
            assert!(
                (c.ap - e[0]).abs() < 1e-9 && (c.ap50 - e[1]).abs() < 1e-9,
                "seed {seed}, category {}: ours {c:?}, pycocotools {e:?}",
                c.category_id
            );
        }
        assert_classwise_consistent(&stats, &per_class);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn perfect_and_empty_detections() {
    let g = vec![
        GtBox { image_id: 1, category_id: 1, bbox: [10.0, 10.0, 50.0, 40.0], area: 2000.0, iscrowd: false },
        GtBox { image_id: 2, category_id: 2, bbox: [0.0, 0.0, 200.0, 100.0], area: 20000.0, iscrowd: false },
    ];
    let d: Vec<DetBox> = g
        .iter()
        .map(|g| DetBox { image_id: g.image_id, category_id: g.category_id, bbox: g.bbox, score: 0.9 })
        .collect();
    let s = coco_map(&g, &d, &[1, 2], &[1, 2]);
    // (pycocotools divides by tp + fp + eps, so "1" is 1 - 2e-16)
    assert!((s.ap - 1.0).abs() < 1e-12 && (s.ap50 - 1.0).abs() < 1e-12 && s.ap_s == -1.0, "{s:?}");
    let s = coco_map(&g, &[], &[1, 2], &[1, 2]);
    assert_eq!((s.ap, s.ap50), (0.0, 0.0));
    // Per class: category 3 has no ground truth (-1); the others are perfect.
    let (_, per_class) = coco_eval(&g, &d, &[1, 2], &[1, 2, 3]);
    assert_eq!(per_class.iter().map(|c| c.category_id).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(per_class[..2].iter().all(|c| (c.ap - 1.0).abs() < 1e-12 && (c.ap50 - 1.0).abs() < 1e-12));
    assert_eq!((per_class[2].ap, per_class[2].ap50), (-1.0, -1.0));
}

#[test]
fn seg_metrics_by_hand() {
    let mut m = SegMetrics::new(3);
    // gt: 0 0 1 1 2 255 ; pred: 0 1 1 1 0 2
    m.add(&[0, 1, 1, 1, 0, 2], &[0, 0, 1, 1, 2, 255], 255);
    let iou = m.class_iou();
    assert_eq!(iou, vec![1.0 / 3.0, 2.0 / 3.0, 0.0]);
    assert_eq!(m.class_acc(), vec![0.5, 1.0, 0.0]);
    let s = m.stats();
    assert!((s.a_acc - 60.0).abs() < 1e-9);
    assert!((s.miou - 100.0 / 3.0).abs() < 1e-9);
    assert!((s.m_acc - 50.0).abs() < 1e-9);
    // A class absent from both gt and prediction is left out of the mean (NaN).
    let mut m = SegMetrics::new(4);
    m.add(&[0, 1], &[0, 1], 255);
    assert!(m.class_iou()[3].is_nan());
    assert_eq!(m.stats().miou, 100.0);
}

#[test]
fn box_coder_round_trips_and_nms_is_class_aware() {
    let a = [10.0, 20.0, 60.0, 80.0];
    let g = [15.0, 18.0, 70.0, 90.0];
    for c in [BoxCoder::SSD, BoxCoder::RETINA] {
        let d = c.encode(&a, &g);
        let back = c.decode(&a, &d, (1000, 1000));
        for i in 0..4 {
            assert!((back[i] - g[i]).abs() < 1e-4, "{back:?}");
        }
    }
    assert_eq!(BoxCoder::SSD.decode(&a, &[0.0, 0.0, 0.0, 0.0], (50, 50)), [10.0, 20.0, 50.0, 50.0]);
    assert!((iou(&a, &a) - 1.0).abs() < 1e-6 && iou(&a, &[100.0, 100.0, 120.0, 120.0]) == 0.0);
    let det = |x: f32, score, label| Detection { bbox: [x, 0.0, x + 10.0, 10.0], score, label };
    let kept = batched_nms(vec![det(0.0, 0.9, 0), det(1.0, 0.8, 0), det(1.0, 0.7, 1), det(50.0, 0.6, 0)], 0.45, 10);
    assert_eq!(kept.iter().map(|d| d.score).collect::<Vec<_>>(), [0.9, 0.7, 0.6]);
    assert_eq!(batched_nms(vec![det(0.0, 0.9, 0), det(50.0, 0.6, 0)], 0.45, 1).len(), 1);
}

#[test]
fn anchors_follow_the_official_generators() {
    let ssd = DenseConfig::paper(Task::SsdLite, Variant::Emo1M);
    let a = anchors::anchors(&ssd);
    assert_eq!(a.len(), 6 * (400 + 100 + 25 + 9 + 4 + 1));
    // First location of level 0: centre (8, 8); min 48, sqrt(48 * 100), then ratio 2 (h / w).
    assert_eq!(a[0], [-16.0, -16.0, 32.0, 32.0]);
    let big = (48.0f64 * 100.0).sqrt() as f32 / 2.0;
    assert!((a[1][0] - (8.0 - big)).abs() < 1e-4);
    let (w, h) = (a[2][2] - a[2][0], a[2][3] - a[2][1]);
    assert!((h / w - 2.0).abs() < 1e-4 && (w * h - 48.0 * 48.0).abs() < 1e-1);
    let retina = DenseConfig::paper(Task::RetinaNet, Variant::Emo1M);
    let r = anchors::anchors(&retina);
    let locs: usize = retina.level_sizes().iter().map(|(h, w)| h * w).sum();
    assert_eq!(r.len(), 9 * locs);
    // Level 0 (stride 8), location (0, 0): ratio 0.5 first, octave scales 4, 4*2^(1/3), ...
    let (w0, h0) = (r[0][2] - r[0][0], r[0][3] - r[0][1]);
    assert!((w0 - 32.0 * 2f32.sqrt()).abs() < 1e-3 && (h0 - 32.0 / 2f32.sqrt()).abs() < 1e-3, "{:?}", r[0]);
    assert_eq!(r[4], [-16.0, -16.0, 16.0, 16.0].map(|v: f32| v * 2f32.powf(1.0 / 3.0)));
}

#[test]
fn every_box_gets_a_positive_anchor() {
    let cfg = DenseConfig::new(Task::SsdLite, Variant::Emo1M, 3, (128, 128));
    let a = anchors::anchors(&cfg);
    // A tiny box no anchor overlaps by 0.5 still claims its best anchor.
    let gts = [[60.0, 60.0, 66.0, 66.0], [0.0, 0.0, 120.0, 120.0]];
    let s = MaxIou::SSD.assign(&a, &gts);
    for g in 0..2 {
        assert!(s.contains(&Assigned::Positive(g)), "box {g} has no positive");
    }
    let t = targets(&MaxIou::SSD, &BoxCoder::SSD, &a, &gts, &[2, 0], 3);
    assert_eq!(t.num_pos, s.iter().filter(|x| matches!(x, Assigned::Positive(_))).count());
    assert!(t.labels.iter().all(|&l| l == 3 || l == 2 || l == 0));
    let none = targets(&MaxIou::SSD, &BoxCoder::SSD, &a, &[], &[], 3);
    assert!(none.labels.iter().all(|&l| l == 3) && none.num_pos == 0);
}

/// mmdet's `gt_max_assign_all`: RetinaNet's assigner (the default, True) gives a box every
/// anchor tied at its best IoU, SSD's (False) only the first; a later box takes a tied anchor.
#[test]
fn a_box_claims_all_its_tied_best_anchors_in_retinanet_only() {
    // The box overlaps anchors 0 and 1 equally (IoU 25 / 175, below both thresholds); anchor
    // 2 is far away.
    let gt = [[10.0, 10.0, 20.0, 20.0]];
    let a = [[5.0, 5.0, 15.0, 15.0], [15.0, 15.0, 25.0, 25.0], [60.0, 60.0, 70.0, 70.0]];
    use Assigned::{Negative, Positive};
    assert_eq!(MaxIou::RETINA.assign(&a, &gt), vec![Positive(0), Positive(0), Negative]);
    assert_eq!(MaxIou::SSD.assign(&a, &gt), vec![Positive(0), Negative, Negative]);
    // Two boxes tied on anchor 1 (each also has anchor 0 or 2 at the same IoU): box 1, later,
    // takes it in both.
    let gts = [[10.0, 10.0, 20.0, 20.0], [20.0, 20.0, 30.0, 30.0]];
    let b = [[5.0, 5.0, 15.0, 15.0], [15.0, 15.0, 25.0, 25.0], [25.0, 25.0, 35.0, 35.0]];
    assert_eq!(MaxIou::RETINA.assign(&b, &gts), vec![Positive(0), Positive(1), Positive(1)]);
    assert_eq!(MaxIou::SSD.assign(&b, &gts), vec![Positive(0), Positive(1), Negative]);
}

/// Anchors outside an image's padded size are ignored, never assigned, and a box claims its
/// best anchor among the valid ones.
#[test]
fn invalid_anchors_are_ignored_and_never_claimed() {
    let gt = [[10.0, 10.0, 20.0, 20.0]];
    let a = [[10.0, 10.0, 20.0, 20.0], [8.0, 8.0, 22.0, 22.0], [60.0, 60.0, 70.0, 70.0]];
    let s = MaxIou::RETINA.assign_valid(&a, &[false, true, true], &gt);
    assert_eq!(s, vec![Assigned::Ignore, Assigned::Positive(0), Assigned::Negative]);
    let t = targets_valid(&MaxIou::RETINA, &BoxCoder::RETINA, &a, Some(&[false, true, true]), &gt, &[1], 2);
    assert_eq!((t.labels, t.num_pos), (vec![-1, 1, 2], 1));
    let all = targets_valid(&MaxIou::RETINA, &BoxCoder::RETINA, &a, Some(&[true; 3]), &gt, &[1], 2);
    assert_eq!(all, targets(&MaxIou::RETINA, &BoxCoder::RETINA, &a, &gt, &[1], 2));
}

/// mmdet's `valid_flags` for RetinaNet (centre offset 0): an anchor is valid when its centre lies
/// within the image's padded size, whatever the batch's; all are for an unpadded image.
#[test]
fn valid_flags_keep_the_anchors_centred_inside_the_padded_image() {
    let batch = DenseConfig::new(Task::RetinaNet, Variant::Emo1M, 3, (128, 224));
    let a = anchors::anchors(&batch);
    assert!(anchors::valid_flags(&batch, (128, 224)).iter().all(|&v| v));
    for pad in [(64, 96), (128, 160), (96, 224)] {
        let flags = anchors::valid_flags(&batch, pad);
        assert_eq!(flags.len(), a.len());
        for (b, &v) in a.iter().zip(&flags) {
            // Centres are whole multiples of the stride; the f32 corners may round them by a hair.
            let (cx, cy) = (((b[0] + b[2]) / 2.0).round(), ((b[1] + b[3]) / 2.0).round());
            assert_eq!(v, cx < pad.1 as f32 && cy < pad.0 as f32, "{b:?} in {pad:?}");
        }
        assert!(flags.iter().any(|&v| !v) && flags.iter().any(|&v| v));
    }
}

/// Keep-ratio detection batches: padded to 32, to the largest image, each image assigned within
/// its own padded size only (the targets of an image alone at its own padded size, laid over
/// the batch's anchors; the rest ignored).
#[test]
fn keep_ratio_batches_assign_each_image_inside_its_own_padding() {
    use emo_dense::predict::AnchorsBySize;
    use emo_dense::train::keep_ratio_targets;
    let model = DenseConfig::new(Task::RetinaNet, Variant::Emo1M, 3, (800, 1280));
    let sizes = [(70, 100), (120, 90)];
    let gts = vec![
        (vec![[10.0, 12.0, 60.0, 50.0], [70.0, 40.0, 99.0, 69.0]], vec![0, 2]),
        (vec![[5.0, 30.0, 85.0, 110.0]], vec![1]),
    ];
    let mut cache = AnchorsBySize::default();
    let (bhw, t) = keep_ratio_targets(&model, &mut cache, &sizes, &gts);
    assert_eq!(bhw, (128, 128), "(96, 128) and (128, 96) padded to 32, then to the largest");
    let batch = DenseConfig { input: bhw, ..model.clone() };
    let all = anchors::anchors(&batch);
    for ((size, (boxes, labels)), ti) in sizes.iter().zip(&gts).zip(&t) {
        let pad = (size.0.div_ceil(32) * 32, size.1.div_ceil(32) * 32);
        let alone = DenseConfig { input: pad, ..model.clone() };
        let own = targets(&MaxIou::RETINA, &BoxCoder::RETINA, &anchors::anchors(&alone), boxes, labels, 3);
        let flags = anchors::valid_flags(&batch, pad);
        assert_eq!(ti.labels.len(), all.len());
        let inside: Vec<i64> = ti.labels.iter().zip(&flags).filter(|p| *p.1).map(|p| *p.0).collect();
        // The valid anchors of the batch, in order, are the image's own at its padded size.
        assert_eq!(inside, own.labels);
        assert!(ti.labels.iter().zip(&flags).all(|(&l, &v)| v || l == -1));
        assert_eq!(ti.num_pos, own.num_pos);
        assert!(own.num_pos >= boxes.len());
    }
}

/// mmdet's RetinaNet training transform: keep-ratio resize with OpenCV's bilinear, boxes scaled
/// and clipped, horizontal flip half the time (`x -> W - x`).
#[test]
fn det_keep_ratio_resizes_scales_and_flips_image_and_boxes_together() {
    use emo_dense::data::{det_keep_ratio, resize_bilinear_cv2};
    let (h, w) = (30, 50);
    let rgb: Vec<u8> = (0..h * w * 3).map(|i| ((i * 37) % 251) as u8).collect();
    let resized = resize_bilinear_cv2(&rgb, (h, w), (60, 100));
    let mut flipped = resized.clone();
    for row in flipped.chunks_exact_mut(100 * 3) {
        let px: Vec<[u8; 3]> = row.chunks_exact(3).rev().map(|p| [p[0], p[1], p[2]]).collect();
        row.copy_from_slice(&px.concat());
    }
    let mut rng = emo_train::rng::Rng::new(5);
    let mut seen = [false; 2];
    for _ in 0..20 {
        let mut boxes = vec![[5.0, 5.0, 15.0, 10.0], [40.0, 0.0, 50.0, 30.0]];
        // (100, 60): the long side at most 100, the short at most 60: x2.
        let (out, size) = det_keep_ratio(&mut rng, &rgb, (h, w), &mut boxes, (100, 60));
        assert_eq!(size, (60, 100));
        if out == resized {
            assert_eq!(boxes, vec![[10.0, 10.0, 30.0, 20.0], [80.0, 0.0, 100.0, 60.0]]);
            seen[0] = true;
        } else {
            assert_eq!(out, flipped);
            assert_eq!(boxes, vec![[70.0, 10.0, 90.0, 20.0], [0.0, 0.0, 20.0, 60.0]]);
            seen[1] = true;
        }
    }
    assert_eq!(seen, [true, true], "both flipped and unflipped in 20 draws");
}

#[test]
fn geometric_augmentation_keeps_boxes_and_labels_consistent() {
    use emo_dense::data::{seg_geometry, ssd_geometry};
    let hw = (64, 64);
    let mut rng = emo_train::rng::Rng::new(3);
    let mut changed = 0;
    for _ in 0..200 {
        // A white square (label 1) on black.
        let mut rgb = vec![0u8; 64 * 64 * 3];
        let mut lab = vec![0u8; 64 * 64];
        for y in 20..40 {
            for x in 10..30 {
                rgb[(y * 64 + x) * 3..(y * 64 + x) * 3 + 3].copy_from_slice(&[255, 255, 255]);
                lab[y * 64 + x] = 1;
            }
        }
        let (mut r2, mut boxes, mut labels) =
            (rgb.clone(), vec![[10.0, 20.0, 30.0, 40.0], [50.0, 50.0, 60.0, 60.0]], vec![4, 7]);
        ssd_geometry(&mut rng, &mut r2, &mut boxes, &mut labels, hw);
        assert_eq!(r2.len(), rgb.len());
        assert!(!boxes.is_empty() && boxes.len() == labels.len());
        for (b, l) in boxes.iter().zip(&labels) {
            assert!(
                b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= 64.0 + 1e-3 && b[3] <= 64.0 + 1e-3 && b[2] > b[0] && b[3] > b[1],
                "{b:?}"
            );
            assert!(*l == 4 || *l == 7);
        }
        // The first box, when kept, still frames white pixels at its centre.
        if let Some(i) = labels.iter().position(|&l| l == 4) {
            let b = boxes[i];
            let (cx, cy) = (((b[0] + b[2]) / 2.0) as usize, ((b[1] + b[3]) / 2.0) as usize);
            assert!(r2[(cy * 64 + cx) * 3] > 200, "centre of {b:?} is not white");
        }
        changed += (r2 != rgb) as usize;
        let (mut r3, mut l3) = (rgb.clone(), lab.clone());
        seg_geometry(&mut rng, &mut r3, &mut l3, hw);
        assert!(l3.iter().all(|&v| v == 0 || v == 1 || v == 255));
        // Image and label stay aligned: label-1 pixels are bright.
        for (i, &v) in l3.iter().enumerate() {
            if v == 1 {
                assert!(r3[i * 3] > 50, "label 1 on a dark pixel"); // (>= 1/4 bilinear weight at a corner)
            }
        }
    }
    assert!(changed > 50, "the augmentation rarely changes anything ({changed}/200)");
}

#[test]
fn hsv_conversion_round_trips_and_matches_known_colours() {
    use emo_dense::data::{hsv_to_rgb, rgb_to_hsv};
    let (h, s, v) = rgb_to_hsv([255.0, 0.0, 0.0]);
    assert!((h - 0.0).abs() < 1e-4 && (s - 1.0).abs() < 1e-6 && (v - 255.0).abs() < 1e-4);
    let (h, _, _) = rgb_to_hsv([0.0, 255.0, 0.0]);
    assert!((h - 120.0).abs() < 1e-3);
    let (h, s, _) = rgb_to_hsv([120.0, 80.0, 60.0]);
    assert!((h - 20.0).abs() < 1e-3 && (s - 0.5).abs() < 1e-6, "{h} {s}");
    let g = hsv_to_rgb(120.0, 1.0, 255.0);
    assert!(g[0].abs() < 1e-3 && (g[1] - 255.0).abs() < 1e-3 && g[2].abs() < 1e-3);
    let mut rng = emo_train::rng::Rng::new(5);
    for _ in 0..2000 {
        let p = [0, 1, 2].map(|_| (rng.uniform() * 255.0).round());
        let (h, s, v) = rgb_to_hsv(p);
        assert!((0.0..360.0).contains(&h) && (0.0..=1.0).contains(&s) && (0.0..=255.0).contains(&v));
        let q = hsv_to_rgb(h, s, v);
        for c in 0..3 {
            assert!((p[c] - q[c]).abs() < 1e-2, "{p:?} -> {q:?}");
        }
    }
}

#[test]
fn photometric_distortion_shifts_hue_within_its_range_and_swaps_channels_only_for_detection() {
    use emo_dense::data::{photometric_distortion, rgb_to_hsv};
    let mut rng = emo_train::rng::Rng::new(9);
    // (120, 90, 60): hue 30 degrees, saturation 0.5; brightness +-32 and contrast x0.5-1.5
    // never clip it, so only the hue step moves the hue. A channel permutation moves it by at
    // least 60 degrees.
    let (mut moved, mut swapped, mut grey_kept) = (0, 0, 0);
    for trial in 0..400 {
        let det = trial % 2 == 0;
        let mut img = vec![120u8, 90, 60, 90, 90, 90];
        photometric_distortion(&mut rng, &mut img, if det { 18.0 } else { 36.0 }, det);
        let p = [img[0] as f32, img[1] as f32, img[2] as f32];
        grey_kept += (img[3] == img[4] && img[4] == img[5]) as usize;
        let (h, _, _) = rgb_to_hsv(p);
        let d = (h - 30.0 + 180.0).rem_euclid(360.0) - 180.0;
        let limit = if det { 18.0 } else { 36.0 };
        if det && d.abs() > limit + 3.0 {
            swapped += 1;
            continue;
        }
        assert!(d.abs() <= limit + 3.0, "hue moved by {d} (limit {limit}): {p:?}");
        moved += (d.abs() > 4.0) as usize;
    }
    assert_eq!(grey_kept, 400, "grey stays grey under every step");
    assert!(moved > 60, "the hue step rarely applies ({moved})");
    assert!(swapped > 30, "detection's channel swap rarely applies ({swapped})");
}

#[test]
fn seg_crop_with_cat_max_ratio_avoids_single_class_crops() {
    use emo_dense::data::seg_geometry_with;
    // Class 1 fills a 30x30 corner of a 64x64 map of background (class 0).
    let hw = (64, 64);
    let mut lab = vec![0u8; 64 * 64];
    for y in 0..30 {
        for x in 0..30 {
            lab[y * 64 + x] = 1;
        }
    }
    let rgb = vec![100u8; 64 * 64 * 3];
    let good = |l: &[u8]| {
        let (mut c0, mut c1) = (0usize, 0usize);
        l.iter().for_each(|&v| match v {
            0 => c0 += 1,
            1 => c1 += 1,
            _ => {}
        });
        c0 > 0 && c1 > 0 && (c0.max(c1) as f32) < 0.75 * (c0 + c1) as f32
    };
    let rate = |ratio: f32| {
        let mut rng = emo_train::rng::Rng::new(4);
        (0..300)
            .filter(|_| {
                let (mut r, mut l) = (rgb.clone(), lab.clone());
                seg_geometry_with(&mut rng, &mut r, &mut l, hw, (0.5, 2.0), ratio);
                good(&l)
            })
            .count()
    };
    let (with, without) = (rate(0.75), rate(1.0));
    eprintln!("balanced crops: {with}/300 with cat_max_ratio 0.75, {without}/300 without");
    assert!(with > without + 60, "cat_max_ratio 0.75: {with}/300 balanced crops, without: {without}/300");
}

#[test]
fn seg_rescale_follows_the_ratio_range() {
    use emo_dense::data::seg_geometry_with;
    // A 32x32 square of class 1 in the middle of a 64x64 map of background.
    let hw = (64, 64);
    let mut lab = vec![0u8; 64 * 64];
    let mut rgb = vec![0u8; 64 * 64 * 3];
    for y in 16..48 {
        for x in 16..48 {
            lab[y * 64 + x] = 1;
            rgb[(y * 64 + x) * 3..][..3].copy_from_slice(&[200, 100, 50]);
        }
    }
    let mut rng = emo_train::rng::Rng::new(7);
    // Ratio 1: the crop is the whole image, unchanged.
    let (mut r, mut l) = (rgb.clone(), lab.clone());
    seg_geometry_with(&mut rng, &mut r, &mut l, hw, (1.0, 1.0), 1.0);
    assert_eq!((&r, &l), (&rgb, &lab));
    // Ratio 0.5: the square shrinks to 16x16 (the rest of the window is padding, ignore 255).
    let (mut r, mut l) = (rgb.clone(), lab.clone());
    seg_geometry_with(&mut rng, &mut r, &mut l, hw, (0.5, 0.5), 1.0);
    let count = |l: &[u8], v: u8| l.iter().filter(|&&x| x == v).count();
    assert!((count(&l, 1) as i64 - 256).abs() <= 40, "{} pixels of class 1 at scale 0.5", count(&l, 1));
    assert_eq!(count(&l, 0) + count(&l, 1), 32 * 32, "the image covers a 32x32 part of the window");
    // A range: the object's area follows the drawn scale, so it varies inside [0.8², 1.25²].
    let areas: Vec<usize> = (0..50)
        .map(|_| {
            let (mut r, mut l) = (rgb.clone(), lab.clone());
            seg_geometry_with(&mut rng, &mut r, &mut l, hw, (0.8, 1.25), 1.0);
            count(&l, 1)
        })
        .collect();
    let (lo, hi) = (*areas.iter().min().unwrap(), *areas.iter().max().unwrap());
    assert!(lo >= 500 && hi <= 1024 * 16 / 10 + 64 && hi > lo + 300, "areas {lo}..{hi}");
}
