//! The dense-prediction models of `emo-dense` (SSDLite, RetinaNet, DeepLabv3, PSPNet) on the
//! fast engine: the backbone is an [`Engine`] that hands over its stage outputs channels-last,
//! and every neck and head conv of [`DenseConfig::head_convs`] runs on the same kernels with its
//! BatchNorm folded in:
//!
//! * a 1x1 conv is one GEMM over all pixels ([`matmul`]), written straight into its columns of
//!   a concatenation (ASPP, PSP) when the next layer reads one;
//! * a full 3x3 stride-1 pad-1 conv (all nine taps read the map) runs by Winograd F(4x4, 3x3)
//!   ([`conv3x3`]), its activation applied in the output transform;
//! * another k x k conv is a GEMM over an im2col of the **live taps** only, those that read at least
//!   one input pixel at this input size (the ASPP branches with dilations 12 / 24 / 36 on a map
//!   smaller than their dilation are 1x1 convs), built one band of output rows at a time;
//! * a depthwise conv is [`depthwise`];
//! * ReLU / ReLU6 follow in place.
//!
//! The auxiliary FCN head of the segmenters is a training device and is not run. Outputs are
//! those of `DenseModel::forward` in eval mode: per-anchor class logits and box deltas
//! (`[B, N, K]`, `[B, N, 4]`, anchors in `emo-dense`'s order) or segmentation logits at the
//! stage-4 size (NCHW). The parity tests check them against the burn model.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use emo_kernels::Act as KAct;
use emo_kernels::dwconv::{self, DwGeom, DwLayer, depthwise};
use emo_kernels::gemm::{Weight, matmul};
use emo_kernels::winograd::{Winograd3x3, conv3x3};
use emo_spec::{DenseConfig, HeadAct, HeadConv, PSP_SCALES, SEG_BN_EPS, SSD_BN_EPS, Task};
use emo_weights::StateDict;

use crate::{Engine, InferError};

/// A channels-last map: `[batch, h, w, c]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Map {
    pub batch: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl Map {
    fn zeros(batch: usize, h: usize, w: usize, c: usize) -> Self {
        Map { batch, h, w, c, data: vec![0.0; batch * h * w * c] }
    }

    fn pixels(&self) -> usize {
        self.batch * self.h * self.w
    }
}

/// What [`DenseEngine::run`] returns.
#[derive(Clone, Debug, PartialEq)]
pub enum DenseRaw {
    /// Detection: class logits `[batch, anchors, classes']` (SSDLite: `classes + 1` softmax
    /// logits with background last; RetinaNet: `classes` sigmoid logits) and box deltas
    /// `[batch, anchors, 4]`, row-major.
    Det { anchors: usize, classes: usize, cls: Vec<f32>, reg: Vec<f32> },
    /// Segmentation logits `[batch, classes, h, w]` (NCHW) at the stage-4 size.
    Seg { shape: [usize; 4], logits: Vec<f32> },
}

/// One neck / head conv with its BN folded in.
struct Layer {
    conv: HeadConv,
    bias: Vec<f32>,
    kind: Kind,
}

enum Kind {
    /// `groups == 1`: the weight `[cout][k*k][cin]`, packed per set of live taps on demand,
    /// and in the Winograd domain for 3x3, stride-1, pad-1 convs on demand.
    Dense { w: Vec<f32>, packed: Mutex<HashMap<Vec<usize>, Arc<Weight>>>, wino: OnceLock<Winograd3x3> },
    /// `groups == cin == cout`: the weight `[k*k, c]`.
    Depthwise { w: Vec<f32> },
}

