//! `hrm-cu bench kernels`: every op kernel and every GEMM of a block at the XL shapes
//! (SPEC §1: hidden 1536, 12 heads of 128, intermediate 4096; 16,384 tokens a batch; vocab
//! 65,536), against the copy and GEMM ceilings measured first in the same run.
//!
//! Byte counts are the fewest each kernel must move: every input read once, every output
//! written once (`x +=` counts a read and a write), integer side inputs included. GEMM rows
//! time the algorithm `GemmCache`'s tuner chose, then every algorithm the cuBLASLt
//! heuristic offers for the shape, and report how far the chosen one and the heuristic's
//! first choice are from the fastest.

use std::collections::HashSet;
use std::time::Instant;

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use half::bf16;

use crate::bench::{print_table, random_bf16, random_host, random_i32, rotation_sets, time_ms, upload, Ceilings, Measurement, Work};
use crate::gpu::{DriverContext, Gpu, GpuError};
use crate::ops::cross_entropy::{cross_entropy_with, lm_head_cross_entropy, metrics, CeKernel, IGNORE_LABEL, METRICS_LEN};
use crate::ops::embedding::{embedding_bwd, embedding_fwd, EmbeddingBwdScratch, TokenOrder};
use crate::ops::gemm::{linear_bwd_input, linear_bwd_weight, linear_fwd, GemmCache, GemmOp, GemmShape};
use crate::ops::gemm_sm90::{linear_fwd_sm90, linear_rope_fwd_sm90, linear_swiglu_fwd_sm90, supports as sm90_gemm_supports, supports_rope as sm90_rope_supports, supports_swiglu as sm90_swiglu_supports};
use crate::ops::rmsnorm::{add_rmsnorm_fwd, rmsnorm_bwd, rmsnorm_fwd};
use crate::ops::rope::{qkv_rope_bwd, qkv_rope_fwd};
use crate::ops::swiglu::{swiglu_bwd, swiglu_fwd};

/// Tokens of one batch.
const T: usize = 16_384;
/// XL's hidden size, heads and intermediate size (also `bench gemm`'s shapes).
pub(super) const D: usize = 1536;
pub(super) const NH: usize = 12;
/// Columns of the attention heads, `NH * 128`.
pub(super) const C: usize = NH * 128;
pub(super) const I: usize = 4096;
const V: usize = 65_536;
/// Samples in the batch, for the metrics kernel (packed samples of ~256 tokens).
const SAMPLES: usize = 64;
/// Rows of the LM head's logits scratch, the model's default first: 4096 x 65,536 bf16 =
/// 512 MiB. The others show whether a smaller or larger chunk would pay.
const LM_CHUNKS: [usize; 3] = [4096, 2048, 8192];

const WARMUP: usize = 3;
const ITERS: usize = 20;
/// Comparing the heuristic's list: rounds over all candidates, each timing every candidate
/// `CANDIDATE_ITERS` times (interleaved, so drift spreads over all of them).
const CANDIDATE_ROUNDS: usize = 3;
const CANDIDATE_ITERS: usize = 3;

pub fn run(gpu: &Gpu) -> anyhow::Result<()> {
    let gemm = GemmCache::new(gpu)?;
    let mut b = Bench { gpu, rows: Vec::new(), seed: 1 };
    eprintln!("measuring the ceilings, then each kernel (rows also print as they finish)");
    let copy_ms = b.copy_ceiling()?;
    let peak = b.gemm_candidates(&gemm, GemmShape { op: GemmOp::Forward, t: 8192, n: 8192, k: 8192 })?;
    let ceilings = Ceilings { copy_bytes_per_s: 2.0 * COPY_BYTES as f64 / (copy_ms / 1e3), gemm_flops_per_s: 2.0 * 8192f64.powi(3) / (peak.best_ms / 1e3) };
    b.push("ceiling: device copy", format!("{} MiB", COPY_BYTES >> 20), copy_ms, Work::Bytes(2.0 * COPY_BYTES as f64), "");
    b.push("ceiling: bf16 GEMM (fastest algo)", "8192^3", peak.best_ms, Work::Flops(2.0 * 8192f64.powi(3)), &peak.note());

    b.rmsnorm()?;
    b.rope()?;
    b.swiglu()?;
    b.embedding()?;
    b.cross_entropy()?;
    b.gemms(&gemm)?;
    b.gemm_tuning()?;
    b.lm_head(&gemm)?;
    print_table(gpu, &ceilings, &b.rows);
    Ok(())
}

