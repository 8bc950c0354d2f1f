//! Data for the dense tasks:
//! - COCO-format detection sets (`annotations/instances_<split>.json` + `images/<split>/`);
//! - segmentation folders (`images/<split>/` + `labels/<split>/*.png` label maps, or ADE20K's
//!   `images/training` + `annotations/training`); 255 is the ignore index;
//! - the layouts COCO 2017 and ADE20K ship in, as they are: a split asked for as `train` / `val`
//!   is found under its own name there ([`resolve_split`]), and an ADE20K folder without
//!   `classes.txt` is read with ADE20K's 150 class names ([`ade20k_layout`]);
//! - a canvas set built from real Fashion-MNIST items ([`make_canvas`]): boxes from placement,
//!   masks from the item's pixels, written in both layouts.
//!
//! A split is first indexed (annotations parsed, every image's header read, every label map
//! checked) and then either decoded into memory, resized to the model input once, in parallel
//! ([`load_coco`], [`load_seg`]), or left on disk and decoded batch by batch as training needs
//! it ([`index_coco`], [`index_seg`]: a streamed split, for sets too large to hold decoded).
//! Bad entries are skipped and counted ([`Skipped`]), never a crash mid-epoch.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use emo_train::rng::Rng;
use image::imageops::FilterType;
use serde::{Deserialize, Serialize};

use crate::DenseError;
use crate::boxes::BBox;
use crate::metrics::GtBox;

/// Counts of skipped input, reported after loading.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Skipped {
    pub unreadable_images: usize,
    pub unknown_category: usize,
    pub unknown_image: usize,
    pub box_outside_image: usize,
    pub degenerate_box: usize,
    pub clipped_box: usize,
    pub empty_images: usize,
    pub missing_label_map: usize,
}

impl Skipped {
    /// One line for the user, or None when nothing was skipped.
    pub fn warning(&self) -> Option<String> {
        let v = serde_json::to_value(self).ok()?;
        let parts: Vec<String> = v
            .as_object()?
            .iter()
            .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
            .map(|(k, n)| format!("{} {}", n, k.replace('_', " ")))
            .collect();
        (!parts.is_empty()).then(|| format!("skipped: {}", parts.join(", ")))
    }
}

/// One detection image, resized to the model input.
#[derive(Clone, Debug)]
pub struct DetImage {
    pub id: u64,
    pub file: String,
    /// Where the image is read from.
    pub path: PathBuf,
    /// Original size (H, W).
    pub orig: (usize, usize),
    /// RGB HWC at the model input size; empty in a streamed split ([`DetDataset::rgb`] decodes it).
    pub rgb: Vec<u8>,
    /// Boxes in input coordinates.
    pub boxes: Vec<BBox>,
    /// 0-based class indices.
    pub labels: Vec<usize>,
}

/// A COCO-format detection split.
#[derive(Clone, Debug)]
pub struct DetDataset {
    pub images: Vec<DetImage>,
    /// Class names, index = contiguous label.
    pub classes: Vec<String>,
    /// COCO category id of each class.
    pub cat_ids: Vec<u64>,
    /// The ground truth as in the file (original coordinates) for COCO evaluation.
    pub gt: Vec<GtBox>,
    pub input: (usize, usize),
    pub skipped: Skipped,
    /// The images stay on disk and are decoded when needed ([`index_coco`]).
    pub streamed: bool,
    /// Evaluation resizes each image from its file as this says instead of to `input`
    /// ([`DetDataset::with_test_scale`]).
    pub test_scale: Option<TestScale>,
}

impl DetDataset {
    /// Evaluate at a test scale (mmdet's test pipeline, e.g. RetinaNet's keep-ratio (1333, 800)
    /// padded to 32): each image read from its file by [`TestScale::load`], normalised, padded,
    /// and run with the anchors of its padded size; the boxes are clipped to the resized image
    /// and scaled back to the original, as mmdet's `get_bboxes(rescale=True)`.
    pub fn with_test_scale(self, scale: Option<TestScale>) -> Self {
        DetDataset { test_scale: scale, ..self }
    }

    /// Image `i`'s RGB at the input size: the decoded pixels, or in a streamed split the image
    /// read from disk now (an error naming the file if it no longer decodes).
    pub fn rgb(&self, i: usize) -> Result<Cow<'_, [u8]>, DenseError> {
        let im = &self.images[i];
        if !self.streamed {
            return Ok(Cow::Borrowed(&im.rgb));
        }
        let (rgb, _) = decode_image(&im.path, self.input).ok_or_else(|| unreadable(&im.path))?;
        Ok(Cow::Owned(rgb))
    }

    /// Bytes the split takes decoded in memory (H x W x 3 an image).
    pub fn decoded_bytes(&self) -> usize {
        self.images.len() * self.input.0 * self.input.1 * 3
    }

    /// Image `i` read from disk at its own size, with that (H, W) and its boxes in its own
    /// pixels (the stored input-coordinate boxes scaled back): what keep-ratio training
    /// ([`det_keep_ratio`]) starts from.
    pub fn full(&self, i: usize) -> Result<FullDet, DenseError> {
        let im = &self.images[i];
        let img = image::open(&im.path).map_err(|_| unreadable(&im.path))?.to_rgb8();
        let hw = (img.height() as usize, img.width() as usize);
        if hw != im.orig {
            return Err(DenseError::Data(format!(
                "{}: {}x{} now, {}x{} when the split was indexed",
                im.path.display(),
                hw.0,
                hw.1,
                im.orig.0,
                im.orig.1
            )));
        }
        let (sy, sx) = (hw.0 as f32 / self.input.0 as f32, hw.1 as f32 / self.input.1 as f32);
        let boxes = im.boxes.iter().map(|b| [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy]).collect();
        Ok((img.into_raw(), hw, boxes))
    }

    /// Decode a streamed split into memory, in parallel; images that no longer decode are
    /// dropped and counted. A split in memory is returned as it is.
    pub fn into_decoded(mut self) -> Result<Self, DenseError> {
        if !self.streamed {
            return Ok(self);
        }
        let dir = folder_of(self.images.first().map(|i| i.path.as_path()));
        let paths: Vec<PathBuf> = self.images.iter().map(|i| i.path.clone()).collect();
        let decoded = decode_all(&paths, self.input);
        let mut images = Vec::with_capacity(self.images.len());
        for (mut im, d) in self.images.into_iter().zip(decoded) {
            match d {
                Some((rgb, _)) => {
                    im.rgb = rgb;
                    images.push(im);
                }
                None => self.skipped.unreadable_images += 1,
            }
        }
        if images.is_empty() {
            return Err(DenseError::Data(format!("{dir}: no usable images")));
        }
        let kept: std::collections::HashSet<u64> = images.iter().map(|i| i.id).collect();
        self.gt.retain(|g| kept.contains(&g.image_id));
        Ok(DetDataset { images, streamed: false, ..self })
    }
}

#[derive(Deserialize)]
struct CocoFile {
    images: Vec<CocoImage>,
    #[serde(default)]
    annotations: Vec<CocoAnn>,
    categories: Vec<CocoCat>,
}
#[derive(Deserialize)]
struct CocoImage {
    id: u64,
    file_name: String,
    width: usize,
    height: usize,
}
#[derive(Deserialize)]
struct CocoAnn {
    image_id: u64,
    category_id: u64,
    bbox: Vec<f64>,
    #[serde(default)]
    area: Option<f64>,
    #[serde(default)]
    iscrowd: u8,
}
#[derive(Deserialize)]
struct CocoCat {
    id: u64,
    name: String,
}

fn io_err(p: &Path, e: impl std::fmt::Display) -> DenseError {
    DenseError::Io(format!("{}: {e}", p.display()))
}

/// Decoded RGB pixels at the model input, and the original (H, W).
type Decoded = Option<(Vec<u8>, (usize, usize))>;

/// The folder of `p`, for messages.
fn folder_of(p: Option<&Path>) -> String {
    p.and_then(Path::parent).map_or_else(String::new, |d| d.display().to_string())
}

fn unreadable(p: &Path) -> DenseError {
    DenseError::Data(format!("{}: no longer decodes (it did when the split was indexed)", p.display()))
}

/// The (H, W) mmcv's `imrescale` gives an (H, W) image for `scale` (mmseg's / mmdet's
/// `img_scale` with `keep_ratio=True`, e.g. ADE20K's test scale (2048, 512)): the aspect ratio
/// kept, the long side at most the larger of `scale`, the short side at most the smaller, as
/// large as that allows (scaled up or down), rounded as `rescale_size` rounds (`int(x + 0.5)`).
pub fn keep_ratio_size((h, w): (usize, usize), scale: (usize, usize)) -> (usize, usize) {
    let (long, short) = (scale.0.max(scale.1) as f64, scale.0.min(scale.1) as f64);
    let factor = (long / h.max(w) as f64).min(short / h.min(w) as f64);
    let r = |n: usize| ((n as f64 * factor + 0.5) as usize).max(1);
    (r(h), r(w))
}

