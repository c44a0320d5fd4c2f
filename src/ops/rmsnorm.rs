//! Weightless RMSNorm (SPEC §2) and the input-injection add that precedes a module.
//!
//! ```text
//! forward    rstd = 1 / sqrt(mean(x^2) + eps)        eps = 1e-6, one value per row
//!            y    = x * rstd
//! backward   dx  += rstd * (dy - y * mean(dy * y))    (dx is the residual stream: +=)
//! ```
//!
//! The backward follows from `dy_j/dx_i = rstd * (delta_ij - y_i * y_j / D)`. The forward
//! saves `rstd` (fp32, one per row) so the backward needs only `x` and `dy`.

use rayon::prelude::*;

use crate::config::NORM_EPS;
use crate::ops::shape::expect_len;

/// `x [T,D] = z [T,D] + inj [T,D]` (a copy of `z` when `inj` is None), then
/// `y [T,D] = rms(x)` with `rstd [T]` saved.
#[allow(clippy::too_many_arguments)]
pub fn add_rmsnorm_fwd_cpu(x: &mut [f32], y: &mut [f32], rstd: &mut [f32], z: &[f32], inj: Option<&[f32]>, t: usize, d: usize) {
    const OP: &str = "add_rmsnorm_fwd_cpu";
    expect_len(OP, "x", x.len(), &[("T", t), ("D", d)]);
    expect_len(OP, "z", z.len(), &[("T", t), ("D", d)]);
    match inj {
        Some(inj) => {
            expect_len(OP, "inj", inj.len(), &[("T", t), ("D", d)]);
            x.par_iter_mut().zip(z.par_iter().zip(inj)).for_each(|(x, (z, i))| *x = z + i);
        }
        None => x.copy_from_slice(z),
    }
    rmsnorm_fwd_cpu(y, rstd, x, t, d);
}

/// `y [T,D] = x * rstd`, `rstd [T] = 1 / sqrt(mean(x^2) + 1e-6)` per row of `x [T,D]`.
pub fn rmsnorm_fwd_cpu(y: &mut [f32], rstd: &mut [f32], x: &[f32], t: usize, d: usize) {
    const OP: &str = "rmsnorm_fwd_cpu";
    expect_len(OP, "y", y.len(), &[("T", t), ("D", d)]);
    expect_len(OP, "rstd", rstd.len(), &[("T", t)]);
    expect_len(OP, "x", x.len(), &[("T", t), ("D", d)]);
    if d == 0 {
        return;
    }
    y.par_chunks_mut(d).zip(rstd.par_iter_mut()).zip(x.par_chunks(d)).for_each(|((y, r), x)| {
        let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
        *r = 1.0 / (mean_sq + NORM_EPS).sqrt();
        y.iter_mut().zip(x).for_each(|(y, x)| *y = x * *r);
    });
}

/// `dx [T,D] += rstd * (dy - y * mean(dy * y))` with `y = x * rstd`; `dy [T,D]`, `x [T,D]`,
/// `rstd [T]` from the forward.
pub fn rmsnorm_bwd_cpu(dx: &mut [f32], dy: &[f32], x: &[f32], rstd: &[f32], t: usize, d: usize) {
    const OP: &str = "rmsnorm_bwd_cpu";
    expect_len(OP, "dx", dx.len(), &[("T", t), ("D", d)]);
    expect_len(OP, "dy", dy.len(), &[("T", t), ("D", d)]);
    expect_len(OP, "x", x.len(), &[("T", t), ("D", d)]);
    expect_len(OP, "rstd", rstd.len(), &[("T", t)]);
    if d == 0 {
        return;
    }
    dx.par_chunks_mut(d).zip(dy.par_chunks(d).zip(x.par_chunks(d))).zip(rstd.par_iter()).for_each(|((dx, (dy, x)), &r)| {
        let mean_dy_y = dy.iter().zip(x).map(|(dy, x)| dy * x * r).sum::<f32>() / d as f32;
        for ((dx, dy), x) in dx.iter_mut().zip(dy).zip(x) {
            *dx += r * (dy - x * r * mean_dy_y);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_gradient, weighted_sum};
    use crate::rng::Rng;

    #[test]
    fn forward_normalises_rows() {
        let mut rng = Rng::new(3);
        let (t, d) = (5, 37);
        let z = rng.uniform_vec(t * d, 100.0);
        let inj = rng.uniform_vec(t * d, 100.0);
        let (mut x, mut y, mut rstd) = (vec![f32::NAN; t * d], vec![f32::NAN; t * d], vec![f32::NAN; t]);
        add_rmsnorm_fwd_cpu(&mut x, &mut y, &mut rstd, &z, Some(&inj), t, d);
        for i in 0..t * d {
            assert_eq!(x[i], z[i] + inj[i]);
        }
        for row in y.chunks(d) {
            let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d as f64;
            assert!((ms - 1.0).abs() < 1e-5, "mean square {ms}");
        }
        add_rmsnorm_fwd_cpu(&mut x, &mut y, &mut rstd, &z, None, t, d);
        assert_eq!(x, z);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(4);
        let (t, d) = (6, 29);
        let x = rng.uniform_vec(t * d, 3.0);
        let r = rng.uniform_vec(t * d, 1.0);
        let loss = |x: &[f32]| {
            let (mut y, mut rstd) = (vec![0.0; t * d], vec![0.0; t]);
            rmsnorm_fwd_cpu(&mut y, &mut rstd, x, t, d);
            weighted_sum(&r, &y)
        };
        let (mut y, mut rstd) = (vec![0.0; t * d], vec![0.0; t]);
        rmsnorm_fwd_cpu(&mut y, &mut rstd, &x, t, d);
        // dx accumulates: start from a random residual gradient and check the increment.
        let start = rng.uniform_vec(t * d, 1.0);
        let mut dx = start.clone();
        rmsnorm_bwd_cpu(&mut dx, &r, &x, &rstd, t, d);
        let delta: Vec<f32> = dx.iter().zip(&start).map(|(a, b)| a - b).collect();
        check_gradient("rmsnorm dx", &x, &delta, loss, &mut rng, 4);
    }
}
