//! `fuse`: decides, on the graph, which nodes are computed inside another node's kernel.
//! Lowering then emits one launch per *root* and none for the absorbed nodes, whose values are
//! never materialised. Patterns, each legal only when the absorbed value has no other reader:
//!
//! - **norm prologue**: an RMSNorm over the whole row whose every reader is a projection is
//!   recomputed in each projection's prologue (the row's `1/rms` once per row and program);
//! - **residual epilogue**: `add(r, linear(x))` is the projection writing `r + x Wᵀ`;
//! - **recurrence prologue**: the short convs + SiLU of q, k and v, the L2 norms of q and k,
//!   β's sigmoid and the decay gate are computed by the recurrence from their inputs (with the
//!   convs fused, a program owns a whole key head, so each conv state channel has exactly one
//!   reader and writer);
//! - **recurrence epilogue**: the gated RMSNorm over each head's output is applied by the
//!   recurrence (a program then owns a whole head, see `kernels::recurrence`).
//!
//! Fused elsewhere, by construction of their builders: SwiGLU into the expert GEMM epilogue,
//! the whole router in one kernel (`kernels::moe`).

use std::collections::{BTreeMap, BTreeSet};

use lamina_ir::graph::{Graph, NodeIndex, Op, Unary};
use lamina_ir::Error;

use super::{Pass, Program};

/// What a root node's kernel computes besides its own op.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Absorbed {
    /// Linear: the RMSNorm producing its input (the kernel reads the norm's input).
    pub norm: Option<NodeIndex>,
    /// Add: the projection producing one operand (the kernel is that projection's, with the
    /// other operand added in the epilogue).
    pub linear: Option<NodeIndex>,
    /// Recurrence: the L2 norms of its q and k operands.
    pub l2_q: Option<NodeIndex>,
    pub l2_k: Option<NodeIndex>,
    /// Recurrence: the sigmoid producing β.
    pub beta: Option<NodeIndex>,
    /// Recurrence: the decay gate producing g.
    pub gate: Option<NodeIndex>,
    /// Recurrence: the gated RMSNorm reading its output (the kernel writes the norm's value).
    pub out_norm: Option<NodeIndex>,
    /// Recurrence: the short convs (+ SiLU) producing q, k (under their L2 norms) and v. Only
    /// all three together: the kernel then owns whole key heads, so each conv state channel
    /// has one reader and writer.
    pub conv: Option<[NodeIndex; 3]>,
}

/// The fusion decisions of one program.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fusion {
    pub roots: BTreeMap<NodeIndex, Absorbed>,
    /// Nodes without a launch of their own.
    pub absorbed: BTreeSet<NodeIndex>,
    /// The root whose kernel writes a node's value, where it is not the node itself (a
    /// recurrence with a fused output norm writes the norm's value).
    pub writes: BTreeMap<NodeIndex, NodeIndex>,
}

impl Fusion {
    pub fn of(&self, n: NodeIndex) -> Absorbed {
        self.roots.get(&n).cloned().unwrap_or_default()
    }

    /// One line per root, for dumps.
    pub fn print(&self, g: &Graph) -> String {
        let mut out = String::new();
        for (root, a) in &self.roots {
            let parts: Vec<String> = [
                ("norm", a.norm),
                ("linear", a.linear),
                ("l2_q", a.l2_q),
                ("l2_k", a.l2_k),
                ("beta", a.beta),
                ("gate", a.gate),
                ("out_norm", a.out_norm),
                ("conv_q", a.conv.map(|c| c[0])),
                ("conv_k", a.conv.map(|c| c[1])),
                ("conv_v", a.conv.map(|c| c[2])),
            ]
            .iter()
            .filter_map(|(k, n)| n.map(|n| format!("{k} = {}", g.node(n).name)))
            .collect();
            out += &format!(
                "// fused into {}: {}\n",
                g.node(*root).name,
                parts.join(", ")
            );
        }
        out
    }
}

pub struct Fuse;

impl Pass for Fuse {
    fn name(&self) -> &'static str {
        "fuse"
    }

    fn run(&self, p: &mut Program) -> Result<(), Error> {
        p.fusion = decide(p.graph);
        Ok(())
    }
}

fn readers(g: &Graph) -> BTreeMap<NodeIndex, Vec<NodeIndex>> {
    let mut r: BTreeMap<NodeIndex, Vec<NodeIndex>> = BTreeMap::new();
    for n in g.schedule() {
        for i in g.inputs(n) {
            r.entry(i).or_default().push(n);
        }
    }
    r
}

