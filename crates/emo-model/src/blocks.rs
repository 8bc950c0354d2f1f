//! The paper's building blocks, usable on any NCHW feature map.
//!
//! EMO's Meta Mobile Block (MMB, paper §3.1) abstracts the inverted residual block and the
//! Transformer's FFN and MHSA into one residual form:
//!
//! ```text
//! out = x + Shrink( F( Expand(x) ) )
//! ```
//! with an expansion ratio λ (Expand: C -> λC, Shrink: λC -> C, both 1x1 convs / linear maps)
//! and an "efficient operator" F. Its instantiations:
//!
//! | block | Expand | F | Shrink |
//! |---|---|---|---|
//! | MobileNetV2 IRB ([`MetaMobileBlock::irb`]) | 1x1 conv + BN + act | depthwise kxk + BN + act | 1x1 conv + BN |
//! | Transformer FFN ([`MetaMobileBlock::ffn`]) | pre-norm, 1x1 (linear) + GELU | identity | 1x1 (linear) |
//! | Transformer MHSA ([`MetaMobileBlock::mhsa`]) | pre-norm, V projection (λ = 1) | attention with Q, K from x | output projection |
//! | **iRMB** ([`IrmbConfig`] -> [`Irmb`]) | pre-norm, V (after attention, attn_pre) | strided-window MHSA + depthwise conv (inner residual) | 1x1 conv |
//!
//! The residual applies when the block keeps shape (stride 1, same width). All blocks accept
//! any spatial size >= 1x1; window attention pads internally and crops back.
//!
//! ```no_run
//! use burn::tensor::{Device, Tensor};
//! use emo_model::blocks::IrmbConfig;
//!
//! let device = Device::flex();
//! // An iRMB with 4 heads of 16 channels in 7x7 strided windows, as in EMO's stage 3.
//! let block = IrmbConfig::new(64, 64).with_attention(16, 7).init(&device);
//! let y = block.forward(Tensor::<4>::zeros([2, 64, 20, 30], &device)); // [2, 64, 20, 30]
//! ```

use burn::module::Module;
use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::{Device, Tensor};
use emo_spec::{Act, AttnSpec, BlockSpec, Norm};

pub use crate::irmb::{Irmb, attend, attend_whole_map, partition, unpartition};
use crate::layers::{Norm2d, Source, act, drop_path};

/// A user-facing description of one iRMB (see [`Irmb`] for the forward pass).
#[derive(Clone, Debug, PartialEq)]
pub struct IrmbConfig {
    pub dim_in: usize,
    pub dim_out: usize,
    /// Expansion ratio λ (dim_mid = int(dim_in * λ)).
    pub exp_ratio: f64,
    pub norm: Option<Norm>,
    pub act: Act,
    pub dw_kernel: usize,
    pub stride: usize,
    /// (dim_head, window size; 0 = global) of the strided-window attention, if any.
    pub attention: Option<(usize, usize)>,
    /// SqueezeExcite reduced channels (on the expanded width), if any.
    pub se_channels: Option<usize>,
    pub drop_path: f64,
}

impl IrmbConfig {
    /// EMO's defaults for a body block: λ = 4, BN, SiLU, dw 3x3, stride 1, no attention.
    pub fn new(dim_in: usize, dim_out: usize) -> Self {
        IrmbConfig {
            dim_in,
            dim_out,
            exp_ratio: 4.0,
            norm: Some(Norm::Batch),
            act: Act::Silu,
            dw_kernel: 3,
            stride: 1,
            attention: None,
            se_channels: None,
            drop_path: 0.0,
        }
    }
    pub fn with_exp_ratio(mut self, r: f64) -> Self {
        self.exp_ratio = r;
        self
    }
    pub fn with_norm(mut self, n: Option<Norm>) -> Self {
        self.norm = n;
        self
    }
    pub fn with_act(mut self, a: Act) -> Self {
        self.act = a;
        self
    }
    pub fn with_kernel(mut self, k: usize) -> Self {
        self.dw_kernel = k;
        self
    }
    pub fn with_stride(mut self, s: usize) -> Self {
        self.stride = s;
        self
    }
    /// Strided-window attention with heads of `dim_head` channels (must divide dim_in).
    pub fn with_attention(mut self, dim_head: usize, window_size: usize) -> Self {
        self.attention = Some((dim_head, window_size));
        self
    }
    pub fn with_se(mut self, channels: usize) -> Self {
        self.se_channels = Some(channels);
        self
    }
    pub fn with_drop_path(mut self, p: f64) -> Self {
        self.drop_path = p;
        self
    }

