//! The scaled token embedding (SPEC §3): `out[t] = w[tokens[t]] * scale`, `scale = sqrt(D)`.
//!
//! ```text
//! forward    out [T,D]   = w[tokens] * scale
//! backward   dw  [V,D]  += scatter-add of dout * scale by token id   (parameter gradient: +=)
//! ```
//!
//! The backward sums the rows of a repeated token in increasing `t` order, so the result
//! is the same on every run.

use rayon::prelude::*;

use crate::ops::shape::expect_len;

/// Panics with the offending position unless every token id is in `0..v`.
#[track_caller]
fn expect_tokens_in_range(op: &str, tokens: &[i32], v: usize) {
    if let Some((t, id)) = tokens.iter().enumerate().find(|(_, &id)| id < 0 || id as usize >= v) {
        panic!("{op}: tokens[{t}] = {id} is outside the vocabulary 0..{v}");
    }
}

/// `out [T,D] = w [V,D][tokens [T]] * scale`; `V` is `w.len() / d`.
pub fn embedding_fwd_cpu(out: &mut [f32], tokens: &[i32], w: &[f32], t: usize, d: usize, scale: f32) {
    const OP: &str = "embedding_fwd_cpu";
    expect_len(OP, "out", out.len(), &[("T", t), ("D", d)]);
    expect_len(OP, "tokens", tokens.len(), &[("T", t)]);
    if d == 0 {
        return;
    }
    assert_eq!(w.len() % d, 0, "{OP}: `w` has {} elements, not a multiple of D={d}", w.len());
    expect_tokens_in_range(OP, tokens, w.len() / d);
    out.par_chunks_mut(d).zip(tokens.par_iter()).for_each(|(row, &id)| {
        let src = &w[id as usize * d..(id as usize + 1) * d];
        row.iter_mut().zip(src).for_each(|(o, &x)| *o = x * scale);
    });
}

/// `dw [V,D] += dout [T,D] * scale`, row `tokens[t]` for each `t` in increasing order.
pub fn embedding_bwd_cpu(dw: &mut [f32], dout: &[f32], tokens: &[i32], t: usize, d: usize, scale: f32) {
    const OP: &str = "embedding_bwd_cpu";
    expect_len(OP, "dout", dout.len(), &[("T", t), ("D", d)]);
    expect_len(OP, "tokens", tokens.len(), &[("T", t)]);
    if d == 0 {
        return;
    }
    assert_eq!(dw.len() % d, 0, "{OP}: `dw` has {} elements, not a multiple of D={d}", dw.len());
    expect_tokens_in_range(OP, tokens, dw.len() / d);
    for (row, &id) in dout.chunks(d).zip(tokens) {
        let dst = &mut dw[id as usize * d..(id as usize + 1) * d];
        dst.iter_mut().zip(row).for_each(|(g, &x)| *g += x * scale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_gradient, weighted_sum};
    use crate::rng::Rng;

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(9);
        let (t, d, v) = (19, 13, 11);
        // Repeated ids (19 tokens over 11 rows) exercise the accumulation.
        let tokens: Vec<i32> = (0..t).map(|_| rng.below(v as u64) as i32).collect();
        let w = rng.uniform_vec(v * d, 1.0);
        let r = rng.uniform_vec(t * d, 1.0);
        let scale = (d as f32).sqrt();
        let loss = |w: &[f32]| {
            let mut out = vec![0.0; t * d];
            embedding_fwd_cpu(&mut out, &tokens, w, t, d, scale);
            weighted_sum(&r, &out)
        };
        let start = rng.uniform_vec(v * d, 1.0);
        let mut dw = start.clone();
        embedding_bwd_cpu(&mut dw, &r, &tokens, t, d, scale);
        let delta: Vec<f32> = dw.iter().zip(&start).map(|(a, b)| a - b).collect();
        check_gradient("embedding dw", &w, &delta, loss, &mut rng, 4);
    }

    #[test]
    #[should_panic(expected = "tokens[1] = 11 is outside the vocabulary 0..11")]
    fn rejects_out_of_range_tokens() {
        let mut out = vec![0.0; 2];
        embedding_fwd_cpu(&mut out, &[0, 11], &[0.0; 11], 2, 1, 1.0);
    }
}
