//! Lamina's pure-Rust intermediate representations (no LLVM, no MLIR):
//!
//! - [`spec`]: the native TOML model description;
//! - [`hf`]: Hugging Face `config.json` import (qwen3_next, kimi_linear, deepseek_v3, minimax);
//! - [`weights`]: safetensors loading (memory-mapped, f32/bf16/f16), name mapping, random init;
//! - [`graph`]: the typed graph IR, its builder, verifier and text form;
//! - [`stats`]: parameter, weight and cache accounting (`compile-model check`).

pub mod cost;
pub mod error;
pub mod graph;
pub mod hf;
pub mod kernel;
pub mod model;
pub mod plan;
pub mod spec;
pub mod stats;
pub mod weights;

pub use error::{Error, Result};