impl Layer {
    fn load(sd: &StateDict, conv: &HeadConv, eps: f64) -> Layer {
        let f = |key: &str| {
            sd.get(key)
                .and_then(|t| t.as_f32())
                .unwrap_or_else(|| panic!("validated checkpoint lacks float `{key}`"))
                .to_vec()
        };
        let mut w = f(&format!("{}.weight", conv.key));
        let mut bias = if conv.bias { f(&format!("{}.bias", conv.key)) } else { vec![0.0; conv.cout] };
        if let Some(p) = &conv.bn {
            let (g, b) = (f(&format!("{p}.weight")), f(&format!("{p}.bias")));
            let (m, v) = (f(&format!("{p}.running_mean")), f(&format!("{p}.running_var")));
            let per = w.len() / conv.cout;
            for o in 0..conv.cout {
                let s = (g[o] as f64 / (v[o] as f64 + eps).sqrt()) as f32;
                w[o * per..(o + 1) * per].iter_mut().for_each(|x| *x *= s);
                bias[o] = (bias[o] - m[o]) * s + b[o];
            }
        }
        let kk = conv.k * conv.k;
        let kind = if conv.groups == 1 {
            // [cout][cin][k*k] -> [cout][k*k][cin]
            let mut t = vec![0.0; w.len()];
            for o in 0..conv.cout {
                for i in 0..conv.cin {
                    for k in 0..kk {
                        t[(o * kk + k) * conv.cin + i] = w[(o * conv.cin + i) * kk + k];
                    }
                }
            }
            Kind::Dense { w: t, packed: Mutex::new(HashMap::new()), wino: OnceLock::new() }
        } else {
            assert!(conv.groups == conv.cin && conv.cin == conv.cout, "{}: only dense or depthwise convs", conv.key);
            Kind::Depthwise { w: dwconv::weight_from_torch(&w, conv.cout, conv.k) }
        };
        Layer { conv: conv.clone(), bias, kind }
    }

    /// The packed weight of the taps `taps` (indices `ky * k + kx`).
    fn packed(&self, taps: &[usize]) -> Arc<Weight> {
        let Kind::Dense { w, packed, .. } = &self.kind else { unreachable!("dense layers only") };
        let mut cache = packed.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(taps.to_vec())
            .or_insert_with(|| {
                let (c, kk) = (&self.conv, self.conv.k * self.conv.k);
                let mut sel = Vec::with_capacity(c.cout * taps.len() * c.cin);
                for o in 0..c.cout {
                    for &t in taps {
                        sel.extend_from_slice(&w[(o * kk + t) * c.cin..(o * kk + t + 1) * c.cin]);
                    }
                }
                Arc::new(Weight::from_torch(&sel, c.cout, taps.len() * c.cin))
            })
            .clone()
    }

    /// Run on `x`, writing columns `col..col + cout` of `out` (row stride `out.c`, which must
    /// have the output's batch and size).
    fn run_into(&self, x: &Map, out: &mut Map, col: usize) {
        let c = &self.conv;
        assert_eq!(x.c, c.cin, "{}: input channels", c.key);
        let (oh, ow) = (c.out_len(x.h), c.out_len(x.w));
        assert!(out.batch == x.batch && out.h == oh && out.w == ow && col + c.cout <= out.c, "{}: output", c.key);
        let ldo = out.c;
        match &self.kind {
            Kind::Depthwise { w } => {
                let geom = DwGeom { k: c.k, stride: c.stride, pad: c.pad };
                assert_eq!(c.dilation, 1, "{}: dilated depthwise conv", c.key);
                // No head concatenates a depthwise conv's output: it fills a map of its own.
                assert!(col == 0 && ldo == c.cout, "{}: a depthwise conv writes a whole map", c.key);
                let layer = DwLayer { weight: w, bias: &self.bias, geom, act: KAct::None, residual: false };
                depthwise(&x.data, x.batch, x.h, x.w, layer, &mut out.data);
            }
            Kind::Dense { w, wino, .. } => {
                let (rows, cols) = (c.live_taps(x.h), c.live_taps(x.w));
                let taps: Vec<usize> = rows.iter().flat_map(|&r| cols.iter().map(move |&q| r * c.k + q)).collect();
                if (c.k, c.stride, c.dilation, c.pad, taps.len()) == (3, 1, 1, 1, 9) {
                    // A full 3x3 "same" conv: Winograd F(4x4, 3x3), activation in its epilogue.
                    let wt = wino.get_or_init(|| Winograd3x3::new(w, c.cout, c.cin, (9 * c.cin, c.cin, 1)));
                    let clamp = clamp_range(c.act).unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
                    conv3x3(&x.data, x.batch, x.h, x.w, wt, &self.bias, clamp, &mut out.data[col..], ldo);
                    return;
                }
                let weight = self.packed(&taps);
                let pointwise = taps.len() == 1 && c.stride == 1 && (oh, ow) == (x.h, x.w) && {
                    // The single live tap reads pixel (oy, ox) itself.
                    let (ky, kx) = (taps[0] / c.k, taps[0] % c.k);
                    ky * c.dilation == c.pad && kx * c.dilation == c.pad
                };
                if pointwise {
                    let dst = &mut out.data[col..];
                    matmul(&x.data, c.cin, x.pixels(), &weight, Some(&self.bias), KAct::None, None, dst, ldo);
                } else {
                    self.im2col_gemm(x, &taps, &weight, out, col);
                }
            }
        }
        act_in_place(&mut out.data, ldo, col, c.cout, c.act);
    }

