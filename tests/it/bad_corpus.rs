//! The data-driven bad-input corpus in `tests/bad/` (see its README): every case through the
//! real binary, with the error contract (exit status 1, one line naming the file, the expected
//! fragment, no panic).

use std::path::Path;
use std::process::Command;

use crate::common::{oracle, repo};

/// Runs the binary with `args`: exit status `code`, no panic, the fragment; exit 1 errors
/// are one line. Returns stderr.
fn expect_error(args: &[&str], code: i32, fragment: &str, case: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_compile-model"))
        .args(args)
        .output()
        .expect("run compile-model");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{case}: exit status; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{case} panicked: {stderr}");
    if code == 1 {
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{case}: not one line: {stderr}"
        );
    }
    assert!(
        stderr.contains(fragment),
        "{case}: error lacks {fragment:?}: {stderr}"
    );
    stderr.into_owned()
}

/// `compile-model check TARGET` fails with the fragment and names `shown_as`.
fn check(target: &Path, shown_as: &str, fragment: &str, case: &str) {
    let t = target.to_str().unwrap();
    let stderr = expect_error(&["check", t], 1, fragment, case);
    assert!(
        stderr.contains(shown_as),
        "{case}: error does not name {shown_as}: {stderr}"
    );
}

#[test]
fn spec_corpus() {
    let dir = repo().join("tests/bad/spec");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let fragment = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: first line must be `# expect: …`", p.display()));
        let name = p.file_name().unwrap().to_str().unwrap();
        check(&p, name, fragment, name);
        n += 1;
    }
    assert!(n >= 35, "only {n} spec cases");
}

#[test]
fn config_corpus() {
    let dir = repo().join("tests/bad/config");
    let expect: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expect.json")).unwrap()).unwrap();
    let ck = tempfile::tempdir().unwrap();
    std::fs::copy(
        oracle("qwen3_next").join("model/model.safetensors"),
        ck.path().join("model.safetensors"),
    )
    .unwrap();
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if name == "expect.json" || p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let fragment = expect
            .get(&name)
            .unwrap_or_else(|| panic!("{name}: no entry in expect.json"));
        std::fs::copy(&p, ck.path().join("config.json")).unwrap();
        check(ck.path(), "config.json", fragment, &name);
        n += 1;
    }
    assert_eq!(n, expect.len(), "expect.json names files that do not exist");
}

/// `safetensors/*`: checkpoint files that cannot be read or matched, each beside the
/// Qwen3-Next oracle config; `*.index.json` files stand in for a sharded checkpoint's index.
#[test]
fn safetensors_corpus() {
    let dir = repo().join("tests/bad/safetensors");
    let expect: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expect.json")).unwrap()).unwrap();
    let mut n = 0;
    for (name, fragment) in &expect {
        let ck = tempfile::tempdir().unwrap();
        std::fs::copy(
            oracle("qwen3_next").join("model/config.json"),
            ck.path().join("config.json"),
        )
        .unwrap();
        let target = if name.ends_with(".index.json") {
            "model.safetensors.index.json"
        } else {
            "model.safetensors"
        };
        std::fs::copy(dir.join(name), ck.path().join(target)).unwrap();
        let dir = ck.path().to_str().unwrap();
        expect_error(
            &["run", dir, "--reference", "--tokens", "1"],
            1,
            fragment,
            name,
        );
        n += 1;
    }
    let files = std::fs::read_dir(&dir).unwrap().count() - 1;
    assert_eq!(
        n, files,
        "every file in tests/bad/safetensors needs an expect.json entry"
    );
}

/// `cli.json`: argument vectors for every subcommand. `{spec}` is the tiny Qwen3-Next spec,
/// `{artifact}` its plan built with --max-context 64 --max-batch 2, `{tmp}` a scratch dir.
/// Exit 1 errors are one line; exit 2 is a usage error.
#[test]
fn cli_corpus() {
    struct Case {
        name: String,
        args: Vec<String>,
        code: i32,
        expect: String,
    }
    let raw: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(repo().join("tests/bad/cli.json")).unwrap())
            .unwrap();
    let cases: Vec<Case> = raw
        .iter()
        .map(|v| Case {
            name: v["name"].as_str().unwrap().to_string(),
            args: v["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string())
                .collect(),
            code: v["code"].as_i64().unwrap() as i32,
            expect: v["expect"].as_str().unwrap().to_string(),
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let spec = repo().join("examples/qwen3-next-tiny.toml");
    let art = tmp.path().join("artifact");
    let built = Command::new(env!("CARGO_BIN_EXE_compile-model"))
        .args(["build", spec.to_str().unwrap(), "-o", art.to_str().unwrap()])
        .args(["--max-context", "64", "--max-batch", "2"])
        .output()
        .unwrap();
    assert!(built.status.success());
    for c in &cases {
        let args: Vec<String> = c
            .args
            .iter()
            .map(|a| {
                a.replace("{artifact}", art.to_str().unwrap())
                    .replace("{spec}", spec.to_str().unwrap())
                    .replace("{tmp}", tmp.path().to_str().unwrap())
            })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_error(&args, c.code, &c.expect, &c.name);
        assert!(
            !tmp.path().join("a").exists(),
            "{}: left an artifact",
            c.name
        );
    }
    assert!(cases.len() >= 20);
}
