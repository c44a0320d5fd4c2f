//! Splitting the fused gate/query/key/value projection into heads, with rotary position
//! embedding on the queries and keys (SPEC §2).
//!
//! A row of `gqkv [T, 4*NH*HD]` holds four column blocks of `NH*HD`: gate heads, query
//! heads, key heads, value heads (the row order of `W_gqkv`). RoPE is the rotate-half form
//! over the two halves of each 128-wide head:
//!
//! ```text
//! inv_freq[i] = theta^(-2i/128), i in 0..64;     a_i = pos * inv_freq[i]  (fp32)
//! out[i]      = x[i]      * cos(a_i) - x[i + 64] * sin(a_i)
//! out[i + 64] = x[i + 64] * cos(a_i) + x[i]      * sin(a_i)
//! ```
//!
//! The backward is the transpose of that rotation, i.e. the rotation by `-a_i`; the gate
//! and value blocks are plain copies both ways.
//!
//! On the GPU (`cuda/rope.cu`) every buffer is bf16 except `pos` (i32); the rotation is fp32.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::bf16;
use rayon::prelude::*;

use crate::config::{HEAD_DIM, ROPE_THETA};
use crate::gpu::{DriverContext, Gpu, GpuError};
use crate::ops::check::{bf16_inputs, download_bf16, poisoned_bf16, upload, upload_bf16};
use crate::ops::compare::{compare, Tolerance, BF16_EPS};
use crate::ops::shape::{as_i32, expect_aligned16, expect_len};
use crate::rng::Rng;
use crate::selftest::{Check, Row};

const FAMILY: &str = "rope";
/// Threads per block (one block per token row); `ROPE_THREADS` in `cuda/rope.cu`.
const THREADS: u32 = 128;

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

/// Rotates each 128-wide head of `src` into `dst` by `+a` (`sign = 1`) or `-a` (`sign = -1`).
fn rotate_heads(dst: &mut [f32], src: &[f32], rot: &[(f32, f32); HALF], sign: f32) {
    for (d, s) in dst.chunks_mut(HEAD_DIM).zip(src.chunks(HEAD_DIM)) {
        for (i, &(c, sn)) in rot.iter().enumerate() {
            let (x1, x2, sn) = (s[i], s[i + HALF], sign * sn);
            d[i] = x1 * c - x2 * sn;
            d[i + HALF] = x2 * c + x1 * sn;
        }
    }
}

/// Splits `gqkv [T, 4*NH*HD]` into `g [T, NH*HD]`, `q`, `k`, `v` (each `[T, NH, HD]`) and
/// rotates `q` and `k` by the positions `pos [T]`.
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope_fwd_cpu(g: &mut [f32], q: &mut [f32], k: &mut [f32], v: &mut [f32], gqkv: &[f32], pos: &[i32], t: usize, nh: usize) {
    const OP: &str = "qkv_rope_fwd_cpu";
    let c = nh * HEAD_DIM;
    for (name, buf) in [("g", &*g), ("q", &*q), ("k", &*k), ("v", &*v)] {
        expect_len(OP, name, buf.len(), &[("T", t), ("NH", nh), ("HD", HEAD_DIM)]);
    }
    expect_len(OP, "gqkv", gqkv.len(), &[("T", t), ("4", 4), ("NH", nh), ("HD", HEAD_DIM)]);
    expect_len(OP, "pos", pos.len(), &[("T", t)]);
    if c == 0 {
        return;
    }
    let inv_freq = rope_inv_freq();
    let rows = g.par_chunks_mut(c).zip(q.par_chunks_mut(c)).zip(k.par_chunks_mut(c)).zip(v.par_chunks_mut(c));
    rows.zip(gqkv.par_chunks(4 * c)).zip(pos.par_iter()).for_each(|(((((g, q), k), v), src), &p)| {
        let rot = rotation(p, &inv_freq);
        g.copy_from_slice(&src[..c]);
        rotate_heads(q, &src[c..2 * c], &rot, 1.0);
        rotate_heads(k, &src[2 * c..3 * c], &rot, 1.0);
        v.copy_from_slice(&src[3 * c..]);
    });
}