    /// A k x k conv as GEMMs over im2col bands of the live taps.
    fn im2col_gemm(&self, x: &Map, taps: &[usize], weight: &Weight, out: &mut Map, col: usize) {
        let c = &self.conv;
        let (oh, ow) = (out.h, out.w);
        let kdim = taps.len() * c.cin;
        // Bands of output rows of at most ~4M floats of im2col.
        let band = ((4 << 20) / (kdim * ow).max(1)).clamp(1, oh);
        let mut buf = vec![0.0f32; band * ow * kdim];
        for b in 0..x.batch {
            let img = &x.data[b * x.h * x.w * c.cin..(b + 1) * x.h * x.w * c.cin];
            for y0 in (0..oh).step_by(band) {
                let y1 = (y0 + band).min(oh);
                let m = (y1 - y0) * ow;
                // The copy is spread over the pool too, 16 rows a task.
                const ROWS: usize = 16;
                emo_kernels::pool::parallel_chunks_mut(&mut buf[..m * kdim], ROWS * kdim, |i, part| {
                    for (j, row) in part.chunks_mut(kdim).enumerate() {
                        let r = i * ROWS + j;
                        let (oy, ox) = (y0 + r / ow, r % ow);
                        for (t, dst) in taps.iter().zip(row.chunks_mut(c.cin)) {
                            let (ky, kx) = (t / c.k, t % c.k);
                            let iy = (oy * c.stride + ky * c.dilation) as isize - c.pad as isize;
                            let ix = (ox * c.stride + kx * c.dilation) as isize - c.pad as isize;
                            if (0..x.h as isize).contains(&iy) && (0..x.w as isize).contains(&ix) {
                                let p = iy as usize * x.w + ix as usize;
                                dst.copy_from_slice(&img[p * c.cin..(p + 1) * c.cin]);
                            } else {
                                dst.fill(0.0);
                            }
                        }
                    }
                });
                let o0 = ((b * oh + y0) * ow) * out.c + col;
                let dst = &mut out.data[o0..];
                matmul(&buf[..m * kdim], kdim, m, weight, Some(&self.bias), KAct::None, None, dst, out.c);
            }
        }
    }

    /// Run into a fresh map of its own.
    fn run(&self, x: &Map) -> Map {
        let c = &self.conv;
        let mut out = Map::zeros(x.batch, c.out_len(x.h), c.out_len(x.w), c.cout);
        self.run_into(x, &mut out, 0);
        out
    }
}

/// ReLU / ReLU6 on columns `col..col + n` of rows of length `ld`.
fn act_in_place(data: &mut [f32], ld: usize, col: usize, n: usize, act: HeadAct) {
    let Some((lo, hi)) = clamp_range(act) else { return };
    for row in data.chunks_mut(ld) {
        row[col..col + n].iter_mut().for_each(|v| *v = v.clamp(lo, hi));
    }
}

