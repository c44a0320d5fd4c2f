//! The HRM-Text model: forward and backward of every net, written once against [`Backend`].
//!
//! One step (SPEC §2-§5), with `T` tokens, `D` hidden, `C = heads*128`, `I` intermediate:
//!
//! ```text
//! z_H = embed(tokens) * sqrt(D)                   [T, D]
//! z_L = z_L_init on every row                     [T, D]   (all nets but transformer)
//! for pass in schedule:  z[out] = module(z[z] + z[inj])     (schedule.rs)
//! losses, correct = CE(z[output] @ W_lm^T, labels)          [T]
//! ```
//!
//! A module is `n` blocks and a final weightless rms; a block is
//!
//! ```text
//! x1    = x  + (sigmoid(g) * attn(rope(q), rope(k), v)) @ W_o^T   g,q,k,v = split(rms(x) @ W_gqkv^T)
//! x_out = x1 + (silu(gate) * up) @ W_down^T                        gate,up = split(rms(x1) @ W_gate_up^T)
//! ```
//!
//! The backward walks the schedule in reverse with one gradient buffer per state. A pass with
//! gradient turns `d z[out]` into `d(z + inj)` through its activations and adds it to
//! both `d z[z]` and `d z[inj]`; a pass without gradient is a constant, so it zeroes
//! `d z[out]` and stops there. What is left in `d z_H` at the start is the embedding's
//! gradient. The derivation of the block's backward is in `docs/model.md`.
//!
//! Memory: every pass with gradient keeps its input `x_0 = z + inj` and its activations
//! ([`PassActs`], one set per block); all passes without gradient share one scratch set of a
//! single block whose residual stream ping-pongs between two buffers (the "ring" indexing
//! below), so they keep nothing. With [`Schedule::recompute`] a pass with gradient keeps only
//! its input: its forward runs in the scratch set like a pass without gradient, and just
//! before its backward `pass_recompute` reruns it from that input into one activation
//! arena, a single pass's set that every pass with gradient refills in turn. The ops and their
//! inputs are the same, so the recomputed activations are the same bits.
//!
//! A step runs in two halves: [`Model::stage_step`] does everything that needs the host (it
//! checks the batch, sizes the buffers and writes the batch into them), and
//! [`Model::enqueue_step`] only enqueues device work on those buffers. The second half reads
//! no host value but the sizes, so a GPU trainer can capture it once in a CUDA graph and
//! replay it for every batch of the same shape; its metrics stay on the device until the
//! trainer reads them ([`Backend::read_metrics`]).

use anyhow::{bail, ensure, Context, Result};
use half::bf16;

use crate::config::{ModelConfig, ModuleName};
use crate::model::backend::{Backend, TensorAt};
use crate::model::schedule::{Pass, Schedule, Slot};
use crate::model::spec::{ParamLayout, Role};
use crate::ops::cross_entropy::{StepMetrics, IGNORE_LABEL};

/// One packed batch on the host (SPEC §4), the fields of `data::batch::PackedBatch`.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    /// Token ids `[T]` (padding: 0).
    pub inputs: &'a [i32],
    /// Next-token labels `[T]`, `IGNORE_LABEL` where no loss is taken.
    pub labels: &'a [i32],
    /// RoPE positions `[T]`, from 0 at each sample's start.
    pub positions: &'a [i32],
    /// Sample starts [S+1]: sample `s` is rows `cu_seqlens[s]..cu_seqlens[s+1]`.
    pub cu_seqlens: &'a [i32],
    /// Instruction length `p` of every sample `[S]`.
    pub prefix_lens: &'a [i32],
}

impl Batch<'_> {
    pub fn tokens(&self) -> usize {
        self.inputs.len()
    }

    /// Checks every field against the others and against the vocabulary, so that no op sees
    /// an index out of range.
    pub fn check(&self, vocab: usize) -> Result<()> {
        let t = self.inputs.len();
        ensure!(t > 0, "batch: no tokens");
        ensure!(self.labels.len() == t, "batch: {} labels for {t} inputs", self.labels.len());
        ensure!(self.positions.len() == t, "batch: {} positions for {t} inputs", self.positions.len());
        ensure!(
            self.cu_seqlens.len() == self.prefix_lens.len() + 1,
            "batch: cu_seqlens has {} entries for {} samples (want S+1)",
            self.cu_seqlens.len(),
            self.prefix_lens.len()
        );
        if let Some(i) = self.inputs.iter().position(|&x| x < 0 || x as usize >= vocab) {
            bail!("batch: input {i} is token {} outside the vocabulary of {vocab}", self.inputs[i]);
        }
        if let Some(i) = self.labels.iter().position(|&y| y != IGNORE_LABEL && (y < 0 || y as usize >= vocab)) {
            bail!("batch: label {i} is {} (want -100 or a token below {vocab})", self.labels[i]);
        }
        if let Some(i) = self.positions.iter().position(|&p| p < 0) {
            bail!("batch: position {i} is negative ({})", self.positions[i]);
        }
        ensure!(self.cu_seqlens[0] == 0, "batch: cu_seqlens starts at {}, not 0", self.cu_seqlens[0]);
        for (s, &p) in self.prefix_lens.iter().enumerate() {
            let (start, end) = (self.cu_seqlens[s], self.cu_seqlens[s + 1]);
            ensure!(start <= end && end as usize <= t, "batch: sample {s} spans rows [{start}, {end}) of {t}");
            ensure!(p >= 0 && p <= end - start, "batch: sample {s} has prefix length {p} but {} rows", end - start);
        }
        Ok(())
    }
}

