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
