//! Code-generation targets for Lamina's kernel IR: `nvptx` (sm_80, sm_90a) and `host` (x86-64).
//!
//! Not implemented yet: the kernel IR and its MLIR lowering are the compiler-core and NVPTX
//! issues. [`Target`] names the targets so the CLI and plan format can refer to them, and
//! [`Target::unavailable`] is the error every code-generation entry point returns until then.

use std::fmt;

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
        format!("code generation for target {self} is not implemented yet (kernel IR and MLIR lowering are pending)")
    }
}
