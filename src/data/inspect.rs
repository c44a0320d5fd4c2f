//! A human summary of a dataset (`hrm-cu data inspect`): sizes, the length histogram, the
//! instruction/response split, and how well multipack fills batches of a given size.

use std::fmt;
use std::time::Instant;

use anyhow::{ensure, Result};

use super::batch::assemble;
use super::dataset::Dataset;
use super::loader::total_steps_estimate;
use super::multipack::plan_epoch;

/// Per-epoch counts and packing.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochSummary {
    pub samples: usize,
    pub instruction_tokens: u64,
    pub response_tokens: u64,
    /// Sum of packed lengths (`inst_len + resp_len - 1`).
    pub packed_tokens: u64,
    pub steps: usize,
    pub efficiency: f64,
    pub dropped_rows: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub source: String,
    pub tokenizer_path: String,
    pub tokenizer_vocab: usize,
    pub vocab: usize,
    pub context: usize,
    pub tokens_per_epoch: u64,
    pub batch_tokens: usize,
    pub world: usize,
    pub epochs: Vec<EpochSummary>,
    /// Epoch 0's packed lengths by power-of-two bucket: (low, high inclusive, samples).
    pub histogram: Vec<(usize, usize, usize)>,
    /// Epoch 0: (min, median, max) of instruction and of response lengths.
    pub instruction_lens: (usize, usize, usize),
    pub response_lens: (usize, usize, usize),
    /// Wall time to assemble the fullest local batch of epoch 0, step 0: the first call and
    /// the mean of repeats, in ms (None if the epoch has no step).
    pub assembly_ms: Option<(f64, f64)>,
}

