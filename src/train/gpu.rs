//! The GPU engine: one training step on one CUDA device, and what it needs in memory.
//!
//! Everything the optimiser touches lives on the device as flat master-shaped buffers, laid
//! out by `spec.rs` (embedding, one bucket per block, LM head, each tensor 64-element
//! aligned), so that a multi-GPU version can reduce-scatter the gradients and shard the
//! optimiser bucket by bucket without changing the layout:
//!
//! ```text
//! master   [N] fp32   the weights
//! compute  [N] bf16   their compute copy, what every forward reads (refreshed by the update)
//! m, v     [N] fp32   AdamATan2 moments
//! ema      [N] fp32   EMA of the master weights
//! grads    [N] fp32   zeroed, then accumulated by the backward (cuBLASLt beta = 1)
//! ```
//!
//! One step stages the batch ([`Model::stage_step`]) and the optimiser's inputs (learning
//! rate, per-tensor gradient flags: [`AdamDeviceTable::set_step`]), then enqueues `grads = 0`,
//! [`Model::enqueue_step`] on the [`CudaBackend`] (its metric sums land in a device buffer),
//! the loss guard and the fused AdamATan2 launch, which also writes the bf16 compute copy.
//! Nothing waits for the device: the host prepares the next batch while this one runs, and
//! reads the metrics only when the trainer logs ([`Engine::read_metrics`]). With CUDA graphs
//! on ([`GpuEngine::set_cuda_graphs`]) the enqueued half is captured once per schedule and
//! replayed (`src/train/graph.rs`).
//!
//! A step of K > 1 micro-batches (`--micro-batches K`, gradient accumulation) zeroes the
//! gradients and metric sums once, stages and enqueues each micro-batch's forward and
//! backward in turn (both accumulate), then runs one guard and update on the sums. It runs op
//! by op, without CUDA graphs: the batch is restaged between micro-batches, so a graph could
//! hold only one micro-batch's half; accumulation serves configurations that are memory-bound,
//! whose kernels are long (at XL graphs saved 1.2%), so the launches cost little.
//!
//! [`MemoryPlan`] predicts the device memory of a training configuration before anything is
//! allocated, by running the model's own buffer planning against a backend that only counts;
//! when it does not fit, it predicts what would: recomputed activations (`--recompute`), a
//! batch in smaller parts (`--micro-batches K`, or smaller steps).
//!
//! `hrm-cu selftest` runs [`selftests`]: every net's loss and gradients on the GPU against
//! the fp32 CPU model, and three optimiser steps of [`GpuEngine`] against [`CpuEngine`].

use std::cell::Cell;
use std::fmt;

use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{CudaSlice, DriverError};
use half::bf16;

use crate::checkpoint::GemmAlgorithms;
use crate::config::{intermediate_size, Dims, ModelConfig, NetName, TrainConfig, HEAD_DIM};
use crate::data::batch::{pack_pairs, PackedBatch};
use crate::gpu::nvtx::Range;
use crate::gpu::{DriverContext, Gpu, GpuError};
use crate::model::backend::{Backend, TensorAt};
use crate::model::cpu::CpuBackend;
use crate::model::cuda::{embedding_scratch_bytes, lm_head_rows, CudaBackend, OpClass, LM_HEAD_CHUNK_BYTES};
use crate::model::net::{Batch, GradStart, Model};
use crate::model::params::Params;
use crate::model::schedule::Schedule;
use crate::model::spec::{ParamLayout, Role};
use crate::ops::attention::attention_scratch_bytes;
use crate::ops::cast::cast_f32_to_bf16;
use crate::ops::compare::{compare, Comparison, Tolerance, BF16_EPS};
use crate::ops::gemm::GemmShape;
use crate::ops::cross_entropy::{StepMetrics, METRICS_LEN};
use crate::ops::elementwise::sum_squares;
use crate::optim::adam_atan2::{adam_atan2, adam_atan2_guard, AdamDeviceTable, LossGuard, CHUNK};
use crate::optim::{AdamAtan2, AdamCoeffs};
use crate::rng::Rng;
use crate::selftest::{Check, Row};
use crate::train::engine::{CpuEngine, Engine, NonFiniteLoss};
use crate::train::graph::{capture, Plan, StepGraphs};

/// The training state of one model on one GPU (see the module doc).
pub struct GpuEngine<'g> {
    gpu: &'g Gpu,
    model: Model<CudaBackend<'g>>,
    /// `z_L_init` [D] (empty for transformer), kept for snapshots: it is never trained.
    z_l_init: Vec<bf16>,
    coeffs: AdamCoeffs,
    /// Trainable tensors: a prefix of `layout.tensors` (`z_L_init`, untrained, comes last).
    n_trainable: usize,
    master: CudaSlice<f32>,   // [N]
    compute: CudaSlice<bf16>, // [N]
    m: CudaSlice<f32>,        // [N]
    v: CudaSlice<f32>,        // [N]
    ema: CudaSlice<f32>,      // [N]
    grads: CudaSlice<f32>,    // [N]
    /// [METRICS_LEN] fp64: the last step's metric sums.
    metrics: CudaSlice<f64>,
    table: AdamDeviceTable,
    graphs: StepGraphs,
}

impl<'g> GpuEngine<'g> {
    /// Uploads `params` and `optimizer` (fresh or resumed from a checkpoint) to `gpu`.
    /// Check the configuration with [`MemoryPlan::check_fits`] first for a clear message when
    /// it cannot fit.
    pub fn new(gpu: &'g Gpu, params: Params, optimizer: AdamAtan2) -> Result<GpuEngine<'g>> {
        let layout = &params.layout;
        let n = layout.master_len;
        ensure!(params.master.len() == n, "master holds {} elements, the layout {n}", params.master.len());
        ensure!(
            optimizer.m.len() == n && optimizer.v.len() == n && optimizer.ema.len() == n,
            "optimiser state does not match the model's layout ({n} elements)"
        );
        let n_trainable = layout.trainable().count();
        ensure!(
            layout.tensors[..n_trainable].iter().all(|t| t.offset.is_some()),
            "the trainable tensors must come first in the layout (the step's gradient flags are indexed that way)"
        );
        ensure!(optimizer.steps.len() == n_trainable, "optimiser has {} step counts for {n_trainable} trainable tensors", optimizer.steps.len());

        let s = &gpu.stream;
        let upload = |host: &[f32], what: &str| s.clone_htod(host).with_context(|| format!("uploading the {what} ({n} fp32)"));
        let master = upload(&params.master, "master weights")?;
        // SAFETY: every element is written by the cast below before anything reads it.
        let mut compute = unsafe { s.alloc::<bf16>(n) }.with_context(|| format!("allocating the bf16 compute copy ({n})"))?;
        cast_f32_to_bf16(gpu, &mut compute.as_view_mut(), &master.as_view()).context("making the bf16 compute copy")?;
        let m = upload(&optimizer.m, "first moment")?;
        let v = upload(&optimizer.v, "second moment")?;
        let ema = upload(&optimizer.ema, "EMA")?;
        let grads = s.alloc_zeros(n).with_context(|| format!("allocating the gradients ({n} fp32)"))?;
        let table = AdamDeviceTable::for_layout(gpu, layout, &optimizer.steps).context("building the optimiser table")?;
        let model = Model::new(CudaBackend::new(gpu)?, params.config, &params.z_l_init)?;
        let metrics = model.backend().alloc_metrics()?;
        let graphs = StepGraphs::new(false);
        Ok(GpuEngine { gpu, model, z_l_init: params.z_l_init, coeffs: optimizer.coeffs, n_trainable, master, compute, m, v, ema, grads, metrics, table, graphs })
    }

    /// The backend, for profiling ([`CudaBackend::set_profiling`]; profiled steps run without
    /// graphs).
    /// The GPU and cuBLASLt library that GEMM algorithm indices refer to.
    fn gemm_device(&self) -> String {
        format!("{}, cuBLASLt {}", self.gpu.props.name, self.model.backend().gemm_cache().library_version())
    }

    pub fn backend(&self) -> &CudaBackend<'g> {
        self.model.backend()
    }

