//! The dense models on burn: an EMO backbone (`backbone.*`) with an SSDLite or RetinaNet
//! detection head, or a DeepLabv3 / PSPNet decode head plus the auxiliary FCN head. Every conv
//! is built from [`DenseConfig::head_convs`] under its mmdet / mmseg key.

use burn::module::{Flag, Module, ModuleMapper, Param, RunningState};
use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, PaddingConfig2d};
use burn::tensor::module::{adaptive_avg_pool2d, interpolate};
use burn::tensor::ops::{ConvOptions, InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use emo_model::{Emo, dropout, param_id, stored};
use emo_spec::{
    ASPP_DILATIONS, DenseConfig, HeadAct, HeadConv, PSP_SCALES, SEG_BN_EPS, SSD_BN_EPS, SSD_BN_MOMENTUM, Task,
};
use emo_weights::{Data, StateDict, Tensor as Stored};

use crate::DenseError;

/// How a fresh head conv is initialised (the official `init_cfg`s).
#[derive(Clone, Copy, Debug)]
enum Init {
    /// Normal(0, std) weights, constant bias.
    Normal(f64, f64),
    /// mmcv `kaiming_init` (fan_out, relu), bias 0: `ConvModule`'s default.
    KaimingFanOut,
    /// Xavier uniform, bias 0 (mmdet FPN).
    Xavier,
}

/// A conv, its optional BN and activation (mmcv `ConvModule`).
#[derive(Module, Debug)]
pub struct ConvModule {
    pub conv: Conv2d,
    pub bn: Option<BatchNorm>,
    #[module(skip)]
    pub act: HeadAct,
}

impl ConvModule {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.conv_live_taps(x);
        if let Some(bn) = &self.bn {
            x = emo_model::ops::batch_norm(bn, x);
        }
        match self.act {
            HeadAct::None => x,
            HeadAct::Relu => burn::tensor::activation::relu(x),
            HeadAct::Relu6 => x.clamp(0.0, 6.0),
        }
    }

    /// The conv, computed on the kernel taps that can see the input ([`emo_spec::live_taps`],
    /// the rule the fast engine uses too): in a stride-1 "same" conv with dilation `d`, every
    /// off-centre kernel row reads only zero padding when `d >= H`, and every off-centre column
    /// when `d >= W` (the ASPP branches with dilations 12 / 24 / 36 on a smaller feature map).
    /// Those taps contribute exactly zero to the output and receive exactly zero gradient, so
    /// convolving with the live taps alone gives the same result (forward and backward) at a
    /// fraction of the work: on a 6x6 map, a 1x1 conv instead of 3x3 for all three dilated
    /// branches. Used when the padding is symmetric and the live taps are a range (always for
    /// stride-1 convs); otherwise the full conv runs.
    fn conv_live_taps(&self, x: Tensor<4>) -> Tensor<4> {
        let c = &self.conv;
        let [_, _, h, w] = x.dims();
        let PaddingConfig2d::Explicit(top, left, bottom, right) = c.padding else {
            return emo_model::ops::conv2d(c, x);
        };
        // The live range along one side and the padding that keeps the output size.
        let side = |n: usize, k: usize, stride: usize, (before, after): (usize, usize), d: usize| {
            if before != after {
                return None;
            }
            let live = emo_spec::live_taps(n, k, stride, before, d);
            let (a, b) = (*live.first()?, *live.last()? + 1);
            if live.len() != b - a {
                return None;
            }
            Some((a..b, (before.checked_sub(a * d)?, after.checked_sub((k - b) * d)?)))
        };
        let [kh, kw] = c.kernel_size;
        let (Some((rows, pad_h)), Some((cols, pad_w))) = (
            side(h, kh, c.stride[0], (top, bottom), c.dilation[0]),
            side(w, kw, c.stride[1], (left, right), c.dilation[1]),
        ) else {
            return emo_model::ops::conv2d(c, x);
        };
        if rows == (0..kh) && cols == (0..kw) {
            return emo_model::ops::conv2d(c, x);
        }
        let weight = c.weight.val();
        let [co, ci, _, _] = weight.dims();
        let weight = weight.slice([0..co, 0..ci, rows, cols]);
        let options = ConvOptions::new_with_padding(c.stride, [pad_h, pad_w], c.dilation, c.groups);
        emo_model::ops::conv2d_with(x, weight, c.bias.as_ref().map(|b| b.val()), options)
    }
}

