// embedding: the scaled token embedding and its deterministic backward (SPEC §3);
// mirrors src/ops/embedding.rs.
//
//   forward    out[t] = w[tokens[t]] * scale                          (bf16 out, bf16 w)
//   backward   dw[v] += scale * sum over {t : tokens[t] == v} of dout[t]   (fp32 dw, +=)
//
// The backward must give the same bits on every run, so it cannot let float atomics race
// on a row of dw. Instead every vocabulary row gets exactly one owner block, which sums its
// tokens in a fixed order. Getting there is a stable counting sort of the token ids:
//
//   1. count      counts[v] = #{t : tokens[t] == v}                  (integer atomics: exact)
//   2. scan       offsets = exclusive prefix sum of counts; uniq = the ids with counts > 0
//   3. fill       bucket[offsets[v] ..] = the t's of id v, in arbitrary order (atomic cursor)
//   4. rank       sorted[offsets[v] + #{t' in bucket of v : t' < t}] = t   (stable: t ascending)
//   5. reduce     block b owns row uniq[b]: sums dout[sorted[j]] over its range in a fixed
//                 order (four interleaved partial sums) and adds the total to dw once
//
// Step 4 costs sum_v count_v^2 comparisons: negligible for text, 2.7e8 in the degenerate
// batch of 16k copies of one token (still ~0.1 ms).
//
// Invariants
// - D % 8 == 0, D <= 8192, every pointer 16-byte aligned (the launcher checks).
// - Token ids outside 0..V are skipped (the forward writes a zero row for them): the data
//   pipeline guarantees ids < V, this only keeps a bad id from reading out of bounds.
// - Scratch (counts, cursor) is zeroed by the launcher before step 1.

#include "common.cuh"

#define SCAN_THREADS 1024

// out: [T, D] bf16, tokens: [T] int32, w: [V, D] bf16
extern "C" __global__ void embedding_fwd(bf16* __restrict__ out, const int* __restrict__ tokens,
                                         const bf16* __restrict__ w, int T, int D, int V, float scale) {
    const int64_t vecs_per_row = D / 8, n = (int64_t)T * vecs_per_row;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = i / vecs_per_row, col = i % vecs_per_row;
        const int id = tokens[row];
        float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (id >= 0 && id < V) {
            bf16x8_to_float(reinterpret_cast<const bf16x8*>(w + (int64_t)id * D)[col], v);
#pragma unroll
            for (int e = 0; e < 8; e++) v[e] *= scale;
        }
        reinterpret_cast<bf16x8*>(out)[i] = float_to_bf16x8(v);
    }
}

// counts: [V] int32 (zeroed, +=), tokens: [T] int32
extern "C" __global__ void embedding_bwd_count(int* __restrict__ counts, const int* __restrict__ tokens, int T, int V) {
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < T; t += gridDim.x * blockDim.x) {
        const int id = tokens[t];
        if (id >= 0 && id < V) atomicAdd(&counts[id], 1);
    }
}

// Exclusive scan of a pair of ints over the block (SCAN_THREADS threads); returns the
// block totals in *total_a, *total_b.
__device__ __forceinline__ void block_exclusive_scan2(int& a, int& b, int* total_a, int* total_b) {
    __shared__ int warp_a[32], warp_b[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int ia = a, ib = b;  // inclusive scans within the warp
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        const int na = __shfl_up_sync(0xffffffffu, ia, offset), nb = __shfl_up_sync(0xffffffffu, ib, offset);
        if (lane >= offset) { ia += na; ib += nb; }
    }
    if (lane == 31) { warp_a[warp] = ia; warp_b[warp] = ib; }
    __syncthreads();
    if (warp == 0) {
        int wa = warp_a[lane], wb = warp_b[lane];
#pragma unroll
        for (int offset = 1; offset < 32; offset <<= 1) {
            const int na = __shfl_up_sync(0xffffffffu, wa, offset), nb = __shfl_up_sync(0xffffffffu, wb, offset);
            if (lane >= offset) { wa += na; wb += nb; }
        }
        warp_a[lane] = wa;  // inclusive prefix over warps
        warp_b[lane] = wb;
    }
    __syncthreads();
    const int before_a = warp == 0 ? 0 : warp_a[warp - 1], before_b = warp == 0 ? 0 : warp_b[warp - 1];
    a = before_a + ia - a;
    b = before_b + ib - b;
    *total_a = warp_a[31];
    *total_b = warp_b[31];
}

