//! The CUDA backend: every [`Backend`] op is the GPU launcher of its family.
//!
//! Activations are bf16 device buffers ([`CudaSlice<bf16>`]), `rstd`/`lse`/losses fp32, index
//! buffers i32, the `correct` flags u8. The weights are the bf16 compute copy of the whole
//! master buffer and the gradients the master-shaped fp32 buffer; an op takes its tensor as a
//! view at [`TensorAt`] (every tensor starts at a multiple of 64 elements, so views stay
//! 16-byte aligned). Weight gradients accumulate in fp32 inside cuBLASLt (`beta = 1`).
//!
//! What the backend keeps between steps, so that a step of an already-seen batch shape
//! allocates nothing:
//!
//! - the cuBLASLt handle, its workspace and one plan per GEMM shape ([`GemmCache`]), built
//!   the first time a shape runs and looked up afterwards;
//! - the logits of one LM-head chunk (`[rows, V]` bf16, [`lm_head_rows`]);
//! - the embedding backward's scratch: the batch's token order, sorted on the host by
//!   [`Backend::prepare_token_order`] and copied through a pinned buffer, its tickets and
//!   partial rows.
//! - the attention launchers' tables and workspaces ([`AttentionScratch`]).
//!
//! The model's own buffers, the batch's included, come from `alloc_*` once per batch shape
//! (`net.rs`, `plan`). [`CudaBackend::allocations`] counts every allocation the backend makes,
//! so that a caller can tell when a step ran without allocating: such a step can be captured
//! in a CUDA graph and replayed (`src/train/graph.rs`).
//!
//! Nothing here synchronises with the host except [`Backend::read_metrics`] and
//! [`Backend::download_f32`], which the trainer calls outside the step.
//!
//! With profiling on ([`CudaBackend::set_profiling`]) every op is bracketed by a pair of CUDA
//! events tagged with its [`OpClass`] and name; [`CudaBackend::take_profile`] sums them per
//! class and per op.

use std::cell::{Cell, RefCell};

use anyhow::{Context, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice};
use half::bf16;

use crate::config::HEAD_DIM;
use crate::gpu::{DriverContext, Gpu};
use crate::model::backend::{Backend, TensorAt};
use crate::ops::attention::{attention_bwd, AttentionScratch, FwdKernel};
use crate::ops::cross_entropy::{cross_entropy_in_place, lm_head_cross_entropy, metrics, CeKernel, StepMetrics, METRICS_LEN};
use crate::ops::elementwise::{add_act, broadcast_rows};
use crate::ops::embedding::{embedding_bwd, embedding_fwd, EmbeddingBwdScratch, TokenOrder};
use crate::ops::gemm::{linear_bwd_input, linear_bwd_weight, linear_fwd, GemmCache};
use crate::ops::gemm_sm90::{
    linear_rope_fwd_sm90, linear_swiglu_bwd_sm90, linear_swiglu_fwd_sm90, supports_rope as sm90_rope_supports, supports_swiglu as sm90_swiglu_supports,
    supports_swiglu_bwd as sm90_swiglu_bwd_supports,
};
use crate::ops::rmsnorm::{add_rmsnorm_fwd, rmsnorm_bwd, rmsnorm_fwd};
use crate::ops::rope::qkv_rope_fwd;
use crate::ops::swiglu::{swiglu_bwd, swiglu_fwd};

/// The LM head's logits scratch holds at most this many bytes by default: 256 MiB is 2048
/// rows of a 64K vocabulary, a GEMM large enough to run at full rate.
pub const LM_HEAD_CHUNK_BYTES: usize = 256 << 20;

/// Rows of one LM-head chunk for `t` tokens and a vocabulary of `v`: as many as fit
/// `chunk_bytes` of bf16 logits, at least one, at most `t`.
pub fn lm_head_rows(t: usize, v: usize, chunk_bytes: usize) -> usize {
    (chunk_bytes / (2 * v)).clamp(1, t.max(1))
}

/// Device bytes of the embedding backward's scratch for `t` tokens and `v` rows
/// ([`EmbeddingBwdScratch::device_bytes`]: the token order `[T + V + 1]` and one ticket per
/// 16 tokens, i32).
pub fn embedding_scratch_bytes(t: usize, v: usize) -> usize {
    EmbeddingBwdScratch::device_bytes(t, v)
}

