//! PrefixLM attention over a packed batch of variable-length samples (SPEC §4).
//!
//! Shapes: `T` tokens in the packed batch, `NH` heads, `HD` = 128 = head dim, `S` samples.
//! q, k, v, o are `[T, NH, HD]` (token-major, as FlashAttention's varlen layout), the
//! log-sum-exp `lse` is `[NH, T]`. Sample `i` spans rows `[cu_seqlens[i], cu_seqlens[i+1])`
//! and has prefix length `p = prefix_lens[i]`; with positions relative to the sample start,
//! query `t` sees key `s` iff `s <= max(t, p - 1)`. Samples never see each other; rows past
//! `cu_seqlens[S]` are padding (o = 0, lse = -inf, every gradient 0).
//!
//! Forward, per sample, head and visible (t, s) pair, with `scale = 1/sqrt(HD)`:
//!
//! ```text
//! x[t,s] = scale * q[t] . k[s]
//! lse[t] = log(sum_s exp(x[t,s]))
//! P[t,s] = exp(x[t,s] - lse[t])
//! o[t]   = sum_s P[t,s] v[s]
//! ```
//!
//! Backward (the derivation is in `docs/attention.md`), with `D[t] = do[t] . o[t]`:
//!
//! ```text
//! dv[s]    = sum_t P[t,s] do[t]
//! dS[t,s]  = P[t,s] * (do[t] . v[s] - D[t])
//! dq[t]    = scale * sum_s dS[t,s] k[s]
//! dk[s]    = scale * sum_t dS[t,s] q[t]
//! ```
//!
//! On the GPU, q, k and v are read where the fused projection wrote them: the query, key and
//! value blocks of `gqkv [T, 4, NH, HD]` (blocks gate | q | k | v, SPEC §2), rows `4 NH HD`
//! elements apart; the backward writes dq, dk, dv into the same blocks of `dgqkv` and leaves
//! its gate block alone. The CPU reference takes q, k, v as three `[T, NH, HD]` tensors.
//!
//! The GPU launchers build their row tables and tile orders from the sample table on the
//! device, in an [`AttentionScratch`] allocated once by the caller: a call allocates nothing
//! and reads nothing back, so a training step that runs them can be captured in a CUDA graph.

use std::ops::Range;

use cudarc::driver::sys::{self, CUfunction_attribute};
use cudarc::driver::{CudaFunction, CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;
use rayon::prelude::*;

use crate::config::HEAD_DIM;
use crate::gpu::{DriverContext, Gpu, GpuError};
use crate::ops::compare::{compare, Tolerance};
use crate::ops::gate::{gate_bwd_cpu, gate_fwd_cpu};
use crate::ops::rope::{qkv_rope_bwd, qkv_rope_bwd_cpu, rope_inv_freq};
use crate::rng::Rng;
use crate::selftest::{Check, Row};

const HD: usize = HEAD_DIM;

/// The softmax scale `1/sqrt(HD)`.
pub const SCALE: f32 = 0.088_388_35; // 1/sqrt(128)

/// One sample of the packed batch, as seen from one of its rows.
#[derive(Clone, Copy, Debug)]
struct Span {
    /// First row of the sample in the packed batch.
    start: usize,
    /// Rows in the sample.
    len: usize,
    /// Prefix length `p` (0 and 1 both mean fully causal).
    prefix: usize,
}

impl Span {
    /// Keys seen by query `t` (relative): `0..=max(t, p-1)`.
    fn keys_seen_by(&self, t: usize) -> Range<usize> {
        0..t.max(self.prefix.saturating_sub(1)) + 1
    }

    /// Queries that see key `s` (relative): all of them for a prefix key, else `s..len`.
    fn queries_seeing(&self, s: usize) -> Range<usize> {
        if s < self.prefix {
            0..self.len
        } else {
            s..self.len
        }
    }
}

/// For every row of the batch, the sample it belongs to (`None` for padding), after checking
/// that `cu_seqlens` starts at 0, never decreases and ends within `t`, and that every prefix
/// fits its sample.
fn row_spans(cu_seqlens: &[i32], prefix_lens: &[i32], t: usize) -> Vec<Option<Span>> {
    assert_eq!(cu_seqlens.len(), prefix_lens.len() + 1, "attention: cu_seqlens has {} entries for {} samples", cu_seqlens.len(), prefix_lens.len());
    assert_eq!(cu_seqlens[0], 0, "attention: cu_seqlens must start at 0");
    let mut rows = vec![None; t];
    for (i, &p) in prefix_lens.iter().enumerate() {
        let (start, end) = (cu_seqlens[i], cu_seqlens[i + 1]);
        assert!(start <= end && end as usize <= t, "attention: sample {i} spans [{start}, {end}) in a batch of {t} rows");
        let len = (end - start) as usize;
        assert!(p >= 0 && p as usize <= len, "attention: sample {i} has prefix {p} but length {len}");
        let span = Span { start: start as usize, len, prefix: p as usize };
        rows[span.start..end as usize].fill(Some(span));
    }
    rows
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums so the compiler can vectorise the loop.
    let mut acc = [0.0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    acc.iter().sum()
}

/// `y += alpha * x`
fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// Head `h` of row `row` of a `[T, NH, HD]` tensor.
fn head(x: &[f32], row: usize, h: usize, nh: usize) -> &[f32] {
    &x[(row * nh + h) * HD..][..HD]
}

/// Turns per-row values `[T, NH]` into the `[NH, T]` layout of `lse`.
fn transpose_into(out: &mut [f32], rows: &[f32], t: usize, nh: usize) {
    for (i, r) in rows.chunks_exact(nh).enumerate() {
        for h in 0..nh {
            out[h * t + i] = r[h];
        }
    }
}

/// Block `j` (0 gate, 1 q, 2 k, 3 v) of a fused projection `x [T, 4, NH, HD]`, as `[T, NH, HD]`.
pub fn block_of<T: Copy>(x: &[T], j: usize, nh: usize) -> Vec<T> {
    let c = nh * HD;
    x.chunks(4 * c).flat_map(|row| row[j * c..(j + 1) * c].to_vec()).collect()
}

/// Writes `src [T, NH, HD]` into block `j` of `x [T, 4, NH, HD]`.
pub fn write_block(x: &mut [f32], j: usize, src: &[f32], nh: usize) {
    let c = nh * HD;
    for (row, s) in x.chunks_mut(4 * c).zip(src.chunks(c)) {
        row[j * c..(j + 1) * c].copy_from_slice(s);
    }
}

fn check_shapes(what: &str, tensors: &[(&str, usize)], lse: usize, t: usize, nh: usize) {
    for &(name, len) in tensors {
        assert_eq!(len, t * nh * HD, "{what}: {name} has {len} elements, expected [T={t}, NH={nh}, {HD}]");
    }
    assert_eq!(lse, nh * t, "{what}: lse has {lse} elements, expected [NH={nh}, T={t}]");
}

/// CPU reference of the forward pass.
/// o: [T, NH, HD] out, lse: [NH, T] out, q, k, v: [T, NH, HD], cu_seqlens: [S+1],
/// prefix_lens: [S].
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd_cpu(
    o: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cu_seqlens: &[i32],
    prefix_lens: &[i32],
    t: usize,
    nh: usize,
) {
    fwd_rounded(o, lse, q, k, v, cu_seqlens, prefix_lens, t, nh, |x| x);
}

/// The forward pass with `round` applied where a plain bf16 implementation with fp32
/// accumulation rounds: the probabilities (an operand of the P V product) and the output.
/// `attention_fwd_cpu` passes the identity; the selftest passes bf16 rounding to measure the
/// error such an implementation makes.
#[allow(clippy::too_many_arguments)]
fn fwd_rounded(
    o: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cu_seqlens: &[i32],
    prefix_lens: &[i32],
    t: usize,
    nh: usize,
    round: impl Fn(f32) -> f32 + Sync,
) {
    check_shapes("attention_fwd_cpu", &[("o", o.len()), ("q", q.len()), ("k", k.len()), ("v", v.len())], lse.len(), t, nh);
    let spans = row_spans(cu_seqlens, prefix_lens, t);
    let mut lse_rows = vec![f32::NEG_INFINITY; t * nh]; // [T, NH]
    o.par_chunks_mut(nh * HD).zip(lse_rows.par_chunks_mut(nh)).enumerate().for_each(|(i, (o_row, lse_row))| {
        o_row.fill(0.0);
        let Some(span) = spans[i] else { return };
        let keys = span.keys_seen_by(i - span.start);
        let mut x = vec![0.0f32; keys.len()];
        for h in 0..nh {
            let qi = head(q, i, h, nh);
            for (xs, s) in x.iter_mut().zip(keys.clone()) {
                *xs = SCALE * dot(qi, head(k, span.start + s, h, nh));
            }
            let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let sum: f32 = x.iter().map(|&xs| (xs - m).exp()).sum();
            lse_row[h] = m + sum.ln();
            let oh = &mut o_row[h * HD..][..HD];
            for (&xs, s) in x.iter().zip(keys.clone()) {
                axpy(oh, round((xs - m).exp() / sum), head(v, span.start + s, h, nh));
            }
            oh.iter_mut().for_each(|y| *y = round(*y));
        }
    });
    transpose_into(lse, &lse_rows, t, nh);
}

/// `D[t, h] = do[t, h] . o[t, h]`: [T, NH] from do_, o: [T, NH, HD] (the backward's input
/// [`attention_bwd_cpu`] takes in place of o; with the gate fused in, `gate_bwd_cpu` computes
/// it from the gate's output instead).
pub fn attention_delta_cpu(do_: &[f32], o: &[f32], t: usize, nh: usize) -> Vec<f32> {
    assert!(do_.len() == t * nh * HD && o.len() == t * nh * HD, "attention_delta_cpu: do and o must be [T={t}, NH={nh}, {HD}]");
    (0..t * nh).map(|r| dot(&do_[r * HD..][..HD], &o[r * HD..][..HD])).collect()
}

/// CPU reference of the backward pass; dq, dk, dv are written (`=`), padding rows get 0.
/// dq, dk, dv: [T, NH, HD] out, do_, q, k, v: [T, NH, HD], delta: [T, NH]
/// ([`attention_delta_cpu`]), lse: [NH, T], cu_seqlens: [S+1], prefix_lens: [S].
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd_cpu(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    do_: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    delta: &[f32],
    lse: &[f32],
    cu_seqlens: &[i32],
    prefix_lens: &[i32],
    t: usize,
    nh: usize,
) {
    bwd_rounded(dq, dk, dv, do_, q, k, v, delta, lse, cu_seqlens, prefix_lens, t, nh, |x| x);
}

/// The backward pass with `round` applied where a plain bf16 implementation with fp32
/// accumulation rounds: P and dS (operands of the dV, dQ, dK products) and the gradients.
#[allow(clippy::too_many_arguments)]
fn bwd_rounded(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    do_: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: &[f32],
    lse: &[f32],
    cu_seqlens: &[i32],
    prefix_lens: &[i32],
    t: usize,
    nh: usize,
    round: impl Fn(f32) -> f32 + Sync,
) {
    let tensors = [("dq", dq.len()), ("dk", dk.len()), ("dv", dv.len()), ("do", do_.len()), ("q", q.len()), ("k", k.len()), ("v", v.len())];
    check_shapes("attention_bwd_cpu", &tensors, lse.len(), t, nh);
    assert_eq!(d.len(), t * nh, "attention_bwd_cpu: delta has {} elements, expected [T={t}, NH={nh}]", d.len());
    let spans = row_spans(cu_seqlens, prefix_lens, t);
    // P[i,j] of head h, recomputed from the saved log-sum-exp, and dS[i,j] = P (dP - D).
    let p = |i: usize, j: usize, h: usize| round((SCALE * dot(head(q, i, h, nh), head(k, j, h, nh)) - lse[h * t + i]).exp());
    let ds = |p: f32, i: usize, j: usize, h: usize| round(p * (dot(head(do_, i, h, nh), head(v, j, h, nh)) - d[i * nh + h]));

    // dq, one query row per task: dq[t] = scale * sum_s dS[t,s] k[s].
    dq.par_chunks_mut(nh * HD).enumerate().for_each(|(i, dq_row)| {
        dq_row.fill(0.0);
        let Some(span) = spans[i] else { return };
        for h in 0..nh {
            let dqh = &mut dq_row[h * HD..][..HD];
            for j in span.keys_seen_by(i - span.start).map(|s| span.start + s) {
                axpy(dqh, SCALE * ds(p(i, j, h), i, j, h), head(k, j, h, nh));
            }
            dqh.iter_mut().for_each(|y| *y = round(*y));
        }
    });

    // dk and dv, one key row per task: dv[s] = sum_t P[t,s] do[t], dk[s] = scale * sum_t dS[t,s] q[t].
    dk.par_chunks_mut(nh * HD).zip(dv.par_chunks_mut(nh * HD)).enumerate().for_each(|(j, (dk_row, dv_row))| {
        dk_row.fill(0.0);
        dv_row.fill(0.0);
        let Some(span) = spans[j] else { return };
        for h in 0..nh {
            let dkh = &mut dk_row[h * HD..][..HD];
            let dvh = &mut dv_row[h * HD..][..HD];
            for i in span.queries_seeing(j - span.start).map(|t| span.start + t) {
                let pij = p(i, j, h);
                axpy(dvh, pij, head(do_, i, h, nh));
                axpy(dkh, SCALE * ds(pij, i, j, h), head(q, i, h, nh));
            }
            dkh.iter_mut().chain(dvh.iter_mut()).for_each(|y| *y = round(*y));
        }
    });
}

/// CPU reference of one decoding step (generation): `nq` new query tokens of each of `s`
/// samples attend to that sample's KV cache, which already holds their keys and values.
/// o: [S, NQ, NH, HD] out, q: [S, NQ, NH, HD], k_cache, v_cache: [S, C, NH, HD] (C = `cap`),
/// kv_lens: [S] (tokens in each cache, the new ones included), prefix_lens: [S].
/// Query i of sample n sits at position `pos = kv_lens[n] - nq + i` and sees the cache keys
/// `0..=max(pos, p-1)` (the mask of SPEC §4); a query with `pos < 0` gets o = 0.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode_cpu(
    o: &mut [f32],
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    kv_lens: &[i32],
    prefix_lens: &[i32],
    s: usize,
    nq: usize,
    cap: usize,
    nh: usize,
) {
    decode_rounded(o, q, k_cache, v_cache, kv_lens, prefix_lens, s, nq, cap, nh, |x| x);
}

/// The decoding step with `round` applied as in `fwd_rounded`.
#[allow(clippy::too_many_arguments)]
fn decode_rounded(
    o: &mut [f32],
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    kv_lens: &[i32],
    prefix_lens: &[i32],
    s: usize,
    nq: usize,
    cap: usize,
    nh: usize,
    round: impl Fn(f32) -> f32 + Sync,
) {
    check_decode_shapes("attention_decode_cpu", o.len(), q.len(), k_cache.len(), v_cache.len(), kv_lens.len(), prefix_lens.len(), s, nq, cap, nh);
    o.par_chunks_mut(nh * HD).enumerate().for_each(|(row, o_row)| {
        o_row.fill(0.0);
        let (n, i) = (row / nq, row % nq);
        let len = kv_lens[n].clamp(0, cap as i32) as i64;
        let pos = len - nq as i64 + i as i64;
        if pos < 0 {
            return;
        }
        let keys = 0..(pos.max(prefix_lens[n] as i64 - 1).min(len - 1) + 1) as usize;
        for h in 0..nh {
            let qi = head(q, row, h, nh);
            let x: Vec<f32> = keys.clone().map(|j| SCALE * dot(qi, head(k_cache, n * cap + j, h, nh))).collect();
            let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let sum: f32 = x.iter().map(|&xj| (xj - m).exp()).sum();
            let oh = &mut o_row[h * HD..][..HD];
            for (&xj, j) in x.iter().zip(keys.clone()) {
                axpy(oh, round((xj - m).exp() / sum), head(v_cache, n * cap + j, h, nh));
            }
            oh.iter_mut().for_each(|y| *y = round(*y));
        }
    });
}

#[allow(clippy::too_many_arguments)]
fn check_decode_shapes(what: &str, o: usize, q: usize, k: usize, v: usize, kv_lens: usize, prefix_lens: usize, s: usize, nq: usize, cap: usize, nh: usize) {
    for (name, len, rows) in [("o", o, s * nq), ("q", q, s * nq), ("k_cache", k, s * cap), ("v_cache", v, s * cap)] {
        assert_eq!(len, rows * nh * HD, "{what}: {name} has {len} elements, expected [S={s}, {}, NH={nh}, {HD}]", if rows == s * nq { format!("NQ={nq}") } else { format!("C={cap}") });
    }
    assert!(kv_lens == s && prefix_lens == s, "{what}: kv_lens and prefix_lens need S={s} entries, got {kv_lens} and {prefix_lens}");
}

// ---------------------------------------------------------------------------------------
// GPU launchers (cuda/attention.cu).
// ---------------------------------------------------------------------------------------

const FAMILY: &str = "attention";

// Tile shapes of cuda/attention.cu (its #defines): the forward and dQ kernels take query tiles
// of 128 rows and loop over key tiles of 64; the dK/dV kernel takes key tiles of 128 rows and
// loops over query tiles of 64. Every block has 8 warps of 16 rows.
const Q_TILE: usize = 128;
const KEY_STEP: usize = 64;
const KV_TILE: usize = 128;
const QUERY_STEP: usize = 64;
const BLOCK_THREADS: u32 = 256;
/// Dynamic shared memory: forward sQ + double-buffered sK, sV; dK/dV sK, sV + double-buffered
/// sQ, sdO (bf16) and lse, delta (fp32); dQ sQ, sdO + double-buffered sK, sV.
const FWD_SMEM: u32 = ((Q_TILE + 4 * KEY_STEP) * HD * 2) as u32;
const KV_SMEM: u32 = ((2 * KV_TILE + 4 * QUERY_STEP) * HD * 2 + 4 * QUERY_STEP * 4) as u32;
const DQ_SMEM: u32 = ((2 * Q_TILE + 4 * KEY_STEP) * HD * 2) as u32;
/// The schedule kernel ranks tiles in static shared memory's default limit (48 KB of ints).
const MAX_TILES: usize = 48 * 1024 / 4;

fn config(blocks: usize, threads: u32, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes }
}

