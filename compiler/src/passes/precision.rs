//! `weight-precision`: the element type kernels read weights in. With `Options::weights_bf16`
//! every parameter bound to a weight (or to stacked experts) becomes `bf16` (loads widen to
//! f32: accumulation, states and softmax statistics stay f32); otherwise weights stay f32.
//! Runs before `dedupe-kernels`, so a kernel's signature carries its weights' type.

use lamina_ir::kernel::Elem;
use lamina_ir::Error;

use super::{Pass, Program};
use crate::kernels::Bind;

pub struct WeightPrecision;

impl Pass for WeightPrecision {
    fn name(&self) -> &'static str {
        "weight-precision"
    }

    fn run(&self, p: &mut Program) -> Result<(), Error> {
        if !p.options.weights_bf16 {
            return Ok(());
        }
        for l in p.schedules.values_mut().flatten() {
            for (param, bind) in l.kernel.params.iter_mut().zip(&l.args) {
                if matches!(bind, Bind::Weight(_) | Bind::Stacked { .. }) {
                    param.elem = Elem::Bf16;
                }
            }
        }
        Ok(())
    }
}
