//! Compiled host plans against the reference executor (f64): every tiny example and every
//! oracle family, prefill logits at prompt lengths around the chunk boundaries, decode logits,
//! greedy tokens, and batched decode against single-sequence runs.

use lamina_compiler::build::build;
use lamina_compiler::passes::Options;
use lamina_ir::model::Model;
use lamina_runtime::host::HostEngine;
use lamina_runtime::reference::Reference;
use lamina_runtime::Executor;
use lamina_targets::Target;

use crate::common::{rel_err, repo};

/// The four tiny examples, one per architecture family.
const TINY_EXAMPLES: [&str; 4] = [
    "examples/qwen3-next-tiny.toml",
    "examples/kimi-linear-tiny.toml",
    "examples/minimax-tiny.toml",
    "examples/deepseek-v3-tiny.toml",
];

const TOL: f64 = 1e-5;
/// Tensor-core plans end to end against the reference with the same bf16 rounding of GEMM
/// inputs (DESIGN.md's bound for bf16 operands). Many runs agree to ~4e-8; where an
/// f32-vs-f64 difference upstream flips one element's rounding by a bf16 step, the logits move
/// by up to ~5e-3 (measured over the tiny examples at lengths 1..65).
const TOL_MMA: f64 = 1e-2;
/// bf16 caches (f32 arithmetic otherwise) against the reference with its caches rounded alike:
/// the same flips (an f32 key on the other side of a bf16 midpoint than the f64 one) move a
/// cached element by one bf16 step now and then (2.4e-5 measured on qwen3-next-tiny at 300
/// tokens); unrounded caches would be off by ~1e-3.
const TOL_CACHE: f64 = 1e-4;

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

/// Prefill at several lengths (the longest through two prefill pieces), then decode steps; every
/// logit compared with the f64 reference.
fn check_model(path: &std::path::Path, lens: &[usize]) {
    check_model_with(path, lens, false, 1, 1, false);
}

/// [`check_model`]; with `bf16`, the plan reads bf16 weights and the reference computes with
/// the same bf16-rounded weights (f64 arithmetic), so the comparison stays at f32 tolerance.
/// `lanes > 1` runs split loops and reductions lane by lane, as the GPU's warp programs do;
/// `splits > 1` splits decode attention over the cached positions; `mma` computes projections
/// as tensor-core tiles (bf16 operands, so the tolerance is DESIGN's 1e-2 for them).
fn check_model_with(
    path: &std::path::Path,
    lens: &[usize],
    bf16: bool,
    lanes: u32,
    splits: usize,
    mma: bool,
) {
    check_model_options(path, lens, model_options(bf16, lanes, splits, mma));
}

/// The options of [`check_model_with`]: 256 rows per prefill launch, so lengths up to 130 run
/// in one launch (several chunks of the chunked recurrences, a partial last one) and 300 runs
/// as 256 + 44.
fn model_options(bf16: bool, lanes: u32, splits: usize, mma: bool) -> Options {
    Options {
        max_batch: 3,
        max_context: 320,
        max_prefill_rows: 256,
        keep_values: false,
        weights_bf16: bf16,
        host_lanes: lanes,
        decode_splits: splits,
        tensor_cores: mma,
        tf32_products: false,
        warpgroup_tiles: false,
        bf16_handoffs: false,
        bf16_caches: false,
        strict_fp: false,
    }
}

/// [`check_model_with`] for any options: tensor-core tiles, TF32 products or bf16 handoffs are
/// held to DESIGN's 1e-2 for bf16 operands, everything else to f32's 1e-5.
fn check_model_options(path: &std::path::Path, lens: &[usize], options: Options) {
    let (bf16, lanes, splits, mma) = (
        options.weights_bf16,
        options.host_lanes,
        options.decode_splits,
        options.tensor_cores,
    );
    let tol = if mma || options.tf32_products || options.bf16_handoffs {
        TOL_MMA
    } else if options.bf16_caches {
        TOL_CACHE
    } else {
        TOL
    };
    let (m, mut e, _dir) = engine(path, options, 0);
    let mut w = m.weights(0).unwrap();
    if bf16 {
        w = w.rounded_to_bf16();
    }
    let mut r = Reference::<f64>::new(&m.graph, &w);
    if mma {
        r = r.with_bf16_projection_inputs().with_bf16_flash_prefill();
    }
    if options.bf16_caches {
        r = r.with_bf16_caches();
    }
    let v = m.graph.vocab_size;
    let (mut worst_pre, mut worst_dec) = (0f64, 0f64);
    for &len in lens {
        let p = prompt(len, v, len);
        let mut sess = r.new_session();
        let (want, _) = r.forward(&mut sess, &p, &[]).unwrap();
        e.reset(0).unwrap();
        let got = e.prefill(0, &p).unwrap();
        let got: Vec<f64> = got.iter().map(|&x| x as f64).collect();
        let err = rel_err(&got, &want.data);
        assert!(
            err <= tol,
            "{} prefill len {len}: rel err {err:.3e}",
            path.display()
        );
        worst_pre = worst_pre.max(err);
        // Two decode steps.
        for step in 0..2 {
            let tok = ((step * 31 + len) % v) as i64;
            let want = r.decode_step(&mut sess, tok).unwrap();
            let got = e.decode(&[(0, tok)]).unwrap();
            let got: Vec<f64> = got.iter().map(|&x| x as f64).collect();
            let err = rel_err(&got, &want.data);
            assert!(
                err <= tol,
                "{} decode step {step} after {len}: rel err {err:.3e}",
                path.display()
            );
            worst_dec = worst_dec.max(err);
        }
    }
    eprintln!(
        "compiled host {}{} vs reference f64, {}: max rel err prefill {worst_pre:.2e}, decode {worst_dec:.2e} (lengths {lens:?})",
        if mma { "tensor-core tiles (bf16 operands)" } else if bf16 { "bf16 weights" } else { "f32" }.to_string()
            + if options.tf32_products { ", TF32 products" } else { "" }
            + if options.bf16_caches { ", bf16 caches" } else { "" },
        if lanes > 1 { format!(", {lanes} emulated lanes") } else { String::new() }
            + &if splits > 1 { format!(", decode attention in {splits} pieces") } else { String::new() },
        path.display()
    );
    if mma || options.bf16_caches {
        // The rounding is real: the reference without it is further away than the bound
        // (tensor cores: bf16 noise in the prefill logits; bf16 caches: in a decode step,
        // which reads the rounded cache of the whole prompt).
        let plain = Reference::<f64>::new(&m.graph, &w);
        let p = prompt(lens[0], v, 7);
        let mut sess = plain.new_session();
        let (mut want, _) = plain.forward(&mut sess, &p, &[]).unwrap();
        e.reset(0).unwrap();
        let mut got = e.prefill(0, &p).unwrap().to_vec();
        if !mma {
            want = plain.decode_step(&mut sess, 1).unwrap();
            got = e.decode(&[(0, 1)]).unwrap().to_vec();
        }
        let got: Vec<f64> = got.iter().map(|&x| x as f64).collect();
        let err = rel_err(&got, &want.data);
        if mma {
            assert!(
                err > 1e-4,
                "{}: a tensor-core plan within {err:.2e} of f32 arithmetic: were the operands rounded?",
                path.display()
            );
        } else {
            assert!(
                err > TOL_CACHE,
                "{}: a bf16-cache plan within {err:.2e} of f32 caches: were the caches rounded?",
                path.display()
            );
        }
    }
}

