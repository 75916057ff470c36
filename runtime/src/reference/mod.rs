//! The reference executor: plain Rust, f32 or f64, running the graph IR node by node with the
//! recurrent form of every linear layer, exact routing, and real caches (KV, MLA latent,
//! recurrent and conv state). No fusion, no cleverness: it is Lamina's golden model.

pub mod attention;
pub mod chunked;
pub mod moe;
pub mod recurrence;
pub mod tensor;

use std::collections::{BTreeMap, HashMap};

use lamina_ir::graph::{lightning_slopes, Decay, GateForm, Graph, Op, Unary};
use lamina_ir::weights::WeightStore;
use lamina_ir::Error;

use tensor::{linear, sigmoid, silu, softplus};
pub use tensor::{Mat, Real};

/// The graph's weights converted to the compute type.
pub struct Weights<F> {
    map: BTreeMap<String, Vec<F>>,
}

impl<F: Real> Weights<F> {
    pub fn new(store: &WeightStore) -> Self {
        Weights {
            map: store
                .tensors
                .iter()
                .map(|(k, t)| (k.clone(), t.data.iter().map(|&x| F::of32(x)).collect()))
                .collect(),
        }
    }

    pub fn get(&self, name: &str) -> &[F] {
        self.map.get(name).unwrap_or_else(|| {
            panic!("weight {name} missing (the loader checks every declared weight)")
        })
    }
}

/// One sequence's caches and position.
pub struct Session<F> {
    pub pos: usize,
    states: Vec<Vec<F>>,
    /// The running forward is a decode step ([`Reference::decode_step`]), not a prefill.
    decoding: bool,
}

/// Values of named nodes captured during a forward (e.g. `layers.3.ffn_residual`).
pub type Taps<F> = HashMap<String, Mat<F>>;

pub struct Reference<'g, F> {
    graph: &'g Graph,
    w: Weights<F>,
    /// Projections read their input rounded to bf16 (see [`Reference::with_bf16_projection_inputs`]).
    bf16_projection_inputs: bool,
    /// The KV and latent caches hold bf16 (see [`Reference::with_bf16_caches`]).
    bf16_caches: bool,
    /// Prefill attention in FlashAttention's bf16 arithmetic (see
    /// [`Reference::with_bf16_flash_prefill`]).
    flash_prefill: bool,
}

/// Greedy generation results (the `--logits-out` contract).
pub struct Generation<F> {
    /// `[T, vocab]`: logits at every prompt position.
    pub prefill_logits: Mat<F>,
    /// `[N, vocab]`: row j is what token j was chosen from.
    pub decode_logits: Mat<F>,
    pub tokens: Vec<i64>,
}

impl<'g, F: Real> Reference<'g, F> {
    pub fn new(graph: &'g Graph, store: &WeightStore) -> Self {
        Reference {
            graph,
            w: Weights::new(store),
            bf16_projection_inputs: false,
            bf16_caches: false,
            flash_prefill: false,
        }
    }

    /// Prefill attention (GQA and MLA, not decode steps) computes as tensor-core plans'
    /// flash attention does ([`attention::FLASH_KEY_TILE`]-key tiles from key 0, an online
    /// softmax per row, bf16 queries, keys, values and probabilities in the products, f32-style
    /// accumulation, unrounded softmax sums), and MLA's decompressed keys and values are
    /// rounded to bf16 as the expand kernel stores them: so that tensor-core plans are checked
    /// at a tight tolerance rather than at the distance bf16 attention noise drifts a model.
    pub fn with_bf16_flash_prefill(mut self) -> Self {
        self.flash_prefill = true;
        self
    }

    /// The KV and latent caches hold bf16: keys, values, latents and rope keys are rounded to
    /// bf16 when cached, as in plans built with bf16 caches, and attention reads them so (the
    /// current rows' too: a compiled prefill writes the cache, then attends over it).
    pub fn with_bf16_caches(mut self) -> Self {
        self.bf16_caches = true;
        self
    }

    /// `x` as a cache holds it.
    fn cached(&self, x: &[F]) -> Vec<F> {
        if self.bf16_caches {
            x.iter().map(|v| v.bf16_rounded()).collect()
        } else {
            x.to_vec()
        }
    }

    /// Every projection (`linear`, and the routed experts' GEMMs) reads its input rounded to
    /// bf16, then computes exactly: the arithmetic of tensor-core plans (bf16 operands, products
    /// exact in f32), so that they can be checked at a tight tolerance rather than at the
    /// distance bf16 noise drifts a model.
    pub fn with_bf16_projection_inputs(mut self) -> Self {
        self.bf16_projection_inputs = true;
        self
    }

