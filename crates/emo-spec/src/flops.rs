//! FLOPs counted the way the paper counts them (fvcore `FlopCountAnalysis`): one multiply-add
//! is one FLOP; conv and linear count MACs (bias not counted), both attention matmuls count
//! M*K*N each, eval BN counts 2 per element, LayerNorm 5 per element. Softmax, the scale,
//! activations, residual adds, padding and mean pooling are not counted.

use crate::config::{EmoConfig, Norm};
use crate::plan::conv_out;

/// FLOP breakdown of one forward pass of one image.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Flops {
    /// Convolutions and the classifier (MACs).
    pub conv_linear: u64,
    /// The two attention matmuls (MACs).
    pub attention: u64,
    /// BatchNorm and LayerNorm.
    pub norm: u64,
}

impl Flops {
    pub fn total(&self) -> u64 {
        self.conv_linear + self.attention + self.norm
    }
}

fn norm_flops(norm: Norm, elems: usize) -> u64 {
    (elems * if norm == Norm::Batch { 2 } else { 5 }) as u64
}

impl EmoConfig {
    /// FLOPs of one image of `h` x `w` (fvcore convention, see the module docs).
    pub fn flops(&self, h: usize, w: usize) -> Flops {
        let mut f = Flops::default();
        let st = self.stem();
        let (mut h, mut w) = (conv_out(h, st.kernel, 2), conv_out(w, st.kernel, 2));
        f.conv_linear += (h * w * st.dim * st.in_chans * st.kernel * st.kernel) as u64;
        f.norm += norm_flops(Norm::Batch, h * w * st.dim);
        for b in self.blocks() {
            let hw = h * w;
            if let Some(n) = b.norm {
                f.norm += norm_flops(n, hw * b.dim_in);
            }
            let (h2, w2) = b.out_hw(h, w);
            if let Some(a) = b.attention {
                let g = a.windows(h, w);
                let hwp = g.hp * g.wp;
                let l = g.wh * g.ww;
                f.conv_linear += (hwp * b.dim_in * 2 * b.dim_in) as u64; // qk on the padded map
                f.attention += 2 * (g.n1 * g.n2 * l * l * b.dim_in) as u64; // q.k^T and attn.x
                f.conv_linear += (hwp * b.dim_in * b.dim_mid) as u64; // v after attention, padded
            } else if b.v_proj {
                f.conv_linear += (hw * b.dim_in * b.dim_mid) as u64;
            }
            let hw2 = h2 * w2;
            f.conv_linear += (hw2 * b.dim_mid * b.dw_kernel * b.dw_kernel) as u64;
            f.norm += norm_flops(Norm::Batch, hw2 * b.dim_mid);
            if let Some(rd) = b.se_channels {
                f.conv_linear += (2 * b.dim_mid * rd) as u64;
            }
            f.conv_linear += (hw2 * b.dim_mid * b.dim_out) as u64;
            h = h2;
            w = w2;
        }
        if self.num_classes > 0 {
            let c4 = self.stages[3].dim;
            f.norm += norm_flops(Norm::Layer, h * w * c4);
            f.conv_linear += (c4 * self.num_classes) as u64;
        }
        f
    }
}
