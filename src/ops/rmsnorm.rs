//! Weightless RMSNorm (SPEC §2) and the input-injection add that precedes a module.
//!
//! ```text
//! forward    rstd = 1 / sqrt(mean(x^2) + eps)        eps = 1e-6, one value per row
//!            y    = x * rstd
//! backward   dx  += rstd * (dy - y * mean(dy * y))    (dx is the residual stream: +=)
//! ```
//!
//! The backward follows from `dy_j/dx_i = rstd * (delta_ij - y_i * y_j / D)`. The forward
//! saves `rstd` (fp32, one per row) so the backward needs only `x` and `dy`.
//!
//! On the GPU (`cuda/rmsnorm.cu`) x, y, z, inj, dx, dy are bf16 and rstd fp32; the math is
//! fp32. `add_rmsnorm_fwd` normalises the bf16-rounded `x` it stores, so its backward sees
//! the same `x` as its forward.

use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg};
use half::bf16;
use rayon::prelude::*;

use crate::config::NORM_EPS;
use crate::gpu::{DriverContext, Gpu, GpuError};
use crate::ops::check::{bf16_inputs, download, download_bf16, max_abs, poisoned_bf16, poisoned_f32, round_bf16, upload, upload_bf16};
use crate::ops::compare::{compare, Tolerance, BF16_EPS};
use crate::ops::shape::{as_i32, expect_aligned16, expect_len};
use crate::rng::Rng;
use crate::selftest::{Check, Row};

const FAMILY: &str = "rmsnorm";

/// `x [T,D] = z [T,D] + inj [T,D]` (a copy of `z` when `inj` is None), then
/// `y [T,D] = rms(x)` with `rstd [T]` saved.
#[allow(clippy::too_many_arguments)]
pub fn add_rmsnorm_fwd_cpu(x: &mut [f32], y: &mut [f32], rstd: &mut [f32], z: &[f32], inj: Option<&[f32]>, t: usize, d: usize) {
    const OP: &str = "add_rmsnorm_fwd_cpu";
    expect_len(OP, "x", x.len(), &[("T", t), ("D", d)]);
    expect_len(OP, "z", z.len(), &[("T", t), ("D", d)]);
    match inj {
        Some(inj) => {
            expect_len(OP, "inj", inj.len(), &[("T", t), ("D", d)]);
            x.par_iter_mut().zip(z.par_iter().zip(inj)).for_each(|(x, (z, i))| *x = z + i);
        }
        None => x.copy_from_slice(z),
    }
    rmsnorm_fwd_cpu(y, rstd, x, t, d);
}

/// `y [T,D] = x * rstd`, `rstd [T] = 1 / sqrt(mean(x^2) + 1e-6)` per row of `x [T,D]`.
pub fn rmsnorm_fwd_cpu(y: &mut [f32], rstd: &mut [f32], x: &[f32], t: usize, d: usize) {
    const OP: &str = "rmsnorm_fwd_cpu";
    expect_len(OP, "y", y.len(), &[("T", t), ("D", d)]);
    expect_len(OP, "rstd", rstd.len(), &[("T", t)]);
    expect_len(OP, "x", x.len(), &[("T", t), ("D", d)]);
    if d == 0 {
        return;
    }
    y.par_chunks_mut(d).zip(rstd.par_iter_mut()).zip(x.par_chunks(d)).for_each(|((y, r), x)| {
        let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
        *r = 1.0 / (mean_sq + NORM_EPS).sqrt();
        y.iter_mut().zip(x).for_each(|(y, x)| *y = x * *r);
    });
}

