//! A native spec: parse, validate, build the graph. Any input may fail, none may panic.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = common::scratch().join("model.toml");
    std::fs::write(&path, data).unwrap();
    let _ = lamina_ir::model::Model::open(&path);
});