/// The range a head activation clamps its input to (ReLU, ReLU6); `None` without one.
fn clamp_range(act: HeadAct) -> Option<(f32, f32)> {
    match act {
        HeadAct::None => None,
        HeadAct::Relu => Some((0.0, f32::INFINITY)),
        HeadAct::Relu6 => Some((0.0, 6.0)),
    }
}

/// Adaptive average pooling of `x` to `s x s` (PyTorch's bins: `floor(i n / s)` to
/// `ceil((i + 1) n / s)`).
fn adaptive_avg_pool(x: &Map, s: usize) -> Map {
    let mut out = Map::zeros(x.batch, s, s, x.c);
    let bins = |n: usize, i: usize| (i * n / s, ((i + 1) * n).div_ceil(s));
    for b in 0..x.batch {
        for oy in 0..s {
            let (y0, y1) = bins(x.h, oy);
            for ox in 0..s {
                let (x0, x1) = bins(x.w, ox);
                let o = &mut out.data[((b * s + oy) * s + ox) * x.c..((b * s + oy) * s + ox + 1) * x.c];
                for iy in y0..y1 {
                    for ix in x0..x1 {
                        let p = (b * x.h + iy) * x.w + ix;
                        o.iter_mut().zip(&x.data[p * x.c..(p + 1) * x.c]).for_each(|(o, v)| *o += v);
                    }
                }
                let n = ((y1 - y0) * (x1 - x0)) as f32;
                o.iter_mut().for_each(|v| *v /= n);
            }
        }
    }
    out
}

/// Bilinear resize (align_corners false, PyTorch's rule) of `x` into columns `col..col + x.c`
/// of `out` (same batch, any size).
fn bilinear_into(x: &Map, out: &mut Map, col: usize) {
    let (ty, tx) = (emo_kernels::xent::bilinear_taps(x.h, out.h), emo_kernels::xent::bilinear_taps(x.w, out.w));
    let c = x.c;
    let mut row = vec![0.0f32; x.w * c];
    for b in 0..x.batch {
        let img = &x.data[b * x.h * x.w * c..(b + 1) * x.h * x.w * c];
        for (oy, t) in ty.iter().enumerate() {
            // Blend the two source rows, then the two columns of each output pixel.
            let (r0, r1) = (&img[t.i0 * x.w * c..(t.i0 + 1) * x.w * c], &img[t.i1 * x.w * c..(t.i1 + 1) * x.w * c]);
            for ((v, a), bb) in row.iter_mut().zip(r0).zip(r1) {
                *v = t.w0 * a + t.w1 * bb;
            }
            for (ox, s) in tx.iter().enumerate() {
                let p = (b * out.h + oy) * out.w + ox;
                let dst = &mut out.data[p * out.c + col..p * out.c + col + c];
                let (a, bb) = (&row[s.i0 * c..(s.i0 + 1) * c], &row[s.i1 * c..(s.i1 + 1) * c]);
                for ((d, a), bb) in dst.iter_mut().zip(a).zip(bb) {
                    *d = s.w0 * a + s.w1 * bb;
                }
            }
        }
    }
}

/// `a += nearest(b)` to `a`'s size (PyTorch's / burn's `floor(o * in / out)` rule).
fn add_nearest(a: &mut Map, b: &Map) {
    let map = |n: usize, m: usize| -> Vec<usize> {
        let r = n as f64 / m as f64;
        (0..m).map(|o| ((o as f64 * r).floor() as usize).min(n - 1)).collect()
    };
    let (my, mx, c) = (map(b.h, a.h), map(b.w, a.w), a.c);
    for n in 0..a.batch {
        for (oy, &iy) in my.iter().enumerate() {
            for (ox, &ix) in mx.iter().enumerate() {
                let (p, q) = ((n * a.h + oy) * a.w + ox, (n * b.h + iy) * b.w + ix);
                a.data[p * c..(p + 1) * c].iter_mut().zip(&b.data[q * c..(q + 1) * c]).for_each(|(x, y)| *x += y);
            }
        }
    }
}

