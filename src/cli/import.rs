//! `hrm-cu import`: an interchange-format model (SPEC §9) to a fresh checkpoint.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::checkpoint::{save, tensors::describe, TrainState};
use crate::config::TrainConfig;
use crate::interchange::import;
use crate::optim::{AdamAtan2, AdamCoeffs};

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// Interchange model directory (config.json + model.safetensors)
    #[arg(long)]
    pub model: PathBuf,
    /// Checkpoint directory to write (replaced if it exists)
    #[arg(long)]
    pub out: PathBuf,
}

/// Writes a checkpoint at step 0 with a fresh optimiser whose EMA is the imported weights,
/// so that it can start a run with `--init` (or be exported again).
pub fn run(args: ImportArgs) -> Result<()> {
    let params = import(&args.model)?;
    let train_config = TrainConfig::default();
    let optimizer = AdamAtan2::new(&params, AdamCoeffs::from_config(&train_config));
    let state = TrainState::new(params.config, train_config);
    save(&args.out, &params, &optimizer, &state)?;
    println!("imported {} ({}) into checkpoint {}", args.model.display(), describe(&params.config), args.out.display());
    Ok(())
}
