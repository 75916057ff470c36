//! Weights of a plan, from the plan's weight map: f32 checkpoint tensors used in place in the
//! memory-mapped file; other dtypes cast, row ranges selected and experts stacked into f32
//! vectors; the deterministic random weights of a native spec.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lamina_ir::plan::{Plan, WeightEntry, WeightSource};
use lamina_ir::stats::kind_from_name;
use lamina_ir::weights::{decode_f32, random_tensor, select_rows};
use lamina_ir::Error;
use memmap2::Mmap;

/// One weight as the kernels see it: contiguous f32.
pub enum Weight {
    Owned(Vec<f32>),
    /// `len` f32 at byte `offset` of a mapped checkpoint file (4-byte aligned, checked).
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
}

impl Weight {
    pub fn as_slice(&self) -> &[f32] {
        match self {
            Weight::Owned(v) => v,
            Weight::Mapped { map, offset, len } => {
                let b = &map[*offset..offset + len * 4];
                // SAFETY: in bounds (checked when made), 4-byte aligned (checked when made),
                // and every bit pattern is an f32.
                unsafe { std::slice::from_raw_parts(b.as_ptr() as *const f32, *len) }
            }
        }
    }
}

/// Every weight of `plan`, read from `weights_dir` (default: the model's source directory).
/// Checkpoint files whose safetensors header changed since the build are refused unless
/// `allow_weight_mismatch` (then their tensors are found by name). `progress(done, total)`
/// follows the weights.
pub fn load_all(
    plan: &Plan,
    weights_dir: Option<&Path>,
    allow_weight_mismatch: bool,
    progress: &dyn Fn(usize, usize),
) -> Result<Vec<Weight>, Error> {
    let wdir = match weights_dir {
        Some(d) => d.to_path_buf(),
        None => Path::new(&plan.model.source).to_path_buf(),
    };
    let mut changed = Vec::new();
    for (file, want) in &plan.model.weight_headers {
        let path = wdir.join(file);
        let got = lamina_ir::weights::header_digest(&path)?;
        if &got != want {
            changed.push(file.clone());
            if !allow_weight_mismatch {
                return Err(Error::Weights {
                    file: path.display().to_string(),
                    msg: format!(
                        "the safetensors header changed since the plan was built (sha256 {} \
                         then, {} now): rebuild the plan, or pass --allow-weight-mismatch",
                        &want[..12.min(want.len())],
                        &got[..12]
                    ),
                });
            }
        }
    }
    let mut loader = Loader::new(&wdir);
    loader.relocate(changed);
    let total = plan.weights.len();
    plan.weights
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let r = loader.load(w);
            progress(i + 1, total);
            r
        })
        .collect()
}

pub struct Loader {
    dir: PathBuf,
    maps: HashMap<String, Arc<Mmap>>,
    /// Files rewritten since the build (allowed by the caller): their tensors are found again
    /// by name in the current header instead of at the recorded offsets.
    relocate: std::collections::BTreeSet<String>,
}

impl Loader {
    pub fn new(dir: &Path) -> Self {
        Loader {
            dir: dir.to_path_buf(),
            maps: HashMap::new(),
            relocate: Default::default(),
        }
    }

    /// Reads `files`' tensors by name from their current headers.
    pub fn relocate(&mut self, files: impl IntoIterator<Item = String>) {
        self.relocate.extend(files);
    }

    /// The byte range of a recorded tensor: as recorded, or looked up again by name (checking
    /// dtype and shape) in a rewritten file.
    #[allow(clippy::too_many_arguments)]
    fn place(
        &mut self,
        name: &str,
        file: &str,
        tensor: &str,
        offset: usize,
        bytes: usize,
        dtype: &str,
        shape: &[usize],
    ) -> Result<(usize, usize), Error> {
        if !self.relocate.contains(file) {
            return Ok((offset, bytes));
        }
        let (map, path) = self.map(name, file)?;
        let bad = |msg: String| Error::Weights {
            file: path.display().to_string(),
            msg,
        };
        let (n, meta) = safetensors::SafeTensors::read_metadata(&map[..])
            .map_err(|e| bad(format!("cannot read the header: {e:?}")))?;
        let info = meta
            .info(tensor)
            .ok_or_else(|| bad(format!("tensor {tensor} (for {name}) is gone")))?;
        if format!("{:?}", info.dtype) != dtype || info.shape != shape {
            return Err(bad(format!(
                "tensor {tensor} (for {name}) is now {:?} {:?}, the plan was built for {dtype} {shape:?}",
                info.dtype, info.shape
            )));
        }
        let (a, b) = info.data_offsets;
        Ok((8 + n + a, b - a))
    }

