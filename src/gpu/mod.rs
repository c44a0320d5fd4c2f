//! The GPU runtime: driver context, stream, device properties and the embedded kernels.
//!
//! Every CUDA library is loaded dynamically (cudarc's `dynamic-loading`), so the binary
//! starts on a machine with no CUDA at all; [`Gpu::open`] is where a missing driver, a
//! missing device or the wrong architecture turns into a clear [`GpuError`].

pub mod kernels;
pub mod nvtx;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUdevice_attribute as Attr;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};

pub use cudarc::driver::{CudaSlice, DriverError, LaunchConfig, PushKernelArg};

/// Where each dynamically loaded library is found on the lent GPU machines.
pub const LD_LIBRARY_PATH_FIX: &str =
    "export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu:$LD_LIBRARY_PATH";

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no CUDA driver found (libcuda.so.1 is not loadable): this command needs an NVIDIA GPU with driver >= 580; on a machine without one, use `--device cpu` where the command offers it")]
    NoDriver,
    #[error("the CUDA driver found no GPU (device {ordinal} requested): {source}")]
    NoDevice { ordinal: usize, source: DriverError },
    #[error("GPU {ordinal} ({name}) has compute capability {major}.{minor}; hrm-cu's kernels need sm_80 or newer (sm_90 for the Hopper kernels)")]
    Unsupported { ordinal: usize, name: String, major: i32, minor: i32 },
    #[error("{lib} not found: {what} needs it; {LD_LIBRARY_PATH_FIX}")]
    MissingLibrary { lib: &'static str, what: &'static str },
    #[error("kernel family `{family}` is not embedded in this binary (rebuild: was cuda/{family}.cu added after the build?)")]
    UnknownFamily { family: String },
    #[error("loading kernel `{family}::{name}`: {source}")]
    Load { family: String, name: String, source: DriverError },
    #[error("CUDA error during {what}: {source}")]
    Driver { what: String, source: DriverError },
    #[error("cuBLASLt error during {what}: {source}")]
    Blas { what: String, source: cudarc::cublaslt::result::CublasError },
}

/// Shorthand for wrapping a driver error with what was being done.
pub trait DriverContext<T> {
    fn during(self, what: impl Into<String>) -> Result<T, GpuError>;
}

impl<T> DriverContext<T> for Result<T, DriverError> {
    fn during(self, what: impl Into<String>) -> Result<T, GpuError> {
        self.map_err(|source| GpuError::Driver { what: what.into(), source })
    }
}

/// The properties kernels and benchmarks read off the device.
#[derive(Clone, Debug)]
pub struct DeviceProps {
    pub ordinal: usize,
    pub name: String,
    pub major: i32,
    pub minor: i32,
    pub sm_count: usize,
    pub l2_bytes: usize,
    /// Largest dynamic shared memory a block can opt into.
    pub smem_per_block_optin: usize,
    pub total_mem_bytes: usize,
}

impl DeviceProps {
    pub fn is_hopper(&self) -> bool {
        self.major == 9
    }
}

/// One GPU: its context, the one stream all work goes on (a non-blocking stream of its own,
/// capturable into CUDA graphs), and the kernel modules loaded so far.
/// Passed explicitly to every launcher; there are no globals.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub props: DeviceProps,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
}

impl Gpu {
    /// Opens GPU `ordinal`, checking the driver, the device and its architecture.
    pub fn open(ordinal: usize) -> Result<Gpu, GpuError> {
        if !driver_present() {
            return Err(GpuError::NoDriver);
        }
        let ctx = CudaContext::new(ordinal).map_err(|source| GpuError::NoDevice { ordinal, source })?;
        let attr = |a: Attr| ctx.attribute(a).during("reading device attributes");
        let props = DeviceProps {
            ordinal,
            name: ctx.name().during("reading the device name")?,
            major: attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            minor: attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            sm_count: attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize,
            l2_bytes: attr(Attr::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as usize,
            smem_per_block_optin: attr(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize,
            total_mem_bytes: total_memory(&ctx)?,
        };
        if props.major < 8 {
            return Err(GpuError::Unsupported { ordinal, name: props.name, major: props.major, minor: props.minor });
        }
        // All work goes on one stream, so cudarc's per-buffer events (which order a buffer's
        // uses across streams) are not needed; they are also what a captured step must not
        // have: a wait on an event recorded outside the capture invalidates it. Switched off
        // before the first buffer exists, as cudarc requires.
        // SAFETY: no buffer of this context exists yet, and nothing here uses a second stream.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own rather than the legacy default stream, which cannot be captured
        // into a CUDA graph (the training step's `--cuda-graph`).
        let stream = ctx.new_stream().during("creating the stream")?;
        Ok(Gpu { ctx, stream, props, modules: Mutex::new(HashMap::new()) })
    }

    /// The kernel `name` of family `family` (`cuda/<family>.cu`); each family's module is
    /// loaded once per device.
    pub fn function(&self, family: &'static str, name: &str) -> Result<CudaFunction, GpuError> {
        let module = {
            let mut modules = self.modules.lock().unwrap();
            match modules.get(family) {
                Some(m) => m.clone(),
                None => {
                    let m = kernels::load_family(&self.ctx, family)?;
                    modules.insert(family, m.clone());
                    m
                }
            }
        };
        module.load_function(name).map_err(|source| GpuError::Load { family: family.into(), name: name.into(), source })
    }

    /// Blocks until all queued work on the stream is done.
    pub fn sync(&self) -> Result<(), GpuError> {
        self.stream.synchronize().during("stream synchronize")
    }

    /// Fails with a [`GpuError::MissingLibrary`] when cuBLASLt cannot be loaded.
    pub fn require_cublaslt(what: &'static str) -> Result<(), GpuError> {
        // SAFETY: only tries to dlopen the library; no function is called.
        if unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            Ok(())
        } else {
            Err(GpuError::MissingLibrary { lib: "libcublasLt.so (cuBLASLt 13)", what })
        }
    }

    /// Fails with a [`GpuError::MissingLibrary`] when NCCL cannot be loaded.
    pub fn require_nccl(what: &'static str) -> Result<(), GpuError> {
        // SAFETY: only tries to dlopen the library; no function is called.
        if unsafe { cudarc::nccl::sys::is_culib_present() } {
            Ok(())
        } else {
            Err(GpuError::MissingLibrary { lib: "libnccl.so.2 (NCCL 2.28)", what })
        }
    }
}

/// True when `libcuda` can be loaded. Checked before any driver call, because cudarc's
/// dynamic loader panics when the library is missing.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library; no function is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

fn total_memory(ctx: &Arc<CudaContext>) -> Result<usize, GpuError> {
    ctx.bind_to_thread().during("binding the context")?;
    let (_free, total) = cudarc::driver::result::mem_get_info().during("querying device memory")?;
    Ok(total)
}
