//! Host lowering smoke tests: a kernel built into a shared library and called through the
//! packed ABI the runtime uses.

use lamina_ir::kernel::build::*;
use lamina_ir::kernel::{Dim, Elem, Expr, Kernel};

use crate::host::{build_library, symbol};

fn norm_kernel(cols: usize) -> Kernel {
    named_norm_kernel("norm", cols)
}

fn named_norm_kernel(name: &str, cols: usize) -> Kernel {
    let x = |c: &str| ld("x", [pid(0), v(c)]);
    Kernel {
        name: name.into(),
        nodes: vec!["test.norm".into()],
        grid: vec![Dim::Rows],
        params: vec![
            input("x", &[Dim::Rows, Dim::N(cols)]),
            output("y", &[Dim::Rows, Dim::N(cols)]),
        ],
        body: vec![
            let_("ss", sum("c", i(0), i(cols), x("c") * x("c"))),
            let_("inv", rsqrt(v("ss") / f(cols as f64) + f(1e-6))),
            for_(
                "c",
                i(0),
                i(cols),
                vec![st("y", [pid(0), v("c")], silu(x("c") * v("inv")))],
            ),
        ],
    }
}

/// `ptx` assembled by `ptxas` for `target` (its kernels' resources), or `None` when ptxas is
/// not installed: a visible skip of `what`, or a failure under `LAMINA_REQUIRE_PTXAS=1`.
fn assembled(ptx: &str, target: crate::Target, what: &str) -> Option<Vec<crate::nvptx::Resources>> {
    if crate::nvptx::ptxas_path().is_some() {
        return Some(crate::nvptx::ptxas(ptx, target).unwrap());
    }
    assert!(
        std::env::var("LAMINA_REQUIRE_PTXAS").as_deref() != Ok("1"),
        "ptxas required but not found"
    );
    eprintln!("SKIPPED: ptxas not installed, {what}'s PTX is not assembled");
    None
}

/// Calls `_mlir_<name>` with flat f32 buffers.
pub(crate) fn call(
    lib: &libloading::Library,
    name: &str,
    bufs: &mut [&mut [f32]],
    rows: i64,
    lo: i64,
    hi: i64,
) {
    let mut desc: Vec<[i64; 5]> = bufs
        .iter_mut()
        .map(|b| {
            [
                b.as_mut_ptr() as i64,
                b.as_mut_ptr() as i64,
                0,
                b.len() as i64,
                1,
            ]
        })
        .collect();
    let mut scalars = [rows, lo, hi];
    let mut args: Vec<*mut i64> = Vec::new();
    for d in desc.iter_mut() {
        for f in d.iter_mut() {
            args.push(f as *mut i64);
        }
    }
    for s in scalars.iter_mut() {
        args.push(s as *mut i64);
    }
    unsafe {
        let f: libloading::Symbol<unsafe extern "C" fn(*mut *mut i64)> =
            lib.get(symbol(name).as_bytes()).unwrap();
        f(args.as_mut_ptr());
    }
}

#[test]
fn norm_kernel_runs_from_a_shared_library() {
    let dir = tempfile::tempdir().unwrap();
    let so = dir.path().join("kernels.so");
    build_library(&[norm_kernel(37)], &so).unwrap();
    check_norm(&so, "norm");
}

/// A second library with one kernel in common takes that kernel's object from the cache,
/// compiles the other, and runs.
#[test]
fn kernel_cache_serves_kernels_compiled_before() {
    use crate::cache::KernelCache;
    use crate::host::build_library_with_progress;
    use crate::mlir::Flavor;
    let dir = tempfile::tempdir().unwrap();
    let cache = KernelCache::new(dir.path().join("cache"));
    let build = |kernels: &[Kernel], so: &str| {
        let so = dir.path().join(so);
        let t = build_library_with_progress(kernels, &so, Flavor::Host, Some(&cache), &|_, _| {})
            .unwrap();
        assert!(t.cache_errors.is_empty(), "{:?}", t.cache_errors);
        (so, t.cached)
    };
    let (_, cached) = build(
        &[named_norm_kernel("norm", 37), named_norm_kernel("wide", 41)],
        "a.so",
    );
    assert_eq!(cached, 0);
    let (so, cached) = build(
        &[
            named_norm_kernel("other", 29),
            named_norm_kernel("norm", 37),
        ],
        "b.so",
    );
    assert_eq!(cached, 1, "norm compiled before, other not");
    check_norm(&so, "norm");
    // The same kernel under another name is another object.
    let (_, cached) = build(&[named_norm_kernel("renamed", 37)], "c.so");
    assert_eq!(cached, 0);
}