struct Builder<'a> {
    cfg: &'a DenseConfig,
    /// `cfg.head_convs()`, computed once.
    convs: Vec<HeadConv>,
    sd: Option<&'a StateDict>,
    /// Keys initialised afresh even with `sd` (a fine-tune's semantic-encoding layer).
    fresh: &'a [String],
    device: Device,
}

impl Builder<'_> {
    fn tensor<const D: usize>(&self, key: &str, shape: [usize; D], fresh: impl FnOnce() -> Tensor<D>) -> Tensor<D> {
        match self.sd {
            Some(sd) if !self.fresh.iter().any(|k| k == key) => {
                let t = sd.get(key).unwrap_or_else(|| panic!("validated checkpoint lacks `{key}`"));
                let v = t.as_f32().unwrap_or_else(|| panic!("validated checkpoint: `{key}` is not float"));
                Tensor::from_data(TensorData::new(v.to_vec(), shape), &self.device)
            }
            _ => fresh(),
        }
    }

    fn param<const D: usize>(
        &self,
        key: &str,
        shape: [usize; D],
        fresh: impl FnOnce() -> Tensor<D>,
    ) -> Param<Tensor<D>> {
        let mut p = Param::from_tensor(self.tensor(key, shape, fresh));
        p.id = param_id(key);
        p
    }

    fn module(&self, key: &str, init: Init) -> ConvModule {
        let c =
            self.convs.iter().find(|c| c.key == key).unwrap_or_else(|| panic!("no head conv `{key}` in the layout"));
        let shape = [c.cout, c.cin / c.groups, c.k, c.k];
        let d = self.device.clone();
        let (fan_in, fan_out) = ((c.cin / c.groups * c.k * c.k) as f64, (c.cout / c.groups * c.k * c.k) as f64);
        let weight = self.param(&format!("{key}.weight"), shape, || {
            let dist = match init {
                Init::Normal(std, _) => Distribution::Normal(0.0, std),
                Init::KaimingFanOut => Distribution::Normal(0.0, (2.0 / fan_out).sqrt()),
                Init::Xavier => {
                    let b = (6.0 / (fan_in + fan_out)).sqrt();
                    Distribution::Uniform(-b, b)
                }
            };
            Tensor::random(shape, dist, &d)
        });
        let bias_value = match init {
            Init::Normal(_, b) => b,
            _ => 0.0,
        };
        let bias =
            c.bias.then(|| self.param(&format!("{key}.bias"), [c.cout], || Tensor::full([c.cout], bias_value, &d)));
        let (eps, momentum) =
            if self.cfg.task == Task::SsdLite { (SSD_BN_EPS, SSD_BN_MOMENTUM) } else { (SEG_BN_EPS, 0.1) };
        let bn = c.bn.as_ref().map(|p| BatchNorm {
            gamma: self.param(&format!("{p}.weight"), [c.cout], || Tensor::ones([c.cout], &d)),
            beta: self.param(&format!("{p}.bias"), [c.cout], || Tensor::zeros([c.cout], &d)),
            running_mean: RunningState::new(
                self.tensor(&format!("{p}.running_mean"), [c.cout], || Tensor::zeros([c.cout], &d)),
            ),
            running_var: RunningState::new(
                self.tensor(&format!("{p}.running_var"), [c.cout], || Tensor::ones([c.cout], &d)),
            ),
            training: Param::from_bool(true),
            momentum,
            epsilon: eps,
        });
        ConvModule {
            conv: Conv2d {
                weight,
                bias,
                stride: [c.stride, c.stride],
                kernel_size: [c.k, c.k],
                dilation: [c.dilation, c.dilation],
                groups: c.groups,
                padding: PaddingConfig2d::Explicit(c.pad, c.pad, c.pad, c.pad),
            },
            bn,
            act: c.act,
        }
    }
}

/// Flatten a level's `[B, A*K, H, W]` output to `[B, H*W*A, K]` (anchor order of
/// [`crate::anchors`]).
fn flatten_level(x: Tensor<4>, k: usize) -> Tensor<3> {
    let [b, ak, h, w] = x.dims();
    x.permute([0, 2, 3, 1]).reshape([b, h * w * (ak / k), k])
}