/// Kernel `name`, allowed `smem` bytes of dynamic shared memory (above the default 48 KB).
fn function_with_smem(gpu: &Gpu, name: &str, smem: u32) -> Result<CudaFunction, GpuError> {
    let func = gpu.function(FAMILY, name)?;
    func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
        .during(format!("{name}: allowing {smem} bytes of shared memory (the device offers {})", gpu.props.smem_per_block_optin))?;
    Ok(func)
}

fn aligned16<T>(gpu: &Gpu, buf: &impl DevicePtr<T>) -> bool {
    let (ptr, _sync) = buf.device_ptr(&gpu.stream);
    ptr % 16 == 0
}

fn check_table(what: &str, cu_seqlens: usize, prefix_lens: usize, t: usize, nh: usize) {
    assert_eq!(cu_seqlens, prefix_lens + 1, "{what}: cu_seqlens has {cu_seqlens} entries for {prefix_lens} samples");
    assert!(t > 0 && nh > 0, "{what}: empty batch (T={t}, NH={nh})");
    assert!(t.div_ceil(Q_TILE).max(t.div_ceil(KV_TILE)) <= MAX_TILES && t * nh < i32::MAX as usize, "{what}: T={t} rows is more than the schedule handles");
}

/// Rows of the tiles a schedule orders: every ordered tile (forward and dQ query tiles, dK/dV
/// key tiles, on both architectures) has 128 rows.
const ORDER_TILE: usize = 128;
const _: () = assert!(Q_TILE == ORDER_TILE && KV_TILE == ORDER_TILE && SM90_TILE == ORDER_TILE && SM90_BWD_KEYS == ORDER_TILE);

/// The device tables and workspaces of the GPU launchers for up to `t_max` rows and `NH`
/// heads, allocated once and reused by every call. By default each call rebuilds what it reads
/// (the row tables and tile orders from the sample table, the zeroed counters), so nothing
/// carries over from one call to the next. After [`AttentionScratch::hold_tables`] the row
/// tables and tile orders built from one sample table are kept for every later call on the
/// same sample-table buffers and T, until [`AttentionScratch::sample_table_changed`]: a model
/// step builds them once for its hundreds of attention calls. Lengths with `T_pad` = T rounded
/// up to 64 and `tiles` = ceil(T / 128):
pub struct AttentionScratch {
    t_max: usize,
    nh: usize,
    /// What the tables hold, when they are held (see [`HeldTables`]).
    held: Option<HeldTables>,
    /// [T, 2] i32 each: the key rows every query sees, the query rows that see every key.
    rows: CudaSlice<i32>,
    cols: CudaSlice<i32>,
    /// [tiles] i32 each: query tiles and key tiles in order of decreasing work.
    q_order: CudaSlice<i32>,
    kv_order: CudaSlice<i32>,
    /// [NH, T_pad] fp32: the backward's `D = do . o` per row.
    delta: CudaSlice<f32>,
    /// [NH, T_pad] fp32 (Hopper backward): lse in base 2.
    lse2: CudaSlice<f32>,
    /// [tiles] i32 (Hopper backward): each key tile's rank in `kv_order`.
    rank: CudaSlice<i32>,
    /// [NH, T_pad, HD] fp32 (Hopper backward): dQ summed over key tiles.
    dqacc: CudaSlice<f32>,
    /// [NH, T_pad / 64] i32 (Hopper backward): key tiles added to each query tile so far.
    sem: CudaSlice<i32>,
    /// [1] i32 (Hopper persistent forward): the head of the work queue.
    next_item: CudaSlice<i32>,
    /// [64] fp32 (Hopper backward): RoPE's frequencies, `ops::rope::rope_inv_freq`, for the
    /// rotation the backward undoes.
    inv_freq: CudaSlice<f32>,
    /// [T, NH, HD] bf16 (backward): the attention's output gradient `do = dy * sigmoid(g)`, which
    /// the gate's backward writes first.
    da: CudaSlice<bf16>,
}

/// Which tables a holding [`AttentionScratch`] has built since the sample table last changed:
/// the row spans for (cu_seqlens, prefix_lens, samples, T) at these device addresses, and the query
/// and key tile orders with the step each was counted in (the kernels differ).
#[derive(Default)]
struct HeldTables {
    spans_for: Option<(u64, u64, usize, usize)>,
    q_order_step: Option<usize>,
    kv_order_step: Option<usize>,
}

/// Element counts of the [`AttentionScratch`] buffers for `t` rows and `nh` heads, in field
/// order (all 4-byte elements).
fn scratch_lens(t: usize, nh: usize) -> [usize; 11] {
    let (tiles, t_pad) = (t.div_ceil(ORDER_TILE), t.div_ceil(SM90_BWD_QUERIES) * SM90_BWD_QUERIES);
    [2 * t, 2 * t, tiles, tiles, nh * t_pad, nh * t_pad, tiles, nh * t_pad * HD, nh * t_pad / SM90_BWD_QUERIES, 1, HD / 2]
}

/// Bytes of an [`AttentionScratch`] for `t` rows and `nh` heads (the memory plan's line).
pub fn attention_scratch_bytes(t: usize, nh: usize) -> usize {
    4 * scratch_lens(t, nh).iter().sum::<usize>() + 2 * t * nh * HD
}

