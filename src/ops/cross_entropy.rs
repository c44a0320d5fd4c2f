//! Cross-entropy of the LM head over the vocabulary, and the step metrics (SPEC §5).
//!
//! Per token row of `logits [T,V]` with label `y` (`-100` = ignored):
//!
//! ```text
//! lse        = log(sum_j exp(logit_j))                       (fp32, max-subtracted)
//! loss       = lse - logit_y
//! correct    = (argmax_j logit_j == y)                        (the first maximum wins)
//! dlogits_j  = (softmax_j - [j == y]) * grad_scale            (d(grad_scale * loss) / dlogit_j)
//! ```
//!
//! Ignored rows get `loss = 0`, `correct = 0`, `dlogits = 0`. `grad_scale` is
//! `1 / (mean over ranks of the valid-label count)`, so summing `grad_scale * loss` over
//! ranks gives the gradient of SPEC §5's loss. The GPU launchers read it from device memory
//! (`[1]` fp32): it changes with every batch, and a training step captured in a CUDA graph
//! replays its launches with the arguments they were captured with.
//!
//! On the GPU (`cuda/cross_entropy.cu`) the logits and their gradient are bf16 (the gradient
//! may be written over the logits), the softmax fp32, and the metrics are summed on the
//! device into a `[5]` fp64 accumulator (see [`METRICS_LEN`]) that the host reads only when
//! it logs.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use cudarc::driver::sys::CUfunction_attribute as FuncAttr;
use half::bf16;
use rayon::prelude::*;

use crate::gpu::{DriverContext, Gpu, GpuError};
use crate::ops::check::{bf16_inputs, download, download_bf16, max_abs, poisoned_bf16, poisoned_f32, round_bf16, upload, upload_bf16};
use crate::ops::gemm::{linear_bwd_input, linear_bwd_input_cpu, linear_bwd_weight, linear_bwd_weight_cpu, linear_fwd, linear_fwd_cpu, GemmCache};
use crate::ops::compare::{compare, Tolerance, BF16_EPS};
use crate::ops::shape::{as_i32, expect_aligned16, expect_len};
use crate::rng::Rng;
use crate::selftest::{Check, Row};

const FAMILY: &str = "cross_entropy";
/// `CE_THREADS` in `cuda/cross_entropy.cu`: one block of this many threads per row.
const CE_THREADS: u32 = 1024;

/// The label value of a position that carries no loss.
pub const IGNORE_LABEL: i32 = -100;

/// The sums behind one step's `loss`, `accuracy` and `exact_accuracy` (SPEC §5); each
/// metric is a ratio of two of them, so sums over micro-batches and ranks stay exact.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepMetrics {
    /// Sum of the per-token losses over valid labels.
    pub loss_sum: f64,
    /// Labels that are not `-100`.
    pub valid_tokens: u64,
    /// Valid labels predicted by the argmax.
    pub correct_tokens: u64,
    /// Samples with at least one valid label, all of them predicted correctly.
    pub exact_samples: u64,
    /// Samples with at least one valid label.
    pub samples_with_labels: u64,
}

/// Softmax cross-entropy of `logits [T,V]` against `labels [T]`: writes `dlogits [T,V]`,
/// `losses [T]` and `correct [T]` (see the module doc), all with `=`.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_cpu(
    dlogits: &mut [f32],
    losses: &mut [f32],
    correct: &mut [u8],
    logits: &[f32],
    labels: &[i32],
    t: usize,
    v: usize,
    grad_scale: f32,
) {
    const OP: &str = "cross_entropy_cpu";
    expect_len(OP, "dlogits", dlogits.len(), &[("T", t), ("V", v)]);
    expect_len(OP, "losses", losses.len(), &[("T", t)]);
    expect_len(OP, "correct", correct.len(), &[("T", t)]);
    expect_len(OP, "logits", logits.len(), &[("T", t), ("V", v)]);
    expect_len(OP, "labels", labels.len(), &[("T", t)]);
    if let Some((row, y)) = labels.iter().enumerate().find(|(_, &y)| y != IGNORE_LABEL && (y < 0 || y as usize >= v)) {
        panic!("{OP}: labels[{row}] = {y} is neither {IGNORE_LABEL} nor in the vocabulary 0..{v}");
    }
    if v == 0 {
        return;
    }
    let rows = dlogits.par_chunks_mut(v).zip(losses.par_iter_mut()).zip(correct.par_iter_mut());
    rows.zip(logits.par_chunks(v).zip(labels.par_iter())).for_each(|(((dl, loss), ok), (x, &y))| {
        if y == IGNORE_LABEL {
            dl.fill(0.0);
            *loss = 0.0;
            *ok = 0;
            return;
        }
        // First maximum: a later element must be strictly larger to take over.
        let (argmax, max) = x.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bm), (j, &xj)| if xj > bm { (j, xj) } else { (bi, bm) });
        let sum: f64 = x.iter().map(|&xj| ((xj - max) as f64).exp()).sum();
        let lse = max + (sum.ln() as f32);
        let y = y as usize;
        *loss = lse - x[y];
        *ok = u8::from(argmax == y);
        let inv_sum = 1.0 / sum;
        for (j, (d, &xj)) in dl.iter_mut().zip(x).enumerate() {
            let p = (((xj - max) as f64).exp() * inv_sum) as f32;
            *d = (p - if j == y { 1.0 } else { 0.0 }) * grad_scale;
        }
    });
}