/// What a profiled op is, for the per-phase split of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpClass {
    /// The linear layers of the blocks (forward, input and weight gradients).
    Gemm,
    /// Attention forward and backward.
    Attention,
    /// The fused LM head: its GEMMs and the cross-entropy.
    LmHead,
    /// Norms, RoPE, gate, SwiGLU, embedding, adds, copies and fills.
    Other,
    /// The AdamATan2 update (timed by the engine).
    Optimizer,
}

impl OpClass {
    pub const ALL: [OpClass; 5] = [OpClass::Gemm, OpClass::Attention, OpClass::LmHead, OpClass::Other, OpClass::Optimizer];
}

/// What [`CudaBackend::take_profile`] measured: the device time of every op, slowest first.
pub struct Profile {
    pub ops: Vec<OpTime>,
}

impl Profile {
    /// Milliseconds per class, in [`OpClass::ALL`] order.
    pub fn classes(&self) -> Vec<(OpClass, f64)> {
        OpClass::ALL.iter().map(|&c| (c, self.ops.iter().filter(|o| o.class == c).map(|o| o.ms).sum())).collect()
    }
}

/// The device time of one op summed over its calls.
pub struct OpTime {
    pub class: OpClass,
    pub op: &'static str,
    pub calls: usize,
    pub ms: f64,
}

/// The CUDA implementation of [`Backend`] on one [`Gpu`].
pub struct CudaBackend<'g> {
    gpu: &'g Gpu,
    /// cuBLASLt handle, workspace and one plan per GEMM shape.
    gemm: GemmCache,
    /// [rows, V] bf16: one chunk of LM-head logits; grown when a batch needs more.
    lm_logits: RefCell<Option<CudaSlice<bf16>>>,
    /// Upper bound on the bytes of `lm_logits` ([`LM_HEAD_CHUNK_BYTES`] unless set).
    lm_chunk_bytes: usize,
    /// The embedding backward's scratch, holding the order of the last prepared batch.
    embed_scratch: RefCell<Option<EmbeddingBwdScratch>>,
    /// The attention launchers' scratch; replaced when a batch has more rows.
    attn_scratch: RefCell<Option<AttentionScratch>>,
    /// Which forward products run as our Hopper GEMM with the pass that follows them in its
    /// epilogue (`ops::gemm_sm90`).
    epilogue_gemms: Cell<EpilogueGemms>,
    /// Device allocations made so far (see [`CudaBackend::allocations`]).
    allocations: Cell<u64>,
    profiling: Cell<bool>,
    /// (class, op, start, end) of every op since the last [`CudaBackend::take_profile`].
    spans: RefCell<Vec<(OpClass, &'static str, CudaEvent, CudaEvent)>>,
}

/// Which products of a block run as our Hopper GEMM with the pass that follows them in its
/// epilogue (`ops::gemm_sm90`, docs/design/gemm-epilogues.md) instead of cuBLASLt's product
/// and the separate pass; each level adds to the one before. In the XL step on an H200 the
/// SwiGLU epilogue saves ~30 us of each gate_up call's ~500, the RoPE epilogue ~10 us of each
/// qkv call's ~360, and under sustained load SwiGLU's backward after down's input gradient
/// ~35 us of ~345.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum EpilogueGemms {
    /// cuBLASLt and the separate passes everywhere.
    Off,
    /// gate_up with SwiGLU in the epilogue; qkv on cuBLASLt, then the RoPE pass.
    Swiglu,
    /// gate_up with SwiGLU, and qkv with RoPE: both forward products.
    Forward,
    /// Also the down projection's input gradient with SwiGLU's backward.
    #[default]
    All,
}

