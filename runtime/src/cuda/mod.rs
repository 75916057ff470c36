//! The CUDA executor (feature `cuda`): runs NVPTX plans (`plan.json`, `kernels.ptx` and, when
//! the build had `ptxas`, `kernels.cubin`) through the CUDA driver API, which cudarc loads at
//! run time: the executor builds everywhere, and on a machine without a driver every entry
//! point returns "no CUDA driver found".
//!
//! Loading checks the device against the plan's target (an sm_90a plan needs compute
//! capability 9.0; an sm_80 plan runs on 8.0 and newer), loads the kernels once (the cubin
//! when the device runs its architecture natively and the driver takes it: no JIT; else the
//! PTX, which the driver compiles), uploads the weights in the plan's dtypes (bf16 for GPU
//! plans, through the host executor's loader: casts, stacked experts), zeroes the pools and
//! allocates the workspaces, one arena and the row-index buffers. A run walks the launch list
//! on one stream: program `p` of a kernel is threads `p·lanes ..< (p + 1)·lanes` (one, a warp,
//! or a whole block for a staged tile) of a 1-d grid of `⌈programs · lanes / block⌉` blocks,
//! with one device pointer per buffer, the scratch pointer, then `rows` (the launch contract in
//! [`lamina_ir::plan::GpuLaunch`]). Decode steps are captured into a CUDA graph per batch size
//! on first use and replayed after (the row indices are copied in before the graph).
//! `LAMINA_CUDA_SYNC=1` runs every launch eagerly and synchronises after each, so that a
//! faulting kernel is named.
//!
//! Unverified without a GPU: everything past "no CUDA driver found" has only been compiled;
//! `scripts/gpu-check` runs the tests that compare it with the host executor.

use std::ffi::{c_void, CString};
use std::fmt;
use std::path::Path;

use cudarc::driver::{result, sys};
use lamina_ir::plan::{Arg, GpuLaunch, Plan, Schedule, CUBIN_FILE, PTX_FILE};
use lamina_ir::Error;

use crate::executor::{bad_plan, check_finite, check_shapes, load_constants, Executor};

type CuResult<T> = Result<T, result::DriverError>;

fn cuda(what: impl std::fmt::Display) -> impl FnOnce(result::DriverError) -> Error {
    move |e| {
        let name = e
            .error_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("{:?}", e.0));
        let msg = e
            .error_string()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Error::Device(format!("{what}: {name} ({msg})"))
    }
}

/// Names cudarc's dynamic loader tries for the driver library (Linux).
const DRIVER_LIBRARIES: &[&str] = &["libcuda.so.1", "libcuda.so"];

/// Whether the CUDA driver library can be loaded. cudarc panics when it cannot, so every entry
/// point asks here first.
pub fn driver_available() -> Result<(), Error> {
    let mut why = Vec::new();
    for name in DRIVER_LIBRARIES {
        // SAFETY: loading the driver runs its initialisers, as any CUDA program does.
        match unsafe { libloading::Library::new(name) } {
            Ok(_) => return Ok(()),
            Err(e) => why.push(format!("{name}: {e}")),
        }
    }
    Err(Error::Device(format!(
        "no CUDA driver found ({}); install the NVIDIA driver or run on the host",
        why.first().map(String::as_str).unwrap_or("")
    )))
}

/// A CUDA device with its primary context current on this thread (retained once, released on
/// drop: deliberately not `Clone`).
#[derive(Debug)]
pub struct Device {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
    pub memory: usize,
    pub multiprocessors: i32,
    /// Most shared memory one block may opt into (static and dynamic together), bytes.
    pub shared_optin: usize,
    cu: sys::CUdevice,
    ctx: sys::CUcontext,
}

impl Device {
    /// Opens device `ordinal` (driver initialisation, primary context made current).
    pub fn open(ordinal: usize) -> Result<Device, Error> {
        driver_available()?;
        std::panic::catch_unwind(result::init)
            .map_err(|_| Error::Device("the CUDA driver library could not be initialised".into()))?
            .map_err(cuda("cuInit"))?;
        let count = result::device::get_count().map_err(cuda("cuDeviceGetCount"))?;
        if count <= ordinal as i32 {
            return Err(Error::Device(format!(
                "no CUDA device {ordinal}: the driver reports {count} device(s)"
            )));
        }
        let cu = result::device::get(ordinal as i32).map_err(cuda("cuDeviceGet"))?;
        let attr = |a| {
            // SAFETY: `cu` is a valid device handle.
            unsafe { result::device::get_attribute(cu, a) }.map_err(cuda("cuDeviceGetAttribute"))
        };
        use sys::CUdevice_attribute as A;
        let capability = (
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let multiprocessors = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let shared_optin = attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize;
        let name = result::device::get_name(cu).map_err(cuda("cuDeviceGetName"))?;
        // SAFETY: valid device handle.
        let memory = unsafe { result::device::total_mem(cu) }.map_err(cuda("cuDeviceTotalMem"))?;
        // SAFETY: valid device; the context is released in `Drop`.
        let ctx =
            unsafe { result::primary_ctx::retain(cu) }.map_err(cuda("cuDevicePrimaryCtxRetain"))?;
        let d = Device {
            ordinal,
            name,
            capability,
            memory,
            multiprocessors,
            shared_optin,
            cu,
            ctx,
        };
        d.bind()?;
        Ok(d)
    }

    /// Makes this device's context current on the calling thread.
    pub fn bind(&self) -> Result<(), Error> {
        // SAFETY: the context is retained for the device's lifetime.
        unsafe { result::ctx::set_current(self.ctx) }.map_err(cuda("cuCtxSetCurrent"))
    }

    /// The plan target this device runs natively: sm_90a on 9.0, sm_80 on other 8.x and newer.
    pub fn native_target(&self) -> Option<&'static str> {
        match self.capability {
            (9, 0) => Some("sm_90a"),
            (major, _) if major >= 8 => Some("sm_80"),
            _ => None,
        }
    }

