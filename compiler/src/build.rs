//! From a model to an artifact directory: run the pass pipeline, resolve every launch argument
//! into the plan format, compile the kernels for the target, and write it all atomically
//! (a temporary directory renamed into place once complete).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lamina_ir::graph::StateKind;
use lamina_ir::model::{Model, ModelSource};
use lamina_ir::plan::{
    Arg, ConstEntry, Cost, KernelEntry, LaunchEntry, Limits, ModelInfo, Plan, PoolEntry, Schedule,
    WeightEntry, WeightSource, WorkspaceEntry, CONSTANTS_FILE, CUBIN_FILE, HOST_LIBRARY, PLAN_FILE,
    PTX_FILE, SCHEMA_VERSION,
};
use lamina_ir::stats::{kind_name, model_stats};
use lamina_ir::weights::{check_checkpoint, Checkpoint, SourceMap};
use lamina_ir::Error;
use lamina_targets::Target;
use sha2::{Digest, Sha256};

use crate::kernels::{Bind, Phase, Value};
use crate::passes::{pipeline, run_pipeline, Options, PassTimes, Program};

/// What a build did and how long each part took.
pub struct BuildReport {
    pub plan: Plan,
    pub pass_times: PassTimes,
    pub codegen: lamina_targets::host::HostTimings,
    /// GPU targets: the bytes of the cubin `ptxas` assembled and how long it took (`None`
    /// without `ptxas`: the artifact holds only PTX, which the driver compiles at load).
    pub cubin: Option<(usize, Duration)>,
    /// Host targets: the kernel cache the build used (`LAMINA_KERNEL_CACHE`), if any.
    pub kernel_cache: Option<PathBuf>,
    pub total: Duration,
}

/// Runs the pipeline on `model`'s graph.
pub fn compile_program<'g>(
    model: &'g Model,
    options: Options,
) -> Result<(Program<'g>, PassTimes), Error> {
    let mut p = Program::new(&model.graph, options);
    let times = run_pipeline(&mut p, &pipeline())?;
    Ok((p, times))
}

