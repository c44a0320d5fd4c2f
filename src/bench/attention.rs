//! `hrm-cu bench attention`: the PrefixLM attention kernels on the three batches of issue 6.
//!
//! - (a) one sample of 16,384 tokens, fully causal (prefix length 1);
//! - (b) samples of 4,096 tokens with a 25% prefix;
//! - (c) lengths uniform in 64..4096, prefix fractions uniform in 10..90%;
//!
//! each packed into 16,384 rows with 12 heads (size XL), and
//!
//! - (d) a training batch as `bench train --size XL` draws them: 12,288 rows filled with the
//!   same mix, the last sample cut to fit. Its samples are longer on average than those of (c)
//!   (the draw that would overflow is cut, not dropped), so it has more pairs per row.
//!
//!  One row per kernel this GPU runs: the
//! portable forward and backward (sm_80) and, on Hopper only, the Hopper ones (sm_90a), which
//! `attention_fwd` and `attention_bwd` dispatch to there. The sigmoid gate is fused into every
//! one of them; its few FLOPs are not counted.
//! Only the FLOPs of visible (query, key)
//! pairs count: the forward does two matrix products per pair of 128-vectors, `4 * 128` FLOPs,
//! the backward `2.5x` that (five products: dV, dP, dQ, dK plus the recomputed S; FlashAttention's
//! convention, although the portable deterministic dQ kernel recomputes S and dP once more). Times are
//! CUDA-event medians after warm-up, the inputs (150 MB of q, k, v) exceed the L2 cache, and a
//! backward call includes RoPE's backward on dq and dk (with each sample's positions), which it
//! fuses. The row spans and tile orders are held across calls, as a training step holds them
//! (built once per batch for its hundreds of attention calls): a row times the kernels as the
//! model runs them, and a line per batch gives what building the tables once costs.
//!
//! [`dump`] writes a small batch with our kernels' outputs, and the three batches' sample tables,
//! for `tools/attention_torch_check.py`.

use std::path::Path;

use anyhow::{Context, Result};
use cudarc::driver::CudaSlice;
use half::bf16;

use crate::gpu::{Gpu, GpuError};
use crate::ops::attention::{block_of, sample_positions, AttentionScratch, BwdKernel, FwdKernel, Sm90Fwd};
use crate::data::batch::PackedBatch;
use crate::rng::Rng;

const HD: usize = crate::config::HEAD_DIM;
const ROWS: usize = 16_384;
/// The tokens of one XL training step (`bench train`'s default batch).
const TRAINING_ROWS: usize = 12_288;
const HEADS: usize = 12;
const WARMUP: usize = 3;
const ITERS: usize = 20;

/// One packed batch: the sample table and the rows it fills.
pub struct BenchBatch {
    pub name: &'static str,
    pub t: usize,
    pub cu_seqlens: Vec<i32>,
    pub prefix_lens: Vec<i32>,
}

impl BenchBatch {
    fn new(name: &'static str, t: usize, samples: &[(usize, usize)]) -> BenchBatch {
        let mut cu_seqlens = vec![0i32];
        for &(len, _) in samples {
            cu_seqlens.push(cu_seqlens.last().unwrap() + len as i32);
        }
        assert!(*cu_seqlens.last().unwrap() as usize <= t);
        BenchBatch { name, t, cu_seqlens, prefix_lens: samples.iter().map(|&(_, p)| p as i32).collect() }
    }

    /// Visible (query, key) pairs per head: a sample of length n with prefix p has p^2 pairs in
    /// its prefix rows and t + 1 in each response row t >= p.
    pub fn pairs(&self) -> u64 {
        let lens = self.cu_seqlens.windows(2).map(|w| (w[1] - w[0]) as u64);
        lens.zip(&self.prefix_lens).map(|(n, &p)| p as u64 * p as u64 + (n * (n + 1) - p as u64 * (p as u64 + 1)) / 2).sum()
    }
}

