//! Which burn backend runs the trainable model: `flex` (pure Rust, the default), `tch`
//! (LibTorch, from a build with `--features tch`) or `vulkan` (a GPU through burn's wgpu /
//! CubeCL backend, from a build with `--features vulkan`). The fast inference engine is ours
//! and does not depend on this choice.

use anyhow::Result;
use burn::tensor::Device;
use std::sync::OnceLock;

/// The burn backend, chosen once per process with the global `--backend` flag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// burn's pure-Rust CPU backend (no set-up).
    #[default]
    Flex,
    /// LibTorch through burn's `tch` backend: build with `--features tch` against the pip wheel
    /// `torch==2.9.0` (`LIBTORCH_USE_PYTORCH=1`; see the README).
    Tch,
    /// A GPU through Vulkan (burn's wgpu / CubeCL backend): build with `--features vulkan`;
    /// needs a Vulkan driver (`libvulkan1` and the GPU vendor's ICD) at run time.
    Vulkan,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Flex => "flex",
            Backend::Tch => "tch",
            Backend::Vulkan => "vulkan",
        })
    }
}

static CHOSEN: OnceLock<Backend> = OnceLock::new();

/// Record the process-wide backend (the first call wins).
pub fn choose(b: Backend) {
    let _ = CHOSEN.set(b);
}

/// The process-wide backend (flex unless `--backend` said otherwise).
pub fn chosen() -> Backend {
    CHOSEN.get().copied().unwrap_or_default()
}

impl Backend {
    /// The CPU device of this backend (without autodiff).
    pub fn device(self) -> Result<Device> {
        match self {
            Backend::Flex => Ok(Device::flex()),
            Backend::Tch => tch_device(),
            Backend::Vulkan => vulkan_device(),
        }
    }

    /// Data-parallel replicas for a batch: one per core on flex (each op runs on one thread);
    /// one on LibTorch, which spreads every op over the cores itself, and one on a GPU.
    pub fn default_workers(self, batch: usize) -> usize {
        match self {
            Backend::Flex => emo_train::parallel::default_workers(batch),
            Backend::Tch | Backend::Vulkan => 1,
        }
    }
}

/// The chosen backend's device.
pub fn device() -> Result<Device> {
    chosen().device()
}

#[cfg(feature = "tch")]
#[allow(deprecated)] // burn 0.22 deprecates burn-tch (gone in 0.23); it is the LibTorch path of 0.22
fn tch_device() -> Result<Device> {
    Ok(Device::libtorch())
}

#[cfg(not(feature = "tch"))]
fn tch_device() -> Result<Device> {
    anyhow::bail!(
        "this `emo` was built without LibTorch; build it with `cargo build --release --features tch` \
         (LIBTORCH_USE_PYTORCH=1, with pip's torch==2.9.0 in the active Python; see the README)"
    )
}

/// The first GPU Vulkan reports (wgpu's default adapter choice: a discrete GPU first).
#[cfg(feature = "vulkan")]
fn vulkan_device() -> Result<Device> {
    Ok(Device::vulkan(burn::tensor::DeviceKind::DefaultDevice))
}

#[cfg(not(feature = "vulkan"))]
fn vulkan_device() -> Result<Device> {
    anyhow::bail!(
        "this `emo` was built without the GPU backend; build it with \
         `cargo build --release -p emo-cli --features vulkan` (see the README)"
    )
}
