//! Host lowering smoke tests: a kernel built into a shared library and called through the
//! packed ABI the runtime uses.

use lamina_ir::kernel::build::*;
use lamina_ir::kernel::{Dim, Kernel};

use crate::host::{build_library, symbol};

fn norm_kernel(cols: usize) -> Kernel {
    let x = |c: &str| ld("x", [pid(0), v(c)]);
    Kernel {
        name: "norm".into(),
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
    let lib = unsafe { libloading::Library::new(&so) }.unwrap();
    let rows = 5;
    let mut x: Vec<f32> = (0..rows * 37)
        .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let mut y = vec![f32::NAN; rows * 37];
    call(
        &lib,
        "norm",
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
