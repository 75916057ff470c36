//! Lamina's compiler: today the `compile-model` front end (check, IR dumps, reference runs);
//! passes, kernel IR lowering and plan emission are the compiler-core issue.

pub mod cli;
