//! Operations with their own kernels and backward passes on the flex backend: the depthwise
//! convolution and the SiLU / GELU activations.
//!
//! burn's autodiff differentiates `conv2d` through the backend's generic `conv2d_x_backward`
//! (a grouped transposed conv) and `conv2d_weight_backward` (a grouped conv); on flex a
//! depthwise layer then runs one tiny GEMM per channel and image, which made the depthwise
//! backward ~20% of an EMO-1M training step. SiLU and GELU went through flex's scalar `expf` /
//! `erff` (another ~15%). This module is a burn backend extension (`#[backend_extension]`):
//! on flex, the depthwise gradients run `emo_kernels::dwgrad` (channels-last loops over the
//! taps that fall inside the input) and the activations and their derivatives run
//! `emo_kernels::act` (vectorised exp / erf, within 2e-6 of the exact functions), and in
//! training the one-group convs run one GEMM per image for the forward pass and each gradient
//! (`emo_kernels::convgrad`, im2col beyond 1x1) instead of burn's generic conv backward. Other
//! backends (LibTorch, CubeCL) never reach it: [`conv2d`] and [`activation`] take the extension
//! only for flex tensors and burn's own ops otherwise. Tests compare values and gradients with
//! burn's ops on EMO's shapes.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::ops::{ConvOptions, ModuleOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{
    AutodiffBackend, Backend, Dispatch, DispatchDevice, Flex, Scalar, TensorMetadata, backend_extension,
};
use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, PaddingConfig2d};
use burn::tensor::{DType, Tensor, TensorData};
use burn_flex::FlexTensor;
use emo_kernels::act::{self as kact, Act as KAct};
use emo_kernels::bnorm;
use emo_kernels::convgrad::{self, ConvPlan};
use emo_kernels::dwgrad::{self, DwPlan};
use emo_spec::Act;

/// The depthwise conv (forward pass and its two gradients) and the activations (forward and
/// derivative) as backend operations. The default bodies are burn's generic ops; flex
/// overrides them with emo-kernels' loops.
#[backend_extension(Flex, Autodiff)]
pub trait EmoOps: Backend {
    /// `conv2d` with `groups == channels` and no bias.
    fn depthwise_conv2d(x: FloatTensor<Self>, weight: FloatTensor<Self>, options: ConvOptions<2>) -> FloatTensor<Self> {
        Self::conv2d(x, weight, None, options)
    }

    /// Gradient of the input for output gradient `grad`.
    fn depthwise_conv2d_x_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        Self::conv2d_x_backward(x, weight, grad, options)
    }

    /// Gradient of the weight for output gradient `grad`.
    fn depthwise_conv2d_weight_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        Self::conv2d_weight_backward(x, weight, grad, options)
    }

    /// `conv2d` with one group and no bias.
    fn dense_conv2d(x: FloatTensor<Self>, weight: FloatTensor<Self>, options: ConvOptions<2>) -> FloatTensor<Self> {
        Self::conv2d(x, weight, None, options)
    }

    /// Its input gradient for output gradient `grad`.
    fn dense_conv2d_x_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        Self::conv2d_x_backward(x, weight, grad, options)
    }

    /// Its weight gradient for output gradient `grad`.
    fn dense_conv2d_weight_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        Self::conv2d_weight_backward(x, weight, grad, options)
    }

    /// `act(x)` for SiLU or exact-erf GELU.
    fn activation(x: FloatTensor<Self>, act: Act) -> FloatTensor<Self> {
        generic_activation::<Self>(x, act)
    }

    /// `grad * act'(x)`.
    fn activation_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>, act: Act) -> FloatTensor<Self> {
        generic_activation_backward::<Self>(x, grad, act)
    }

    /// Training-mode BatchNorm of NCHW `x`: `(output, batch mean, biased batch variance)`.
    fn batch_norm_train_nchw(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let r = <Self as ModuleOps<Self>>::batch_norm_train(x, gamma, beta, epsilon);
        (r.output, r.mean, r.variance)
    }

    /// Its gradients `(x, gamma, beta)` for output gradient `grad`.
    fn batch_norm_train_nchw_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let r = <Self as ModuleOps<Self>>::batch_norm_train_backward(x, gamma, mean, variance, epsilon, grad);
        (r.x_grad, r.gamma_grad, r.beta_grad)
    }
}