/// Plans reading bf16 weights (every GPU plan does) against the reference on the same rounded
/// weights: the bf16 loads, the in-place mapping and the conversion at load are exact.
#[test]
fn bf16_weight_plans_match_the_reference() {
    for ex in [
        "examples/qwen3-next-tiny.toml",
        "examples/kimi-linear-tiny.toml",
        "examples/minimax-tiny.toml",
        "examples/deepseek-v3-tiny.toml",
        "tests/fixtures/oracle/kimi_linear/model",
    ] {
        check_model_with(&repo().join(ex), &[1, 65], true, 1, 1, false);
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
#[ignore = "debugging aid: LAMINA_DEBUG_MODEL=examples/x.toml LAMINA_DEBUG_LEN=5 [LAMINA_DEBUG_MMA=1: tensor-core plan vs the rounding reference] [LAMINA_DEBUG_TOL=1e-4]"]
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
        weights_bf16: std::env::var("LAMINA_DEBUG_MMA").is_ok(),
        host_lanes: 1,
        decode_splits: 1,
        tensor_cores: std::env::var("LAMINA_DEBUG_MMA").is_ok(),
        tf32_products: false,
        warpgroup_tiles: false,
        bf16_handoffs: false,
        bf16_caches: false,
        strict_fp: false,
    };
    let (m, mut e, _dir) = engine(&path, options, 0);
    let mut w = m.weights(0).unwrap();
    if options.weights_bf16 {
        w = w.rounded_to_bf16();
    }
    let mut r = Reference::<f64>::new(&m.graph, &w);
    if options.tensor_cores {
        r = r.with_bf16_projection_inputs().with_bf16_flash_prefill();
    }
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
    e.reset(0).unwrap();
    e.prefill(0, &p).unwrap();
    for n in &names {
        let (Some(want), Some(got)) = (taps.get(n), e.value(false, n, len)) else {
            continue;
        };
        let got: Vec<f64> = got.iter().map(|&x| x as f64).collect();
        let err = rel_err(&got, &want.data);
        eprintln!("{n}: {err:.3e}");
        if err > std::env::var("LAMINA_DEBUG_TOL").map_or(TOL, |t| t.parse().unwrap_or(TOL)) {
            panic!("first divergence at {n}: {err:.3e}");
        }
    }
}