impl<'g> CudaBackend<'g> {
    pub fn new(gpu: &'g Gpu) -> Result<CudaBackend<'g>> {
        keep_pool_memory(gpu)?;
        Ok(CudaBackend {
            gpu,
            gemm: GemmCache::new(gpu).context("creating the GEMM cache")?,
            lm_logits: RefCell::new(None),
            lm_chunk_bytes: LM_HEAD_CHUNK_BYTES,
            embed_scratch: RefCell::new(None),
            attn_scratch: RefCell::new(None),
            epilogue_gemms: Cell::new(EpilogueGemms::default()),
            allocations: Cell::new(0),
            profiling: Cell::new(false),
            spans: RefCell::new(Vec::new()),
        })
    }

    /// The cuBLASLt products' plans and algorithms.
    pub fn gemm_cache(&self) -> &GemmCache {
        &self.gemm
    }

    /// The same backend with LM-head chunks of at most `bytes` of logits (checks use small
    /// chunks to run several per batch).
    pub fn with_lm_head_chunk_bytes(self, bytes: usize) -> CudaBackend<'g> {
        CudaBackend { lm_chunk_bytes: bytes, ..self }
    }

    /// Chooses which forward products run as our Hopper GEMM with the following pass in its
    /// epilogue ([`EpilogueGemms`]; on other GPUs, and for shapes it does not take, cuBLASLt
    /// and the pass run instead). Set it before the first step: a captured step keeps the
    /// route it was captured with. The routes differ by the products' accumulation order.
    pub fn set_epilogue_gemms(&self, which: EpilogueGemms) {
        self.epilogue_gemms.set(which);
    }

    /// Turns the per-op event timing on or off (off by default: it costs two event records
    /// per op).
    pub fn set_profiling(&self, on: bool) {
        self.profiling.set(on);
    }

    pub fn profiling(&self) -> bool {
        self.profiling.get()
    }

    /// How many device buffers the backend has allocated so far (the model's through
    /// `alloc_*`, and its own scratch). Unchanged over a step means the step allocated nothing:
    /// run again with the same shapes it allocates nothing either, so it can be captured.
    pub fn allocations(&self) -> u64 {
        self.allocations.get()
    }

    /// Counts one allocation and passes its result on.
    fn counted<T>(&self, allocation: Result<T>) -> Result<T> {
        self.allocations.set(self.allocations.get() + 1);
        allocation
    }

    /// Runs `f`, bracketed by timing events tagged `class` and `op` when profiling is on.
    pub fn timed<T>(&self, class: OpClass, op: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if !self.profiling.get() {
            return f();
        }
        let event = || -> Result<CudaEvent> {
            let e = self.gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).during("creating a profiling event")?;
            e.record(&self.gpu.stream).during("recording a profiling event")?;
            Ok(e)
        };
        let start = event()?;
        let out = f()?;
        let end = event()?;
        self.spans.borrow_mut().push((class, op, start, end));
        Ok(out)
    }

    /// Device time since the last call, per class and per op (synchronises).
    pub fn take_profile(&self) -> Result<Profile> {
        let spans = std::mem::take(&mut *self.spans.borrow_mut());
        let mut profile = Profile { ops: Vec::new() };
        for (class, op, start, end) in &spans {
            let ms = start.elapsed_ms(end).during("reading a profiling event")? as f64;
            match profile.ops.iter_mut().find(|o| o.op == *op) {
                Some(o) => {
                    o.calls += 1;
                    o.ms += ms;
                }
                None => profile.ops.push(OpTime { class: *class, op, calls: 1, ms }),
            }
        }
        profile.ops.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(profile)
    }

    /// The logits scratch for a batch of `t` tokens: at least `[lm_head_rows(t, v), V]` bf16.
    fn lm_scratch(&self, t: usize, v: usize) -> Result<std::cell::RefMut<'_, CudaSlice<bf16>>> {
        let len = lm_head_rows(t, v, self.lm_chunk_bytes) * v;
        let mut slot = self.lm_logits.borrow_mut();
        if slot.as_ref().is_none_or(|s| s.len() < len) {
            *slot = None; // release the smaller buffer first
            // SAFETY: the logits are written by the GEMM before anything reads them.
            let buf = self.counted(unsafe { self.gpu.stream.alloc::<bf16>(len) }.context("allocating the LM-head logits"))?;
            *slot = Some(buf);
        }
        Ok(std::cell::RefMut::map(slot, |s| s.as_mut().expect("allocated above")))
    }

    /// The attention scratch for `t` rows of `nh` heads, replaced when it does not fit.
    fn attention_scratch(&self, t: usize, nh: usize) -> Result<std::cell::RefMut<'_, AttentionScratch>> {
        let mut slot = self.attn_scratch.borrow_mut();
        if slot.as_ref().is_none_or(|s| !s.fits(t, nh)) {
            *slot = None; // release the smaller one first
            let mut scratch = self.counted(AttentionScratch::new(self.gpu, t, nh).context("allocating the attention scratch"))?;
            // Built once per batch: the model announces every new sample table.
            scratch.hold_tables();
            *slot = Some(scratch);
        }
        Ok(std::cell::RefMut::map(slot, |s| s.as_mut().expect("allocated above")))
    }
}