/// Runs the 37-column norm kernel `name` of library `so` against f32 arithmetic.
fn check_norm(so: &std::path::Path, name: &str) {
    let lib = unsafe { libloading::Library::new(so) }.unwrap();
    let rows = 5;
    let mut x: Vec<f32> = (0..rows * 37)
        .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let mut y = vec![f32::NAN; rows * 37];
    call(
        &lib,
        name,
        &mut [&mut x, &mut y],
        rows as i64,
        0,
        rows as i64,
    );
    for r in 0..rows {
        let xr = &x[r * 37..][..37];
        let inv = 1.0 / ((xr.iter().map(|v| v * v).sum::<f32>() / 37.0 + 1e-6).sqrt());
        for c in 0..37 {
            let z = xr[c] * inv;
            let want = z / (1.0 + (-z).exp());
            assert!(
                (y[r * 37 + c] - want).abs() < 1e-5,
                "{} vs {want}",
                y[r * 37 + c]
            );
        }
    }
}

/// The bits of `v` rounded to the nearest TF32, ties away from zero; infinities and NaNs only
/// masked (as `UnOp::Tf32Round` and the TF32 MMA fragments compute it).
fn tf32_round_bits(v: f32) -> u32 {
    let b = v.to_bits();
    let up = if b & 0x7f80_0000 == 0x7f80_0000 {
        b
    } else {
        b.wrapping_add(0x1000)
    };
    up & 0xffff_e000
}

/// `UnOp::Tf32Round` on the host, bit for bit: ties, a carry into the exponent, the largest
/// finite values (rounding to infinity), both infinities, and NaNs, which stay NaNs (NVIDIA's
/// canonical 0x7fffffff would carry into the sign bit and come out as -0 if rounded as a
/// finite value).
#[test]
fn tf32_rounding_is_to_nearest_and_keeps_nan() {
    let kernel = Kernel {
        name: "round".into(),
        nodes: vec![],
        grid: vec![Dim::Rows],
        params: vec![input("x", &[Dim::Rows]), output("y", &[Dim::Rows])],
        body: vec![st("y", [pid(0)], tf32_round(ld("x", [pid(0)])))],
    };
    let bits: [u32; 12] = [
        0x3f80_1000, // 1 + half a TF32 step: a tie, away from zero
        0x3f80_0fff, // just below: down
        0xbf80_1000, // the negative tie: away from zero
        0x3fff_f000, // carries into the exponent: 2.0
        0x7f7f_ffff, // the largest finite f32: to infinity
        0x7f80_0000,
        0xff80_0000,
        0x7fff_ffff, // NVIDIA's canonical NaN
        0xffff_ffff,
        0x7fc0_0000,
        0x0000_1000, // a denormal tie
        0x0000_0000,
    ];
    let mut x: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
    let mut y = vec![0f32; x.len()];
    let dir = tempfile::tempdir().unwrap();
    let so = dir.path().join("kernels.so");
    build_library(std::slice::from_ref(&kernel), &so).unwrap();
    let lib = unsafe { libloading::Library::new(&so) }.unwrap();
    let n = x.len() as i64;
    call(&lib, "round", &mut [&mut x, &mut y], n, 0, n);
    for (&xv, &yv) in x.iter().zip(&y) {
        assert_eq!(yv.to_bits(), tf32_round_bits(xv), "{:#010x}", xv.to_bits());
        assert_eq!(yv.is_nan(), xv.is_nan(), "{:#010x}", xv.to_bits());
    }
    assert_eq!(y[0].to_bits(), 0x3f80_2000);
    assert_eq!(y[1].to_bits(), 0x3f80_0000);
    assert_eq!(y[3], 2.0);
    assert_eq!(y[4], f32::INFINITY);
}

#[test]
fn mlir_text_is_verified_and_names_the_kernel() {
    let text = crate::mlir::print_mlir(&[norm_kernel(8)]).unwrap();
    assert!(text.contains("func.func @norm"), "{text}");
    assert!(text.contains("scf.for"), "{text}");
}