/// SSDLite: the 4 extra depthwise levels and the depthwise cls / reg convs per level.
#[derive(Module, Debug)]
pub struct SsdLite {
    /// `neck.extra_layers.{i}`: 1x1, depthwise 3x3 s2, pointwise (3 per level).
    pub extra: Vec<ConvModule>,
    /// `bbox_head.cls_convs.{l}`: depthwise 3x3 + BN + ReLU6, then 1x1 with bias (2 per level).
    pub cls: Vec<ConvModule>,
    pub reg: Vec<ConvModule>,
    #[module(skip)]
    pub num_classes: usize,
}

impl SsdLite {
    fn build(b: &Builder) -> Self {
        let neck = Init::Normal(0.03, 0.0);
        let head = Init::Normal(0.001, 0.0);
        let mut extra = Vec::new();
        for i in 0..4 {
            let p = format!("neck.extra_layers.{i}");
            for k in [format!("{p}.0.conv"), format!("{p}.1.depthwise_conv.conv"), format!("{p}.1.pointwise_conv.conv")]
            {
                extra.push(b.module(&k, neck));
            }
        }
        let branch = |name: &str| {
            (0..6)
                .flat_map(|l| {
                    let p = format!("bbox_head.{name}.{l}");
                    [b.module(&format!("{p}.0.conv"), head), b.module(&format!("{p}.1"), head)]
                })
                .collect()
        };
        SsdLite { extra, cls: branch("cls_convs"), reg: branch("reg_convs"), num_classes: b.cfg.num_classes }
    }

    /// `(cls [B, N, classes + 1], reg [B, N, 4])` over all anchors.
    fn forward(&self, c3: Tensor<4>, c4: Tensor<4>) -> (Tensor<3>, Tensor<3>) {
        let mut levels = vec![c3, c4];
        for i in 0..4 {
            let mut x = levels.last().expect("levels").clone();
            for m in &self.extra[3 * i..3 * i + 3] {
                x = m.forward(x);
            }
            levels.push(x);
        }
        let (mut cls, mut reg) = (Vec::new(), Vec::new());
        for (l, x) in levels.into_iter().enumerate() {
            let c = self.cls[2 * l + 1].forward(self.cls[2 * l].forward(x.clone()));
            let r = self.reg[2 * l + 1].forward(self.reg[2 * l].forward(x));
            cls.push(flatten_level(c, self.num_classes + 1));
            reg.push(flatten_level(r, 4));
        }
        (Tensor::cat(cls, 1), Tensor::cat(reg, 1))
    }
}

/// RetinaNet: FPN from stage 2 (P3-P7, extra convs on the stage-4 input) and the shared head.
#[derive(Module, Debug)]
pub struct RetinaNet {
    pub lateral: Vec<ConvModule>,
    /// `neck.fpn_convs.{0..5}` (3 and 4 are the stride-2 extra levels).
    pub fpn: Vec<ConvModule>,
    pub cls_convs: Vec<ConvModule>,
    pub reg_convs: Vec<ConvModule>,
    pub retina_cls: ConvModule,
    pub retina_reg: ConvModule,
    #[module(skip)]
    pub num_classes: usize,
}

impl RetinaNet {
    fn build(b: &Builder) -> Self {
        let head = Init::Normal(0.01, 0.0);
        let prior = -((1.0f64 - 0.01) / 0.01).ln();
        RetinaNet {
            lateral: (0..3).map(|i| b.module(&format!("neck.lateral_convs.{i}.conv"), Init::Xavier)).collect(),
            fpn: (0..5).map(|i| b.module(&format!("neck.fpn_convs.{i}.conv"), Init::Xavier)).collect(),
            cls_convs: (0..4).map(|i| b.module(&format!("bbox_head.cls_convs.{i}.conv"), head)).collect(),
            reg_convs: (0..4).map(|i| b.module(&format!("bbox_head.reg_convs.{i}.conv"), head)).collect(),
            retina_cls: b.module("bbox_head.retina_cls", Init::Normal(0.01, prior)),
            retina_reg: b.module("bbox_head.retina_reg", head),
            num_classes: b.cfg.num_classes,
        }
    }

