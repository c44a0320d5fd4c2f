// cross_entropy: softmax cross-entropy over the vocabulary with the logit gradient written
// in place, and the device-side step metrics (SPEC §5); mirrors src/ops/cross_entropy.rs.
//
// Per row of logits [T, V] with label y (-100 = ignored):
//   m = max_j x_j (first index of the maximum = the argmax),  s = sum_j exp(x_j - m)
//   loss = m + log(s) - x_y;  correct = (argmax == y);  dx_j = (exp(x_j - m)/s - [j == y]) * grad_scale
// Ignored rows: loss = 0, correct = 0, dx = 0.
//
// Three kernels, one row per block at a time; the launcher picks the first that fits V:
// - cross_entropy_regs (V <= 8 * 8 * CE_THREADS = 65,536): a persistent grid. Each thread
//   keeps its CE_VPT 16-byte vectors of the row in registers (packed bf16, 32 registers),
//   so the row is read from device memory once and the gradient written once, and the
//   next row of the block streams into shared memory (cp.async) while this one is reduced
//   and written: reads overlap compute and writes, the whole point at one block per SM.
//   Loss, argmax flag and gradient all come out of this one pass.
// - cross_entropy_smem (2V bytes of shared memory): the row staged in shared memory, read
//   once, written once, but load and write phases of a block do not overlap.
// - cross_entropy_stream (any V): an online (max, sum) pass, then a second read of the row
//   (mostly from L2) to write the gradient.
//
// Invariants
// - dlogits may alias logits (the LM head writes the gradient over its logits): a row is
//   entirely read (into registers or shared memory, or by the thread that later overwrites
//   the element) before any of it is written, so those two pointers are not __restrict__.
// - fp32 math; exponentials as exp2f of log2(e)-scaled differences (2 ulp). Sums are per
//   thread in index order, then a fixed-shape block tree: bitwise reproducible.
// - V % 8 == 0 and pointers 16-byte aligned (the launcher checks).
// - grad_scale is read from device memory ([1] fp32): it changes with every batch (one over
//   its valid labels), and a training step captured in a CUDA graph replays its launches with
//   the arguments they were captured with.
// - ce_metrics runs as one block and adds its sums to the [5] fp64 accumulator with `+=`, so
//   the sums of a whole logging window stay on the device; fixed reduction order.

#include "common.cuh"

#define CE_THREADS 1024
#define CE_LOADS 4
// 16-byte vectors of a row per thread in cross_entropy_regs: V <= 8 * CE_VPT * blockDim.x.
#define CE_VPT 8
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

// ---- cross_entropy_pipelined -------------------------------------------------------

// Starts loading this thread's vectors of `row` (i = threadIdx.x + u * blockDim.x) into
// registers; nothing for rows past T or ignored rows, which need no logits. The loads stay
// in flight until the registers are first read.
// next: [CE_VPT] 16-byte vectors, logits: [T, V] bf16, labels: [T] int32
__device__ __forceinline__ void load_row(uint4 next[CE_VPT], const bf16* logits, const int* __restrict__ labels, int row,
                                         int T, int n_vec) {
    if (row >= T || labels[row] == IGNORE_LABEL) return;
    const uint4* src = reinterpret_cast<const uint4*>(logits + (int64_t)row * n_vec * 8);
#pragma unroll
    for (int u = 0; u < CE_VPT; u++) {
        const int i = threadIdx.x + u * blockDim.x;
        if (i < n_vec) next[u] = src[i];
    }
}

// Vector u of this thread from the row in shared memory; -inf past the row end (so it
// changes neither the maximum nor the sum: exp2 gives 0).
__device__ __forceinline__ uint4 row_vector(const uint4* this_row, int u, int n_vec) {
    const int i = threadIdx.x + u * blockDim.x;
    return i < n_vec ? this_row[i] : make_uint4(0xff80ff80u, 0xff80ff80u, 0xff80ff80u, 0xff80ff80u);
}

// The two bf16 of a 32-bit word as floats (bf16 is the top half of an fp32).
__device__ __forceinline__ float bf16_lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }

__device__ __forceinline__ __nv_bfloat162 as_bf162(unsigned w) { return *reinterpret_cast<const __nv_bfloat162*>(&w); }

__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const unsigned*>(&h);
}