/// What a step's backward finds in the gradient buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradStart {
    /// Nothing of this step (the first micro-batch; the buffer holds the last step's): each
    /// trained tensor's first contribution writes its region, and the regions nothing writes
    /// are zeroed, so the buffer needs no zeroing pass of its own.
    Fresh,
    /// Gradients to add to (a later micro-batch of the step, or a caller's running sum).
    Accumulate,
}

/// What one training step hands back to the trainer.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    pub metrics: StepMetrics,
    /// One flag per tensor of `ParamLayout::tensors` (same order): whether it received
    /// gradient this step. The optimiser skips tensors without (SPEC §7); `z_L_init` is never
    /// trained.
    pub tensors_with_grad: Vec<bool>,
}

/// Where a block's four weights lie in the flat buffers.
#[derive(Clone, Copy, Debug)]
struct BlockWeights {
    gqkv: TensorAt,    // [4C, D]
    o: TensorAt,       // [D, C]
    gate_up: TensorAt, // [2I, D]
    down: TensorAt,    // [D, I]
}

/// The positions of every weight, read once off the spec table.
#[derive(Clone, Debug)]
struct WeightMap {
    embed: TensorAt,   // [V, D]
    lm_head: TensorAt, // [V, D]
    modules: Vec<(ModuleName, Vec<BlockWeights>)>,
}

