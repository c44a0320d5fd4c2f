//! `hrm-cu plot`: a run's training curves as a PNG.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run directory (`hrm-cu train --out`) whose metrics.jsonl to plot
    #[arg(long)]
    pub run: PathBuf,
    /// Where to write the PNG (default: RUN/metrics.png)
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: PlotArgs) -> Result<()> {
    let out = crate::train::plot::plot_run(&args.run, args.out.as_deref())?;
    println!("wrote {}", out.display());
    Ok(())
}
