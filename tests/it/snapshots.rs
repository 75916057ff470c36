//! The graph IR text of every example, reviewed with `cargo insta review`.

use lamina_ir::graph::print::print_graph;
use lamina_ir::model::Model;

use crate::common::repo;

fn graph_text(example: &str) -> String {
    let m = Model::open(&repo().join("examples").join(example))
        .unwrap_or_else(|e| panic!("{example}: {e}"));
    print_graph(&m.graph)
}

macro_rules! graph_snapshot {
    ($test:ident, $file:literal) => {
        #[test]
        fn $test() {
            insta::assert_snapshot!(graph_text($file));
        }
    };
}

graph_snapshot!(graph_kimi_linear_tiny, "kimi-linear-tiny.toml");
graph_snapshot!(graph_qwen3_next_tiny, "qwen3-next-tiny.toml");
graph_snapshot!(graph_minimax_tiny, "minimax-tiny.toml");
graph_snapshot!(graph_deepseek_v3_tiny, "deepseek-v3-tiny.toml");
graph_snapshot!(graph_kimi_linear_48b_a3b, "kimi-linear-48b-a3b.toml");
graph_snapshot!(graph_qwen3_next_80b_a3b, "qwen3-next-80b-a3b.toml");
graph_snapshot!(graph_minimax_text_01, "minimax-text-01.toml");
graph_snapshot!(graph_deepseek_v3, "deepseek-v3.toml");

/// The kernel IR (both phases) after the pass pipeline, at fixed build sizes.
fn kernel_text(example: &str) -> String {
    let m = Model::open(&repo().join("examples").join(example))
        .unwrap_or_else(|e| panic!("{example}: {e}"));
    let options = lamina_compiler::passes::Options {
        max_batch: 4,
        max_context: 256,
        max_prefill_rows: 64,
        keep_values: false,
        weights_bf16: false,
        host_lanes: 1,
        decode_splits: 1,
        tensor_cores: false,
        tf32_products: false,
        warpgroup_tiles: false,
        bf16_handoffs: false,
        bf16_caches: false,
        strict_fp: false,
    };
    let (p, _) = lamina_compiler::build::compile_program(&m, options).unwrap();
    let text = p.print();
    if example.contains("tiny") {
        text
    } else {
        // Full-size models: the kernels and the launch counts, not every launch line.
        text.lines()
            .filter(|l| !l.starts_with("//   "))
            .map(|l| format!("{l}\n"))
            .collect()
    }
}

macro_rules! kernel_snapshot {
    ($test:ident, $file:literal) => {
        #[test]
        fn $test() {
            insta::assert_snapshot!(kernel_text($file));
        }
    };
}

kernel_snapshot!(kernel_kimi_linear_tiny, "kimi-linear-tiny.toml");
kernel_snapshot!(kernel_qwen3_next_tiny, "qwen3-next-tiny.toml");
kernel_snapshot!(kernel_minimax_tiny, "minimax-tiny.toml");
kernel_snapshot!(kernel_deepseek_v3_tiny, "deepseek-v3-tiny.toml");
kernel_snapshot!(kernel_kimi_linear_48b_a3b, "kimi-linear-48b-a3b.toml");
kernel_snapshot!(kernel_qwen3_next_80b_a3b, "qwen3-next-80b-a3b.toml");
kernel_snapshot!(kernel_minimax_text_01, "minimax-text-01.toml");
kernel_snapshot!(kernel_deepseek_v3, "deepseek-v3.toml");

/// The host MLIR of a tiny model's kernels, both phases (verified, before lowering).
fn mlir_text(file: &str) -> String {
    let m = Model::open(&repo().join("examples").join(file)).unwrap();
    let (p, _) = lamina_compiler::build::compile_program(&m, Default::default()).unwrap();
    let kernels: Vec<_> = p.kernels().into_iter().cloned().collect();
    lamina_targets::mlir::print_mlir(&kernels).unwrap()
}

macro_rules! mlir_snapshot {
    ($test:ident, $file:literal) => {
        #[test]
        fn $test() {
            insta::assert_snapshot!(mlir_text($file));
        }
    };
}

mlir_snapshot!(mlir_kimi_linear_tiny, "kimi-linear-tiny.toml");
mlir_snapshot!(mlir_qwen3_next_tiny, "qwen3-next-tiny.toml");
mlir_snapshot!(mlir_minimax_tiny, "minimax-tiny.toml");
mlir_snapshot!(mlir_deepseek_v3_tiny, "deepseek-v3-tiny.toml");

/// The Graphviz form of the graph (`ir --stage graph --format dot`).
#[test]
fn graph_dot_qwen3_next_tiny() {
    let m = Model::open(&repo().join("examples/qwen3-next-tiny.toml")).unwrap();
    let dot = lamina_ir::graph::print::print_dot(&m.graph);
    // Every operand is an edge.
    let edges = dot.lines().filter(|l| l.contains(" -> ")).count();
    let operands: usize = m
        .graph
        .schedule()
        .iter()
        .map(|&n| m.graph.inputs(n).len())
        .sum();
    assert_eq!(edges, operands);
    insta::assert_snapshot!(dot);
}