/// The inner reductions come out as packed SIMD code: LLVM's loop vectorizer is what the host
/// target relies on (no explicit vector dialect), so a change that defeats it (a lost fastmath
/// flag, an aliasing-hostile access) must fail here. Needs `objdump` (binutils); skipped
/// visibly without it.
#[test]
fn reductions_are_vectorised() {
    let Ok(probe) = std::process::Command::new("objdump")
        .arg("--version")
        .output()
    else {
        eprintln!("SKIP reductions_are_vectorised: objdump (binutils) is not installed");
        return;
    };
    assert!(probe.status.success());
    let dir = tempfile::tempdir().unwrap();
    let so = dir.path().join("kernels.so");
    build_library(&[norm_kernel(256)], &so).unwrap();
    let out = std::process::Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(&so)
        .output()
        .unwrap();
    let asm = String::from_utf8_lossy(&out.stdout);
    let body: Vec<&str> = asm
        .split("\n\n")
        .filter(|f| f.contains("<norm>:"))
        .flat_map(|f| f.lines())
        .collect();
    assert!(!body.is_empty(), "no <norm> function in the library");
    // Packed single-precision arithmetic (SSE/AVX/AVX-512: ...ps on xmm/ymm/zmm).
    let packed = body
        .iter()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| {
            m.ends_with("ps") && (m.contains("fmadd") || m.contains("mulps") || m.contains("addps"))
        })
        .count();
    assert!(
        packed >= 2,
        "the norm kernel's reductions are not vectorised:\n{}",
        body.join("\n")
    );
}

/// The tile operations (dot, cumsum, trisolve), expanded into loops and compiled, against the
/// same math in Rust. x: [3 rows × 4] f32 input, `a` = x, `b` = x (so dot is x xᵀ).
#[test]
fn tile_operations_compute_what_they_say() {
    let (n, k) = (3usize, 4usize);
    let load = |name: &str| {
        for_(
            "p",
            i(0),
            i(n * k),
            vec![st(name, [v("p")], ld("x", [v("p")]))],
        )
    };
    let kernel = Kernel {
        name: "tiles".into(),
        nodes: vec!["test.tiles".into()],
        grid: vec![Dim::N(1)],
        params: vec![
            input("x", &[Dim::N(n * k)]),
            output("y", &[Dim::N(n * n + n * k + n * k)]),
        ],
        body: vec![
            local("a", n * k),
            local("m", n * n),
            local("c", n * k),
            local("s", n * k),
            load("a"),
            load("c"),
            load("s"),
            // m = a aᵀ; c = cumsum of a's rows; s = (I + strict_lower(m))⁻¹ a.
            dot(
                view("m", i(0), n),
                view("a", i(0), k),
                view("a", i(0), k),
                i(n),
                i(n),
                k,
                false,
            ),
            cumsum(view("c", i(0), k), i(n), k),
            trisolve(view("m", i(0), n), view("s", i(0), k), i(n), k),
            for_(
                "p",
                i(0),
                i(n * n),
                vec![st("y", [v("p")], ld("m", [v("p")]))],
            ),
            for_(
                "p",
                i(0),
                i(n * k),
                vec![st("y", [i(n * n) + v("p")], ld("c", [v("p")]))],
            ),
            for_(
                "p",
                i(0),
                i(n * k),
                vec![st("y", [i(n * n + n * k) + v("p")], ld("s", [v("p")]))],
            ),
        ],
    };
    lamina_ir::kernel::verify::verify_kernel(&kernel).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let so = dir.path().join("kernels.so");
    build_library(&[kernel], &so).unwrap();
    let lib = unsafe { libloading::Library::new(&so) }.unwrap();
    let mut x: Vec<f32> = (0..n * k)
        .map(|p| ((p * 37) % 11) as f32 / 7.0 - 0.6)
        .collect();
    let mut y = vec![f32::NAN; n * n + 2 * n * k];
    call(&lib, "tiles", &mut [&mut x, &mut y], 1, 0, 1);
    let at = |r: usize, c: usize| x[r * k + c];
    let mut m = vec![0f32; n * n];
    for r in 0..n {
        for c in 0..n {
            m[r * n + c] = (0..k).map(|e| at(r, e) * at(c, e)).sum();
        }
    }
    let mut cs = x.clone();
    for r in 1..n {
        for c in 0..k {
            cs[r * k + c] += cs[(r - 1) * k + c];
        }
    }
    let mut sol = x.clone();
    for r in 0..n {
        for c in 0..k {
            let corr: f32 = (0..r).map(|j| m[r * n + j] * sol[j * k + c]).sum();
            sol[r * k + c] -= corr;
        }
    }
    let want: Vec<f32> = m.iter().chain(&cs).chain(&sol).copied().collect();
    for (p, (g, w)) in y.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "element {p}: {g} vs {w}"
        );
    }
}

/// `y = x wᵀ + bias` as 32 × 16 MMA tiles with every edge ragged (45 rows, 21 columns, depth
/// 40 or 37): compiled for the host (and with 32 emulated lanes), every element written once,
/// equal to the kind's products summed exactly (bf16: Σ bf16(x)·bf16(w); TF32x3: Σ x·w to
/// ~2^-20); and the same kernels for the GPU assemble (when ptxas is installed) with their MMAs.
fn mma_kernel(cols: usize, depth: usize, kind: lamina_ir::kernel::MmaKind) -> Kernel {
    sized_mma_kernel([32, 16], cols, depth, kind, lamina_ir::kernel::Elem::F32)
}