    pub fn load(&mut self, w: &WeightEntry) -> Result<Weight, Error> {
        let want: usize = w.shape.iter().product();
        if let Some(m) = self.in_place(w, want)? {
            return Ok(m);
        }
        let data = self.source(&w.name, &w.source, &w.shape)?;
        if data.len() != want {
            return Err(Error::Weights {
                file: self.dir.display().to_string(),
                msg: format!(
                    "weight {}: the plan's source gives {} elements, its shape {:?} needs {want}",
                    w.name,
                    data.len(),
                    w.shape
                ),
            });
        }
        Ok(Weight::Owned(data))
    }

    /// A whole little-endian f32 tensor is used where it lies in the mapped file.
    fn in_place(&mut self, w: &WeightEntry, want: usize) -> Result<Option<Weight>, Error> {
        let WeightSource::File {
            file,
            tensor,
            offset,
            bytes,
            dtype,
            shape: src_shape,
            rows,
        } = &w.source
        else {
            return Ok(None);
        };
        let (offset, bytes) =
            &self.place(&w.name, file, tensor, *offset, *bytes, dtype, src_shape)?;
        if dtype != "F32"
            || !rows.is_empty()
            || Some(*bytes) != want.checked_mul(4)
            || !cfg!(target_endian = "little")
        {
            return Ok(None);
        }
        let (map, path) = self.map(&w.name, file)?;
        let Some(b) = offset
            .checked_add(*bytes)
            .and_then(|end| map.get(*offset..end))
        else {
            return Ok(None); // reported by the copying path
        };
        if !(b.as_ptr() as usize).is_multiple_of(4) {
            return Ok(None);
        }
        let weight = Weight::Mapped {
            map,
            offset: *offset,
            len: want,
        };
        if weight.as_slice().iter().any(|x| !x.is_finite()) {
            return Err(Error::Weights {
                file: path.display().to_string(),
                msg: format!("weight {} holds NaN or infinite values", w.name),
            });
        }
        Ok(Some(weight))
    }

    fn map(&mut self, name: &str, file: &str) -> Result<(Arc<Mmap>, PathBuf), Error> {
        if file.contains('/') || file.contains("..") {
            return Err(Error::Input {
                what: "plan.json".into(),
                msg: format!("weight {name}: bad file name {file}"),
            });
        }
        let path = self.dir.join(file);
        if !self.maps.contains_key(file) {
            let f = File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: read-only map of a checkpoint file that nothing in this process
            // writes; a concurrent external writer is outside the contract.
            let m = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(&path, e))?;
            self.maps.insert(file.to_string(), Arc::new(m));
        }
        Ok((self.maps[file].clone(), path))
    }

    fn source(&mut self, name: &str, s: &WeightSource, shape: &[usize]) -> Result<Vec<f32>, Error> {
        Ok(match s {
            WeightSource::Random { tensor, seed, kind } => {
                let k = kind_from_name(kind).ok_or_else(|| Error::Input {
                    what: "plan.json".into(),
                    msg: format!("weight {name}: unknown kind {kind:?}"),
                })?;
                random_tensor(tensor, shape, k, *seed)
            }
            WeightSource::Stack { parts } => {
                let part_shape = &shape[1..];
                let mut out = Vec::new();
                for (e, p) in parts.iter().enumerate() {
                    out.extend(self.source(&format!("{name}[{e}]"), p, part_shape)?);
                }
                out
            }
            WeightSource::File {
                file,
                tensor,
                offset,
                bytes,
                dtype,
                shape: src_shape,
                rows,
            } => {
                let (offset, bytes) =
                    &self.place(name, file, tensor, *offset, *bytes, dtype, src_shape)?;
                let (m, path) = self.map(name, file)?;
                let end = offset.checked_add(*bytes);
                let b = end.and_then(|e| m.get(*offset..e)).ok_or_else(|| Error::Weights {
                    file: path.display().to_string(),
                    msg: format!("weight {name}: bytes {offset}..{} lie outside the file (was the checkpoint replaced?)", offset + bytes),
                })?;
                let data = decode_f32(dtype, b).map_err(|m| Error::Weights {
                    file: path.display().to_string(),
                    msg: format!("weight {name}: {m}"),
                })?;
                if data.iter().any(|x| !x.is_finite()) {
                    return Err(Error::Weights {
                        file: path.display().to_string(),
                        msg: format!("weight {name} holds NaN or infinite values"),
                    });
                }
                if rows.is_empty() {
                    data
                } else {
                    let last = *src_shape.last().unwrap_or(&1);
                    let total_rows = data.len() / last.max(1);
                    if rows.iter().any(|&(s, n)| s + n > total_rows) {
                        return Err(Error::Weights {
                            file: path.display().to_string(),
                            msg: format!("weight {name}: row ranges outside the tensor"),
                        });
                    }
                    select_rows(&data, last, rows)
                }
            }
        })
    }
}