impl AttentionScratch {
    pub fn new(gpu: &Gpu, t_max: usize, nh: usize) -> Result<AttentionScratch, GpuError> {
        let [rows, cols, q_order, kv_order, delta, lse2, rank, dqacc, sem, next_item, inv_freq] = scratch_lens(t_max, nh);
        debug_assert_eq!(inv_freq, rope_inv_freq().len());
        let what = "allocating the attention scratch";
        let i32s = |n: usize| gpu.stream.alloc_zeros::<i32>(n.max(1)).during(what);
        let f32s = |n: usize| gpu.stream.alloc_zeros::<f32>(n.max(1)).during(what);
        Ok(AttentionScratch {
            t_max,
            nh,
            held: None,
            rows: i32s(rows)?,
            cols: i32s(cols)?,
            q_order: i32s(q_order)?,
            kv_order: i32s(kv_order)?,
            delta: f32s(delta)?,
            lse2: f32s(lse2)?,
            rank: i32s(rank)?,
            dqacc: f32s(dqacc)?,
            sem: i32s(sem)?,
            next_item: i32s(next_item)?,
            inv_freq: gpu.stream.clone_htod(&rope_inv_freq()).during(what)?,
            da: gpu.stream.alloc_zeros::<bf16>((t_max * nh * HD).max(1)).during(what)?,
        })
    }

    /// Whether this scratch serves calls of `t` rows and `nh` heads.
    pub fn fits(&self, t: usize, nh: usize) -> bool {
        t <= self.t_max && nh == self.nh
    }

    fn check(&self, what: &str, t: usize, nh: usize) {
        assert!(self.fits(t, nh), "{what}: the scratch holds T <= {} rows of NH = {} heads, the call has T = {t}, NH = {nh}", self.t_max, self.nh);
    }

    /// From now on, keep the row tables and tile orders between calls on the same sample-table
    /// buffers and T. The caller promises to call [`AttentionScratch::sample_table_changed`]
    /// whenever it writes new contents into those buffers.
    pub fn hold_tables(&mut self) {
        self.held = Some(HeldTables::default());
    }

    /// The sample table's contents changed: the next call rebuilds the tables.
    pub fn sample_table_changed(&mut self) {
        if let Some(held) = &mut self.held {
            *held = HeldTables::default();
        }
    }

    /// Builds now, for a holding scratch, the tables that `fwd` and `bwd` read (the row spans
    /// and their tile orders), as their first calls after a new sample table would.
    #[allow(clippy::too_many_arguments)]
    pub fn build_tables(&mut self, gpu: &Gpu, cu_seqlens: &CudaView<i32>, prefix_lens: &CudaView<i32>, t: usize, fwd: FwdKernel, bwd: BwdKernel) -> Result<(), GpuError> {
        assert!(self.held.is_some(), "AttentionScratch::build_tables: call hold_tables first; otherwise every call rebuilds them");
        self.check("AttentionScratch::build_tables", t, self.nh);
        spans(gpu, self, cu_seqlens, prefix_lens, t)?;
        fwd.build_orders(gpu, self, t)?;
        bwd.build_orders(gpu, self, t)
    }
}

/// The row spans of every query and key (`[T, 2]` i32 each in `s.rows`, `s.cols`, see
/// cuda/attention.cuh), built on the device from the sample table (unless held from an
/// earlier call on the same table).
fn spans(gpu: &Gpu, s: &mut AttentionScratch, cu_seqlens: &CudaView<i32>, prefix_lens: &CudaView<i32>, t: usize) -> Result<(), GpuError> {
    let key = {
        let (cu, _read) = cu_seqlens.device_ptr(&gpu.stream);
        let (pl, _read) = prefix_lens.device_ptr(&gpu.stream);
        (cu, pl, prefix_lens.len(), t)
    };
    if let Some(held) = &mut s.held {
        if held.spans_for == Some(key) {
            return Ok(());
        }
        *held = HeldTables { spans_for: Some(key), ..HeldTables::default() };
    }
    let (n_samples, t_i32) = (prefix_lens.len() as i32, t as i32);
    let func = gpu.function(FAMILY, "attention_spans")?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(&mut s.rows).arg(&mut s.cols).arg(cu_seqlens).arg(prefix_lens).arg(&n_samples).arg(&t_i32);
    // SAFETY: block n < S reads cu_seqlens[n..=n+1] and prefix_lens[n] (the views hold S+1 and
    // S entries); every row index written is clamped to [0, T) and both tables hold at least
    // T int2 (the scratch fits T, checked by the callers).
    unsafe { args.launch(config(prefix_lens.len() + 1, BLOCK_THREADS, 0)) }.during("attention_spans")?;
    Ok(())
}

/// The query tiles of 128 rows in `s.q_order`, ordered by decreasing work counted in key
/// tiles of `step` rows (unless held); [`spans`] first.
fn query_order(gpu: &Gpu, s: &mut AttentionScratch, t: usize, step: usize) -> Result<(), GpuError> {
    if let Some(held) = &mut s.held {
        if held.q_order_step == Some(step) {
            return Ok(());
        }
        held.q_order_step = Some(step);
    }
    schedule(gpu, &mut s.q_order, &s.rows, t, ORDER_TILE, step)
}

/// The key tiles of 128 rows in `s.kv_order`, ordered by decreasing work counted in query
/// tiles of `step` rows (unless held); [`spans`] first.
fn key_order(gpu: &Gpu, s: &mut AttentionScratch, t: usize, step: usize) -> Result<(), GpuError> {
    if let Some(held) = &mut s.held {
        if held.kv_order_step == Some(step) {
            return Ok(());
        }
        held.kv_order_step = Some(step);
    }
    schedule(gpu, &mut s.kv_order, &s.cols, t, ORDER_TILE, step)
}

/// Writes into `order` the tiles of `tile` rows ordered by decreasing work, counted in
/// `step`-row tiles of the other axis (`[ceil(T / tile)]` i32).
fn schedule(gpu: &Gpu, order: &mut CudaSlice<i32>, spans: &CudaSlice<i32>, t: usize, tile: usize, step: usize) -> Result<(), GpuError> {
    let ntiles = t.div_ceil(tile);
    assert!(ntiles <= order.len() && 2 * t <= spans.len(), "attention_schedule: tables sized for fewer than T = {t} rows");
    let (t_i32, tile_i32, step_i32) = (t as i32, tile as i32, step as i32);
    let func = gpu.function(FAMILY, "attention_schedule")?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(order).arg(spans).arg(&t_i32).arg(&tile_i32).arg(&step_i32);
    // SAFETY: reads T int2 spans (the slice holds at least 2T i32), writes the ceil(T/tile)
    // entries of `order` (a permutation of the tile indices; the slice holds at least that
    // many), uses ceil(T/tile) ints of shared memory.
    unsafe { args.launch(config(1, 1024, (ntiles * 4) as u32)) }.during("attention_schedule")?;
    Ok(())
}

/// Which forward kernel runs: the portable one or a Hopper version (docs/attention.md, kernel
/// versions). [`attention_fwd`] runs [`FwdKernel::for_device`]; selftest and `hrm-cu bench
/// attention` run each one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FwdKernel {
    /// v2: cuda/attention.cu, `mma.sync`, any GPU since sm_80.
    Sm80,
    /// v3, v5 or v6: cuda/attention_sm90.cu, TMA + wgmma; errors on other GPUs.
    Sm90(Sm90Fwd),
}

impl FwdKernel {
    /// Builds (unless held) the tile order this kernel reads; [`spans`] first.
    fn build_orders(self, gpu: &Gpu, s: &mut AttentionScratch, t: usize) -> Result<(), GpuError> {
        match self {
            FwdKernel::Sm80 => query_order(gpu, s, t, KEY_STEP),
            FwdKernel::Sm90(_) => query_order(gpu, s, t, SM90_TILE),
        }
    }

    /// The default, whatever the batch: v3 on Hopper, v2 elsewhere.
    pub fn for_device(gpu: &Gpu) -> FwdKernel {
        if gpu.props.is_hopper() { FwdKernel::Sm90(Sm90Fwd::Plain) } else { FwdKernel::Sm80 }
    }

    /// For batches packed from many samples of up to a few thousand tokens, as training's are:
    /// v6 (the persistent grid) on Hopper, v2 elsewhere. On such batches v6's items are short
    /// and its overlap of one item's start with the previous item's end pays: 3-5% less
    /// forward time in an XL training step on an H200 (docs/attention.md, fourth session);
    /// on one long sequence (batch (a)) v3 is ~10% faster.
    pub fn for_packed_batches(gpu: &Gpu) -> FwdKernel {
        if gpu.props.is_hopper() { FwdKernel::Sm90(Sm90Fwd::Persistent) } else { FwdKernel::Sm80 }
    }

    /// Runs this kernel; same contract as [`attention_fwd`].
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        self,
        gpu: &Gpu,
        y: &mut CudaViewMut<bf16>,
        lse: &mut CudaViewMut<f32>,
        gqkv: &CudaView<bf16>,
        cu_seqlens: &CudaView<i32>,
        prefix_lens: &CudaView<i32>,
        t: usize,
        nh: usize,
        scratch: &mut AttentionScratch,
    ) -> Result<(), GpuError> {
        match self {
            FwdKernel::Sm80 => fwd_sm80(gpu, y, lse, gqkv, cu_seqlens, prefix_lens, t, nh, scratch),
            FwdKernel::Sm90(variant) => fwd_sm90(gpu, variant, y, lse, gqkv, cu_seqlens, prefix_lens, t, nh, scratch),
        }
    }
}

/// The gated attention forward on the GPU: [`attention_fwd_cpu`] followed by the gate
/// (`ops::gate::gate_fwd_cpu`). Runs the Hopper kernel (v3) on sm_90 devices and the portable
/// one (v2) elsewhere ([`FwdKernel::for_device`]).
/// y: [T, NH, HD] bf16 out (sigmoid(g) * o; o itself is not written), lse: [NH, T] fp32 out,
/// gqkv: [T, 4, NH, HD] bf16 whose blocks 0..3 are g, q, k, v (16-byte aligned), cu_seqlens:
/// [S+1] i32, prefix_lens: [S] i32 (device memory, never read by the host); `scratch` fits T and NH ([`AttentionScratch::fits`]). Empty samples (equal
/// consecutive offsets) are allowed: a sample table padded to a fixed length gives the same
/// results.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd(
    gpu: &Gpu,
    y: &mut CudaViewMut<bf16>,
    lse: &mut CudaViewMut<f32>,
    gqkv: &CudaView<bf16>,
    cu_seqlens: &CudaView<i32>,
    prefix_lens: &CudaView<i32>,
    t: usize,
    nh: usize,
    scratch: &mut AttentionScratch,
) -> Result<(), GpuError> {
    FwdKernel::for_device(gpu).run(gpu, y, lse, gqkv, cu_seqlens, prefix_lens, t, nh, scratch)
}

/// The device addresses of the gate, query, key and value blocks of a fused projection (or of
/// its gradient) `[T, 4, NH, HD]` at `base`, and their row stride in elements (`4 NH HD`).
struct QkvBlocks {
    g: u64,
    q: u64,
    k: u64,
    v: u64,
    ld: i32,
}

impl QkvBlocks {
    fn at(base: u64, nh: usize) -> QkvBlocks {
        let block_bytes = (nh * HD * 2) as u64;
        QkvBlocks { g: base, q: base + block_bytes, k: base + 2 * block_bytes, v: base + 3 * block_bytes, ld: (4 * nh * HD) as i32 }
    }
}

fn check_qkv(what: &str, name: &str, len: usize, t: usize, nh: usize) {
    assert_eq!(len, t * 4 * nh * HD, "{what}: {name} has {len} elements, expected [T={t}, 4, NH={nh}, {HD}] (gate, q, k, v blocks)");
}