    /// `(cls logits [B, N, classes], reg [B, N, 4])`.
    fn forward(&self, feats: Vec<Tensor<4>>) -> (Tensor<3>, Tensor<3>) {
        // feats = stage2, stage3, stage4
        let mut lat: Vec<Tensor<4>> = feats.iter().zip(&self.lateral).map(|(f, l)| l.forward(f.clone())).collect();
        for i in (1..3).rev() {
            let [_, _, h, w] = lat[i - 1].dims();
            let up =
                interpolate(lat[i].clone(), InterpolateOptions::new(InterpolateMode::Nearest).with_output_size([h, w]));
            lat[i - 1] = lat[i - 1].clone() + up;
        }
        let mut outs: Vec<Tensor<4>> = lat.into_iter().zip(&self.fpn).map(|(x, c)| c.forward(x)).collect();
        let p6 = self.fpn[3].forward(feats[2].clone());
        outs.push(p6.clone());
        outs.push(self.fpn[4].forward(p6));
        let (mut cls, mut reg) = (Vec::new(), Vec::new());
        for x in outs {
            let (mut c, mut r) = (x.clone(), x);
            for m in &self.cls_convs {
                c = m.forward(c);
            }
            for m in &self.reg_convs {
                r = m.forward(r);
            }
            cls.push(flatten_level(self.retina_cls.forward(c), self.num_classes));
            reg.push(flatten_level(self.retina_reg.forward(r), 4));
        }
        (Tensor::cat(cls, 1), Tensor::cat(reg, 1))
    }
}

/// mmseg's `dropout_ratio` of the DeepLabv3 / PSPNet and FCN heads (spec §12).
pub const SEG_HEAD_DROPOUT: f64 = 0.1;

/// DeepLabv3 (ASPP) or PSPNet (pyramid pooling) decode head on stage 4, and the auxiliary FCN
/// head on stage 3.
#[derive(Module, Debug)]
pub struct SegHead {
    /// DeepLabv3: `image_pool`, then the 4 ASPP branches. PSPNet: the 4 pyramid branches.
    pub branches: Vec<ConvModule>,
    pub bottleneck: ConvModule,
    pub conv_seg: ConvModule,
    pub aux_conv: ConvModule,
    pub aux_seg: ConvModule,
    /// Training only, when the config asks for it: the semantic-encoding layer
    /// ([`emo_spec::SE_LAYER`]) on stage 4's pooled features.
    pub se_layer: Option<ConvModule>,
    /// Dropout before both classifiers (mmseg `dropout_ratio`).
    #[module(skip)]
    pub dropout: f64,
    #[module(skip)]
    pub task: Task,
}

impl SegHead {
    fn build(b: &Builder) -> Self {
        let k = Init::KaimingFanOut;
        let branches = if b.cfg.task == Task::DeepLabV3 {
            std::iter::once(b.module("decode_head.image_pool.1.conv", k))
                .chain((0..ASPP_DILATIONS.len()).map(|i| b.module(&format!("decode_head.aspp_modules.{i}.conv"), k)))
                .collect()
        } else {
            (0..PSP_SCALES.len()).map(|i| b.module(&format!("decode_head.psp_modules.{i}.1.conv"), k)).collect()
        };
        SegHead {
            branches,
            bottleneck: b.module("decode_head.bottleneck.conv", k),
            conv_seg: b.module("decode_head.conv_seg", Init::Normal(0.01, 0.0)),
            aux_conv: b.module("auxiliary_head.convs.0.conv", k),
            aux_seg: b.module("auxiliary_head.conv_seg", Init::Normal(0.01, 0.0)),
            se_layer: b.cfg.se_layer.then(|| b.module(emo_spec::SE_LAYER, Init::Normal(0.01, 0.0))),
            dropout: SEG_HEAD_DROPOUT,
            task: b.cfg.task,
        }
    }

