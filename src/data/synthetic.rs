//! Synthetic packed batches for checks, benchmarks and tests: random samples that fill a
//! batch, and the batch with the largest index tables (for memory planning). Both are
//! `PackedBatch`es whose `rows` are sample indices `0..S`.

use anyhow::{ensure, Result};

use super::batch::{pack_pairs, PackedBatch};
use crate::rng::Rng;

impl PackedBatch {
    /// `batch_tokens` slots filled completely with random samples: lengths
    /// `len(I) + len(R) - 1` uniform in `lens`, instruction fractions uniform in
    /// `prefix_frac`, the last sample cut to the slots left; tokens uniform in `1..vocab`.
    pub fn random(rng: &mut Rng, batch_tokens: usize, vocab: usize, lens: std::ops::Range<usize>, prefix_frac: (f64, f64)) -> Result<PackedBatch> {
        ensure!(lens.start >= 2 && lens.start < lens.end, "sample lengths {lens:?}: need at least 2 tokens");
        ensure!(vocab > 1, "vocabulary of {vocab}");
        let mut samples = Vec::new();
        let mut left = batch_tokens;
        while left >= 2 {
            let len = (lens.start + rng.below((lens.end - lens.start) as u64) as usize).min(left);
            let frac = prefix_frac.0 + (prefix_frac.1 - prefix_frac.0) * rng.uniform();
            let inst = ((len as f64 * frac).round() as usize).clamp(1, len - 1);
            let mut draw = |n: usize| (0..n).map(|_| 1 + rng.below(vocab as u64 - 1) as i32).collect::<Vec<i32>>();
            samples.push((draw(inst), draw(len + 1 - inst)));
            left -= len;
        }
        pack_pairs(&samples, batch_tokens)
    }

    /// The largest index tables a batch of `batch_tokens` tokens can have: one-token samples.
    pub(crate) fn worst_case(batch_tokens: usize) -> PackedBatch {
        PackedBatch {
            inputs: vec![0; batch_tokens],
            labels: vec![0; batch_tokens],
            positions: vec![0; batch_tokens],
            cu_seqlens: (0..=batch_tokens as i32).collect(),
            prefix_lens: vec![1; batch_tokens],
            causal_lens: vec![0; batch_tokens],
            rows: (0..batch_tokens).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_batches_fill_every_row() {
        let mut rng = Rng::new(3);
        let p = PackedBatch::random(&mut rng, 12_288, 65_536, 64..4096, (0.1, 0.9)).unwrap();
        assert_eq!(p.num_tokens(), 12_288);
        p.batch().check(65_536).unwrap();
        assert!(p.num_labels() > 0);
    }
}