/// The sums of [`StepMetrics`] from the outputs of [`cross_entropy_cpu`]: `losses [T]`,
/// `correct [T]`, `labels [T]`, and the sample starts `cu_seqlens [S+1]` (tokens from
/// `cu_seqlens[S]` on are padding).
pub fn metrics_cpu(losses: &[f32], correct: &[u8], labels: &[i32], cu_seqlens: &[i32], t: usize) -> StepMetrics {
    const OP: &str = "metrics_cpu";
    expect_len(OP, "losses", losses.len(), &[("T", t)]);
    expect_len(OP, "correct", correct.len(), &[("T", t)]);
    expect_len(OP, "labels", labels.len(), &[("T", t)]);
    assert!(!cu_seqlens.is_empty(), "{OP}: `cu_seqlens` must hold at least [0]");
    let mut m = StepMetrics::default();
    for i in 0..t {
        if labels[i] != IGNORE_LABEL {
            m.loss_sum += losses[i] as f64;
            m.valid_tokens += 1;
            m.correct_tokens += u64::from(correct[i]);
        }
    }
    for (s, w) in cu_seqlens.windows(2).enumerate() {
        let (start, end) = (w[0] as usize, w[1] as usize);
        assert!(start <= end && end <= t, "{OP}: sample {s} spans {start}..{end}, outside 0..{t} or reversed");
        let valid = (start..end).filter(|&i| labels[i] != IGNORE_LABEL);
        let (n_valid, n_correct) = valid.fold((0u64, 0u64), |(n, c), i| (n + 1, c + u64::from(correct[i])));
        if n_valid > 0 {
            m.samples_with_labels += 1;
            m.exact_samples += u64::from(n_correct == n_valid);
        }
    }
    m
}

/// Length of the device metrics accumulator: `[loss_sum, valid_tokens, correct_tokens,
/// exact_samples, samples_with_labels]`, fp64 (counts are exact below 2^53).
pub const METRICS_LEN: usize = 5;

/// The sums of two batches: a step's micro-batches add up this way.
impl std::ops::AddAssign for StepMetrics {
    fn add_assign(&mut self, other: StepMetrics) {
        self.loss_sum += other.loss_sum;
        self.valid_tokens += other.valid_tokens;
        self.correct_tokens += other.correct_tokens;
        self.exact_samples += other.exact_samples;
        self.samples_with_labels += other.samples_with_labels;
    }
}

impl StepMetrics {
    /// The sums held by a device accumulator written by [`metrics`].
    pub fn from_device(sums: &[f64; METRICS_LEN]) -> StepMetrics {
        StepMetrics {
            loss_sum: sums[0],
            valid_tokens: sums[1] as u64,
            correct_tokens: sums[2] as u64,
            exact_samples: sums[3] as u64,
            samples_with_labels: sums[4] as u64,
        }
    }
}

/// Which cross-entropy kernel runs a row (see `cuda/cross_entropy.cu`); [`cross_entropy`]
/// picks the first of these that fits V.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CeKernel {
    /// V <= 65,536: a persistent grid; the row being reduced sits in shared memory while
    /// the block's next row is loaded into registers. Logits read once, gradient written
    /// once, and the reads overlap the reductions and the writes.
    Pipelined,
    /// The row staged in shared memory: logits read once, gradient written once, but a
    /// block's reads and writes take turns.
    Smem,
    /// Any V: the row read twice (the second time mostly from L2).
    Stream,
}

/// `CE_VPT` in `cuda/cross_entropy.cu`: 16-byte vectors of a row per thread of the
/// pipelined kernel, so V <= 8 * CE_VPT * CE_THREADS.
const CE_VPT: usize = 8;

impl CeKernel {
    pub fn for_vocab(gpu: &Gpu, v: usize) -> CeKernel {
        let fits_smem = smem_bytes(v) <= gpu.props.smem_per_block_optin;
        if fits_smem && v <= 8 * CE_VPT * CE_THREADS as usize {
            CeKernel::Pipelined
        } else if fits_smem {
            CeKernel::Smem
        } else {
            CeKernel::Stream
        }
    }