/// `y = x·wᵀ + bias` as `tr × tc` MMA tiles (`w` stored as `w_elem`).
fn sized_mma_kernel(
    [tr, tc]: [usize; 2],
    cols: usize,
    depth: usize,
    kind: lamina_ir::kernel::MmaKind,
    w_elem: lamina_ir::kernel::Elem,
) -> Kernel {
    let mut tile = mma(
        [tr, tc, depth],
        min(i(tr), rows() - v("r0")),
        min(i(tc), i(cols) - v("n0")),
        ld("x", [v("r0") + v("mi"), v("k")]),
        ld("w", [v("n0") + v("mj"), v("k")]),
        vec![st(
            "y",
            [v("r0") + v("mi"), v("n0") + v("mj")],
            v("acc") + ld("bias", [v("n0") + v("mj")]),
        )],
    );
    if let lamina_ir::kernel::Stmt::Mma(m) = &mut tile {
        m.kind = kind;
    }
    Kernel {
        name: "mma_tile".into(),
        nodes: vec!["test.mma".into()],
        grid: vec![Dim::N(cols.div_ceil(tc)), Dim::RowBlocks(tr)],
        params: vec![
            input("x", &[Dim::Rows, Dim::N(depth)]),
            param(
                "w",
                w_elem,
                &[Dim::N(cols), Dim::N(depth)],
                lamina_ir::kernel::Access::Read,
            ),
            input("bias", &[Dim::N(cols)]),
            output("y", &[Dim::Rows, Dim::N(cols)]),
        ],
        body: vec![let_("n0", pid(0) * i(tc)), let_("r0", pid(1) * i(tr)), tile],
    }
}

/// A prefill-sized bf16 tile (128 × 64, bf16 weights) runs as a block-cooperative program:
/// the weights staged by `cp.async`, the activations by the threads, products by `wgmma` on
/// sm_90a (two 64-row halves per 16-deep step) and by `mma.sync` on sm_80 (16 per warp per
/// step); it assembles without spills within the static shared-memory budget. Its arithmetic
/// is the MMA tile's (checked on the host by `mma_tiles_compute_rounded_products_exactly`).
#[test]
fn staged_tiles_assemble_for_both_gpus() {
    use crate::mlir::lower::staged::{self, shared_bytes, staged_tile};
    use crate::Target;
    use lamina_ir::kernel::{Elem, MmaKind};
    let kernel = sized_mma_kernel([128, 64], 200, 96, MmaKind::Bf16, Elem::Bf16);
    let tile = staged_tile(&kernel).expect("a staged tile");
    assert_eq!(crate::nvptx::lanes(&kernel), staged::LANES);
    // f32 weights are staged by the threads (no cp.async); small tiles stay one warp.
    let f32_weights = sized_mma_kernel([128, 64], 200, 96, MmaKind::Bf16, Elem::F32);
    assert!(staged_tile(&f32_weights).is_some());
    assert!(staged_tile(&mma_kernel(21, 40, MmaKind::Bf16)).is_none());
    for target in [Target::Sm80, Target::Sm90a] {
        let (ptx, _) = crate::nvptx::compile_ptx(std::slice::from_ref(&kernel), target).unwrap();
        let count = |s: &str| ptx.matches(s).count();
        assert!(
            count("cp.async.cg.shared.global") >= 2,
            "{target}: cp.async"
        );
        assert!(count("bar.sync") >= 1, "{target}: block barrier");
        match target {
            Target::Sm90a => {
                assert_eq!(
                    count("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16"),
                    4
                );
                assert!(count("fence.proxy.async.shared::cta") >= 1);
                assert!(count("wgmma.wait_group.sync.aligned") >= 1);
            }
            _ => {
                let mma = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32";
                assert_eq!(count(mma), 2 * 16, "{target}");
                assert_eq!(count("wgmma"), 0);
            }
        }
        if let Some(res) = assembled(&ptx, target, "the staged kernel") {
            assert_eq!(res.len(), 1);
            assert_eq!(res[0].spill_stores + res[0].spill_loads, 0, "{target}");
            assert_eq!(res[0].shared as usize, shared_bytes(tile), "{target}");
            assert!(
                res[0].blocks_per_sm(staged::LANES, 0, target) >= 1,
                "{target}"
            );
        }
    }
}