/// Keeps freed memory in the device's default pool instead of returning it to the driver at
/// every synchronisation (the default release threshold is 0), so the few stream-ordered
/// allocations made between steps (the gradient norm's partial sums at logging steps, buffers
/// replaced when a batch shape changes) are served from the pool.
fn keep_pool_memory(gpu: &Gpu) -> Result<()> {
    use cudarc::driver::sys;
    gpu.ctx.bind_to_thread().during("binding the context")?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: `pool` receives the device's default pool handle; the attribute is a u64 read
    // from `threshold`, as CU_MEMPOOL_ATTR_RELEASE_THRESHOLD expects.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, gpu.ctx.cu_device()).result().during("getting the default memory pool")?;
        sys::cuMemPoolSetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, (&mut threshold as *mut u64).cast())
            .result()
            .during("setting the memory pool's release threshold")?;
    }
    Ok(())
}

impl<'g> Backend for CudaBackend<'g> {
    type Act = CudaSlice<bf16>;
    type F32 = CudaSlice<f32>;
    type I32 = CudaSlice<i32>;
    type U8 = CudaSlice<u8>;
    type Metrics = CudaSlice<f64>;
    type Weights = CudaSlice<bf16>;
    type Grads = CudaSlice<f32>;

    fn alloc_act(&self, n: usize) -> Result<CudaSlice<bf16>> {
        self.counted(self.gpu.stream.alloc_zeros(n).with_context(|| format!("allocating an activation of {n} bf16")))
    }

    fn alloc_f32(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.counted(self.gpu.stream.alloc_zeros(n).with_context(|| format!("allocating {n} fp32")))
    }

    fn alloc_u8(&self, n: usize) -> Result<CudaSlice<u8>> {
        self.counted(self.gpu.stream.alloc_zeros(n).with_context(|| format!("allocating {n} u8")))
    }

    fn alloc_i32(&self, n: usize) -> Result<CudaSlice<i32>> {
        self.counted(self.gpu.stream.alloc_zeros(n).with_context(|| format!("allocating {n} i32")))
    }

    fn alloc_metrics(&self) -> Result<CudaSlice<f64>> {
        self.counted(self.gpu.stream.alloc_zeros(METRICS_LEN).context("allocating the metric sums"))
    }

    fn zero_metrics(&self, sums: &mut CudaSlice<f64>) -> Result<()> {
        self.timed(OpClass::Other, "zero_metrics", || self.gpu.stream.memset_zeros(sums).context("zeroing the metric sums"))
    }

    fn write_i32(&self, dst: &mut CudaSlice<i32>, host: &[i32]) -> Result<()> {
        self.gpu.stream.memcpy_htod(host, &mut dst.slice_mut(..host.len())).with_context(|| format!("uploading {} i32", host.len()))
    }

    fn write_f32(&self, dst: &mut CudaSlice<f32>, host: &[f32]) -> Result<()> {
        self.gpu.stream.memcpy_htod(host, &mut dst.slice_mut(..host.len())).with_context(|| format!("uploading {} fp32", host.len()))
    }

    fn upload_act(&self, host: &[f32]) -> Result<CudaSlice<bf16>> {
        let rounded: Vec<bf16> = host.iter().map(|&x| bf16::from_f32(x)).collect();
        self.counted(self.gpu.stream.clone_htod(&rounded).with_context(|| format!("uploading {} bf16", host.len())))
    }

    fn zero_act(&self, x: &mut CudaSlice<bf16>) -> Result<()> {
        self.timed(OpClass::Other, "zero_act", || self.gpu.stream.memset_zeros(x).context("zero_act"))
    }

    fn zero_grads_at(&self, g: &mut CudaSlice<f32>, at: TensorAt) -> Result<()> {
        self.timed(OpClass::Other, "zero_grads_at", || self.gpu.stream.memset_zeros(&mut g.slice_mut(at.range())).context("zero_grads_at"))
    }