/// A dense model (backbone + neck + heads) on the fast kernels.
pub struct DenseEngine {
    cfg: DenseConfig,
    backbone: Engine,
    layers: HashMap<String, Layer>,
}

impl DenseEngine {
    /// Build from a dense model's state dict (`backbone.*` + mmdet / mmseg head keys), validated
    /// strictly as `emo-dense` validates it; the auxiliary head's keys must be there but are
    /// not kept.
    pub fn from_state_dict(cfg: &DenseConfig, sd: &StateDict) -> Result<Self, InferError> {
        cfg.validate()?;
        let backbone = Engine::from_owned(&cfg.backbone, emo_weights::dense_backbone(sd, cfg)?)?;
        let eps = if cfg.task == Task::SsdLite { SSD_BN_EPS } else { SEG_BN_EPS };
        let layers = cfg
            .head_convs()
            .iter()
            .filter(|c| !c.training_only())
            .map(|c| (c.key.clone(), Layer::load(sd, c, eps)))
            .collect();
        Ok(DenseEngine { cfg: cfg.clone(), backbone, layers })
    }

    pub fn config(&self) -> &DenseConfig {
        &self.cfg
    }

    fn layer(&self, key: &str) -> &Layer {
        self.layers.get(key).unwrap_or_else(|| panic!("no head conv `{key}` in the {} layout", self.cfg.task))
    }

    /// Run an NCHW batch (`batch x 3 x h x w`, normalised as the backbone expects; any size the
    /// backbone takes, not only the configured input).
    pub fn run(&mut self, input: &[f32], batch: usize, h: usize, w: usize) -> Result<DenseRaw, InferError> {
        let feats = self.backbone.features_nhwc(input, batch, h, w, &self.cfg.out_indices())?;
        let mut maps: Vec<Map> =
            feats.into_iter().map(|(_, [b, h, w, c], data)| Map { batch: b, h, w, c, data }).collect();
        Ok(match self.cfg.task {
            Task::DeepLabV3 | Task::PspNet => {
                let c4 = maps.pop().expect("stage 4");
                self.seg(&c4)
            }
            Task::SsdLite => {
                let c4 = maps.pop().expect("stage 4");
                let c3 = maps.pop().expect("stage 3");
                self.ssd(c3, c4)
            }
            Task::RetinaNet => self.retina(maps.split_off(1)),
        })
    }

    fn seg(&self, c4: &Map) -> DenseRaw {
        let hc = emo_spec::HEAD_CHANNELS;
        let (b, h, w) = (c4.batch, c4.h, c4.w);
        let cat = if self.cfg.task == Task::DeepLabV3 {
            let mut cat = Map::zeros(b, h, w, 5 * hc);
            // Image pooling: global mean, 1x1 conv + BN + ReLU, broadcast (a bilinear resize of
            // a 1x1 map).
            let pooled = self.layer("decode_head.image_pool.1.conv").run(&adaptive_avg_pool(c4, 1));
            bilinear_into(&pooled, &mut cat, 0);
            for i in 0..emo_spec::ASPP_DILATIONS.len() {
                self.layer(&format!("decode_head.aspp_modules.{i}.conv")).run_into(c4, &mut cat, (i + 1) * hc);
            }
            cat
        } else {
            let mut cat = Map::zeros(b, h, w, c4.c + PSP_SCALES.len() * hc);
            for (src, dst) in c4.data.chunks(c4.c).zip(cat.data.chunks_mut(cat.c)) {
                dst[..c4.c].copy_from_slice(src);
            }
            for (i, &s) in PSP_SCALES.iter().enumerate() {
                let y = self.layer(&format!("decode_head.psp_modules.{i}.1.conv")).run(&adaptive_avg_pool(c4, s));
                bilinear_into(&y, &mut cat, c4.c + i * hc);
            }
            cat
        };
        let x = self.layer("decode_head.bottleneck.conv").run(&cat);
        let logits = self.layer("decode_head.conv_seg").run(&x);
        let k = logits.c;
        DenseRaw::Seg { shape: [b, k, h, w], logits: crate::nhwc_to_nchw(&logits.data, b, h, w, k) }
    }

