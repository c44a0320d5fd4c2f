//! `hrm-cu bench train`: whole training steps of a random model on synthetic packed batches.
//!
//! The batches mix samples as real data does (lengths uniform in 64..4096, instruction
//! fractions uniform in 10..90%), filled to the batch token count. After the warm-up steps
//! (plans, allocations, first-touch), each timed step lies between two CUDA events, so a
//! step's time includes every gap the host leaves on the device.
//!
//! Useful FLOPs and MFU are those of `src/train/flops.rs` (the training log reports the same
//! figures): matmul FLOPs of every forward pass, twice that again for the passes with
//! gradient, attention over the visible (query, key) pairs only, over 989 TFLOP/s. With
//! `--recompute` the forwards that are run again are printed beside them and left out of MFU.
//!
//! `--profile` runs a few more steps with every op bracketed by CUDA events and prints the
//! split per op class; the event records add a little time of their own, so the totals are
//! a few percent above the plain steps.

use anyhow::{ensure, Context, Result};
use cudarc::driver::sys;
use cudarc::driver::sys::CUevent_flags;
use half::bf16;
use rayon::prelude::*;

use crate::config::{ModelConfig, Net, NetName, SizeName, TrainConfig};
use crate::gpu::{DriverContext, Gpu};
use crate::model::params::Params;
use crate::model::schedule::Schedule;
use crate::model::spec::ParamLayout;
use crate::optim::{AdamAtan2, AdamCoeffs};
use crate::rng::Rng;
use crate::train::engine::Engine;
use crate::train::flops::{recompute_flops, useful_flops, HOPPER_BF16_FLOPS};
use crate::train::gpu::{GpuEngine, MemoryPlan, PackedSamples};

/// Distinct batches cycled through the steps.
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
    /// Tokenizer vocabulary (rounded up to 256)
    #[arg(long, default_value_t = DEFAULT_VOCAB)]
    pub vocab: usize,
    /// Untimed steps first
    #[arg(long, default_value_t = DEFAULT_WARMUP)]
    pub warmup: usize,
    /// Timed steps
    #[arg(long, default_value_t = DEFAULT_STEPS)]
    pub steps: usize,
    /// Profiled steps after the timed ones (0: no per-phase split)
    #[arg(long, default_value_t = 0)]
    pub profile: usize,
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
            vocab: DEFAULT_VOCAB,
            warmup: DEFAULT_WARMUP,
            steps: DEFAULT_STEPS,
            profile: 0,
            seed: 0,
        }
    }
}

/// [`run`] with the defaults, in the shape of a `bench::TARGETS` entry.
pub fn run_default(gpu: &Gpu) -> Result<()> {
    run(gpu, &TrainBenchArgs::default())
}

pub fn run(gpu: &Gpu, args: &TrainBenchArgs) -> Result<()> {
    ensure!(args.steps > 0, "--steps must be positive");
    let config = ModelConfig::new(args.size, args.net, args.vocab);
    let bp_steps = match config.net {
        Net::Hrm { bp_max_steps, .. } => args.bp_steps.unwrap_or(bp_max_steps),
        _ => 0,
    };
    let schedule = Schedule::for_training(&config.net, bp_steps).with_recompute(args.recompute);
    let t = args.batch_tokens;

    let plan = MemoryPlan::predict(&config, &schedule, t)?;
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
    println!("predicted device memory:\n{plan}");
    plan.check_fits(gpu)?;

    let mut rng = Rng::new(args.seed ^ 0x5eed);
    let batches = (0..BATCHES).map(|_| PackedSamples::random(&mut rng, t, config.vocab, 64..4097, (0.1, 0.9))).collect::<Result<Vec<_>>>()?;
    let coeffs = AdamCoeffs::from_config(&TrainConfig::default());
    let lr = TrainConfig::default().lr;
    let optimizer = AdamAtan2::new(&params, coeffs);
    reset_pool_peak(gpu)?;
    let mut engine = GpuEngine::new(gpu, params, optimizer)?;
    println!("on {}", engine.describe());

    let mut step = |i: usize| -> Result<()> {
        let b = &batches[i % BATCHES];
        engine.train_step(&b.batch(), &schedule, lr, b.valid_labels() as f32).map(|_| ())
    };
    for i in 0..args.warmup {
        step(i).with_context(|| format!("warm-up step {i}"))?;
    }
    let mut times = Vec::with_capacity(args.steps);
    for i in 0..args.steps {
        let start = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).during("creating an event")?;
        let end = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).during("creating an event")?;
        start.record(&gpu.stream).during("recording an event")?;
        step(args.warmup + i).with_context(|| format!("timed step {i}"))?;
        end.record(&gpu.stream).during("recording an event")?;
        times.push(start.elapsed_ms(&end).during("reading an event")? as f64);
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];

    // Per-step averages over the batches the timed steps ran.
    let used: Vec<&PackedSamples> = (0..args.steps).map(|i| &batches[(args.warmup + i) % BATCHES]).collect();
    let tokens = used.iter().map(|b| b.tokens() as f64).sum::<f64>() / used.len() as f64;
    let flops = used.iter().map(|b| useful_flops(&config, &schedule, &b.batch())).sum::<f64>() / used.len() as f64;
    let recomputed = used.iter().map(|b| recompute_flops(&config, &schedule, &b.batch())).sum::<f64>() / used.len() as f64;
    let seconds = median * 1e-3;
    println!("step time   median {median:.1} ms (min {:.1}, max {:.1}) over {} steps after {} warm-up", sorted[0], sorted[sorted.len() - 1], args.steps, args.warmup);
    println!("throughput  {:.0} tokens/s ({:.0} real tokens per step)", tokens / seconds, tokens);
    println!("FLOPs       {:.1} TFLOP useful per step: {:.0} TFLOP/s, MFU {:.1}% of 989 TFLOP/s", flops / 1e12, flops / seconds / 1e12, 100.0 * flops / seconds / HOPPER_BF16_FLOPS);
    if schedule.recompute {
        let all = flops + recomputed;
        println!("            plus {:.1} TFLOP recomputed, not counted: {:.0} TFLOP/s executed ({:.1}% of 989)", recomputed / 1e12, all / seconds / 1e12, 100.0 * all / seconds / HOPPER_BF16_FLOPS);
    }
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
            let b = &batches[i % BATCHES];
            engine.train_step(&b.batch(), &schedule, lr, b.valid_labels() as f32).with_context(|| format!("profiled step {i}"))?;
            end.record(&gpu.stream).during("recording an event")?;
            wall += start.elapsed_ms(&end).during("reading an event")? as f64;
        }
        let be = engine.backend();
        let phases = be.take_profile()?;
        be.set_profiling(false);
        let n = args.profile as f64;
        println!("profile over {} steps ({:.1} ms per step with events):", args.profile, wall / n);
        println!("  {:<10} {:>10} {:>7}", "phase", "ms/step", "share");
        let mut accounted = 0.0;
        for (class, ms) in &phases {
            accounted += ms;
            println!("  {:<10} {:>10.2} {:>6.1}%", format!("{class:?}"), ms / n, 100.0 * ms / wall);
        }
        println!("  {:<10} {:>10.2} {:>6.1}%", "gaps", (wall - accounted) / n, 100.0 * (wall - accounted) / wall);
    }
    Ok(())
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