/// The three batches, (c) drawn from `rng` until the next sample would not fit, and
/// (d), a training batch of XL.
pub fn bench_batches(rng: &mut Rng) -> Result<Vec<BenchBatch>> {
    let mut mixed = Vec::new();
    let mut used = 0;
    loop {
        let len = 64 + rng.below(4096 - 64 + 1) as usize;
        if used + len > ROWS {
            break;
        }
        let fraction = 0.1 + 0.8 * rng.uniform();
        mixed.push((len, ((len as f64 * fraction).round() as usize).max(1)));
        used += len;
    }
    let training = PackedBatch::random(rng, TRAINING_ROWS, 2, 64..4097, (0.1, 0.9)).context("drawing the training batch")?;
    let training: Vec<(usize, usize)> =
        training.cu_seqlens.windows(2).zip(&training.prefix_lens).map(|(w, &p)| ((w[1] - w[0]) as usize, p as usize)).collect();
    Ok(vec![
        BenchBatch::new("(a) 1 x 16384 causal", ROWS, &[(ROWS, 1)]),
        BenchBatch::new("(b) 4 x 4096, 25% prefix", ROWS, &[(4096, 1024); 4]),
        BenchBatch::new("(c) 64..4096, 10..90% prefix", ROWS, &mixed),
        BenchBatch::new("(d) XL training batch", TRAINING_ROWS, &training),
    ])
}

/// Device buffers of one batch: inputs uniform in ±1 (never zeros), outputs, gradients. g, q,
/// k, v and their gradients are the blocks of `[T, 4, NH, HD]` buffers, as in training; y is
/// the gated output sigmoid(g) * o and dy its gradient.
struct Buffers {
    gqkv: CudaSlice<bf16>,
    y: CudaSlice<bf16>,
    dy: CudaSlice<bf16>,
    dgqkv: CudaSlice<bf16>,
    lse: CudaSlice<f32>,
    cu_seqlens: CudaSlice<i32>,
    prefix_lens: CudaSlice<i32>,
    /// RoPE's positions, whose backward the attention backward applies to dq and dk.
    positions: CudaSlice<i32>,
    scratch: AttentionScratch,
}

impl Buffers {
    fn new(gpu: &Gpu, rng: &mut Rng, b: &BenchBatch, positions: &[i32], nh: usize) -> Result<Buffers> {
        let n = b.t * nh * HD;
        let mut random = |n: usize| -> Result<CudaSlice<bf16>> {
            let host: Vec<bf16> = rng.uniform_vec(n, 1.0).into_iter().map(bf16::from_f32).collect();
            Ok(gpu.stream.clone_htod(&host)?)
        };
        Ok(Buffers {
            gqkv: random(4 * n)?,
            dy: random(n)?,
            y: gpu.stream.alloc_zeros(n)?,
            dgqkv: gpu.stream.alloc_zeros(4 * n)?,
            lse: gpu.stream.alloc_zeros(nh * b.t)?,
            cu_seqlens: gpu.stream.clone_htod(&b.cu_seqlens)?,
            prefix_lens: gpu.stream.clone_htod(&b.prefix_lens)?,
            positions: gpu.stream.clone_htod(positions)?,
            scratch: {
                let mut scratch = AttentionScratch::new(gpu, b.t, nh)?;
                scratch.hold_tables();
                scratch
            },
        })
    }

    /// Builds the row spans and tile orders afresh, as the first attention calls of a training
    /// step do (for the kernels the model runs).
    fn build_tables(&mut self, gpu: &Gpu, t: usize) -> Result<(), GpuError> {
        self.scratch.sample_table_changed();
        let (cu, pl) = (self.cu_seqlens.as_view(), self.prefix_lens.as_view());
        self.scratch.build_tables(gpu, &cu, &pl, t, FwdKernel::for_packed_batches(gpu), BwdKernel::for_device(gpu))
    }

    fn forward(&mut self, gpu: &Gpu, kernel: FwdKernel, t: usize, nh: usize) -> Result<(), GpuError> {
        let (cu, pl) = (self.cu_seqlens.as_view(), self.prefix_lens.as_view());
        kernel.run(gpu, &mut self.y.as_view_mut(), &mut self.lse.as_view_mut(), &self.gqkv.as_view(), &cu, &pl, t, nh, &mut self.scratch)
    }

