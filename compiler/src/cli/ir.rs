use std::path::Path;

use lamina_ir::graph::print::print_graph;
use lamina_ir::model::Model;

use super::{CliResult, Stage};

pub fn ir(model: &Path, stage: Stage) -> CliResult {
    let m = Model::open(model).map_err(|e| e.to_string())?;
    match stage {
        Stage::Graph => {
            print!("{}", print_graph(&m.graph));
            Ok(())
        }
        Stage::Kernel | Stage::Mlir | Stage::Ptx => Err(
            "only --stage graph exists so far: the kernel IR, MLIR and PTX stages are not implemented yet".into(),
        ),
    }
}
