//! The scaled token embedding (SPEC §3): `out[t] = w[tokens[t]] * scale`, `scale = sqrt(D)`.
//!
//! ```text
//! forward    out [T,D]   = w[tokens] * scale
//! backward   dw  [V,D]  += scatter-add of dout * scale by token id   (parameter gradient: +=)
//! ```
//!
//! The backward sums the rows of a repeated token in increasing `t` order, so the result
//! is the same on every run. On the GPU (`cuda/embedding.cu`) `w` and `out`/`dout` are bf16
//! and `dw` fp32; the backward is a stable counting sort of the token ids, then fixed-size
//! chunks of the sorted positions, each summing its ids' runs of `dout` rows in `t` order
//! (a run that crosses chunks is summed piece by piece, the pieces added in chunk order).
//! No float atomics, so it is bitwise reproducible too (in its own fixed order, which
//! groups the CPU's sum differently).

use cudarc::driver::sys::CUfunction_attribute as FuncAttr;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
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
/// `SCAN_THREADS` in `cuda/embedding.cu`.
const SCAN_THREADS: u32 = 1024;
/// `CHUNK` in `cuda/embedding.cu`: sorted positions per block of the reduce step.
const CHUNK: usize = 16;
/// `SORT_THREADS`, `RADIX` and `HIST_PITCH` in `cuda/embedding.cu`: the one-block radix sort.
const SORT_THREADS: u32 = 1024;
const RADIX: usize = 256;
const HIST_PITCH: usize = SORT_THREADS as usize / 32 + 1;
/// Static shared memory of `embedding_bwd_sort` (the scan's 32 warp sums), besides the dynamic.
const SORT_STATIC_SMEM: usize = 32 * 4;
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

/// Device scratch of the deterministic backward, sized once for `t_max` tokens and a
/// vocabulary of `v` rows, and reused every step.
pub struct EmbeddingBwdScratch {
    t_max: usize,
    v: usize,
    /// [2V + ceil(t_max/CHUNK)] i32: per-id token counts, per-id fill cursors, per-chunk
    /// tickets of the runs that cross chunks; zeroed each call (one memset).
    counters: CudaSlice<i32>,
    /// [V+1] i32: start of each id's run in `sorted`.
    offsets: CudaSlice<i32>,
    /// [T] i32 each: token positions grouped by id (unordered, then ascending).
    bucket: CudaSlice<i32>,
    sorted: CudaSlice<i32>,
    /// [ceil(t_max/CHUNK), 2, D] fp32: the pieces of runs that cross chunks. D is not known
    /// until the first call, which allocates it (6 MiB at 16k tokens and D = 1536).
    partials: Option<CudaSlice<f32>>,
}

