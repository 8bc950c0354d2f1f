//! Checkpoint reading, strict validation and bad-input handling, on the committed EMO-1M
//! fixture (official state_dict layout, seeded random weights).

use std::io::{Read, Write};
use std::path::PathBuf;

use emo_spec::{EmoConfig, Variant};
use emo_weights::{Data, Tensor, WeightsError, Wrapping, load, load_pth_bytes, validate};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/emo").join(name)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("emo-weights-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn pth_and_safetensors_hold_the_same_state_dict() {
    let a = load(fixture("emo_1m.pth")).unwrap();
    let b = load(fixture("emo_1m.safetensors")).unwrap();
    assert_eq!(a.wrapping, Wrapping::Plain);
    assert_eq!(a.len(), 217);
    assert_eq!(a.tensors, b.tensors);
    assert!(matches!(a.get("stage0.0.convs.0.1.num_batches_tracked").unwrap().data, Data::I64(_)));
    validate(&a, &EmoConfig::emo_1m()).unwrap();
    assert_eq!(emo_weights::detect_variant(&a), Some(Variant::Emo1M));
}

#[test]
fn other_variant_is_named_in_the_error() {
    let sd = load(fixture("emo_1m.safetensors")).unwrap();
    let e = validate(&sd, &EmoConfig::emo_5m()).unwrap_err();
    let WeightsError::Mismatch(m) = &e else { panic!("{e}") };
    assert_eq!(m.looks_like, Some(Variant::Emo1M));
    assert!(e.to_string().contains("looks like a emo-1m checkpoint"), "{e}");
}

#[test]
fn missing_unexpected_and_misshaped_keys_are_all_named() {
    let mut sd = load(fixture("emo_1m.safetensors")).unwrap();
    sd.tensors.remove("stage3.1.qk.conv.bias");
    sd.tensors.remove("head.weight");
    sd.insert("stage9.0.extra", Tensor::f32(vec![1], vec![0.0]));
    sd.insert("stage2.0.proj.conv.weight", Tensor::f32(vec![48, 160, 1, 2], vec![0.0; 48 * 160 * 2]));
    let e = validate(&sd, &EmoConfig::emo_1m()).unwrap_err().to_string();
    for needle in ["stage3.1.qk.conv.bias", "head.weight", "stage9.0.extra", "stage2.0.proj.conv.weight"] {
        assert!(e.contains(needle), "{needle} not in: {e}");
    }
}

#[test]
fn head_width_mismatch_says_how_many_classes() {
    let sd = load(fixture("emo_1m.safetensors")).unwrap();
    let e = validate(&sd, &EmoConfig::emo_1m().with_num_classes(10)).unwrap_err().to_string();
    assert!(e.contains("1000 classes"), "{e}");
}

#[test]
fn wrong_dtype_is_reported() {
    let mut sd = load(fixture("emo_1m.safetensors")).unwrap();
    sd.insert("head.bias", Tensor { shape: vec![1000], data: Data::I64(vec![0; 1000]) });
    let e = validate(&sd, &EmoConfig::emo_1m()).unwrap_err().to_string();
    assert!(e.contains("wrong dtype: head.bias"), "{e}");
}

#[test]
fn truncated_and_garbage_files_give_errors_not_panics() {
    for src in ["emo_1m.pth", "emo_1m.safetensors"] {
        let bytes = std::fs::read(fixture(src)).unwrap();
        for cut in [10, 1000, bytes.len() / 2, bytes.len() - 7] {
            let p = tmp(&format!("cut{cut}-{src}"));
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let e = load(&p).unwrap_err();
            assert!(matches!(e, WeightsError::Corrupt(_)), "{src} cut at {cut}: {e}");
        }
    }
    let p = tmp("garbage.pth");
    std::fs::write(&p, b"hello, this is not a checkpoint").unwrap();
    assert!(load(&p).is_err());
    assert!(matches!(load(tmp("does-not-exist.pth")).unwrap_err(), WeightsError::Io { .. }));
}

/// Rewrite the fixture's zip with a new data.pkl.
fn with_pickle(f: impl Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
    let bytes = std::fs::read(fixture("emo_1m.pth")).unwrap();
    let mut zin = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..zin.len() {
        let mut e = zin.by_index(i).unwrap();
        let name = e.name().unwrap().to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        if name.ends_with("data.pkl") {
            data = f(&data);
        }
        out.start_file(name, opts).unwrap();
        out.write_all(&data).unwrap();
    }
    out.finish().unwrap().into_inner()
}

fn binunicode(s: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend((s.len() as u32).to_le_bytes());
    v.extend(s.as_bytes());
    v
}

#[test]
fn wrapped_net_and_net_e_checkpoints_are_unwrapped() {
    for (key, want) in [("net", Wrapping::Net), ("net_E", Wrapping::NetE)] {
        // {key: <original state dict>, "epoch": 7}
        let z = with_pickle(|orig| {
            let body = &orig[2..orig.len() - 1]; // drop PROTO 2 and STOP
            let mut p = vec![0x80, 2, b'}', b'('];
            p.extend(binunicode("epoch"));
            p.extend([b'K', 7]);
            p.extend(binunicode(key));
            p.extend(body);
            p.extend([b'u', b'.']);
            p
        });
        let sd = load_pth_bytes(&z).unwrap();
        assert_eq!(sd.wrapping, want);
        validate(&sd, &EmoConfig::emo_1m()).unwrap();
    }
}

#[test]
fn non_state_dict_pickles_are_rejected_clearly() {
    // A pickled object of an unknown class (what torch.save(model) produces).
    let z = with_pickle(|_| b"\x80\x02cmodel.emo\nEMO\nq\x00)\x81q\x01}b.".to_vec());
    let e = load_pth_bytes(&z).unwrap_err().to_string();
    assert!(e.contains("model.emo.EMO") && e.contains("state_dict"), "{e}");
    // A dict without tensors.
    let z = with_pickle(|_| {
        let mut p = vec![0x80, 2, b'}'];
        p.extend(binunicode("lr"));
        p.extend([b'K', 3, b's', b'.']);
        p
    });
    let e = load_pth_bytes(&z).unwrap_err().to_string();
    assert!(e.contains("no tensors"), "{e}");
}

#[test]
fn safetensors_round_trip_is_exact_and_atomic() {
    let sd = load(fixture("emo_1m.pth")).unwrap();
    let p = tmp("roundtrip.safetensors");
    emo_weights::save_safetensors(&sd, &p).unwrap();
    assert_eq!(load(&p).unwrap().tensors, sd.tensors);
    // Writing into a folder that does not exist fails without touching anything.
    let bad = tmp("no/such/dir/x.safetensors");
    assert!(matches!(emo_weights::save_safetensors(&sd, &bad), Err(WeightsError::Write { .. })));
}
