//! The scaled token embedding (SPEC §3): `out[t] = w[tokens[t]] * scale`, `scale = sqrt(D)`.
//!
//! ```text
//! forward    out [T,D]   = w[tokens] * scale
//! backward   dw  [V,D]  += scatter-add of dout * scale by token id   (parameter gradient: +=)
//! ```
//!
//! The backward sums the rows of a repeated token in increasing `t` order, so the result
//! is the same on every run. On the GPU (`cuda/embedding.cu`) `w` and `out`/`dout` are bf16
//! and `dw` fp32, and the backward takes three steps:
//!
//! 1. [`TokenOrder::of`], on the host: a stable counting sort of the token positions by id,
//!    `O(T + V)`. The ids of a batch are known before its step, so this runs when the batch
//!    is uploaded, not on the device.
//! 2. [`EmbeddingBwdScratch::upload_order`]: the order goes through pinned host memory to
//!    the device with an asynchronous copy; the next upload waits for that copy (an event)
//!    before it rewrites the pinned buffer, and nothing else waits.
//! 3. [`embedding_bwd`]: one kernel, fixed-size chunks of the sorted positions, each summing
//!    its ids' runs of `dout` rows in `t` order (a run that crosses chunks is summed piece by
//!    piece, the pieces added in chunk order).
//!
//! No float atomics, so it is bitwise reproducible too (in its own fixed order, which
//! groups the CPU's sum differently).

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, CudaView, CudaViewMut, LaunchConfig, PinnedHostSlice, PushKernelArg};
use half::bf16;
use rayon::prelude::*;

use crate::gpu::{DriverContext, Gpu, GpuError};
use crate::ops::check::{bf16_inputs, download, download_bf16, max_abs, poisoned_bf16, upload, upload_bf16};
use crate::ops::compare::{compare, Tolerance, BF16_EPS};
use crate::ops::shape::{as_i32, expect_aligned16, expect_len};
use crate::rng::Rng;
use crate::selftest::{Check, Row};

const FAMILY: &str = "embedding";
const THREADS: u32 = 256;
/// `CHUNK` in `cuda/embedding.cu`: sorted positions per block of the reduce.
const CHUNK: usize = 16;
/// `FWD_WARPS` in `cuda/embedding.cu`: rows per block of the forward; `THREADS` = 32 of it.
const FWD_WARPS: usize = 8;

/// Panics with the offending position unless every token id is in `0..v`.
#[track_caller]
fn expect_tokens_in_range(op: &str, tokens: &[i32], v: usize) {
    if let Some((t, id)) = tokens.iter().enumerate().find(|(_, &id)| id < 0 || id as usize >= v) {
        panic!("{op}: tokens[{t}] = {id} is outside the vocabulary 0..{v}");
    }
}

/// `out [T,D] = w [V,D][tokens [T]] * scale`; `V` is `w.len() / d`.
pub fn embedding_fwd_cpu(out: &mut [f32], tokens: &[i32], w: &[f32], t: usize, d: usize, scale: f32) {
    const OP: &str = "embedding_fwd_cpu";
    expect_len(OP, "out", out.len(), &[("T", t), ("D", d)]);
    expect_len(OP, "tokens", tokens.len(), &[("T", t)]);
    if d == 0 {
        return;
    }
    assert_eq!(w.len() % d, 0, "{OP}: `w` has {} elements, not a multiple of D={d}", w.len());
    expect_tokens_in_range(OP, tokens, w.len() / d);
    out.par_chunks_mut(d).zip(tokens.par_iter()).for_each(|(row, &id)| {
        let src = &w[id as usize * d..(id as usize + 1) * d];
        row.iter_mut().zip(src).for_each(|(o, &x)| *o = x * scale);
    });
}

/// `dw [V,D] += dout [T,D] * scale`, row `tokens[t]` for each `t` in increasing order.
pub fn embedding_bwd_cpu(dw: &mut [f32], dout: &[f32], tokens: &[i32], t: usize, d: usize, scale: f32) {
    const OP: &str = "embedding_bwd_cpu";
    expect_len(OP, "dout", dout.len(), &[("T", t), ("D", d)]);
    expect_len(OP, "tokens", tokens.len(), &[("T", t)]);
    if d == 0 {
        return;
    }
    assert_eq!(dw.len() % d, 0, "{OP}: `dw` has {} elements, not a multiple of D={d}", dw.len());
    expect_tokens_in_range(OP, tokens, dw.len() / d);
    for (row, &id) in dout.chunks(d).zip(tokens) {
        let dst = &mut dw[id as usize * d..(id as usize + 1) * d];
        dst.iter_mut().zip(row).for_each(|(g, &x)| *g += x * scale);
    }
}