    fn add_act(&self, dst: &mut CudaSlice<bf16>, src: &CudaSlice<bf16>, n: usize) -> Result<()> {
        self.timed(OpClass::Other, "add_act", || add_act(self.gpu, &mut dst.slice_mut(..n), &src.slice(..n), n).with_context(|| format!("add_act [{n}]")))
    }

    fn broadcast_rows(&self, out: &mut CudaSlice<bf16>, row: &CudaSlice<bf16>, t: usize, d: usize) -> Result<()> {
        self.timed(OpClass::Other, "broadcast_rows", || broadcast_rows(self.gpu, &mut out.as_view_mut(), &row.as_view(), t, d).with_context(|| format!("broadcast_rows [{t}, {d}]")))
    }

    fn weights_len(&self, w: &CudaSlice<bf16>) -> usize {
        w.len()
    }

    fn grads_len(&self, g: &CudaSlice<f32>) -> usize {
        g.len()
    }

    fn download_f32(&self, x: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.gpu.stream.clone_dtoh(x).context("downloading an fp32 buffer")
    }

    fn linear_fwd(&self, y: &mut CudaSlice<bf16>, x: &CudaSlice<bf16>, w: &CudaSlice<bf16>, w_at: TensorAt, residual: Option<&CudaSlice<bf16>>, t: usize, n: usize, k: usize) -> Result<()> {
        self.timed(OpClass::Gemm, "linear_fwd", || {
            let residual = residual.map(|r| r.as_view());
            linear_fwd(self.gpu, &self.gemm, &mut y.as_view_mut(), &x.as_view(), &w.slice(w_at.range()), residual.as_ref(), t, n, k)
                .with_context(|| format!("linear_fwd [T={t}, N={n}, K={k}]"))
        })
    }

    fn gate_up_swiglu_fwd(&self, gate_up: &mut CudaSlice<bf16>, keep_gate_up: bool, out: &mut CudaSlice<bf16>, x: &CudaSlice<bf16>, w: &CudaSlice<bf16>, w_at: TensorAt, t: usize, i: usize, d: usize) -> Result<()> {
        if !(self.epilogue_gemms.get() >= EpilogueGemms::Swiglu && sm90_swiglu_supports(self.gpu, i, d)) {
            self.linear_fwd(gate_up, x, w, w_at, None, t, 2 * i, d)?;
            return self.swiglu_fwd(out, gate_up, t, i);
        }
        self.timed(OpClass::Gemm, "gate_up_swiglu_fwd", || {
            let mut gate_up = gate_up.as_view_mut();
            linear_swiglu_fwd_sm90(self.gpu, keep_gate_up.then_some(&mut gate_up), &mut out.as_view_mut(), &x.as_view(), &w.slice(w_at.range()), t, i, d)
                .with_context(|| format!("gate_up_swiglu_fwd [T={t}, I={i}, D={d}]"))
        })
    }

    fn down_swiglu_bwd(&self, dgate_up: &mut CudaSlice<bf16>, dout: &mut CudaSlice<bf16>, dy: &CudaSlice<bf16>, w: &CudaSlice<bf16>, w_at: TensorAt, gate_up: &CudaSlice<bf16>, t: usize, d: usize, i: usize) -> Result<()> {
        if !(self.epilogue_gemms.get() >= EpilogueGemms::All && sm90_swiglu_bwd_supports(self.gpu, i, d)) {
            self.linear_bwd_input(dout, dy, w, w_at, t, d, i)?;
            return self.swiglu_bwd(dgate_up, dout, gate_up, t, i);
        }
        self.timed(OpClass::Gemm, "down_swiglu_bwd", || {
            linear_swiglu_bwd_sm90(self.gpu, &mut dgate_up.as_view_mut(), None, &dy.as_view(), &w.slice(w_at.range()), &gate_up.as_view(), t, d, i)
                .with_context(|| format!("down_swiglu_bwd [T={t}, D={d}, I={i}]"))
        })
    }