/// `dgqkv [T, 4*NH*HD]` from `dg [T, NH*HD]`, `dq`, `dk`, `dv` (each `[T, NH, HD]`): the
/// inverse rotation for `dq`, `dk`, copies for `dg`, `dv` (written with `=`).
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope_bwd_cpu(dgqkv: &mut [f32], dg: &[f32], dq: &[f32], dk: &[f32], dv: &[f32], pos: &[i32], t: usize, nh: usize) {
    const OP: &str = "qkv_rope_bwd_cpu";
    let c = nh * HEAD_DIM;
    expect_len(OP, "dgqkv", dgqkv.len(), &[("T", t), ("4", 4), ("NH", nh), ("HD", HEAD_DIM)]);
    for (name, buf) in [("dg", dg), ("dq", dq), ("dk", dk), ("dv", dv)] {
        expect_len(OP, name, buf.len(), &[("T", t), ("NH", nh), ("HD", HEAD_DIM)]);
    }
    expect_len(OP, "pos", pos.len(), &[("T", t)]);
    if c == 0 {
        return;
    }
    let inv_freq = rope_inv_freq();
    dgqkv.par_chunks_mut(4 * c).enumerate().for_each(|(row, dst)| {
        let rot = rotation(pos[row], &inv_freq);
        let src = row * c..(row + 1) * c;
        let (dst_g, rest) = dst.split_at_mut(c);
        let (dst_q, rest) = rest.split_at_mut(c);
        let (dst_k, dst_v) = rest.split_at_mut(c);
        dst_g.copy_from_slice(&dg[src.clone()]);
        rotate_heads(dst_q, &dq[src.clone()], &rot, -1.0);
        rotate_heads(dst_k, &dk[src.clone()], &rot, -1.0);
        dst_v.copy_from_slice(&dv[src]);
    });
}

/// GPU [`qkv_rope_fwd_cpu`]. g: [T, NH*HD], q, k, v: [T, NH, HD], gqkv: [T, 4*NH*HD] (bf16),
/// pos: [T] i32.
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope_fwd(
    gpu: &Gpu,
    g: &mut CudaViewMut<bf16>,
    q: &mut CudaViewMut<bf16>,
    k: &mut CudaViewMut<bf16>,
    v: &mut CudaViewMut<bf16>,
    gqkv: &CudaView<bf16>,
    pos: &CudaView<i32>,
    t: usize,
    nh: usize,
) -> Result<(), GpuError> {
    const OP: &str = "qkv_rope_fwd";
    for (name, len) in [("g", g.len()), ("q", q.len()), ("k", k.len()), ("v", v.len())] {
        expect_len(OP, name, len, &[("T", t), ("NH", nh), ("HD", HEAD_DIM)]);
    }
    expect_len(OP, "gqkv", gqkv.len(), &[("T", t), ("4", 4), ("NH", nh), ("HD", HEAD_DIM)]);
    expect_len(OP, "pos", pos.len(), &[("T", t)]);
    expect_aligned16(OP, "g", gpu, g);
    expect_aligned16(OP, "q", gpu, q);
    expect_aligned16(OP, "k", gpu, k);
    expect_aligned16(OP, "v", gpu, v);
    expect_aligned16(OP, "gqkv", gpu, gqkv);
    if t == 0 || nh == 0 {
        return Ok(());
    }
    as_i32(OP, "4*NH*HD", 4 * nh * HEAD_DIM);
    let (t_i, nh_i) = (as_i32(OP, "T", t), nh as i32);
    let func = gpu.function(FAMILY, OP)?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(g).arg(q).arg(k).arg(v).arg(gqkv).arg(pos).arg(&t_i).arg(&nh_i);
    // SAFETY: every buffer has the [T, ...] length the kernel indexes (checked above) and is
    // 16-byte aligned; block `row` reads and writes only row `row` of each.
    unsafe { args.launch(row_config(t)) }.during(OP)?;
    Ok(())
}