// One block of SCAN_THREADS threads; thread i scans the contiguous ids [i*per, (i+1)*per).
// offsets: [V+1] int32, uniq: [>= number of distinct ids] int32, n_uniq: [1] int32,
// counts: [V] int32
extern "C" __global__ void __launch_bounds__(SCAN_THREADS)
embedding_bwd_scan(int* __restrict__ offsets, int* __restrict__ uniq, int* __restrict__ n_uniq,
                   const int* __restrict__ counts, int V) {
    const int per = (V + SCAN_THREADS - 1) / SCAN_THREADS;
    const int begin = min(threadIdx.x * per, V), end = min(begin + per, V);
    int tokens_before = 0, ids_before = 0;
    for (int v = begin; v < end; v++) {
        tokens_before += counts[v];
        ids_before += counts[v] > 0;
    }
    int total_tokens, total_ids;
    block_exclusive_scan2(tokens_before, ids_before, &total_tokens, &total_ids);
    for (int v = begin; v < end; v++) {
        offsets[v] = tokens_before;
        tokens_before += counts[v];
        if (counts[v] > 0) uniq[ids_before++] = v;
    }
    if (threadIdx.x == 0) {
        offsets[V] = total_tokens;
        *n_uniq = total_ids;
    }
}

// bucket: [T] int32, cursor: [V] int32 (zeroed), offsets: [V+1] int32, tokens: [T] int32
extern "C" __global__ void embedding_bwd_fill(int* __restrict__ bucket, int* __restrict__ cursor,
                                              const int* __restrict__ offsets, const int* __restrict__ tokens, int T, int V) {
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < T; t += gridDim.x * blockDim.x) {
        const int id = tokens[t];
        if (id >= 0 && id < V) bucket[offsets[id] + atomicAdd(&cursor[id], 1)] = t;
    }
}

// sorted: [T] int32, bucket: [T] int32, offsets: [V+1] int32, tokens: [T] int32
extern "C" __global__ void embedding_bwd_rank(int* __restrict__ sorted, const int* __restrict__ bucket,
                                              const int* __restrict__ offsets, const int* __restrict__ tokens, int T, int V) {
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < T; t += gridDim.x * blockDim.x) {
        const int id = tokens[t];
        if (id < 0 || id >= V) continue;
        const int begin = offsets[id], end = offsets[id + 1];
        int rank = 0;
        for (int j = begin; j < end; j++) rank += bucket[j] < t;
        sorted[begin + rank] = t;
    }
}

// Block b (blockDim.x = round_up(D/8, 32)) owns vocabulary row uniq[b]: thread c sums
// columns 8c..8c+8 of the rows sorted[offsets[id] ..] in a fixed order (entry j into
// accumulator j % 4, four rows in flight at a time, then (a0 + a1) + (a2 + a3)) and adds the
// total to dw once.
// dw: [V, D] fp32 (+=), dout: [T, D] bf16, sorted: [T] int32, offsets: [V+1] int32,
// uniq: [gridDim.x] int32, n_uniq: [1] int32
#define REDUCE_ROWS 4
extern "C" __global__ void embedding_bwd_reduce(float* __restrict__ dw, const bf16* __restrict__ dout,
                                                const int* __restrict__ sorted, const int* __restrict__ offsets,
                                                const int* __restrict__ uniq, const int* __restrict__ n_uniq, int D,
                                                float scale) {
    const int c = threadIdx.x;
    if ((int)blockIdx.x >= *n_uniq || c >= D / 8) return;
    const int id = uniq[blockIdx.x];
    const int begin = offsets[id], end = offsets[id + 1];
    float acc[REDUCE_ROWS][8] = {};
    int j = begin;
    for (; j + REDUCE_ROWS <= end; j += REDUCE_ROWS) {
        bf16x8 rows[REDUCE_ROWS];
#pragma unroll
        for (int u = 0; u < REDUCE_ROWS; u++) rows[u] = reinterpret_cast<const bf16x8*>(dout + (int64_t)sorted[j + u] * D)[c];
#pragma unroll
        for (int u = 0; u < REDUCE_ROWS; u++) {
            float x[8];
            bf16x8_to_float(rows[u], x);
#pragma unroll
            for (int e = 0; e < 8; e++) acc[u][e] = fmaf(x[e], scale, acc[u][e]);
        }
    }
    for (; j < end; j++) {
        float x[8];
        bf16x8_to_float(reinterpret_cast<const bf16x8*>(dout + (int64_t)sorted[j] * D)[c], x);
#pragma unroll
        for (int e = 0; e < 8; e++) acc[0][e] = fmaf(x[e], scale, acc[0][e]);
    }
    float4* dst = reinterpret_cast<float4*>(dw + (int64_t)id * D + 8 * c);
    float total[8];
#pragma unroll
    for (int e = 0; e < 8; e++) total[e] = (acc[0][e] + acc[1][e]) + (acc[2][e] + acc[3][e]);
    float4 lo = dst[0], hi = dst[1];
    lo.x += total[0]; lo.y += total[1]; lo.z += total[2]; lo.w += total[3];
    hi.x += total[4]; hi.y += total[5]; hi.z += total[6]; hi.w += total[7];
    dst[0] = lo;
    dst[1] = hi;
}