    fn linear_bwd_input(&self, dx: &mut CudaSlice<bf16>, dy: &CudaSlice<bf16>, w: &CudaSlice<bf16>, w_at: TensorAt, t: usize, n: usize, k: usize) -> Result<()> {
        self.timed(OpClass::Gemm, "linear_bwd_input", || {
            linear_bwd_input(self.gpu, &self.gemm, &mut dx.as_view_mut(), &dy.as_view(), &w.slice(w_at.range()), t, n, k)
                .with_context(|| format!("linear_bwd_input [T={t}, N={n}, K={k}]"))
        })
    }

    fn linear_bwd_weight(&self, dw: &mut CudaSlice<f32>, dw_at: TensorAt, dy: &CudaSlice<bf16>, x: &CudaSlice<bf16>, t: usize, n: usize, k: usize, accumulate: bool) -> Result<()> {
        self.timed(OpClass::Gemm, "linear_bwd_weight", || {
            linear_bwd_weight(self.gpu, &self.gemm, &mut dw.slice_mut(dw_at.range()), &dy.as_view(), &x.as_view(), t, n, k, accumulate)
                .with_context(|| format!("linear_bwd_weight [T={t}, N={n}, K={k}]"))
        })
    }

    fn add_rmsnorm_fwd(&self, x: &mut CudaSlice<bf16>, y: &mut CudaSlice<bf16>, rstd: &mut CudaSlice<f32>, z: &CudaSlice<bf16>, inj: Option<&CudaSlice<bf16>>, t: usize, d: usize) -> Result<()> {
        self.timed(OpClass::Other, "add_rmsnorm_fwd", || {
            let inj = inj.map(|i| i.as_view());
            add_rmsnorm_fwd(self.gpu, &mut x.as_view_mut(), &mut y.as_view_mut(), &mut rstd.as_view_mut(), &z.as_view(), inj.as_ref(), t, d)
                .with_context(|| format!("add_rmsnorm_fwd [T={t}, D={d}]"))
        })
    }

    fn rmsnorm_fwd(&self, y: &mut CudaSlice<bf16>, rstd: &mut CudaSlice<f32>, x: &CudaSlice<bf16>, t: usize, d: usize) -> Result<()> {
        self.timed(OpClass::Other, "rmsnorm_fwd", || {
            rmsnorm_fwd(self.gpu, &mut y.as_view_mut(), &mut rstd.as_view_mut(), &x.as_view(), t, d).with_context(|| format!("rmsnorm_fwd [T={t}, D={d}]"))
        })
    }

    fn rmsnorm_bwd(&self, dx: &mut CudaSlice<bf16>, dy: &CudaSlice<bf16>, x: &CudaSlice<bf16>, rstd: &CudaSlice<f32>, t: usize, d: usize) -> Result<()> {
        self.timed(OpClass::Other, "rmsnorm_bwd", || {
            rmsnorm_bwd(self.gpu, &mut dx.as_view_mut(), &dy.as_view(), &x.as_view(), &rstd.as_view(), t, d).with_context(|| format!("rmsnorm_bwd [T={t}, D={d}]"))
        })
    }

    fn qkv_rope_fwd(&self, gqkv: &mut CudaSlice<bf16>, pos: &CudaSlice<i32>, t: usize, nh: usize) -> Result<()> {
        self.timed(OpClass::Other, "qkv_rope_fwd", || qkv_rope_fwd(self.gpu, &mut gqkv.as_view_mut(), &pos.as_view(), t, nh).with_context(|| format!("qkv_rope_fwd [T={t}, NH={nh}]")))
    }

    fn gqkv_rope_fwd(&self, gqkv: &mut CudaSlice<bf16>, x: &CudaSlice<bf16>, w: &CudaSlice<bf16>, w_at: TensorAt, pos: &CudaSlice<i32>, t: usize, nh: usize, d: usize) -> Result<()> {
        if !(self.epilogue_gemms.get() >= EpilogueGemms::Forward && sm90_rope_supports(self.gpu, nh, d)) {
            self.linear_fwd(gqkv, x, w, w_at, None, t, 4 * nh * HEAD_DIM, d)?;
            return self.qkv_rope_fwd(gqkv, pos, t, nh);
        }
        self.timed(OpClass::Gemm, "gqkv_rope_fwd", || {
            linear_rope_fwd_sm90(self.gpu, &mut gqkv.as_view_mut(), &x.as_view(), &w.slice(w_at.range()), &pos.as_view(), t, nh, d)
                .with_context(|| format!("gqkv_rope_fwd [T={t}, NH={nh}, D={d}]"))
        })
    }