/// GPU [`qkv_rope_bwd_cpu`]. dgqkv: [T, 4*NH*HD], dg: [T, NH*HD], dq, dk, dv: [T, NH, HD]
/// (bf16), pos: [T] i32.
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope_bwd(
    gpu: &Gpu,
    dgqkv: &mut CudaViewMut<bf16>,
    dg: &CudaView<bf16>,
    dq: &CudaView<bf16>,
    dk: &CudaView<bf16>,
    dv: &CudaView<bf16>,
    pos: &CudaView<i32>,
    t: usize,
    nh: usize,
) -> Result<(), GpuError> {
    const OP: &str = "qkv_rope_bwd";
    expect_len(OP, "dgqkv", dgqkv.len(), &[("T", t), ("4", 4), ("NH", nh), ("HD", HEAD_DIM)]);
    for (name, buf) in [("dg", dg), ("dq", dq), ("dk", dk), ("dv", dv)] {
        expect_len(OP, name, buf.len(), &[("T", t), ("NH", nh), ("HD", HEAD_DIM)]);
        expect_aligned16(OP, name, gpu, buf);
    }
    expect_len(OP, "pos", pos.len(), &[("T", t)]);
    expect_aligned16(OP, "dgqkv", gpu, dgqkv);
    if t == 0 || nh == 0 {
        return Ok(());
    }
    as_i32(OP, "4*NH*HD", 4 * nh * HEAD_DIM);
    let (t_i, nh_i) = (as_i32(OP, "T", t), nh as i32);
    let func = gpu.function(FAMILY, OP)?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(dgqkv).arg(dg).arg(dq).arg(dk).arg(dv).arg(pos).arg(&t_i).arg(&nh_i);
    // SAFETY: as in qkv_rope_fwd, with the roles of the split and fused buffers swapped.
    unsafe { args.launch(row_config(t)) }.during(OP)?;
    Ok(())
}

