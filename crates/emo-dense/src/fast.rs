//! Inference through either model: the trainable burn [`DenseModel`] or the fast engine
//! ([`FastDense`], `emo-infer`'s [`DenseEngine`]: BN folded, channels-last kernels). Both give
//! the same [`DenseOutput`] (to float rounding; the parity tests check it), so every inference
//! function in [`crate::predict`] and the evaluation in [`crate::train`] take either.

use std::sync::Mutex;

use burn::tensor::{Tensor, TensorData};
use emo_infer::InferError;
use emo_infer::dense::{DenseEngine, DenseRaw};
use emo_spec::DenseConfig;
use emo_weights::StateDict;

use crate::DenseError;
use crate::loss::to_vec;
use crate::model::{DenseModel, DenseOutput};

/// The engine's errors as this crate's (a checkpoint or config error keeps its type).
fn infer_error(e: InferError) -> DenseError {
    match e {
        InferError::Spec(e) => DenseError::Spec(e),
        InferError::Weights(e) => DenseError::Weights(e),
        InferError::Input(m) => DenseError::Data(m),
    }
}

/// A dense model that can run inference (eval mode, no auxiliary logits).
pub trait DenseInfer: Sync {
    fn dense_config(&self) -> &DenseConfig;

    /// The eval-mode outputs of an NCHW batch.
    fn infer(&self, x: Tensor<4>) -> Result<DenseOutput, DenseError>;

    /// Threads evaluation should split its batches over: the burn model's CPU ops run on one
    /// thread each, the fast engine uses every core by itself.
    fn eval_threads(&self) -> usize {
        emo_train::parallel::cores()
    }
}

impl DenseInfer for DenseModel {
    fn dense_config(&self) -> &DenseConfig {
        &self.cfg
    }

    fn infer(&self, x: Tensor<4>) -> Result<DenseOutput, DenseError> {
        self.forward(x, false)
    }
}

/// The fast CPU engine for a dense model.
pub struct FastDense {
    cfg: DenseConfig,
    engine: Mutex<DenseEngine>,
}

impl FastDense {
    /// From a dense model's state dict (strictly validated, as [`DenseModel::from_state_dict`]).
    pub fn from_state_dict(cfg: &DenseConfig, sd: &StateDict) -> Result<Self, DenseError> {
        let engine = DenseEngine::from_state_dict(cfg, sd).map_err(infer_error)?;
        Ok(FastDense { cfg: cfg.clone(), engine: Mutex::new(engine) })
    }

    /// The engine for a burn model's current weights (BN statistics included).
    pub fn from_model(model: &DenseModel) -> Result<Self, DenseError> {
        Self::from_state_dict(&model.cfg, &model.state_dict())
    }
}

impl DenseInfer for FastDense {
    fn dense_config(&self) -> &DenseConfig {
        &self.cfg
    }

    fn infer(&self, x: Tensor<4>) -> Result<DenseOutput, DenseError> {
        let [b, _, h, w] = x.dims();
        let device = x.device();
        let input = to_vec(x);
        let raw = self.engine.lock().unwrap_or_else(|e| e.into_inner()).run(&input, b, h, w).map_err(infer_error)?;
        Ok(match raw {
            DenseRaw::Det { anchors, classes, cls, reg } => DenseOutput::Det {
                cls: Tensor::from_data(TensorData::new(cls, [b, anchors, classes]), &device),
                reg: Tensor::from_data(TensorData::new(reg, [b, anchors, 4]), &device),
            },
            DenseRaw::Seg { shape, logits } => DenseOutput::Seg {
                logits: Tensor::from_data(TensorData::new(logits, shape), &device),
                aux: None,
                se: None,
            },
        })
    }

    fn eval_threads(&self) -> usize {
        1
    }
}