// 2^x as one MUFU.EX2 (PTX ex2.approx.ftz: at most 2 ulp off, as exp2f). exp2f adds a
// range test and two multiplies per call to produce results below 2^-126 as denormals;
// here they flush to 0, which changes a softmax term by less than 2^-126.
__device__ __forceinline__ float exp2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Every thread gets the block's sum of s and minimum of i (fixed-shape trees).
__device__ __forceinline__ void block_sum_min(float& s, int& i) {
    __shared__ float sums[32];
    __shared__ int mins[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        s += __shfl_xor_sync(0xffffffffu, s, offset);
        i = min(i, __shfl_xor_sync(0xffffffffu, i, offset));
    }
    __syncthreads();  // the previous row's readers are done with sums, mins
    if (lane == 0) {
        sums[warp] = s;
        mins[warp] = i;
    }
    __syncthreads();
    s = lane < n_warps ? sums[lane] : 0.0f;
    i = lane < n_warps ? mins[lane] : INT_MAX;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        s += __shfl_xor_sync(0xffffffffu, s, offset);
        i = min(i, __shfl_xor_sync(0xffffffffu, i, offset));
    }
}

// Persistent grid (gridDim.x <= T); block b handles rows b, b + gridDim.x, ... The row being
// reduced sits in shared memory while the block's next row is in flight into registers:
//   1. store the arrived vectors (this row) to shared memory, start loading the next row;
//   2. max pass on packed bf16 (HMNMX2, exact); block max;
//   3. first index of the maximum, searched only by the threads whose own maximum it is;
//      sum of exp(x - m); block sum and min;
//   4. the label's owner thread writes loss and correct; every thread writes its gradient
//      vectors, p = exp(x - lse).
// Each pass re-reads shared memory (LDS.128, cheap) rather than keeping the row unpacked in
// registers: 64 fp32 values a thread do not fit next to the 32 registers of the next row.
// A thread only ever reads the slots it wrote itself, so the row buffer needs no barrier;
// the block reductions are the only ones.
// dlogits: [T, V] bf16 (may alias logits), losses: [T] fp32, correct: [T] uint8,
// logits: [T, V] bf16, labels: [T] int32, grad_scale_ptr: [1] fp32; dynamic shared memory: V bf16
extern "C" __global__ void __launch_bounds__(CE_THREADS, 1)
cross_entropy_pipelined(bf16* dlogits, float* __restrict__ losses, uint8_t* __restrict__ correct, const bf16* logits,
                        const int* __restrict__ labels, int T, int V, const float* __restrict__ grad_scale_ptr) {
    const float grad_scale = *grad_scale_ptr;
    extern __shared__ uint4 this_row[];  // [V/8]
    const int n_vec = V / 8;
    uint4 next[CE_VPT];
    load_row(next, logits, labels, blockIdx.x, T, n_vec);
    for (int row = blockIdx.x; row < T; row += gridDim.x) {
        const int label = labels[row];
        bf16* d_row = dlogits + (int64_t)row * V;
        if (label == IGNORE_LABEL) {
            load_row(next, logits, labels, row + gridDim.x, T, n_vec);
            ignored_row(d_row, losses + row, correct + row, V);
            continue;
        }

        // 1. This row to shared memory, the next one into the registers just freed.
#pragma unroll
        for (int u = 0; u < CE_VPT; u++) {
            const int i = threadIdx.x + u * blockDim.x;
            if (i < n_vec) this_row[i] = next[u];
        }
        load_row(next, logits, labels, row + gridDim.x, T, n_vec);

        // 2. Maximum, two bf16 at a time (exact: the maximum of bf16 values is one of them).
        __nv_bfloat162 m2 = __bfloat162bfloat162(__ushort_as_bfloat16(0xff80u));
#pragma unroll
        for (int u = 0; u < CE_VPT; u++) {
            const uint4 v = row_vector(this_row, u, n_vec);
            m2 = __hmax2(__hmax2(m2, as_bf162(v.x)), __hmax2(as_bf162(v.y), __hmax2(as_bf162(v.z), as_bf162(v.w))));
        }
        const float m_thread = fmaxf(__low2float(m2), __high2float(m2));
        const float m = block_max(m_thread);

        // 3. First index of the maximum, from the last element back so the first match wins.
        int first = INT_MAX;
        if (m_thread == m) {
            const __nv_bfloat162 mm = __float2bfloat162_rn(m);
            for (int u = CE_VPT - 1; u >= 0; u--) {
                const uint4 v = row_vector(this_row, u, n_vec);
                const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                for (int k = 3; k >= 0; k--) {
                    const unsigned eq = __heq2_mask(as_bf162(w[k]), mm);
                    const int idx = 8 * (threadIdx.x + u * blockDim.x) + 2 * k;
                    if (eq & 0xffff0000u) first = idx + 1;
                    if (eq & 0x0000ffffu) first = idx;
                }
            }
        }
        const float m_log2e = m * LOG2E;
        float s = 0.0f;
#pragma unroll
        for (int u = 0; u < CE_VPT; u++) {
            const uint4 v = row_vector(this_row, u, n_vec);
            const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int k = 0; k < 4; k++) {
                s += exp2_ftz(fmaf(bf16_lo(w[k]), LOG2E, -m_log2e));
                s += exp2_ftz(fmaf(bf16_hi(w[k]), LOG2E, -m_log2e));
            }
        }
        block_sum_min(s, first);

        // 4. Gradient, dx_j = p_j * grad_scale - [j == label] * grad_scale with
        //    p_j = exp(x_j - lse): every element as if it were not the label, then the
        //    thread that holds the label's logit rewrites that one element (a second store
        //    by the same thread, ordered after the first) and writes loss and flag.
        const float lse_log2e = m_log2e + log2f(s);
#pragma unroll
        for (int u = 0; u < CE_VPT; u++) {
            const int i = threadIdx.x + u * blockDim.x;
            if (i >= n_vec) continue;
            const uint4 v = this_row[i];
            const unsigned w[4] = {v.x, v.y, v.z, v.w};
            float d[8];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                d[2 * k] = exp2_ftz(fmaf(bf16_lo(w[k]), LOG2E, -lse_log2e)) * grad_scale;
                d[2 * k + 1] = exp2_ftz(fmaf(bf16_hi(w[k]), LOG2E, -lse_log2e)) * grad_scale;
            }
            reinterpret_cast<uint4*>(d_row)[i] =
                make_uint4(pack_bf16x2(d[0], d[1]), pack_bf16x2(d[2], d[3]), pack_bf16x2(d[4], d[5]), pack_bf16x2(d[6], d[7]));
        }
        if (threadIdx.x == (label / 8) % blockDim.x) {
            const float x_label = __bfloat162float(reinterpret_cast<const bf16*>(this_row)[label]);
            const float p_label = exp2_ftz(fmaf(x_label, LOG2E, -lse_log2e));
            d_row[label] = __float2bfloat16_rn((p_label - 1.0f) * grad_scale);
            losses[row] = m + logf(s) - x_label;
            correct[row] = first == label;
        }
    }
}

