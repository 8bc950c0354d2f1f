//! Backbone feature metadata (timm `feature_info` style).

use crate::{EmoConfig, SpecError};

/// One selectable backbone output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureInfo {
    /// 0..=4 for `stage0`..`stage4`.
    pub index: usize,
    pub name: String,
    pub channels: usize,
    /// Stride relative to the input (2, 4, 8, 16, 32).
    pub reduction: usize,
}

impl EmoConfig {
    /// The five stage outputs `stage0`..`stage4`.
    pub fn feature_info(&self) -> Vec<FeatureInfo> {
        self.stage_dims()
            .iter()
            .enumerate()
            .map(|(i, &c)| FeatureInfo { index: i, name: format!("stage{i}"), channels: c, reduction: 2 << i })
            .collect()
    }
}

/// Resolve timm-style `out_indices` (negative counts from the end: -1 = stage4) into sorted,
/// de-duplicated stage indices.
pub fn resolve_out_indices(indices: &[i64]) -> Result<Vec<usize>, SpecError> {
    let mut out = Vec::new();
    for &i in indices {
        let r = if i < 0 { 5 + i } else { i };
        if !(0..5).contains(&r) {
            return Err(SpecError::OutIndex { index: i });
        }
        out.push(r as usize);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}
