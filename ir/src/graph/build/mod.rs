//! Spec → graph. The decoder skeleton lives here; each mixer and FFN family is lowered by its
//! own module:
//!
//! | family | module |
//! |---|---|
//! | `gated_delta`, `delta`, `kda`, `lightning` | [`linear_attention`] |
//! | `gqa`, `mla` | [`attention`] |
//! | `swiglu`, `moe` | [`ffn`] |
//!
//! Weight names are Lamina's canonical names (`layers.3.mixer.q_proj`); importers map them to a
//! checkpoint's own names ([`crate::hf`]).

mod attention;
mod ffn;
mod linear_attention;

use std::collections::BTreeMap;

use petgraph::stable_graph::{NodeIndex, StableGraph};

use crate::error::Result;
use crate::spec::{MixerSpec, ModelSpec, ResidualStyle};

use super::{
    DType, Graph, Node, Op, StateDecl, StateId, StateKind, TensorType, Unary, WeightDecl,
    WeightKind,
};

/// Lowers a validated spec to a verified graph.
pub fn build_graph(spec: &ModelSpec) -> Result<Graph> {
    spec.validate()?;
    let mut b = Builder::new(spec);
    let tokens = b.node("tokens", Op::Tokens, &[]);
    let d = spec.hidden_size;
    b.weight("embed", &[spec.vocab_size, d], WeightKind::Embedding);
    let mut x = b.node(
        "embed",
        Op::Embed {
            weight: "embed".into(),
            dim: d,
        },
        &[tokens],
    );
    let mut layer_kinds = Vec::new();
    for layer in spec.layer_plan() {
        let i = layer.index;
        b.layer = i;
        layer_kinds.push((
            layer.mixer.kind_name().to_string(),
            ffn::kind_name(layer.ffn),
        ));
        let (alpha, beta) = match (spec.residual.style, layer.mixer.is_linear()) {
            (ResidualStyle::PreNorm, _) => (1.0, 1.0),
            (ResidualStyle::ScaledPostNorm, true) => {
                (spec.residual.linear_alpha, spec.residual.linear_beta)
            }
            (ResidualStyle::ScaledPostNorm, false) => {
                (spec.residual.attention_alpha, spec.residual.attention_beta)
            }
        };
        let h = b.norm(&format!("layers.{i}.mixer_norm"), x, d);
        let p = format!("layers.{i}.mixer");
        let m = match layer.mixer {
            MixerSpec::GatedDelta(s) => linear_attention::gated_delta(&mut b, &p, h, s, true),
            MixerSpec::Delta(s) => linear_attention::gated_delta(&mut b, &p, h, s, false),
            MixerSpec::Kda(s) => linear_attention::kda(&mut b, &p, h, s),
            MixerSpec::Lightning(s) => linear_attention::lightning(&mut b, &p, h, s),
            MixerSpec::Gqa(s) => attention::gqa(&mut b, &p, h, s),
            MixerSpec::Mla(s) => attention::mla(&mut b, &p, h, s),
        };
        x = b.residual(&format!("layers.{i}.mixer_residual"), x, h, m, alpha, beta);

        let h = b.norm(&format!("layers.{i}.ffn_norm"), x, d);
        let p = format!("layers.{i}.ffn");
        let f = ffn::ffn(&mut b, &p, h, layer.ffn);
        let (alpha, beta) = match spec.residual.style {
            ResidualStyle::PreNorm => (1.0, 1.0),
            ResidualStyle::ScaledPostNorm => (spec.residual.ffn_alpha, spec.residual.ffn_beta),
        };
        x = b.residual(&format!("layers.{i}.ffn_residual"), x, h, f, alpha, beta);
    }
    let h = b.norm("final_norm", x, d);
    let lm_weight = if spec.tie_embeddings {
        "embed".to_string()
    } else {
        b.weight("lm_head", &[spec.vocab_size, d], WeightKind::LmHead);
        "lm_head".to_string()
    };
    let logits = b.node(
        "lm_head",
        Op::Linear {
            weight: lm_weight,
            in_dim: d,
            out_dim: spec.vocab_size,
        },
        &[h],
    );
    let graph = Graph {
        name: spec.name.clone(),
        vocab_size: spec.vocab_size,
        hidden_size: d,
        num_layers: spec.num_layers,
        g: b.g,
        output: logits,
        weights: b.weights,
        states: b.states,
        layer_kinds,
    };
    super::verify::verify(&graph)?;
    Ok(graph)
}

