//! `lower-to-kernels`: every graph node of the schedule to its launches, once per phase,
//! except the nodes `fuse` absorbed into another node's kernel. The dispatcher below is the
//! one place that maps an op to its builder in `crate::kernels`.

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
        if p.options.tensor_cores && !p.options.weights_bf16 {
            return Err(Error::Compile(
                "tensor-core projections read bf16 weights: build with bf16 weights \
                 (--weight-dtype bf16 or auto) or without --tensor-cores"
                    .into(),
            ));
        }
        for phase in [Phase::Prefill, Phase::Decode] {
            let rows = match phase {
                Phase::Prefill => p.options.max_prefill_rows,
                Phase::Decode => p.options.max_batch,
            };
            let o = p.options;
            let mut cx = Ctx::new(p.graph, &p.fusion, phase, rows, o.max_batch, o.max_context);
            cx.decode_splits = o.decode_splits;
            cx.tensor_cores = o.tensor_cores;
            cx.bf16_handoffs = o.bf16_handoffs;
            if o.warpgroup_tiles {
                cx.tiling = lamina_ir::kernel::build::Tiling::Warpgroup;
            }
            cx.bf16_caches = o.bf16_caches;
            let mut launches = Vec::new();
            for n in p.graph.schedule() {
                if !p.fusion.absorbed.contains(&n) {
                    launches.extend(lower_node(&cx, n));
                }
            }
            p.schedules.insert(phase, launches);
        }
        Ok(())
    }
}

fn lower_node(cx: &Ctx, n: lamina_ir::graph::NodeIndex) -> Vec<Launch> {
    let ins = cx.graph.inputs(n);
    if let Some(l) = cx.fusion.of(n).linear {
        // A residual add computed by the projection producing one of its operands.
        return linear::build(cx, l, Some(n));
    }
    match &cx.graph.node(n).op {
        // Bound directly by the embedding kernel.
        Op::Tokens => vec![],
        Op::RmsNorm { .. } | Op::GatedRmsNorm { .. } | Op::L2Norm { .. } => {
            vec![norm::build(cx, n, &ins)]
        }
        Op::Linear { .. } => linear::build(cx, n, None),
        Op::Embed { .. }
        | Op::Slice { .. }
        | Op::Unary(_)
        | Op::Mul
        | Op::Add { .. }
        | Op::SwiGlu
        | Op::DecayGate { .. } => vec![elementwise::build(cx, n, &ins)],
        Op::ShortConv { .. } => vec![conv::build(cx, n, &ins)],
        Op::Recurrence { .. } => recurrence::build(cx, n, &ins),
        Op::Rope(_) => vec![attention::rope(cx, n, &ins)],
        Op::Attention { .. } => attention::gqa(cx, n, &ins),
        Op::MlaAttention { .. } => attention::mla(cx, n, &ins),
        Op::Moe { .. } => moe::build(cx, n, &ins),
    }
}
