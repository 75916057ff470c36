use std::path::Path;

use lamina_ir::graph::print::print_graph;
use lamina_ir::kernel::print::print_kernel;
use lamina_ir::model::Model;
use lamina_targets::Target;

use super::build::{parse_target, SizeArgs};
use super::{CliResult, PhaseArg, Stage};
use crate::build::compile_program;
use crate::kernels::Phase;

pub fn ir(
    model: &Path,
    stage: Stage,
    phase: Option<PhaseArg>,
    target: &str,
    sizes: &SizeArgs,
) -> CliResult {
    let m = Model::open(model).map_err(|e| e.to_string())?;
    if let Stage::Graph = stage {
        print!("{}", print_graph(&m.graph));
        return Ok(());
    }
    let target = parse_target(target)?;
    let (p, _) = compile_program(&m, sizes.options()?).map_err(|e| e.to_string())?;
    let phases: Vec<Phase> = match phase {
        Some(PhaseArg::Prefill) => vec![Phase::Prefill],
        Some(PhaseArg::Decode) => vec![Phase::Decode],
        None => vec![Phase::Prefill, Phase::Decode],
    };
    for ph in phases {
        let kernels: Vec<_> = p.phase_kernels(ph).into_iter().cloned().collect();
        println!(
            "// phase {}: {} launches, {} kernels",
            ph.name(),
            p.schedules[&ph].len(),
            kernels.len()
        );
        match stage {
            Stage::Kernel => {
                for k in &kernels {
                    println!("{}", print_kernel(k));
                }
            }
            Stage::Mlir => {
                if target != Target::Host {
                    return Err(target.unavailable());
                }
                print!(
                    "{}",
                    lamina_targets::mlir::print_mlir(&kernels).map_err(|e| e.to_string())?
                );
            }
            Stage::Ptx => return Err(Target::Sm90a.unavailable()),
            Stage::Graph => unreachable!(),
        }
    }
    Ok(())
}
