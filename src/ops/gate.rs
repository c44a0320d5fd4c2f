//! The sigmoid output gate of attention (SPEC §2): `out = sigmoid(g) * a`.
//!
//! ```text
//! forward    out = s * a,            s = sigmoid(g) = 1 / (1 + exp(-g))
//! backward   da  = dout * s
//!            dg  = dout * a * s * (1 - s)
//! ```
//!
//! Elementwise over `[T, C]` values, `C = NH * HD`; `g` is the gate block of the fused
//! projection `gqkv [T, 4C]` (its first `C` columns, rows `4C` apart, read in place), and `dg`
//! goes to the same block of `dgqkv` (the other blocks are left as they are). Both gradients
//! are written with `=`. On the GPU (`cuda/gate.cu`) every buffer is bf16 and the math fp32.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;
use rayon::prelude::*;

use crate::gpu::{DriverContext, Gpu, GpuError};
use crate::ops::check::{bf16_inputs, download_bf16, max_abs, poisoned_bf16, upload_bf16};
use crate::ops::compare::{compare, Tolerance, BF16_EPS};
use crate::config::HEAD_DIM;
use crate::ops::shape::{as_i32, expect_aligned16, expect_len};
use crate::rng::Rng;
use crate::selftest::{Check, Row};

const FAMILY: &str = "gate";
const THREADS: u32 = 256;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The gate block of each row of `x [T, 4C]`.
fn gate_blocks(x: &[f32], c: usize) -> impl IndexedParallelIterator<Item = &[f32]> {
    x.par_chunks(4 * c).map(move |row| &row[..c])
}

/// `out [T,C] = sigmoid(g) * a [T,C]`, `g` the gate block of `gqkv [T,4C]`, `C = NH * HD`.
pub fn gate_fwd_cpu(out: &mut [f32], gqkv: &[f32], a: &[f32], t: usize, nh: usize) {
    const OP: &str = "gate_fwd_cpu";
    let c = nh * HEAD_DIM;
    expect_len(OP, "out", out.len(), &[("T", t), ("C", c)]);
    expect_len(OP, "gqkv", gqkv.len(), &[("T", t), ("4", 4), ("C", c)]);
    expect_len(OP, "a", a.len(), &[("T", t), ("C", c)]);
    if c == 0 {
        return;
    }
    out.par_chunks_mut(c).zip(gate_blocks(gqkv, c)).zip(a.par_chunks(c)).for_each(|((o, g), a)| {
        for ((o, &g), &a) in o.iter_mut().zip(g).zip(a) {
            *o = sigmoid(g) * a;
        }
    });
}