fn generic_activation<B: Backend>(x: FloatTensor<B>, act: Act) -> FloatTensor<B> {
    match act {
        Act::Silu => B::float_mul(x.clone(), B::sigmoid(x)),
        Act::Gelu => B::gelu(x),
    }
}

fn generic_activation_backward<B: Backend>(x: FloatTensor<B>, grad: FloatTensor<B>, act: Act) -> FloatTensor<B> {
    match act {
        Act::Silu => {
            // s (1 + x (1 - s))
            let s = B::sigmoid(x.clone());
            let one_minus_s = B::float_add_scalar(B::float_neg(s.clone()), Scalar::Float(1.0));
            let inner = B::float_add_scalar(B::float_mul(x, one_minus_s), Scalar::Float(1.0));
            B::float_mul(grad, B::float_mul(s, inner))
        }
        Act::Gelu => B::gelu_backward(x, grad),
    }
}

fn plan(x_shape: &[usize], w_shape: &[usize], options: &ConvOptions<2>) -> DwPlan {
    DwPlan {
        n: x_shape[0],
        c: x_shape[1],
        h: x_shape[2],
        w: x_shape[3],
        kh: w_shape[2],
        kw: w_shape[3],
        stride: options.stride,
        pad: options.padding_begin(),
        dilation: options.dilation,
    }
}

/// The values of an f32 flex tensor in row-major order (copies only a strided view).
fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(t.to_contiguous().as_slice::<f32>().expect("contiguous f32").to_vec()),
    }
}

/// The loops handle f32 NCHW depthwise convs (`[c, 1, kh, kw]` weight, `groups == c`) with
/// symmetric padding; anything else takes burn's ops.
fn fast_path(x: &FlexTensor, weight: &FlexTensor, grad: &FlexTensor, options: &ConvOptions<2>) -> bool {
    let f32 = |t: &FlexTensor| t.dtype() == DType::F32;
    let (xs, ws) = (x.shape(), weight.shape());
    f32(x)
        && f32(weight)
        && f32(grad)
        && !options.is_asymmetric()
        && xs.num_dims() == 4
        && ws.num_dims() == 4
        && ws[0] == xs[1]
        && ws[1] == 1
        && options.groups == xs[1]
}

/// The GEMM loops handle f32 `[n, ci, h, w]` inputs with a `[co, ci, kh, kw]` weight, one group
/// and symmetric padding.
fn dense_fast_path(x: &FlexTensor, weight: &FlexTensor, grad: &FlexTensor, options: &ConvOptions<2>) -> bool {
    let (xs, ws) = (x.shape(), weight.shape());
    all_f32(&[x, weight, grad])
        && xs.num_dims() == 4
        && ws.num_dims() == 4
        && ws[1] == xs[1]
        && options.groups == 1
        && !options.is_asymmetric()
}

fn conv_plan(x: &FlexTensor, weight: &FlexTensor, options: &ConvOptions<2>) -> ConvPlan {
    let [n, ci, h, w] = x.shape().dims::<4>();
    let [co, _, kh, kw] = weight.shape().dims::<4>();
    ConvPlan {
        n,
        ci,
        co,
        h,
        w,
        kh,
        kw,
        stride: options.stride,
        pad: options.padding_begin(),
        dilation: options.dilation,
    }
}

/// Elements per chunk of an activation's output (32 KiB: stays in L1 until overwritten).
const ACT_CHUNK: usize = 8192;

