// cross_entropy: softmax cross-entropy over the vocabulary with the logit gradient written
// in place, and the device-side step metrics (SPEC §5); mirrors src/ops/cross_entropy.rs.
//
// Per row of logits [T, V] with label y (-100 = ignored):
//   m = max_j x_j (first index of the maximum = the argmax),  s = sum_j exp(x_j - m)
//   loss = m + log(s) - x_y;  correct = (argmax == y);  dx_j = (exp(x_j - m)/s - [j == y]) * grad_scale
// Ignored rows: loss = 0, correct = 0, dx = 0.
//
// Invariants
// - One block per row (CE_THREADS threads; the metrics kernel too). dlogits may alias logits (the LM head writes the
//   gradient over its logits): every element is read before the block's first barrier or by
//   the thread that later overwrites it, so those two pointers are not __restrict__.
// - cross_entropy_smem stages the row in shared memory (2V bytes: V <= ~116k on Hopper), so
//   it reads the logits from device memory once and writes the gradient once.
//   cross_entropy_stream, for any V, reads the row twice (the second read mostly from L2).
// - fp32 math; exponentials as exp2f of log2(e)-scaled differences (2 ulp).
// - V % 8 == 0 and pointers 16-byte aligned (the launcher checks).
// - ce_metrics runs as one block and adds its sums to the [5] fp64 accumulator with `+=`, so
//   the sums of a whole logging window stay on the device; fixed reduction order.

#include "common.cuh"

#define CE_THREADS 1024
#define CE_LOADS 4
#define IGNORE_LABEL (-100)
#define LOG2E 1.4426950408889634f

// A candidate maximum: larger value wins, ties go to the smaller index (the first maximum).
struct MaxArg {
    float v;
    int i;
};

__device__ __forceinline__ MaxArg better(MaxArg a, MaxArg b) { return (b.v > a.v || (b.v == a.v && b.i < a.i)) ? b : a; }

__device__ __forceinline__ MaxArg warp_argmax(MaxArg m) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        MaxArg o = {__shfl_xor_sync(0xffffffffu, m.v, offset), __shfl_xor_sync(0xffffffffu, m.i, offset)};
        m = better(m, o);
    }
    return m;
}

