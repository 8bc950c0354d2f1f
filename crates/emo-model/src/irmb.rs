//! The Inverted Residual Mobile Block (iRMB), EMO's only building block.
//!
//! ```text
//! shortcut = x
//! x = norm(x)                                   # BN, LN2d, or identity (stem iRMB)
//! x = EW-MHSA(x) then v  |  v(x)  |  x          # attention blocks | others | stem
//! y = SiLU(BN(dwconv_kxk_stride(x)));  y = se(y)   # SE only in the stem iRMB
//! x = x + y if skip else y                      # inner residual (expanded width)
//! x = proj(x)                                   # 1x1, no bias
//! out = shortcut + drop_path(x) if skip else x  # outer residual
//! ```
//! `skip` = (dim_in == dim_out and stride == 1); the first block of each stage has neither
//! residual. The attention is EMO's strided-window ("remote") multi-head self-attention with
//! `attn_pre`: attention mixes the normalised input itself, and `v` (1x1 conv + act) is applied
//! after it. Windows hold pixels spaced `n1` rows and `n2` columns apart; the map is
//! zero-padded on the right and bottom, and padded keys are *not* masked (as in the official
//! model).

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use burn::tensor::activation::softmax;
use burn::tensor::ops::PadMode;
use emo_spec::{Act, AttnSpec, BlockSpec, Norm, WindowGeom};

use crate::layers::{ConvBn, Norm2d, Sink, Source, SqueezeExcite, act, drop_path};

/// One iRMB. Works on any NCHW map of `dim_in` channels and any size >= 1x1.
#[derive(Module, Debug)]
pub struct Irmb {
    /// `norm` (absent in the stem iRMB).
    pub norm: Option<Norm2d>,
    /// `qk.conv`: 1x1, dim_in -> 2*dim_in, with bias (attention blocks only).
    pub qk: Option<Conv2d>,
    /// `v.conv`: 1x1, dim_in -> dim_mid, with bias, followed by the block activation.
    pub v: Option<Conv2d>,
    /// `conv_local.{conv,norm}`: depthwise kxk (no bias) + BN, then always SiLU.
    pub conv_local: ConvBn,
    /// `se` (stem iRMB only).
    pub se: Option<SqueezeExcite>,
    /// `proj.conv`: 1x1, dim_mid -> dim_out, no bias.
    pub proj: Conv2d,
    #[module(skip)]
    pub act: Act,
    #[module(skip)]
    pub attention: Option<AttnSpec>,
    pub skip: bool,
    pub drop_path: f64,
}

impl Irmb {
    /// A randomly initialised block (PyTorch's default conv init) on `device`.
    pub fn new(spec: &BlockSpec, device: &burn::tensor::Device) -> Self {
        Self::build(spec, &Source { device: device.clone(), checkpoint: None, stable_ids: false })
    }

    pub(crate) fn build(b: &BlockSpec, src: &Source) -> Self {
        let p = &b.name;
        let norm = b.norm.map(|n| match n {
            Norm::Batch => Norm2d::Batch(src.bn(&format!("{p}.norm"), b.dim_in)),
            Norm::Layer => Norm2d::Layer(src.ln2d(&format!("{p}.norm"), b.dim_in)),
        });
        let qk = b.attention.map(|_| src.conv(&format!("{p}.qk.conv"), b.dim_in, 2 * b.dim_in, 1, 1, 1, true));
        let v = b.v_proj.then(|| src.conv(&format!("{p}.v.conv"), b.dim_in, b.dim_mid, 1, 1, 1, true));
        let conv_local = ConvBn {
            conv: src.conv(
                &format!("{p}.conv_local.conv"),
                b.dim_mid,
                b.dim_mid,
                b.dw_kernel,
                b.stride,
                b.dim_mid,
                false,
            ),
            norm: src.bn(&format!("{p}.conv_local.norm"), b.dim_mid),
        };
        let se = b.se_channels.map(|rd| SqueezeExcite {
            conv_reduce: src.conv(&format!("{p}.se.conv_reduce"), b.dim_mid, rd, 1, 1, 1, true),
            conv_expand: src.conv(&format!("{p}.se.conv_expand"), rd, b.dim_mid, 1, 1, 1, true),
            act: b.act,
        });
        let proj = src.conv(&format!("{p}.proj.conv"), b.dim_mid, b.dim_out, 1, 1, 1, false);
        Irmb {
            norm,
            qk,
            v,
            conv_local,
            se,
            proj,
            act: b.act,
            attention: b.attention,
            skip: b.skip,
            drop_path: b.drop_path,
        }
    }

