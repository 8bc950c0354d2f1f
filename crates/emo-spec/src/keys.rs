//! The official state-dict layout of a config: every key with its shape, in the order the
//! official `state_dict()` lists them.

use crate::config::{EmoConfig, Norm};

/// What a state-dict entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// A trainable parameter (counted in the params total).
    Param,
    /// A float buffer (BN running mean / var).
    Buffer,
    /// BN `num_batches_tracked` (int64 scalar). Optional when loading.
    Counter,
}

/// One expected entry of the state dict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: KeyKind,
}

struct Keys(Vec<KeySpec>);

impl Keys {
    fn push(&mut self, name: String, shape: &[usize], kind: KeyKind) {
        self.0.push(KeySpec { name, shape: shape.to_vec(), kind });
    }
    fn conv(&mut self, p: &str, cout: usize, cin_per_group: usize, k: usize, bias: bool) {
        self.push(format!("{p}.weight"), &[cout, cin_per_group, k, k], KeyKind::Param);
        if bias {
            self.push(format!("{p}.bias"), &[cout], KeyKind::Param);
        }
    }
    fn bn(&mut self, p: &str, c: usize) {
        self.push(format!("{p}.weight"), &[c], KeyKind::Param);
        self.push(format!("{p}.bias"), &[c], KeyKind::Param);
        self.push(format!("{p}.running_mean"), &[c], KeyKind::Buffer);
        self.push(format!("{p}.running_var"), &[c], KeyKind::Buffer);
        self.push(format!("{p}.num_batches_tracked"), &[], KeyKind::Counter);
    }
    fn ln2d(&mut self, p: &str, c: usize) {
        self.push(format!("{p}.norm.weight"), &[c], KeyKind::Param);
        self.push(format!("{p}.norm.bias"), &[c], KeyKind::Param);
    }
}

impl EmoConfig {
    /// Every key of the official state dict for this config. With `num_classes == 0` the final
    /// `norm.*` and `head.*` are left out (the detection/segmentation backbone layout).
    pub fn state_dict_keys(&self) -> Vec<KeySpec> {
        let mut k = Keys(Vec::new());
        let st = self.stem();
        k.conv("stage0.0.convs.0.0", st.dim, st.in_chans, st.kernel, true);
        k.bn("stage0.0.convs.0.1", st.dim);
        for b in self.blocks() {
            let p = &b.name;
            match b.norm {
                Some(Norm::Batch) => k.bn(&format!("{p}.norm"), b.dim_in),
                Some(Norm::Layer) => k.ln2d(&format!("{p}.norm"), b.dim_in),
                None => {}
            }
            if b.attention.is_some() {
                k.conv(&format!("{p}.qk.conv"), 2 * b.dim_in, b.dim_in, 1, true);
            }
            if b.v_proj {
                k.conv(&format!("{p}.v.conv"), b.dim_mid, b.dim_in, 1, true);
            }
            k.conv(&format!("{p}.conv_local.conv"), b.dim_mid, 1, b.dw_kernel, false);
            k.bn(&format!("{p}.conv_local.norm"), b.dim_mid);
            if let Some(rd) = b.se_channels {
                k.conv(&format!("{p}.se.conv_reduce"), rd, b.dim_mid, 1, true);
                k.conv(&format!("{p}.se.conv_expand"), b.dim_mid, rd, 1, true);
            }
            k.conv(&format!("{p}.proj.conv"), b.dim_out, b.dim_mid, 1, false);
        }
        if self.num_classes > 0 {
            let c4 = self.stages[3].dim;
            k.ln2d("norm", c4);
            k.push("head.weight".into(), &[self.num_classes, c4], KeyKind::Param);
            k.push("head.bias".into(), &[self.num_classes], KeyKind::Param);
        }
        k.0
    }

    /// Number of trainable parameters (BN running statistics are buffers, not counted).
    pub fn num_params(&self) -> usize {
        self.state_dict_keys()
            .iter()
            .filter(|k| k.kind == KeyKind::Param)
            .map(|k| k.shape.iter().product::<usize>())
            .sum()
    }
}