    /// Captures each schedule's step in a CUDA graph and replays it (`src/train/graph.rs`);
    /// off by default. Off drops the graphs.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.graphs.set_enabled(on);
    }

    /// Schedules whose step is captured and replayed.
    pub fn captured_graphs(&self) -> usize {
        self.graphs.captured()
    }

    /// Replaces the weights and the optimiser state with `params` and `optimizer` (the same
    /// layout and `z_L_init`), in the existing buffers: captured steps stay valid. Clears the
    /// loss guard.
    pub fn load(&mut self, params: &Params, optimizer: &AdamAtan2) -> Result<()> {
        ensure!(params.layout == *self.model.layout(), "load: the parameters have another layout");
        ensure!(params.z_l_init == self.z_l_init, "load: the parameters have another z_L_init (the model uploads it once)");
        ensure!(optimizer.steps.len() == self.n_trainable && optimizer.m.len() == params.master.len(), "load: the optimiser state does not match the layout");
        let s = &self.gpu.stream;
        for (dst, host, what) in [(&mut self.master, &params.master, "master weights"), (&mut self.m, &optimizer.m, "first moment"), (&mut self.v, &optimizer.v, "second moment"), (&mut self.ema, &optimizer.ema, "EMA")] {
            s.memcpy_htod(host, dst).with_context(|| format!("uploading the {what}"))?;
        }
        cast_f32_to_bf16(self.gpu, &mut self.compute.as_view_mut(), &self.master.as_view()).context("making the bf16 compute copy")?;
        self.table.write_steps(self.gpu, &optimizer.steps)?;
        self.table.write_guard(self.gpu, LossGuard::default())?;
        self.coeffs = optimizer.coeffs;
        Ok(())
    }

    /// The device work of a one-batch step, on what [`Engine::train_micro_batches`] staged:
    /// zero the metric sums, the model's forward and backward (which writes the gradients
    /// afresh), the loss guard, the optimiser. It reads no host value that changes between
    /// steps, so it can be captured in a graph.
    fn enqueue_update(&mut self, schedule: &Schedule) -> Result<()> {
        self.model.backend().zero_metrics(&mut self.metrics)?;
        self.enqueue_forward_backward(schedule, GradStart::Fresh)?;
        self.enqueue_optimizer()
    }

    /// A step of several micro-batches, op by op: zero the metric sums once, then stage each
    /// micro-batch and enqueue its forward and backward (gradients and metric sums accumulate),
    /// then one update. Staging a micro-batch overwrites the device batch that the previous
    /// one's queued kernels read, safely: the copies are on the same stream, after those
    /// kernels, from host memory the copy no longer needs when it returns (pageable `Vec`s
    /// are staged by the driver; the token order's pinned buffer waits for its previous copy,
    /// `EmbeddingBwdScratch::upload_order`).
    fn enqueue_accumulated(&mut self, micro_batches: &[Batch], schedule: &Schedule, loss_divisor: f32) -> Result<()> {
        self.model.backend().zero_metrics(&mut self.metrics)?;
        for (i, batch) in micro_batches.iter().enumerate() {
            let staging = Range::push("stage");
            self.model.stage_step(batch, schedule, loss_divisor)?;
            drop(staging);
            self.enqueue_forward_backward(schedule, if i == 0 { GradStart::Fresh } else { GradStart::Accumulate })?;
        }
        self.enqueue_optimizer()
    }

    /// The staged batch's forward and backward, adding to the metric sums and writing
    /// (`Fresh`) or adding to the gradients.
    fn enqueue_forward_backward(&mut self, schedule: &Schedule, start: GradStart) -> Result<()> {
        let _forward_backward = Range::push("forward_backward");
        self.model.enqueue_step(&self.compute, schedule, &mut self.grads, start, &mut self.metrics)
    }

    /// The loss guard on the step's summed loss, then AdamATan2 on the summed gradients.
    fn enqueue_optimizer(&mut self) -> Result<()> {
        let gpu = self.gpu;
        let _optimizer = Range::push("optimizer");
        let coeffs = &self.coeffs;
        let (master, m, v, ema, grads, compute, table, metrics) = (&mut self.master, &mut self.m, &mut self.v, &mut self.ema, &self.grads, &mut self.compute, &mut self.table, &self.metrics);
        self.model.backend().timed(OpClass::Optimizer, "adam_atan2", || {
            adam_atan2_guard(gpu, table, &metrics.as_view()).context("AdamATan2 loss guard")?;
            adam_atan2(gpu, &mut master.as_view_mut(), &mut m.as_view_mut(), &mut v.as_view_mut(), &mut ema.as_view_mut(), &grads.as_view(), &mut compute.as_view_mut(), table, coeffs)
                .context("AdamATan2 step")
        })
    }
}

impl Engine for GpuEngine<'_> {
    fn train_micro_batches(&mut self, micro_batches: &[Batch], schedule: &Schedule, lr: f32, loss_divisor: f32) -> Result<()> {
        let batch = match micro_batches {
            [] => bail!("a training step needs at least one micro-batch"),
            [batch] => batch,
            _ => {
                // Several micro-batches run op by op: a graph would hold one micro-batch's
                // half, and gradient accumulation is for memory-bound configurations, whose
                // kernels are long enough that launches cost little (module doc).
                let with_grad = self.model.tensors_with_grad(schedule);
                self.table.set_step(self.gpu, &with_grad[..self.n_trainable], lr).context("writing the optimiser's step inputs")?;
                return self.enqueue_accumulated(micro_batches, schedule, loss_divisor);
            }
        };
        let staging = Range::push("stage");
        self.model.stage_step(batch, schedule, loss_divisor)?;
        let with_grad = self.model.tensors_with_grad(schedule);
        self.table.set_step(self.gpu, &with_grad[..self.n_trainable], lr).context("writing the optimiser's step inputs")?;
        drop(staging);
        let allocations = self.model.backend().allocations();
        let plan = match self.model.backend().profiling() {
            true => Plan::Eager, // profiling records events around every op
            false => self.graphs.plan(schedule, allocations),
        };
        match plan {
            Plan::Replay(graph) => {
                let _replay = Range::push("graph");
                graph.launch().context("launching the step's CUDA graph")?;
            }
            Plan::Capture => {
                let stream = self.gpu.stream.clone();
                match capture(&stream, || self.enqueue_update(schedule)) {
                    Ok(graph) => {
                        // The eager run before proved this; a change here means buffers now
                        // live in a graph that will never run.
                        ensure!(self.model.backend().allocations() == allocations, "the training step allocated device memory while it was being captured into a CUDA graph; run without --cuda-graph");
                        graph.launch().context("launching the step's CUDA graph")?;
                        self.graphs.keep(schedule, allocations, graph);
                    }
                    Err(why) => {
                        self.graphs.failed(schedule, &why);
                        self.enqueue_update(schedule)?;
                    }
                }
            }
            Plan::Eager => {
                self.enqueue_update(schedule)?;
                self.graphs.ran_eagerly(schedule, self.model.backend().allocations());
            }
        }
        Ok(())
    }

    fn read_metrics(&mut self) -> Result<StepMetrics> {
        let guard = self.table.read_guard(self.gpu).context("reading the loss guard")?;
        NonFiniteLoss::check(guard)?;
        let metrics = self.model.backend().read_metrics(&self.metrics)?;
        // The guard counts the steps since this read.
        self.table.write_guard(self.gpu, LossGuard::default()).context("restarting the loss guard's count")?;
        Ok(metrics)
    }

    fn grad_norm(&mut self) -> Result<f64> {
        Ok(sum_squares(self.gpu, &self.grads.as_view())?.sqrt())
    }

    fn eval_batch(&mut self, batch: &Batch) -> Result<StepMetrics> {
        self.model.forward_loss(&self.compute, batch)
    }

    fn snapshot(&mut self) -> Result<(Params, AdamAtan2)> {
        let s = &self.gpu.stream;
        let download = |buf: &CudaSlice<f32>, what: &str| s.clone_dtoh(buf).with_context(|| format!("downloading the {what}"));
        let params = Params { config: *self.model.config(), layout: self.model.layout().clone(), master: download(&self.master, "master weights")?, z_l_init: self.z_l_init.clone() };
        let optimizer = AdamAtan2 {
            coeffs: self.coeffs,
            m: download(&self.m, "first moment")?,
            v: download(&self.v, "second moment")?,
            ema: download(&self.ema, "EMA")?,
            steps: self.table.download_steps(self.gpu).context("downloading the step counts")?,
        };
        Ok((params, optimizer))
    }

    fn describe(&self) -> String {
        let p = &self.gpu.props;
        format!("{} (GPU {}, sm_{}{}, bf16 compute, fp32 master)", p.name, p.ordinal, p.major, p.minor)
    }

    fn gemm_algorithms(&self) -> GemmAlgorithms {
        GemmAlgorithms { device: self.gemm_device(), choices: self.model.backend().gemm_cache().choices() }
    }

    fn use_gemm_algorithms(&mut self, recorded: &GemmAlgorithms) -> Result<Option<String>> {
        if recorded.choices.is_empty() {
            return Ok(None);
        }
        let here = self.gemm_device();
        if recorded.device != here {
            return Ok(Some(format!("recorded on {}, running on {here}", recorded.device)));
        }
        self.model.backend().gemm_cache().preset_choices(&recorded.choices).context("running the recorded GEMM algorithms")?;
        Ok(None)
    }
}