/// Forward pass with the portable kernel (cuda/attention.cu, sm_80+, `mma.sync`); same
/// contract as [`attention_fwd`]. The default off Hopper; selftested explicitly on every GPU.
#[allow(clippy::too_many_arguments)]
fn fwd_sm80(
    gpu: &Gpu,
    y: &mut CudaViewMut<bf16>,
    lse: &mut CudaViewMut<f32>,
    gqkv: &CudaView<bf16>,
    cu_seqlens: &CudaView<i32>,
    prefix_lens: &CudaView<i32>,
    t: usize,
    nh: usize,
    scratch: &mut AttentionScratch,
) -> Result<(), GpuError> {
    check_shapes("attention_fwd_sm80", &[("y", y.len())], lse.len(), t, nh);
    check_qkv("attention_fwd_sm80", "gqkv", gqkv.len(), t, nh);
    check_table("attention_fwd_sm80", cu_seqlens.len(), prefix_lens.len(), t, nh);
    assert!(aligned16(gpu, y) && aligned16(gpu, gqkv), "attention_fwd_sm80: tensors must be 16-byte aligned");
    scratch.check("attention_fwd_sm80", t, nh);
    spans(gpu, scratch, cu_seqlens, prefix_lens, t)?;
    let s = scratch;
    FwdKernel::Sm80.build_orders(gpu, s, t)?;
    let func = function_with_smem(gpu, "attention_fwd", FWD_SMEM)?;
    let (t_i32, nh_i32) = (t as i32, nh as i32);
    // The guard keeps gqkv recorded as read by this launch (cudarc's stream tracking).
    let (base, _read) = gqkv.device_ptr(&gpu.stream);
    let qkv = QkvBlocks::at(base, nh);
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(y).arg(lse).arg(&qkv.g).arg(&qkv.q).arg(&qkv.k).arg(&qkv.v).arg(&s.rows).arg(&s.q_order).arg(&t_i32).arg(&nh_i32).arg(&qkv.ld);
    // SAFETY: shapes checked above; the kernel reads and writes rows < T of head < NH only (of
    // the four blocks of gqkv, rows ld apart), rows/order were written by `spans`/`schedule`
    // for this T; FWD_SMEM bytes allowed above.
    unsafe { args.launch(config(t.div_ceil(Q_TILE) * nh, BLOCK_THREADS, FWD_SMEM)) }.during("attention_fwd")?;
    Ok(())
}

/// The Hopper forward kernel's family (cuda/attention_sm90.cu, built for sm_90a only), its
/// tiles (query tiles of 128 rows, key tiles of 128), block (3 warpgroups) and shared memory
/// (Q, two stages of K and V, the gate tile, 1 KB of alignment slack).
const SM90_FAMILY: &str = "attention_sm90";
const SM90_TILE: usize = 128;
const SM90_THREADS: u32 = 384;
const SM90_SMEM: u32 = (6 * 128 * HD * 2 + 1024) as u32;
/// v6 (persistent) double-buffers Q: one more tile.
const SM90_SMEM_PERSISTENT: u32 = (7 * 128 * HD * 2 + 1024) as u32;

/// The Hopper forward kernels of cuda/attention_sm90.cu (docs/attention.md, kernel versions).
/// v5 and v6 are opt-in until their bench rows beat v3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sm90Fwd {
    /// v3: one block per (query tile, head).
    Plain,
    /// v5: v3 with the ping-pong of the two consumer warpgroups.
    PingPong,
    /// v6: v5 on a persistent grid of one block per SM, items taken from a queue.
    Persistent,
}

/// A `CUtensorMap` passed by value as a `__grid_constant__` kernel parameter.
#[repr(C, align(128))]
#[derive(Clone, Copy)]
pub(crate) struct TensorMap(sys::CUtensorMap);

// SAFETY: a plain 128-byte, 128-aligned C struct, copied into the kernel's parameter space.
unsafe impl DeviceRepr for TensorMap {}

/// The TMA descriptor of a `[T, NH, HD]` bf16 tensor at `ptr` with rows `ld` elements apart,
/// seen as the 3-D tensor (HD, NH, T) and copied in boxes of (64, 1, `box_rows`): half a head
/// row by `box_rows` rows, 128-byte swizzled (cuda/attention_sm90.cuh). Rows past T read as
/// zeros.
pub(crate) fn tensor_map(ptr: u64, t: usize, nh: usize, ld: usize, box_rows: usize) -> Result<TensorMap, GpuError> {
    tensor_map_boxed(ptr, t, nh, ld, (64, box_rows), sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B)
}

/// [`tensor_map`] with boxes of (`box_cols`, 1, `box_rows`) and the given swizzle (whose span
/// must be `box_cols` * 2 bytes).
pub(crate) fn tensor_map_boxed(ptr: u64, t: usize, nh: usize, ld: usize, (box_cols, box_rows): (usize, usize), swizzle: sys::CUtensorMapSwizzle) -> Result<TensorMap, GpuError> {
    let dims: [u64; 3] = [HD as u64, nh as u64, t as u64];
    let strides: [u64; 2] = [(HD * 2) as u64, (ld * 2) as u64]; // bytes, dims 1 and 2
    let boxes: [u32; 3] = [box_cols as u32, 1, box_rows as u32];
    let steps: [u32; 3] = [1, 1, 1];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every pointer refers to a live local array of the length the rank (3) implies;
    // the driver only encodes the descriptor (the global address is not dereferenced here).
    unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            3,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            steps.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()
        .during(format!("sm_90: encoding the tensor map of a [{t}, {nh}, {HD}] tensor, boxes ({box_cols}, 1, {box_rows})"))?;
        Ok(TensorMap(map.assume_init()))
    }
}

/// Launches one of the Hopper forward kernels (they share all arguments but v6's queue head).
#[allow(clippy::too_many_arguments)]
fn fwd_sm90(
    gpu: &Gpu,
    variant: Sm90Fwd,
    y: &mut CudaViewMut<bf16>,
    lse: &mut CudaViewMut<f32>,
    gqkv: &CudaView<bf16>,
    cu_seqlens: &CudaView<i32>,
    prefix_lens: &CudaView<i32>,
    t: usize,
    nh: usize,
    scratch: &mut AttentionScratch,
) -> Result<(), GpuError> {
    let p = &gpu.props;
    if !p.is_hopper() {
        return Err(GpuError::Unsupported { ordinal: p.ordinal, name: p.name.clone(), major: p.major, minor: p.minor });
    }
    let (name, smem) = match variant {
        Sm90Fwd::Plain => ("attention_fwd_sm90", SM90_SMEM),
        Sm90Fwd::PingPong => ("attention_fwd_sm90_pingpong", SM90_SMEM),
        Sm90Fwd::Persistent => ("attention_fwd_sm90_persistent", SM90_SMEM_PERSISTENT),
    };
    check_shapes(name, &[("y", y.len())], lse.len(), t, nh);
    check_qkv(name, "gqkv", gqkv.len(), t, nh);
    check_table(name, cu_seqlens.len(), prefix_lens.len(), t, nh);
    assert!(aligned16(gpu, y) && aligned16(gpu, gqkv), "{name}: tensors must be 16-byte aligned");
    scratch.check(name, t, nh);
    spans(gpu, scratch, cu_seqlens, prefix_lens, t)?;
    let s = scratch;
    FwdKernel::Sm90(variant).build_orders(gpu, s, t)?;
    // The guard keeps gqkv recorded as read by this launch (cudarc's stream tracking).
    let (base, _read) = gqkv.device_ptr(&gpu.stream);
    let qkv = QkvBlocks::at(base, nh);
    let ld = qkv.ld as usize;
    let (tm_q, tm_k, tm_v) = (tensor_map(qkv.q, t, nh, ld, SM90_TILE)?, tensor_map(qkv.k, t, nh, ld, SM90_TILE)?, tensor_map(qkv.v, t, nh, ld, SM90_TILE)?);
    let tm_g = tensor_map(qkv.g, t, nh, ld, SM90_TILE)?;
    let func = gpu.function(SM90_FAMILY, name)?;
    func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
        .during(format!("{name}: allowing {smem} bytes of shared memory (the device offers {})", p.smem_per_block_optin))?;
    let (t_i32, nh_i32) = (t as i32, nh as i32);
    let items = t.div_ceil(SM90_TILE) * nh;
    if variant == Sm90Fwd::Persistent {
        // v6's queue head starts at 0 every call.
        gpu.stream.memset_zeros(&mut s.next_item).during("attention_fwd_sm90_persistent: zeroing the queue head")?;
    }
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(&tm_q).arg(&tm_k).arg(&tm_v).arg(&tm_g).arg(y).arg(lse).arg(&s.rows).arg(&s.q_order).arg(&t_i32).arg(&nh_i32);
    let blocks = match variant {
        Sm90Fwd::Persistent => {
            args.arg(&mut s.next_item);
            items.min(p.sm_count)
        }
        Sm90Fwd::Plain | Sm90Fwd::PingPong => items,
    };
    // SAFETY: the tensor maps describe exactly the four blocks of gqkv (alive until the guard
    // drops after the launch); y, lse shapes checked above; rows/q_order built for this T;
    // `smem` bytes allowed above; v6 takes items < ceil(T / 128) * NH from its zeroed counter.
    unsafe { args.launch(config(blocks, SM90_THREADS, smem)) }.during(name.to_string())?;
    Ok(())
}

/// Which backward kernel runs: the portable one or a Hopper version (docs/attention.md,
/// kernel versions). [`attention_bwd`] runs [`BwdKernel::for_device`]; selftest and `hrm-cu
/// bench attention` run each one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BwdKernel {
    /// v2: cuda/attention.cu, dK/dV and dQ kernels, any GPU since sm_80.
    Sm80,
    /// v4: cuda/attention_bwd_sm90.cu, TMA + wgmma; errors on other GPUs.
    Sm90,
}

impl BwdKernel {
    /// Builds (unless held) the tile orders this kernel reads; [`spans`] first.
    fn build_orders(self, gpu: &Gpu, s: &mut AttentionScratch, t: usize) -> Result<(), GpuError> {
        match self {
            BwdKernel::Sm80 => {
                query_order(gpu, s, t, KEY_STEP)?;
                key_order(gpu, s, t, QUERY_STEP)
            }
            BwdKernel::Sm90 => key_order(gpu, s, t, SM90_BWD_QUERIES),
        }
    }

    /// The default: v4 on Hopper, v2 elsewhere; both deterministic.
    pub fn for_device(gpu: &Gpu) -> BwdKernel {
        if gpu.props.is_hopper() { BwdKernel::Sm90 } else { BwdKernel::Sm80 }
    }

    /// Runs this kernel; same contract as [`attention_bwd`].
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        self,
        gpu: &Gpu,
        dgqkv: &mut CudaViewMut<bf16>,
        dy: &CudaView<bf16>,
        gqkv: &CudaView<bf16>,
        y: &CudaView<bf16>,
        lse: &CudaView<f32>,
        cu_seqlens: &CudaView<i32>,
        prefix_lens: &CudaView<i32>,
        positions: &CudaView<i32>,
        t: usize,
        nh: usize,
        scratch: &mut AttentionScratch,
    ) -> Result<(), GpuError> {
        match self {
            BwdKernel::Sm80 => bwd_sm80(gpu, dgqkv, dy, gqkv, y, lse, cu_seqlens, prefix_lens, positions, t, nh, scratch),
            BwdKernel::Sm90 => bwd_sm90(gpu, dgqkv, dy, gqkv, y, lse, cu_seqlens, prefix_lens, positions, t, nh, scratch),
        }
    }
}

/// The gated attention backward on the GPU, RoPE's backward included: the gate's backward
/// (`ops::gate::gate_bwd_cpu`), [`attention_bwd_cpu`], then `ops::rope::qkv_rope_bwd_cpu` on
/// dq and dk, so that they are the gradients of the projection's q and k before the forward
/// rotated them in place (`qkv_rope_fwd`). Runs the Hopper kernel (v4) on sm_90 devices and the
/// portable one (v2) elsewhere ([`BwdKernel::for_device`]).
/// dgqkv: [T, 4, NH, HD] bf16 out, all four blocks written (dg, dq, dk, dv); dy: [T, NH, HD]
/// bf16, the gradient of the forward's y; gqkv: [T, 4, NH, HD] bf16 (g, q, k, v, q and k as
/// rotated); y: [T, NH, HD] bf16, the forward's output (all 16-byte aligned); lse: [NH, T] fp32
/// (from the forward), cu_seqlens: [S+1] i32, prefix_lens: [S] i32, positions: [T] i32 (RoPE's);
/// `scratch` fits T and NH. Deterministic: bitwise-identical results from run to run.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    gpu: &Gpu,
    dgqkv: &mut CudaViewMut<bf16>,
    dy: &CudaView<bf16>,
    gqkv: &CudaView<bf16>,
    y: &CudaView<bf16>,
    lse: &CudaView<f32>,
    cu_seqlens: &CudaView<i32>,
    prefix_lens: &CudaView<i32>,
    positions: &CudaView<i32>,
    t: usize,
    nh: usize,
    scratch: &mut AttentionScratch,
) -> Result<(), GpuError> {
    BwdKernel::for_device(gpu).run(gpu, dgqkv, dy, gqkv, y, lse, cu_seqlens, prefix_lens, positions, t, nh, scratch)
}