/// Resize an RGB image (H x W x 3 bytes) to `to` as OpenCV's `cv2.resize(INTER_LINEAR)` does,
/// which mmcv's `imresize` / `imrescale` call: bilinear on half-pixel centres, edge pixels
/// repeated, no antialiasing when shrinking (unlike the triangle filter the training splits are
/// decoded with): `resample`, the training geometry's bilinear, over the whole image. OpenCV
/// computes in 11-bit fixed point; this in f32, within 1 of it per byte (tested against `cv2`
/// when Python has it).
pub fn resize_bilinear_cv2(rgb: &[u8], from: (usize, usize), to: (usize, usize)) -> Vec<u8> {
    let (h, w) = from;
    assert_eq!(rgb.len(), h * w * 3, "an RGB image of {h}x{w}");
    if from == to {
        return rgb.to_vec();
    }
    // The whole image as the window: half-pixel centres, clamped at the edges, nothing filled.
    resample(rgb, from, 3, [0.0, 0.0, w as f32, h as f32], to, &[0; 3], false)
}

/// How the test pipeline of mmdet / mmseg resizes an image (`Resize` in `MultiScaleFlipAug`,
/// then `Pad`), with OpenCV's bilinear ([`resize_bilinear_cv2`]), from the image's file: what
/// an official checkpoint was tested with (spec §12), where the runs of `emo train --task` test
/// at the input they trained at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestScale {
    /// mmcv's `img_scale`: (W, H) to resize to; with `keep_ratio`, the (long, short) bounds, in
    /// either order ([`keep_ratio_size`]).
    pub scale: (usize, usize),
    pub keep_ratio: bool,
    /// Pad the normalised image with zeros at the bottom and right to a multiple of this
    /// (mmdet's `Pad(size_divisor=32)`); 1: no padding. Detection only.
    #[serde(default = "no_pad")]
    pub pad: usize,
}

fn no_pad() -> usize {
    1
}

/// mmdet's `Pad(size_divisor=32)`: a detector's keep-ratio image (RetinaNet's, in training and
/// test) is zero-padded to a multiple of this.
pub const DETECTION_PAD: usize = 32;

/// (H, W) rounded up to multiples of `pad` (0 or 1: unchanged).
pub fn pad_to((h, w): (usize, usize), pad: usize) -> (usize, usize) {
    let p = pad.max(1);
    (h.div_ceil(p) * p, w.div_ceil(p) * p)
}

/// The (H, W) a batch of images of `sizes` runs at: each padded to `pad`, then the batch to its
/// largest (mmdet's `Pad`, then collate).
pub fn batch_size_padded(sizes: &[(usize, usize)], pad: usize) -> (usize, usize) {
    sizes.iter().map(|&s| pad_to(s, pad)).fold((0, 0), |a, s| (a.0.max(s.0), a.1.max(s.1)))
}

impl TestScale {
    /// mmseg's ADE20K test resize: keep-ratio (2048, 512), no padding.
    pub const ADE20K: TestScale = TestScale { scale: (2048, 512), keep_ratio: true, pad: 1 };
    /// mmdet's SSDLite test resize: (320, 320), the aspect ratio not kept.
    pub const SSDLITE: TestScale = TestScale { scale: (320, 320), keep_ratio: false, pad: 1 };
    /// mmdet's RetinaNet (1x COCO) test resize: keep-ratio (1333, 800), padded to 32.
    pub const RETINANET: TestScale = TestScale { scale: (1333, 800), keep_ratio: true, pad: DETECTION_PAD };

    /// The official config's test resize of `task` (spec §12).
    pub fn paper(task: emo_spec::Task) -> Self {
        match task {
            emo_spec::Task::SsdLite => Self::SSDLITE,
            emo_spec::Task::RetinaNet => Self::RETINANET,
            _ => Self::ADE20K,
        }
    }

    /// Keep-ratio at (long, short) bounds, no padding.
    pub fn keep_ratio(scale: (usize, usize)) -> Self {
        TestScale { scale, keep_ratio: true, pad: 1 }
    }

    /// Keep-ratio at (long, short) bounds as `task`'s pipelines resize: a detector's input
    /// padded to [`DETECTION_PAD`], a segmenter's not.
    pub fn keep_ratio_for(task: emo_spec::Task, scale: (usize, usize)) -> Self {
        let pad = if task.is_detection() { DETECTION_PAD } else { 1 };
        TestScale { pad, ..Self::keep_ratio(scale) }
    }

    /// The (H, W) an (H, W) image is resized to.
    pub fn resized(&self, hw: (usize, usize)) -> (usize, usize) {
        if self.keep_ratio { keep_ratio_size(hw, self.scale) } else { (self.scale.1, self.scale.0) }
    }

    /// The (H, W) the model runs on: `resized`, padded up to a multiple of `pad`.
    pub fn padded(&self, resized: (usize, usize)) -> (usize, usize) {
        pad_to(resized, self.pad)
    }

    /// Read `path` and resize it.
    pub fn load(&self, path: &Path) -> Result<Resized, DenseError> {
        let img = image::open(path).map_err(|_| unreadable(path))?.to_rgb8();
        let orig = (img.height() as usize, img.width() as usize);
        let (rgb, size) = self.apply(&img);
        Ok(Resized { rgb, size, orig })
    }

    /// Resize a decoded image: (RGB, its resized (H, W)).
    pub fn apply(&self, img: &image::RgbImage) -> (Vec<u8>, (usize, usize)) {
        let orig = (img.height() as usize, img.width() as usize);
        let to = self.resized(orig);
        (resize_bilinear_cv2(img.as_raw(), orig, to), to)
    }

    /// "keep-ratio 2048x512" / "1333x800 keep-ratio, padded to 32" / "320x320".
    pub fn describe(&self) -> String {
        let (a, b) = self.scale;
        let pad = if self.pad > 1 { format!(", padded to {}", self.pad) } else { String::new() };
        if self.keep_ratio { format!("keep-ratio {a}x{b}{pad}") } else { format!("{b}x{a}{pad}") }
    }
}

/// An image resized by a [`TestScale`].
#[derive(Clone, Debug, PartialEq)]
pub struct Resized {
    /// RGB, `size` (H, W) of it.
    pub rgb: Vec<u8>,
    pub size: (usize, usize),
    /// The image's own (H, W).
    pub orig: (usize, usize),
}

/// Decode one image and squeeze it to `size` ([`squeeze_rgb`]); `None` if unreadable.
fn decode_image(p: &Path, size: (usize, usize)) -> Decoded {
    let img = image::open(p).ok()?.to_rgb8();
    let orig = (img.height() as usize, img.width() as usize);
    Some((if orig == size { img.into_raw() } else { squeeze_rgb(&img, size) }, orig))
}

/// An RGB image resized to (H, W) `size`, the aspect ratio not kept, as the splits are decoded
/// for training at the input and `emo detect` / `emo segment` squeeze a photo: the triangle
/// (bilinear, antialiased) filter; the pixels as they are at their own size.
pub fn squeeze_rgb(img: &image::RgbImage, size: (usize, usize)) -> Vec<u8> {
    if (img.height() as usize, img.width() as usize) == size {
        return img.as_raw().clone();
    }
    image::imageops::resize(img, size.1 as u32, size.0 as u32, FilterType::Triangle).into_raw()
}

/// Decode images and resize them to `size` (bilinear) in parallel; `None` for unreadable ones.
fn decode_all(paths: &[PathBuf], size: (usize, usize)) -> Vec<Decoded> {
    emo_train::parallel::map_each(paths, emo_train::parallel::cores(), |p| decode_image(p, size))
}

/// The (H, W) of each image from its header alone, in parallel; `None` for unreadable ones.
fn read_headers(paths: &[PathBuf]) -> Vec<Option<(usize, usize)>> {
    emo_train::parallel::map_each(paths, emo_train::parallel::cores(), |p| {
        image::image_dimensions(p).ok().map(|(w, h)| (h as usize, w as usize))
    })
}

/// A decoded label map: at the input size (nearest) and, with `keep_full`, also at its original
/// size where that differs.
type DecodedLabel = Option<(Vec<u8>, Option<LabelMap>)>;