// ---------------------------------------------------------------------------------------
// Memory prediction.
// ---------------------------------------------------------------------------------------

/// cuBLASLt's workspace, as `GemmCache` allocates it (32 MiB).
const GEMM_WORKSPACE_BYTES: u64 = 32 << 20;
/// What the device holds outside our allocations: the CUDA context, the loaded kernels and
/// cuBLASLt's own kernels. An estimate, checked by `hrm-cu bench train` (device memory in
/// use after the run against the prediction).
const RUNTIME_RESERVE_BYTES: u64 = 1 << 30;

/// The device memory a training configuration needs, line by line, predicted before anything
/// is allocated.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    /// (what, bytes) of every buffer we allocate, in the order of the table.
    pub items: Vec<(String, u64)>,
    /// What the CUDA runtime itself holds (an estimate).
    pub runtime: u64,
    /// What was predicted, so that [`Self::check_fits`] can predict the alternatives:
    /// `batch_tokens` is one micro-batch's, `micro_batches` of them make a step.
    config: ModelConfig,
    schedule: Schedule,
    batch_tokens: usize,
    micro_batches: usize,
}

impl MemoryPlan {
    /// The memory of training `config` with `schedule` (take the deepest one of a run: saved
    /// activations grow with the passes that carry gradient) on packed batches of
    /// `batch_tokens` tokens. `schedule.recompute` decides what those passes keep: their
    /// activations, or only their inputs plus one pass's activations recomputed in turn.
    pub fn predict(config: &ModelConfig, schedule: &Schedule, batch_tokens: usize) -> Result<MemoryPlan> {
        MemoryPlan::predict_micro_batches(config, schedule, batch_tokens, 1)
    }

    /// The memory of steps of `batch_tokens` tokens in `micro_batches` micro-batches
    /// (gradient accumulation): that of one micro-batch, `batch_tokens / micro_batches`
    /// tokens, since they run one after the other into the same gradients.
    pub fn predict_micro_batches(config: &ModelConfig, schedule: &Schedule, batch_tokens: usize, micro_batches: usize) -> Result<MemoryPlan> {
        let batch_tokens = crate::data::loader::micro_batch_tokens(batch_tokens, micro_batches)?;
        ensure!(batch_tokens > 0, "batch_tokens must be positive");
        let t = batch_tokens;
        let layout = ParamLayout::new(config);
        let n = layout.master_len as u64;
        let n_trainable = layout.trainable().count() as u64;
        let chunks: u64 = layout.trainable().map(|s| s.numel().div_ceil(CHUNK) as u64).sum();

        // The model's own buffers: a step's workspace with and without the passes with gradient.
        let counted = |grad: bool| -> Result<u64> {
            let mut model = Model::new(Footprint::default(), *config, &vec![bf16::ZERO; config.dims.hidden])?;
            let packed = PackedBatch::worst_case(t);
            let batch = packed.batch();
            let (weights, mut grads) = (layout.master_len, layout.master_len);
            if grad {
                model.forward_backward(&weights, &batch, schedule, &mut grads, 1.0)?;
            } else {
                model.forward_loss(&weights, &batch)?;
            }
            Ok(model.backend().bytes.get())
        };
        let workspace = counted(false)?;
        let with_saved = counted(true)?;

        let (v, nh) = (config.vocab, config.dims.heads);
        let lm_rows = lm_head_rows(t, v, LM_HEAD_CHUNK_BYTES) as u64;
        let passes = schedule.grad_passes();
        let saved = match schedule.recompute {
            false => format!("saved activations ({passes} passes with gradient)"),
            true => format!("saved activations ({passes} pass inputs, 1 pass recomputed at a time)"),
        };
        let items = vec![
            ("fp32 master weights".to_string(), 4 * n),
            ("bf16 compute copy".to_string(), 2 * n),
            ("AdamATan2 m, v, EMA (fp32)".to_string(), 12 * n),
            ("fp32 gradients".to_string(), 4 * n),
            ("optimiser tables, loss guard, metric sums".to_string(), 20 * chunks + 8 * n_trainable + 4 + 8 + 8 * METRICS_LEN as u64),
            (saved, with_saved - workspace),
            ("step workspace (states, scratch pass, gradient scratch, batch)".to_string(), workspace),
            (format!("LM-head logits chunk ({lm_rows} rows)"), 2 * lm_rows * v as u64),
            ("embedding backward scratch".to_string(), embedding_scratch_bytes(t, v) as u64),
            ("attention tables and workspaces".to_string(), attention_scratch_bytes(t, nh) as u64),
            ("cuBLASLt workspace".to_string(), GEMM_WORKSPACE_BYTES),
        ];
        Ok(MemoryPlan { items, runtime: RUNTIME_RESERVE_BYTES, config: *config, schedule: schedule.clone(), batch_tokens, micro_batches })
    }

    /// Bytes of our own buffers.
    pub fn allocations(&self) -> u64 {
        self.items.iter().map(|(_, b)| b).sum()
    }

    pub fn total(&self) -> u64 {
        self.allocations() + self.runtime
    }