    pub(crate) fn export(&self, p: &str, out: &mut Sink) {
        match &self.norm {
            Some(Norm2d::Batch(n)) => out.bn(&format!("{p}.norm"), n),
            Some(Norm2d::Layer(n)) => out.ln2d(&format!("{p}.norm"), n),
            None => {}
        }
        if let Some(qk) = &self.qk {
            out.conv(&format!("{p}.qk.conv"), qk);
        }
        if let Some(v) = &self.v {
            out.conv(&format!("{p}.v.conv"), v);
        }
        out.conv(&format!("{p}.conv_local.conv"), &self.conv_local.conv);
        out.bn(&format!("{p}.conv_local.norm"), &self.conv_local.norm);
        if let Some(se) = &self.se {
            out.conv(&format!("{p}.se.conv_reduce"), &se.conv_reduce);
            out.conv(&format!("{p}.se.conv_expand"), &se.conv_expand);
        }
        out.conv(&format!("{p}.proj.conv"), &self.proj);
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let shortcut = self.skip.then(|| x.clone());
        let x = match &self.norm {
            Some(n) => n.forward(x),
            None => x,
        };
        let x = match (&self.attention, &self.v) {
            (Some(a), Some(v)) => self.window_attention(x, a, v),
            (None, Some(v)) => act(self.act, crate::ops::conv2d(v, x)),
            _ => x,
        };
        let mut y = act(Act::Silu, self.conv_local.forward(x.clone()));
        if let Some(se) = &self.se {
            y = se.forward(y);
        }
        let x = if self.skip { x + y } else { y };
        let x = crate::ops::conv2d(&self.proj, x);
        match shortcut {
            Some(s) => s + drop_path(x, self.drop_path),
            None => x,
        }
    }

    /// Strided-window MHSA with attn_pre, then `v` + act, per window; returns dim_mid channels.
    ///
    /// `v` is a 1x1 conv and the act is pointwise, so both run after the windows are merged back
    /// and the padding cropped (the official model runs them on the padded windows and crops
    /// after: same values at every real pixel). When one window holds the whole map (a map no
    /// larger than the window, as in stages 3-4 at small inputs) the exact shortcut
    /// [`attend_whole_map`] replaces the padded tokens.
    fn window_attention(&self, x: Tensor<4>, a: &AttnSpec, v: &Conv2d) -> Tensor<4> {
        let qk = self.qk.as_ref().expect("attention block has qk");
        let [b, _, h, w] = x.dims();
        let g = a.windows(h, w);
        let o = if g.n1 == 1 && g.n2 == 1 {
            attend_whole_map(qk, x, a.num_heads, a.scale(), g.hp * g.wp - h * w)
        } else {
            let (xw, _, _) = partition(x, a.window_size);
            let o = attend(qk, xw.clone(), xw, a.num_heads, a.scale());
            unpartition(o, &g, b, h, w)
        };
        act(self.act, crate::ops::conv2d(v, o))
    }
}

/// Zero-pad `x` (B, C, H, W) on the right/bottom to whole windows and gather the strided
/// windows: pixel (h1*n1 + i1, w1*n2 + i2) goes to window (b, i1, i2) at token (h1, w1).
/// Returns the windows (B*n1*n2, C, wh, ww), the geometry and the original dims.
pub fn partition(x: Tensor<4>, window_size: usize) -> (Tensor<4>, WindowGeom, [usize; 4]) {
    let dims = x.dims();
    let [b, c, h, w] = dims;
    let g = AttnSpec { num_heads: 1, dim_head: 1, window_size }.windows(h, w);
    let x = if g.hp != h || g.wp != w { x.pad([(0, g.hp - h), (0, g.wp - w)], PadMode::Constant(0.0)) } else { x };
    let xw =
        x.reshape([b, c, g.wh, g.n1, g.ww, g.n2]).permute([0, 3, 5, 1, 2, 4]).reshape([b * g.n1 * g.n2, c, g.wh, g.ww]);
    (xw, g, dims)
}

