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

/// The cost model's sizes for the full-size specs, against values computed by hand from the
/// published configs (DESIGN.md), and the crossover context they imply.
#[test]
fn cost_report_matches_hand_computed_sizes() {
    use lamina_ir::cost::{cost, gpu};
    let h200 = gpu("h200");
    let kib = 1024u64;
    let mib = 1024 * kib;
    // (spec, recurrent state per sequence, KV/latent cache per token)
    let cases = [
        // 20 KDA layers x 32 heads x 128 x 128 x 4 B; 7 MLA layers x (512 + 64) x 2 B.
        (
            "kimi-linear-48b-a3b.toml",
            20 * 32 * 128 * 128 * 4,
            7 * (512 + 64) * 2,
        ),
        // 36 GDN layers x 32 value heads x 128 x 128 x 4 B; 12 attention layers x 2 kv heads x
        // 256 x (k, v) x 2 B.
        (
            "qwen3-next-80b-a3b.toml",
            36 * 32 * 128 * 128 * 4,
            12 * 2 * 256 * 2 * 2,
        ),
        // 70 lightning layers x 64 heads x 128 x 128 x 4 B; 10 attention layers x 8 kv heads x
        // 128 x (k, v) x 2 B.
        (
            "minimax-text-01.toml",
            70 * 64 * 128 * 128 * 4,
            10 * 8 * 128 * 2 * 2,
        ),
        // No recurrence; 61 MLA layers x (512 + 64) x 2 B.
        ("deepseek-v3.toml", 0, 61 * (512 + 64) * 2),
    ];
    for (spec, state, kv) in cases {
        let m = open(spec);
        let c = cost(&m.graph, 1, 131072, h200);
        assert_eq!(
            c.recurrent_state_bytes, state as u64,
            "{spec} recurrent state"
        );
        assert_eq!(c.cache_bytes_per_token, kv as u64, "{spec} cache per token");
        assert_eq!(c.cache_bytes_at_context, kv as u64 * 131072, "{spec}");
        assert_eq!(
            c.total_memory,
            c.weight_bytes + c.recurrent_state_bytes + c.conv_state_bytes + kv as u64 * 131072,
            "{spec}"
        );
        if state > 0 {
            let want = 2 * (state as u64 + c.conv_state_bytes) / kv as u64;
            assert_eq!(c.crossover_context, Some(want), "{spec}");
        } else {
            assert_eq!(c.crossover_context, None, "{spec}");
        }
        let b = c.gpu.as_ref().unwrap();
        // Decode at batch 1 is bound by memory on every one of them.
        assert_eq!(b.decode_bound, "memory", "{spec}");
        let want = 4.8e12 / c.decode_bytes_per_token as f64;
        assert!((b.decode_tokens_per_s - want).abs() <= 0.05, "{spec}");
    }
    // Kimi's decode traffic by hand: dense + LM head + norms read in full, one embedding row,
    // 8 of 256 experts per MoE layer, state read and written, cache read at 131072 tokens.
    let m = open("kimi-linear-48b-a3b.toml");
    let c = cost(&m.graph, 1, 131072, None);
    let kind = |k: &str| c.weight_bytes_by_kind.get(k).copied().unwrap_or(0) as f64;
    let want = kind("dense")
        + kind("lm_head")
        + kind("norms/gates")
        + kind("embedding") / 163840.0
        + kind("experts") * 8.0 / 256.0
        + 2.0 * (c.recurrent_state_bytes + c.conv_state_bytes) as f64
        + (7 * 576 * 2 * 131072) as f64;
    assert!(
        (c.decode_bytes_per_token as f64 - want).abs() <= 1.0,
        "{} vs {want}",
        c.decode_bytes_per_token
    );
    assert_eq!(c.recurrent_state_bytes, 40 * mib);
}

/// `report --json` is stable: snapshot of one operating point.
#[test]
fn cost_report_json_is_stable() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_compile-model"))
        .args([
            "report",
            "examples/kimi-linear-48b-a3b.toml",
            "--gpu",
            "h200",
            "--context",
            "131072",
            "--batch",
            "8",
            "--json",
        ])
        .current_dir(repo())
        .output()
        .expect("run compile-model");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(v["gpu"]["gpu"], "h200");
    insta::assert_snapshot!(text);
}
