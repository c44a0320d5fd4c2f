//! The narrow interface between the model and the hardware it runs on.
//!
//! The model (`src/model/net.rs`) is written once against the [`Backend`] trait: the dozen
//! ops of `docs/design/ops.md` (fused where the GPU wants them fused), plus buffer
//! allocation, zeroing, adding and uploads. There is no autograd and no tensor library:
//! the model allocates every activation buffer up front, calls each forward op by hand and
//! each backward op by hand, in reverse.
//!
//! Design points, chosen so that a CUDA backend can implement the same trait:
//!
//! - **Buffers are associated types.** [`Backend::Act`] holds activations: fp32 `Vec`s on
//!   the CPU, bf16 device memory on the GPU (the math inside each op is fp32 on both).
//!   [`Backend::F32`] holds what stays fp32 on every backend (rms `rstd`, attention `lse`,
//!   per-token losses), [`Backend::I32`] the batch's index buffers, [`Backend::U8`] the
//!   per-token "argmax was right" flags, [`Backend::Metrics`] a step's metric sums. Every
//!   buffer is allocated once per batch shape through the backend, so a GPU backend does no
//!   allocation inside the step.
//! - **Weights and gradients are flat buffers.** [`Backend::Weights`] is the compute copy of
//!   the whole master buffer laid out by `spec.rs` (the CPU reads the fp32 master itself; the
//!   GPU its bf16 copy) and [`Backend::Grads`] the master-shaped fp32 gradient buffer. An op
//!   receives the whole buffer and a [`TensorAt`] naming one tensor inside it, so nothing is
//!   split into per-tensor allocations, and weight gradients accumulate (`+=`) in fp32, as
//!   cuBLASLt does with `beta = 1`.
//! - **Argument order is the op launcher's** (outputs first, then inputs, then sizes), with
//!   a weight `w` passed as `(weights, at)`. Parameter gradients accumulate with `+=`,
//!   activation gradients are written with `=`, except where an op says `+=` (the residual
//!   stream, `rmsnorm_bwd`).
//! - **No host synchronisation inside the step.** Ops only enqueue work, and read every
//!   per-batch value from backend buffers written before the step (`write_i32`,
//!   `write_f32`), never from host arguments: a GPU backend can then record a step once and
//!   replay it (a CUDA graph). The step's metrics are reduced on the backend
//!   ([`Backend::step_metrics`]); the only methods that read results back to the host are
//!   [`Backend::read_metrics`] (when the trainer logs) and [`Backend::download_f32`] (tests,
//!   tools).
//! - **The LM head is one fused op.** [`Backend::lm_head_loss`] computes logits,
//!   cross-entropy, metrics flags and (optionally) both backward products, so a GPU backend
//!   can run it chunk by chunk over tokens without ever holding `[T, V]` logits.
//!
//! Errors are `anyhow::Result`: the CPU backend never fails once the model has checked the
//! batch; a GPU backend reports driver errors with the op that hit them.

use anyhow::{anyhow, Result};

use crate::config::HEAD_DIM;
use crate::model::spec::TensorSpec;
use crate::ops::cross_entropy::StepMetrics;

/// Where one tensor lies in a flat weight (or master-shaped gradient) buffer, in elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorAt {
    pub offset: usize,
    pub len: usize,
}

impl TensorAt {
    /// The position of a trainable tensor of the spec table.
    pub fn of(spec: &TensorSpec) -> Result<TensorAt> {
        let offset = spec.offset.ok_or_else(|| anyhow!("{} is not a trainable tensor (no master offset)", spec.name))?;
        Ok(TensorAt { offset, len: spec.numel() })
    }

