//! A model.safetensors beside a valid config.json: header parsing, weight matching and
//! conversion. Any input may fail, none may panic or read out of bounds.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = common::scratch().join("safetensors-case");
    if !dir.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(common::oracle().join("config.json"), dir.join("config.json")).unwrap();
    }
    let file = dir.join("model.safetensors");
    std::fs::write(&file, data).unwrap();
    let _ = lamina_ir::weights::header_digest(&file);
    if let Ok(m) = lamina_ir::model::Model::open(&dir) {
        let _ = m.weights(0);
    }
});
