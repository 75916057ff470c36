//! Weights for a graph: loaded from memory-mapped safetensors (f32, bf16, f16, f64), matched by
//! name and shape against the graph's declarations, or drawn deterministically from a seed.
//!
//! Checkpoints name and lay out tensors their own way; an importer supplies a [`SourceMap`]
//! that says, for each canonical weight, which checkpoint tensor holds it and how to cut it out
//! (e.g. Qwen3-Next's fused, head-grouped `in_proj_qkvz`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::graph::{Graph, WeightDecl, WeightKind};

/// A dense host tensor in f32 (every supported checkpoint dtype converts to f32 exactly).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// All weights of a graph under their canonical names.
#[derive(Debug, Clone, Default)]
pub struct WeightStore {
    pub tensors: BTreeMap<String, HostTensor>,
}

impl WeightStore {
    pub fn get(&self, name: &str) -> &HostTensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("weight {name} was not loaded (the loader checks this)"))
    }

    /// Every weight rounded to bf16 (nearest even) and back: what a plan built with bf16
    /// weights computes with, for the reference executor to be compared against it.
    pub fn rounded_to_bf16(&self) -> WeightStore {
        WeightStore {
            tensors: self
                .tensors
                .iter()
                .map(|(k, t)| {
                    let data = t
                        .data
                        .iter()
                        .map(|&x| half::bf16::from_f32(x).to_f32())
                        .collect();
                    (
                        k.clone(),
                        HostTensor {
                            shape: t.shape.clone(),
                            data,
                        },
                    )
                })
                .collect(),
        }
    }
}

/// Where a canonical weight comes from in a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub tensor: String,
    /// The shape the checkpoint tensor must have.
    pub shape: Vec<usize>,
    /// Row ranges `(start, len)` of the source, viewed as `[numel / last_dim, last_dim]`, to
    /// concatenate;
    /// empty means the whole tensor (a reshape when the shapes differ).
    pub rows: Vec<(usize, usize)>,
}

