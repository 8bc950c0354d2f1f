//! RandAugment as timm's `rand-m9-mstd0.5-inc1` (the paper's recipe, spec §10): per image, two
//! operations drawn uniformly (with replacement) from timm's "increasing" set, each applied
//! with probability 0.5 at a magnitude drawn from N(9, 0.5) clipped to [0, 10] (of 10).
//! Also RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, bilinear), which precedes it.
//!
//! Images are planar u8 (`[c][h][w]`, one or three channels), as the data splits store them.
//! The operations follow PIL's (`ImageOps`, `ImageEnhance`, affine transforms with the inverse
//! mapping); geometric ones fill with `fill` (timm: the dataset mean).

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// A planar u8 image.
#[derive(Clone, Debug, PartialEq)]
pub struct Img {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<u8>,
}

impl Img {
    fn at(&self, c: usize, y: usize, x: usize) -> u8 {
        self.data[(c * self.h + y) * self.w + x]
    }

    fn map(&mut self, lut: impl Fn(usize, u8) -> u8) {
        let plane = self.h * self.w;
        for (i, v) in self.data.iter_mut().enumerate() {
            *v = lut(i / plane, *v);
        }
    }

    /// PIL's "L" conversion of an RGB image (ITU-R 601-2 luma), or the single channel.
    fn grey(&self) -> Vec<f32> {
        let plane = self.h * self.w;
        if self.c < 3 {
            return self.data[..plane].iter().map(|&v| v as f32).collect();
        }
        (0..plane)
            .map(|i| {
                let (r, g, b) = (self.data[i] as f32, self.data[plane + i] as f32, self.data[2 * plane + i] as f32);
                ((r * 19595.0 + g * 38470.0 + b * 7471.0 + 32768.0) / 65536.0).floor()
            })
            .collect()
    }

    /// `degenerate + f * (self - degenerate)`, clipped (PIL ImageEnhance).
    fn blend(&mut self, degenerate: &[f32], per_channel: bool, f: f32) {
        let plane = self.h * self.w;
        for (i, v) in self.data.iter_mut().enumerate() {
            let d = if per_channel { degenerate[i] } else { degenerate[i % plane] };
            *v = clip(d + f * (*v as f32 - d));
        }
    }

    /// Resample through the inverse map `(x, y) -> (a x + b y + c, d x + e y + f)` (output to
    /// input pixel coordinates, pixel centres at +0.5), bilinear, `fill` outside.
    fn affine(&mut self, m: [f32; 6], fill: &[u8; 3]) {
        let (c, h, w) = (self.c, self.h, self.w);
        let mut out = vec![0u8; self.data.len()];
        for y in 0..h {
            for x in 0..w {
                let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
                let sx = m[0] * fx + m[1] * fy + m[2] - 0.5;
                let sy = m[3] * fx + m[4] * fy + m[5] - 0.5;
                let inside = sx > -1.0 && sy > -1.0 && sx < w as f32 && sy < h as f32;
                for ch in 0..c {
                    out[(ch * h + y) * w + x] = if !inside {
                        fill[ch.min(2)]
                    } else {
                        let (x0, y0) = (sx.floor(), sy.floor());
                        let (tx, ty) = (sx - x0, sy - y0);
                        let px = |yy: f32, xx: f32| -> f32 {
                            if xx < 0.0 || yy < 0.0 || xx >= w as f32 || yy >= h as f32 {
                                fill[ch.min(2)] as f32
                            } else {
                                self.at(ch, yy as usize, xx as usize) as f32
                            }
                        };
                        let top = px(y0, x0) * (1.0 - tx) + px(y0, x0 + 1.0) * tx;
                        let bot = px(y0 + 1.0, x0) * (1.0 - tx) + px(y0 + 1.0, x0 + 1.0) * tx;
                        clip(top * (1.0 - ty) + bot * ty)
                    };
                }
            }
        }
        self.data = out;
    }
}

fn clip(v: f32) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

