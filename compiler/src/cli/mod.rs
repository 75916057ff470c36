//! The `compile-model` command line. Every error is one line on stderr and a non-zero exit.

mod bench;
mod build;
mod check;
mod cost;
mod device;
mod generate;
mod gpu_report;
mod ir;
mod run;
mod ui;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "compile-model",
    version,
    about = "Lamina: an ahead-of-time compiler for hybrid LLMs",
    after_help = "MODEL is a native spec (.toml, see examples/) or a Hugging Face checkpoint directory \
(config.json + model.safetensors or a sharded index).\n\nExamples:\n  \
compile-model check examples/kimi-linear-48b-a3b.toml\n  \
compile-model ir examples/qwen3-next-tiny.toml --stage graph\n  \
compile-model build examples/qwen3-next-tiny.toml -o out/qwen3-next-tiny\n  \
compile-model run out/qwen3-next-tiny --tokens 1,2,3 --max-new-tokens 8\n  \
compile-model run tests/fixtures/oracle/qwen3_next/model --reference --tokens 1,2,3 --max-new-tokens 8"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// More detail on stderr: -v pass and stage timings, -vv per-kernel details.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Nothing but results: no progress bars, no logs below errors.
    #[arg(short, long, global = true)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate a model and print its layer pattern, parameters, weight bytes and cache sizes.
    #[command(after_help = "Example:\n  compile-model check examples/deepseek-v3.toml")]
    Check { model: PathBuf },
    /// Print an intermediate representation of a model.
    #[command(
        after_help = "Examples:\n  compile-model ir examples/minimax-tiny.toml --stage graph\n  \
compile-model ir examples/kimi-linear-tiny.toml --stage graph --format svg > kimi.svg"
    )]
    Ir {
        model: PathBuf,
        #[arg(long, value_enum, default_value = "graph")]
        stage: Stage,
        /// Schedule to print for the kernel and MLIR stages (default: both).
        #[arg(long, value_enum)]
        phase: Option<PhaseArg>,
        /// Target of the MLIR and PTX stages: host (MLIR only), sm_80 or sm_90a.
        #[arg(long, default_value = "host")]
        target: String,
        /// Output of the graph stage: text, Graphviz dot, or SVG rendered with `dot`.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        #[command(flatten)]
        sizes: build::SizeArgs,
    },
    /// Compile a model into an artifact directory (plan.json + kernels).
    #[command(
        after_help = "Example:\n  compile-model build examples/kimi-linear-tiny.toml --target host -o out/kimi -v\n\n\
                      With LAMINA_KERNEL_CACHE=DIR, host kernels compiled before (same MLIR, LLVM \
                      and CPU) are taken from DIR and new ones kept there."
    )]
    Build(build::BuildArgs),
    /// Print what a model costs to serve (memory, bytes and FLOPs per token, roofline on a
    /// GPU), then its compiled host plan's buffers.
    #[command(
        after_help = "Examples:\n  compile-model report examples/qwen3-next-80b-a3b.toml --gpu h200 --context 131072 --batch 8\n  \
compile-model report examples/kimi-linear-48b-a3b.toml --gpu h100 --bandwidth 3000 --flops 700 --json"
    )]
    Report(build::ReportArgs),
    /// Print several models' serving costs side by side.
    #[command(
        after_help = "Example:\n  compile-model compare examples/kimi-linear-48b-a3b.toml examples/qwen3-next-80b-a3b.toml \\\n      \
examples/minimax-text-01.toml examples/deepseek-v3.toml --gpu h200 --context 131072"
    )]
    Compare(cost::CompareArgs),
    /// Run a model: prefill the prompt, then greedy-decode.
    #[command(
        after_help = "Example:\n  compile-model run examples/kimi-linear-tiny.toml --reference --tokens 1,2,3 \
--max-new-tokens 8 --logits-out out.safetensors"
    )]
    Run(run::RunArgs),
    /// Generate text from a text prompt with the checkpoint's tokenizer, streamed.
    #[command(
        after_help = "Example:\n  compile-model generate path/to/checkpoint --prompt \"The capital of France is\" \
--max-new-tokens 32 --temperature 0.7 --top-p 0.9 --seed 1"
    )]
    Generate(generate::GenerateArgs),
    /// Time prefill and decode of a compiled host plan against the measured memory bandwidth.
    #[command(
        after_help = "Example:\n  compile-model bench examples/qwen3-next-small.toml --prompt-len 512 --gen 64 --reference"
    )]
    Bench(bench::BenchArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Stage {
    /// The graph IR (after the verifier).
    Graph,
    /// The kernel IR of every distinct kernel, after the pass pipeline.
    Kernel,
    /// The kernels in MLIR (host: func, scf, arith, math, memref; GPU: one gpu.module), verified,
    /// before lowering.
    Mlir,
    /// PTX of the kernels (--target sm_80 or sm_90a).
    Ptx,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Text,
    Dot,
    Svg,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum PhaseArg {
    Prefill,
    Decode,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Precision {
    F32,
    F64,
}

/// Errors of the CLI: one line each.
pub type CliResult = Result<(), String>;

pub fn main() -> ExitCode {
    // Output piped into a reader that stops early (`compile-model ir ... | head`) ends the
    // process quietly, as for other Unix tools, instead of a panic of `print!` on EPIPE
    // (Rust ignores SIGPIPE by default).
    #[cfg(unix)]
    // SAFETY: called first, before any thread exists; restores the default disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    ui::init(cli.verbose, cli.quiet);
    let result = match cli.cmd {
        Cmd::Check { model } => check::check(&model),
        Cmd::Ir {
            model,
            stage,
            phase,
            target,
            format,
            sizes,
        } => ir::ir(&model, stage, phase, &target, format, &sizes),
        Cmd::Build(args) => build::build_cmd(&args),
        Cmd::Report(args) => build::report(&args),
        Cmd::Compare(args) => cost::compare(&args),
        Cmd::Run(args) => run::run(&args),
        Cmd::Bench(args) => bench::bench(&args),
        Cmd::Generate(args) => generate::generate(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