/// A kernel's `[n, ...]` output computed image by image into a fresh buffer (`f(image, part)`),
/// each image's part zeroed only just before the kernel writes it ([`emo_kernels::produce`]).
fn per_image(n: usize, len: usize, mut f: impl FnMut(usize, &mut [f32])) -> Vec<f32> {
    let per = len / n.max(1);
    emo_kernels::produce(len, per, |start, part| f(start / per.max(1), part))
}

impl EmoOps for Flex {
    fn dense_conv2d(x: FloatTensor<Self>, weight: FloatTensor<Self>, options: ConvOptions<2>) -> FloatTensor<Self> {
        if !dense_fast_path(&x, &weight, &weight, &options) {
            return Self::conv2d(x, weight, None, options);
        }
        let p = conv_plan(&x, &weight, &options);
        let (oh, ow) = p.out_hw();
        let (x, weight, one) = (values(&x), values(&weight), ConvPlan { n: 1, ..p });
        let out = per_image(p.n, p.output_len(), |b, out| {
            convgrad::forward(&x[b * one.input_len()..][..one.input_len()], &weight, &one, out)
        });
        FlexTensor::from_data(TensorData::new(out, [p.n, p.co, oh, ow]))
    }

    fn dense_conv2d_x_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        if !dense_fast_path(&x, &weight, &grad, &options) {
            return Self::conv2d_x_backward(x, weight, grad, options);
        }
        let p = conv_plan(&x, &weight, &options);
        let (grad, weight, one) = (values(&grad), values(&weight), ConvPlan { n: 1, ..p });
        let gx = per_image(p.n, p.input_len(), |b, gx| {
            convgrad::x_grad(&grad[b * one.output_len()..][..one.output_len()], &weight, &one, gx)
        });
        FlexTensor::from_data(TensorData::new(gx, x.shape().clone()))
    }

    fn dense_conv2d_weight_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        if !dense_fast_path(&x, &weight, &grad, &options) {
            return Self::conv2d_weight_backward(x, weight, grad, options);
        }
        let p = conv_plan(&x, &weight, &options);
        let mut gw = vec![0f32; p.weight_len()];
        convgrad::weight_grad(&values(&x), &values(&grad), &p, &mut gw);
        FlexTensor::from_data(TensorData::new(gw, weight.shape().clone()))
    }

    fn depthwise_conv2d(x: FloatTensor<Self>, weight: FloatTensor<Self>, options: ConvOptions<2>) -> FloatTensor<Self> {
        if !fast_path(&x, &weight, &weight, &options) {
            return Self::conv2d(x, weight, None, options);
        }
        let p = plan(&x.shape().dims::<4>(), &weight.shape().dims::<4>(), &options);
        let (oh, ow) = p.out_hw();
        let (x, weight, one) = (values(&x), values(&weight), DwPlan { n: 1, ..p });
        let out = per_image(p.n, p.output_len(), |b, out| {
            dwgrad::forward(&x[b * one.input_len()..][..one.input_len()], &weight, &one, out)
        });
        FlexTensor::from_data(TensorData::new(out, [p.n, p.c, oh, ow]))
    }

    fn depthwise_conv2d_x_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        if !fast_path(&x, &weight, &grad, &options) {
            return Self::conv2d_x_backward(x, weight, grad, options);
        }
        let xs = x.shape().dims::<4>().to_vec();
        let p = plan(&xs, &weight.shape().dims::<4>(), &options);
        let (grad, weight, one) = (values(&grad), values(&weight), DwPlan { n: 1, ..p });
        let gx = per_image(p.n, p.input_len(), |b, gx| {
            dwgrad::x_grad(&grad[b * one.output_len()..][..one.output_len()], &weight, &one, gx)
        });
        FlexTensor::from_data(TensorData::new(gx, xs))
    }

    fn depthwise_conv2d_weight_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        if !fast_path(&x, &weight, &grad, &options) {
            return Self::conv2d_weight_backward(x, weight, grad, options);
        }
        let ws = weight.shape().dims::<4>().to_vec();
        let p = plan(&x.shape().dims::<4>(), &ws, &options);
        let mut gw = vec![0f32; p.weight_len()];
        dwgrad::weight_grad(&values(&x), &values(&grad), &p, &mut gw);
        FlexTensor::from_data(TensorData::new(gw, ws))
    }

    fn activation(x: FloatTensor<Self>, act: Act) -> FloatTensor<Self> {
        if x.dtype() != DType::F32 {
            return generic_activation::<Self>(x, act);
        }
        let shape = x.shape().clone();
        let (x, act) = (values(&x), kernel_act(act));
        let y = emo_kernels::produce(shape.num_elements(), ACT_CHUNK, |s, y| kact::apply_to(act, &x[s..], y));
        FlexTensor::from_data(TensorData::new(y, shape))
    }

    fn activation_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>, act: Act) -> FloatTensor<Self> {
        if x.dtype() != DType::F32 || grad.dtype() != DType::F32 {
            return generic_activation_backward::<Self>(x, grad, act);
        }
        let shape = grad.shape().clone();
        let mut g = values(&grad).into_owned();
        kact::backward(kernel_act(act), &values(&x), &mut g);
        FlexTensor::from_data(TensorData::new(g, shape))
    }

    fn batch_norm_train_nchw(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        if !all_f32(&[&x, &gamma, &beta]) || x.shape().num_dims() != 4 {
            let r = <Self as ModuleOps<Self>>::batch_norm_train(x, gamma, beta, epsilon);
            return (r.output, r.mean, r.variance);
        }
        let shape = x.shape().clone();
        let [n, c, h, w] = shape.dims::<4>();
        let xv = values(&x);
        let (mut mean, mut var) = (vec![0f32; c], vec![0f32; c]);
        bnorm::stats(&xv, n, c, h * w, &mut mean, &mut var);
        let (gamma, beta, chw) = (values(&gamma), values(&beta), c * h * w);
        let y = per_image(n, xv.len(), |b, y| {
            bnorm::normalize(&xv[b * chw..][..chw], 1, c, h * w, &gamma, &beta, &mean, &var, epsilon as f32, y)
        });
        (
            FlexTensor::from_data(TensorData::new(y, shape)),
            FlexTensor::from_data(TensorData::new(mean, [c])),
            FlexTensor::from_data(TensorData::new(var, [c])),
        )
    }

    fn batch_norm_train_nchw_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        if !all_f32(&[&x, &gamma, &mean, &variance, &grad]) || x.shape().num_dims() != 4 {
            let r = <Self as ModuleOps<Self>>::batch_norm_train_backward(x, gamma, mean, variance, epsilon, grad);
            return (r.x_grad, r.gamma_grad, r.beta_grad);
        }
        let shape = x.shape().clone();
        let [n, c, h, w] = shape.dims::<4>();
        let (mut gx, mut gg, mut gb) = (vec![0f32; shape.num_elements()], vec![0f32; c], vec![0f32; c]);
        bnorm::backward(
            &values(&x),
            &values(&grad),
            n,
            c,
            h * w,
            &values(&gamma),
            &values(&mean),
            &values(&variance),
            epsilon as f32,
            &mut gx,
            &mut gg,
            &mut gb,
        );
        (
            FlexTensor::from_data(TensorData::new(gx, shape)),
            FlexTensor::from_data(TensorData::new(gg, [c])),
            FlexTensor::from_data(TensorData::new(gb, [c])),
        )
    }
}

