//! Cross-entropy of the LM head over the vocabulary, and the step metrics (SPEC §5).
//!
//! Per token row of `logits [T,V]` with label `y` (`-100` = ignored):
//!
//! ```text
//! lse        = log(sum_j exp(logit_j))                       (fp32, max-subtracted)
//! loss       = lse - logit_y
//! correct    = (argmax_j logit_j == y)                        (the first maximum wins)
//! dlogits_j  = (softmax_j - [j == y]) * grad_scale            (d(grad_scale * loss) / dlogit_j)
//! ```
//!
//! Ignored rows get `loss = 0`, `correct = 0`, `dlogits = 0`. `grad_scale` is
//! `1 / (mean over ranks of the valid-label count)`, so summing `grad_scale * loss` over
//! ranks gives the gradient of SPEC §5's loss.

use rayon::prelude::*;

use crate::ops::shape::expect_len;

/// The label value of a position that carries no loss.
pub const IGNORE_LABEL: i32 = -100;

/// The sums behind one step's `loss`, `accuracy` and `exact_accuracy` (SPEC §5); each
/// metric is a ratio of two of them, so sums over micro-batches and ranks stay exact.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepMetrics {
    /// Sum of the per-token losses over valid labels.
    pub loss_sum: f64,
    /// Labels that are not `-100`.
    pub valid_tokens: u64,
    /// Valid labels predicted by the argmax.
    pub correct_tokens: u64,
    /// Samples with at least one valid label, all of them predicted correctly.
    pub exact_samples: u64,
    /// Samples with at least one valid label.
    pub samples_with_labels: u64,
}

/// Softmax cross-entropy of `logits [T,V]` against `labels [T]`: writes `dlogits [T,V]`,
/// `losses [T]` and `correct [T]` (see the module doc), all with `=`.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_cpu(
    dlogits: &mut [f32],
    losses: &mut [f32],
    correct: &mut [u8],
    logits: &[f32],
    labels: &[i32],
    t: usize,
    v: usize,
    grad_scale: f32,
) {
    const OP: &str = "cross_entropy_cpu";
    expect_len(OP, "dlogits", dlogits.len(), &[("T", t), ("V", v)]);
    expect_len(OP, "losses", losses.len(), &[("T", t)]);
    expect_len(OP, "correct", correct.len(), &[("T", t)]);
    expect_len(OP, "logits", logits.len(), &[("T", t), ("V", v)]);
    expect_len(OP, "labels", labels.len(), &[("T", t)]);
    if let Some((row, y)) = labels.iter().enumerate().find(|(_, &y)| y != IGNORE_LABEL && (y < 0 || y as usize >= v)) {
        panic!("{OP}: labels[{row}] = {y} is neither {IGNORE_LABEL} nor in the vocabulary 0..{v}");
    }
    if v == 0 {
        return;
    }
    let rows = dlogits.par_chunks_mut(v).zip(losses.par_iter_mut()).zip(correct.par_iter_mut());
    rows.zip(logits.par_chunks(v).zip(labels.par_iter())).for_each(|(((dl, loss), ok), (x, &y))| {
        if y == IGNORE_LABEL {
            dl.fill(0.0);
            *loss = 0.0;
            *ok = 0;
            return;
        }
        // First maximum: a later element must be strictly larger to take over.
        let (argmax, max) = x.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bm), (j, &xj)| if xj > bm { (j, xj) } else { (bi, bm) });
        let sum: f64 = x.iter().map(|&xj| ((xj - max) as f64).exp()).sum();
        let lse = max + (sum.ln() as f32);
        let y = y as usize;
        *loss = lse - x[y];
        *ok = u8::from(argmax == y);
        let inv_sum = 1.0 / sum;
        for (j, (d, &xj)) in dl.iter_mut().zip(x).enumerate() {
            let p = (((xj - max) as f64).exp() * inv_sum) as f32;
            *d = (p - if j == y { 1.0 } else { 0.0 }) * grad_scale;
        }
    });
}