/// The token positions of a batch sorted by id, stably: what the backward's reduce reads to
/// sum each id's rows of `dout` in `t` order. Built on the host ([`TokenOrder::of`]) by a
/// counting sort, `O(T + V)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenOrder {
    /// [T] i32: the positions `t` ordered by `tokens[t]`, `t` ascending within an id; the
    /// positions of ids outside `0..V` last, also ascending. A permutation of `0..T`.
    sorted: Vec<i32>,
    /// [V+1] i32: id `v` owns `sorted[offsets[v] .. offsets[v+1]]`; `offsets[V]` is the
    /// number of valid tokens. Non-decreasing from 0.
    offsets: Vec<i32>,
}

impl TokenOrder {
    /// The order of `tokens` `[T]` over a vocabulary of `v` ids.
    pub fn of(tokens: &[i32], v: usize) -> TokenOrder {
        const OP: &str = "TokenOrder::of";
        as_i32(OP, "T", tokens.len());
        as_i32(OP, "V", v);
        let id_of = |id: i32| usize::try_from(id).ok().filter(|&id| id < v);
        // offsets[id + 1] = count of id, then the running sum: offsets[id] = start of id's run
        // (and offsets[V] = start of the invalid ids' positions).
        let mut offsets = vec![0i32; v + 1];
        tokens.iter().filter_map(|&id| id_of(id)).for_each(|id| offsets[id + 1] += 1);
        for id in 0..v {
            offsets[id + 1] += offsets[id];
        }
        // Each position goes to its id's next free slot, offsets[id] serving as the cursor;
        // invalid ids fill the tail through offsets[V].
        let mut sorted = vec![0i32; tokens.len()];
        for (t, &id) in tokens.iter().enumerate() {
            let cursor = &mut offsets[id_of(id).unwrap_or(v)];
            sorted[*cursor as usize] = t as i32;
            *cursor += 1;
        }
        // Each cursor stopped at the end of its run, which is the start of the next id's:
        // shifted one place up, they are the starts again (offsets[V]: the valid tokens).
        // (Cursors in a copy of the starts took 4x as long, ~280 against ~70 us at T = 16,384
        // and V = 65,536 on a 2-core VM: one more 256 KB buffer to allocate, fault in, fill.)
        offsets.copy_within(0..v, 1);
        offsets[0] = 0;
        TokenOrder { sorted, offsets }
    }

    /// Tokens `T`.
    pub fn tokens(&self) -> usize {
        self.sorted.len()
    }
}

/// What the backward keeps between steps, sized once for `t_max` tokens and a vocabulary of
/// `v` rows: the device copy of the batch's [`TokenOrder`] (and its pinned staging buffer),
/// the reduce's chunk tickets and partial rows.
pub struct EmbeddingBwdScratch {
    t_max: usize,
    v: usize,
    /// Tokens of the order last uploaded; `None` before the first upload.
    ordered_tokens: Option<usize>,
    /// [t_max + V + 1] i32: `sorted` (its first T entries), then `offsets`. Pinned,
    /// write-combined host memory (the host only writes it), so the copy to the device is
    /// asynchronous: it reads the buffer when the stream reaches it, not when it is queued.
    staging: PinnedHostSlice<i32>,
    /// Recorded after each copy from `staging`; the next upload waits on it before writing
    /// the buffer, so a copy not yet run never reads the next batch's order. (cudarc's own
    /// event on a pinned buffer is not recorded here: `Gpu` switches its event tracking off.)
    copied: CudaEvent,
    /// [t_max + V + 1] i32: the device copy, same layout.
    order: CudaSlice<i32>,
    /// [ceil(t_max/CHUNK)] i32: per-chunk tickets of the runs that cross chunks. Zero
    /// between launches: zeroed here, and set back to zero by the kernel.
    tickets: CudaSlice<i32>,
    /// [ceil(t_max/CHUNK), 2, D] fp32: the pieces of runs that cross chunks. D is not known
    /// until the first call, which allocates it (6 MiB at 16k tokens and D = 1536).
    partials: Option<CudaSlice<f32>>,
}

