//! Useful FLOPs of a training step, and MFU: the numerator and denominator that `hrm-cu
//! train` logs and `hrm-cu bench train` prints.
//!
//! Counted over the real (non-padding) tokens `T` of the packed batch, with `D` the hidden
//! size, `C = NH * 128` the attention width, `I` the MLP width and `V` the vocabulary:
//!
//! ```text
//! block GEMMs   2 T (D*4C + C*D + D*2I + I*D)   per block of every forward pass (2 per mul-add)
//! attention     4 * 128 * pairs * NH            per block of every forward pass (QK^T and PV)
//! LM head       2 T D V                         once
//! a pass with gradient adds 2x its GEMMs (dX and dW) and 2.5x its attention (the backward's
//! five products against the forward's two); the LM head always has gradient
//! ```
//!
//! `pairs` counts the (query, key) pairs the PrefixLM mask lets through (SPEC §4), not the
//! `T^2` of a dense product. The embedding is a gather and the norms, RoPE, gate and SwiGLU
//! are elementwise: none of them counts.
//!
//! MFU is the useful FLOPs over step time times the card's dense bf16 tensor-core rate
//! ([`peak_bf16_flops`]), as in PaLM's appendix B and nanoGPT's `estimate_mfu`. Recomputation
//! counts as no useful work, so MFU is a fair measure across implementations: with
//! `--recompute` the step also runs [`recompute_flops`], the forward of every pass with
//! gradient a second time, which MFU leaves out.

use crate::config::{ModelConfig, ModuleName, HEAD_DIM};
use crate::gpu::DeviceProps;
use crate::model::net::Batch;
use crate::model::schedule::Schedule;

/// Dense bf16 tensor-core rate of an H100 SXM (and of an H200, the same chip), the
/// denominator of MFU. The sustained rate under the card's power cap is lower: `hrm-cu bench
/// kernels` measures about 800 TFLOP/s for a large GEMM (`docs/perf.md`).
pub const HOPPER_BF16_FLOPS: f64 = 989e12;

/// The peak MFU divides by on this card: Hopper (H100/H200) only, since that is what the
/// kernels are tuned for and what the 989 TFLOP/s figure is for; `None` elsewhere, and the log
/// then carries TFLOP/s alone.
pub fn peak_bf16_flops(props: &DeviceProps) -> Option<f64> {
    props.is_hopper().then_some(HOPPER_BF16_FLOPS)
}

/// The useful FLOPs of one training step of `config` with `schedule` on `batch` (see the
/// module doc).
pub fn useful_flops(config: &ModelConfig, schedule: &Schedule, batch: &Batch) -> f64 {
    let (block_gemm, attention) = block_flops(config, batch);
    let mut flops = 0.0;
    for pass in &schedule.passes {
        let blocks = blocks_of(config, pass.module);
        flops += blocks * (block_gemm + attention);
        if pass.grad {
            flops += blocks * (2.0 * block_gemm + 2.5 * attention);
        }
    }
    let (t, d, v) = (real_tokens(batch) as f64, config.dims.hidden as f64, config.vocab as f64);
    flops + 3.0 * 2.0 * t * d * v
}

/// The FLOPs a step of `schedule` runs on top of its useful ones: with recomputation, the
/// forward of every pass with gradient again; none without.
pub fn recompute_flops(config: &ModelConfig, schedule: &Schedule, batch: &Batch) -> f64 {
    if !schedule.recompute {
        return 0.0;
    }
    let (block_gemm, attention) = block_flops(config, batch);
    schedule.passes.iter().filter(|p| p.grad).map(|p| blocks_of(config, p.module) * (block_gemm + attention)).sum()
}

/// The forward FLOPs of one block on `batch`: (its GEMMs, its attention).
fn block_flops(config: &ModelConfig, batch: &Batch) -> (f64, f64) {
    let d = &config.dims;
    let t = real_tokens(batch) as f64;
    let (dd, c, i) = (d.hidden as f64, (d.heads * HEAD_DIM) as f64, d.intermediate as f64);
    let gemm = 2.0 * t * (dd * 4.0 * c + c * dd + dd * 2.0 * i + i * dd);
    let attention = 4.0 * HEAD_DIM as f64 * visible_pairs(batch) as f64 * d.heads as f64;
    (gemm, attention)
}

/// Blocks of `module` in this net.
fn blocks_of(config: &ModelConfig, module: ModuleName) -> f64 {
    config.net.modules(config.dims.n_layers).iter().find(|(m, _)| *m == module).map_or(0, |(_, n)| *n) as f64
}

/// Tokens of the batch's samples; the padding after the last sample is not counted.
fn real_tokens(batch: &Batch) -> usize {
    batch.cu_seqlens.last().map_or(0, |&n| n as usize)
}

