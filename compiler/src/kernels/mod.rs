//! Graph IR → kernel IR: one module per op family. Each builder returns a [`Launch`]: a kernel
//! (see `lamina_ir::kernel`) and what every parameter is bound to at run time.
//!
//! Conventions shared by all builders: an activation is `f32[R, cols]` (row = token in
//! prefill, sequence in decode); `slot: i64[R]` and `pos: i64[R]` give each row's cache slot
//! and absolute position; caches and states are pools `[slots, ...]` indexed by slot.
//!
//! - [`norm`]: RMSNorm (plain, zero-centred, gated), L2 norm;
//! - [`linear`]: projections and the LM head;
//! - [`elementwise`]: embedding, slices, activations, products, residual adds, decay gates;
//! - [`conv`]: the short causal conv (prefill: sequential over a sequence; decode: one step);
//! - [`recurrence`]: linear-attention recurrences (GDN, KDA, DeltaNet, lightning);
//! - [`attention`]: rope, GQA and MLA over their caches;
//! - [`moe`]: routing, routed SwiGLU experts;
//! - [`fill`]: the device fill of random benchmark weights (GPU plans).

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod fill;
pub mod linear;
pub mod moe;
pub mod norm;
pub mod recurrence;

use lamina_ir::graph::{Graph, NodeIndex, StateDecl, StateId, StateKind};
use lamina_ir::kernel::build::param;
use lamina_ir::kernel::{Access, Dim, Elem, Kernel, Param};

use crate::passes::fuse::Fusion;

/// Which compiled schedule a kernel belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// One sequence, many tokens (rows = tokens; recurrences run over the rows in order).
    Prefill,
    /// Many sequences, one token each (rows = sequences).
    Decode,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Prefill => "prefill",
            Phase::Decode => "decode",
        }
    }
}

/// An activation value: a graph node's output or a kernel-to-kernel temporary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    Node(NodeIndex),
    /// `(id, cols)`.
    Temp(usize, usize),
}

/// What a kernel parameter is bound to.
#[derive(Debug, Clone, PartialEq)]
pub enum Bind {
    /// An activation `[R, cols]` in the arena.
    Act(Value),
    Weight(String),
    /// Routed experts' `{prefix}.experts.{e}.{leaf}` stacked along a new first axis.
    Stacked {
        prefix: String,
        leaf: String,
        experts: usize,
    },
    State(StateId),
    /// A workspace `[shape]` of `elem` (see `lamina_ir::plan::WorkspaceEntry`): launches
    /// binding the same name share one buffer, so the name says the shape.
    Workspace {
        name: String,
        shape: Vec<usize>,
        elem: Elem,
    },
    /// A table computed at compile time (rope cos/sin, lightning slopes).
    Const(String, Vec<f32>),
    Tokens,
    Slot,
    Pos,
}

/// One kernel launch of a schedule.
#[derive(Debug, Clone)]
pub struct Launch {
    pub kernel: Kernel,
    /// Parallel to `kernel.params`.
    pub args: Vec<Bind>,
    /// Graph nodes computed.
    pub nodes: Vec<NodeIndex>,
}

/// What every builder needs to know.
pub struct Ctx<'g> {
    pub graph: &'g Graph,
    pub fusion: &'g Fusion,
    pub phase: Phase,
    /// Most rows of one launch of this phase (sizes per-row locals).
    pub rows: usize,
    /// Sequences (cache slots) the pools hold.
    pub slots: usize,
    /// Positions per slot in the KV/latent caches.
    pub context: usize,
    /// Pieces the cached positions of one decode attention are split into (1: none; 0: the
    /// attention builder chooses, see `attention::DECODE_PROGRAMS`).
    pub decode_splits: usize,
    /// Projections as MMA tiles (see `passes::Options::tensor_cores`).
    pub tensor_cores: bool,
    /// Chunked recurrences hand over bf16 (see `passes::Options::bf16_handoffs`).
    pub bf16_handoffs: bool,
    /// How the chunked recurrences cut their products into tensor-core tiles (warpgroup
    /// tiles with `passes::Options::warpgroup_tiles`).
    pub tiling: lamina_ir::kernel::build::Tiling,
    /// KV and latent caches hold bf16 (see `passes::Options::bf16_caches`).
    pub bf16_caches: bool,
    next_temp: std::cell::Cell<usize>,
    /// Per RMSNorm fused into prefill tensor-core projections: the temporary holding its rows'
    /// `1/rms`, computed once for all the projections it feeds.
    norm_inv: std::cell::RefCell<std::collections::HashMap<NodeIndex, Value>>,
}