/// The sums of [`StepMetrics`] from the outputs of [`cross_entropy_cpu`]: `losses [T]`,
/// `correct [T]`, `labels [T]`, and the sample starts `cu_seqlens [S+1]` (tokens from
/// `cu_seqlens[S]` on are padding).
pub fn metrics_cpu(losses: &[f32], correct: &[u8], labels: &[i32], cu_seqlens: &[i32], t: usize) -> StepMetrics {
    const OP: &str = "metrics_cpu";
    expect_len(OP, "losses", losses.len(), &[("T", t)]);
    expect_len(OP, "correct", correct.len(), &[("T", t)]);
    expect_len(OP, "labels", labels.len(), &[("T", t)]);
    assert!(!cu_seqlens.is_empty(), "{OP}: `cu_seqlens` must hold at least [0]");
    let mut m = StepMetrics::default();
    for i in 0..t {
        if labels[i] != IGNORE_LABEL {
            m.loss_sum += losses[i] as f64;
            m.valid_tokens += 1;
            m.correct_tokens += u64::from(correct[i]);
        }
    }
    for (s, w) in cu_seqlens.windows(2).enumerate() {
        let (start, end) = (w[0] as usize, w[1] as usize);
        assert!(start <= end && end <= t, "{OP}: sample {s} spans {start}..{end}, outside 0..{t} or reversed");
        let valid = (start..end).filter(|&i| labels[i] != IGNORE_LABEL);
        let (n_valid, n_correct) = valid.fold((0u64, 0u64), |(n, c), i| (n + 1, c + u64::from(correct[i])));
        if n_valid > 0 {
            m.samples_with_labels += 1;
            m.exact_samples += u64::from(n_correct == n_valid);
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::check_gradient;
    use crate::rng::Rng;

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(10);
        let (t, v) = (6, 37);
        let logits = rng.uniform_vec(t * v, 4.0);
        let labels = [3, IGNORE_LABEL, 0, 36, 17, IGNORE_LABEL];
        let grad_scale = 0.25;
        let loss = |x: &[f32]| {
            let (mut dl, mut losses, mut ok) = (vec![0.0; t * v], vec![0.0; t], vec![0; t]);
            cross_entropy_cpu(&mut dl, &mut losses, &mut ok, x, &labels, t, v, grad_scale);
            losses.iter().map(|&l| l as f64 * grad_scale as f64).sum()
        };
        let (mut dl, mut losses, mut ok) = (vec![f32::NAN; t * v], vec![f32::NAN; t], vec![9; t]);
        cross_entropy_cpu(&mut dl, &mut losses, &mut ok, &logits, &labels, t, v, grad_scale);
        check_gradient("cross_entropy dlogits", &logits, &dl, loss, &mut rng, 4);
        assert!(dl[v..2 * v].iter().all(|&g| g == 0.0) && losses[1] == 0.0 && ok[1] == 0, "ignored rows are zero");
    }

    #[test]
    fn loss_and_argmax_by_hand() {
        // Row 0: uniform logits, loss ln 3, ties resolved to the first index 0.
        // Row 1: label 2 is the strict maximum.
        let logits = [1.0, 1.0, 1.0, 0.0, 0.0, 5.0];
        let (mut dl, mut losses, mut ok) = (vec![0.0; 6], vec![0.0; 2], vec![0; 2]);
        cross_entropy_cpu(&mut dl, &mut losses, &mut ok, &logits, &[1, 2], 2, 3, 1.0);
        assert!((losses[0] - 3f32.ln()).abs() < 1e-6);
        assert_eq!(ok, [0, 1]);
        let mut ok_first = vec![0; 1];
        cross_entropy_cpu(&mut dl[..3], &mut losses[..1], &mut ok_first, &logits[..3], &[0], 1, 3, 1.0);
        assert_eq!(ok_first, [1], "first maximum wins");
    }

    #[test]
    fn metrics_count_samples() {
        // Three samples [0,3) [3,5) [5,6), then two padding tokens.
        let labels = [IGNORE_LABEL, 4, 5, IGNORE_LABEL, IGNORE_LABEL, 7, IGNORE_LABEL, IGNORE_LABEL];
        let correct = [0, 1, 1, 0, 0, 0, 0, 0];
        let losses = [0.0, 0.5, 0.25, 0.0, 0.0, 2.0, 0.0, 0.0];
        let m = metrics_cpu(&losses, &correct, &labels, &[0, 3, 5, 6], 8);
        assert_eq!(m, StepMetrics { loss_sum: 2.75, valid_tokens: 3, correct_tokens: 2, exact_samples: 1, samples_with_labels: 2 });
    }
}