/// Every oracle family (real Hugging Face checkpoint layouts) compiled: logits against the f64
/// reference at the chunk-boundary lengths, and greedy tokens identical to transformers'.
#[test]
fn oracle_families_match_reference_and_oracle_tokens() {
    for case in [
        "qwen3_next",
        "kimi_linear",
        "deepseek_v3",
        "deepseek_v3_yarn",
        "minimax",
    ] {
        let model = crate::common::oracle(case).join("model");
        check_model(&model, &[1, 63, 64, 65, 130, 300]);
        let exp =
            crate::common::read_all(&crate::common::oracle(case).join("expected.safetensors"));
        let options = Options {
            max_batch: 1,
            max_context: 160,
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
        let (_, mut e, _dir) = engine(&model, options, 0);
        for len in [7, 33, 100] {
            let (ids, want) = crate::common::oracle_prompt(&exp, len);
            let g = e.generate(&[ids], want.len()).unwrap().pop().unwrap();
            assert_eq!(
                g.tokens, want,
                "{case} prompt {len}: compiled greedy tokens differ from the oracle"
            );
        }
    }
}

/// Three different prompts decoded together give the tokens and logits of each run alone.
#[test]
fn batched_decode_matches_single_runs() {
    for ex in ["kimi-linear-tiny", "qwen3-next-tiny"] {
        let path = repo().join(format!("examples/{ex}.toml"));
        let options = Options {
            max_batch: 3,
            max_context: 64,
            max_prefill_rows: 16,
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
        let (m, mut e, _dir) = engine(&path, options, 0);
        let v = m.graph.vocab_size;
        let prompts: Vec<Vec<i64>> = [5, 17, 40]
            .iter()
            .enumerate()
            .map(|(i, &n)| prompt(n, v, i + 3))
            .collect();
        let together = e.generate(&prompts, 6).unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let alone = e
                .generate(std::slice::from_ref(p), 6)
                .unwrap()
                .pop()
                .unwrap();
            assert_eq!(together[i].tokens, alone.tokens, "{ex} prompt {i}");
            let a: Vec<f64> = together[i]
                .decode_logits
                .iter()
                .map(|&x| x as f64)
                .collect();
            let b: Vec<f64> = alone.decode_logits.iter().map(|&x| x as f64).collect();
            let err = rel_err(&a, &b);
            assert!(
                err <= TOL,
                "{ex} prompt {i}: batched vs alone rel err {err:.3e}"
            );
        }
    }
}

/// The runtime must not link MLIR or LLVM.
#[test]
fn runtime_does_not_depend_on_mlir_or_llvm() {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "lamina-runtime",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(repo())
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    for banned in ["melior", "mlir-sys", "inkwell", "llvm-sys"] {
        assert!(
            !tree.lines().any(|l| l.starts_with(&format!("{banned} "))),
            "lamina-runtime depends on {banned}:\n{tree}"
        );
    }
    assert!(
        tree.contains("lamina-ir"),
        "unexpected cargo tree output:\n{tree}"
    );
}

/// The GPU's split arithmetic on the CPU: every split loop and reduction dealt to 32 lanes
/// (lane j takes iterations j, j + 32, ...; partials combined after), as warp programs do on
/// the GPU, against the reference. Checks the lane bounds, steps, initial values and the
/// combination of partials (sums and maxima, ragged trip counts) for every kernel family.
#[test]
fn split_lanes_match_the_reference() {
    for ex in [
        "examples/qwen3-next-tiny.toml",
        "examples/kimi-linear-tiny.toml",
        "examples/minimax-tiny.toml",
        "examples/deepseek-v3-tiny.toml",
        "tests/fixtures/oracle/qwen3_next/model",
    ] {
        check_model_with(&repo().join(ex), &[1, 65], true, 32, 1, false);
    }
}

/// Projections and experts as tensor-core tiles, as GPU plans compute them, end to end:
/// operands rounded to bf16, f32 accumulation, 32-row × 16-column tiles with ragged last tiles
/// (65 rows: 2 full tiles and one of 1 row), fused norm prologues and residual epilogues; once
/// with the lanes emulated. The reference rounds the GEMM inputs the same way; the unrounded
/// reference must be measurably further away (the rounding happened).
///
/// End to end the two only agree to DESIGN's bf16 bound: where an f32-vs-f64 difference flips
/// one element's rounding, the random tiny models amplify it layer after layer (measured up to
/// ~5e-3 at 65 tokens, 2.2e-2 for qwen3-next-tiny at 300). The arithmetic itself is checked
/// tightly op by op (`tensor_core_ops_match_the_reference_op_by_op`) and per tile in
/// `lamina-targets` (`mma_tiles_compute_rounded_products_exactly`).
#[test]
fn tensor_core_tiles_match_the_reference() {
    for ex in TINY_EXAMPLES {
        check_model_with(&repo().join(ex), &[1, 65], true, 1, 1, true);
    }
    check_model_with(
        &repo().join("tests/fixtures/oracle/qwen3_next/model"),
        &[65],
        true,
        32,
        1,
        true,
    );
}

/// Options of a plan with TF32 products (bf16 weights, f32 projections: only the products
/// differ from [`check_model`]'s plans).
fn tf32_options(lanes: u32) -> Options {
    Options {
        tf32_products: true,
        bf16_handoffs: false,
        bf16_caches: false,
        strict_fp: false,
        ..model_options(true, lanes, 1, false)
    }
}

/// `check_model_options` with TF32 products, and the rounding is real: at 65 tokens the logits
/// move away from those of the same plan with f32 products, by less than the bound.
fn check_tf32_products(ex: &str) {
    let path = repo().join(ex);
    check_model_options(&path, &[1, 65], tf32_options(1));
    let logits = |o: Options| -> Vec<f64> {
        let (m, mut e, _dir) = engine(&path, o, 0);
        let p = prompt(65, m.graph.vocab_size, 5);
        e.reset(0).unwrap();
        let got = e.prefill(0, &p).unwrap();
        got.iter().map(|&x| x as f64).collect()
    };
    let moved = rel_err(
        &logits(tf32_options(1)),
        &logits(model_options(true, 1, 1, false)),
    );
    assert!(
        moved > 1e-6 && moved < TOL_MMA,
        "{ex}: tf32 moved logits by {moved:.3e}"
    );
}

/// Plans built with TF32 products (`--products tf32`, experimental): attention's and the
/// chunked recurrences' products as single TF32 MMAs, the host rounding the operands to TF32
/// as a GPU plan does. Within DESIGN's bound for bf16 operands on the Qwen3-Next and Kimi tiny
/// examples (one token, 65) and the Qwen3-Next oracle checkpoint with lanes emulated; at 300
/// tokens qwen3-next-tiny reaches 1.35e-2 (its bf16 projections alone reach 2.2e-2 there).
#[test]
fn tf32_products_match_the_reference() {
    for ex in [
        "examples/qwen3-next-tiny.toml",
        "examples/kimi-linear-tiny.toml",
    ] {
        check_tf32_products(ex);
    }
    check_model_options(
        &repo().join("tests/fixtures/oracle/qwen3_next/model"),
        &[65],
        tf32_options(32),
    );
}

/// Plans whose chunked recurrences hand over bf16 (`--handoffs bf16`, experimental) end to
/// end, on the tiny examples where the random model keeps the per-op error (at most 3.1e-3,
/// see `recurrences_and_attention_match_the_reference_op_by_op`) within DESIGN's bound:
/// Kimi's KDA (4.0e-3 prefill, 5.9e-3 decode) and MiniMax's lightning attention (1.1e-3,
/// 2.1e-3).
#[test]
fn bf16_handoffs_match_the_reference() {
    for ex in [
        "examples/kimi-linear-tiny.toml",
        "examples/minimax-tiny.toml",
    ] {
        let options = Options {
            bf16_handoffs: true,
            ..model_options(true, 1, 1, false)
        };
        check_model_options(&repo().join(ex), &[1, 65], options);
    }
}

/// Plans with bf16 KV and latent caches (GPU builds' default) against the reference with its
/// caches rounded alike: every example family (GQA, MLA, both with and without a decode
/// split), prefill in one launch and in two (the second attending to cached bf16 rows), then
/// decode; f32 arithmetic otherwise, so the f32 bound holds. And with everything an sm_90a
/// plan does (bf16 weights, tensor cores, a split decode, lanes emulated, warpgroup tiles) at
/// DESIGN's bound for bf16 operands.
#[test]
fn bf16_caches_match_the_reference() {
    for ex in TINY_EXAMPLES {
        for splits in [1, 4] {
            let options = Options {
                bf16_caches: true,
                strict_fp: false,
                ..model_options(false, 1, splits, false)
            };
            check_model_options(&repo().join(ex), &[65, 300], options);
        }
        let options = Options {
            bf16_caches: true,
            strict_fp: false,
            warpgroup_tiles: true,
            ..model_options(true, 32, 4, true)
        };
        check_model_options(&repo().join(ex), &[65], options);
    }
}

/// sm_90a's tiles of the chunked recurrences' products (64 rows, `Options::warpgroup_tiles`,
/// run as `wgmma` there) as the host runs them: against the reference at f32's bound for the
/// linear-attention examples, prefill of one token, one chunk and a token (a second, one-row
/// chunk), two chunks and a ragged third, and two launches (256 + 44 rows), then decode; and
/// with split loops run lane by lane as the GPU's warps do.
#[test]
fn warpgroup_tiles_match_the_reference() {
    for ex in &TINY_EXAMPLES[..3] {
        for lanes in [1, 32] {
            let options = Options {
                warpgroup_tiles: true,
                ..model_options(false, lanes, 1, false)
            };
            check_model_options(&repo().join(ex), &[1, 65, 150, 300], options);
        }
    }
}

/// Why TF32 products and bf16 handoffs stay experimental: end to end, some tiny random models
/// amplify their per-op errors (TF32 at most 5.6e-4, bf16 handoffs 3.1e-3 on every recurrence
/// and attention output, see `recurrences_and_attention_match_the_reference_op_by_op`) past
/// DESIGN's bound for logits, and not monotonically (MiniMax with both passes).
#[test]
#[ignore = "not validated end to end: TF32 products reach 8.6e-2 on deepseek-v3-tiny and \
            3.6e-2 on minimax-tiny, bf16 handoffs 2.0e-2 on qwen3-next-tiny, at 65 tokens, \
            over DESIGN's 1e-2, though each op is within 6e-4 and 3.1e-3"]
fn reduced_precision_misses_end_to_end() {
    for ex in [
        "examples/minimax-tiny.toml",
        "examples/deepseek-v3-tiny.toml",
    ] {
        check_tf32_products(ex);
    }
    let options = Options {
        bf16_handoffs: true,
        bf16_caches: false,
        strict_fp: false,
        ..model_options(true, 1, 1, false)
    };
    check_model_options(
        &repo().join("examples/qwen3-next-tiny.toml"),
        &[1, 65],
        options,
    );
}

/// The recurrences and attention op by op, on the plan's own inputs: every recurrence and
/// attention output a 200-token prefill stores (three chunks and seven key tiles, one launch),
/// and every gated norm (a recurrence fused into the kernels that write it), recomputed by the
/// reference (f64) from the values the plan stored for their inputs; what the plan fused and
/// never stored (short convs, L2 norms, gates) is recomputed from its own inputs in turn. Only
/// these ops' arithmetic differs, so no drift across layers hides an error or inflates one:
/// with f32 products as a GPU forms them (3xTF32, 32 lanes emulated) within `F32_OP`, with TF32
/// products within `TF32_OP`.
#[test]
fn recurrences_and_attention_match_the_reference_op_by_op() {
    use lamina_ir::graph::Op;
    use lamina_runtime::reference::tensor::Mat;
    use std::collections::HashMap;
    const F32_OP: f64 = 2e-5;
    const TF32_OP: f64 = 2e-3;
    // DESIGN's bound for bf16 operands.
    const BF16_OP: f64 = 1e-2;
    // Tensor-core plans' bf16 flash attention against the reference's model of it: f32 against
    // f64 arithmetic, and the rare bf16 rounding of a probability that differs.
    const FLASH_OP: f64 = 2e-5;
    // The reference's model of flash attention tiles the keys as the kernels do.
    assert_eq!(
        lamina_runtime::reference::attention::FLASH_KEY_TILE,
        lamina_compiler::kernels::attention::FLASH_K
    );
    for ex in TINY_EXAMPLES {
        let path = repo().join(ex);
        for (tf32, bf16h, mma, tol, mode) in [
            (false, false, false, F32_OP, "f32 (3xTF32) products"),
            (true, false, false, TF32_OP, "tf32 products"),
            (false, true, false, BF16_OP, "bf16 handoffs"),
            (
                false,
                false,
                true,
                FLASH_OP,
                "tensor cores (bf16 flash prefill)",
            ),
        ] {
            let options = Options {
                max_batch: 1,
                max_context: 256,
                max_prefill_rows: 256,
                keep_values: true,
                weights_bf16: true,
                host_lanes: 32,
                decode_splits: 1,
                tensor_cores: mma,
                tf32_products: tf32,
                warpgroup_tiles: false,
                bf16_handoffs: bf16h,
                bf16_caches: false,
                strict_fp: false,
            };
            let (m, mut e, _dir) = engine(&path, options, 0);
            let g = &m.graph;
            let w = m.weights(0).unwrap().rounded_to_bf16();
            let mut r = Reference::<f64>::new(g, &w);
            if mma {
                r = r.with_bf16_flash_prefill();
            }
            let len = 200;
            let p = prompt(len, g.vocab_size, 11);
            e.reset(0).unwrap();
            e.prefill(0, &p).unwrap();
            let mut stored = HashMap::new();
            for n in g.schedule() {
                if let Some(v) = e.value(false, &g.node(n).name, len) {
                    let data = v.iter().map(|&x| x as f64).collect::<Vec<_>>();
                    let cols = data.len() / len;
                    stored.insert(
                        n,
                        Mat {
                            rows: len,
                            cols,
                            data,
                        },
                    );
                }
            }
            // Recurrences are checked directly or through the gated norm fused after them
            // (whose kernel writes the stored value); attention outputs always directly.
            let count = |f: &dyn Fn(&Op) -> bool| {
                g.schedule()
                    .into_iter()
                    .filter(|&n| f(&g.node(n).op))
                    .count()
            };
            let attention = |op: &Op| matches!(op, Op::Attention { .. } | Op::MlaAttention { .. });
            let recurrent = |op: &Op| matches!(op, Op::Recurrence { .. } | Op::GatedRmsNorm { .. });
            let (attn_nodes, rec_nodes) = (
                count(&attention),
                count(&|op| matches!(op, Op::Recurrence { .. })),
            );
            let (mut attn_checked, mut rec_checked) = (0, 0);
            let (mut checked, mut worst) = (0, 0f64);
            for n in g.schedule() {
                let node = g.node(n);
                let mixer = matches!(
                    node.op,
                    Op::Recurrence { .. }
                        | Op::Attention { .. }
                        | Op::MlaAttention { .. }
                        | Op::GatedRmsNorm { .. }
                );
                let Some(got) = stored.get(&n).filter(|_| mixer) else {
                    continue;
                };
                let want = r.eval_from(n, &p, &|i| stored.get(&i).cloned());
                let err = rel_err(&got.data, &want.data);
                assert!(err <= tol, "{ex} ({mode}) {}: rel err {err:.3e}", node.name);
                checked += 1;
                attn_checked += usize::from(attention(&node.op));
                rec_checked += usize::from(recurrent(&node.op));
                worst = worst.max(err);
            }
            assert_eq!(
                attn_checked, attn_nodes,
                "{ex}: attention outputs not all stored"
            );
            assert!(
                rec_checked >= rec_nodes,
                "{ex}: {rec_checked} of {rec_nodes} recurrences"
            );
            eprintln!(
                "{ex}, {mode}: {checked} recurrence/attention outputs op by op, worst rel err {worst:.2e}"
            );
        }
    }
}

/// Tensor-core plans store the activations that only GEMMs read (attention and recurrence
/// outputs before `o_proj`, SwiGLU outputs, the experts' intermediate rows) or bf16 prefill
/// attention reads as its queries (GQA's and MLA's `q`) as bf16; the GEMMs and the attention round
/// their operands to bf16 anyway, so the logits are bit for bit those of the same plan
/// with every activation f32 (`keep_values` plans keep all f32), in prefill (two launches) and
/// decode. And the plan really is narrower: some activation parameters are bf16. Likewise the
/// row-wise maps (`inline-maps`): in the first plan the kernels reading a map's output
/// element-wise compute it themselves (the decode projections split over their depth: the
/// sums of their partial products; residual adds, gates), in the `keep_values` plan the map
/// is a launch of its own; the same f32 operations, so no bit differs either. Both plans compute strictly (`strict_fp`): with `reassoc` LLVM may vectorise a consumer's sum
/// differently when it widens bf16 than when it rounds f32 (on an AVX2 CPU the logits then
/// differ by up to 2.5e-3 on qwen3-next-tiny, bf16 flips amplified by the layers).
#[test]
fn bf16_gemm_operands_change_no_bit() {
    use lamina_compiler::kernels::{Bind, Phase};
    use lamina_ir::kernel::Elem;
    for ex in TINY_EXAMPLES {
        let path = repo().join(ex);
        let options = |keep_values| Options {
            max_batch: 2,
            max_context: 320,
            max_prefill_rows: 256,
            keep_values,
            weights_bf16: true,
            host_lanes: 1,
            decode_splits: 1,
            tensor_cores: true,
            tf32_products: false,
            warpgroup_tiles: false,
            bf16_handoffs: false,
            bf16_caches: false,
            strict_fp: true,
        };
        let m = Model::open(&path).unwrap();
        for (keep, want_bf16) in [(false, true), (true, false)] {
            let (p, _) = lamina_compiler::build::compile_program(&m, options(keep)).unwrap();
            for phase in [Phase::Prefill, Phase::Decode] {
                let narrow = p.schedules[&phase]
                    .iter()
                    .flat_map(|l| l.kernel.params.iter().zip(&l.args))
                    .filter(|(q, b)| matches!(b, Bind::Act(_)) && q.elem == Elem::Bf16)
                    .count();
                assert_eq!(narrow > 0, want_bf16, "{ex} {phase:?} keep_values {keep}");
            }
            // Split-K sums inlined into their readers (not with keep_values, whose values all
            // stay inspectable).
            let folded = p.schedules[&Phase::Decode]
                .iter()
                .filter(|l| {
                    l.args.iter().zip(&l.kernel.params).any(|(b, q)| {
                        matches!(b, Bind::Act(lamina_compiler::kernels::Value::Temp(..)))
                            && q.access == lamina_ir::kernel::Access::Read
                    }) && l.kernel.name.contains("_sum")
                        && !l.kernel.name.starts_with("splitk_sum")
                })
                .count();
            assert_eq!(
                folded > 0,
                want_bf16,
                "{ex}: {folded} launches add split-K pieces"
            );
            // Sibling launches fused (horizontal fusion, also not with keep_values): the
            // comparison below checks the fused kernels bit for bit.
            let fused = p.schedules[&Phase::Decode]
                .iter()
                .filter(|l| {
                    let n = &l.kernel.name;
                    n.starts_with("group")
                        || n.rsplit_once("_x")
                            .is_some_and(|(_, c)| c.parse::<usize>().is_ok())
                })
                .count();
            assert_eq!(fused > 0, want_bf16, "{ex}: {fused} fused sibling launches");
        }
        let (_, mut narrow, _d1) = engine(&path, options(false), 0);
        let (_, mut wide, _d2) = engine(&path, options(true), 0);
        let p = prompt(300, m.graph.vocab_size, 5);
        let mut got = Vec::new();
        for e in [&mut narrow, &mut wide] {
            e.reset(0).unwrap();
            let mut logits = e.prefill(0, &p).unwrap().to_vec();
            for tok in [3, 11] {
                logits.extend(e.decode(&[(0, tok)]).unwrap().iter());
            }
            assert!(logits.iter().all(|x| x.is_finite()), "{ex}");
            got.push(logits);
        }
        let differ = got[0]
            .iter()
            .zip(&got[1])
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differ, 0, "{ex}: {differ} logits differ");
        // Values stored as bf16 are not offered as f32 rows.
        let mut hidden = 0;
        for n in m.graph.schedule() {
            let node = m.graph.node(n);
            match narrow.value(true, &node.name, 1) {
                Some(v) => assert_eq!(v.len(), node.ty.cols.unwrap_or(1), "{ex} {}", node.name),
                None => hidden += 1,
            }
        }
        assert!(hidden > 0, "{ex}: every decode value offered");
    }
}