fn row_config(t: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (t as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

pub fn selftests() -> Vec<Check> {
    vec![Check { name: "qkv_rope_fwd", run: check_fwd }, Check { name: "qkv_rope_bwd", run: check_bwd }]
}

/// (T, NH, input scale, largest position): odd token counts, 1 to 20 heads (XXL_wide),
/// positions up to the 4096 context.
const SHAPES: [(usize, usize, f32, i32); 4] = [(1, 1, 1.0, 1), (37, 2, 1000.0, 4095), (1023, 12, 1.0, 4095), (129, 20, 3.0, 40000)];

/// Tolerance of a rotated value: one bf16 rounding (2^-9, so 2^-7 leaves two ulps of slack)
/// plus, where x1 cos - x2 sin cancels, the fp32 error of sin/cos (CUDA's sincosf and the
/// CPU's are each within 2 ulps: 2 * 2.4e-7 * |x|) and of the products (~2^-23 * |x|):
/// 2e-6 * scale leaves a factor ~3.
fn rotation_tol(scale: f32) -> Tolerance {
    Tolerance { abs: 2e-6 * scale, rel: 2.0 * BF16_EPS }
}

fn positions(rng: &mut Rng, t: usize, max_pos: i32) -> Vec<i32> {
    (0..t).map(|_| rng.below(max_pos as u64 + 1) as i32).collect()
}

fn check_fwd(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for (t, nh, scale, max_pos) in SHAPES {
        let c = nh * HEAD_DIM;
        let shape = format!("[{t},{nh}x128] x{scale} p<={max_pos}");
        let gqkv = bf16_inputs(rng, t * 4 * c, scale);
        let pos = positions(rng, t, max_pos);
        let mut want = [vec![0.0; t * c], vec![0.0; t * c], vec![0.0; t * c], vec![0.0; t * c]];
        let [g, q, k, v] = &mut want;
        qkv_rope_fwd_cpu(g, q, k, v, &gqkv, &pos, t, nh);

        let (dgqkv, dpos) = (upload_bf16(gpu, &gqkv)?, upload(gpu, &pos)?);
        let mut out = [poisoned_bf16(gpu, t * c)?, poisoned_bf16(gpu, t * c)?, poisoned_bf16(gpu, t * c)?, poisoned_bf16(gpu, t * c)?];
        let [g, q, k, v] = &mut out;
        qkv_rope_fwd(gpu, &mut g.as_view_mut(), &mut q.as_view_mut(), &mut k.as_view_mut(), &mut v.as_view_mut(), &dgqkv.as_view(), &dpos.as_view(), t, nh)?;
        // Gate and value are copies: exact.
        let exact = Tolerance { abs: 0.0, rel: 0.0 };
        let tols = [exact, rotation_tol(scale), rotation_tol(scale), exact];
        for (i, name) in ["qkv_rope_fwd g", "qkv_rope_fwd q", "qkv_rope_fwd k", "qkv_rope_fwd v"].into_iter().enumerate() {
            rows.push(Row::new(name, &shape, tols[i], compare(&download_bf16(gpu, &out[i])?, &want[i], tols[i])));
        }
    }
    Ok(rows)
}

fn check_bwd(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for (t, nh, scale, max_pos) in SHAPES {
        let c = nh * HEAD_DIM;
        let shape = format!("[{t},{nh}x128] x{scale} p<={max_pos}");
        let grads: Vec<Vec<f32>> = (0..4).map(|_| bf16_inputs(rng, t * c, scale)).collect();
        let pos = positions(rng, t, max_pos);
        let mut want = vec![0.0; t * 4 * c];
        qkv_rope_bwd_cpu(&mut want, &grads[0], &grads[1], &grads[2], &grads[3], &pos, t, nh);

        let d: Vec<_> = grads.iter().map(|g| upload_bf16(gpu, g)).collect::<Result<_, _>>()?;
        let dpos = upload(gpu, &pos)?;
        let mut out = poisoned_bf16(gpu, t * 4 * c)?;
        qkv_rope_bwd(gpu, &mut out.as_view_mut(), &d[0].as_view(), &d[1].as_view(), &d[2].as_view(), &d[3].as_view(), &dpos.as_view(), t, nh)?;
        let tol = rotation_tol(scale);
        rows.push(Row::new("qkv_rope_bwd dgqkv", &shape, tol, compare(&download_bf16(gpu, &out)?, &want, tol)));
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
        let mut out = [vec![f32::NAN; t * c], vec![f32::NAN; t * c], vec![f32::NAN; t * c], vec![f32::NAN; t * c]];
        let [g, q, k, v] = &mut out;
        qkv_rope_fwd_cpu(g, q, k, v, &gqkv, &pos, t, nh);
        assert_eq!(&q[..c], &gqkv[c..2 * c], "position 0 rotates by nothing");
        assert_eq!(&g[c..2 * c], &gqkv[4 * c..5 * c]);
        assert_eq!(&v[2 * c..], &gqkv[2 * 4 * c + 3 * c..]);
        // Element 3 of head 1 of the key at position 4095, straight from the SPEC formula in f64.
        let (row, head, i) = (2, 1, 3);
        let a = (4095.0f32 * rope_inv_freq()[i]) as f64;
        let x = |j: usize| gqkv[row * 4 * c + 2 * c + head * HEAD_DIM + j] as f64;
        let want = x(i) * a.cos() - x(i + HALF) * a.sin();
        let got = k[row * c + head * HEAD_DIM + i] as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(6);
        let (t, nh) = (4, 2);
        let c = nh * HEAD_DIM;
        let gqkv = rng.uniform_vec(t * 4 * c, 1.0);
        let pos = [0, 7, 300, 2049];
        let r: Vec<Vec<f32>> = (0..4).map(|_| rng.uniform_vec(t * c, 1.0)).collect();
        let loss = |x: &[f32]| {
            let mut out = [vec![0.0; t * c], vec![0.0; t * c], vec![0.0; t * c], vec![0.0; t * c]];
            let [g, q, k, v] = &mut out;
            qkv_rope_fwd_cpu(g, q, k, v, x, &pos, t, nh);
            out.iter().zip(&r).map(|(o, r)| weighted_sum(r, o)).sum()
        };
        let mut dgqkv = vec![f32::NAN; t * 4 * c];
        qkv_rope_bwd_cpu(&mut dgqkv, &r[0], &r[1], &r[2], &r[3], &pos, t, nh);
        check_gradient("rope dgqkv", &gqkv, &dgqkv, loss, &mut rng, 4);
    }
}