#[test]
fn mma_tiles_compute_rounded_products_exactly() {
    use lamina_ir::kernel::MmaKind;
    // bf16 products exactly; TF32x3 products to ~2^-20 (depth 37: a ragged last step of 8);
    // f32 tiles (f32 products on the host, TF32x3 with the lanes emulated) likewise.
    for (kind, depth, tol) in [
        (MmaKind::Bf16, 40usize, 1e-6),
        (MmaKind::Tf32x3, 37, 1e-6),
        (MmaKind::F32, 37, 1e-6),
        (MmaKind::Tf32, 37, 1e-6),
    ] {
        check_mma_tile(kind, depth, tol);
    }
}

/// Inputs of [`sized_mma_kernel`]: `x` `[rows, depth]` and `w` `[cols, depth]` of mixed signs
/// that no short period repeats, and `bias` `[cols]`.
fn mma_inputs(rows: usize, cols: usize, depth: usize) -> [Vec<f32>; 3] {
    [
        (0..rows * depth)
            .map(|p| ((p * 7919) % 1013) as f32 / 377.0 - 1.3)
            .collect(),
        (0..cols * depth)
            .map(|p| ((p * 104729) % 997) as f32 / 411.0 - 1.1)
            .collect(),
        (0..cols).map(|c| c as f32 / 8.0).collect(),
    ]
}

fn check_mma_tile(kind: lamina_ir::kernel::MmaKind, depth: usize, tol: f64) {
    use crate::host::build_library_with_progress;
    use crate::mlir::Flavor;
    use lamina_ir::kernel::MmaKind;
    let (rows, cols) = (45usize, 21usize);
    let kernel = mma_kernel(cols, depth, kind);
    lamina_ir::kernel::verify::verify_kernel(&kernel).unwrap();
    let [mut x, mut w, mut bias] = mma_inputs(rows, cols, depth);
    let bf = |v: f32| match kind {
        MmaKind::Bf16 => half::bf16::from_f32(v).to_f32() as f64,
        MmaKind::Tf32x3 | MmaKind::F32 => v as f64,
        // Rounded to TF32 (ties away): products of two are exact in f32.
        MmaKind::Tf32 => f32::from_bits(tf32_round_bits(v)) as f64,
    };
    // Each element's value, and the size of its terms (errors are relative to them).
    let want: Vec<(f64, f64)> = (0..rows * cols)
        .map(|p| {
            let (r, c) = (p / cols, p % cols);
            let terms = (0..depth).map(|k| bf(x[r * depth + k]) * bf(w[c * depth + k]));
            let dot: f64 = terms.clone().sum();
            let size: f64 = terms.map(f64::abs).sum();
            (dot + bias[c] as f64, size + (bias[c] as f64).abs())
        })
        .collect();
    if matches!(kind, MmaKind::Bf16 | MmaKind::Tf32) {
        // Rounding matters here: the unrounded product is far from `want`.
        let plain = (0..depth).map(|k| x[k] as f64 * w[k] as f64).sum::<f64>() + bias[0] as f64;
        assert!((plain - want[0].0).abs() > 1e-4, "{plain} vs {}", want[0].0);
    }
    let blocks = cols.div_ceil(16) * rows.div_ceil(32);
    for flavor in [Flavor::Host, Flavor::HostLanes(32)] {
        let dir = tempfile::tempdir().unwrap();
        let so = dir.path().join("kernels.so");
        build_library_with_progress(std::slice::from_ref(&kernel), &so, flavor, None, &|_, _| {})
            .unwrap();
        let lib = unsafe { libloading::Library::new(&so) }.unwrap();
        let mut y = vec![f32::NAN; rows * cols];
        call(
            &lib,
            "mma_tile",
            &mut [&mut x, &mut w, &mut bias, &mut y],
            rows as i64,
            0,
            blocks as i64,
        );
        for (p, (g, (w, size))) in y.iter().zip(&want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= tol * (1.0 + size),
                "{kind:?} {flavor:?} element {p}: {g} vs {w}"
            );
        }
    }
}

#[test]
fn mma_tiles_assemble_for_both_gpus() {
    use crate::Target;
    use lamina_ir::kernel::MmaKind;
    for (target, kind) in [
        (Target::Sm80, MmaKind::Bf16),
        (Target::Sm90a, MmaKind::Bf16),
        (Target::Sm80, MmaKind::Tf32x3),
        (Target::Sm90a, MmaKind::Tf32x3),
        (Target::Sm80, MmaKind::F32),
        (Target::Sm90a, MmaKind::Tf32),
    ] {
        let kernel = mma_kernel(21, 37, kind);
        let instr = match kind {
            MmaKind::Bf16 => "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
            // An f32 tile runs as TF32x3 on a GPU.
            MmaKind::Tf32x3 | MmaKind::F32 | MmaKind::Tf32 => {
                "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"
            }
        };
        let (ptx, _) = crate::nvptx::compile_ptx(std::slice::from_ref(&kernel), target).unwrap();
        // 2 × 2 MMAs per step (three each for TF32x3).
        let mmas = ptx.lines().filter(|l| l.contains(instr)).count();
        assert!(mmas >= 4, "{target} {kind:?}: {mmas} {instr} in\n{ptx}");
        if let Some(res) = assembled(&ptx, target, "the MMA kernel") {
            assert_eq!(res.len(), 1);
            assert_eq!(
                res[0].spill_stores + res[0].spill_loads,
                0,
                "{target}: spills"
            );
        }
    }
}