    /// Whether this device runs `target`'s machine code as it is: SASS runs on the same major
    /// architecture at the same or a later minor revision, arch-specific (`a`) SASS only on
    /// its own.
    pub fn runs_cubin(&self, target: &str) -> bool {
        match target {
            "sm_90a" => self.capability == (9, 0),
            "sm_80" => self.capability.0 == 8,
            _ => false,
        }
    }

    /// Whether a plan for `target` runs here (or why not).
    pub fn check_target(&self, target: &str) -> Result<(), String> {
        let (major, minor) = self.capability;
        let ok = match target {
            // Arch-specific PTX (wgmma, setmaxnreg): exactly compute capability 9.0.
            "sm_90a" => (major, minor) == (9, 0),
            "sm_80" => major >= 8,
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "the plan targets {target}, but {} has compute capability {major}.{minor}",
                self.name
            ))
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: balanced with the retain in `open`.
        let _ = unsafe { result::primary_ctx::release(self.cu) };
    }
}

/// Which form of an artifact's kernels a process loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelImage {
    /// `kernels.cubin`: machine code assembled at build time, loaded without a JIT.
    Cubin,
    /// `kernels.ptx`, compiled by the driver's JIT at load: the artifact has no cubin, or one
    /// for another architecture than this device's.
    Ptx,
    /// `kernels.ptx` because the driver refused the cubin (why): typically a cubin from a
    /// newer CUDA toolkit than the driver supports. The PTX targets an older ISA.
    PtxNotCubin(String),
}

impl KernelImage {
    /// The artifact file the kernels came from.
    pub fn file(&self) -> &'static str {
        match self {
            KernelImage::Cubin => CUBIN_FILE,
            _ => PTX_FILE,
        }
    }
}

impl fmt::Display for KernelImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelImage::Cubin => write!(f, "{CUBIN_FILE} (assembled at build time, no JIT)"),
            KernelImage::Ptx => write!(f, "{PTX_FILE} (driver JIT at load)"),
            KernelImage::PtxNotCubin(why) => write!(
                f,
                "{PTX_FILE} (driver JIT at load; the driver refused {CUBIN_FILE}: {why})"
            ),
        }
    }
}

/// Lets function `f` (kernel `name`) launch with its plan's dynamic shared memory: above the
/// driver's default 48 KiB a function must opt in. Refuses a device whose per-block opt-in
/// maximum is smaller than the kernel's static and dynamic shared memory together.
///
/// # Safety
/// `f` is a function of a loaded module.
unsafe fn opt_in_dynamic_shared(
    f: sys::CUfunction,
    g: &GpuLaunch,
    device: &Device,
    name: &str,
) -> Result<(), Error> {
    if g.dynamic_shared_bytes == 0 {
        return Ok(());
    }
    let dynamic = g.dynamic_shared_bytes as usize;
    // SAFETY: `f` is valid (the caller's contract).
    let fixed = unsafe {
        result::function::get_function_attribute(
            f,
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
        )
    }
    .map_err(cuda(format!(
        "kernel {name}: reading its static shared memory"
    )))?
    .max(0) as usize;
    if fixed + dynamic > device.shared_optin {
        return Err(Error::Device(format!(
            "kernel {name} needs {fixed} bytes of static and {dynamic} of dynamic shared memory \
             per block, but {} allows a block at most {}",
            device.name, device.shared_optin
        )));
    }
    // SAFETY: as above.
    unsafe {
        result::function::set_function_attribute(
            f,
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            dynamic as i32,
        )
    }
    .map_err(cuda(format!(
        "kernel {name}: opting into {dynamic} bytes of dynamic shared memory"
    )))
}

/// Loads the artifact's kernels (the caller unloads the module): its cubin when it has one
/// that `device` runs natively, else, or when the driver refuses the cubin, its PTX.
fn load_kernels(
    dir: &Path,
    target: &str,
    device: &Device,
) -> Result<(sys::CUmodule, KernelImage), Error> {
    let cubin = dir.join(CUBIN_FILE);
    if !(cubin.exists() && device.runs_cubin(target)) {
        return load_ptx(dir).map(|m| (m, KernelImage::Ptx));
    }
    let bytes = std::fs::read(&cubin).map_err(|e| Error::io(&cubin, e))?;
    if !bytes.starts_with(b"\x7fELF") {
        return Err(Error::Io {
            path: cubin.display().to_string(),
            msg: "is not an ELF cubin".into(),
        });
    }
    match load_image(&bytes, &cubin, "cubin") {
        Ok(m) => Ok((m, KernelImage::Cubin)),
        Err(refused) => load_ptx(dir).map(|m| (m, KernelImage::PtxNotCubin(refused.to_string()))),
    }
}