    fn sample_table_changed(&self) {
        if let Some(scratch) = self.attn_scratch.borrow_mut().as_mut() {
            scratch.sample_table_changed();
        }
    }

    fn attention_fwd(&self, y: &mut CudaSlice<bf16>, lse: &mut CudaSlice<f32>, gqkv: &CudaSlice<bf16>, cu_seqlens: &CudaSlice<i32>, prefix_lens: &CudaSlice<i32>, t: usize, nh: usize) -> Result<()> {
        let mut scratch = self.attention_scratch(t, nh)?;
        self.timed(OpClass::Attention, "attention_fwd", || {
            // The model's batches are packed sample mixes: the kernel for those.
            let kernel = FwdKernel::for_packed_batches(self.gpu);
            kernel.run(self.gpu, &mut y.as_view_mut(), &mut lse.as_view_mut(), &gqkv.as_view(), &cu_seqlens.as_view(), &prefix_lens.as_view(), t, nh, &mut scratch)
                .with_context(|| format!("attention_fwd [T={t}, NH={nh}, S={}]", prefix_lens.len()))
        })
    }

    fn attention_bwd(&self, dgqkv: &mut CudaSlice<bf16>, dy: &CudaSlice<bf16>, gqkv: &CudaSlice<bf16>, y: &CudaSlice<bf16>, lse: &CudaSlice<f32>, cu_seqlens: &CudaSlice<i32>, prefix_lens: &CudaSlice<i32>, pos: &CudaSlice<i32>, t: usize, nh: usize) -> Result<()> {
        let mut scratch = self.attention_scratch(t, nh)?;
        self.timed(OpClass::Attention, "attention_bwd", || {
            let (cu, pl, pos) = (cu_seqlens.as_view(), prefix_lens.as_view(), pos.as_view());
            attention_bwd(self.gpu, &mut dgqkv.as_view_mut(), &dy.as_view(), &gqkv.as_view(), &y.as_view(), &lse.as_view(), &cu, &pl, &pos, t, nh, &mut scratch)
                .with_context(|| format!("attention_bwd [T={t}, NH={nh}, S={}]", prefix_lens.len()))
        })
    }

    fn swiglu_fwd(&self, out: &mut CudaSlice<bf16>, gate_up: &CudaSlice<bf16>, t: usize, i: usize) -> Result<()> {
        self.timed(OpClass::Other, "swiglu_fwd", || swiglu_fwd(self.gpu, &mut out.as_view_mut(), &gate_up.as_view(), t, i).with_context(|| format!("swiglu_fwd [T={t}, I={i}]")))
    }

    fn swiglu_bwd(&self, dgate_up: &mut CudaSlice<bf16>, dout: &CudaSlice<bf16>, gate_up: &CudaSlice<bf16>, t: usize, i: usize) -> Result<()> {
        self.timed(OpClass::Other, "swiglu_bwd", || {
            swiglu_bwd(self.gpu, &mut dgate_up.as_view_mut(), &dout.as_view(), &gate_up.as_view(), t, i).with_context(|| format!("swiglu_bwd [T={t}, I={i}]"))
        })
    }

    fn embedding_fwd(&self, out: &mut CudaSlice<bf16>, tokens: &CudaSlice<i32>, w: &CudaSlice<bf16>, w_at: TensorAt, t: usize, d: usize, scale: f32) -> Result<()> {
        self.timed(OpClass::Other, "embedding_fwd", || {
            embedding_fwd(self.gpu, &mut out.as_view_mut(), &tokens.as_view(), &w.slice(w_at.range()), t, d, scale).with_context(|| format!("embedding_fwd [T={t}, D={d}]"))
        })
    }

    fn prepare_token_order(&self, tokens: &[i32], v: usize) -> Result<()> {
        let t = tokens.len();
        let mut slot = self.embed_scratch.borrow_mut();
        if slot.as_ref().is_none_or(|s| s.t_max() < t || s.v() != v) {
            *slot = None; // release the smaller scratch first
            *slot = Some(self.counted(EmbeddingBwdScratch::new(self.gpu, t, v).context("allocating the embedding backward scratch"))?);
        }
        let scratch = slot.as_mut().expect("allocated above");
        // Host work while the device runs what is queued; untimed, like the batch's uploads.
        let order = TokenOrder::of(tokens, v);
        scratch.upload_order(self.gpu, &order).with_context(|| format!("uploading the token order [T={t}, V={v}]"))
    }