/// The tuner's choice against every algorithm the heuristic offered.
struct GemmTiming {
    /// The chosen algorithm, timed like every other row.
    chosen_ms: f64,
    chosen_index: usize,
    /// Median time of each candidate (infinite: failed to run), in the heuristic's order.
    candidates: Vec<f64>,
    best_ms: f64,
    best_index: usize,
}

impl GemmTiming {
    fn note(&self) -> String {
        let gap = |index: usize| 100.0 * (self.candidates[index] / self.best_ms - 1.0);
        format!(
            "tuned #{} ({:+.1}% vs #{} of {}); heuristic #0 {:+.1}%",
            self.chosen_index,
            gap(self.chosen_index),
            self.best_index,
            self.candidates.len(),
            gap(0)
        )
    }
}

/// Times `run` with each of the heuristic's algorithms for `shape` (the medians of
/// `CANDIDATE_ROUNDS` interleaved rounds), then with the tuner's choice, which the cache
/// is left on.
fn time_candidates(gpu: &Gpu, gemm: &GemmCache, shape: GemmShape, run: &mut dyn FnMut(usize) -> Result<(), GpuError>) -> Result<GemmTiming, GpuError> {
    let chosen_index = gemm.chosen_algorithm(shape)?;
    let count = gemm.algorithm_count(shape)?;
    let mut rounds = vec![Vec::new(); count];
    for _ in 0..CANDIDATE_ROUNDS {
        for (index, times) in rounds.iter_mut().enumerate() {
            gemm.choose_algorithm(shape, index)?;
            // An algorithm that fails to run is left out of the comparison.
            times.push(time_ms(gpu, 1, CANDIDATE_ITERS, &mut *run).unwrap_or(f64::INFINITY));
        }
    }
    let candidates: Vec<f64> = rounds
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect();
    let (best_index, best_ms) = candidates.iter().copied().enumerate().fold((0, f64::INFINITY), |b, (i, ms)| if ms < b.1 { (i, ms) } else { b });
    gemm.choose_algorithm(shape, chosen_index)?;
    let chosen_ms = time_ms(gpu, WARMUP, ITERS, &mut *run)?;
    Ok(GemmTiming { chosen_ms, chosen_index, candidates, best_ms, best_index })
}

/// Bytes of the copy ceiling: 1 GiB each way, far beyond L2.
const COPY_BYTES: usize = 1 << 30;

struct Bench<'a> {
    gpu: &'a Gpu,
    rows: Vec<Measurement>,
    seed: u64,
}

