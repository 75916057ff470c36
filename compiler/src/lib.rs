//! Lamina's compiler: the graph IR → kernel IR lowering ([`kernels`], one module per op
//! family), the pass pipeline ([`passes`]), artifact emission ([`build`]) and the
//! `compile-model` command line ([`cli`]). MLIR and LLVM live behind `lamina_targets`.

pub mod build;
pub mod cli;
pub mod kernels;
pub mod passes;
