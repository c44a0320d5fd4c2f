// embedding: the scaled token embedding and its deterministic backward (SPEC §3);
// mirrors src/ops/embedding.rs.
//
//   forward    out[t] = w[tokens[t]] * scale                          (bf16 out, bf16 w)
//   backward   dw[v] += scale * sum over {t : tokens[t] == v} of dout[t]   (fp32 dw, +=)
//
// The backward must give the same bits on every run, so it cannot let float atomics race
// on a row of dw. It needs the token positions sorted by id, stably (t ascending within an
// id), and each id's run in that order:
//
//   sorted    [T]    the positions t, ordered by tokens[t]
//   offsets   [V+1]  id v owns sorted[offsets[v] .. offsets[v+1]); offsets[V] = the valid tokens
//
// The host computes both (TokenOrder in src/ops/embedding.rs: a counting sort, O(T + V))
// when the batch is uploaded, since the ids are known before the step, and copies them
// here asynchronously. On the device the backward is the one reduce kernel below: block c
// owns sorted positions [c*CHUNK, (c+1)*CHUNK); it walks them in order, summing each id's
// run into registers; a run that lies inside the chunk is added to dw at once, a run that
// crosses a chunk boundary leaves its piece in a partial row, and the block that finishes
// a run's last piece (an atomic ticket per run) adds the pieces in chunk order to dw.
//
// Fixed-size chunks keep every block's work the same whatever the distribution of ids: a
// batch dominated by one id (padding) is split over many blocks instead of serialising on
// one.
//
// Invariants
// - D % 8 == 0, D <= 8192, every pointer 16-byte aligned (the launcher checks).
// - Token ids outside 0..V are skipped (the forward writes a zero row for them; the sort
//   puts their positions after offsets[V], where the reduce never reads): the data
//   pipeline guarantees ids < V, this only keeps a bad id from reading out of bounds.
// - The chunk tickets are zero before each launch: zeroed when allocated, and each is set
//   back to zero by the block that draws its last ticket (no other block touches it after).
// - Every sum has a fixed order (t ascending within a piece, pieces in chunk order), and
//   each row of dw is written by exactly one block: bitwise reproducible.

#include "common.cuh"

// Rows of out per block of the forward (one warp each), and 16-byte vectors a lane loads
// before it stores the first.
#define FWD_WARPS 8
#define FWD_UNROLL 4