    pub fn range(self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// The ops the model needs, with shape comments in the notation of `docs/design/ops.md`:
/// `T` tokens, `D` hidden, `NH` heads, `HD` = 128, `C = NH*HD`, `I` intermediate, `V` vocab.
#[allow(clippy::too_many_arguments)]
pub trait Backend {
    /// Activations (CPU: fp32, GPU: bf16).
    type Act;
    /// Buffers that are fp32 on every backend: `rstd`, `lse`, per-token losses.
    type F32;
    /// Index buffers: tokens, labels, positions, `cu_seqlens`, `prefix_lens`.
    type I32;
    /// Per-token flags (`correct`).
    type U8;
    /// One step's [`StepMetrics`] sums (GPU: `[METRICS_LEN]` fp64 in device memory).
    type Metrics;
    /// The compute copy of the flat master buffer (CPU: the fp32 master itself).
    type Weights: ?Sized;
    /// The master-shaped fp32 gradient buffer.
    type Grads: ?Sized;

    // ---- buffers ----

    /// A zeroed activation buffer of `n` elements.
    fn alloc_act(&self, n: usize) -> Result<Self::Act>;
    fn alloc_f32(&self, n: usize) -> Result<Self::F32>;
    fn alloc_u8(&self, n: usize) -> Result<Self::U8>;
    fn alloc_i32(&self, n: usize) -> Result<Self::I32>;
    fn alloc_metrics(&self) -> Result<Self::Metrics>;
    /// `sums = 0`, before the first [`Backend::step_metrics`] of a step.
    fn zero_metrics(&self, sums: &mut Self::Metrics) -> Result<()>;
    /// `dst[..host.len()] = host` (stream-ordered on a GPU: it applies to the work queued after).
    fn write_i32(&self, dst: &mut Self::I32, host: &[i32]) -> Result<()>;
    fn write_f32(&self, dst: &mut Self::F32, host: &[f32]) -> Result<()>;
    /// An activation buffer holding `host` (converted to the activation precision).
    fn upload_act(&self, host: &[f32]) -> Result<Self::Act>;
    /// `x = 0`
    fn zero_act(&self, x: &mut Self::Act) -> Result<()>;
    /// `dst += src`, both `[n]` (gradient fan-in where one state feeds two places).
    fn add_act(&self, dst: &mut Self::Act, src: &Self::Act, n: usize) -> Result<()>;
    /// out: [T, D] = `row` `[D]` repeated on every row (`z_L_init` to every token).
    fn broadcast_rows(&self, out: &mut Self::Act, row: &Self::Act, t: usize, d: usize) -> Result<()>;
    /// The gradient region of one tensor = 0 (a region that no product of the step writes).
    fn zero_grads_at(&self, g: &mut Self::Grads, at: TensorAt) -> Result<()>;
    /// Elements in a flat weight buffer (checked against the layout before a step).
    fn weights_len(&self, w: &Self::Weights) -> usize;
    fn grads_len(&self, g: &Self::Grads) -> usize;
    /// Reads an fp32 buffer back to the host (synchronises; not for the step's hot path).
    fn download_f32(&self, x: &Self::F32) -> Result<Vec<f32>>;

    // ---- gemm ----

    /// y: [T, N] = x [T, K] @ w^T (+ residual [T, N]), w: [N, K] at `w_at`.
    fn linear_fwd(&self, y: &mut Self::Act, x: &Self::Act, w: &Self::Weights, w_at: TensorAt, residual: Option<&Self::Act>, t: usize, n: usize, k: usize) -> Result<()>;
    /// dx: [T, K] = dy [T, N] @ w [N, K].
    fn linear_bwd_input(&self, dx: &mut Self::Act, dy: &Self::Act, w: &Self::Weights, w_at: TensorAt, t: usize, n: usize, k: usize) -> Result<()>;
    /// dw: [N, K] at `dw_at` += dy^T [N, T] @ x [T, K] with `accumulate`; without, `=` (the
    /// tensor's first contribution in a step: what the region held is not read).
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd_weight(&self, dw: &mut Self::Grads, dw_at: TensorAt, dy: &Self::Act, x: &Self::Act, t: usize, n: usize, k: usize, accumulate: bool) -> Result<()>;

    // ---- rmsnorm ----

    /// x: [T, D] = z + inj (a copy without `inj`); y: [T, D] = x * rstd; rstd: `[T]`.
    fn add_rmsnorm_fwd(&self, x: &mut Self::Act, y: &mut Self::Act, rstd: &mut Self::F32, z: &Self::Act, inj: Option<&Self::Act>, t: usize, d: usize) -> Result<()>;
    /// y: [T, D] = x * rstd, rstd: `[T]` = 1/sqrt(mean(x^2) + eps).
    fn rmsnorm_fwd(&self, y: &mut Self::Act, rstd: &mut Self::F32, x: &Self::Act, t: usize, d: usize) -> Result<()>;
    /// dx: [T, D] += rstd * (dy - y * mean(dy * y)), y = x * rstd.
    fn rmsnorm_bwd(&self, dx: &mut Self::Act, dy: &Self::Act, x: &Self::Act, rstd: &Self::F32, t: usize, d: usize) -> Result<()>;

    // ---- rope ----
    // The fused projection gqkv [T, 4C] (blocks gate | q | k | v, C = NH * 128) is what the
    // rope and the gated attention read, in place; its gradient dgqkv is written by the gated
    // attention's backward, which includes the rope's.

    /// Rotates the q and k blocks of gqkv [T, 4C] in place by `pos` `[T]`.
    fn qkv_rope_fwd(&self, gqkv: &mut Self::Act, pos: &Self::I32, t: usize, nh: usize) -> Result<()>;
    /// gqkv: [T, 4C] = x [T, D] @ w^T (w: [4C, D] at `w_at`, C = NH * 128), then its q and k
    /// blocks rotated by `pos` `[T]`: the projection and its RoPE, which a backend may run as
    /// one op (the CUDA one does on Hopper, in the product's epilogue).
    #[allow(clippy::too_many_arguments)]
    fn gqkv_rope_fwd(&self, gqkv: &mut Self::Act, x: &Self::Act, w: &Self::Weights, w_at: TensorAt, pos: &Self::I32, t: usize, nh: usize, d: usize) -> Result<()> {
        self.linear_fwd(gqkv, x, w, w_at, None, t, 4 * nh * HEAD_DIM, d)?;
        self.qkv_rope_fwd(gqkv, pos, t, nh)
    }

    // ---- gated attention ----

    /// The sample table (`cu_seqlens`, `prefix_lens`) was just rewritten: tables a backend
    /// derives from it and keeps between attention calls (the CUDA row spans and tile orders)
    /// must be rebuilt.
    fn sample_table_changed(&self) {}

    /// y: [T, C] = sigmoid(g) * attention(q, k, v), lse: [NH, T], from the blocks of gqkv
    /// [T, 4C]; PrefixLM mask over the samples of `cu_seqlens` [S+1], `prefix_lens` `[S]`. The
    /// attention's own output is not kept (ops::gate).
    fn attention_fwd(&self, y: &mut Self::Act, lse: &mut Self::F32, gqkv: &Self::Act, cu_seqlens: &Self::I32, prefix_lens: &Self::I32, t: usize, nh: usize) -> Result<()>;
    /// All four blocks of dgqkv [T, 4C] (dg, dq, dk, dv) written with `=`, from dy [T, C] and
    /// the forward's y; dq and dk with RoPE's backward by `pos` applied (the inverse rotation),
    /// so that they are the gradients of the projection's q, k before `qkv_rope_fwd`.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(&self, dgqkv: &mut Self::Act, dy: &Self::Act, gqkv: &Self::Act, y: &Self::Act, lse: &Self::F32, cu_seqlens: &Self::I32, prefix_lens: &Self::I32, pos: &Self::I32, t: usize, nh: usize) -> Result<()>;

    // ---- swiglu ----
    /// out: [T, I] = silu(gate_up[:, :I]) * gate_up[:, I:].
    fn swiglu_fwd(&self, out: &mut Self::Act, gate_up: &Self::Act, t: usize, i: usize) -> Result<()>;
    /// gate_up: [T, 2I] = x [T, D] @ w^T (w: [2I, D] at `w_at`) and out: [T, I] =
    /// silu(gate_up[:, :I]) * gate_up[:, I:]: the MLP's first product and its activation, which
    /// a backend may run as one op (the CUDA one does on Hopper, in the product's epilogue).
    /// Without `keep_gate_up` (a pass whose activations no backward reads) the backend may
    /// leave gate_up unwritten.
    #[allow(clippy::too_many_arguments)]
    fn gate_up_swiglu_fwd(&self, gate_up: &mut Self::Act, keep_gate_up: bool, out: &mut Self::Act, x: &Self::Act, w: &Self::Weights, w_at: TensorAt, t: usize, i: usize, d: usize) -> Result<()> {
        let _ = keep_gate_up; // the product is needed for out either way
        self.linear_fwd(gate_up, x, w, w_at, None, t, 2 * i, d)?;
        self.swiglu_fwd(out, gate_up, t, i)
    }
    /// dgate_up: [T, 2I] from dout [T, I].
    fn swiglu_bwd(&self, dgate_up: &mut Self::Act, dout: &Self::Act, gate_up: &Self::Act, t: usize, i: usize) -> Result<()>;
    /// dgate_up: [T, 2I] = swiglu_bwd(dout, gate_up) of dout: [T, I] = dy [T, D] @ w (w: [D, I]
    /// at `w_at`, the down projection): its input gradient and SwiGLU's backward, which a
    /// backend may run as one op (the CUDA one does on Hopper, in the product's epilogue, and
    /// then leaves dout unwritten).
    #[allow(clippy::too_many_arguments)]
    fn down_swiglu_bwd(&self, dgate_up: &mut Self::Act, dout: &mut Self::Act, dy: &Self::Act, w: &Self::Weights, w_at: TensorAt, gate_up: &Self::Act, t: usize, d: usize, i: usize) -> Result<()> {
        self.linear_bwd_input(dout, dy, w, w_at, t, d, i)?;
        self.swiglu_bwd(dgate_up, dout, gate_up, t, i)
    }

    // ---- embedding ----

    /// out: [T, D] = `w[tokens]` * scale, w: [V, D] at `w_at`.
    fn embedding_fwd(&self, out: &mut Self::Act, tokens: &Self::I32, w: &Self::Weights, w_at: TensorAt, t: usize, d: usize, scale: f32) -> Result<()>;
    /// Prepares the embedding backward of the batch whose `tokens` `[T]` (ids in `0..v`) were
    /// just uploaded; called once per batch that trains the embedding, before its
    /// `embedding_bwd`. The GPU sorts the token positions by id here, on the host, and queues
    /// their copy to the device, so its backward is one reduce; the CPU needs nothing.
    fn prepare_token_order(&self, tokens: &[i32], v: usize) -> Result<()>;
    /// dw: [V, D] at `dw_at` += scatter of dout [T, D] * scale (deterministic order).
    fn embedding_bwd(&self, dw: &mut Self::Grads, dw_at: TensorAt, dout: &Self::Act, tokens: &Self::I32, t: usize, d: usize, scale: f32) -> Result<()>;

    // ---- LM head and loss ----

    /// The LM head fused with fp32 cross-entropy: `logits [T, V] = y [T, D] @ w^T`,
    /// losses: `[T]` and correct: `[T]` as `cross_entropy_cpu` (0 on ignored rows). With
    /// `grads = Some((dy, dw, accumulate))`: `dlogits = (softmax - onehot) * grad_scale`
    /// (grad_scale: `[1]`), dy: [T, D] = dlogits @ w (written), dw: [V, D] at `w_at` +=
    /// dlogits^T @ y (`=` without `accumulate`, as [`Backend::linear_bwd_weight`]).
    #[allow(clippy::type_complexity)]
    fn lm_head_loss(&self, losses: &mut Self::F32, correct: &mut Self::U8, grads: Option<(&mut Self::Act, &mut Self::Grads, bool)>, y: &Self::Act, w: &Self::Weights, w_at: TensorAt, labels: &Self::I32, t: usize, v: usize, d: usize, grad_scale: &Self::F32) -> Result<()>;
    /// sums += the [`StepMetrics`] of a batch's per-token results (accumulated, so that a
    /// step's micro-batches add up; zero them first with [`Backend::zero_metrics`]):
    /// losses, correct, labels `[T]`, cu_seqlens [S+1] (empty samples count for nothing).
    fn step_metrics(&self, sums: &mut Self::Metrics, losses: &Self::F32, correct: &Self::U8, labels: &Self::I32, cu_seqlens: &Self::I32, t: usize) -> Result<()>;
    /// Reads metric sums back to the host (synchronises: at logging steps, not in the step).
    fn read_metrics(&self, sums: &Self::Metrics) -> Result<StepMetrics>;
}