    /// `(logits at stage-4 size, auxiliary logits at stage-3 size, class-presence logits
    /// [batch, classes])`; the last two with `aux` (training), the presence logits only from a
    /// model with the semantic-encoding layer.
    fn forward(&self, c3: Tensor<4>, c4: Tensor<4>, aux: bool) -> SegLogits {
        let [b, _, h, w] = c4.dims();
        let se = self.se_layer.as_ref().filter(|_| aux).map(|m| {
            let k = m.conv.weight.dims()[0];
            m.forward(adaptive_avg_pool2d(c4.clone(), [1, 1])).reshape([b, k])
        });
        let mut parts = Vec::new();
        if self.task == Task::DeepLabV3 {
            let pooled = self.branches[0].forward(adaptive_avg_pool2d(c4.clone(), [1, 1]));
            parts.push(crate::loss::resize_logits(pooled, (h, w)));
            parts.extend(self.branches[1..].iter().map(|m| m.forward(c4.clone())));
        } else {
            parts.push(c4.clone());
            for (m, &s) in self.branches.iter().zip(&PSP_SCALES) {
                parts.push(crate::loss::resize_logits(m.forward(adaptive_avg_pool2d(c4.clone(), [s, s])), (h, w)));
            }
        }
        let x = self.bottleneck.forward(Tensor::cat(parts, 1));
        let logits = self.conv_seg.forward(dropout(x, self.dropout));
        let aux = aux.then(|| self.aux_seg.forward(dropout(self.aux_conv.forward(c3), self.dropout)));
        (logits, aux, se)
    }
}

/// What [`SegHead::forward`] returns.
type SegLogits = (Tensor<4>, Option<Tensor<4>>, Option<Tensor<2>>);

#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum DenseHead {
    Ssd(SsdLite),
    Retina(RetinaNet),
    Seg(SegHead),
}

/// What a dense model returns.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // a step's output, moved once into its loss
pub enum DenseOutput {
    /// Per-anchor class scores (SSD: softmax logits with background last; RetinaNet: sigmoid
    /// logits) and box deltas.
    Det { cls: Tensor<3>, reg: Tensor<3> },
    /// Segmentation logits at stage-4 resolution, the auxiliary ones at stage-3 resolution, and
    /// (training a model with the semantic-encoding layer) each image's class-presence logits.
    Seg { logits: Tensor<4>, aux: Option<Tensor<4>>, se: Option<Tensor<2>> },
}

/// Turns every BN training flag off (mmdet `norm_eval`).
struct EvalNorms;
impl ModuleMapper for EvalNorms {
    fn map_flag(&mut self, flag: Param<Flag>) -> Param<Flag> {
        flag.with_value(false)
    }
}

/// An EMO backbone with a detection or segmentation head.
#[derive(Module, Debug)]
pub struct DenseModel {
    pub backbone: Emo,
    pub head: DenseHead,
    #[module(skip)]
    pub cfg: DenseConfig,
}

impl DenseModel {
    /// A fresh model (the heads' official inits); `backbone` optionally from a classification
    /// or backbone checkpoint (`norm.*` / `head.*` dropped by rule, strict about the rest), or
    /// from the `backbone.*` part of a whole detector / segmenter (mmcv's `Pretrained` init with
    /// `prefix='backbone.'`; its neck and heads dropped).
    pub fn new(cfg: &DenseConfig, backbone: Option<&StateDict>, device: &Device) -> Result<Self, DenseError> {
        cfg.validate()?;
        let bb = match backbone {
            Some(sd) if sd.tensors.keys().any(|k| k.starts_with("backbone.")) => {
                Emo::from_state_dict(&cfg.backbone, &emo_weights::backbone_part(sd), device)?
            }
            Some(sd) => Emo::from_state_dict(&cfg.backbone, sd, device)?,
            None => Emo::new(&cfg.backbone, device)?,
        };
        Ok(Self::assemble(cfg, bb, None, &[], device))
    }

    /// A whole model from its state dict (`backbone.*` + head keys), strictly validated.
    pub fn from_state_dict(cfg: &DenseConfig, sd: &StateDict, device: &Device) -> Result<Self, DenseError> {
        cfg.validate()?;
        let bb = emo_weights::dense_backbone(sd, cfg)?;
        let backbone = Emo::from_state_dict(&cfg.backbone, &bb, device)?;
        Ok(Self::assemble(cfg, backbone, Some(sd), &[], device))
    }