/// Decode one label map at `size` (nearest) and, with `keep_full`, also at its original size
/// where that differs; `None` if unreadable.
fn decode_label(p: &Path, size: (usize, usize), keep_full: bool) -> DecodedLabel {
    let full = decode_label_full(p)?;
    if (full.h, full.w) == size {
        return Some((full.data, None));
    }
    let img = image::GrayImage::from_raw(full.w as u32, full.h as u32, full.data)?;
    let resized = image::imageops::resize(&img, size.1 as u32, size.0 as u32, FilterType::Nearest).into_raw();
    Some((resized, keep_full.then(|| LabelMap { h: full.h, w: full.w, data: img.into_raw() })))
}

/// Decode one label map at its original size; `None` if unreadable.
fn decode_label_full(p: &Path) -> Option<LabelMap> {
    let img = image::open(p).ok()?.to_luma8();
    let (h, w) = (img.height() as usize, img.width() as usize);
    Some(LabelMap { h, w, data: img.into_raw() })
}

/// Decode label maps in parallel ([`decode_label`]).
fn decode_labels(paths: &[PathBuf], size: (usize, usize), keep_full: bool) -> Vec<DecodedLabel> {
    emo_train::parallel::map_each(paths, emo_train::parallel::cores(), |p| decode_label(p, size, keep_full))
}

/// ADE20K's `reduce_zero_label` (0 -> 255, the rest down by one), then the check that every
/// value is a class or 255: an error that names the file.
fn prepare_label(map: &mut [u8], reduce_zero_label: bool, classes: usize, path: &Path) -> Result<(), DenseError> {
    if reduce_zero_label {
        map.iter_mut().for_each(|v| *v = if *v == 0 || *v == 255 { 255 } else { *v - 1 });
    }
    match map.iter().find(|&&v| v != 255 && v as usize >= classes) {
        Some(bad) => {
            Err(DenseError::Data(format!("{}: label {bad} but only {classes} classes (255 = ignore)", path.display())))
        }
        None => Ok(()),
    }
}

/// Load `<root>/annotations/instances_<split>.json` with images under `<root>/images/<split>/`
/// (or `<root>/<split>/` / `<root>/images/`), decoded and resized to `input` (H, W).
/// `keep_empty`: keep images without boxes (evaluation) or skip them (training, as mmdet's
/// `filter_empty_gt`). `limit > 0` keeps only the first `limit` images (by id), and only those
/// are decoded.
pub fn load_coco(
    root: &Path,
    split: &str,
    input: (usize, usize),
    keep_empty: bool,
    limit: usize,
) -> Result<DetDataset, DenseError> {
    index_coco(root, split, input, keep_empty, limit)?.into_decoded()
}

/// [`load_coco`] without decoding: a streamed split, whose images are read from disk when
/// needed ([`DetDataset::rgb`]). Every image's header is read (its size scales the boxes);
/// images whose header does not read are skipped and counted.
pub fn index_coco(
    root: &Path,
    split: &str,
    input: (usize, usize),
    keep_empty: bool,
    limit: usize,
) -> Result<DetDataset, DenseError> {
    let json = root.join("annotations").join(format!("instances_{split}.json"));
    let text = std::fs::read_to_string(&json).map_err(|e| io_err(&json, e))?;
    let file: CocoFile = serde_json::from_str(&text)
        .map_err(|e| DenseError::Data(format!("{}: not a COCO file: {e}", json.display())))?;
    if file.categories.is_empty() {
        return Err(DenseError::Data(format!("{}: no categories", json.display())));
    }
    let img_dir = [root.join("images").join(split), root.join(split), root.join("images")]
        .into_iter()
        .find(|d| d.is_dir())
        .ok_or_else(|| DenseError::Data(format!("{}: no images/{split} folder", root.display())))?;
    let mut cats: Vec<&CocoCat> = file.categories.iter().collect();
    cats.sort_by_key(|c| c.id);
    let cat_index: HashMap<u64, usize> = cats.iter().enumerate().map(|(i, c)| (c.id, i)).collect();
    let mut skipped = Skipped::default();
    let sizes: HashMap<u64, (usize, usize)> = file.images.iter().map(|i| (i.id, (i.height, i.width))).collect();
    let mut per_image: BTreeMap<u64, Vec<(BBox, usize)>> = BTreeMap::new();
    let mut gt = Vec::new();
    for a in &file.annotations {
        let Some(&(h, w)) = sizes.get(&a.image_id) else {
            skipped.unknown_image += 1;
            continue;
        };
        let Some(&label) = cat_index.get(&a.category_id) else {
            skipped.unknown_category += 1;
            continue;
        };
        if a.bbox.len() != 4 || a.bbox.iter().any(|v| !v.is_finite()) || a.bbox[2] <= 0.0 || a.bbox[3] <= 0.0 {
            skipped.degenerate_box += 1;
            continue;
        }
        let (x1, y1, x2, y2) = (a.bbox[0], a.bbox[1], a.bbox[0] + a.bbox[2], a.bbox[1] + a.bbox[3]);
        let (cx1, cy1, cx2, cy2) = (x1.max(0.0), y1.max(0.0), x2.min(w as f64), y2.min(h as f64));
        if cx2 - cx1 < 1.0 || cy2 - cy1 < 1.0 {
            skipped.box_outside_image += 1;
            continue;
        }
        if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2) {
            skipped.clipped_box += 1;
        }
        let bbox = [cx1, cy1, cx2 - cx1, cy2 - cy1];
        gt.push(GtBox {
            image_id: a.image_id,
            category_id: a.category_id,
            bbox,
            area: a.area.unwrap_or(bbox[2] * bbox[3]),
            iscrowd: a.iscrowd != 0,
        });
        if a.iscrowd == 0 {
            per_image.entry(a.image_id).or_default().push(([cx1 as f32, cy1 as f32, cx2 as f32, cy2 as f32], label));
        }
    }
    let mut entries: Vec<&CocoImage> = file.images.iter().collect();
    entries.sort_by_key(|i| i.id);
    if !keep_empty {
        let before = entries.len();
        entries.retain(|i| per_image.contains_key(&i.id));
        skipped.empty_images = before - entries.len();
    }
    if limit > 0 {
        entries.truncate(limit);
    }
    let paths: Vec<PathBuf> = entries.iter().map(|i| img_dir.join(&i.file_name)).collect();
    let headers = read_headers(&paths);
    let mut images = Vec::new();
    for ((e, path), orig) in entries.iter().zip(paths).zip(headers) {
        let Some(orig) = orig else {
            skipped.unreadable_images += 1;
            continue;
        };
        let (sy, sx) = (input.0 as f32 / orig.0 as f32, input.1 as f32 / orig.1 as f32);
        let anns = per_image.remove(&e.id).unwrap_or_default();
        images.push(DetImage {
            id: e.id,
            file: e.file_name.clone(),
            path,
            orig,
            rgb: Vec::new(),
            boxes: anns.iter().map(|(b, _)| [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy]).collect(),
            labels: anns.iter().map(|&(_, l)| l).collect(),
        });
    }
    if images.is_empty() {
        return Err(DenseError::Data(format!("{}: no usable images", json.display())));
    }
    let kept: std::collections::HashSet<u64> = images.iter().map(|i| i.id).collect();
    gt.retain(|g| kept.contains(&g.image_id));
    Ok(DetDataset {
        images,
        classes: cats.iter().map(|c| c.name.clone()).collect(),
        cat_ids: cats.iter().map(|c| c.id).collect(),
        gt,
        input,
        skipped,
        streamed: true,
        test_scale: None,
    })
}

/// One segmentation image and its label map, both at the model input size.
#[derive(Clone, Debug)]
pub struct SegImage {
    pub file: String,
    /// Where the image and its label map are read from.
    pub path: PathBuf,
    pub label_path: PathBuf,
    /// RGB at the model input size; empty in a streamed split ([`SegDataset::pair`] decodes it).
    pub rgb: Vec<u8>,
    /// The label map at the model input size (nearest), what training uses; empty in a
    /// streamed split.
    pub label: Vec<u8>,
    /// Evaluation splits: the label map at its original size where that differs from the input,
    /// which mIoU is computed on (mmseg rescales the logits to the original image).
    pub full: Option<LabelMap>,
}

/// A label map at its original size.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelMap {
    pub h: usize,
    pub w: usize,
    pub data: Vec<u8>,
}

impl SegImage {
    /// The label map evaluation scores against, and its (H, W): the original one, else the one
    /// at the input size `input`.
    pub fn eval_label(&self, input: (usize, usize)) -> (&[u8], (usize, usize)) {
        match &self.full {
            Some(f) => (&f.data, (f.h, f.w)),
            None => (&self.label, input),
        }
    }
}

#[derive(Clone, Debug)]
pub struct SegDataset {
    pub images: Vec<SegImage>,
    pub classes: Vec<String>,
    pub input: (usize, usize),
    pub skipped: Skipped,
    /// ADE20K's label convention (applied as the label maps are decoded).
    pub reduce_zero_label: bool,
    /// The images and label maps stay on disk and are decoded when needed ([`index_seg`]).
    pub streamed: bool,
    /// Evaluation resizes each image from its file as this says instead of to `input`
    /// ([`SegDataset::with_test_scale`]).
    pub test_scale: Option<TestScale>,
}