/// A 64-row TF32 tile (a warpgroup tile) that one warp runs is lowered as its 32-row blocks
/// ([`crate::mlir::lower::row_blocks`]): the blocks compute what the whole tile does (the
/// host runs both forms; rows 0..70, so the last program's second block is partial and a
/// third program has no second block), and the one-warp sm_90a program assembles as `mma.sync`
/// without spills.
#[test]
fn warpgroup_tiles_in_one_warp_run_in_row_blocks() {
    use crate::host::build_library_with_progress;
    use crate::mlir::Flavor;
    use crate::Target;
    use lamina_ir::kernel::{Elem, MmaKind, Stmt};
    let (rows, cols, depth) = (70usize, 24usize, 37usize);
    let whole = sized_mma_kernel([64, 64], cols, depth, MmaKind::F32, Elem::F32);
    let split = {
        let mut k = whole.clone();
        let last = k.body.pop().unwrap();
        let Stmt::Mma(tile) = &last else {
            panic!("no tile")
        };
        k.body
            .extend(crate::mlir::lower::row_blocks(tile).expect("a 64-row f32 tile splits"));
        k
    };
    lamina_ir::kernel::verify::verify_kernel(&split).unwrap();
    let [x, w, bias] = mma_inputs(rows, cols, depth);
    let run = |k: &Kernel| {
        let dir = tempfile::tempdir().unwrap();
        let so = dir.path().join("kernels.so");
        build_library_with_progress(
            std::slice::from_ref(k),
            &so,
            Flavor::HostStrict,
            None,
            &|_, _| {},
        )
        .unwrap();
        let lib = unsafe { libloading::Library::new(&so) }.unwrap();
        let (mut x, mut w, mut bias) = (x.clone(), w.clone(), bias.clone());
        let mut y = vec![f32::NAN; rows * cols];
        call(
            &lib,
            "mma_tile",
            &mut [&mut x, &mut w, &mut bias, &mut y],
            rows as i64,
            0,
            rows.div_ceil(64) as i64,
        );
        y
    };
    let (a, b) = (run(&whole), run(&split));
    assert!(a.iter().all(|v| v.is_finite()));
    assert_eq!(a, b);
    let (ptx, _) = crate::nvptx::compile_ptx(std::slice::from_ref(&whole), Target::Sm90a).unwrap();
    assert_eq!(crate::nvptx::program_warps(&whole, Target::Sm90a), 1);
    assert!(ptx.contains("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"));
    assert!(!ptx.contains("wgmma"));
    if let Some(res) = assembled(&ptx, Target::Sm90a, "a one-warp warpgroup tile") {
        assert_eq!(res[0].spill_stores + res[0].spill_loads, 0, "spills");
    }
}

/// A program of 4 warps on sm_90a whose locals leave no room for a warpgroup staging area: its
/// 64-row tiles are dealt to the warps as 32-row blocks, and the warps' `cp.async` staging is
/// sized for them (not for the other tiles alone); it lowers and assembles without spills.
#[test]
fn warpgroup_tiles_without_an_area_are_dealt() {
    use crate::nvptx::{self, LocalsIn};
    use crate::Target;
    use lamina_ir::kernel::MmaKind;
    let (rows, cols, depth) = (128usize, 64usize, 128usize);
    let big = (nvptx::dynamic_shared_budget(Target::Sm90a) - (2 << 10)) / 4;
    let tile = mma_tiles(
        MmaKind::F32,
        Tiling::Warpgroup,
        i(rows),
        i(cols),
        depth,
        &|r, k| ld("x", [r, k]),
        &|c, k| ld("w", [c, k]),
        &|r, c, acc| {
            vec![st(
                "y",
                [r.clone(), c.clone()],
                acc + ld("buf", [r * i(cols) + c]),
            )]
        },
    );
    let kernel = Kernel {
        name: "no_group_area".into(),
        nodes: vec![],
        grid: vec![Dim::N(1)],
        params: vec![
            input("x", &[Dim::N(rows), Dim::N(depth)]),
            input("w", &[Dim::N(cols), Dim::N(depth)]),
            output("y", &[Dim::N(rows), Dim::N(cols)]),
        ],
        body: vec![
            local("buf", big),
            for_par("q", i(0), i(big), vec![st("buf", [v("q")], f(0.5))]),
            tile,
        ],
    };
    let layout = nvptx::warp_layout(&kernel, Target::Sm90a).unwrap();
    assert_eq!(layout.program_warps, 4);
    assert_eq!(layout.group_staging, 0, "{layout:?}");
    if layout.locals == LocalsIn::Scratch {
        assert!(layout.staging > 0, "{layout:?}");
    }
    let (ptx, _) = nvptx::compile_ptx(std::slice::from_ref(&kernel), Target::Sm90a).unwrap();
    assert!(!ptx.contains("wgmma"));
    assert!(ptx.contains("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"));
    if let Some(res) = assembled(&ptx, Target::Sm90a, "a warpgroup tile without an area") {
        assert_eq!(res[0].spill_stores + res[0].spill_loads, 0, "spills");
    }
}

