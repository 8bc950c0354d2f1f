//! Small layers shared by the blocks: conv + BN, LayerNorm2d, a PyTorch-layout Linear,
//! SqueezeExcite, drop path, and the parameter source that builds them either randomly
//! initialised (the official `_init_weights`) or from a validated checkpoint.

use burn::module::{Module, Param, RunningState};
use burn::nn::BatchNorm;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use emo_spec::{Act, NORM_EPS, conv_pad};
use emo_weights::{StateDict, Tensor as StoredTensor};

/// Apply a stage activation (SiLU, or exact-erf GELU).
pub fn act(a: Act, x: Tensor<4>) -> Tensor<4> {
    crate::ops::activation(a, x)
}

/// How a freshly built parameter is initialised.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Init {
    /// PyTorch's default conv init: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    /// also used for conv biases.
    ConvDefault {
        fan_in: usize,
    },
    /// timm trunc_normal(std=0.02) for Linear weights.
    TruncNormal,
    Ones,
    Zeros,
}

/// Where parameters come from while a model is built.
pub(crate) struct Source<'a> {
    pub device: Device,
    pub checkpoint: Option<&'a StateDict>,
    /// Derive each parameter's id from its official key (FNV-1a), so that a model rebuilt from
    /// a checkpoint has the same ids and a saved optimizer state applies to it (exact resume).
    pub stable_ids: bool,
}

/// The stable parameter id of an official key (what every model of this workspace uses, so an
/// optimizer state saved for one build applies to a rebuilt model).
pub fn param_id(key: &str) -> burn::module::ParamId {
    burn::module::ParamId::from(key_id(key))
}

/// FNV-1a of a key: a stable parameter id.
pub(crate) fn key_id(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl Source<'_> {
    /// The tensor `key` of the checkpoint, or a fresh one. Checkpoints are validated against the
    /// config before building, so a missing key here is a bug in the key layout.
    pub fn tensor<const D: usize>(&self, key: &str, shape: [usize; D], init: Init) -> Tensor<D> {
        if let Some(sd) = self.checkpoint {
            let t = sd.get(key).unwrap_or_else(|| panic!("validated checkpoint lacks `{key}`"));
            let data = t.as_f32().unwrap_or_else(|| panic!("validated checkpoint: `{key}` is not float"));
            return Tensor::from_data(TensorData::new(data.to_vec(), shape), &self.device);
        }
        match init {
            Init::ConvDefault { fan_in } => {
                let b = 1.0 / (fan_in as f64).sqrt();
                Tensor::random(shape, Distribution::Uniform(-b, b), &self.device)
            }
            Init::TruncNormal => Tensor::random(shape, Distribution::Normal(0.0, 0.02), &self.device).clamp(-2.0, 2.0),
            Init::Ones => Tensor::ones(shape, &self.device),
            Init::Zeros => Tensor::zeros(shape, &self.device),
        }
    }

    pub fn param<const D: usize>(&self, key: &str, shape: [usize; D], init: Init) -> Param<Tensor<D>> {
        let mut p = Param::from_tensor(self.tensor(key, shape, init));
        if self.stable_ids {
            p.id = burn::module::ParamId::from(key_id(key));
        }
        p
    }

    /// A Conv2d with EMO's padding rule; `key` is the official prefix (`...conv`).
    #[allow(clippy::too_many_arguments)]
    pub fn conv(
        &self,
        key: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        groups: usize,
        bias: bool,
    ) -> Conv2d {
        let fan_in = cin / groups * k * k;
        let p = conv_pad(k, stride);
        Conv2d {
            weight: self.param(&format!("{key}.weight"), [cout, cin / groups, k, k], Init::ConvDefault { fan_in }),
            bias: bias.then(|| self.param(&format!("{key}.bias"), [cout], Init::ConvDefault { fan_in })),
            stride: [stride, stride],
            kernel_size: [k, k],
            dilation: [1, 1],
            groups,
            padding: PaddingConfig2d::Explicit(p, p, p, p),
        }
    }

    /// BatchNorm2d(eps 1e-6, momentum 0.1).
    pub fn bn(&self, key: &str, c: usize) -> BatchNorm {
        BatchNorm {
            gamma: self.param(&format!("{key}.weight"), [c], Init::Ones),
            beta: self.param(&format!("{key}.bias"), [c], Init::Zeros),
            training: Param::from_bool(true),
            running_mean: RunningState::new(self.tensor(&format!("{key}.running_mean"), [c], Init::Zeros)),
            running_var: RunningState::new(self.tensor(&format!("{key}.running_var"), [c], Init::Ones)),
            momentum: 0.1,
            epsilon: NORM_EPS,
        }
    }

    pub fn ln2d(&self, key: &str, c: usize) -> LayerNorm2d {
        LayerNorm2d {
            weight: self.param(&format!("{key}.norm.weight"), [c], Init::Ones),
            bias: self.param(&format!("{key}.norm.bias"), [c], Init::Zeros),
            eps: NORM_EPS,
        }
    }
}

/// Collects a model's tensors under their official names.
pub(crate) struct Sink<'a>(pub &'a mut StateDict);

/// A burn tensor as a checkpoint tensor (f32, same shape).
pub fn stored<const D: usize>(t: Tensor<D>) -> StoredTensor {
    let shape = t.dims().to_vec();
    let data = t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 tensor data");
    StoredTensor::f32(shape, data)
}

