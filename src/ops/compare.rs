//! Comparing a computed tensor with its reference: `|x - ref| <= abs + |ref| * rel`.
//!
//! `rel` is usually a small multiple of the output dtype's epsilon (bf16: 2^-8 = 3.9e-3,
//! half an ulp of rounding per cast); `abs` covers values that cancel to near zero. Each
//! check states where its numbers come from.

use std::fmt;

pub const BF16_EPS: f32 = 1.0 / 256.0;
pub const F32_EPS: f32 = f32::EPSILON;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    pub abs: f32,
    pub rel: f32,
}

impl fmt::Display for Tolerance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.0e}+{:.0e}|ref|", self.abs, self.rel)
    }
}

/// The outcome of comparing `got` with `want` element by element.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    pub len: usize,
    /// Largest `|got - want|`.
    pub max_abs_err: f64,
    /// Largest `|got - want| / max(|want|, 1e-30)` over elements whose `|want| > abs`.
    pub max_rel_err: f64,
    /// Largest `|got - want| / (abs + rel*|want|)`: the check passes when this is <= 1.
    pub worst_ratio: f64,
    /// Index of the worst element.
    pub worst_index: usize,
    /// Elements that are NaN or infinite where the reference is finite (unwritten outputs).
    pub non_finite: usize,
}

impl Comparison {
    pub fn passed(&self) -> bool {
        self.non_finite == 0 && self.worst_ratio <= 1.0
    }
}

pub fn compare(got: &[f32], want: &[f32], tol: Tolerance) -> Comparison {
    assert_eq!(got.len(), want.len(), "compare: length mismatch");
    let mut c = Comparison { len: got.len(), max_abs_err: 0.0, max_rel_err: 0.0, worst_ratio: 0.0, worst_index: 0, non_finite: 0 };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if !g.is_finite() && w.is_finite() {
            c.non_finite += 1;
            continue;
        }
        let err = (g as f64 - w as f64).abs();
        let bound = tol.abs as f64 + tol.rel as f64 * (w as f64).abs();
        let ratio = err / bound;
        c.max_abs_err = c.max_abs_err.max(err);
        if (w as f64).abs() > tol.abs as f64 {
            c.max_rel_err = c.max_rel_err.max(err / (w as f64).abs());
        }
        if ratio > c.worst_ratio {
            c.worst_ratio = ratio;
            c.worst_index = i;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_in_output_fails() {
        let tol = Tolerance { abs: 1e-3, rel: 1e-3 };
        assert!(compare(&[1.0, 2.0], &[1.0, 2.0], tol).passed());
        assert!(!compare(&[1.0, f32::NAN], &[1.0, 2.0], tol).passed());
        assert!(!compare(&[1.0, 2.1], &[1.0, 2.0], tol).passed());
    }
}