impl Source {
    pub fn whole(tensor: impl Into<String>, shape: &[usize]) -> Self {
        Source {
            tensor: tensor.into(),
            shape: shape.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn rows(tensor: impl Into<String>, shape: &[usize], rows: Vec<(usize, usize)>) -> Self {
        Source {
            tensor: tensor.into(),
            shape: shape.to_vec(),
            rows,
        }
    }
}

/// Maps a canonical weight name to its source; `has` tells which checkpoint tensors exist, so a
/// map can accept several layouts.
pub trait SourceMap {
    fn source(
        &self,
        canonical: &str,
        shape: &[usize],
        has: &dyn Fn(&str) -> bool,
    ) -> Option<Source>;
    /// Checkpoint tensors that are not weights of the graph and may be ignored (persistent
    /// buffers, multi-token-prediction layers).
    fn ignorable(&self, _tensor: &str) -> bool {
        false
    }
}

/// A tensor's place in a checkpoint.
struct Entry {
    file: usize,
    shape: Vec<usize>,
    dtype: Dtype,
    /// Byte range of the data within the file's map.
    bytes: std::ops::Range<usize>,
}

/// The safetensors files of a checkpoint directory, memory-mapped.
pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name → where it lies; the headers are parsed once, at open.
    index: BTreeMap<String, Entry>,
}

impl Checkpoint {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::weights(&index_path, format!("invalid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    Error::weights(
                        &index_path,
                        "field `weight_map` is missing or not an object",
                    )
                })?;
            let mut files = BTreeSet::new();
            for (name, f) in map {
                let f = f.as_str().ok_or_else(|| {
                    Error::weights(&index_path, format!("weight_map.{name} is not a file name"))
                })?;
                if f.contains('/') || f.contains("..") {
                    return Err(Error::weights(
                        &index_path,
                        format!("weight_map.{name}: bad file name {f}"),
                    ));
                }
                files.insert(dir.join(f));
            }
            files.into_iter().collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(Error::weights(
                dir,
                "no model.safetensors or model.safetensors.index.json in the model directory",
            ));
        };
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for p in paths {
            let f = File::open(&p).map_err(|e| Error::io(&p, e))?;
            // SAFETY: the map is read-only; a checkpoint modified while we read it is outside
            // what any loader can defend against (same contract as safetensors' own loaders).
            let mmap = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(&p, e))?;
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| Error::weights(&p, format!("not a valid safetensors file: {e:?}")))?;
            for (name, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
                let entry = Entry {
                    file: files.len(),
                    shape: view.shape().to_vec(),
                    dtype: view.dtype(),
                    bytes: start..start + view.data().len(),
                };
                if let Some(prev) = index.insert(name.to_string(), entry) {
                    let prev: &(PathBuf, Mmap) = &files[prev.file];
                    return Err(Error::weights(
                        &p,
                        format!("tensor {name} also appears in {}", prev.0.display()),
                    ));
                }
            }
            files.push((p, mmap));
        }
        Ok(Checkpoint { files, index })
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn file_of(&self, name: &str) -> &Path {
        &self.files[self.index[name].file].0
    }

    /// Shape of a checkpoint tensor.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.index.get(name).map(|e| e.shape.clone())
    }

    /// Reads a tensor, converting to f32.
    pub fn read_f32(&self, name: &str) -> Result<HostTensor> {
        let e = self
            .index
            .get(name)
            .ok_or_else(|| Error::input("checkpoint", format!("no tensor {name}")))?;
        let (path, mmap) = &self.files[e.file];
        let b = &mmap[e.bytes.clone()];
        let data = decode_f32(&format!("{:?}", e.dtype), b)
            .map_err(|m| Error::weights(path, format!("tensor {name}: {m}")))?;
        let data = if data.iter().all(|v| v.is_finite()) {
            data
        } else {
            return Err(Error::weights(
                path,
                format!("tensor {name} holds NaN or infinite values"),
            ));
        };
        Ok(HostTensor {
            shape: e.shape.clone(),
            data,
        })
    }
}

/// Where a checkpoint tensor lies: file name (relative to the checkpoint directory), byte
/// offset and length, dtype name and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Located {
    pub file: String,
    pub offset: usize,
    pub bytes: usize,
    pub dtype: String,
    pub shape: Vec<usize>,
}

impl Checkpoint {
    pub fn locate(&self, name: &str) -> Option<Located> {
        let e = self.index.get(name)?;
        let (path, _) = &self.files[e.file];
        Some(Located {
            file: path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            offset: e.bytes.start,
            bytes: e.bytes.len(),
            dtype: format!("{:?}", e.dtype),
            shape: e.shape.clone(),
        })
    }
}

/// Little-endian tensor bytes of safetensors dtype `dtype` (`F32`, `BF16`, `F16`, `F64`) as f32.
pub fn decode_f32(dtype: &str, b: &[u8]) -> std::result::Result<Vec<f32>, String> {
    Ok(match dtype {
        "F32" => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        "BF16" => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        "F16" => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        "F64" => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => {
            return Err(format!(
                "dtype {other} is not supported (F32, BF16, F16, F64)"
            ))
        }
    })
}

/// Concatenates row ranges `(start, len)` of `data` viewed as `[rows, last]`.
pub fn select_rows(data: &[f32], last: usize, rows: &[(usize, usize)]) -> Vec<f32> {
    rows.iter()
        .flat_map(|&(s, n)| data[s * last..(s + n) * last].iter().copied())
        .collect()
}

