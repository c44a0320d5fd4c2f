//! The SwiGLU activation of the MLP (SPEC §2): `out = silu(gate) * up`.
//!
//! `gate_up [T, 2I]` is the output of `gate_up_proj`: columns `0..I` are the gate, `I..2I`
//! the up projection.
//!
//! ```text
//! forward    out   = silu(g) * u,         silu(g) = g * s,  s = sigmoid(g)
//! backward   du    = dout * silu(g)
//!            dg    = dout * u * s * (1 + g * (1 - s))      (d silu / dg)
//! ```
//!
//! On the GPU (`cuda/swiglu.cu`) every buffer is bf16 and the math fp32; `I % 8 == 0`.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;
use rayon::prelude::*;

use crate::gpu::{DriverContext, Gpu, GpuError};
use crate::ops::check::{bf16_inputs, download_bf16, max_abs, poisoned_bf16, upload_bf16};
use crate::ops::compare::{compare, Tolerance, BF16_EPS};
use crate::ops::shape::{as_i32, expect_aligned16, expect_len};
use crate::rng::Rng;
use crate::selftest::{Check, Row};

const FAMILY: &str = "swiglu";
const THREADS: u32 = 256;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `out [T,I] = silu(gate_up[:, :I]) * gate_up[:, I:]` for `gate_up [T,2I]`.
pub fn swiglu_fwd_cpu(out: &mut [f32], gate_up: &[f32], t: usize, i: usize) {
    const OP: &str = "swiglu_fwd_cpu";
    expect_len(OP, "out", out.len(), &[("T", t), ("I", i)]);
    expect_len(OP, "gate_up", gate_up.len(), &[("T", t), ("2I", 2 * i)]);
    if i == 0 {
        return;
    }
    out.par_chunks_mut(i).zip(gate_up.par_chunks(2 * i)).for_each(|(out, gu)| {
        let (gate, up) = gu.split_at(i);
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g * sigmoid(g) * u;
        }
    });
}

/// `dgate_up [T,2I]` (written with `=`) from `dout [T,I]` and the forward input
/// `gate_up [T,2I]`.
pub fn swiglu_bwd_cpu(dgate_up: &mut [f32], dout: &[f32], gate_up: &[f32], t: usize, i: usize) {
    const OP: &str = "swiglu_bwd_cpu";
    expect_len(OP, "dgate_up", dgate_up.len(), &[("T", t), ("2I", 2 * i)]);
    expect_len(OP, "dout", dout.len(), &[("T", t), ("I", i)]);
    expect_len(OP, "gate_up", gate_up.len(), &[("T", t), ("2I", 2 * i)]);
    if i == 0 {
        return;
    }
    dgate_up.par_chunks_mut(2 * i).zip(dout.par_chunks(i)).zip(gate_up.par_chunks(2 * i)).for_each(|((dgu, dout), gu)| {
        let (dgate, dup) = dgu.split_at_mut(i);
        let (gate, up) = gu.split_at(i);
        for j in 0..i {
            let (g, u, d) = (gate[j], up[j], dout[j]);
            let s = sigmoid(g);
            dup[j] = d * g * s;
            dgate[j] = d * u * s * (1.0 + g * (1.0 - s));
        }
    });
}