impl<'g> Ctx<'g> {
    pub fn new(
        graph: &'g Graph,
        fusion: &'g Fusion,
        phase: Phase,
        rows: usize,
        slots: usize,
        context: usize,
    ) -> Self {
        Ctx {
            graph,
            fusion,
            phase,
            rows,
            slots,
            context,
            decode_splits: 1,
            tensor_cores: false,
            tiling: Default::default(),
            bf16_handoffs: false,
            bf16_caches: false,
            next_temp: std::cell::Cell::new(0),
            norm_inv: Default::default(),
        }
    }

    /// The temporary of norm `nm`'s `1/rms` per row, and whether it is new (its kernel still
    /// to be launched).
    pub fn norm_inv(&self, nm: NodeIndex) -> (Value, bool) {
        if let Some(&v) = self.norm_inv.borrow().get(&nm) {
            return (v, false);
        }
        let v = self.temp(1);
        self.norm_inv.borrow_mut().insert(nm, v);
        (v, true)
    }

    pub fn temp(&self, cols: usize) -> Value {
        let id = self.next_temp.get();
        self.next_temp.set(id + 1);
        Value::Temp(id, cols)
    }

    pub fn cols(&self, n: NodeIndex) -> usize {
        self.graph.node(n).ty.cols.unwrap_or(1)
    }

    /// A weight parameter with the declared shape.
    pub fn weight(&self, local: &str, name: &str) -> (Param, Bind) {
        let shape: Vec<Dim> = self.graph.weights[name]
            .shape
            .iter()
            .map(|&d| Dim::N(d))
            .collect();
        (
            param(local, Elem::F32, &shape, Access::Read),
            Bind::Weight(name.into()),
        )
    }

    /// Workspace `name` (`[shape]` of `elem`), bound to the kernel's parameter `local`.
    pub fn workspace(
        &self,
        local: &str,
        name: &str,
        shape: &[usize],
        elem: Elem,
        access: Access,
    ) -> (Param, Bind) {
        let dims: Vec<Dim> = shape.iter().map(|&d| Dim::N(d)).collect();
        (
            param(local, elem, &dims, access),
            Bind::Workspace {
                name: name.into(),
                shape: shape.to_vec(),
                elem,
            },
        )
    }

    /// The pool of state `id` (see [`pool_shape`]).
    pub fn state(&self, local: &str, id: StateId) -> (Param, Bind) {
        let decl = self.graph.state(id);
        let shape: Vec<Dim> = pool_shape(decl, self.slots, self.context)
            .into_iter()
            .map(Dim::N)
            .collect();
        (
            param(
                local,
                state_elem(decl, self.bf16_caches),
                &shape,
                Access::ReadWrite,
            ),
            Bind::State(id),
        )
    }
}

/// The element type of a state's pool: bf16 for the KV and latent caches when `bf16_caches`,
/// else f32 (recurrent and conv states always: the precision rule).
pub fn state_elem(s: &StateDecl, bf16_caches: bool) -> Elem {
    if bf16_caches && s.per_token() {
        Elem::Bf16
    } else {
        Elem::F32
    }
}

/// How a state is laid out in its pool: `[slots, context, per-token numel]` for caches,
/// `[slots, heads, dv, dk]` for recurrent states (declared `[heads, dk, dv]`: stored transposed
/// so a value column is contiguous), `[slots, per-sequence shape]` otherwise.
pub fn pool_shape(s: &StateDecl, slots: usize, context: usize) -> Vec<usize> {
    let mut shape = vec![slots];
    if s.per_token() {
        shape.extend([context, s.numel()]);
    } else if s.kind == StateKind::Recurrent {
        let [h, dk, dv] = s.shape[..] else {
            unreachable!("graph verifier: recurrent states are [heads, dk, dv]")
        };
        shape.extend([h, dv, dk]);
    } else {
        shape.extend(&s.shape);
    }
    shape
}

pub fn act(cols: usize) -> [Dim; 2] {
    [Dim::Rows, Dim::N(cols)]
}

pub fn rows_i64(name: &str) -> Param {
    param(name, Elem::I64, &[Dim::Rows], Access::Read)
}

/// Assembles a launch from `(param, bind)` pairs.
pub fn launch(
    name: String,
    grid: Vec<Dim>,
    params: Vec<(Param, Bind)>,
    body: Vec<lamina_ir::kernel::Stmt>,
    nodes: Vec<NodeIndex>,
    g: &Graph,
) -> Launch {
    let (params, args): (Vec<Param>, Vec<Bind>) = params.into_iter().unzip();
    Launch {
        kernel: Kernel {
            name,
            nodes: nodes.iter().map(|&n| g.node(n).name.clone()).collect(),
            grid,
            params,
            body,
        },
        args,
        nodes,
    }
}

/// Largest power of two ≤ `cap` dividing `n`.
pub fn tile(n: usize, cap: usize) -> usize {
    let mut t = 1;
    while t * 2 <= cap && n.is_multiple_of(t * 2) {
        t *= 2;
    }
    t
}
