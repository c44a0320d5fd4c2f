//! The training data loader: a background thread that plans each epoch (multipack) and
//! assembles this rank's batches ahead of the trainer, through a bounded queue, so the
//! GPU never waits on the host.
//!
//! Epochs run in order, `0..epochs`. A position names one step of one epoch; a checkpoint
//! stores the position of the next batch to train on, and a loader started from it yields
//! exactly what the uninterrupted run would have yielded from there.
//!
//! With K micro-batches per step (gradient accumulation, `--micro-batches K`) each rank is K
//! virtual ranks: the plan has `world * K` bins of `batch_tokens / K` slots, and rank `r`
//! gets, per step, the bins of virtual ranks `r*K .. r*K + K - 1` in that order, each packed
//! into its own `batch_tokens / K` slots. A run of K micro-batches on W GPUs therefore trains
//! on exactly the batches of a run on `W*K` GPUs with `batch_tokens / K` each; K = 1 is the
//! plain plan of SPEC §8.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::batch::{assemble, PackedBatch};
use super::dataset::Dataset;
use super::multipack::plan_epoch;

/// Batches assembled ahead of the trainer by default.
pub const DEFAULT_PREFETCH: usize = 4;

/// Where a run is in its data: step `step` (from 0) of epoch `epoch` (from 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: usize,
    pub step: usize,
}

impl DataPosition {
    /// The position after this one. A step past the end of an epoch is read by the loader as
    /// the start of the next epoch, so `next()` needs no knowledge of epoch lengths.
    pub fn next(self) -> DataPosition {
        DataPosition { epoch: self.epoch, step: self.step + 1 }
    }
}

/// What one rank loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoaderConfig {
    pub rank: usize,
    pub world: usize,
    /// Slots of this rank's batch: `global_batch_tokens / world` (SPEC §7).
    pub batch_tokens: usize,
    /// Micro-batches per step, each of `batch_tokens / micro_batches` slots (which must
    /// divide evenly); 1: the whole batch at once.
    pub micro_batches: usize,
    /// Labels only on responses (SPEC §4).
    pub target_only: bool,
    /// Epochs to run; the dataset must hold at least this many.
    pub epochs: usize,
    /// Batches assembled ahead (the queue's bound), at least 1.
    pub prefetch: usize,
}

/// A step's position and its micro-batches, in order (one when `micro_batches` is 1).
type Item = Result<(DataPosition, Vec<PackedBatch>)>;

/// Yields `(position, micro-batches)` for every step of every epoch from a start position,
/// in order.
pub struct Loader {
    rx: Option<Receiver<Item>>,
    worker: Option<JoinHandle<()>>,
}

impl Loader {
    /// Checks the configuration against the dataset and starts the background thread.
    pub fn new(dataset: Arc<Dataset>, cfg: LoaderConfig, from: DataPosition) -> Result<Loader> {
        ensure!(cfg.world >= 1 && cfg.rank < cfg.world, "rank {} is not in 0..{} (world size)", cfg.rank, cfg.world);
        ensure!(cfg.prefetch >= 1, "prefetch must be at least 1");
        dataset.require_epochs(cfg.epochs)?;
        let k = cfg.micro_batches;
        let micro_tokens = micro_batch_tokens(cfg.batch_tokens, k)?;
        ensure!(
            micro_tokens >= dataset.max_sample_len(),
            "a {} of {micro_tokens} tokens cannot hold the dataset's longest sample ({} tokens; context {}): \
             raise the global batch to at least world size x micro-batches x context = {}",
            if k == 1 { "local batch".to_string() } else { format!("micro-batch (1/{k} of the local batch)") },
            dataset.max_sample_len(),
            dataset.context(),
            cfg.world * k * dataset.context()
        );
        ensure!(
            from.epoch < cfg.epochs || from == (DataPosition { epoch: cfg.epochs, step: 0 }),
            "data position epoch {} step {} is past the {} epochs of this run",
            from.epoch,
            from.step,
            cfg.epochs
        );
        let (tx, rx) = sync_channel(cfg.prefetch);
        let worker = std::thread::Builder::new()
            .name(format!("hrm-data-rank{}", cfg.rank))
            .spawn(move || {
                let mut first_step = from.step;
                for epoch in from.epoch..cfg.epochs {
                    // Every micro-batch is a virtual rank of its own (module doc).
                    let plan = plan_epoch(&dataset.packed_lengths(epoch), micro_tokens, cfg.world * k);
                    if first_step > plan.steps.len() {
                        let _ = tx.send(Err(anyhow!(
                            "data position epoch {epoch} step {first_step} is past the end of that epoch ({} steps): \
                             was the checkpoint trained on another dataset, world size, batch size or micro-batch count?",
                            plan.steps.len()
                        )));
                        return;
                    }
                    for step in first_step..plan.steps.len() {
                        let virtual_ranks = cfg.rank * k..(cfg.rank + 1) * k;
                        let batch = virtual_ranks
                            .map(|v| assemble(&dataset, epoch, plan.rows(step, v), micro_tokens, cfg.target_only))
                            .collect::<Result<Vec<_>>>()
                            .map(|micro_batches| (DataPosition { epoch, step }, micro_batches));
                        let failed = batch.is_err();
                        // A send fails only when the Loader was dropped: stop quietly.
                        if tx.send(batch).is_err() || failed {
                            return;
                        }
                    }
                    first_step = 0;
                }
            })
            .context("starting the data loader thread")?;
        Ok(Loader { rx: Some(rx), worker: Some(worker) })
    }
}

