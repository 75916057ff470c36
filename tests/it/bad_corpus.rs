//! The data-driven bad-input corpus in `tests/bad/` (see its README): every case through the
//! real binary, with the error contract (exit status 1, one line naming the file, the expected
//! fragment, no panic).

use std::path::Path;
use std::process::Command;

use crate::common::{oracle, repo};

fn check(target: &Path, shown_as: &str, fragment: &str, case: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_compile-model"))
        .arg("check")
        .arg(target)
        .output()
        .expect("run compile-model");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{case}: exit status; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{case} panicked: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{case}: not one line: {stderr}"
    );
    assert!(
        stderr.contains(shown_as),
        "{case}: error does not name {shown_as}: {stderr}"
    );
    assert!(
        stderr.contains(fragment),
        "{case}: error lacks {fragment:?}: {stderr}"
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
