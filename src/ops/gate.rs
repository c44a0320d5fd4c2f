//! The sigmoid output gate of attention (SPEC §2): `out = sigmoid(g) * a`.
//!
//! ```text
//! forward    out = s * a,            s = sigmoid(g) = 1 / (1 + exp(-g))
//! backward   da  = dout * s
//!            dg  = dout * a * s * (1 - s)
//! ```
//!
//! Elementwise over `n = T * NH * HD` values; both gradients are written with `=`. On the
//! GPU (`cuda/gate.cu`) every buffer is bf16 and the math fp32.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;
use rayon::prelude::*;

use crate::gpu::{DriverContext, Gpu, GpuError};
use crate::ops::check::{bf16_inputs, download_bf16, max_abs, poisoned_bf16, upload_bf16};
use crate::ops::compare::{compare, Tolerance, BF16_EPS};
use crate::ops::shape::{expect_aligned16, expect_len};
use crate::rng::Rng;
use crate::selftest::{Check, Row};

const FAMILY: &str = "gate";
const THREADS: u32 = 256;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `out [T,C] = sigmoid(g [T,C]) * a [T,C]`, `n = T*C`.
pub fn gate_fwd_cpu(out: &mut [f32], g: &[f32], a: &[f32], n: usize) {
    const OP: &str = "gate_fwd_cpu";
    expect_len(OP, "out", out.len(), &[("T*C", n)]);
    expect_len(OP, "g", g.len(), &[("T*C", n)]);
    expect_len(OP, "a", a.len(), &[("T*C", n)]);
    out.par_iter_mut().zip(g.par_iter().zip(a)).for_each(|(o, (&g, &a))| *o = sigmoid(g) * a);
}

/// `dg [T,C]`, `da [T,C]` (written with `=`) from `dout [T,C]` and the forward inputs
/// `g [T,C]`, `a [T,C]`; `n = T*C`.
pub fn gate_bwd_cpu(dg: &mut [f32], da: &mut [f32], dout: &[f32], g: &[f32], a: &[f32], n: usize) {
    const OP: &str = "gate_bwd_cpu";
    for (name, len) in [("dg", dg.len()), ("da", da.len()), ("dout", dout.len()), ("g", g.len()), ("a", a.len())] {
        expect_len(OP, name, len, &[("T*C", n)]);
    }
    dg.par_iter_mut().zip(da.par_iter_mut()).zip(dout.par_iter().zip(g).zip(a)).for_each(|((dg, da), ((&dout, &g), &a))| {
        let s = sigmoid(g);
        *da = dout * s;
        *dg = dout * a * s * (1.0 - s);
    });
}

/// `GATE_FWD_UNROLL` / `GATE_BWD_UNROLL` in `cuda/gate.cu`: vectors of 8 a thread handles.
const GATE_FWD_UNROLL: usize = 4;
const GATE_BWD_UNROLL: usize = 2;
/// Grid cap (blocks); past it the blocks stride over the tiles. 2^31 - 1 is the hardware's
/// limit; this only keeps `as u32` honest for absurd n.
const MAX_BLOCKS: usize = 1 << 30;