/// Where every weight of `graph` comes from in `ckpt` through `map`, without reading any data.
/// Missing, mis-shaped and unexpected tensors are collected and reported together in one
/// error. The compiler calls it at build time, [`load_weights`] before reading.
pub fn check_checkpoint(
    graph: &Graph,
    ckpt: &Checkpoint,
    map: &dyn SourceMap,
    dir: &Path,
) -> Result<Vec<(String, Vec<usize>, Source)>> {
    let has = |n: &str| ckpt.has(n);
    let mut missing = Vec::new();
    let mut misshaped = Vec::new();
    let mut used = BTreeSet::new();
    let mut plan = Vec::new();
    for (name, decl) in &graph.weights {
        let Some(src) = map.source(name, &decl.shape, &has) else {
            missing.push(format!("{name} (no checkpoint tensor maps to it)"));
            continue;
        };
        if !ckpt.has(&src.tensor) {
            missing.push(src.tensor.clone());
            continue;
        }
        used.insert(src.tensor.clone());
        let actual = ckpt.shape(&src.tensor).unwrap_or_default();
        if actual != src.shape {
            misshaped.push(format!(
                "{} is {:?}, expected {:?}",
                src.tensor, actual, src.shape
            ));
            continue;
        }
        plan.push((name.clone(), decl.shape.clone(), src));
    }
    let unexpected: Vec<String> = ckpt
        .names()
        .filter(|n| !used.contains(*n) && !map.ignorable(n))
        .cloned()
        .collect();
    missing.dedup();
    if !(missing.is_empty() && misshaped.is_empty() && unexpected.is_empty()) {
        let mut parts = Vec::new();
        let list = |v: &[String]| {
            let shown: Vec<&str> = v.iter().take(12).map(|s| s.as_str()).collect();
            let more = if v.len() > 12 {
                format!(" and {} more", v.len() - 12)
            } else {
                String::new()
            };
            format!("{}{more}", shown.join(", "))
        };
        if !missing.is_empty() {
            parts.push(format!("{} missing: {}", missing.len(), list(&missing)));
        }
        if !misshaped.is_empty() {
            parts.push(format!(
                "{} mis-shaped: {}",
                misshaped.len(),
                list(&misshaped)
            ));
        }
        if !unexpected.is_empty() {
            parts.push(format!(
                "{} unexpected: {}",
                unexpected.len(),
                list(&unexpected)
            ));
        }
        return Err(Error::weights(
            dir,
            format!("weights do not match the model: {}", parts.join("; ")),
        ));
    }
    Ok(plan)
}

/// Loads every weight of `graph` from `ckpt` through `map` (checked by [`check_checkpoint`]).
pub fn load_weights(
    graph: &Graph,
    ckpt: &Checkpoint,
    map: &dyn SourceMap,
    dir: &Path,
) -> Result<WeightStore> {
    let plan = check_checkpoint(graph, ckpt, map, dir)?;
    let mut store = WeightStore::default();
    let mut cache: BTreeMap<String, HostTensor> = BTreeMap::new();
    for (name, shape, src) in plan {
        if !cache.contains_key(&src.tensor) {
            let t = ckpt.read_f32(&src.tensor)?;
            cache.insert(src.tensor.clone(), t);
        }
        let t = &cache[&src.tensor];
        let data = if src.rows.is_empty() {
            t.data.clone()
        } else {
            let rest = t.shape.last().copied().unwrap_or(1).max(1);
            let rows = t.data.len() / rest;
            let mut d = Vec::new();
            for &(start, len) in &src.rows {
                if start + len > rows {
                    return Err(Error::weights(
                        ckpt.file_of(&src.tensor),
                        format!(
                            "tensor {}: rows {start}..{} out of range",
                            src.tensor,
                            start + len
                        ),
                    ));
                }
                d.extend_from_slice(&t.data[start * rest..(start + len) * rest]);
            }
            d
        };
        if data.len() != shape.iter().product::<usize>() {
            return Err(Error::weights(
                ckpt.file_of(&src.tensor),
                format!("tensor {} cannot be cut into {name} {shape:?}", src.tensor),
            ));
        }
        store.tensors.insert(name, HostTensor { shape, data });
    }
    Ok(store)
}