    pub fn new_session(&self) -> Session<F> {
        Session {
            pos: 0,
            states: self
                .graph
                .states
                .iter()
                .map(|s| {
                    if s.per_token() {
                        Vec::new()
                    } else {
                        vec![F::zero(); s.numel()]
                    }
                })
                .collect(),
            decoding: false,
        }
    }

    /// One decode step of `token` at the session's next position (as a compiled plan's decode
    /// schedule computes it: no flash prefill arithmetic); returns logits `[1, vocab]`.
    pub fn decode_step(&self, sess: &mut Session<F>, token: i64) -> Result<Mat<F>, Error> {
        sess.decoding = true;
        let out = self.forward(sess, &[token], &[]);
        sess.decoding = false;
        Ok(out?.0)
    }

    fn check_tokens(&self, tokens: &[i64]) -> Result<(), Error> {
        if tokens.is_empty() {
            return Err(Error::input("tokens", "the prompt is empty"));
        }
        let v = self.graph.vocab_size as i64;
        if let Some((i, t)) = tokens.iter().enumerate().find(|(_, &t)| t < 0 || t >= v) {
            return Err(Error::input(
                "tokens",
                format!("token {i} has id {t}, outside the vocabulary 0..{v}"),
            ));
        }
        Ok(())
    }

    /// Runs `tokens` at the session's next positions; returns logits `[T, vocab]` and the
    /// values of the nodes named in `taps`.
    pub fn forward(
        &self,
        sess: &mut Session<F>,
        tokens: &[i64],
        taps: &[&str],
    ) -> Result<(Mat<F>, Taps<F>), Error> {
        self.check_tokens(tokens)?;
        let g = self.graph;
        let t_len = tokens.len();
        let mut vals: HashMap<_, Mat<F>> = HashMap::new();
        let mut captured = Taps::new();
        for n in g.schedule() {
            let node = g.node(n);
            let ins: Vec<&Mat<F>> = g.inputs(n).iter().map(|i| &vals[i]).collect();
            let cols = node.ty.cols.unwrap_or(1);
            let out = self.eval(&node.op, &ins, tokens, sess, cols);
            debug_assert_eq!(out.data.len(), t_len * cols, "{}", node.name);
            if out.data.iter().any(|x| !x.is_finite()) {
                return Err(Error::input(
                    "forward",
                    format!("node {} produced NaN or infinite values", node.name),
                ));
            }
            if taps.contains(&node.name.as_str()) {
                captured.insert(node.name.clone(), out.clone());
            }
            vals.insert(n, out);
        }
        sess.pos += t_len;
        Ok((vals.remove(&g.output).expect("output evaluated"), captured))
    }

    /// A projection or MoE node (stateless, one input) evaluated on the input `x` of `rows`
    /// rows: for op-by-op checks of compiled plans against their own inputs. `None` for other
    /// ops.
    pub fn eval_projection(&self, n: lamina_ir::graph::NodeIndex, x: &Mat<F>) -> Option<Mat<F>> {
        let node = self.graph.node(n);
        if !matches!(node.op, Op::Linear { .. } | Op::Moe { .. }) {
            return None;
        }
        let tokens = vec![0; x.rows];
        let cols = node.ty.cols.unwrap_or(1);
        Some(self.eval(&node.op, &[x], &tokens, &mut self.new_session(), cols))
    }

    /// Node `n` of a prefill of `tokens` from an empty session, evaluated on given inputs: each
    /// input is `known(input)` when that gives one (a compiled plan's own value), else is
    /// evaluated the same way from its inputs (a node fused into `n`'s kernel, which the plan
    /// never stores). For op-by-op checks of stateful and multi-input ops (recurrences,
    /// attention): only the arithmetic of `n` and of what it absorbs differs from the plan's.
    pub fn eval_from(
        &self,
        n: lamina_ir::graph::NodeIndex,
        tokens: &[i64],
        known: &dyn Fn(lamina_ir::graph::NodeIndex) -> Option<Mat<F>>,
    ) -> Mat<F> {
        fn go<F: Real>(
            r: &Reference<'_, F>,
            n: lamina_ir::graph::NodeIndex,
            tokens: &[i64],
            known: &dyn Fn(lamina_ir::graph::NodeIndex) -> Option<Mat<F>>,
            sess: &mut Session<F>,
            memo: &mut HashMap<lamina_ir::graph::NodeIndex, Mat<F>>,
        ) -> Mat<F> {
            let ins: Vec<Mat<F>> = r
                .graph
                .inputs(n)
                .iter()
                .map(|&i| {
                    if let Some(v) = memo.get(&i) {
                        return v.clone();
                    }
                    let v = known(i).unwrap_or_else(|| go(r, i, tokens, known, sess, memo));
                    memo.insert(i, v.clone());
                    v
                })
                .collect();
            let node = r.graph.node(n);
            let refs: Vec<&Mat<F>> = ins.iter().collect();
            r.eval(&node.op, &refs, tokens, sess, node.ty.cols.unwrap_or(1))
        }
        go(
            self,
            n,
            tokens,
            known,
            &mut self.new_session(),
            &mut HashMap::new(),
        )
    }