    /// Fails with the whole table when our buffers need more than the device's free memory,
    /// saying which of [`Self::alternatives`] would fit. Call it with the GPU open and nothing
    /// allocated yet: the context then already holds its share, so only [`Self::allocations`]
    /// must fit (cuBLASLt's kernels still load at the first GEMM, within the runtime estimate).
    pub fn check_fits(&self, gpu: &Gpu) -> Result<()> {
        gpu.ctx.bind_to_thread().during("binding the context")?;
        let (free, total) = cudarc::driver::result::mem_get_info().during("querying device memory")?;
        let (free, total) = (free as u64, total as u64);
        if self.allocations() > free {
            let alternatives: Vec<String> = self.alternatives(free)?.iter().map(|a| format!("  {a}\n")).collect();
            bail!(
                "this configuration needs {:.1} GiB of device memory for its buffers, {} has {:.1} GiB free of {:.1} GiB. \
                 Options that need less:\n{}this configuration:\n{self}",
                gib(self.allocations()),
                gpu.props.name,
                gib(free),
                gib(total),
                alternatives.concat()
            );
        }
        Ok(())
    }

    /// The same run with less activation memory, for a device with `free` bytes: recomputation
    /// (when not on already), whether it fits or not; then the fewest equal parts of the
    /// (micro-)batch, in this plan's mode and, when recomputation alone does not fit, with it,
    /// whose part fits. Splitting the batch trades time (more micro-batches per step, the same
    /// optimiser steps) or a smaller optimiser step for memory; recomputation trades time.
    pub fn alternatives(&self, free: u64) -> Result<Vec<Alternative>> {
        let mut found = Vec::new();
        let mut modes = vec![self.schedule.recompute];
        if !self.schedule.recompute {
            let recompute = self.with(true, self.batch_tokens)?;
            found.push(Alternative::of(&recompute, 1, free));
            if recompute.allocations() > free {
                modes.push(true);
            }
        }
        for recompute in modes {
            found.extend(self.smallest_split(recompute, free)?);
        }
        Ok(found)
    }

    /// This plan with recomputation `on` or off, for `batch_tokens` tokens.
    fn with(&self, recompute: bool, batch_tokens: usize) -> Result<MemoryPlan> {
        let plan = MemoryPlan::predict(&self.config, &self.schedule.clone().with_recompute(recompute), batch_tokens)?;
        Ok(MemoryPlan { micro_batches: self.micro_batches, ..plan })
    }

    /// The batch split in the fewest equal parts (`parts` divides the batch tokens) whose part
    /// fits `free`; when none does, one-token parts (which do not fit either: the weights and
    /// the optimiser state alone are too large). `None` for a one-token batch.
    fn smallest_split(&self, recompute: bool, free: u64) -> Result<Option<Alternative>> {
        let t = self.batch_tokens;
        let mut last = None;
        for parts in (2..=t).filter(|k| t % k == 0) {
            let option = Alternative::of(&self.with(recompute, t / parts)?, parts, free);
            last = Some(option);
            if option.fits {
                break;
            }
        }
        Ok(last)
    }
}

/// One way to run a plan's training in less memory (see [`MemoryPlan::alternatives`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alternative {
    pub recompute: bool,
    /// The plan's (micro-)batch in this many equal parts (1: as it is).
    pub parts: usize,
    /// Tokens of one part.
    pub part_tokens: usize,
    /// Micro-batches per step that keep the step's size: the plan's times `parts`.
    pub micro_batches: usize,
    /// Bytes of our buffers ([`MemoryPlan::allocations`]).
    pub bytes: u64,
    pub fits: bool,
}

impl Alternative {
    fn of(plan: &MemoryPlan, parts: usize, free: u64) -> Alternative {
        let bytes = plan.allocations();
        Alternative { recompute: plan.schedule.recompute, parts, part_tokens: plan.batch_tokens, micro_batches: plan.micro_batches * parts, bytes, fits: bytes <= free }
    }
}

impl fmt::Display for Alternative {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (k, n, m) = (self.parts, self.part_tokens, self.micro_batches);
        let recompute = if self.recompute { "--recompute " } else { "" };
        let micro = |m: usize| if m > 1 { format!("--micro-batches {m}") } else { String::new() };
        let verdict = if self.fits { "fits" } else { "does not fit" };
        write!(f, "with {}: {:.1} GiB ({verdict})", format!("{recompute}{}", micro(m)).trim_end(), gib(self.bytes))?;
        if k > 1 {
            // The other way to the same part size: keep the micro-batches, shrink the step.
            let smaller = format!("{recompute}--batch-tokens {} {}", n * (m / k), micro(m / k));
            write!(f, "; micro-batches of {n} tokens, the same optimiser steps (or {}: steps {k}x smaller)", smaller.trim_end())?;
        }
        Ok(())
    }
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (what, bytes) in &self.items {
            writeln!(f, "  {what:<64} {:>9.2} GiB", gib(*bytes))?;
        }
        writeln!(f, "  {:<64} {:>9.2} GiB", "CUDA context, kernels, cuBLASLt (estimate)", gib(self.runtime))?;
        write!(f, "  {:<64} {:>9.2} GiB", "total", gib(self.total()))
    }
}

/// A backend that runs nothing and counts the bytes the model allocates through it (bf16
/// activations, fp32, i32 and u8 buffers as the CUDA backend stores them). Buffers are their
/// element counts; the weights and gradients are the master length.
#[derive(Default)]
struct Footprint {
    bytes: Cell<u64>,
}

impl Footprint {
    fn count(&self, n: usize, size: usize) -> Result<usize> {
        self.bytes.set(self.bytes.get() + (n * size) as u64);
        Ok(n)
    }
}

impl Backend for Footprint {
    type Act = usize;
    type F32 = usize;
    type I32 = usize;
    type U8 = usize;
    type Metrics = usize;
    type Weights = usize;
    type Grads = usize;

