//! `hrm-cu train`: fresh, from `--init`, or `--resume`d.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::config::{NetName, SizeName, TrainConfig};
use crate::data::demo::DemoConfig;
use crate::model::cuda::EpilogueGemms;
use crate::train::{self, DataSource, Device, ModelSource, TrainOptions};

/// An option that is on or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A dataset directory in the SPEC §8 layout, or `demo` for the built-in addition task
    #[arg(long)]
    pub data: String,
    /// Backbone size of a fresh model (SPEC §1)
    #[arg(long, value_enum, default_value_t = SizeName::Tiny)]
    pub size: SizeName,
    /// Recurrence of a fresh model (SPEC §1)
    #[arg(long, value_enum, default_value_t = NetName::Hrm)]
    pub net: NetName,
    /// Seed of a fresh model's weights
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Start from these weights: an export directory, a checkpoint or a run (EMA weights)
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// The SPEC §7 fine-tuning recipe (lr 3e-5, cosine to 0.1, no warm-up, 5 epochs,
    /// 32768-token batches, EMA 0.999, no bp warm-up); other flags still override it
    #[arg(long)]
    pub sft: bool,
    /// Run directory: metrics.jsonl and checkpoints
    #[arg(long, default_value = "runs/train")]
    pub out: PathBuf,
    /// Continue the run in --out from its newest complete checkpoint
    #[arg(long)]
    pub resume: bool,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Tokens per optimiser step (the global batch; default SPEC §7's, 2048 for the demo)
    #[arg(long)]
    pub batch_tokens: Option<usize>,
    /// Stop after this many steps (also the schedule's length); default: the data's epochs
    #[arg(long)]
    pub steps: Option<u64>,
    /// Passes over the data (default 4; 30 for the demo)
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Peak learning rate (default 2.2e-4; 1e-3 for the demo)
    #[arg(long)]
    pub lr: Option<f32>,
    /// Cosine floor as a fraction of --lr (1.0: constant after warm-up)
    #[arg(long)]
    pub lr_min_ratio: Option<f32>,
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Fixed hrm gradient depth instead of the warm-up from 2 to 5 (SPEC §3)
    #[arg(long)]
    pub bp_steps: Option<usize>,
    /// Keep only the input of each pass with gradient and recompute its activations in the
    /// backward: the same results in less memory (XL hrm at bp_steps 5: ~1 pass's activations
    /// instead of 5), for one more forward of those passes; also on --resume
    #[arg(long)]
    pub recompute: bool,
    /// Split each step's batch into K micro-batches of --batch-tokens / K and sum their
    /// gradients before one update (gradient accumulation): activation memory of one
    /// micro-batch, the optimiser steps of K times the GPUs; --resume needs the run's K
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub micro_batches: usize,
    #[arg(long)]
    pub weight_decay: Option<f32>,
    #[arg(long)]
    pub ema_decay: Option<f32>,
    /// Also put labels on the instruction (SPEC §4 target_only = false)
    #[arg(long)]
    pub train_on_instruction: bool,
    /// Checkpoint every N steps (besides epoch ends, the end, and --checkpoint-minutes)
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Checkpoint when this many minutes passed since the last one
    #[arg(long, default_value_t = 20.0)]
    pub checkpoint_minutes: f64,
    /// Checkpoints kept in the run directory
    #[arg(long, default_value_t = 3)]
    pub keep_last: usize,
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,
    /// Evaluate the held-out split (demo) every N steps
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Wrap step N in cuProfilerStart/Stop so that `ncu --profile-from-start off` profiles
    /// that step alone (GPU only; docs/perf.md, "Observing a run")
    #[arg(long, value_name = "N")]
    pub profile_step: Option<u64>,
    /// Capture each step in a CUDA graph and replay it: on by default on the GPU (docs/perf.md,
    /// "CUDA graphs"); `off` runs every step eagerly
    #[arg(long, value_name = "on|off")]
    pub cuda_graph: Option<Switch>,
    /// Which products run as our Hopper GEMM with the following pass in its epilogue
    /// (docs/design/gemm-epilogues.md): none (cuBLASLt, then the passes), gate_up with SwiGLU,
    /// also qkv with RoPE, or also down's input gradient with SwiGLU's backward. The routes round the products alike but may add in another
    /// order, so a run resumed on another route continues on slightly different numbers
    #[arg(long, value_enum, default_value_t = EpilogueGemms::default())]
    pub epilogue_gemms: EpilogueGemms,
    /// The file that remembers, per GPU and cuBLASLt version, the algorithm each product ran
    /// (default ~/.cache/hrm-cu/gemm-algorithms.json; HRM_CU_CACHE_DIR or XDG_CACHE_HOME move
    /// it). Every run on the same GPU and library after the first runs the algorithms the first
    /// recorded, so two runs of one command give the same bits. `off`: tune every product anew
    #[arg(long, value_name = "FILE|off")]
    pub gemm_algorithms: Option<String>,
    /// Demo: digits of the larger operand
    #[arg(long, default_value_t = 2)]
    pub demo_digits: usize,
    /// Demo: distinct training problems
    #[arg(long, default_value_t = 4000)]
    pub demo_train_samples: usize,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let demo = args.data == "demo";
    let mut cfg = if args.sft { TrainConfig::sft() } else { TrainConfig::default() };
    if demo {
        // A small task for a small model: bigger steps, no long warm-up, 30 passes over the
        // 4000 problems (a tiny hrm reaches ~98% held-out exact accuracy; docs/perf.md).
        cfg.lr = 1e-3;
        cfg.warmup_steps = 20;
        cfg.global_batch_tokens = 2048;
        cfg.ema_decay = 0.99;
        cfg.epochs = 30;
    }
    cfg.seed = args.seed;
    cfg.max_steps = args.steps;
    cfg.fixed_bp_steps = args.bp_steps;
    cfg.recompute = args.recompute;
    cfg.micro_batches = args.micro_batches;
    cfg.target_only = !args.train_on_instruction;
    macro_rules! set {
        ($($field:ident <- $arg:expr),*) => { $(if let Some(v) = $arg { cfg.$field = v; })* };
    }
    set!(global_batch_tokens <- args.batch_tokens, epochs <- args.epochs, lr <- args.lr, lr_min_ratio <- args.lr_min_ratio,
         warmup_steps <- args.warmup_steps, weight_decay <- args.weight_decay, ema_decay <- args.ema_decay);

    let data = if demo {
        DataSource::Demo(DemoConfig { digits: args.demo_digits, train_samples: args.demo_train_samples, epochs: cfg.epochs, seed: args.seed, ..DemoConfig::default() })
    } else {
        DataSource::Dir(PathBuf::from(&args.data))
    };
    let model = match args.init {
        Some(dir) => ModelSource::Init(dir),
        None => ModelSource::Fresh { size: args.size, net: args.net, seed: args.seed },
    };
    let opts = TrainOptions {
        data,
        model,
        train: cfg,
        run_dir: args.out,
        resume: args.resume,
        device: args.device,
        checkpoint_every_steps: args.checkpoint_every,
        checkpoint_every_minutes: args.checkpoint_minutes,
        keep_last: args.keep_last,
        log_every: args.log_every.max(1),
        eval_every: args.eval_every.or(demo.then_some(50)),
        profile_step: args.profile_step,
        cuda_graph: args.cuda_graph.map(|s| s == Switch::On),
        epilogue_gemms: args.epilogue_gemms,
        gemm_store: match args.gemm_algorithms.as_deref() {
            Some("off") => None,
            Some(path) => Some(PathBuf::from(path)),
            None => train::gemm_store::default_path(),
        },
    };
    if let Some(m) = train::run(&opts)? {
        println!("{}", serde_json::to_string(&m)?);
    }
    Ok(())
}
