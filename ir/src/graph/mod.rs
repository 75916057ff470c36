//! Graph IR: a typed tensor dataflow graph (petgraph `StableGraph`) of one decoder forward pass.
//!
//! Every activation is a `[T, features]` matrix (T = tokens in this call; heads are contiguous
//! column groups). Stateful ops (short conv, recurrences, attention) name a [`StateDecl`] they
//! read and update, so the same graph runs a whole prompt (prefill) or one token (decode).
//!
//! - [`build`] lowers a [`crate::spec::ModelSpec`] to a graph, one module per op family.
//! - [`verify`] re-infers every type and checks the precision rules, naming the offending node.
//! - [`print`] is the stable text form (`compile-model ir MODEL --stage graph`).

pub mod build;
mod op;
pub mod print;
pub mod verify;

use std::collections::BTreeMap;

pub use petgraph::stable_graph::NodeIndex;
use petgraph::stable_graph::StableGraph;
use petgraph::visit::EdgeRef;
use petgraph::Direction;

pub use op::*;

/// Element types. Activations and weight matrices are bf16 in compiled plans; recurrent state,
/// decay gates, router scores and every accumulator are f32 (checked by [`verify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    I64,
    Bf16,
    F32,
}

impl DType {
    pub fn bytes(self) -> usize {
        match self {
            DType::I64 => 8,
            DType::Bf16 => 2,
            DType::F32 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::I64 => "i64",
            DType::Bf16 => "bf16",
            DType::F32 => "f32",
        }
    }
}

/// The type of a node's value: `[T]` (token ids) or `[T, cols]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorType {
    pub dtype: DType,
    /// None for the `[T]` token vector.
    pub cols: Option<usize>,
}

impl TensorType {
    pub fn act(cols: usize) -> Self {
        TensorType {
            dtype: DType::Bf16,
            cols: Some(cols),
        }
    }

    pub fn f32(cols: usize) -> Self {
        TensorType {
            dtype: DType::F32,
            cols: Some(cols),
        }
    }
}

/// What a weight tensor is, for reports (weights by kind) and later layout decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WeightKind {
    Embedding,
    LmHead,
    /// Projection matrices outside the routed experts (attention, mixers, dense/shared FFN).
    Dense,
    /// Routed-expert matrices (only top-k of them are touched per token).
    Expert,
    /// Norm weights, gates' biases, A_log, conv filters: small f32 vectors.
    Small,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WeightDecl {
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub kind: WeightKind,
}

impl WeightDecl {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StateId(pub usize);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateKind {
    /// Short-conv history: `[channels, kernel - 1]` per sequence.
    Conv,
    /// Linear-attention state `S`: `[heads, dk, dv]` per sequence, always f32.
    Recurrent,
    /// GQA KV cache: `kv_heads * (head_dim + v_dim)` per token.
    KvCache,
    /// MLA latent cache: `kv_lora_rank + rope_dim` per token.
    MlaLatent,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StateDecl {
    pub name: String,
    pub kind: StateKind,
    pub layer: usize,
    pub dtype: DType,
    /// Shape per sequence (Conv, Recurrent) or per token (KvCache, MlaLatent).
    pub shape: Vec<usize>,
}

impl StateDecl {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.bytes()
    }

    pub fn per_token(&self) -> bool {
        matches!(self.kind, StateKind::KvCache | StateKind::MlaLatent)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Stable, human-readable name (`layers.3.mixer.q_proj`), also used in error messages.
    pub name: String,
    pub op: Op,
    pub ty: TensorType,
}

/// The forward graph of one model. Edge weights are operand positions.
#[derive(Debug, Clone)]
pub struct Graph {
    pub name: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub g: StableGraph<Node, usize>,
    pub output: NodeIndex,
    pub weights: BTreeMap<String, WeightDecl>,
    pub states: Vec<StateDecl>,
    /// One line per layer: `0: kda + swiglu`, for summaries.
    pub layer_kinds: Vec<(String, String)>,
}

impl Graph {
    /// Operands of `n`, in order.
    pub fn inputs(&self, n: NodeIndex) -> Vec<NodeIndex> {
        let mut e: Vec<(usize, NodeIndex)> = self
            .g
            .edges_directed(n, Direction::Incoming)
            .map(|e| (*e.weight(), e.source()))
            .collect();
        e.sort();
        e.into_iter().map(|(_, s)| s).collect()
    }

    /// Nodes in execution order (topological; ties broken by creation order).
    pub fn schedule(&self) -> Vec<NodeIndex> {
        let mut order: Vec<NodeIndex> = self.g.node_indices().collect();
        order.sort();
        // Builders add nodes after their operands, so index order is topological; a pass that
        // appends nodes out of order must keep this true (the verifier checks it).
        order
    }

    pub fn node(&self, n: NodeIndex) -> &Node {
        &self.g[n]
    }

    pub fn state(&self, id: StateId) -> &StateDecl {
        &self.states[id.0]
    }
}