    /// Every kernel that can run rows of `v` logits, the one [`CeKernel::for_vocab`] picks
    /// first; for tests and benchmarks.
    pub fn all_for_vocab(gpu: &Gpu, v: usize) -> Vec<CeKernel> {
        let first = CeKernel::for_vocab(gpu, v);
        std::iter::once(first).chain([CeKernel::Pipelined, CeKernel::Smem, CeKernel::Stream].into_iter().filter(|&k| k != first && k.fits(gpu, v))).collect()
    }

    fn fits(self, gpu: &Gpu, v: usize) -> bool {
        let fits_smem = smem_bytes(v) <= gpu.props.smem_per_block_optin;
        match self {
            CeKernel::Pipelined => fits_smem && v <= 8 * CE_VPT * CE_THREADS as usize,
            CeKernel::Smem => fits_smem,
            CeKernel::Stream => true,
        }
    }
}

/// Shared memory of the pipelined and smem kernels for a row of `v` logits: the row, plus
/// 1 KiB for the static arrays of their block reductions.
fn smem_bytes(v: usize) -> usize {
    2 * v + 1024
}

/// GPU [`cross_entropy_cpu`] with separate buffers. dlogits: [T,V] bf16, losses: [T] fp32,
/// correct: [T] u8, logits: [T,V] bf16, labels: [T] i32, grad_scale: [1] fp32.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy(
    gpu: &Gpu,
    dlogits: &mut CudaViewMut<bf16>,
    losses: &mut CudaViewMut<f32>,
    correct: &mut CudaViewMut<u8>,
    logits: &CudaView<bf16>,
    labels: &CudaView<i32>,
    t: usize,
    v: usize,
    grad_scale: &CudaView<f32>,
) -> Result<(), GpuError> {
    cross_entropy_with(gpu, CeKernel::for_vocab(gpu, v), dlogits, losses, correct, logits, labels, t, v, grad_scale)
}

/// [`cross_entropy`] with the kernel chosen by the caller (benchmarks, tests).
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_with(
    gpu: &Gpu,
    kernel: CeKernel,
    dlogits: &mut CudaViewMut<bf16>,
    losses: &mut CudaViewMut<f32>,
    correct: &mut CudaViewMut<u8>,
    logits: &CudaView<bf16>,
    labels: &CudaView<i32>,
    t: usize,
    v: usize,
    grad_scale: &CudaView<f32>,
) -> Result<(), GpuError> {
    expect_len("cross_entropy", "logits", logits.len(), &[("T", t), ("V", v)]);
    expect_aligned16("cross_entropy", "logits", gpu, logits);
    launch_ce(gpu, kernel, dlogits, losses, correct, Some(logits), labels, t, v, grad_scale)
}

/// [`cross_entropy`] with the gradient written over the logits: logits_grad: [T,V] bf16
/// (logits in, dlogits out), losses: [T] fp32, correct: [T] u8, labels: [T] i32,
/// grad_scale: [1] fp32.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_in_place(
    gpu: &Gpu,
    kernel: CeKernel,
    logits_grad: &mut CudaViewMut<bf16>,
    losses: &mut CudaViewMut<f32>,
    correct: &mut CudaViewMut<u8>,
    labels: &CudaView<i32>,
    t: usize,
    v: usize,
    grad_scale: &CudaView<f32>,
) -> Result<(), GpuError> {
    launch_ce(gpu, kernel, logits_grad, losses, correct, None, labels, t, v, grad_scale)
}