impl EmbeddingBwdScratch {
    pub fn new(gpu: &Gpu, t_max: usize, v: usize) -> Result<EmbeddingBwdScratch, GpuError> {
        const WHAT: &str = "allocating the embedding backward scratch";
        let order_len = t_max + v + 1;
        // SAFETY: the memory is uninitialised until the fill just below, before any read.
        let mut staging = unsafe { gpu.ctx.alloc_pinned::<i32>(order_len) }.during(WHAT)?;
        staging.as_mut_slice().during(WHAT)?.fill(0);
        Ok(EmbeddingBwdScratch {
            t_max,
            v,
            ordered_tokens: None,
            staging,
            copied: gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC)).during(WHAT)?,
            order: gpu.stream.alloc_zeros::<i32>(order_len).during(WHAT)?,
            tickets: gpu.stream.alloc_zeros::<i32>(t_max.div_ceil(CHUNK).max(1)).during(WHAT)?,
            partials: None,
        })
    }

    /// Device bytes of [`EmbeddingBwdScratch::new`] for `t_max` tokens and `v` rows, besides
    /// the partial rows (`[ceil(t_max/16), 2, D]` fp32, allocated by the first backward).
    pub fn device_bytes(t_max: usize, v: usize) -> usize {
        4 * ((t_max + v + 1) + t_max.div_ceil(CHUNK).max(1))
    }

    pub fn t_max(&self) -> usize {
        self.t_max
    }

    pub fn v(&self) -> usize {
        self.v
    }

    /// Queues the copy of `order` (T <= t_max tokens over this scratch's V ids) to the device:
    /// every [`embedding_bwd`] after it reads this order, until the next upload. Returns once
    /// `order` is copied into the pinned staging buffer; that waits until the previous
    /// upload's device copy has read the buffer. In training that copy runs once the step
    /// before it is done, so the host stays at most one step ahead of the device.
    pub fn upload_order(&mut self, gpu: &Gpu, order: &TokenOrder) -> Result<(), GpuError> {
        const OP: &str = "upload_order";
        let t = order.tokens();
        assert!(t <= self.t_max, "{OP}: T = {t} exceeds the scratch's {} tokens", self.t_max);
        assert_eq!(order.offsets.len(), self.v + 1, "{OP}: the order is over {} ids, the scratch over V = {}", order.offsets.len() - 1, self.v);
        self.copied.synchronize().during("waiting for the previous token order's copy")?;
        let staging = self.staging.as_mut_slice().during("writing the token order's staging buffer")?;
        staging[..t].copy_from_slice(&order.sorted);
        staging[self.t_max..].copy_from_slice(&order.offsets);
        gpu.stream.memcpy_htod(&self.staging, &mut self.order).during("copying the token order to the device")?;
        self.copied.record(&gpu.stream).during("recording the token order's copy")?;
        self.ordered_tokens = Some(t);
        Ok(())
    }

    /// Allocates the partial rows for hidden size `d` on first use.
    fn ensure_partials(&mut self, gpu: &Gpu, d: usize) -> Result<(), GpuError> {
        let len = self.t_max.div_ceil(CHUNK) * 2 * d;
        if self.partials.as_ref().is_none_or(|p| p.len() < len) {
            // SAFETY: a partial row is always written before it is read (see the kernel).
            self.partials = Some(unsafe { gpu.stream.alloc::<f32>(len.max(1)) }.during("allocating the embedding backward partials")?);
        }
        Ok(())
    }
}

