//! PrefixLM batch assembly (SPEC §4): whole samples back to back in one flat buffer of
//! `batch_tokens` slots, the rest padding.
//!
//! For a sample with instruction `I` (length p) and response `R` (length r), the sample
//! occupies `p + r - 1` slots:
//!
//! ```text
//! inputs     I[0] I[1] ... I[p-1]  R[0] ... R[r-2]
//! labels     -100 -100 ... R[0]    R[1] ... R[r-1]      (target_only = false: I[1] ... I[p-1], R[0], ...)
//! positions  0    1    ... p-1     p    ... p+r-2
//! ```
//!
//! so the last instruction token predicts `R[0]`. Padding after `cu_seqlens[S]` is input 0,
//! label -100, position 0; the attention kernels mask it out.

use anyhow::{ensure, Result};

use super::dataset::{Dataset, Sample, TokenSlice};
use crate::model::net::Batch;

pub use crate::ops::cross_entropy::IGNORE_LABEL;

/// One rank's batch for one step. `N` = batch_tokens, `S` = samples packed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedBatch {
    /// `[N]` token ids; padding 0.
    pub inputs: Vec<i32>,
    /// `[N]` next-token targets; `IGNORE_LABEL` where no loss is taken.
    pub labels: Vec<i32>,
    /// `[N]` position inside the sample, from 0; padding 0.
    pub positions: Vec<i32>,
    /// `[S+1]` sample `i` occupies slots `cu_seqlens[i]..cu_seqlens[i+1]`; `cu_seqlens[0] = 0`.
    pub cu_seqlens: Vec<i32>,
    /// `[S]` instruction length `p`: slots `0..p` of a sample see each other (bidirectional).
    pub prefix_lens: Vec<i32>,
    /// `[S]` `len(R) - 1`: the causal part; may be 0 (a response of one token).
    pub causal_lens: Vec<i32>,
    /// `[S]` the epoch rows packed here, in buffer order.
    pub rows: Vec<usize>,
}

impl PackedBatch {
    pub fn num_samples(&self) -> usize {
        self.rows.len()
    }

    /// Slots holding sample tokens (the rest is padding).
    pub fn num_tokens(&self) -> usize {
        *self.cu_seqlens.last().expect("cu_seqlens has S+1 entries") as usize
    }

    /// Slots whose label is not `IGNORE_LABEL`: the per-rank count the loss divides by (SPEC §5).
    pub fn num_labels(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_LABEL).count()
    }

    /// The borrowed view the model takes.
    pub fn batch(&self) -> Batch<'_> {
        Batch { inputs: &self.inputs, labels: &self.labels, positions: &self.positions, cu_seqlens: &self.cu_seqlens, prefix_lens: &self.prefix_lens }
    }

    /// `batch_tokens` slots of padding and no samples yet; room reserved for `samples`.
    fn padding(batch_tokens: usize, samples: usize) -> PackedBatch {
        let mut cu_seqlens = Vec::with_capacity(samples + 1);
        cu_seqlens.push(0);
        PackedBatch {
            inputs: vec![0; batch_tokens],
            labels: vec![IGNORE_LABEL; batch_tokens],
            positions: vec![0; batch_tokens],
            cu_seqlens,
            prefix_lens: Vec::with_capacity(samples),
            causal_lens: Vec::with_capacity(samples),
            rows: Vec::with_capacity(samples),
        }
    }

    /// Writes `sample` (called `row`) into the `packed_len()` slots after the samples packed
    /// so far: the one place SPEC §4's layout is spelled out. The caller has checked that
    /// both parts are non-empty and that the sample fits the slots left.
    fn push_sample(&mut self, row: usize, sample: Sample<'_>, target_only: bool) {
        let (inst, resp) = (sample.instruction, sample.response);
        let (p, r) = (inst.len(), resp.len());
        let n = p + r - 1;
        let at = self.num_tokens();
        // inputs: I ++ R[:-1]
        inst.copy_to_i32(&mut self.inputs[at..at + p]);
        resp.slice(0..r - 1).copy_to_i32(&mut self.inputs[at + p..at + n]);
        // labels: (-100 * (p-1) | I[1:]) ++ R
        if !target_only {
            inst.slice(1..p).copy_to_i32(&mut self.labels[at..at + p - 1]);
        }
        resp.copy_to_i32(&mut self.labels[at + p - 1..at + n]);
        for (pos, slot) in self.positions[at..at + n].iter_mut().enumerate() {
            *slot = pos as i32;
        }
        self.cu_seqlens.push((at + n) as i32);
        self.prefix_lens.push(p as i32);
        self.causal_lens.push((r - 1) as i32);
        self.rows.push(row);
    }
}