/// Backward pass with the portable kernels (cuda/attention.cu, sm_80+ with 129 KB of shared
/// memory per block); same contract as [`attention_bwd`]. No atomics: dK/dV and dQ are separate
/// kernels.
#[allow(clippy::too_many_arguments)]
fn bwd_sm80(
    gpu: &Gpu,
    dgqkv: &mut CudaViewMut<bf16>,
    dy: &CudaView<bf16>,
    gqkv: &CudaView<bf16>,
    y: &CudaView<bf16>,
    lse: &CudaView<f32>,
    cu_seqlens: &CudaView<i32>,
    prefix_lens: &CudaView<i32>,
    positions: &CudaView<i32>,
    t: usize,
    nh: usize,
    scratch: &mut AttentionScratch,
) -> Result<(), GpuError> {
    check_shapes("attention_bwd_sm80", &[("dy", dy.len()), ("y", y.len())], lse.len(), t, nh);
    check_qkv("attention_bwd_sm80", "dgqkv", dgqkv.len(), t, nh);
    check_qkv("attention_bwd_sm80", "gqkv", gqkv.len(), t, nh);
    check_table("attention_bwd_sm80", cu_seqlens.len(), prefix_lens.len(), t, nh);
    let aligned = aligned16(gpu, dgqkv) && aligned16(gpu, dy) && aligned16(gpu, gqkv) && aligned16(gpu, y);
    assert!(aligned, "attention_bwd_sm80: tensors must be 16-byte aligned");
    scratch.check("attention_bwd_sm80", t, nh);
    spans(gpu, scratch, cu_seqlens, prefix_lens, t)?;
    let s = scratch;
    BwdKernel::Sm80.build_orders(gpu, s, t)?;
    let (t_i32, nh_i32) = (t as i32, nh as i32);

    {
        // The guards keep gqkv recorded as read and dgqkv as written by these launches, and are
        // dropped before RoPE's backward takes dgqkv.
        let (base, _read) = gqkv.device_ptr(&gpu.stream);
        let (dbase, _written) = dgqkv.device_ptr_mut(&gpu.stream);
        let (qkv, dqkv) = (QkvBlocks::at(base, nh), QkvBlocks::at(dbase, nh));

        // The gate's backward: dg, do = dy * sigmoid(g) (s.da) and delta = rowsum(do * o) ([NH, T]),
        // one warp per (row, head).
        let func = gpu.function(FAMILY, "attention_bwd_gate")?;
        let mut args = gpu.stream.launch_builder(&func);
        args.arg(&mut s.da).arg(&dqkv.g).arg(&mut s.delta).arg(dy).arg(&qkv.g).arg(y).arg(&t_i32).arg(&nh_i32).arg(&qkv.ld);
        // SAFETY: one warp per (row, head) < T * NH reads 128 elements of dy, y (shapes checked) and
        // of the gate block of gqkv, writes them in s.da (the scratch fits T, NH) and the gate block
        // of dgqkv, and one entry of delta ([NH, T], within the scratch's NH * T_pad).
        unsafe { args.launch(config((t * nh).div_ceil(8), BLOCK_THREADS, 0)) }.during("attention_bwd_gate")?;
        let func = function_with_smem(gpu, "attention_bwd_dkv", KV_SMEM)?;
        let mut args = gpu.stream.launch_builder(&func);
        args.arg(&dqkv.k).arg(&dqkv.v).arg(&qkv.q).arg(&qkv.k).arg(&qkv.v).arg(&s.da).arg(lse).arg(&s.delta).arg(&s.cols).arg(&s.kv_order);
        args.arg(&t_i32).arg(&nh_i32).arg(&qkv.ld);
        // SAFETY: shapes checked above; rows < T of heads < NH only (of the q, k, v blocks of gqkv
        // and the dk, dv blocks of dgqkv, rows ld apart); cols/kv_order built for this T.
        unsafe { args.launch(config(t.div_ceil(KV_TILE) * nh, BLOCK_THREADS, KV_SMEM)) }.during("attention_bwd_dkv")?;

        let func = function_with_smem(gpu, "attention_bwd_dq", DQ_SMEM)?;
        let mut args = gpu.stream.launch_builder(&func);
        args.arg(&dqkv.q).arg(&qkv.q).arg(&qkv.k).arg(&qkv.v).arg(&s.da).arg(lse).arg(&s.delta).arg(&s.rows).arg(&s.q_order);
        args.arg(&t_i32).arg(&nh_i32).arg(&qkv.ld);
        // SAFETY: as above (the dq block of dgqkv), with rows/q_order built for this T.
        unsafe { args.launch(config(t.div_ceil(Q_TILE) * nh, BLOCK_THREADS, DQ_SMEM)) }.during("attention_bwd_dq")?;
    }
    // RoPE's backward on the dq and dk blocks (the Hopper path fuses it into its last kernel).
    qkv_rope_bwd(gpu, dgqkv, positions, t, nh)
}

/// The Hopper backward's family (cuda/attention_bwd_sm90.cu, sm_90a only): blocks of 3
/// warpgroups own key tiles of 128 rows and walk query tiles of 64; dQ partials are added into
/// an fp32 workspace of query tiles of 64 rows in a fixed order. Shared memory: K, V (64 KB),
/// two stages of Q, dO (64 KB), dS^T (16 KB), two dQ partials (64 KB), two stages of lse2 and
/// delta (1 KB), 1 KB of alignment slack.
const SM90_BWD_FAMILY: &str = "attention_bwd_sm90";
const SM90_BWD_KEYS: usize = 128;
const SM90_BWD_QUERIES: usize = 64;
const SM90_BWD_SMEM: u32 = (2 * 32768 + 2 * 32768 + 16384 + 2 * 32768 + 2 * 2 * 64 * 4 + 1024) as u32;

/// The Hopper backward: prep, the main kernel, dq.
#[allow(clippy::too_many_arguments)]
fn bwd_sm90(
    gpu: &Gpu,
    dgqkv: &mut CudaViewMut<bf16>,
    dy: &CudaView<bf16>,
    gqkv: &CudaView<bf16>,
    y: &CudaView<bf16>,
    lse: &CudaView<f32>,
    cu_seqlens: &CudaView<i32>,
    prefix_lens: &CudaView<i32>,
    positions: &CudaView<i32>,
    t: usize,
    nh: usize,
    scratch: &mut AttentionScratch,
) -> Result<(), GpuError> {
    let p = &gpu.props;
    if !p.is_hopper() {
        return Err(GpuError::Unsupported { ordinal: p.ordinal, name: p.name.clone(), major: p.major, minor: p.minor });
    }
    let name = "attention_bwd_sm90";
    let smem = SM90_BWD_SMEM;
    check_shapes(name, &[("dy", dy.len()), ("y", y.len())], lse.len(), t, nh);
    check_qkv(name, "dgqkv", dgqkv.len(), t, nh);
    check_qkv(name, "gqkv", gqkv.len(), t, nh);
    check_table(name, cu_seqlens.len(), prefix_lens.len(), t, nh);
    let aligned = aligned16(gpu, dgqkv) && aligned16(gpu, dy) && aligned16(gpu, gqkv) && aligned16(gpu, y);
    assert!(aligned, "{name}: tensors must be 16-byte aligned");
    scratch.check(name, t, nh);
    spans(gpu, scratch, cu_seqlens, prefix_lens, t)?;
    let s = scratch;
    BwdKernel::Sm90.build_orders(gpu, s, t)?;
    let (n_kv, n_q) = (t.div_ceil(SM90_BWD_KEYS), t.div_ceil(SM90_BWD_QUERIES));
    let t_pad = n_q * SM90_BWD_QUERIES;
    let (t_i32, t_pad_i32, nh_i32, n_kv_i32) = (t as i32, t_pad as i32, nh as i32, n_kv as i32);

    // Workspaces (the scratch's, sized for at least this T). lse2, delta, rank and dqacc are
    // written before they are read (dqacc by the first contribution to each query tile, a bulk
    // store); the semaphores must start at 0.
    gpu.stream.memset_zeros(&mut s.sem.slice_mut(..nh * n_q)).during("attention_bwd_sm90: zeroing the semaphores")?;

    // The guards keep gqkv and the workspace do recorded as read and dgqkv as written by these
    // launches (cudarc's stream tracking).
    let (base, _read) = gqkv.device_ptr(&gpu.stream);
    let (dbase, _written) = dgqkv.device_ptr_mut(&gpu.stream);
    let (qkv, dqkv) = (QkvBlocks::at(base, nh), QkvBlocks::at(dbase, nh));

    let func = gpu.function(SM90_BWD_FAMILY, "attention_bwd_sm90_prep")?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(&mut s.lse2).arg(&mut s.delta).arg(&mut s.rank).arg(&mut s.da).arg(&dqkv.g).arg(dy).arg(&qkv.g).arg(y).arg(lse).arg(&s.kv_order);
    args.arg(&t_i32).arg(&t_pad_i32).arg(&nh_i32).arg(&n_kv_i32).arg(&qkv.ld);
    // SAFETY: one warp per (row < T_pad, head) writes lse2/delta[h * T_pad + row] and, for rows
    // < T, reads dy, y and the gate block of gqkv (shapes checked), lse[h * T + row], and writes
    // s.da (the scratch fits T, NH) and the gate block of dgqkv; threads < n_kv write
    // rank[order[i]], a permutation of 0..n_kv. The grid has at least n_kv threads.
    unsafe { args.launch(config((t_pad * nh).div_ceil(8), BLOCK_THREADS, 0)) }.during("attention_bwd_sm90_prep")?;
    let (do_ptr, _do_read) = s.da.device_ptr(&gpu.stream);
    let ld = qkv.ld as usize;
    let tm_q = tensor_map(qkv.q, t, nh, ld, SM90_BWD_QUERIES)?;
    let tm_do = tensor_map(do_ptr, t, nh, nh * HD, SM90_BWD_QUERIES)?;
    let tm_k = tensor_map(qkv.k, t, nh, ld, SM90_BWD_KEYS)?;
    let tm_v = tensor_map(qkv.v, t, nh, ld, SM90_BWD_KEYS)?;
    let func = gpu.function(SM90_BWD_FAMILY, name)?;
    func.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
        .during(format!("{name}: allowing {smem} bytes of shared memory (the device offers {})", p.smem_per_block_optin))?;
    let mut args = gpu.stream.launch_builder(&func);
    assert!(positions.len() >= t, "{name}: {} positions for T = {t} rows", positions.len());
    args.arg(&tm_q).arg(&tm_k).arg(&tm_v).arg(&tm_do).arg(&dqkv.k).arg(&dqkv.v).arg(&mut s.dqacc).arg(&mut s.sem);
    args.arg(&s.lse2).arg(&s.delta).arg(&s.rows).arg(&s.cols).arg(&s.kv_order).arg(&s.rank).arg(positions).arg(&s.inv_freq);
    args.arg(&t_i32).arg(&t_pad_i32).arg(&nh_i32).arg(&qkv.ld);
    // SAFETY: the tensor maps describe exactly the q, k, v blocks of gqkv and do (alive until
    // the guards drop after the launch); the dk, dv blocks of dgqkv (rows ld apart) checked
    // above; dqacc holds at least NH * T_pad * HD fp32, sem NH * T_pad / 64 ints, lse2 and delta
    // NH * T_pad; rows/cols/kv_order/rank built for this T; positions hold T (checked), inv_freq
    // 64; `smem` bytes allowed above.
    unsafe { args.launch(config(n_kv * nh, SM90_THREADS, smem)) }.during(name.to_string())?;

    let func = gpu.function(SM90_BWD_FAMILY, "attention_bwd_sm90_finish")?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(&dqkv.q).arg(&s.dqacc).arg(&s.rows).arg(positions).arg(&s.inv_freq).arg(&t_i32).arg(&t_pad_i32).arg(&nh_i32).arg(&qkv.ld);
    // SAFETY: one block per (query tile < T_pad / 64, head) reads its 32 KB of dqacc, the
    // positions of its rows < T (checked above) and the 64 frequencies, and writes those rows
    // of that head of the dq block of dgqkv (shape checked).
    unsafe { args.launch(config(n_q * nh, BLOCK_THREADS, 0)) }.during("attention_bwd_sm90_finish")?;
    Ok(())
}

