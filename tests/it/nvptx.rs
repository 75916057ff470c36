//! The NVPTX targets without a GPU: every kernel of every example lowered for sm_80 and sm_90a
//! and assembled by `ptxas -v`; resources within budget; GPU artifacts and the CLI stages.
//!
//! ptxas comes from `scripts/bootstrap`. Without it these checks print a visible skip; with
//! `LAMINA_REQUIRE_PTXAS=1` (set by `make test`) a missing ptxas fails them.

use std::process::Command;

use lamina_ir::model::Model;
use lamina_targets::nvptx::{self, Resources};
use lamina_targets::Target;

use crate::common::repo;

/// Build options of a GPU plan for `target`: bf16 weights (the rule of GPU targets), decode
/// attention in 8 pieces, projections on tensor cores, bf16 caches, on sm_90a the chunked
/// recurrences' products as warpgroup tiles (what `build --target` does by default).
fn gpu_options(target: Target) -> lamina_compiler::passes::Options {
    lamina_compiler::passes::Options {
        weights_bf16: true,
        decode_splits: 8,
        tensor_cores: true,
        tf32_products: false,
        warpgroup_tiles: target == Target::Sm90a,
        bf16_handoffs: false,
        bf16_caches: true,
        strict_fp: false,
        ..Default::default()
    }
}

fn ptxas_or_skip(what: &str) -> bool {
    if nvptx::ptxas_path().is_some() {
        return true;
    }
    assert!(
        std::env::var("LAMINA_REQUIRE_PTXAS").as_deref() != Ok("1"),
        "{what}: ptxas not found and LAMINA_REQUIRE_PTXAS=1 (run scripts/bootstrap)"
    );
    crate::common::skip(&format!(
        "{what}: ptxas not found (run scripts/bootstrap or set LAMINA_PTXAS)"
    ));
    false
}

/// Lowers every kernel of `example` (both phases, default build sizes) for both NVPTX targets,
/// assembles the PTX, and checks each kernel's resources.
fn assembles(example: &str) {
    let m = Model::open(&repo().join("examples").join(example)).unwrap();
    for target in [Target::Sm80, Target::Sm90a] {
        let (p, _) = lamina_compiler::build::compile_program(&m, gpu_options(target)).unwrap();
        let kernels: Vec<_> = p.kernels().into_iter().cloned().collect();
        let (ptx, _) = nvptx::compile_ptx(&kernels, target)
            .unwrap_or_else(|e| panic!("{example} {target}: {e}"));
        let (chip, _) = target.nvptx().unwrap();
        assert!(
            ptx.contains(&format!(".target {chip}")),
            "{example} {target}"
        );
        if !ptxas_or_skip(&format!("{example} {target}")) {
            continue;
        }
        let res = nvptx::ptxas(&ptx, target).unwrap_or_else(|e| panic!("{example}: {e}"));
        for k in &kernels {
            let r: &Resources = res
                .iter()
                .find(|r| r.kernel == k.name)
                .unwrap_or_else(|| panic!("{example} {target}: ptxas reports no {}", k.name));
            let block = nvptx::block_size(k, target);
            let dynamic = nvptx::dynamic_shared_bytes(k, target) as u32;
            assert_eq!(
                (r.spill_stores, r.spill_loads),
                (0, 0),
                "{example} {target} {}: register spills",
                k.name
            );
            assert!(
                r.registers > 0 && r.blocks_per_sm(block, dynamic, target) >= 1,
                "{example} {target} {}: {} registers × {block} threads or {} + {dynamic} B of \
                 shared memory exceed an SM",
                k.name,
                r.registers,
                r.shared
            );
            assert!(
                r.shared + dynamic <= nvptx::shared_limit(target),
                "{example} {target} {}: {} + {dynamic} bytes of shared memory",
                k.name,
                r.shared
            );
            assert!(
                (r.stack as usize) <= nvptx::LOCAL_BUDGET,
                "{example} {target} {}: {} bytes of stack",
                k.name,
                r.stack
            );
        }
    }
}

macro_rules! assembles {
    ($test:ident, $file:literal) => {
        #[test]
        fn $test() {
            assembles($file);
        }
    };
}

assembles!(ptxas_kimi_linear_tiny, "kimi-linear-tiny.toml");
assembles!(ptxas_qwen3_next_tiny, "qwen3-next-tiny.toml");
assembles!(ptxas_minimax_tiny, "minimax-tiny.toml");
assembles!(ptxas_deepseek_v3_tiny, "deepseek-v3-tiny.toml");
assembles!(ptxas_kimi_linear_small, "kimi-linear-small.toml");
assembles!(ptxas_qwen3_next_small, "qwen3-next-small.toml");
assembles!(ptxas_kimi_linear_48b_a3b, "kimi-linear-48b-a3b.toml");
assembles!(ptxas_qwen3_next_80b_a3b, "qwen3-next-80b-a3b.toml");
assembles!(ptxas_minimax_text_01, "minimax-text-01.toml");
assembles!(ptxas_deepseek_v3, "deepseek-v3.toml");

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_compile-model"))
        .args(args)
        .output()
        .unwrap()
}

