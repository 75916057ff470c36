//! Hugging Face import paths beyond the oracle files: Kimi's original config layout, sharded
//! checkpoints, bf16/f16 weights; and a DeltaNet spec end to end.

use std::collections::HashMap;
use std::path::Path;

use lamina_ir::graph::print::print_graph;
use lamina_ir::model::Model;
use lamina_runtime::reference::Reference;
use safetensors::tensor::{Dtype, TensorView};

use crate::common::{oracle, read_all, rel_err};

fn copy_model(case: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join(case);
    std::fs::create_dir(&m).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(oracle(case).join("model").join(f), m.join(f)).unwrap();
    }
    (d, m)
}

fn prefill(dir: &Path, prompt: &[i64]) -> Vec<f64> {
    let m = Model::open(dir).unwrap_or_else(|e| panic!("{e}"));
    let w = m.weights(0).unwrap_or_else(|e| panic!("{e}"));
    let r = Reference::<f64>::new(&m.graph, &w);
    r.forward(&mut r.new_session(), prompt, &[]).unwrap().0.data
}

/// Writes tensors (f32 data) in `dtype` to a safetensors file.
fn write(path: &Path, tensors: &[(&String, &crate::common::T)], dtype: Dtype) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, t)| {
            let b: Vec<u8> = match dtype {
                Dtype::F32 => t
                    .data
                    .iter()
                    .flat_map(|&x| (x as f32).to_le_bytes())
                    .collect(),
                Dtype::BF16 => t
                    .data
                    .iter()
                    .flat_map(|&x| half::bf16::from_f64(x).to_le_bytes())
                    .collect(),
                Dtype::F16 => t
                    .data
                    .iter()
                    .flat_map(|&x| half::f16::from_f64(x).to_le_bytes())
                    .collect(),
                _ => unreachable!(),
            };
            ((*k).clone(), t.shape.clone(), b)
        })
        .collect();
    let views: HashMap<String, TensorView> = bytes
        .iter()
        .map(|(k, s, b)| (k.clone(), TensorView::new(dtype, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

const PROMPT: &[i64] = &[3, 141, 59, 26, 53, 58, 97, 93, 23, 84];

#[test]
fn kimi_original_config_layout_gives_the_same_model() {
    let (_d, m) = copy_model("kimi_linear");
    let p = m.join("config.json");
    let mut c: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    for k in [
        "layer_types",
        "mlp_layer_types",
        "linear_conv_kernel_dim",
        "linear_head_dim",
        "linear_num_heads",
    ] {
        c.remove(k);
    }
    c.insert(
        "linear_attn_config".into(),
        serde_json::json!({"full_attn_layers": [4], "kda_layers": [1, 2, 3], "num_heads": 4, "head_dim": 16, "short_conv_kernel_size": 4}),
    );
    c.insert("first_k_dense_replace".into(), 1.into());
    c.insert("moe_layer_freq".into(), 1.into());
    c.insert("mla_use_nope".into(), true.into());
    c.insert("moe_router_activation_func".into(), "sigmoid".into());
    std::fs::write(&p, serde_json::to_string(&c).unwrap()).unwrap();
    let strip = |dir: &Path| {
        print_graph(&Model::open(dir).unwrap().graph)
            .lines()
            .skip(1)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip(&m), strip(&oracle("kimi_linear").join("model")));
    assert_eq!(
        prefill(&m, PROMPT),
        prefill(&oracle("kimi_linear").join("model"), PROMPT)
    );
}

#[test]
fn sharded_checkpoint_loads_like_a_single_file() {
    let (_d, m) = copy_model("qwen3_next");
    let all = read_all(&m.join("model.safetensors"));
    std::fs::remove_file(m.join("model.safetensors")).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let ts: Vec<(&String, &crate::common::T)> = part.iter().map(|k| (*k, &all[*k])).collect();
        write(&m.join(file), &ts, Dtype::F32);
        for k in part {
            map.insert((*k).clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(m.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(
        prefill(&m, PROMPT),
        prefill(&oracle("qwen3_next").join("model"), PROMPT)
    );
}

/// bf16 and f16 checkpoints load exactly (every value converts to f32 without rounding) and
/// give logits close to the f32 checkpoint's.
#[test]
fn bf16_and_f16_checkpoints() {
    let reference = prefill(&oracle("deepseek_v3").join("model"), PROMPT);
    for dtype in [Dtype::BF16, Dtype::F16] {
        let (_d, m) = copy_model("deepseek_v3");
        let all = read_all(&m.join("model.safetensors"));
        let ts: Vec<(&String, &crate::common::T)> = all.iter().collect();
        write(&m.join("model.safetensors"), &ts, dtype);
        let model = Model::open(&m).unwrap();
        let w = model.weights(0).unwrap();
        let t = &w.tensors["layers.1.mixer.kv_b_proj"];
        let src = &all["model.layers.1.self_attn.kv_b_proj.weight"].data;
        for (got, &x) in t.data.iter().zip(src) {
            let want = match dtype {
                Dtype::BF16 => half::bf16::from_f64(x).to_f32(),
                _ => half::f16::from_f64(x).to_f32(),
            };
            assert_eq!(*got, want, "{dtype:?} weights must load exactly");
        }
        let got = prefill(&m, PROMPT);
        let err = rel_err(&got, &reference);
        println!("deepseek_v3 with {dtype:?} weights: logits rel err {err:.1e} vs f32 weights");
        assert!(err < 5e-2 && err > 0.0, "{dtype:?}: {err:e}");
    }
}

/// A DeltaNet (no decay) + GQA hybrid from a native spec: prefill + cached decode equals the
/// full forward, and the recurrence has no decay operand.
#[test]
fn deltanet_spec_runs() {
    let text = r#"
name = "deltanet-hybrid"
vocab_size = 64
hidden_size = 32
num_layers = 3
[norm]
eps = 1e-6
[layers]
pattern = "DDA"
ffn_pattern = "F"
[mixer.D]
kind = "delta"
key_heads = 2
value_heads = 2
key_head_dim = 8
value_head_dim = 8
conv_kernel = 4
[mixer.A]
kind = "gqa"
heads = 4
kv_heads = 1
head_dim = 8
rope = { theta = 10000.0, rotary_dim = 8 }
[ffn.F]
kind = "swiglu"
intermediate = 64
"#;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("deltanet.toml");
    std::fs::write(&p, text).unwrap();
    let m = Model::open(&p).unwrap();
    let g = print_graph(&m.graph);
    assert!(g.contains("update = delta, decay = none"), "{g}");
    assert!(!g.contains("decay_gate"));
    let w = m.weights(11).unwrap();
    let r = Reference::<f64>::new(&m.graph, &w);
    let prompt: Vec<i64> = (0..20).map(|i| (i * 7 % 64) as i64).collect();
    let gen = r.generate(&prompt, 3).unwrap();
    let mut full = prompt.clone();
    full.extend_from_slice(&gen.tokens[..2]);
    let (logits, _) = r.forward(&mut r.new_session(), &full, &[]).unwrap();
    for j in 1..3 {
        assert!(rel_err(gen.decode_logits.row(j), logits.row(prompt.len() - 1 + j)) < 1e-10);
    }
}

/// A bf16 checkpoint compiled with bf16 weights: whole tensors are read in place from the
/// mapped file, cut ones converted, and the plan matches the reference on the same weights.
#[test]
fn bf16_checkpoint_runs_in_a_bf16_plan() {
    use lamina_runtime::Executor;
    let (_d, m) = copy_model("kimi_linear");
    let all = read_all(&m.join("model.safetensors"));
    let ts: Vec<(&String, &crate::common::T)> = all.iter().collect();
    write(&m.join("model.safetensors"), &ts, Dtype::BF16);
    let model = Model::open(&m).unwrap();
    let w = model.weights(0).unwrap();
    let r = Reference::<f64>::new(&model.graph, &w);
    let (want, _) = r.forward(&mut r.new_session(), PROMPT, &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("a");
    let options = lamina_compiler::passes::Options {
        weights_bf16: true,
        ..Default::default()
    };
    lamina_compiler::build::build(&model, &art, lamina_targets::Target::Host, options, 0).unwrap();
    let plan = lamina_ir::plan::Plan::load(&art).unwrap();
    assert!(plan.weights.iter().all(|w| w.dtype == "bf16"));
    let mut e = lamina_runtime::host::HostEngine::load(&art, None).unwrap();
    let got: Vec<f64> = e
        .prefill(0, PROMPT)
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect();
    let err = rel_err(&got, &want.data);
    assert!(
        err < 1e-5,
        "bf16 checkpoint in a bf16 plan: rel err {err:.2e}"
    );
}