/// Loads the artifact's PTX module (the caller unloads it), with the driver JIT's error log
/// in the error.
fn load_ptx(dir: &Path) -> Result<sys::CUmodule, Error> {
    let path = dir.join(PTX_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let ptx = CString::new(text).map_err(|_| Error::Io {
        path: path.display().to_string(),
        msg: "contains a NUL byte: not PTX".into(),
    })?;
    load_image(ptx.as_bytes_with_nul(), &path, "driver PTX JIT")
}

/// `cuModuleLoadDataEx` of `image` (NUL-terminated PTX, or a cubin) read from `path`, with the
/// driver's error log in the error.
fn load_image(image: &[u8], path: &Path, what: &str) -> Result<sys::CUmodule, Error> {
    let mut log = vec![0u8; 16 << 10];
    let mut options = [
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
    ];
    let mut values = [log.as_mut_ptr() as *mut c_void, log.len() as *mut c_void];
    let mut module = std::mem::MaybeUninit::uninit();
    // SAFETY: a complete image (PTX NUL-terminated by the caller); options and values are
    // parallel arrays that outlive the call; the log buffer's size is passed by value, as the
    // driver API expects.
    let r = unsafe {
        sys::cuModuleLoadDataEx(
            module.as_mut_ptr(),
            image.as_ptr() as *const c_void,
            options.len() as u32,
            options.as_mut_ptr(),
            values.as_mut_ptr(),
        )
    };
    match r.result() {
        // SAFETY: initialised by a successful load.
        Ok(()) => Ok(unsafe { module.assume_init() }),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let jit = String::from_utf8_lossy(&log[..end])
                .trim()
                .replace('\n', "; ");
            let what = if jit.is_empty() {
                format!("loading {} ({what})", path.display())
            } else {
                format!("loading {} ({what}: {jit})", path.display())
            };
            Err(cuda(what)(e))
        }
    }
}

/// Fills `n` bf16 elements of `out` with the plan's fill kernel `f` (launched with `(block,
/// lanes)`): its arguments `p` go through `args` (16 bytes) on `stream`, and the stream is
/// synchronised before returning, so `args` may be rewritten for the next fill.
fn fill_bf16(
    f: sys::CUfunction,
    (block, lanes): (u32, u32),
    (out, n): (&Buffer, usize),
    (args, p): (&Buffer, [f32; 4]),
    stream: sys::CUstream,
) -> Result<(), Error> {
    let mut params = [out.ptr, args.ptr, 0u64, n as u64];
    let mut ptrs: Vec<*mut c_void> = params
        .iter_mut()
        .map(|x| x as *mut u64 as *mut c_void)
        .collect();
    let blocks = (n * lanes as usize).div_ceil(block as usize).max(1) as u32;
    // SAFETY: 16 bytes into the 16-byte `args`, ordered before the launch on `stream`; the fill
    // kernel takes (out, p, scratch, rows) and `out` holds n bf16; `p` and `params` outlive the
    // synchronisation.
    unsafe {
        result::memcpy_htod_async(args.ptr, &p, stream).map_err(cuda("the fill arguments"))?;
        result::launch_kernel(f, (blocks, 1, 1), (block, 1, 1), 0, stream, &mut ptrs)
            .map_err(cuda("the fill kernel"))?;
        result::stream::synchronize(stream).map_err(cuda("the fill kernel"))
    }
}

/// Device memory, freed on drop.
struct Buffer {
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

impl Buffer {
    fn new(bytes: usize, what: &str) -> Result<Buffer, Error> {
        // SAFETY: plain allocation; a zero-byte request is rounded up.
        let ptr = unsafe { result::malloc_sync(bytes.max(16)) }
            .map_err(cuda(format!("allocating {bytes} bytes for {what}")))?;
        Ok(Buffer { ptr, bytes })
    }