pub fn decide(g: &Graph) -> Fusion {
    let readers = readers(g);
    let only_reader = |n: NodeIndex, of: NodeIndex| -> bool {
        n != g.output && readers.get(&n).is_some_and(|r| r.len() == 1 && r[0] == of)
    };
    let mut f = Fusion::default();
    for n in g.schedule() {
        match &g.node(n).op {
            // Residual epilogue.
            Op::Add { alpha, beta } if *alpha == 1.0 && *beta == 1.0 => {
                let ins = g.inputs(n);
                let lin = ins.iter().rev().copied().find(|&x| {
                    matches!(g.node(x).op, Op::Linear { .. })
                        && only_reader(x, n)
                        && !ins.iter().all(|&y| y == x)
                });
                if let Some(l) = lin {
                    f.roots.entry(n).or_default().linear = Some(l);
                    f.absorbed.insert(l);
                }
            }
            // Recurrence prologue and epilogue.
            Op::Recurrence { rec, .. } => {
                let ins = g.inputs(n);
                let mut a = Absorbed::default();
                let l2 = |x: NodeIndex| {
                    (matches!(g.node(x).op, Op::L2Norm { group, .. } if group == rec.dk)
                        && only_reader(x, n))
                    .then_some(x)
                };
                a.l2_q = l2(ins[0]);
                a.l2_k = l2(ins[1]);
                let mut next = 3;
                if rec.decay != lamina_ir::graph::Decay::None
                    && !matches!(rec.decay, lamina_ir::graph::Decay::Fixed { .. })
                {
                    let x = ins[next];
                    next += 1;
                    if matches!(g.node(x).op, Op::DecayGate { .. }) && only_reader(x, n) {
                        a.gate = Some(x);
                    }
                }
                if rec.update == lamina_ir::graph::Update::Delta {
                    let x = ins[next];
                    if matches!(g.node(x).op, Op::Unary(Unary::Sigmoid)) && only_reader(x, n) {
                        a.beta = Some(x);
                    }
                }
                // The convs under q and k's L2 norms, and under v.
                let conv = |x: Option<NodeIndex>, reader: NodeIndex| {
                    x.filter(|&c| {
                        matches!(g.node(c).op, Op::ShortConv { kernel, .. } if kernel >= 2)
                            && only_reader(c, reader)
                    })
                };
                let cq = a.l2_q.and_then(|l| conv(Some(g.inputs(l)[0]), l));
                let ck = a.l2_k.and_then(|l| conv(Some(g.inputs(l)[0]), l));
                let cv = conv(Some(ins[2]), n);
                let size = |c: NodeIndex| match g.node(c).op {
                    Op::ShortConv { kernel, .. } => kernel,
                    _ => 0,
                };
                // One kernel size for the three: the fused kernel reads it from q's conv.
                if let (Some(cq), Some(ck), Some(cv)) = (cq, ck, cv) {
                    if size(cq) == size(ck) && size(ck) == size(cv) {
                        a.conv = Some([cq, ck, cv]);
                        f.absorbed.extend([cq, ck, cv]);
                    }
                }
                if let Some(r) = readers.get(&n).filter(|r| r.len() == 1 && n != g.output) {
                    let norm = r[0];
                    if let Op::GatedRmsNorm { group, .. } = g.node(norm).op {
                        let gin = g.inputs(norm);
                        // The gate must exist when the recurrence runs.
                        if group == rec.dv && gin[0] == n && gin[1] < n && norm != g.output {
                            a.out_norm = Some(norm);
                            f.writes.insert(norm, n);
                        }
                    }
                }
                for x in [a.l2_q, a.l2_k, a.beta, a.gate, a.out_norm]
                    .into_iter()
                    .flatten()
                {
                    f.absorbed.insert(x);
                }
                if a != Absorbed::default() {
                    f.roots.insert(n, a);
                }
            }
            _ => {}
        }
    }
    // Norm prologue: every reader is a projection over the whole row (possibly itself
    // absorbed by a residual add, which then becomes the root).
    for n in g.schedule() {
        let Op::RmsNorm { group, .. } = g.node(n).op else {
            continue;
        };
        let cols = g.node(n).ty.cols.unwrap_or(0);
        let Some(r) = readers.get(&n) else { continue };
        if n == g.output
            || group != cols
            || !r.iter().all(|&x| matches!(g.node(x).op, Op::Linear { .. }))
        {
            continue;
        }
        for &l in r {
            let root = match f.roots.iter().find(|(_, a)| a.linear == Some(l)) {
                Some((&add, _)) => add,
                None => l,
            };
            f.roots.entry(root).or_default().norm = Some(n);
        }
        f.absorbed.insert(n);
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use lamina_ir::model::Model;

    fn graph(file: &str) -> Graph {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(file);
        Model::open(&path).unwrap().graph
    }

    fn by_name(g: &Graph, name: &str) -> NodeIndex {
        g.schedule()
            .into_iter()
            .find(|&n| g.node(n).name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    #[test]
    fn gated_deltanet_layer_fusions() {
        let g = graph("qwen3-next-tiny.toml");
        let f = decide(&g);
        let n = |s: &str| by_name(&g, s);
        let rec = f.of(n("layers.0.mixer.recurrence"));
        assert_eq!(rec.l2_q, Some(n("layers.0.mixer.q_l2norm")));
        assert_eq!(rec.l2_k, Some(n("layers.0.mixer.k_l2norm")));
        assert_eq!(rec.beta, Some(n("layers.0.mixer.beta")));
        assert_eq!(rec.gate, Some(n("layers.0.mixer.decay_gate")));
        assert_eq!(rec.out_norm, Some(n("layers.0.mixer.norm")));
        assert_eq!(
            f.of(n("layers.0.mixer_residual")).linear,
            Some(n("layers.0.mixer.o_proj"))
        );
        assert_eq!(
            f.of(n("layers.0.mixer.q_proj")).norm,
            Some(n("layers.0.mixer_norm"))
        );
        // The FFN norm also feeds the router: it keeps its own kernel.
        assert!(!f.absorbed.contains(&n("layers.0.ffn_norm")));
        let convs = ["q_conv", "k_conv", "v_conv"].map(|c| n(&format!("layers.0.mixer.{c}")));
        assert_eq!(rec.conv, Some(convs));
        assert!(convs.iter().all(|c| f.absorbed.contains(c)));
        // Absorbed nodes are not roots, and the logits are never absorbed.
        assert!(f.absorbed.iter().all(|a| !f.roots.contains_key(a)));
        assert!(!f.absorbed.contains(&g.output));
    }
}
