// embedding: the scaled token embedding and its deterministic backward (SPEC §3);
// mirrors src/ops/embedding.rs.
//
//   forward    out[t] = w[tokens[t]] * scale                          (bf16 out, bf16 w)
//   backward   dw[v] += scale * sum over {t : tokens[t] == v} of dout[t]   (fp32 dw, +=)
//
// The backward must give the same bits on every run, so it cannot let float atomics race
// on a row of dw. It sorts the token positions by id (a stable counting sort, integer
// atomics only), then sums each id's run of dout rows in sorted order (t ascending):
//
//   1. count      counts[v] = #{t : tokens[t] == v}                  (integer atomics: exact)
//   2. scan       offsets = exclusive prefix sum of counts: id v owns sorted[offsets[v] ..
//                 offsets[v+1])
//   3. fill       bucket[offsets[v] ..] = the t's of id v, in arbitrary order (atomic cursor)
//   4. rank       sorted[offsets[v] + #{t' in bucket of v : t' < t}] = t   (stable: t ascending)
//   5. reduce     block c owns sorted positions [c*CHUNK, (c+1)*CHUNK): it walks them in
//                 order, summing each id's run into registers; a run that lies inside the
//                 chunk is added to dw at once, a run that crosses a chunk boundary leaves
//                 its piece in a partial row, and the block that finishes a run's last
//                 piece (an atomic ticket per run) adds the pieces in chunk order to dw.
//
// Steps 1-4 are the fallback: for T that fits one block's shared memory (every model size),
// embedding_bwd_sort below does them in one launch (a radix sort on the id bits).
//
// Fixed-size chunks keep every block's work the same whatever the distribution of ids: a
// batch dominated by one id (padding) is split over many blocks instead of serialising on
// one. Step 4 costs sum_v count_v^2 comparisons: negligible for text, 2.7e8 in the
// degenerate batch of 16k copies of one token (still ~0.1 ms).
//
// Invariants
// - D % 8 == 0, D <= 8192, every pointer 16-byte aligned (the launcher checks).
// - Token ids outside 0..V are skipped (the forward writes a zero row for them): the data
//   pipeline guarantees ids < V, this only keeps a bad id from reading out of bounds.
// - Scratch counters (counts, cursors, tickets) are zeroed by the launcher before step 1
//   (by embedding_bwd_sort itself, tickets only, on its path).
// - Every sum has a fixed order (t ascending within a piece, pieces in chunk order), and
//   each row of dw is written by exactly one block: bitwise reproducible.

#include "common.cuh"

#define SCAN_THREADS 1024

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

// counts: [V] int32 (zeroed, +=), tokens: [T] int32
extern "C" __global__ void embedding_bwd_count(int* __restrict__ counts, const int* __restrict__ tokens, int T, int V) {
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < T; t += gridDim.x * blockDim.x) {
        const int id = tokens[t];
        if (id >= 0 && id < V) atomicAdd(&counts[id], 1);
    }
}

// Exclusive scan over the block (SCAN_THREADS threads); returns the block total in *total.
__device__ __forceinline__ int block_exclusive_scan(int a, int* total) {
    __shared__ int warp_sums[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int inclusive = a;  // within the warp
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += n;
    }
    if (lane == 31) warp_sums[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        int w = warp_sums[lane];
#pragma unroll
        for (int offset = 1; offset < 32; offset <<= 1) {
            const int n = __shfl_up_sync(0xffffffffu, w, offset);
            if (lane >= offset) w += n;
        }
        warp_sums[lane] = w;  // inclusive prefix over warps
    }
    __syncthreads();
    *total = warp_sums[31];
    return (warp == 0 ? 0 : warp_sums[warp - 1]) + inclusive - a;
}

