//! Exponential moving average of the whole state dict (parameters and BN statistics; the
//! integer `num_batches_tracked` is left out), as timm's ModelEmaV2 with decay 0.9998.

use std::collections::BTreeMap;

use emo_weights::{Data, StateDict, Tensor};

#[derive(Clone, Debug, PartialEq)]
pub struct Ema {
    pub decay: f64,
    values: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Ema {
    /// Start from the current weights.
    pub fn new(decay: f64, sd: &StateDict) -> Self {
        let values = sd
            .tensors
            .iter()
            .filter_map(|(k, t)| t.as_f32().map(|d| (k.clone(), (t.shape.clone(), d.to_vec()))))
            .collect();
        Ema { decay, values }
    }

    /// `ema = decay * ema + (1 - decay) * current`.
    pub fn update(&mut self, sd: &StateDict) {
        let (d, e) = (self.decay as f32, 1.0 - self.decay as f32);
        for (k, (_, v)) in self.values.iter_mut() {
            if let Some(cur) = sd.get(k).and_then(|t| t.as_f32()) {
                v.iter_mut().zip(cur).for_each(|(a, b)| *a = d * *a + e * b);
            }
        }
    }

    /// The averaged weights as a state dict (with `num_batches_tracked` = 0 where the model has it).
    pub fn state_dict(&self, like: &StateDict) -> StateDict {
        let mut sd = StateDict::new();
        for (k, t) in &like.tensors {
            match self.values.get(k) {
                Some((shape, v)) => sd.insert(k.clone(), Tensor::f32(shape.clone(), v.clone())),
                None => sd.insert(k.clone(), Tensor { shape: t.shape.clone(), data: Data::I64(vec![0; t.numel()]) }),
            }
        }
        sd
    }

    /// Restore from a saved state dict.
    pub fn from_state_dict(decay: f64, sd: &StateDict) -> Self {
        Self::new(decay, sd)
    }
}
