//! A dependency-light PNG of the training curves: left, the training loss logged every few
//! iterations (`loss.csv`); right, validation top-1 per epoch of the raw (blue) and the EMA (red)
//! weights (`metrics.jsonl`). Light grey lines mark every 10% of the y range (loss: 0 at the
//! bottom to the maximum logged loss; accuracy: 0-100%).

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::TrainError;
use crate::trainer::EpochMetrics;

const W: u32 = 900;
const H: u32 = 360;
const PAD: u32 = 20;

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb<u8>) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()) as usize).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
        for (dx, dy) in [(0i64, 0i64), (1, 0), (0, 1)] {
            let (px, py) = (x as i64 + dx, y as i64 + dy);
            if px >= 0 && py >= 0 && (px as u32) < W && (py as u32) < H {
                img.put_pixel(px as u32, py as u32, c);
            }
        }
    }
}

/// A panel at x offset `x0` of width `w`: returns the pixel position of (fraction x, fraction y).
fn panel(img: &mut RgbImage, x0: u32, w: u32) -> impl Fn(f64, f64) -> (f64, f64) + use<> {
    let (top, bottom) = (PAD as f64, (H - PAD) as f64);
    for k in 0..=10 {
        let y = bottom - (bottom - top) * k as f64 / 10.0;
        let c = if k == 0 { Rgb([0, 0, 0]) } else { Rgb([225, 225, 225]) };
        line(img, (x0 as f64, y), ((x0 + w) as f64, y), c);
    }
    line(img, (x0 as f64, top), (x0 as f64, bottom), Rgb([0, 0, 0]));
    move |fx: f64, fy: f64| (x0 as f64 + fx * w as f64, bottom - fy.clamp(0.0, 1.0) * (bottom - top))
}

/// Draw `RUN/curves.png` from `RUN/loss.csv` and the epoch metrics.
pub fn write(dir: &Path, epochs: &[EpochMetrics], total_iters: usize) -> Result<(), TrainError> {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let loss: Vec<(f64, f64)> = std::fs::read_to_string(dir.join("loss.csv"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split(',');
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        })
        .collect();
    let half = (W - 3 * PAD) / 2;
    let p = panel(&mut img, PAD, half);
    let max_loss = loss.iter().map(|l| l.1).fold(1e-9, f64::max);
    let xs = total_iters.max(1) as f64;
    for w in loss.windows(2) {
        line(&mut img, p(w[0].0 / xs, w[0].1 / max_loss), p(w[1].0 / xs, w[1].1 / max_loss), Rgb([40, 40, 40]));
    }
    let q = panel(&mut img, 2 * PAD + half, half);
    let n = epochs.iter().map(|e| e.epoch).max().unwrap_or(1).max(1) as f64;
    type Series = (fn(&EpochMetrics) -> f64, Rgb<u8>);
    let series: [Series; 2] = [(|e| e.top1, Rgb([30, 80, 220])), (|e| e.ema_top1, Rgb([220, 40, 40]))];
    for (get, c) in series {
        let pts: Vec<(f64, f64)> = epochs.iter().map(|e| q(e.epoch as f64 / n, get(e) / 100.0)).collect();
        for w in pts.windows(2) {
            line(&mut img, w[0], w[1], c);
        }
        for &(x, y) in &pts {
            for d in -3i32..=3 {
                line(&mut img, (x + d as f64, y - 3.0), (x + d as f64, y + 3.0), c);
            }
        }
    }
    let path = dir.join("curves.png");
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).map_err(|e| TrainError::Io(format!("curves.png: {e}")))?;
    emo_weights::write_atomic(&path, &buf.into_inner())?;
    Ok(())
}
