//! The `hrm-cu` command line: one subcommand per capability.
//!
//! Subcommands whose capability has not landed yet say so and exit non-zero; none pretends
//! to work.

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};

use crate::gpu::Gpu;

mod data;
mod export;
mod import;
mod loss;
mod plot;
mod train;

#[derive(Parser, Debug)]
#[command(name = "hrm-cu", version, about = "A from-scratch, CUDA-native trainer for the HRM-Text model family")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a model (fresh or from --init) and write checkpoints
    Train(train::TrainArgs),
    /// Evaluate the loss and accuracies of a model on a dataset (forward only)
    Loss(loss::LossArgs),
    /// Run the published benchmarks (GSM8k, MATH, MMLU, ...)
    Eval(Unfinished),
    /// Generate text greedily from a prompt
    Generate(Unfinished),
    /// Write a checkpoint in the Hugging Face layout (SPEC §9)
    Export(export::ExportArgs),
    /// Read a Hugging Face-layout model into a checkpoint
    Import(import::ImportArgs),
    /// Dataset tools: prepare, inspect, batches
    Data(data::DataArgs),
    /// Time kernels and training steps against the card's measured ceilings
    Bench(BenchArgs),
    /// Check every GPU kernel against its CPU reference on this machine's GPU
    Selftest(SelftestArgs),
    /// Draw a run's metrics.jsonl (loss, accuracies, lr, gradient norm, throughput) as a PNG
    Plot(plot::PlotArgs),
}

/// Arguments of a subcommand whose capability has not landed yet.
#[derive(Args, Debug)]
pub struct Unfinished {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    rest: Vec<String>,
}

#[derive(Args, Debug)]
pub struct SelftestArgs {
    /// Run only the checks whose name contains this text
    #[arg(long)]
    pub filter: Option<String>,
    /// Seed of the random inputs (default: from the clock, printed so a failure replays)
    #[arg(long)]
    pub seed: Option<u64>,
    /// GPU ordinal
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to time (the targets of `hrm_cu::bench::TARGETS`)
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(
        crate::bench::TARGETS.iter().map(|t| clap::builder::PossibleValue::new(t.name).help(t.about))))]
    pub target: String,
    /// GPU ordinal
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// `bench attention`: instead of timing, write a check batch, our outputs for it and the
    /// bench batches' sample tables to this directory, for `tools/attention_torch_check.py`
    #[arg(long)]
    pub dump: Option<std::path::PathBuf>,
    /// Options of `bench train`
    #[command(flatten, next_help_heading = "bench train")]
    pub train: crate::bench::train::TrainBenchArgs,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Selftest(args) => selftest(args),
        Command::Train(args) => train::run(args),
        Command::Loss(args) => loss::run(args),
        Command::Eval(_) => unfinished("eval", "the evaluation engine"),
        Command::Generate(_) => unfinished("generate", "the evaluation engine"),
        Command::Export(args) => export::run(args),
        Command::Import(args) => import::run(args),
        Command::Data(args) => data::run(args),
        Command::Bench(args) => bench(args),
        Command::Plot(args) => plot::run(args),
    }
}

fn unfinished(command: &str, arrives_with: &str) -> Result<()> {
    bail!("`hrm-cu {command}` is not implemented yet; it arrives with {arrives_with}")
}

fn bench(args: BenchArgs) -> Result<()> {
    let target = crate::bench::TARGETS.iter().find(|t| t.name == args.target).expect("clap accepts only listed targets");
    let gpu = Gpu::open(args.gpu)?;
    // The targets with options of their own.
    match (target.name, &args.dump) {
        ("train", _) => return crate::bench::train::run(&gpu, &args.train),
        ("attention", Some(dir)) => return crate::bench::attention::dump(&gpu, dir),
        (_, Some(_)) => anyhow::bail!("--dump applies to `bench attention` only"),
        _ => {}
    }
    (target.run)(&gpu)
}

fn selftest(args: SelftestArgs) -> Result<()> {
    let gpu = Gpu::open(args.gpu)?;
    let seed = args.seed.unwrap_or_else(|| crate::rng::Rng::from_time().next_u64());
    let failed = crate::selftest::run(&gpu, args.filter.as_deref(), seed)?;
    if failed > 0 {
        bail!("selftest: {failed} check(s) failed (replay with --seed {seed})");
    }
    println!("selftest: all checks passed");
    Ok(())
}
