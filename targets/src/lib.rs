//! Code-generation targets for Lamina's kernel IR.
//!
//! - [`mlir`]: the MLIR context, pass pipelines and the kernel IR → MLIR lowering (the only
//!   place melior is used);
//! - [`host`]: x86-64 shared libraries of kernels (MLIR → LLVM → object → `kernels.so`);
//! - [`nvptx`]: PTX for sm_80 and sm_90a (MLIR gpu/NVVM → LLVM NVPTX), checked with `ptxas`.

pub mod cache;
pub mod host;
pub mod mlir;
pub mod nvptx;

use std::fmt;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("invalid kernel: {0}")]
    Kernel(String),
    #[error("{0}")]
    Mlir(String),
    #[error("linking the kernel library failed: {0}")]
    Link(String),
    /// `ptxas` could not assemble the PTX (or not be run).
    #[error("assembling the PTX: {0}")]
    Assemble(String),
    #[error("{0}")]
    Unavailable(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Host,
    Sm80,
    Sm90a,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Host => "host",
            Target::Sm80 => "sm_80",
            Target::Sm90a => "sm_90a",
        })
    }
}

impl Target {
    pub fn parse(s: &str) -> Option<Target> {
        match s {
            "host" => Some(Target::Host),
            "sm_80" => Some(Target::Sm80),
            "sm_90a" => Some(Target::Sm90a),
            _ => None,
        }
    }

    /// NVPTX chip and PTX features (`None` for the host).
    pub fn nvptx(&self) -> Option<(&'static str, &'static str)> {
        match self {
            Target::Host => None,
            // sm_80 needs PTX ≥ 7.0; 7.8 loads on CUDA 11.8 drivers and newer. sm_90a (wgmma,
            // TMA) needs PTX 8.0 (CUDA 12.0).
            Target::Sm80 => Some(("sm_80", "+ptx78")),
            Target::Sm90a => Some(("sm_90a", "+ptx80")),
        }
    }
}

#[cfg(test)]
mod host_tests;
