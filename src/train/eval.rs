//! Forward-only evaluation over the batches of a dataset (`hrm-cu loss`, the demo's held-out
//! accuracy).

use anyhow::{ensure, Result};
use serde::Serialize;

use crate::data::batch::{assemble, PackedBatch};
use crate::data::multipack::plan_epoch;
use crate::data::Dataset;
use crate::model::net::Batch;
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

/// The view of a packed batch the model takes.
pub fn batch_view(b: &PackedBatch) -> Batch<'_> {
    Batch { inputs: &b.inputs, labels: &b.labels, positions: &b.positions, cu_seqlens: &b.cu_seqlens, prefix_lens: &b.prefix_lens }
}

/// Evaluates the first `max_steps` batches (all when `None`) of `epoch`, packed for one rank
/// of `batch_tokens` slots exactly as training packs them (SPEC §8).
pub fn evaluate(engine: &mut dyn Engine, ds: &Dataset, epoch: usize, batch_tokens: usize, target_only: bool, max_steps: Option<usize>) -> Result<MeanMetrics> {
    ensure!(epoch < ds.num_epochs(), "the dataset has {} epoch(s); epoch {epoch} requested", ds.num_epochs());
    ensure!(
        batch_tokens >= ds.max_sample_len(),
        "--batch-tokens {batch_tokens} cannot hold the dataset's longest sample ({} tokens)",
        ds.max_sample_len()
    );
    let plan = plan_epoch(&ds.packed_lengths(epoch), batch_tokens, 1);
    let steps = max_steps.map_or(plan.steps.len(), |k| k.min(plan.steps.len()));
    ensure!(steps > 0, "epoch {epoch} packs into no full step of {batch_tokens} tokens (the last step of an epoch is dropped, SPEC §8)");
    let mut sum = MeanMetrics { steps, ..MeanMetrics::default() };
    for step in 0..steps {
        let batch = assemble(ds, epoch, plan.rows(step, 0), batch_tokens, target_only)?;
        let m = engine.eval_batch(&batch_view(&batch))?;
        let (loss, acc, exact) = step_ratios(&m);
        sum.loss += loss;
        sum.accuracy += acc;
        sum.exact_accuracy += exact;
        sum.tokens += m.valid_tokens;
    }
    let n = steps as f64;
    Ok(MeanMetrics { loss: sum.loss / n, accuracy: sum.accuracy / n, exact_accuracy: sum.exact_accuracy / n, ..sum })
}
