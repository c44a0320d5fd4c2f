//! The sigmoid output gate of attention (SPEC §2): `y = sigmoid(g) * a`, `a` the attention's
//! output. On the GPU it is fused into the attention kernels (`ops::attention`): the
//! forward's epilogue writes `y` and never `a`, and the backward's preparation turns `dy` into
//! `da`, `dg` and the attention's `D`. This module is the CPU reference of both halves.
//!
//! ```text
//! forward    y  = s * a,                          s = sigmoid(g) = 1 / (1 + exp(-g))
//! backward   da = dy * s
//!            dg = dy * a * s * (1 - s) = dy * y * (1 - s)      from y: a is not kept
//!            D  = da . a = dy . y                             per row and head
//! ```
//!
//! Shapes: `[T, C]` with `C = NH * HD`; `g` is the gate block of the fused projection
//! `gqkv [T, 4C]` (its first `C` columns) and `dg` goes to the same block of `dgqkv` (the
//! other blocks are left as they are). `D` is `[T, NH]`, the input `attention_bwd_cpu` takes.

use rayon::prelude::*;

use crate::config::HEAD_DIM;
use crate::ops::shape::expect_len;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The gate block of each row of `x [T, 4C]`.
fn gate_blocks(x: &[f32], c: usize) -> impl IndexedParallelIterator<Item = &[f32]> {
    x.par_chunks(4 * c).map(move |row| &row[..c])
}

/// `y [T,C] = sigmoid(g) * a [T,C]`, `g` the gate block of `gqkv [T,4C]`, `C = NH * HD`.
pub fn gate_fwd_cpu(y: &mut [f32], gqkv: &[f32], a: &[f32], t: usize, nh: usize) {
    const OP: &str = "gate_fwd_cpu";
    let c = nh * HEAD_DIM;
    expect_len(OP, "y", y.len(), &[("T", t), ("C", c)]);
    expect_len(OP, "gqkv", gqkv.len(), &[("T", t), ("4", 4), ("C", c)]);
    expect_len(OP, "a", a.len(), &[("T", t), ("C", c)]);
    if c == 0 {
        return;
    }
    y.par_chunks_mut(c).zip(gate_blocks(gqkv, c)).zip(a.par_chunks(c)).for_each(|((y, g), a)| {
        for ((y, &g), &a) in y.iter_mut().zip(g).zip(a) {
            *y = sigmoid(g) * a;
        }
    });
}

/// The gate block of `dgqkv [T,4C]`, `da [T,C]` and `delta [T,NH]` (all written with `=`) from
/// `dy [T,C]`, the gate block of `gqkv [T,4C]` and the forward's output `y [T,C]`.
#[allow(clippy::too_many_arguments)]
pub fn gate_bwd_cpu(dgqkv: &mut [f32], da: &mut [f32], delta: &mut [f32], dy: &[f32], gqkv: &[f32], y: &[f32], t: usize, nh: usize) {
    const OP: &str = "gate_bwd_cpu";
    let c = nh * HEAD_DIM;
    for (name, len) in [("dgqkv", dgqkv.len()), ("gqkv", gqkv.len())] {
        expect_len(OP, name, len, &[("T", t), ("4", 4), ("C", c)]);
    }
    for (name, len) in [("da", da.len()), ("dy", dy.len()), ("y", y.len())] {
        expect_len(OP, name, len, &[("T", t), ("C", c)]);
    }
    expect_len(OP, "delta", delta.len(), &[("T", t), ("NH", nh)]);
    if c == 0 {
        return;
    }
    let dg = dgqkv.par_chunks_mut(4 * c).map(|row| &mut row[..c]);
    let outs = dg.zip(da.par_chunks_mut(c)).zip(delta.par_chunks_mut(nh));
    let ins = dy.par_chunks(c).zip(gate_blocks(gqkv, c)).zip(y.par_chunks(c));
    outs.zip(ins).for_each(|(((dg, da), delta), ((dy, g), y))| {
        for i in 0..c {
            let s = sigmoid(g[i]);
            da[i] = dy[i] * s;
            dg[i] = dy[i] * y[i] * (1.0 - s);
        }
        for (h, d) in delta.iter_mut().enumerate() {
            let r = h * HEAD_DIM..(h + 1) * HEAD_DIM;
            *d = dy[r.clone()].iter().zip(&y[r]).map(|(a, b)| a * b).sum();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_gradient, weighted_sum};
    use crate::rng::Rng;

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(7);
        let (t, nh) = (3, 2);
        let c = nh * HEAD_DIM;
        let gqkv = rng.uniform_vec(t * 4 * c, 4.0);
        let a = rng.uniform_vec(t * c, 2.0);
        let r = rng.uniform_vec(t * c, 1.0);
        let loss = |gqkv: &[f32], a: &[f32]| {
            let mut y = vec![0.0; t * c];
            gate_fwd_cpu(&mut y, gqkv, a, t, nh);
            weighted_sum(&r, &y)
        };
        let mut y = vec![0.0; t * c];
        gate_fwd_cpu(&mut y, &gqkv, &a, t, nh);
        // The blocks the gate does not read have zero gradient: dgqkv starts at 0 there.
        let (mut dgqkv, mut da, mut delta) = (vec![0.0; t * 4 * c], vec![f32::NAN; t * c], vec![f32::NAN; t * nh]);
        gate_bwd_cpu(&mut dgqkv, &mut da, &mut delta, &r, &gqkv, &y, t, nh);
        check_gradient("gate dgqkv", &gqkv, &dgqkv, |g| loss(g, &a), &mut rng, 8);
        check_gradient("gate da", &a, &da, |a| loss(&gqkv, a), &mut rng, 4);
        // D = da . a per row and head, as the attention backward defines it from its own o.
        for (row, d) in delta.chunks(nh).enumerate() {
            for (h, &d) in d.iter().enumerate() {
                let at = row * c + h * HEAD_DIM;
                let want: f32 = (0..HEAD_DIM).map(|i| da[at + i] * a[at + i]).sum();
                assert!((d - want).abs() <= 1e-4 * (1.0 + want.abs()), "D[{row}, {h}] = {d}, da . a = {want}");
            }
        }
    }

    #[test]
    fn saturates_without_nan() {
        let c = HEAD_DIM;
        let mut gqkv = vec![0.0; 4 * c];
        (gqkv[0], gqkv[1]) = (-200.0, 200.0);
        let mut y = vec![f32::NAN; c];
        gate_fwd_cpu(&mut y, &gqkv, &vec![3.0; c], 1, 1);
        assert_eq!(y[..2], [0.0, 3.0]);
    }
}