    /// A model to fine-tune from `sd`, a whole trained model of the same task, backbone and
    /// classes (mmdet / mmseg's `load_from`; [`Self::carry_classes`] lays out a model of other
    /// classes first): every weight from `sd` but the training-only semantic-encoding layer,
    /// which starts from its official init whatever `sd` holds under its name. Strict about
    /// everything else: a missing, unexpected or mis-shaped key is an error that names it.
    pub fn fine_tune_from(cfg: &DenseConfig, sd: &StateDict, device: &Device) -> Result<Self, DenseError> {
        cfg.validate()?;
        let se = format!("{}.", emo_spec::SE_LAYER);
        let fresh: Vec<String> = cfg.classifier_keys().into_iter().filter(|k| k.starts_with(&se)).collect();
        let mut kept = sd.clone();
        kept.tensors.retain(|k, _| !k.starts_with(&se));
        let expected: Vec<_> = cfg.state_dict_keys().into_iter().filter(|k| !fresh.contains(&k.name)).collect();
        let what = format!("{} on {} (to fine-tune)", cfg.task, cfg.backbone.name());
        emo_weights::validate_keys(&kept, &expected, &what)?;
        let backbone = Emo::from_state_dict(&cfg.backbone, &emo_weights::backbone_part(&kept), device)?;
        Ok(Self::assemble(cfg, backbone, Some(&kept), &fresh, device))
    }

    /// `sd`, a trained model whose classes are `from`, with each classifier laid out for
    /// `cfg`'s classes `to`: a class of `to` found by name in `from` takes that class's
    /// classifier rows (for every anchor; SSD's background row with the first one found), the
    /// others keep `init`'s (a fresh model's state dict for `cfg`), so that a fine-tune to a
    /// subset, a reordering or an extension of the classes keeps what was learned of each.
    /// Returns the state dict ([`Self::fine_tune_from`] takes it) and how many classes were
    /// found.
    pub fn carry_classes(
        cfg: &DenseConfig,
        sd: &StateDict,
        from: &[String],
        to: &[String],
        init: &StateDict,
    ) -> Result<(StateDict, usize), DenseError> {
        let found: Vec<Option<usize>> = to.iter().map(|c| from.iter().position(|f| f == c)).collect();
        let src_cfg = DenseConfig { num_classes: from.len(), ..cfg.clone() };
        let bigger = DenseConfig { num_classes: cfg.num_classes + 1, ..cfg.clone() }.state_dict_keys();
        let (src_keys, dst_keys) = (src_cfg.state_dict_keys(), cfg.state_dict_keys());
        let se = format!("{}.", emo_spec::SE_LAYER);
        let mut out = sd.clone();
        for key in cfg.classifier_keys().into_iter().filter(|k| !k.starts_with(&se)) {
            // A classifier key names a key of every class count.
            let spec = |keys: &[emo_spec::KeySpec]| keys.iter().find(|k| k.name == key).expect("listed").shape.clone();
            let (src_shape, dst_shape, big) = (spec(&src_keys), spec(&dst_keys), spec(&bigger));
            // `anchors` blocks of `classes + extra` rows (SSD: the background row last).
            let anchors = big[0] - dst_shape[0];
            let extra = dst_shape[0] / anchors - to.len();
            let row: usize = dst_shape[1..].iter().product();
            let given = sd.get(&key);
            if given.map(|t| &t.shape) != Some(&src_shape) {
                return Err(DenseError::Data(format!(
                    "`{key}`: shape {:?}, but {} classes need {src_shape:?}",
                    given.map(|t| t.shape.clone()).unwrap_or_default(),
                    from.len()
                )));
            }
            let (Some(src), Some(dst)) = (given.and_then(|t| t.as_f32()), init.get(&key).and_then(|t| t.as_f32()))
            else {
                return Err(DenseError::Data(format!("`{key}`: not float, in the weights or the fresh model")));
            };
            let mut v = dst.to_vec();
            let (src_block, dst_block) = (from.len() + extra, to.len() + extra);
            let mut copy = |s: usize, d: usize| v[d * row..(d + 1) * row].copy_from_slice(&src[s * row..(s + 1) * row]);
            for a in 0..anchors {
                for (j, i) in found.iter().enumerate() {
                    if let Some(i) = i {
                        copy(a * src_block + i, a * dst_block + j);
                    }
                }
                if extra == 1 && found.iter().any(Option::is_some) {
                    copy(a * src_block + from.len(), a * dst_block + to.len());
                }
            }
            out.insert(key, Stored::f32(dst_shape, v));
        }
        Ok((out, found.iter().flatten().count()))
    }

