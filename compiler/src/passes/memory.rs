//! `plan-memory`: a liveness-based arena per phase. Every activation (graph node output or
//! kernel temporary) lives from the launch that first binds it to the last launch that reads
//! it (the logits to the end); live values never overlap, dead ones are reused (first fit,
//! 64-byte aligned). Sizes are per row, so one plan serves any row count up to the phase's
//! maximum (prefill rows, or decode batch).

use std::collections::BTreeMap;

use lamina_ir::kernel::Dim;
use lamina_ir::Error;

use super::{Pass, Program};
use crate::kernels::{Bind, Phase, Value};

#[derive(Debug, Clone, Default)]
pub struct MemoryPlan {
    pub rows: usize,
    pub bytes_per_row: usize,
    /// value → (offset per row, bytes per row).
    pub slots: BTreeMap<Value, (usize, usize)>,
}

pub struct PlanMemory;

const ALIGN: usize = 64;

impl Pass for PlanMemory {
    fn name(&self) -> &'static str {
        "plan-memory"
    }

    fn run(&self, p: &mut Program) -> Result<(), Error> {
        let output = Value::Node(p.graph.output);
        for (phase, launches) in &p.schedules {
            // value → (first, last, bytes per row)
            let mut live: BTreeMap<Value, (usize, usize, usize)> = BTreeMap::new();
            for (i, l) in launches.iter().enumerate() {
                for (param, arg) in l.kernel.params.iter().zip(&l.args) {
                    if let Bind::Act(v) = arg {
                        if param.shape.first() != Some(&Dim::Rows) {
                            return Err(Error::Compile(format!(
                                "kernel {}: activation parameter {} is not [R, ...]",
                                l.kernel.name, param.name
                            )));
                        }
                        let per_row = param.numel(1) * param.elem.bytes();
                        let e = live.entry(*v).or_insert((i, i, per_row));
                        e.1 = i;
                        e.2 = e.2.max(per_row);
                    }
                }
            }
            if let Some(e) = live.get_mut(&output) {
                e.1 = usize::MAX;
            }
            let mut order: Vec<(Value, (usize, usize, usize))> = live.into_iter().collect();
            order.sort_by_key(|(v, (first, _, _))| (*first, *v));
            let mut active: Vec<(usize, usize, usize)> = Vec::new(); // (offset, size, last)
            let mut plan = MemoryPlan {
                rows: match phase {
                    Phase::Prefill => p.options.max_prefill_rows,
                    Phase::Decode => p.options.max_batch,
                },
                ..Default::default()
            };
            for (v, (first, last, size)) in order {
                if !p.options.keep_values {
                    active.retain(|&(_, _, l)| l >= first);
                }
                active.sort();
                let raw = size;
                let size = size.div_ceil(ALIGN) * ALIGN;
                let mut off = 0;
                for &(o, s, _) in &active {
                    if off + size <= o {
                        break;
                    }
                    off = off.max(o + s);
                }
                active.push((off, size, last));
                plan.bytes_per_row = plan.bytes_per_row.max(off + size);
                plan.slots.insert(v, (off, raw));
            }
            p.memory.insert(*phase, plan);
        }
        Ok(())
    }
}
