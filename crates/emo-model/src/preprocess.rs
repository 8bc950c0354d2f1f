//! The official evaluation transform (timm / torchvision): resize the shorter side to
//! `floor(size / crop_pct)` with bicubic interpolation, center-crop `size` x `size`, scale to
//! [0, 1] and normalise with the ImageNet mean / std. Output is CHW f32.

use std::path::Path;

use image::{DynamicImage, RgbImage, imageops::FilterType};

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Settings of the evaluation transform.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalTransform {
    /// Side of the square crop (224).
    pub size: usize,
    /// Crop ratio (0.875: resize to 256, crop 224).
    pub crop_pct: f64,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for EvalTransform {
    fn default() -> Self {
        EvalTransform { size: 224, crop_pct: 0.875, mean: IMAGENET_MEAN, std: IMAGENET_STD }
    }
}

/// An image that could not be read or decoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot read image {path}: {reason}")]
pub struct ImageError {
    pub path: String,
    pub reason: String,
}

impl EvalTransform {
    /// The shorter side after resizing.
    pub fn resize_size(&self) -> usize {
        (self.size as f64 / self.crop_pct).floor() as usize
    }

    /// Transform a decoded image into a `3 x size x size` CHW tensor.
    pub fn apply(&self, img: &DynamicImage) -> Vec<f32> {
        let rgb = img.to_rgb8();
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        let s = self.resize_size().max(self.size);
        // torchvision Resize(int): shorter side = s, longer = int(s * long / short)
        let (nw, nh) = if w <= h {
            (s, (s as f64 * h as f64 / w as f64) as usize)
        } else {
            ((s as f64 * w as f64 / h as f64) as usize, s)
        };
        let resized: RgbImage = if (nw, nh) == (w, h) {
            rgb
        } else {
            image::imageops::resize(&rgb, nw as u32, nh as u32, FilterType::CatmullRom)
        };
        let top = ((nh - self.size) as f64 / 2.0).round() as usize;
        let left = ((nw - self.size) as f64 / 2.0).round() as usize;
        let n = self.size;
        let mut out = vec![0f32; 3 * n * n];
        for y in 0..n {
            for x in 0..n {
                let p = resized.get_pixel((left + x) as u32, (top + y) as u32);
                for c in 0..3 {
                    out[c * n * n + y * n + x] = (p[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
                }
            }
        }
        out
    }

    /// Read, decode and transform an image file.
    pub fn load(&self, path: impl AsRef<Path>) -> Result<Vec<f32>, ImageError> {
        let path = path.as_ref();
        let img =
            image::open(path).map_err(|e| ImageError { path: path.display().to_string(), reason: e.to_string() })?;
        Ok(self.apply(&img))
    }
}