// One warp per row (grid-striding if the grid is short): the warp reads its token id
// once, then copies the row 32 * FWD_UNROLL vectors at a time, every lane's FWD_UNROLL
// loads in flight before the first store. (v1 ran one thread per 16-byte vector of out,
// with a 64-bit division per vector to find its row and 2-byte loads, and reached 70% of
// the copy bandwidth on an H200.)
// out: [T, D] bf16, tokens: [T] int32, w: [V, D] bf16
extern "C" __global__ void __launch_bounds__(FWD_WARPS * 32)
embedding_fwd(bf16* __restrict__ out, const int* __restrict__ tokens, const bf16* __restrict__ w, int T, int D, int V,
              float scale) {
    const int lane = threadIdx.x % 32, n_vec = D / 8;
    for (int64_t row = (int64_t)blockIdx.x * FWD_WARPS + threadIdx.x / 32; row < T; row += (int64_t)gridDim.x * FWD_WARPS) {
        const int id = tokens[row];
        const bool valid = id >= 0 && id < V;
        const bf16* src = w + (int64_t)(valid ? id : 0) * D;
        bf16* dst = out + row * D;
        for (int c0 = lane; c0 < n_vec; c0 += 32 * FWD_UNROLL) {
            bf16x8 v[FWD_UNROLL];
#pragma unroll
            for (int u = 0; u < FWD_UNROLL; u++) {
                const int c = c0 + 32 * u;
                if (valid && c < n_vec) v[u] = load_bf16x8(src + 8 * c);
            }
#pragma unroll
            for (int u = 0; u < FWD_UNROLL; u++) {
                const int c = c0 + 32 * u;
                if (c >= n_vec) continue;
                float f[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                if (valid) bf16x8_to_float(v[u], f);
#pragma unroll
                for (int e = 0; e < 8; e++) f[e] *= scale;
                *reinterpret_cast<bf16x8*>(dst + 8 * c) = float_to_bf16x8(f);
            }
        }
    }
}

// ---- the backward ----------------------------------------------------------------------

// Sorted positions per reduce block. Small, so that T/CHUNK blocks fill the device; a run
// longer than a chunk costs one partial row per chunk it covers.
#define CHUNK 16
#define REDUCE_BATCH 4

// dst[0..8) += add[0..8) for one fp32 row slice. dst: [8] fp32, 16-byte aligned
__device__ __forceinline__ void add_to_row(float* dst, const float add[8]) {
    float4* d = reinterpret_cast<float4*>(dst);
    float4 lo = d[0], hi = d[1];
    lo.x += add[0]; lo.y += add[1]; lo.z += add[2]; lo.w += add[3];
    hi.x += add[4]; hi.y += add[5]; hi.z += add[6]; hi.w += add[7];
    d[0] = lo;
    d[1] = hi;
}

// Sums, in chunk order, the pieces of the run [begin, end) of sorted positions that crosses
// chunk boundaries: the tail piece of the chunk it starts in (slot 1), then the head piece
// (slot 0) of every later chunk it covers; adds the total to dw_row. Thread c does columns
// 8c..8c+8. partials: [n_chunks, 2, D] fp32, dw_row: [D] fp32 (+=)
__device__ __forceinline__ void combine_pieces(float* __restrict__ dw_row, const float* __restrict__ partials, int begin,
                                               int end, int D, int c) {
    const int first = begin / CHUNK, last = (end - 1) / CHUNK;
    float total[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int chunk = first; chunk <= last; chunk++) {
        const int slot = chunk == first ? 1 : 0;
        // Written by other blocks: read from L2 (__ldcg), past this SM's L1.
        const float4* p = reinterpret_cast<const float4*>(partials + ((int64_t)chunk * 2 + slot) * D + 8 * c);
        const float4 lo = __ldcg(p), hi = __ldcg(p + 1);
        total[0] += lo.x; total[1] += lo.y; total[2] += lo.z; total[3] += lo.w;
        total[4] += hi.x; total[5] += hi.y; total[6] += hi.z; total[7] += hi.w;
    }
    add_to_row(dw_row + 8 * c, total);
}

// Block c (blockDim.x = round_up(D/8, 32); thread k does columns 8k..8k+8) owns sorted
// positions [c*CHUNK, min((c+1)*CHUNK, T)). It walks them in order, REDUCE_BATCH rows of
// dout in flight at a time, accumulating scale * dout[sorted[j]] for the current id. Where
// the id's run ends (or the chunk does) the piece is flushed:
// - a run entirely inside the chunk: dw[id] += sum, at once;
// - otherwise the piece goes to partials[c][slot]: slot 0 for the run that began before
//   the chunk (its head piece, or the whole chunk), slot 1 for the run that begins in the
//   chunk and goes on past it (its tail piece). Each such run then takes a ticket on
//   tickets[first chunk of the run]; the block that draws the last ticket sums the pieces.
// The drawer of a run's last ticket also sets the ticket back to zero for the next launch.
// Sorted positions run to offsets[V] (T less the tokens with ids outside 0..V); blocks past
// that return at once.
// dw: [V, D] fp32 (+=), partials: [ceil(T/CHUNK), 2, D] fp32, tickets: [ceil(T/CHUNK)] int32
// (zero, left zero), dout: [T, D] bf16, tokens: [T] int32, sorted: [T] int32, offsets:
// [V+1] int32
extern "C" __global__ void embedding_bwd_reduce(float* __restrict__ dw, float* __restrict__ partials,
                                                int* __restrict__ tickets, const bf16* __restrict__ dout,
                                                const int* __restrict__ tokens, const int* __restrict__ sorted,
                                                const int* __restrict__ offsets, int D, int V, float scale) {
    // Per position of the chunk: token t, id, and the id's run [begin, end) in sorted order.
    __shared__ int pos_t[CHUNK], pos_id[CHUNK], run_begin[CHUNK], run_end[CHUNK];
    __shared__ int finishes[2];
    const int chunk = blockIdx.x, j0 = chunk * CHUNK, sorted_len = offsets[V];
    if (j0 >= sorted_len) return;
    const int n = min(CHUNK, sorted_len - j0);
    if (threadIdx.x < n) {
        // An id outside 0..V here means the order is of other tokens (the caller's bug):
        // clamped, so that the sums are wrong but every access stays in bounds.
        const int t = sorted[j0 + threadIdx.x], id = min(max(tokens[t], 0), V - 1);
        pos_t[threadIdx.x] = t;
        pos_id[threadIdx.x] = id;
        run_begin[threadIdx.x] = offsets[id];
        run_end[threadIdx.x] = offsets[id + 1];
    }
    __syncthreads();

    const int c = threadIdx.x;
    const bool active = c < D / 8;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int k0 = 0; k0 < n; k0 += REDUCE_BATCH) {
        bf16x8 rows[REDUCE_BATCH];
#pragma unroll
        for (int q = 0; q < REDUCE_BATCH; q++) {
            if (active && k0 + q < n) rows[q] = load_bf16x8(dout + (int64_t)pos_t[k0 + q] * D + 8 * c);
        }
#pragma unroll
        for (int q = 0; q < REDUCE_BATCH; q++) {
            const int k = k0 + q;
            if (k >= n || !active) continue;
            float x[8];
            bf16x8_to_float(rows[q], x);
#pragma unroll
            for (int e = 0; e < 8; e++) acc[e] = fmaf(x[e], scale, acc[e]);
            if (run_end[k] != j0 + k + 1 && k + 1 != n) continue;  // the piece goes on
            if (run_begin[k] >= j0 && run_end[k] <= j0 + n) {
                add_to_row(dw + (int64_t)pos_id[k] * D + 8 * c, acc);
            } else {
                const int slot = run_begin[k] < j0 ? 0 : 1;
                float4* p = reinterpret_cast<float4*>(partials + ((int64_t)chunk * 2 + slot) * D + 8 * c);
                p[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
                p[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
            }
#pragma unroll
            for (int e = 0; e < 8; e++) acc[e] = 0.0f;
        }
    }

    // Runs crossing the chunk's edges: the first position's run if it began before the
    // chunk, the last position's run if it began inside and goes on past the end.
    const bool head = run_begin[0] < j0;
    const bool tail = run_end[n - 1] > j0 + n && run_begin[n - 1] >= j0;
    if (!head && !tail) return;  // uniform over the block (shared values)
    __threadfence();  // this block's partial rows are visible device-wide before its tickets
    __syncthreads();
    if (threadIdx.x == 0) {
        finishes[0] = finishes[1] = 0;
        for (int side = 0; side < 2; side++) {
            const int k = side == 0 ? 0 : n - 1;
            if (side == 0 ? !head : !tail) continue;
            const int first = run_begin[k] / CHUNK, pieces = (run_end[k] - 1) / CHUNK - first + 1;
            finishes[side] = atomicAdd(&tickets[first], 1) == pieces - 1;
            if (finishes[side]) tickets[first] = 0;  // every piece has drawn: reset for the next launch
        }
    }
    __syncthreads();
    __threadfence();  // the other blocks' pieces, published before their tickets, are read after ours
    for (int side = 0; side < 2; side++) {
        const int k = side == 0 ? 0 : n - 1;
        if (finishes[side] && active) combine_pieces(dw + (int64_t)pos_id[k] * D, partials, run_begin[k], run_end[k], D, c);
    }
}
