//! One error type for everything that reads user input. Every message is one line that names the
//! file and the field or tensor it is about.

use std::path::Path;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {msg}")]
    Io { path: String, msg: String },
    /// A native TOML spec (or the spec an importer produced) is malformed or inconsistent.
    #[error("{file}: {}{msg}", field_prefix(field))]
    Spec {
        file: String,
        field: String,
        msg: String,
    },
    /// A Hugging Face config.json key is missing, mistyped or unsupported.
    #[error("{file}: {}{msg}", field_prefix(field))]
    Config {
        file: String,
        field: String,
        msg: String,
    },
    /// Safetensors files that are unreadable or do not match the graph.
    #[error("{file}: {msg}")]
    Weights { file: String, msg: String },
    /// The graph verifier rejected a node.
    #[error("graph verifier: node {node}: {msg}")]
    Graph { node: String, msg: String },
    /// The compiler failed on a valid model (a kernel that does not verify, an MLIR or LLVM
    /// failure): a bug, reported with the kernel and graph node.
    #[error("compiler: {0}")]
    Compile(String),
    /// Bad run-time input (token ids, lengths).
    #[error("{what}: {msg}")]
    Input { what: String, msg: String },
    /// The GPU executor: no driver or device, a device that cannot run the plan, or a failed
    /// CUDA call (named with the kernel and launch it came from).
    #[error("cuda: {0}")]
    Device(String),
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("field `{field}`: ")
    }
}

impl Error {
    pub fn io(path: &Path, e: std::io::Error) -> Self {
        Error::Io {
            path: path.display().to_string(),
            msg: e.to_string(),
        }
    }

    /// A spec error whose file is filled in later by [`Error::in_file`].
    pub fn spec_field(field: &str, msg: String) -> Self {
        Error::Spec {
            file: "<spec>".into(),
            field: field.into(),
            msg,
        }
    }

    pub fn config(file: &Path, field: &str, msg: impl Into<String>) -> Self {
        Error::Config {
            file: file.display().to_string(),
            field: field.into(),
            msg: msg.into(),
        }
    }

    pub fn weights(file: &Path, msg: impl Into<String>) -> Self {
        Error::Weights {
            file: file.display().to_string(),
            msg: msg.into(),
        }
    }

    pub fn input(what: &str, msg: impl Into<String>) -> Self {
        Error::Input {
            what: what.into(),
            msg: msg.into(),
        }
    }

    /// Names the file a spec error came from.
    pub fn in_file(self, path: &Path) -> Self {
        match self {
            Error::Spec { field, msg, .. } => Error::Spec {
                file: path.display().to_string(),
                field,
                msg,
            },
            other => other,
        }
    }
}