/// Grid-stride over the `T * I/8` output vectors, a few waves of the device at most.
fn vector_config(gpu: &Gpu, op: &str, t: usize, i: usize) -> LaunchConfig {
    assert!(i % 8 == 0, "{op}: I = {i} must be a multiple of 8");
    as_i32(op, "2I", 2 * i);
    let blocks = (t * i / 8).div_ceil(THREADS as usize).clamp(1, gpu.props.sm_count * 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// GPU [`swiglu_fwd_cpu`]. out: [T,I] bf16, gate_up: [T,2I] bf16.
pub fn swiglu_fwd(gpu: &Gpu, out: &mut CudaViewMut<bf16>, gate_up: &CudaView<bf16>, t: usize, i: usize) -> Result<(), GpuError> {
    const OP: &str = "swiglu_fwd";
    expect_len(OP, "out", out.len(), &[("T", t), ("I", i)]);
    expect_len(OP, "gate_up", gate_up.len(), &[("T", t), ("2I", 2 * i)]);
    expect_aligned16(OP, "out", gpu, out);
    expect_aligned16(OP, "gate_up", gpu, gate_up);
    let cfg = vector_config(gpu, OP, t, i);
    if t * i == 0 {
        return Ok(());
    }
    let (t_i, i_i) = (as_i32(OP, "T", t), i as i32);
    let func = gpu.function(FAMILY, OP)?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(out).arg(gate_up).arg(&t_i).arg(&i_i);
    // SAFETY: out holds T*I and gate_up T*2I bf16 (checked above), 16-byte aligned, I % 8 == 0;
    // the kernel touches vectors 0..T*I/8 of out and the matching ones of gate_up.
    unsafe { args.launch(cfg) }.during(OP)?;
    Ok(())
}

/// GPU [`swiglu_bwd_cpu`]. dgate_up: [T,2I] bf16, dout: [T,I] bf16, gate_up: [T,2I] bf16.
pub fn swiglu_bwd(gpu: &Gpu, dgate_up: &mut CudaViewMut<bf16>, dout: &CudaView<bf16>, gate_up: &CudaView<bf16>, t: usize, i: usize) -> Result<(), GpuError> {
    const OP: &str = "swiglu_bwd";
    expect_len(OP, "dgate_up", dgate_up.len(), &[("T", t), ("2I", 2 * i)]);
    expect_len(OP, "dout", dout.len(), &[("T", t), ("I", i)]);
    expect_len(OP, "gate_up", gate_up.len(), &[("T", t), ("2I", 2 * i)]);
    expect_aligned16(OP, "dgate_up", gpu, dgate_up);
    expect_aligned16(OP, "dout", gpu, dout);
    expect_aligned16(OP, "gate_up", gpu, gate_up);
    let cfg = vector_config(gpu, OP, t, i);
    if t * i == 0 {
        return Ok(());
    }
    let (t_i, i_i) = (as_i32(OP, "T", t), i as i32);
    let func = gpu.function(FAMILY, OP)?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(dgate_up).arg(dout).arg(gate_up).arg(&t_i).arg(&i_i);
    // SAFETY: as in swiglu_fwd; dgate_up has the shape of gate_up.
    unsafe { args.launch(cfg) }.during(OP)?;
    Ok(())
}

pub fn selftests() -> Vec<Check> {
    vec![Check { name: "swiglu_fwd", run: check_fwd }, Check { name: "swiglu_bwd", run: check_bwd }]
}

/// (T, I, input scale): one vector, odd T and I/8, the XL row [4096] with large inputs.
const SHAPES: [(usize, usize, f32); 4] = [(1, 8, 1.0), (37, 8 * 37, 6.0), (1001, 4096, 3.0), (65, 4096, 300.0)];

fn check_fwd(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for (t, i, scale) in SHAPES {
        let gate_up = bf16_inputs(rng, t * 2 * i, scale);
        let mut want = vec![0.0; t * i];
        swiglu_fwd_cpu(&mut want, &gate_up, t, i);
        let dgu = upload_bf16(gpu, &gate_up)?;
        let mut out = poisoned_bf16(gpu, t * i)?;
        swiglu_fwd(gpu, &mut out.as_view_mut(), &dgu.as_view(), t, i)?;
        // One bf16 rounding of an fp32 product (expf within 2 ulps): 2^-7.
        let tol = Tolerance { abs: 1e-30, rel: 2.0 * BF16_EPS };
        rows.push(Row::new("swiglu_fwd out", format!("[{t},{i}] x{scale}"), tol, compare(&download_bf16(gpu, &out)?, &want, tol)));
    }
    Ok(rows)
}

fn check_bwd(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for (t, i, scale) in SHAPES {
        let gate_up = bf16_inputs(rng, t * 2 * i, scale);
        let dout = bf16_inputs(rng, t * i, 1.0);
        let mut want = vec![0.0; t * 2 * i];
        swiglu_bwd_cpu(&mut want, &dout, &gate_up, t, i);
        let (dgu, dd) = (upload_bf16(gpu, &gate_up)?, upload_bf16(gpu, &dout)?);
        let mut out = poisoned_bf16(gpu, t * 2 * i)?;
        swiglu_bwd(gpu, &mut out.as_view_mut(), &dd.as_view(), &dgu.as_view(), t, i)?;
        // dgate has g * (1 - s), whose fp32 cancellation when s ~ 1 costs |g| * 2^-24
        // absolute: up to |dout| * |u| * |g| * 2^-23 in dgate.
        let tol = Tolerance { abs: max_abs(&dout) * scale * scale * 2f32.powi(-22), rel: 2.0 * BF16_EPS };
        rows.push(Row::new("swiglu_bwd dgate_up", format!("[{t},{i}] x{scale}"), tol, compare(&download_bf16(gpu, &out)?, &want, tol)));
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
        let mut rng = Rng::new(8);
        let (t, i) = (7, 45);
        let gate_up = rng.uniform_vec(t * 2 * i, 5.0);
        let r = rng.uniform_vec(t * i, 1.0);
        let loss = |gu: &[f32]| {
            let mut out = vec![0.0; t * i];
            swiglu_fwd_cpu(&mut out, gu, t, i);
            weighted_sum(&r, &out)
        };
        let mut dgu = vec![f32::NAN; t * 2 * i];
        swiglu_bwd_cpu(&mut dgu, &r, &gate_up, t, i);
        check_gradient("swiglu dgate_up", &gate_up, &dgu, loss, &mut rng, 4);
    }
}