/// timm's increasing RandAugment operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    PosterizeIncreasing,
    SolarizeIncreasing,
    SolarizeAdd,
    ColorIncreasing,
    ContrastIncreasing,
    BrightnessIncreasing,
    SharpnessIncreasing,
    ShearX,
    ShearY,
    TranslateXRel,
    TranslateYRel,
}

pub const OPS: [Op; 15] = [
    Op::AutoContrast,
    Op::Equalize,
    Op::Invert,
    Op::Rotate,
    Op::PosterizeIncreasing,
    Op::SolarizeIncreasing,
    Op::SolarizeAdd,
    Op::ColorIncreasing,
    Op::ContrastIncreasing,
    Op::BrightnessIncreasing,
    Op::SharpnessIncreasing,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateXRel,
    Op::TranslateYRel,
];

/// `v` with a random sign (timm's `_randomly_negate`).
fn negate(rng: &mut Rng, v: f32) -> f32 {
    if rng.uniform() < 0.5 { -v } else { v }
}

impl Op {
    /// Apply at magnitude `m` (0-10); random signs are drawn from `rng`.
    pub fn apply(self, img: &mut Img, m: f32, rng: &mut Rng, fill: &[u8; 3]) {
        let l = m / 10.0;
        let enhance = |rng: &mut Rng| 1.0 + negate(rng, l * 0.9);
        let (w, h) = (img.w as f32, img.h as f32);
        match self {
            Op::AutoContrast => {
                let plane = img.h * img.w;
                let ranges: Vec<(u8, u8)> = (0..img.c)
                    .map(|c| {
                        let p = &img.data[c * plane..(c + 1) * plane];
                        (*p.iter().min().unwrap_or(&0), *p.iter().max().unwrap_or(&255))
                    })
                    .collect();
                img.map(|c, v| {
                    let (lo, hi) = ranges[c];
                    if hi <= lo { v } else { clip((v - lo) as f32 * 255.0 / (hi - lo) as f32) }
                });
            }
            Op::Equalize => {
                let plane = img.h * img.w;
                let luts: Vec<[u8; 256]> = (0..img.c)
                    .map(|c| {
                        let mut hist = [0usize; 256];
                        img.data[c * plane..(c + 1) * plane].iter().for_each(|&v| hist[v as usize] += 1);
                        let mut lut = [0u8; 256];
                        (0..256).for_each(|i| lut[i] = i as u8);
                        let nonzero: Vec<usize> = hist.iter().copied().filter(|&n| n > 0).collect();
                        if nonzero.len() > 1 {
                            let step = (nonzero.iter().sum::<usize>() - nonzero[nonzero.len() - 1]) / 255;
                            if step > 0 {
                                let mut n = step / 2;
                                for i in 0..256 {
                                    lut[i] = (n / step).min(255) as u8;
                                    n += hist[i];
                                }
                            }
                        }
                        lut
                    })
                    .collect();
                img.map(|c, v| luts[c][v as usize]);
            }
            Op::Invert => img.map(|_, v| 255 - v),
            Op::Rotate => {
                let a = negate(rng, l * 30.0).to_radians();
                let (cx, cy) = (w / 2.0, h / 2.0);
                // inverse map of a counter-clockwise rotation about the centre (PIL)
                let (cos, sin) = (a.cos(), a.sin());
                img.affine([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy], fill);
            }
            Op::PosterizeIncreasing => {
                let bits = 4 - (l * 4.0) as u32;
                let mask = !(0xFFu32 >> bits) as u8;
                img.map(|_, v| v & mask);
            }
            Op::SolarizeIncreasing => {
                let thresh = 256 - (l * 256.0) as i32;
                img.map(|_, v| if v as i32 >= thresh { 255 - v } else { v });
            }
            Op::SolarizeAdd => {
                let add = (l * 110.0) as i32;
                img.map(|_, v| if v < 128 { (v as i32 + add).min(255) as u8 } else { v });
            }
            Op::ColorIncreasing => {
                let f = enhance(rng);
                if img.c >= 3 {
                    let g = img.grey();
                    img.blend(&g, false, f);
                }
            }
            Op::ContrastIncreasing => {
                let f = enhance(rng);
                let g = img.grey();
                let mean = (g.iter().sum::<f32>() / g.len().max(1) as f32 + 0.5).floor();
                img.blend(&vec![mean; img.h * img.w], false, f);
            }
            Op::BrightnessIncreasing => {
                let f = enhance(rng);
                img.blend(&vec![0.0; img.h * img.w], false, f);
            }
            Op::SharpnessIncreasing => {
                let f = enhance(rng);
                // PIL's SMOOTH kernel [[1,1,1],[1,5,1],[1,1,1]] / 13; the border stays as is.
                let mut d: Vec<f32> = img.data.iter().map(|&v| v as f32).collect();
                for c in 0..img.c {
                    for y in 1..img.h.saturating_sub(1) {
                        for x in 1..img.w.saturating_sub(1) {
                            let mut s = 4.0 * img.at(c, y, x) as f32;
                            for dy in 0..3 {
                                for dx in 0..3 {
                                    s += img.at(c, y + dy - 1, x + dx - 1) as f32;
                                }
                            }
                            d[(c * img.h + y) * img.w + x] = (s / 13.0).round();
                        }
                    }
                }
                img.blend(&d, true, f);
            }
            Op::ShearX => {
                let s = negate(rng, l * 0.3);
                img.affine([1.0, s, 0.0, 0.0, 1.0, 0.0], fill);
            }
            Op::ShearY => {
                let s = negate(rng, l * 0.3);
                img.affine([1.0, 0.0, 0.0, s, 1.0, 0.0], fill);
            }
            Op::TranslateXRel => {
                let t = negate(rng, l * 0.45) * w;
                img.affine([1.0, 0.0, t, 0.0, 1.0, 0.0], fill);
            }
            Op::TranslateYRel => {
                let t = negate(rng, l * 0.45) * h;
                img.affine([1.0, 0.0, 0.0, 0.0, 1.0, t], fill);
            }
        }
    }
}

