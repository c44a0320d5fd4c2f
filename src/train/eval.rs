//! Forward-only evaluation over the batches of a dataset (`hrm-cu loss`, the demo's held-out
//! accuracy).

use anyhow::{ensure, Result};
use serde::Serialize;

use crate::data::batch::assemble;
use crate::data::multipack::plan_epoch;
use crate::data::Dataset;
use crate::ops::cross_entropy::StepMetrics;
use crate::train::engine::Engine;

/// Per-step metrics averaged over steps (the `hrm-cu loss` contract): each field is the mean
/// of its per-step value; `tokens` is the total of valid labels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct MeanMetrics {
    pub loss: f64,
    pub accuracy: f64,
    pub exact_accuracy: f64,
    pub tokens: u64,
    pub steps: usize,
}

/// Loss, accuracy and exact accuracy of one step (SPEC §5), each a ratio of sums.
pub fn step_ratios(m: &StepMetrics) -> (f64, f64, f64) {
    let per_token = |x: f64| if m.valid_tokens == 0 { 0.0 } else { x / m.valid_tokens as f64 };
    let exact = if m.samples_with_labels == 0 { 0.0 } else { m.exact_samples as f64 / m.samples_with_labels as f64 };
    (per_token(m.loss_sum), per_token(m.correct_tokens as f64), exact)
}

/// Which batches of an epoch [`evaluate`] scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coverage {
    /// The first `k` steps of the training plan (SPEC §8, which drops the last step): the
    /// `hrm-cu loss` contract, comparable with the PyTorch reference.
    FirstSteps(usize),
    /// Every sample: the plan's steps, then the dropped tail packed in order (held-out sets).
    AllSamples,
}

/// Evaluates the batches of `epoch` that `coverage` names, packed for one rank of
/// `batch_tokens` slots as training packs them (SPEC §8).
pub fn evaluate(engine: &mut dyn Engine, ds: &Dataset, epoch: usize, batch_tokens: usize, target_only: bool, coverage: Coverage) -> Result<MeanMetrics> {
    ensure!(epoch < ds.num_epochs(), "the dataset has {} epoch(s); epoch {epoch} requested", ds.num_epochs());
    ensure!(
        batch_tokens >= ds.max_sample_len(),
        "--batch-tokens {batch_tokens} cannot hold the dataset's longest sample ({} tokens)",
        ds.max_sample_len()
    );
    let lengths = ds.packed_lengths(epoch);
    let plan = plan_epoch(&lengths, batch_tokens, 1);
    let mut batches: Vec<Vec<usize>> = plan.steps.iter().map(|ranks| ranks[0].clone()).collect();
    match coverage {
        Coverage::FirstSteps(k) => batches.truncate(k),
        Coverage::AllSamples => {
            // The tail rows, packed greedily in row order.
            let mut current: (Vec<usize>, usize) = (Vec::new(), 0);
            for (row, &len) in lengths.iter().enumerate().take(plan.total_rows).skip(plan.packed_rows) {
                if current.1 + len > batch_tokens {
                    batches.push(std::mem::take(&mut current.0));
                    current.1 = 0;
                }
                current.0.push(row);
                current.1 += len;
            }
            if !current.0.is_empty() {
                batches.push(current.0);
            }
        }
    }
    let steps = batches.len();
    ensure!(steps > 0, "epoch {epoch} packs into no full step of {batch_tokens} tokens (the last step of an epoch is dropped, SPEC §8)");
    let mut sum = MeanMetrics { steps, ..MeanMetrics::default() };
    for rows in &batches {
        let batch = assemble(ds, epoch, rows, batch_tokens, target_only)?;
        let m = engine.eval_batch(&batch.batch())?;
        let (loss, acc, exact) = step_ratios(&m);
        sum.loss += loss;
        sum.accuracy += acc;
        sum.exact_accuracy += exact;
        sum.tokens += m.valid_tokens;
    }
    let n = steps as f64;
    Ok(MeanMetrics { loss: sum.loss / n, accuracy: sum.accuracy / n, exact_accuracy: sum.exact_accuracy / n, ..sum })
}