/// Summarises `ds` for local batches of `batch_tokens` on `world` ranks.
pub fn summarize(ds: &Dataset, batch_tokens: usize, world: usize) -> Result<Summary> {
    ensure!(world >= 1 && batch_tokens >= 1, "--world and --batch-tokens must be positive");
    ensure!(
        batch_tokens >= ds.max_sample_len(),
        "--batch-tokens {batch_tokens} cannot hold the longest sample ({} tokens); use at least the context {}",
        ds.max_sample_len(),
        ds.context()
    );
    let mut epochs = Vec::new();
    let mut assembly_ms = None;
    for e in 0..ds.num_epochs() {
        let lengths = ds.packed_lengths(e);
        let plan = plan_epoch(&lengths, batch_tokens, world);
        let (mut inst, mut resp) = (0u64, 0u64);
        for r in 0..ds.num_samples(e) {
            let s = ds.sample(e, r);
            inst += s.instruction.len() as u64;
            resp += s.response.len() as u64;
        }
        if e == 0 && !plan.steps.is_empty() {
            let fullest = (0..world).max_by_key(|&r| plan.rows(0, r).iter().map(|&i| lengths[i]).sum::<usize>()).unwrap_or(0);
            // The first call pays the page faults of reading the mapped tokens; the repeats
            // show the cost of the copying itself.
            const REPS: u32 = 5;
            let t = Instant::now();
            assemble(ds, 0, plan.rows(0, fullest), batch_tokens, true)?;
            let first = t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            for _ in 0..REPS {
                assemble(ds, 0, plan.rows(0, fullest), batch_tokens, true)?;
            }
            assembly_ms = Some((first, t.elapsed().as_secs_f64() * 1e3 / REPS as f64));
        }
        epochs.push(EpochSummary {
            samples: ds.num_samples(e),
            instruction_tokens: inst,
            response_tokens: resp,
            packed_tokens: lengths.iter().map(|&l| l as u64).sum(),
            steps: plan.steps.len(),
            efficiency: plan.efficiency(),
            dropped_rows: plan.dropped_rows(),
        });
    }

    let mut lens: Vec<usize> = ds.packed_lengths(0);
    lens.sort_unstable();
    let mut histogram: Vec<(usize, usize, usize)> = Vec::new();
    let mut low = 1;
    while low <= ds.context() {
        let high = (2 * low - 1).min(ds.context());
        let count = lens.partition_point(|&l| l <= high) - lens.partition_point(|&l| l < low);
        histogram.push((low, high, count));
        low *= 2;
    }
    let stats = |mut v: Vec<usize>| {
        v.sort_unstable();
        match v.len() {
            0 => (0, 0, 0),
            n => (v[0], v[n / 2], v[n - 1]),
        }
    };
    let rows = 0..ds.num_samples(0);
    Ok(Summary {
        source: ds.dir().map_or("(in memory)".to_string(), |d| d.display().to_string()),
        tokenizer_path: ds.metadata().tokenizer_info.tokenizer_path.clone(),
        tokenizer_vocab: ds.tokenizer_vocab(),
        vocab: ds.vocab(),
        context: ds.context(),
        tokens_per_epoch: ds.tokens_per_epoch(),
        batch_tokens,
        world,
        epochs,
        histogram,
        instruction_lens: stats(rows.clone().map(|r| ds.sample(0, r).instruction.len()).collect()),
        response_lens: stats(rows.map(|r| ds.sample(0, r).response.len()).collect()),
        assembly_ms,
    })
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "dataset     {}", self.source)?;
        writeln!(f, "tokenizer   {} ({} tokens; model vocabulary {})", self.tokenizer_path, self.tokenizer_vocab, self.vocab)?;
        writeln!(f, "context     {} tokens (max_seq_len {})", self.context, self.context + 1)?;
        writeln!(f, "epochs      {}, {} tokens per epoch (metadata total_length)", self.epochs.len(), self.tokens_per_epoch)?;
        writeln!(f)?;
        writeln!(f, "Packing: local batch {} tokens x {} rank(s) = global batch {}", self.batch_tokens, self.world, self.batch_tokens * self.world)?;
        writeln!(f, "{:>5} {:>10} {:>13} {:>13} {:>7} {:>7} {:>11} {:>8}", "epoch", "samples", "instruction", "response", "inst %", "steps", "efficiency", "dropped")?;
        for (e, s) in self.epochs.iter().enumerate() {
            let total = (s.instruction_tokens + s.response_tokens).max(1) as f64;
            writeln!(
                f,
                "{e:>5} {:>10} {:>13} {:>13} {:>6.1}% {:>7} {:>10.2}% {:>8}",
                s.samples,
                s.instruction_tokens,
                s.response_tokens,
                100.0 * s.instruction_tokens as f64 / total,
                s.steps,
                100.0 * s.efficiency,
                s.dropped_rows
            )?;
        }
        let steps: usize = self.epochs.iter().map(|e| e.steps).sum();
        let estimate = total_steps_estimate(self.epochs.len(), self.tokens_per_epoch, self.batch_tokens * self.world);
        writeln!(f, "steps over all epochs: {steps} (SPEC §7 estimate floor(epochs * tokens_per_epoch / global batch) = {estimate})")?;
        if let Some((first, warm)) = self.assembly_ms {
            writeln!(f, "assembly of one local batch ({} tokens): {first:.3} ms (first call), {warm:.3} ms (repeated)", self.batch_tokens)?;
        }
        writeln!(f)?;
        let (il, rl) = (self.instruction_lens, self.response_lens);
        writeln!(f, "Epoch 0 lengths (min / median / max): instruction {} / {} / {}, response {} / {} / {}", il.0, il.1, il.2, rl.0, rl.1, rl.2)?;
        writeln!(f, "{:>15} {:>10}", "packed length", "samples")?;
        let most = self.histogram.iter().map(|h| h.2).max().unwrap_or(0).max(1);
        for &(low, high, count) in &self.histogram {
            let bar = "#".repeat((count * 40).div_ceil(most));
            writeln!(f, "{:>7}..{:<6} {count:>10} {bar}", low, high)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::demo::{build, DemoConfig};

    #[test]
    fn summary_counts_match_the_dataset() {
        let demo = build(&DemoConfig { digits: 2, train_samples: 300, heldout_samples: 10, epochs: 2, seed: 0 }).unwrap();
        let s = summarize(&demo.train, 64, 2).unwrap();
        assert_eq!(s.epochs.len(), 2);
        let e0 = &s.epochs[0];
        assert_eq!(e0.samples, 300);
        assert_eq!(e0.instruction_tokens + e0.response_tokens, demo.train.tokens_per_epoch());
        assert_eq!(e0.packed_tokens, e0.instruction_tokens + e0.response_tokens - 300);
        assert_eq!(s.histogram.iter().map(|h| h.2).sum::<usize>(), 300);
        assert_eq!(s.histogram.last().unwrap().1, 16);
        assert!(e0.efficiency > 0.8 && e0.steps > 0 && s.assembly_ms.is_some());
        let text = s.to_string();
        assert!(text.contains("global batch 128") && text.contains("packed length"), "{text}");
        assert!(summarize(&demo.train, 8, 1).is_err(), "a batch smaller than a sample");
    }
}