/// Tensor-core plans op by op, without drift across layers: every projection and MoE node
/// whose value the plan keeps, recomputed by the reference (f64, the same bf16 rounding of its
/// GEMM inputs) from the plan's own input to that node. Only this op's arithmetic differs, so
/// the bound is tight; a rare rounding flip (an f32 product at a bf16 midpoint) moves one term
/// of one dot product by a bf16 step. Prefill of 200 tokens (7 tiles of 32 rows, the last
/// ragged), and a decode step at batch 1.
#[test]
fn tensor_core_ops_match_the_reference_op_by_op() {
    for ex in TINY_EXAMPLES {
        let path = repo().join(ex);
        // 600 rows in one launch: 1200 routed assignments over 8 experts, so experts get more
        // than one 128-row block of the grouped GEMMs, and the sort runs over 19 chunks.
        let options = Options {
            max_batch: 2,
            max_context: 640,
            max_prefill_rows: 640,
            keep_values: true,
            weights_bf16: true,
            host_lanes: 1,
            decode_splits: 1,
            tensor_cores: true,
            tf32_products: false,
            warpgroup_tiles: false,
            bf16_handoffs: false,
            bf16_caches: false,
            strict_fp: false,
        };
        let (m, mut e, _dir) = engine(&path, options, 0);
        let w = m.weights(0).unwrap().rounded_to_bf16();
        let r = Reference::<f64>::new(&m.graph, &w).with_bf16_projection_inputs();
        let len = 600;
        let p = prompt(len, m.graph.vocab_size, 3);
        e.reset(0).unwrap();
        e.prefill(0, &p).unwrap();
        let mut checked = 0;
        let mut worst = 0f64;
        for decode in [false, true] {
            if decode {
                e.decode(&[(0, 5)]).unwrap();
            }
            let rows = if decode { 1 } else { len };
            for n in m.graph.schedule() {
                let node = m.graph.node(n);
                let Some(&input) = m.graph.inputs(n).first() else {
                    continue;
                };
                let (Some(x), Some(got)) = (
                    e.value(decode, &m.graph.node(input).name, rows),
                    e.value(decode, &node.name, rows),
                ) else {
                    continue;
                };
                let x = lamina_runtime::reference::tensor::Mat {
                    rows,
                    cols: x.len() / rows,
                    data: x.iter().map(|&v| v as f64).collect(),
                };
                let Some(want) = r.eval_projection(n, &x) else {
                    continue;
                };
                let got: Vec<f64> = got.iter().map(|&v| v as f64).collect();
                let err = rel_err(&got, &want.data);
                assert!(
                    err <= 1e-4,
                    "{ex} {} {}: rel err {err:.3e}",
                    if decode { "decode" } else { "prefill" },
                    node.name
                );
                worst = worst.max(err);
                checked += 1;
            }
        }
        assert!(checked >= 8, "{ex}: only {checked} projections checked");
        eprintln!("{ex}: {checked} projection/MoE values (prefill 200 rows, decode 1) within {worst:.2e} of the reference");
    }
}