/// One tile of `THREADS * unroll` vectors of 8 a block (`cuda/gate.cu`): ~3k short blocks
/// at the XL shape, which the block scheduler keeps the device full with to the end. (v2 ran
/// a one-wave grid-stride loop: on an H100 gate_fwd's threads did 9.3 iterations, the last
/// with 31% of them busy.)
fn elementwise_config(n: usize, unroll: usize) -> LaunchConfig {
    let blocks = (n / 8).div_ceil(THREADS as usize * unroll).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// GPU [`gate_fwd_cpu`]. out, g, a: [T,C] bf16, `n = T*C`.
pub fn gate_fwd(gpu: &Gpu, out: &mut CudaViewMut<bf16>, g: &CudaView<bf16>, a: &CudaView<bf16>, n: usize) -> Result<(), GpuError> {
    const OP: &str = "gate_fwd";
    for (name, len) in [("out", out.len()), ("g", g.len()), ("a", a.len())] {
        expect_len(OP, name, len, &[("T*C", n)]);
    }
    expect_aligned16(OP, "out", gpu, out);
    expect_aligned16(OP, "g", gpu, g);
    expect_aligned16(OP, "a", gpu, a);
    if n == 0 {
        return Ok(());
    }
    let n_i = n as i64;
    let func = gpu.function(FAMILY, OP)?;
    let cfg = elementwise_config(n, GATE_FWD_UNROLL);
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(out).arg(g).arg(a).arg(&n_i);
    // SAFETY: all three buffers hold n bf16 (checked above), 16-byte aligned; the kernel
    // touches elements 0..n only.
    unsafe { args.launch(cfg) }.during(OP)?;
    Ok(())
}

/// GPU [`gate_bwd_cpu`]. dg, da, dout, g, a: [T,C] bf16, `n = T*C`.
#[allow(clippy::too_many_arguments)]
pub fn gate_bwd(gpu: &Gpu, dg: &mut CudaViewMut<bf16>, da: &mut CudaViewMut<bf16>, dout: &CudaView<bf16>, g: &CudaView<bf16>, a: &CudaView<bf16>, n: usize) -> Result<(), GpuError> {
    const OP: &str = "gate_bwd";
    for (name, len) in [("dg", dg.len()), ("da", da.len()), ("dout", dout.len()), ("g", g.len()), ("a", a.len())] {
        expect_len(OP, name, len, &[("T*C", n)]);
    }
    expect_aligned16(OP, "dg", gpu, dg);
    expect_aligned16(OP, "da", gpu, da);
    expect_aligned16(OP, "dout", gpu, dout);
    expect_aligned16(OP, "g", gpu, g);
    expect_aligned16(OP, "a", gpu, a);
    if n == 0 {
        return Ok(());
    }
    let n_i = n as i64;
    let func = gpu.function(FAMILY, OP)?;
    let cfg = elementwise_config(n, GATE_BWD_UNROLL);
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(dg).arg(da).arg(dout).arg(g).arg(a).arg(&n_i);
    // SAFETY: all five buffers hold n bf16 (checked above), 16-byte aligned; the kernel
    // touches elements 0..n only.
    unsafe { args.launch(cfg) }.during(OP)?;
    Ok(())
}

pub fn selftests() -> Vec<Check> {
    vec![Check { name: "gate_fwd", run: check_fwd }, Check { name: "gate_bwd", run: check_bwd }]
}

/// (n, input scale): the scalar tail alone, a tail of 7, XL-sized [2049, 1536], large inputs
/// that saturate the sigmoid.
const SHAPES: [(usize, f32); 4] = [(5, 1.0), (8 * 1001 + 7, 4.0), (2049 * 1536, 8.0), (4096 + 3, 1000.0)];

fn check_fwd(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for (n, scale) in SHAPES {
        let (g, a) = (bf16_inputs(rng, n, scale), bf16_inputs(rng, n, scale));
        let mut want = vec![0.0; n];
        gate_fwd_cpu(&mut want, &g, &a, n);
        let (dg, da) = (upload_bf16(gpu, &g)?, upload_bf16(gpu, &a)?);
        let mut out = poisoned_bf16(gpu, n)?;
        gate_fwd(gpu, &mut out.as_view_mut(), &dg.as_view(), &da.as_view(), n)?;
        // One bf16 rounding (2^-9) of an fp32 product whose expf is within 2 ulps: 2^-7.
        let tol = Tolerance { abs: 1e-30, rel: 2.0 * BF16_EPS };
        rows.push(Row::new("gate_fwd out", format!("[{n}] x{scale}"), tol, compare(&download_bf16(gpu, &out)?, &want, tol)));
    }
    Ok(rows)
}

fn check_bwd(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for (n, scale) in SHAPES {
        let (g, a, dout) = (bf16_inputs(rng, n, scale), bf16_inputs(rng, n, scale), bf16_inputs(rng, n, 1.0));
        let (mut dg_want, mut da_want) = (vec![0.0; n], vec![0.0; n]);
        gate_bwd_cpu(&mut dg_want, &mut da_want, &dout, &g, &a, n);
        let (dd, dgi, dai) = (upload_bf16(gpu, &dout)?, upload_bf16(gpu, &g)?, upload_bf16(gpu, &a)?);
        let (mut dg, mut da) = (poisoned_bf16(gpu, n)?, poisoned_bf16(gpu, n)?);
        gate_bwd(gpu, &mut dg.as_view_mut(), &mut da.as_view_mut(), &dd.as_view(), &dgi.as_view(), &dai.as_view(), n)?;
        let shape = format!("[{n}] x{scale}");
        let da_tol = Tolerance { abs: 1e-30, rel: 2.0 * BF16_EPS };
        // s * (1 - s) cancels when s ~ 1: the fp32 error of 1 - s is 2^-24 absolute, so dg
        // carries up to |dout * a| * 2^-23 absolute error.
        let dg_tol = Tolerance { abs: max_abs(&dout) * max_abs(&a) * 2f32.powi(-22), rel: 2.0 * BF16_EPS };
        rows.push(Row::new("gate_bwd dg", &shape, dg_tol, compare(&download_bf16(gpu, &dg)?, &dg_want, dg_tol)));
        rows.push(Row::new("gate_bwd da", &shape, da_tol, compare(&download_bf16(gpu, &da)?, &da_want, da_tol)));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_gradient, weighted_sum};
    use crate::rng::Rng;

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(7);
        let n = 301;
        let g = rng.uniform_vec(n, 4.0);
        let a = rng.uniform_vec(n, 2.0);
        let r = rng.uniform_vec(n, 1.0);
        let loss = |g: &[f32], a: &[f32]| {
            let mut out = vec![0.0; n];
            gate_fwd_cpu(&mut out, g, a, n);
            weighted_sum(&r, &out)
        };
        let (mut dg, mut da) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        gate_bwd_cpu(&mut dg, &mut da, &r, &g, &a, n);
        check_gradient("gate dg", &g, &dg, |g| loss(g, &a), &mut rng, 4);
        check_gradient("gate da", &a, &da, |a| loss(&g, a), &mut rng, 4);
    }

    #[test]
    fn saturates_without_nan() {
        let mut out = [f32::NAN; 2];
        gate_fwd_cpu(&mut out, &[-200.0, 200.0], &[3.0, 3.0], 2);
        assert_eq!(out, [0.0, 3.0]);
    }
}
