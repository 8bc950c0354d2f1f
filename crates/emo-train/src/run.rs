//! Pieces every training loop of this workspace shares (classification here, detection and
//! segmentation in `emo-dense`): the AdamW set-up, JSON files, the atomically replaced
//! checkpoint folder, and the text progress bar.

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::optim::{AdamWConfig, ModuleOptimizer};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::TrainError;

/// Collects the ids of 1-D parameters (norm weights, biases).
struct OneDimIds(Vec<ParamId>);
impl ModuleVisitor for OneDimIds {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if D == 1 {
            self.0.push(param.id);
        }
    }
}

/// AdamW (betas 0.9 / 0.999, eps 1e-8) with `weight_decay` on the weights and none on the 1-D
/// parameters (norms and biases), for any model.
pub fn adamw<M: Module>(model: &M, weight_decay: f64) -> ModuleOptimizer {
    let cfg = |wd: f64| {
        AdamWConfig::new().with_beta_1(0.9).with_beta_2(0.999).with_epsilon(1e-8).with_weight_decay(wd as f32)
    };
    let mut ids = OneDimIds(Vec::new());
    model.visit(&mut ids);
    cfg(weight_decay).init().with_group(ParamGroup::from_ids(ids.0), cfg(0.0).build(), None)
}

/// Write pretty JSON atomically.
pub fn write_json(path: &Path, v: &impl Serialize) -> Result<(), TrainError> {
    let s = serde_json::to_string_pretty(v).map_err(|e| TrainError::Io(e.to_string()))?;
    emo_weights::write_atomic(path, s.as_bytes())?;
    Ok(())
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, TrainError> {
    let s = std::fs::read_to_string(path).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&s).map_err(|e| TrainError::Io(format!("{}: {e}", path.display())))
}

/// Append one epoch's line to `dir/metrics.jsonl`.
pub fn append_metrics(dir: &Path, m: &impl Serialize) -> Result<(), TrainError> {
    use std::io::Write;
    let line = serde_json::to_string(m).map_err(|e| TrainError::Io(e.to_string()))?;
    let io = |e: std::io::Error| TrainError::Io(format!("metrics.jsonl: {e}"));
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("metrics.jsonl")).map_err(io)?;
    writeln!(f, "{line}").map_err(io)
}

/// The epoch lines of `dir/metrics.jsonl` (unreadable lines are skipped).
pub fn read_metrics<T: for<'de> Deserialize<'de>>(dir: &Path) -> Vec<T> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Replace `dir/checkpoint` atomically: `fill` writes `checkpoint.tmp`, the old checkpoint is
/// moved to `checkpoint.old`, the new one renamed into place, the old removed. A kill at any
/// point leaves a complete `checkpoint` or `checkpoint.old` ([`last_checkpoint`] finds it).
pub fn replace_checkpoint(dir: &Path, fill: impl FnOnce(&Path) -> Result<(), TrainError>) -> Result<(), TrainError> {
    let (tmp, cur, old) = (dir.join("checkpoint.tmp"), dir.join("checkpoint"), dir.join("checkpoint.old"));
    let io = |e: std::io::Error| TrainError::Io(format!("checkpoint: {e}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io)?;
    fill(&tmp)?;
    let _ = std::fs::remove_dir_all(&old);
    if cur.exists() {
        std::fs::rename(&cur, &old).map_err(io)?;
    }
    std::fs::rename(&tmp, &cur).map_err(io)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// The newest complete checkpoint folder of a run (one with a `state.json`).
pub fn last_checkpoint(dir: &Path) -> Result<PathBuf, TrainError> {
    ["checkpoint", "checkpoint.old"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.join("state.json").exists())
        .ok_or_else(|| TrainError::Config(format!("{} has no complete checkpoint", dir.display())))
}

/// A text progress bar, `[#####---------------]`.
pub fn progress_bar(done: usize, total: usize, width: usize) -> String {
    let n = (done * width).checked_div(total).unwrap_or(width).min(width);
    format!("[{}{}]", "#".repeat(n), "-".repeat(width - n))
}