fn all_f32(ts: &[&FlexTensor]) -> bool {
    ts.iter().all(|t| t.dtype() == DType::F32)
}

fn kernel_act(act: Act) -> KAct {
    match act {
        Act::Silu => KAct::Silu,
        Act::Gelu => KAct::Gelu,
    }
}

/// The three kernels of one convolution family (forward pass, input gradient, weight
/// gradient), so that the depthwise and the one-group convs share one autodiff node.
trait ConvKernels: std::fmt::Debug + Send + 'static {
    fn forward<B: EmoOps>(x: FloatTensor<B>, w: FloatTensor<B>, o: ConvOptions<2>) -> FloatTensor<B>;
    fn x_backward<B: EmoOps>(
        x: FloatTensor<B>,
        w: FloatTensor<B>,
        g: FloatTensor<B>,
        o: ConvOptions<2>,
    ) -> FloatTensor<B>;
    fn weight_backward<B: EmoOps>(
        x: FloatTensor<B>,
        w: FloatTensor<B>,
        g: FloatTensor<B>,
        o: ConvOptions<2>,
    ) -> FloatTensor<B>;
}

#[derive(Debug)]
struct Depthwise;

impl ConvKernels for Depthwise {
    fn forward<B: EmoOps>(x: FloatTensor<B>, w: FloatTensor<B>, o: ConvOptions<2>) -> FloatTensor<B> {
        B::depthwise_conv2d(x, w, o)
    }
    fn x_backward<B: EmoOps>(
        x: FloatTensor<B>,
        w: FloatTensor<B>,
        g: FloatTensor<B>,
        o: ConvOptions<2>,
    ) -> FloatTensor<B> {
        B::depthwise_conv2d_x_backward(x, w, g, o)
    }
    fn weight_backward<B: EmoOps>(
        x: FloatTensor<B>,
        w: FloatTensor<B>,
        g: FloatTensor<B>,
        o: ConvOptions<2>,
    ) -> FloatTensor<B> {
        B::depthwise_conv2d_weight_backward(x, w, g, o)
    }
}

