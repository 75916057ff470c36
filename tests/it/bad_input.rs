//! Bad input through the real binary: each case must exit non-zero with exactly one line on
//! stderr that names the file and the field or tensor, and never panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::tensor::{Dtype, TensorView};

use crate::common::{oracle, read_all, repo};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_compile-model")
}

/// Runs the binary, which must succeed; returns stdout.
fn succeeds(args: &[&str]) -> String {
    let out = Command::new(bin())
        .args(args)
        .output()
        .expect("run compile-model");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Runs the binary and checks the error contract; returns stderr.
fn fails(args: &[&str], needles: &[&str]) -> String {
    let out = Command::new(bin())
        .args(args)
        .output()
        .expect("run compile-model");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "{args:?} succeeded; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{args:?}: error is not one line:\n{stderr}"
    );
    for n in needles {
        assert!(
            stderr.contains(n),
            "{args:?}: error does not mention {n:?}:\n{stderr}"
        );
    }
    stderr
}

fn tiny_spec() -> String {
    std::fs::read_to_string(repo().join("examples/qwen3-next-tiny.toml")).unwrap()
}

/// Writes a spec variant and checks `compile-model check` rejects it.
fn bad_spec(text: &str, needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, text).unwrap();
    let mut n = vec!["bad.toml"];
    n.extend_from_slice(needles);
    fails(&["check", p.to_str().unwrap()], &n);
}

#[test]
fn malformed_toml() {
    bad_spec("name = \"x\"\nvocab_size = [", &[":2"]);
}

#[test]
fn wrong_type_in_spec() {
    bad_spec(
        &tiny_spec().replace("hidden_size = 64", "hidden_size = \"64\""),
        &["invalid type"],
    );
}

#[test]
fn unknown_spec_field() {
    bad_spec(
        &tiny_spec().replace("hidden_size = 64", "hidden_size = 64\nhiden_size = 64"),
        &["hiden_size"],
    );
}

#[test]
fn unknown_layer_kind() {
    bad_spec(
        &tiny_spec().replace("kind = \"gated_delta\"", "kind = \"mamba\""),
        &["mamba"],
    );
}

#[test]
fn pattern_letter_without_mixer() {
    bad_spec(
        &tiny_spec().replace("pattern = \"LLLA\"", "pattern = \"LLLX\""),
        &["layers.pattern", "'X'"],
    );
}

#[test]
fn inconsistent_head_counts() {
    bad_spec(
        &tiny_spec().replace("value_heads = 4", "value_heads = 3"),
        &["mixer.L.value_heads"],
    );
}

#[test]
fn top_k_larger_than_experts() {
    bad_spec(
        &tiny_spec().replace("top_k = 2", "top_k = 9"),
        &["ffn.M.top_k"],
    );
}

#[test]
fn odd_rotary_dim() {
    bad_spec(
        &tiny_spec().replace("rotary_dim = 8", "rotary_dim = 7"),
        &["mixer.A.rope.rotary_dim"],
    );
}

#[test]
fn override_layer_out_of_range() {
    let t = tiny_spec() + "\n[[layers.override]]\nlayers = [9]\nmixer = \"A\"\n";
    bad_spec(&t, &["layers.override[0].layers"]);
}

#[test]
fn non_finite_rope_theta() {
    bad_spec(
        &tiny_spec().replace("theta = 10000.0", "theta = nan"),
        &["mixer.A.rope.theta", "finite"],
    );
}

#[test]
fn positive_kda_lower_bound() {
    let spec = std::fs::read_to_string(repo().join("examples/kimi-linear-tiny.toml")).unwrap();
    bad_spec(
        &spec.replace(
            "output_gate_rank = 16",
            "output_gate_rank = 16\nlower_bound = 5.0",
        ),
        &["mixer.K.lower_bound"],
    );
}

