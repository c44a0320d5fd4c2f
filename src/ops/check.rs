//! Helpers shared by the GPU-vs-CPU selftest checks of the op families.
//!
//! Inputs are drawn on the host already rounded to bf16, so that the CPU reference and the
//! kernel see exactly the same values and the comparison measures only the kernel's own
//! arithmetic and output rounding. Outputs are allocated full of NaN, so an element the
//! kernel forgot to write fails the check.

use cudarc::driver::{CudaSlice, DeviceRepr};
use half::bf16;

use crate::gpu::{DriverContext, Gpu, GpuError};
use crate::rng::Rng;

/// `n` values uniform in `[-scale, scale)`, rounded to bf16 (returned as fp32).
pub fn bf16_inputs(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    round_bf16(&rng.uniform_vec(n, scale))
}

/// The values a bf16 buffer would hold (round to nearest even).
pub fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

pub fn upload<T: DeviceRepr>(gpu: &Gpu, v: &[T]) -> Result<CudaSlice<T>, GpuError> {
    gpu.stream.clone_htod(v).during("selftest upload")
}

pub fn upload_bf16(gpu: &Gpu, v: &[f32]) -> Result<CudaSlice<bf16>, GpuError> {
    upload(gpu, &v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>())
}

/// A bf16 output buffer of `n` NaNs.
pub fn poisoned_bf16(gpu: &Gpu, n: usize) -> Result<CudaSlice<bf16>, GpuError> {
    upload(gpu, &vec![bf16::NAN; n])
}

/// An fp32 output buffer of `n` NaNs.
pub fn poisoned_f32(gpu: &Gpu, n: usize) -> Result<CudaSlice<f32>, GpuError> {
    upload(gpu, &vec![f32::NAN; n])
}

pub fn download<T: DeviceRepr>(gpu: &Gpu, buf: &CudaSlice<T>) -> Result<Vec<T>, GpuError> {
    gpu.stream.clone_dtoh(buf).during("selftest download")
}

pub fn download_bf16(gpu: &Gpu, buf: &CudaSlice<bf16>) -> Result<Vec<f32>, GpuError> {
    Ok(download(gpu, buf)?.iter().map(|x| x.to_f32()).collect())
}

/// Largest `|x|`, for tolerances that scale with the inputs.
pub fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}