#[derive(Debug)]
struct Dense;

impl ConvKernels for Dense {
    fn forward<B: EmoOps>(x: FloatTensor<B>, w: FloatTensor<B>, o: ConvOptions<2>) -> FloatTensor<B> {
        B::dense_conv2d(x, w, o)
    }
    fn x_backward<B: EmoOps>(
        x: FloatTensor<B>,
        w: FloatTensor<B>,
        g: FloatTensor<B>,
        o: ConvOptions<2>,
    ) -> FloatTensor<B> {
        B::dense_conv2d_x_backward(x, w, g, o)
    }
    fn weight_backward<B: EmoOps>(
        x: FloatTensor<B>,
        w: FloatTensor<B>,
        g: FloatTensor<B>,
        o: ConvOptions<2>,
    ) -> FloatTensor<B> {
        B::dense_conv2d_weight_backward(x, w, g, o)
    }
}

/// The autodiff node of a convolution family: input and weight are checkpointed, and each
/// gradient is computed only for the parents that require one.
#[derive(Debug)]
struct ConvBackward<K>(std::marker::PhantomData<K>);

impl<B: EmoOps, K: ConvKernels> Backward<B, 2> for ConvBackward<K> {
    type State = (NodeId, NodeId, ConvOptions<2>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_x, node_weight] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x_state, weight_state, options) = ops.state;
        let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
        let weight = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(weight_state);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, K::x_backward::<B>(x.clone(), weight.clone(), grad.clone(), options.clone()));
        }
        if let Some(node) = node_weight {
            grads.register::<B>(node.id, K::weight_backward::<B>(x, weight, grad, options));
        }
    }
}