/// `logits: None` means "read the logits from `dlogits`" (in place).
#[allow(clippy::too_many_arguments)]
fn launch_ce(
    gpu: &Gpu,
    kernel: CeKernel,
    dlogits: &mut CudaViewMut<bf16>,
    losses: &mut CudaViewMut<f32>,
    correct: &mut CudaViewMut<u8>,
    logits: Option<&CudaView<bf16>>,
    labels: &CudaView<i32>,
    t: usize,
    v: usize,
    grad_scale: &CudaView<f32>,
) -> Result<(), GpuError> {
    const OP: &str = "cross_entropy";
    expect_len(OP, "dlogits", dlogits.len(), &[("T", t), ("V", v)]);
    expect_len(OP, "losses", losses.len(), &[("T", t)]);
    expect_len(OP, "correct", correct.len(), &[("T", t)]);
    expect_len(OP, "labels", labels.len(), &[("T", t)]);
    expect_len(OP, "grad_scale", grad_scale.len(), &[("1", 1)]);
    assert!(v > 0 && v % 8 == 0, "{OP}: V = {v} must be a positive multiple of 8");
    expect_aligned16(OP, "dlogits", gpu, dlogits);
    if t == 0 {
        return Ok(());
    }
    let (t_i, v_i) = (as_i32(OP, "T", t), as_i32(OP, "V", v));
    let (name, smem) = match kernel {
        CeKernel::Pipelined => ("cross_entropy_pipelined", 2 * v),
        CeKernel::Smem => ("cross_entropy_smem", 2 * v),
        CeKernel::Stream => ("cross_entropy_stream", 0),
    };
    assert!(kernel.fits(gpu, v), "{OP}: V = {v} is too large for the {kernel:?} kernel on this device ({} bytes of shared memory a block)", gpu.props.smem_per_block_optin);
    let func = gpu.function(FAMILY, name)?;
    if smem > 48 * 1024 {
        func.set_attribute(FuncAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32).during(format!("raising the shared-memory limit of {name}"))?;
    }
    let cfg = match kernel {
        // Just enough threads for CE_VPT vectors each, and a persistent grid of as many
        // blocks as fit on the device at once (one per SM at V = 65,536).
        CeKernel::Pipelined => {
            let threads = (v / 8).div_ceil(CE_VPT).next_multiple_of(32).clamp(32, CE_THREADS as usize) as u32;
            let per_sm = func.occupancy_max_active_blocks_per_multiprocessor(threads, smem, None).during(format!("querying the occupancy of {name}"))?.max(1) as usize;
            let blocks = t.min(per_sm * gpu.props.sm_count) as u32;
            LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem as u32 }
        }
        CeKernel::Smem | CeKernel::Stream => LaunchConfig { grid_dim: (t as u32, 1, 1), block_dim: (CE_THREADS, 1, 1), shared_mem_bytes: smem as u32 },
    };
    // The kernel takes the logits pointer separately; in place it is dlogits' own address.
    let logits_ptr = logits.map(|l| cudarc::driver::DevicePtr::device_ptr(l, &gpu.stream));
    let dlogits_ptr = cudarc::driver::DevicePtr::device_ptr(&*dlogits, &gpu.stream).0;
    let logits_raw: u64 = logits_ptr.as_ref().map_or(dlogits_ptr, |(p, _)| *p);
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(dlogits).arg(losses).arg(correct).arg(&logits_raw).arg(labels).arg(&t_i).arg(&v_i).arg(grad_scale);
    // SAFETY: dlogits and logits hold T*V bf16 (checked above and by the callers), 16-byte
    // aligned; losses, correct, labels hold T, grad_scale one value; each row belongs to one
    // block, which reads
    // all of it (into registers or shared memory, or in the thread that later overwrites
    // the element) before writing any of it, so the in-place case is safe. Dynamic shared
    // memory is 2V bytes for the pipelined and smem kernels, within the limit raised above;
    // the pipelined kernel's block holds V/8 <= CE_VPT * threads vectors.
    unsafe { args.launch(cfg) }.during(name)?;
    Ok(())
}

