use emo_spec::{EmoConfig, KeyKind, Variant, resolve_out_indices};

#[test]
fn params_match_paper_counts() {
    let want = [1_361_168, 2_377_472, 5_108_848, 6_168_496];
    for (v, w) in Variant::ALL.iter().zip(want) {
        assert_eq!(v.config().num_params(), w, "{v}");
    }
}

#[test]
fn flops_match_fvcore() {
    // fvcore at 224x224 (spec §9): total and the attention-matmul share, in MFLOPs (2 decimals).
    let want = [(260.84, 12.37), (439.36, 20.36), (902.58, 27.35), (960.75, 27.66)];
    for (v, (tot, attn)) in Variant::ALL.iter().zip(want) {
        let f = v.config().flops(224, 224);
        assert_eq!((f.total() as f64 / 1e4).round() / 100.0, tot, "{v} total {}", f.total());
        assert_eq!((f.attention as f64 / 1e4).round() / 100.0, attn, "{v} attn {}", f.attention);
    }
}

#[test]
fn dim_mid_table_matches_spec() {
    // spec §6: (s1 down, s1 body, s2 down, s2 body, s3 down, s3 body, s4 down, s4 body)
    let want = [
        [96, 64, 160, 120, 288, 240, 560, 588],
        [96, 64, 160, 120, 288, 360, 840, 700],
        [96, 96, 288, 216, 576, 640, 1280, 1152],
        [96, 96, 288, 216, 576, 640, 1600, 1600],
    ];
    for (v, w) in Variant::ALL.iter().zip(want) {
        let b = v.config().blocks();
        for s in 1..=4 {
            let down = b.iter().find(|x| x.stage == s && x.index == 0).unwrap();
            let body = b.iter().find(|x| x.stage == s && x.index == 1).unwrap();
            assert_eq!([down.dim_mid, body.dim_mid], [w[2 * s - 2], w[2 * s - 1]], "{v} stage {s}");
            assert!(!down.skip && down.attention.is_none() && down.stride == 2);
            assert!(body.skip && body.stride == 1);
            assert_eq!(body.attention.is_some(), s >= 3);
        }
    }
}

#[test]
fn key_count_of_emo_1m() {
    let keys = EmoConfig::emo_1m().state_dict_keys();
    assert_eq!(keys.len(), 217);
    assert_eq!(keys.iter().filter(|k| k.kind == KeyKind::Counter).count(), 21);
}

#[test]
fn stage_shapes_follow_ceil_rule() {
    let c = EmoConfig::emo_1m();
    assert_eq!(c.stage_hw(256, 192), [(128, 96), (64, 48), (32, 24), (16, 12), (8, 6)]);
    assert_eq!(c.stage_hw(1, 1), [(1, 1); 5]);
    assert_eq!(c.stage_hw(33, 300)[4], (2, 10));
    let a = c.blocks().iter().find(|b| b.name == "stage3.1").unwrap().attention.unwrap();
    let g = a.windows(16, 12);
    assert_eq!((g.hp, g.wp, g.n1, g.n2), (21, 14, 3, 2));
}

#[test]
fn variant_names_parse() {
    for v in Variant::ALL {
        assert_eq!(v.name().parse::<Variant>().unwrap(), v);
        assert_eq!(v.paper_name().replace('-', "_").parse::<Variant>().unwrap(), v);
    }
    assert!("emo-3m".parse::<Variant>().is_err());
}

#[test]
fn out_indices_resolve_like_timm() {
    assert_eq!(resolve_out_indices(&[-1, 3, 3]).unwrap(), vec![3, 4]);
    assert!(resolve_out_indices(&[5]).is_err());
    assert!(resolve_out_indices(&[-6]).is_err());
}

#[test]
fn validate_rejects_bad_heads() {
    let mut c = EmoConfig::emo_1m();
    assert!(c.validate().is_ok());
    c.stages[2].dim_head = 7;
    assert!(c.validate().is_err());
}