/// An image's RGB and its label map at the input size, borrowed from a decoded split or decoded
/// now from a streamed one.
pub type Pair<'a> = (Cow<'a, [u8]>, Cow<'a, [u8]>);

/// An image's RGB and label map at their own (H, W) ([`SegDataset::pair_full`]).
pub type FullPair = (Vec<u8>, Vec<u8>, (usize, usize));

/// A detection image at its own size ([`DetDataset::full`]): RGB, (H, W), boxes in its pixels.
pub type FullDet = (Vec<u8>, (usize, usize), Vec<BBox>);

/// What evaluation needs of one image ([`SegDataset::eval_pair`]).
pub struct EvalPair<'a> {
    /// The RGB pixels the model runs on, `input` (H, W) of them.
    pub rgb: Cow<'a, [u8]>,
    /// The split's input size, or the image's own keep-ratio size under a test scale
    /// ([`SegDataset::with_test_scale`]).
    pub input: (usize, usize),
    /// The label map scored against, `size` (H, W): the original one where the split has it.
    pub label: Cow<'a, [u8]>,
    pub size: (usize, usize),
}

impl SegDataset {
    /// Image `i`'s RGB and label map at the input size: the decoded ones, or in a streamed split
    /// both read from disk now (an error naming the file if one no longer decodes or holds a
    /// label that is not a class).
    pub fn pair(&self, i: usize) -> Result<Pair<'_>, DenseError> {
        let im = &self.images[i];
        if !self.streamed {
            return Ok((Cow::Borrowed(&im.rgb), Cow::Borrowed(&im.label)));
        }
        let (rgb, _) = decode_image(&im.path, self.input).ok_or_else(|| unreadable(&im.path))?;
        let (mut label, _) =
            decode_label(&im.label_path, self.input, false).ok_or_else(|| unreadable(&im.label_path))?;
        prepare_label(&mut label, self.reduce_zero_label, self.classes.len(), &im.label_path)?;
        Ok((Cow::Owned(rgb), Cow::Owned(label)))
    }

    /// Image `i`'s RGB and label map at their own size, read from disk in either mode (the
    /// label map prepared as the split's: `reduce_zero_label`, checked), and that (H, W): what
    /// keep-ratio training ([`seg_geometry_keep_ratio`]) starts from.
    pub fn pair_full(&self, i: usize) -> Result<FullPair, DenseError> {
        let im = &self.images[i];
        let img = image::open(&im.path).map_err(|_| unreadable(&im.path))?.to_rgb8();
        let hw = (img.height() as usize, img.width() as usize);
        let LabelMap { h, w, data } = self.full_label(im)?;
        if (h, w) != hw {
            return Err(DenseError::Data(format!(
                "{}: label map {h}x{w}, image {}x{}",
                im.label_path.display(),
                hw.0,
                hw.1
            )));
        }
        Ok((img.into_raw(), data, hw))
    }

    /// `im`'s label map at its original size, read from disk and prepared as the split's
    /// (`reduce_zero_label`, checked against the classes).
    fn full_label(&self, im: &SegImage) -> Result<LabelMap, DenseError> {
        let mut map = decode_label_full(&im.label_path).ok_or_else(|| unreadable(&im.label_path))?;
        prepare_label(&mut map.data, self.reduce_zero_label, self.classes.len(), &im.label_path)?;
        Ok(map)
    }

    /// Image `i`'s RGB at the input size with the label map evaluation scores against and its
    /// (H, W) ([`SegImage::eval_label`]): borrowed from a decoded split, or in a streamed split
    /// read from disk now, the label map at its original size (an error naming the file if one no
    /// longer decodes or holds a label that is not a class).
    ///
    /// Under a test scale ([`with_test_scale`](Self::with_test_scale)) the image is read from disk
    /// in either mode and resized keeping its aspect ratio, as mmseg's test pipeline resizes it.
    pub fn eval_pair(&self, i: usize) -> Result<EvalPair<'_>, DenseError> {
        let im = &self.images[i];
        if !self.streamed && self.test_scale.is_none() {
            let (label, size) = im.eval_label(self.input);
            return Ok(EvalPair { rgb: Cow::Borrowed(&im.rgb), input: self.input, label: Cow::Borrowed(label), size });
        }
        let (rgb, input) = match self.test_scale {
            Some(ts) => {
                let r = ts.load(&im.path)?;
                (r.rgb, r.size)
            }
            None => (decode_image(&im.path, self.input).ok_or_else(|| unreadable(&im.path))?.0, self.input),
        };
        // Scored at its original size (what `eval_label` gives a split decoded with `keep_full`):
        // no resize to the input needed.
        let (label, size) = if self.streamed {
            let LabelMap { h, w, data } = self.full_label(im)?;
            (Cow::Owned(data), (h, w))
        } else {
            let (label, size) = im.eval_label(self.input);
            (Cow::Borrowed(label), size)
        };
        Ok(EvalPair { rgb: Cow::Owned(rgb), input, label, size })
    }

    /// Evaluate at a test scale (mmseg's test `img_scale`, e.g. ADE20K's keep-ratio (2048, 512)):
    /// each image resized from its file by [`TestScale::load`] instead of to the split's fixed
    /// input size. The model then runs on each image at its own size (batched with images of the
    /// same size). Padding is a detection setting: an error here.
    pub fn with_test_scale(self, scale: Option<TestScale>) -> Result<Self, DenseError> {
        if scale.is_some_and(|s| s.pad > 1) {
            return Err(DenseError::Data("a segmentation test scale pads nothing (pad 1)".into()));
        }
        Ok(SegDataset { test_scale: scale, ..self })
    }

    /// Bytes the split takes decoded in memory (H x W x 3 an image, H x W its label map; label
    /// maps kept at their original size for evaluation not counted).
    pub fn decoded_bytes(&self) -> usize {
        self.images.len() * self.input.0 * self.input.1 * 4
    }

    /// Decode a streamed split into memory, in parallel; pairs that no longer decode are
    /// dropped and counted. `keep_full` (evaluation): keep each label map at its original size
    /// too where that differs from the input ([`SegImage::full`]). A split already in memory is
    /// returned as it is.
    pub fn into_decoded(mut self, keep_full: bool) -> Result<Self, DenseError> {
        if !self.streamed {
            return Ok(self);
        }
        let dir = folder_of(self.images.first().map(|i| i.path.as_path()));
        let imgs = decode_all(&self.images.iter().map(|p| p.path.clone()).collect::<Vec<_>>(), self.input);
        let labs =
            decode_labels(&self.images.iter().map(|p| p.label_path.clone()).collect::<Vec<_>>(), self.input, keep_full);
        let mut images = Vec::with_capacity(self.images.len());
        for ((mut im, rgb), lb) in self.images.into_iter().zip(imgs).zip(labs) {
            let (Some((rgb, _)), Some((mut label, mut full))) = (rgb, lb) else {
                self.skipped.unreadable_images += 1;
                continue;
            };
            for map in std::iter::once(&mut label).chain(full.as_mut().map(|f| &mut f.data)) {
                prepare_label(map, self.reduce_zero_label, self.classes.len(), &im.label_path)?;
            }
            (im.rgb, im.label, im.full) = (rgb, label, full);
            images.push(im);
        }
        if images.is_empty() {
            return Err(DenseError::Data(format!("{dir}: no usable image/label pairs")));
        }
        Ok(SegDataset { images, streamed: false, ..self })
    }

    /// A streamed split with every label map decoded and checked once, in parallel, then dropped
    /// (so a bad label value is an error now, not mid-run); pairs whose label map does not read
    /// are dropped and counted.
    pub fn checked(mut self) -> Result<Self, DenseError> {
        if !self.streamed {
            // Checked as it was decoded.
            return Ok(self);
        }
        let dir = folder_of(self.images.first().map(|i| i.path.as_path()));
        let (input, rzl, classes) = (self.input, self.reduce_zero_label, self.classes.len());
        let checks = emo_train::parallel::map_each(&self.images, emo_train::parallel::cores(), |im| {
            let (mut map, _) = decode_label(&im.label_path, input, false)?;
            Some(prepare_label(&mut map, rzl, classes, &im.label_path))
        });
        let mut images = Vec::with_capacity(self.images.len());
        for (im, check) in self.images.into_iter().zip(checks) {
            match check {
                Some(check) => {
                    check?;
                    images.push(im);
                }
                None => self.skipped.unreadable_images += 1,
            }
        }
        if images.is_empty() {
            return Err(DenseError::Data(format!("{dir}: no usable image/label pairs")));
        }
        Ok(SegDataset { images, ..self })
    }
}