/// One decoding step on the GPU; same contract as [`attention_decode_cpu`].
/// o: [S, NQ, NH, HD] bf16 out, q: [S, NQ, NH, HD] bf16, k_cache, v_cache: [S, C, NH, HD] bf16,
/// kv_lens: [S] i32, prefix_lens: [S] i32. Correct, not tuned: one warp per query and head.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(
    gpu: &Gpu,
    o: &mut CudaViewMut<bf16>,
    q: &CudaView<bf16>,
    k_cache: &CudaView<bf16>,
    v_cache: &CudaView<bf16>,
    kv_lens: &CudaView<i32>,
    prefix_lens: &CudaView<i32>,
    s: usize,
    nq: usize,
    cap: usize,
    nh: usize,
) -> Result<(), GpuError> {
    check_decode_shapes("attention_decode", o.len(), q.len(), k_cache.len(), v_cache.len(), kv_lens.len(), prefix_lens.len(), s, nq, cap, nh);
    assert!(s * cap * nh < i32::MAX as usize, "attention_decode: cache of {s} x {cap} x {nh} rows is too large");
    let aligned = aligned16(gpu, o) && aligned16(gpu, q) && aligned16(gpu, k_cache) && aligned16(gpu, v_cache);
    assert!(aligned, "attention_decode: tensors must be 16-byte aligned");
    let (s_i32, nq_i32, cap_i32, nh_i32) = (s as i32, nq as i32, cap as i32, nh as i32);
    let func = gpu.function(FAMILY, "attention_decode")?;
    let mut args = gpu.stream.launch_builder(&func);
    args.arg(o).arg(q).arg(k_cache).arg(v_cache).arg(kv_lens).arg(prefix_lens).arg(&s_i32).arg(&nq_i32).arg(&cap_i32).arg(&nh_i32);
    // SAFETY: one warp per (sample, query, head) < S*NQ*NH; cache rows read are < min(kv_lens, C)
    // of their sample (clamped in the kernel); shapes checked above.
    unsafe { args.launch(config((s * nq * nh).div_ceil(4), 128, 0)) }.during("attention_decode")?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Selftest: GPU against the fp32 CPU reference, FlashAttention's way: the GPU's error must be
// at most twice that of a plain bf16 implementation (the CPU code on the same bf16 inputs with
// bf16 rounding of P, dS and the outputs, the operands and results of its bf16 products),
// plus a small floor. Scores and dP stay fp32 in the baseline, as in a tensor-core kernel:
// rounding them too would make the baseline, hence the tolerance, loose for large logits.
// ---------------------------------------------------------------------------------------

/// fp32 accumulation noise over the longest sums here (a few thousand terms of size ~1:
/// ~1e-7 * sqrt(n) * a few), for outputs a bf16 baseline happens to get exactly right.
const ABS_FLOOR: f32 = 1e-5;

fn bf16_round(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// `2 * max |baseline - reference| + ABS_FLOOR`: twice a plain bf16 implementation's error.
fn tolerance_vs_baseline(baseline: &[f32], reference: &[f32]) -> Tolerance {
    Tolerance { abs: 2.0 * compare(baseline, reference, Tolerance { abs: 1.0, rel: 0.0 }).max_abs_err as f32 + ABS_FLOOR, rel: 0.0 }
}

/// lse is fp32 in both the GPU kernel and the baseline, so its tolerance needs a part that
/// scales with it: the tensor cores' fp32 sums of 128 products err by ~sqrt(128) ulps of
/// sum |q_i k_i|, up to ~3e-5 of the logit for the "large" batch's logits of size ~50.
const LSE_REL: f32 = 3e-5;

/// lse is -inf on padding rows: compare it through a finite stand-in, so that -inf matches
/// -inf while NaN (unwritten) and finite-vs-infinite mismatches still fail.
fn finite_lse(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| if v == f32::NEG_INFINITY { -1e30 } else { v }).collect()
}

/// A packed batch for the checks: bf16-representable inputs, the sample table, a name.
struct TestBatch {
    name: &'static str,
    t: usize,
    nh: usize,
    cu_seqlens: Vec<i32>,
    prefix_lens: Vec<i32>,
    g: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl TestBatch {
    /// `(length, prefix)` per sample then `padding` rows; q, k uniform in ±`qk`, v in ±1, the
    /// gate's pre-activation g in ±4.
    fn new(rng: &mut Rng, name: &'static str, samples: &[(usize, usize)], padding: usize, nh: usize, qk: f32) -> TestBatch {
        let mut cu_seqlens = vec![0i32];
        for &(len, _) in samples {
            cu_seqlens.push(cu_seqlens.last().unwrap() + len as i32);
        }
        let t = *cu_seqlens.last().unwrap() as usize + padding;
        let n = t * nh * HD;
        let mut bf16_vec = |n, scale| rng.uniform_vec(n, scale).into_iter().map(bf16_round).collect::<Vec<_>>();
        let (g, q, k, v) = (bf16_vec(n, 4.0), bf16_vec(n, qk), bf16_vec(n, qk), bf16_vec(n, 1.0));
        TestBatch { name, t, nh, cu_seqlens, prefix_lens: samples.iter().map(|&(_, p)| p as i32).collect(), g, q, k, v }
    }

    fn shape(&self) -> String {
        format!("{} T={} NH={}", self.name, self.t, self.nh)
    }

    /// g, q, k, v as the fused projection holds them: the blocks of `[T, 4, NH, HD]`.
    fn gqkv(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.t * 4 * self.nh * HD];
        for (j, block) in [&self.g, &self.q, &self.k, &self.v].into_iter().enumerate() {
            write_block(&mut out, j, block, self.nh);
        }
        out
    }

    fn positions(&self) -> Vec<i32> {
        sample_positions(&self.cu_seqlens, self.t)
    }
}

/// RoPE positions `[T]` of a packed batch given by its sample starts: 0, 1, ... from each
/// sample's start (as the packer writes them), 0 on padding rows.
pub fn sample_positions(cu_seqlens: &[i32], t: usize) -> Vec<i32> {
    let mut pos = vec![0; t];
    for w in cu_seqlens.windows(2) {
        (w[0]..w[1]).for_each(|row| pos[row as usize] = row - w[0]);
    }
    pos
}

/// RoPE's backward on the gradients `dq`, `dk` `[T, NH, HD]` (in place), as the GPU backward
/// applies it before returning them.
fn rope_back_cpu(dq: &mut Vec<f32>, dk: &mut Vec<f32>, pos: &[i32], t: usize, nh: usize) {
    let mut dgqkv = vec![0.0; t * 4 * nh * HD];
    write_block(&mut dgqkv, 1, dq, nh);
    write_block(&mut dgqkv, 2, dk, nh);
    qkv_rope_bwd_cpu(&mut dgqkv, pos, t, nh);
    (*dq, *dk) = (block_of(&dgqkv, 1, nh), block_of(&dgqkv, 2, nh));
}

/// The packed batches of the checks: every edge of the mask and of the tiling.
fn test_batches(rng: &mut Rng) -> Vec<TestBatch> {
    // Length 1; an empty sample (a sample table padded for graph capture); prefix-only
    // (a response of one token: causal length 0); a response of two tokens; one key tile
    // (64) with a prefix; one query tile (128) prefix-only and fully causal; 37 padding rows.
    let edge = [(1, 1), (0, 0), (7, 7), (9, 7), (64, 20), (128, 128), (128, 1)];
    // Many tiny samples: several per tile, tiles straddling samples.
    let tiny: Vec<(usize, usize)> = (0..300)
        .map(|_| {
            let len = 1 + rng.below(8) as usize;
            (len, 1 + rng.below(len as u64) as usize)
        })
        .collect();
    // Random lengths and prefix fractions, as in training.
    let mut mixed = Vec::new();
    let mut total = 0;
    while total < 1800 {
        let len = 1 + rng.below(400) as usize;
        mixed.push((len, (len as f64 * (0.1 + 0.8 * rng.uniform())).ceil() as usize));
        total += len;
    }
    vec![
        TestBatch::new(rng, "edge", &edge, 37, 2, 2.0),
        TestBatch::new(rng, "long", &[(1000, 300), (700, 1)], 20, 3, 2.0),
        TestBatch::new(rng, "aligned", &[(1024, 512)], 0, 2, 2.0),
        TestBatch::new(rng, "tiny", &tiny, 5, 2, 2.0),
        TestBatch::new(rng, "mixed", &mixed, 11, 2, 2.0),
        // Logits of size ~10-30: the online softmax must rescale without overflow.
        TestBatch::new(rng, "large", &[(600, 200), (300, 1)], 3, 2, 8.0),
    ]
}

fn upload_bf16(gpu: &Gpu, x: &[f32]) -> Result<CudaSlice<bf16>, GpuError> {
    let v: Vec<bf16> = x.iter().map(|&x| bf16::from_f32(x)).collect();
    gpu.stream.clone_htod(&v).during("upload")
}

fn download_bf16(gpu: &Gpu, x: &CudaSlice<bf16>) -> Result<Vec<f32>, GpuError> {
    Ok(gpu.stream.clone_dtoh(x).during("download")?.iter().map(|x| x.to_f32()).collect())
}

fn poisoned_bf16(gpu: &Gpu, n: usize) -> Result<CudaSlice<bf16>, GpuError> {
    gpu.stream.clone_htod(&vec![bf16::NAN; n]).during("poison")
}

pub fn selftests() -> Vec<Check> {
    // The portable kernels and the Hopper defaults first; the opt-in Hopper kernels last, so
    // that a hang in one of them (a barrier protocol bug) still leaves the others reported.
    vec![
        Check { name: "attention_fwd_sm80", run: check_fwd_sm80 },
        Check { name: "attention_bwd_sm80", run: check_bwd_sm80 },
        Check { name: "attention_decode", run: check_decode },
        Check { name: "attention_held_tables", run: check_held_tables },
        Check { name: "attention_fwd_sm90", run: check_fwd_sm90 },
        Check { name: "attention_bwd_sm90", run: check_bwd_sm90 },
        Check { name: "attention_fwd_sm90_pingpong", run: check_fwd_sm90_pingpong },
        Check { name: "attention_fwd_sm90_persistent", run: check_fwd_sm90_persistent },
    ]
}

/// The portable kernel, on every GPU (on Hopper `attention_fwd` does not run it).
fn check_fwd_sm80(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    fwd_rows(gpu, rng, "attention_fwd_sm80", FwdKernel::Sm80)
}

/// The Hopper kernel on the same batches; no rows on other GPUs (it is not built for them).
fn check_fwd_sm90(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    if !gpu.props.is_hopper() {
        return Ok(Vec::new());
    }
    fwd_rows(gpu, rng, "attention_fwd_sm90", FwdKernel::Sm90(Sm90Fwd::Plain))
}

fn check_fwd_sm90_pingpong(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    if !gpu.props.is_hopper() {
        return Ok(Vec::new());
    }
    fwd_rows(gpu, rng, "attention_fwd_sm90_pingpong", FwdKernel::Sm90(Sm90Fwd::PingPong))
}

fn check_fwd_sm90_persistent(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    if !gpu.props.is_hopper() {
        return Ok(Vec::new());
    }
    fwd_rows(gpu, rng, "attention_fwd_sm90_persistent", FwdKernel::Sm90(Sm90Fwd::Persistent))
}

/// The rows of one forward kernel on every test batch: the gated output y = sigmoid(g) * o and
/// the log-sum-exp against the CPU reference.
fn fwd_rows(gpu: &Gpu, rng: &mut Rng, name: &str, kernel: FwdKernel) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for b in test_batches(rng) {
        let (t, nh, n) = (b.t, b.nh, b.q.len());
        let gqkv_host = b.gqkv();
        let (mut o_ref, mut lse_ref) = (vec![0.0; n], vec![0.0; nh * t]);
        attention_fwd_cpu(&mut o_ref, &mut lse_ref, &b.q, &b.k, &b.v, &b.cu_seqlens, &b.prefix_lens, t, nh);
        let mut y_ref = vec![0.0; n];
        gate_fwd_cpu(&mut y_ref, &gqkv_host, &o_ref, t, nh);
        // A plain bf16 implementation: o rounded, then the gate's product rounded.
        let (mut o_base, mut lse_base) = (vec![0.0; n], vec![0.0; nh * t]);
        fwd_rounded(&mut o_base, &mut lse_base, &b.q, &b.k, &b.v, &b.cu_seqlens, &b.prefix_lens, t, nh, bf16_round);
        let mut y_base = vec![0.0; n];
        gate_fwd_cpu(&mut y_base, &gqkv_host, &o_base, t, nh);
        y_base.iter_mut().for_each(|x| *x = bf16_round(*x));

        let gqkv = upload_bf16(gpu, &gqkv_host)?;
        let cu = gpu.stream.clone_htod(&b.cu_seqlens).during("upload")?;
        let pl = gpu.stream.clone_htod(&b.prefix_lens).during("upload")?;
        let mut y = poisoned_bf16(gpu, n)?;
        let mut lse = gpu.stream.clone_htod(&vec![f32::NAN; nh * t]).during("poison")?;
        let mut scratch = AttentionScratch::new(gpu, t, nh)?;
        kernel.run(gpu, &mut y.as_view_mut(), &mut lse.as_view_mut(), &gqkv.as_view(), &cu.as_view(), &pl.as_view(), t, nh, &mut scratch)?;
        let y_gpu = download_bf16(gpu, &y)?;
        let lse_gpu = gpu.stream.clone_dtoh(&lse).during("download")?;

        let tol = tolerance_vs_baseline(&y_base, &y_ref);
        rows.push(Row::new(format!("{name} y (gated)"), b.shape(), tol, compare(&y_gpu, &y_ref, tol)));
        let (lse_ref, lse_base) = (finite_lse(&lse_ref), finite_lse(&lse_base));
        let tol = Tolerance { rel: LSE_REL, ..tolerance_vs_baseline(&lse_base, &lse_ref) };
        rows.push(Row::new(format!("{name} lse"), b.shape(), tol, compare(&finite_lse(&lse_gpu), &lse_ref, tol)));
    }
    Ok(rows)
}