fn tracked_conv<B: EmoOps, C: CheckpointStrategy, K: ConvKernels>(
    x: FloatTensor<Autodiff<B, C>>,
    weight: FloatTensor<Autodiff<B, C>>,
    options: ConvOptions<2>,
) -> FloatTensor<Autodiff<B, C>> {
    let node = ConvBackward::<K>(std::marker::PhantomData);
    match node.prepare::<C>([x.node(), weight.node()]).compute_bound().stateful() {
        OpsKind::Tracked(mut prep) => {
            let x_state = prep.checkpoint(&x);
            let weight_state = prep.checkpoint(&weight);
            let out = K::forward::<B>(x.into_primitive(), weight.into_primitive(), options.clone());
            prep.finish((x_state, weight_state, options), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(K::forward::<B>(x.into_primitive(), weight.into_primitive(), options)),
    }
}

impl<B: EmoOps, C: CheckpointStrategy> EmoOps for Autodiff<B, C> {
    fn depthwise_conv2d(x: FloatTensor<Self>, weight: FloatTensor<Self>, options: ConvOptions<2>) -> FloatTensor<Self> {
        tracked_conv::<B, C, Depthwise>(x, weight, options)
    }

    fn dense_conv2d(x: FloatTensor<Self>, weight: FloatTensor<Self>, options: ConvOptions<2>) -> FloatTensor<Self> {
        tracked_conv::<B, C, Dense>(x, weight, options)
    }

    fn activation(x: FloatTensor<Self>, act: Act) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct ActivationBackward;

        impl<B: EmoOps> Backward<B, 1> for ActivationBackward {
            type State = (NodeId, Act);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_x] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (x_state, act) = ops.state;
                let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
                if let Some(node) = node_x {
                    grads.register::<B>(node.id, B::activation_backward(x, grad, act));
                }
            }
        }

        match ActivationBackward.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                prep.finish((x_state, act), B::activation(x.into_primitive(), act))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::activation(x.into_primitive(), act)),
        }
    }

    fn batch_norm_train_nchw(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct BatchNormBackward;

        impl<B: EmoOps> Backward<B, 3> for BatchNormBackward {
            // The input and gamma are checkpointed; the statistics come as the forward pass
            // computed them.
            type State = (NodeId, NodeId, B::FloatTensorPrimitive, B::FloatTensorPrimitive, f64);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
                let [node_x, node_gamma, node_beta] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (x_state, gamma_state, mean, variance, epsilon) = ops.state;
                let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
                let gamma = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(gamma_state);
                let (gx, gg, gb) = B::batch_norm_train_nchw_backward(x, gamma, mean, variance, epsilon, grad);
                for (node, g) in [(node_x, gx), (node_gamma, gg), (node_beta, gb)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        match BatchNormBackward.prepare::<C>([x.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let gamma_state = prep.checkpoint(&gamma);
                let (y, mean, variance) = B::batch_norm_train_nchw(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                );
                let state = (x_state, gamma_state, mean.clone(), variance.clone(), epsilon);
                (
                    prep.finish(state, y),
                    <Self as AutodiffBackend>::from_inner(mean),
                    <Self as AutodiffBackend>::from_inner(variance),
                )
            }
            OpsKind::UnTracked(prep) => {
                let (y, mean, variance) = B::batch_norm_train_nchw(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                );
                (
                    prep.finish(y),
                    <Self as AutodiffBackend>::from_inner(mean),
                    <Self as AutodiffBackend>::from_inner(variance),
                )
            }
        }
    }
}

/// Whether tensors on `device` run on flex (with or without autodiff): where host-side kernels
/// can read and write the values without a device transfer.
pub fn on_flex(device: &burn::tensor::Device) -> bool {
    matches!(device.clone().inner().as_dispatch(), DispatchDevice::Flex(_))
}

/// `act(x)` (SiLU or exact-erf GELU): through the extension on flex, burn's activations elsewhere.
pub fn activation(act: Act, x: Tensor<4>) -> Tensor<4> {
    if !on_flex(&x.device()) {
        return match act {
            Act::Silu => burn::tensor::activation::silu(x),
            Act::Gelu => burn::tensor::activation::gelu(x),
        };
    }
    Tensor::<4>::from_dispatch(<Dispatch as EmoOps>::activation(x.into_dispatch(), act))
}

/// `bn.forward(x)` for NCHW `x`. In training (an autodiff device and `bn`'s training flag on)
/// on flex, the batch statistics, the normalisation and the backward pass run
/// `emo_kernels::bnorm` through the extension, and the running statistics are updated as burn's
/// `BatchNorm` does (`momentum` of the batch's, biased variance); otherwise `bn.forward(x)`.
pub fn batch_norm(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    let device = x.device();
    if !(device.is_autodiff() && bn.training.is_enabled() && on_flex(&device)) {
        return bn.forward(x);
    }
    let (y, mean, variance) = <Dispatch as EmoOps>::batch_norm_train_nchw(
        x.into_dispatch(),
        bn.gamma.val().into_dispatch(),
        bn.beta.val().into_dispatch(),
        bn.epsilon,
    );
    let (mean, variance) = (Tensor::<1>::from_dispatch(mean), Tensor::<1>::from_dispatch(variance));
    let momentum = bn.momentum;
    let running_mean = bn.running_mean.value_sync().to_device(&device);
    let running_var = bn.running_var.value_sync().to_device(&device);
    let running_mean = running_mean.mul_scalar(1.0 - momentum).add(mean.detach().mul_scalar(momentum));
    let running_var = running_var.mul_scalar(1.0 - momentum).add(variance.detach().mul_scalar(momentum));
    bn.running_mean.update(running_mean.detach());
    bn.running_var.update(running_var.detach());
    Tensor::<4>::from_dispatch(y)
}

/// `conv.forward(x)`, through the extension when `x` is on flex and `conv` is depthwise
/// (`groups == channels`, symmetric explicit padding), or, in training (an autodiff device),
/// has one group ([`conv2d_with`]); through burn's `Conv2d` otherwise.
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let [_, c, _, _] = x.dims();
    let weight = conv.weight.val();
    let PaddingConfig2d::Explicit(pt, pl, pb, pr) = conv.padding.clone() else {
        return conv.forward(x);
    };
    let options = ConvOptions::new_with_padding(conv.stride, [(pt, pb), (pl, pr)], conv.dilation, conv.groups);
    if dense_training(&x, &weight, &options) {
        return dense(x, weight, conv.bias.as_ref().map(|b| b.val()), options);
    }
    let depthwise = conv.groups == c && weight.dims()[0] == c && weight.dims()[1] == 1;
    if !depthwise || pt != pb || pl != pr || !on_flex(&x.device()) {
        return conv.forward(x);
    }
    let options = ConvOptions::new(conv.stride, [pt, pl], conv.dilation, conv.groups);
    let y = Tensor::<4>::from_dispatch(<Dispatch as EmoOps>::depthwise_conv2d(
        x.into_dispatch(),
        weight.into_dispatch(),
        options,
    ));
    match &conv.bias {
        Some(b) => y + b.val().reshape([1, c, 1, 1]),
        None => y,
    }
}

