//! A fast CPU inference engine for EMO, independent of any framework.
//!
//! At load time every BatchNorm is folded into the convolution next to it (the stem conv, each
//! depthwise conv, and the `v` 1x1 conv after a block's input BN), weights are re-laid out for
//! channels-last kernels, and nothing else is kept. A forward pass then runs on NHWC buffers
//! that are allocated once per input shape and reused:
//!
//! ```text
//! stem conv+BN (direct) -> [per iRMB] LN? -> qk GEMM -> strided-window attention (from
//! pixel indices, no permutes) -> v GEMM + bias + act -> depthwise + bias + SiLU (+ inner
//! residual) -> SE? -> proj GEMM (+ outer residual) -> [head] LN -> mean -> linear
//! ```
//! Results match the official model to ~1e-6 (see the parity tests); the kernels are in
//! `emo-kernels`. [`dense`] runs the detection and segmentation heads of `emo-dense`'s models
//! the same way on the backbone's channels-last features.

pub mod dense;

use std::borrow::Cow;
use std::path::Path;

use emo_kernels::Act as KAct;
use emo_kernels::attention::window_attention;
use emo_kernels::conv::{self, ConvWeights, Images, channel_mean, conv2d, linear};
use emo_kernels::dwconv::{self, DwGeom};
use emo_kernels::fused::{
    conv_dw_mean, dw_channel_mean, dw_matmul, ln_matmul, matmul_in_place, v_dw_matmul, v_dw_matmul_available,
};
use emo_kernels::gemm::{Weight, matmul};
use emo_kernels::norm::layer_norm;
use emo_spec::{Act, BlockSpec, EmoConfig, NORM_EPS, Norm};
use emo_weights::{StateDict, WeightsError};

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(transparent)]
    Spec(#[from] emo_spec::SpecError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("bad input: {0}")]
    Input(String),
}

fn kact(a: Act) -> KAct {
    match a {
        Act::Silu => KAct::Silu,
        Act::Gelu => KAct::Gelu,
    }
}

/// Move a tensor out of the (validated) state dict: the engine takes the weights over without
/// copies, so a checkpoint is in memory only once while the engine is built.
fn take(sd: &mut StateDict, key: &str) -> Vec<f32> {
    match sd.tensors.remove(key).map(|t| t.data) {
        Some(emo_weights::Data::F32(v)) => v,
        _ => panic!("validated checkpoint lacks float `{key}`"),
    }
}

/// BN as `x * scale + shift`.
fn bn(sd: &mut StateDict, p: &str) -> (Vec<f32>, Vec<f32>) {
    let (g, b) = (take(sd, &format!("{p}.weight")), take(sd, &format!("{p}.bias")));
    let (m, v) = (take(sd, &format!("{p}.running_mean")), take(sd, &format!("{p}.running_var")));
    let scale: Vec<f32> = g.iter().zip(&v).map(|(g, v)| (*g as f64 / (*v as f64 + NORM_EPS).sqrt()) as f32).collect();
    let shift = b.iter().zip(&m).zip(&scale).map(|((b, m), s)| b - m * s).collect();
    (scale, shift)
}

