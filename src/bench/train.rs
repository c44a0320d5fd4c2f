//! `hrm-cu bench train`: whole training steps of a random model on synthetic packed batches.
//!
//! The batches mix samples as real data does (lengths uniform in 64..4096, instruction
//! fractions uniform in 10..90%), filled to the batch token count. After the warm-up steps
//! (plans, allocations, first-touch, graph capture), the timed steps are queued back to back
//! as training queues them, with a CUDA event between consecutive steps; the events are read
//! once the last step has finished. A step's time is the device time between its two events,
//! so it includes every gap the host leaves on the device.
//!
//! `--cuda-graph on` replays each step from a CUDA graph (`src/train/graph.rs`); `both` times
//! the same engine without, then with graphs, and prints what they buy.
//!
//! Useful FLOPs and MFU are those of `src/train/flops.rs` (the training log reports the same
//! figures): matmul FLOPs of every forward pass, twice that again for the passes with
//! gradient, attention over the visible (query, key) pairs only, over 989 TFLOP/s. With
//! `--recompute` the forwards that are run again are printed beside them and left out of MFU.
//!
//! `--micro-batches K` splits each step into K micro-batches of `batch_tokens / K` (gradient
//! accumulation, as `hrm-cu train --micro-batches K` trains): memory is predicted for one
//! micro-batch, and the steps run without CUDA graphs (`src/train/gpu.rs`).
//!
//! `--profile` runs a few more steps with every op bracketed by CUDA events and prints the
//! split per op class; the event records add a little time of their own, so the totals are
//! a few percent above the plain steps.

use anyhow::{ensure, Context, Result};
use clap::ValueEnum;
use cudarc::driver::sys;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;
use half::bf16;
use rayon::prelude::*;

use crate::config::{ModelConfig, Net, NetName, SizeName, TrainConfig, HEAD_DIM};
use crate::gpu::{DriverContext, Gpu};
use crate::data::batch::PackedBatch;
use crate::data::loader::micro_batch_tokens;
use crate::model::cuda::EpilogueGemms;
use crate::model::net::Batch;
use crate::model::params::Params;
use crate::model::schedule::Schedule;
use crate::model::spec::ParamLayout;
use crate::optim::{AdamAtan2, AdamCoeffs};
use crate::rng::Rng;
use crate::train::engine::Engine;
use crate::train::flops::{recompute_flops, useful_flops, visible_pairs, HOPPER_BF16_FLOPS};
use crate::train::gpu::{GpuEngine, MemoryPlan};

/// Distinct steps cycled through (each of `--micro-batches` batches).
const BATCHES: usize = 4;
const DEFAULT_BATCH_TOKENS: usize = 12_288;
const DEFAULT_VOCAB: usize = 65_536;
const DEFAULT_WARMUP: usize = 3;
const DEFAULT_STEPS: usize = 10;