impl EmbeddingBwdScratch {
    pub fn new(gpu: &Gpu, t_max: usize, v: usize) -> Result<EmbeddingBwdScratch, GpuError> {
        let alloc = |n: usize| gpu.stream.alloc_zeros::<i32>(n.max(1)).during("allocating the embedding backward scratch");
        Ok(EmbeddingBwdScratch {
            t_max,
            v,
            counters: alloc(2 * v + t_max.div_ceil(CHUNK))?,
            offsets: alloc(v + 1)?,
            bucket: alloc(t_max)?,
            sorted: alloc(t_max)?,
            partials: None,
        })
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
/// `scratch` sized for at least T tokens and exactly V rows. Bitwise reproducible.
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
    let (t_i, d_i, v_i) = (as_i32(OP, "T", t), as_i32(OP, "D", d), as_i32(OP, "V", v));
    as_i32(OP, "2V + T/CHUNK", 2 * v + t.div_ceil(CHUNK));
    sort_tokens(gpu, tokens, t_i, v_i, scratch)?;
    scratch.ensure_partials(gpu, d)?;
    let s = scratch;
    let chunks = t.div_ceil(CHUNK);
    let cols = (d / 8).next_multiple_of(32) as u32;
    let cfg = LaunchConfig { grid_dim: (chunks as u32, 1, 1), block_dim: (cols, 1, 1), shared_mem_bytes: 0 };
    let partials = s.partials.as_mut().expect("allocated by ensure_partials");
    let mut tickets = s.counters.slice_mut(2 * v..2 * v + chunks);
    let func = gpu.function(FAMILY, "embedding_bwd_reduce")?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(dw).arg(partials).arg(&mut tickets).arg(dout).arg(tokens).arg(&s.sorted).arg(&s.offsets).arg(&d_i).arg(&v_i).arg(&scale);
    // SAFETY: dw holds V*D fp32, dout T*D bf16 (checked above), both 16-byte aligned;
    // partials hold ceil(t_max/CHUNK)*2*D fp32 and tickets one i32 per chunk (the grid),
    // zeroed by sort_tokens; sorted positions past offsets[V] are never read. Each row of
    // dw is written by one block (the run's own chunk, or the one that draws its last
    // ticket).
    unsafe { args.launch(cfg) }.during("embedding_bwd_reduce")?;
    Ok(())
}

/// Bits that hold every value in `0..=max` (at least 1).
fn bits_for(max: usize) -> u32 {
    (usize::BITS - max.leading_zeros()).max(1)
}

/// Dynamic shared memory of the one-block radix sort for `t` tokens: two key buffers and
/// the per-warp digit histograms.
fn radix_sort_smem(t: usize) -> usize {
    (2 * t + RADIX * HIST_PITCH) * 4
}

/// Whether the one-block radix sort (`embedding_bwd_sort`) takes `t` tokens over `v` ids on
/// this device: the keys `id << t_bits | t` (ids up to V, the stand-in for invalid ones)
/// fit 32 bits, and both key buffers fit one block's shared memory (T up to ~24k on sm_90).
fn radix_sort_fits(gpu: &Gpu, t: usize, v: usize) -> bool {
    bits_for(t.saturating_sub(1)) + bits_for(v) <= 32 && radix_sort_smem(t) + SORT_STATIC_SMEM <= gpu.props.smem_per_block_optin
}

/// Steps 1-4 of the backward (`cuda/embedding.cu`): the stable sort of the token positions
/// by id into `scratch.sorted`, each id's run `scratch.offsets[id] .. scratch.offsets[id +
/// 1]`, and the reduce's chunk tickets zeroed. One block's radix sort in shared memory when
/// T fits it ([`radix_sort_fits`]); otherwise the counting sort (memset and 4 kernels).
/// Public to the crate so the bench can time it alone.
pub(crate) fn sort_tokens(gpu: &Gpu, tokens: &CudaView<i32>, t_i: i32, v_i: i32, scratch: &mut EmbeddingBwdScratch) -> Result<(), GpuError> {
    let (t, v) = (t_i as usize, v_i as usize);
    if radix_sort_fits(gpu, t, v) {
        return radix_sort_tokens(gpu, tokens, t_i, v_i, scratch);
    }
    counting_sort_tokens(gpu, tokens, t_i, v_i, scratch)
}

/// The one-block radix sort: one launch, no memset. Writes only the offsets the reduce reads
/// (each present id's start and end, and `offsets[V]`); those of absent ids keep stale values.
fn radix_sort_tokens(gpu: &Gpu, tokens: &CudaView<i32>, t_i: i32, v_i: i32, scratch: &mut EmbeddingBwdScratch) -> Result<(), GpuError> {
    const NAME: &str = "embedding_bwd_sort";
    let (t, v) = (t_i as usize, v_i as usize);
    let s = scratch;
    let chunks = t.div_ceil(CHUNK);
    let (t_bits, id_bits, n_tickets) = (bits_for(t - 1) as i32, bits_for(v) as i32, chunks as i32);
    let smem = radix_sort_smem(t);
    let func = gpu.function(FAMILY, NAME)?;
    if smem > 48 * 1024 {
        func.set_attribute(FuncAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .during(format!("{NAME}: allowing {smem} bytes of shared memory (the device offers {})", gpu.props.smem_per_block_optin))?;
    }
    let mut tickets = s.counters.slice_mut(2 * v..2 * v + chunks);
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (SORT_THREADS, 1, 1), shared_mem_bytes: smem as u32 };
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(&mut s.sorted).arg(&mut s.offsets).arg(&mut tickets).arg(tokens).arg(&t_i).arg(&v_i).arg(&t_bits).arg(&id_bits).arg(&n_tickets);
    // SAFETY: sorted holds t_max >= T i32, offsets V+1 (ids are clamped to 0..=V), tickets
    // ceil(T/CHUNK) (the slice above), tokens T; one block of SORT_THREADS with the dynamic
    // shared memory the kernel expects (2T keys + the histograms), within the device's
    // opt-in limit (radix_sort_fits); t_bits + id_bits <= 32 so the keys fit.
    unsafe { args.launch(cfg) }.during(NAME)?;
    Ok(())
}

/// The counting sort: zero the counters, then steps 1-4 of `cuda/embedding.cu`.
fn counting_sort_tokens(gpu: &Gpu, tokens: &CudaView<i32>, t_i: i32, v_i: i32, scratch: &mut EmbeddingBwdScratch) -> Result<(), GpuError> {
    let (t, v) = (t_i as usize, v_i as usize);
    let s = scratch;
    gpu.stream.memset_zeros(&mut s.counters).during("zeroing the embedding backward counters")?;
    let per_token = LaunchConfig { grid_dim: (t.div_ceil(THREADS as usize) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };

    // 1. counts[id] += 1 for every token.
    let (mut counts, mut rest) = s.counters.split_at_mut(v);
    let mut cursor = rest.slice_mut(..v);
    let func = gpu.function(FAMILY, "embedding_bwd_count")?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(&mut counts).arg(tokens).arg(&t_i).arg(&v_i);
    // SAFETY: counts holds V i32, tokens T i32; ids outside 0..V are skipped.
    unsafe { args.launch(per_token) }.during("embedding_bwd_count")?;

    // 2. offsets = exclusive scan of counts.
    let func = gpu.function(FAMILY, "embedding_bwd_scan")?;
    let counts = counts.as_view();
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(&mut s.offsets).arg(&counts).arg(&v_i);
    let one_block = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (SCAN_THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: offsets holds V+1 i32, counts V; one block of SCAN_THREADS threads as the
    // kernel requires.
    unsafe { args.launch(one_block) }.during("embedding_bwd_scan")?;

    // 3. bucket[offsets[id] + cursor[id]++] = t.
    let func = gpu.function(FAMILY, "embedding_bwd_fill")?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(&mut s.bucket).arg(&mut cursor).arg(&s.offsets).arg(tokens).arg(&t_i).arg(&v_i);
    // SAFETY: bucket holds t_max >= T i32 and every slot offsets[id] + cursor < offsets[V] <= T
    // (the counts bound the cursors); cursor holds V i32.
    unsafe { args.launch(per_token) }.during("embedding_bwd_fill")?;

    // 4. sorted = bucket with each id's positions in ascending order.
    let func = gpu.function(FAMILY, "embedding_bwd_rank")?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(&mut s.sorted).arg(&s.bucket).arg(&s.offsets).arg(tokens).arg(&t_i).arg(&v_i);
    // SAFETY: sorted and bucket hold t_max >= T i32; ranks are < the id's count.
    unsafe { args.launch(per_token) }.during("embedding_bwd_rank")?;
    Ok(())
}

pub fn selftests() -> Vec<Check> {
    vec![Check { name: "embedding_fwd", run: check_fwd }, Check { name: "embedding_bwd", run: check_bwd }]
}

/// (T, D, V, share of the tokens that are one "hot" id): odd sizes, an XL-like batch, a
/// batch dominated by one id (padding) that exercises the interleaved partial sums, and a
/// batch too long for the one-block radix sort's shared memory (the counting sort).
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
        let mut scratch = EmbeddingBwdScratch::new(gpu, t, v)?;
        let mut run = || -> Result<Vec<f32>, GpuError> {
            let mut dw = upload(gpu, &dw0)?;
            embedding_bwd(gpu, &mut dw.as_view_mut(), &ddout.as_view(), &dtok.as_view(), t, d, scale, &mut scratch)?;
            download(gpu, &dw)
        };
        let (first, second) = (run()?, run()?);
        // fp32 sums of up to n terms in two different orders (CPU: sequential; GPU: four
        // interleaved partial sums): each within n * 2^-24 of the sum of |terms|, which is at
        // most n * scale * max|dout|: abs 2^-23 * n^2 * scale * max|dout|.
        let mut counts = vec![0usize; v];
        tokens.iter().for_each(|&id| counts[id as usize] += 1);
        let max_count = counts.into_iter().max().unwrap_or(0) as f32;
        let abs = 2f32.powi(-23) * max_count * max_count * scale * max_abs(&dout);
        let tol = Tolerance { abs: abs.max(1e-7), rel: 2.0 * f32::EPSILON };
        let shape = format!("[{t},{d}] V={v} hot={hot}");
        rows.push(Row::new("embedding_bwd dw (+=)", &shape, tol, compare(&first, &want, tol)));
        // Same inputs, same bits: no order-dependent float atomics.
        let exact = Tolerance { abs: 0.0, rel: 0.0 };
        rows.push(Row::new("embedding_bwd rerun bitwise", &shape, exact, compare(&second, &first, exact)));
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

    #[test]
    #[should_panic(expected = "tokens[1] = 11 is outside the vocabulary 0..11")]
    fn rejects_out_of_range_tokens() {
        let mut out = vec![0.0; 2];
        embedding_fwd_cpu(&mut out, &[0, 11], &[0.0; 11], 2, 1, 1.0);
    }
}
