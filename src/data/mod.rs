//! Training data: the dataset layout of SPEC §8, the multipack sampler, PrefixLM batch
//! assembly (SPEC §4) and the background loader, plus the in-memory demo task.
//!
//! The path of one batch, identical on every rank:
//!
//! ```text
//! Dataset::open(dir)            validate tokens.npy, epoch_<N>/*.npy, metadata.json
//! Dataset::packed_lengths(e)    [rows] inst_len + resp_len - 1
//! multipack::plan_epoch         steps -> ranks -> rows      (the same plan on every rank)
//! batch::assemble               this rank's rows -> PackedBatch of batch_tokens slots
//! loader::Loader                the two above on a background thread, prefetched
//! ```
//!
//! Around it: [`npy`] reads and writes the `.npy` arrays, [`prepare`] builds a dataset from
//! JSONL (`hrm-cu data prepare`), [`inspect`] summarises one, [`demo`] makes the small
//! addition task in memory, and [`synthetic`] makes random batches for checks and benchmarks.

pub mod batch;
pub mod dataset;
pub mod demo;
pub mod inspect;
pub mod loader;
pub mod multipack;
pub mod npy;
pub mod prepare;
pub mod synthetic;

pub use batch::{assemble, pack_pairs, PackedBatch, IGNORE_LABEL};
pub use dataset::{Dataset, EpochIndex, Metadata, Sample, TokenSlice, TokenizerInfo};
pub use loader::{total_steps_estimate, DataPosition, Loader, LoaderConfig};
pub use multipack::{plan_epoch, EpochPlan};

/// Fisher–Yates shuffle: every permutation equally likely, deterministic in the generator.
pub(crate) fn shuffle<T>(rng: &mut crate::rng::Rng, v: &mut [T]) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
}