/// Adds typed nodes, weights and states; type errors here are builder bugs and panic with the
/// node's name (the verifier reports the same errors as values for graphs built elsewhere).
pub(crate) struct Builder<'s> {
    pub spec: &'s ModelSpec,
    pub layer: usize,
    g: StableGraph<Node, usize>,
    weights: BTreeMap<String, WeightDecl>,
    states: Vec<StateDecl>,
}

impl<'s> Builder<'s> {
    fn new(spec: &'s ModelSpec) -> Self {
        Builder {
            spec,
            layer: 0,
            g: StableGraph::new(),
            weights: BTreeMap::new(),
            states: Vec::new(),
        }
    }

    pub fn node(&mut self, name: &str, op: Op, inputs: &[NodeIndex]) -> NodeIndex {
        let tys: Vec<TensorType> = inputs.iter().map(|&i| self.g[i].ty).collect();
        let ty = op
            .infer(&tys)
            .unwrap_or_else(|e| panic!("graph builder produced an ill-typed node {name}: {e}"));
        let n = self.g.add_node(Node {
            name: name.to_string(),
            op,
            ty,
        });
        for (pos, &i) in inputs.iter().enumerate() {
            self.g.add_edge(i, n, pos);
        }
        n
    }

    pub fn weight(&mut self, name: &str, shape: &[usize], kind: WeightKind) -> String {
        let dtype = if kind == WeightKind::Small {
            DType::F32
        } else {
            DType::Bf16
        };
        self.weights.insert(
            name.to_string(),
            WeightDecl {
                shape: shape.to_vec(),
                dtype,
                kind,
            },
        );
        name.to_string()
    }

    pub fn state(&mut self, name: &str, kind: StateKind, dtype: DType, shape: &[usize]) -> StateId {
        self.states.push(StateDecl {
            name: name.to_string(),
            kind,
            layer: self.layer,
            dtype,
            shape: shape.to_vec(),
        });
        StateId(self.states.len() - 1)
    }

    /// `x Wᵀ` with a fresh `[out, in]` weight named after the node.
    pub fn linear(
        &mut self,
        name: &str,
        x: NodeIndex,
        out_dim: usize,
        kind: WeightKind,
    ) -> NodeIndex {
        let in_dim = self.g[x].ty.cols.expect("linear of a [T, n] value");
        let weight = self.weight(name, &[out_dim, in_dim], kind);
        self.node(
            name,
            Op::Linear {
                weight,
                in_dim,
                out_dim,
            },
            &[x],
        )
    }

    /// The model's RMSNorm (plain or zero-centred) over groups of `group` columns.
    pub fn norm(&mut self, name: &str, x: NodeIndex, group: usize) -> NodeIndex {
        self.norm_eps(name, x, group, self.spec.norm.eps)
    }

    pub fn norm_eps(&mut self, name: &str, x: NodeIndex, group: usize, eps: f64) -> NodeIndex {
        let weight = self.weight(name, &[group], WeightKind::Small);
        self.node(
            name,
            Op::RmsNorm {
                weight,
                eps,
                zero_centred: self.spec.norm.zero_centred,
                group,
            },
            &[x],
        )
    }

    pub fn unary(&mut self, name: &str, f: Unary, x: NodeIndex) -> NodeIndex {
        self.node(name, Op::Unary(f), &[x])
    }

    pub fn slice(
        &mut self,
        name: &str,
        x: NodeIndex,
        group: usize,
        start: usize,
        len: usize,
    ) -> NodeIndex {
        self.node(name, Op::Slice { group, start, len }, &[x])
    }

    pub fn add(&mut self, name: &str, a: NodeIndex, b: NodeIndex) -> NodeIndex {
        self.node(
            name,
            Op::Add {
                alpha: 1.0,
                beta: 1.0,
            },
            &[a, b],
        )
    }

    /// Pre-norm: `x + out`. Scaled post-norm (MiniMax): `alpha * normed + beta * out`.
    fn residual(
        &mut self,
        name: &str,
        x: NodeIndex,
        normed: NodeIndex,
        out: NodeIndex,
        alpha: f64,
        beta: f64,
    ) -> NodeIndex {
        match self.spec.residual.style {
            ResidualStyle::PreNorm => self.add(name, x, out),
            ResidualStyle::ScaledPostNorm => {
                self.node(name, Op::Add { alpha, beta }, &[normed, out])
            }
        }
    }
}