    fn eval(
        &self,
        op: &Op,
        ins: &[&Mat<F>],
        tokens: &[i64],
        sess: &mut Session<F>,
        cols: usize,
    ) -> Mat<F> {
        let t_len = tokens.len();
        let w = &self.w;
        let mat = |data: Vec<F>| Mat {
            rows: t_len,
            cols,
            data,
        };
        match op {
            Op::Tokens => mat(tokens.iter().map(|&t| F::of(t as f64)).collect()),
            Op::Embed { weight, dim } => {
                let e = w.get(weight);
                mat(tokens
                    .iter()
                    .flat_map(|&t| e[t as usize * dim..][..*dim].to_vec())
                    .collect())
            }
            Op::RmsNorm {
                weight,
                eps,
                zero_centred,
                group,
            } => {
                let wt = w.get(weight);
                let mut y = ins[0].clone();
                for chunk in y.data.chunks_mut(*group) {
                    let ms = chunk.iter().map(|&x| x * x).sum::<F>() / F::of(*group as f64);
                    let inv = F::one() / (ms + F::of(*eps)).sqrt();
                    for (x, &wi) in chunk.iter_mut().zip(wt) {
                        let scale = if *zero_centred { F::one() + wi } else { wi };
                        *x = *x * inv * scale;
                    }
                }
                y
            }
            Op::GatedRmsNorm {
                weight,
                eps,
                group,
                gate,
            } => {
                let wt = w.get(weight);
                let mut y = ins[0].clone();
                for (chunk, gc) in y.data.chunks_mut(*group).zip(ins[1].data.chunks(*group)) {
                    let ms = chunk.iter().map(|&x| x * x).sum::<F>() / F::of(*group as f64);
                    let inv = F::one() / (ms + F::of(*eps)).sqrt();
                    for ((x, &wi), &gv) in chunk.iter_mut().zip(wt).zip(gc) {
                        let act = match gate {
                            Unary::Silu => silu(gv),
                            Unary::Sigmoid => sigmoid(gv),
                        };
                        *x = *x * inv * wi * act;
                    }
                }
                y
            }
            Op::L2Norm { group, eps } => {
                let mut y = ins[0].clone();
                for chunk in y.data.chunks_mut(*group) {
                    let inv =
                        F::one() / (chunk.iter().map(|&x| x * x).sum::<F>() + F::of(*eps)).sqrt();
                    for x in chunk.iter_mut() {
                        *x = *x * inv;
                    }
                }
                y
            }
            Op::Linear {
                weight, out_dim, ..
            } if self.bf16_projection_inputs => {
                let mut x = ins[0].clone();
                for v in x.data.iter_mut() {
                    *v = v.bf16_rounded();
                }
                linear(&x, w.get(weight), *out_dim)
            }
            Op::Linear {
                weight, out_dim, ..
            } => linear(ins[0], w.get(weight), *out_dim),
            Op::Slice { group, start, len } => mat(ins[0]
                .data
                .chunks(*group)
                .flat_map(|c| c[*start..start + len].to_vec())
                .collect()),
            Op::ShortConv {
                weight,
                channels,
                kernel,
                state,
            } => {
                let s = &mut sess.states[state.0];
                mat(recurrence::short_conv(
                    &ins[0].data,
                    t_len,
                    *channels,
                    *kernel,
                    w.get(weight),
                    s,
                ))
            }
            Op::Unary(Unary::Silu) => ins[0].map(silu),
            Op::Unary(Unary::Sigmoid) => ins[0].map(sigmoid),
            Op::Mul => {
                let (a, b) = (ins[0], ins[1]);
                let bcast = b.cols == 1 && a.cols != 1;
                mat(a
                    .data
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| x * if bcast { b.data[i / a.cols] } else { b.data[i] })
                    .collect())
            }
            Op::Add { alpha, beta } => {
                let (al, be) = (F::of(*alpha), F::of(*beta));
                mat(ins[0]
                    .data
                    .iter()
                    .zip(&ins[1].data)
                    .map(|(&a, &b)| al * a + be * b)
                    .collect())
            }
            Op::SwiGlu => mat(ins[0]
                .data
                .iter()
                .zip(&ins[1].data)
                .map(|(&a, &b)| silu(a) * b)
                .collect()),
            Op::DecayGate {
                a_log,
                dt_bias,
                width,
                form,
                ..
            } => {
                let (al, db) = (w.get(a_log), w.get(dt_bias));
                let hw = ins[0].cols;
                mat(ins[0]
                    .data
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| {
                        let c = i % hw;
                        let a = al[c / width];
                        let x = x + db[c];
                        match form {
                            GateForm::Softplus => -a.exp() * softplus(x),
                            GateForm::Bounded { lower_bound } => {
                                F::of(*lower_bound) * sigmoid(a.exp() * x)
                            }
                        }
                    })
                    .collect())
            }
            Op::Recurrence { rec, state } => {
                let fixed: Vec<F> = match rec.decay {
                    Decay::Fixed { layer, num_layers } => {
                        lightning_slopes(rec.heads, layer, num_layers)
                            .iter()
                            .map(|&s| F::of(-s))
                            .collect()
                    }
                    _ => Vec::new(),
                };
                let has_g = matches!(rec.decay, Decay::Scalar | Decay::PerChannel);
                let g = has_g.then(|| ins[3].data.as_slice());
                let beta = (rec.update == lamina_ir::graph::Update::Delta)
                    .then(|| ins[if has_g { 4 } else { 3 }].data.as_slice());
                let gate = recurrence::gate_for(rec, g, &fixed);
                let s = &mut sess.states[state.0];
                mat(recurrence::recurrent(
                    rec,
                    t_len,
                    &ins[0].data,
                    &ins[1].data,
                    &ins[2].data,
                    gate,
                    beta,
                    s,
                ))
            }
            Op::Rope(r) => {
                let mut y = ins[0].clone();
                attention::rope(r, &mut y.data, t_len, sess.pos);
                y
            }
            Op::Attention {
                heads,
                kv_heads,
                head_dim,
                v_dim,
                scale,
                cache,
            } => {
                let (k, v) = (self.cached(&ins[1].data), self.cached(&ins[2].data));
                let flash = self.flash_prefill && !sess.decoding;
                let c = &mut sess.states[cache.0];
                mat(attention::gqa(
                    &ins[0].data,
                    &k,
                    &v,
                    t_len,
                    sess.pos,
                    *heads,
                    *kv_heads,
                    *head_dim,
                    *v_dim,
                    *scale,
                    c,
                    flash,
                ))
            }
            Op::MlaAttention {
                heads,
                kv_lora_rank,
                nope,
                rope,
                v_dim,
                scale,
                kv_b,
                cache,
            } => {
                let (latent, k_rope) = (self.cached(&ins[1].data), self.cached(&ins[2].data));
                let flash = self.flash_prefill && !sess.decoding;
                let c = &mut sess.states[cache.0];
                mat(attention::mla(
                    &ins[0].data,
                    &latent,
                    &k_rope,
                    t_len,
                    sess.pos,
                    *heads,
                    *kv_lora_rank,
                    *nope,
                    *rope,
                    *v_dim,
                    *scale,
                    w.get(kv_b),
                    c,
                    flash,
                ))
            }
            Op::Moe {
                moe,
                prefix,
                hidden,
            } => mat(moe::moe(
                moe,
                prefix,
                &ins[0].data,
                t_len,
                *hidden,
                w,
                self.bf16_projection_inputs,
            )),
        }
    }

    /// Greedy decoding: prefill the prompt, then feed each chosen token through the caches.
    pub fn generate(&self, prompt: &[i64], max_new: usize) -> Result<Generation<F>, Error> {
        let mut sess = self.new_session();
        let (prefill, _) = self.forward(&mut sess, prompt, &[])?;
        let vocab = self.graph.vocab_size;
        let mut decode = Mat::zeros(0, vocab);
        let mut tokens = Vec::new();
        let mut last = prefill.row(prefill.rows - 1).to_vec();
        for step in 0..max_new {
            let next = argmax(&last) as i64;
            decode.data.extend_from_slice(&last);
            decode.rows += 1;
            tokens.push(next);
            if step + 1 < max_new {
                last = self.decode_step(&mut sess, next)?.data;
            }
        }
        Ok(Generation {
            prefill_logits: prefill,
            decode_logits: decode,
            tokens,
        })
    }
}

/// Index of the largest value (first on ties). NaN never wins.
pub fn argmax<F: Real>(x: &[F]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] || x[best].is_nan() {
            best = i;
        }
    }
    best
}