/// Rows wider than one program's block of columns (`elementwise::MAP_COLS` = 256): hidden 320
/// and intermediate 576 give ragged column blocks in the embedding, the SwiGLU, the residual
/// adds and the split-K sums; with f32 projections and with tensor-core tiles.
#[test]
fn wide_rows_span_several_programs() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("wide.toml");
    std::fs::write(
        &spec,
        "name = \"wide\"\nvocab_size = 97\nhidden_size = 320\nnum_layers = 2\n\n[norm]\neps = 1e-6\n\n\
         [layers]\npattern = \"A\"\nffn_pattern = \"F\"\n\n\
         [mixer.A]\nkind = \"gqa\"\nheads = 4\nkv_heads = 2\nhead_dim = 64\n\
         rope = { theta = 10000.0, rotary_dim = 64 }\n\n[ffn.F]\nkind = \"swiglu\"\nintermediate = 576\n",
    )
    .unwrap();
    check_model_with(&spec, &[1, 40], false, 1, 1, false);
    check_model_with(&spec, &[1, 40], true, 1, 1, true);
}

/// Decode MoE experts whose intermediate width is not a whole number of column blocks: 8
/// experts chosen per row at intermediate 2052 give 16-column blocks (1032 programs at batch 1,
/// `linear::decode_cols`), the last one 4 columns wide, its rows clamped and stores guarded;
/// checked against the reference, lanes also run one by one as a warp's.
#[test]
fn decode_moe_blocks_may_be_ragged() {
    use lamina_compiler::kernels::linear::decode_cols;
    assert_eq!(decode_cols(8, 2052), 16);
    assert_ne!(2052 % decode_cols(8, 2052), 0);
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("ragged-moe.toml");
    std::fs::write(
        &spec,
        "name = \"ragged-moe\"\nvocab_size = 97\nhidden_size = 64\nnum_layers = 1\n\n[norm]\neps = 1e-6\n\n\
         [layers]\npattern = \"A\"\nffn_pattern = \"M\"\n\n\
         [mixer.A]\nkind = \"gqa\"\nheads = 2\nkv_heads = 1\nhead_dim = 32\n\
         rope = { theta = 10000.0, rotary_dim = 32 }\n\n\
         [ffn.M]\nkind = \"moe\"\nexperts = 8\ntop_k = 8\nintermediate = 2052\nrouter = \"softmax\"\n\
         renormalize = true\nshared_intermediate = 16\n",
    )
    .unwrap();
    check_model_with(&spec, &[1, 5], false, 1, 1, false);
    check_model_with(&spec, &[1, 5], false, 32, 1, false);
}

