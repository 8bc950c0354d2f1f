//! The single expansion of an [`EmoConfig`] into per-block specs. Every other crate (the burn
//! model, the weight validator, the FLOP counter, the fast engine) builds from this list.

use crate::config::{Act, EmoConfig, Norm};

/// Window attention of one iRMB (attn_pre = True, qkv_bias = True in every released model).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnSpec {
    pub num_heads: usize,
    pub dim_head: usize,
    /// 0 = one global window.
    pub window_size: usize,
}

impl AttnSpec {
    /// `dim_head ** -0.5`.
    pub fn scale(&self) -> f64 {
        (self.dim_head as f64).powf(-0.5)
    }

    /// Window geometry for an `h` x `w` map: (wsH, wsW, padded H, padded W, n1, n2).
    pub fn windows(&self, h: usize, w: usize) -> WindowGeom {
        let (wh, ww) = if self.window_size == 0 { (h, w) } else { (self.window_size, self.window_size) };
        let pad_b = (wh - h % wh) % wh;
        let pad_r = (ww - w % ww) % ww;
        let (hp, wp) = (h + pad_b, w + pad_r);
        WindowGeom { wh, ww, hp, wp, n1: hp / wh, n2: wp / ww }
    }
}

/// Strided-window geometry: pixel (h, w) of the padded map belongs to window
/// (h % n1, w % n2) at token position (h / n1, w / n2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowGeom {
    pub wh: usize,
    pub ww: usize,
    pub hp: usize,
    pub wp: usize,
    pub n1: usize,
    pub n2: usize,
}

/// One iRMB, fully resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockSpec {
    /// Official key prefix without the trailing dot, e.g. `stage3.1`.
    pub name: String,
    /// Stage index 0..=4 (the stem iRMB is in stage 0).
    pub stage: usize,
    pub index: usize,
    pub dim_in: usize,
    pub dim_mid: usize,
    pub dim_out: usize,
    pub stride: usize,
    pub dw_kernel: usize,
    /// Norm on the block input; `None` = Identity (stem iRMB).
    pub norm: Option<Norm>,
    /// Activation of `v` (and of the SE).
    pub act: Act,
    /// Whether the 1x1 `v` projection exists (false only in the stem iRMB).
    pub v_proj: bool,
    pub attention: Option<AttnSpec>,
    /// SqueezeExcite with this many reduced channels (stem iRMB only).
    pub se_channels: Option<usize>,
    /// Both residuals (inner around the depthwise conv, outer around the block).
    pub skip: bool,
    /// Drop-path rate (training only; blocks without skip never use it).
    pub drop_path: f64,
}

impl BlockSpec {
    /// Output size of the depthwise conv for an input of `h` x `w` (ceil(h/s) for every odd k).
    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        (conv_out(h, self.dw_kernel, self.stride), conv_out(w, self.dw_kernel, self.stride))
    }
}

/// `pad = ceil((k - stride) / 2)` (dilation 1), the padding rule of every conv in EMO.
pub fn conv_pad(k: usize, stride: usize) -> usize {
    (k.saturating_sub(stride)).div_ceil(2)
}

/// Output length of a conv with EMO's padding rule.
pub fn conv_out(n: usize, k: usize, stride: usize) -> usize {
    (n + 2 * conv_pad(k, stride) - k) / stride + 1
}

/// The stem conv (`stage0.0.convs.0.0`): in_chans -> stem_dim, k x k, stride 2, bias, then BN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StemSpec {
    pub in_chans: usize,
    pub dim: usize,
    pub kernel: usize,
}

impl EmoConfig {
    pub fn stem(&self) -> StemSpec {
        StemSpec { in_chans: self.in_chans, dim: self.stem_dim, kernel: self.stem_kernel }
    }

    /// Channels of the five stage outputs `stage0`..`stage4`.
    pub fn stage_dims(&self) -> [usize; 5] {
        [self.stem_dim, self.stages[0].dim, self.stages[1].dim, self.stages[2].dim, self.stages[3].dim]
    }

    /// Spatial sizes of the five stage outputs for an `h` x `w` input (each stage is ceil(/2)).
    pub fn stage_hw(&self, h: usize, w: usize) -> [(usize, usize); 5] {
        let mut out = [(0, 0); 5];
        let (mut h, mut w) = (h, w);
        for o in &mut out {
            h = h.div_ceil(2);
            w = w.div_ceil(2);
            *o = (h, w);
        }
        out
    }

    /// Every iRMB in forward order: the stem iRMB (`stage0.1`), then stage1..stage4.
    pub fn blocks(&self) -> Vec<BlockSpec> {
        let s1 = &self.stages[0];
        let mut out = vec![BlockSpec {
            name: "stage0.1".into(),
            stage: 0,
            index: 1,
            dim_in: self.stem_dim,
            dim_mid: self.stem_dim,
            dim_out: self.stem_dim,
            stride: 1,
            dw_kernel: self.stem_kernel,
            norm: None,
            act: s1.act,
            v_proj: false,
            attention: None,
            se_channels: Some(self.stem_dim), // rd_ratio 1
            skip: false,                      // has_skip = False in the stem
            drop_path: 0.0,
        }];
        let total: usize = self.stages.iter().map(|s| s.depth).sum();
        let dpr = |i: usize| {
            if total > 1 { self.drop_path * i as f64 / (total - 1) as f64 } else { 0.0 }
        };
        let mut k = 0;
        let mut prev = self.stem_dim;
        for (si, s) in self.stages.iter().enumerate() {
            for j in 0..s.depth {
                let down = j == 0;
                let dim_in = if down { prev } else { s.dim };
                let exp = if down { s.exp_ratio * 2.0 } else { s.exp_ratio };
                let stride = if down { 2 } else { 1 };
                let attention = (s.attention && !down).then(|| AttnSpec {
                    num_heads: dim_in / s.dim_head,
                    dim_head: s.dim_head,
                    window_size: s.window_size,
                });
                out.push(BlockSpec {
                    name: format!("stage{}.{}", si + 1, j),
                    stage: si + 1,
                    index: j,
                    dim_in,
                    dim_mid: (dim_in as f64 * exp) as usize, // Python int() truncation
                    dim_out: s.dim,
                    stride,
                    dw_kernel: s.dw_kernel,
                    norm: Some(s.norm),
                    act: s.act,
                    v_proj: true,
                    attention,
                    se_channels: None,
                    skip: dim_in == s.dim && stride == 1,
                    drop_path: dpr(k),
                });
                k += 1;
            }
            prev = s.dim;
        }
        out
    }
}
