//! `hrm-cu data`: prepare a dataset, inspect one, print a rank's multipack schedule.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use clap::{Args, Subcommand};

use crate::data::inspect::summarize;
use crate::data::loader::micro_batch_tokens;
use crate::data::prepare::{self, PrepareOptions, SamplingConfig};
use crate::data::{plan_epoch, Dataset};

#[derive(Args, Debug)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Tokenize instruction/response JSONL into a dataset directory (SPEC §8)
    ///
    /// Reads JSONL rows `{"condition": "cot,noisy", "instruction": "...", "response": "..."}`
    /// (Parquet is not read: convert it to JSONL first), tokenizes them, samples the epochs and
    /// writes tokens.npy, epoch_<N>/*.npy, metadata.json, tokenizer.json and coverage.md.
    ///
    /// Sampling rules come from `--config rules.json` (JSON; YAML is not read):
    ///
    ///   {"rules": [{"prefix": "math/", "max_per_file": 50000, "repeat": 2, "long_context": "drop"},
    ///              {"prefix": "chat", "max_per_file": 10000}]}
    ///
    /// A file's rule is the first whose prefix starts the file's path relative to the --input
    /// directory it was found in (a file given directly: its name); a rule with prefix ""
    /// placed last is the catch-all. Unmatched files take every row once and truncate long
    /// responses (max_per_file: all, repeat: 1, long_context: "truncate"). Per epoch a file
    /// contributes min(rows, max_per_file) distinct rows, each `repeat` times; successive
    /// epochs continue through a per-file shuffled order, so every row is used once before
    /// any is used twice. Tokenized rows are held in memory (4 bytes per token).
    #[command(verbatim_doc_comment)]
    Prepare(PrepareArgs),
    /// Print a summary: samples, tokens, length histogram, prefix/response split, packing
    Inspect(InspectArgs),
    /// Print one rank's multipack schedule of one epoch, one JSON object per step
    Batches(BatchesArgs),
    /// Write the built-in addition task (train and held-out) as SPEC §8 dataset directories
    Demo(DemoArgs),
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Output directory: `train/` and `heldout/` are written inside it
    #[arg(long)]
    pub out: PathBuf,
    /// Digits of the larger operand
    #[arg(long, default_value_t = 2)]
    pub digits: usize,
    /// Distinct training problems
    #[arg(long, default_value_t = 4000)]
    pub train_samples: usize,
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// JSONL files, or directories searched recursively for *.jsonl
    #[arg(long = "input", required = true, num_args = 1..)]
    pub inputs: Vec<PathBuf>,
    /// A Hugging Face tokenizer.json
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Output directory (must not exist or be empty)
    #[arg(long)]
    pub out: PathBuf,
    /// Epochs to sample
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    /// max_seq_len: the model's context plus one
    #[arg(long, default_value_t = 4097)]
    pub context: usize,
    /// Sampling rules (JSON, see above)
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Drop rows whose response (end-of-answer token included, after truncation) is shorter
    #[arg(long, default_value_t = 2)]
    pub min_resp_length: usize,
    /// Seed of every random choice (each file's row order, each epoch's shuffle)
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Begin-of-question token
    #[arg(long, default_value = prepare::DEFAULT_BOQ)]
    pub boq: String,
    /// End-of-question token
    #[arg(long, default_value = prepare::DEFAULT_EOQ)]
    pub eoq: String,
    /// End-of-answer token
    #[arg(long, default_value = prepare::DEFAULT_EOA)]
    pub eoa: String,
    /// Condition name -> token, comma separated
    #[arg(long, default_value = prepare::DEFAULT_CONDITIONS)]
    pub conditions: String,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Dataset directory
    #[arg(long)]
    pub data: PathBuf,
    /// Slots of one rank's batch (the global batch is world x this)
    #[arg(long, default_value_t = 196_608)]
    pub batch_tokens: usize,
    /// Ranks the batch is packed for
    #[arg(long, default_value_t = 1)]
    pub world: usize,
    /// Micro-batches per rank and step (`train --micro-batches`): packed as world x K bins of
    /// batch_tokens / K
    #[arg(long, default_value_t = 1)]
    pub micro_batches: usize,
}

#[derive(Args, Debug)]
pub struct BatchesArgs {
    /// Dataset directory
    #[arg(long)]
    pub data: PathBuf,
    /// Number of ranks (bins per step)
    #[arg(long)]
    pub world: usize,
    /// The rank whose rows are printed
    #[arg(long)]
    pub rank: usize,
    /// Slots of one rank's batch: the capacity of a bin (the global batch is world x this)
    #[arg(long)]
    pub batch_tokens: usize,
    /// Epoch (from 0)
    #[arg(long)]
    pub epoch: usize,
    /// Micro-batches per rank and step (`train --micro-batches`): the plan has world x K bins
    /// of batch_tokens / K, and each line names its micro-batch
    #[arg(long, default_value_t = 1)]
    pub micro_batches: usize,
}

