//! A model as the tools see it: a spec (native TOML or imported from a Hugging Face directory),
//! its graph, and where its weights come from.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::graph::{build::build_graph, Graph};
use crate::hf;
use crate::spec::ModelSpec;
use crate::weights::{load_weights, random_weights, Checkpoint, SourceMap, WeightStore};

pub enum ModelSource {
    /// A native spec file; weights are drawn from a seed.
    Spec(PathBuf),
    /// A Hugging Face checkpoint directory (config.json + safetensors).
    HuggingFace {
        dir: PathBuf,
        model_type: String,
        map: Box<dyn SourceMap>,
    },
}

pub struct Model {
    pub spec: ModelSpec,
    pub graph: Graph,
    pub source: ModelSource,
}

impl Model {
    /// Opens a `.toml` spec or a directory holding `config.json`.
    pub fn open(path: &Path) -> Result<Model> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let (spec, source) = if meta.is_dir() {
            if !path.join("config.json").exists() {
                return Err(Error::Io {
                    path: path.display().to_string(),
                    msg: "a model directory needs a config.json (or pass a .toml spec file)".into(),
                });
            }
            let imported = hf::import_dir(path)?;
            (
                imported.spec,
                ModelSource::HuggingFace {
                    dir: path.to_path_buf(),
                    model_type: imported.model_type,
                    map: imported.map,
                },
            )
        } else {
            (
                ModelSpec::from_toml_file(path)?,
                ModelSource::Spec(path.to_path_buf()),
            )
        };
        let graph = build_graph(&spec).map_err(|e| e.in_file(path))?;
        Ok(Model {
            spec,
            graph,
            source,
        })
    }

    /// Checkpoint weights for a Hugging Face directory; deterministic random weights from
    /// `seed` for a spec.
    pub fn weights(&self, seed: u64) -> Result<WeightStore> {
        match &self.source {
            ModelSource::Spec(_) => Ok(random_weights(&self.graph, seed)),
            ModelSource::HuggingFace { dir, map, .. } => {
                let ckpt = Checkpoint::open(dir)?;
                load_weights(&self.graph, &ckpt, map.as_ref(), dir)
            }
        }
    }

    pub fn describe_source(&self) -> String {
        match &self.source {
            ModelSource::Spec(p) => format!("spec {}", p.display()),
            ModelSource::HuggingFace {
                dir, model_type, ..
            } => {
                format!("Hugging Face {model_type} checkpoint {}", dir.display())
            }
        }
    }
}
