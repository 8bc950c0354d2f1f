//! The learning-rate schedule of the recipe (timm `CosineLRScheduler`, per iteration): linear
//! warm-up from `warmup_lr` to `lr`, then half a cosine down to `min_lr`.

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Cosine {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_lr: f64,
    pub warmup_iters: usize,
    pub total_iters: usize,
}

impl Cosine {
    /// Learning rate at iteration `t` (0-based).
    pub fn at(&self, t: usize) -> f64 {
        if t < self.warmup_iters {
            return self.warmup_lr + (self.lr - self.warmup_lr) * t as f64 / self.warmup_iters as f64;
        }
        let span = self.total_iters.saturating_sub(self.warmup_iters).max(1);
        let p = ((t - self.warmup_iters) as f64 / span as f64).min(1.0);
        self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * p).cos())
    }
}

/// Scale a base learning rate given per 512 images to a batch size (1.5e-3 per 512 in the paper).
pub fn scaled_lr(base_per_512: f64, batch: usize) -> f64 {
    base_per_512 * batch as f64 / 512.0
}