    /// The resolved block spec (the same type EMO's own plan produces).
    pub fn spec(&self) -> BlockSpec {
        let stride = self.stride.max(1);
        BlockSpec {
            name: "block".into(),
            stage: 0,
            index: 0,
            dim_in: self.dim_in,
            dim_mid: (self.dim_in as f64 * self.exp_ratio) as usize,
            dim_out: self.dim_out,
            stride,
            dw_kernel: self.dw_kernel,
            norm: self.norm,
            act: self.act,
            v_proj: true,
            attention: self.attention.map(|(dh, ws)| AttnSpec {
                num_heads: self.dim_in / dh,
                dim_head: dh,
                window_size: ws,
            }),
            se_channels: self.se_channels,
            skip: self.dim_in == self.dim_out && stride == 1,
            drop_path: self.drop_path,
        }
    }

    /// Build a randomly initialised iRMB.
    ///
    /// # Panics
    /// If `dim_head` does not divide `dim_in`, or the kernel is even.
    pub fn init(&self, device: &Device) -> Irmb {
        if let Some((dh, _)) = self.attention {
            assert!(dh > 0 && self.dim_in.is_multiple_of(dh), "dim_head {dh} must divide dim_in {}", self.dim_in);
        }
        assert!(self.dw_kernel % 2 == 1, "dw_kernel must be odd");
        Irmb::new(&self.spec(), device)
    }
}

/// The efficient operator F of a [`MetaMobileBlock`].
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // one per block, built once
pub enum Operator {
    /// F = identity (the Transformer FFN).
    Identity(burn::nn::Identity),
    /// F = depthwise kxk conv + BN + act (MobileNetV2's IRB).
    DwConv(DwConv),
    /// F = multi-head self-attention with Q, K computed from the block input (the MHSA).
    Attention(Attention),
}

/// Depthwise conv + BN + activation.
#[derive(Module, Debug)]
pub struct DwConv {
    pub conv: Conv2d,
    pub norm: BatchNorm,
    #[module(skip)]
    pub act: Act,
}

/// Attention operator: Q and K from the (normed) input via one 1x1 conv, values = the expanded
/// tensor, in strided windows (`window_size` 0 = global attention over the whole map).
#[derive(Module, Debug)]
pub struct Attention {
    pub qk: Conv2d,
    pub num_heads: usize,
    pub window_size: usize,
}

/// One Meta Mobile Block: `x + Shrink(F(Expand(norm(x))))` (residual when shapes allow).
#[derive(Module, Debug)]
pub struct MetaMobileBlock {
    pub norm: Option<Norm2d>,
    /// 1x1 conv (bias when there is no BN after it).
    pub expand: Conv2d,
    pub expand_norm: Option<BatchNorm>,
    #[module(skip)]
    pub expand_act: Option<Act>,
    pub operator: Operator,
    pub shrink: Conv2d,
    pub shrink_norm: Option<BatchNorm>,
    pub skip: bool,
    pub drop_path: f64,
}

fn src(device: &Device) -> Source<'static> {
    Source { device: device.clone(), checkpoint: None, stable_ids: false }
}

