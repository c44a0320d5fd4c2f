//! The sigmoid output gate of attention (SPEC §2): `out = sigmoid(g) * a`.
//!
//! ```text
//! forward    out = s * a,            s = sigmoid(g) = 1 / (1 + exp(-g))
//! backward   da  = dout * s
//!            dg  = dout * a * s * (1 - s)
//! ```
//!
//! Elementwise over `n = T * NH * HD` values; both gradients are written with `=`.

use rayon::prelude::*;

use crate::ops::shape::expect_len;

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