mod tasks {
    use emo_spec::{DenseConfig, Task, Variant};

    /// The paper's params column truncates to 0.1M (spec §9): ours must fall in that interval.
    #[test]
    fn params_match_the_paper_tables() {
        for task in Task::ALL {
            for v in [Variant::Emo1M, Variant::Emo2M, Variant::Emo5M] {
                let cfg = DenseConfig::paper(task, v);
                let (p, _) = task.paper_params_flops(v).unwrap();
                let ours = cfg.num_params() as f64 / 1e6;
                assert!(ours >= p - 1e-9 && ours < p + 0.1, "{task} {v}: {ours:.3}M vs paper {p}M");
            }
        }
    }

    #[test]
    fn flops_are_close_to_the_paper_tables() {
        for task in Task::ALL {
            for v in [Variant::Emo1M, Variant::Emo2M, Variant::Emo5M] {
                let (_, g) = task.paper_params_flops(v).unwrap();
                // The paper used mmcv's counter, which misses the attention matmuls.
                let ours = DenseConfig::paper(task, v).flops().mmcv_like() as f64 / 1e9;
                assert!((ours - g).abs() / g < 0.1, "{task} {v}: {ours:.3}G vs paper {g}G");
            }
        }
    }

    #[test]
    fn official_windows_and_levels() {
        let d = DenseConfig::paper(Task::SsdLite, Variant::Emo5M);
        assert!(d.backbone.stages.iter().all(|s| s.window_size == 10));
        let s = DenseConfig::paper(Task::PspNet, Variant::Emo5M);
        assert!(s.backbone.stages.iter().all(|s| s.window_size == 16));
        assert!(DenseConfig::paper(Task::DeepLabV3, Variant::Emo1M).backbone.stages.iter().all(|s| s.window_size == 7));
        let sizes: Vec<usize> = d.level_sizes().iter().map(|s| s.0).collect();
        assert_eq!(sizes, [20, 10, 5, 3, 2, 1]);
        let r = DenseConfig::paper(Task::RetinaNet, Variant::Emo1M);
        assert_eq!(r.level_sizes(), [(160, 100), (80, 50), (40, 25), (20, 13), (10, 7)]);
        let a = d.ssd_anchor_levels();
        assert_eq!((a[3].stride, a[3].min_size, a[5].max_size), ((107.0, 107.0), 202.0, 320.0));
        let small = DenseConfig::new(Task::SsdLite, Variant::Emo1M, 10, (128, 128)).ssd_anchor_levels();
        assert_eq!(small[0].stride, (16.0, 16.0));
        assert!((small[0].min_size - 19.2).abs() < 1e-9);
        assert_eq!("PSPNet".parse::<Task>().unwrap(), Task::PspNet);
        assert!("yolo".parse::<Task>().is_err());
    }

