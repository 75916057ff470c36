//! Helpers: fixture paths, safetensors reading, error metrics.

use std::collections::HashMap;
use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn oracle(case: &str) -> PathBuf {
    repo().join("tests/fixtures/oracle").join(case)
}

/// A tensor as f64 with its shape.
pub struct T {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

pub fn read_all(path: &std::path::Path) -> HashMap<String, T> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let b = v.data();
            let data: Vec<f64> = match v.dtype() {
                Dtype::F32 => b
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::F64 => b
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                Dtype::I64 => b
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                d => panic!("{name}: unexpected dtype {d:?}"),
            };
            (
                name,
                T {
                    shape: v.shape().to_vec(),
                    data,
                },
            )
        })
        .collect()
}

/// ‖a − b‖ / ‖b‖; NaN anywhere gives infinity, so NaN never passes.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    if a.iter().chain(b).any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den
}

pub fn max_abs(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_finite() && y.is_finite() {
                (x - y).abs()
            } else {
                f64::INFINITY
            }
        })
        .fold(0.0, f64::max)
}

/// The oracle's prompt `len`: input ids and transformers' greedy tokens.
pub fn oracle_prompt(exp: &HashMap<String, T>, len: usize) -> (Vec<i64>, Vec<i64>) {
    let ids = |k: &str| -> Vec<i64> {
        exp[&format!("prompt{len}.{k}")]
            .data
            .iter()
            .map(|&x| x as i64)
            .collect()
    };
    (ids("input_ids"), ids("greedy_tokens"))
}

/// Reports a skipped check on the real stderr (libtest captures `eprintln!` of passing tests,
/// and a skip must stay visible in `make test`'s output).
pub fn skip(msg: &str) {
    note(&format!("SKIPPED {msg}"));
}

/// A line on the real stderr, shown even when the test passes (measured errors of GPU runs).
pub fn note(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{msg}");
}