    fn alloc_act(&self, n: usize) -> Result<usize> {
        self.count(n, 2)
    }
    fn alloc_f32(&self, n: usize) -> Result<usize> {
        self.count(n, 4)
    }
    fn alloc_u8(&self, n: usize) -> Result<usize> {
        self.count(n, 1)
    }
    fn alloc_i32(&self, n: usize) -> Result<usize> {
        self.count(n, 4)
    }
    fn alloc_metrics(&self) -> Result<usize> {
        self.count(METRICS_LEN, 8)
    }
    fn zero_metrics(&self, _: &mut usize) -> Result<()> {
        Ok(())
    }
    fn write_i32(&self, _: &mut usize, _: &[i32]) -> Result<()> {
        Ok(())
    }
    fn write_f32(&self, _: &mut usize, _: &[f32]) -> Result<()> {
        Ok(())
    }
    fn upload_act(&self, host: &[f32]) -> Result<usize> {
        self.count(host.len(), 2)
    }
    fn zero_act(&self, _: &mut usize) -> Result<()> {
        Ok(())
    }
    fn zero_grads_at(&self, _: &mut usize, _: TensorAt) -> Result<()> {
        Ok(())
    }
    fn add_act(&self, _: &mut usize, _: &usize, _: usize) -> Result<()> {
        Ok(())
    }
    fn broadcast_rows(&self, _: &mut usize, _: &usize, _: usize, _: usize) -> Result<()> {
        Ok(())
    }
    fn weights_len(&self, w: &usize) -> usize {
        *w
    }
    fn grads_len(&self, g: &usize) -> usize {
        *g
    }
    fn download_f32(&self, x: &usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; *x])
    }
    fn linear_fwd(&self, _: &mut usize, _: &usize, _: &usize, _: TensorAt, _: Option<&usize>, _: usize, _: usize, _: usize) -> Result<()> {
        Ok(())
    }
    fn linear_bwd_input(&self, _: &mut usize, _: &usize, _: &usize, _: TensorAt, _: usize, _: usize, _: usize) -> Result<()> {
        Ok(())
    }
    fn linear_bwd_weight(&self, _: &mut usize, _: TensorAt, _: &usize, _: &usize, _: usize, _: usize, _: usize, _: bool) -> Result<()> {
        Ok(())
    }
    fn add_rmsnorm_fwd(&self, _: &mut usize, _: &mut usize, _: &mut usize, _: &usize, _: Option<&usize>, _: usize, _: usize) -> Result<()> {
        Ok(())
    }
    fn rmsnorm_fwd(&self, _: &mut usize, _: &mut usize, _: &usize, _: usize, _: usize) -> Result<()> {
        Ok(())
    }
    fn rmsnorm_bwd(&self, _: &mut usize, _: &usize, _: &usize, _: &usize, _: usize, _: usize) -> Result<()> {
        Ok(())
    }
    fn qkv_rope_fwd(&self, _: &mut usize, _: &usize, _: usize, _: usize) -> Result<()> {
        Ok(())
    }
    fn attention_fwd(&self, _: &mut usize, _: &mut usize, _: &usize, _: &usize, _: &usize, _: usize, _: usize) -> Result<()> {
        Ok(())
    }
    fn attention_bwd(&self, _: &mut usize, _: &usize, _: &usize, _: &usize, _: &usize, _: &usize, _: &usize, _: &usize, _: usize, _: usize) -> Result<()> {
        Ok(())
    }
    fn swiglu_fwd(&self, _: &mut usize, _: &usize, _: usize, _: usize) -> Result<()> {
        Ok(())
    }
    fn swiglu_bwd(&self, _: &mut usize, _: &usize, _: &usize, _: usize, _: usize) -> Result<()> {
        Ok(())
    }
    fn embedding_fwd(&self, _: &mut usize, _: &usize, _: &usize, _: TensorAt, _: usize, _: usize, _: f32) -> Result<()> {
        Ok(())
    }
    fn prepare_token_order(&self, _: &[i32], _: usize) -> Result<()> {
        Ok(())
    }
    fn embedding_bwd(&self, _: &mut usize, _: TensorAt, _: &usize, _: &usize, _: usize, _: usize, _: f32) -> Result<()> {
        Ok(())
    }
    fn lm_head_loss(&self, _: &mut usize, _: &mut usize, _: Option<(&mut usize, &mut usize, bool)>, _: &usize, _: &usize, _: TensorAt, _: &usize, _: usize, _: usize, _: usize, _: &usize) -> Result<()> {
        Ok(())
    }
    fn step_metrics(&self, _: &mut usize, _: &usize, _: &usize, _: &usize, _: &usize, _: usize) -> Result<()> {
        Ok(())
    }
    fn read_metrics(&self, _: &usize) -> Result<StepMetrics> {
        Ok(StepMetrics::default())
    }
}

// ---------------------------------------------------------------------------------------
// selftest: the model and the engine on the GPU against the CPU.
// ---------------------------------------------------------------------------------------

pub fn selftests() -> Vec<Check> {
    vec![
        Check { name: "model_gpu_vs_cpu", run: check_model_gpu_vs_cpu },
        Check { name: "engine_cuda_graph", run: check_cuda_graph },
        Check { name: "engine_gemm_algorithms", run: check_gemm_algorithms },
    ]
}

/// The mean loss agrees to one bf16 rounding of itself. The CPU runs on the same (bf16-
/// representable) weights in fp32; the GPU stores every activation in bf16, and the loss
/// averages a few hundred per-token errors of mixed sign, so its error stays well under the
/// per-token one.
const LOSS_TOL: Tolerance = Tolerance { abs: 0.0, rel: BF16_EPS };
/// Per-token losses (about ln V = 6.2 nats here): the logits are O(1) dot products of the
/// final state, whose bf16 error builds up over the recurrence (up to 16 blocks deep); 2^-4
/// nats is a few percent of a logit. Ignored and padding rows are 0 on both sides.
const TOKEN_LOSS_TOL: Tolerance = Tolerance { abs: 1.0 / 16.0, rel: 0.0 };
/// Gradients, as ‖gpu - cpu‖ / ‖cpu‖ over all tensors of one role. Each gradient is a product
/// of ~20-40 bf16-rounded factors along the backward (unit roundoff 2^-9 = 2e-3 each, errors
/// of random sign: ~sqrt(40) * 2e-3 = 1.3e-2), plus bf16 accumulation of the states'
/// gradients across passes: 2e-2.
const GRAD_TOL: f32 = 2e-2;
/// AdamATan2's second moment is quadratic in the gradient: twice the gradient's error.
const V_TOL: f32 = 2.0 * GRAD_TOL;
/// After three steps the fp32 master weights (and their EMA) agree to the precision of the
/// bf16 compute copy the next forward reads. At lr = 2.2e-4 an update the GPU failed to apply
/// would show as ~1e-2 (three updates of ~lr against weights of RMS 1/16).
const MASTER_TOL: f32 = BF16_EPS;

/// (net, n_layers, bp_steps, recompute): 1-2 blocks per module; hrm at its deepest gradient
/// (H pass 0 injected into L passes 3-5), also with recomputed activations (against the CPU
/// keeping them), and at bp_steps = 2, where the embedding gets no gradient.
const CASES: [(NetName, usize, usize, bool); 8] = [
    (NetName::Hrm, 4, 5, false),
    (NetName::Hrm, 4, 5, true),
    (NetName::Hrm, 2, 2, false),
    (NetName::Transformer, 2, 0, false),
    (NetName::Trm, 2, 0, false),
    (NetName::TrmMatchRecurrence, 4, 0, false),
    (NetName::Rins, 2, 0, false),
    (NetName::Ut, 2, 0, false),
];
/// Rows of the check's batches; LM-head chunks of 64 rows, so a batch spans five of them.
const ROWS: usize = 300;
const VOCAB: usize = 512;
const LM_CHUNK_BYTES: usize = 64 * VOCAB * 2;

/// `Check::run` reports a GpuError; keep the whole chain (op, shape, cause) as its text.
fn as_gpu_error(check: &str, e: anyhow::Error) -> GpuError {
    GpuError::Driver { what: format!("{check}: {e:#}"), source: DriverError(cudarc::driver::sys::cudaError_enum::CUDA_ERROR_UNKNOWN) }
}

fn check_model_gpu_vs_cpu(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    model_gpu_vs_cpu(gpu, rng).map_err(|e| as_gpu_error("model_gpu_vs_cpu", e))
}

fn check_cuda_graph(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    cuda_graph_rows(gpu, rng).map_err(|e| as_gpu_error("engine_cuda_graph", e))
}

fn check_gemm_algorithms(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    gemm_algorithm_rows(gpu, rng).map_err(|e| as_gpu_error("engine_gemm_algorithms", e))
}