#[derive(clap::Args, Clone, Debug)]
pub struct TrainBenchArgs {
    /// Model size
    #[arg(long, value_enum, default_value = "XL")]
    pub size: SizeName,
    /// Net
    #[arg(long, value_enum, default_value = "hrm")]
    pub net: NetName,
    /// hrm's gradient depth (default: bp_max_steps = 5); the other nets have a fixed one
    #[arg(long)]
    pub bp_steps: Option<usize>,
    /// Tokens per packed batch
    #[arg(long, default_value_t = DEFAULT_BATCH_TOKENS)]
    pub batch_tokens: usize,
    /// Recompute the activations of each pass with gradient in the backward (keep its input only)
    #[arg(long)]
    pub recompute: bool,
    /// Micro-batches per step (gradient accumulation), each of --batch-tokens / K tokens
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub micro_batches: usize,
    /// Tokenizer vocabulary (rounded up to 256)
    #[arg(long, default_value_t = DEFAULT_VOCAB)]
    pub vocab: usize,
    /// Untimed steps first (at least 2 with CUDA graphs: an eager one, then the capture)
    #[arg(long, default_value_t = DEFAULT_WARMUP)]
    pub warmup: usize,
    /// Timed steps
    #[arg(long, default_value_t = DEFAULT_STEPS)]
    pub steps: usize,
    /// Profiled steps after the timed ones (0: no per-phase split; profiled steps never use
    /// graphs)
    #[arg(long, default_value_t = 0)]
    pub profile: usize,
    /// Replay the step from a CUDA graph: off, on, or both (timed one after the other)
    #[arg(long, value_enum, default_value = "off")]
    pub cuda_graph: GraphMode,
    /// Which products run as our Hopper GEMM with the following pass in its epilogue
    /// (docs/design/gemm-epilogues.md): none (cuBLASLt and the separate passes), gate_up with
    /// SwiGLU, also qkv with RoPE, or also down's input gradient with SwiGLU's backward
    #[arg(long, value_enum, default_value_t = EpilogueGemms::default())]
    pub epilogue_gemms: EpilogueGemms,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl Default for TrainBenchArgs {
    /// The command line's defaults: XL hrm at bp_steps 5 on 12,288-token batches, no profile.
    fn default() -> TrainBenchArgs {
        TrainBenchArgs {
            size: SizeName::XL,
            net: NetName::Hrm,
            bp_steps: None,
            batch_tokens: DEFAULT_BATCH_TOKENS,
            recompute: false,
            micro_batches: 1,
            vocab: DEFAULT_VOCAB,
            warmup: DEFAULT_WARMUP,
            steps: DEFAULT_STEPS,
            profile: 0,
            cuda_graph: GraphMode::Off,
            epilogue_gemms: EpilogueGemms::default(),
            seed: 0,
        }
    }
}

/// Whether the timed steps replay CUDA graphs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphMode {
    Off,
    On,
    Both,
}

/// [`run`] with the defaults, in the shape of a `bench::TARGETS` entry.
pub fn run_default(gpu: &Gpu) -> Result<()> {
    run(gpu, &TrainBenchArgs::default())
}

