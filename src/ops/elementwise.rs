//! The small element maps the model needs besides its op families (`cuda/elementwise.cu`):
//!
//! ```text
//! add_act         dst [n] += src [n]             a recurrent state's gradient fan-in
//! broadcast_rows  out [T, D] = row [D] per row   z_L_init onto every token
//! sum_squares     sum of x [n]^2, in fp64        the gradient norm of the training log
//! ```
//!
//! On the GPU both are bf16; `add_act` adds in fp32 and rounds once, so it matches
//! `bf16(dst + src)` of the CPU reference bit for bit. Zeroing is a `memset` and uploads
//! convert on the host (`half`'s round to nearest even, as `cast_f32_to_bf16`), so neither
//! needs a kernel.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::gpu::{DriverContext, Gpu, GpuError};
use crate::ops::check::{bf16_inputs, download_bf16, poisoned_bf16, round_bf16, upload_bf16};
use crate::ops::compare::{compare, Tolerance};
use crate::ops::shape::{as_i32, expect_aligned16, expect_len};
use crate::rng::Rng;
use crate::selftest::{Check, Row};

const FAMILY: &str = "elementwise";
const THREADS: u32 = 256;

/// `dst [n] += src [n]`.
pub fn add_act_cpu(dst: &mut [f32], src: &[f32], n: usize) {
    expect_len("add_act_cpu", "dst", dst.len(), &[("n", n)]);
    expect_len("add_act_cpu", "src", src.len(), &[("n", n)]);
    dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
}

/// `out [T, D]` = `row [D]` on every row.
pub fn broadcast_rows_cpu(out: &mut [f32], row: &[f32], t: usize, d: usize) {
    expect_len("broadcast_rows_cpu", "out", out.len(), &[("T", t), ("D", d)]);
    expect_len("broadcast_rows_cpu", "row", row.len(), &[("D", d)]);
    out.chunks_exact_mut(d).for_each(|r| r.copy_from_slice(row));
}

