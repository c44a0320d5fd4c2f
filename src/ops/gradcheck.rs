//! Finite-difference checks of the backward passes (tests only).
//!
//! An op's backward is checked through a scalar loss `L(x) = sum_i r_i * out_i(x)` with fixed
//! random weights `r` (so the analytic gradient is the backward applied to `dout = r`),
//! along random directions `u`:
//!
//! ```text
//! (L(x + h*u) - L(x - h*u)) / 2   ~=   <grad, (x + h*u) - (x - h*u)> / 2
//! ```
//!
//! The right side uses the perturbation actually stored in fp32 after rounding, and `L` is
//! summed in f64, so the only errors left are the fp32 rounding of the op's outputs and the
//! O(h^2) truncation of the central difference.
//!
//! Tolerance, relative to the size `h * |grad . u|` of the directional derivative: the fp32
//! rounding of `n` outputs of size ~1 adds noise ~`2^-24 * sqrt(n) / (h * |grad| * sqrt(n))`
//! (~1e-4 with `h = 3e-3`, `|grad| ~ 0.1`), the truncation `h^2 * f''' / 6` about 1e-5
//! for inputs of size ~1-10. The correct backwards of this crate land at 1e-6..8e-5; we
//! allow `5e-4`. A wrong gradient (a sign, a missing term, a wrong index) is off by O(1),
//! and a term scaled by 1% is caught when it carries more than ~5% of the gradient.

use crate::rng::Rng;

/// Checks `grad` = dL/dx at `x` along `directions` random directions, panicking with the
/// worst relative error if it exceeds `rel_tol`.
pub fn check_gradient(name: &str, x: &[f32], grad: &[f32], loss: impl Fn(&[f32]) -> f64, rng: &mut Rng, directions: usize) {
    const H: f64 = 3e-3;
    const REL_TOL: f64 = 5e-4;
    assert_eq!(x.len(), grad.len(), "{name}: gradient length");
    for dir in 0..directions {
        let u: Vec<f64> = (0..x.len()).map(|_| rng.normal()).collect();
        let xp: Vec<f32> = x.iter().zip(&u).map(|(&xi, &ui)| (xi as f64 + H * ui) as f32).collect();
        let xm: Vec<f32> = x.iter().zip(&u).map(|(&xi, &ui)| (xi as f64 - H * ui) as f32).collect();
        let numeric = (loss(&xp) - loss(&xm)) / 2.0;
        let analytic: f64 = grad.iter().zip(xp.iter().zip(&xm)).map(|(&g, (&p, &m))| g as f64 * (p as f64 - m as f64) / 2.0).sum();
        // Scale of the terms being summed: the error is measured against it so that a
        // directional derivative that happens to cancel near zero does not fail spuriously.
        let scale: f64 = grad.iter().zip(&u).map(|(&g, &ui)| (g as f64 * ui * H).powi(2)).sum::<f64>().sqrt();
        let err = (numeric - analytic).abs() / scale.max(f64::MIN_POSITIVE);
        assert!(err <= REL_TOL, "{name}: direction {dir}: numeric {numeric:.6e} vs analytic {analytic:.6e} (relative error {err:.2e} > {REL_TOL:.0e})");
    }
}

/// `sum_i r_i * out_i` in f64: the scalar whose gradient with respect to `out` is `r`.
pub fn weighted_sum(r: &[f32], out: &[f32]) -> f64 {
    r.iter().zip(out).map(|(&a, &b)| a as f64 * b as f64).sum()
}
