//! Model descriptions: the full-size specs agree with the published parameter counts, the tiny
//! specs describe exactly the oracle fixtures' architectures, and every example runs.

use lamina_ir::graph::print::print_graph;
use lamina_ir::model::Model;
use lamina_ir::stats::model_stats;
use lamina_runtime::reference::Reference;

use crate::common::{oracle, repo};

fn open(example: &str) -> Model {
    Model::open(&repo().join("examples").join(example)).unwrap_or_else(|e| panic!("{example}: {e}"))
}

fn billions(n: u64) -> f64 {
    n as f64 / 1e9
}

/// (spec, published total, published active, whether "active" counts embeddings, tolerance).
#[test]
fn full_size_specs_match_published_parameter_counts() {
    let cases = [
        // DeepSeek-V3: 671B total, 37B activated (tech report; embeddings included).
        ("deepseek-v3.toml", 671.0, 37.0, true, 0.03),
        // Kimi-Linear-48B-A3B: "48B total, 3B activated" (49.1B in the safetensors index).
        ("kimi-linear-48b-a3b.toml", 48.0, 3.0, false, 0.1),
        // Qwen3-Next-80B-A3B: 80B total, 3B activated.
        ("qwen3-next-80b-a3b.toml", 80.0, 3.0, false, 0.1),
        // MiniMax-Text-01: 456B total, 45.9B activated.
        ("minimax-text-01.toml", 456.0, 45.9, false, 0.02),
    ];
    for (file, total, active, with_emb, tol) in cases {
        let s = model_stats(&open(file).graph);
        let t = billions(s.total_params);
        let a = billions(if with_emb {
            s.active_params
        } else {
            s.active_non_embedding
        });
        println!("{file}: {t:.2}B total, {a:.2}B active");
        assert!(
            (t - total).abs() / total <= tol,
            "{file}: {t:.2}B total, published {total}B"
        );
        assert!(
            (a - active).abs() / active <= tol.max(0.1),
            "{file}: {a:.2}B active, published {active}B"
        );
    }
}

#[test]
fn state_and_cache_bytes_of_real_models() {
    // Kimi Linear: 20 KDA layers × 32 heads × 128 × 128 f32 state; 7 MLA layers × (512 + 64)
    // bf16 latent per token.
    let s = model_stats(&open("kimi-linear-48b-a3b.toml").graph);
    assert_eq!(s.recurrent_state_bytes, 20 * 32 * 128 * 128 * 4);
    assert_eq!(s.conv_state_bytes, 20 * 3 * 32 * 128 * 3 * 4);
    assert_eq!(s.kv_bytes_per_token, 7 * (512 + 64) * 2);
    // DeepSeek-V3: 61 MLA layers, no recurrent state.
    let s = model_stats(&open("deepseek-v3.toml").graph);
    assert_eq!(s.recurrent_state_bytes, 0);
    assert_eq!(s.kv_bytes_per_token, 61 * 576 * 2);
    // Qwen3-Next: 12 attention layers × 2 KV heads × (256 + 256) bf16 per token.
    let s = model_stats(&open("qwen3-next-80b-a3b.toml").graph);
    assert_eq!(s.kv_bytes_per_token, 12 * 2 * 512 * 2);
    assert_eq!(s.recurrent_state_bytes, 36 * 32 * 128 * 128 * 4);
}

/// The tiny example specs describe the same graphs as the imported oracle checkpoints.
#[test]
fn tiny_specs_equal_imported_oracle_graphs() {
    for (spec, case) in [
        ("qwen3-next-tiny.toml", "qwen3_next"),
        ("kimi-linear-tiny.toml", "kimi_linear"),
        ("minimax-tiny.toml", "minimax"),
        ("deepseek-v3-tiny.toml", "deepseek_v3_yarn"),
    ] {
        let a = open(spec);
        let b = Model::open(&oracle(case).join("model")).unwrap();
        let strip = |m: &Model| {
            print_graph(&m.graph)
                .lines()
                .skip(1)
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            strip(&a),
            strip(&b),
            "{spec} differs from the {case} checkpoint's graph"
        );
    }
}

/// Every example spec round-trips through TOML and runs on random weights with finite logits;
/// incremental decode gives the same logits as re-running the whole sequence.
#[test]
fn tiny_examples_run_and_decode_matches_full_forward() {
    for file in [
        "qwen3-next-tiny.toml",
        "kimi-linear-tiny.toml",
        "minimax-tiny.toml",
        "deepseek-v3-tiny.toml",
    ] {
        let m = open(file);
        let again = lamina_ir::spec::ModelSpec::from_toml_str(
            &m.spec.to_toml(),
            std::path::Path::new(file),
        )
        .unwrap();
        assert_eq!(again, m.spec, "{file}: TOML round trip");
        let w = m.weights(3).unwrap();
        let r = Reference::<f64>::new(&m.graph, &w);
        let prompt: Vec<i64> = (0..70).map(|i| (i * 37 % 256) as i64).collect();
        let gen = r.generate(&prompt, 4).unwrap();
        assert!(
            gen.decode_logits.data.iter().all(|x| x.is_finite()),
            "{file}: non-finite logits"
        );
        let mut full = prompt.clone();
        full.extend_from_slice(&gen.tokens[..3]);
        let (logits, _) = r.forward(&mut r.new_session(), &full, &[]).unwrap();
        for j in 1..4 {
            let want = logits.row(prompt.len() - 1 + j);
            let got = gen.decode_logits.row(j);
            let err = crate::common::rel_err(got, want);
            assert!(
                err < 1e-10,
                "{file}: decode step {j} differs from the full forward ({err:e})"
            );
        }
    }
}

/// `compile-model report` states the planned pools and the decode traffic, checked by hand for
/// qwen3-next-small at --max-batch 4 --max-context 1024.
#[test]
fn report_states_pools_and_decode_traffic() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_compile-model"))
        .args(["report", "examples/qwen3-next-small.toml"])
        .current_dir(repo())
        .output()
        .expect("run compile-model");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for want in [
        // 6 GDN layers x 4 slots x 8 heads x 128 x 128 x 4 B = 12 MiB.
        "recurrent     6 layers  12.00 MiB",
        // 2 attention layers x 4 slots x 1024 positions x (2 kv heads x 128 x 2) x 4 B = 16 MiB.
        "kv_cache      2 layers  16.00 MiB",
        // Per cached position: 2 layers x 512 floats x 4 B = 4 KiB.
        "cache 4.00 KiB per cached position",
    ] {
        assert!(text.contains(want), "report lacks {want:?}:\n{text}");
    }
}
