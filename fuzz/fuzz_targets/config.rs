//! A Hugging Face config.json beside a valid checkpoint: import, derive the spec, build the
//! graph, match the weights. Any input may fail, none may panic.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = common::scratch().join("config-case");
    if !dir.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            common::oracle().join("model.safetensors"),
            dir.join("model.safetensors"),
        )
        .unwrap();
    }
    std::fs::write(dir.join("config.json"), data).unwrap();
    if let Ok(m) = lamina_ir::model::Model::open(&dir) {
        let _ = m.weights(0);
    }
});