/// sha256 of the model description (the spec file, or a checkpoint's config.json).
pub fn hash_source(model: &Model) -> Result<String, Error> {
    let path = match &model.source {
        ModelSource::Spec(p) => p.clone(),
        ModelSource::HuggingFace { dir, .. } => dir.join("config.json"),
    };
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// The plan of `p` (everything but the kernel library), plus the constants' data.
pub fn make_plan(
    model: &Model,
    p: &Program,
    target: Target,
    seed: u64,
) -> Result<(Plan, Vec<f32>), Error> {
    let g = &model.graph;
    let owned = plan_kernels(p, target);
    let kernels: Vec<&lamina_ir::kernel::Kernel> = owned.iter().collect();
    let kindex: HashMap<&str, usize> = kernels
        .iter()
        .enumerate()
        .map(|(i, k)| (k.name.as_str(), i))
        .collect();
    let ckpt = match &model.source {
        ModelSource::HuggingFace { dir, map, .. } => {
            let ck = Checkpoint::open(dir)?;
            // Every tensor present with its shape, nothing unexpected: reported together now,
            // not when the runtime first maps the weights.
            check_checkpoint(g, &ck, map.as_ref(), dir)?;
            Some((ck, map.as_ref(), dir.clone()))
        }
        ModelSource::Spec(_) => None,
    };
    let mut weights: Vec<WeightEntry> = Vec::new();
    let mut windex: HashMap<String, usize> = HashMap::new();
    let mut constants: Vec<ConstEntry> = Vec::new();
    let mut cindex: HashMap<String, usize> = HashMap::new();
    let mut cdata: Vec<f32> = Vec::new();
    let mut workspaces: Vec<WorkspaceEntry> = Vec::new();
    let mut wsindex: HashMap<String, usize> = HashMap::new();
    let source_of = |name: &str| -> Result<WeightSource, Error> {
        let decl = &g.weights[name];
        match &ckpt {
            None => Ok(WeightSource::Random {
                tensor: name.to_string(),
                seed,
                kind: kind_name(decl.kind).to_string(),
            }),
            Some((ck, map, dir)) => {
                let has = |n: &str| ck.has(n);
                let src = (*map as &dyn SourceMap)
                    .source(name, &decl.shape, &has)
                    .ok_or_else(|| Error::Weights {
                        file: dir.display().to_string(),
                        msg: format!("no checkpoint tensor maps to {name}"),
                    })?;
                let loc = ck.locate(&src.tensor).ok_or_else(|| Error::Weights {
                    file: dir.display().to_string(),
                    msg: format!("tensor {} (for {name}) is missing", src.tensor),
                })?;
                Ok(WeightSource::File {
                    file: loc.file,
                    tensor: src.tensor.clone(),
                    offset: loc.offset,
                    bytes: loc.bytes,
                    dtype: loc.dtype,
                    shape: loc.shape,
                    rows: src.rows,
                })
            }
        }
    };
    let dtype = if p.options.weights_bf16 {
        "bf16"
    } else {
        "f32"
    };
    let mut schedules = Vec::new();
    for phase in [Phase::Prefill, Phase::Decode] {
        let mem = &p.memory[&phase];
        let mut launches = Vec::new();
        for l in &p.schedules[&phase] {
            let mut args = Vec::new();
            for b in &l.args {
                args.push(match b {
                    Bind::Act(v) => {
                        let (off, bytes) = mem.slots[v];
                        Arg::Arena {
                            offset_per_row: off,
                            bytes_per_row: bytes,
                        }
                    }
                    Bind::Weight(name) => Arg::Weight {
                        index: intern(&mut weights, &mut windex, name, || {
                            Ok(WeightEntry {
                                name: name.clone(),
                                shape: g.weights[name].shape.clone(),
                                source: source_of(name)?,
                                dtype: dtype.into(),
                            })
                        })?,
                    },
                    Bind::Stacked {
                        prefix,
                        leaf,
                        experts,
                    } => {
                        let key = format!("{prefix}.experts.*.{leaf}");
                        let make = || {
                            let parts = (0..*experts)
                                .map(|e| source_of(&format!("{prefix}.experts.{e}.{leaf}")))
                                .collect::<Result<Vec<_>, _>>()?;
                            let mut shape = vec![*experts];
                            shape.extend(&g.weights[&format!("{prefix}.experts.0.{leaf}")].shape);
                            Ok(WeightEntry {
                                name: key.clone(),
                                shape,
                                source: WeightSource::Stack { parts },
                                dtype: dtype.into(),
                            })
                        };
                        Arg::Weight {
                            index: intern(&mut weights, &mut windex, &key, make)?,
                        }
                    }
                    Bind::State(id) => Arg::Pool { index: id.0 },
                    Bind::Workspace { name, shape, elem } => {
                        let index = intern(&mut workspaces, &mut wsindex, name, || {
                            Ok(WorkspaceEntry {
                                name: name.clone(),
                                shape: shape.clone(),
                                bytes: shape.iter().product::<usize>() * elem.bytes(),
                                dtype: elem.name().into(),
                            })
                        })?;
                        let w = &workspaces[index];
                        if w.shape != *shape || w.dtype != elem.name() {
                            return Err(Error::Compile(format!(
                                "workspace {name} is bound as {:?} {} and as {shape:?} {}",
                                w.shape,
                                w.dtype,
                                elem.name()
                            )));
                        }
                        Arg::Workspace { index }
                    }
                    Bind::Const(name, data) => Arg::Const {
                        index: intern(&mut constants, &mut cindex, name, || {
                            // Each table starts on 16 bytes (a GPU tile may copy it by
                            // 16-byte `cp.async`).
                            cdata.resize(cdata.len().next_multiple_of(4), 0.0);
                            let e = ConstEntry {
                                name: name.clone(),
                                offset: cdata.len(),
                                len: data.len(),
                            };
                            cdata.extend(data);
                            Ok(e)
                        })?,
                    },
                    Bind::Tokens => Arg::Tokens,
                    Bind::Slot => Arg::Slot,
                    Bind::Pos => Arg::Pos,
                });
            }
            launches.push(LaunchEntry {
                kernel: kindex[l.kernel.name.as_str()],
                nodes: l.nodes.iter().map(|&n| g.node(n).name.clone()).collect(),
                args,
            });
        }
        let (off, bytes) = mem.slots[&Value::Node(g.output)];
        schedules.push(Schedule {
            arena_bytes_per_row: mem.bytes_per_row,
            rows: mem.rows,
            launches,
            logits: Arg::Arena {
                offset_per_row: off,
                bytes_per_row: bytes,
            },
            // Node values readable as f32 rows (`HostEngine::value`): those stored as bf16
            // (GEMM-only activations of tensor-core plans) are left out.
            values: mem
                .slots
                .iter()
                .filter_map(|(v, &(o, b))| match v {
                    Value::Node(n) if b == 4 * g.node(*n).ty.cols.unwrap_or(1) => Some((
                        g.node(*n).name.clone(),
                        Arg::Arena {
                            offset_per_row: o,
                            bytes_per_row: b,
                        },
                    )),
                    _ => None,
                })
                .collect(),
        });
    }
    let decode = schedules.pop().expect("decode");
    let prefill = schedules.pop().expect("prefill");
    let o = p.options;
    let pools: Vec<PoolEntry> = g
        .states
        .iter()
        .map(|s| {
            let shape = crate::kernels::pool_shape(s, o.max_batch, o.max_context);
            PoolEntry {
                name: s.name.clone(),
                kind: match s.kind {
                    StateKind::Conv => "conv",
                    StateKind::Recurrent => "recurrent",
                    StateKind::KvCache => "kv_cache",
                    StateKind::MlaLatent => "mla_latent",
                }
                .into(),
                layer: s.layer,
                bytes: shape.iter().product::<usize>()
                    * crate::kernels::state_elem(s, o.bf16_caches).bytes(),
                dtype: crate::kernels::state_elem(s, o.bf16_caches).name().into(),
                shape,
            }
        })
        .collect();
    let cost = decode_cost(g, &pools, o);
    // The header digest of every checkpoint file the weight map reads.
    let mut weight_headers = std::collections::BTreeMap::new();
    if let Some((_, _, dir)) = &ckpt {
        fn files<'a>(src: &'a WeightSource, out: &mut Vec<&'a str>) {
            match src {
                WeightSource::File { file, .. } => out.push(file),
                WeightSource::Stack { parts } => parts.iter().for_each(|p| files(p, out)),
                WeightSource::Random { .. } => {}
            }
        }
        let mut names = Vec::new();
        for w in &weights {
            files(&w.source, &mut names);
        }
        for f in names {
            if !weight_headers.contains_key(f) {
                let digest = lamina_ir::weights::header_digest(&dir.join(f))?;
                weight_headers.insert(f.to_string(), digest);
            }
        }
    }
    let plan = Plan {
        schema_version: SCHEMA_VERSION,
        target: target.to_string(),
        model: ModelInfo {
            name: g.name.clone(),
            source: model_path(model).display().to_string(),
            hash: hash_source(model)?,
            vocab_size: g.vocab_size,
            hidden_size: g.hidden_size,
            num_layers: g.num_layers,
            weight_headers,
        },
        limits: Limits {
            max_batch: o.max_batch,
            max_context: o.max_context,
            max_prefill_rows: o.max_prefill_rows,
        },
        kernels: kernels
            .iter()
            .map(|k| KernelEntry {
                name: k.name.clone(),
                symbol: match target {
                    Target::Host => lamina_targets::host::symbol(&k.name),
                    _ => k.name.clone(),
                },
                grid: k.grid.clone(),
                params: k.params.clone(),
                gpu: (target != Target::Host).then(|| lamina_targets::nvptx::gpu_launch(k, target)),
            })
            .collect(),
        prefill,
        decode,
        pools,
        weights,
        constants,
        workspaces,
        cost,
    };
    plan.check().map_err(Error::Compile)?;
    Ok((plan, cdata))
}

