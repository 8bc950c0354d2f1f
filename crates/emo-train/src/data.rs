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

/// An ImageNet-style folder: `ROOT/train/<class>/*` and `ROOT/val/<class>/*` (the classes are
/// the sorted sub-folder names of `train`; `val` must have the same). Images are decoded on all
/// cores, resized (shorter side, bicubic) and centre-cropped to `store x store`, and kept as u8
/// RGB in memory. Unreadable images are skipped and counted (returned as the third value).
pub fn image_folder(root: &Path, store: usize) -> Result<(Split, Split, Vec<String>, usize), TrainError> {
    let classes = class_dirs(&root.join("train"))?;
    let val_classes = class_dirs(&root.join("val"))?;
    if val_classes != classes {
        return Err(TrainError::Data(format!(
            "{}: val classes differ from train classes ({} vs {})",
            root.display(),
            val_classes.len(),
            classes.len()
        )));
    }
    let (train, s1) = load_folder(&root.join("train"), &classes, store)?;
    let (val, s2) = load_folder(&root.join("val"), &classes, store)?;
    Ok((train, val, classes, s1 + s2))
}

fn class_dirs(dir: &Path) -> Result<Vec<String>, TrainError> {
    let rd = std::fs::read_dir(dir).map_err(|e| TrainError::Data(format!("{}: {e}", dir.display())))?;
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    if v.is_empty() {
        return Err(TrainError::Data(format!("{} has no class folders", dir.display())));
    }
    Ok(v)
}

fn load_folder(dir: &Path, classes: &[String], store: usize) -> Result<(Split, usize), TrainError> {
    let mut files = Vec::new();
    for (ci, c) in classes.iter().enumerate() {
        let cdir = dir.join(c);
        let mut n = 0;
        let rd = std::fs::read_dir(&cdir).map_err(|e| TrainError::Data(format!("{}: {e}", cdir.display())))?;
        let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect();
        entries.sort();
        for p in entries {
            files.push((p, ci as u8));
            n += 1;
        }
        if n == 0 {
            return Err(TrainError::Data(format!("class folder {} is empty", cdir.display())));
        }
    }
    let per = 3 * store * store;
    let results = crate::parallel::map_each(&files, crate::parallel::cores(), |(p, _)| decode(p, store));
    let (mut images, mut labels, mut skipped) = (Vec::with_capacity(files.len() * per), Vec::new(), 0);
    for (img, (path, label)) in results.into_iter().zip(&files) {
        match img {
            Some(px) => {
                images.extend(px);
                labels.push(*label);
            }
            None => {
                skipped += 1;
                eprintln!("warning: skipping unreadable image {}", path.display());
            }
        }
    }
    if labels.is_empty() {
        return Err(TrainError::Data(format!("{}: no readable images", dir.display())));
    }
    Ok((Split { images, labels, channels: 3, h: store, w: store, classes: classes.len() }, skipped))
}

/// Decode, resize the shorter side to `store` (bicubic), centre-crop, CHW u8.
fn decode(path: &Path, store: usize) -> Option<Vec<u8>> {
    let img = image::open(path).ok()?.to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return None;
    }
    let (nw, nh) = if w <= h { (store, (store * h).div_ceil(w)) } else { ((store * w).div_ceil(h), store) };
    let r = image::imageops::resize(&img, nw as u32, nh as u32, image::imageops::FilterType::CatmullRom);
    let (y0, x0) = ((nh - store) / 2, (nw - store) / 2);
    let mut out = vec![0u8; 3 * store * store];
    for y in 0..store {
        for x in 0..store {
            let p = r.get_pixel((x0 + x) as u32, (y0 + y) as u32);
            for c in 0..3 {
                out[(c * store + y) * store + x] = p[c];
            }
        }
    }
    Some(out)
}