/// Inverse of [`partition`]: scatter windows back and crop the padding away.
pub fn unpartition(o: Tensor<4>, g: &WindowGeom, b: usize, h: usize, w: usize) -> Tensor<4> {
    let c = o.dims()[1];
    let o = o.reshape([b, g.n1, g.n2, c, g.wh, g.ww]).permute([0, 3, 4, 1, 5, 2]).reshape([b, c, g.hp, g.wp]);
    if g.hp != h || g.wp != w { o.narrow(2, 0, h).narrow(3, 0, w) } else { o }
}

/// Multi-head attention inside each window: q and k from `qk(xw)` (channels `[q | k]`, each
/// head-major), softmax(q k^T * scale) applied to `values` split into `num_heads` heads.
/// No masking: padded tokens take part as keys (as in the official model).
pub fn attend(qk: &Conv2d, xw: Tensor<4>, values: Tensor<4>, num_heads: usize, scale: f64) -> Tensor<4> {
    let [nw, _, wh, ww] = xw.dims();
    let cv = values.dims()[1];
    let (l, dv) = (wh * ww, cv / num_heads);
    let (q, k) = queries_keys(qk, xw, num_heads);
    let attn = softmax(q.matmul(k).mul_scalar(scale), 3);
    let v = values.reshape([nw, num_heads, dv, l]).swap_dims(2, 3);
    attn.matmul(v).swap_dims(2, 3).reshape([nw, cv, wh, ww])
}

/// [`attend`] with `attn_pre` (the values are the input) for a map that one window holds whole,
/// zero-padded with `n_pad` tokens, computed without the padded tokens.
///
/// Every padded token is a zero pixel: its key is the k half of the qk-conv bias and its value
/// is 0, and its own output is cropped away. So the `n_pad` padded keys are one key, `k_pad`,
/// whose softmax weight counts `n_pad` times (its logit plus `ln n_pad`) and which adds nothing
/// to the output. Same function as the padded computation (and the same gradients), at the
/// cost of `h*w + 1` keys instead of `hp*wp`: a 2x2 map in a 7x7 window attends over 5 keys,
/// not 49.
pub fn attend_whole_map(qk: &Conv2d, x: Tensor<4>, num_heads: usize, scale: f64, n_pad: usize) -> Tensor<4> {
    if n_pad == 0 {
        return attend(qk, x.clone(), x, num_heads, scale);
    }
    let [b, c, h, w] = x.dims();
    let (l, dh) = (h * w, c / num_heads);
    let (q, k) = queries_keys(qk, x.clone(), num_heads);
    let k_pad = match &qk.bias {
        Some(bias) => bias.val().narrow(0, c, c),
        None => Tensor::zeros([c], &x.device()),
    }
    .reshape([1, num_heads, 1, dh]);
    let logit_pad = (q.clone() * k_pad).sum_dim(3).mul_scalar(scale).add_scalar((n_pad as f64).ln());
    let logits = Tensor::cat(vec![q.matmul(k).mul_scalar(scale), logit_pad], 3);
    let attn = softmax(logits, 3).narrow(3, 0, l);
    let v = x.reshape([b, num_heads, dh, l]).swap_dims(2, 3);
    attn.matmul(v).swap_dims(2, 3).reshape([b, c, h, w])
}

/// `qk(xw)` split into per-head queries `[nw, heads, l, dh]` and transposed keys
/// `[nw, heads, dh, l]` (channels `[q | k]`, each head-major).
fn queries_keys(qk: &Conv2d, xw: Tensor<4>, num_heads: usize) -> (Tensor<4>, Tensor<4>) {
    let [nw, c, wh, ww] = xw.dims();
    let (l, dh) = (wh * ww, c / num_heads);
    let qk = crate::ops::conv2d(qk, xw).reshape([nw, 2, num_heads, dh, l]);
    let q = qk.clone().narrow(1, 0, 1).reshape([nw, num_heads, dh, l]).swap_dims(2, 3);
    let k = qk.narrow(1, 1, 1).reshape([nw, num_heads, dh, l]);
    (q, k)
}