/// The gate block of `dgqkv [T,4C]` and `da [T,C]` (written with `=`) from `dout [T,C]` and
/// the forward inputs: `g`, the gate block of `gqkv [T,4C]`, and `a [T,C]`.
pub fn gate_bwd_cpu(dgqkv: &mut [f32], da: &mut [f32], dout: &[f32], gqkv: &[f32], a: &[f32], t: usize, nh: usize) {
    const OP: &str = "gate_bwd_cpu";
    let c = nh * HEAD_DIM;
    for (name, len) in [("dgqkv", dgqkv.len()), ("gqkv", gqkv.len())] {
        expect_len(OP, name, len, &[("T", t), ("4", 4), ("C", c)]);
    }
    for (name, len) in [("da", da.len()), ("dout", dout.len()), ("a", a.len())] {
        expect_len(OP, name, len, &[("T", t), ("C", c)]);
    }
    if c == 0 {
        return;
    }
    let dg = dgqkv.par_chunks_mut(4 * c).map(|row| &mut row[..c]);
    dg.zip(da.par_chunks_mut(c)).zip(dout.par_chunks(c).zip(gate_blocks(gqkv, c)).zip(a.par_chunks(c))).for_each(|((dg, da), ((dout, g), a))| {
        for i in 0..c {
            let s = sigmoid(g[i]);
            da[i] = dout[i] * s;
            dg[i] = dout[i] * a[i] * s * (1.0 - s);
        }
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

/// GPU [`gate_fwd_cpu`]. out, a: [T,C], gqkv: [T,4C] bf16 (its gate block is read).
pub fn gate_fwd(gpu: &Gpu, out: &mut CudaViewMut<bf16>, gqkv: &CudaView<bf16>, a: &CudaView<bf16>, t: usize, nh: usize) -> Result<(), GpuError> {
    const OP: &str = "gate_fwd";
    let c = nh * HEAD_DIM;
    expect_len(OP, "out", out.len(), &[("T", t), ("C", c)]);
    expect_len(OP, "gqkv", gqkv.len(), &[("T", t), ("4", 4), ("C", c)]);
    expect_len(OP, "a", a.len(), &[("T", t), ("C", c)]);
    expect_aligned16(OP, "out", gpu, out);
    expect_aligned16(OP, "gqkv", gpu, gqkv);
    expect_aligned16(OP, "a", gpu, a);
    if t * c == 0 {
        return Ok(());
    }
    let (t_i, c_i) = (t as i64, as_i32(OP, "C", c));
    as_i32(OP, "T*C/8", t * c / 8);
    let func = gpu.function(FAMILY, OP)?;
    let cfg = elementwise_config(t * c, GATE_FWD_UNROLL);
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(out).arg(gqkv).arg(a).arg(&t_i).arg(&c_i);
    // SAFETY: out and a hold T*C bf16, gqkv T*4C (checked above), all 16-byte aligned; the
    // kernel touches rows < T only, columns < C of each.
    unsafe { args.launch(cfg) }.during(OP)?;
    Ok(())
}

/// GPU [`gate_bwd_cpu`]. dgqkv, gqkv: [T,4C] bf16 (gate blocks written / read); da, dout, a:
/// [T,C] bf16.
#[allow(clippy::too_many_arguments)]
pub fn gate_bwd(gpu: &Gpu, dgqkv: &mut CudaViewMut<bf16>, da: &mut CudaViewMut<bf16>, dout: &CudaView<bf16>, gqkv: &CudaView<bf16>, a: &CudaView<bf16>, t: usize, nh: usize) -> Result<(), GpuError> {
    const OP: &str = "gate_bwd";
    let c = nh * HEAD_DIM;
    for (name, len) in [("dgqkv", dgqkv.len()), ("gqkv", gqkv.len())] {
        expect_len(OP, name, len, &[("T", t), ("4", 4), ("C", c)]);
    }
    for (name, len) in [("da", da.len()), ("dout", dout.len()), ("a", a.len())] {
        expect_len(OP, name, len, &[("T", t), ("C", c)]);
    }
    expect_aligned16(OP, "dgqkv", gpu, dgqkv);
    expect_aligned16(OP, "da", gpu, da);
    expect_aligned16(OP, "dout", gpu, dout);
    expect_aligned16(OP, "gqkv", gpu, gqkv);
    expect_aligned16(OP, "a", gpu, a);
    if t * c == 0 {
        return Ok(());
    }
    let (t_i, c_i) = (t as i64, as_i32(OP, "C", c));
    as_i32(OP, "T*C/8", t * c / 8);
    let func = gpu.function(FAMILY, OP)?;
    let cfg = elementwise_config(t * c, GATE_BWD_UNROLL);
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(dgqkv).arg(da).arg(dout).arg(gqkv).arg(a).arg(&t_i).arg(&c_i);
    // SAFETY: as in gate_fwd; the kernel writes only the gate blocks of dgqkv and all of da.
    unsafe { args.launch(cfg) }.during(OP)?;
    Ok(())
}

pub fn selftests() -> Vec<Check> {
    vec![Check { name: "gate_fwd", run: check_fwd }, Check { name: "gate_bwd", run: check_bwd }]
}

/// (T, NH, input scale): one head, a row count that leaves a partial last tile, XL-sized
/// [2049, 12 x 128], large inputs that saturate the sigmoid.
const SHAPES: [(usize, usize, f32); 4] = [(1, 1, 1.0), (1001, 2, 4.0), (2049, 12, 8.0), (33, 3, 1000.0)];

/// The gate blocks of `x [T, 4C]`, gathered into `[T, C]`.
fn gate_part(x: &[f32], c: usize) -> Vec<f32> {
    x.chunks(4 * c).flat_map(|row| row[..c].to_vec()).collect()
}

/// The other three blocks of `x [T, 4C]`, gathered into `[T, 3C]`.
fn other_parts(x: &[f32], c: usize) -> Vec<f32> {
    x.chunks(4 * c).flat_map(|row| row[c..].to_vec()).collect()
}

fn check_fwd(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for (t, nh, scale) in SHAPES {
        let c = nh * HEAD_DIM;
        let (gqkv, a) = (bf16_inputs(rng, t * 4 * c, scale), bf16_inputs(rng, t * c, scale));
        let mut want = vec![0.0; t * c];
        gate_fwd_cpu(&mut want, &gqkv, &a, t, nh);
        let (dg, da) = (upload_bf16(gpu, &gqkv)?, upload_bf16(gpu, &a)?);
        let mut out = poisoned_bf16(gpu, t * c)?;
        gate_fwd(gpu, &mut out.as_view_mut(), &dg.as_view(), &da.as_view(), t, nh)?;
        // One bf16 rounding (2^-9) of an fp32 product whose expf is within 2 ulps: 2^-7.
        let tol = Tolerance { abs: 1e-30, rel: 2.0 * BF16_EPS };
        rows.push(Row::new("gate_fwd out", format!("[{t},{nh}x128] x{scale}"), tol, compare(&download_bf16(gpu, &out)?, &want, tol)));
    }
    Ok(rows)
}

fn check_bwd(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for (t, nh, scale) in SHAPES {
        let c = nh * HEAD_DIM;
        let (gqkv, a, dout) = (bf16_inputs(rng, t * 4 * c, scale), bf16_inputs(rng, t * c, scale), bf16_inputs(rng, t * c, 1.0));
        // dgqkv's other blocks hold what the attention's backward wrote there: kept as they are.
        let dgqkv_before = bf16_inputs(rng, t * 4 * c, 1.0);
        let (mut dgqkv_want, mut da_want) = (dgqkv_before.clone(), vec![0.0; t * c]);
        gate_bwd_cpu(&mut dgqkv_want, &mut da_want, &dout, &gqkv, &a, t, nh);
        let (dd, dgi, dai) = (upload_bf16(gpu, &dout)?, upload_bf16(gpu, &gqkv)?, upload_bf16(gpu, &a)?);
        let (mut dgqkv, mut da) = (upload_bf16(gpu, &dgqkv_before)?, poisoned_bf16(gpu, t * c)?);
        gate_bwd(gpu, &mut dgqkv.as_view_mut(), &mut da.as_view_mut(), &dd.as_view(), &dgi.as_view(), &dai.as_view(), t, nh)?;
        let shape = format!("[{t},{nh}x128] x{scale}");
        let da_tol = Tolerance { abs: 1e-30, rel: 2.0 * BF16_EPS };
        // s * (1 - s) cancels when s ~ 1: the fp32 error of 1 - s is 2^-24 absolute, so dg
        // carries up to |dout * a| * 2^-23 absolute error.
        let dg_tol = Tolerance { abs: max_abs(&dout) * max_abs(&a) * 2f32.powi(-22), rel: 2.0 * BF16_EPS };
        let exact = Tolerance { abs: 0.0, rel: 0.0 };
        let got = download_bf16(gpu, &dgqkv)?;
        rows.push(Row::new("gate_bwd dg", &shape, dg_tol, compare(&gate_part(&got, c), &gate_part(&dgqkv_want, c), dg_tol)));
        rows.push(Row::new("gate_bwd dgqkv q, k, v untouched", &shape, exact, compare(&other_parts(&got, c), &other_parts(&dgqkv_before, c), exact)));
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
        let (t, nh) = (3, 1);
        let c = nh * HEAD_DIM;
        let gqkv = rng.uniform_vec(t * 4 * c, 4.0);
        let a = rng.uniform_vec(t * c, 2.0);
        let r = rng.uniform_vec(t * c, 1.0);
        let loss = |gqkv: &[f32], a: &[f32]| {
            let mut out = vec![0.0; t * c];
            gate_fwd_cpu(&mut out, gqkv, a, t, nh);
            weighted_sum(&r, &out)
        };
        // The blocks the gate does not read have zero gradient: dgqkv starts at 0 there.
        let (mut dgqkv, mut da) = (vec![0.0; t * 4 * c], vec![f32::NAN; t * c]);
        gate_bwd_cpu(&mut dgqkv, &mut da, &r, &gqkv, &a, t, nh);
        check_gradient("gate dgqkv", &gqkv, &dgqkv, |g| loss(g, &a), &mut rng, 8);
        check_gradient("gate da", &a, &da, |a| loss(&gqkv, a), &mut rng, 4);
    }

    #[test]
    fn saturates_without_nan() {
        let c = HEAD_DIM;
        let mut gqkv = vec![0.0; 4 * c];
        (gqkv[0], gqkv[1]) = (-200.0, 200.0);
        let mut out = vec![f32::NAN; c];
        gate_fwd_cpu(&mut out, &gqkv, &vec![3.0; c], 1, 1);
        assert_eq!(out[..2], [0.0, 3.0]);
    }
}
