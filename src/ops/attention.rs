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

use std::ops::Range;

use rayon::prelude::*;

use crate::config::HEAD_DIM;

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
                axpy(oh, (xs - m).exp() / sum, head(v, span.start + s, h, nh));
            }
        }
    });
    transpose_into(lse, &lse_rows, t, nh);
}

/// CPU reference of the backward pass; dq, dk, dv are written (`=`), padding rows get 0.
/// dq, dk, dv: [T, NH, HD] out, do_, q, k, v, o: [T, NH, HD], lse: [NH, T],
/// cu_seqlens: [S+1], prefix_lens: [S].
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd_cpu(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    do_: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    cu_seqlens: &[i32],
    prefix_lens: &[i32],
    t: usize,
    nh: usize,
) {
    let tensors = [("dq", dq.len()), ("dk", dk.len()), ("dv", dv.len()), ("do", do_.len()), ("q", q.len()), ("k", k.len()), ("v", v.len()), ("o", o.len())];
    check_shapes("attention_bwd_cpu", &tensors, lse.len(), t, nh);
    let spans = row_spans(cu_seqlens, prefix_lens, t);
    // D[t, h] = do[t, h] . o[t, h]: [T, NH]
    let d: Vec<f32> = (0..t * nh).map(|r| dot(&do_[r * HD..][..HD], &o[r * HD..][..HD])).collect();
    // P[t,s] of head h, recomputed from the saved log-sum-exp.
    let p = |i: usize, j: usize, h: usize| (SCALE * dot(head(q, i, h, nh), head(k, j, h, nh)) - lse[h * t + i]).exp();

    // dq, one query row per task: dq[t] = scale * sum_s dS[t,s] k[s].
    dq.par_chunks_mut(nh * HD).enumerate().for_each(|(i, dq_row)| {
        dq_row.fill(0.0);
        let Some(span) = spans[i] else { return };
        for h in 0..nh {
            let dqh = &mut dq_row[h * HD..][..HD];
            for s in span.keys_seen_by(i - span.start).map(|s| span.start + s) {
                let ds = p(i, s, h) * (dot(head(do_, i, h, nh), head(v, s, h, nh)) - d[i * nh + h]);
                axpy(dqh, SCALE * ds, head(k, s, h, nh));
            }
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
                let ds = pij * (dot(head(do_, i, h, nh), head(v, j, h, nh)) - d[i * nh + h]);
                axpy(dkh, SCALE * ds, head(q, i, h, nh));
            }
        }
    });
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
        attention_bwd_cpu(&mut dq, &mut dk, &mut dv, &g, &b.q, &b.k, &b.v, &o, &lse, &b.cu_seqlens, &b.prefix_lens, b.t, b.nh);

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