/// A checkpoint's GEMM algorithms reach a fresh engine, as `--resume` (or the algorithm store)
/// gives them: one engine's products after a step, recorded with the heuristic's last listed
/// algorithm each (not the tuner's pick on every shape), go to a second engine before its first
/// step; it reports them before it plans anything, and after its own step its products run
/// exactly those (preset, not tuned). The same record said to come from another GPU is refused.
fn gemm_algorithm_rows(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>> {
    let config = small_config(NetName::Hrm, 2);
    let params = bf16_params(config, rng.next_u64());
    let optimizer = AdamAtan2::new(&params, AdamCoeffs::from_config(&TrainConfig::default()));
    let batch = PackedBatch::random(rng, ROWS, VOCAB, 8..120, (0.1, 0.9))?;
    let schedule = Schedule::for_training(&config.net, 2);
    let step = |engine: &mut GpuEngine| -> Result<()> {
        engine.train_step(&batch.batch(), &schedule, TrainConfig::default().lr, batch.num_labels() as f32)?;
        engine.read_metrics().map(|_| ())
    };
    let mut first = GpuEngine::new(gpu, params.clone(), optimizer.clone())?;
    step(&mut first)?;
    let mut recorded = first.gemm_algorithms();
    ensure!(!recorded.choices.is_empty(), "a training step planned no GEMM");
    let cache = first.backend().gemm_cache();
    for choice in &mut recorded.choices {
        let shape = GemmShape { op: choice.op, t: choice.t, n: choice.n, k: choice.k };
        choice.algorithm = cache.algorithm_count(shape)? - 1;
    }
    drop(first);

    let mut second = GpuEngine::new(gpu, params, optimizer)?;
    let elsewhere = GemmAlgorithms { device: "another GPU".into(), ..recorded.clone() };
    ensure!(second.use_gemm_algorithms(&elsewhere)?.is_some(), "algorithms recorded on another GPU were taken");
    ensure!(second.gemm_algorithms().choices.is_empty(), "refused algorithms planned products");
    let why = second.use_gemm_algorithms(&recorded)?;
    ensure!(why.is_none(), "recorded algorithms not applied: {}", why.unwrap_or_default());
    ensure!(second.gemm_algorithms() == recorded, "the preset algorithms are not reported before the first step");
    step(&mut second)?;
    let indices = |a: &GemmAlgorithms| a.choices.iter().map(|c| c.algorithm as f32).collect::<Vec<f32>>();
    let exact = Tolerance { abs: 0.0, rel: 0.0 };
    let got = second.gemm_algorithms();
    ensure!(got.choices.len() == recorded.choices.len(), "{} shapes planned, {} recorded", got.choices.len(), recorded.choices.len());
    let unlisted = second.backend().gemm_cache().unlisted_presets();
    ensure!(unlisted.is_empty(), "{} recorded algorithms were not listed when their shapes were planned", unlisted.len());
    let shape = format!("{} shapes", recorded.choices.len());
    Ok(vec![Row::new("engine GEMM algorithms from a checkpoint", shape, exact, compare(&indices(&got), &indices(&recorded), exact))])
}

fn small_config(net: NetName, n_layers: usize) -> ModelConfig {
    let dims = Dims { n_layers, hidden: 256, heads: 2, head_dim: HEAD_DIM, intermediate: intermediate_size(256) };
    ModelConfig { dims, net: net.default_net(), vocab: VOCAB }
}

/// Fresh weights, rounded to bf16 so that the CPU reference and the GPU's compute copy hold
/// the same values and the comparison measures the GPU's activation arithmetic only.
fn bf16_params(config: ModelConfig, seed: u64) -> Params {
    let mut p = Params::init(config, seed);
    p.master.iter_mut().for_each(|w| *w = bf16::from_f32(*w).to_f32());
    p
}

/// Samples of 99, 12 (a one-token response: causal length 0), 80 (prefix 1: plain causal),
/// 79 and 2 rows, then 28 rows of padding.
fn check_batch(rng: &mut Rng) -> Result<PackedBatch> {
    let mut draw = |n: usize| (0..n).map(|_| 1 + rng.below(VOCAB as u64 - 1) as i32).collect::<Vec<i32>>();
    let samples = [(40, 60), (12, 1), (1, 80), (50, 30), (1, 2)].map(|(i, r)| (draw(i), draw(r)));
    pack_pairs(&samples, ROWS)
}

fn model_gpu_vs_cpu(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let packed = check_batch(rng)?;
    let batch = packed.batch();
    let divisor = packed.num_labels() as f32;
    for (net, n_layers, bp_steps, recompute) in CASES {
        let config = small_config(net, n_layers);
        let params = bf16_params(config, rng.next_u64());
        let schedule = Schedule::for_training(&config.net, bp_steps);
        let label = |what: &str| format!("{} {what}", short(net));
        let shape = format!("L{n_layers} bp{bp_steps} T{ROWS}{}", if recompute { " recompute" } else { "" });

        let mut cpu = Model::new(CpuBackend, config, &params.z_l_init)?;
        let mut cpu_grads = params.zeros_like_master();
        let cpu_out = cpu.forward_backward(&params.master, &batch, &schedule, &mut cpu_grads, divisor)?;
        let cpu_tokens = cpu.token_losses()?;
        let cpu_eval = cpu.forward_loss(&params.master, &batch)?;

        let backend = CudaBackend::new(gpu)?.with_lm_head_chunk_bytes(LM_CHUNK_BYTES);
        let mut model = Model::new(backend, config, &params.z_l_init)?;
        let host_bf16: Vec<bf16> = params.master.iter().map(|&w| bf16::from_f32(w)).collect();
        let weights = gpu.stream.clone_htod(&host_bf16).context("uploading the weights")?;
        let mut grads = gpu.stream.alloc_zeros::<f32>(params.layout.master_len).context("allocating the gradients")?;
        let out = model.forward_backward(&weights, &batch, &schedule.clone().with_recompute(recompute), &mut grads, divisor)?;
        let tokens = model.token_losses()?;
        let eval = model.forward_loss(&weights, &batch)?;
        let grads = gpu.stream.clone_dtoh(&grads).context("downloading the gradients")?;

        let mean = |m: &StepMetrics| (m.loss_sum / m.valid_tokens.max(1) as f64) as f32;
        rows.push(Row::new(label("loss"), &shape, LOSS_TOL, compare(&[mean(&out.metrics)], &[mean(&cpu_out.metrics)], LOSS_TOL)));
        rows.push(Row::new(label("token losses"), &shape, TOKEN_LOSS_TOL, compare(&tokens, &cpu_tokens, TOKEN_LOSS_TOL)));
        rows.push(Row::new(label("eval loss"), &shape, LOSS_TOL, compare(&[mean(&eval)], &[mean(&cpu_eval)], LOSS_TOL)));
        for (role, got, want) in grads_by_role(&params.layout, &grads, &cpu_grads) {
            let tol = Tolerance { abs: 0.0, rel: GRAD_TOL };
            rows.push(Row::new(label(&format!("d{role} rel-L2")), &shape, tol, rel_l2(&got, &want, GRAD_TOL)));
        }
    }
    rows.extend(engine_rows(gpu, rng)?);
    Ok(rows)
}

fn short(net: NetName) -> &'static str {
    match net {
        NetName::Hrm => "hrm",
        NetName::Transformer => "transformer",
        NetName::Trm => "trm",
        NetName::TrmMatchRecurrence => "trm_match",
        NetName::Rins => "rins",
        NetName::Ut => "ut",
    }
}

/// The gradients gathered by role (embedding, LM head, each module's four weight kinds over
/// its blocks), in layout order: (role, gpu, cpu).
fn grads_by_role(layout: &ParamLayout, got: &[f32], want: &[f32]) -> Vec<(String, Vec<f32>, Vec<f32>)> {
    let mut groups: Vec<(String, Vec<f32>, Vec<f32>)> = Vec::new();
    for spec in layout.trainable() {
        let role = match spec.role {
            Role::Embedding => "embed".to_string(),
            Role::LmHead => "lm_head".to_string(),
            Role::Gqkv { module, .. } => format!("{module:?}.gqkv"),
            Role::AttnOut { module, .. } => format!("{module:?}.o"),
            Role::GateUp { module, .. } => format!("{module:?}.gate_up"),
            Role::Down { module, .. } => format!("{module:?}.down"),
            Role::ZLInit => continue,
        };
        let r = spec.range().expect("trainable tensors have offsets");
        let i = match groups.iter().position(|(name, _, _)| *name == role) {
            Some(i) => i,
            None => {
                groups.push((role, Vec::new(), Vec::new()));
                groups.len() - 1
            }
        };
        groups[i].1.extend_from_slice(&got[r.clone()]);
        groups[i].2.extend_from_slice(&want[r]);
    }
    groups
}