/// The LM head with its loss, chunked over tokens so that only a `[chunk, V]` block of
/// logits exists at a time (the scratch `logits` holds `chunk * V` bf16; `chunk` is its
/// length over V). For each chunk of rows `c`:
///
/// ```text
/// logits      = z[c] @ w^T                       (GEMM, bf16 out)
/// logits     <- dlogits, losses[c], correct[c]   (cross-entropy, in place)
/// dz[c]       = dlogits @ w                      (GEMM, bf16, written with =)
/// dw         += dlogits^T @ z[c]                 (GEMM, fp32, accumulated; the first
///                                                 chunk writes it unless `accumulate`)
/// ```
///
/// dz: [T,D] bf16, dw: [V,D] fp32 (+= with `accumulate`, else =), losses: [T] fp32, correct: [T] u8, z: [T,D] bf16,
/// w: [V,D] bf16, labels: [T] i32, grad_scale: [1] fp32, logits: [chunk, V] bf16 scratch.
/// With T = 16k, V = 64k
/// and chunk = 4096 the scratch is 512 MiB instead of 2 GiB for the whole batch.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_cross_entropy(
    gpu: &Gpu,
    gemm: &GemmCache,
    dz: &mut CudaViewMut<bf16>,
    dw: &mut CudaViewMut<f32>,
    losses: &mut CudaViewMut<f32>,
    correct: &mut CudaViewMut<u8>,
    z: &CudaView<bf16>,
    w: &CudaView<bf16>,
    labels: &CudaView<i32>,
    t: usize,
    v: usize,
    d: usize,
    grad_scale: &CudaView<f32>,
    logits: &mut CudaViewMut<bf16>,
    accumulate: bool,
) -> Result<(), GpuError> {
    const OP: &str = "lm_head_cross_entropy";
    expect_len(OP, "dz", dz.len(), &[("T", t), ("D", d)]);
    expect_len(OP, "z", z.len(), &[("T", t), ("D", d)]);
    expect_len(OP, "losses", losses.len(), &[("T", t)]);
    expect_len(OP, "correct", correct.len(), &[("T", t)]);
    expect_len(OP, "labels", labels.len(), &[("T", t)]);
    assert!(v > 0 && d % 8 == 0, "{OP}: V = {v} must be positive and D = {d} a multiple of 8");
    let chunk = logits.len() / v;
    assert!(chunk > 0, "{OP}: the logits scratch holds {} elements, less than one row of V = {v}", logits.len());
    let kernel = CeKernel::for_vocab(gpu, v);
    for start in (0..t).step_by(chunk) {
        let rows = chunk.min(t - start);
        let (r, rd) = (start..start + rows, start * d..(start + rows) * d);
        let mut block = logits.slice_mut(..rows * v);
        linear_fwd(gpu, gemm, &mut block, &z.slice(rd.clone()), w, None, rows, v, d)?;
        cross_entropy_in_place(gpu, kernel, &mut block, &mut losses.slice_mut(r.clone()), &mut correct.slice_mut(r.clone()), &labels.slice(r), rows, v, grad_scale)?;
        let dlogits = block.as_view();
        linear_bwd_input(gpu, gemm, &mut dz.slice_mut(rd.clone()), &dlogits, w, rows, v, d)?;
        linear_bwd_weight(gpu, gemm, dw, &dlogits, &z.slice(rd), rows, v, d, accumulate || start > 0)?;
    }
    Ok(())
}

