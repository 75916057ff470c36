//! Code-generation targets for Lamina's kernel IR.
//!
//! - [`mlir`]: the MLIR context, pass pipelines and the kernel IR → MLIR lowering (the only
//!   place melior is used);
//! - [`host`]: x86-64 shared libraries of kernels (MLIR → LLVM → object → `kernels.so`);
//! - nvptx (sm_80, sm_90a): not implemented yet, [`Target::unavailable`] says so.

pub mod host;
pub mod mlir;

use std::fmt;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("invalid kernel: {0}")]
    Kernel(String),
    #[error("{0}")]
    Mlir(String),
    #[error("linking the kernel library failed: {0}")]
    Link(String),
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

    /// The error for code generation that does not exist yet.
    pub fn unavailable(&self) -> String {
        format!("code generation for target {self} is not implemented yet (the NVPTX lowering is pending)")
    }
}

#[cfg(test)]
mod host_tests;