/// burn's functional `conv2d(x, weight, bias, options)`, with a one-group conv (symmetric
/// padding) in training on flex through the extension's GEMM kernels (`emo_kernels::convgrad`):
/// burn's generic weight gradient transposes both operands and runs a conv, and its input
/// gradient runs a transposed conv; for 1x1 convs that was about a quarter of a DeepLabv3
/// training step at 192x192.
pub fn conv2d_with(x: Tensor<4>, weight: Tensor<4>, bias: Option<Tensor<1>>, options: ConvOptions<2>) -> Tensor<4> {
    if dense_training(&x, &weight, &options) {
        return dense(x, weight, bias, options);
    }
    burn::tensor::module::conv2d(x, weight, bias, options)
}

/// Whether [`conv2d`] / [`conv2d_with`] run this conv on the GEMM training kernels.
pub fn dense_training(x: &Tensor<4>, weight: &Tensor<4>, options: &ConvOptions<2>) -> bool {
    let [_, c, _, _] = x.dims();
    weight.dims()[1] == c
        && options.groups == 1
        && !options.is_asymmetric()
        && x.device().is_autodiff()
        && on_flex(&x.device())
}

fn dense(x: Tensor<4>, weight: Tensor<4>, bias: Option<Tensor<1>>, options: ConvOptions<2>) -> Tensor<4> {
    let co = weight.dims()[0];
    let y = Tensor::<4>::from_dispatch(<Dispatch as EmoOps>::dense_conv2d(
        x.into_dispatch(),
        weight.into_dispatch(),
        options,
    ));
    match bias {
        Some(b) => y + b.reshape([1, co, 1, 1]),
        None => y,
    }
}