    fn upload<T>(data: &[T], what: &str) -> Result<Buffer, Error> {
        let b = Buffer::new(std::mem::size_of_val(data), what)?;
        // SAFETY: `b` holds at least `data`'s bytes.
        unsafe { result::memcpy_htod_sync(b.ptr, data) }
            .map_err(cuda(format!("uploading {what}")))?;
        Ok(b)
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: allocated by `malloc_sync`, freed once.
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

/// A captured decode step for one batch size.
struct Graph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: created by capture/instantiate, destroyed once.
        unsafe {
            let _ = result::graph::exec_destroy(self.exec);
            let _ = result::graph::destroy(self.graph);
        }
    }
}

/// Device-to-device copy bandwidth of device 0 (read + write bytes per second, best of 5)
/// over `bytes`: the ceiling decode is read against.
pub fn copy_bandwidth(bytes: usize) -> Result<f64, Error> {
    let _device = Device::open(0)?;
    let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
        .map_err(cuda("cuStreamCreate"))?;
    let measured = (|| {
        let src = Buffer::new(bytes, "bandwidth source")?;
        let dst = Buffer::new(bytes, "bandwidth destination")?;
        let mut best = f64::INFINITY;
        for _ in 0..6 {
            let t = std::time::Instant::now();
            // SAFETY: both buffers hold `bytes`; the stream is synchronised before timing ends.
            unsafe {
                result::memcpy_dtod_async(dst.ptr, src.ptr, bytes, stream)
                    .map_err(cuda("cuMemcpyDtoDAsync"))?;
                result::stream::synchronize(stream).map_err(cuda("cuStreamSynchronize"))?;
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(2.0 * bytes as f64 / best)
    })();
    // SAFETY: created above, destroyed once.
    let _ = unsafe { result::stream::destroy(stream) };
    measured
}

pub struct CudaEngine {
    pub plan: Plan,
    /// What was loaded: the artifact's cubin, or its PTX through the driver's JIT.
    pub image: KernelImage,
    stream: sys::CUstream,
    module: sys::CUmodule,
    functions: Vec<sys::CUfunction>,
    weights: Vec<Buffer>,
    pools: Vec<Buffer>,
    workspaces: Vec<Buffer>,
    constants: Buffer,
    arena: Buffer,
    /// Warp programs' locals: the largest `programs · scratch_bytes` of any launch.
    scratch: Buffer,
    /// Row indices of the current launch: tokens, slots, positions (i64 each).
    rows_in: [Buffer; 3],
    /// Host copies of the row indices, alive until their async copies complete.
    staged: [Vec<i64>; 3],
    pos: Vec<usize>,
    /// Decode graphs by batch size (index `b - 1`).
    graphs: Vec<Option<Graph>>,
    eager: bool,
    /// Fill the arena with NaN before every run (tests: a value no kernel wrote cannot pass).
    poison_runs: bool,
    prefill_progress: Option<Box<dyn Fn(usize, usize)>>,
    /// Last: fields drop in order, and the buffers above need the context this releases.
    pub device: Device,
}

impl CudaEngine {
    /// Loads the artifact in `dir` onto device 0.
    pub fn load(dir: &Path, weights_dir: Option<&Path>) -> Result<CudaEngine, Error> {
        Self::load_with_progress(dir, weights_dir, false, &|_, _| {})
    }

    /// [`CudaEngine::load`], calling `progress(done, total)` as weights are read.
    pub fn load_with_progress(
        dir: &Path,
        weights_dir: Option<&Path>,
        allow_weight_mismatch: bool,
        progress: &dyn Fn(usize, usize),
    ) -> Result<CudaEngine, Error> {
        Self::load_with(dir, weights_dir, allow_weight_mismatch, false, progress)
    }

    /// [`CudaEngine::load_with_progress`]; with `device_weights`, a native spec's random weights
    /// are filled on the device by the plan's fill kernel (uniform in the host generator's
    /// range, not its values: for benchmarks of plans too large to upload).
    pub fn load_with(
        dir: &Path,
        weights_dir: Option<&Path>,
        allow_weight_mismatch: bool,
        device_weights: bool,
        progress: &dyn Fn(usize, usize),
    ) -> Result<CudaEngine, Error> {
        let plan = Plan::load(dir)?;
        if plan.target == "host" {
            return Err(bad_plan(
                dir,
                "field target is \"host\": build the artifact with --target sm_80 or sm_90a to \
                 run it on a GPU"
                    .into(),
            ));
        }
        let device = Device::open(0)?;
        device
            .check_target(&plan.target)
            .map_err(|m| bad_plan(dir, m))?;
        let (module, image) = load_kernels(dir, &plan.target, &device)?;
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(cuda("cuStreamCreate"));
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // SAFETY: loaded above, unloaded once.
                let _ = unsafe { result::module::unload(module) };
                return Err(e);
            }
        };
        let mut e = CudaEngine {
            image,
            pos: vec![0; plan.limits.max_batch],
            graphs: (0..plan.limits.max_batch).map(|_| None).collect(),
            functions: Vec::new(),
            weights: Vec::new(),
            pools: Vec::new(),
            workspaces: Vec::new(),
            constants: Buffer::new(0, "constants")?,
            arena: Buffer::new(0, "arena")?,
            scratch: Buffer::new(0, "scratch")?,
            rows_in: [
                Buffer::new(0, "tokens")?,
                Buffer::new(0, "slots")?,
                Buffer::new(0, "positions")?,
            ],
            staged: Default::default(),
            eager: std::env::var("LAMINA_CUDA_SYNC").as_deref() == Ok("1"),
            poison_runs: false,
            prefill_progress: None,
            plan,
            device,
            stream,
            module,
        };
        for k in &e.plan.kernels {
            let name = CString::new(k.symbol.clone()).map_err(|_| {
                bad_plan(
                    dir,
                    format!("kernel {}: symbol contains a NUL byte", k.name),
                )
            })?;
            // SAFETY: the module is loaded.
            let f =
                unsafe { result::module::get_function(e.module, name) }.map_err(cuda(format!(
                    "kernel {} (entry {}) in {}",
                    k.name,
                    k.symbol,
                    e.image.file()
                )))?;
            let Some(g) = &k.gpu else {
                return Err(bad_plan(
                    dir,
                    format!("kernel {} has no gpu launch data", k.name),
                ));
            };
            // SAFETY: `f` was just taken from the loaded module.
            unsafe { opt_in_dynamic_shared(f, g, &e.device, &k.name) }?;
            e.functions.push(f);
        }
        e.constants = Buffer::upload(&load_constants(&e.plan, dir)?, "constants")?;
        if device_weights {
            e.fill_weights(dir, progress)?;
        } else {
            let host = crate::host::weights::load_all(
                &e.plan,
                weights_dir,
                allow_weight_mismatch,
                progress,
            )?;
            for (w, entry) in host.iter().zip(&e.plan.weights) {
                e.weights.push(Buffer::upload(
                    w.bytes(),
                    &format!("weight {}", entry.name),
                )?);
            }
        }
        for p in &e.plan.pools {
            let b = Buffer::new(p.shape.iter().product::<usize>() * p.elem_bytes(), &p.name)?;
            // SAFETY: `b` holds that many bytes.
            unsafe { result::memset_d8_sync(b.ptr, 0, b.bytes) }
                .map_err(cuda(format!("zeroing {}", p.name)))?;
            e.pools.push(b);
        }
        for w in &e.plan.workspaces {
            let b = Buffer::new(w.bytes, &w.name)?;
            e.workspaces.push(b);
        }
        let arena_bytes = [&e.plan.prefill, &e.plan.decode]
            .iter()
            .map(|s| s.arena_bytes_per_row * s.rows)
            .max()
            .unwrap_or(0);
        e.arena = Buffer::new(arena_bytes, "arena")?;
        let mut scratch = 0usize;
        for s in [&e.plan.prefill, &e.plan.decode] {
            for l in &s.launches {
                let k = &e.plan.kernels[l.kernel];
                let per = k.gpu.as_ref().map_or(0, |g| g.scratch_bytes as usize);
                let programs: usize = k.grid.iter().map(|d| d.eval(s.rows)).product();
                scratch = scratch.max(programs * per);
            }
        }
        e.scratch = Buffer::new(scratch, "scratch")?;
        let rows = e.plan.prefill.rows.max(e.plan.decode.rows);
        for (i, what) in ["tokens", "slots", "positions"].iter().enumerate() {
            e.rows_in[i] = Buffer::new(rows * 8, what)?;
        }
        if e.weights.len() != e.plan.weights.len() {
            return Err(bad_plan(
                dir,
                "the weight loader returned the wrong count".into(),
            ));
        }
        let (weights, pools) = (&e.weights, &e.pools);
        let plan_weights = &e.plan.weights;
        let elem_bytes = |i: usize| {
            if plan_weights[i].dtype == "bf16" {
                2
            } else {
                4
            }
        };
        let plan_pools = &e.plan.pools;
        check_shapes(&e.plan, dir, &|i| weights[i].bytes / elem_bytes(i), &|i| {
            pools[i].bytes / plan_pools[i].elem_bytes()
        })?;
        // Synchronous copies from pageable memory and memsets return before the device has
        // finished them, and the engine's stream does not wait for the legacy stream.
        result::ctx::synchronize().map_err(cuda("finishing the uploads"))?;
        Ok(e)
    }

    /// Every weight allocated and filled on the device by the plan's fill kernel.
    fn fill_weights(&mut self, dir: &Path, progress: &dyn Fn(usize, usize)) -> Result<(), Error> {
        use lamina_ir::plan::{WeightSource, FILL_KERNEL};
        let fill = self
            .plan
            .kernels
            .iter()
            .position(|k| k.name == FILL_KERNEL)
            .ok_or_else(|| bad_plan(dir, format!("no {FILL_KERNEL} kernel for device weights")))?;
        let (block, lanes) = self.plan.kernels[fill]
            .gpu
            .as_ref()
            .map_or((128, 1), |g| (g.block, g.lanes));
        let args = Buffer::new(16, "fill arguments")?;
        let total = self.plan.weights.len();
        for (wi, w) in self.plan.weights.iter().enumerate() {
            let kind = match &w.source {
                WeightSource::Random { kind, .. } => kind,
                WeightSource::Stack { parts } => match parts.first() {
                    Some(WeightSource::Random { kind, .. }) => kind,
                    _ => "",
                },
                _ => "",
            };
            let kind = lamina_ir::stats::kind_from_name(kind).ok_or_else(|| {
                bad_plan(
                    dir,
                    format!(
                        "weight {}: device weights need a native spec's random weights",
                        w.name
                    ),
                )
            })?;
            let n: usize = w.shape.iter().product();
            let buf = Buffer::new(n * 2, &format!("weight {}", w.name))?;
            let (centre, width) = lamina_ir::weights::random_range(&w.name, &w.shape, kind);
            let seed = lamina_ir::weights::tensor_seed(&w.name, 0) as f32;
            let fill_args = [seed, centre, width, 0.0f32];
            fill_bf16(
                self.functions[fill],
                (block, lanes),
                (&buf, n),
                (&args, fill_args),
                self.stream,
            )
            .map_err(|e| Error::Device(format!("filling weight {}: {e}", w.name)))?;
            self.weights.push(buf);
            progress(wi + 1, total);
        }
        Ok(())
    }

    /// With `on`, the arena and the workspaces are filled with NaN (0xFF bytes) before every
    /// prefill piece and decode step, so that an element no kernel of that run wrote turns the
    /// logits NaN, which the run refuses.
    pub fn poison_every_run(&mut self, on: bool) {
        self.poison_runs = on;
    }

    /// Fills the arena and the workspaces with `byte` (0xFF makes every f32 and bf16 a NaN:
    /// the GPU tests poison them before each run so that an element no kernel wrote cannot
    /// pass).
    pub fn poison_arena(&mut self, byte: u8) -> Result<(), Error> {
        self.device.bind()?;
        // SAFETY: each buffer holds `bytes` bytes; on the engine's stream, so ordered before
        // the next run's kernels, and finished before returning.
        unsafe {
            for b in std::iter::once(&self.arena).chain(&self.workspaces) {
                result::memset_d8_async(b.ptr, byte, b.bytes, self.stream)
                    .map_err(cuda("poisoning the arena"))?;
            }
            result::stream::synchronize(self.stream).map_err(cuda("poisoning the arena"))
        }
    }

    /// The device pointers and row count of one launch, as the kernel's parameters.
    fn params(&self, sched: &Schedule, li: usize, rows: usize) -> Vec<u64> {
        let l = &sched.launches[li];
        let mut v: Vec<u64> = l
            .args
            .iter()
            .map(|a| match a {
                Arg::Arena { offset_per_row, .. } => {
                    self.arena.ptr + (offset_per_row * rows) as u64
                }
                Arg::Weight { index } => self.weights[*index].ptr,
                Arg::Pool { index } => self.pools[*index].ptr,
                Arg::Workspace { index } => self.workspaces[*index].ptr,
                Arg::Const { index } => {
                    self.constants.ptr + (self.plan.constants[*index].offset * 4) as u64
                }
                Arg::Tokens => self.rows_in[0].ptr,
                Arg::Slot => self.rows_in[1].ptr,
                Arg::Pos => self.rows_in[2].ptr,
            })
            .collect();
        v.push(self.scratch.ptr);
        v.push(rows as u64);
        v
    }

    /// Enqueues every launch of `sched` for `rows` rows on the stream.
    fn enqueue(&self, decode: bool, rows: usize) -> Result<(), Error> {
        let sched = if decode {
            &self.plan.decode
        } else {
            &self.plan.prefill
        };
        let phase = if decode { "decode" } else { "prefill" };
        for (li, l) in sched.launches.iter().enumerate() {
            let k = &self.plan.kernels[l.kernel];
            let g = k.gpu.as_ref().expect("checked at load");
            let programs: usize = k.grid.iter().map(|d| d.eval(rows)).product();
            if programs == 0 {
                continue;
            }
            let blocks = (programs * g.lanes as usize).div_ceil(g.block as usize);
            let mut params = self.params(sched, li, rows);
            let mut ptrs: Vec<*mut c_void> = params
                .iter_mut()
                .map(|p| p as *mut u64 as *mut c_void)
                .collect();
            let what = || {
                format!(
                    "{phase}.launches[{li}] (kernel {}, graph nodes {})",
                    k.name,
                    l.nodes.join(", ")
                )
            };
            // SAFETY: the function takes exactly these parameters (one pointer per buffer and
            // the row count, checked against the PTX by the build), every pointer covers what
            // the kernel indexes for `rows` rows (check_shapes), and `params` outlives the
            // call (the driver copies parameters at launch).
            unsafe {
                result::launch_kernel(
                    self.functions[l.kernel],
                    (blocks as u32, 1, 1),
                    (g.block, 1, 1),
                    g.dynamic_shared_bytes,
                    self.stream,
                    &mut ptrs,
                )
            }
            .map_err(cuda(what()))?;
            if self.eager {
                // SAFETY: valid stream.
                unsafe { result::stream::synchronize(self.stream) }.map_err(cuda(what()))?;
            }
        }
        Ok(())
    }

    fn run(
        &mut self,
        decode: bool,
        tokens: &[i64],
        slots: &[i64],
        pos: &[i64],
    ) -> Result<Vec<f32>, Error> {
        self.device.bind()?;
        let rows = tokens.len();
        let most = if decode {
            self.plan.decode.rows
        } else {
            self.plan.prefill.rows
        };
        if rows == 0 || rows > most || slots.len() != rows || pos.len() != rows {
            return Err(Error::input(
                "rows",
                format!(
                    "{rows} tokens with {} slots and {} positions; the schedule takes 1..={most} rows",
                    slots.len(),
                    pos.len()
                ),
            ));
        }
        if self.poison_runs {
            self.poison_arena(0xFF)?;
        }
        self.staged = [tokens.to_vec(), slots.to_vec(), pos.to_vec()];
        for (b, h) in self.rows_in.iter().zip(&self.staged) {
            // SAFETY: the buffer holds the schedule's rows (≥ rows) of i64; `staged` lives
            // until the stream is synchronised below.
            unsafe { result::memcpy_htod_async(b.ptr, h, self.stream) }
                .map_err(cuda("copying the row indices"))?;
        }
        if decode && !self.eager {
            if self.graphs[rows - 1].is_none() {
                self.graphs[rows - 1] = Some(self.capture(rows)?);
            }
            let g = self.graphs[rows - 1].as_ref().expect("captured above");
            // SAFETY: an instantiated graph on a valid stream.
            unsafe { result::graph::launch(g.exec, self.stream) }
                .map_err(cuda(format!("launching the decode graph (batch {rows})")))?;
        } else {
            self.enqueue(decode, rows)?;
        }
        let sched = if decode {
            &self.plan.decode
        } else {
            &self.plan.prefill
        };
        let Arg::Arena { offset_per_row, .. } = sched.logits else {
            unreachable!("plan check: logits live in the arena")
        };
        let v = self.plan.model.vocab_size;
        let mut logits = vec![0f32; rows * v];
        // SAFETY: the logits slot holds rows × vocab f32; the stream is synchronised before
        // `logits` is read.
        unsafe {
            result::memcpy_dtoh_async(
                &mut logits,
                self.arena.ptr + (offset_per_row * rows) as u64,
                self.stream,
            )
            .map_err(cuda("copying the logits"))?;
            result::stream::synchronize(self.stream).map_err(cuda(format!(
                "running the {} schedule (set LAMINA_CUDA_SYNC=1 to name the failing kernel)",
                if decode { "decode" } else { "prefill" }
            )))?;
        }
        check_finite(&logits, v)?;
        Ok(logits)
    }

    /// Captures the decode launches for `rows` sequences into a graph.
    fn capture(&self, rows: usize) -> Result<Graph, Error> {
        // SAFETY: valid stream; capture is ended on every path below.
        unsafe {
            result::stream::begin_capture(
                self.stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(cuda("beginning the decode graph capture"))?;
        let enqueued = self.enqueue(true, rows);
        // SAFETY: capture was begun on this stream.
        let graph: CuResult<sys::CUgraph> = unsafe { result::stream::end_capture(self.stream) };
        if let Err(e) = enqueued {
            if let Ok(g) = graph {
                // SAFETY: destroyed once.
                let _ = unsafe { result::graph::destroy(g) };
            }
            return Err(e);
        }
        let graph = graph.map_err(cuda("ending the decode graph capture"))?;
        // SAFETY: a captured graph.
        match unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) } {
            Ok(exec) => Ok(Graph { graph, exec }),
            Err(e) => {
                // SAFETY: destroyed once.
                let _ = unsafe { result::graph::destroy(graph) };
                Err(cuda(format!(
                    "instantiating the decode graph (batch {rows})"
                ))(e))
            }
        }
    }
}

impl Drop for CudaEngine {
    fn drop(&mut self) {
        let _ = self.device.bind();
        // SAFETY: valid stream; nothing may still run when graphs and buffers go.
        let _ = unsafe { result::stream::synchronize(self.stream) };
        self.graphs.clear();
        // SAFETY: created in `load`, destroyed once; buffers are freed after (their own Drop).
        unsafe {
            let _ = result::stream::destroy(self.stream);
            let _ = result::module::unload(self.module);
        }
    }
}

impl Executor for CudaEngine {
    fn plan(&self) -> &Plan {
        &self.plan
    }

