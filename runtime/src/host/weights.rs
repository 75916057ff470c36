//! Weights of a plan, from the plan's weight map: f32 checkpoint tensors used in place in the
//! memory-mapped file; other dtypes cast, row ranges selected and experts stacked into f32
//! vectors; the deterministic random weights of a native spec.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lamina_ir::kernel::Elem;
use lamina_ir::plan::{Plan, WeightEntry, WeightSource};
use lamina_ir::stats::kind_from_name;
use lamina_ir::weights::{decode_f32, random_tensor, select_rows};
use lamina_ir::Error;
use memmap2::Mmap;

/// One weight as the kernels see it: contiguous f32 or bf16 (the plan's `dtype`).
pub enum Weight {
    Owned(Vec<f32>),
    /// bf16 bit patterns.
    OwnedBf16(Vec<u16>),
    /// `len` elements of `elem` at byte `offset` of a mapped checkpoint file (aligned to the
    /// element, checked).
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
        elem: Elem,
    },
}

impl Weight {
    /// The kernels' element type.
    pub fn elem(&self) -> Elem {
        match self {
            Weight::Owned(_) => Elem::F32,
            Weight::OwnedBf16(_) => Elem::Bf16,
            Weight::Mapped { elem, .. } => *elem,
        }
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.bytes().len() / self.elem().bytes()
    }

    /// The elements' bytes, little-endian, as the kernels read them.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Weight::Owned(v) => {
                // SAFETY: plain old data viewed as bytes, in bounds.
                unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 4) }
            }
            Weight::OwnedBf16(v) => {
                // SAFETY: as above.
                unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 2) }
            }
            Weight::Mapped {
                map,
                offset,
                len,
                elem,
            } => &map[*offset..offset + len * elem.bytes()],
        }
    }
}

/// f32 → bf16 bits, rounding to nearest even (as the kernels' stores and PyTorch do).
fn to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
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
        Ok(match w.dtype.as_str() {
            "bf16" => Weight::OwnedBf16(data.into_iter().map(to_bf16).collect()),
            _ => Weight::Owned(data),
        })
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
        // The file's element type must be the plan's, whole and unselected.
        let elem = match (dtype.as_str(), w.dtype.as_str()) {
            ("F32", "f32") => Elem::F32,
            ("BF16", "bf16") => Elem::Bf16,
            _ => return Ok(None),
        };
        if !rows.is_empty()
            || Some(*bytes) != want.checked_mul(elem.bytes())
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
        if !(b.as_ptr() as usize).is_multiple_of(elem.bytes()) {
            return Ok(None);
        }
        let weight = Weight::Mapped {
            map,
            offset: *offset,
            len: want,
            elem,
        };
        let finite = match elem {
            Elem::Bf16 => weight
                .bytes()
                .chunks_exact(2)
                .all(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 != 0x7f80),
            _ => weight
                .bytes()
                .chunks_exact(4)
                .all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
        };
        if !finite {
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