/// GPU [`embedding_fwd_cpu`]. out: [T,D] bf16, tokens: [T] i32, w: [V,D] bf16. Ids outside
/// `0..V` (which the data pipeline never produces) give zero rows instead of reading out of
/// bounds.
pub fn embedding_fwd(gpu: &Gpu, out: &mut CudaViewMut<bf16>, tokens: &CudaView<i32>, w: &CudaView<bf16>, t: usize, d: usize, scale: f32) -> Result<(), GpuError> {
    const OP: &str = "embedding_fwd";
    expect_len(OP, "out", out.len(), &[("T", t), ("D", d)]);
    expect_len(OP, "tokens", tokens.len(), &[("T", t)]);
    assert!(d > 0 && d % 8 == 0, "{OP}: D = {d} must be a positive multiple of 8");
    assert_eq!(w.len() % d, 0, "{OP}: `w` has {} elements, not a multiple of D={d}", w.len());
    expect_aligned16(OP, "out", gpu, out);
    expect_aligned16(OP, "w", gpu, w);
    if t == 0 {
        return Ok(());
    }
    let (t_i, d_i, v_i) = (as_i32(OP, "T", t), as_i32(OP, "D", d), as_i32(OP, "V", w.len() / d));
    // One warp per row, FWD_WARPS rows (THREADS = FWD_WARPS * 32 threads) a block.
    let blocks = t.div_ceil(FWD_WARPS) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let func = gpu.function(FAMILY, OP)?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(out).arg(tokens).arg(w).arg(&t_i).arg(&d_i).arg(&v_i).arg(&scale);
    // SAFETY: out holds T*D bf16, tokens T i32, w V*D bf16 (checked above), 16-byte aligned;
    // the kernel reads only rows of w whose id is in 0..V.
    unsafe { args.launch(cfg) }.during(OP)?;
    Ok(())
}

/// GPU [`embedding_bwd_cpu`]. dw: [V,D] fp32 (+=), dout: [T,D] bf16, tokens: [T] i32;
/// `scratch` sized for at least T tokens and exactly V rows, holding the [`TokenOrder`] of
/// these `tokens` ([`EmbeddingBwdScratch::upload_order`]). One kernel; bitwise reproducible.
#[allow(clippy::too_many_arguments)]
pub fn embedding_bwd(
    gpu: &Gpu,
    dw: &mut CudaViewMut<f32>,
    dout: &CudaView<bf16>,
    tokens: &CudaView<i32>,
    t: usize,
    d: usize,
    scale: f32,
    scratch: &mut EmbeddingBwdScratch,
) -> Result<(), GpuError> {
    const OP: &str = "embedding_bwd";
    expect_len(OP, "dout", dout.len(), &[("T", t), ("D", d)]);
    expect_len(OP, "tokens", tokens.len(), &[("T", t)]);
    assert!(d > 0 && d % 8 == 0 && d <= 8192, "{OP}: D = {d} must be a positive multiple of 8, at most 8192");
    let v = scratch.v;
    expect_len(OP, "dw", dw.len(), &[("V", v), ("D", d)]);
    assert!(t <= scratch.t_max, "{OP}: T = {t} exceeds the scratch's {} tokens", scratch.t_max);
    expect_aligned16(OP, "dw", gpu, dw);
    expect_aligned16(OP, "dout", gpu, dout);
    if t == 0 {
        return Ok(());
    }
    assert!(
        scratch.ordered_tokens == Some(t),
        "{OP}: the scratch holds the order of {:?} tokens, not T = {t}: upload this batch's TokenOrder first",
        scratch.ordered_tokens
    );
    let (d_i, v_i) = (as_i32(OP, "D", d), as_i32(OP, "V", v));
    scratch.ensure_partials(gpu, d)?;
    let s = scratch;
    let chunks = t.div_ceil(CHUNK);
    let cols = (d / 8).next_multiple_of(32) as u32;
    let cfg = LaunchConfig { grid_dim: (chunks as u32, 1, 1), block_dim: (cols, 1, 1), shared_mem_bytes: 0 };
    let partials = s.partials.as_mut().expect("allocated by ensure_partials");
    let mut tickets = s.tickets.slice_mut(..chunks);
    let (sorted, offsets) = (s.order.slice(..s.t_max), s.order.slice(s.t_max..));
    let func = gpu.function(FAMILY, "embedding_bwd_reduce")?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(dw).arg(partials).arg(&mut tickets).arg(dout).arg(tokens).arg(&sorted).arg(&offsets).arg(&d_i).arg(&v_i).arg(&scale);
    // SAFETY: dw holds V*D fp32, dout T*D bf16 (checked above), both 16-byte aligned;
    // partials hold ceil(t_max/CHUNK)*2*D fp32 and tickets one zero i32 per chunk (the
    // grid). The order on the device is a TokenOrder of T tokens over V ids (uploaded
    // before this launch on the same stream): offsets [V+1] non-decreasing up to
    // offsets[V] <= T, and sorted[j] < T for the j < offsets[V] the kernel reads; ids are
    // clamped to 0..V. Each row of dw is written by one block (the run's own chunk, or the
    // one that draws its last ticket).
    unsafe { args.launch(cfg) }.during("embedding_bwd_reduce")?;
    Ok(())
}

