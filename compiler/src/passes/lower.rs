//! `lower-to-kernels`: every graph node of the schedule to its launches, once per phase. The
//! dispatcher below is the one place that maps an op to its builder in `crate::kernels`.

use lamina_ir::graph::Op;
use lamina_ir::Error;

use super::{Pass, Program};
use crate::kernels::{
    attention, conv, elementwise, linear, moe, norm, recurrence, Ctx, Launch, Phase,
};

pub struct LowerToKernels;

impl Pass for LowerToKernels {
    fn name(&self) -> &'static str {
        "lower-to-kernels"
    }

    fn run(&self, p: &mut Program) -> Result<(), Error> {
        for phase in [Phase::Prefill, Phase::Decode] {
            let cx = Ctx::new(p.graph, phase, p.options.max_batch, p.options.max_context);
            let mut launches = Vec::new();
            for n in p.graph.schedule() {
                launches.extend(lower_node(&cx, n));
            }
            p.schedules.insert(phase, launches);
        }
        Ok(())
    }
}

fn lower_node(cx: &Ctx, n: lamina_ir::graph::NodeIndex) -> Vec<Launch> {
    let ins = cx.graph.inputs(n);
    match &cx.graph.node(n).op {
        // Bound directly by the embedding kernel.
        Op::Tokens => vec![],
        Op::RmsNorm { .. } | Op::GatedRmsNorm { .. } | Op::L2Norm { .. } => {
            vec![norm::build(cx, n, &ins)]
        }
        Op::Linear { .. } => vec![linear::build(cx, n, &ins)],
        Op::Embed { .. }
        | Op::Slice { .. }
        | Op::Unary(_)
        | Op::Mul
        | Op::Add { .. }
        | Op::SwiGlu
        | Op::DecayGate { .. } => vec![elementwise::build(cx, n, &ins)],
        Op::ShortConv { .. } => vec![conv::build(cx, n, &ins)],
        Op::Recurrence { .. } => vec![recurrence::build(cx, n, &ins)],
        Op::Rope(_) => vec![attention::rope(cx, n, &ins)],
        Op::Attention { .. } => attention::gqa(cx, n, &ins),
        Op::MlaAttention { .. } => attention::mla(cx, n, &ins),
        Op::Moe { .. } => moe::build(cx, n, &ins),
    }
}
