//! Training: the loop that drives an [`engine::Engine`] over the data loader.
//!
//! ```text
//! for (position, micro-batches) in loader (from the checkpoint's data position):
//!     step      = global_step + 1                         (SPEC §7: the first update is step 1)
//!     lr        = warm-up + cosine schedule at step
//!     schedule  = the net's passes, hrm's bp_steps warming up  (SPEC §3)
//!     divisor   = valid labels of the micro-batches / K   (SPEC §5, a micro-batch is a virtual rank)
//!     engine.train_micro_batches(micro-batches, schedule, lr, divisor)      (queued, not awaited)
//!     log, evaluate, checkpoint (every N steps / minutes, at each epoch end, at the end)
//! ```
//!
//! Gradient accumulation (`--micro-batches K`, default 1): a step is K micro-batches of
//! `batch_tokens / K` slots, trained as K virtual ranks (`src/data/loader.rs`): each one's CE
//! sum is divided by the mean of their valid label counts, the gradients are summed, one
//! update follows, and the step's metrics are ratios of sums over its micro-batches. Device
//! memory is that of one micro-batch; the optimiser steps are those of a run on K times the
//! GPUs. K is part of the data plan, so `--resume` must be given the run's K. Held-out
//! evaluation (the demo) still packs whole `batch_tokens` batches, so its numbers do not
//! depend on K.
//!
//! The loop never waits for a step: the engine keeps each step's metrics on the device, and
//! the loop reads them ([`Engine::read_metrics`]) only when it logs, evaluates or
//! checkpoints. The logged loss, accuracy and exact accuracy are those of the logged step
//! alone (not a mean over the logging interval). A non-finite loss is therefore found at the
//! first read after it; the engine has skipped every update since that step, so the run stops
//! with the error and a checkpoint of the weights before that step, as if it had been found
//! at once (only the compute of the steps in between is lost).
//!
//! A run lives in one directory: `metrics.jsonl` (one JSON object per logged step) and the
//! checkpoints `ckpt-<step>/` with a `latest` pointer (`src/checkpoint/run_dir.rs`).
//! `--resume` reloads the newest complete checkpoint and its data position, so the run goes
//! on exactly where the checkpoint was taken.

pub mod engine;
pub mod eval;
pub mod flops;
pub mod gemm_store;
pub mod gpu;
pub mod graph;
pub mod plot;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::checkpoint::{self, run_dir, TrainState};
use crate::config::{ModelConfig, NetName, SizeName, TrainConfig};
use crate::data::demo::{self, DemoConfig};
use crate::data::loader::micro_batch_tokens;
use crate::data::{total_steps_estimate, DataPosition, Dataset, Loader, LoaderConfig, PackedBatch};
use crate::model::cuda::EpilogueGemms;
use crate::model::params::Params;
use crate::model::schedule::{bp_steps, Schedule};
use crate::optim::{AdamAtan2, AdamCoeffs, LrSchedule};
use crate::gpu::nvtx::{self, CaptureRange, Range};
use crate::gpu::Gpu;
use crate::ops::cross_entropy::StepMetrics;
use engine::{CpuEngine, Engine, NonFiniteLoss};
use gpu::{GpuEngine, MemoryPlan};
use eval::{evaluate, step_ratios, Coverage, MeanMetrics};
use gemm_store::GemmStore;

/// Where the training data comes from.
#[derive(Clone, Debug)]
pub enum DataSource {
    /// The built-in addition task (`--data demo`), with a held-out split.
    Demo(DemoConfig),
    /// A dataset directory in the SPEC §8 layout.
    Dir(PathBuf),
}

/// Where the starting weights come from (ignored on `--resume`).
#[derive(Clone, Debug)]
pub enum ModelSource {
    Fresh { size: SizeName, net: NetName, seed: u64 },
    /// An interchange directory, a checkpoint or a run directory (EMA weights when present).
    Init(PathBuf),
}