impl WeightMap {
    fn new(cfg: &ModelConfig, layout: &ParamLayout) -> Result<WeightMap> {
        let at = |role: Role| -> Result<TensorAt> {
            let spec = layout.get(role).with_context(|| format!("{role:?} missing from the spec table"))?;
            TensorAt::of(spec)
        };
        let mut modules = Vec::new();
        for (module, n_blocks) in cfg.net.modules(cfg.dims.n_layers) {
            let blocks = (0..n_blocks)
                .map(|layer| {
                    Ok(BlockWeights {
                        gqkv: at(Role::Gqkv { module, layer })?,
                        o: at(Role::AttnOut { module, layer })?,
                        gate_up: at(Role::GateUp { module, layer })?,
                        down: at(Role::Down { module, layer })?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            modules.push((module, blocks));
        }
        Ok(WeightMap { embed: at(Role::Embedding)?, lm_head: at(Role::LmHead)?, modules })
    }

    fn module(&self, m: ModuleName) -> Result<&[BlockWeights]> {
        match self.modules.iter().find(|(name, _)| *name == m) {
            Some((_, blocks)) => Ok(blocks),
            None => bail!("the schedule calls module {m:?}, which this net does not have"),
        }
    }
}

/// The activations of one block that its backward reads.
struct BlockActs<B: Backend> {
    xn1: B::Act,   // [T, D]  rms(x), the attention input
    rstd1: B::F32, // [T]
    gqkv: B::Act,  // [T, 4C] rms(x) @ W_gqkv^T: gate | q | k | v heads, q and k roped in place
    lse: B::F32,   // [NH, T]
    ga: B::Act,    // [T, C]  sigmoid(g) * attn(q, k, v), the input of W_o (attn itself not kept)
    x1: B::Act,    // [T, D]  residual stream after attention
    xn2: B::Act,   // [T, D]  rms(x1), the MLP input
    rstd2: B::F32, // [T]
    gu: B::Act,    // [T, 2I] gate | up
    act: B::Act,   // [T, I]  silu(gate) * up, the input of W_down
}

/// The activations one module pass computes from its input `x_0 = z + inj` (which lives
/// outside, see [`Workspace`]): the residual stream after each block and each block's.
/// `x[i]` is block i's output `x_{i+1}`, `x[n-1]` the input of the final rms. Indexing is
/// modulo the lengths, so the scratch set (2 stream buffers, 1 block) serves a module of any
/// depth as a ring, and a kept set (`n`, `n`) is indexed plainly.
struct PassActs<B: Backend> {
    x: Vec<B::Act>, // each [T, D]
    blocks: Vec<BlockActs<B>>,
    rstd: B::F32, // [T]  of the final rms
}

/// Gradient scratch of one block, reused by every block of every pass.
struct BlockGrads<B: Backend> {
    dres: B::Act,  // [T, D]  the residual stream's gradient, updated in place
    dxn: B::Act,   // [T, D]  gradient of a norm's output
    dact: B::Act,  // [T, I]
    dgu: B::Act,   // [T, 2I]
    dga: B::Act,   // [T, C]
    dgqkv: B::Act, // [T, 4C]  gate and attention gradients in place, then d of the projection
}

/// The smallest sample table a workspace holds (see [`DeviceBatch`]).
const MIN_SAMPLE_CAPACITY: usize = 64;

/// The batch on the backend, in buffers of fixed size so that every step reads its batch from
/// the same places. The sample table holds `samples` entries, at least the batch's `S`: the
/// rest are empty samples (the last offset repeated, prefix 0), which change no result (an
/// empty sample has no rows to attend and no labels to count). The capacity is a power of two,
/// grown when a batch has more samples, so padding at most doubles the per-sample work (one
/// block per sample in the attention's span table, one warp-iteration in the metrics).
struct DeviceBatch<B: Backend> {
    samples: usize,
    tokens: B::I32,      // [T]
    labels: B::I32,      // [T]
    positions: B::I32,   // [T]
    cu_seqlens: B::I32,  // [samples+1]
    prefix_lens: B::I32, // [samples]
    grad_scale: B::F32,  // [1]  1 / loss_divisor, the LM head's gradient scale
}

impl<B: Backend> DeviceBatch<B> {
    /// Buffers for `t` tokens and a sample table for at least `s` samples.
    fn new(be: &B, t: usize, s: usize) -> Result<DeviceBatch<B>> {
        let samples = s.next_power_of_two().max(MIN_SAMPLE_CAPACITY);
        Ok(DeviceBatch {
            samples,
            tokens: be.alloc_i32(t)?,
            labels: be.alloc_i32(t)?,
            positions: be.alloc_i32(t)?,
            cu_seqlens: be.alloc_i32(samples + 1)?,
            prefix_lens: be.alloc_i32(samples)?,
            grad_scale: be.alloc_f32(1)?,
        })
    }

    /// Writes `batch` (checked, with as many tokens as the buffers and at most `samples`
    /// samples), its sample table padded to the capacity, and `grad_scale`.
    fn write(&mut self, be: &B, batch: &Batch, grad_scale: f32) -> Result<()> {
        let s = batch.prefix_lens.len();
        ensure!(s <= self.samples, "batch: {s} samples for a sample table of {}", self.samples);
        let last = *batch.cu_seqlens.last().expect("a checked batch has cu_seqlens[0]");
        let mut cu_seqlens = batch.cu_seqlens.to_vec();
        cu_seqlens.resize(self.samples + 1, last);
        let mut prefix_lens = batch.prefix_lens.to_vec();
        prefix_lens.resize(self.samples, 0);
        be.write_i32(&mut self.tokens, batch.inputs)?;
        be.write_i32(&mut self.labels, batch.labels)?;
        be.write_i32(&mut self.positions, batch.positions)?;
        be.write_i32(&mut self.cu_seqlens, &cu_seqlens)?;
        be.write_i32(&mut self.prefix_lens, &prefix_lens)?;
        be.sample_table_changed();
        be.write_f32(&mut self.grad_scale, &[grad_scale])
    }
}

/// Sizes every op call needs.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    t: usize,
    d: usize,
    nh: usize,
    c: usize,
    i: usize,
    v: usize,
}

/// Every buffer of a step of `T` tokens, allocated once and reused while `T` stays the same.
struct Workspace<B: Backend> {
    t: usize,
    batch: DeviceBatch<B>,
    state: [B::Act; 2],  // [T, D] each, indexed by Slot: z_H, z_L
    dstate: [B::Act; 2], // [T, D] their gradients
    /// `x_0 = z + inj` of a pass without gradient.
    scratch_input: B::Act, // [T, D]
    /// The ring every pass runs in when its activations are not kept.
    scratch: PassActs<B>,
    /// `x_0 = z + inj` of each pass with gradient, in forward order: where its backward (and
    /// its recomputation) starts. Grows with `bp_steps`.
    inputs: Vec<B::Act>, // [T, D] each
    /// The activations the backward reads: one set per pass with gradient, in forward order;
    /// with recompute a single set, the arena each pass's recomputation refills.
    kept: Vec<PassActs<B>>,
    grads: BlockGrads<B>,
    losses: B::F32, // [T]
    correct: B::U8, // [T]
}

/// The model on one backend: weight positions, `z_L_init` and the step's buffers.
pub struct Model<B: Backend> {
    backend: B,
    config: ModelConfig,
    layout: ParamLayout,
    weights: WeightMap,
    /// `z_L_init` `[D]`, in the activation precision; `None` for transformer.
    z_l_init: Option<B::Act>,
    /// Blocks of the deepest module: the size of a kept pass.
    max_blocks: usize,
    ws: Option<Workspace<B>>,
    /// The metric sums of [`Model::forward_backward`] and [`Model::forward_loss`] (a trainer
    /// passes its own to [`Model::enqueue_step`]).
    metrics: Option<B::Metrics>,
}

impl<B: Backend> Model<B> {
    /// `z_l_init` is the saved bf16 vector `[D]` (empty for transformer).
    pub fn new(backend: B, config: ModelConfig, z_l_init: &[bf16]) -> Result<Model<B>> {
        let layout = ParamLayout::new(&config);
        let weights = WeightMap::new(&config, &layout)?;
        let d = config.dims.hidden;
        let z_l_init = if config.net.has_z_l_init() {
            ensure!(z_l_init.len() == d, "z_L_init has {} elements, the model's hidden size is {d}", z_l_init.len());
            let host: Vec<f32> = z_l_init.iter().map(|x| x.to_f32()).collect();
            Some(backend.upload_act(&host)?)
        } else {
            None
        };
        let max_blocks = weights.modules.iter().map(|(_, b)| b.len()).max().unwrap_or(0);
        ensure!(max_blocks > 0, "the {:?} net with n_layers = {} has a module without blocks", config.net.name(), config.dims.n_layers);
        Ok(Model { backend, config, layout, weights, z_l_init, max_blocks, ws: None, metrics: None })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// One forward and backward over `batch`. `grads` (master-shaped, fp32) accumulates
    /// `d(loss_sum / loss_divisor)/d(weights)`; `loss_divisor` is the number of valid labels
    /// (at world size 1; SPEC §5). Gradient flows only through the passes of `schedule` that
    /// have it. Reads the metrics back (synchronises): for checks and tools; a trainer runs
    /// [`Model::stage_step`] and [`Model::enqueue_step`] and reads metrics when it logs.
    pub fn forward_backward(&mut self, weights: &B::Weights, batch: &Batch, schedule: &Schedule, grads: &mut B::Grads, loss_divisor: f32) -> Result<StepOutput> {
        self.stage_step(batch, schedule, loss_divisor)?;
        let metrics = self.enqueue_and_read(weights, schedule, Some((grads, GradStart::Accumulate)))?;
        Ok(StepOutput { metrics, tensors_with_grad: self.tensors_with_grad(schedule) })
    }

    /// The forward alone (evaluation, `hrm-cu loss`): no activations kept, no gradients.
    /// Synchronises.
    pub fn forward_loss(&mut self, weights: &B::Weights, batch: &Batch) -> Result<StepMetrics> {
        let schedule = Schedule::forward_only(&self.config.net);
        self.stage(batch, 0, 0, 0.0)?; // no gradient: the scale multiplies logit gradients nobody reads
        self.enqueue_and_read(weights, &schedule, None)
    }

    /// One flag per tensor of `ParamLayout::tensors` (same order): whether a step with
    /// `schedule` gives it gradient. The optimiser skips tensors without (SPEC §7);
    /// `z_L_init` is never trained.
    pub fn tensors_with_grad(&self, schedule: &Schedule) -> Vec<bool> {
        self.layout
            .tensors
            .iter()
            .map(|t| match t.role {
                Role::Embedding => schedule.embedding_grad,
                Role::LmHead => true,
                Role::Gqkv { module, .. } | Role::AttnOut { module, .. } | Role::GateUp { module, .. } | Role::Down { module, .. } => schedule.module_grad(module),
                Role::ZLInit => false,
            })
            .collect()
    }

    /// The first half of a training step: checks `batch`, sizes the step's buffers for it and
    /// for the passes of `schedule` with gradient (allocating only what grows), and writes the
    /// batch and the gradient scale `1 / loss_divisor` into them.
    /// When the schedule trains the embedding, the batch's token order for its backward is
    /// prepared here too (host work and a copy, outside the enqueued step).
    pub fn stage_step(&mut self, batch: &Batch, schedule: &Schedule, loss_divisor: f32) -> Result<()> {
        ensure!(loss_divisor.is_finite() && loss_divisor > 0.0, "loss_divisor must be positive, got {loss_divisor}");
        self.stage(batch, schedule.grad_passes(), schedule.kept_passes(), 1.0 / loss_divisor)?;
        if schedule.embedding_grad {
            self.backend.prepare_token_order(batch.inputs, self.config.vocab)?;
        }
        Ok(())
    }

    /// The second half: enqueues the forward and backward of the staged batch with `schedule`
    /// (which must be the staged one's or need no more pass inputs and kept passes). `metrics`
    /// (the batch's sums, on the backend) accumulate: zero them first
    /// ([`Backend::zero_metrics`]), then stage and enqueue each micro-batch of a step in turn,
    /// the first with [`GradStart::Fresh`], the others with [`GradStart::Accumulate`]: `grads`
    /// then holds the step's summed gradients without being zeroed first. Nothing is read back
    /// and nothing is allocated.
    pub fn enqueue_step(&mut self, weights: &B::Weights, schedule: &Schedule, grads: &mut B::Grads, start: GradStart, metrics: &mut B::Metrics) -> Result<()> {
        self.enqueue(weights, schedule, Some((grads, start)), metrics)
    }

    /// The per-token losses `[T]` of the last step (0 on ignored labels). Synchronises.
    pub fn token_losses(&self) -> Result<Vec<f32>> {
        let ws = self.ws.as_ref().context("token_losses: no step has run yet")?;
        self.backend.download_f32(&ws.losses)
    }

    fn sizes(&self, t: usize) -> Sizes {
        let d = &self.config.dims;
        Sizes { t, d: d.hidden, nh: d.heads, c: d.heads * d.head_dim, i: d.intermediate, v: self.config.vocab }
    }

    /// Checks `batch`, plans the workspace for it with `inputs` pass inputs and `kept` kept
    /// passes, writes it.
    fn stage(&mut self, batch: &Batch, inputs: usize, kept: usize, grad_scale: f32) -> Result<()> {
        batch.check(self.config.vocab)?;
        let sz = self.sizes(batch.tokens());
        let ws = plan(&mut self.ws, &self.backend, sz, self.max_blocks, inputs, kept, batch.prefix_lens.len())?;
        ws.batch.write(&self.backend, batch, grad_scale)
    }

    /// Enqueues the staged step with the model's own metric sums and reads them back.
    fn enqueue_and_read(&mut self, w: &B::Weights, schedule: &Schedule, grads: Option<(&mut B::Grads, GradStart)>) -> Result<StepMetrics> {
        let mut sums = match self.metrics.take() {
            Some(sums) => sums,
            None => self.backend.alloc_metrics()?,
        };
        let read = self.backend.zero_metrics(&mut sums).and_then(|()| self.enqueue(w, schedule, grads, &mut sums)).and_then(|()| self.backend.read_metrics(&sums));
        self.metrics = Some(sums);
        read
    }

    fn enqueue(&mut self, w: &B::Weights, schedule: &Schedule, grads: Option<(&mut B::Grads, GradStart)>, metrics: &mut B::Metrics) -> Result<()> {
        let master_len = self.layout.master_len;
        ensure!(self.backend.weights_len(w) == master_len, "weights hold {} elements, the layout {master_len}", self.backend.weights_len(w));
        if let Some((g, _)) = &grads {
            ensure!(self.backend.grads_len(g) == master_len, "gradients hold {} elements, the layout {master_len}", self.backend.grads_len(g));
        }
        // A fresh step writes each trained tensor's gradient with its first contribution; the
        // regions nothing overwrites are zeroed: tensors without gradient this step (so that
        // the whole buffer is this step's, as the gradient norm reads it) and the embedding,
        // whose backward adds only the rows of the batch's tokens.
        let untouched: Vec<TensorAt> = match &grads {
            Some((_, GradStart::Fresh)) => {
                let with_grad = self.tensors_with_grad(schedule);
                let specs = self.layout.tensors.iter().zip(with_grad).filter(|(spec, with)| spec.offset.is_some() && (!with || spec.role == Role::Embedding));
                specs.map(|(spec, _)| TensorAt::of(spec)).collect::<Result<_>>()?
            }
            _ => Vec::new(),
        };
        ensure!(self.config.net.has_z_l_init() || schedule.passes.iter().all(|p| p.z != Slot::L && p.inj != Some(Slot::L)), "the schedule reads z_L, which the {:?} net does not have", self.config.net.name());
        let sz = self.sizes(self.ws.as_ref().context("no batch was staged")?.t);
        let ws = self.ws.as_mut().expect("checked above");
        let training = grads.is_some();
        let (inputs, kept) = if training { (schedule.grad_passes(), schedule.kept_passes()) } else { (0, 0) };
        ensure!(
            ws.inputs.len() >= inputs && ws.kept.len() >= kept,
            "the staged buffers keep {} pass inputs and {} passes' activations, the schedule needs {inputs} and {kept}: stage the batch with this schedule",
            ws.inputs.len(),
            ws.kept.len()
        );
        let (be, wm) = (&self.backend, &self.weights);
        let db = &ws.batch;
        let (t, d) = (sz.t, sz.d);
        let scale = (d as f32).sqrt(); // SPEC §3: embedding times 1/init_std = sqrt(hidden)

        // ---- forward ----
        be.embedding_fwd(&mut ws.state[Slot::H.index()], &db.tokens, w, wm.embed, t, d, scale)?;
        if let Some(z0) = &self.z_l_init {
            be.broadcast_rows(&mut ws.state[Slot::L.index()], z0, t, d)?;
        }
        let mut k = 0; // passes with gradient so far
        for pass in &schedule.passes {
            let (input, acts) = match (pass.grad && training, schedule.recompute) {
                (true, false) => (&mut ws.inputs[k], &mut ws.kept[k]),
                (true, true) => (&mut ws.inputs[k], &mut ws.scratch),
                (false, _) => (&mut ws.scratch_input, &mut ws.scratch),
            };
            // Only a kept pass's activations are read again (a recomputed one's by its rerun).
            let keep = pass.grad && training && !schedule.recompute;
            pass_forward(be, w, wm.module(pass.module)?, pass, input, acts, keep, &mut ws.state, db, sz)?;
            k += usize::from(pass.grad && training);
        }
        let out = schedule.output.index();
        let Some((grads, start)) = grads else {
            be.lm_head_loss(&mut ws.losses, &mut ws.correct, None, &ws.state[out], w, wm.lm_head, &db.labels, t, sz.v, d, &db.grad_scale)?;
            return be.step_metrics(metrics, &ws.losses, &ws.correct, &db.labels, &db.cu_seqlens, t);
        };
        for &at in &untouched {
            be.zero_grads_at(grads, at)?;
        }
        // The LM head writes d z[output]; the other state's gradient starts at zero.
        let fresh = start == GradStart::Fresh;
        be.lm_head_loss(&mut ws.losses, &mut ws.correct, Some((&mut ws.dstate[out], &mut *grads, !fresh)), &ws.state[out], w, wm.lm_head, &db.labels, t, sz.v, d, &db.grad_scale)?;
        be.zero_act(&mut ws.dstate[schedule.output.other().index()])?;

        // ---- backward ----
        // A module's weights get gradient from each of its passes with gradient: the first of
        // them in the backward's order writes it (when the step is fresh), the others add.
        let mut modules_written: Vec<ModuleName> = Vec::new();
        for pass in schedule.passes.iter().rev() {
            if !pass.grad {
                // A pass without gradient is a constant: the gradient of its output stops here.
                be.zero_act(&mut ws.dstate[pass.out.index()])?;
                continue;
            }
            k -= 1;
            let blocks = wm.module(pass.module)?;
            let acts = if schedule.recompute {
                // The states are no longer read once the LM head has run: the rerun writes the
                // pass's output where its forward did, the same bits.
                pass_recompute(be, w, blocks, &ws.inputs[k], &mut ws.kept[0], &mut ws.state[pass.out.index()], db, sz)?;
                &ws.kept[0]
            } else {
                &ws.kept[k]
            };
            let accumulate = !fresh || modules_written.contains(&pass.module);
            if !accumulate {
                modules_written.push(pass.module);
            }
            pass_backward(be, w, blocks, grads, accumulate, pass, &ws.inputs[k], acts, &mut ws.grads, &mut ws.dstate, db, sz)?;
        }
        if schedule.embedding_grad {
            be.embedding_bwd(grads, wm.embed, &ws.dstate[Slot::H.index()], &db.tokens, t, d, scale)?;
        }
        be.step_metrics(metrics, &ws.losses, &ws.correct, &db.labels, &db.cu_seqlens, t)
    }
}

impl<B: Backend> Workspace<B> {
    /// Every buffer of a step of `T` tokens and `s` samples, with no passes with gradient yet.
    fn new(be: &B, sz: Sizes, s: usize) -> Result<Workspace<B>> {
        let Sizes { t, d, c, i, .. } = sz;
        let act = |n: usize| be.alloc_act(n);
        Ok(Workspace {
            t,
            batch: DeviceBatch::new(be, t, s)?,
            state: [act(t * d)?, act(t * d)?],
            dstate: [act(t * d)?, act(t * d)?],
            scratch_input: act(t * d)?,
            scratch: alloc_pass(be, sz, 2, 1)?,
            inputs: Vec::new(),
            kept: Vec::new(),
            grads: BlockGrads {
                dres: act(t * d)?,
                dxn: act(t * d)?,
                dact: act(t * i)?,
                dgu: act(t * 2 * i)?,
                dga: act(t * c)?,
                dgqkv: act(t * 4 * c)?,
            },
            losses: be.alloc_f32(t)?,
            correct: be.alloc_u8(t)?,
        })
    }
}

/// The workspace for `T = sz.t` tokens, `s` samples, at least `inputs` pass inputs and `kept`
/// kept passes of `blocks` blocks: the existing one when `T` is unchanged (growing the sample
/// table, the inputs and the kept passes if needed), else a fresh one.
#[allow(clippy::too_many_arguments)]
fn plan<'a, B: Backend>(slot: &'a mut Option<Workspace<B>>, be: &B, sz: Sizes, blocks: usize, inputs: usize, kept: usize, s: usize) -> Result<&'a mut Workspace<B>> {
    if slot.as_ref().is_some_and(|ws| ws.t != sz.t) {
        *slot = None; // release the old buffers before allocating new ones
    }
    let ws = match slot {
        Some(ws) => ws,
        None => slot.insert(Workspace::new(be, sz, s)?),
    };
    if ws.batch.samples < s {
        ws.batch = DeviceBatch::new(be, sz.t, s)?;
    }
    while ws.inputs.len() < inputs {
        ws.inputs.push(be.alloc_act(sz.t * sz.d)?);
    }
    while ws.kept.len() < kept {
        ws.kept.push(alloc_pass(be, sz, blocks, blocks)?);
    }
    Ok(ws)
}

/// Activations of a pass with `stream` residual-stream buffers and `blocks` blocks: `n` and
/// `n` to keep a pass of up to `n` blocks, 2 and 1 for the scratch ring.
fn alloc_pass<B: Backend>(be: &B, sz: Sizes, stream: usize, blocks: usize) -> Result<PassActs<B>> {
    let Sizes { t, d, nh, c, i, .. } = sz;
    let act = |n: usize| be.alloc_act(n);
    let f32 = |n: usize| be.alloc_f32(n);
    Ok(PassActs {
        x: (0..stream).map(|_| act(t * d)).collect::<Result<_>>()?,
        blocks: (0..blocks)
            .map(|_| {
                Ok(BlockActs {
                    xn1: act(t * d)?,
                    rstd1: f32(t)?,
                    gqkv: act(t * 4 * c)?,
                    lse: f32(nh * t)?,
                    ga: act(t * c)?,
                    x1: act(t * d)?,
                    xn2: act(t * d)?,
                    rstd2: f32(t)?,
                    gu: act(t * 2 * i)?,
                    act: act(t * i)?,
                })
            })
            .collect::<Result<_>>()?,
        rstd: f32(t)?,
    })
}

/// `(&ring[i], &mut ring[i + 1])`, indices modulo the ring's length (at least 2).
fn ring_pair<T>(ring: &mut [T], i: usize) -> (&T, &mut T) {
    let (a, b) = (i % ring.len(), (i + 1) % ring.len());
    if a < b {
        let (lo, hi) = ring.split_at_mut(b);
        (&lo[a], &mut hi[0])
    } else {
        let (lo, hi) = ring.split_at_mut(a);
        (&hi[0], &mut lo[b])
    }
}

/// `state[out] = Module(state[z] + state[inj])`, writing `input = x_0 = z + inj` and `acts`
/// (without `keep`, only what the forward itself reads).
#[allow(clippy::too_many_arguments)]
fn pass_forward<B: Backend>(be: &B, w: &B::Weights, blocks: &[BlockWeights], pass: &Pass, input: &mut B::Act, acts: &mut PassActs<B>, keep: bool, state: &mut [B::Act; 2], db: &DeviceBatch<B>, sz: Sizes) -> Result<()> {
    // x_0 = z + inj, normed for block 0's attention (one fused op)
    let inj = pass.inj.map(|s| &state[s.index()]);
    let first = &mut acts.blocks[0];
    be.add_rmsnorm_fwd(input, &mut first.xn1, &mut first.rstd1, &state[pass.z.index()], inj, sz.t, sz.d)?;
    module_forward(be, w, blocks, input, acts, keep, &mut state[pass.out.index()], db, sz)
}

/// The forward of a pass again, from its saved `input` `x_0` [T, D], refilling `acts` for its
/// backward: the ops of [`pass_forward`] on the same values (the rms of a stored `x_0` is
/// what the fused add-and-norm computed from it), so the same bits. Writes the pass's output
/// to `out` [T, D] as the forward did.
#[allow(clippy::too_many_arguments)]
fn pass_recompute<B: Backend>(be: &B, w: &B::Weights, blocks: &[BlockWeights], input: &B::Act, acts: &mut PassActs<B>, out: &mut B::Act, db: &DeviceBatch<B>, sz: Sizes) -> Result<()> {
    let first = &mut acts.blocks[0];
    be.rmsnorm_fwd(&mut first.xn1, &mut first.rstd1, input, sz.t, sz.d)?;
    module_forward(be, w, blocks, input, acts, true, out, db, sz)
}

/// The blocks and the final rms of a pass: `out = rms(x_n)` from `x_0 = input` [T, D], given
/// block 0's pre-norm in `acts.blocks[0]`; `keep` as in [`pass_forward`].
#[allow(clippy::too_many_arguments)]
fn module_forward<B: Backend>(be: &B, w: &B::Weights, blocks: &[BlockWeights], input: &B::Act, acts: &mut PassActs<B>, keep: bool, out: &mut B::Act, db: &DeviceBatch<B>, sz: Sizes) -> Result<()> {
    let (t, d, n) = (sz.t, sz.d, blocks.len());
    let (xs, bs) = (acts.x.len(), acts.blocks.len());
    for (i, bw) in blocks.iter().enumerate() {
        // block i reads x_i (the input, or the previous block's output) and writes x_{i+1}
        let (x, x_next) = if i == 0 { (input, &mut acts.x[0]) } else { ring_pair(&mut acts.x, i - 1) };
        block_forward(be, w, bw, &mut acts.blocks[i % bs], keep, x, x_next, db, sz)?;
        // The pre-norm of what reads x_{i+1}: block i+1's attention, or the module's final rms.
        let x_next = &acts.x[i % xs];
        if i + 1 < n {
            let next = &mut acts.blocks[(i + 1) % bs];
            be.rmsnorm_fwd(&mut next.xn1, &mut next.rstd1, x_next, t, d)?;
        } else {
            be.rmsnorm_fwd(out, &mut acts.rstd, x_next, t, d)?;
        }
    }
    Ok(())
}

/// One block, given its input `x` [T, D] and `a.xn1 = rms(x)`; writes `x_out` [T, D], and
/// `a.gu` only with `keep` (its backward's input, read by nothing else).
#[allow(clippy::too_many_arguments)]
fn block_forward<B: Backend>(be: &B, w: &B::Weights, bw: &BlockWeights, a: &mut BlockActs<B>, keep: bool, x: &B::Act, x_out: &mut B::Act, db: &DeviceBatch<B>, sz: Sizes) -> Result<()> {
    let Sizes { t, d, nh, c, i, .. } = sz;
    // attention: x1 = x + (sigmoid(g) * attn(rope(q), rope(k), v)) @ W_o^T
    // g, q, k, v stay where the projection wrote them: the rope and the gated attention read a.gqkv.
    be.gqkv_rope_fwd(&mut a.gqkv, &a.xn1, w, bw.gqkv, &db.positions, t, nh, d)?;
    be.attention_fwd(&mut a.ga, &mut a.lse, &a.gqkv, &db.cu_seqlens, &db.prefix_lens, t, nh)?;
    be.linear_fwd(&mut a.x1, &a.ga, w, bw.o, Some(x), t, d, c)?;
    // MLP: x_out = x1 + (silu(gate) * up) @ W_down^T
    be.rmsnorm_fwd(&mut a.xn2, &mut a.rstd2, &a.x1, t, d)?;
    be.gate_up_swiglu_fwd(&mut a.gu, keep, &mut a.act, &a.xn2, w, bw.gate_up, t, i, d)?;
    be.linear_fwd(x_out, &a.act, w, bw.down, Some(&a.x1), t, d, i)
}

/// Backward of `state[out] = Module(state[z] + state[inj])` from its `input` `x_0` [T, D] and
/// kept `acts`: consumes `dstate[out]`, adds `d(z + inj)` to `dstate[z]` and `dstate[inj]`,
/// accumulates the module's weight gradients (writes them without `accumulate`).
#[allow(clippy::too_many_arguments)]
fn pass_backward<B: Backend>(be: &B, w: &B::Weights, blocks: &[BlockWeights], dw: &mut B::Grads, accumulate: bool, pass: &Pass, input: &B::Act, acts: &PassActs<B>, g: &mut BlockGrads<B>, dstate: &mut [B::Act; 2], db: &DeviceBatch<B>, sz: Sizes) -> Result<()> {
    let (t, d, n) = (sz.t, sz.d, blocks.len());
    // out = rms(x_n): dres = d x_n
    be.zero_act(&mut g.dres)?;
    be.rmsnorm_bwd(&mut g.dres, &dstate[pass.out.index()], &acts.x[n - 1], &acts.rstd, t, d)?;
    // The value `out` held before this pass is another variable, with no gradient so far.
    be.zero_act(&mut dstate[pass.out.index()])?;
    for i in (0..n).rev() {
        let x = if i == 0 { input } else { &acts.x[i - 1] };
        block_backward(be, w, &blocks[i], dw, accumulate, &acts.blocks[i], x, g, db, sz)?;
    }
    // dres = d(z + inj), which fans out to both
    be.add_act(&mut dstate[pass.z.index()], &g.dres, t * d)?;
    if let Some(inj) = pass.inj {
        be.add_act(&mut dstate[inj.index()], &g.dres, t * d)?;
    }
    Ok(())
}

/// One block's backward: `g.dres` holds `d x_out` on entry and `d x` on exit (the residual
/// stream's gradient accumulates in place); weight gradients accumulate into `dw` (are
/// written there without `accumulate`).
#[allow(clippy::too_many_arguments)]
fn block_backward<B: Backend>(be: &B, w: &B::Weights, bw: &BlockWeights, dw: &mut B::Grads, accumulate: bool, a: &BlockActs<B>, x: &B::Act, g: &mut BlockGrads<B>, db: &DeviceBatch<B>, sz: Sizes) -> Result<()> {
    let Sizes { t, d, nh, c, i, .. } = sz;
    // MLP: x_out = x1 + act @ W_down^T, act = swiglu(rms(x1) @ W_gate_up^T)
    be.down_swiglu_bwd(&mut g.dgu, &mut g.dact, &g.dres, w, bw.down, &a.gu, t, d, i)?;
    be.linear_bwd_weight(dw, bw.down, &g.dres, &a.act, t, d, i, accumulate)?;
    be.linear_bwd_input(&mut g.dxn, &g.dgu, w, bw.gate_up, t, 2 * i, d)?;
    be.linear_bwd_weight(dw, bw.gate_up, &g.dgu, &a.xn2, t, 2 * i, d, accumulate)?;
    be.rmsnorm_bwd(&mut g.dres, &g.dxn, &a.x1, &a.rstd2, t, d)?;
    // attention: x1 = x + ga @ W_o^T, ga = sigmoid(g) * attn(...)
    be.linear_bwd_input(&mut g.dga, &g.dres, w, bw.o, t, d, c)?;
    be.linear_bwd_weight(dw, bw.o, &g.dres, &a.ga, t, d, c, accumulate)?;
    // dgqkv is assembled in place: the gated attention writes its four blocks, then the rope
    // rotates the q and k ones back.
    be.attention_bwd(&mut g.dgqkv, &g.dga, &a.gqkv, &a.ga, &a.lse, &db.cu_seqlens, &db.prefix_lens, &db.positions, t, nh)?;
    be.linear_bwd_input(&mut g.dxn, &g.dgqkv, w, bw.gqkv, t, 4 * c, d)?;
    be.linear_bwd_weight(dw, bw.gqkv, &g.dgqkv, &a.xn1, t, 4 * c, d, accumulate)?;
    be.rmsnorm_bwd(&mut g.dres, &g.dxn, x, &a.rstd1, t, d)
}