pub fn selftests() -> Vec<Check> {
    vec![
        Check { name: "embedding_fwd", run: check_fwd },
        Check { name: "embedding_bwd", run: check_bwd },
        Check { name: "embedding_bwd_staged", run: check_bwd_staged_ahead },
    ]
}

/// (T, D, V, share of the tokens that are one "hot" id): odd sizes, an XL-like batch, a
/// batch dominated by one id (padding) that exercises the interleaved partial sums, and a
/// long batch of narrow rows (2500 chunks, most ids repeated).
const SHAPES: [(usize, usize, usize, f64); 5] = [(1, 8, 3, 0.0), (37, 296, 11, 0.0), (4099, 1536, 65536, 0.1), (1000, 2560, 300, 0.8), (40000, 8, 5000, 0.0)];

fn draw_tokens(rng: &mut Rng, t: usize, v: usize, hot: f64) -> Vec<i32> {
    (0..t).map(|_| if rng.uniform() < hot { 0 } else { rng.below(v as u64) as i32 }).collect()
}

fn check_fwd(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for (t, d, v, hot) in SHAPES {
        let tokens = draw_tokens(rng, t, v, hot);
        let w = bf16_inputs(rng, v * d, 1.0);
        let scale = (d as f32).sqrt();
        let mut want = vec![0.0; t * d];
        embedding_fwd_cpu(&mut want, &tokens, &w, t, d, scale);
        let (dtok, dw) = (upload(gpu, &tokens)?, upload_bf16(gpu, &w)?);
        let mut out = poisoned_bf16(gpu, t * d)?;
        embedding_fwd(gpu, &mut out.as_view_mut(), &dtok.as_view(), &dw.as_view(), t, d, scale)?;
        // One bf16 rounding of the fp32 product w * scale: 2^-9, checked at 2^-8.
        let tol = Tolerance { abs: 0.0, rel: BF16_EPS };
        rows.push(Row::new("embedding_fwd out", format!("[{t},{d}] V={v}"), tol, compare(&download_bf16(gpu, &out)?, &want, tol)));
    }
    Ok(rows)
}

fn check_bwd(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for (t, d, v, hot) in SHAPES {
        let tokens = draw_tokens(rng, t, v, hot);
        let dout = bf16_inputs(rng, t * d, 1.0);
        let dw0 = rng.uniform_vec(v * d, 1.0);
        let scale = (d as f32).sqrt();
        let mut want = dw0.clone();
        embedding_bwd_cpu(&mut want, &dout, &tokens, t, d, scale);

        let (dtok, ddout) = (upload(gpu, &tokens)?, upload_bf16(gpu, &dout)?);
        // As in training: a scratch with room for more tokens than this batch, which already
        // served another batch (its order, its tickets) before this batch's order replaces it.
        let mut scratch = EmbeddingBwdScratch::new(gpu, t + 7, v)?;
        let other = draw_tokens(rng, t, v, hot);
        let run = |tokens: &CudaSlice<i32>, scratch: &mut EmbeddingBwdScratch| -> Result<Vec<f32>, GpuError> {
            let mut dw = upload(gpu, &dw0)?;
            embedding_bwd(gpu, &mut dw.as_view_mut(), &ddout.as_view(), &tokens.as_view(), t, d, scale, scratch)?;
            download(gpu, &dw)
        };
        scratch.upload_order(gpu, &TokenOrder::of(&other, v))?;
        run(&upload(gpu, &other)?, &mut scratch)?;
        scratch.upload_order(gpu, &TokenOrder::of(&tokens, v))?;
        let (first, second) = (run(&dtok, &mut scratch)?, run(&dtok, &mut scratch)?);
        let tol = bwd_tolerance(&tokens, v, scale, &dout);
        let shape = format!("[{t},{d}] V={v} hot={hot}");
        rows.push(Row::new("embedding_bwd dw (+=)", &shape, tol, compare(&first, &want, tol)));
        // Same inputs, same bits: no order-dependent float atomics, and the first run left
        // the tickets zero for the second.
        let exact = Tolerance { abs: 0.0, rel: 0.0 };
        rows.push(Row::new("embedding_bwd rerun bitwise", &shape, exact, compare(&second, &first, exact)));
    }
    Ok(rows)
}