    fn backward(&mut self, gpu: &Gpu, kernel: BwdKernel, t: usize, nh: usize) -> Result<(), GpuError> {
        let (cu, pl) = (self.cu_seqlens.as_view(), self.prefix_lens.as_view());
        let (y, lse) = (self.y.as_view(), self.lse.as_view());
        let pos = self.positions.as_view();
        kernel.run(gpu, &mut self.dgqkv.as_view_mut(), &self.dy.as_view(), &self.gqkv.as_view(), &y, &lse, &cu, &pl, &pos, t, nh, &mut self.scratch)
    }
}

/// The kernels a row can time: every launcher this GPU can run, the portable ones first.
fn routes(gpu: &Gpu) -> Vec<(&'static str, Pass)> {
    let mut routes = vec![("fwd sm80 (mma.sync)", Pass::Forward(FwdKernel::Sm80))];
    if gpu.props.is_hopper() {
        routes.push(("fwd sm90 (TMA + wgmma)", Pass::Forward(FwdKernel::Sm90(Sm90Fwd::Plain))));
        routes.push(("fwd sm90 ping-pong", Pass::Forward(FwdKernel::Sm90(Sm90Fwd::PingPong))));
        routes.push(("fwd sm90 persistent", Pass::Forward(FwdKernel::Sm90(Sm90Fwd::Persistent))));
    }
    routes.push(("bwd sm80 (mma.sync)", Pass::Backward(BwdKernel::Sm80)));
    if gpu.props.is_hopper() {
        routes.push(("bwd sm90 (TMA + wgmma)", Pass::Backward(BwdKernel::Sm90)));
    }
    routes
}

/// What one row runs: a forward or a backward launcher (a backward row first runs the
/// dispatched forward once, so that it starts from real o and lse).
#[derive(Clone, Copy)]
enum Pass {
    Forward(FwdKernel),
    Backward(BwdKernel),
}

/// Prints the table: per batch and kernel, the time and TFLOP/s over visible pairs.
pub fn run(gpu: &Gpu) -> Result<()> {
    let mut rng = Rng::new(6);
    println!("attention on {} ({} SMs), {HEADS} heads of {HD}, {ROWS} rows per batch ((d): {TRAINING_ROWS})", gpu.props.name, gpu.props.sm_count);
    println!("{:<30} {:>7} {:>14}  {:<24} {:>9} {:>9}", "batch", "samples", "visible pairs", "kernel", "ms", "TFLOP/s");
    for b in bench_batches(&mut rng)? {
        let mut bufs = Buffers::new(gpu, &mut rng, &b, &sample_positions(&b.cu_seqlens, b.t), HEADS)?;
        let fwd_flops = 4.0 * HD as f64 * b.pairs() as f64 * HEADS as f64;
        let tables_ms = super::time_ms(gpu, WARMUP, ITERS, |_| bufs.build_tables(gpu, b.t))?;
        for (i, (name, pass)) in routes(gpu).into_iter().enumerate() {
            let (ms, flops) = match pass {
                Pass::Forward(kernel) => (super::time_ms(gpu, WARMUP, ITERS, |_| bufs.forward(gpu, kernel, b.t, HEADS))?, fwd_flops),
                Pass::Backward(kernel) => {
                    bufs.forward(gpu, FwdKernel::for_device(gpu), b.t, HEADS)?;
                    (super::time_ms(gpu, WARMUP, ITERS, |_| bufs.backward(gpu, kernel, b.t, HEADS))?, 2.5 * fwd_flops)
                }
            };
            let (label, samples, pairs) = if i == 0 { (b.name, b.prefix_lens.len().to_string(), b.pairs().to_string()) } else { ("", String::new(), String::new()) };
            println!("{label:<30} {samples:>7} {pairs:>14}  {name:<24} {ms:>9.3} {:>9.1}", flops / (ms * 1e-3) / 1e12);
        }
        println!("{:<55}{:<24} {tables_ms:>9.3}", "", "tables, once per batch");
    }
    Ok(())
}

