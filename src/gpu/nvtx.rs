//! Markers for the profilers: NVTX ranges around the phases of a step, and the capture range
//! that limits a profile to one step.
//!
//! An NVTX range is a named interval on the host's timeline; Nsight Systems draws it above the
//! kernels it launched, and Nsight Compute can filter kernels by it (`--nvtx-include`). The
//! trainer nests them as
//!
//! ```text
//! step ─┬─ stage                (the batch and the optimiser's inputs, written to the device)
//!       ├─ forward_backward      (the model's forward, then its backward, which writes the
//!       │                          step's gradients: no zeroing pass before it)
//!       ├─ optimizer             (the loss guard and the fused AdamATan2 launch)
//!       └─ log / eval / checkpoint   (on the steps that do them; they read the metrics back)
//! ```
//!
//! With `--cuda-graph`, a replayed step shows `stage` then one `graph` range instead of the
//! three in the middle (ranges are host-side: a graph's kernels carry the ranges of the step
//! that captured it only in that step).
//!
//! The ranges go through the NVTX v2 C API (`nvtxRangePushA`, `nvtxRangePop`), loaded once
//! with `dlopen` like every other CUDA library, from the first of [`LIBRARIES`] found:
//! `libnvToolsExt.so.1` up to CUDA 12.8, `libnvtx3interop.so.1` (the same API over NVTX 3)
//! from CUDA 12.9 on, in the toolkit's `lib64/` or the `nvidia-nvtx` wheel's `lib/`. Where
//! neither is on the library path a [`Range`] does nothing, so the binary runs everywhere.
//! With the library loaded and no profiler attached, a range costs two calls that return at
//! once (the library finds no tool to forward to).
//!
//! [`CaptureRange`] wraps `cuProfilerStart`/`cuProfilerStop`: a profiler started with
//! `ncu --profile-from-start off` (or `nsys --capture-range=cudaProfilerApi`) records only
//! what the device ran between the two (`hrm-cu train --profile-step N`; `docs/perf.md`).

use std::ffi::{c_char, c_int, CString};
use std::marker::PhantomData;
use std::sync::OnceLock;

use crate::gpu::{DriverContext, Gpu, GpuError};

/// The libraries that export the NVTX v2 API, in the order tried.
pub const LIBRARIES: [&str; 2] = ["libnvToolsExt.so.1", "libnvtx3interop.so.1"];

/// The two entry points a range needs, resolved from the loaded library.
struct Nvtx {
    push: unsafe extern "C" fn(*const c_char) -> c_int,
    pop: unsafe extern "C" fn() -> c_int,
    /// Which of [`LIBRARIES`] they come from.
    library: &'static str,
    /// Keeps the library mapped for as long as the process runs.
    _lib: libloading::Library,
}

fn load() -> Option<Nvtx> {
    LIBRARIES.iter().find_map(|&name| {
        // SAFETY: loading runs the library's initialisers; NVTX's only set up its function
        // table. The two symbols have these C signatures in every NVTX v2 implementation.
        unsafe {
            let lib = libloading::Library::new(name).ok()?;
            let push = *lib.get::<unsafe extern "C" fn(*const c_char) -> c_int>(b"nvtxRangePushA\0").ok()?;
            let pop = *lib.get::<unsafe extern "C" fn() -> c_int>(b"nvtxRangePop\0").ok()?;
            Some(Nvtx { push, pop, library: name, _lib: lib })
        }
    })
}

fn nvtx() -> Option<&'static Nvtx> {
    static NVTX: OnceLock<Option<Nvtx>> = OnceLock::new();
    NVTX.get_or_init(load).as_ref()
}

/// The NVTX library the ranges go to, if one could be loaded (tried once per process).
pub fn library() -> Option<&'static str> {
    nvtx().map(|n| n.library)
}

/// An NVTX push/pop range on the calling thread, popped when dropped; a no-op when no NVTX
/// library is loaded. Nest them lexically: `let _r = Range::push("step");`.
#[must_use = "the range ends when this guard is dropped"]
pub struct Range {
    nvtx: Option<&'static Nvtx>,
    /// NVTX ranges belong to the thread that pushed them: the guard stays on it.
    _thread_bound: PhantomData<*const ()>,
}

impl Range {
    /// Opens the range `name` (a fixed name: profilers group and filter ranges by it).
    pub fn push(name: &'static str) -> Range {
        let nvtx = nvtx();
        if let Some(n) = nvtx {
            let name = CString::new(name).expect("range names have no NUL bytes");
            // SAFETY: a NUL-terminated string that outlives the call (NVTX copies it).
            unsafe { (n.push)(name.as_ptr()) };
        }
        Range { nvtx, _thread_bound: PhantomData }
    }
}

impl Drop for Range {
    fn drop(&mut self) {
        if let Some(n) = self.nvtx {
            // SAFETY: pops the range this guard pushed, on the thread that pushed it.
            unsafe { (n.pop)() };
        }
    }
}

/// The profiler's capture range: started on creation, stopped by [`CaptureRange::stop`].
/// Both ends wait for the device, so the capture holds exactly the work queued in between
/// (the step's kernels, not the tail of the previous step's optimiser).
pub struct CaptureRange<'g> {
    gpu: &'g Gpu,
}

impl<'g> CaptureRange<'g> {
    pub fn start(gpu: &'g Gpu) -> Result<CaptureRange<'g>, GpuError> {
        gpu.ctx.bind_to_thread().during("binding the context for cuProfilerStart")?;
        gpu.stream.synchronize().during("waiting for the device before cuProfilerStart")?;
        cudarc::driver::profiler_start().during("cuProfilerStart")?;
        Ok(CaptureRange { gpu })
    }

    pub fn stop(self) -> Result<(), GpuError> {
        self.gpu.stream.synchronize().during("waiting for the profiled work")?;
        cudarc::driver::profiler_stop().during("cuProfilerStop")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_nest_with_or_without_the_library() {
        // CI has no NVTX library: the guards must be no-ops there, and balanced where it is
        // (with LD_LIBRARY_PATH pointing at one, this test drives the real calls).
        eprintln!("NVTX library: {:?}", library());
        let outer = Range::push("test_outer");
        {
            let _inner = Range::push("test_inner");
        }
        drop(outer);
    }
}