    fn positions(&self) -> &[usize] {
        &self.pos
    }

    fn positions_mut(&mut self) -> &mut [usize] {
        &mut self.pos
    }

    fn run_rows(
        &mut self,
        decode: bool,
        tokens: &[i64],
        slots: &[i64],
        pos: &[i64],
    ) -> Result<Vec<f32>, Error> {
        self.run(decode, tokens, slots, pos)
    }

    fn clear_slot(&mut self, slot: usize) -> Result<(), Error> {
        if slot >= self.plan.limits.max_batch {
            return Err(Error::input(
                "slot",
                format!(
                    "slot {slot} outside 0..{} (--max-batch)",
                    self.plan.limits.max_batch
                ),
            ));
        }
        self.device.bind()?;
        for (p, b) in self.plan.pools.iter().zip(&self.pools) {
            let per = b.bytes / p.shape[0];
            // SAFETY: the slot's range lies inside the pool.
            unsafe { result::memset_d8_async(b.ptr + (slot * per) as u64, 0, per, self.stream) }
                .map_err(cuda(format!("clearing slot {slot} of {}", p.name)))?;
        }
        // SAFETY: valid stream.
        unsafe { result::stream::synchronize(self.stream) }.map_err(cuda("clearing a slot"))
    }

    fn prefill_progress(&self, done: usize, total: usize) {
        if let Some(f) = &self.prefill_progress {
            f(done, total);
        }
    }