// ---- cross_entropy_smem, cross_entropy_stream ------------------------------------------

// The row is staged in shared memory: read from global memory once, written once.
// dlogits: [T, V] bf16 (may alias logits), losses: [T] fp32, correct: [T] uint8,
// logits: [T, V] bf16, labels: [T] int32, grad_scale_ptr: [1] fp32; dynamic shared memory: V bf16
extern "C" __global__ void __launch_bounds__(CE_THREADS)
cross_entropy_smem(bf16* dlogits, float* __restrict__ losses, uint8_t* __restrict__ correct, const bf16* logits,
                   const int* __restrict__ labels, int T, int V, const float* __restrict__ grad_scale_ptr) {
    const float grad_scale = *grad_scale_ptr;
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
            if (i < n_vec) v[u] = load_bf16x8(x_row + 8 * i);
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
// logits: [T, V] bf16, labels: [T] int32, grad_scale_ptr: [1] fp32
extern "C" __global__ void __launch_bounds__(CE_THREADS)
cross_entropy_stream(bf16* dlogits, float* __restrict__ losses, uint8_t* __restrict__ correct, const bf16* logits,
                     const int* __restrict__ labels, int T, int V, const float* __restrict__ grad_scale_ptr) {
    const float grad_scale = *grad_scale_ptr;
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
        bf16x8_to_float(load_bf16x8(x_row + 8 * i), x);
#pragma unroll
        for (int e = 0; e < 8; e++) online_update(m, s, x[e], 8 * i + e);
    }
    block_online_combine(m, s);
    const float m_log2e = m.v * LOG2E;
    const float inv_s = 1.0f / s;
    for (int i = threadIdx.x; i < n_vec; i += blockDim.x) {
        float x[8];
        bf16x8_to_float(load_bf16x8(x_row + 8 * i), x);
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