/// The portable kernels, on every GPU (on Hopper `attention_bwd` does not run them).
fn check_bwd_sm80(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    bwd_rows(gpu, rng, "attention_bwd_sm80", BwdKernel::Sm80)
}

/// The Hopper kernels on the same batches; no rows on other GPUs (they are not built for them).
fn check_bwd_sm90(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    if !gpu.props.is_hopper() {
        return Ok(Vec::new());
    }
    bwd_rows(gpu, rng, "attention_bwd_sm90", BwdKernel::Sm90)
}

/// The rows of one backward kernel on every test batch: dg, dq, dk, dv against the CPU
/// reference, and a rerun that must agree bit for bit.
fn bwd_rows(gpu: &Gpu, rng: &mut Rng, name: &str, kernel: BwdKernel) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    for b in test_batches(rng) {
        let (t, nh, n) = (b.t, b.nh, b.q.len());
        let gqkv_host = b.gqkv();
        let dy: Vec<f32> = rng.uniform_vec(n, 1.0).into_iter().map(bf16_round).collect();
        let (mut o_ref, mut lse_ref) = (vec![0.0; n], vec![0.0; nh * t]);
        attention_fwd_cpu(&mut o_ref, &mut lse_ref, &b.q, &b.k, &b.v, &b.cu_seqlens, &b.prefix_lens, t, nh);
        // The GPU sees y as the forward stores it: o rounded, gated, rounded.
        let o_bf16: Vec<f32> = o_ref.iter().map(|&x| bf16_round(x)).collect();
        let mut y = vec![0.0; n];
        gate_fwd_cpu(&mut y, &gqkv_host, &o_bf16, t, nh);
        y.iter_mut().for_each(|x| *x = bf16_round(*x));
        let table = (&b.cu_seqlens[..], &b.prefix_lens[..]);

        // The reference in fp32 from the exact o: dg = dy o s (1 - s), da = dy s, D = da . o.
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        let s_ref: Vec<f32> = b.g.iter().map(|&g| sig(g)).collect();
        let da_ref: Vec<f32> = dy.iter().zip(&s_ref).map(|(d, s)| d * s).collect();
        let dg_ref: Vec<f32> = (0..n).map(|i| dy[i] * o_ref[i] * s_ref[i] * (1.0 - s_ref[i])).collect();
        let delta_ref = attention_delta_cpu(&da_ref, &o_ref, t, nh);
        let mut reference = [vec![0.0; n], vec![0.0; n], vec![0.0; n], dg_ref];
        let [dq, dk, dv, _] = &mut reference;
        attention_bwd_cpu(dq, dk, dv, &da_ref, &b.q, &b.k, &b.v, &delta_ref, &lse_ref, table.0, table.1, t, nh);
        let positions = b.positions();
        rope_back_cpu(dq, dk, &positions, t, nh);
        // A plain bf16 implementation: the gate's backward from the stored y, da rounded, then
        // the attention backward with its roundings.
        let (mut dgqkv_base, mut da_base, mut delta_base) = (vec![0.0; 4 * n], vec![0.0; n], vec![0.0; t * nh]);
        gate_bwd_cpu(&mut dgqkv_base, &mut da_base, &mut delta_base, &dy, &gqkv_host, &y, t, nh);
        da_base.iter_mut().for_each(|x| *x = bf16_round(*x));
        let dg_base: Vec<f32> = block_of(&dgqkv_base, 0, nh).into_iter().map(bf16_round).collect();
        let mut baseline = [vec![0.0; n], vec![0.0; n], vec![0.0; n], dg_base];
        let [dq, dk, dv, _] = &mut baseline;
        bwd_rounded(dq, dk, dv, &da_base, &b.q, &b.k, &b.v, &delta_base, &lse_ref, table.0, table.1, t, nh, bf16_round);
        rope_back_cpu(dq, dk, &positions, t, nh);
        dq.iter_mut().chain(dk.iter_mut()).for_each(|x| *x = bf16_round(*x));

        let gqkv = upload_bf16(gpu, &gqkv_host)?;
        let (d_dy, d_y) = (upload_bf16(gpu, &dy)?, upload_bf16(gpu, &y)?);
        let lse = gpu.stream.clone_htod(&lse_ref).during("upload")?;
        let cu = gpu.stream.clone_htod(&b.cu_seqlens).during("upload")?;
        let pl = gpu.stream.clone_htod(&b.prefix_lens).during("upload")?;
        let pos = gpu.stream.clone_htod(&positions).during("upload")?;
        // One scratch for both runs: the rerun must not depend on what the first left in it.
        let mut scratch = AttentionScratch::new(gpu, t, nh)?;
        let mut run = || -> Result<[Vec<f32>; 4], GpuError> {
            let mut dgqkv = poisoned_bf16(gpu, 4 * n)?;
            let (cu, pl) = (cu.as_view(), pl.as_view());
            kernel.run(gpu, &mut dgqkv.as_view_mut(), &d_dy.as_view(), &gqkv.as_view(), &d_y.as_view(), &lse.as_view(), &cu, &pl, &pos.as_view(), t, nh, &mut scratch)?;
            let out = download_bf16(gpu, &dgqkv)?;
            Ok([block_of(&out, 1, nh), block_of(&out, 2, nh), block_of(&out, 3, nh), block_of(&out, 0, nh)])
        };
        let first = run()?;
        for (i, grad) in ["dq", "dk", "dv", "dg"].into_iter().enumerate() {
            let tol = tolerance_vs_baseline(&baseline[i], &reference[i]);
            rows.push(Row::new(format!("{name} {grad}"), b.shape(), tol, compare(&first[i], &reference[i], tol)));
        }
        // Deterministic: a second run must agree bit for bit.
        let second = run()?;
        let exact = Tolerance { abs: 0.0, rel: 0.0 };
        rows.push(Row::new(format!("{name} rerun"), b.shape(), exact, compare(&second.concat(), &first.concat(), exact)));
    }
    Ok(rows)
}

/// A scratch that holds its tables (as the model's does) gives, bit for bit, what a fresh one
/// gives: on a second batch written into the same sample-table buffers after
/// `sample_table_changed`, and again on a later call that reuses the held tables. The default
/// kernels, forward and backward.
fn check_held_tables(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    let nh = 2;
    // Two sample tables of the same T and sample count: where the first has a long prefix and
    // padding, the second is causal with many tiles.
    let first = TestBatch::new(rng, "held first", &[(300, 290), (150, 1)], 62, nh, 2.0);
    let second = TestBatch::new(rng, "held second", &[(40, 20), (472, 1)], 0, nh, 2.0);
    assert_eq!((first.t, first.prefix_lens.len()), (second.t, second.prefix_lens.len()));
    let (t, n) = (second.t, second.q.len());
    let gqkv = upload_bf16(gpu, &second.gqkv())?;
    let dy = upload_bf16(gpu, &rng.uniform_vec(n, 1.0).into_iter().map(bf16_round).collect::<Vec<_>>())?;
    let pos = gpu.stream.clone_htod(&second.positions()).during("upload")?;
    // fwd then bwd: y, lse and the four gradient blocks, downloaded as one vector.
    let run = |scratch: &mut AttentionScratch, cu: &CudaSlice<i32>, pl: &CudaSlice<i32>| -> Result<Vec<f32>, GpuError> {
        let (mut y, mut dgqkv) = (poisoned_bf16(gpu, n)?, poisoned_bf16(gpu, 4 * n)?);
        let mut lse = gpu.stream.clone_htod(&vec![f32::NAN; nh * t]).during("poison")?;
        let (cu, pl) = (cu.as_view(), pl.as_view());
        attention_fwd(gpu, &mut y.as_view_mut(), &mut lse.as_view_mut(), &gqkv.as_view(), &cu, &pl, t, nh, scratch)?;
        attention_bwd(gpu, &mut dgqkv.as_view_mut(), &dy.as_view(), &gqkv.as_view(), &y.as_view(), &lse.as_view(), &cu, &pl, &pos.as_view(), t, nh, scratch)?;
        let lse = gpu.stream.clone_dtoh(&lse).during("download")?;
        Ok([download_bf16(gpu, &y)?, finite_lse(&lse), download_bf16(gpu, &dgqkv)?].concat())
    };
    let mut held = AttentionScratch::new(gpu, t, nh)?;
    held.hold_tables();
    let mut cu = gpu.stream.clone_htod(&first.cu_seqlens).during("upload")?;
    let mut pl = gpu.stream.clone_htod(&first.prefix_lens).during("upload")?;
    run(&mut held, &cu, &pl)?;
    gpu.stream.memcpy_htod(&second.cu_seqlens, &mut cu).during("upload")?;
    gpu.stream.memcpy_htod(&second.prefix_lens, &mut pl).during("upload")?;
    held.sample_table_changed();
    let after_change = run(&mut held, &cu, &pl)?;
    let reused = run(&mut held, &cu, &pl)?;
    let fresh = run(&mut AttentionScratch::new(gpu, t, nh)?, &cu, &pl)?;
    let exact = Tolerance { abs: 0.0, rel: 0.0 };
    Ok(vec![
        Row::new("attention held tables, new sample table", second.shape(), exact, compare(&after_change, &fresh, exact)),
        Row::new("attention held tables, reused", second.shape(), exact, compare(&reused, &fresh, exact)),
    ])
}