impl MetaMobileBlock {
    /// MobileNetV2's inverted residual block: 1x1 expand + BN + act, depthwise kxk (stride) +
    /// BN + act, 1x1 shrink + BN; residual when stride 1 and dim_in == dim_out.
    pub fn irb(
        dim_in: usize,
        dim_out: usize,
        exp_ratio: f64,
        kernel: usize,
        stride: usize,
        a: Act,
        device: &Device,
    ) -> Self {
        let s = src(device);
        let mid = (dim_in as f64 * exp_ratio) as usize;
        MetaMobileBlock {
            norm: None,
            expand: s.conv("expand", dim_in, mid, 1, 1, 1, false),
            expand_norm: Some(s.bn("expand_norm", mid)),
            expand_act: Some(a),
            operator: Operator::DwConv(DwConv {
                conv: s.conv("dw", mid, mid, kernel, stride, mid, false),
                norm: s.bn("dw_norm", mid),
                act: a,
            }),
            shrink: s.conv("shrink", mid, dim_out, 1, 1, 1, false),
            shrink_norm: Some(s.bn("shrink_norm", dim_out)),
            skip: stride == 1 && dim_in == dim_out,
            drop_path: 0.0,
        }
    }

    /// The Transformer FFN on a feature map: pre-LayerNorm (over channels), 1x1 expand + GELU,
    /// 1x1 shrink, residual.
    pub fn ffn(dim: usize, exp_ratio: f64, device: &Device) -> Self {
        let s = src(device);
        let mid = (dim as f64 * exp_ratio) as usize;
        MetaMobileBlock {
            norm: Some(Norm2d::Layer(s.ln2d("norm", dim))),
            expand: s.conv("expand", dim, mid, 1, 1, 1, true),
            expand_norm: None,
            expand_act: Some(Act::Gelu),
            operator: Operator::Identity(burn::nn::Identity::new()),
            shrink: s.conv("shrink", mid, dim, 1, 1, 1, true),
            shrink_norm: None,
            skip: true,
            drop_path: 0.0,
        }
    }

    /// Transformer multi-head self-attention on a feature map: pre-LayerNorm, V projection
    /// (λ = 1), softmax(Q K^T / sqrt(d)) V over all pixels (`window_size` 0) or over EMO's strided
    /// windows, output projection, residual.
    pub fn mhsa(dim: usize, num_heads: usize, window_size: usize, device: &Device) -> Self {
        assert!(num_heads > 0 && dim.is_multiple_of(num_heads), "num_heads must divide dim");
        let s = src(device);
        MetaMobileBlock {
            norm: Some(Norm2d::Layer(s.ln2d("norm", dim))),
            expand: s.conv("v", dim, dim, 1, 1, 1, true),
            expand_norm: None,
            expand_act: None,
            operator: Operator::Attention(Attention {
                qk: s.conv("qk", dim, 2 * dim, 1, 1, 1, true),
                num_heads,
                window_size,
            }),
            shrink: s.conv("proj", dim, dim, 1, 1, 1, true),
            shrink_norm: None,
            skip: true,
            drop_path: 0.0,
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let shortcut = self.skip.then(|| x.clone());
        let xn = match &self.norm {
            Some(n) => n.forward(x),
            None => x,
        };
        let mut e = crate::ops::conv2d(&self.expand, xn.clone());
        if let Some(n) = &self.expand_norm {
            e = crate::ops::batch_norm(n, e);
        }
        if let Some(a) = self.expand_act {
            e = act(a, e);
        }
        let f = match &self.operator {
            Operator::Identity(_) => e,
            Operator::DwConv(d) => act(d.act, crate::ops::batch_norm(&d.norm, crate::ops::conv2d(&d.conv, e))),
            Operator::Attention(a) => {
                let (xw, g, [b, _, h, w]) = partition(xn, a.window_size);
                let (ew, _, _) = partition(e, a.window_size);
                let dh = xw.dims()[1] / a.num_heads;
                let o = attend(&a.qk, xw, ew, a.num_heads, (dh as f64).powf(-0.5));
                unpartition(o, &g, b, h, w)
            }
        };
        let mut y = crate::ops::conv2d(&self.shrink, f);
        if let Some(n) = &self.shrink_norm {
            y = crate::ops::batch_norm(n, y);
        }
        match shortcut {
            Some(s) => s + drop_path(y, self.drop_path),
            None => y,
        }
    }
}
