//! The reference executor against the external oracle (transformers 5.24, float32 and float64)
//! for every family and prompt: f64 within 1e-8 relative error of the `*_f64` tensors, f32
//! within 2e-4 max-abs of them, greedy tokens identical.

use lamina_ir::model::Model;
use lamina_runtime::reference::{Real, Reference};

use crate::common::{max_abs, oracle, read_all, rel_err};

const F64_REL: f64 = 1e-8;
const F32_ABS: f64 = 2e-4;

fn to64<F: Real>(v: &[F]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64().unwrap()).collect()
}

struct Errors {
    prefill: f64,
    hidden: f64,
    decode: f64,
}

/// Prefill logits and hidden states against `*_f64`, then cached greedy decode.
fn run<F: Real>(
    m: &Model,
    w: &lamina_ir::weights::WeightStore,
    exp: &std::collections::HashMap<String, crate::common::T>,
    len: usize,
    metric: fn(&[f64], &[f64]) -> f64,
) -> Errors {
    let key = |k: &str| format!("prompt{len}.{k}");
    let (ids, want_tokens) = crate::common::oracle_prompt(exp, len);
    let r = Reference::<F>::new(&m.graph, w);
    let layers = m.graph.num_layers;
    let mut taps: Vec<String> = vec!["embed".into()];
    taps.extend((0..layers).map(|i| format!("layers.{i}.ffn_residual")));
    taps.push("final_norm".into());
    let tap_refs: Vec<&str> = taps.iter().map(|s| s.as_str()).collect();
    let mut sess = r.new_session();
    let (logits, got) = r.forward(&mut sess, &ids, &tap_refs).expect("prefill");
    let prefill = metric(&to64(&logits.data), &exp[&key("prefill_logits_f64")].data);
    let hs = &exp[&key("hidden_states_f64")];
    let per = len * m.graph.hidden_size;
    let mut hidden: f64 = 0.0;
    for (i, t) in taps.iter().enumerate() {
        let e = metric(&to64(&got[t].data), &hs.data[i * per..(i + 1) * per]);
        hidden = hidden.max(e);
    }
    let gen = r.generate(&ids, want_tokens.len()).expect("generate");
    assert_eq!(
        gen.tokens, want_tokens,
        "greedy tokens differ (prompt {len})"
    );
    let decode = metric(
        &to64(&gen.decode_logits.data),
        &exp[&key("decode_logits_f64")].data,
    );
    Errors {
        prefill,
        hidden,
        decode,
    }
}

fn check_case(case: &str) {
    let m = Model::open(&oracle(case).join("model")).expect("open oracle model");
    let w = m.weights(0).expect("load oracle weights");
    let exp = read_all(&oracle(case).join("expected.safetensors"));
    for len in [7, 33, 100] {
        let e64 = run::<f64>(&m, &w, &exp, len, rel_err);
        let e32 = run::<f32>(&m, &w, &exp, len, max_abs);
        println!(
            "oracle {case:<17} prompt {len:>3}: f64 rel err prefill {:.1e} hidden {:.1e} decode {:.1e} | f32 max-abs prefill {:.1e} hidden {:.1e} decode {:.1e}",
            e64.prefill, e64.hidden, e64.decode, e32.prefill, e32.hidden, e32.decode
        );
        for (what, v) in [
            ("prefill", e64.prefill),
            ("hidden", e64.hidden),
            ("decode", e64.decode),
        ] {
            assert!(
                v <= F64_REL,
                "{case} prompt {len}: f64 {what} relative error {v:e} > {F64_REL:e}"
            );
        }
        for (what, v) in [
            ("prefill", e32.prefill),
            ("hidden", e32.hidden),
            ("decode", e32.decode),
        ] {
            assert!(
                v <= F32_ABS,
                "{case} prompt {len}: f32 {what} max-abs error {v:e} > {F32_ABS:e}"
            );
        }
    }
}

#[test]
fn qwen3_next_matches_transformers() {
    check_case("qwen3_next");
}

#[test]
fn kimi_linear_matches_transformers() {
    check_case("kimi_linear");
}

#[test]
fn minimax_matches_transformers() {
    check_case("minimax");
}

#[test]
fn deepseek_v3_matches_transformers() {
    check_case("deepseek_v3");
}

#[test]
fn deepseek_v3_yarn_matches_transformers() {
    check_case("deepseek_v3_yarn");
}

/// The lightning decay rates Lamina derives from the config equal the buffers transformers
/// saved in the checkpoint, bit for bit.
#[test]
fn lightning_slopes_match_checkpoint_buffers() {
    let st = read_all(&oracle("minimax").join("model/model.safetensors"));
    for layer in 0..3 {
        let want = &st[&format!("model.layers.{layer}.self_attn.slope_rate")].data;
        let got = lamina_ir::graph::lightning_slopes(4, layer, 4);
        assert_eq!(&got, want, "layer {layer}");
    }
}
