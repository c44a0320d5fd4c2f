//! Precision conversions over flat buffers (`cuda/cast.cu`).
//!
//! fp32 -> bf16 makes the compute copies of the master weights; bf16 -> fp32 reads
//! activations back for checks. Round to nearest even, as PyTorch's `.to(torch.bfloat16)`.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::gpu::{DriverContext, Gpu, GpuError};
use crate::ops::compare::{compare, Tolerance};
use crate::rng::Rng;
use crate::selftest::{Check, Row};

const FAMILY: &str = "cast";
const THREADS: u32 = 256;

/// CPU reference. out: [n] bf16, input: [n] fp32.
pub fn cast_f32_to_bf16_cpu(out: &mut [bf16], input: &[f32]) {
    assert_eq!(out.len(), input.len());
    for (o, &x) in out.iter_mut().zip(input) {
        *o = bf16::from_f32(x);
    }
}

/// CPU reference. out: [n] fp32, input: [n] bf16.
pub fn cast_bf16_to_f32_cpu(out: &mut [f32], input: &[bf16]) {
    assert_eq!(out.len(), input.len());
    for (o, &x) in out.iter_mut().zip(input) {
        *o = x.to_f32();
    }
}

/// out: [n] bf16, input: [n] fp32; both 16-byte aligned.
pub fn cast_f32_to_bf16(gpu: &Gpu, out: &mut CudaViewMut<bf16>, input: &CudaView<f32>) -> Result<(), GpuError> {
    launch(gpu, "cast_f32_to_bf16", out, input)
}

/// out: [n] fp32, input: [n] bf16; both 16-byte aligned.
pub fn cast_bf16_to_f32(gpu: &Gpu, out: &mut CudaViewMut<f32>, input: &CudaView<bf16>) -> Result<(), GpuError> {
    launch(gpu, "cast_bf16_to_f32", out, input)
}

fn launch<O, I>(gpu: &Gpu, kernel: &str, out: &mut CudaViewMut<O>, input: &CudaView<I>) -> Result<(), GpuError> {
    assert_eq!(out.len(), input.len(), "{kernel}: out has {} elements, input {}", out.len(), input.len());
    assert!(aligned16(gpu, out) && aligned16(gpu, input), "{kernel}: buffers must be 16-byte aligned");
    let n = input.len() as i64;
    let blocks = ((input.len() / 8).div_ceil(THREADS as usize)).clamp(1, gpu.props.sm_count * 16) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let func = gpu.function(FAMILY, kernel)?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(out).arg(input).arg(&n);
    // SAFETY: the kernel reads `n` elements of `input` and writes `n` of `out`; both views
    // hold exactly `n` elements (asserted above) of the types the kernel expects.
    unsafe { args.launch(cfg) }.during(kernel)?;
    Ok(())
}

fn aligned16<T>(gpu: &Gpu, buf: &impl DevicePtr<T>) -> bool {
    let (ptr, _sync) = buf.device_ptr(&gpu.stream);
    ptr % 16 == 0
}

pub fn selftests() -> Vec<Check> {
    vec![Check { name: "cast_f32_to_bf16", run: check_f32_to_bf16 }, Check { name: "cast_bf16_to_f32", run: check_bf16_to_f32 }]
}

/// Sizes: empty tail, a tail of 7, one element, and a multi-wave size.
const SIZES: [usize; 4] = [1, 8 * 1000, 8 * 1000 + 7, (1 << 22) + 3];

fn check_f32_to_bf16(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    // Rounding is exact and deterministic: both sides must agree bit for bit.
    let tol = Tolerance { abs: 0.0, rel: 0.0 };
    let mut rows = Vec::new();
    for n in SIZES {
        let input: Vec<f32> = rng.uniform_vec(n, 1e4);
        let mut want = vec![bf16::ZERO; n];
        cast_f32_to_bf16_cpu(&mut want, &input);

        let d_in = gpu.stream.clone_htod(&input).during("upload")?;
        let mut d_out: CudaSlice<bf16> = gpu.stream.clone_htod(&vec![bf16::NAN; n]).during("poison")?;
        cast_f32_to_bf16(gpu, &mut d_out.as_view_mut(), &d_in.as_view())?;
        let got = gpu.stream.clone_dtoh(&d_out).during("download")?;

        let to_f32 = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        rows.push(Row::new("cast_f32_to_bf16", format!("[{n}]"), tol, compare(&to_f32(&got), &to_f32(&want), tol)));
    }
    Ok(rows)
}

fn check_bf16_to_f32(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let tol = Tolerance { abs: 0.0, rel: 0.0 };
    let mut rows = Vec::new();
    for n in SIZES {
        let input: Vec<bf16> = rng.uniform_vec(n, 1e4).into_iter().map(bf16::from_f32).collect();
        let mut want = vec![0.0f32; n];
        cast_bf16_to_f32_cpu(&mut want, &input);

        let d_in = gpu.stream.clone_htod(&input).during("upload")?;
        let mut d_out = gpu.stream.clone_htod(&vec![f32::NAN; n]).during("poison")?;
        cast_bf16_to_f32(gpu, &mut d_out.as_view_mut(), &d_in.as_view())?;
        let got = gpu.stream.clone_dtoh(&d_out).during("download")?;
        rows.push(Row::new("cast_bf16_to_f32", format!("[{n}]"), tol, compare(&got, &want, tol)));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values; ties go to the even mantissa (1.0).
        let mut out = [bf16::ZERO; 2];
        cast_f32_to_bf16_cpu(&mut out, &[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0]);
        assert_eq!(out[0].to_f32(), 1.0);
        assert_eq!(out[1].to_f32(), 1.0 + 4.0 / 256.0);
    }
}