/// A norm-wise comparison in the table's terms: `max_abs_err` is ‖got - want‖₂,
/// `max_rel_err` that over ‖want‖₂, passing when it is at most `tol` (a zero reference must be
/// matched exactly: a tensor without gradient).
fn rel_l2(got: &[f32], want: &[f32], tol: f32) -> Comparison {
    let (mut err2, mut ref2, mut non_finite) = (0.0f64, 0.0f64, 0);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            non_finite += 1;
            continue;
        }
        err2 += (g as f64 - w as f64).powi(2);
        ref2 += (w as f64).powi(2);
    }
    let (err, norm) = (err2.sqrt(), ref2.sqrt());
    let rel = if norm > 0.0 { err / norm } else if err == 0.0 { 0.0 } else { f64::INFINITY };
    Comparison { len: got.len(), max_abs_err: err, max_rel_err: rel, worst_ratio: rel / tol as f64, worst_index: 0, non_finite }
}

/// Three AdamATan2 steps of [`GpuEngine`] and [`CpuEngine`] from the same state on the same
/// three batches, with hrm's gradient depth warming up (bp_steps 2, 3, 5: the embedding gets
/// its first gradient in step 2, H pass 0 joins in step 3); then a fourth step of two
/// micro-batches (`--micro-batches 2`: the GPU's accumulating path, run op by op).
fn engine_rows(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>> {
    let config = small_config(NetName::Hrm, 4);
    let params = bf16_params(config, rng.next_u64());
    // SPEC §7 defaults, with an EMA decay short enough for three steps to move it.
    let defaults = TrainConfig::default();
    let coeffs = AdamCoeffs { ema_decay: 0.9, ..AdamCoeffs::from_config(&defaults) };
    let lr = defaults.lr;
    let optimizer = AdamAtan2::new(&params, coeffs);
    let mut cpu = CpuEngine::new(params.clone(), optimizer.clone())?;
    let mut gpu_engine = GpuEngine::new(gpu, params, optimizer)?;
    let mut rows = Vec::new();
    for (step, bp_steps) in [2, 3, 5].into_iter().enumerate() {
        let packed = PackedBatch::random(rng, ROWS, VOCAB, 8..120, (0.1, 0.9))?;
        let schedule = Schedule::for_training(&config.net, bp_steps);
        let divisor = packed.num_labels() as f32;
        cpu.train_step(&packed.batch(), &schedule, lr, divisor)?;
        gpu_engine.train_step(&packed.batch(), &schedule, lr, divisor)?;
        let (want, got) = (cpu.read_metrics()?, gpu_engine.read_metrics()?);
        let mean = |m: &StepMetrics| (m.loss_sum / m.valid_tokens.max(1) as f64) as f32;
        rows.push(Row::new(format!("engine step {} loss", step + 1), format!("hrm bp{bp_steps} T{ROWS}"), LOSS_TOL, compare(&[mean(&got)], &[mean(&want)], LOSS_TOL)));
    }
    let (p_gpu, o_gpu) = gpu_engine.snapshot()?;
    let (p_cpu, o_cpu) = cpu.snapshot()?;
    let shape = "hrm L4, 3 steps";
    let row = |what: &str, got: &[f32], want: &[f32], tol: f32| Row::new(format!("engine {what} rel-L2"), shape, Tolerance { abs: 0.0, rel: tol }, rel_l2(got, want, tol));
    rows.push(row("master", &p_gpu.master, &p_cpu.master, MASTER_TOL));
    rows.push(row("ema", &o_gpu.ema, &o_cpu.ema, MASTER_TOL));
    rows.push(row("m", &o_gpu.m, &o_cpu.m, GRAD_TOL));
    rows.push(row("v", &o_gpu.v, &o_cpu.v, V_TOL));
    let exact = Tolerance { abs: 0.0, rel: 0.0 };
    let steps = |s: &[u32]| s.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    rows.push(Row::new("engine step counts", shape, exact, compare(&steps(&o_gpu.steps), &steps(&o_cpu.steps), exact)));

    let micro = [PackedBatch::random(rng, ROWS / 2, VOCAB, 8..120, (0.1, 0.9))?, PackedBatch::random(rng, ROWS / 2, VOCAB, 8..120, (0.1, 0.9))?];
    let views = [micro[0].batch(), micro[1].batch()];
    let divisor = (micro[0].num_labels() + micro[1].num_labels()) as f32 / 2.0;
    let schedule = Schedule::for_training(&config.net, 5);
    cpu.train_micro_batches(&views, &schedule, lr, divisor)?;
    gpu_engine.train_micro_batches(&views, &schedule, lr, divisor)?;
    let (want, got) = (cpu.read_metrics()?, gpu_engine.read_metrics()?);
    let shape = format!("hrm bp5, 2 micro-batches of T{}", ROWS / 2);
    let counts = |m: &StepMetrics| [m.valid_tokens, m.samples_with_labels].map(|x| x as f32);
    rows.push(Row::new("engine micro-batch step: label and sample counts", &shape, exact, compare(&counts(&got), &counts(&want), exact)));
    let loss = |m: &StepMetrics| (m.loss_sum / m.valid_tokens.max(1) as f64) as f32;
    rows.push(Row::new("engine micro-batch step: loss", &shape, LOSS_TOL, compare(&[loss(&got)], &[loss(&want)], LOSS_TOL)));
    let (p_gpu, p_cpu) = (gpu_engine.snapshot()?.0, cpu.snapshot()?.0);
    rows.push(Row::new("engine micro-batch step: master rel-L2", &shape, Tolerance { abs: 0.0, rel: MASTER_TOL }, rel_l2(&p_gpu.master, &p_cpu.master, MASTER_TOL)));
    Ok(rows)
}

/// hrm's gradient depth over the graph check's steps, on a fresh engine: each schedule runs
/// eagerly once, is captured, then replayed; bp_steps 5 allocates more saved passes, which
/// drops bp 2's graph, so bp 2 warms up and is captured again.
const GRAPH_BP_STEPS: [usize; 9] = [2, 2, 2, 5, 5, 5, 2, 2, 2];

/// One engine from one state over the same batches, first with CUDA graphs, then op by op (a
/// second engine would tune its GEMMs anew, maybe to other algorithms): every step's metrics
/// and the final weights, moments, EMA and step counts must agree bit for bit. In between,
/// the loss guard inside replayed graphs: a step with a NaN learning rate poisons the weights,
/// the next step's loss is NaN, and from there on no update may apply.
fn cuda_graph_rows(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>> {
    let config = small_config(NetName::Hrm, 4);
    let params = bf16_params(config, rng.next_u64());
    let coeffs = AdamCoeffs { ema_decay: 0.9, ..AdamCoeffs::from_config(&TrainConfig::default()) };
    let optimizer = AdamAtan2::new(&params, coeffs);
    let batches = GRAPH_BP_STEPS.iter().map(|_| PackedBatch::random(rng, ROWS, VOCAB, 8..120, (0.1, 0.9))).collect::<Result<Vec<_>>>()?;
    let mut engine = GpuEngine::new(gpu, params.clone(), optimizer.clone())?;
    let run = |engine: &mut GpuEngine, graphs: bool| -> Result<(Vec<f32>, Params, AdamAtan2)> {
        engine.set_cuda_graphs(graphs);
        engine.load(&params, &optimizer)?;
        let mut metrics = Vec::new();
        for (i, (&bp, b)) in GRAPH_BP_STEPS.iter().zip(&batches).enumerate() {
            // A learning rate that changes every step: it must reach a replayed graph.
            let lr = TrainConfig::default().lr * (1.0 + i as f32 / 4.0);
            engine.train_step(&b.batch(), &Schedule::for_training(&config.net, bp), lr, b.num_labels() as f32)?;
            let m = engine.read_metrics()?;
            metrics.extend([m.loss_sum as f32, m.valid_tokens as f32, m.correct_tokens as f32, m.exact_samples as f32, m.samples_with_labels as f32]);
        }
        let (p, o) = engine.snapshot()?;
        Ok((metrics, p, o))
    };
    let (m_graph, p_graph, o_graph) = run(&mut engine, true)?;
    let exact = Tolerance { abs: 0.0, rel: 0.0 };
    let shape = format!("hrm L4 T{ROWS}, bp {GRAPH_BP_STEPS:?}");
    // bp 5's graph and bp 2's second one.
    let mut rows = vec![Row::new("graphs captured", &shape, exact, compare(&[engine.captured_graphs() as f32], &[2.0], exact))];

    // The loss guard, graphs still on: bp 2 is captured, so these steps replay it.
    let schedule = Schedule::for_training(&config.net, 2);
    let with_grad = engine.model.tensors_with_grad(&schedule);
    for (i, b) in batches.iter().take(3).enumerate() {
        let lr = if i == 0 { f32::NAN } else { TrainConfig::default().lr };
        engine.train_step(&b.batch(), &schedule, lr, b.num_labels() as f32)?;
    }
    let steps_before = match engine.read_metrics() {
        Err(e) => e.downcast_ref::<NonFiniteLoss>().map_or(-1.0, |nf| nf.steps_before as f32),
        Ok(_) => -2.0,
    };
    // Step 1 (NaN learning rate) had a finite loss and was applied; step 2's loss is NaN.
    let guard = "NaN lr at step 1 of 3";
    rows.push(Row::new("graph loss guard: finite steps before the NaN", guard, exact, compare(&[steps_before], &[1.0], exact)));
    let (_, after) = engine.snapshot()?;
    let steps = |s: &[u32]| s.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let want: Vec<u32> = o_graph.steps.iter().zip(&with_grad).map(|(&s, &g)| s + u32::from(g)).collect();
    rows.push(Row::new("graph loss guard: step counts", guard, exact, compare(&steps(&after.steps), &steps(&want), exact)));

    let (m_eager, p_eager, o_eager) = run(&mut engine, false)?;
    rows.extend([
        Row::new("graph vs eager metrics", &shape, exact, compare(&m_graph, &m_eager, exact)),
        Row::new("graph vs eager master", &shape, exact, compare(&p_graph.master, &p_eager.master, exact)),
        Row::new("graph vs eager m", &shape, exact, compare(&o_graph.m, &o_eager.m, exact)),
        Row::new("graph vs eager v", &shape, exact, compare(&o_graph.v, &o_eager.v, exact)),
        Row::new("graph vs eager ema", &shape, exact, compare(&o_graph.ema, &o_eager.ema, exact)),
        Row::new("graph vs eager step counts", &shape, exact, compare(&steps(&o_graph.steps), &steps(&o_eager.steps), exact)),
    ]);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SizeName;

    fn saved_bytes(plan: &MemoryPlan) -> u64 {
        plan.items.iter().find(|(w, _)| w.starts_with("saved activations")).unwrap().1
    }

    #[test]
    fn memory_plan_counts_the_saved_passes() {
        // One more pass with gradient adds exactly one pass of saved activations, or with
        // recomputation one pass input [T, D].
        let cfg = ModelConfig::new(SizeName::Tiny, NetName::Hrm, 512);
        let saved = |bp: usize, recompute: bool| {
            let schedule = Schedule::for_training(&cfg.net, bp).with_recompute(recompute);
            saved_bytes(&MemoryPlan::predict(&cfg, &schedule, 1024).unwrap())
        };
        let per_pass = saved(3, false) - saved(2, false);
        assert!(per_pass > 0);
        assert_eq!(saved(5, false) - saved(4, false), per_pass);
        // Tiny has 2 blocks per module: the input, 2 stream buffers of [T, D] and 2 blocks'
        // activations (bf16 xn1, x1, xn2; gqkv [T, 4C] and the gated output [T, C]; gu, act;
        // fp32 rstd1, rstd2, lse).
        let (t, d, c, i, nh) = (1024u64, 256u64, 256u64, 768u64, 2u64);
        let block = 2 * (3 * t * d + 5 * t * c + 3 * t * i) + 4 * (2 * t + nh * t);
        assert_eq!(per_pass, 3 * 2 * t * d + 2 * block + 4 * t);
        // Recomputation: every pass's input, and one pass's activations without its input.
        let input = 2 * t * d;
        for bp in 2..=5 {
            assert_eq!(saved(bp, true), bp as u64 * input + per_pass - input, "bp_steps {bp}");
        }
    }

    #[test]
    fn xl_hrm_at_bp5_and_12k_tokens_fits_80_gb() {
        let cfg = ModelConfig::new(SizeName::XL, NetName::Hrm, 65_536);
        let schedule = Schedule::for_training(&cfg.net, 5);
        let plan = MemoryPlan::predict(&cfg, &schedule, 12_288).unwrap();
        let recompute = MemoryPlan::predict(&cfg, &schedule.with_recompute(true), 12_288).unwrap();
        println!("kept activations:\n{plan}\nrecomputed activations:\n{recompute}");
        // An H100 80GB offers 79.1 GiB to the process.
        assert!(plan.total() < (79u64 << 30), "{plan}");
        // Recomputation keeps 1 pass's activations instead of 5, plus the 5 inputs.
        let per_pass = (saved_bytes(&plan) - saved_bytes(&recompute)) / 4;
        assert!(saved_bytes(&recompute) < 2 * per_pass, "{recompute}");
    }

    #[test]
    fn a_plan_that_does_not_fit_names_what_would() {
        // XL hrm at bp_steps 5 on 12,288 tokens, on a device with 40 GiB free: recomputation
        // fits, and so does the batch in 2 or more parts.
        let cfg = ModelConfig::new(SizeName::XL, NetName::Hrm, 65_536);
        let plan = MemoryPlan::predict(&cfg, &Schedule::for_training(&cfg.net, 5), 12_288).unwrap();
        let free = 40u64 << 30;
        assert!(plan.allocations() > free);
        let found = plan.alternatives(free).unwrap();
        for a in &found {
            println!("{a}");
        }
        assert_eq!(found.len(), 2, "recomputation fits, so no split with it is proposed");
        assert!(found[0].recompute && found[0].parts == 1 && found[0].fits);
        assert!(!found[1].recompute && found[1].parts > 1 && found[1].fits);
        assert_eq!(found[1].part_tokens * found[1].parts, 12_288);
        // The fewest parts: one fewer does not fit.
        let fewer = (1..found[1].parts).rev().find(|k| 12_288 % k == 0).unwrap();
        assert!(MemoryPlan::predict(&cfg, &Schedule::for_training(&cfg.net, 5), 12_288 / fewer).unwrap().allocations() > free);
        // On 10 GiB free neither fits alone: the split is proposed with recomputation too.
        let found = plan.alternatives(10u64 << 30).unwrap();
        assert_eq!(found.len(), 3);
        assert!(!found[0].fits && found[2].recompute && found[2].parts > 1);
    }
}