/// The hardware a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// The GPU when one is usable, else the CPU.
    Auto,
    Cpu,
    Gpu,
}

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub data: DataSource,
    pub model: ModelSource,
    pub train: TrainConfig,
    pub run_dir: PathBuf,
    pub resume: bool,
    pub device: Device,
    /// Checkpoint every this many steps (besides epoch ends and the end of the run).
    pub checkpoint_every_steps: Option<u64>,
    /// Checkpoint when this many minutes have passed since the last one.
    pub checkpoint_every_minutes: f64,
    pub keep_last: usize,
    pub log_every: u64,
    /// Evaluate the held-out split (demo) every this many steps.
    pub eval_every: Option<u64>,
    /// Wrap this step in cuProfilerStart/Stop, so that `ncu --profile-from-start off`
    /// captures it alone (GPU only).
    pub profile_step: Option<u64>,
    /// Capture each schedule's step in a CUDA graph and replay it (GPU only, `graph.rs`);
    /// `None`: on where there is a GPU.
    pub cuda_graph: Option<bool>,
    /// Which forward products run as our Hopper GEMM with the following pass in its epilogue
    /// (GPU only).
    pub epilogue_gemms: EpilogueGemms,
    /// The GEMM algorithm store this run reads and adds to (GPU only, [`gemm_store`]); `None`:
    /// every product is tuned anew.
    pub gemm_store: Option<PathBuf>,
}

/// The training data and, for the demo, its held-out split.
struct TrainData {
    train: Arc<Dataset>,
    heldout: Option<Dataset>,
}

fn load_data(source: &DataSource) -> Result<TrainData> {
    match source {
        DataSource::Demo(cfg) => {
            let demo = demo::build(cfg)?;
            Ok(TrainData { train: Arc::new(demo.train), heldout: Some(demo.heldout) })
        }
        DataSource::Dir(dir) => Ok(TrainData { train: Arc::new(Dataset::open(dir)?), heldout: None }),
    }
}

/// Opens the GPU `device` asks for: `Gpu` must, `Auto` may (falling back to the CPU with a
/// note), `Cpu` never.
pub fn open_gpu(device: Device) -> Result<Option<Gpu>> {
    match device {
        Device::Cpu => Ok(None),
        Device::Gpu => Ok(Some(Gpu::open(0)?)),
        Device::Auto => match Gpu::open(0) {
            Ok(gpu) => Ok(Some(gpu)),
            Err(e) => {
                eprintln!("no usable GPU ({e}); running on the CPU");
                Ok(None)
            }
        },
    }
}

/// The engine on `gpu` when there is one (replaying its steps as CUDA graphs with
/// `cuda_graph`, its products routed by `epilogue_gemms`), else the CPU reference.
pub fn make_engine(gpu: Option<&Gpu>, params: Params, optimizer: AdamAtan2, cuda_graph: bool, epilogue_gemms: EpilogueGemms) -> Result<Box<dyn Engine + '_>> {
    match gpu {
        Some(gpu) => {
            let mut engine = GpuEngine::new(gpu, params, optimizer)?;
            engine.set_cuda_graphs(cuda_graph);
            engine.backend().set_epilogue_gemms(epilogue_gemms);
            Ok(Box::new(engine))
        }
        None => Ok(Box::new(CpuEngine::new(params, optimizer)?)),
    }
}

/// Fresh or resumed: the weights, the optimiser and the scalar state a run starts from.
fn starting_point(opts: &TrainOptions, data: &TrainData) -> Result<(Params, AdamAtan2, TrainState)> {
    if opts.resume {
        let ckpt_dir = run_dir::find_resume(&opts.run_dir)?.with_context(|| {
            format!("--resume: {} holds no complete checkpoint; start the run without --resume", opts.run_dir.display())
        })?;
        let ckpt = checkpoint::load(&ckpt_dir, None)?;
        eprintln!("resuming from {} (step {})", ckpt_dir.display(), ckpt.state.global_step);
        return Ok((ckpt.params, ckpt.optimizer, ckpt.state));
    }
    if !run_dir::list_checkpoints(&opts.run_dir)?.is_empty() {
        bail!("{} already holds checkpoints: pass --resume to continue that run, or choose another --out", opts.run_dir.display());
    }
    let params = match &opts.model {
        ModelSource::Fresh { size, net, seed } => Params::init(ModelConfig::new(*size, *net, data.train.tokenizer_vocab()), *seed),
        ModelSource::Init(dir) => crate::interchange::load_init(dir)?,
    };
    let optimizer = AdamAtan2::new(&params, AdamCoeffs::from_config(&opts.train));
    let mut state = TrainState::new(params.config, opts.train.clone());
    state.dataset_metadata = Some(data.train.metadata().raw.clone());
    state.dataset_dir = data.train.dir().map(Path::to_path_buf);
    Ok((params, optimizer, state))
}