fn check_decode(gpu: &Gpu, rng: &mut Rng) -> Result<Vec<Row>, GpuError> {
    // Five caches of capacity 80: one token; a prompt only (prefill of a prefix); a full cache
    // with a prefix; fully causal; and 3 tokens (with 4 new queries, one has pos < 0).
    let (cap, nh) = (80, 2);
    let kv_lens = [1i32, 17, 80, 40, 3];
    let prefix_lens = [1i32, 17, 30, 1, 2];
    let s = kv_lens.len();
    let mut rows = Vec::new();
    for nq in [1, 4] {
        let mut draw = |n, scale| rng.uniform_vec(n, scale).into_iter().map(bf16_round).collect::<Vec<f32>>();
        let q = draw(s * nq * nh * HD, 2.0);
        let (mut k_cache, mut v_cache) = (draw(s * cap * nh * HD, 2.0), draw(s * cap * nh * HD, 1.0));
        // Slots past each cache's length are NaN: reading one would show.
        for (n, &len) in kv_lens.iter().enumerate() {
            let unused = (n * cap + len as usize) * nh * HD..(n + 1) * cap * nh * HD;
            k_cache[unused.clone()].fill(f32::NAN);
            v_cache[unused].fill(f32::NAN);
        }
        let mut o_ref = vec![0.0; q.len()];
        attention_decode_cpu(&mut o_ref, &q, &k_cache, &v_cache, &kv_lens, &prefix_lens, s, nq, cap, nh);
        let mut o_base = vec![0.0; q.len()];
        decode_rounded(&mut o_base, &q, &k_cache, &v_cache, &kv_lens, &prefix_lens, s, nq, cap, nh, bf16_round);

        let (d_q, d_k, d_v) = (upload_bf16(gpu, &q)?, upload_bf16(gpu, &k_cache)?, upload_bf16(gpu, &v_cache)?);
        let lens = gpu.stream.clone_htod(&kv_lens).during("upload")?;
        let pl = gpu.stream.clone_htod(&prefix_lens).during("upload")?;
        let mut o = poisoned_bf16(gpu, q.len())?;
        attention_decode(gpu, &mut o.as_view_mut(), &d_q.as_view(), &d_k.as_view(), &d_v.as_view(), &lens.as_view(), &pl.as_view(), s, nq, cap, nh)?;
        let tol = tolerance_vs_baseline(&o_base, &o_ref);
        rows.push(Row::new("attention_decode o", format!("S={s} NQ={nq} C={cap} NH={nh}"), tol, compare(&download_bf16(gpu, &o)?, &o_ref, tol)));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// A packed batch: tensors `[T, NH, HD]` and the sample table.
    #[derive(Clone)]
    struct Batch {
        t: usize,
        nh: usize,
        cu_seqlens: Vec<i32>,
        prefix_lens: Vec<i32>,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
    }

    /// `(length, prefix)` per sample, then `padding` rows.
    fn batch(rng: &mut Rng, samples: &[(usize, usize)], padding: usize, nh: usize) -> Batch {
        let mut cu_seqlens = vec![0i32];
        for &(len, _) in samples {
            cu_seqlens.push(cu_seqlens.last().unwrap() + len as i32);
        }
        let t = *cu_seqlens.last().unwrap() as usize + padding;
        let n = t * nh * HD;
        // Scale 2 makes the logits spread over several units, so the softmax is not flat.
        Batch {
            t,
            nh,
            cu_seqlens,
            prefix_lens: samples.iter().map(|&(_, p)| p as i32).collect(),
            q: rng.uniform_vec(n, 2.0),
            k: rng.uniform_vec(n, 2.0),
            v: rng.uniform_vec(n, 1.0),
        }
    }

    fn forward(b: &Batch) -> (Vec<f32>, Vec<f32>) {
        let mut o = vec![f32::NAN; b.q.len()];
        let mut lse = vec![f32::NAN; b.nh * b.t];
        attention_fwd_cpu(&mut o, &mut lse, &b.q, &b.k, &b.v, &b.cu_seqlens, &b.prefix_lens, b.t, b.nh);
        (o, lse)
    }

    /// The mask written out literally from SPEC §4 over the whole packed batch: rows `i` and
    /// `j` are in one sample and `s <= max(t, p-1)` with relative positions (i64: `p-1` may be -1).
    fn visible(b: &Batch, i: usize, j: usize) -> bool {
        (0..b.prefix_lens.len()).any(|n| {
            let (start, end) = (b.cu_seqlens[n] as usize, b.cu_seqlens[n + 1] as usize);
            let (t, s, p) = (i as i64 - start as i64, j as i64 - start as i64, b.prefix_lens[n] as i64);
            (start..end).contains(&i) && (start..end).contains(&j) && s <= t.max(p - 1)
        })
    }

    /// Dense masked softmax attention in f64, a different formulation of the same function.
    fn dense_reference(b: &Batch) -> (Vec<f64>, Vec<f64>) {
        let (t, nh) = (b.t, b.nh);
        let mut o = vec![0.0f64; t * nh * HD];
        let mut lse = vec![f64::NEG_INFINITY; nh * t];
        for h in 0..nh {
            for i in 0..t {
                let x: Vec<Option<f64>> = (0..t)
                    .map(|j| {
                        let qk: f64 = (0..HD).map(|c| b.q[(i * nh + h) * HD + c] as f64 * b.k[(j * nh + h) * HD + c] as f64).sum();
                        visible(b, i, j).then_some(qk / (HD as f64).sqrt())
                    })
                    .collect();
                let m = x.iter().flatten().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let sum: f64 = x.iter().flatten().map(|&xj| (xj - m).exp()).sum();
                lse[h * t + i] = m + sum.ln();
                for (j, xj) in x.iter().enumerate() {
                    if let Some(xj) = xj {
                        for c in 0..HD {
                            o[(i * nh + h) * HD + c] += (xj - m).exp() / sum * b.v[(j * nh + h) * HD + c] as f64;
                        }
                    }
                }
            }
        }
        (o, lse)
    }

    /// Samples: length 1, prefix-only (the response of one token, causal length 0), prefix 3 of
    /// 7, fully causal (p = 1) and p = 0, then 3 padding rows.
    const EDGE_SAMPLES: [(usize, usize); 5] = [(1, 1), (5, 5), (7, 3), (6, 1), (4, 0)];

    #[test]
    fn sample_positions_restart_at_each_sample_and_pad_with_zero() {
        assert_eq!(sample_positions(&[0, 3, 5], 7), [0, 1, 2, 0, 1, 0, 0]);
        assert_eq!(sample_positions(&[0, 1], 1), [0]);
    }

    #[test]
    fn forward_matches_dense_masked_softmax() {
        let b = batch(&mut Rng::new(1), &EDGE_SAMPLES, 3, 2);
        let (o, lse) = forward(&b);
        let (o_ref, lse_ref) = dense_reference(&b);
        // fp32 sums of <= 7 terms of size <= ~10 against f64: errors ~1e-6; 1e-5 leaves margin.
        for (i, (&got, &want)) in o.iter().zip(&o_ref).enumerate() {
            assert!((got as f64 - want).abs() <= 1e-5, "o[{i}] = {got}, dense reference {want}");
        }
        for (i, (&got, &want)) in lse.iter().zip(&lse_ref).enumerate() {
            if want == f64::NEG_INFINITY {
                assert_eq!(got, f32::NEG_INFINITY, "lse[{i}] of a padding row");
            } else {
                assert!((got as f64 - want).abs() <= 1e-5, "lse[{i}] = {got}, dense reference {want}");
            }
        }
        // Padding rows are exactly zero (a NaN-poisoned buffer went in).
        let real = *b.cu_seqlens.last().unwrap() as usize * b.nh * HD;
        assert!(o[real..].iter().all(|&x| x == 0.0));
    }

    /// Changing key/value row `j` changes exactly the rows that see it.
    #[test]
    fn each_key_reaches_exactly_the_rows_that_see_it() {
        let base = batch(&mut Rng::new(2), &EDGE_SAMPLES, 3, 1);
        let (o0, _) = forward(&base);
        for j in 0..base.t {
            let mut b = batch(&mut Rng::new(2), &EDGE_SAMPLES, 3, 1);
            for c in 0..HD {
                b.k[j * HD + c] += 0.5;
                b.v[j * HD + c] += 0.5;
            }
            let (o1, _) = forward(&b);
            for i in 0..base.t {
                let changed = o0[i * HD..][..HD] != o1[i * HD..][..HD];
                assert_eq!(changed, visible(&base, i, j), "query row {i}, key row {j}");
            }
        }
    }

    /// Decoding the last `nq` tokens of each sample against a cache of the sample's rows
    /// reproduces those rows of the forward pass, bit for bit (same sums in the same order).
    #[test]
    fn decode_continues_the_forward() {
        let (nh, nq, cap) = (2, 2, 9);
        let samples = [(5, 2), (3, 3), (9, 1), (1, 1)];
        let b = batch(&mut Rng::new(4), &samples, 0, nh);
        let (o, _) = forward(&b);
        let row = nh * HD;
        let s = samples.len();
        let (mut q, mut k_cache, mut v_cache) = (vec![0.0; s * nq * row], vec![0.0; s * cap * row], vec![0.0; s * cap * row]);
        let mut want = vec![0.0; s * nq * row];
        for (n, &(len, _)) in samples.iter().enumerate() {
            let start = b.cu_seqlens[n] as usize;
            k_cache[n * cap * row..][..len * row].copy_from_slice(&b.k[start * row..][..len * row]);
            v_cache[n * cap * row..][..len * row].copy_from_slice(&b.v[start * row..][..len * row]);
            for i in 0..nq {
                // Query i sits at position len - nq + i; before the sample's start it sees nothing.
                if let Some(pos) = (len + i).checked_sub(nq) {
                    q[(n * nq + i) * row..][..row].copy_from_slice(&b.q[(start + pos) * row..][..row]);
                    want[(n * nq + i) * row..][..row].copy_from_slice(&o[(start + pos) * row..][..row]);
                }
            }
        }
        let kv_lens: Vec<i32> = samples.iter().map(|&(len, _)| len as i32).collect();
        let mut got = vec![f32::NAN; want.len()];
        attention_decode_cpu(&mut got, &q, &k_cache, &v_cache, &kv_lens, &b.prefix_lens, s, nq, cap, nh);
        assert_eq!(got, want);
    }

    /// The loss `L = sum(o * g)` and its gradient through `attention_bwd_cpu`.
    fn loss(b: &Batch, g: &[f32]) -> f64 {
        forward(b).0.iter().zip(g).map(|(&o, &g)| o as f64 * g as f64).sum()
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(3);
        let b = batch(&mut rng, &[(1, 1), (4, 4), (6, 2), (3, 1)], 2, 2);
        let g = rng.uniform_vec(b.q.len(), 1.0);
        let (o, lse) = forward(&b);
        let n = b.q.len();
        let (mut dq, mut dk, mut dv) = (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
        let delta = attention_delta_cpu(&g, &o, b.t, b.nh);
        attention_bwd_cpu(&mut dq, &mut dk, &mut dv, &g, &b.q, &b.k, &b.v, &delta, &lse, &b.cu_seqlens, &b.prefix_lens, b.t, b.nh);

        // Central differences with step 1e-2 on inputs of size ~1: truncation ~h^2 * L''' ~1e-4,
        // fp32 rounding of the loss ~1e-6 / h ~1e-4; gradients are O(0.1..1). A tolerance of
        // 1e-3 + 1e-2 * |grad| sits above both and far below any missing term.
        let h = 1e-2f32;
        let fd = |which: usize, idx: usize| {
            let at = |delta: f32| {
                let mut bp = b.clone();
                [&mut bp.q, &mut bp.k, &mut bp.v][which][idx] += delta;
                loss(&bp, &g)
            };
            (at(h) - at(-h)) / (2.0 * h as f64)
        };
        for (which, (name, grad)) in [("dq", &dq), ("dk", &dk), ("dv", &dv)].into_iter().enumerate() {
            for (idx, &got) in grad.iter().enumerate() {
                let want = fd(which, idx);
                assert!((got as f64 - want).abs() <= 1e-3 + 1e-2 * want.abs(), "{name}[{idx}] = {got}, finite difference {want}");
            }
        }
        // Padding rows: gradient exactly zero.
        let real = *b.cu_seqlens.last().unwrap() as usize * b.nh * HD;
        assert!(dq[real..].iter().chain(&dk[real..]).chain(&dv[real..]).all(|&x| x == 0.0));
    }
}