#[test]
fn infinite_residual_scale() {
    let spec = std::fs::read_to_string(repo().join("examples/minimax-tiny.toml")).unwrap();
    bad_spec(
        &spec.replace("ffn_alpha = 1.5", "ffn_alpha = inf"),
        &["residual.ffn_alpha"],
    );
}

/// Finite weights whose activations overflow f32: the executor names the node instead of
/// printing tokens chosen from infinite logits.
#[test]
fn overflowing_activations_are_reported() {
    let (_d, m) = hf_copy("deepseek_v3");
    edit_tensors(&m, |t| {
        for name in ["model.norm.weight", "lm_head.weight"] {
            for v in t.get_mut(name).unwrap().1.iter_mut() {
                *v *= 1e30;
            }
        }
    });
    fails(
        &["run", m.to_str().unwrap(), "--reference", "--tokens", "1,2"],
        &["node lm_head", "NaN or infinite"],
    );
}

#[test]
fn zero_layers() {
    bad_spec(
        &tiny_spec().replace("num_layers = 4", "num_layers = 0"),
        &["num_layers"],
    );
}

/// A copy of an oracle checkpoint directory to corrupt.
fn hf_copy(case: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("model");
    std::fs::create_dir(&m).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(oracle(case).join("model").join(f), m.join(f)).unwrap();
    }
    (dir, m)
}

fn edit_config(m: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = m.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn config_invalid_json() {
    let (_d, m) = hf_copy("qwen3_next");
    std::fs::write(m.join("config.json"), "{\"model_type\": ").unwrap();
    fails(
        &["check", m.to_str().unwrap()],
        &["config.json", "invalid JSON"],
    );
}

#[test]
fn config_unsupported_model_type() {
    let (_d, m) = hf_copy("qwen3_next");
    edit_config(&m, |c| {
        c.insert("model_type".into(), "llama".into());
    });
    fails(
        &["check", m.to_str().unwrap()],
        &[
            "config.json",
            "model_type",
            "qwen3_next, kimi_linear, deepseek_v3, minimax",
        ],
    );
}

#[test]
fn config_unknown_key() {
    let (_d, m) = hf_copy("kimi_linear");
    edit_config(&m, |c| {
        c.insert("sliding_window_size".into(), 512.into());
    });
    fails(
        &["check", m.to_str().unwrap()],
        &["config.json", "sliding_window_size"],
    );
}

#[test]
fn config_missing_key() {
    let (_d, m) = hf_copy("deepseek_v3");
    edit_config(&m, |c| {
        c.remove("kv_lora_rank");
    });
    fails(
        &["check", m.to_str().unwrap()],
        &["config.json", "kv_lora_rank", "missing"],
    );
}

#[test]
fn config_wrong_type() {
    let (_d, m) = hf_copy("minimax");
    edit_config(&m, |c| {
        c.insert("num_hidden_layers".into(), "4".into());
    });
    fails(
        &["check", m.to_str().unwrap()],
        &["config.json", "num_hidden_layers"],
    );
}

#[test]
fn config_unsupported_rope_type() {
    let (_d, m) = hf_copy("qwen3_next");
    edit_config(&m, |c| {
        c.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "longrope", "rope_theta": 10000.0}),
        );
    });
    fails(
        &["check", m.to_str().unwrap()],
        &["config.json", "rope_type", "longrope"],
    );
}

#[test]
fn config_unsupported_activation() {
    let (_d, m) = hf_copy("deepseek_v3");
    edit_config(&m, |c| {
        c.insert("hidden_act".into(), "gelu".into());
    });
    fails(
        &["check", m.to_str().unwrap()],
        &["config.json", "hidden_act"],
    );
}

#[test]
fn config_inconsistent_layer_types() {
    let (_d, m) = hf_copy("kimi_linear");
    edit_config(&m, |c| {
        c.insert(
            "layer_types".into(),
            serde_json::json!(["linear_attention", "full_attention"]),
        );
    });
    fails(
        &["check", m.to_str().unwrap()],
        &["config.json", "layer_types", "2 entries for 4 layers"],
    );
}

