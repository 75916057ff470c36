//! `--device host|cuda`: which executor runs a compiled plan, and which target a model path is
//! compiled for when it is not an artifact yet.

use std::path::Path;

use clap::ValueEnum;
use lamina_runtime::host::HostEngine;
use lamina_runtime::Executor;
use lamina_targets::Target;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// This machine's CPU cores (host plans, `kernels.so`).
    Host,
    /// NVIDIA GPU 0 through the CUDA driver (sm_80 / sm_90a plans, `kernels.ptx`); needs a
    /// `compile-model` built with `--features cuda`.
    Cuda,
}

/// The target a model path is compiled for to run on `device`: the host, or the GPU's own
/// (sm_90a on compute capability 9.0, sm_80 elsewhere).
pub fn target_for(device: Device) -> Result<Target, String> {
    match device {
        Device::Host => Ok(Target::Host),
        Device::Cuda => cuda::native_target(),
    }
}

/// Loads `artifact` on `device`, with a progress bar over its weights.
pub fn load(
    artifact: &Path,
    weights: Option<&Path>,
    allow_weight_mismatch: bool,
    device: Device,
) -> Result<Box<dyn Executor>, String> {
    let bar = super::ui::bar(0, "weights");
    let track = super::ui::track(&bar);
    let e: Result<Box<dyn Executor>, String> = match device {
        Device::Host => {
            HostEngine::load_with_progress(artifact, weights, allow_weight_mismatch, &track)
                .map(|e| Box::new(e) as Box<dyn Executor>)
                .map_err(|e| e.to_string())
        }
        Device::Cuda => cuda::load(artifact, weights, allow_weight_mismatch, &track),
    };
    bar.finish_and_clear();
    e
}

/// Device-to-device copy bandwidth of the GPU (read + write bytes per second).
pub fn gpu_copy_bandwidth(bytes: usize) -> Result<(String, f64), String> {
    cuda::copy_bandwidth(bytes)
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::Path;

    use lamina_runtime::cuda::{CudaEngine, Device};
    use lamina_runtime::Executor;
    use lamina_targets::Target;

    pub fn native_target() -> Result<Target, String> {
        let d = Device::open(0).map_err(|e| e.to_string())?;
        let t = d.native_target().ok_or_else(|| {
            format!(
                "cuda: {} has compute capability {}.{}; Lamina targets sm_80 and newer",
                d.name, d.capability.0, d.capability.1
            )
        })?;
        Ok(Target::parse(t).expect("a known target"))
    }

    pub fn load(
        artifact: &Path,
        weights: Option<&Path>,
        allow_weight_mismatch: bool,
        progress: &dyn Fn(usize, usize),
    ) -> Result<Box<dyn Executor>, String> {
        let e = CudaEngine::load_with_progress(artifact, weights, allow_weight_mismatch, progress)
            .map_err(|e| e.to_string())?;
        tracing::info!("kernels loaded from the {}", e.image);
        Ok(Box::new(e) as Box<dyn Executor>)
    }

    pub fn copy_bandwidth(bytes: usize) -> Result<(String, f64), String> {
        let d = Device::open(0).map_err(|e| e.to_string())?;
        let bw = lamina_runtime::cuda::copy_bandwidth(bytes).map_err(|e| e.to_string())?;
        Ok((d.name.clone(), bw))
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use std::path::Path;

    use lamina_runtime::Executor;
    use lamina_targets::Target;

    const WHY: &str = "--device cuda: this compile-model was built without the `cuda` feature \
                       (rebuild with `cargo build --release --features cuda`)";

    pub fn native_target() -> Result<Target, String> {
        Err(WHY.into())
    }

    pub fn load(
        _: &Path,
        _: Option<&Path>,
        _: bool,
        _: &dyn Fn(usize, usize),
    ) -> Result<Box<dyn Executor>, String> {
        Err(WHY.into())
    }

    pub fn copy_bandwidth(_: usize) -> Result<(String, f64), String> {
        Err(WHY.into())
    }
}
