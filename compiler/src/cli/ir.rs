use std::path::Path;

use lamina_ir::graph::print::{print_dot, print_graph};
use lamina_ir::kernel::print::print_kernel;
use lamina_ir::model::Model;
use lamina_targets::Target;

use super::build::{parse_target, SizeArgs};
use super::{CliResult, Format, PhaseArg, Stage};
use crate::build::compile_program;
use crate::kernels::Phase;

pub fn ir(
    model: &Path,
    stage: Stage,
    phase: Option<PhaseArg>,
    target: &str,
    format: Format,
    sizes: &SizeArgs,
) -> CliResult {
    let m = Model::open(model).map_err(|e| e.to_string())?;
    if let Stage::Graph = stage {
        match format {
            Format::Text => print!("{}", print_graph(&m.graph)),
            Format::Dot => print!("{}", print_dot(&m.graph)),
            Format::Svg => print!("{}", render_svg(&print_dot(&m.graph))?),
        }
        return Ok(());
    }
    if format != Format::Text {
        return Err("--format dot|svg is for --stage graph".into());
    }
    let target = parse_target(target)?;
    let (p, _) = compile_program(&m, sizes.options_for(target)?).map_err(|e| e.to_string())?;
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
                print!("{}", p.print_launches(ph));
                for k in &kernels {
                    println!("{}", print_kernel(k));
                }
            }
            Stage::Mlir => {
                let text = match target {
                    Target::Host => lamina_targets::mlir::print_mlir(&kernels),
                    _ => lamina_targets::mlir::print_gpu_mlir(&kernels, target, &|k| {
                        lamina_targets::nvptx::flavor(k, target)
                    }),
                };
                print!("{}", text.map_err(|e| e.to_string())?);
            }
            Stage::Ptx => {
                if target == Target::Host {
                    return Err("--stage ptx needs --target sm_80 or sm_90a".into());
                }
                let (ptx, _) = lamina_targets::nvptx::compile_ptx(&kernels, target)
                    .map_err(|e| e.to_string())?;
                print!("{ptx}");
            }
            Stage::Graph => unreachable!(),
        }
    }
    Ok(())
}

/// SVG from Graphviz's `dot` (`$LAMINA_DOT` overrides the program).
fn render_svg(dot: &str) -> Result<String, String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let prog = std::env::var("LAMINA_DOT").unwrap_or_else(|_| "dot".into());
    let mut child = Command::new(&prog)
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!(
                "--format svg needs Graphviz ({prog}: {e}); install it (Debian: apt-get install graphviz) or use --format dot"
            )
        })?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(dot.as_bytes())
        .map_err(|e| format!("{prog}: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{prog}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{prog} -Tsvg failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    String::from_utf8(out.stdout).map_err(|e| format!("{prog}: output is not UTF-8: {e}"))
}