/// Appends JSON lines to `metrics.jsonl`.
struct MetricsLog {
    file: File,
}

impl MetricsLog {
    fn open(run_dir: &Path) -> Result<MetricsLog> {
        let path = run_dir.join("metrics.jsonl");
        let file = OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(MetricsLog { file })
    }

    fn write(&mut self, record: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{record}").context("writing metrics.jsonl")
    }
}

/// Trains until the data or `max_steps` runs out. Returns the held-out metrics of the final
/// weights when the data has a held-out split.
pub fn run(opts: &TrainOptions) -> Result<Option<MeanMetrics>> {
    let data = load_data(&opts.data)?;
    std::fs::create_dir_all(&opts.run_dir).with_context(|| format!("creating the run directory {}", opts.run_dir.display()))?;
    let (params, optimizer, mut state) = starting_point(opts, &data)?;
    // Recomputation changes memory and time, never results: the command line decides, on
    // --resume too, and the run's checkpoints record the last setting.
    state.train_config.recompute = opts.train.recompute;
    ensure!(
        state.train_config.micro_batches == opts.train.micro_batches,
        "--resume: the run was trained with --micro-batches {}, this command asks for {}: micro-batches are virtual ranks of the \
         data plan (src/data/loader.rs), so the run continues exactly only with its own; pass --micro-batches {}",
        state.train_config.micro_batches,
        opts.train.micro_batches,
        state.train_config.micro_batches
    );
    let cfg = state.train_config.clone();
    let model = params.config;
    ensure!(
        data.train.vocab() <= model.vocab,
        "the dataset's vocabulary ({} rounded) is larger than the model's ({}): the model was made for another tokenizer",
        data.train.vocab(),
        model.vocab
    );
    let batch_tokens = cfg.global_batch_tokens; // world size 1: the local batch is the global one
    let micro_batches = cfg.micro_batches;
    let micro_tokens = micro_batch_tokens(batch_tokens, micro_batches)?;
    let estimate = total_steps_estimate(cfg.epochs, data.train.tokens_per_epoch(), cfg.global_batch_tokens);
    let total_steps = cfg.max_steps.unwrap_or(estimate).max(1);
    let lr_schedule = LrSchedule::new(&cfg, total_steps);

    let gpu = open_gpu(opts.device)?;
    if let Some(gpu) = &gpu {
        // The deepest schedule the run will use decides the activation memory (SPEC §3).
        let deepest = Schedule::for_training(&model.net, cfg.fixed_bp_steps.unwrap_or(bp_steps(&model.net, total_steps, total_steps, false).unwrap_or(0))).with_recompute(cfg.recompute);
        let plan = MemoryPlan::predict_micro_batches(&model, &deepest, batch_tokens, micro_batches)?;
        plan.check_fits(gpu).with_context(|| format!("predicted device memory of this run:\n{plan}"))?;
    }
    ensure!(opts.cuda_graph != Some(true) || gpu.is_some(), "--cuda-graph on: CUDA graphs need the GPU (--device gpu)");
    let cuda_graph = opts.cuda_graph.unwrap_or(gpu.is_some());
    if cuda_graph && micro_batches > 1 {
        eprintln!("--micro-batches {micro_batches}: steps of several micro-batches run without CUDA graphs (src/train/gpu.rs)");
    }
    if let Some(n) = opts.profile_step {
        ensure!(gpu.is_some(), "--profile-step {n}: profiling needs the GPU (--device gpu)");
        ensure!(n > state.global_step && n <= total_steps, "--profile-step {n}: this run takes steps {} to {total_steps}", state.global_step + 1);
        if nvtx::library().is_none() {
            eprintln!("--profile-step: no NVTX library ({}) on the library path: the profile carries no NVTX ranges", nvtx::LIBRARIES.join(" or "));
        }
    }
    // Useful FLOPs (src/train/flops.rs) are logged on the GPU as TFLOP/s, and as MFU where
    // the card's peak is known.
    let (on_gpu, peak_flops) = (gpu.is_some(), gpu.as_ref().and_then(|g| flops::peak_bf16_flops(&g.props)));
    let mut engine = make_engine(gpu.as_ref(), params, optimizer, cuda_graph, opts.epilogue_gemms)?;
    // A resumed run adds in the order the checkpointed one did (checkpoint::GemmAlgorithms);
    // the shapes it did not record, and those of a fresh run, run what earlier runs on this
    // GPU and library recorded in the store (the first preset of a shape wins).
    if !state.gemm_algorithms.choices.is_empty() {
        if let Some(why) = engine.use_gemm_algorithms(&state.gemm_algorithms)? {
            eprintln!("--resume: the checkpoint's GEMM algorithms do not all apply ({why}): the products may add in another order, so the run continues close to, not bit for bit as, the one before");
        }
    }
    let mut store = match (&opts.gemm_store, on_gpu) {
        (Some(path), true) => Some(GemmStore::open(path)?),
        _ => None,
    };
    if let Some(store) = &store {
        let recorded = store.for_device(&engine.gemm_algorithms().device);
        engine.use_gemm_algorithms(&recorded)?;
    }
    let first_step = state.global_step + 1;
    let loader_cfg = LoaderConfig { rank: 0, world: 1, batch_tokens, micro_batches, target_only: cfg.target_only, epochs: cfg.epochs, prefetch: 4 };
    let loader = Loader::new(data.train.clone(), loader_cfg, state.data_position)?;
    let mut log = MetricsLog::open(&opts.run_dir)?;

    let accumulation = match micro_batches {
        1 => String::new(),
        k => format!(" ({k} micro-batches of {micro_tokens})"),
    };
    eprintln!(
        "training {} ({} parameters) on {}: {} steps of {batch_tokens} tokens{accumulation}, lr {:.2e}, run dir {}",
        checkpoint::tensors::describe(&model),
        crate::model::spec::ParamLayout::new(&model).num_params(),
        engine.describe(),
        total_steps,
        cfg.lr,
        opts.run_dir.display()
    );
    let bar = ProgressBar::new(total_steps);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}").expect("valid template"));
    bar.set_position(state.global_step);

    let started = Instant::now();
    let mut last_save = Instant::now();
    let mut window = (Instant::now(), 0u64, 0.0f64); // tokens and useful FLOPs since the last log line
    let mut last_epoch = state.data_position.epoch;
    let mut last_heldout: Option<(u64, MeanMetrics)> = None; // the final weights' evaluation, when the loop made it
    let mut unread = Unread::default();
    for item in loader {
        if state.global_step >= total_steps {
            break;
        }
        let (position, micro_batches) = item?;
        let views: Vec<_> = micro_batches.iter().map(PackedBatch::batch).collect();
        let step_tokens: usize = micro_batches.iter().map(|b| b.num_tokens()).sum();
        let _step_range = Range::push("step");
        if position.epoch != last_epoch {
            checkpoint(opts, &mut *engine, &mut state, &mut unread, &bar)?; // every epoch end
            last_save = Instant::now();
            last_epoch = position.epoch;
        }
        let step = state.global_step + 1;
        let lr = lr_schedule.lr_at(step);
        let bp = cfg.fixed_bp_steps.or_else(|| bp_steps(&model.net, step, total_steps, cfg.bp_warmup));
        let schedule = Schedule::for_training(&model.net, bp.unwrap_or(0)).with_recompute(cfg.recompute);
        // The mean over the virtual ranks of their valid labels (SPEC §5).
        let labels: usize = micro_batches.iter().map(|b| b.num_labels()).sum();
        let loss_divisor = labels.max(1) as f32 / micro_batches.len() as f32;
        let capture = match (&gpu, opts.profile_step == Some(step)) {
            (Some(gpu), true) => Some(CaptureRange::start(gpu)?),
            _ => None,
        };
        unread.before.push(Progress::of(&state));
        let result = engine.train_micro_batches(&views, &schedule, lr, loss_divisor);
        if let Some(capture) = capture {
            capture.stop()?;
        }
        result.with_context(|| format!("step {step}"))?;
        if step == first_step {
            record_gemm_algorithms(&mut store, &*engine, &bar); // every product of a step is planned now
        }
        state.global_step = step;
        state.data_position = DataPosition { epoch: position.epoch, step: position.step + 1 };
        state.tokens_seen += step_tokens as u64;
        window.1 += step_tokens as u64;
        window.2 += views.iter().map(|b| flops::useful_flops(&model, &schedule, b)).sum::<f64>();
        bar.set_position(step);

        if step % opts.log_every == 0 || step == total_steps {
            let _log_range = Range::push("log");
            let metrics = read_metrics(opts, &mut *engine, &mut state, &mut unread, &bar)?;
            let (loss, accuracy, exact) = step_ratios(&metrics);
            let seconds = window.0.elapsed().as_secs_f64();
            let (tokens_per_s, flops_per_s) = (window.1 as f64 / seconds, window.2 / seconds);
            window = (Instant::now(), 0, 0.0);
            let grad_norm = engine.grad_norm()?;
            let mut record = json!({
                "split": "train", "step": step, "epoch": position.epoch, "loss": loss, "accuracy": accuracy,
                "exact_accuracy": exact, "lr": lr, "bp_steps": bp, "grad_norm": grad_norm,
                "tokens": step_tokens, "tokens_seen": state.tokens_seen, "tokens_per_s": tokens_per_s,
                "elapsed_s": started.elapsed().as_secs_f64(),
            });
            let mut message = format!("loss {loss:.4} acc {accuracy:.3} exact {exact:.3} {tokens_per_s:.0} tok/s");
            if on_gpu {
                record["tflops"] = json!(flops_per_s / 1e12);
            }
            if let Some(peak) = peak_flops {
                record["mfu"] = json!(flops_per_s / peak);
                message += &format!(" MFU {:.1}%", 100.0 * flops_per_s / peak);
            }
            bar.set_message(message);
            log.write(record)?;
        }
        if let (Some(heldout), Some(every)) = (&data.heldout, opts.eval_every) {
            if step % every == 0 {
                let _eval_range = Range::push("eval");
                read_metrics(opts, &mut *engine, &mut state, &mut unread, &bar)?; // no evaluation of weights a non-finite loss stopped
                let m = evaluate(&mut *engine, heldout, 0, batch_tokens, cfg.target_only, Coverage::AllSamples)?;
                report_heldout(&bar, &mut log, step, &m)?;
                last_heldout = Some((step, m));
            }
        }
        let due_steps = opts.checkpoint_every_steps.is_some_and(|n| step % n == 0);
        let due_time = last_save.elapsed().as_secs_f64() >= opts.checkpoint_every_minutes * 60.0;
        if due_steps || due_time {
            checkpoint(opts, &mut *engine, &mut state, &mut unread, &bar)?;
            last_save = Instant::now();
        }
    }
    ensure!(
        state.global_step > 0,
        "the data yielded no full training step: {} tokens per epoch do not fill one {batch_tokens}-token batch (SPEC §8 drops an epoch's last step); lower --batch-tokens or add data",
        data.train.tokens_per_epoch()
    );
    checkpoint(opts, &mut *engine, &mut state, &mut unread, &bar)?;
    bar.finish();

    let heldout = match (&data.heldout, last_heldout) {
        (None, _) => None,
        (Some(_), Some((step, m))) if step == state.global_step => Some(m),
        (Some(heldout), _) => {
            let m = evaluate(&mut *engine, heldout, 0, batch_tokens, cfg.target_only, Coverage::AllSamples)?;
            report_heldout(&bar, &mut log, state.global_step, &m)?;
            Some(m)
        }
    };
    record_gemm_algorithms(&mut store, &*engine, &bar); // and the evaluation's products
    Ok(heldout)
}

