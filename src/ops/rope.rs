//! Rotary position embedding on the queries and keys of the fused gate/query/key/value
//! projection (SPEC §2), in place.
//!
//! A row of `gqkv [T, 4*NH*HD]` holds four column blocks of `NH*HD`: gate heads, query
//! heads, key heads, value heads (the row order of `W_gqkv`). The attention and the gate read
//! their heads straight from that buffer (rows `4*NH*HD` apart), so only the query and key
//! blocks change here. RoPE is the rotate-half form over the two halves of each 128-wide head:
//!
//! ```text
//! inv_freq[i] = theta^(-2i/128), i in 0..64;     a_i = pos * inv_freq[i]  (fp32)
//! out[i]      = x[i]      * cos(a_i) - x[i + 64] * sin(a_i)
//! out[i + 64] = x[i + 64] * cos(a_i) + x[i]      * sin(a_i)
//! ```
//!
//! The backward is the transpose of that rotation, i.e. the rotation by `-a_i`, applied in
//! place to the query and key blocks of `dgqkv` (the attention wrote d(rotated q, k) there).
//!
//! On the GPU (`cuda/rope.cu`) every buffer is bf16 except `pos` (i32); the rotation is fp32.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;
use rayon::prelude::*;

use crate::config::{HEAD_DIM, ROPE_THETA};
use crate::gpu::{DriverContext, Gpu, GpuError};
use crate::ops::attention::block_of;
use crate::ops::check::{bf16_inputs, download_bf16, upload, upload_bf16};
use crate::ops::compare::{compare, Tolerance, BF16_EPS};
use crate::ops::shape::{as_i32, expect_aligned16, expect_len};
use crate::rng::Rng;
use crate::selftest::{Check, Row};

const FAMILY: &str = "rope";
/// Most threads per block (one block per token row); `ROPE_THREADS` in `cuda/rope.cu`.
const MAX_THREADS: usize = 256;

const HALF: usize = HEAD_DIM / 2;

/// `inv_freq[i] = theta^(-2i/128)` rounded once to fp32, as PyTorch's fp32 table.
pub fn rope_inv_freq() -> [f32; HALF] {
    std::array::from_fn(|i| (1.0 / (ROPE_THETA as f64).powf(2.0 * i as f64 / HEAD_DIM as f64)) as f32)
}

/// `(cos a_i, sin a_i)` for one position, `a_i = pos * inv_freq[i]` in fp32.
fn rotation(pos: i32, inv_freq: &[f32; HALF]) -> [(f32, f32); HALF] {
    std::array::from_fn(|i| {
        let a = pos as f32 * inv_freq[i];
        (a.cos(), a.sin())
    })
}

/// Rotates each 128-wide head of `x` in place by `+a` (`sign = 1`) or `-a` (`sign = -1`).
fn rotate_heads(x: &mut [f32], rot: &[(f32, f32); HALF], sign: f32) {
    for head in x.chunks_mut(HEAD_DIM) {
        for (i, &(c, sn)) in rot.iter().enumerate() {
            let (x1, x2, sn) = (head[i], head[i + HALF], sign * sn);
            head[i] = x1 * c - x2 * sn;
            head[i + HALF] = x2 * c + x1 * sn;
        }
    }
}

/// Rotates the query and key blocks of every row of `x [T, 4*NH*HD]` by `sign * a`.
fn rotate_qk(op: &str, x: &mut [f32], pos: &[i32], t: usize, nh: usize, sign: f32) {
    let c = nh * HEAD_DIM;
    expect_len(op, "gqkv", x.len(), &[("T", t), ("4", 4), ("NH", nh), ("HD", HEAD_DIM)]);
    expect_len(op, "pos", pos.len(), &[("T", t)]);
    if c == 0 {
        return;
    }
    let inv_freq = rope_inv_freq();
    x.par_chunks_mut(4 * c).zip(pos.par_iter()).for_each(|(row, &p)| {
        let rot = rotation(p, &inv_freq);
        rotate_heads(&mut row[c..3 * c], &rot, sign);
    });
}

/// Rotates the query and key heads of `gqkv [T, 4*NH*HD]` in place by the positions
/// `pos [T]`; the gate and value blocks are left as they are.
pub fn qkv_rope_fwd_cpu(gqkv: &mut [f32], pos: &[i32], t: usize, nh: usize) {
    rotate_qk("qkv_rope_fwd_cpu", gqkv, pos, t, nh, 1.0);
}