impl Bench<'_> {
    fn push(&mut self, name: &str, shape: impl Into<String>, ms: f64, work: Work, note: &str) {
        let row = Measurement { name: name.into(), shape: shape.into(), ms, work, note: note.into() };
        eprintln!("  {:<34} {:<30} {:>10.1} us", row.name, row.shape, row.ms * 1e3);
        self.rows.push(row);
    }

    fn next_seed(&mut self) -> u64 {
        self.seed += 1;
        self.seed
    }

    /// `sets` independent random bf16 buffers of `n` values.
    fn bf16_sets(&mut self, sets: usize, n: usize, scale: f32) -> Result<Vec<CudaSlice<bf16>>, GpuError> {
        (0..sets).map(|_| random_bf16(self.gpu, n, scale, self.next_seed())).collect()
    }

    fn zero_sets<T: DeviceRepr + ValidAsZeroBits>(&self, sets: usize, n: usize) -> Result<Vec<CudaSlice<T>>, GpuError> {
        (0..sets).map(|_| self.gpu.stream.alloc_zeros::<T>(n).during("allocating bench outputs")).collect()
    }

    fn copy_ceiling(&mut self) -> Result<f64, GpuError> {
        let src = random_bf16(self.gpu, COPY_BYTES / 2, 1.0, self.next_seed())?;
        let mut dst = self.gpu.stream.alloc_zeros::<bf16>(COPY_BYTES / 2).during("allocating the copy target")?;
        let gpu = self.gpu;
        time_ms(gpu, WARMUP, ITERS, |_| gpu.stream.memcpy_dtod(&src, &mut dst).during("device copy"))
    }

    fn rmsnorm(&mut self) -> Result<(), GpuError> {
        let gpu = self.gpu;
        let n = T * D;
        let bytes = 4 * n * 2 + T * 4;
        let sets = rotation_sets(gpu, bytes);
        let (z, inj) = (self.bf16_sets(sets, n, 1.0)?, self.bf16_sets(sets, n, 1.0)?);
        let (mut x, mut y, mut rstd) = (self.zero_sets::<bf16>(sets, n)?, self.zero_sets::<bf16>(sets, n)?, self.zero_sets::<f32>(sets, T)?);
        let shape = format!("[{T},{D}]");

        let ms = time_ms(gpu, WARMUP, ITERS, |i| {
            let s = i % sets;
            add_rmsnorm_fwd(gpu, &mut x[s].as_view_mut(), &mut y[s].as_view_mut(), &mut rstd[s].as_view_mut(), &z[s].as_view(), Some(&inj[s].as_view()), T, D)
        })?;
        self.push("add_rmsnorm_fwd", &shape, ms, Work::Bytes(bytes as f64), "reads z, inj; writes x, y, rstd");

        let ms = time_ms(gpu, WARMUP, ITERS, |i| {
            let s = i % sets;
            rmsnorm_fwd(gpu, &mut y[s].as_view_mut(), &mut rstd[s].as_view_mut(), &z[s].as_view(), T, D)
        })?;
        self.push("rmsnorm_fwd", &shape, ms, Work::Bytes((2 * n * 2 + T * 4) as f64), "");

        // dx += ...: dx (read and written), dy, x, rstd.
        let ms = time_ms(gpu, WARMUP, ITERS, |i| {
            let s = i % sets;
            rmsnorm_bwd(gpu, &mut x[s].as_view_mut(), &inj[s].as_view(), &z[s].as_view(), &rstd[s].as_view(), T, D)
        })?;
        self.push("rmsnorm_bwd", &shape, ms, Work::Bytes((4 * n * 2 + T * 4) as f64), "dx read + written");
        Ok(())
    }

    fn rope(&mut self) -> Result<(), GpuError> {
        let gpu = self.gpu;
        // The query and key blocks of each row, read and written in place.
        let bytes = 2 * T * 2 * C * 2 + T * 4;
        let sets = rotation_sets(gpu, bytes);
        let mut gqkv = self.bf16_sets(sets, T * 4 * C, 1.0)?;
        let pos: Vec<CudaSlice<i32>> = (0..sets).map(|_| random_i32(gpu, T, 4096, self.next_seed())).collect::<Result<_, _>>()?;
        let shape = format!("[{T},4x{NH}x128]");
        let ms = time_ms(gpu, WARMUP, ITERS, |i| {
            let s = i % sets;
            qkv_rope_fwd(gpu, &mut gqkv[s].as_view_mut(), &pos[s].as_view(), T, NH)
        })?;
        self.push("qkv_rope_fwd", &shape, ms, Work::Bytes(bytes as f64), "in place: q, k blocks");
        let ms = time_ms(gpu, WARMUP, ITERS, |i| {
            let s = i % sets;
            qkv_rope_bwd(gpu, &mut gqkv[s].as_view_mut(), &pos[s].as_view(), T, NH)
        })?;
        self.push("qkv_rope_bwd", &shape, ms, Work::Bytes(bytes as f64), "in place: dq, dk blocks");
        Ok(())
    }

    fn swiglu(&mut self) -> Result<(), GpuError> {
        let gpu = self.gpu;
        let bytes_bwd = (T * I + 2 * T * 2 * I) * 2;
        let sets = rotation_sets(gpu, bytes_bwd);
        let (gate_up, dout) = (self.bf16_sets(sets, T * 2 * I, 3.0)?, self.bf16_sets(sets, T * I, 1.0)?);
        let (mut out, mut dgu) = (self.zero_sets::<bf16>(sets, T * I)?, self.zero_sets::<bf16>(sets, T * 2 * I)?);
        let shape = format!("[{T},{I}]");
        let ms = time_ms(gpu, WARMUP, ITERS, |i| {
            let s = i % sets;
            swiglu_fwd(gpu, &mut out[s].as_view_mut(), &gate_up[s].as_view(), T, I)
        })?;
        self.push("swiglu_fwd", &shape, ms, Work::Bytes((3 * T * I * 2) as f64), "");
        let ms = time_ms(gpu, WARMUP, ITERS, |i| {
            let s = i % sets;
            swiglu_bwd(gpu, &mut dgu[s].as_view_mut(), &dout[s].as_view(), &gate_up[s].as_view(), T, I)
        })?;
        self.push("swiglu_bwd", &shape, ms, Work::Bytes(bytes_bwd as f64), "");
        Ok(())
    }

    fn embedding(&mut self) -> Result<(), GpuError> {
        let gpu = self.gpu;
        let tokens_host: Vec<i32> = random_host(T, self.next_seed(), |rng| rng.below(V as u64) as i32);
        let unique = tokens_host.iter().collect::<HashSet<_>>().len();
        let tokens = upload(gpu, &tokens_host)?;
        let w = random_bf16(gpu, V * D, 1.0, self.next_seed())?;
        let dout = random_bf16(gpu, T * D, 1.0, self.next_seed())?;
        let mut out = gpu.stream.alloc_zeros::<bf16>(T * D).during("allocating bench outputs")?;
        let mut dw = gpu.stream.alloc_zeros::<f32>(V * D).during("allocating bench outputs")?;
        let mut scratch = EmbeddingBwdScratch::new(gpu, T, V)?;
        let scale = (D as f32).sqrt();
        let shape = format!("[{T},{D}] V={V}");
        let note = format!("{unique} distinct ids");
        // Working sets (unique rows of w or dw, plus the activations) exceed L2: no rotation.
        let ms = time_ms(gpu, WARMUP, ITERS, |_| embedding_fwd(gpu, &mut out.as_view_mut(), &tokens.as_view(), &w.as_view(), T, D, scale))?;
        self.push("embedding_fwd", &shape, ms, Work::Bytes((T * 4 + unique * D * 2 + T * D * 2) as f64), &note);

        // The backward's host part: the counting sort of the positions by id (CPU wall time).
        let host_ms = median_host_ms(ITERS, || TokenOrder::of(&tokens_host, V));
        self.push("TokenOrder::of (host)", &shape, host_ms, Work::Latency, "CPU wall time, median; runs as the batch is uploaded");
        let order = TokenOrder::of(&tokens_host, V);
        scratch.upload_order(gpu, &order)?;
        // Reads dout, the tokens and `sorted` (the offsets of the present ids are noise); reads
        // and writes the touched rows of dw.
        let bwd_bytes = |unique: usize| (2 * T * 4 + T * D * 2 + 2 * unique * D * 4) as f64;
        let ms = time_ms(gpu, WARMUP, ITERS, |_| embedding_bwd(gpu, &mut dw.as_view_mut(), &dout.as_view(), &tokens.as_view(), T, D, scale, &mut scratch))?;
        self.push("embedding_bwd (reduce)", &shape, ms, Work::Bytes(bwd_bytes(unique)), &format!("{note}; dw rows read + written"));
        let ms = time_ms(gpu, WARMUP, ITERS, |_| {
            scratch.upload_order(gpu, &order)?;
            embedding_bwd(gpu, &mut dw.as_view_mut(), &dout.as_view(), &tokens.as_view(), T, D, scale, &mut scratch)
        })?;
        self.push("embedding_bwd (upload + reduce)", &shape, ms, Work::Bytes(bwd_bytes(unique)), "+ the order's copy from pinned memory");
        // A packed batch with 10% padding: one id holds 1638 of the positions.
        let padded_host: Vec<i32> = tokens_host.iter().enumerate().map(|(t, &id)| if t >= T - T / 10 { 0 } else { id }).collect();
        let padded = upload(gpu, &padded_host)?;
        let unique = padded_host.iter().collect::<HashSet<_>>().len();
        scratch.upload_order(gpu, &TokenOrder::of(&padded_host, V))?;
        let ms = time_ms(gpu, WARMUP, ITERS, |_| embedding_bwd(gpu, &mut dw.as_view_mut(), &dout.as_view(), &padded.as_view(), T, D, scale, &mut scratch))?;
        self.push("embedding_bwd (reduce), 10% one id", &shape, ms, Work::Bytes(bwd_bytes(unique)), &format!("{unique} distinct ids"));
        Ok(())
    }

    fn cross_entropy(&mut self) -> Result<(), GpuError> {
        let gpu = self.gpu;
        let logits = random_bf16(gpu, T * V, 8.0, self.next_seed())?;
        let mut dlogits = gpu.stream.alloc_zeros::<bf16>(T * V).during("allocating bench outputs")?;
        let labels_host: Vec<i32> = random_host(T, self.next_seed(), |rng| if rng.below(10) == 0 { IGNORE_LABEL } else { rng.below(V as u64) as i32 });
        let labels = upload(gpu, &labels_host)?;
        let mut losses = gpu.stream.alloc_zeros::<f32>(T).during("allocating bench outputs")?;
        let mut correct = gpu.stream.alloc_zeros::<u8>(T).during("allocating bench outputs")?;
        let grad_scale = upload(gpu, &[1.0 / T as f32])?;
        let shape = format!("[{T},{V}]");
        let bytes = 2 * T * V * 2 + T * (4 + 4 + 1);
        for kernel in CeKernel::all_for_vocab(gpu, V) {
            let ms = time_ms(gpu, WARMUP, ITERS, |_| {
                cross_entropy_with(gpu, kernel, &mut dlogits.as_view_mut(), &mut losses.as_view_mut(), &mut correct.as_view_mut(), &logits.as_view(), &labels.as_view(), T, V, &grad_scale.as_view())
            })?;
            let chosen = if kernel == CeKernel::for_vocab(gpu, V) { "used by cross_entropy; 10% ignored rows (not read)" } else { "alternative" };
            self.push(&format!("cross_entropy ({kernel:?})"), &shape, ms, Work::Bytes(bytes as f64), chosen);
        }

        // Metrics: SAMPLES samples back to back over 90% of the batch, the rest padding.
        let mut cuts: Vec<i32> = (0..=SAMPLES).map(|s| (s * (T - T / 10) / SAMPLES) as i32).collect();
        cuts.dedup();
        let cu = upload(gpu, &cuts)?;
        let mut sums = gpu.stream.alloc_zeros::<f64>(METRICS_LEN).during("allocating bench outputs")?;
        let ms = time_ms(gpu, WARMUP, ITERS, |_| metrics(gpu, &mut sums.as_view_mut(), &losses.as_view(), &correct.as_view(), &labels.as_view(), &cu.as_view(), T))?;
        self.push("ce_metrics", format!("T={T} S={SAMPLES}"), ms, Work::Latency, "one block; inputs fit in L2");
        Ok(())
    }

    /// Times every algorithm the heuristic offers for `shape` on fresh random operands, then
    /// the tuner's choice again (the one `GemmCache` keeps using).
    fn gemm_candidates(&mut self, gemm: &GemmCache, shape: GemmShape) -> Result<GemmTiming, GpuError> {
        let gpu = self.gpu;
        let GemmShape { op, t, n, k } = shape;
        // Random inputs, zeroed outputs (written with beta = 0, or accumulated into for dw).
        match op {
            GemmOp::Forward | GemmOp::ForwardResidual => {
                let (x, w) = (random_bf16(gpu, t * k, 1.0, self.next_seed())?, random_bf16(gpu, n * k, 1.0, self.next_seed())?);
                let res = if op == GemmOp::ForwardResidual { Some(random_bf16(gpu, t * n, 1.0, self.next_seed())?) } else { None };
                let mut y = gpu.stream.alloc_zeros::<bf16>(t * n).during("allocating bench outputs")?;
                time_candidates(gpu, gemm, shape, &mut |_| linear_fwd(gpu, gemm, &mut y.as_view_mut(), &x.as_view(), &w.as_view(), res.as_ref().map(|r| r.as_view()).as_ref(), t, n, k))
            }
            GemmOp::BackwardInput => {
                let (dy, w) = (random_bf16(gpu, t * n, 1.0, self.next_seed())?, random_bf16(gpu, n * k, 1.0, self.next_seed())?);
                let mut dx = gpu.stream.alloc_zeros::<bf16>(t * k).during("allocating bench outputs")?;
                time_candidates(gpu, gemm, shape, &mut |_| linear_bwd_input(gpu, gemm, &mut dx.as_view_mut(), &dy.as_view(), &w.as_view(), t, n, k))
            }
            GemmOp::BackwardWeight => {
                let (dy, x) = (random_bf16(gpu, t * n, 1.0, self.next_seed())?, random_bf16(gpu, t * k, 1.0, self.next_seed())?);
                let mut dw = gpu.stream.alloc_zeros::<f32>(n * k).during("allocating bench outputs")?;
                time_candidates(gpu, gemm, shape, &mut |_| linear_bwd_weight(gpu, gemm, &mut dw.as_view_mut(), &dy.as_view(), &x.as_view(), t, n, k, true))
            }
        }
    }

    fn gemms(&mut self, gemm: &GemmCache) -> Result<(), GpuError> {
        // The linear layers of an XL block and the LM head: (name, N, K). The two
        // projections that end a sub-layer run with the residual as C (beta = 1, C != D).
        let layers = [("gqkv_proj", 4 * C, D, false), ("o_proj", D, C, true), ("gate_up_proj", 2 * I, D, false), ("down_proj", D, I, true), ("lm_head", V, D, false)];
        for (name, n, k, residual) in layers {
            let forwards: &[GemmOp] = if residual { &[GemmOp::Forward, GemmOp::ForwardResidual] } else { &[GemmOp::Forward] };
            for &op in forwards.iter().chain(&[GemmOp::BackwardInput, GemmOp::BackwardWeight]) {
                let shape = GemmShape { op, t: T, n, k };
                let timing = self.gemm_candidates(gemm, shape)?;
                let label = match op {
                    GemmOp::Forward => "y = x w^T",
                    GemmOp::ForwardResidual => "y = res + x w^T",
                    GemmOp::BackwardInput => "dx = dy w",
                    GemmOp::BackwardWeight => "dw += dy^T x (fp32)",
                };
                self.push(&format!("{name} {label}"), format!("T={T} N={n} K={k}"), timing.chosen_ms, Work::Flops(shape.flops()), &timing.note());
                if op == GemmOp::Forward && sm90_gemm_supports(self.gpu, n, k) {
                    // Ours (docs/design/gemm-epilogues.md), same shape, next to cuBLASLt's.
                    let ms = self.gemm_sm90(n, k)?;
                    self.push(&format!("{name} {label} (ours, sm90)"), format!("T={T} N={n} K={k}"), ms, Work::Flops(shape.flops()), "gemm_sm90");
                }
                if op == GemmOp::Forward && name == "gqkv_proj" && sm90_rope_supports(self.gpu, NH, k) {
                    let ms = self.gemm_rope_sm90(k)?;
                    let note = "gemm_rope_sm90: replaces this product and qkv_rope_fwd";
                    self.push(&format!("{name} y = x w^T, rope(q, k) (ours, sm90)"), format!("T={T} N={n} K={k}"), ms, Work::Flops(shape.flops()), note);
                }
                if op == GemmOp::Forward && name == "gate_up_proj" && sm90_swiglu_supports(self.gpu, n / 2, k) {
                    let ms = self.gemm_swiglu_sm90(n / 2, k)?;
                    let note = "gemm_swiglu_sm90: replaces this product and swiglu_fwd";
                    self.push(&format!("{name} y = x w^T, act = swiglu(y) (ours, sm90)"), format!("T={T} N={n} K={k}"), ms, Work::Flops(shape.flops()), note);
                }
            }
        }
        Ok(())
    }

    /// Our Hopper forward product on fresh random operands of [T, K] x [N, K]^T.
    fn gemm_sm90(&mut self, n: usize, k: usize) -> Result<f64, GpuError> {
        let gpu = self.gpu;
        let (x, w) = (random_bf16(gpu, T * k, 1.0, self.next_seed())?, random_bf16(gpu, n * k, 1.0, self.next_seed())?);
        let mut y = gpu.stream.alloc_zeros::<bf16>(T * n).during("allocating bench outputs")?;
        time_ms(gpu, WARMUP, ITERS, |_| linear_fwd_sm90(gpu, &mut y.as_view_mut(), &x.as_view(), &w.as_view(), T, n, k))
    }

    /// Our Hopper qkv product with the RoPE epilogue: gqkv [T, 4C], positions of 4 samples.
    fn gemm_rope_sm90(&mut self, k: usize) -> Result<f64, GpuError> {
        let gpu = self.gpu;
        let n = 4 * C;
        let (x, w) = (random_bf16(gpu, T * k, 1.0, self.next_seed())?, random_bf16(gpu, n * k, 1.0, self.next_seed())?);
        let pos: Vec<i32> = (0..T).map(|r| (r % (T / 4)) as i32).collect();
        let pos = upload(gpu, &pos)?;
        let mut y = gpu.stream.alloc_zeros::<bf16>(T * n).during("allocating bench outputs")?;
        time_ms(gpu, WARMUP, ITERS, |_| linear_rope_fwd_sm90(gpu, &mut y.as_view_mut(), &x.as_view(), &w.as_view(), &pos.as_view(), T, NH, k))
    }

    /// Our Hopper gate_up product with the SwiGLU epilogue: gu [T, 2I] and act [T, I].
    fn gemm_swiglu_sm90(&mut self, i: usize, k: usize) -> Result<f64, GpuError> {
        let gpu = self.gpu;
        let (x, w) = (random_bf16(gpu, T * k, 1.0, self.next_seed())?, random_bf16(gpu, 2 * i * k, 1.0, self.next_seed())?);
        let mut gu = gpu.stream.alloc_zeros::<bf16>(T * 2 * i).during("allocating bench outputs")?;
        let mut act = gpu.stream.alloc_zeros::<bf16>(T * i).during("allocating bench outputs")?;
        time_ms(gpu, WARMUP, ITERS, |_| linear_swiglu_fwd_sm90(gpu, Some(&mut gu.as_view_mut()), &mut act.as_view_mut(), &x.as_view(), &w.as_view(), T, i, k))
    }

    /// What tuning costs at set-up: a fresh cache prepares every product of an XL block and
    /// of the LM head at its default chunk (host wall time, tuning included).
    fn gemm_tuning(&mut self) -> Result<(), GpuError> {
        let gemm = GemmCache::new(self.gpu)?;
        let layers = [(T, 4 * C, D, false), (T, D, C, true), (T, 2 * I, D, false), (T, D, I, true), (LM_CHUNKS[0], V, D, false)];
        let shapes: Vec<GemmShape> = layers.iter().flat_map(|&(t, n, k, residual)| GemmShape::linear_layer(t, n, k, residual)).collect();
        let start = Instant::now();
        gemm.prepare(&shapes)?;
        self.gpu.sync()?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        self.push("GemmCache::prepare (autotune)", format!("{} XL shapes", shapes.len()), ms, Work::Latency, "once at set-up; host wall time");
        Ok(())
    }

    fn lm_head(&mut self, gemm: &GemmCache) -> Result<(), GpuError> {
        let gpu = self.gpu;
        let z = random_bf16(gpu, T * D, 1.0, self.next_seed())?;
        let w = random_bf16(gpu, V * D, 0.05, self.next_seed())?;
        let labels_host: Vec<i32> = random_host(T, self.next_seed(), |rng| if rng.below(10) == 0 { IGNORE_LABEL } else { rng.below(V as u64) as i32 });
        let labels = upload(gpu, &labels_host)?;
        let mut dz = gpu.stream.alloc_zeros::<bf16>(T * D).during("allocating bench outputs")?;
        let mut dw = gpu.stream.alloc_zeros::<f32>(V * D).during("allocating bench outputs")?;
        let mut losses = gpu.stream.alloc_zeros::<f32>(T).during("allocating bench outputs")?;
        let mut correct = gpu.stream.alloc_zeros::<u8>(T).during("allocating bench outputs")?;
        let grad_scale = upload(gpu, &[1.0 / T as f32])?;
        for chunk in LM_CHUNKS {
            let mut scratch = gpu.stream.alloc_zeros::<bf16>(chunk * V).during("allocating the logits scratch")?;
            // The warm-up runs also build and tune the chunk's three GEMM plans.
            let ms = time_ms(gpu, 2, 5, |_| {
                lm_head_cross_entropy(
                    gpu,
                    gemm,
                    &mut dz.as_view_mut(),
                    &mut dw.as_view_mut(),
                    &mut losses.as_view_mut(),
                    &mut correct.as_view_mut(),
                    &z.as_view(),
                    &w.as_view(),
                    &labels.as_view(),
                    T,
                    V,
                    D,
                    &grad_scale.as_view(),
                    &mut scratch.as_view_mut(),
                    true,
                )
            })?;
            let flops = 3.0 * 2.0 * (T * V * D) as f64;
            let note = if chunk == LM_CHUNKS[0] { "3 GEMMs + CE per chunk; rate counts GEMM flops" } else { "other chunk size" };
            self.push("lm_head_cross_entropy (fused)", format!("T={T} V={V} D={D} chunk={chunk}"), ms, Work::Flops(flops), note);
        }
        Ok(())
    }
}

/// Median host wall time of `runs` calls of `f`, in milliseconds.
fn median_host_ms<R>(runs: usize, mut f: impl FnMut() -> R) -> f64 {
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(f());
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}