struct Ln {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

fn ln(sd: &mut StateDict, p: &str) -> Ln {
    Ln { gamma: take(sd, &format!("{p}.norm.weight")), beta: take(sd, &format!("{p}.norm.bias")) }
}

struct Se {
    rd: usize,
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
}

struct Block {
    spec: BlockSpec,
    /// Its output is the stage output (`stage{i}` feature).
    last_of_stage: bool,
    ln: Option<Ln>,
    qk: Option<(Weight, Vec<f32>)>,
    v: Option<(Weight, Vec<f32>)>,
    dw_w: Vec<f32>,
    dw_b: Vec<f32>,
    dw: DwGeom,
    se: Option<Se>,
    proj: Weight,
}

impl Block {
    fn load(sd: &mut StateDict, b: &BlockSpec) -> Block {
        let p = &b.name;
        let mut ln_norm = None;
        let mut bn_norm = None;
        match b.norm {
            Some(Norm::Layer) => ln_norm = Some(ln(sd, &format!("{p}.norm"))),
            Some(Norm::Batch) => bn_norm = Some(bn(sd, &format!("{p}.norm"))),
            None => {}
        }
        let qk = b.attention.map(|_| {
            let w = take(sd, &format!("{p}.qk.conv.weight"));
            (Weight::from_torch(&w, 2 * b.dim_in, b.dim_in), take(sd, &format!("{p}.qk.conv.bias")))
        });
        let v = b.v_proj.then(|| {
            let mut w = take(sd, &format!("{p}.v.conv.weight"));
            let mut bias = take(sd, &format!("{p}.v.conv.bias"));
            if let Some((s, t)) = &bn_norm {
                // v(BN(x)) = (W diag(s)) x + (W t + b)
                for o in 0..b.dim_mid {
                    let row = &mut w[o * b.dim_in..(o + 1) * b.dim_in];
                    bias[o] += row.iter().zip(t).map(|(w, t)| w * t).sum::<f32>();
                    row.iter_mut().zip(s).for_each(|(w, s)| *w *= s);
                }
            }
            (Weight::from_torch(&w, b.dim_mid, b.dim_in), bias)
        });
        let (s, t) = bn(sd, &format!("{p}.conv_local.norm"));
        let k = b.dw_kernel;
        let mut w = take(sd, &format!("{p}.conv_local.conv.weight"));
        for (c, chunk) in w.chunks_mut(k * k).enumerate() {
            chunk.iter_mut().for_each(|v| *v *= s[c]);
        }
        let se = b.se_channels.map(|rd| Se {
            rd,
            w1: take(sd, &format!("{p}.se.conv_reduce.weight")),
            b1: take(sd, &format!("{p}.se.conv_reduce.bias")),
            w2: take(sd, &format!("{p}.se.conv_expand.weight")),
            b2: take(sd, &format!("{p}.se.conv_expand.bias")),
        });
        Block {
            spec: b.clone(),
            last_of_stage: false,
            ln: ln_norm,
            qk,
            v,
            dw_w: dwconv::weight_from_torch(&w, b.dim_mid, k),
            dw_b: t,
            dw: DwGeom { k, stride: b.stride, pad: emo_spec::conv_pad(k, b.stride) },
            se,
            proj: Weight::from_torch(&take(sd, &format!("{p}.proj.conv.weight")), b.dim_out, b.dim_mid),
        }
    }

    /// The depthwise conv as the kernels take it (SiLU, as in every iRMB), with the inner
    /// residual when the block has one.
    fn dw_layer(&self, residual: bool) -> dwconv::DwLayer<'_> {
        dwconv::DwLayer { weight: &self.dw_w, bias: &self.dw_b, geom: self.dw, act: KAct::Silu, residual }
    }
}

struct Head {
    ln: Ln,
    w: Weight,
    b: Vec<f32>,
    classes: usize,
}

/// Reusable activation buffers (grown on demand, never shrunk).
#[derive(Default)]
struct Buffers {
    x: Vec<f32>,
    out: Vec<f32>,
    xn: Vec<f32>,
    qk: Vec<f32>,
    att: Vec<f32>,
    e: Vec<f32>,
}

fn grow(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    emo_kernels::grow_exact(v, n);
    &mut v[..n]
}

/// Stage outputs: (stage index, shape, data).
pub type Features = Vec<(usize, [usize; 4], Vec<f32>)>;

/// Output of [`Engine::run_with`].
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// Selected stage outputs: (stage index, NCHW shape, NCHW data).
    pub features: Features,
    /// `[batch * num_classes]` logits, when asked for.
    pub logits: Option<Vec<f32>>,
}

/// The EMO inference engine for one config and set of weights.
pub struct Engine {
    cfg: EmoConfig,
    stem_w: Vec<f32>,
    stem_b: Vec<f32>,
    stem: DwGeom,
    blocks: Vec<Block>,
    head: Option<Head>,
    buf: Buffers,
    /// Extra buffers for image-parallel batches (one per thread).
    spare: Vec<Buffers>,
    /// Per-step wall times (stem, each block, head) when profiling is on.
    profile: Option<std::sync::Mutex<Vec<f64>>>,
}