/// Adds the shapes `engine` planned that the store lacks, and writes it. A store that cannot be
/// written costs later runs a tuning, not this one its result: a warning.
fn record_gemm_algorithms(store: &mut Option<GemmStore>, engine: &dyn Engine, bar: &ProgressBar) {
    let Some(store) = store else { return };
    if store.add(&engine.gemm_algorithms()) {
        if let Err(e) = store.save() {
            bar.println(format!("warning: could not write the GEMM algorithm store {} ({e:#}); later runs will tune their products again", store.path().display()));
        }
    }
}

fn report_heldout(bar: &ProgressBar, log: &mut MetricsLog, step: u64, m: &MeanMetrics) -> Result<()> {
    bar.println(format!(
        "step {step}: held-out loss {:.4}, accuracy {:.3}, exact accuracy {:.3} ({} tokens)",
        m.loss, m.accuracy, m.exact_accuracy, m.tokens
    ));
    log.write(json!({ "split": "heldout", "step": step, "loss": m.loss, "accuracy": m.accuracy, "exact_accuracy": m.exact_accuracy, "tokens": m.tokens }))
}

/// What a step changes in the run's state, as it was before one step.
#[derive(Clone, Copy, Debug)]
struct Progress {
    global_step: u64,
    data_position: DataPosition,
    tokens_seen: u64,
}