pub fn run(gpu: &Gpu, args: &TrainBenchArgs) -> Result<()> {
    ensure!(args.steps > 0, "--steps must be positive");
    ensure!(args.cuda_graph == GraphMode::Off || args.warmup >= 2, "--cuda-graph needs --warmup 2 or more: a schedule's first step runs eagerly, the second is captured");
    let config = ModelConfig::new(args.size, args.net, args.vocab);
    let bp_steps = match config.net {
        Net::Hrm { bp_max_steps, .. } => args.bp_steps.unwrap_or(bp_max_steps),
        _ => 0,
    };
    let schedule = Schedule::for_training(&config.net, bp_steps).with_recompute(args.recompute);
    let t = args.batch_tokens;
    let k = args.micro_batches;
    let micro_tokens = micro_batch_tokens(t, k)?;

    let plan = MemoryPlan::predict_micro_batches(&config, &schedule, t, k)?;
    let params = random_params(config, args.seed);
    println!(
        "bench train: {:?} {:?}, {:.3} B parameters, vocab {}, {} passes ({} with gradient, activations {}), {t} tokens per step",
        args.size,
        args.net,
        params.layout.num_params() as f64 / 1e9,
        config.vocab,
        schedule.passes.len(),
        schedule.grad_passes(),
        if schedule.recompute { "recomputed" } else { "kept" }
    );
    if k > 1 {
        println!("{k} micro-batches of {micro_tokens} tokens per step, gradients accumulated; steps run without CUDA graphs");
    }
    println!("predicted device memory:\n{plan}");
    plan.check_fits(gpu)?;

    let mut rng = Rng::new(args.seed ^ 0x5eed);
    let steps = (0..BATCHES)
        .map(|_| (0..k).map(|_| PackedBatch::random(&mut rng, micro_tokens, config.vocab, 64..4097, (0.1, 0.9))).collect::<Result<Vec<_>>>())
        .collect::<Result<Vec<_>>>()?;
    let coeffs = AdamCoeffs::from_config(&TrainConfig::default());
    let lr = TrainConfig::default().lr;
    let optimizer = AdamAtan2::new(&params, coeffs);
    reset_pool_peak(gpu)?;
    let mut engine = GpuEngine::new(gpu, params, optimizer)?;
    engine.backend().set_epilogue_gemms(args.epilogue_gemms);
    println!("on {}", engine.describe());
    let route = match args.epilogue_gemms {
        EpilogueGemms::Off => "cuBLASLt, then the SwiGLU and RoPE passes",
        EpilogueGemms::Swiglu => "gate_up ours with the SwiGLU epilogue, qkv cuBLASLt then the RoPE pass",
        EpilogueGemms::Forward => "ours with the SwiGLU and RoPE epilogues",
        EpilogueGemms::All => "ours with the SwiGLU and RoPE epilogues, and down's input gradient with SwiGLU's backward",
    };
    let flag = args.epilogue_gemms.to_possible_value().expect("every variant has a name");
    println!("epilogue GEMMs (--epilogue-gemms {}; ours on Hopper only): {route}", flag.get_name());

    let modes: &[bool] = match args.cuda_graph {
        GraphMode::Off => &[false],
        GraphMode::On => &[true],
        GraphMode::Both => &[false, true],
    };
    // Per-step averages over the micro-batches the timed steps run.
    let used: Vec<&PackedBatch> = (0..args.steps).flat_map(|i| &steps[(args.warmup + i) % BATCHES]).collect();
    let per_step = |sum: f64| sum / args.steps as f64;
    let tokens = per_step(used.iter().map(|b| b.num_tokens() as f64).sum());
    let flops = per_step(used.iter().map(|b| useful_flops(&config, &schedule, &b.batch())).sum());
    let recomputed = per_step(used.iter().map(|b| recompute_flops(&config, &schedule, &b.batch())).sum());
    let mut medians = Vec::new();
    for &graphs in modes {
        engine.set_cuda_graphs(graphs);
        let times = time_steps(gpu, &mut engine, &steps, &schedule, lr, args.warmup, args.steps)?;
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        let seconds = median * 1e-3;
        let label = if graphs { format!("CUDA graphs on ({} captured)", engine.captured_graphs()) } else { "CUDA graphs off".to_string() };
        println!("{label}:");
        println!("step time   median {median:.2} ms (min {:.2}, max {:.2}) over {} steps after {} warm-up", sorted[0], sorted[sorted.len() - 1], args.steps, args.warmup);
        println!("throughput  {:.0} tokens/s ({:.0} real tokens per step)", tokens / seconds, tokens);
        println!("FLOPs       {:.1} TFLOP useful per step: {:.0} TFLOP/s, MFU {:.1}% of 989 TFLOP/s", flops / 1e12, flops / seconds / 1e12, 100.0 * flops / seconds / HOPPER_BF16_FLOPS);
        if schedule.recompute {
            let all = flops + recomputed;
            println!("            plus {:.1} TFLOP recomputed, not counted: {:.0} TFLOP/s executed ({:.1}% of 989)", recomputed / 1e12, all / seconds / 1e12, 100.0 * all / seconds / HOPPER_BF16_FLOPS);
        }
        medians.push(median);
    }
    if let [off, on] = medians[..] {
        println!("CUDA graphs: median step {off:.2} ms without, {on:.2} ms with ({:+.2} ms, {:+.1}%)", on - off, 100.0 * (on - off) / off);
    }
    engine.set_cuda_graphs(false);
    let (free, total) = {
        gpu.ctx.bind_to_thread().during("binding the context")?;
        cudarc::driver::result::mem_get_info().during("querying device memory")?
    };
    let (used, reserved) = pool_peaks(gpu)?;
    println!(
        "memory      peak {:.2} GiB in our buffers ({:.2} GiB reserved by the pool), device in use {:.2} GiB of {:.2}; predicted {:.2} GiB of buffers, {:.2} GiB with the runtime",
        gib(used),
        gib(reserved),
        gib((total - free) as u64),
        gib(total as u64),
        gib(plan.allocations()),
        gib(plan.total())
    );

    if args.profile > 0 {
        let be = engine.backend();
        be.set_profiling(true);
        let mut wall = 0.0;
        for i in 0..args.profile {
            let start = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).during("creating an event")?;
            let end = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).during("creating an event")?;
            start.record(&gpu.stream).during("recording an event")?;
            train_step(&mut engine, &steps[i % BATCHES], &schedule, lr).with_context(|| format!("profiled step {i}"))?;
            end.record(&gpu.stream).during("recording an event")?;
            wall += start.elapsed_ms(&end).during("reading an event")? as f64;
        }
        engine.read_metrics().context("the profiled steps")?;
        let be = engine.backend();
        let profile = be.take_profile()?;
        be.set_profiling(false);
        let n = args.profile as f64;
        println!("profile over {} steps ({:.1} ms per step with events):", args.profile, wall / n);
        println!("  {:<10} {:>10} {:>7}", "phase", "ms/step", "share");
        let mut accounted = 0.0;
        for (class, ms) in &profile.classes() {
            accounted += ms;
            println!("  {:<10} {:>10.2} {:>6.1}%", format!("{class:?}"), ms / n, 100.0 * ms / wall);
        }
        println!("  {:<10} {:>10.2} {:>6.1}%", "gaps", (wall - accounted) / n, 100.0 * (wall - accounted) / wall);
        println!("  {:<18} {:<10} {:>10} {:>10} {:>10}", "op", "phase", "calls/step", "ms/step", "us/call");
        for o in &profile.ops {
            let calls = o.calls as f64 / n;
            println!("  {:<18} {:<10} {:>10.0} {:>10.2} {:>10.1}", o.op, format!("{:?}", o.class), calls, o.ms / n, 1e3 * o.ms / o.calls as f64);
        }
        // The attention's rate over the visible pairs of the profiled batches (a call's FLOPs:
        // 4 * HD * pairs * NH forward, 2.5x that backward), as `bench attention` reports it.
        let batches: Vec<&PackedBatch> = (0..args.profile).flat_map(|i| steps[i % BATCHES].iter()).collect();
        let pairs = batches.iter().map(|b| visible_pairs(&b.batch()) as f64).sum::<f64>() / batches.len() as f64;
        let fwd_flops = 4.0 * HEAD_DIM as f64 * pairs * config.dims.heads as f64;
        for (op, flops) in [("attention_fwd", fwd_flops), ("attention_bwd", 2.5 * fwd_flops)] {
            if let Some(o) = profile.ops.iter().find(|o| o.op == op) {
                println!("  {op}: {:.0} TFLOP/s over {:.2}M visible pairs per head and call", flops * o.calls as f64 / (o.ms * 1e-3) / 1e12, pairs / 1e6);
            }
        }
    }
    Ok(())
}

