//! Long runs (issue 7 §4), `#[ignore]`d because they take minutes: `scripts/soak` runs them in
//! release mode.
//!
//! - 10,000 decode steps of one sequence (tiny and ~110M-parameter examples): resident memory sampled every 500 steps must not
//!   grow after warm-up, and the logits at a fixed step must equal a fresh run's.
//! - 8 sequences of different lengths started and finished at different times in the slots:
//!   each gives exactly what it gives alone.

use lamina_compiler::build::build;
use lamina_compiler::passes::Options;
use lamina_ir::model::Model;
use lamina_runtime::host::HostEngine;
use lamina_runtime::reference::argmax;
use lamina_runtime::Executor;
use lamina_targets::Target;

use crate::common::repo;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn artifact(example: &str, options: Options, dir: &std::path::Path) -> std::path::PathBuf {
    let m = Model::open(&repo().join("examples").join(example)).unwrap();
    let art = dir.join(example.trim_end_matches(".toml"));
    build(&m, &art, Target::Host, options, 3).unwrap();
    art
}

/// Greedy decode of `steps` tokens after `prompt` in slot 0; returns the logits of step `keep`.
fn decode_run(
    e: &mut HostEngine,
    prompt: &[i64],
    steps: usize,
    keep: usize,
    mut sample: impl FnMut(usize),
) -> Vec<f32> {
    e.reset(0).unwrap();
    let v = e.vocab();
    let pre = e.prefill(0, prompt).unwrap();
    let mut tok = argmax(&pre[pre.len() - v..]) as i64;
    let mut kept = Vec::new();
    for step in 0..steps {
        let logits = e.decode(&[(0, tok)]).unwrap();
        if step == keep {
            kept = logits.clone();
        }
        tok = argmax(&logits) as i64;
        sample(step);
    }
    kept
}

#[test]
#[ignore = "long run: scripts/soak"]
fn soak_long_decode_neither_leaks_nor_drifts() {
    let dir = tempfile::tempdir().unwrap();
    for example in [
        "qwen3-next-tiny.toml",
        "kimi-linear-tiny.toml",
        "qwen3-next-small.toml",
    ] {
        let steps = 10_000;
        let options = Options {
            max_batch: 1,
            max_context: steps + 64,
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
        let art = artifact(example, options, dir.path());
        let mut e = HostEngine::load(&art, None).unwrap();
        let prompt: Vec<i64> = (0..40).map(|i| (i * 37 + 11) % 200).collect();
        let warm = steps / 5;
        let keep = steps / 2;
        let mut samples = Vec::new();
        let kept = decode_run(&mut e, &prompt, steps, keep, |s| {
            if s % 500 == 499 {
                samples.push((s + 1, rss_bytes()));
            }
        });
        let after_warm: Vec<u64> = samples
            .iter()
            .filter(|(s, _)| *s > warm)
            .map(|x| x.1)
            .collect();
        let (lo, hi) = (
            *after_warm.iter().min().unwrap(),
            *after_warm.iter().max().unwrap(),
        );
        eprintln!(
            "soak {example}: {steps} steps, resident {:.1}–{:.1} MiB after warm-up (samples {:?})",
            lo as f64 / (1 << 20) as f64,
            hi as f64 / (1 << 20) as f64,
            samples.iter().map(|x| x.1 >> 20).collect::<Vec<_>>()
        );
        assert!(
            hi - lo <= 2 << 20,
            "{example}: resident memory grew by {} KiB after warm-up",
            (hi - lo) >> 10
        );
        // A fresh engine reaches the same logits at the same step.
        let mut fresh = HostEngine::load(&art, None).unwrap();
        let again = decode_run(&mut fresh, &prompt, keep + 1, keep, |_| {});
        assert_eq!(kept, again, "{example}: logits at step {keep} drifted");
    }
}

#[test]
#[ignore = "long run: scripts/soak"]
fn soak_staggered_batch_equals_each_sequence_alone() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        max_batch: 8,
        max_context: 512,
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
    let art = artifact("kimi-linear-tiny.toml", options, dir.path());
    let v = {
        let e = HostEngine::load(&art, None).unwrap();
        e.vocab()
    };
    // 12 sequences through 8 slots: (prompt, tokens to generate), started as slots free up.
    let seqs: Vec<(Vec<i64>, usize)> = (0..12)
        .map(|s| {
            let len = 5 + (s * 23) % 90;
            let prompt = (0..len).map(|i| ((i * 31 + s * 7) % v) as i64).collect();
            (prompt, 20 + (s * 37) % 150)
        })
        .collect();
    // Alone: each sequence in slot 0 of its own engine run.
    let mut alone = HostEngine::load(&art, None).unwrap();
    let solo: Vec<Vec<f32>> = seqs
        .iter()
        .map(|(p, n)| {
            let g = alone.generate(std::slice::from_ref(p), *n).unwrap();
            g[0].decode_logits.clone()
        })
        .collect();
    // Together: a slot takes the next waiting sequence when its previous one finishes.
    let mut e = HostEngine::load(&art, None).unwrap();
    struct Live {
        seq: usize,
        next: i64,
        logits: Vec<f32>,
        left: usize,
    }
    let mut slots: Vec<Option<Live>> = (0..8).map(|_| None).collect();
    let mut waiting = 0..seqs.len();
    let mut done = vec![Vec::new(); seqs.len()];
    loop {
        for (s, slot) in slots.iter_mut().enumerate() {
            if slot.is_none() {
                if let Some(q) = waiting.next() {
                    e.reset(s).unwrap();
                    let pre = e.prefill(s, &seqs[q].0).unwrap();
                    let last = pre[pre.len() - v..].to_vec();
                    *slot = Some(Live {
                        seq: q,
                        next: argmax(&last) as i64,
                        logits: last,
                        left: seqs[q].1,
                    });
                }
            }
        }
        if slots.iter().all(|x| x.is_none()) {
            break;
        }
        // Record what each live sequence's token was chosen from; finish those at their end.
        let mut batch = Vec::new();
        for (s, slot) in slots.iter_mut().enumerate() {
            if let Some(l) = slot {
                done[l.seq].extend_from_slice(&l.logits);
                l.left -= 1;
                if l.left == 0 {
                    *slot = None;
                } else {
                    batch.push((s, l.next));
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        let out = e.decode(&batch).unwrap();
        for (b, &(s, _)) in batch.iter().enumerate() {
            let l = slots[s].as_mut().unwrap();
            l.logits = out[b * v..(b + 1) * v].to_vec();
            l.next = argmax(&l.logits) as i64;
        }
    }
    for (q, (got, want)) in done.iter().zip(&solo).enumerate() {
        assert_eq!(got.len(), want.len(), "sequence {q}");
        let worst = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-5,
            "sequence {q} in a staggered batch: {worst:e}"
        );
    }
    eprintln!("soak staggered batch: 12 sequences through 8 slots match their solo runs");
}