// Every thread gets the block's (max, first argmax).
__device__ __forceinline__ MaxArg block_argmax(MaxArg m) {
    __shared__ float vals[32];
    __shared__ int idxs[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    m = warp_argmax(m);
    __syncthreads();
    if (lane == 0) {
        vals[warp] = m.v;
        idxs[warp] = m.i;
    }
    __syncthreads();
    MaxArg w = {-INFINITY, INT_MAX};
    if (lane < n_warps) w = MaxArg{vals[lane], idxs[lane]};
    return warp_argmax(w);
}

// Zeroes an ignored row. d_row: [V] bf16
__device__ __forceinline__ void ignored_row(bf16* d_row, float* loss, uint8_t* correct, int V) {
    const bf16x8 zero = {};
    for (int i = threadIdx.x; i < V / 8; i += blockDim.x) reinterpret_cast<bf16x8*>(d_row)[i] = zero;
    if (threadIdx.x == 0) {
        *loss = 0.0f;
        *correct = 0;
    }
}

// Writes the gradient of 8 logits starting at element `idx`, given m*log2(e) and 1/s.
__device__ __forceinline__ bf16x8 softmax_grad8(const float x[8], int idx, int label, float m_log2e, float inv_s,
                                                float grad_scale) {
    float d[8];
#pragma unroll
    for (int e = 0; e < 8; e++) {
        const float p = exp2f(fmaf(x[e], LOG2E, -m_log2e)) * inv_s;
        d[e] = (p - (idx + e == label ? 1.0f : 0.0f)) * grad_scale;
    }
    return float_to_bf16x8(d);
}

// Folds x (element idx) into a thread's running (max, first argmax) and its sum of
// exp(x - max), rescaling the sum when the maximum grows (the online softmax).
__device__ __forceinline__ void online_update(MaxArg& m, float& s, float x, int idx) {
    if (x > m.v) s = s * exp2f((m.v - x) * LOG2E) + 1.0f;
    else s += exp2f((x - m.v) * LOG2E);
    m = better(m, MaxArg{x, idx});
}

// Combines the threads' online (max, argmax, sum) into the row's; every thread gets them.
__device__ __forceinline__ void block_online_combine(MaxArg& m, float& s) {
    const MaxArg top = block_argmax(m);
    s = block_sum(m.v == -INFINITY ? 0.0f : s * exp2f((m.v - top.v) * LOG2E));
    m = top;
}

// The row is staged in shared memory: read from global memory once, written once.
// dlogits: [T, V] bf16 (may alias logits), losses: [T] fp32, correct: [T] uint8,
// logits: [T, V] bf16, labels: [T] int32; dynamic shared memory: V bf16
extern "C" __global__ void __launch_bounds__(CE_THREADS)
cross_entropy_smem(bf16* dlogits, float* __restrict__ losses, uint8_t* __restrict__ correct, const bf16* logits,
                   const int* __restrict__ labels, int T, int V, float grad_scale) {
    extern __shared__ bf16x8 row_smem[];  // [V/8]
    const int64_t row = blockIdx.x;
    const int label = labels[row], n_vec = V / 8;
    const bf16* x_row = logits + row * V;
    bf16* d_row = dlogits + row * V;
    if (label == IGNORE_LABEL) {
        ignored_row(d_row, losses + row, correct + row, V);
        return;
    }
    const float x_label = threadIdx.x == 0 ? __bfloat162float(x_row[label]) : 0.0f;
    MaxArg m = {-INFINITY, INT_MAX};
    float s = 0.0f;
    // CE_LOADS independent 16-byte loads in flight per thread before the first use.
    for (int base = threadIdx.x; base < n_vec; base += CE_LOADS * blockDim.x) {
        bf16x8 v[CE_LOADS];
#pragma unroll
        for (int u = 0; u < CE_LOADS; u++) {
            const int i = base + u * blockDim.x;
            if (i < n_vec) v[u] = reinterpret_cast<const bf16x8*>(x_row)[i];
        }
#pragma unroll
        for (int u = 0; u < CE_LOADS; u++) {
            const int i = base + u * blockDim.x;
            if (i < n_vec) {
                row_smem[i] = v[u];
#pragma unroll
                for (int e = 0; e < 8; e++) online_update(m, s, __bfloat162float(v[u].v[e]), 8 * i + e);
            }
        }
    }
    block_online_combine(m, s);  // its barriers also publish row_smem
    const float m_log2e = m.v * LOG2E, inv_s = 1.0f / s;
    for (int i = threadIdx.x; i < n_vec; i += blockDim.x) {
        float x[8];
        bf16x8_to_float(row_smem[i], x);
        reinterpret_cast<bf16x8*>(d_row)[i] = softmax_grad8(x, 8 * i, label, m_log2e, inv_s, grad_scale);
    }
    if (threadIdx.x == 0) {
        losses[row] = m.v + logf(s) - x_label;
        correct[row] = m.i == label;
    }
}

// Any V: an online (max, sum) pass, then a second read to write the gradient.
// dlogits: [T, V] bf16 (may alias logits), losses: [T] fp32, correct: [T] uint8,
// logits: [T, V] bf16, labels: [T] int32
extern "C" __global__ void __launch_bounds__(CE_THREADS)
cross_entropy_stream(bf16* dlogits, float* __restrict__ losses, uint8_t* __restrict__ correct, const bf16* logits,
                     const int* __restrict__ labels, int T, int V, float grad_scale) {
    const int64_t row = blockIdx.x;
    const int label = labels[row], n_vec = V / 8;
    const bf16* x_row = logits + row * V;
    bf16* d_row = dlogits + row * V;
    if (label == IGNORE_LABEL) {
        ignored_row(d_row, losses + row, correct + row, V);
        return;
    }
    const float x_label = threadIdx.x == 0 ? __bfloat162float(x_row[label]) : 0.0f;
    MaxArg m = {-INFINITY, INT_MAX};
    float s = 0.0f;
    for (int i = threadIdx.x; i < n_vec; i += blockDim.x) {
        float x[8];
        bf16x8_to_float(reinterpret_cast<const bf16x8*>(x_row)[i], x);
#pragma unroll
        for (int e = 0; e < 8; e++) online_update(m, s, x[e], 8 * i + e);
    }
    block_online_combine(m, s);
    const float m_log2e = m.v * LOG2E;
    const float inv_s = 1.0f / s;
    for (int i = threadIdx.x; i < n_vec; i += blockDim.x) {
        float x[8];
        bf16x8_to_float(reinterpret_cast<const bf16x8*>(x_row)[i], x);
        reinterpret_cast<bf16x8*>(d_row)[i] = softmax_grad8(x, 8 * i, label, m_log2e, inv_s, grad_scale);
    }
    if (threadIdx.x == 0) {
        losses[row] = m.v + logf(s) - x_label;
        correct[row] = m.i == label;
    }
}

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

#define N_METRICS 5

// One block of CE_THREADS threads. Tokens are summed by a fixed thread-strided split, samples
// by one warp each (ballots over the sample's tokens), then a fixed tree over the block.
// metrics: [5] fp64 (+=): loss_sum, valid_tokens, correct_tokens, exact_samples,
// samples_with_labels; losses: [T] fp32, correct: [T] uint8, labels: [T] int32,
// cu_seqlens: [S+1] int32
extern "C" __global__ void __launch_bounds__(CE_THREADS)
ce_metrics(double* __restrict__ metrics, const float* __restrict__ losses, const uint8_t* __restrict__ correct,
           const int* __restrict__ labels, const int* __restrict__ cu_seqlens, int T, int S) {
    __shared__ double warp_totals[32][N_METRICS];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    double sums[N_METRICS] = {0, 0, 0, 0, 0};
    for (int i = threadIdx.x; i < T; i += blockDim.x) {
        if (labels[i] != IGNORE_LABEL) {
            sums[0] += (double)losses[i];
            sums[1] += 1.0;
            sums[2] += (double)correct[i];
        }
    }
    for (int s = warp; s < S; s += n_warps) {
        const int begin = min(cu_seqlens[s], T), end = min(cu_seqlens[s + 1], T);
        bool any_valid = false, all_right = true;
        for (int i = begin + lane; i < end; i += 32) {
            if (labels[i] != IGNORE_LABEL) {
                any_valid = true;
                all_right = all_right && correct[i];
            }
        }
        any_valid = __any_sync(0xffffffffu, any_valid);
        all_right = __all_sync(0xffffffffu, all_right);
        if (lane == 0 && any_valid) {
            sums[3] += all_right ? 1.0 : 0.0;
            sums[4] += 1.0;
        }
    }
#pragma unroll
    for (int j = 0; j < N_METRICS; j++) sums[j] = warp_sum_f64(sums[j]);
    if (lane == 0) {
#pragma unroll
        for (int j = 0; j < N_METRICS; j++) warp_totals[warp][j] = sums[j];
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int j = 0; j < N_METRICS; j++) {
            const double total = warp_sum_f64(lane < n_warps ? warp_totals[lane][j] : 0.0);
            if (lane == 0) metrics[j] += total;
        }
    }
}