/// A warp's share of a dealt reduction that reads nothing contiguously (here a strided row)
/// runs [`crate::mlir::lower::REDUCE_UNROLL`] iterations per trip, each one's load issued
/// before the first add (so the warp keeps that many loads in flight per lane), then the
/// remainder one by one.
#[test]
fn dealt_reductions_keep_loads_in_flight() {
    use crate::mlir::lower::REDUCE_UNROLL;
    use crate::Target;
    let cols = 2048;
    let x = |c: Expr| ld("x", [pid(0), c * i(2)]);
    let kernel = Kernel {
        name: "strided_norm".into(),
        nodes: vec![],
        grid: vec![Dim::Rows],
        params: vec![
            input("x", &[Dim::Rows, Dim::N(2 * cols)]),
            output("y", &[Dim::Rows]),
        ],
        body: vec![st(
            "y",
            [pid(0)],
            sum("c", i(0), i(cols), x(v("c")) * x(v("c"))),
        )],
    };
    assert_eq!(crate::nvptx::lanes(&kernel), crate::nvptx::WARP);
    let (ptx, _) = crate::nvptx::compile_ptx(std::slice::from_ref(&kernel), Target::Sm90a).unwrap();
    // The longest run of global loads between two branches: one unrolled trip's.
    let mut run = 0;
    let mut most = 0;
    for line in ptx.lines() {
        if line.contains("ld.global") {
            run += 1;
            most = most.max(run);
        } else if line.contains("bra") || line.starts_with("$L") {
            run = 0;
        }
    }
    assert!(
        most >= REDUCE_UNROLL,
        "{most} loads in the longest straight run of\n{ptx}"
    );
}

/// A GEMV-like kernel of `depth` (a split sum carrying two output columns, a reduction, and a
/// parallel loop writing a row of products) whose weights are `w_elem`: every loop reads `x`
/// and `w` contiguously (the parallel one writes `z` so too), so it is dealt in blocks
/// ([`crate::mlir::lower`]'s `deal`).
fn blocked_kernel(depth: usize, w_elem: Elem) -> Kernel {
    use lamina_ir::kernel::Access;
    let x = |c: &str| ld("x", [pid(0), v(c)]);
    let w = |r: Expr, c: &str| ld("w", [r, v(c)]);
    Kernel {
        name: "blocked".into(),
        nodes: vec![],
        grid: vec![Dim::Rows, Dim::N(4)],
        params: vec![
            input("x", &[Dim::Rows, Dim::N(depth)]),
            param("w", w_elem, &[Dim::N(8), Dim::N(depth)], Access::Read),
            output("y", &[Dim::Rows, Dim::N(8)]),
            output("s", &[Dim::Rows, Dim::N(4)]),
            output("z", &[Dim::Rows, Dim::N(4), Dim::N(depth)]),
        ],
        body: vec![
            for_sum(
                "c",
                i(0),
                i(depth),
                vec![("a", f(0.0)), ("b", f(0.0))],
                vec![
                    let_("xc", x("c")),
                    let_("w0", w(pid(1) * i(2), "c")),
                    let_("w1", w(pid(1) * i(2) + i(1), "c")),
                ],
                vec![v("a") + v("xc") * v("w0"), v("b") + v("xc") * v("w1")],
            ),
            st("y", [pid(0), pid(1) * i(2)], v("a")),
            st("y", [pid(0), pid(1) * i(2) + i(1)], v("b")),
            st(
                "s",
                [pid(0), pid(1)],
                sum("k", i(0), i(depth), x("k") * w(pid(1), "k")),
            ),
            for_par(
                "c",
                i(0),
                i(depth),
                vec![st(
                    "z",
                    [pid(0), pid(1), v("c")],
                    x("c") * w(pid(1), "c") + f(1.0),
                )],
            ),
        ],
    }
}