/// The kernels of `p`'s plan for `target`: every scheduled kernel, and for GPU targets the
/// device fill of random weights (launched by the runtime, not by a schedule).
pub fn plan_kernels(p: &Program, target: Target) -> Vec<lamina_ir::kernel::Kernel> {
    let mut ks: Vec<lamina_ir::kernel::Kernel> = p.kernels().into_iter().cloned().collect();
    if target != Target::Host {
        ks.push(crate::kernels::fill::fill_uniform_bf16());
    }
    ks
}

/// The planned traffic of one decode step at batch 1 (weights as the plan stores them).
fn decode_cost(g: &lamina_ir::graph::Graph, pools: &[PoolEntry], o: Options) -> Cost {
    let st = model_stats(g);
    let kind = |k: &str| st.params_by_kind.get(k).copied().unwrap_or(0);
    // A tied LM head reads the whole embedding; otherwise decode reads one embedding row.
    let params = if kind("lm_head") == 0 {
        st.active_params
    } else {
        st.active_params - kind("embedding") + g.hidden_size as u64
    };
    let (mut state, mut cache) = (0u64, 0u64);
    for p in pools {
        match p.kind.as_str() {
            "kv_cache" | "mla_latent" => cache += p.bytes as u64,
            _ => state += p.bytes as u64,
        }
    }
    Cost {
        decode_weight_bytes: params * if o.weights_bf16 { 2 } else { 4 },
        state_bytes_per_sequence: state / o.max_batch as u64,
        cache_bytes_per_position: cache / (o.max_batch * o.max_context) as u64,
    }
}