/// `dx [T,D] += rstd * (dy - y * mean(dy * y))` with `y = x * rstd`; `dy [T,D]`, `x [T,D]`,
/// `rstd [T]` from the forward.
pub fn rmsnorm_bwd_cpu(dx: &mut [f32], dy: &[f32], x: &[f32], rstd: &[f32], t: usize, d: usize) {
    const OP: &str = "rmsnorm_bwd_cpu";
    expect_len(OP, "dx", dx.len(), &[("T", t), ("D", d)]);
    expect_len(OP, "dy", dy.len(), &[("T", t), ("D", d)]);
    expect_len(OP, "x", x.len(), &[("T", t), ("D", d)]);
    expect_len(OP, "rstd", rstd.len(), &[("T", t)]);
    if d == 0 {
        return;
    }
    dx.par_chunks_mut(d).zip(dy.par_chunks(d).zip(x.par_chunks(d))).zip(rstd.par_iter()).for_each(|((dx, (dy, x)), &r)| {
        let mean_dy_y = dy.iter().zip(x).map(|(dy, x)| dy * x * r).sum::<f32>() / d as f32;
        for ((dx, dy), x) in dx.iter_mut().zip(dy).zip(x) {
            *dx += r * (dy - x * r * mean_dy_y);
        }
    });
}

/// `RMS_WARPS` in `cuda/rmsnorm.cu` (rows per block of the warp layout), and the numbers of
/// 16-byte vectors a lane holds for which that layout is instantiated.
const RMS_WARPS: usize = 4;
const WARP_VPLS: [usize; 5] = [2, 4, 6, 8, 10];

/// The kernel of forward op `op` and its launch for rows of `d` (`cuda/rmsnorm.cu`): one warp
/// per row when some instantiation holds a row (D <= 2560), else [`block_launch`].
fn row_launch(op: &str, t: usize, d: usize) -> (String, LaunchConfig) {
    let per_lane = (d / 8).div_ceil(32);
    match WARP_VPLS.iter().find(|&&vpl| vpl >= per_lane) {
        Some(vpl) => {
            let cfg = LaunchConfig { grid_dim: (t.div_ceil(RMS_WARPS) as u32, 1, 1), block_dim: (32 * RMS_WARPS as u32, 1, 1), shared_mem_bytes: 0 };
            (format!("{op}_warp_{vpl}"), cfg)
        }
        None => block_launch(op, t, d),
    }
}

/// The block layout of `op` (`<op>_block`) for rows of `d`: one block per row, one thread
/// per 8 columns.
fn block_launch(op: &str, t: usize, d: usize) -> (String, LaunchConfig) {
    assert!(d > 0 && d % 8 == 0 && d <= 8192, "{op}: D = {d} must be a positive multiple of 8, at most 8192");
    let cfg = LaunchConfig { grid_dim: (t as u32, 1, 1), block_dim: ((d / 8).next_multiple_of(32) as u32, 1, 1), shared_mem_bytes: 0 };
    (format!("{op}_block"), cfg)
}

/// GPU [`add_rmsnorm_fwd_cpu`]. x: [T,D] bf16 (written), y: [T,D] bf16, rstd: [T] fp32,
/// z: [T,D] bf16, inj: [T,D] bf16 (None: x is a copy of z).
#[allow(clippy::too_many_arguments)]
pub fn add_rmsnorm_fwd(
    gpu: &Gpu,
    x: &mut CudaViewMut<bf16>,
    y: &mut CudaViewMut<bf16>,
    rstd: &mut CudaViewMut<f32>,
    z: &CudaView<bf16>,
    inj: Option<&CudaView<bf16>>,
    t: usize,
    d: usize,
) -> Result<(), GpuError> {
    const OP: &str = "add_rmsnorm_fwd";
    for (name, len) in [("x", x.len()), ("y", y.len()), ("z", z.len())] {
        expect_len(OP, name, len, &[("T", t), ("D", d)]);
    }
    expect_len(OP, "rstd", rstd.len(), &[("T", t)]);
    expect_aligned16(OP, "x", gpu, x);
    expect_aligned16(OP, "y", gpu, y);
    expect_aligned16(OP, "z", gpu, z);
    if let Some(inj) = inj {
        expect_len(OP, "inj", inj.len(), &[("T", t), ("D", d)]);
        expect_aligned16(OP, "inj", gpu, inj);
    }
    let (name, cfg) = row_launch(OP, t, d);
    if t == 0 {
        return Ok(());
    }
    // The kernel takes a null `inj` for "no injection".
    let inj_ptr = inj.map(|v| v.device_ptr(&gpu.stream));
    let inj_raw: u64 = inj_ptr.as_ref().map_or(0, |(p, _)| *p);
    let (t_i, d_i) = (as_i32(OP, "T", t), as_i32(OP, "D", d));
    let func = gpu.function(FAMILY, &name)?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(x).arg(y).arg(rstd).arg(z).arg(&inj_raw).arg(&t_i).arg(&d_i);
    // SAFETY: x, y, z (and inj when not null) hold T*D bf16, rstd T fp32 (checked above), all
    // 16-byte aligned; the grid covers the T rows (a warp or a block each), rows past T
    // return at once, and each row is touched only by its own warp or block.
    unsafe { args.launch(cfg) }.during(OP)?;
    Ok(())
}

