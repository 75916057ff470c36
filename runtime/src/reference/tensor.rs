//! The reference executor's numbers: a float type parameter (f32 or f64) and a row-major matrix.

use std::fmt::Debug;
use std::iter::Sum;

use num_traits::{Float, FromPrimitive, ToPrimitive};

/// The element type the reference executor computes in (f32 or f64).
pub trait Real:
    Float
    + num_traits::float::TotalOrder
    + FromPrimitive
    + ToPrimitive
    + Sum
    + Debug
    + Send
    + Sync
    + 'static
{
    fn of(v: f64) -> Self {
        Self::from_f64(v).expect("every f64 converts to f32/f64")
    }
    fn of32(v: f32) -> Self {
        Self::from_f32(v).expect("every f32 converts to f32/f64")
    }
    /// The value as f32, rounded to the nearest bfloat16 (a tensor-core plan's GEMM operand).
    fn bf16_rounded(self) -> Self {
        let f = self.to_f32().expect("f32/f64 convert to f32");
        Self::of32(half::bf16::from_f32(f).to_f32())
    }
}

impl Real for f32 {}
impl Real for f64 {}

/// `[rows, cols]`, row-major. Activations are `[T, features]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat<F> {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<F>,
}

impl<F: Real> Mat<F> {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Mat {
            rows,
            cols,
            data: vec![F::zero(); rows * cols],
        }
    }

    pub fn row(&self, r: usize) -> &[F] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    pub fn row_mut(&mut self, r: usize) -> &mut [F] {
        &mut self.data[r * self.cols..(r + 1) * self.cols]
    }

    pub fn map(&self, f: impl Fn(F) -> F) -> Self {
        Mat {
            rows: self.rows,
            cols: self.cols,
            data: self.data.iter().map(|&v| f(v)).collect(),
        }
    }
}

pub fn dot<F: Real>(a: &[F], b: &[F]) -> F {
    a.iter().zip(b).map(|(&x, &y)| x * y).sum()
}

pub fn sigmoid<F: Real>(x: F) -> F {
    F::one() / (F::one() + (-x).exp())
}

pub fn silu<F: Real>(x: F) -> F {
    x * sigmoid(x)
}

/// PyTorch's softplus (beta 1, threshold 20).
pub fn softplus<F: Real>(x: F) -> F {
    if x > F::of(20.0) {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// `x Wᵀ` for W `[out, in]` stored row-major.
pub fn linear<F: Real>(x: &Mat<F>, w: &[F], out: usize) -> Mat<F> {
    let k = x.cols;
    debug_assert_eq!(w.len(), out * k);
    let mut y = Mat::zeros(x.rows, out);
    for r in 0..x.rows {
        let xr = x.row(r);
        let yr = y.row_mut(r);
        for (o, yo) in yr.iter_mut().enumerate() {
            *yo = dot(xr, &w[o * k..(o + 1) * k]);
        }
    }
    y
}