/// Whether `root` is ADE20K as it ships (`ADEChallengeData2016`): `images/training` with
/// `annotations/training`, and no `classes.txt`. Its label maps hold 0 = "other" and the 150
/// classes as 1..=150, so it is read with ADE20K's class names and `reduce_zero_label`, as mmseg's
/// `ADE20KDataset` reads it.
pub fn ade20k_layout(root: &Path) -> bool {
    !root.join("classes.txt").exists()
        && root.join("images").join("training").is_dir()
        && root.join("annotations").join("training").is_dir()
}

/// Whether `root` is COCO 2017 as it unpacks: `annotations/instances_train2017.json` (where
/// `emo train --task retinanet` then trains as mmdet does, keep-ratio 1333x800).
pub fn coco2017_layout(root: &Path) -> bool {
    root.join("annotations").join("instances_train2017.json").is_file()
}

/// The folder name a dataset gives the split asked for as `split`: `split` itself when the
/// dataset has it, else the name its own layout uses for it (COCO 2017's `train2017` / `val2017`,
/// ADE20K's `training` / `validation`), else `split` (whose absence the loader then reports).
pub fn resolve_split(root: &Path, split: &str, detection: bool) -> String {
    let exists = |s: &str| {
        if detection {
            root.join("annotations").join(format!("instances_{s}.json")).is_file()
        } else {
            root.join("images").join(s).is_dir()
        }
    };
    if exists(split) {
        return split.to_string();
    }
    let alternatives: &[&str] = match (detection, split) {
        (true, "train") => &["train2017"],
        (true, "val") => &["val2017"],
        (false, "train") => &["training"],
        (false, "val") => &["validation"],
        _ => &[],
    };
    alternatives.iter().find(|s| exists(s)).map_or_else(|| split.to_string(), |s| s.to_string())
}

/// Class names of a segmentation folder: `classes.txt` (one per line) if present; ADE20K's 150
/// for a folder in ADE20K's layout ([`ade20k_layout`]).
fn seg_classes(root: &Path, n: Option<usize>) -> Result<Vec<String>, DenseError> {
    let p = root.join("classes.txt");
    if p.exists() {
        let s = std::fs::read_to_string(&p).map_err(|e| io_err(&p, e))?;
        return Ok(s.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect());
    }
    if ade20k_layout(root) {
        return Ok(crate::names::ADE20K_CLASSES.map(String::from).to_vec());
    }
    n.map(|n| (0..n).map(|i| format!("class{i}")).collect())
        .ok_or_else(|| DenseError::Data(format!("{}: no classes.txt (give the number of classes)", root.display())))
}

/// Load a segmentation split: `images/<split>/NAME.{png,jpg}` with `labels/<split>/NAME.png`
/// (or ADE20K's `annotations/<split>/`), decoded at the input size. Label values >= the class
/// count other than 255 are an error that names the file; `reduce_zero_label` maps 0 to 255 and
/// shifts the rest down (ADE20K). `limit > 0` keeps only the first `limit` pairs (by name), and
/// only those are decoded. `keep_full` (evaluation): keep each label map at its original size
/// too where that differs from `input` ([`SegImage::full`]).
pub fn load_seg(
    root: &Path,
    split: &str,
    input: (usize, usize),
    reduce_zero_label: bool,
    num_classes: Option<usize>,
    limit: usize,
    keep_full: bool,
) -> Result<SegDataset, DenseError> {
    list_seg(root, split, input, reduce_zero_label, num_classes, limit)?.into_decoded(keep_full)
}

/// [`load_seg`] without keeping the pixels: a streamed split, whose pairs are read from disk when
/// needed ([`SegDataset::pair`]). Every image's header is read and every label map decoded and
/// checked once (so a bad label value is an error now, not mid-run), then dropped; pairs that
/// do not read are skipped and counted.
pub fn index_seg(
    root: &Path,
    split: &str,
    input: (usize, usize),
    reduce_zero_label: bool,
    num_classes: Option<usize>,
    limit: usize,
) -> Result<SegDataset, DenseError> {
    list_seg(root, split, input, reduce_zero_label, num_classes, limit)?.checked()
}