/// GPU [`rmsnorm_fwd_cpu`]. y: [T,D] bf16, rstd: [T] fp32, x: [T,D] bf16.
pub fn rmsnorm_fwd(gpu: &Gpu, y: &mut CudaViewMut<bf16>, rstd: &mut CudaViewMut<f32>, x: &CudaView<bf16>, t: usize, d: usize) -> Result<(), GpuError> {
    const OP: &str = "rmsnorm_fwd";
    expect_len(OP, "y", y.len(), &[("T", t), ("D", d)]);
    expect_len(OP, "rstd", rstd.len(), &[("T", t)]);
    expect_len(OP, "x", x.len(), &[("T", t), ("D", d)]);
    expect_aligned16(OP, "y", gpu, y);
    expect_aligned16(OP, "x", gpu, x);
    let (name, cfg) = row_launch(OP, t, d);
    if t == 0 {
        return Ok(());
    }
    let (t_i, d_i) = (as_i32(OP, "T", t), as_i32(OP, "D", d));
    let func = gpu.function(FAMILY, &name)?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(y).arg(rstd).arg(x).arg(&t_i).arg(&d_i);
    // SAFETY: y and x hold T*D bf16, rstd T fp32, 16-byte aligned (checked above); one warp
    // or block per row, rows past T return at once.
    unsafe { args.launch(cfg) }.during(OP)?;
    Ok(())
}

/// GPU [`rmsnorm_bwd_cpu`]. dx: [T,D] bf16 (+=), dy: [T,D] bf16, x: [T,D] bf16, rstd: [T] fp32.
/// Always the block layout: each thread loads its 16 bytes of dy, x and dx at once, so a row
/// costs one round trip to memory, and the threads are few registers each. On an H200 at
/// [16384, 1536] it moves 94% of the copy bandwidth, where a warp per row (dy and x of the row
/// in a lane's registers, dx loaded after the row's reduction) moved 78%.
pub fn rmsnorm_bwd(gpu: &Gpu, dx: &mut CudaViewMut<bf16>, dy: &CudaView<bf16>, x: &CudaView<bf16>, rstd: &CudaView<f32>, t: usize, d: usize) -> Result<(), GpuError> {
    const OP: &str = "rmsnorm_bwd";
    for (name, len) in [("dx", dx.len()), ("dy", dy.len()), ("x", x.len())] {
        expect_len(OP, name, len, &[("T", t), ("D", d)]);
    }
    expect_len(OP, "rstd", rstd.len(), &[("T", t)]);
    expect_aligned16(OP, "dx", gpu, dx);
    expect_aligned16(OP, "dy", gpu, dy);
    expect_aligned16(OP, "x", gpu, x);
    let (name, cfg) = block_launch(OP, t, d);
    if t == 0 {
        return Ok(());
    }
    let (t_i, d_i) = (as_i32(OP, "T", t), as_i32(OP, "D", d));
    let func = gpu.function(FAMILY, &name)?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(dx).arg(dy).arg(x).arg(rstd).arg(&t_i).arg(&d_i);
    // SAFETY: dx, dy, x hold T*D bf16, rstd T fp32, 16-byte aligned (checked above); one
    // block per row, each row read and written only by it.
    unsafe { args.launch(cfg) }.during(OP)?;
    Ok(())
}

pub fn selftests() -> Vec<Check> {
    vec![Check { name: "add_rmsnorm_fwd", run: check_add_rmsnorm_fwd }, Check { name: "rmsnorm_fwd", run: check_rmsnorm_fwd }, Check { name: "rmsnorm_bwd", run: check_rmsnorm_bwd }]
}