/// Grid-stride over vectors of 8, a few waves of the device at most.
fn elementwise_config(gpu: &Gpu, n: usize) -> LaunchConfig {
    let blocks = (n / 8).div_ceil(THREADS as usize).clamp(1, gpu.props.sm_count * 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// GPU [`add_act_cpu`]. dst: [n] bf16 (+=), src: [n] bf16.
pub fn add_act(gpu: &Gpu, dst: &mut CudaViewMut<bf16>, src: &CudaView<bf16>, n: usize) -> Result<(), GpuError> {
    const OP: &str = "add_act";
    expect_len(OP, "dst", dst.len(), &[("n", n)]);
    expect_len(OP, "src", src.len(), &[("n", n)]);
    expect_aligned16(OP, "dst", gpu, dst);
    expect_aligned16(OP, "src", gpu, src);
    if n == 0 {
        return Ok(());
    }
    let n_i = n as i64;
    let func = gpu.function(FAMILY, OP)?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(dst).arg(src).arg(&n_i);
    // SAFETY: both buffers hold n bf16 (checked above), 16-byte aligned; the kernel touches
    // elements 0..n only.
    unsafe { args.launch(elementwise_config(gpu, n)) }.during(OP)?;
    Ok(())
}

/// `sum(x^2)` over x: [n] fp32, accumulated in fp64.
pub fn sum_squares_cpu(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64 * v as f64).sum()
}

/// Blocks of the `sum_squares` grid: fixed, so the result does not depend on the device.
const SUM_SQUARES_BLOCKS: usize = 1024;

/// GPU [`sum_squares_cpu`]: x: [n] fp32. Synchronises (it returns a host value): for logging
/// steps, not the hot path.
pub fn sum_squares(gpu: &Gpu, x: &CudaView<f32>) -> Result<f64, GpuError> {
    const OP: &str = "sum_squares";
    let n = x.len() as i64;
    let mut partial = gpu.stream.alloc_zeros::<f64>(SUM_SQUARES_BLOCKS).during("allocating sum_squares partials")?;
    let func = gpu.function(FAMILY, OP)?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(&mut partial).arg(x).arg(&n);
    let cfg = LaunchConfig { grid_dim: (SUM_SQUARES_BLOCKS as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: partial holds one f64 per block; the kernel reads x[0..n] and uses 256 threads,
    // the size of its shared tree.
    unsafe { args.launch(cfg) }.during(OP)?;
    Ok(gpu.stream.clone_dtoh(&partial).during("downloading sum_squares partials")?.iter().sum())
}

/// GPU [`broadcast_rows_cpu`]. out: [T, D] bf16, row: [D] bf16, D a multiple of 8.
pub fn broadcast_rows(gpu: &Gpu, out: &mut CudaViewMut<bf16>, row: &CudaView<bf16>, t: usize, d: usize) -> Result<(), GpuError> {
    const OP: &str = "broadcast_rows";
    expect_len(OP, "out", out.len(), &[("T", t), ("D", d)]);
    expect_len(OP, "row", row.len(), &[("D", d)]);
    assert!(d > 0 && d % 8 == 0, "{OP}: D = {d} must be a positive multiple of 8");
    expect_aligned16(OP, "out", gpu, out);
    expect_aligned16(OP, "row", gpu, row);
    if t == 0 {
        return Ok(());
    }
    let (t_i, d_i) = (t as i64, as_i32(OP, "D", d));
    let func = gpu.function(FAMILY, OP)?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(out).arg(row).arg(&t_i).arg(&d_i);
    // SAFETY: out holds T*D bf16 and row D (checked above), 16-byte aligned, D % 8 == 0; the
    // kernel writes the T*D/8 vectors of out and reads the D/8 of row.
    unsafe { args.launch(elementwise_config(gpu, t * d)) }.during(OP)?;
    Ok(())
}

pub fn selftests() -> Vec<Check> {
    vec![
        Check { name: "add_act", run: check_add_act },
        Check { name: "broadcast_rows", run: check_broadcast_rows },
        Check { name: "sum_squares", run: check_sum_squares },
    ]
}

/// Both are exact: `add_act` is one fp32 add and one rounding on either side, and
/// `broadcast_rows` a copy.
const EXACT: Tolerance = Tolerance { abs: 0.0, rel: 0.0 };

fn check_add_act(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    // (n, scale of dst, scale of src): a lone tail element, a tail of 7, a multi-wave size,
    // and terms of very different magnitude (the small one mostly rounds away).
    for (n, dst_scale, src_scale) in [(1, 1.0, 1.0), (8 * 1000 + 7, 1.0, 1.0), ((1 << 22) + 3, 3.0, 0.5), (4099, 1e3, 1e-2)] {
        let dst = bf16_inputs(rng, n, dst_scale);
        let src = bf16_inputs(rng, n, src_scale);
        let mut want = dst.clone();
        add_act_cpu(&mut want, &src, n);
        let want = round_bf16(&want);

        let (mut ddst, dsrc) = (upload_bf16(gpu, &dst)?, upload_bf16(gpu, &src)?);
        add_act(gpu, &mut ddst.as_view_mut(), &dsrc.as_view(), n)?;
        rows.push(Row::new("add_act", format!("[{n}] {dst_scale}+{src_scale}"), EXACT, compare(&download_bf16(gpu, &ddst)?, &want, EXACT)));
    }
    Ok(rows)
}

fn check_sum_squares(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    // Both sides sum fp64 squares of the same fp32 values, in different orders (a relative
    // difference near 1e-15); compared after rounding each to fp32, so 1e-6 covers the two
    // roundings (2^-24 each) with a wide margin while still catching a missed element.
    let tol = Tolerance { abs: 0.0, rel: 1e-6 };
    let mut rows = Vec::new();
    for n in [1usize, 1000, (1 << 22) + 5] {
        let x = rng.uniform_vec(n, 10.0);
        let dx = gpu.stream.clone_htod(&x).during("upload")?;
        let got = sum_squares(gpu, &dx.as_view())?;
        let want = sum_squares_cpu(&x);
        rows.push(Row::new("sum_squares", format!("[{n}]"), tol, compare(&[got as f32], &[want as f32], tol)));
    }
    Ok(rows)
}

fn check_broadcast_rows(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for (t, d) in [(1, 8), (37, 256), (3001, 1536)] {
        let row = bf16_inputs(rng, d, 1.0);
        let mut want = vec![0.0; t * d];
        broadcast_rows_cpu(&mut want, &row, t, d);

        let drow = upload_bf16(gpu, &row)?;
        let mut out = poisoned_bf16(gpu, t * d)?;
        broadcast_rows(gpu, &mut out.as_view_mut(), &drow.as_view(), t, d)?;
        rows.push(Row::new("broadcast_rows", format!("[{t},{d}]"), EXACT, compare(&download_bf16(gpu, &out)?, &want, EXACT)));
    }
    Ok(rows)
}