    fn embedding_bwd(&self, dw: &mut CudaSlice<f32>, dw_at: TensorAt, dout: &CudaSlice<bf16>, tokens: &CudaSlice<i32>, t: usize, d: usize, scale: f32) -> Result<()> {
        let v = dw_at.len / d;
        let mut slot = self.embed_scratch.borrow_mut();
        let scratch = slot.as_mut().context("embedding_bwd: no token order was prepared (Backend::prepare_token_order)")?;
        self.timed(OpClass::Other, "embedding_bwd", || {
            embedding_bwd(self.gpu, &mut dw.slice_mut(dw_at.range()), &dout.as_view(), &tokens.as_view(), t, d, scale, scratch).with_context(|| format!("embedding_bwd [T={t}, D={d}, V={v}]"))
        })
    }

    fn lm_head_loss(&self, losses: &mut CudaSlice<f32>, correct: &mut CudaSlice<u8>, grads: Option<(&mut CudaSlice<bf16>, &mut CudaSlice<f32>, bool)>, y: &CudaSlice<bf16>, w: &CudaSlice<bf16>, w_at: TensorAt, labels: &CudaSlice<i32>, t: usize, v: usize, d: usize, grad_scale: &CudaSlice<f32>) -> Result<()> {
        let mut logits = self.lm_scratch(t, v)?;
        let rows = lm_head_rows(t, v, self.lm_chunk_bytes);
        let mut logits = logits.slice_mut(..rows * v); // [rows, V]
        let w = w.slice(w_at.range()); // [V, D]
        let what = || format!("lm_head_loss [T={t}, V={v}, D={d}] in chunks of {rows} rows");
        self.timed(OpClass::LmHead, "lm_head_loss", || {
            if let Some((dy, dw, accumulate)) = grads {
                let mut dw = dw.slice_mut(w_at.range());
                return lm_head_cross_entropy(self.gpu, &self.gemm, &mut dy.as_view_mut(), &mut dw, &mut losses.as_view_mut(), &mut correct.as_view_mut(), &y.as_view(), &w, &labels.as_view(), t, v, d, &grad_scale.as_view(), &mut logits, accumulate)
                    .with_context(what);
            }
            // Forward only: the same chunks without the two backward GEMMs.
            let kernel = CeKernel::for_vocab(self.gpu, v);
            for start in (0..t).step_by(rows) {
                let n = rows.min(t - start);
                let mut block = logits.slice_mut(..n * v);
                linear_fwd(self.gpu, &self.gemm, &mut block, &y.slice(start * d..(start + n) * d), &w, None, n, v, d).with_context(what)?;
                let r = start..start + n;
                cross_entropy_in_place(self.gpu, kernel, &mut block, &mut losses.slice_mut(r.clone()), &mut correct.slice_mut(r.clone()), &labels.slice(r), n, v, &grad_scale.as_view()).with_context(what)?;
            }
            Ok(())
        })
    }

    fn step_metrics(&self, sums: &mut CudaSlice<f64>, losses: &CudaSlice<f32>, correct: &CudaSlice<u8>, labels: &CudaSlice<i32>, cu_seqlens: &CudaSlice<i32>, t: usize) -> Result<()> {
        self.timed(OpClass::Other, "step_metrics", || {
            metrics(self.gpu, &mut sums.as_view_mut(), &losses.as_view(), &correct.as_view(), &labels.as_view(), &cu_seqlens.as_view(), t).with_context(|| format!("step_metrics [T={t}, S={}]", cu_seqlens.len() - 1))
        })
    }

    fn read_metrics(&self, sums: &CudaSlice<f64>) -> Result<StepMetrics> {
        let host = self.gpu.stream.clone_dtoh(sums).context("downloading the metric sums")?;
        let sums: [f64; METRICS_LEN] = host.try_into().map_err(|v: Vec<f64>| anyhow::anyhow!("the metric sums hold {} values, not {METRICS_LEN}", v.len()))?;
        Ok(StepMetrics::from_device(&sums))
    }
}