/// (T, D, input scale): a single vector, odd row counts, the XL width, the widest D.
const SHAPES: [(usize, usize, f32); 4] = [(1, 8, 1.0), (37, 296, 1000.0), (1025, 1536, 1.0), (300, 8192, 30.0)];

/// Tolerances. A bf16 output is one rounding (2^-9 relative) of an fp32 value whose own
/// error is ~1e-6 (fp32 sums of D terms): 2 * BF16_EPS = 2^-7 is two bf16 ulps of slack.
/// rstd is fp32: its error is the sum-of-squares rounding, ~log2(D) * 2^-24: 1e-5.
const Y_TOL: Tolerance = Tolerance { abs: 1e-6, rel: 2.0 * BF16_EPS };
const RSTD_TOL: Tolerance = Tolerance { abs: 0.0, rel: 1e-5 };

fn check_add_rmsnorm_fwd(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for (t, d, scale) in SHAPES {
        let shape = format!("[{t},{d}] x{scale}");
        let z = bf16_inputs(rng, t * d, scale);
        let inj = bf16_inputs(rng, t * d, scale);
        // x is stored in bf16: one rounding of z + inj (2^-9 relative).
        let (mut x_want, mut y_want, mut rstd_want) = (vec![0.0; t * d], vec![0.0; t * d], vec![0.0; t]);
        add_rmsnorm_fwd_cpu(&mut x_want, &mut y_want, &mut rstd_want, &z, Some(&inj), t, d);
        // The kernel normalises the x it stored, so y and rstd are referenced to that x.
        rmsnorm_fwd_cpu(&mut y_want, &mut rstd_want, &round_bf16(&x_want), t, d);

        let (dz, dinj) = (upload_bf16(gpu, &z)?, upload_bf16(gpu, &inj)?);
        let (mut dx, mut dy, mut drstd) = (poisoned_bf16(gpu, t * d)?, poisoned_bf16(gpu, t * d)?, poisoned_f32(gpu, t)?);
        add_rmsnorm_fwd(gpu, &mut dx.as_view_mut(), &mut dy.as_view_mut(), &mut drstd.as_view_mut(), &dz.as_view(), Some(&dinj.as_view()), t, d)?;
        let x_tol = Tolerance { abs: 0.0, rel: BF16_EPS };
        rows.push(Row::new("add_rmsnorm_fwd x", &shape, x_tol, compare(&download_bf16(gpu, &dx)?, &x_want, x_tol)));
        rows.push(Row::new("add_rmsnorm_fwd y", &shape, Y_TOL, compare(&download_bf16(gpu, &dy)?, &y_want, Y_TOL)));
        rows.push(Row::new("add_rmsnorm_fwd rstd", &shape, RSTD_TOL, compare(&download(gpu, &drstd)?, &rstd_want, RSTD_TOL)));

        // Without injection x is an exact copy of z.
        let mut dx = poisoned_bf16(gpu, t * d)?;
        add_rmsnorm_fwd(gpu, &mut dx.as_view_mut(), &mut dy.as_view_mut(), &mut drstd.as_view_mut(), &dz.as_view(), None, t, d)?;
        let exact = Tolerance { abs: 0.0, rel: 0.0 };
        rows.push(Row::new("add_rmsnorm_fwd x (no inj)", &shape, exact, compare(&download_bf16(gpu, &dx)?, &z, exact)));
    }
    Ok(rows)
}

fn check_rmsnorm_fwd(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for (t, d, scale) in SHAPES {
        let shape = format!("[{t},{d}] x{scale}");
        let x = bf16_inputs(rng, t * d, scale);
        let (mut y_want, mut rstd_want) = (vec![0.0; t * d], vec![0.0; t]);
        rmsnorm_fwd_cpu(&mut y_want, &mut rstd_want, &x, t, d);
        let dxin = upload_bf16(gpu, &x)?;
        let (mut dy, mut drstd) = (poisoned_bf16(gpu, t * d)?, poisoned_f32(gpu, t)?);
        rmsnorm_fwd(gpu, &mut dy.as_view_mut(), &mut drstd.as_view_mut(), &dxin.as_view(), t, d)?;
        rows.push(Row::new("rmsnorm_fwd y", &shape, Y_TOL, compare(&download_bf16(gpu, &dy)?, &y_want, Y_TOL)));
        rows.push(Row::new("rmsnorm_fwd rstd", &shape, RSTD_TOL, compare(&download(gpu, &drstd)?, &rstd_want, RSTD_TOL)));
    }
    Ok(rows)
}