/// Runs `warmup` untimed steps, then `steps` timed ones queued back to back, and returns the
/// device milliseconds of each: the time between the events recorded before and after it.
/// Synchronises once, at the end (and reads the metrics, so that a non-finite loss fails the
/// bench instead of timing skipped updates).
fn time_steps(gpu: &Gpu, engine: &mut GpuEngine, batches: &[Vec<PackedBatch>], schedule: &Schedule, lr: f32, warmup: usize, steps: usize) -> Result<Vec<f64>> {
    let step = |engine: &mut GpuEngine, i: usize| train_step(engine, &batches[i % batches.len()], schedule, lr);
    for i in 0..warmup {
        step(engine, i).with_context(|| format!("warm-up step {i}"))?;
    }
    let event = || -> Result<CudaEvent> {
        let e = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).during("creating an event")?;
        e.record(&gpu.stream).during("recording an event")?;
        Ok(e)
    };
    let mut events = vec![event()?];
    for i in 0..steps {
        step(engine, warmup + i).with_context(|| format!("timed step {i}"))?;
        events.push(event()?);
    }
    engine.read_metrics().context("the timed steps")?;
    events.windows(2).map(|w| Ok(w[0].elapsed_ms(&w[1]).during("reading an event")? as f64)).collect()
}

/// Queues one step on its micro-batches, each one's loss divided by the mean of their valid
/// labels (SPEC §5 with a micro-batch per virtual rank, as the trainer does).
fn train_step(engine: &mut GpuEngine, micro_batches: &[PackedBatch], schedule: &Schedule, lr: f32) -> Result<()> {
    let views: Vec<Batch> = micro_batches.iter().map(PackedBatch::batch).collect();
    let labels: usize = micro_batches.iter().map(PackedBatch::num_labels).sum();
    engine.train_micro_batches(&views, schedule, lr, labels as f32 / micro_batches.len() as f32)
}