/// Packs (instruction, response) pairs, each part non-empty, into `batch_tokens` slots with
/// `target_only`, the way `assemble` packs dataset rows; `rows` are the pairs' indices.
/// Checks, benchmarks and tests build their batches with it.
pub fn pack_pairs(samples: &[(Vec<i32>, Vec<i32>)], batch_tokens: usize) -> Result<PackedBatch> {
    let mut pairs = Vec::with_capacity(samples.len());
    for (i, (inst, resp)) in samples.iter().enumerate() {
        ensure!(!inst.is_empty() && !resp.is_empty(), "sample {i}: instruction and response must be non-empty");
        pairs.push(Sample { instruction: TokenSlice::I32(inst), response: TokenSlice::I32(resp) });
    }
    let used: usize = pairs.iter().map(Sample::packed_len).sum();
    ensure!(used <= batch_tokens, "{used} tokens of samples do not fit {batch_tokens} rows");
    let mut b = PackedBatch::padding(batch_tokens, pairs.len());
    for (i, pair) in pairs.into_iter().enumerate() {
        b.push_sample(i, pair, true);
    }
    Ok(b)
}

/// Packs `rows` of epoch `epoch`, in the given order, into a buffer of `batch_tokens` slots.
/// With `target_only` (the default of SPEC §4) only the response carries labels.
pub fn assemble(ds: &Dataset, epoch: usize, rows: &[usize], batch_tokens: usize, target_only: bool) -> Result<PackedBatch> {
    ensure!(epoch < ds.num_epochs(), "epoch {epoch} does not exist: the dataset has {} epochs", ds.num_epochs());
    ensure!(i32::try_from(batch_tokens).is_ok(), "batch_tokens {batch_tokens} does not fit the i32 offsets of cu_seqlens");
    let mut used = 0;
    for &row in rows {
        ensure!(row < ds.num_samples(epoch), "row {row} does not exist: epoch {epoch} has {} samples", ds.num_samples(epoch));
        used += ds.sample(epoch, row).packed_len();
    }
    ensure!(
        used <= batch_tokens,
        "rows {rows:?} of epoch {epoch} need {used} slots but a local batch has {batch_tokens}: \
         batch_tokens must be at least the longest sample (the sampler guarantees this only when it is)"
    );

    let mut b = PackedBatch::padding(batch_tokens, rows.len());
    for &row in rows {
        b.push_sample(row, ds.sample(epoch, row), target_only);
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset::tests::info;
    use crate::data::dataset::EpochIndex;

    /// Sample 0: I = [10, 11, 12], R = [20, 21]; sample 1: I = [13, 14], R = [22] (causal 0).
    fn dataset() -> Dataset {
        let tokens = vec![10, 11, 12, 20, 21, 13, 14, 22];
        let mut e = EpochIndex::default();
        e.push(0, 3, 3, 2);
        e.push(5, 2, 7, 1);
        Dataset::from_parts(info(100), 9, tokens, vec![e]).unwrap()
    }

    #[test]
    fn packs_inputs_labels_positions_and_lengths() {
        let ds = dataset();
        let b = assemble(&ds, 0, &[1, 0], 9, true).unwrap();
        const X: i32 = IGNORE_LABEL;
        assert_eq!(b.inputs, [13, 14, 10, 11, 12, 20, 0, 0, 0]);
        assert_eq!(b.labels, [X, 22, X, X, 20, 21, X, X, X]);
        assert_eq!(b.positions, [0, 1, 0, 1, 2, 3, 0, 0, 0]);
        assert_eq!(b.cu_seqlens, [0, 2, 6]);
        assert_eq!(b.prefix_lens, [2, 3]);
        assert_eq!(b.causal_lens, [0, 1]);
        assert_eq!(b.rows, [1, 0]);
        assert_eq!((b.num_samples(), b.num_tokens(), b.num_labels()), (2, 6, 3));

        let b = assemble(&ds, 0, &[1, 0], 6, false).unwrap();
        assert_eq!(b.labels, [14, 22, 11, 12, 20, 21]);
    }

    #[test]
    fn overfull_batches_and_bad_rows_are_errors() {
        let ds = dataset();
        let e = format!("{:#}", assemble(&ds, 0, &[0, 1], 5, true).unwrap_err());
        assert!(e.contains("need 6 slots but a local batch has 5"), "{e}");
        assert!(assemble(&ds, 0, &[2], 9, true).is_err());
        assert!(assemble(&ds, 1, &[0], 9, true).is_err());
        let empty = assemble(&ds, 0, &[], 4, true).unwrap();
        assert_eq!((empty.cu_seqlens.clone(), empty.num_labels()), (vec![0], 0));
    }

    #[test]
    fn pairs_pack_like_dataset_rows() {
        let ds = dataset();
        let pairs = [(vec![13, 14], vec![22]), (vec![10, 11, 12], vec![20, 21])];
        let from_pairs = pack_pairs(&pairs, 9).unwrap();
        let from_rows = assemble(&ds, 0, &[1, 0], 9, true).unwrap();
        assert_eq!(from_pairs, PackedBatch { rows: vec![0, 1], ..from_rows });

        let e = format!("{:#}", pack_pairs(&pairs, 5).unwrap_err());
        assert!(e.contains("6 tokens of samples do not fit 5 rows"), "{e}");
        assert!(pack_pairs(&[(vec![], vec![1])], 9).is_err());
    }
}