impl Progress {
    fn of(state: &TrainState) -> Progress {
        Progress { global_step: state.global_step, data_position: state.data_position, tokens_seen: state.tokens_seen }
    }

    fn restore(self, state: &mut TrainState) {
        (state.global_step, state.data_position, state.tokens_seen) = (self.global_step, self.data_position, self.tokens_seen);
    }
}

/// The steps run since the engine's metrics were last read: the state before each, so that a
/// non-finite loss found at the read can be checkpointed as of the step that produced it.
#[derive(Default)]
struct Unread {
    before: Vec<Progress>,
}

/// The metrics of the last step. A non-finite loss found here stops the run: the engine
/// skipped every update from that step on, so its weights are those before it; they are
/// checkpointed with the run's state from before that step.
fn read_metrics(opts: &TrainOptions, engine: &mut dyn Engine, state: &mut TrainState, unread: &mut Unread, bar: &ProgressBar) -> Result<StepMetrics> {
    let err = match engine.read_metrics() {
        Ok(metrics) => {
            unread.before.clear();
            return Ok(metrics);
        }
        Err(err) => err,
    };
    let Some(&NonFiniteLoss { steps_before }) = err.downcast_ref::<NonFiniteLoss>() else { return Err(err) };
    let before = *unread.before.get(steps_before as usize).with_context(|| format!("the engine reports a non-finite loss {steps_before} steps after the last read, but ran only {}", unread.before.len()))?;
    before.restore(state);
    save(opts, engine, state, bar)?;
    Err(err).context(format!(
        "step {}: training stopped; the weights before this step were checkpointed in {} (the loss is checked when the run logs, evaluates or checkpoints)",
        state.global_step + 1,
        opts.run_dir.display()
    ))
}

/// Checks the steps since the last read (see [`read_metrics`]), then saves a checkpoint.
fn checkpoint(opts: &TrainOptions, engine: &mut dyn Engine, state: &mut TrainState, unread: &mut Unread, bar: &ProgressBar) -> Result<()> {
    read_metrics(opts, engine, state, unread, bar)?;
    save(opts, engine, state, bar)
}

fn save(opts: &TrainOptions, engine: &mut dyn Engine, state: &TrainState, bar: &ProgressBar) -> Result<()> {
    if state.global_step == 0 {
        return Ok(());
    }
    let _range = Range::push("checkpoint");
    let (params, optimizer) = engine.snapshot()?;
    let state = TrainState { gemm_algorithms: engine.gemm_algorithms(), ..state.clone() };
    let dir = run_dir::save_in_run(&opts.run_dir, &params, &optimizer, &state, opts.keep_last)?;
    bar.println(format!("step {}: checkpoint {}", state.global_step, dir.display()));
    Ok(())
}