// One block of SCAN_THREADS threads; thread i scans the contiguous ids [i*per, (i+1)*per).
// offsets: [V+1] int32, counts: [V] int32
extern "C" __global__ void __launch_bounds__(SCAN_THREADS)
embedding_bwd_scan(int* __restrict__ offsets, const int* __restrict__ counts, int V) {
    const int per = (V + SCAN_THREADS - 1) / SCAN_THREADS;
    const int begin = min(threadIdx.x * per, V), end = min(begin + per, V);
    int tokens_before = 0;
    for (int v = begin; v < end; v++) tokens_before += counts[v];
    int total;
    tokens_before = block_exclusive_scan(tokens_before, &total);
    for (int v = begin; v < end; v++) {
        offsets[v] = tokens_before;
        tokens_before += counts[v];
    }
    if (threadIdx.x == 0) offsets[V] = total;
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

// ---- steps 1-4 in one block: the radix sort -------------------------------------------
//
// For T up to what shared memory holds (8T + 33 KB; T <= ~24k on sm_90) and
// t_bits + id_bits <= 32, one block of SORT_THREADS replaces steps 1-4 (and the memset):
// the keys id << t_bits | t (ids outside 0..V become V, sorting last) sit in shared
// memory; an LSD radix sort on the id bits alone, RADIX_BITS at a time, orders them by id,
// and stability keeps each id's t ascending (the keys start in t order). Each pass:
//   count    warp w walks its contiguous segment of keys 32 at a time; __match_any_sync
//            groups the lanes by digit and the lowest lane of a group adds its size to
//            hist[digit][w] (no atomics: one writer per digit and warp per batch);
//   scan     exclusive prefix over hist in digit-major order (digit, then warp);
//   scatter  the same walk: a key goes to hist[digit][w] + #{lower lanes, same digit},
//            then the group's leader advances hist[digit][w].
// Then sorted[j] = t of key j, and only the offsets the reduce reads are written: each
// present id's start (offsets[id]) and end (offsets[id + 1]), and offsets[V] (the number
// of valid tokens). Entries of absent ids are left as they were and never read. The
// chunk tickets of step 5 are zeroed here too.

#define SORT_THREADS 1024
#define SORT_WARPS (SORT_THREADS / 32)
#define RADIX_BITS 8
#define RADIX (1 << RADIX_BITS)
// hist[digit][warp] at digit * HIST_PITCH + warp: the padding spreads one warp's leaders
// (different digits, same warp) over different banks.
#define HIST_PITCH (SORT_WARPS + 1)

// sorted: [T] int32, offsets: [V+1] int32 (sparsely written, see above), tickets:
// [n_tickets] int32 (zeroed), tokens: [T] int32. Dynamic shared memory:
// (2T + RADIX * HIST_PITCH) * 4 bytes.
extern "C" __global__ void __launch_bounds__(SORT_THREADS)
embedding_bwd_sort(int* __restrict__ sorted, int* __restrict__ offsets, int* __restrict__ tickets,
                   const int* __restrict__ tokens, int T, int V, int t_bits, int id_bits, int n_tickets) {
    extern __shared__ unsigned sort_smem[];
    unsigned* keys = sort_smem;
    unsigned* alt = sort_smem + T;
    int* hist = reinterpret_cast<int*>(sort_smem + 2 * T);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const unsigned lanes_below = (1u << lane) - 1;

    for (int i = threadIdx.x; i < n_tickets; i += SORT_THREADS) tickets[i] = 0;
    for (int t = threadIdx.x; t < T; t += SORT_THREADS) {
        int id = tokens[t];
        if (id < 0 || id >= V) id = V;
        keys[t] = ((unsigned)id << t_bits) | (unsigned)t;
    }
    const int seg = (T + SORT_WARPS - 1) / SORT_WARPS, lo = min(warp * seg, T), hi = min(lo + seg, T);

    for (int shift = t_bits; shift < t_bits + id_bits; shift += RADIX_BITS) {
        for (int i = threadIdx.x; i < RADIX * HIST_PITCH; i += SORT_THREADS) hist[i] = 0;
        __syncthreads();  // keys written (first pass) or scattered (previous pass); hist zero
        for (int b = lo; b < hi; b += 32) {  // warp-uniform bounds: every lane takes part
            const int i = b + lane;
            const unsigned digit = i < hi ? (keys[i] >> shift) & (RADIX - 1) : RADIX;
            const unsigned peers = __match_any_sync(0xffffffffu, digit);
            if (digit < RADIX && (peers & lanes_below) == 0) hist[digit * HIST_PITCH + warp] += __popc(peers);
            __syncwarp();
        }
        __syncthreads();
        {
            // Thread k owns the digit-major entries 8k .. 8k+8: digit k / 4, warps (k % 4) * 8 ..
            static_assert(RADIX * SORT_WARPS == 8 * SORT_THREADS, "scan layout");
            int* h = hist + (threadIdx.x / 4) * HIST_PITCH + (threadIdx.x % 4) * 8;
            int v[8], sum = 0;
#pragma unroll
            for (int e = 0; e < 8; e++) {
                v[e] = h[e];
                sum += v[e];
            }
            int total;
            int run = block_exclusive_scan(sum, &total);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                h[e] = run;
                run += v[e];
            }
        }
        __syncthreads();
        for (int b = lo; b < hi; b += 32) {
            const int i = b + lane;
            const unsigned key = i < hi ? keys[i] : 0u;
            const unsigned digit = i < hi ? (key >> shift) & (RADIX - 1) : RADIX;
            const unsigned peers = __match_any_sync(0xffffffffu, digit);
            if (digit < RADIX) alt[hist[digit * HIST_PITCH + warp] + __popc(peers & lanes_below)] = key;
            __syncwarp();
            if (digit < RADIX && (peers & lanes_below) == 0) hist[digit * HIST_PITCH + warp] += __popc(peers);
            __syncwarp();
        }
        __syncthreads();  // alt complete before it is read as keys
        unsigned* tmp = keys;
        keys = alt;
        alt = tmp;
    }

    const unsigned t_mask = (1u << t_bits) - 1;
    for (int j = threadIdx.x; j < T; j += SORT_THREADS) {
        const unsigned k = keys[j];
        const int id = (int)(k >> t_bits);
        sorted[j] = (int)(k & t_mask);
        const int prev = j == 0 ? -1 : (int)(keys[j - 1] >> t_bits);
        if (id != prev) {
            offsets[id] = j;                     // start of id's run (offsets[V] for the invalid)
            if (prev >= 0) offsets[prev + 1] = j;  // end of prev's run (== j if prev + 1 == id)
        }
        if (j == T - 1 && id < V) {
            offsets[id + 1] = T;  // end of the last run
            offsets[V] = T;       // every token valid
        }
    }
}

// ---- step 5 ----------------------------------------------------------------------------

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
// Sorted positions run to offsets[V] (T less the tokens with ids outside 0..V); blocks past
// that return at once.
// dw: [V, D] fp32 (+=), partials: [ceil(T/CHUNK), 2, D] fp32, tickets: [ceil(T/CHUNK)] int32
// (zeroed), dout: [T, D] bf16, tokens: [T] int32, sorted: [T] int32, offsets: [V+1] int32
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
        const int t = sorted[j0 + threadIdx.x], id = tokens[t];
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
        }
    }
    __syncthreads();
    __threadfence();  // the other blocks' pieces, published before their tickets, are read after ours
    for (int side = 0; side < 2; side++) {
        const int k = side == 0 ? 0 : n - 1;
        if (finishes[side] && active) combine_pieces(dw + (int64_t)pos_id[k] * D, partials, run_begin[k], run_end[k], D, c);
    }
}