#[test]
fn config_unknown_layer_type() {
    let (_d, m) = hf_copy("minimax");
    edit_config(&m, |c| {
        c.insert(
            "layer_types".into(),
            serde_json::json!([
                "linear_attention",
                "mamba",
                "linear_attention",
                "full_attention"
            ]),
        );
    });
    fails(
        &["check", m.to_str().unwrap()],
        &["config.json", "layer_types[1]", "mamba"],
    );
}

#[test]
fn truncated_safetensors() {
    let (_d, m) = hf_copy("qwen3_next");
    let p = m.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    fails(
        &["run", m.to_str().unwrap(), "--reference", "--tokens", "1,2"],
        &["model.safetensors", "not a valid safetensors"],
    );
}

/// Rewrites the checkpoint with `f` applied to its tensor map.
fn edit_tensors(m: &Path, f: impl FnOnce(&mut HashMap<String, (Vec<usize>, Vec<f32>)>)) {
    let p = m.join("model.safetensors");
    let mut t: HashMap<String, (Vec<usize>, Vec<f32>)> = read_all(&p)
        .into_iter()
        .map(|(k, v)| (k, (v.shape, v.data.iter().map(|&x| x as f32).collect())))
        .collect();
    f(&mut t);
    let bytes: HashMap<String, (Vec<usize>, Vec<u8>)> = t
        .into_iter()
        .map(|(k, (s, d))| (k, (s, d.iter().flat_map(|x| x.to_le_bytes()).collect())))
        .collect();
    let views: HashMap<String, TensorView> = bytes
        .iter()
        .map(|(k, (s, d))| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    std::fs::write(&p, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn missing_misshaped_and_unexpected_tensors_in_one_error() {
    let (_d, m) = hf_copy("kimi_linear");
    edit_tensors(&m, |t| {
        t.remove("model.layers.1.self_attn.b_proj.weight");
        let (_, d) = t.remove("model.layers.2.self_attn.o_norm.weight").unwrap();
        t.insert(
            "model.layers.2.self_attn.o_norm.weight".into(),
            (vec![d.len() - 1], d[1..].to_vec()),
        );
        t.insert(
            "model.layers.0.self_attn.extra.weight".into(),
            (vec![2], vec![0.0, 1.0]),
        );
    });
    fails(
        &["run", m.to_str().unwrap(), "--reference", "--tokens", "1,2"],
        &[
            "1 missing: model.layers.1.self_attn.b_proj.weight",
            "1 mis-shaped: model.layers.2.self_attn.o_norm.weight",
            "1 unexpected: model.layers.0.self_attn.extra.weight",
        ],
    );
}

#[test]
fn nan_in_weights() {
    let (_d, m) = hf_copy("minimax");
    edit_tensors(&m, |t| {
        t.get_mut("model.norm.weight").unwrap().1[3] = f32::NAN;
    });
    fails(
        &["run", m.to_str().unwrap(), "--reference", "--tokens", "1,2"],
        &["model.norm.weight", "NaN"],
    );
}

#[test]
fn token_outside_vocabulary() {
    let m = oracle("deepseek_v3").join("model");
    fails(
        &[
            "run",
            m.to_str().unwrap(),
            "--reference",
            "--tokens",
            "1,256,3",
        ],
        &["tokens", "256", "0..256"],
    );
}

#[test]
fn negative_token() {
    let spec = repo().join("examples/minimax-tiny.toml");
    fails(
        &[
            "run",
            spec.to_str().unwrap(),
            "--reference",
            "--tokens",
            "4,-1",
        ],
        &["tokens", "-1"],
    );
}

#[test]
fn empty_prompt() {
    let spec = repo().join("examples/minimax-tiny.toml");
    fails(
        &["run", spec.to_str().unwrap(), "--reference", "--tokens", ""],
        &["tokens"],
    );
}

#[test]
fn missing_model_path() {
    fails(
        &["check", "/nonexistent/model.toml"],
        &["/nonexistent/model.toml"],
    );
}

#[test]
fn directory_without_config() {
    let d = tempfile::tempdir().unwrap();
    fails(&["check", d.path().to_str().unwrap()], &["config.json"]);
}

#[test]
fn zero_new_tokens() {
    let spec = repo().join("examples/minimax-tiny.toml");
    fails(
        &[
            "run",
            spec.to_str().unwrap(),
            "--reference",
            "--tokens",
            "1",
            "--max-new-tokens",
            "0",
        ],
        &["--max-new-tokens"],
    );
}

#[test]
fn logits_out_is_written_atomically_and_complete() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("logits.safetensors");
    let spec = repo().join("examples/kimi-linear-tiny.toml");
    let st = Command::new(bin())
        .args([
            "run",
            spec.to_str().unwrap(),
            "--reference",
            "--tokens",
            "5,6,7",
            "--max-new-tokens",
            "3",
            "--logits-out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let t = read_all(&out);
    assert_eq!(t["prefill_logits"].shape, vec![3, 256]);
    assert_eq!(t["decode_logits"].shape, vec![3, 256]);
    assert_eq!(t["tokens"].shape, vec![3]);
    let printed: Vec<f64> = String::from_utf8_lossy(&st.stdout)
        .trim()
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(printed, t["tokens"].data);
    assert_eq!(
        std::fs::read_dir(d.path()).unwrap().count(),
        1,
        "no temporary file left behind"
    );
}

/// A built artifact to damage.
fn artifact() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("art");
    let spec = repo().join("examples/kimi-linear-tiny.toml");
    let out = Command::new(bin())
        .args([
            "build",
            spec.to_str().unwrap(),
            "-o",
            art.to_str().unwrap(),
            "--max-context",
            "16",
            "--max-batch",
            "1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (dir, art)
}

#[test]
fn bad_artifacts() {
    let (_d, art) = artifact();
    let a = art.to_str().unwrap();
    // Prompt and generation beyond the plan's context.
    fails(
        &[
            "run",
            a,
            "--tokens",
            "1,2,3,4,5,6,7,8,9,10",
            "--max-new-tokens",
            "8",
        ],
        &["--max-context 16"],
    );
    // Token outside the vocabulary.
    fails(&["run", a, "--tokens", "1,99999"], &["tokens", "99999"]);
    // Truncated plan.json.
    let plan = art.join("plan.json");
    let text = std::fs::read_to_string(&plan).unwrap();
    std::fs::write(&plan, &text[..text.len() / 2]).unwrap();
    fails(
        &["run", a, "--tokens", "1,2"],
        &["plan.json", "not a Lamina plan"],
    );
    // Wrong schema version.
    std::fs::write(
        &plan,
        text.replacen("\"schema_version\": 3", "\"schema_version\": 99", 1),
    )
    .unwrap();
    fails(
        &["run", a, "--tokens", "1,2"],
        &["plan.json", "schema_version"],
    );
    // A weight bound to a parameter the kernel may write (an edited plan).
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let kernels = v["kernels"].as_array_mut().unwrap();
    let weight_param = kernels
        .iter_mut()
        .flat_map(|k| k["params"].as_array_mut().unwrap().iter_mut())
        .find(|p| p["name"] == "w")
        .expect("a projection weight parameter");
    weight_param["access"] = serde_json::json!("read_write");
    std::fs::write(&plan, serde_json::to_string(&v).unwrap()).unwrap();
    fails(
        &["run", a, "--tokens", "1,2"],
        &["plan.json", "may be written", "read-only"],
    );
    // A workspace smaller than its shape (MLA prefill's decompressed keys and values).
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["workspaces"][0]["bytes"] = serde_json::json!(64);
    std::fs::write(&plan, serde_json::to_string(&v).unwrap()).unwrap();
    fails(
        &["run", a, "--tokens", "1,2"],
        &["plan.json", "workspaces[0]", "mla_kv_"],
    );
    // A launch argument naming a workspace the plan does not have.
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["workspaces"] = serde_json::json!([]);
    std::fs::write(&plan, serde_json::to_string(&v).unwrap()).unwrap();
    fails(
        &["run", a, "--tokens", "1,2"],
        &["plan.json", "out of range"],
    );
    // Logits outside the arena.
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["decode"]["logits"]["arena"]["offset_per_row"] = serde_json::json!(1u64 << 40);
    std::fs::write(&plan, serde_json::to_string(&v).unwrap()).unwrap();
    fails(
        &["run", a, "--tokens", "1,2"],
        &["plan.json", "decode.logits"],
    );
    // Missing kernel library.
    std::fs::write(&plan, &text).unwrap();
    std::fs::remove_file(art.join("kernels.so")).unwrap();
    fails(&["run", a, "--tokens", "1,2"], &["kernels.so", "missing"]);
}

#[test]
fn build_refuses_to_replace_a_non_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("precious");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "keep me").unwrap();
    let spec = repo().join("examples/kimi-linear-tiny.toml");
    fails(
        &["build", spec.to_str().unwrap(), "-o", out.to_str().unwrap()],
        &["precious", "not a Lamina artifact"],
    );
    assert!(out.join("notes.txt").exists());
    // And no temporary build directory is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".lamina-build-")
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary build directories left behind"
    );
    fails(
        &[
            "build",
            spec.to_str().unwrap(),
            "-o",
            "/tmp/x",
            "--target",
            "sm_75",
        ],
        &["--target", "sm_75"],
    );
    fails(
        &[
            "build",
            spec.to_str().unwrap(),
            "-o",
            "/tmp/x",
            "--max-batch",
            "0",
        ],
        &["--max-batch"],
    );
}

#[test]
fn build_reports_checkpoint_problems_and_leaves_no_artifact() {
    let (d, m) = hf_copy("kimi_linear");
    edit_tensors(&m, |t| {
        t.remove("model.layers.1.self_attn.b_proj.weight");
        let (_, w) = t.remove("model.layers.2.self_attn.o_norm.weight").unwrap();
        t.insert(
            "model.layers.2.self_attn.o_norm.weight".into(),
            (vec![w.len() - 1], w[1..].to_vec()),
        );
    });
    let out = d.path().join("artifact");
    fails(
        &["build", m.to_str().unwrap(), "-o", out.to_str().unwrap()],
        &[
            "1 missing: model.layers.1.self_attn.b_proj.weight",
            "1 mis-shaped: model.layers.2.self_attn.o_norm.weight",
        ],
    );
    assert!(!out.exists(), "a failed build left {}", out.display());
}

/// A build killed part-way leaves nothing at the output path (the artifact is assembled in a
/// hidden temporary directory and renamed into place only when complete).
#[test]
fn killed_build_leaves_no_artifact() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("artifact");
    let mut child = Command::new(bin())
        .args(["build", "examples/qwen3-next-80b-a3b.toml", "-o"])
        .arg(&out)
        .current_dir(repo())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run compile-model");
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.kill().ok();
    let status = child.wait().unwrap();
    if status.success() {
        eprintln!("SKIP killed_build_leaves_no_artifact: the build finished within 300 ms");
        return;
    }
    assert!(!out.exists(), "a killed build left {}", out.display());
    // Whatever the temporary directory holds, it is not at a path anyone asked for, and `run`
    // refuses it unless its plan.json was completely written.
    for e in std::fs::read_dir(d.path()).unwrap() {
        let p = e.unwrap().path();
        if !p.join("plan.json").exists() {
            fails(
                &["run", p.to_str().unwrap(), "--tokens", "1"],
                &[p.file_name().unwrap().to_str().unwrap()],
            );
        }
    }
}

/// An artifact reads its weights where the checkpoint was when it was built; after the
/// checkpoint moves, `run` names the missing file, and `--weights` points it to the new place.
#[test]
fn moved_checkpoint_and_weights_override() {
    let (d, m) = hf_copy("minimax");
    let art = d.path().join("artifact");
    let ok = succeeds;
    ok(&["build", m.to_str().unwrap(), "-o", art.to_str().unwrap()]);
    let before = ok(&[
        "run",
        art.to_str().unwrap(),
        "--tokens",
        "1,2,3",
        "--max-new-tokens",
        "4",
    ]);
    let moved = d.path().join("moved");
    std::fs::rename(&m, &moved).unwrap();
    fails(
        &["run", art.to_str().unwrap(), "--tokens", "1,2,3"],
        &["model.safetensors"],
    );
    let after = ok(&[
        "run",
        art.to_str().unwrap(),
        "--weights",
        moved.to_str().unwrap(),
        "--tokens",
        "1,2,3",
        "--max-new-tokens",
        "4",
    ]);
    assert_eq!(before, after);
}

#[test]
fn cost_report_arguments() {
    let spec = "examples/minimax-tiny.toml";
    let m = repo().join(spec);
    let m = m.to_str().unwrap();
    fails(&["report", m, "--gpu", "tpu9"], &["--gpu \"tpu9\"", "h200"]);
    fails(
        &["report", m, "--gpu", "h100", "--bandwidth=-3"],
        &["--bandwidth"],
    );
    fails(
        &["report", m, "--flops", "100"],
        &["--bandwidth and --flops"],
    );
    fails(&["report", m, "--context", "0"], &["--context"]);
    // compare needs two models: a usage error (exit code 2).
    let out = Command::new(bin()).args(["compare", m]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// `--format svg` renders with Graphviz when it is installed and says how to get it when not.
#[test]
fn graph_svg_needs_graphviz() {
    let m = repo().join("examples/minimax-tiny.toml");
    let m = m.to_str().unwrap();
    let out = Command::new(bin())
        .args(["ir", m, "--format", "svg"])
        .env("LAMINA_DOT", "/nonexistent/dot")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("apt-get install graphviz"), "{err}");
    let have_dot = Command::new("dot").arg("-V").output().is_ok();
    if !have_dot {
        eprintln!("SKIP svg rendering: Graphviz `dot` is not installed");
        return;
    }
    let out = Command::new(bin())
        .args(["ir", m, "--format", "svg"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("<svg"));
    fails(
        &["ir", m, "--stage", "kernel", "--format", "dot"],
        &["--stage graph"],
    );
}

/// On a pipe a command prints its results only: no progress bars, no logs; `-v` adds the pass
/// timings on stderr, `-q` keeps quiet.
#[test]
fn quiet_on_a_pipe_and_verbose_on_request() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("a");
    let spec = repo().join("examples/minimax-tiny.toml");
    let run = |extra: &[&str]| {
        let o = Command::new(bin())
            .args(["build", spec.to_str().unwrap(), "-o", out.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (stdout, stderr) = run(&[]);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with("wrote "), "{stdout}");
    assert!(stderr.is_empty(), "stderr on a pipe: {stderr}");
    let (_, stderr) = run(&["-v"]);
    assert!(stderr.contains("pass fuse"), "{stderr}");
    assert!(
        !stderr.contains("per kernel"),
        "-v shows no per-kernel lines: {stderr}"
    );
    let (_, stderr) = run(&["-vv"]);
    assert!(stderr.contains("per kernel"), "{stderr}");
    let (_, stderr) = run(&["-q", "-v"]);
    assert!(stderr.is_empty(), "-q: {stderr}");
}

/// Text in, text out: a word-level tokenizer built here, `generate` and `run --prompt` stream
/// the same words the token-id path produces, stopping at the EOS id of
/// generation_config.json; sampling is reproducible under a seed; without a tokenizer,
/// `--prompt` says why it cannot work.
#[test]
fn text_generation_with_a_tokenizer() {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::Tokenizer;
    let (d, m) = hf_copy("qwen3_next");
    let word = |i: usize| {
        if i == 0 {
            "[UNK]".to_string()
        } else {
            format!("w{i}")
        }
    };
    let vocab: std::collections::HashMap<String, u32> =
        (0..256).map(|i| (word(i), i as u32)).collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok.save(m.join("tokenizer.json"), false).unwrap();
    let eos = 7;
    std::fs::write(
        m.join("generation_config.json"),
        format!("{{\"eos_token_id\": [{eos}]}}"),
    )
    .unwrap();
    let art = d.path().join("artifact");
    let mm = m.to_str().unwrap();
    let a = art.to_str().unwrap();
    let ok = |args: &[&str]| succeeds(args).trim_end().to_string();
    ok(&["build", mm, "-o", a]);
    let ids = ok(&["run", a, "--tokens", "12,40,3", "--max-new-tokens", "12"]);
    let want: Vec<String> = ids
        .split(',')
        .map(|t| t.parse::<usize>().unwrap())
        .take_while(|&t| t != eos)
        .map(word)
        .collect();
    let want = want.join(" ");
    let got = ok(&[
        "generate",
        a,
        "--prompt",
        "w12 w40 w3",
        "--max-new-tokens",
        "12",
    ]);
    assert_eq!(got, want);
    assert_eq!(
        ok(&["run", a, "--prompt", "w12 w40 w3", "--max-new-tokens", "12"]),
        want
    );
    assert_eq!(
        ok(&[
            "run",
            mm,
            "--reference",
            "--prompt",
            "w12 w40 w3",
            "--max-new-tokens",
            "12"
        ]),
        want
    );
    let sample = [
        "generate",
        a,
        "--prompt",
        "w12 w40 w3",
        "--max-new-tokens",
        "12",
        "--temperature",
        "1.5",
        "--top-p",
        "0.9",
        "--seed",
        "5",
    ];
    assert_eq!(ok(&sample), ok(&sample));
    fails(
        &["generate", a, "--prompt", "w1", "--top-p", "0"],
        &["--top-p"],
    );
    let spec = repo().join("examples/qwen3-next-tiny.toml");
    fails(
        &["run", spec.to_str().unwrap(), "--prompt", "hello"],
        &["tokenizer", "--tokens"],
    );
}

/// A plan records each checkpoint file's header digest: a file rewritten under it is refused,
/// naming the file and the way out; `--allow-weight-mismatch` runs anyway.
#[test]
fn changed_checkpoint_header_is_refused() {
    let (d, m) = hf_copy("minimax");
    let art = d.path().join("artifact");
    let a = art.to_str().unwrap();
    let ok = succeeds;
    ok(&["build", m.to_str().unwrap(), "-o", a]);
    let before = ok(&["run", a, "--tokens", "1,2,3", "--max-new-tokens", "4"]);
    // Same tensors, same bytes, one metadata entry more in the header.
    let p = m.join("model.safetensors");
    let raw = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    let views: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                TensorView::new(v.dtype(), v.shape().to_vec(), v.data()).unwrap(),
            )
        })
        .collect();
    let meta: HashMap<String, String> = [("note".to_string(), "edited".to_string())].into();
    let bytes = safetensors::serialize(views, Some(meta)).unwrap();
    std::fs::write(&p, bytes).unwrap();
    fails(
        &["run", a, "--tokens", "1,2,3"],
        &[
            "model.safetensors",
            "header changed",
            "--allow-weight-mismatch",
        ],
    );
    let after = ok(&[
        "run",
        a,
        "--tokens",
        "1,2,3",
        "--max-new-tokens",
        "4",
        "--allow-weight-mismatch",
    ]);
    assert_eq!(before, after);
}