/// The backward, in place: the query and key blocks of `dgqkv [T, 4*NH*HD]` hold the
/// gradients of the rotated heads on entry and those of the projection's on exit (the
/// inverse rotation); the gate and value blocks are left as they are.
pub fn qkv_rope_bwd_cpu(dgqkv: &mut [f32], pos: &[i32], t: usize, nh: usize) {
    rotate_qk("qkv_rope_bwd_cpu", dgqkv, pos, t, nh, -1.0);
}

/// GPU [`qkv_rope_fwd_cpu`]: gqkv [T, 4*NH*HD] bf16 (in place), pos: [T] i32.
pub fn qkv_rope_fwd(gpu: &Gpu, gqkv: &mut CudaViewMut<bf16>, pos: &CudaView<i32>, t: usize, nh: usize) -> Result<(), GpuError> {
    rotate_qk_gpu(gpu, "qkv_rope_fwd", gqkv, pos, t, nh)
}

/// GPU [`qkv_rope_bwd_cpu`]: dgqkv [T, 4*NH*HD] bf16 (in place), pos: [T] i32.
pub fn qkv_rope_bwd(gpu: &Gpu, dgqkv: &mut CudaViewMut<bf16>, pos: &CudaView<i32>, t: usize, nh: usize) -> Result<(), GpuError> {
    rotate_qk_gpu(gpu, "qkv_rope_bwd", dgqkv, pos, t, nh)
}

/// Launches kernel `op` of `cuda/rope.cu` over the rows of `x [T, 4*NH*HD]`.
fn rotate_qk_gpu(gpu: &Gpu, op: &str, x: &mut CudaViewMut<bf16>, pos: &CudaView<i32>, t: usize, nh: usize) -> Result<(), GpuError> {
    expect_len(op, "gqkv", x.len(), &[("T", t), ("4", 4), ("NH", nh), ("HD", HEAD_DIM)]);
    expect_len(op, "pos", pos.len(), &[("T", t)]);
    expect_aligned16(op, "gqkv", gpu, x);
    if t == 0 || nh == 0 {
        return Ok(());
    }
    as_i32(op, "4*NH*HD", 4 * nh * HEAD_DIM);
    let (t_i, nh_i) = (as_i32(op, "T", t), nh as i32);
    let func = gpu.function(FAMILY, op)?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(x).arg(pos).arg(&t_i).arg(&nh_i);
    // SAFETY: x has the [T, 4*NH*HD] length the kernel indexes (checked above) and is 16-byte
    // aligned; block `row` reads and writes only the query and key blocks of row `row`.
    unsafe { args.launch(row_config(t, nh)) }.during(op.to_string())?;
    Ok(())
}