fn check_rmsnorm_bwd(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for (t, d, scale) in SHAPES {
        let shape = format!("[{t},{d}] x{scale}");
        let x = bf16_inputs(rng, t * d, scale);
        let dy = bf16_inputs(rng, t * d, 1.0);
        let dx0 = bf16_inputs(rng, t * d, 1.0);
        let (mut y, mut rstd) = (vec![0.0; t * d], vec![0.0; t]);
        rmsnorm_fwd_cpu(&mut y, &mut rstd, &x, t, d);
        let mut want = dx0.clone();
        rmsnorm_bwd_cpu(&mut want, &dy, &x, &rstd, t, d);
        // The increment rstd * (dy - y * mean(dy*y)) carries fp32 error ~1e-6 of its terms
        // (|dy| <= 1, |y| ~ 1): abs 1e-5 * max rstd; the bf16 result adds one rounding.
        let tol = Tolerance { abs: 1e-5 * max_abs(&rstd).max(1.0), rel: 2.0 * BF16_EPS };

        let mut ddx = upload_bf16(gpu, &dx0)?;
        let (ddy, dxin, drstd) = (upload_bf16(gpu, &dy)?, upload_bf16(gpu, &x)?, upload(gpu, &rstd)?);
        rmsnorm_bwd(gpu, &mut ddx.as_view_mut(), &ddy.as_view(), &dxin.as_view(), &drstd.as_view(), t, d)?;
        rows.push(Row::new("rmsnorm_bwd dx (+=)", &shape, tol, compare(&download_bf16(gpu, &ddx)?, &want, tol)));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_gradient, weighted_sum};
    use crate::rng::Rng;

    #[test]
    fn forward_normalises_rows() {
        let mut rng = Rng::new(3);
        let (t, d) = (5, 37);
        let z = rng.uniform_vec(t * d, 100.0);
        let inj = rng.uniform_vec(t * d, 100.0);
        let (mut x, mut y, mut rstd) = (vec![f32::NAN; t * d], vec![f32::NAN; t * d], vec![f32::NAN; t]);
        add_rmsnorm_fwd_cpu(&mut x, &mut y, &mut rstd, &z, Some(&inj), t, d);
        for i in 0..t * d {
            assert_eq!(x[i], z[i] + inj[i]);
        }
        for row in y.chunks(d) {
            let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d as f64;
            assert!((ms - 1.0).abs() < 1e-5, "mean square {ms}");
        }
        add_rmsnorm_fwd_cpu(&mut x, &mut y, &mut rstd, &z, None, t, d);
        assert_eq!(x, z);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(4);
        let (t, d) = (6, 29);
        let x = rng.uniform_vec(t * d, 3.0);
        let r = rng.uniform_vec(t * d, 1.0);
        let loss = |x: &[f32]| {
            let (mut y, mut rstd) = (vec![0.0; t * d], vec![0.0; t]);
            rmsnorm_fwd_cpu(&mut y, &mut rstd, x, t, d);
            weighted_sum(&r, &y)
        };
        let (mut y, mut rstd) = (vec![0.0; t * d], vec![0.0; t]);
        rmsnorm_fwd_cpu(&mut y, &mut rstd, &x, t, d);
        // dx accumulates: start from a random residual gradient and check the increment.
        let start = rng.uniform_vec(t * d, 1.0);
        let mut dx = start.clone();
        rmsnorm_bwd_cpu(&mut dx, &r, &x, &rstd, t, d);
        let delta: Vec<f32> = dx.iter().zip(&start).map(|(a, b)| a - b).collect();
        check_gradient("rmsnorm dx", &x, &delta, loss, &mut rng, 4);
    }
}
