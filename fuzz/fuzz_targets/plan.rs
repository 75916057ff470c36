//! An artifact's plan.json: parse and check. Any input may fail, none may panic.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = common::scratch().join("plan-case");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("plan.json"), data).unwrap();
    let _ = lamina_ir::plan::Plan::load(&dir);
});