    fn set_prefill_progress(&mut self, f: Box<dyn Fn(usize, usize)>) {
        self.prefill_progress = Some(f);
    }
}

/// One kernel of a GPU plan timed alone (see [`bench_kernel`]).
#[derive(Debug, Clone)]
pub struct KernelBench {
    pub kernel: String,
    pub rows: usize,
    /// Mean time of one launch.
    pub seconds: f64,
    /// Bytes of all its buffers at `rows` rows (each read or written once: a floor on its
    /// traffic).
    pub footprint: u64,
}

/// Times the first kernel of the plan in `dir` whose name contains `name`, alone, over `rows`
/// rows: every buffer allocated at its size for `rows` and filled (bf16: the device fill; f32:
/// 0.01; `pos`: `pos`, or 0, 1, 2, ... when `pos` is None; other i64: 0), one warm-up launch,
/// then `iters` launches on one stream, synchronised once.
pub fn bench_kernel(
    dir: &Path,
    name: &str,
    rows: usize,
    pos: Option<usize>,
    iters: usize,
) -> Result<KernelBench, Error> {
    use lamina_ir::kernel::Elem;
    let plan = Plan::load(dir)?;
    let device = Device::open(0)?;
    device
        .check_target(&plan.target)
        .map_err(|m| bad_plan(dir, m))?;
    let k = plan
        .kernels
        .iter()
        .find(|k| k.name.contains(name))
        .ok_or_else(|| bad_plan(dir, format!("no kernel named like {name:?}")))?;
    let fill_k = plan
        .kernels
        .iter()
        .position(|k| k.name == lamina_ir::plan::FILL_KERNEL)
        .ok_or_else(|| bad_plan(dir, "no fill kernel".into()))?;
    let g = k
        .gpu
        .clone()
        .ok_or_else(|| bad_plan(dir, format!("kernel {} has no launch data", k.name)))?;
    let (module, image) = load_kernels(dir, &plan.target, &device)?;
    let timed = (|| -> Result<KernelBench, Error> {
        let get = |n: &str| {
            let c = CString::new(n).map_err(|_| bad_plan(dir, format!("bad symbol {n}")))?;
            // SAFETY: the module is loaded.
            unsafe { result::module::get_function(module, c) }
                .map_err(cuda(format!("kernel {n} in {}", image.file())))
        };
        let f = get(&k.symbol)?;
        // SAFETY: `f` was just taken from the loaded module.
        unsafe { opt_in_dynamic_shared(f, &g, &device, &k.name) }?;
        let fill = get(&plan.kernels[fill_k].symbol)?;
        let (fill_block, fill_lanes) = plan.kernels[fill_k]
            .gpu
            .as_ref()
            .map_or((128, 1), |g| (g.block, g.lanes));
        let mut bufs = Vec::new();
        let mut footprint = 0u64;
        let args = Buffer::new(16, "fill arguments")?;
        for p in &k.params {
            let n = p.numel(rows);
            let b = Buffer::new(n * p.elem.bytes(), &p.name)?;
            footprint += (n * p.elem.bytes()) as u64;
            // SAFETY: every write below stays inside `b` (n elements of its type).
            unsafe {
                match p.elem {
                    Elem::Bf16 => fill_bf16(
                        fill,
                        (fill_block, fill_lanes),
                        (&b, n),
                        (&args, [17.0, 0.0, 0.02, 0.0]),
                        result::stream::null(),
                    )
                    .map_err(|e| Error::Device(format!("filling {}: {e}", p.name)))?,
                    Elem::F32 => {
                        sys::cuMemsetD32_v2(b.ptr, 0.01f32.to_bits(), n)
                            .result()
                            .map_err(cuda(format!("filling {}", p.name)))?;
                    }
                    Elem::I64 => {
                        let v: Vec<i64> = match (p.name.as_str(), pos) {
                            ("pos", Some(at)) => vec![at as i64; n],
                            ("pos", None) => (0..n as i64).collect(),
                            _ => vec![0; n],
                        };
                        result::memcpy_htod_sync(b.ptr, &v)
                            .map_err(cuda(format!("filling {}", p.name)))?;
                    }
                }
            }
            bufs.push(b);
        }
        let programs: usize = k.grid.iter().map(|d| d.eval(rows)).product();
        let scratch = Buffer::new(programs * g.scratch_bytes as usize, "scratch")?;
        let mut params: Vec<u64> = bufs.iter().map(|b| b.ptr).collect();
        params.push(scratch.ptr);
        params.push(rows as u64);
        let mut ptrs: Vec<*mut c_void> = params
            .iter_mut()
            .map(|x| x as *mut u64 as *mut c_void)
            .collect();
        let blocks = (programs * g.lanes as usize)
            .div_ceil(g.block as usize)
            .max(1) as u32;
        result::ctx::synchronize().map_err(cuda("preparing the buffers"))?;
        let launch = |ptrs: &mut [*mut c_void]| {
            // SAFETY: the parameters match the kernel's (one pointer per buffer sized for
            // `rows`, the scratch, the row count).
            unsafe {
                result::launch_kernel(
                    f,
                    (blocks, 1, 1),
                    (g.block, 1, 1),
                    g.dynamic_shared_bytes,
                    result::stream::null(),
                    ptrs,
                )
            }
            .map_err(cuda(format!("kernel {}", k.name)))
        };
        launch(&mut ptrs)?;
        result::ctx::synchronize().map_err(cuda(format!("kernel {} (warm-up)", k.name)))?;
        let t = std::time::Instant::now();
        for _ in 0..iters.max(1) {
            launch(&mut ptrs)?;
        }
        result::ctx::synchronize().map_err(cuda(format!("kernel {}", k.name)))?;
        Ok(KernelBench {
            kernel: k.name.clone(),
            rows,
            seconds: t.elapsed().as_secs_f64() / iters.max(1) as f64,
            footprint,
        })
    })();
    // SAFETY: loaded above; its functions are not used past this point.
    let _ = unsafe { result::module::unload(module) };
    drop(device);
    timed
}
