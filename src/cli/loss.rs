//! `hrm-cu loss`: forward-only metrics of a model on the first batches of a dataset.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::data::Dataset;
use crate::model::cuda::EpilogueGemms;
use crate::optim::{AdamAtan2, AdamCoeffs};
use crate::train::eval::{evaluate, Coverage};
use crate::train::{make_engine, open_gpu, Device};

#[derive(Args, Debug)]
pub struct LossArgs {
    /// An export directory, a checkpoint or a run directory (EMA weights when present)
    #[arg(long)]
    pub model: PathBuf,
    /// A dataset directory in the SPEC §8 layout
    #[arg(long)]
    pub data: PathBuf,
    /// Tokens per batch (world size 1)
    #[arg(long)]
    pub batch_tokens: usize,
    /// Batches of epoch 0 to evaluate
    #[arg(long)]
    pub steps: usize,
    /// Score the instruction tokens too (SPEC §4 target_only = false)
    #[arg(long)]
    pub train_on_instruction: bool,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
}

/// Prints `{"loss":..,"accuracy":..,"exact_accuracy":..,"tokens":..,"steps":..}`: each metric
/// the mean over the steps of its per-step value, `tokens` the valid labels in all.
pub fn run(args: LossArgs) -> Result<()> {
    let params = crate::interchange::load_init(&args.model)?;
    let ds = Dataset::open(&args.data)?;
    let optimizer = AdamAtan2::new(&params, AdamCoeffs::from_config(&Default::default()));
    let gpu = open_gpu(args.device)?;
    let mut engine = make_engine(gpu.as_ref(), params, optimizer, false, EpilogueGemms::default())?;
    let m = evaluate(&mut *engine, &ds, 0, args.batch_tokens, !args.train_on_instruction, Coverage::FirstSteps(args.steps))?;
    println!("{}", serde_json::to_string(&m)?);
    Ok(())
}