/// Visible (query, key) pairs of one head: a sample of `n` rows with prefix `p` has `p` keys
/// for each of its `p` instruction rows and `t + 1` for response row `t >= p`, so
/// `p^2 + sum_{t=p}^{n-1} (t + 1) = p^2 + (n(n+1) - p(p+1)) / 2`.
pub fn visible_pairs(batch: &Batch) -> u64 {
    let lens = batch.cu_seqlens.windows(2).map(|w| (w[1] - w[0]) as u64);
    lens.zip(batch.prefix_lens)
        .map(|(n, &p)| {
            let p = (p.max(0) as u64).min(n); // a prefix longer than its sample sees the whole sample
            p * p + (n * (n + 1) - p * (p + 1)) / 2
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NetName, SizeName};
    use crate::data::batch::pack_pairs;
    use crate::model::spec::ParamLayout;

    #[test]
    fn visible_pairs_follow_the_prefix_mask() {
        // One sample of 4 rows with prefix 2: rows 0, 1 see 2 keys, rows 2, 3 see 3, 4.
        let p = pack_pairs(&[(vec![1, 2], vec![3, 4, 5])], 6).unwrap();
        assert_eq!(visible_pairs(&p.batch()), 2 + 2 + 3 + 4);
    }

    #[test]
    fn visible_pairs_match_the_mask_by_brute_force() {
        // The SPEC §4 rule: query t of a sample with prefix p sees key s iff s <= max(t, p-1).
        let samples: Vec<(Vec<i32>, Vec<i32>)> = [(1, 1), (7, 3), (9, 9), (12, 1), (3, 40)].iter().map(|&(i, r)| (vec![1; i], vec![2; r])).collect();
        let p = pack_pairs(&samples, 100).unwrap();
        let brute: u64 = p
            .cu_seqlens
            .windows(2)
            .zip(&p.prefix_lens)
            .map(|(w, &pre)| {
                let n = (w[1] - w[0]) as i64;
                (0..n).flat_map(|t| (0..n).map(move |s| (t, s))).filter(|&(t, s)| s <= t.max(pre as i64 - 1)).count() as u64
            })
            .sum();
        assert_eq!(visible_pairs(&p.batch()), brute);
    }

    #[test]
    fn transformer_flops_are_six_per_parameter_token_plus_attention() {
        // Without attention (one-token samples) a transformer step is 6 FLOPs per weight and
        // token over the blocks and the LM head (the embedding is a gather). The padding rows
        // after the 8 samples count for nothing.
        let cfg = ModelConfig::new(SizeName::Tiny, NetName::Transformer, 512);
        let samples: Vec<(Vec<i32>, Vec<i32>)> = (0..8).map(|_| (vec![1], vec![2])).collect();
        let p = pack_pairs(&samples, 16).unwrap();
        let schedule = Schedule::for_training(&cfg.net, 0);
        let layout = ParamLayout::new(&cfg);
        let embed = layout.trainable().next().unwrap().numel();
        let weights = (layout.num_params() - embed) as f64;
        let attention = 4.0 * 128.0 * 8.0 * 2.0 * 3.5 * 4.0; // 8 pairs, 2 heads, fwd + 2.5x bwd, 4 blocks
        assert_eq!(useful_flops(&cfg, &schedule, &p.batch()), 6.0 * weights * 8.0 + attention);
    }

    #[test]
    fn passes_without_gradient_count_their_forward_only() {
        // Going from bp_steps 2 to 3 gives one more of hrm's passes gradient (H pass 0, SPEC
        // §3): 2x its GEMMs and 2.5x its attention, for each of its blocks. H and L have the
        // same number of blocks.
        let cfg = ModelConfig::new(SizeName::Tiny, NetName::Hrm, 512);
        let p = pack_pairs(&[(vec![1; 5], vec![2; 4])], 8).unwrap();
        let flops = |bp: usize| useful_flops(&cfg, &Schedule::for_training(&cfg.net, bp), &p.batch());
        let d = &cfg.dims;
        let (t, dd, c, i) = (8.0, d.hidden as f64, (d.heads * HEAD_DIM) as f64, d.intermediate as f64);
        let gemm = 2.0 * t * (dd * 4.0 * c + c * dd + dd * 2.0 * i + i * dd);
        let attention = 4.0 * 128.0 * (5.0 * 5.0 + 6.0 + 7.0 + 8.0) * d.heads as f64;
        let blocks = (d.n_layers / 2) as f64;
        let grad_passes = |bp: usize| Schedule::for_training(&cfg.net, bp).grad_passes();
        assert_eq!(grad_passes(3), grad_passes(2) + 1);
        assert_eq!(flops(3) - flops(2), blocks * (2.0 * gemm + 2.5 * attention));
    }

    #[test]
    fn recomputation_is_not_useful_work() {
        // hrm at bp_steps 5 reruns the forward of its 5 passes with gradient, of the same
        // number of blocks each; the useful FLOPs do not change.
        let cfg = ModelConfig::new(SizeName::Tiny, NetName::Hrm, 512);
        let p = pack_pairs(&[(vec![1; 5], vec![2; 4])], 8).unwrap();
        let kept = Schedule::for_training(&cfg.net, 5);
        let recomputed = kept.clone().with_recompute(true);
        assert_eq!(useful_flops(&cfg, &recomputed, &p.batch()), useful_flops(&cfg, &kept, &p.batch()));
        assert_eq!(recompute_flops(&cfg, &kept, &p.batch()), 0.0);
        let (gemm, attention) = block_flops(&cfg, &p.batch());
        let blocks = (cfg.dims.n_layers / 2) as f64;
        assert_eq!(recompute_flops(&cfg, &recomputed, &p.batch()), 5.0 * blocks * (gemm + attention));
    }
}