/// fp32 sums of up to n terms in two different orders (CPU: sequential; GPU: four interleaved
/// partial sums): each within n * 2^-24 of the sum of |terms|, which is at most n * scale *
/// max|dout|: abs 2^-23 * n^2 * scale * max|dout|, n the most repeated id's count.
fn bwd_tolerance(tokens: &[i32], v: usize, scale: f32, dout: &[f32]) -> Tolerance {
    let mut counts = vec![0usize; v];
    tokens.iter().for_each(|&id| counts[id as usize] += 1);
    let max_count = counts.into_iter().max().unwrap_or(0) as f32;
    let abs = 2f32.powi(-23) * max_count * max_count * scale * max_abs(dout);
    Tolerance { abs: abs.max(1e-7), rel: 2.0 * f32::EPSILON }
}

/// Two batches' orders staged back to back while the stream is still busy, as a training step
/// replayed from a CUDA graph leaves it (the host stages the next batch at once): each
/// backward must read its own batch's order, not the one the host wrote after it. About 10 ms
/// of forward passes queue ahead of the first copy, so a second upload that did not wait would
/// overwrite the pinned buffer before the first copy reads it.
fn check_bwd_staged_ahead(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let (t, d, v) = (4099, 256, 3000);
    let scale = (d as f32).sqrt();
    let dout = bf16_inputs(rng, t * d, 1.0);
    let ddout = upload_bf16(gpu, &dout)?;
    let batches: Vec<Vec<i32>> = (0..2).map(|_| draw_tokens(rng, t, v, 0.0)).collect();
    let mut scratch = EmbeddingBwdScratch::new(gpu, t, v)?;
    // Everything else is on the device before the busy work: a copy from pageable memory may
    // wait for the stream, which would hide the race this check is about.
    let device_tokens = batches.iter().map(|b| upload(gpu, b)).collect::<Result<Vec<_>, _>>()?;
    let mut results = (0..2).map(|_| gpu.stream.alloc_zeros::<f32>(v * d).during("allocating dw")).collect::<Result<Vec<_>, _>>()?;

    let (busy_t, busy_d, busy_v) = (65536, 1024, 1024);
    let busy_tokens = upload(gpu, &draw_tokens(rng, busy_t, busy_v, 0.0))?;
    let busy_w = upload_bf16(gpu, &bf16_inputs(rng, busy_v * busy_d, 1.0))?;
    let mut busy_out = poisoned_bf16(gpu, busy_t * busy_d)?;
    for _ in 0..200 {
        embedding_fwd(gpu, &mut busy_out.as_view_mut(), &busy_tokens.as_view(), &busy_w.as_view(), busy_t, busy_d, 1.0)?;
    }
    for ((tokens, device_tokens), dw) in batches.iter().zip(&device_tokens).zip(&mut results) {
        scratch.upload_order(gpu, &TokenOrder::of(tokens, v))?;
        embedding_bwd(gpu, &mut dw.as_view_mut(), &ddout.as_view(), &device_tokens.as_view(), t, d, scale, &mut scratch)?;
    }
    let mut rows = Vec::new();
    for (i, (tokens, dw)) in batches.iter().zip(&results).enumerate() {
        let mut want = vec![0.0; v * d];
        embedding_bwd_cpu(&mut want, &dout, tokens, t, d, scale);
        let tol = bwd_tolerance(tokens, v, scale, &dout);
        rows.push(Row::new(format!("embedding_bwd dw, order {} of 2 staged ahead", i + 1), format!("[{t},{d}] V={v}"), tol, compare(&download(gpu, dw)?, &want, tol)));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_gradient, weighted_sum};
    use crate::rng::Rng;

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(9);
        let (t, d, v) = (19, 13, 11);
        // Repeated ids (19 tokens over 11 rows) exercise the accumulation.
        let tokens: Vec<i32> = (0..t).map(|_| rng.below(v as u64) as i32).collect();
        let w = rng.uniform_vec(v * d, 1.0);
        let r = rng.uniform_vec(t * d, 1.0);
        let scale = (d as f32).sqrt();
        let loss = |w: &[f32]| {
            let mut out = vec![0.0; t * d];
            embedding_fwd_cpu(&mut out, &tokens, w, t, d, scale);
            weighted_sum(&r, &out)
        };
        let start = rng.uniform_vec(v * d, 1.0);
        let mut dw = start.clone();
        embedding_bwd_cpu(&mut dw, &r, &tokens, t, d, scale);
        let delta: Vec<f32> = dw.iter().zip(&start).map(|(a, b)| a - b).collect();
        check_gradient("embedding dw", &w, &delta, loss, &mut rng, 4);
    }

    /// The order by a plain stable sort of the positions on (valid id, or V for an invalid
    /// one), each offset by a binary search: what `TokenOrder::of` must equal.
    fn sorted_by_std(tokens: &[i32], v: usize) -> TokenOrder {
        let key = |t: &i32| usize::try_from(tokens[*t as usize]).ok().filter(|&id| id < v).unwrap_or(v);
        let mut sorted: Vec<i32> = (0..tokens.len() as i32).collect();
        sorted.sort_by_key(key); // stable: t ascending within a key
        let offsets = (0..=v).map(|id| sorted.partition_point(|t| key(t) < id) as i32).collect();
        TokenOrder { sorted, offsets }
    }

    #[test]
    fn token_order_is_a_stable_sort_by_id() {
        let mut rng = Rng::new(17);
        for (t, v) in [(1, 1), (37, 11), (1000, 300), (4099, 65536)] {
            let tokens: Vec<i32> = (0..t).map(|_| rng.below(v as u64) as i32).collect();
            assert_eq!(TokenOrder::of(&tokens, v), sorted_by_std(&tokens, v), "T = {t}, V = {v}");
        }
    }

    #[test]
    fn token_order_spells_out_a_small_case() {
        let order = TokenOrder::of(&[2, 0, 2, 1, 0, 2], 4);
        assert_eq!(order.sorted, [1, 4, 3, 0, 2, 5]);
        assert_eq!(order.offsets, [0, 2, 3, 6, 6]);
    }

    #[test]
    fn token_order_puts_invalid_ids_last_in_t_order() {
        let tokens = [3, -1, 0, 5, 3, i32::MAX, 0, i32::MIN];
        let order = TokenOrder::of(&tokens, 4);
        assert_eq!(order.sorted, [2, 6, 0, 4, 1, 3, 5, 7]);
        assert_eq!(order.offsets, [0, 2, 2, 2, 4]); // 4 valid tokens
        assert_eq!(order, sorted_by_std(&tokens, 4));
    }

    #[test]
    fn token_order_of_nothing() {
        let order = TokenOrder::of(&[], 5);
        assert!(order.sorted.is_empty());
        assert_eq!(order.offsets, [0; 6]);
        // No vocabulary: every id is invalid.
        let order = TokenOrder::of(&[0, 1], 0);
        assert_eq!((order.sorted, order.offsets), (vec![0, 1], vec![0]));
    }

    #[test]
    fn token_order_with_one_id_dominating() {
        // A packed batch's padding: 90% of the positions are id 0, spread among the others.
        let mut rng = Rng::new(23);
        let tokens: Vec<i32> = (0..5000).map(|_| if rng.uniform() < 0.9 { 0 } else { 1 + rng.below(999) as i32 }).collect();
        let order = TokenOrder::of(&tokens, 1000);
        let zeros: Vec<i32> = (0..5000).filter(|&t| tokens[t as usize] == 0).collect();
        assert_eq!(order.sorted[..zeros.len()], zeros[..]);
        assert_eq!(order.offsets[1] as usize, zeros.len());
        assert_eq!(order, sorted_by_std(&tokens, 1000));
    }

    #[test]
    #[should_panic(expected = "tokens[1] = 11 is outside the vocabulary 0..11")]
    fn rejects_out_of_range_tokens() {
        let mut out = vec![0.0; 2];
        embedding_fwd_cpu(&mut out, &[0, 11], &[0.0; 11], 2, 1, 1.0);
    }
}