/// Deterministic random weights: every tensor drawn from its own stream seeded by `seed` and
/// its name, so adding a layer does not change the others. Scales keep activations O(1).
pub fn random_weights(graph: &Graph, seed: u64) -> WeightStore {
    let mut store = WeightStore::default();
    for (name, decl) in &graph.weights {
        store.tensors.insert(
            name.clone(),
            HostTensor {
                shape: decl.shape.clone(),
                data: random_tensor(name, &decl.shape, decl.kind, seed),
            },
        );
    }
    store
}

/// The random tensor `name` of [`random_weights`] alone (the runtime draws weights of a
/// native spec one at a time from the plan's weight map).
/// The uniform range `(centre, half-width)` that [`random_tensor`] draws `name` from (A_log's
/// log-uniform draw approximated by a uniform one): what a GPU fills large benchmark weights
/// with on the device instead of uploading them.
pub fn random_range(name: &str, shape: &[usize], kind: WeightKind) -> (f32, f32) {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let last = shape.last().copied().unwrap_or(1) as f32;
    match kind {
        WeightKind::Embedding => (0.0, 1.0),
        WeightKind::Dense | WeightKind::Expert | WeightKind::LmHead => {
            (0.0, last.sqrt().recip() * 1.5)
        }
        WeightKind::Small => match leaf {
            "A_log" => (-1.96, 1.94),
            "dt_bias" | "router_bias" => (0.0, 0.2),
            l if l.ends_with("_conv") => (0.0, last.sqrt().recip()),
            _ => (1.0, 0.2),
        },
    }
}

/// A 24-bit seed for `name` (the device fill's per-tensor stream).
pub fn tensor_seed(name: &str, seed: u64) -> u32 {
    let mut h: u64 = seed ^ 0x9e37_79b9_7f4a_7c15;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h >> 40) as u32 & 0xff_ffff
}

pub fn random_tensor(name: &str, shape: &[usize], kind: WeightKind, seed: u64) -> Vec<f32> {
    let decl = WeightDecl {
        shape: shape.to_vec(),
        dtype: crate::graph::DType::F32,
        kind,
    };
    let mut h: u64 = seed ^ 0x9e37_79b9_7f4a_7c15;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(h);
    let n = decl.numel();
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let data: Vec<f32> = match decl.kind {
        WeightKind::Embedding => (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
        WeightKind::Dense | WeightKind::Expert | WeightKind::LmHead => {
            let fan_in = decl.shape.last().copied().unwrap_or(1) as f32;
            let a = fan_in.sqrt().recip() * 1.5;
            (0..n).map(|_| rng.random_range(-a..a)).collect()
        }
        WeightKind::Small => match leaf {
            "A_log" => (0..n)
                .map(|_| rng.random_range(0.02f32..1.0).ln())
                .collect(),
            "dt_bias" | "router_bias" => (0..n).map(|_| rng.random_range(-0.2f32..0.2)).collect(),
            l if l.ends_with("_conv") => {
                let k = decl.shape.last().copied().unwrap_or(1) as f32;
                let a = k.sqrt().recip();
                (0..n).map(|_| rng.random_range(-a..a)).collect()
            }
            // Norm weights: near one (near zero for zero-centred norms is handled by the
            // norm itself: 1 + w with w small is also fine).
            _ => (0..n)
                .map(|_| 1.0 + rng.random_range(-0.2f32..0.2))
                .collect(),
        },
    };
    data
}

/// sha256 (hex) of a safetensors file's header: its 8-byte length and the JSON that names every
/// tensor's dtype, shape and byte range. Cheap (no tensor data is read) and enough to notice a
/// checkpoint replaced under a compiled plan.
pub fn header_digest(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let err = |msg: String| Error::Weights {
        file: path.display().to_string(),
        msg,
    };
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| err(format!("cannot read the header length: {e}")))?;
    let n = u64::from_le_bytes(len);
    let size = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if n > size.saturating_sub(8) || n > 100 << 20 {
        return Err(err(format!("header length {n} does not fit the file")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| err(format!("cannot read the header: {e}")))?;
    let mut h = Sha256::new();
    h.update(len);
    h.update(&header);
    Ok(format!("{:x}", h.finalize()))
}
