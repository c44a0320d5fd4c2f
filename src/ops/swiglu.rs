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

use rayon::prelude::*;

use crate::ops::shape::expect_len;

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
