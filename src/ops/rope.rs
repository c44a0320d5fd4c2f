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

use rayon::prelude::*;

use crate::config::{HEAD_DIM, ROPE_THETA};
use crate::ops::shape::expect_len;

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
