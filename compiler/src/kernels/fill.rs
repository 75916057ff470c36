//! The device fill of random benchmark weights: `out[i] = centre + width·u(i)` with `u(i)` in
//! [-1, 1] from two rounds of a 31-bit linear congruential hash of `i` and a per-tensor seed
//! (each round reduces its input mod 2^31 first, so no product leaves i64).
//! GPU plans carry it (not launched by any schedule) so that full-size benchmarks fill their
//! weights where they live instead of uploading tens of gigabytes; host tests run it to check
//! its range. Not the host's `random_tensor` values: only for timing.

use lamina_ir::kernel::build::*;
use lamina_ir::kernel::{Access, Dim, Elem, Kernel};

pub use lamina_ir::plan::FILL_KERNEL;

/// `out: bf16[R]` (R = the tensor's elements), `p: f32[4] = [seed (< 2^24), centre, width, 0]`.
pub fn fill_uniform_bf16() -> Kernel {
    const M: usize = 1 << 31;
    // x ≥ 0 throughout; reduced below 2^31 before the multiply, the product stays below 2^62.
    let round = |x: lamina_ir::kernel::Expr| rem(rem(x, i(M)) * i(1_103_515_245) + i(12_345), i(M));
    Kernel {
        name: FILL_KERNEL.into(),
        nodes: vec![],
        grid: vec![Dim::Rows],
        params: vec![
            param("out", Elem::Bf16, &[Dim::Rows], Access::Write),
            param("p", Elem::F32, &[Dim::N(4)], Access::Read),
        ],
        body: vec![
            let_("seed", to_i(ld("p", [i(0)]))),
            let_("h1", round(pid(0) + v("seed") * i(7919))),
            let_("h2", round(v("h1") + v("seed"))),
            let_("u", to_f(v("h2")) * f(2.0 / M as f64) - f(1.0)),
            st("out", [pid(0)], ld("p", [i(1)]) + ld("p", [i(2)]) * v("u")),
        ],
    }
}