pub fn run(args: DataArgs) -> Result<()> {
    match args.command {
        DataCommand::Prepare(a) => prepare_cmd(a),
        DataCommand::Inspect(a) => inspect(a),
        DataCommand::Batches(a) => batches(a),
        DataCommand::Demo(a) => demo(a),
    }
}

fn demo(a: DemoArgs) -> Result<()> {
    let cfg = crate::data::demo::DemoConfig { digits: a.digits, train_samples: a.train_samples, epochs: a.epochs, seed: a.seed, ..Default::default() };
    let demo = crate::data::demo::build(&cfg)?;
    demo.train.write(&a.out.join("train"))?;
    demo.heldout.write(&a.out.join("heldout"))?;
    println!("wrote {} and {}", a.out.join("train").display(), a.out.join("heldout").display());
    Ok(())
}

fn prepare_cmd(a: PrepareArgs) -> Result<()> {
    let config = match &a.config {
        Some(path) => SamplingConfig::load(path)?,
        None => SamplingConfig::default(),
    };
    let opts = PrepareOptions {
        inputs: a.inputs,
        tokenizer: a.tokenizer,
        out: a.out,
        epochs: a.epochs,
        context: a.context,
        config,
        min_resp_length: a.min_resp_length,
        seed: a.seed,
        boq: a.boq,
        eoq: a.eoq,
        eoa: a.eoa,
        conditions: prepare::parse_conditions(&a.conditions)?,
    };
    let report = prepare::prepare(&opts)?;
    for f in report.files.iter().filter(|f| f.parse_errors > 0) {
        eprintln!("warning: {} row(s) of {} failed to parse, e.g. line {}: {}", f.parse_errors, f.path.display(), f.error_examples[0].0, f.error_examples[0].1);
    }
    let rows: usize = report.files.iter().map(|f| f.rows).sum();
    let usable: usize = report.files.iter().map(|f| f.usable).sum();
    eprintln!(
        "prepared {}: {} file(s), {rows} rows ({} failed to parse, {usable} usable), {} epoch(s) of {} samples, {} tokens; see coverage.md",
        opts.out.display(),
        report.files.len(),
        report.parse_errors(),
        report.epochs.len(),
        report.epochs.first().map_or(0, |e| e.0),
        report.tokens_written
    );
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let ds = Dataset::open(&a.data)?;
    let bin = micro_batch_tokens(a.batch_tokens, a.micro_batches)?;
    print!("{}", summarize(&ds, bin, a.world * a.micro_batches)?);
    Ok(())
}

fn batches(a: BatchesArgs) -> Result<()> {
    ensure!(a.world >= 1 && a.rank < a.world, "--rank {} is not in 0..{} (--world)", a.rank, a.world);
    let ds = Dataset::open(&a.data)?;
    ensure!(a.epoch < ds.num_epochs(), "--epoch {}: {} holds epochs 0..{}", a.epoch, a.data.display(), ds.num_epochs());
    let (bin, k) = (micro_batch_tokens(a.batch_tokens, a.micro_batches)?, a.micro_batches);
    ensure!(
        bin >= ds.max_sample_len(),
        "--batch-tokens {} / --micro-batches {k} = {bin} slots cannot hold the longest sample ({} tokens); use at least the context {}",
        a.batch_tokens,
        ds.max_sample_len(),
        ds.context()
    );
    let plan = plan_epoch(&ds.packed_lengths(a.epoch), bin, a.world * k);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    // Keys in this order and Python's json.dumps separators, so a line diffs cleanly
    // against the reference sampler's output (which has no micro-batches: K = 1 prints none).
    for (step, ranks) in plan.steps.iter().enumerate() {
        for micro in 0..k {
            let rows: Vec<String> = ranks[a.rank * k + micro].iter().map(usize::to_string).collect();
            let micro_key = if k > 1 { format!(", \"micro_batch\": {micro}") } else { String::new() };
            writeln!(out, "{{\"step\": {step}{micro_key}, \"samples\": [{}]}}", rows.join(", ")).context("writing to stdout")?;
        }
    }
    out.flush().context("writing to stdout")?;
    eprintln!(
        "epoch {}: {} steps, packing efficiency {:.2}%, {} of {} rows dropped at the end",
        a.epoch,
        plan.steps.len(),
        100.0 * plan.efficiency(),
        plan.dropped_rows(),
        plan.total_rows
    );
    Ok(())
}
