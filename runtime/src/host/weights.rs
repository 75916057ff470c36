//! Weights of a plan, materialised as f32 vectors from the plan's weight map: checkpoint
//! tensors (memory-mapped, cast, row ranges selected), stacked experts, or the deterministic
//! random weights of a native spec.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use lamina_ir::plan::{WeightEntry, WeightSource};
use lamina_ir::stats::kind_from_name;
use lamina_ir::weights::{decode_f32, random_tensor, select_rows};
use lamina_ir::Error;
use memmap2::Mmap;

pub struct Loader {
    dir: PathBuf,
    maps: HashMap<String, Mmap>,
}

impl Loader {
    pub fn new(dir: &Path) -> Self {
        Loader {
            dir: dir.to_path_buf(),
            maps: HashMap::new(),
        }
    }

    pub fn load(&mut self, w: &WeightEntry) -> Result<Vec<f32>, Error> {
        let data = self.source(&w.name, &w.source, &w.shape)?;
        let want: usize = w.shape.iter().product();
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
        Ok(data)
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
                offset,
                bytes,
                dtype,
                shape: src_shape,
                rows,
            } => {
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
                    self.maps.insert(file.clone(), m);
                }
                let m = &self.maps[file];
                let b = m.get(*offset..offset + bytes).ok_or_else(|| Error::Weights {
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