/// Index of `key` in `table`, appending `make()` the first time it is seen.
fn intern<T>(
    table: &mut Vec<T>,
    index: &mut HashMap<String, usize>,
    key: &str,
    make: impl FnOnce() -> Result<T, Error>,
) -> Result<usize, Error> {
    if let Some(&i) = index.get(key) {
        return Ok(i);
    }
    table.push(make()?);
    index.insert(key.to_string(), table.len() - 1);
    Ok(table.len() - 1)
}

fn model_path(model: &Model) -> PathBuf {
    let p = match &model.source {
        ModelSource::Spec(p) => p.clone(),
        ModelSource::HuggingFace { dir, .. } => dir.clone(),
    };
    std::fs::canonicalize(&p).unwrap_or(p)
}

/// Compiles `model` for `target` into the artifact directory `out`.
pub fn build(
    model: &Model,
    out: &Path,
    target: Target,
    options: Options,
    seed: u64,
) -> Result<BuildReport, Error> {
    build_with_progress(model, out, target, options, seed, &|_, _| {})
}

/// [`build`], reporting `progress(kernels compiled, kernels)` during code generation.
pub fn build_with_progress(
    model: &Model,
    out: &Path,
    target: Target,
    options: Options,
    seed: u64,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<BuildReport, Error> {
    let start = Instant::now();
    let (program, pass_times) = compile_program(model, options)?;
    let (plan, cdata) = make_plan(model, &program, target, seed)?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".lamina-build-")
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;
    let kernels = plan_kernels(&program, target);
    let write = |name: &str, bytes: &[u8]| -> Result<(), Error> {
        let path = tmp.path().join(name);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))
    };
    let mut cubin = None;
    let mut kernel_cache = None;
    let codegen = match target {
        Target::Host => {
            let library = tmp.path().join(HOST_LIBRARY);
            let flavor = match (options.host_lanes, options.strict_fp) {
                (0 | 1, false) => lamina_targets::mlir::Flavor::Host,
                (0 | 1, true) => lamina_targets::mlir::Flavor::HostStrict,
                (n, false) => lamina_targets::mlir::Flavor::HostLanes(n),
                (n, true) => {
                    return Err(Error::Compile(format!(
                        "strict f32 arithmetic needs host_lanes 1, not {n}"
                    )))
                }
            };
            let cache = lamina_targets::cache::KernelCache::from_env();
            let t = lamina_targets::host::build_library_with_progress(
                &kernels,
                &library,
                flavor,
                cache.as_ref(),
                progress,
            )
            .map_err(|e| Error::Compile(e.to_string()))?;
            for e in &t.cache_errors {
                tracing::warn!("{e}");
            }
            kernel_cache = cache.map(|c| c.dir().to_path_buf());
            t
        }
        Target::Sm80 | Target::Sm90a => {
            progress(0, kernels.len());
            let (ptx, t) = lamina_targets::nvptx::compile_ptx(&kernels, target)
                .map_err(|e| Error::Compile(e.to_string()))?;
            write(PTX_FILE, ptx.as_bytes())?;
            // Ahead of time down to the machine code: the cubin spares every process that
            // loads the artifact the driver's PTX JIT (seconds to minutes for a large model).
            let start = Instant::now();
            cubin = match lamina_targets::nvptx::assemble(&ptx, target) {
                Ok((bytes, _)) => {
                    write(CUBIN_FILE, &bytes)?;
                    Some((bytes.len(), start.elapsed()))
                }
                Err(lamina_targets::TargetError::Unavailable(_)) => {
                    tracing::warn!(
                        "ptxas not found (scripts/bootstrap installs it; or set LAMINA_PTXAS): \
                         the artifact holds only {PTX_FILE}, which the CUDA driver compiles \
                         each time a process loads it"
                    );
                    None
                }
                Err(e) => return Err(Error::Compile(e.to_string())),
            };
            progress(kernels.len(), kernels.len());
            lamina_targets::host::HostTimings {
                lower: t.lower,
                passes: t.passes,
                ..Default::default()
            }
        }
    };
    let bytes: Vec<u8> = cdata.iter().flat_map(|x| x.to_le_bytes()).collect();
    write(CONSTANTS_FILE, &bytes)?;
    let json = serde_json::to_string_pretty(&plan).map_err(|e| Error::Compile(e.to_string()))?;
    write(PLAN_FILE, json.as_bytes())?;
    // Replace any previous artifact only now that this one is complete.
    if out.exists() {
        if !out.join(PLAN_FILE).exists() {
            return Err(Error::Io {
                path: out.display().to_string(),
                msg: "exists and is not a Lamina artifact; refusing to replace it".into(),
            });
        }
        std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, out).map_err(|e| Error::io(out, e))?;
    Ok(BuildReport {
        plan,
        pass_times,
        codegen,
        cubin,
        kernel_cache,
        total: start.elapsed(),
    })
}