/// RandAugment settings (`rand-m{magnitude}-mstd{magnitude_std}-inc1`, `n` operations).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RandAugment {
    pub layers: usize,
    pub magnitude: f32,
    pub magnitude_std: f32,
    /// Probability that each drawn operation is applied.
    pub prob: f32,
}

impl Default for RandAugment {
    /// The paper's `rand-m9-mstd0.5-inc1`.
    fn default() -> Self {
        RandAugment { layers: 2, magnitude: 9.0, magnitude_std: 0.5, prob: 0.5 }
    }
}

/// A standard normal draw (Box-Muller).
fn gauss(rng: &mut Rng) -> f32 {
    let u1 = (rng.uniform() as f64).max(1e-12);
    let u2 = rng.uniform() as f64;
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

impl RandAugment {
    /// Augment `img` in place; returns the operations applied (for tests and logs).
    pub fn apply(&self, img: &mut Img, rng: &mut Rng, fill: &[u8; 3]) -> Vec<Op> {
        let mut applied = Vec::new();
        for _ in 0..self.layers {
            let op = OPS[rng.below(OPS.len() as u64) as usize];
            if rng.uniform() >= self.prob {
                continue;
            }
            let m = if self.magnitude_std > 0.0 {
                (self.magnitude + self.magnitude_std * gauss(rng)).clamp(0.0, 10.0)
            } else {
                self.magnitude
            };
            op.apply(img, m, rng, fill);
            applied.push(op);
        }
        applied
    }
}

/// torchvision's RandomResizedCrop(size, scale 0.08-1, ratio 3/4-4/3) with bilinear
/// resampling: up to 10 tries for a box of the drawn area and aspect ratio, else the central
/// crop at the clamped ratio.
pub fn random_resized_crop(src: &Img, size: usize, rng: &mut Rng) -> Img {
    let (h, w) = (src.h as f32, src.w as f32);
    let area = h * w;
    let (lr0, lr1) = ((3.0f32 / 4.0).ln(), (4.0f32 / 3.0).ln());
    let mut bx = None;
    for _ in 0..10 {
        let target = area * (0.08 + rng.uniform() * 0.92);
        let ratio = (lr0 + rng.uniform() * (lr1 - lr0)).exp();
        let cw = (target * ratio).sqrt().round();
        let ch = (target / ratio).sqrt().round();
        if cw > 0.0 && ch > 0.0 && cw <= w && ch <= h {
            let y = rng.below((h - ch) as u64 + 1) as f32;
            let x = rng.below((w - cw) as u64 + 1) as f32;
            bx = Some((x, y, cw, ch));
            break;
        }
    }
    let (x0, y0, cw, ch) = bx.unwrap_or_else(|| {
        let r = w / h;
        let (cw, ch) = if r < 3.0 / 4.0 {
            (w, (w / (3.0 / 4.0)).round())
        } else if r > 4.0 / 3.0 {
            ((h * 4.0 / 3.0).round(), h)
        } else {
            (w, h)
        };
        (((w - cw) / 2.0).floor(), ((h - ch) / 2.0).floor(), cw, ch)
    });
    let mut out = Img { c: src.c, h: size, w: size, data: vec![0; src.c * size * size] };
    let (sx, sy) = (cw / size as f32, ch / size as f32);
    for y in 0..size {
        let fy = (y0 + (y as f32 + 0.5) * sy - 0.5).clamp(0.0, h - 1.0);
        let (y1, ty) = (fy.floor() as usize, fy - fy.floor());
        let y2 = (y1 + 1).min(src.h - 1);
        for x in 0..size {
            let fx = (x0 + (x as f32 + 0.5) * sx - 0.5).clamp(0.0, w - 1.0);
            let (x1, tx) = (fx.floor() as usize, fx - fx.floor());
            let x2 = (x1 + 1).min(src.w - 1);
            for c in 0..src.c {
                let top = src.at(c, y1, x1) as f32 * (1.0 - tx) + src.at(c, y1, x2) as f32 * tx;
                let bot = src.at(c, y2, x1) as f32 * (1.0 - tx) + src.at(c, y2, x2) as f32 * tx;
                out.data[(c * size + y) * size + x] = clip(top * (1.0 - ty) + bot * ty);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(c: usize, h: usize, w: usize) -> Img {
        let data = (0..c * h * w).map(|i| ((i % (h * w)) * 255 / (h * w - 1)) as u8 / (c as u8)).collect();
        Img { c, h, w, data }
    }

    fn square(h: usize, w: usize) -> Img {
        let mut img = Img { c: 1, h, w, data: vec![20; h * w] };
        for y in h / 4..3 * h / 4 {
            for x in w / 4..3 * w / 4 {
                img.data[y * w + x] = 220;
            }
        }
        img
    }

    #[test]
    fn pixel_ops_match_pil() {
        let mut r = Rng::new(0);
        let fill = [0, 0, 0];
        // PIL: ImageOps.invert / posterize(img, 1) / solarize(img, 256 - int(0.9 * 256) = 26)
        let src = Img { c: 1, h: 1, w: 4, data: vec![0, 25, 130, 255] };
        let run = |op: Op, m: f32, r: &mut Rng| {
            let mut i = src.clone();
            op.apply(&mut i, m, r, &fill);
            i.data
        };
        assert_eq!(run(Op::Invert, 9.0, &mut r), vec![255, 230, 125, 0]);
        assert_eq!(run(Op::PosterizeIncreasing, 9.0, &mut r), vec![0, 0, 128, 128]);
        assert_eq!(run(Op::SolarizeIncreasing, 9.0, &mut r), vec![0, 25, 125, 0]);
        // SolarizeAdd at m = 10: +110 below 128
        assert_eq!(run(Op::SolarizeAdd, 10.0, &mut r), vec![110, 135, 130, 255]);
        // autocontrast stretches [25, 130] to [0, 255]
        let mut i = Img { c: 1, h: 1, w: 3, data: vec![25, 60, 130] };
        Op::AutoContrast.apply(&mut i, 9.0, &mut r, &fill);
        assert_eq!(i.data, vec![0, 85, 255]);
        // equalize (PIL): 4 distinct values, equal counts
        let mut i = Img { c: 1, h: 2, w: 4, data: vec![10, 10, 20, 20, 30, 30, 40, 40] };
        Op::Equalize.apply(&mut i, 9.0, &mut r, &fill);
        // step = (8 - 2) / 255 = 0 -> unchanged, as PIL
        assert_eq!(i.data, vec![10, 10, 20, 20, 30, 30, 40, 40]);
    }

    #[test]
    fn enhance_factors_stay_in_timm_range_and_colour_keeps_grey() {
        let mut r = Rng::new(3);
        let fill = [0, 0, 0];
        for _ in 0..20 {
            let src = Img { c: 1, h: 1, w: 2, data: vec![100, 100] };
            let mut i = src.clone();
            Op::BrightnessIncreasing.apply(&mut i, 10.0, &mut r, &fill);
            assert!(i.data[0] == 10 || i.data[0] == 190, "factor 1 +- 0.9: {:?}", i.data);
            let mut i = src.clone();
            Op::ColorIncreasing.apply(&mut i, 10.0, &mut r, &fill);
            assert_eq!(i, src, "saturation of a grey image");
        }
    }

    #[test]
    fn geometric_ops_move_content_and_fill() {
        let mut r = Rng::new(1);
        let fill = [7, 7, 7];
        // translate by 45% of the width at m = 10: a column of fill appears on one side
        let src = square(20, 20);
        let mut i = src.clone();
        Op::TranslateXRel.apply(&mut i, 10.0, &mut r, &fill);
        let left = i.at(0, 10, 0);
        let right = i.at(0, 10, 19);
        assert!(left == 7 || right == 7, "fill on one side: {left} {right}");
        assert_ne!(i, src);
        // rotation keeps the centre of a centred square
        let mut i = src.clone();
        Op::Rotate.apply(&mut i, 10.0, &mut r, &fill);
        assert_eq!(i.at(0, 10, 10), 220);
        assert_eq!(i.at(0, 0, 0), 7, "corner rotated out");
        // magnitude 0 shear is the identity
        let mut i = src.clone();
        Op::ShearX.apply(&mut i, 0.0, &mut r, &fill);
        assert_eq!(i, src);
    }

    #[test]
    fn rand_augment_draws_two_ops_half_the_time_each_deterministically() {
        let ra = RandAugment::default();
        let (mut r1, mut r2) = (Rng::new(9), Rng::new(9));
        let fill = [124, 116, 104];
        let mut counts = 0;
        for _ in 0..400 {
            let (mut a, mut b) = (ramp(3, 16, 16), ramp(3, 16, 16));
            let oa = ra.apply(&mut a, &mut r1, &fill);
            let ob = ra.apply(&mut b, &mut r2, &fill);
            assert_eq!((oa.clone(), a), (ob, b), "same seed, same augmentation");
            counts += oa.len();
        }
        // 2 ops x p 0.5 = 1 op per image on average
        assert!((340..460).contains(&counts), "{counts} ops applied to 400 images");
    }

    #[test]
    fn random_resized_crop_covers_scale_range_and_is_exact_on_full_boxes() {
        let mut r = Rng::new(5);
        let src = ramp(3, 40, 30);
        for _ in 0..50 {
            let out = random_resized_crop(&src, 16, &mut r);
            assert_eq!((out.c, out.h, out.w, out.data.len()), (3, 16, 16, 3 * 256));
        }
        // a 1x1 source resizes to a constant
        let one = Img { c: 1, h: 1, w: 1, data: vec![77] };
        let out = random_resized_crop(&one, 4, &mut r);
        assert!(out.data.iter().all(|&v| v == 77));
    }
}