/// `build --target sm_90a` writes the plan with each kernel's launch contract, the PTX and the
/// cubin `ptxas` assembles from it (when ptxas is installed), no host library; the host
/// executor refuses it with a clear error.
#[test]
fn gpu_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a");
    let example = repo().join("examples/qwen3-next-tiny.toml");
    let o = cli(&[
        "build",
        example.to_str().unwrap(),
        "--target",
        "sm_90a",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out.join(lamina_ir::plan::HOST_LIBRARY).exists());
    let ptx = std::fs::read_to_string(out.join(lamina_ir::plan::PTX_FILE)).unwrap();
    let plan = lamina_ir::plan::Plan::load(&out).unwrap();
    assert_eq!(plan.target, "sm_90a");
    // The cubin: an ELF image for sm_90a with every kernel's entry symbol.
    let cubin = std::fs::read(out.join(lamina_ir::plan::CUBIN_FILE));
    match (cubin, lamina_targets::nvptx::ptxas_path()) {
        (Ok(cubin), Some(_)) => {
            assert!(cubin.starts_with(b"\x7fELF"), "kernels.cubin is not ELF");
            let has = |s: &str| cubin.windows(s.len()).any(|w| w == s.as_bytes());
            for k in &plan.kernels {
                assert!(has(&k.symbol), "no {} in kernels.cubin", k.symbol);
            }
        }
        (Err(e), Some(p)) => panic!("{} found, but no kernels.cubin: {e}", p.display()),
        (Ok(_), None) => panic!("a kernels.cubin without ptxas"),
        (Err(_), None) => {
            ptxas_or_skip("gpu_artifact's cubin");
        }
    }
    for k in &plan.kernels {
        let g = k
            .gpu
            .as_ref()
            .expect("every GPU kernel has a launch contract");
        assert_eq!(g.abi, lamina_ir::plan::GPU_ABI);
        assert!(g.block > 0 && g.block <= 1024);
        // The entry exists with one pointer per buffer and the row count.
        let entry = format!(".entry {}(", k.symbol);
        let at = ptx
            .find(&entry)
            .unwrap_or_else(|| panic!("no {entry} in kernels.ptx"));
        let sig = &ptx[at..at + ptx[at..].find(')').unwrap()];
        // Buffers, scratch, rows.
        assert_eq!(
            sig.matches(".param .u64").count(),
            k.params.len() + 2,
            "{sig}"
        );
    }
    let err = match lamina_runtime::host::HostEngine::load(&out, None) {
        Ok(_) => panic!("the host executor loaded an sm_90a plan"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("sm_90a") && err.contains("host"), "{err}");
    // The chunked recurrence's kernels keep their locals in dynamic shared memory: the plan
    // records the bytes (and the block the slices were laid out for), the PTX addresses the
    // module's external shared array. (The tiny model's fit static shared memory on sm_90a,
    // where the scans' warpgroup tiles need no per-warp staging: this checks its sm_80 plan.)
    let out = dir.path().join("b");
    let o = cli(&[
        "build",
        example.to_str().unwrap(),
        "--target",
        "sm_80",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ptx = std::fs::read_to_string(out.join(lamina_ir::plan::PTX_FILE)).unwrap();
    let plan = lamina_ir::plan::Plan::load(&out).unwrap();
    let dynamic: Vec<_> = plan
        .kernels
        .iter()
        .filter(|k| k.gpu.as_ref().unwrap().dynamic_shared_bytes > 0)
        .collect();
    assert!(
        dynamic.iter().any(|k| k.name.contains("_scan64_")),
        "no scan kernel with dynamic shared memory"
    );
    assert!(ptx.contains(".extern .shared .align 16 .b8 lamina_dynamic_shared[];"));
    for k in &dynamic {
        let g = k.gpu.as_ref().unwrap();
        // Scans are programs of 4 warps, one to a block; other warp programs one warp each.
        let lanes = if k.name.contains("_scan64_") { 128 } else { 32 };
        assert_eq!((g.lanes, g.scratch_bytes), (lanes, 0), "{}", k.name);
        assert!(
            g.block == 64 || g.block == 128,
            "{}: block {}",
            k.name,
            g.block
        );
        assert!(
            g.dynamic_shared_bytes > 48 << 10
                && g.dynamic_shared_bytes <= lamina_ir::plan::MAX_DYNAMIC_SHARED,
            "{}: {}",
            k.name,
            g.dynamic_shared_bytes
        );
        assert!(
            entry(&ptx, &k.symbol).contains("lamina_dynamic_shared"),
            "{}",
            k.name
        );
    }
    let mut bad = plan.clone();
    let at = plan
        .kernels
        .iter()
        .position(|k| k.name == dynamic[0].name)
        .unwrap();
    bad.kernels[at].gpu.as_mut().unwrap().dynamic_shared_bytes = 228 << 10;
    assert!(bad.check().unwrap_err().contains("dynamic_shared_bytes"));
    // A host plan carrying GPU launch data is refused by the plan check.
    let mut bad = plan.clone();
    bad.target = "host".into();
    assert!(bad.check().unwrap_err().contains("kernels[0].gpu"));
    // The caches are bf16 (`--cache-dtype auto`), the states f32; the check refuses a bf16
    // state and a pool whose bytes do not match its dtype.
    for p in &plan.pools {
        let cache = p.kind == "kv_cache" || p.kind == "mla_latent";
        assert_eq!(p.dtype, if cache { "bf16" } else { "f32" }, "{}", p.name);
        assert_eq!(p.bytes, p.shape.iter().product::<usize>() * p.elem_bytes());
    }
    let state = plan
        .pools
        .iter()
        .position(|p| p.kind == "recurrent")
        .unwrap();
    let mut bad = plan.clone();
    bad.pools[state].dtype = "bf16".into();
    assert!(bad.check().unwrap_err().contains("states are f32"));
    let cache = plan
        .pools
        .iter()
        .position(|p| p.kind == "kv_cache")
        .unwrap();
    let mut bad = plan.clone();
    bad.pools[cache].bytes *= 2;
    let err = bad.check().unwrap_err();
    assert!(
        err.contains("bytes for shape") && err.contains("of bf16"),
        "{err}"
    );
}

/// `ir --stage ptx|mlir --target` prints each stage; `--stage ptx` needs a GPU target.
#[test]
fn ir_stages_for_gpu_targets() {
    let example = repo().join("examples/minimax-tiny.toml");
    let ex = example.to_str().unwrap();
    let o = cli(&[
        "ir", ex, "--stage", "ptx", "--target", "sm_80", "--phase", "decode",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains(".target sm_80") && text.contains(".entry "));
    let o = cli(&[
        "ir", ex, "--stage", "mlir", "--target", "sm_90a", "--phase", "decode",
    ]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("gpu.module @kernels") && text.contains("chip = \"sm_90a\""));
    let o = cli(&["ir", ex, "--stage", "ptx"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--target sm_80 or sm_90a"));
}

/// A `compile-model` built without the `cuda` feature says so for `--device cuda`.
#[cfg(not(feature = "cuda"))]
#[test]
fn device_cuda_needs_the_feature() {
    let example = repo().join("examples/minimax-tiny.toml");
    let o = cli(&[
        "run",
        example.to_str().unwrap(),
        "--device",
        "cuda",
        "--tokens",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("without the `cuda` feature"), "{err}");
}

/// `report --target sm_90a` lists every kernel's resources and both phases' rooflines.
#[test]
fn gpu_report() {
    if !ptxas_or_skip("gpu_report") {
        return;
    }
    let example = repo().join("examples/kimi-linear-tiny.toml");
    let o = cli(&[
        "report",
        example.to_str().unwrap(),
        "--target",
        "sm_90a",
        "--context",
        "256",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("regs") && text.contains("spill st/ld") && text.contains("KB/program"),
        "{text}"
    );
    for phase in ["prefill total:", "decode total:"] {
        let line = text.lines().find(|l| l.starts_with(phase)).unwrap();
        assert!(line.contains("roofline") && !line.contains("NaN"), "{line}");
    }
    // Each kernel's roofline row ends with what bounds it.
    let bounds = ["memory", "bf16 mma", "tf32x3 mma", "tf32 mma", "cuda cores"];
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("_chunk64_") || l.starts_with("rms_norm_linear_mma"))
        .filter(|l| bounds.iter().any(|b| l.ends_with(b)))
        .collect();
    assert!(rows.len() >= 2, "no roofline rows with a bound in\n{text}");
}

/// GPU MLIR and PTX of the tiny examples, reviewed with `cargo insta review`.
fn gpu_text(file: &str, target: Target, ptx: bool) -> String {
    let m = Model::open(&repo().join("examples").join(file)).unwrap();
    let (p, _) = lamina_compiler::build::compile_program(&m, gpu_options(target)).unwrap();
    let kernels: Vec<_> = p.kernels().into_iter().cloned().collect();
    if ptx {
        let (text, _) = nvptx::compile_ptx(&kernels, target).unwrap();
        // Comment lines (the generator banner) may change with LLVM's build: not part of it.
        text.lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .map(|l| format!("{l}\n"))
            .collect()
    } else {
        lamina_targets::mlir::print_gpu_mlir(&kernels, target, &|k| nvptx::flavor(k, target))
            .unwrap()
    }
}

macro_rules! gpu_snapshot {
    ($test:ident, $file:literal, $target:expr, $ptx:literal) => {
        #[test]
        fn $test() {
            insta::assert_snapshot!(gpu_text($file, $target, $ptx));
        }
    };
}

gpu_snapshot!(
    gpu_mlir_kimi_linear_tiny,
    "kimi-linear-tiny.toml",
    Target::Sm90a,
    false
);
gpu_snapshot!(
    gpu_mlir_qwen3_next_tiny,
    "qwen3-next-tiny.toml",
    Target::Sm90a,
    false
);
gpu_snapshot!(
    gpu_mlir_minimax_tiny,
    "minimax-tiny.toml",
    Target::Sm90a,
    false
);
gpu_snapshot!(
    gpu_mlir_deepseek_v3_tiny,
    "deepseek-v3-tiny.toml",
    Target::Sm90a,
    false
);
gpu_snapshot!(
    ptx_sm90a_kimi_linear_tiny,
    "kimi-linear-tiny.toml",
    Target::Sm90a,
    true
);
gpu_snapshot!(
    ptx_sm90a_qwen3_next_tiny,
    "qwen3-next-tiny.toml",
    Target::Sm90a,
    true
);
gpu_snapshot!(
    ptx_sm90a_minimax_tiny,
    "minimax-tiny.toml",
    Target::Sm90a,
    true
);
gpu_snapshot!(
    ptx_sm90a_deepseek_v3_tiny,
    "deepseek-v3-tiny.toml",
    Target::Sm90a,
    true
);
gpu_snapshot!(
    ptx_sm80_minimax_tiny,
    "minimax-tiny.toml",
    Target::Sm80,
    true
);

/// The device fill of random benchmark weights, lowered for the host from the same kernel IR:
/// every value inside `centre ± width`, spread over it, different per seed.
#[test]
fn device_fill_covers_its_range() {
    use lamina_compiler::kernels::fill::{fill_uniform_bf16, FILL_KERNEL};
    let dir = tempfile::tempdir().unwrap();
    let so = dir.path().join("fill.so");
    lamina_targets::host::build_library(&[fill_uniform_bf16()], &so).unwrap();
    // SAFETY: a library just built from one kernel; its symbol has the packed signature.
    let lib = unsafe { libloading::Library::new(&so) }.unwrap();
    let f: libloading::Symbol<unsafe extern "C" fn(*mut *mut i64)> =
        unsafe { lib.get(lamina_targets::host::symbol(FILL_KERNEL).as_bytes()) }.unwrap();
    let fill = |seed: f32| -> Vec<f32> {
        let n = 100_003usize;
        let mut out = vec![0u16; n];
        let mut p = [seed, 0.5f32, 0.25, 0.0];
        let mut desc = [
            [
                out.as_mut_ptr() as i64,
                out.as_mut_ptr() as i64,
                0,
                n as i64,
                1,
            ],
            [p.as_mut_ptr() as i64, p.as_mut_ptr() as i64, 0, 4, 1],
        ];
        let mut scalars = [n as i64, 0, n as i64];
        let mut args: Vec<*mut i64> = Vec::new();
        for d in desc.iter_mut() {
            for x in d.iter_mut() {
                args.push(x);
            }
        }
        for s in scalars.iter_mut() {
            args.push(s);
        }
        // SAFETY: the descriptors cover both buffers; rows = n programs, each writing its own
        // element.
        unsafe { f(args.as_mut_ptr()) };
        out.iter()
            .map(|&b| half::bf16::from_bits(b).to_f32())
            .collect()
    };
    let a = fill(12345.0);
    let b = fill(777.0);
    // The largest seed (2^24 − 1) must not overflow the hash.
    let c = fill(16_777_215.0);
    assert!(
        c.iter().all(|&x| (0.249..=0.751).contains(&x)),
        "seed 2^24-1 leaves the range"
    );
    let n = a.len() as f64;
    let mean = a.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    assert!(
        a.iter().all(|&x| (0.249..=0.751).contains(&x)),
        "outside 0.5 ± 0.25"
    );
    assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
    // Uniform on ±0.25: standard deviation 0.25/√3 ≈ 0.144.
    assert!((var.sqrt() - 0.144).abs() < 0.01, "std {}", var.sqrt());
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(
        same < a.len() / 10,
        "seeds give the same values at {same} of {} places",
        a.len()
    );
}

/// Every prefill GEMM (projections and routed experts) whose depth is a whole number of staging
/// slabs runs as a block-cooperative tile on GPUs: 128 threads per program and per block,
/// 30 KiB of static shared memory; on sm_90a through `wgmma`, weights copied by `cp.async`.
/// Shallower prefill GEMMs and decode keep one-warp tiles.
#[test]
fn prefill_gemms_are_block_cooperative() {
    use lamina_compiler::kernels::Phase;
    use lamina_targets::mlir::lower::staged::{self, staged_tile};
    let m = Model::open(&repo().join("examples/kimi-linear-tiny.toml")).unwrap();
    let (p, _) = lamina_compiler::build::compile_program(&m, gpu_options(Target::Sm90a)).unwrap();
    let gemm = |name: &str| name.contains("linear_mma_") || name.starts_with("moe_mma_");
    fn depth(body: &[lamina_ir::kernel::Stmt]) -> usize {
        use lamina_ir::kernel::Stmt;
        body.iter()
            .map(|s| match s {
                Stmt::Mma(m) => m.depth,
                Stmt::If { then, .. } => depth(then),
                _ => 0,
            })
            .max()
            .unwrap_or(0)
    }
    let mut staged_kernels = Vec::new();
    for (phase, launches) in &p.schedules {
        for l in launches.iter().filter(|l| gemm(&l.kernel.name)) {
            let k = &l.kernel;
            match phase {
                Phase::Prefill if !depth(&k.body).is_multiple_of(staged::SLAB) => {
                    assert_eq!(nvptx::lanes(k), nvptx::WARP, "{}", k.name)
                }
                Phase::Prefill => {
                    assert!(staged_tile(k).is_some(), "{} is not staged", k.name);
                    assert_eq!(nvptx::lanes(k), staged::LANES, "{}", k.name);
                    assert_eq!(
                        nvptx::block_size(k, Target::Sm90a),
                        staged::LANES,
                        "{}",
                        k.name
                    );
                    if !staged_kernels
                        .iter()
                        .any(|s: &lamina_ir::kernel::Kernel| s.name == k.name)
                    {
                        staged_kernels.push(k.clone());
                    }
                }
                Phase::Decode => assert_eq!(nvptx::lanes(k), nvptx::WARP, "{}", k.name),
            }
        }
    }
    assert!(staged_kernels
        .iter()
        .any(|k| k.name.starts_with("moe_mma_down")));
    let (ptx, _) = nvptx::compile_ptx(&staged_kernels, Target::Sm90a).unwrap();
    for k in &staged_kernels {
        let start = ptx
            .find(&format!(".entry {}(", k.name))
            .unwrap_or_else(|| panic!("no entry {}", k.name));
        let end = ptx[start + 1..]
            .find(".entry ")
            .map_or(ptx.len(), |e| start + 1 + e);
        let body = &ptx[start..end];
        assert!(body.contains("wgmma.mma_async"), "{}: no wgmma", k.name);
        assert!(body.contains("cp.async.cg.shared.global"), "{}", k.name);
    }
    if ptxas_or_skip("prefill_gemms_are_block_cooperative") {
        for r in nvptx::ptxas(&ptx, Target::Sm90a).unwrap() {
            assert_eq!(r.shared, 30720, "{}", r.kernel);
            assert_eq!((r.spill_stores, r.spill_loads), (0, 0), "{}", r.kernel);
        }
    }
}

/// Prefill runs each linear-attention recurrence chunk-parallel: a warp program per (chunk,
/// value head) for the intra-chunk work, then a warp program per (value head, block of state
/// columns) for the scan over the chunks, both with their products as tensor-core tiles
/// (`mma.sync`, 3×TF32 for near-f32 products), for the delta rule with scalar (Qwen3-Next) and
/// per-channel (Kimi) decay and the additive rule with fixed decay (MiniMax).
#[test]
fn chunked_recurrences_are_chunk_parallel_on_tensor_cores() {
    use lamina_compiler::kernels::recurrence::chunked::{CHUNK, SCAN_COLS};
    use lamina_compiler::kernels::Phase;
    use lamina_ir::kernel::Dim;
    for (example, heads, dv) in [
        ("qwen3-next-80b-a3b.toml", 32, 128),
        ("kimi-linear-48b-a3b.toml", 32, 128),
        ("minimax-text-01.toml", 64, 128),
    ] {
        let m = Model::open(&repo().join("examples").join(example)).unwrap();
        let (p, _) =
            lamina_compiler::build::compile_program(&m, gpu_options(Target::Sm90a)).unwrap();
        let prefill = &p.schedules[&Phase::Prefill];
        let find = |part: &str| {
            prefill
                .iter()
                .find(|l| l.kernel.name.starts_with("recurrence_") && l.kernel.name.contains(part))
                .unwrap_or_else(|| panic!("{example}: no {part} kernel"))
                .kernel
                .clone()
        };
        let (chunk, scan) = (find("_chunk64_"), find("_scan64_"));
        assert_eq!(
            chunk.grid,
            vec![Dim::RowBlocks(CHUNK), Dim::N(heads)],
            "{example}"
        );
        assert_eq!(
            scan.grid,
            vec![Dim::N(heads), Dim::N(dv / SCAN_COLS)],
            "{example}"
        );
        assert!(!prefill.iter().any(|l| l.kernel.name.contains("_chunked")));
        // The scan's locals (the state columns, u, the output block and the staged keys: 48 KiB
        // a program) and its 4 warps' staging areas live in dynamic shared memory, one program
        // of 4 warps to a block, on both targets ([`scans_deal_their_tiles_to_four_warps`]).
        use nvptx::LocalsIn;
        let layout = |k, target| nvptx::warp_layout(k, target).unwrap();
        for target in [Target::Sm80, Target::Sm90a] {
            let s = layout(&scan, target);
            assert_eq!(
                (s.locals, s.warps, s.program_warps),
                (LocalsIn::DynamicShared, 4, 4),
                "{example} {target}"
            );
            assert_eq!(nvptx::scratch_bytes(&scan, target), 0, "{example}");
        }
        // The chunk kernels' locals are larger, but buffers whose lifetimes do not overlap
        // share one local: MiniMax's (fixed decay, no solve, 64 KiB), Qwen3-Next's (scalar
        // decay, 64.5 KiB) and Kimi-Linear's (per-channel decay, products one 16-row sub-chunk
        // at a time, 108.25 KiB) all fit dynamic shared memory on sm_90a, nothing in the
        // scratch buffer, as programs of 4 warps sharing one copy (3 blocks an SM, 12 warps, for
        // MiniMax and Qwen3-Next, 2 blocks, 8 warps, for Kimi-Linear; one-warp programs fit 2):
        // Qwen3-Next's M_kk and T, one local apart, are solved column-parallel, and Kimi-Linear's
        // sub-chunk dots, which write past what they read of the same local, are MMA tiles, so
        // none stores outside split loops and tiles.
        let c90 = layout(&chunk, Target::Sm90a);
        assert_eq!(
            (c90.locals, c90.warps, c90.program_warps),
            (LocalsIn::DynamicShared, 4, 4),
            "{example}"
        );
        assert_eq!(nvptx::scratch_bytes(&chunk, Target::Sm90a), 0, "{example}");
        warpgroups_on_tf32_tensor_cores(&[chunk, scan]);
        // sm_80 plans keep warp tiles on `mma.sync`.
        let kernels = chunked_recurrence_kernels(&m, gpu_options(Target::Sm80));
        assert_eq!(kernels.len(), 2, "{example}");
        warps_on_tf32_tensor_cores(&kernels, Target::Sm80);
    }
}

/// The chunked recurrences' prefill chunk and scan kernels of `m` built with `options`.
fn chunked_recurrence_kernels(
    m: &Model,
    options: lamina_compiler::passes::Options,
) -> Vec<lamina_ir::kernel::Kernel> {
    let (p, _) = lamina_compiler::build::compile_program(m, options).unwrap();
    p.phase_kernels(lamina_compiler::kernels::Phase::Prefill)
        .into_iter()
        .filter(|k| ["_chunk64_", "_scan64_"].iter().any(|s| k.name.contains(s)))
        .cloned()
        .collect()
}

/// Each of `kernels` (built for sm_90a: the chunked recurrences' products as 64-row warpgroup
/// tiles) is a program of 4 warps that runs those tiles as `wgmma` m64nNk8 TF32: A from
/// registers, B staged in the program's warpgroup staging area and read through descriptors
/// after `fence.proxy.async`, waited for before the area is reused; ptxas: no spills, at least
/// 2 blocks (8 warps) per SM.
fn warpgroups_on_tf32_tensor_cores(kernels: &[lamina_ir::kernel::Kernel]) {
    use lamina_targets::mlir::lower::group;
    let target = Target::Sm90a;
    let (ptx, _) = nvptx::compile_ptx(kernels, target).unwrap();
    for k in kernels {
        let layout = nvptx::warp_layout(k, target).unwrap();
        assert_eq!((layout.program_warps, layout.warps), (4, 4), "{}", k.name);
        let (least, most) = group::staging_bounds(&lamina_ir::kernel::expand::expand_tiles(
            &lamina_ir::kernel::expand::dots_on_tensor_cores(k),
        ))
        .unwrap_or_else(|| panic!("{}: no warpgroup tiles", k.name));
        assert!(
            (least..=most).contains(&layout.group_staging),
            "{}: {} bytes of warpgroup staging, not in {least}..={most}",
            k.name,
            layout.group_staging
        );
        let text = entry(&ptx, &k.name);
        for op in [
            "k8.f32.tf32.tf32",
            "wgmma.mma_async.sync.aligned.m64n",
            "wgmma.fence.sync.aligned",
            "wgmma.wait_group.sync.aligned 0",
            "fence.proxy.async.shared::cta",
        ] {
            assert!(text.contains(op), "{}: no {op}", k.name);
        }
    }
    if ptxas_or_skip("warpgroups_on_tf32_tensor_cores") {
        for r in nvptx::ptxas(&ptx, target).unwrap() {
            let k = kernels.iter().find(|k| k.name == r.kernel).unwrap();
            assert_eq!((r.spill_stores, r.spill_loads), (0, 0), "{}", r.kernel);
            let launch = nvptx::gpu_launch(k, target);
            assert!(
                r.blocks_per_sm(launch.block, launch.dynamic_shared_bytes, target) >= 2,
                "{}: {r:?}",
                r.kernel
            );
        }
    }
}

/// Each of `kernels` is a warp program with 3xTF32 `mma.sync` in its PTX for `target`, staging
/// its operands through shared memory ([`warps_stage_through_shared_memory`]); ptxas: no
/// spills, at least one block per SM.
fn warps_on_tf32_tensor_cores(kernels: &[lamina_ir::kernel::Kernel], target: Target) {
    let ptx = warps_stage_through_shared_memory(kernels, target);
    for k in kernels {
        assert!(
            entry(&ptx, &k.name).contains("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"),
            "{}: no tf32 mma",
            k.name
        );
    }
}

/// The PTX of kernel `name` in `ptx`.
fn entry<'p>(ptx: &'p str, name: &str) -> &'p str {
    let start = ptx
        .find(&format!(".entry {name}("))
        .unwrap_or_else(|| panic!("no entry {name}"));
    let end = ptx[start + 1..]
        .find(".entry ")
        .map_or(ptx.len(), |e| start + 1 + e);
    &ptx[start..end]
}

/// Each of `kernels` is a warp program whose tensor-core tiles copy operands into the warp's
/// slice of shared memory with `cp.async` (2 to 4 stages: `wait_group 1..3` in the loop),
/// unless every operand is a local already in shared memory (MiniMax's chunk kernel on sm_90a);
/// ptxas: with its locals in the scratch buffer the block's static shared memory is its 4
/// warps' staging areas, with its locals in dynamic shared memory there is no static shared
/// memory; no spills, at least one block per SM. Returns the PTX for `target`.
fn warps_stage_through_shared_memory(
    kernels: &[lamina_ir::kernel::Kernel],
    target: Target,
) -> String {
    for k in kernels {
        assert_eq!(nvptx::lanes(k), nvptx::WARP, "{}", k.name);
        assert!(
            nvptx::warp_staging_bytes(k, target) > 0
                || nvptx::warp_layout(k, target).unwrap().locals == nvptx::LocalsIn::DynamicShared,
            "{}: nothing staged",
            k.name
        );
    }
    let (ptx, _) = nvptx::compile_ptx(kernels, target).unwrap();
    for k in kernels {
        let text = entry(&ptx, &k.name);
        if nvptx::warp_staging_bytes(k, target) == 0 {
            // Operands in shared memory: fragments read from there, nothing copied.
            assert!(text.contains("ld.shared"), "{} {target}", k.name);
            assert!(!text.contains("cp.async"), "{} {target}", k.name);
            continue;
        }
        for op in ["cp.async.ca.shared.global", "bar.warp.sync"] {
            assert!(text.contains(op), "{} {target}: no {op}", k.name);
        }
        // Slabs in flight inside the loop: a wait that leaves 1 to 3 groups pending.
        assert!(
            (1..=3).any(|n| text.contains(&format!("cp.async.wait_group \t{n};"))),
            "{} {target}: no pipelined cp.async.wait_group",
            k.name
        );
    }
    if ptxas_or_skip("warps_stage_through_shared_memory") {
        for r in nvptx::ptxas(&ptx, target).unwrap() {
            let k = kernels.iter().find(|k| k.name == r.kernel).unwrap();
            assert_eq!((r.spill_stores, r.spill_loads), (0, 0), "{}", r.kernel);
            let dynamic = nvptx::dynamic_shared_bytes(k, target);
            let block = nvptx::block_size(k, target);
            assert!(
                r.blocks_per_sm(block, dynamic as u32, target) >= 1,
                "{}",
                r.kernel
            );
            let warps = (block / nvptx::WARP) as usize;
            match nvptx::warp_layout(k, target).unwrap().locals {
                nvptx::LocalsIn::Scratch => assert_eq!(
                    r.shared as usize,
                    warps * nvptx::warp_staging_bytes(k, target),
                    "{}",
                    r.kernel
                ),
                nvptx::LocalsIn::DynamicShared => {
                    assert_eq!(r.shared, 0, "{}", r.kernel);
                    assert!(
                        dynamic > warps * nvptx::warp_staging_bytes(k, target),
                        "{}",
                        r.kernel
                    );
                }
                nvptx::LocalsIn::StaticShared => {}
            }
        }
    }
    ptx
}

/// Decode's tensor-core tiles stage their operands too: the MLA absorbed attention (the query
/// group and the latent cache rows) and the split-K projections (the weight rows), on both
/// targets.
#[test]
fn decode_tiles_stage_weights_and_cache() {
    use lamina_compiler::kernels::Phase;
    let m = Model::open(&repo().join("examples/kimi-linear-48b-a3b.toml")).unwrap();
    let options = lamina_compiler::passes::Options {
        max_batch: 1,
        max_context: 4096,
        decode_splits: 0,
        ..gpu_options(Target::Sm90a)
    };
    let (p, _) = lamina_compiler::build::compile_program(&m, options).unwrap();
    let decode = p.phase_kernels(Phase::Decode);
    let pick = |prefix: &str| {
        decode
            .iter()
            .find(|k| k.name.starts_with(prefix))
            .map(|k| (*k).clone())
            .unwrap_or_else(|| panic!("no {prefix} kernel"))
    };
    let kernels = [
        pick("mla_attend_"),
        // The q, k, v, gate and beta projections, fused (`fuse-siblings`).
        pick("group6_rms_norm_linear_mma_2304x4096_splitk"),
    ];
    // The projection's thin weight slabs (16 rows) get the deepest pipeline: 4 stages, 3 slabs
    // in flight; the MLA tile's 32 + 32 rows, 2.
    // The MLA tile's locals (64 KiB of latent accumulators and more per warp) stay in the
    // scratch buffer on sm_80; on sm_90a 2 warps' fit a block's dynamic shared memory.
    use lamina_targets::mlir::lower::warp_stage::{MAX_STAGES, MIN_STAGES, ROW_BYTES};
    for target in [Target::Sm80, Target::Sm90a] {
        assert_eq!(
            nvptx::warp_staging_bytes(&kernels[1], target),
            MAX_STAGES * 16 * ROW_BYTES
        );
        assert_eq!(
            nvptx::warp_staging_bytes(&kernels[0], target),
            MIN_STAGES * 64 * ROW_BYTES
        );
        let layout = nvptx::warp_layout(&kernels[0], target).unwrap();
        assert_eq!(
            (layout.locals, layout.warps, layout.program_warps),
            match target {
                // One warp a program: its last stores are outside split loops.
                Target::Sm90a => (nvptx::LocalsIn::DynamicShared, 2, 1),
                _ => (nvptx::LocalsIn::Scratch, 4, 1),
            },
            "{target}"
        );
        let ptx = warps_stage_through_shared_memory(&kernels, target);
        assert!(entry(&ptx, &kernels[1].name).contains("cp.async.wait_group \t3;"));
    }
}

/// With TF32 products (`--products tf32`) the chunked recurrence kernels (named `_tf32`) issue
/// one TF32 `mma.sync` where the default plan issues three (sm_80 plans: warp tiles), and still
/// assemble without spills; on sm_90a their warpgroup tiles are single TF32 `wgmma`s. (Prefill
/// flash attention's products are bf16 whatever the option.)
#[test]
fn tf32_products_are_a_third_of_the_mmas() {
    let instr = "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32";
    for example in ["qwen3-next-80b-a3b.toml", "kimi-linear-48b-a3b.toml"] {
        let m = Model::open(&repo().join("examples").join(example)).unwrap();
        let hot = |tf32: bool| {
            let options = lamina_compiler::passes::Options {
                tf32_products: tf32,
                bf16_handoffs: false,
                ..gpu_options(Target::Sm80)
            };
            let kernels = chunked_recurrence_kernels(&m, options);
            let (ptx, _) = nvptx::compile_ptx(&kernels, Target::Sm80).unwrap();
            (kernels, ptx.matches(instr).count())
        };
        let ((plain, three), (tf32, one)) = (hot(false), hot(true));
        assert_eq!(plain.len(), tf32.len(), "{example}");
        assert!(tf32.iter().all(|k| k.name.ends_with("_tf32")), "{example}");
        assert!(
            one > 0 && three == 3 * one,
            "{example}: {three} vs {one} tf32 MMAs"
        );
        warps_on_tf32_tensor_cores(&tf32, Target::Sm80);
        let options = lamina_compiler::passes::Options {
            tf32_products: true,
            bf16_handoffs: false,
            ..gpu_options(Target::Sm90a)
        };
        warpgroups_on_tf32_tensor_cores(&chunked_recurrence_kernels(&m, options));
    }
}

/// Decode attention reads each cached key and value about once per launch, whatever the number
/// of query heads sharing it: a GQA program attends its KV head's whole group (Qwen3-Next's
/// and MiniMax's 8 query heads), an MLA program up to 32 heads of the one latent head (Kimi's
/// 32, DeepSeek-V3's 128 in 4 groups, each of which reads the latent rows). The count model's
/// loads issued to the cache at batch 1 over a full 32K context, against the bytes of the
/// attended cache rows times the groups reading each: each key once, the values once more
/// (MLA: the latent's `c` part of the same rows, 0.89x of them) — under 2.5x. One program per
/// query head, as before, issued 8x (GQA) to 128x (MLA) of them. (The group's queries, read
/// per key step, are not counted: a few KB that every program reads from L1/L2.)
#[test]
fn decode_attention_reads_the_cache_once_per_kv_head() {
    use lamina_compiler::kernels::Phase;
    use lamina_ir::kernel::count::param_bytes;
    use lamina_ir::kernel::Dim;
    let context = 32768;
    for (example, family, readers) in [
        ("qwen3-next-80b-a3b.toml", "gqa_attend_", 1),
        ("minimax-text-01.toml", "gqa_attend_", 1),
        ("kimi-linear-48b-a3b.toml", "mla_attend_", 1),
        ("deepseek-v3.toml", "mla_attend_", 4),
    ] {
        let m = Model::open(&repo().join("examples").join(example)).unwrap();
        let options = lamina_compiler::passes::Options {
            max_batch: 1,
            max_context: context,
            decode_splits: 0,
            ..gpu_options(Target::Sm90a)
        };
        let (p, _) = lamina_compiler::build::compile_program(&m, options).unwrap();
        let k = p
            .phase_kernels(Phase::Decode)
            .into_iter()
            .find(|k| k.name.starts_with(family))
            .unwrap_or_else(|| panic!("{example}: no {family} kernel"));
        let cache = k.param("cache").unwrap();
        let Some(&Dim::N(entry)) = cache.shape.last() else {
            panic!("{}: cache shape {:?}", k.name, cache.shape)
        };
        // The count model attends the middle of the positions: half the context.
        let attended = (readers * context / 2 * entry * cache.elem.bytes()) as f64;
        if family == "mla_attend_" {
            assert_eq!(k.grid[1], Dim::N(readers), "{}", k.name);
        }
        // GQA's locals (the group's accumulators and logits) fit the block's static shared
        // memory; MLA's 32 heads' latent accumulators (64 KiB) stay in the scratch buffer on
        // sm_80 and fit dynamic shared memory, 2 warps to a block, on sm_90a.
        for target in [Target::Sm80, Target::Sm90a] {
            let expect = match (family, target) {
                ("gqa_attend_", _) => nvptx::LocalsIn::StaticShared,
                (_, Target::Sm90a) => nvptx::LocalsIn::DynamicShared,
                _ => nvptx::LocalsIn::Scratch,
            };
            let layout = nvptx::warp_layout(k, target).unwrap();
            assert_eq!(layout.locals, expect, "{} {target}", k.name);
            assert_eq!(
                (
                    nvptx::locals_in_shared(k, target),
                    nvptx::scratch_bytes(k, target) == 0
                ),
                (
                    expect != nvptx::LocalsIn::Scratch,
                    expect != nvptx::LocalsIn::Scratch
                ),
                "{} {target}",
                k.name
            );
        }
        let loads = param_bytes(k, 1, (0.0, context as f64), "cache");
        let ratio = loads / attended;
        assert!(
            (1.0..2.5).contains(&ratio),
            "{example}: {} loads {:.1} MB of the cache per launch, {ratio:.2}x the {:.1} MB of \
             cache rows it attends",
            k.name,
            loads / 1e6,
            attended / 1e6
        );
        // The automatic split still gives a batch-1 row programs to fill the SMs.
        assert!(
            k.programs(1) >= 32,
            "{}: {} programs",
            k.name,
            k.programs(1)
        );
    }
}

/// Prefill attends flash-style, a program per (64 query rows, head), logits and value
/// products on tensor cores, as a block of 4 warps with its state in registers and bf16
/// products: GQA (Qwen3-Next's 256-wide heads, MiniMax's 128-wide) and MLA (Kimi's and
/// DeepSeek-V3's 192-deep logits and 128-wide values), whose keys and values an expand kernel
/// decompresses from the latent cache first as block-cooperative tensor-core tiles. Decode
/// keeps its split-sequence kernels.
#[test]
fn prefill_attention_is_flash_attention_on_tensor_cores() {
    use lamina_compiler::kernels::attention::FLASH_Q;
    use lamina_compiler::kernels::Phase;
    use lamina_ir::kernel::Dim;
    for (example, family, heads) in [
        ("qwen3-next-80b-a3b.toml", "gqa_", 16),
        ("minimax-text-01.toml", "gqa_", 64),
        ("kimi-linear-48b-a3b.toml", "mla_", 32),
        ("deepseek-v3.toml", "mla_", 128),
    ] {
        let m = Model::open(&repo().join("examples").join(example)).unwrap();
        let (p, _) =
            lamina_compiler::build::compile_program(&m, gpu_options(Target::Sm90a)).unwrap();
        let prefill: Vec<_> = p.schedules[&Phase::Prefill]
            .iter()
            .filter(|l| l.kernel.name.starts_with(family))
            .map(|l| l.kernel.clone())
            .collect();
        let flash = format!("{family}flash_");
        let (attend, expand): (Vec<_>, Vec<_>) = prefill
            .into_iter()
            .partition(|k| k.name.starts_with(&flash));
        assert!(!attend.is_empty(), "{example}");
        for k in &expand {
            assert!(k.name.starts_with("mla_expand_"), "{}", k.name);
            assert!(
                lamina_targets::mlir::lower::staged::staged_tile(k).is_some(),
                "{}: not a block-cooperative tile",
                k.name
            );
        }
        assert_eq!(expand.len(), attend.len() * usize::from(family == "mla_"));
        for k in &attend {
            assert_eq!(
                k.grid,
                vec![Dim::RowBlocks(FLASH_Q), Dim::N(heads)],
                "{}",
                k.name
            );
        }
        assert!(p.schedules[&Phase::Decode]
            .iter()
            .any(|l| l.kernel.name.starts_with(&format!("{family}attend_"))));
        flash_blocks_on_bf16_tensor_cores(&attend[..1]);
    }
}

/// Each of `kernels` is a flash-attention block (FlashAttention-2's loop, its state in
/// registers): one block of 4 warps per program, no scratch, the tiles staged in static
/// shared memory between block barriers, the row statistics combined by shuffles; the products
/// `mma.sync` m16n8k16 bf16 on sm_80 (fragments loaded from shared memory), on sm_90a
/// `wgmma` m64nNk16 with the queries and probabilities from registers and the keys and values
/// read through descriptors (after `fence.proxy.async`), and no `mma.sync`; on both targets
/// ptxas reports no spills, the planned shared memory, and at least one block per SM.
fn flash_blocks_on_bf16_tensor_cores(kernels: &[lamina_ir::kernel::Kernel]) {
    use lamina_targets::mlir::lower::attend::{self, attend_block};
    for k in kernels {
        let a = attend_block(k).unwrap_or_else(|| panic!("{}: not an attention block", k.name));
        assert_eq!(nvptx::lanes(k), attend::LANES, "{}", k.name);
        for target in [Target::Sm90a, Target::Sm80] {
            assert_eq!(nvptx::block_size(k, target), attend::LANES, "{}", k.name);
            assert_eq!(nvptx::scratch_bytes(k, target), 0, "{}", k.name);
            let (ptx, _) = nvptx::compile_ptx(kernels, target).unwrap();
            let text = entry(&ptx, &k.name);
            let sync = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32";
            let wgmma = [
                format!(
                    "wgmma.mma_async.sync.aligned.m64n{}k16.f32.bf16.bf16",
                    attend::KEY_TILE
                ),
                format!("wgmma.mma_async.sync.aligned.m64n{}k16.f32.bf16.bf16", a.vw),
                "wgmma.wait_group.sync.aligned 0".into(),
                "fence.proxy.async.shared::cta".into(),
            ];
            let products = match target {
                Target::Sm90a => {
                    assert!(!text.contains(sync), "{} {target}: mma.sync", k.name);
                    wgmma.to_vec()
                }
                _ => {
                    assert!(!text.contains("wgmma"), "{} {target}: wgmma", k.name);
                    vec![sync.into(), "ld.shared.b32".into()]
                }
            };
            for op in ["bar.sync", "shfl.sync.bfly", "st.shared.b32"]
                .map(String::from)
                .into_iter()
                .chain(products)
            {
                assert!(text.contains(&op), "{} {target}: no {op}", k.name);
            }
            assert!(!text.contains("tf32"), "{} {target}: tf32 products", k.name);
            if ptxas_or_skip("flash_blocks_on_bf16_tensor_cores") {
                for r in nvptx::ptxas(&ptx, target).unwrap() {
                    assert_eq!((r.spill_stores, r.spill_loads), (0, 0), "{}", r.kernel);
                    assert_eq!(r.shared as usize, attend::shared_bytes(a), "{}", r.kernel);
                    assert!(
                        r.blocks_per_sm(attend::LANES, 0, target) >= 1,
                        "{}",
                        r.kernel
                    );
                }
            }
        }
    }
}

/// A GPU decode step launches no kernel just to add a split-K projection's pieces or a
/// residual: the kernels reading those row-wise maps element-wise compute them
/// (`inline-maps`). What keeps a launch of its own is read by a GEMM (the low-rank gates'
/// first projection, the residual stream) or by a kernel that would recompute it too often
/// (MLA's query absorption reads each query element 16 times).
/// Kimi-Linear-48B: 858 launches a step before the pass, 625 with it (444 after
/// `fuse-siblings`, [`decode_steps_fuse_sibling_launches`]).
#[test]
fn decode_steps_inline_row_maps() {
    use lamina_compiler::kernels::{Bind, Phase};
    let m = Model::open(&repo().join("examples/kimi-linear-48b-a3b.toml")).unwrap();
    let (p, _) = lamina_compiler::build::compile_program(&m, gpu_options(Target::Sm90a)).unwrap();
    let decode = &p.schedules[&Phase::Decode];
    assert_eq!(decode.len(), 444);
    // The adds left are the shared experts' residual adds, which took in their split-K sum
    // (and so are not inlined in turn: no chains).
    for l in decode.iter().filter(|l| l.kernel.name.starts_with("add_")) {
        assert!(l.kernel.name.ends_with("_sum8"), "{}", l.kernel.name);
    }
    // Every split-K sum left (plain or with a residual) is read by a GEMM, or feeds several
    // kernels (the residual stream), or a norm that would read it more than 4 times a row.
    for (i, l) in decode.iter().enumerate() {
        if !l.kernel.name.starts_with("splitk_sum") {
            continue;
        }
        let out = l.args.last().unwrap();
        let readers: Vec<_> = decode[i + 1..]
            .iter()
            .filter(|r| {
                r.args
                    .iter()
                    .zip(&r.kernel.params)
                    .any(|(b, q)| b == out && q.access == lamina_ir::kernel::Access::Read)
            })
            .collect();
        assert!(matches!(out, Bind::Act(_)), "{}", l.kernel.name);
        let rereads = |r: &lamina_compiler::kernels::Launch| {
            use lamina_compiler::passes::inline_maps::MAX_READS_PER_ELEMENT;
            let (q, _) = r
                .kernel
                .params
                .iter()
                .zip(&r.args)
                .find(|(_, b)| *b == out)
                .unwrap();
            let bytes = lamina_ir::kernel::count::param_bytes(&r.kernel, 4, (0.0, 1.0), &q.name);
            bytes / (q.numel(4) * q.elem.bytes()) as f64 > MAX_READS_PER_ELEMENT
        };
        assert!(
            readers.len() > 2
                || readers
                    .iter()
                    .any(|r| r.kernel.name.contains("linear_mma") || rereads(r)),
            "{} read by {:?}",
            l.kernel.name,
            readers.iter().map(|r| &r.kernel.name).collect::<Vec<_>>()
        );
    }
}

/// Horizontal fusion (`fuse-siblings`): a KDA layer's six projections of its normed input (q,
/// k, v, the forget gate's and output gate's first low-rank projections, beta) are one launch,
/// the two gates' split-K sums and second projections one launch each, an FFN's gate and up
/// projections one, an MLA layer's query and latent projections one. Kimi-Linear-48B's decode
/// step: 625 launches apart, 444 fused, with the same work by the cost model (each member's
/// programs counted once; the shared input's DRAM bytes once per launch), and every fused
/// kernel assembles for both targets without spills.
#[test]
fn decode_steps_fuse_sibling_launches() {
    use lamina_compiler::kernels::Phase;
    use lamina_compiler::passes::{pipeline, run_pipeline, Program};
    use lamina_ir::kernel::count::launch_work;
    let m = Model::open(&repo().join("examples/kimi-linear-48b-a3b.toml")).unwrap();
    let (fused, _) =
        lamina_compiler::build::compile_program(&m, gpu_options(Target::Sm90a)).unwrap();
    let passes: Vec<_> = pipeline()
        .into_iter()
        .filter(|p| p.name() != "fuse-siblings")
        .collect();
    let mut apart = Program::new(&m.graph, gpu_options(Target::Sm90a));
    run_pipeline(&mut apart, &passes).unwrap();
    for (phase, rows) in [(Phase::Decode, 1), (Phase::Prefill, 512)] {
        let work = |p: &Program| {
            p.schedules[&phase].iter().fold((0.0, 0.0, 0.0), |acc, l| {
                let w = launch_work(&l.kernel, rows, (0.0, 4096.0));
                (
                    acc.0 + w.flops + w.bf16_mma_flops,
                    acc.1 + w.load_bytes,
                    acc.2 + w.dram_bytes,
                )
            })
        };
        let (a, f) = (work(&apart), work(&fused));
        for (x, y) in [(a.0, f.0), (a.1, f.1)] {
            assert!(
                (x - y).abs() <= 1e-9 * x.abs(),
                "{phase:?}: {x} apart, {y} fused"
            );
        }
        // DRAM bytes: an input the members share is read from memory once per launch, not
        // once per member (a few MB of a 6.4 GB step).
        assert!(
            f.2 <= a.2 && f.2 >= a.2 * (1.0 - 1e-3),
            "{phase:?}: {} apart, {} fused",
            a.2,
            f.2
        );
    }
    let decode = &fused.schedules[&Phase::Decode];
    assert_eq!(apart.schedules[&Phase::Decode].len(), 625);
    assert_eq!(decode.len(), 444);
    // Every linear-attention layer's normed input is read by one projection launch.
    let six = decode
        .iter()
        .filter(|l| {
            l.kernel
                .name
                .starts_with("group6_rms_norm_linear_mma_2304x4096")
        })
        .count();
    let kda = m
        .graph
        .schedule()
        .into_iter()
        .filter(|&n| m.graph.node(n).name.ends_with("mixer.recurrence"))
        .count();
    assert!(kda > 0);
    assert_eq!(six, kda);
    if !ptxas_or_skip("decode_steps_fuse_sibling_launches") {
        return;
    }
    let kernels: Vec<_> = fused
        .phase_kernels(Phase::Decode)
        .into_iter()
        .filter(|k| k.name.starts_with("group") || k.name.contains("_x"))
        .cloned()
        .collect();
    assert!(kernels.len() >= 4, "{}", kernels.len());
    for target in [Target::Sm80, Target::Sm90a] {
        let (ptx, _) = nvptx::compile_ptx(&kernels, target).unwrap();
        for r in nvptx::ptxas(&ptx, target).unwrap() {
            assert_eq!(r.spill_stores + r.spill_loads, 0, "{target:?} {}", r.kernel);
        }
    }
}

/// The chunked recurrences' scans (one program per head and 16-row state block, walking the
/// chunks in order, so their latency bounds the prefill) are programs of 4 warps on both
/// targets: on sm_80 the tiles of each product are dealt to the warps (`build::mma_tiles`'
/// split tile loop), on sm_90a each is a warpgroup tile (`wgmma`, all 4 warps); the parallel
/// copies go to all 128 lanes, and the warps meet at block barriers (`bar.sync 0`) where a
/// one-warp program has warp barriers; inside their own tiles sm_80's warps keep warp
/// barriers; the products' columns are the 16 state columns (16-column tiles).
/// One program to a block, its locals and the 4 warps' staging areas in
/// shared memory (on sm_80 too, where one-warp scans kept their locals in scratch), no spills.
/// The chunk kernels are programs of 4 warps on sm_90a too (locals in shared memory, more warps
/// an SM).
#[test]
fn scans_deal_their_tiles_to_four_warps() {
    use lamina_compiler::kernels::Phase;
    if !ptxas_or_skip("scans_deal_their_tiles_to_four_warps") {
        return;
    }
    for example in [
        "qwen3-next-80b-a3b.toml",
        "kimi-linear-48b-a3b.toml",
        "minimax-text-01.toml",
    ] {
        let m = Model::open(&repo().join("examples").join(example)).unwrap();
        for target in [Target::Sm80, Target::Sm90a] {
            let (p, _) = lamina_compiler::build::compile_program(&m, gpu_options(target)).unwrap();
            let prefill = p.phase_kernels(Phase::Prefill);
            let scans: Vec<_> = prefill
                .iter()
                .filter(|k| k.name.contains("_scan"))
                .map(|k| (*k).clone())
                .collect();
            assert_eq!(scans.len(), 1, "{example}");
            // Every product has the 16 state columns as its columns, 16-column tiles (a 32-wide
            // tile would multiply as much padding as data), and the chunk's rows or the key
            // width as its rows: 32-row warp tiles on sm_80, 64-row warpgroup tiles on sm_90a.
            let text = lamina_ir::kernel::print::print_kernel(&scans[0]);
            let rows = if target == Target::Sm90a { 64 } else { 32 };
            let tiles: Vec<_> = text.match_indices(" tile, ").collect();
            assert!(!tiles.is_empty(), "{example} {target}");
            assert_eq!(
                text.matches(&format!("{rows}x16 tile")).count(),
                tiles.len(),
                "{example} {target}: {text}"
            );
            // The chunk kernels take 4 warps a program where their locals then stay in shared
            // memory with at least as many warps an SM and they store only in split loops and
            // tiles (sm_90a), else one (sm_80: locals in scratch).
            for k in prefill.iter().filter(|k| k.name.contains("_chunk")) {
                let warps = nvptx::warp_layout(k, target).unwrap().program_warps;
                let want = if target == Target::Sm90a { 4 } else { 1 };
                assert_eq!(warps, want, "{example} {target} {}", k.name);
            }
            let k = &scans[0];
            let layout = nvptx::warp_layout(k, target).unwrap();
            assert_eq!(
                (layout.program_warps, layout.warps),
                (4, 4),
                "{example} {target}"
            );
            assert_ne!(
                layout.locals,
                nvptx::LocalsIn::Scratch,
                "{example} {target}"
            );
            let launch = nvptx::gpu_launch(k, target);
            assert_eq!(
                (launch.block, launch.lanes),
                (128, 128),
                "{example} {target}"
            );
            assert_eq!(launch.scratch_bytes, 0, "{example} {target}");
            let (ptx, _) = nvptx::compile_ptx(&scans, target).unwrap();
            let body = entry(&ptx, &k.name);
            assert!(
                body.contains("bar.sync \t0;"),
                "{example} {target}: no block barrier"
            );
            // sm_80: warp tiles with warp barriers inside; sm_90a: warpgroup tiles alone.
            if target == Target::Sm90a {
                assert!(body.contains("k8.f32.tf32.tf32"), "{example} {target}");
                assert!(!body.contains("mma.sync"), "{example} {target}");
            } else {
                assert!(
                    body.contains("bar.warp.sync"),
                    "{example} {target}: no warp barrier"
                );
            }
            for r in nvptx::ptxas(&ptx, target).unwrap() {
                assert_eq!(r.spill_stores + r.spill_loads, 0, "{example} {target}");
                let dynamic = launch.dynamic_shared_bytes;
                assert!(
                    r.blocks_per_sm(128, dynamic, target) >= 1,
                    "{example} {target}"
                );
            }
        }
    }
}