    fn assemble(cfg: &DenseConfig, backbone: Emo, sd: Option<&StateDict>, fresh: &[String], device: &Device) -> Self {
        let b = Builder { cfg, convs: cfg.head_convs(), sd, fresh, device: device.clone() };
        let head = match cfg.task {
            Task::SsdLite => DenseHead::Ssd(SsdLite::build(&b)),
            Task::RetinaNet => DenseHead::Retina(RetinaNet::build(&b)),
            Task::DeepLabV3 | Task::PspNet => DenseHead::Seg(SegHead::build(&b)),
        };
        DenseModel { backbone, head, cfg: cfg.clone() }
    }

    /// Keep the backbone's BatchNorms in eval mode while training (`norm_eval=True`).
    pub fn with_norm_eval(mut self) -> Self {
        self.backbone = self.backbone.map(&mut EvalNorms);
        self
    }

    /// Freeze the stem and stages `1..=k` (`frozen_stages=k`; -1 or 0.. as in mmdet: `k < 0`
    /// freezes nothing, `0` the stem only): no gradients, and their BatchNorms in eval mode, as
    /// mmdet's `_freeze_stages` does (burn's `Module::freeze` turns the BN training flag off).
    pub fn with_frozen_stages(mut self, k: i64) -> Self {
        if k >= 0 {
            self.backbone.stem = self.backbone.stem.freeze();
            for s in self.backbone.stages.iter_mut().take(k as usize) {
                *s = s.clone().freeze();
            }
        }
        self
    }

    /// Forward an NCHW batch. `aux` asks for the auxiliary segmentation logits (training).
    pub fn forward(&self, x: Tensor<4>, aux: bool) -> Result<DenseOutput, DenseError> {
        let mut f = self.backbone.forward_features(x, &self.cfg.out_indices())?;
        Ok(match &self.head {
            DenseHead::Ssd(h) => {
                let c4 = f.pop().expect("stage4");
                let (cls, reg) = h.forward(f.pop().expect("stage3"), c4);
                DenseOutput::Det { cls, reg }
            }
            DenseHead::Retina(h) => {
                let (cls, reg) = h.forward(f.split_off(1));
                DenseOutput::Det { cls, reg }
            }
            DenseHead::Seg(h) => {
                let c4 = f.pop().expect("stage4");
                let (logits, aux, se) = h.forward(f.pop().expect("stage3"), c4, aux);
                DenseOutput::Seg { logits, aux, se }
            }
        })
    }

    /// The weights under mmdet / mmseg names: `backbone.*` then the head convs.
    pub fn state_dict(&self) -> StateDict {
        let mut sd = StateDict::new();
        for (k, t) in self.backbone.state_dict().tensors {
            sd.insert(format!("backbone.{k}"), t);
        }
        for (c, m) in self.cfg.head_convs().iter().zip(self.modules()) {
            sd.insert(format!("{}.weight", c.key), stored(m.conv.weight.val()));
            if let Some(b) = &m.conv.bias {
                sd.insert(format!("{}.bias", c.key), stored(b.val()));
            }
            if let (Some(p), Some(bn)) = (&c.bn, &m.bn) {
                sd.insert(format!("{p}.weight"), stored(bn.gamma.val()));
                sd.insert(format!("{p}.bias"), stored(bn.beta.val()));
                sd.insert(format!("{p}.running_mean"), stored(bn.running_mean.value_sync()));
                sd.insert(format!("{p}.running_var"), stored(bn.running_var.value_sync()));
                sd.insert(format!("{p}.num_batches_tracked"), Stored { shape: vec![], data: Data::I64(vec![0]) });
            }
        }
        sd
    }

    /// The head's conv modules in the order of [`DenseConfig::head_convs`].
    fn modules(&self) -> Vec<&ConvModule> {
        match &self.head {
            DenseHead::Ssd(h) => {
                let mut v: Vec<&ConvModule> = h.extra.iter().collect();
                v.extend(&h.cls);
                v.extend(&h.reg);
                v
            }
            DenseHead::Retina(h) => {
                let mut v: Vec<&ConvModule> = h.lateral.iter().chain(&h.fpn).collect();
                v.extend(&h.cls_convs);
                v.extend(&h.reg_convs);
                v.push(&h.retina_cls);
                v.push(&h.retina_reg);
                v
            }
            DenseHead::Seg(h) => {
                let mut v: Vec<&ConvModule> = vec![&h.conv_seg];
                v.extend(&h.branches);
                v.extend([&h.bottleneck, &h.aux_seg, &h.aux_conv]);
                v.extend(&h.se_layer);
                v
            }
        }
    }
}