    /// Per-level head outputs, channels-last (`[b, h, w, a * k]` is `[b, h * w * a, k]`),
    /// concatenated per image over the levels.
    fn flatten(levels: &[Map], k: usize) -> (usize, Vec<f32>) {
        let b = levels[0].batch;
        let anchors: usize = levels.iter().map(|m| m.h * m.w * m.c / k).sum();
        let mut out = Vec::with_capacity(b * anchors * k);
        for n in 0..b {
            for m in levels {
                let per = m.h * m.w * m.c;
                out.extend_from_slice(&m.data[n * per..(n + 1) * per]);
            }
        }
        (anchors, out)
    }

    fn ssd(&self, c3: Map, c4: Map) -> DenseRaw {
        let mut levels = vec![c3, c4];
        for i in 0..4 {
            let p = format!("neck.extra_layers.{i}");
            let x = self.layer(&format!("{p}.0.conv")).run(levels.last().expect("levels"));
            let x = self.layer(&format!("{p}.1.depthwise_conv.conv")).run(&x);
            levels.push(self.layer(&format!("{p}.1.pointwise_conv.conv")).run(&x));
        }
        let branch = |name: &str| -> Vec<Map> {
            levels
                .iter()
                .enumerate()
                .map(|(l, x)| {
                    let p = format!("bbox_head.{name}.{l}");
                    self.layer(&format!("{p}.1")).run(&self.layer(&format!("{p}.0.conv")).run(x))
                })
                .collect()
        };
        let k = self.cfg.num_classes + 1;
        let (anchors, cls) = Self::flatten(&branch("cls_convs"), k);
        let (_, reg) = Self::flatten(&branch("reg_convs"), 4);
        DenseRaw::Det { anchors, classes: k, cls, reg }
    }

    fn retina(&self, feats: Vec<Map>) -> DenseRaw {
        // feats = stage 2, 3, 4
        let mut lat: Vec<Map> =
            feats.iter().enumerate().map(|(i, f)| self.layer(&format!("neck.lateral_convs.{i}.conv")).run(f)).collect();
        for i in (1..3).rev() {
            let (lo, hi) = lat.split_at_mut(i);
            add_nearest(&mut lo[i - 1], &hi[0]);
        }
        let mut outs: Vec<Map> =
            lat.iter().enumerate().map(|(i, x)| self.layer(&format!("neck.fpn_convs.{i}.conv")).run(x)).collect();
        let p6 = self.layer("neck.fpn_convs.3.conv").run(&feats[2]);
        let p7 = self.layer("neck.fpn_convs.4.conv").run(&p6);
        outs.extend([p6, p7]);
        let tower = |name: &str, last: &str, x: &Map| {
            let mut y = self.layer(&format!("bbox_head.{name}.0.conv")).run(x);
            for i in 1..4 {
                y = self.layer(&format!("bbox_head.{name}.{i}.conv")).run(&y);
            }
            self.layer(last).run(&y)
        };
        let cls: Vec<Map> = outs.iter().map(|x| tower("cls_convs", "bbox_head.retina_cls", x)).collect();
        let reg: Vec<Map> = outs.iter().map(|x| tower("reg_convs", "bbox_head.retina_reg", x)).collect();
        let k = self.cfg.num_classes;
        let (anchors, cls) = Self::flatten(&cls, k);
        let (_, reg) = Self::flatten(&reg, 4);
        DenseRaw::Det { anchors, classes: k, cls, reg }
    }
}