impl Sink<'_> {
    pub fn put<const D: usize>(&mut self, key: String, t: Tensor<D>) {
        self.0.insert(key, stored(t));
    }
    pub fn conv(&mut self, key: &str, c: &Conv2d) {
        self.put(format!("{key}.weight"), c.weight.val());
        if let Some(b) = &c.bias {
            self.put(format!("{key}.bias"), b.val());
        }
    }
    pub fn bn(&mut self, key: &str, b: &BatchNorm) {
        self.put(format!("{key}.weight"), b.gamma.val());
        self.put(format!("{key}.bias"), b.beta.val());
        self.put(format!("{key}.running_mean"), b.running_mean.value_sync());
        self.put(format!("{key}.running_var"), b.running_var.value_sync());
        self.0.insert(
            format!("{key}.num_batches_tracked"),
            StoredTensor { shape: vec![], data: emo_weights::Data::I64(vec![0]) },
        );
    }
    pub fn ln2d(&mut self, key: &str, n: &LayerNorm2d) {
        self.put(format!("{key}.norm.weight"), n.weight.val());
        self.put(format!("{key}.norm.bias"), n.bias.val());
    }
}

/// LayerNorm over the channels of every pixel of an NCHW map (eps 1e-6), computed in place
/// without permutes. Official keys: `<prefix>.norm.{weight,bias}`.
#[derive(Module, Debug)]
pub struct LayerNorm2d {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub eps: f64,
}

impl LayerNorm2d {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let c = self.weight.dims()[0];
        let (var, mean) = x.clone().var_mean_bias(1);
        let x = (x - mean).div(var.add_scalar(self.eps).sqrt());
        x * self.weight.val().reshape([1, c, 1, 1]) + self.bias.val().reshape([1, c, 1, 1])
    }
}

/// A norm on an iRMB input: BatchNorm2d or LayerNorm2d.
#[derive(Module, Debug)]
pub enum Norm2d {
    Batch(BatchNorm),
    Layer(LayerNorm2d),
}

impl Norm2d {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Norm2d::Batch(n) => crate::ops::batch_norm(n, x),
            Norm2d::Layer(n) => n.forward(x),
        }
    }
}

/// Conv followed by BatchNorm (the stem conv `convs.0.{0,1}` and every `conv_local.{conv,norm}`).
#[derive(Module, Debug)]
pub struct ConvBn {
    pub conv: Conv2d,
    pub norm: BatchNorm,
}

impl ConvBn {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        crate::ops::batch_norm(&self.norm, crate::ops::conv2d(&self.conv, x))
    }
}

/// A Linear layer with PyTorch's weight layout `[out, in]` (official key `head.{weight,bias}`).
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
    pub bias: Param<Tensor<1>>,
}

impl Linear {
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let n = self.bias.dims()[0];
        x.matmul(self.weight.val().transpose()) + self.bias.val().reshape([1, n])
    }
}

/// timm 0.6.5 SqueezeExcite: mean over HxW, 1x1 conv (bias), act, 1x1 conv (bias), sigmoid gate.
#[derive(Module, Debug)]
pub struct SqueezeExcite {
    pub conv_reduce: Conv2d,
    pub conv_expand: Conv2d,
    #[module(skip)]
    pub act: Act,
}

impl SqueezeExcite {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let s = x.clone().mean_dim(2).mean_dim(3);
        let s = act(self.act, self.conv_reduce.forward(s));
        x * sigmoid(self.conv_expand.forward(s))
    }
}

thread_local! {
    /// The random source of drop path and dropout on this thread (see [`seed_stochastic`]).
    static STOCHASTIC: std::cell::Cell<u64> = const { std::cell::Cell::new(0x853C_49E6_748F_EA9B) };
}

/// Seed this thread's source of drop-path and dropout draws. Trainers seed it per step (and
/// per data-parallel replica), so the draws depend neither on thread timing nor on how many
/// other random tensors were made, and a resumed run draws exactly what an uninterrupted one
/// would.
pub fn seed_stochastic(seed: u64) {
    STOCHASTIC.with(|s| s.set(seed));
}

/// The next uniform draw in [0, 1) of this thread's stochastic source (splitmix64).
fn stochastic_uniform() -> f32 {
    STOCHASTIC.with(|s| {
        let x = s.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        s.set(x);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    })
}

/// A mask of `n` values: 1 / keep with probability `keep`, else 0.
fn keep_mask(n: usize, keep: f64) -> Vec<f32> {
    let scale = (1.0 / keep) as f32;
    (0..n).map(|_| if (stochastic_uniform() as f64) < keep { scale } else { 0.0 }).collect()
}

/// Stochastic depth on the residual branch: active only on an autodiff (training) device.
pub fn drop_path(x: Tensor<4>, rate: f64) -> Tensor<4> {
    if rate <= 0.0 || !x.device().is_autodiff() {
        return x;
    }
    let b = x.dims()[0];
    let mask = Tensor::<4>::from_data(TensorData::new(keep_mask(b, 1.0 - rate), [b, 1, 1, 1]), &x.device());
    x * mask
}

/// Element-wise dropout (inverted scaling): active only on an autodiff (training) device.
pub fn dropout(x: Tensor<4>, rate: f64) -> Tensor<4> {
    if rate <= 0.0 || !x.device().is_autodiff() {
        return x;
    }
    let dims = x.dims();
    let mask = Tensor::<4>::from_data(TensorData::new(keep_mask(dims.iter().product(), 1.0 - rate), dims), &x.device());
    x * mask
}
