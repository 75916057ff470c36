//! Lamina's whole-system tests, one binary: oracle fixtures (transformers / fla), kernel
//! vectors, chunked-vs-recurrent forms, compiled host plans (examples, oracle families, random
//! shapes), IR snapshots of every example, model accounting,
//! bad input through the `compile-model` binary, the NVPTX targets (ptxas) and, with the
//! `cuda` feature, the CUDA executor against the host executor.

mod bad_corpus;
mod bad_input;
mod common;
mod compiled;
#[cfg(feature = "cuda")]
mod cuda;
mod import;
mod kernels;
mod models;
mod nvptx;
mod oracle;
mod shapes;
mod snapshots;
mod soak;
