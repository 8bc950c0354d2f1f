//! EMO as a backbone for dense prediction (spec §12): SSDLite and RetinaNet detectors,
//! DeepLabv3 and PSPNet segmenters, on burn; plus everything around them that needs no
//! framework: anchors, the box coder, the max-IoU assigner, NMS, COCO mAP (as pycocotools
//! computes it), mIoU, COCO / mask-folder datasets, and a canvas dataset made from real
//! Fashion-MNIST items.

pub mod anchors;
pub mod assign;
pub mod bn;
pub mod boxes;
pub mod data;
pub mod fast;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod names;
pub mod predict;
pub mod train;

pub use boxes::{BBox, BoxCoder, Detection};
pub use emo_spec::{DenseConfig, Task};
pub use fast::{DenseInfer, FastDense};
pub use model::{DenseModel, DenseOutput};

/// Errors of the dense-prediction crate.
#[derive(Debug, thiserror::Error)]
pub enum DenseError {
    #[error(transparent)]
    Spec(#[from] emo_spec::SpecError),
    #[error(transparent)]
    Weights(#[from] emo_weights::WeightsError),
    #[error(transparent)]
    Model(#[from] emo_model::ModelError),
    #[error(transparent)]
    Train(#[from] emo_train::TrainError),
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Io(String),
    #[error("training diverged at iteration {iter}: loss is {loss}")]
    Diverged { iter: usize, loss: f64 },
}