/// Recurrences whose value heads span several scan programs (16 state columns each: 3 for
/// dv 48, 5 for lightning's dv 40 in 8-column tiles) and whose key width is not the tiny
/// examples' 16, prefilled over several chunks and across two prefill launches (300 = 256 +
/// 44), with the lanes run one by one as a warp's and without.
#[test]
fn wide_recurrences_span_several_scan_programs() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("wide-rec.toml");
    std::fs::write(
        &spec,
        "name = \"wide-rec\"\nvocab_size = 97\nhidden_size = 64\nnum_layers = 3\n\n[norm]\neps = 1e-6\n\n\
         [layers]\npattern = \"GKL\"\nffn_pattern = \"F\"\n\n\
         [mixer.G]\nkind = \"gated_delta\"\nkey_heads = 1\nvalue_heads = 2\nkey_head_dim = 32\n\
         value_head_dim = 48\nconv_kernel = 4\n\n\
         [mixer.K]\nkind = \"kda\"\nheads = 2\nhead_dim = 48\nconv_kernel = 4\ngate_rank = 16\n\
         output_gate_rank = 16\n\n\
         [mixer.L]\nkind = \"lightning\"\nheads = 2\nhead_dim = 40\nnorm_eps = 1e-6\n\n\
         [ffn.F]\nkind = \"swiglu\"\nintermediate = 96\n",
    )
    .unwrap();
    check_model(&spec, &[1, 70, 300]);
    check_model_with(&spec, &[70], false, 32, 1, false);
}