impl Engine {
    /// Build from an official-layout state dict (validated strictly; with `num_classes == 0`
    /// the head keys are dropped).
    pub fn from_state_dict(cfg: &EmoConfig, sd: &StateDict) -> Result<Self, InferError> {
        Self::from_owned(cfg, sd.clone())
    }

    /// [`Engine::from_state_dict`], taking the tensors over (no copy of the checkpoint).
    pub fn from_owned(cfg: &EmoConfig, sd: StateDict) -> Result<Self, InferError> {
        cfg.validate()?;
        let mut sd = if cfg.num_classes == 0 { emo_weights::backbone_only(sd) } else { sd };
        emo_weights::validate(&sd, cfg)?;
        let sd = &mut sd;
        let st = cfg.stem();
        let (s, t) = bn(sd, "stage0.0.convs.0.1");
        let mut w = take(sd, "stage0.0.convs.0.0.weight");
        let per = st.in_chans * st.kernel * st.kernel;
        for (co, chunk) in w.chunks_mut(per).enumerate() {
            chunk.iter_mut().for_each(|v| *v *= s[co]);
        }
        let cb = take(sd, "stage0.0.convs.0.0.bias");
        let stem_b = (0..st.dim).map(|co| cb[co] * s[co] + t[co]).collect();
        let mut blocks: Vec<Block> = cfg.blocks().iter().map(|b| Block::load(&mut *sd, b)).collect();
        for i in 0..blocks.len() {
            blocks[i].last_of_stage = blocks.get(i + 1).is_none_or(|n| n.spec.stage != blocks[i].spec.stage);
        }
        let head = (cfg.num_classes > 0).then(|| Head {
            ln: ln(sd, "norm"),
            w: Weight::from_torch(&take(sd, "head.weight"), cfg.num_classes, cfg.stages[3].dim),
            b: take(sd, "head.bias"),
            classes: cfg.num_classes,
        });
        Ok(Engine {
            cfg: cfg.clone(),
            stem_w: conv::weight_from_torch(&w, st.dim, st.in_chans, st.kernel),
            stem_b,
            stem: DwGeom { k: st.kernel, stride: 2, pad: emo_spec::conv_pad(st.kernel, 2) },
            blocks,
            head,
            buf: Buffers::default(),
            spare: Vec::new(),
            profile: None,
        })
    }

    /// Load a `.pth` / `.safetensors` checkpoint.
    pub fn load(cfg: &EmoConfig, path: impl AsRef<Path>) -> Result<(Self, emo_weights::Wrapping), InferError> {
        let sd = emo_weights::load(path)?;
        let wrapping = sd.wrapping;
        Ok((Self::from_owned(cfg, sd)?, wrapping))
    }