impl Iterator for Loader {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        let rx = self.rx.as_ref()?;
        match rx.recv() {
            Ok(item) => Some(item),
            // The worker finished (or died): a panic becomes an error, the end becomes None.
            Err(_) => {
                self.rx = None;
                let worker = self.worker.take()?;
                worker.join().err().map(|panic| {
                    let msg = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                    Err(anyhow!("the data loader thread panicked: {}", msg.unwrap_or_default()))
                })
            }
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Dropping the receiver first makes a worker blocked on a full queue return.
        self.rx = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// Slots of one of `micro_batches` equal micro-batches of a `batch_tokens` batch.
pub fn micro_batch_tokens(batch_tokens: usize, micro_batches: usize) -> Result<usize> {
    ensure!(
        micro_batches >= 1 && batch_tokens % micro_batches == 0,
        "--micro-batches {micro_batches}: the local batch of {batch_tokens} tokens does not divide into {micro_batches} equal micro-batches"
    );
    Ok(batch_tokens / micro_batches)
}

/// `floor(epochs * tokens_per_epoch / global_batch_tokens)`: the step count the schedule and
/// the bp warm-up use (SPEC §7); multipack may run a few steps more or fewer.
pub fn total_steps_estimate(epochs: usize, tokens_per_epoch: u64, global_batch_tokens: usize) -> u64 {
    (epochs as u128 * tokens_per_epoch as u128 / global_batch_tokens.max(1) as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset::tests::info;
    use crate::data::dataset::EpochIndex;
    use crate::rng::Rng;

    /// Two epochs of 300 random samples (packed lengths 2..=33) over one shared token array.
    fn dataset() -> Arc<Dataset> {
        let mut rng = Rng::new(9);
        let mut tokens = Vec::new();
        let mut spans = Vec::new();
        for _ in 0..300 {
            let (il, rl) = (1 + rng.below(16) as usize, 1 + rng.below(17) as usize + 1);
            spans.push((tokens.len(), il, tokens.len() + il, rl));
            tokens.extend((0..il + rl).map(|_| rng.below(50) as u32));
        }
        let epochs = (0..2)
            .map(|e| {
                let mut idx = EpochIndex::default();
                for i in 0..spans.len() {
                    let (is, il, rs, rl) = spans[(i * (e + 1) * 7) % spans.len()];
                    idx.push(is, il, rs, rl);
                }
                idx
            })
            .collect();
        Arc::new(Dataset::from_parts(info(50), 40, tokens, epochs).unwrap())
    }

    fn cfg(rank: usize) -> LoaderConfig {
        LoaderConfig { rank, world: 2, batch_tokens: 64, micro_batches: 1, target_only: true, epochs: 2, prefetch: 2 }
    }

    /// Rank `rank` of 2 with 128-token batches in 2 micro-batches: 4 virtual ranks of 64.
    fn micro_cfg(rank: usize) -> LoaderConfig {
        LoaderConfig { batch_tokens: 128, micro_batches: 2, ..cfg(rank) }
    }

    #[test]
    fn yields_every_planned_step_of_every_epoch_in_order() {
        let ds = dataset();
        let got: Vec<_> = Loader::new(ds.clone(), cfg(1), DataPosition::default()).unwrap().map(Result::unwrap).collect();
        let mut want = Vec::new();
        for epoch in 0..2 {
            let plan = plan_epoch(&ds.packed_lengths(epoch), 64, 2);
            for step in 0..plan.steps.len() {
                want.push((DataPosition { epoch, step }, vec![assemble(&ds, epoch, plan.rows(step, 1), 64, true).unwrap()]));
            }
        }
        assert!(want.len() > 10);
        assert_eq!(got, want);
    }

    #[test]
    fn micro_batches_are_the_bins_of_consecutive_virtual_ranks() {
        let ds = dataset();
        let got: Vec<_> = Loader::new(ds.clone(), micro_cfg(1), DataPosition::default()).unwrap().map(Result::unwrap).collect();
        let mut want = Vec::new();
        for epoch in 0..2 {
            // world 2 x 2 micro-batches = 4 bins of 128 / 2 = 64 slots; rank 1 is virtual ranks 2 and 3.
            let plan = plan_epoch(&ds.packed_lengths(epoch), 64, 4);
            for step in 0..plan.steps.len() {
                let micro = [2, 3].map(|v| assemble(&ds, epoch, plan.rows(step, v), 64, true).unwrap());
                want.push((DataPosition { epoch, step }, micro.to_vec()));
            }
        }
        assert!(want.len() > 5);
        assert!(got.iter().all(|(_, m)| m.iter().all(|b| b.num_samples() > 0)), "every micro-batch of a full step holds samples");
        assert_eq!(got, want);
    }

    #[test]
    fn resuming_from_a_position_continues_exactly() {
        let ds = dataset();
        for config in [cfg(0), micro_cfg(0)] {
            let all: Vec<_> = Loader::new(ds.clone(), config, DataPosition::default()).unwrap().map(Result::unwrap).collect();
            let last_of_epoch0 = all.iter().rposition(|(p, _)| p.epoch == 0).unwrap();
            for cut in [1, last_of_epoch0, all.len() - 1] {
                let resume_at = all[cut - 1].0.next();
                let rest: Vec<_> = Loader::new(ds.clone(), config, resume_at).unwrap().map(Result::unwrap).collect();
                assert_eq!(rest, all[cut..], "{} micro-batches, resumed after {:?}", config.micro_batches, all[cut - 1].0);
            }
        }
        let done = DataPosition { epoch: 2, step: 0 };
        assert_eq!(Loader::new(ds.clone(), cfg(0), done).unwrap().count(), 0);
        let past = DataPosition { epoch: 0, step: 10_000 };
        let e = format!("{:#}", Loader::new(ds, cfg(0), past).unwrap().next().unwrap().unwrap_err());
        assert!(e.contains("past the end of that epoch"), "{e}");
    }

    #[test]
    fn bad_configurations_are_refused_up_front() {
        let ds = dataset();
        let err = |c: LoaderConfig| format!("{:#}", Loader::new(ds.clone(), c, DataPosition::default()).err().unwrap());
        assert!(err(LoaderConfig { rank: 2, ..cfg(0) }).contains("rank 2 is not in 0..2"));
        assert!(err(LoaderConfig { epochs: 3, ..cfg(0) }).contains("--epochs 3"));
        assert!(err(LoaderConfig { batch_tokens: 20, ..cfg(0) }).contains("cannot hold the dataset's longest sample"));
        assert!(err(LoaderConfig { micro_batches: 2, ..cfg(0) }).contains("micro-batch (1/2 of the local batch) of 32 tokens cannot hold"));
        assert!(err(LoaderConfig { micro_batches: 3, ..micro_cfg(0) }).contains("--micro-batches 3: the local batch of 128 tokens does not divide"));
    }

    #[test]
    fn dropping_a_loader_midway_stops_its_thread() {
        let mut loader = Loader::new(dataset(), LoaderConfig { prefetch: 1, ..cfg(0) }, DataPosition::default()).unwrap();
        assert!(loader.next().unwrap().is_ok());
        drop(loader); // joins the worker, which is blocked on the full queue: must not hang
    }

    #[test]
    fn total_steps_follow_spec() {
        assert_eq!(total_steps_estimate(4, 1_000_000, 196_608), 20);
        assert_eq!(total_steps_estimate(1, 196_607, 196_608), 0);
    }
}
