//! Segment (or detect) images with a trained model on the fast CPU engine, from Rust.
//!
//! ```sh
//! cargo run --release -p emo-dense --example segment_fast -- runs/deeplab/best.safetensors IMAGE...
//! ```
//! The weights' model card (`model.json`, written by `emo train --task`) must lie beside them.
//! Prints each image's classes (segmentation) or its boxes (detection), as `emo segment` /
//! `emo detect` do, without writing files.

use std::error::Error;
use std::path::Path;

use burn::tensor::Device;
use emo_dense::predict::{DetTestCfg, SegAug, batch_tensor, detect, segment_aug};
use emo_dense::train::ModelCard;
use emo_dense::{DenseInfer, FastDense, anchors};

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((weights, images)) = args.split_first() else {
        return Err("usage: segment_fast WEIGHTS IMAGE...".into());
    };
    let card: ModelCard =
        serde_json::from_str(&std::fs::read_to_string(Path::new(weights).with_file_name("model.json"))?)?;
    let sd = emo_weights::load(weights)?;
    let model = FastDense::from_state_dict(&card.model, &sd)?; // strict: names any missing key
    let (h, w) = card.model.input;
    let device = Device::flex();
    for path in images {
        let img = image::open(path)?.to_rgb8();
        let rgb = image::imageops::resize(&img, w as u32, h as u32, image::imageops::FilterType::Triangle);
        let x = batch_tensor(&[rgb.as_raw()], (h, w), &device);
        if model.dense_config().task.is_detection() {
            let boxes = detect(&model, x, &anchors::anchors(&card.model), &DetTestCfg::official(card.model.task))?;
            for d in boxes[0].iter().filter(|d| d.score >= 0.3) {
                println!("{path}: {} {:.2} at {:?} (input pixels)", card.classes[d.label], d.score, d.bbox);
            }
        } else {
            // Class map at the image's own size, single scale.
            let size = (img.height() as usize, img.width() as usize);
            let map = segment_aug(&model, x, &SegAug::default(), &[size])?.remove(0);
            let mut counts = vec![0usize; card.classes.len()];
            map.iter().for_each(|&c| counts[c as usize] += 1);
            let shares: Vec<String> = counts
                .iter()
                .enumerate()
                .filter(|&(_, &n)| n > 0)
                .map(|(c, &n)| format!("{} {:.0}%", card.classes[c], 100.0 * n as f64 / map.len() as f64))
                .collect();
            println!("{path}: {}", shares.join(", "));
        }
    }
    Ok(())
}