/// The blocked deal of split sums and reductions (lanes taking blocks of 8 bf16 or 4 f32
/// consecutive iterations, read as vectors on a GPU) at widths where it runs: hidden 776 is 3
/// rounds of 8 × 32 bf16 weights and a remainder of 8 (norms, routers, the experts' gate and
/// up, the split-K projections), head and expert widths of 128 and 264 whole and ragged rounds
/// of 4 × 32 f32 (the recurrent decode step, the experts' down); lanes emulated, bf16 weights,
/// against the reference.
#[test]
fn blocked_lanes_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("blocked.toml");
    std::fs::write(
        &spec,
        "name = \"blocked\"\nvocab_size = 97\nhidden_size = 776\nnum_layers = 3\n\n[norm]\neps = 1e-6\n\n\
         [layers]\npattern = \"GKA\"\nffn_pattern = \"M\"\n\n\
         [mixer.G]\nkind = \"gated_delta\"\nkey_heads = 1\nvalue_heads = 2\nkey_head_dim = 128\n\
         value_head_dim = 128\nconv_kernel = 4\n\n\
         [mixer.K]\nkind = \"kda\"\nheads = 1\nhead_dim = 128\nconv_kernel = 4\ngate_rank = 16\n\
         output_gate_rank = 16\n\n\
         [mixer.A]\nkind = \"gqa\"\nheads = 2\nkv_heads = 1\nhead_dim = 128\n\
         rope = { theta = 10000.0, rotary_dim = 32 }\n\n\
         [ffn.M]\nkind = \"moe\"\nexperts = 4\ntop_k = 2\nintermediate = 264\nrouter = \"softmax\"\n\
         renormalize = true\nshared_intermediate = 16\n",
    )
    .unwrap();
    check_model_with(&spec, &[1, 65], true, 32, 1, false);
}