    #[test]
    fn keys_are_unique_and_prefixed() {
        for task in Task::ALL {
            let keys = DenseConfig::paper(task, Variant::Emo1M).state_dict_keys();
            let mut names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
            let n = names.len();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), n, "{task}");
            assert!(names.iter().any(|k| k.starts_with("backbone.stage4.")));
        }
    }

    /// The training-only SE layer: a [classes, stage-4 channels] linear layer (as a 1x1 conv)
    /// under `decode_head.se_layer`, counted with the auxiliary head, not in inference FLOPs;
    /// segmentation only.
    #[test]
    fn classifier_keys_are_the_class_dependent_convs() {
        let keys = |task, se_layer| {
            DenseConfig { se_layer, ..DenseConfig::new(task, Variant::Emo1M, 11, task.paper_input()) }.classifier_keys()
        };
        assert_eq!(keys(Task::RetinaNet, false), ["bbox_head.retina_cls.weight", "bbox_head.retina_cls.bias"]);
        let ssd: Vec<String> =
            (0..6).flat_map(|i| ["weight", "bias"].map(|p| format!("bbox_head.cls_convs.{i}.1.{p}"))).collect();
        assert_eq!(keys(Task::SsdLite, false), ssd);
        for task in [Task::DeepLabV3, Task::PspNet] {
            let seg = ["decode_head.conv_seg.weight", "decode_head.conv_seg.bias"];
            let aux = ["auxiliary_head.conv_seg.weight", "auxiliary_head.conv_seg.bias"];
            let mut with_se: Vec<&str> = [seg, aux].concat();
            assert_eq!(keys(task, false), with_se);
            with_se.extend(["decode_head.se_layer.weight", "decode_head.se_layer.bias"]);
            let mut got = keys(task, true);
            got.sort();
            with_se.sort();
            assert_eq!(got, with_se);
        }
    }

    #[test]
    fn se_layer_is_a_training_only_linear_layer() {
        use emo_spec::SE_LAYER;
        let plain = DenseConfig::new(Task::DeepLabV3, Variant::Emo1M, 11, (192, 192));
        let se = DenseConfig { se_layer: true, ..plain.clone() };
        let conv = se.head_conv(SE_LAYER);
        assert_eq!((conv.cin, conv.cout, conv.k, conv.bias, conv.bn.is_some()), (168, 11, 1, true, false));
        assert!(conv.training_only() && !plain.head_convs().iter().any(|c| c.key == SE_LAYER));
        assert_eq!(se.num_params(), plain.num_params() + 168 * 11 + 11);
        assert_eq!(se.flops().inference(), plain.flops().inference());
        assert_eq!(se.flops().aux, plain.flops().aux + 168 * 11);
        let keys: Vec<String> = se.state_dict_keys().into_iter().map(|k| k.name).collect();
        assert!(keys.contains(&format!("{SE_LAYER}.weight")) && keys.contains(&format!("{SE_LAYER}.bias")));
        assert!(
            DenseConfig { se_layer: true, ..DenseConfig::paper(Task::SsdLite, Variant::Emo1M) }.validate().is_err()
        );
        assert!(se.validate().is_ok());
        // A config written before the field existed reads as without it.
        let mut json = serde_json::to_value(&plain).unwrap();
        json.as_object_mut().unwrap().remove("se_layer");
        assert_eq!(serde_json::from_value::<DenseConfig>(json).unwrap(), plain);
    }
}

#[test]
fn live_taps_are_those_that_read_the_map() {
    use emo_spec::{conv_len, live_taps};
    // ASPP's 3x3 branches ("same": pad = dilation) on a 6x6 map: dilation 12 / 24 / 36 leave
    // the centre tap only; dilation 1 and 5 keep all three (5 < 6).
    for d in [12, 24, 36] {
        assert_eq!(live_taps(6, 3, 1, d, d), [1]);
        assert_eq!(conv_len(6, 3, 1, d, d), 6);
    }
    assert_eq!(live_taps(6, 3, 1, 1, 1), [0, 1, 2]);
    assert_eq!(live_taps(6, 3, 1, 5, 5), [0, 1, 2]);
    assert_eq!(live_taps(6, 3, 1, 6, 6), [1], "dilation 6 on 6 positions: the side taps read padding only");
    // A 5x5 "same" conv with dilation 2 on 3 positions: offsets 0 and 4 read 4 away from every position.
    assert_eq!(live_taps(3, 5, 1, 4, 2), [1, 2, 3]);
    // A 1x1 map: only the centre of a 3x3 stride-1 or stride-2 conv.
    assert_eq!(live_taps(1, 3, 1, 1, 1), [1]);
    assert_eq!(live_taps(1, 3, 2, 1, 1), [1]);
    // Stride 2 on 2 positions (one output, reading -1, 0, 1): all but the first.
    assert_eq!(conv_len(2, 3, 2, 1, 1), 1);
    assert_eq!(live_taps(2, 3, 2, 1, 1), [1, 2]);
}