/// Adds this batch's [`StepMetrics`] sums into `sums` ([`METRICS_LEN`] fp64, +=) on the
/// device. losses: [T] fp32, correct: [T] u8, labels: [T] i32, cu_seqlens: [S+1] i32.
pub fn metrics(
    gpu: &Gpu,
    sums: &mut CudaViewMut<f64>,
    losses: &CudaView<f32>,
    correct: &CudaView<u8>,
    labels: &CudaView<i32>,
    cu_seqlens: &CudaView<i32>,
    t: usize,
) -> Result<(), GpuError> {
    const OP: &str = "ce_metrics";
    expect_len(OP, "sums", sums.len(), &[("METRICS_LEN", METRICS_LEN)]);
    expect_len(OP, "losses", losses.len(), &[("T", t)]);
    expect_len(OP, "correct", correct.len(), &[("T", t)]);
    expect_len(OP, "labels", labels.len(), &[("T", t)]);
    assert!(!cu_seqlens.is_empty(), "{OP}: `cu_seqlens` must hold at least [0]");
    let (t_i, s_i) = (as_i32(OP, "T", t), as_i32(OP, "S", cu_seqlens.len() - 1));
    let func = gpu.function(FAMILY, OP)?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(sums).arg(losses).arg(correct).arg(labels).arg(cu_seqlens).arg(&t_i).arg(&s_i);
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (CE_THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: sums holds 5 f64, the token buffers T, cu_seqlens S+1 (checked above); the
    // kernel clamps sample bounds to 0..T.
    unsafe { args.launch(cfg) }.during(OP)?;
    Ok(())
}

pub fn selftests() -> Vec<Check> {
    vec![
        Check { name: "cross_entropy", run: check_cross_entropy },
        Check { name: "ce_metrics", run: check_metrics },
        Check { name: "lm_head_cross_entropy", run: check_lm_head },
    ]
}

/// Labels for a check: about one in five ignored, the rest uniform, with the first and last
/// vocabulary entries forced in.
fn draw_labels(rng: &mut Rng, t: usize, v: usize) -> Vec<i32> {
    let mut labels: Vec<i32> = (0..t).map(|_| if rng.below(5) == 0 { IGNORE_LABEL } else { rng.below(v as u64) as i32 }).collect();
    if t >= 2 {
        labels[0] = 0;
        labels[t - 1] = v as i32 - 1;
    }
    labels
}

fn check_cross_entropy(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    // (T, V, logit scale): a single 8-wide row, odd T, the XL vocabulary and half of it
    // with more rows than the pipelined kernel's persistent grid has blocks (so blocks
    // carry a prefetched row from one iteration to the next), a vocabulary too large for
    // shared memory (stream kernel only), large logits.
    let shapes = [(1, 8, 1.0), (37, 1000, 4.0), (300, 65536, 8.0), (700, 32768, 8.0), (9, 140_000, 8.0), (33, 4096, 100.0)];
    let mut rows = Vec::new();
    for (t, v, scale) in shapes {
        let mut logits = bf16_inputs(rng, t * v, scale);
        // Row 1 all equal: the loss is ln V and the first index is the argmax.
        if t > 1 {
            logits[v..2 * v].fill(0.5);
        }
        let labels = draw_labels(rng, t, v);
        let grad_scale = 1.0 / t as f32;
        let (mut dl_want, mut loss_want, mut ok_want) = (vec![0.0; t * v], vec![0.0; t], vec![0u8; t]);
        cross_entropy_cpu(&mut dl_want, &mut loss_want, &mut ok_want, &logits, &labels, t, v, grad_scale);
        let ok_want: Vec<f32> = ok_want.iter().map(|&c| c as f32).collect();

        // Loss: lse - x_y in fp32; exp2f of (x - m) * log2 e is off by |m| * 2^-24 in the
        // exponent and the sums by ~log2(V) * 2^-24: 1e-6 * (10 + max|x|) absolute.
        let loss_tol = Tolerance { abs: 1e-6 * (10.0 + max_abs(&logits)), rel: 1e-6 };
        // Gradient: one bf16 rounding (2^-9) of an fp32 value; where p - 1 cancels, the same
        // absolute error as the loss, times grad_scale.
        let grad_tol = Tolerance { abs: grad_scale * loss_tol.abs, rel: 2.0 * BF16_EPS };
        let exact = Tolerance { abs: 0.0, rel: 0.0 };
        let (dlabels, dscale) = (upload(gpu, &labels)?, upload(gpu, &[grad_scale])?);
        for kernel in CeKernel::all_for_vocab(gpu, v) {
            let shape = format!("[{t},{v}] x{scale} {kernel:?}");
            // In place, as the LM head runs it: the buffer holds the logits, then the gradient.
            let mut buf = upload_bf16(gpu, &logits)?;
            let (mut losses, mut correct) = (poisoned_f32(gpu, t)?, upload(gpu, &vec![7u8; t])?);
            cross_entropy_in_place(gpu, kernel, &mut buf.as_view_mut(), &mut losses.as_view_mut(), &mut correct.as_view_mut(), &dlabels.as_view(), t, v, &dscale.as_view())?;
            let ok: Vec<f32> = download(gpu, &correct)?.iter().map(|&c| c as f32).collect();
            rows.push(Row::new("cross_entropy loss", &shape, loss_tol, compare(&download(gpu, &losses)?, &loss_want, loss_tol)));
            rows.push(Row::new("cross_entropy correct", &shape, exact, compare(&ok, &ok_want, exact)));
            rows.push(Row::new("cross_entropy dlogits", &shape, grad_tol, compare(&download_bf16(gpu, &buf)?, &dl_want, grad_tol)));
        }
        // Separate buffers through the public entry point.
        let dlog = upload_bf16(gpu, &logits)?;
        let mut dl = poisoned_bf16(gpu, t * v)?;
        let (mut losses, mut correct) = (poisoned_f32(gpu, t)?, upload(gpu, &vec![7u8; t])?);
        cross_entropy(gpu, &mut dl.as_view_mut(), &mut losses.as_view_mut(), &mut correct.as_view_mut(), &dlog.as_view(), &dlabels.as_view(), t, v, &dscale.as_view())?;
        rows.push(Row::new("cross_entropy dl (separate)", format!("[{t},{v}] x{scale}"), grad_tol, compare(&download_bf16(gpu, &dl)?, &dl_want, grad_tol)));
    }
    Ok(rows)
}

fn check_metrics(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    // (T, number of samples): one token, odd sizes, an XL batch of many samples.
    for (t, s) in [(1, 1), (37, 5), (16_384, 900)] {
        // Sample boundaries: S distinct cut points, the last sample ending before T (padding).
        let mut cuts: Vec<i32> = (0..s - 1).map(|_| rng.below(t as u64) as i32).collect();
        cuts.push(0);
        cuts.push((t - t / 10) as i32);
        cuts.sort_unstable();
        let labels: Vec<i32> = (0..t).map(|i| if i as i32 >= cuts[s] || rng.below(3) == 0 { IGNORE_LABEL } else { 1 }).collect();
        // Mostly right, so that some samples are exact.
        let correct: Vec<u8> = (0..t).map(|_| u8::from(rng.below(50) != 0)).collect();
        let losses: Vec<f32> = rng.uniform_vec(t, 10.0).iter().map(|x| x.abs()).collect();
        let want = metrics_cpu(&losses, &correct, &labels, &cuts, t);

        let start = [0.25, 1.0, 2.0, 3.0, 4.0];
        let mut sums = upload(gpu, &start)?;
        let (dl, dc, dlab, dcu) = (upload(gpu, &losses)?, upload(gpu, &correct)?, upload(gpu, &labels)?, upload(gpu, &cuts)?);
        metrics(gpu, &mut sums.as_view_mut(), &dl.as_view(), &dc.as_view(), &dlab.as_view(), &dcu.as_view(), t)?;
        let got: Vec<f64> = download(gpu, &sums)?;
        let got: Vec<f32> = got.iter().zip(start).map(|(g, s)| (g - s) as f32).collect();
        let want_v = [want.loss_sum as f32, want.valid_tokens as f32, want.correct_tokens as f32, want.exact_samples as f32, want.samples_with_labels as f32];
        // fp64 sums of fp32 values in two orders: far below fp32 resolution. Counts exact.
        let tol = Tolerance { abs: 0.0, rel: 1e-6 };
        rows.push(Row::new("ce_metrics (+=)", format!("T={t} S={s}"), tol, compare(&got, &want_v, tol)));
    }
    Ok(rows)
}

/// The fused LM head against the CPU ops composed, with the GPU's bf16 storage points
/// (logits, dlogits) rounded the same way on the CPU. Inputs are multiples of 1/8 in
/// [-1/8, 1/8] and D <= 128, so every logit is a multiple of 1/64 below 2 in magnitude:
/// exact in bf16 and in fp32 on both sides, whatever the summation order. What is left to
/// differ is the cross-entropy's own rounding (checked by `cross_entropy`) and the two
/// GEMMs behind it; the check is about the chunking: every row, every chunk, dw accumulated.
fn check_lm_head(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let gemm = GemmCache::new(gpu)?;
    let mut rows = Vec::new();
    // (T, D, V, chunk): chunks of 16, 16, 5; then four full chunks and a remainder.
    for (t, d, v, chunk) in [(37, 64, 2056, 16), (300, 128, 8192, 64)] {
        let eighths = |rng: &mut Rng, n: usize| -> Vec<f32> { (0..n).map(|_| (rng.below(3) as f32 - 1.0) / 8.0).collect() };
        let (z, w) = (eighths(rng, t * d), eighths(rng, v * d));
        let labels = draw_labels(rng, t, v);
        let dw0 = rng.uniform_vec(v * d, 1.0);
        let grad_scale = 1.0 / t as f32;

        let mut logits = vec![0.0; t * v];
        linear_fwd_cpu(&mut logits, &z, &w, None, t, v, d);
        let (mut dl, mut loss_want, mut ok_want) = (vec![0.0; t * v], vec![0.0; t], vec![0u8; t]);
        cross_entropy_cpu(&mut dl, &mut loss_want, &mut ok_want, &logits, &labels, t, v, grad_scale);
        let dl = round_bf16(&dl);
        let mut dz_want = vec![0.0; t * d];
        linear_bwd_input_cpu(&mut dz_want, &dl, &w, t, v, d);
        let mut dw_want = dw0.clone();
        linear_bwd_weight_cpu(&mut dw_want, &dl, &z, t, v, d, true);

        let (dzin, dwin, dlab, dscale) = (upload_bf16(gpu, &z)?, upload_bf16(gpu, &w)?, upload(gpu, &labels)?, upload(gpu, &[grad_scale])?);
        let (mut dz, mut dw) = (poisoned_bf16(gpu, t * d)?, upload(gpu, &dw0)?);
        let (mut losses, mut correct) = (poisoned_f32(gpu, t)?, upload(gpu, &vec![7u8; t])?);
        let mut scratch = poisoned_bf16(gpu, chunk * v)?;
        let mut run = |dw: &mut CudaSlice<f32>, accumulate: bool| {
            lm_head_cross_entropy(
                gpu,
                &gemm,
                &mut dz.as_view_mut(),
                &mut dw.as_view_mut(),
                &mut losses.as_view_mut(),
                &mut correct.as_view_mut(),
                &dzin.as_view(),
                &dwin.as_view(),
                &dlab.as_view(),
                t,
                v,
                d,
                &dscale.as_view(),
                &mut scratch.as_view_mut(),
                accumulate,
            )
        };
        run(&mut dw, true)?;
        // A step's first contribution: the first chunk writes dw (NaN before proves it).
        let mut dw_written = poisoned_f32(gpu, v * d)?;
        run(&mut dw_written, false)?;
        let shape = format!("[{t},{d}] V={v} chunk={chunk}");
        // Loss as in `cross_entropy` (logits below 2).
        let loss_tol = Tolerance { abs: 1.2e-5, rel: 1e-6 };
        let exact = Tolerance { abs: 0.0, rel: 0.0 };
        // A dlogit may round to the neighbouring bf16 on the GPU (its fp32 value differs by
        // a few ulps): one term of a dz or dw sum off by 2^-8 * max|dl| / 8, plus the
        // accumulation error of the GEMM tolerances.
        let flip = 2f32.powi(-8) * max_abs(&dl) / 8.0;
        let dz_tol = Tolerance { abs: flip + 2f32.powi(-20) * v as f32 * max_abs(&dl) / 8.0, rel: 2.0 * BF16_EPS };
        let dw_tol = Tolerance { abs: flip + 2f32.powi(-20) * t as f32 * max_abs(&dl) / 8.0, rel: 4.0 * f32::EPSILON };
        let ok: Vec<f32> = download(gpu, &correct)?.iter().map(|&c| c as f32).collect();
        let ok_want: Vec<f32> = ok_want.iter().map(|&c| c as f32).collect();
        rows.push(Row::new("lm_head_ce loss", &shape, loss_tol, compare(&download(gpu, &losses)?, &loss_want, loss_tol)));
        rows.push(Row::new("lm_head_ce correct", &shape, exact, compare(&ok, &ok_want, exact)));
        rows.push(Row::new("lm_head_ce dz", &shape, dz_tol, compare(&download_bf16(gpu, &dz)?, &dz_want, dz_tol)));
        rows.push(Row::new("lm_head_ce dw (+=)", &shape, dw_tol, compare(&download(gpu, &dw)?, &dw_want, dw_tol)));
        let mut dw_written_want = vec![f32::NAN; v * d];
        linear_bwd_weight_cpu(&mut dw_written_want, &dl, &z, t, v, d, false);
        rows.push(Row::new("lm_head_ce dw (=)", &shape, dw_tol, compare(&download(gpu, &dw_written)?, &dw_written_want, dw_tol)));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::check_gradient;
    use crate::rng::Rng;

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(10);
        let (t, v) = (6, 37);
        let logits = rng.uniform_vec(t * v, 4.0);
        let labels = [3, IGNORE_LABEL, 0, 36, 17, IGNORE_LABEL];
        let grad_scale = 0.25;
        let loss = |x: &[f32]| {
            let (mut dl, mut losses, mut ok) = (vec![0.0; t * v], vec![0.0; t], vec![0; t]);
            cross_entropy_cpu(&mut dl, &mut losses, &mut ok, x, &labels, t, v, grad_scale);
            losses.iter().map(|&l| l as f64 * grad_scale as f64).sum()
        };
        let (mut dl, mut losses, mut ok) = (vec![f32::NAN; t * v], vec![f32::NAN; t], vec![9; t]);
        cross_entropy_cpu(&mut dl, &mut losses, &mut ok, &logits, &labels, t, v, grad_scale);
        check_gradient("cross_entropy dlogits", &logits, &dl, loss, &mut rng, 4);
        assert!(dl[v..2 * v].iter().all(|&g| g == 0.0) && losses[1] == 0.0 && ok[1] == 0, "ignored rows are zero");
    }

    #[test]
    fn loss_and_argmax_by_hand() {
        // Row 0: uniform logits, loss ln 3, ties resolved to the first index 0.
        // Row 1: label 2 is the strict maximum.
        let logits = [1.0, 1.0, 1.0, 0.0, 0.0, 5.0];
        let (mut dl, mut losses, mut ok) = (vec![0.0; 6], vec![0.0; 2], vec![0; 2]);
        cross_entropy_cpu(&mut dl, &mut losses, &mut ok, &logits, &[1, 2], 2, 3, 1.0);
        assert!((losses[0] - 3f32.ln()).abs() < 1e-6);
        assert_eq!(ok, [0, 1]);
        let mut ok_first = vec![0; 1];
        cross_entropy_cpu(&mut dl[..3], &mut losses[..1], &mut ok_first, &logits[..3], &[0], 1, 3, 1.0);
        assert_eq!(ok_first, [1], "first maximum wins");
    }

    #[test]
    fn metrics_count_samples() {
        // Three samples [0,3) [3,5) [5,6), then two padding tokens.
        let labels = [IGNORE_LABEL, 4, 5, IGNORE_LABEL, IGNORE_LABEL, 7, IGNORE_LABEL, IGNORE_LABEL];
        let correct = [0, 1, 1, 0, 0, 0, 0, 0];
        let losses = [0.0, 0.5, 0.25, 0.0, 0.0, 2.0, 0.0, 0.0];
        let m = metrics_cpu(&losses, &correct, &labels, &[0, 3, 5, 6], 8);
        assert_eq!(m, StepMetrics { loss_sum: 2.75, valid_tokens: 3, correct_tokens: 2, exact_samples: 1, samples_with_labels: 2 });
    }
}