    /// Turn per-step timing on (accumulated over runs) or off.
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(|| std::sync::Mutex::new(vec![0.0; self.blocks.len() + 2]));
    }

    /// Accumulated seconds per step: `("stem", t)`, one entry per iRMB (`stage3.1`, ...),
    /// `("head", t)`. Empty unless profiling is on.
    pub fn profile(&self) -> Vec<(String, f64)> {
        let Some(p) = &self.profile else { return Vec::new() };
        let t = p.lock().unwrap();
        // With the stem conv and the stem block fused (EMO's layout), "stem" holds the conv and
        // the block's depthwise half, and the block's own entry its gated projection.
        let mut names = vec!["stem".to_string()];
        names.extend(self.blocks.iter().map(|b| b.spec.name.clone()));
        names.push("head".into());
        names.into_iter().zip(t.iter().copied()).collect()
    }

    fn tick(&self, slot: usize, since: &mut std::time::Instant) {
        if let Some(p) = &self.profile {
            let now = std::time::Instant::now();
            p.lock().unwrap()[slot] += (now - *since).as_secs_f64();
            *since = now;
        }
    }

    pub fn config(&self) -> &EmoConfig {
        &self.cfg
    }

    pub fn num_classes(&self) -> usize {
        self.head.as_ref().map_or(0, |h| h.classes)
    }

    /// Logits `[batch, num_classes]` (row-major) for an NCHW input of any size >= 1x1.
    pub fn run(&mut self, input: &[f32], batch: usize, h: usize, w: usize) -> Result<Vec<f32>, InferError> {
        Ok(self.run_with(input, batch, h, w, &[], true)?.logits.expect("logits"))
    }

    /// Run and keep the stage outputs in `out_indices` (0..=4), optionally the logits.
    pub fn run_with(
        &mut self,
        input: &[f32],
        batch: usize,
        h: usize,
        w: usize,
        out_indices: &[usize],
        logits: bool,
    ) -> Result<Output, InferError> {
        self.run_cow(Cow::Borrowed(input), batch, h, w, out_indices, logits, false)
    }

    /// The stage outputs in `out_indices` (0..=4) of an NCHW input, each channels-last:
    /// `(stage index, [batch, h, w, c], data)`, as the dense heads read them.
    pub fn features_nhwc(
        &mut self,
        input: &[f32],
        batch: usize,
        h: usize,
        w: usize,
        out_indices: &[usize],
    ) -> Result<Features, InferError> {
        Ok(self.run_cow(Cow::Borrowed(input), batch, h, w, out_indices, false, true)?.features)
    }

    /// [`Engine::run_with`] taking the input by value: a single image is freed as soon as the
    /// stem has read it, so it does not sit next to the activations.
    pub fn run_owned(
        &mut self,
        input: Vec<f32>,
        batch: usize,
        h: usize,
        w: usize,
        out_indices: &[usize],
        logits: bool,
    ) -> Result<Output, InferError> {
        self.run_cow(Cow::Owned(input), batch, h, w, out_indices, logits, false)
    }

    /// `nhwc`: keep the features channels-last (shape `[batch, h, w, c]`), not NCHW.
    #[allow(clippy::too_many_arguments)]
    fn run_cow(
        &mut self,
        input: Cow<'_, [f32]>,
        batch: usize,
        h: usize,
        w: usize,
        out_indices: &[usize],
        logits: bool,
        nhwc: bool,
    ) -> Result<Output, InferError> {
        let cin = self.cfg.in_chans;
        if batch == 0 || h == 0 || w == 0 || input.len() != batch * cin * h * w {
            return Err(InferError::Input(format!(
                "expected {batch}x{cin}x{h}x{w} = {} values (NCHW, non-zero sizes), got {}",
                batch * cin * h * w,
                input.len()
            )));
        }
        if logits && self.head.is_none() {
            return Err(InferError::Input("this engine has no classifier head (num_classes = 0)".into()));
        }
        if let Some(&i) = out_indices.iter().find(|&&i| i > 4) {
            return Err(InferError::Input(format!("out index {i} > 4")));
        }
        let per = cin * h * w;
        let threads = emo_kernels::pool::num_threads();
        let mut results: Vec<Option<Output>> = vec![None; batch];
        if batch >= threads && threads > 1 {
            // One image per thread, kernels single-threaded inside: no synchronisation at all.
            let slots: Vec<std::sync::Mutex<Option<Output>>> =
                (0..batch).map(|_| std::sync::Mutex::new(None)).collect();
            let pool = std::sync::Mutex::new(std::mem::take(&mut self.spare));
            let this = &*self;
            emo_kernels::pool::parallel_for(batch, |b| {
                let mut buf = pool.lock().unwrap().pop().unwrap_or_default();
                let o = this.forward(
                    &mut buf,
                    Cow::Borrowed(&input[b * per..(b + 1) * per]),
                    1,
                    h,
                    w,
                    out_indices,
                    logits,
                    nhwc,
                );
                pool.lock().unwrap().push(buf);
                *slots[b].lock().unwrap() = Some(o);
            });
            self.spare = pool.into_inner().unwrap();
            for (r, s) in results.iter_mut().zip(slots) {
                *r = s.into_inner().unwrap();
            }
        } else {
            // Image after image, each with all threads (batch-1 working sets stay in cache).
            let mut buf = std::mem::take(&mut self.buf);
            if batch == 1 {
                results[0] = Some(self.forward(&mut buf, input, 1, h, w, out_indices, logits, nhwc));
            } else {
                for (b, r) in results.iter_mut().enumerate() {
                    let x = Cow::Borrowed(&input[b * per..(b + 1) * per]);
                    *r = Some(self.forward(&mut buf, x, 1, h, w, out_indices, logits, nhwc));
                }
            }
            self.buf = buf;
        }
        // Concatenate along the batch.
        let outs: Vec<Output> = results.into_iter().map(|o| o.expect("every image ran")).collect();
        let mut features: Features = Vec::new();
        for (k, (i, shape, _)) in outs[0].features.iter().enumerate() {
            let mut data = Vec::with_capacity(batch * outs[0].features[k].2.len());
            for o in &outs {
                data.extend_from_slice(&o.features[k].2);
            }
            let mut shape = *shape;
            shape[0] = batch;
            features.push((*i, shape, data));
        }
        let logits = logits.then(|| outs.iter().flat_map(|o| o.logits.clone().expect("logits")).collect());
        Ok(Output { features, logits })
    }

    /// One forward pass over `batch` images with the given buffers (input already checked).
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        buf: &mut Buffers,
        input: Cow<'_, [f32]>,
        batch: usize,
        h: usize,
        w: usize,
        out_indices: &[usize],
        logits: bool,
        nhwc: bool,
    ) -> Output {
        let cin = self.cfg.in_chans;
        let last_stage = if logits { 4 } else { out_indices.iter().copied().max().unwrap_or(0) };
        let Buffers { x, out, xn, qk, att, e } = buf;
        let mut clock = std::time::Instant::now();
        let (mut hh, mut ww) = (self.stem.out_len(h), self.stem.out_len(w));
        let c0 = self.cfg.stem_dim;
        // The stem block (depthwise + SE + projection, no expansion, no residual) fused with the
        // stem conv: the conv's output is never stored, and the largest map of the network is
        // written once (as the depthwise output, then projected in place).
        let first = &self.blocks[0];
        let fused_stem = Self::is_stem_block(first, hh, ww);
        // The stem conv reads the NCHW input in place.
        let images = Images { data: &input, planar: true, h, w, c: cin };
        let stem_conv = ConvWeights { weight: &self.stem_w, bias: &self.stem_b, geom: self.stem };
        if fused_stem {
            let (se, c) = (first.se.as_ref().expect("an SE block"), first.spec.dim_mid);
            let dw = ConvWeights { weight: &first.dw_w, bias: &first.dw_b, geom: first.dw };
            let xb = grow(x, batch * hh * ww * c0);
            for (b, y) in xb.chunks_mut(hh * ww * c0).enumerate() {
                let mut mean = vec![0.0; c];
                conv_dw_mean(images.image(b), stem_conv, dw, KAct::Silu, y, &mut mean);
                self.tick(0, &mut clock);
                matmul_in_place(y, hh * ww, &se_gated_proj(first, se, &mean));
            }
        } else {
            conv2d(images, batch, stem_conv, KAct::None, grow(x, batch * hh * ww * c0));
        }
        // A one-shot run (owned input) frees what it no longer needs: the input past the stem,
        // and below, buffers sized for larger maps than any block still to come.
        let one_shot = matches!(input, Cow::Owned(_));
        drop(input);
        let mut features = Vec::new();
        let keep = |stage: usize, data: &[f32], hh: usize, ww: usize, c: usize, features: &mut Vec<_>| {
            if out_indices.contains(&stage) {
                features.push(if nhwc {
                    (stage, [batch, hh, ww, c], data.to_vec())
                } else {
                    (stage, [batch, c, hh, ww], nhwc_to_nchw(data, batch, hh, ww, c))
                });
            }
        };
        if !fused_stem {
            self.tick(0, &mut clock);
        }
        for (bi, blk) in self.blocks.iter().enumerate() {
            let s = &blk.spec;
            if s.stage > last_stage {
                break;
            }
            if bi == 0 && fused_stem {
                self.tick(1, &mut clock);
                if blk.last_of_stage {
                    keep(s.stage, &x[..batch * hh * ww * s.dim_out], hh, ww, s.dim_out, &mut features);
                }
                continue;
            }
            let p = batch * hh * ww;
            let xcur = &x[..p * s.dim_in];
            let (oh, ow) = (blk.dw.out_len(hh), blk.dw.out_len(ww));
            let po = batch * oh * ow;
            // A downsampling block on a large map runs as one fused region (AVX-512 only),
            // without a full expanded map.
            let fuse = blk.ln.is_none()
                && blk.se.is_none()
                && blk.v.is_some()
                && blk.dw.stride == 2
                && blk.dw.k == 3
                && oh >= 16
                && v_dw_matmul_available();
            if one_shot {
                // A one-shot run releases a buffer larger than this block needs (the stem-
                // resolution map, 1.2 MB for EMO-1M, after stage 1's first block) rather than
                // keeping it to the end; a later block that needs more allocates again.
                let need_e = if fuse { 0 } else { p * s.dim_mid };
                for (v, need) in [(&mut *out, po * s.dim_out), (&mut *e, need_e)] {
                    if v.capacity() > need {
                        *v = Vec::new();
                    }
                }
            }
            match &blk.v {
                Some((wv, bv)) if fuse => {
                    let o = grow(out, po * s.dim_out);
                    let dw = blk.dw_layer(false);
                    let ran = v_dw_matmul(xcur, batch, hh, ww, (wv, bv, kact(s.act)), dw, &blk.proj, o);
                    debug_assert!(ran, "v_dw_matmul_available said it runs");
                }
                _ => self.block_unfused(blk, batch, hh, ww, (x, out, xn, qk, att, e)),
            }
            std::mem::swap(x, out);
            // `out` and `e` are both free between blocks: keep the larger allocation (the
            // stem-resolution map) as `e`, which later blocks fill, instead of as a second
            // idle copy next to it.
            if out.capacity() > e.capacity() {
                std::mem::swap(out, e);
            }
            (hh, ww) = (oh, ow);
            self.tick(bi + 1, &mut clock);
            if blk.last_of_stage {
                keep(s.stage, &x[..po * s.dim_out], hh, ww, s.dim_out, &mut features);
            }
        }
        let logits = if logits {
            let hd = self.head.as_ref().expect("head");
            let c = self.cfg.stages[3].dim;
            let p = batch * hh * ww;
            layer_norm(&x[..p * c], p, c, &hd.ln.gamma, &hd.ln.beta, NORM_EPS as f32, grow(xn, p * c));
            let mut pooled = vec![0.0; batch * c];
            channel_mean(&xn[..p * c], batch, hh * ww, c, &mut pooled);
            let mut out = vec![0.0; batch * hd.classes];
            matmul(&pooled, c, batch, &hd.w, Some(&hd.b), KAct::None, None, &mut out, hd.classes);
            Some(out)
        } else {
            None
        };
        self.tick(self.blocks.len() + 1, &mut clock);
        Output { features, logits }
    }
    /// Whether `blk` is EMO's stem block: depthwise (stride-1 "same") + SE + projection, no
    /// expansion, no attention, no residual, `c -> c`. It then runs over its input.
    fn is_stem_block(blk: &Block, h: usize, w: usize) -> bool {
        let s = &blk.spec;
        blk.se.is_some()
            && blk.ln.is_none()
            && blk.qk.is_none()
            && blk.v.is_none()
            && !s.skip
            && s.dim_in == s.dim_mid
            && s.dim_mid == s.dim_out
            && blk.dw.stride == 1
            && blk.dw.k == 2 * blk.dw.pad + 1
            && (blk.dw.out_len(h), blk.dw.out_len(w)) == (h, w)
    }

    /// One iRMB through the separate stages: (LN +) qk, attention, v / v alone / nothing, then
    /// depthwise + projection (fused, or with the SE in between for the stem block).
    /// Reads `x` (`[batch, h, w, dim_in]`), writes `out`.
    fn block_unfused(&self, blk: &Block, batch: usize, h: usize, w: usize, bufs: BufRefs) {
        let (x, out, xn, qk, att, e) = bufs;
        let s = &blk.spec;
        let p = batch * h * w;
        let (oh, ow) = (blk.dw.out_len(h), blk.dw.out_len(w));
        let po = batch * oh * ow;
        let (cin, mid, eps) = (s.dim_in, s.dim_mid, NORM_EPS as f32);
        let xcur = &x[..p * cin];
        let expanded: &[f32] = match (&blk.ln, &blk.qk, &blk.v, &s.attention) {
            (Some(l), Some((wqk, bqk)), Some((wv, bv)), Some(a)) => {
                let (xnb, qkb) = (grow(xn, p * cin), grow(qk, p * 2 * cin));
                ln_matmul(xcur, p, cin, &l.gamma, &l.beta, eps, xnb, wqk, Some(bqk), KAct::None, qkb);
                let o = grow(att, p * cin);
                let scale = a.scale() as f32;
                window_attention(
                    &xn[..p * cin],
                    &qk[..p * 2 * cin],
                    bqk,
                    batch,
                    h,
                    w,
                    cin,
                    a.num_heads,
                    a.window_size,
                    scale,
                    o,
                );
                matmul(o, cin, p, wv, Some(bv), kact(s.act), None, grow(e, p * mid), mid);
                &e[..p * mid]
            }
            (Some(l), None, Some((wv, bv)), _) => {
                let xnb = grow(xn, p * cin);
                ln_matmul(xcur, p, cin, &l.gamma, &l.beta, eps, xnb, wv, Some(bv), kact(s.act), grow(e, p * mid));
                &e[..p * mid]
            }
            (None, None, Some((wv, bv)), _) => {
                matmul(xcur, cin, p, wv, Some(bv), kact(s.act), None, grow(e, p * mid), mid);
                &e[..p * mid]
            }
            (None, None, None, _) => xcur,
            _ => unreachable!("block layout is fixed by the plan"),
        };
        let residual = s.skip.then_some(xcur);
        let outb = grow(out, po * s.dim_out);
        let Some(se) = &blk.se else {
            dw_matmul(expanded, batch, h, w, blk.dw_layer(s.skip), &blk.proj, residual, outb);
            return;
        };
        // SE: channel means of the depthwise output in a first pass (not stored), the gate folded
        // into the projection ((y * gate) . P = y . diag(gate) P), then depthwise + projection.
        let mut mean = vec![0.0; batch * mid];
        dw_channel_mean(expanded, batch, h, w, blk.dw_layer(s.skip), &mut mean);
        let (per_in, per_out) = (h * w * mid, oh * ow * s.dim_out);
        for b in 0..batch {
            let proj = se_gated_proj(blk, se, &mean[b * mid..(b + 1) * mid]);
            let res = residual.map(|r| &r[b * per_out..(b + 1) * per_out]);
            let (eb, ob) = (&expanded[b * per_in..(b + 1) * per_in], &mut outb[b * per_out..(b + 1) * per_out]);
            dw_matmul(eb, 1, h, w, blk.dw_layer(s.skip), &proj, res, ob);
        }
    }
}

