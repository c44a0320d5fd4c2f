//! `hrm-cu export`: a checkpoint to the interchange format (SPEC §9).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use crate::checkpoint::{is_checkpoint, run_dir};
use crate::interchange::{export, ExportDtype, CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE};

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Checkpoint directory, or a run directory (its newest complete checkpoint is exported)
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output directory (created if needed)
    #[arg(long)]
    pub out: PathBuf,
    /// Export the master weights instead of their EMA
    #[arg(long)]
    pub no_ema: bool,
    /// Precision of the exported weights (z_L_init is bf16 either way)
    #[arg(long, value_enum, default_value_t = ExportDtype::Bf16)]
    pub dtype: ExportDtype,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let checkpoint = if is_checkpoint(&args.checkpoint) {
        args.checkpoint.clone()
    } else {
        match run_dir::find_resume(&args.checkpoint)? {
            Some(dir) => dir,
            None => bail!("{} is neither a checkpoint nor a run directory with a complete checkpoint", args.checkpoint.display()),
        }
    };
    let summary = export(&checkpoint, &args.out, !args.no_ema, args.dtype)?;
    let weights = if args.no_ema { "master" } else { "EMA" };
    println!("exported the {weights} weights of {} to {} ({:?})", checkpoint.display(), args.out.display(), args.dtype);
    let tokenizer = if summary.tokenizer.is_some() { format!(", {TOKENIZER_FILE}") } else { String::new() };
    println!("wrote {CONFIG_FILE}, {MODEL_FILE}{tokenizer}");
    for note in &summary.notes {
        println!("note: {note}");
    }
    Ok(())
}