/// Writes into `dir` what `tools/attention_torch_check.py` reads: `meta.json` (the check
/// batch's sample table and sizes, the three bench batches' tables, the card), the check
/// batch's inputs `g.bin q.bin k.bin v.bin dy.bin` and our outputs `y.bin dg.bin dq.bin dk.bin
/// dv.bin` (raw little-endian bf16, `[T, NH, HD]`; y = sigmoid(g) * o, the gated output) and
/// `lse.bin` (fp32, `[NH, T]`).
pub fn dump(gpu: &Gpu, dir: &Path) -> Result<()> {
    let mut rng = Rng::new(7);
    // The check batch: small enough for a dense fp32 reference (T x T scores per head).
    let (nh, t) = (4, 4096);
    let mut samples = Vec::new();
    let mut used = 0;
    loop {
        let len = 1 + rng.below(1024) as usize;
        if used + len > t - 13 {
            break;
        }
        samples.push((len, 1 + rng.below(len as u64) as usize));
        used += len;
    }
    let check = BenchBatch::new("check", t, &samples);
    // Positions 0: RoPE's backward, which our backward applies, is then the identity, and the
    // PyTorch check (attention without RoPE) compares the attention alone.
    let mut bufs = Buffers::new(gpu, &mut rng, &check, &vec![0; t], nh)?;
    bufs.forward(gpu, FwdKernel::for_device(gpu), t, nh)?;
    bufs.backward(gpu, BwdKernel::for_device(gpu), t, nh)?;

    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).with_context(|| format!("writing {}", dir.join(name).display()));
    let (gqkv, dgqkv) = (gpu.stream.clone_dtoh(&bufs.gqkv)?, gpu.stream.clone_dtoh(&bufs.dgqkv)?);
    let block = |x: &[bf16], j: usize| block_of(x, j, nh);
    let (dy, y) = (gpu.stream.clone_dtoh(&bufs.dy)?, gpu.stream.clone_dtoh(&bufs.y)?);
    let tensors = [
        ("g", block(&gqkv, 0)),
        ("q", block(&gqkv, 1)),
        ("k", block(&gqkv, 2)),
        ("v", block(&gqkv, 3)),
        ("dy", dy),
        ("y", y),
        ("dg", block(&dgqkv, 0)),
        ("dq", block(&dgqkv, 1)),
        ("dk", block(&dgqkv, 2)),
        ("dv", block(&dgqkv, 3)),
    ];
    for (name, host) in tensors {
        write(&format!("{name}.bin"), bytemuck::cast_slice(&host))?;
    }
    write("lse.bin", bytemuck::cast_slice(&gpu.stream.clone_dtoh(&bufs.lse)?))?;

    let table = |b: &BenchBatch| serde_json::json!({"name": b.name, "t": b.t, "cu_seqlens": b.cu_seqlens, "prefix_lens": b.prefix_lens});
    let meta = serde_json::json!({
        "card": gpu.props.name,
        "head_dim": HD,
        "check": {"nh": nh, "t": t, "cu_seqlens": check.cu_seqlens, "prefix_lens": check.prefix_lens},
        "bench": {"nh": HEADS, "batches": bench_batches(&mut Rng::new(6))?.iter().map(table).collect::<Vec<_>>()},
    });
    write("meta.json", serde_json::to_string_pretty(&meta)?.as_bytes())?;
    println!("attention: wrote the check batch (T={t}, NH={nh}, {} samples) and our outputs to {}", check.prefix_lens.len(), dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visible_pairs_match_the_mask() {
        // Counted by brute force over the SPEC §4 rule `s <= max(t, p-1)`.
        let b = BenchBatch::new("t", 40, &[(1, 1), (7, 3), (9, 9), (12, 1), (5, 0)]);
        let brute: u64 = b
            .cu_seqlens
            .windows(2)
            .zip(&b.prefix_lens)
            .map(|(w, &p)| {
                let n = (w[1] - w[0]) as i64;
                (0..n).flat_map(|t| (0..n).map(move |s| (t, s))).filter(|&(t, s)| s <= t.max(p as i64 - 1)).count() as u64
            })
            .sum();
        assert_eq!(b.pairs(), brute);
    }
}