/// Random weights with each tensor's SPEC §6 standard deviation, drawn in parallel (uniform
/// with that std, not the truncated normal: the timing does not depend on the distribution,
/// and `Params::init` draws a billion normals on one thread).
fn random_params(config: ModelConfig, seed: u64) -> Params {
    let layout = ParamLayout::new(&config);
    let mut master = vec![0.0f32; layout.master_len];
    const PAR: usize = 1 << 20;
    for spec in layout.trainable() {
        let r = spec.range().expect("trainable tensors have offsets");
        let half_width = 3.0f32.sqrt() * spec.init_std;
        let base = seed ^ (r.start as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        master[r].par_chunks_mut(PAR).enumerate().for_each(|(i, chunk)| {
            let mut rng = Rng::new(base.wrapping_add(i as u64));
            chunk.copy_from_slice(&rng.uniform_vec(chunk.len(), half_width));
        });
    }
    let z_l_init = match config.net.has_z_l_init() {
        true => Rng::new(seed).uniform_vec(config.dims.hidden, 3.0f32.sqrt()).into_iter().map(bf16::from_f32).collect(),
        false => Vec::new(),
    };
    Params { config, layout, master, z_l_init }
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

fn default_pool(gpu: &Gpu) -> Result<sys::CUmemoryPool> {
    gpu.ctx.bind_to_thread().during("binding the context")?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: writes the device's default pool handle into `pool`.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, gpu.ctx.cu_device()) }.result().during("getting the default memory pool")?;
    Ok(pool)
}

/// Restarts the pool's high-water marks (every buffer of ours comes from the pool).
fn reset_pool_peak(gpu: &Gpu) -> Result<()> {
    let pool = default_pool(gpu)?;
    for attr in [sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH] {
        let mut zero = 0u64;
        // SAFETY: both attributes are u64; setting one to 0 resets that high-water mark.
        unsafe { sys::cuMemPoolSetAttribute(pool, attr, (&mut zero as *mut u64).cast()) }.result().during("resetting the pool's peaks")?;
    }
    Ok(())
}

/// The pool's high-water marks since [`reset_pool_peak`]: (bytes in use by our buffers,
/// bytes the pool reserved from the driver to hold them).
fn pool_peaks(gpu: &Gpu) -> Result<(u64, u64)> {
    let pool = default_pool(gpu)?;
    let read = |attr: sys::CUmemPool_attribute| -> Result<u64> {
        let mut value = 0u64;
        // SAFETY: the attribute is a u64 written into `value`.
        unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&mut value as *mut u64).cast()) }.result().during("reading the pool's peaks")?;
        Ok(value)
    };
    Ok((read(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?, read(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?))
}