/// The projection with the SE gate of one image folded in: `(y * gate) . P = y . diag(gate) P`,
/// from the channel means of the depthwise output.
fn se_gated_proj(blk: &Block, se: &Se, mean: &[f32]) -> Weight {
    let (mut r, mut g) = (vec![0.0; se.rd], vec![0.0; mean.len()]);
    linear(mean, &se.w1, &se.b1, se.rd, mean.len(), kact(blk.spec.act), &mut r);
    linear(&r, &se.w2, &se.b2, mean.len(), se.rd, KAct::None, &mut g);
    let mut proj = blk.proj.clone();
    proj.scale_rows(|i| emo_kernels::act::sigmoid(g[i]));
    proj
}

/// Mutable views of the buffers a block uses: x, out, xn, qk, att, e.
type BufRefs<'a> =
    (&'a mut Vec<f32>, &'a mut Vec<f32>, &'a mut Vec<f32>, &'a mut Vec<f32>, &'a mut Vec<f32>, &'a mut Vec<f32>);

fn nhwc_to_nchw(x: &[f32], b: usize, h: usize, w: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0.0; b * c * h * w];
    for n in 0..b {
        for p in 0..h * w {
            for ch in 0..c {
                out[(n * c + ch) * h * w + p] = x[(n * h * w + p) * c + ch];
            }
        }
    }
    out
}