/// Split sums, reductions and parallel loops that read (or write) buffers contiguously are
/// dealt to the lanes in blocks (here 4 f32 iterations, rounds of 128): the host's emulation
/// of the lanes takes every iteration once, in the whole trips (4 rounds each here), the
/// rounds left over and the ragged remainder alike, and matches the plain host build and an
/// f64 sum. Depths: below a
/// round; 2 rounds; 6 rounds (a trip and 2 left) and a remainder; 16 rounds and a remainder.
#[test]
fn blocked_deal_takes_every_iteration_once() {
    use crate::host::build_library_with_progress;
    use crate::mlir::Flavor;
    for depth in [40, 256, 3 * 256 + 40, 2048 + 40] {
        let kernel = blocked_kernel(depth, Elem::F32);
        let rows = 3;
        let x: Vec<f32> = (0..rows * depth)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let w: Vec<f32> = (0..8 * depth)
            .map(|i| ((i * 104_729) % 97) as f32 / 48.0 - 1.0)
            .collect();
        let dot = |r: usize, o: usize| -> f64 {
            (0..depth)
                .map(|c| x[r * depth + c] as f64 * w[o * depth + c] as f64)
                .sum()
        };
        for flavor in [Flavor::Host, Flavor::HostLanes(32)] {
            let dir = tempfile::tempdir().unwrap();
            let so = dir.path().join("kernels.so");
            build_library_with_progress(
                std::slice::from_ref(&kernel),
                &so,
                flavor,
                None,
                &|_, _| {},
            )
            .unwrap();
            let lib = unsafe { libloading::Library::new(&so) }.unwrap();
            let (mut x, mut w) = (x.clone(), w.clone());
            let mut y = vec![f32::NAN; rows * 8];
            let mut s = vec![f32::NAN; rows * 4];
            let mut z = vec![f32::NAN; rows * 4 * depth];
            call(
                &lib,
                "blocked",
                &mut [&mut x, &mut w, &mut y, &mut s, &mut z],
                rows as i64,
                0,
                rows as i64 * 4,
            );
            for r in 0..rows {
                for o in 0..8 {
                    let (got, want) = (y[r * 8 + o] as f64, dot(r, o));
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{flavor:?} depth {depth} y[{r}, {o}]: {got} vs {want}"
                    );
                }
                for o in 0..4 {
                    for c in 0..depth {
                        let want = x[r * depth + c] as f64 * w[o * depth + c] as f64 + 1.0;
                        let got = z[(r * 4 + o) * depth + c] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                            "{flavor:?} depth {depth} z[{r}, {o}, {c}]: {got} vs {want}"
                        );
                    }
                    let (got, want) = (s[r * 4 + o] as f64, dot(r, o));
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{flavor:?} depth {depth} s[{r}, {o}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}

/// On a GPU, the blocked deal reads each lane's block of a contiguous operand with 16-byte
/// vector loads: 8 bf16 weights in one `ld.global.v4`, 8 f32 activations in two; only the
/// ragged remainder is read element by element. The kernel assembles without spills.
#[test]
fn blocked_deal_reads_16_byte_vectors() {
    use crate::Target;
    let kernel = blocked_kernel(2048 + 40, Elem::Bf16);
    assert_eq!(crate::nvptx::lanes(&kernel), crate::nvptx::WARP);
    for target in [Target::Sm80, Target::Sm90a] {
        let (ptx, _) = crate::nvptx::compile_ptx(std::slice::from_ref(&kernel), target).unwrap();
        let count = |s: &str| ptx.lines().filter(|l| l.contains(s)).count();
        // Per round: the sum's x (2 vector loads), w0 and w1 (1 each), 64 bytes a lane; the
        // reduction's x (2) and w (1), 48 bytes. Both take 4 rounds per trip (256 bytes at
        // most), and the 8 whole rounds are 2 trips (the loops of leftover rounds fold away).
        assert!(
            count("ld.global.v4.b32") >= 4 * 4 + 4 * 3,
            "{target}: {ptx}"
        );
        // The parallel loop's rows of z: 8 f32 per block, two vector stores.
        assert!(count("st.global.v4.b32") >= 2, "{target}: {ptx}");
        // The remainders' scalar loads: x, w0 and w1, then x and w.
        assert!(
            count("ld.global.b16") + count("ld.global.u16") >= 3,
            "{target}: {ptx}"
        );
        if let Some(res) = assembled(&ptx, target, "the blocked kernel") {
            assert_eq!(
                res[0].spill_stores + res[0].spill_loads,
                0,
                "{target}: spills"
            );
        }
    }
}