/// The pairs of a segmentation split, each image's header read (unreadable ones skipped and
/// counted), the label maps not yet opened: what [`SegDataset::checked`] (streamed) or
/// [`SegDataset::into_decoded`] (in memory) completes, each reading every label map once.
pub(crate) fn list_seg(
    root: &Path,
    split: &str,
    input: (usize, usize),
    reduce_zero_label: bool,
    num_classes: Option<usize>,
    limit: usize,
) -> Result<SegDataset, DenseError> {
    let classes = seg_classes(root, num_classes)?;
    if ade20k_layout(root) && !reduce_zero_label {
        return Err(DenseError::Data(format!(
            "{}: ADE20K's layout without classes.txt: its label maps hold 0 = other and the 150 classes as \
             1-150, read with reduce_zero_label (`emo train` sets it for such a folder); or write classes.txt",
            root.display()
        )));
    }
    let img_dir = root.join("images").join(split);
    let lab_dir = [root.join("labels").join(split), root.join("annotations").join(split)]
        .into_iter()
        .find(|d| d.is_dir())
        .ok_or_else(|| {
            DenseError::Data(format!("{}: no labels/{split} or annotations/{split} folder", root.display()))
        })?;
    let mut names: Vec<PathBuf> = std::fs::read_dir(&img_dir)
        .map_err(|e| io_err(&img_dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    let mut skipped = Skipped::default();
    let mut pairs = Vec::new();
    for p in names {
        let stem = p.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        let lab = lab_dir.join(format!("{stem}.png"));
        if lab.exists() {
            pairs.push((p, lab));
        } else {
            skipped.missing_label_map += 1;
        }
    }
    if limit > 0 {
        pairs.truncate(limit);
    }
    let headers = read_headers(&pairs.iter().map(|p| p.0.clone()).collect::<Vec<_>>());
    let mut images = Vec::new();
    for ((path, label_path), header) in pairs.into_iter().zip(headers) {
        if header.is_none() {
            skipped.unreadable_images += 1;
            continue;
        }
        let file = path.file_name().unwrap_or_default().to_string_lossy().into();
        images.push(SegImage { file, path, label_path, rgb: Vec::new(), label: Vec::new(), full: None });
    }
    if images.is_empty() {
        return Err(DenseError::Data(format!("{}: no usable image/label pairs", img_dir.display())));
    }
    Ok(SegDataset { images, classes, input, skipped, reduce_zero_label, streamed: true, test_scale: None })
}

/// Settings of the Fashion-MNIST canvas set.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CanvasConfig {
    /// Canvas side in pixels.
    pub size: usize,
    pub train: usize,
    pub val: usize,
    /// Items per canvas (inclusive range).
    pub items: (usize, usize),
    /// Item scale range (28 px times this).
    pub scale: (f32, f32),
    /// `fine`: the 10 Fashion-MNIST classes; `coarse`: tops / trousers / footwear / bags.
    pub coarse: bool,
    pub seed: u64,
}

impl Default for CanvasConfig {
    fn default() -> Self {
        CanvasConfig { size: 128, train: 4000, val: 500, items: (1, 3), scale: (1.5, 3.0), coarse: false, seed: 0 }
    }
}

pub const FMNIST_CLASSES: [&str; 10] =
    ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"];
const COARSE: [(&str, &[usize]); 4] =
    [("top", &[0, 2, 3, 4, 6]), ("trouser", &[1]), ("footwear", &[5, 7, 9]), ("bag", &[8])];

/// Build the canvas set from real Fashion-MNIST items (train items for `train`, test items
/// for `val`) under `out`: `images/{train,val}/*.png`, `annotations/instances_{train,val}.json`
/// (COCO; `area` = mask pixels), `labels/{train,val}/*.png` (0 = background, class + 1 per
/// item pixel) and `classes.txt` (background first).
pub fn make_canvas(out: &Path, cfg: &CanvasConfig, fmnist_dir: Option<&Path>) -> Result<(), DenseError> {
    let (train, test) = emo_train::data::fashion_mnist(fmnist_dir).map_err(|e| DenseError::Data(e.to_string()))?;
    let names: Vec<&str> = if cfg.coarse { COARSE.iter().map(|c| c.0).collect() } else { FMNIST_CLASSES.to_vec() };
    let class_of = |l: u8| -> usize {
        if cfg.coarse {
            COARSE.iter().position(|c| c.1.contains(&(l as usize))).expect("coarse class")
        } else {
            l as usize
        }
    };
    let mut rng = Rng::new(cfg.seed);
    for (split, src, n) in [("train", &train, cfg.train), ("val", &test, cfg.val)] {
        let (idir, ldir) = (out.join("images").join(split), out.join("labels").join(split));
        for d in [&idir, &ldir, &out.join("annotations")] {
            std::fs::create_dir_all(d).map_err(|e| io_err(d, e))?;
        }
        let mut images = Vec::new();
        let mut anns = Vec::new();
        let s = cfg.size;
        for i in 0..n {
            // Background: a random flat colour with mild noise.
            let bg: [f32; 3] = std::array::from_fn(|_| 20.0 + 80.0 * rng.uniform());
            let mut rgb: Vec<f32> = (0..s * s * 3).map(|k| bg[k % 3] + 12.0 * (rng.uniform() - 0.5)).collect();
            let mut label = vec![0u8; s * s];
            let count = cfg.items.0 + rng.below((cfg.items.1 - cfg.items.0 + 1) as u64) as usize;
            let mut placed: Vec<BBox> = Vec::new();
            for _ in 0..count {
                let idx = rng.below(src.len() as u64) as usize;
                let item = src.image(idx);
                let side = ((28.0 * (cfg.scale.0 + (cfg.scale.1 - cfg.scale.0) * rng.uniform())) as usize).min(s);
                let (mut x0, mut y0) = (0, 0);
                let mut ok = false;
                for _ in 0..20 {
                    x0 = rng.below((s - side + 1) as u64) as usize;
                    y0 = rng.below((s - side + 1) as u64) as usize;
                    let b = [x0 as f32, y0 as f32, (x0 + side) as f32, (y0 + side) as f32];
                    if placed.iter().all(|p| crate::boxes::iou(p, &b) < 0.2) {
                        ok = true;
                        break;
                    }
                }
                if !ok {
                    continue;
                }
                let tint: [f32; 3] = std::array::from_fn(|_| 0.5 + 0.5 * rng.uniform());
                let cls = class_of(src.labels[idx]);
                let (mut bx0, mut by0, mut bx1, mut by1, mut area) = (usize::MAX, usize::MAX, 0, 0, 0);
                for y in 0..side {
                    for x in 0..side {
                        // Bilinear sample of the 28x28 item.
                        let fy = ((y as f32 + 0.5) * 28.0 / side as f32 - 0.5).clamp(0.0, 27.0);
                        let fx = ((x as f32 + 0.5) * 28.0 / side as f32 - 0.5).clamp(0.0, 27.0);
                        let (iy, ix) = (fy as usize, fx as usize);
                        let (iy1, ix1) = ((iy + 1).min(27), (ix + 1).min(27));
                        let (dy, dx) = (fy - iy as f32, fx - ix as f32);
                        let p = |yy: usize, xx: usize| item[yy * 28 + xx] as f32;
                        let v = p(iy, ix) * (1.0 - dy) * (1.0 - dx)
                            + p(iy, ix1) * (1.0 - dy) * dx
                            + p(iy1, ix) * dy * (1.0 - dx)
                            + p(iy1, ix1) * dy * dx;
                        if v < 32.0 {
                            continue;
                        }
                        let (py, px) = (y0 + y, x0 + x);
                        let a = (v / 255.0).min(1.0);
                        for (c, t) in tint.iter().enumerate() {
                            let k = (py * s + px) * 3 + c;
                            rgb[k] = rgb[k] * (1.0 - a) + 255.0 * t * a;
                        }
                        label[py * s + px] = cls as u8 + 1;
                        area += 1;
                        (bx0, by0, bx1, by1) = (bx0.min(px), by0.min(py), bx1.max(px + 1), by1.max(py + 1));
                    }
                }
                if area == 0 {
                    continue;
                }
                placed.push([x0 as f32, y0 as f32, (x0 + side) as f32, (y0 + side) as f32]);
                anns.push(serde_json::json!({
                    "id": anns.len() + 1, "image_id": i + 1, "category_id": cls + 1,
                    "bbox": [bx0, by0, bx1 - bx0, by1 - by0], "area": area, "iscrowd": 0,
                }));
            }
            let file = format!("{i:06}.png");
            let bytes: Vec<u8> = rgb.iter().map(|v| v.round().clamp(0.0, 255.0) as u8).collect();
            let img = image::RgbImage::from_raw(s as u32, s as u32, bytes).expect("canvas size");
            img.save(idir.join(&file)).map_err(|e| io_err(&idir.join(&file), e))?;
            let lab = image::GrayImage::from_raw(s as u32, s as u32, label).expect("label size");
            lab.save(ldir.join(&file)).map_err(|e| io_err(&ldir.join(&file), e))?;
            images.push(serde_json::json!({"id": i + 1, "file_name": file, "width": s, "height": s}));
        }
        let cats: Vec<_> = names.iter().enumerate().map(|(i, n)| serde_json::json!({"id": i + 1, "name": n})).collect();
        let coco = serde_json::json!({"images": images, "annotations": anns, "categories": cats});
        let p = out.join("annotations").join(format!("instances_{split}.json"));
        emo_weights::write_atomic(&p, coco.to_string().as_bytes())?;
    }
    let classes: Vec<&str> = std::iter::once("background").chain(names.iter().copied()).collect();
    let p = out.join("classes.txt");
    emo_weights::write_atomic(&p, (classes.join("\n") + "\n").as_bytes())?;
    emo_weights::write_atomic(
        &out.join("canvas.json"),
        serde_json::to_string_pretty(cfg).unwrap_or_default().as_bytes(),
    )?;
    Ok(())
}

/// ImageNet mean / std (RGB, 0-255), as in the mmdet / mmseg configs.
pub const MEAN: [f32; 3] = [123.675, 116.28, 103.53];
pub const STD: [f32; 3] = [58.395, 57.12, 57.375];

/// HWC u8 RGB to normalised CHW f32 appended to `out`.
pub fn normalize_into(rgb: &[u8], h: usize, w: usize, out: &mut Vec<f32>) {
    for c in 0..3 {
        out.extend((0..h * w).map(|i| (rgb[i * 3 + c] as f32 - MEAN[c]) / STD[c]));
    }
}

/// Training augmentation shared by both tasks: horizontal flip (p 0.5), then
/// [`photometric_distortion`] (with mmdet's channel swap for detection, without for
/// segmentation as in mmseg).
pub fn augment(
    rng: &mut Rng,
    rgb: &mut [u8],
    label: Option<&mut [u8]>,
    mut boxes: Option<&mut [BBox]>,
    h: usize,
    w: usize,
) {
    if rng.uniform() < 0.5 {
        flip_rgb(rgb, w);
        if let Some(l) = label {
            for y in 0..h {
                l[y * w..(y + 1) * w].reverse();
            }
        }
        if let Some(bs) = boxes.as_deref_mut() {
            flip_boxes(bs, w);
        }
    }
    let detection = boxes.is_some();
    photometric_distortion(rng, rgb, if detection { 18.0 } else { 36.0 }, detection);
}

/// Mirror an RGB image `w` pixels wide left to right, in place.
fn flip_rgb(rgb: &mut [u8], w: usize) {
    for row in rgb.chunks_exact_mut(w * 3) {
        for x in 0..w / 2 {
            for c in 0..3 {
                row.swap(x * 3 + c, (w - 1 - x) * 3 + c);
            }
        }
    }
}

/// Mirror boxes on an image `w` pixels wide (mmdet 2.x: `x -> w - x`).
fn flip_boxes(boxes: &mut [BBox], w: usize) {
    let w = w as f32;
    for b in boxes {
        *b = [w - b[2], b[1], w - b[0], b[3]];
    }
}

/// [`augment`] (segmentation) of the top-left `valid` (H, W) of an `hw` image only: mmseg flips
/// and distorts the crop before padding it, so the padding (from
/// [`seg_geometry_keep_ratio`]) stays at the bottom and right and keeps its colour.
pub fn augment_top_left(rng: &mut Rng, rgb: &mut [u8], label: &mut [u8], hw: (usize, usize), valid: (usize, usize)) {
    if valid == hw {
        return augment(rng, rgb, Some(label), None, hw.0, hw.1);
    }
    let (vh, vw) = valid;
    let mut sub_rgb = Vec::with_capacity(vh * vw * 3);
    let mut sub_lab = Vec::with_capacity(vh * vw);
    for y in 0..vh {
        sub_rgb.extend_from_slice(&rgb[y * hw.1 * 3..(y * hw.1 + vw) * 3]);
        sub_lab.extend_from_slice(&label[y * hw.1..y * hw.1 + vw]);
    }
    augment(rng, &mut sub_rgb, Some(&mut sub_lab), None, vh, vw);
    for y in 0..vh {
        rgb[y * hw.1 * 3..(y * hw.1 + vw) * 3].copy_from_slice(&sub_rgb[y * vw * 3..(y + 1) * vw * 3]);
        label[y * hw.1..y * hw.1 + vw].copy_from_slice(&sub_lab[y * vw..(y + 1) * vw]);
    }
}

/// mmdet / mmseg `PhotoMetricDistortion` on an RGB u8 image, each step with probability 0.5:
/// brightness +-32; contrast x0.5-1.5, before or after the colour steps (chosen at random);
/// saturation x0.5-1.5 and hue +-`hue_delta` degrees in HSV; and with `swap_channels`
/// (mmdet only) a random permutation of the three channels. Values are clipped to 0-255 after
/// each step, as mmseg does on its uint8 images. mmdet's hue delta is 18 degrees; mmseg's 18 is
/// in OpenCV's uint8 hue units of 2 degrees, i.e. 36 degrees.
pub fn photometric_distortion(rng: &mut Rng, rgb: &mut [u8], hue_delta: f32, swap_channels: bool) {
    let brightness = if rng.uniform() < 0.5 { Some(64.0 * (rng.uniform() - 0.5)) } else { None };
    let contrast_first = rng.uniform() < 0.5;
    let contrast = if rng.uniform() < 0.5 { Some(0.5 + rng.uniform()) } else { None };
    let saturation = if rng.uniform() < 0.5 { Some(0.5 + rng.uniform()) } else { None };
    let hue = if rng.uniform() < 0.5 { Some(hue_delta * (2.0 * rng.uniform() - 1.0)) } else { None };
    let perm: [usize; 3] = if swap_channels && rng.uniform() < 0.5 {
        const PERMS: [[usize; 3]; 6] = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
        PERMS[rng.below(6) as usize]
    } else {
        [0, 1, 2]
    };
    if brightness.is_none() && contrast.is_none() && saturation.is_none() && hue.is_none() && perm == [0, 1, 2] {
        return;
    }
    let clip = |v: f32| v.clamp(0.0, 255.0);
    for px in rgb.chunks_exact_mut(3) {
        let mut p = [px[0] as f32, px[1] as f32, px[2] as f32];
        if let Some(d) = brightness {
            p = p.map(|v| clip(v + d));
        }
        if let (true, Some(a)) = (contrast_first, contrast) {
            p = p.map(|v| clip(v * a));
        }
        if saturation.is_some() || hue.is_some() {
            let (mut hh, mut ss, vv) = rgb_to_hsv(p);
            if let Some(a) = saturation {
                ss = (ss * a).clamp(0.0, 1.0);
            }
            if let Some(d) = hue {
                hh = (hh + d).rem_euclid(360.0);
            }
            p = hsv_to_rgb(hh, ss, vv).map(clip);
        }
        if let (false, Some(a)) = (contrast_first, contrast) {
            p = p.map(|v| clip(v * a));
        }
        for c in 0..3 {
            px[c] = p[perm[c]].round() as u8;
        }
    }
}

/// RGB (0-255) to hue in degrees [0, 360), saturation [0, 1] and value (0-255), as OpenCV's
/// float conversion.
pub fn rgb_to_hsv(p: [f32; 3]) -> (f32, f32, f32) {
    let [r, g, b] = p;
    let v = r.max(g).max(b);
    let m = r.min(g).min(b);
    let d = v - m;
    let s = if v > 0.0 { d / v } else { 0.0 };
    if d <= 0.0 {
        return (0.0, s, v);
    }
    let h = if v == r {
        60.0 * (g - b) / d
    } else if v == g {
        120.0 + 60.0 * (b - r) / d
    } else {
        240.0 + 60.0 * (r - g) / d
    };
    (h.rem_euclid(360.0), s, v)
}

/// The inverse of [`rgb_to_hsv`].
pub fn hsv_to_rgb(h: f32, s: f32, v: f32) -> [f32; 3] {
    let c = v * s;
    let hp = h.rem_euclid(360.0) / 60.0;
    let x = c * (1.0 - (hp % 2.0 - 1.0).abs());
    let (r, g, b) = match hp as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [r + m, g + m, b + m]
}

/// Resample the region `src` (x0, y0, x1, y1 in source pixels, may extend past the image) of an
/// HWC image with `ch` channels to `out` (H, W); outside pixels take `fill`. Bilinear, or
/// nearest for label maps.
fn resample(
    img: &[u8],
    hw: (usize, usize),
    ch: usize,
    src: [f32; 4],
    out: (usize, usize),
    fill: &[u8],
    nearest: bool,
) -> Vec<u8> {
    let (h, w) = hw;
    let (sx, sy) = ((src[2] - src[0]) / out.1 as f32, (src[3] - src[1]) / out.0 as f32);
    let mut o = vec![0u8; out.0 * out.1 * ch];
    for y in 0..out.0 {
        for x in 0..out.1 {
            let fx = src[0] + (x as f32 + 0.5) * sx - 0.5;
            let fy = src[1] + (y as f32 + 0.5) * sy - 0.5;
            let dst = &mut o[(y * out.1 + x) * ch..(y * out.1 + x + 1) * ch];
            if fx < -0.5 || fy < -0.5 || fx > w as f32 - 0.5 || fy > h as f32 - 0.5 {
                dst.copy_from_slice(fill);
                continue;
            }
            if nearest {
                let (ix, iy) = ((fx.round().max(0.0) as usize).min(w - 1), (fy.round().max(0.0) as usize).min(h - 1));
                dst.copy_from_slice(&img[(iy * w + ix) * ch..(iy * w + ix + 1) * ch]);
                continue;
            }
            let (fx, fy) = (fx.clamp(0.0, (w - 1) as f32), fy.clamp(0.0, (h - 1) as f32));
            let (x0, y0) = (fx as usize, fy as usize);
            let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
            let (dx, dy) = (fx - x0 as f32, fy - y0 as f32);
            for c in 0..ch {
                let p = |yy: usize, xx: usize| img[(yy * w + xx) * ch + c] as f32;
                let v = p(y0, x0) * (1.0 - dx) * (1.0 - dy)
                    + p(y0, x1) * dx * (1.0 - dy)
                    + p(y1, x0) * (1.0 - dx) * dy
                    + p(y1, x1) * dx * dy;
                dst[c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    o
}

/// mmdet's RetinaNet training transform (spec §12: `Resize(img_scale=(1333, 800),
/// keep_ratio=True)`, `RandomFlip(0.5)`) of an RGB image at its own (H, W) `hw`: resized keeping
/// its aspect ratio to `scale` ([`keep_ratio_size`], OpenCV's bilinear), the boxes scaled by the
/// resized image's actual width and height ratios and clipped to it, then flipped horizontally
/// with probability 0.5 (`x -> W - x`, mmdet 2.x). Returns the image and its (H, W); the batch
/// pads it (`Pad(size_divisor=32)`, then to the batch's largest).
pub fn det_keep_ratio(
    rng: &mut Rng,
    rgb: &[u8],
    hw: (usize, usize),
    boxes: &mut [BBox],
    scale: (usize, usize),
) -> (Vec<u8>, (usize, usize)) {
    let to = keep_ratio_size(hw, scale);
    let mut out = resize_bilinear_cv2(rgb, hw, to);
    let (sx, sy) = (to.1 as f32 / hw.1 as f32, to.0 as f32 / hw.0 as f32);
    let (w, h) = (to.1 as f32, to.0 as f32);
    for b in boxes.iter_mut() {
        *b = [
            (b[0] * sx).clamp(0.0, w),
            (b[1] * sy).clamp(0.0, h),
            (b[2] * sx).clamp(0.0, w),
            (b[3] * sy).clamp(0.0, h),
        ];
    }
    if rng.uniform() < 0.5 {
        flip_rgb(&mut out, to.1);
        flip_boxes(boxes, to.1);
    }
    (out, to)
}

/// mmdet's SSD geometry: `Expand` (p 0.5: the image shrunk by 1-4x into a mean-filled canvas)
/// then `MinIoURandomCrop` (a crop whose IoU with some box is at least one of 0.1 / 0.3 / 0.5 /
/// 0.7 / 0.9, or none; boxes whose centre falls outside are dropped), resized back to the
/// input. Boxes and labels are updated; at least one box always survives.
pub fn ssd_geometry(
    rng: &mut Rng,
    rgb: &mut Vec<u8>,
    boxes: &mut Vec<BBox>,
    labels: &mut Vec<usize>,
    hw: (usize, usize),
) {
    let (h, w) = (hw.0 as f32, hw.1 as f32);
    // Work in "expanded canvas" coordinates: the source image occupies [ox, oy, ox + w, oy + h]
    // of a (r*w) x (r*h) canvas.
    let r = if rng.uniform() < 0.5 { 1.0 + 3.0 * rng.uniform() } else { 1.0 };
    let (cw, chh) = (w * r, h * r);
    let (ox, oy) = (rng.uniform() * (cw - w), rng.uniform() * (chh - h));
    let canvas_boxes: Vec<BBox> = boxes.iter().map(|b| [b[0] + ox, b[1] + oy, b[2] + ox, b[3] + oy]).collect();
    let mut crop = [0.0, 0.0, cw, chh];
    let modes = [0.0f32, 0.1, 0.3, 0.5, 0.7, 0.9];
    let min_iou = modes[rng.below(modes.len() as u64) as usize];
    if min_iou > 0.0 {
        for _ in 0..50 {
            let (nw, nh) = ((0.3 + 0.7 * rng.uniform()) * cw, (0.3 + 0.7 * rng.uniform()) * chh);
            if nh / nw < 0.5 || nh / nw > 2.0 {
                continue;
            }
            let (l, t) = (rng.uniform() * (cw - nw), rng.uniform() * (chh - nh));
            let c = [l, t, l + nw, t + nh];
            let centred = |b: &BBox| {
                let (cx, cy) = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
                cx > c[0] && cx < c[2] && cy > c[1] && cy < c[3]
            };
            let best = canvas_boxes.iter().map(|b| crate::boxes::iou(b, &c)).fold(0.0f32, f32::max);
            if best >= min_iou && canvas_boxes.iter().any(centred) {
                crop = c;
                break;
            }
        }
    }
    // Keep boxes whose centre is inside the crop, clipped, in output coordinates.
    let (sx, sy) = (w / (crop[2] - crop[0]), h / (crop[3] - crop[1]));
    let mut nb = Vec::new();
    let mut nl = Vec::new();
    for (b, &l) in canvas_boxes.iter().zip(labels.iter()) {
        let (cx, cy) = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
        if cx <= crop[0] || cx >= crop[2] || cy <= crop[1] || cy >= crop[3] {
            continue;
        }
        let c = [b[0].max(crop[0]), b[1].max(crop[1]), b[2].min(crop[2]), b[3].min(crop[3])];
        let o = [(c[0] - crop[0]) * sx, (c[1] - crop[1]) * sy, (c[2] - crop[0]) * sx, (c[3] - crop[1]) * sy];
        if o[2] - o[0] >= 1.0 && o[3] - o[1] >= 1.0 {
            nb.push(o);
            nl.push(l);
        }
    }
    if nb.is_empty() {
        return; // nothing left: keep the sample unchanged
    }
    // The crop in source-image coordinates.
    let src = [crop[0] - ox, crop[1] - oy, crop[2] - ox, crop[3] - oy];
    let fill = MEAN.map(|m| m.round() as u8);
    *rgb = resample(rgb, hw, 3, src, hw, &fill, false);
    *boxes = nb;
    *labels = nl;
}

/// mmseg's geometry for segmentation: random rescale by 0.5-2.0 and a random crop back to the
/// input (padding with ignore = 255), applied to the image and the label map together. As in
/// mmseg's `RandomCrop(cat_max_ratio=0.75)`, up to 10 crop positions are tried until no single
/// class covers 75% or more of the crop's labelled pixels (and it holds more than one class); the
/// last position is kept when none qualifies. A rescaled image no larger than the crop is all in
/// it at any position, so it gets one.
pub fn seg_geometry(rng: &mut Rng, rgb: &mut Vec<u8>, label: &mut Vec<u8>, hw: (usize, usize)) {
    seg_geometry_with(rng, rgb, label, hw, PAPER_RESCALE, 0.75)
}

/// The paper's (mmseg's ADE20K) rescale ratio range.
pub const PAPER_RESCALE: (f32, f32) = (0.5, 2.0);

/// mmseg's ADE20K training geometry on an image at its own size `src_hw` (not squeezed to the
/// input first): `Resize(img_scale=scale, ratio_range, keep_ratio=True)` (the scale times a
/// ratio drawn from `ratio_range`, then [`keep_ratio_size`]), then `RandomCrop(crop,
/// cat_max_ratio)` (an offset drawn in whole pixels where the resized image is larger than the
/// crop, up to 10 draws until no class covers more than `cat_max_ratio` of the labelled
/// pixels), then `Pad` to `crop` at the bottom and right (the mean colour, label 255). One
/// resampling from the source (bilinear; nearest for the labels) does the resize and the crop.
/// Returns the resized (H, W) the crop was taken from.
#[allow(clippy::too_many_arguments)]
pub fn seg_geometry_keep_ratio(
    rng: &mut Rng,
    rgb: &mut Vec<u8>,
    label: &mut Vec<u8>,
    src_hw: (usize, usize),
    crop: (usize, usize),
    scale: (usize, usize),
    ratio_range: (f32, f32),
    cat_max_ratio: f32,
) -> (usize, usize) {
    let r = ratio_range.0 + (ratio_range.1 - ratio_range.0) * rng.uniform();
    // mmseg's `random_sample_ratio`: int(scale * ratio) per side.
    let scaled = ((scale.0 as f32 * r) as usize, (scale.1 as f32 * r) as usize);
    let resized = keep_ratio_size(src_hw, scaled);
    let (fy, fx) = (resized.0 as f32 / src_hw.0 as f32, resized.1 as f32 / src_hw.1 as f32);
    let (margin_y, margin_x) = (resized.0.saturating_sub(crop.0), resized.1.saturating_sub(crop.1));
    let fill = MEAN.map(|m| m.round() as u8);
    let mut lab = Vec::new();
    let mut src = [0.0; 4];
    for _ in 0..10 {
        // randint(0, margin + 1), as mmseg's `get_crop_bbox`.
        let oy = ((rng.uniform() * (margin_y + 1) as f32) as usize).min(margin_y);
        let ox = ((rng.uniform() * (margin_x + 1) as f32) as usize).min(margin_x);
        src = [ox as f32 / fx, oy as f32 / fy, (ox + crop.1) as f32 / fx, (oy + crop.0) as f32 / fy];
        lab = resample(label, src_hw, 1, src, crop, &[255], true);
        // With no margin every draw is the same crop.
        if (margin_y == 0 && margin_x == 0) || cat_ratio_ok(&lab, cat_max_ratio) {
            break;
        }
    }
    *rgb = resample(rgb, src_hw, 3, src, crop, &fill, false);
    *label = lab;
    resized
}

/// mmseg's `cat_max_ratio` test of a cropped label map: more than one class, and none covering
/// `cat_max_ratio` or more of the labelled pixels (255 not counted); 1.0 or more always passes.
fn cat_ratio_ok(lab: &[u8], cat_max_ratio: f32) -> bool {
    if cat_max_ratio >= 1.0 {
        return true;
    }
    let mut counts = [0usize; 255];
    lab.iter().filter(|&&v| v != 255).for_each(|&v| counts[v as usize] += 1);
    let (classes, total) = (counts.iter().filter(|&&c| c > 0).count(), counts.iter().sum::<usize>());
    let top = counts.iter().copied().max().unwrap_or(0);
    classes > 1 && (top as f32) < cat_max_ratio * total as f32
}

/// [`seg_geometry`] with another rescale ratio range (mmseg's `ratio_range`: the scale is drawn
/// uniformly from it) and another `cat_max_ratio`; 1.0 or more turns the check off (one crop).
pub fn seg_geometry_with(
    rng: &mut Rng,
    rgb: &mut Vec<u8>,
    label: &mut Vec<u8>,
    hw: (usize, usize),
    ratio_range: (f32, f32),
    cat_max_ratio: f32,
) {
    let s = ratio_range.0 + (ratio_range.1 - ratio_range.0) * rng.uniform();
    let (h, w) = (hw.0 as f32, hw.1 as f32);
    // The output window covers (h/s) x (w/s) source pixels, placed anywhere it overlaps.
    let (vw, vh) = (w / s, h / s);
    let fill = MEAN.map(|m| m.round() as u8);
    let mut lab = Vec::new();
    let mut src = [0.0; 4];
    for _ in 0..10 {
        let x0 = if vw <= w { rng.uniform() * (w - vw) } else { -rng.uniform() * (vw - w) };
        let y0 = if vh <= h { rng.uniform() * (h - vh) } else { -rng.uniform() * (vh - h) };
        src = [x0, y0, x0 + vw, y0 + vh];
        lab = resample(label, hw, 1, src, hw, &[255], true);
        // A window at least as large as the image holds all of it wherever it is placed, so
        // another position cannot change the class counts.
        if (vw >= w && vh >= h) || cat_ratio_ok(&lab, cat_max_ratio) {
            break;
        }
    }
    *rgb = resample(rgb, hw, 3, src, hw, &fill, false);
    *label = lab;
}