/// MLA prefill (keys and values expanded, then flash attention) with ragged tiles: the expand
/// GEMM is 168 columns (2 heads × (48 + 36)) over a latent depth of 96, so its last column tile
/// is ragged both as f32 32 × 16 tiles (168 = 10·16 + 8) and as tensor-core 128 × 64 tiles
/// (2·64 + 40), its row tiles ragged at the cached positions; logits 48 + 16 deep, values 36
/// wide. Prompts within one 64-row block, over several blocks and key tiles, and across two
/// prefill launches (300 = 256 + 44: the second expands and attends to the keys of the first);
/// f32 with lanes emulated and not, and with tensor cores against the reference's bf16 flash
/// attention.
#[test]
fn wide_mla_prefill_has_ragged_tiles() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("wide-mla.toml");
    std::fs::write(
        &spec,
        "name = \"wide-mla\"\nvocab_size = 97\nhidden_size = 64\nnum_layers = 2\n\n[norm]\neps = 1e-6\n\n\
         [layers]\npattern = \"A\"\nffn_pattern = \"F\"\n\n\
         [mixer.A]\nkind = \"mla\"\nheads = 2\nq_lora_rank = 24\nkv_lora_rank = 96\n\
         qk_nope_head_dim = 48\nqk_rope_head_dim = 16\nv_head_dim = 36\n\n\
         [mixer.A.rope]\ntheta = 10000.0\nrotary_dim = 16\n\n\
         [ffn.F]\nkind = \"swiglu\"\nintermediate = 96\n",
    )
    .unwrap();
    check_model(&spec, &[1, 70, 300]);
    check_model_with(&spec, &[130], false, 32, 1, false);
    check_model_with(&spec, &[70, 300], true, 1, 1, true);
}

/// Multi-query attention (36 query heads on one KV head): the group is more than one decode
/// program holds (`GQA_DECODE_HEADS` = 16), so 3 programs of 12 heads share it, each reading its
/// keys and values; whole and split decode, lanes emulated and not.
#[test]
fn multi_query_decode_shares_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("mqa.toml");
    std::fs::write(
        &spec,
        "name = \"mqa\"\nvocab_size = 97\nhidden_size = 64\nnum_layers = 2\n\n[norm]\neps = 1e-6\n\n\
         [layers]\npattern = \"A\"\nffn_pattern = \"F\"\n\n\
         [mixer.A]\nkind = \"gqa\"\nheads = 36\nkv_heads = 1\nhead_dim = 8\n\
         rope = { theta = 10000.0, rotary_dim = 8 }\n\n\
         [ffn.F]\nkind = \"swiglu\"\nintermediate = 96\n",
    )
    .unwrap();
    let m = lamina_ir::model::Model::open(&spec).unwrap();
    let options = Options {
        decode_splits: 4,
        ..model_options(false, 1, 4, false)
    };
    let (p, _) = lamina_compiler::build::compile_program(&m, options).unwrap();
    let attend = p
        .phase_kernels(lamina_compiler::kernels::Phase::Decode)
        .into_iter()
        .find(|k| k.name.starts_with("gqa_attend_"))
        .unwrap()
        .clone();
    assert_eq!(
        attend.grid[1],
        lamina_ir::kernel::Dim::N(3),
        "{}",
        attend.name
    );
    check_model_with(&spec, &[1, 40, 300], false, 1, 1, false);
    check_model_with(&spec, &[300], false, 32, 4, false);
}

/// Split-sequence decode attention: the cached positions in 4 pieces (3 key tiles each at
/// context 320), partials merged by the combine kernel, for GQA (qwen3-next, minimax) and MLA
/// (kimi, deepseek), at positions where one piece holds everything (the others are empty) and
/// where all four hold keys (300 tokens); and with the GPU's lane arithmetic emulated. Each
/// decode program attends a group of query heads (the tiny GQA models' pairs, the tiny MLA
/// models' 4 heads at once), so the per-head locals and partials are checked too.
#[test]
fn split_decode_attention_matches_the_reference() {
    for ex in TINY_EXAMPLES {
        check_model_with(&repo().join(ex), &[1, 300], false, 1, 4, false);
    }
    // The automatic split (GPU targets' default): 2 pieces of 5 tiles at context 320.
    for ex in [
        "examples/qwen3-next-tiny.toml",
        "examples/kimi-linear-tiny.toml",
    ] {
        check_model_with(&repo().join(ex), &[300], false, 32, 0, false);
    }
    check_model_with(
        &repo().join("tests/fixtures/oracle/deepseek_v3/model"),
        &[130],
        true,
        32,
        4,
        false,
    );
}
