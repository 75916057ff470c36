//! Test-only crate: see it/main.rs.
