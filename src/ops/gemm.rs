//! The linear layers: `y = x @ w^T (+ residual)` and its two backward products.
//!
//! Weights are stored as PyTorch's `nn.Linear` does, `w [N, K]` (out features, in features),
//! all row-major:
//!
//! ```text
//! forward      y  [T,N]  = x [T,K] @ w^T            (+ residual [T,N])
//! input grad   dx [T,K] (+)= dy [T,N] @ w [N,K]
//! weight grad  dw [N,K] += dy^T [N,T] @ x [T,K]      (parameter gradients accumulate)
//! ```
//!
//! The CPU reference calls `matrixmultiply`'s blocked, multi-threaded sgemm.

use crate::ops::shape::expect_len;

/// `y [T,N] = x [T,K] @ w [N,K]^T + residual [T,N]` (no residual: plain product).
pub fn linear_fwd_cpu(y: &mut [f32], x: &[f32], w: &[f32], residual: Option<&[f32]>, t: usize, n: usize, k: usize) {
    const OP: &str = "linear_fwd_cpu";
    expect_len(OP, "y", y.len(), &[("T", t), ("N", n)]);
    expect_len(OP, "x", x.len(), &[("T", t), ("K", k)]);
    expect_len(OP, "w", w.len(), &[("N", n), ("K", k)]);
    let beta = match residual {
        Some(r) => {
            expect_len(OP, "residual", r.len(), &[("T", t), ("N", n)]);
            y.copy_from_slice(r);
            1.0
        }
        None => 0.0,
    };
    // w^T is w read with row stride 1 and column stride K.
    sgemm(t, k, n, x, (k, 1), w, (1, k), beta, y);
}

/// `dx [T,K] = dy [T,N] @ w [N,K]`, or `+=` when `accumulate`.
pub fn linear_bwd_input_cpu(dx: &mut [f32], dy: &[f32], w: &[f32], t: usize, n: usize, k: usize, accumulate: bool) {
    const OP: &str = "linear_bwd_input_cpu";
    expect_len(OP, "dx", dx.len(), &[("T", t), ("K", k)]);
    expect_len(OP, "dy", dy.len(), &[("T", t), ("N", n)]);
    expect_len(OP, "w", w.len(), &[("N", n), ("K", k)]);
    sgemm(t, n, k, dy, (n, 1), w, (k, 1), if accumulate { 1.0 } else { 0.0 }, dx);
}

/// `dw [N,K] += dy [T,N]^T @ x [T,K]`.
pub fn linear_bwd_weight_cpu(dw: &mut [f32], dy: &[f32], x: &[f32], t: usize, n: usize, k: usize) {
    const OP: &str = "linear_bwd_weight_cpu";
    expect_len(OP, "dw", dw.len(), &[("N", n), ("K", k)]);
    expect_len(OP, "dy", dy.len(), &[("T", t), ("N", n)]);
    expect_len(OP, "x", x.len(), &[("T", t), ("K", k)]);
    // dy^T is dy read with row stride 1 and column stride N.
    sgemm(n, t, k, dy, (1, n), x, (k, 1), 1.0, dw);
}

/// `c [M,N] = a [M,K] @ b [K,N] + beta * c` with `a` and `b` given as (row stride, column
/// stride) views and `c` row-major; `beta = 0` ignores what `c` held (NaN included).
#[allow(clippy::too_many_arguments)]
fn sgemm(m: usize, k: usize, n: usize, a: &[f32], a_strides: (usize, usize), b: &[f32], b_strides: (usize, usize), beta: f32, c: &mut [f32]) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty sum: c = beta * c, with beta = 0 overwriting whatever was there.
        c.iter_mut().for_each(|v| *v = if beta == 0.0 { 0.0 } else { *v * beta });
        return;
    }
    // SAFETY: the callers checked that `a` holds the [m,k] view, `b` the [k,n] view (the
    // largest index reached is (rows-1)*row_stride + (cols-1)*col_stride < len for the
    // strides used above) and `c` exactly m*n elements; `c` does not alias `a` or `b`
    // (it is a `&mut`).
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            a_strides.0 as isize,
            a_strides.1 as isize,
            b.as_ptr(),
            b_strides.0 as isize,
            b_strides.1 as isize,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_gradient, weighted_sum};
    use crate::rng::Rng;

    /// The textbook triple loop in f64, the reference for the blocked sgemm.
    fn naive_fwd(x: &[f32], w: &[f32], t: usize, n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0.0f64; t * n];
        for i in 0..t {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum();
            }
        }
        y
    }

    #[test]
    fn forward_matches_triple_loop() {
        let mut rng = Rng::new(1);
        // Odd sizes so no dimension is a multiple of the sgemm kernel's tile.
        let (t, n, k) = (37, 29, 53);
        let x = rng.uniform_vec(t * k, 1.0);
        let w = rng.uniform_vec(n * k, 1.0);
        let res = rng.uniform_vec(t * n, 1.0);
        let mut y = vec![f32::NAN; t * n];
        linear_fwd_cpu(&mut y, &x, &w, None, t, n, k);
        let want = naive_fwd(&x, &w, t, n, k);
        // fp32 dot products of K = 53 terms of size <= 1: error <= K * 2^-24 * sum|terms|.
        for (g, w) in y.iter().zip(&want) {
            assert!((*g as f64 - w).abs() <= 53.0 * 6e-8 * 53.0, "{g} vs {w}");
        }
        linear_fwd_cpu(&mut y, &x, &w, Some(&res), t, n, k);
        for ((g, w), r) in y.iter().zip(&want).zip(&res) {
            assert!((*g as f64 - (w + *r as f64)).abs() <= 53.0 * 6e-8 * 54.0);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(2);
        let (t, n, k) = (13, 7, 11);
        let x = rng.uniform_vec(t * k, 1.0);
        let w = rng.uniform_vec(n * k, 1.0);
        let r = rng.uniform_vec(t * n, 1.0);
        let loss = |x: &[f32], w: &[f32]| {
            let mut y = vec![0.0; t * n];
            linear_fwd_cpu(&mut y, x, w, None, t, n, k);
            weighted_sum(&r, &y)
        };

        // dx: written with `=` (NaN before proves it), then `+=` onto itself doubles it.
        let mut dx = vec![f32::NAN; t * k];
        linear_bwd_input_cpu(&mut dx, &r, &w, t, n, k, false);
        check_gradient("linear dx", &x, &dx, |x| loss(x, &w), &mut rng, 4);
        let once = dx.clone();
        linear_bwd_input_cpu(&mut dx, &r, &w, t, n, k, true);
        assert!(dx.iter().zip(&once).all(|(a, b)| (a - 2.0 * b).abs() <= 1e-6 * b.abs().max(1.0)));

        // dw: accumulates onto a random start.
        let start = rng.uniform_vec(n * k, 1.0);
        let mut dw = start.clone();
        linear_bwd_weight_cpu(&mut dw, &r, &x, t, n, k);
        let delta: Vec<f32> = dw.iter().zip(&start).map(|(a, b)| a - b).collect();
        check_gradient("linear dw", &w, &delta, |w| loss(&x, w), &mut rng, 4);
    }
}