/// One block per row, one thread per pair item (`2*NH*HD / 16` of them) rounded up to a warp,
/// at least the 64 that fill the (cos, sin) table.
fn row_config(t: usize, nh: usize) -> LaunchConfig {
    let threads = (nh * HEAD_DIM / 8).next_multiple_of(32).clamp(64, MAX_THREADS);
    LaunchConfig { grid_dim: (t as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }
}

pub fn selftests() -> Vec<Check> {
    vec![Check { name: "qkv_rope_fwd", run: check_fwd }, Check { name: "qkv_rope_bwd", run: check_bwd }]
}

/// (T, NH, input scale, largest position): odd token counts, 1 to 20 heads (XXL_wide),
/// positions up to the 4096 context.
const SHAPES: [(usize, usize, f32, i32); 4] = [(1, 1, 1.0, 1), (37, 2, 1000.0, 4095), (1023, 12, 1.0, 4095), (129, 20, 3.0, 40000)];

/// Tolerance of a rotated value: one bf16 rounding (2^-9, so 2^-7 leaves two ulps of slack)
/// plus, where x1 cos - x2 sin cancels, the error of sin/cos (the GPU's `rope_sincos` in
/// cuda/rope.cuh within ~4e-7 absolute, the CPU's f32 sin/cos within an ulp: together ~1.3e-6 *
/// |x| over the two terms) and of the products (~2^-23 * |x|): 2e-6 * scale.
fn rotation_tol(scale: f32) -> Tolerance {
    Tolerance { abs: 2e-6 * scale, rel: 2.0 * BF16_EPS }
}

fn positions(rng: &mut Rng, t: usize, max_pos: i32) -> Vec<i32> {
    (0..t).map(|_| rng.below(max_pos as u64 + 1) as i32).collect()
}

fn check_fwd(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    check_in_place(gpu, rng, "qkv_rope_fwd", qkv_rope_fwd_cpu, qkv_rope_fwd)
}

fn check_bwd(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    check_in_place(gpu, rng, "qkv_rope_bwd", qkv_rope_bwd_cpu, qkv_rope_bwd)
}

type CpuRotation = fn(&mut [f32], &[i32], usize, usize);
type GpuRotation = fn(&Gpu, &mut CudaViewMut<bf16>, &CudaView<i32>, usize, usize) -> Result<(), GpuError>;

/// The GPU rotation of a random `[T, 4*NH*HD]` buffer against the CPU one, per column block:
/// the gate and value blocks must come back bit for bit.
fn check_in_place(gpu: &Gpu, rng: &mut Rng, op: &str, cpu: CpuRotation, gpu_op: GpuRotation) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for (t, nh, scale, max_pos) in SHAPES {
        let c = nh * HEAD_DIM;
        let shape = format!("[{t},4x{nh}x128] x{scale} p<={max_pos}");
        let input = bf16_inputs(rng, t * 4 * c, scale);
        let pos = positions(rng, t, max_pos);
        let mut want = input.clone();
        cpu(&mut want, &pos, t, nh);

        let (mut x, dpos) = (upload_bf16(gpu, &input)?, upload(gpu, &pos)?);
        gpu_op(gpu, &mut x.as_view_mut(), &dpos.as_view(), t, nh)?;
        let got = download_bf16(gpu, &x)?;
        let exact = Tolerance { abs: 0.0, rel: 0.0 };
        for (block, name, tol) in [(0, "gate", exact), (1, "query", rotation_tol(scale)), (2, "key", rotation_tol(scale)), (3, "value", exact)] {
            rows.push(Row::new(format!("{op} {name}"), &shape, tol, compare(&block_of(&got, block, nh), &block_of(&want, block, nh), tol)));
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_gradient, weighted_sum};
    use crate::rng::Rng;

    #[test]
    fn position_zero_is_identity_and_rotation_matches_definition() {
        let mut rng = Rng::new(5);
        let (t, nh) = (3, 2);
        let c = nh * HEAD_DIM;
        let gqkv = rng.uniform_vec(t * 4 * c, 2.0);
        let pos = [0, 1, 4095];
        let mut out = gqkv.clone();
        qkv_rope_fwd_cpu(&mut out, &pos, t, nh);
        assert_eq!(&out[..4 * c], &gqkv[..4 * c], "position 0 rotates by nothing");
        for row in 0..t {
            let (g, v) = (row * 4 * c..row * 4 * c + c, row * 4 * c + 3 * c..(row + 1) * 4 * c);
            assert_eq!(&out[g.clone()], &gqkv[g], "the gate block is left as it is");
            assert_eq!(&out[v.clone()], &gqkv[v], "the value block is left as it is");
        }
        // Element 3 of head 1 of the key at position 4095, straight from the SPEC formula in f64.
        let (row, head, i) = (2, 1, 3);
        let a = (4095.0f32 * rope_inv_freq()[i]) as f64;
        let x = |j: usize| gqkv[row * 4 * c + 2 * c + head * HEAD_DIM + j] as f64;
        let want = x(i) * a.cos() - x(i + HALF) * a.sin();
        let got = out[row * 4 * c + 2 * c + head * HEAD_DIM + i] as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(6);
        let (t, nh) = (4, 2);
        let c = nh * HEAD_DIM;
        let gqkv = rng.uniform_vec(t * 4 * c, 1.0);
        let pos = [0, 7, 300, 2049];
        let r = rng.uniform_vec(t * 4 * c, 1.0);
        let loss = |x: &[f32]| {
            let mut out = x.to_vec();
            qkv_rope_fwd_cpu(&mut out, &pos, t, nh);
            weighted_sum(&r, &out)
        };
        let mut dgqkv = r.clone();
        qkv_rope_bwd_cpu(&mut dgqkv, &pos, t, nh);
        check_gradient("rope dgqkv", &gqkv, &dgqkv, loss, &mut rng, 4);
    }
}
