//! Datasets: Fashion-MNIST from its IDX files (the Debian package `dataset-fashion-mnist`
//! installs them in `/usr/share/datasets/fashion-mnist`), kept as raw u8 pixels.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::TrainError;

/// Where Debian's `dataset-fashion-mnist` puts the files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The ten Fashion-MNIST classes.
pub const FASHION_MNIST_CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

/// Images of one split as u8 pixels, `[n, channels, h, w]`, with labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub channels: usize,
    pub h: usize,
    pub w: usize,
    pub classes: usize,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.channels * self.h * self.w;
        &self.images[i * n..(i + 1) * n]
    }
    /// The first `n` images (for quick runs).
    pub fn take(mut self, n: usize) -> Self {
        let n = n.min(self.len());
        self.images.truncate(n * self.channels * self.h * self.w);
        self.labels.truncate(n);
        self
    }
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, TrainError> {
    let io = |e| TrainError::Data(format!("{}: {e}", path.display()));
    let raw = std::fs::read(path).map_err(io)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(io)?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn be32(b: &[u8], at: usize) -> usize {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize
}

/// Parse an IDX image file (magic 0x803) and its label file (0x801).
pub fn parse_idx(images: &[u8], labels: &[u8], classes: usize) -> Result<Split, TrainError> {
    let bad = |m: &str| TrainError::Data(format!("IDX: {m}"));
    if images.len() < 16 || be32(images, 0) != 0x803 {
        return Err(bad("image file has no 0x803 header"));
    }
    if labels.len() < 8 || be32(labels, 0) != 0x801 {
        return Err(bad("label file has no 0x801 header"));
    }
    let (n, h, w) = (be32(images, 4), be32(images, 8), be32(images, 12));
    if be32(labels, 4) != n {
        return Err(bad("image and label counts differ"));
    }
    if images.len() < 16 + n * h * w || labels.len() < 8 + n {
        return Err(bad("file is truncated"));
    }
    let labels = labels[8..8 + n].to_vec();
    if let Some(l) = labels.iter().find(|&&l| l as usize >= classes) {
        return Err(bad(&format!("label {l} out of range for {classes} classes")));
    }
    Ok(Split { images: images[16..16 + n * h * w].to_vec(), labels, channels: 1, h, w, classes })
}

/// Load Fashion-MNIST (train, test) from `dir` (default: [`FASHION_MNIST_DIR`]).
pub fn fashion_mnist(dir: Option<&Path>) -> Result<(Split, Split), TrainError> {
    let dir = dir.map(PathBuf::from).unwrap_or_else(|| PathBuf::from(FASHION_MNIST_DIR));
    let find = |stem: &str| -> Result<PathBuf, TrainError> {
        for name in [format!("{stem}.gz"), stem.to_string()] {
            let p = dir.join(name);
            if p.exists() {
                return Ok(p);
            }
        }
        Err(TrainError::Data(format!(
            "{stem} not found in {} (install it with `apt-get install -y dataset-fashion-mnist`)",
            dir.display()
        )))
    };
    let load = |img: &str, lbl: &str| -> Result<Split, TrainError> {
        parse_idx(&read_maybe_gz(&find(img)?)?, &read_maybe_gz(&find(lbl)?)?, 10)
    };
    Ok((
        load("train-images-idx3-ubyte", "train-labels-idx1-ubyte")?,
        load("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?,
    ))
}
