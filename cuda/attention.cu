// attention: PrefixLM attention over a packed batch, FlashAttention-2 style (sm_80+, mma.sync).
//
// Shapes: T tokens, NH heads, HD = 128, S samples. q, k, v, o, do, dq, dk, dv: [T, NH, HD]
// bf16 (token-major, like FlashAttention's varlen layout); q, k, v and dq, dk, dv have rows
// `ld` elements apart (ld = 4 NH HD: they are blocks of the fused projection gqkv [T, 4 NH HD]
// and of its gradient, as are the gate g and dg); lse, delta: [NH, T] fp32; cu_seqlens: [S+1]
// i32; prefix_lens: [S] i32. The math is in src/ops/attention.rs and the story of the kernels
// in docs/attention.md.
//
// The sigmoid output gate is fused in (src/ops/gate.rs): the forward writes y = sigmoid(g) * o
// (contiguous) and never o; the backward starts from dy and y, and its first kernel writes the
// gate's gradient dg, the attention's do = dy * sigmoid(g) (contiguous, a workspace) and delta.
//
// Invariants
// - Forward writes every row of y and lse: padding rows get y = 0, lse = -inf. Backward
//   writes every row of dq, dk, dv, dg (=, not +=); padding rows get 0.
// - Deterministic: every output element is produced by exactly one thread block, which sums
//   its terms in a fixed order; no atomics. dK/dV (one block per key tile, looping over query
//   tiles) and dQ (one block per query tile, looping over key tiles) are separate kernels, at
//   the price of computing Q K^T and dO V^T twice.
// - The sample table is read on the device only (`attention_spans`), so a step that calls
//   these kernels can be captured in a CUDA graph. A malformed table (decreasing offsets,
//   offsets past T, prefix longer than its sample) is clamped: results are then wrong but no
//   access leaves the buffers.
// - Tiles are packed-batch tiles: rows [m0, m0 + BM) whatever samples they hold. A block
//   visits only the key tiles its rows see; per warp (16 rows), a key tile is skipped when
//   none of its keys is visible, run without mask arithmetic when all are, and masked only
//   on the boundary. Blocks start in order of decreasing work (`attention_schedule`).
// - Masked scores never reach exp(): a masked probability is set to 0, not computed from
//   -inf (padding rows have lse = -inf, and -inf - -inf is NaN). Masked keys inside a
//   tile must hold finite values (they are real rows of the batch: padding tokens'
//   projections are finite), and keys past T are zero-filled.

#include "attention.cuh"

// ---------------------------------------------------------------------------------------
// PTX wrappers: asynchronous copies, ldmatrix, the bf16 tensor-core MMA.
// ---------------------------------------------------------------------------------------

// 16-byte global -> shared copy; reads `bytes` (0 or 16) and zero-fills the rest.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int bytes) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}

// 4-byte global -> shared copy; reads `bytes` (0 or 4) and zero-fills the rest.
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, int bytes) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Four 8x8 b16 matrices; lane l gives the row address of matrix l / 8 and receives, from
// each matrix i, the pair (row l / 4, columns 2 (l % 4), +1) in r[i].
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const bf16* smem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

// The same, transposed: lane l receives (rows 2 (l % 4), +1, column l / 4) of each matrix.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const bf16* smem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

// c[16x8] += a[16x16] @ b[16x8], bf16 inputs, fp32 accumulators. With g = lane / 4 and
// u = lane % 4: a = {(g, 2u..2u+1), (g+8, 2u..), (g, 2u+8..), (g+8, 2u+8..)} as bf16 pairs,
// b = {(k 2u..2u+1, n g), (k 2u+8.., n g)}, c = {(g, 2u), (g, 2u+1), (g+8, 2u), (g+8, 2u+1)}.
__device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------------------------------
// Fragment loads from swizzled [rows][HD] tiles. "Row-operand" loads serve both the A
// operand of a 16-row block and, transposed, the B operand whose k index runs along rows;
// "column-operand" loads serve a B operand whose n index runs along rows.
// ---------------------------------------------------------------------------------------

// A fragment of rows [row0, row0+16) x columns [16 kk, 16 kk + 16) (non-transposed), or,
// with TRANS, the B fragments {n-tile 2j: r0, r1; n-tile 2j+1: r2, r3} of k = rows
// [row0, row0+16), n = columns [16 j, 16 j + 16) (pass j as kk).
template <bool TRANS>
__device__ __forceinline__ void load_rows16(uint32_t r[4], const bf16* tile, int row0, int kk, int lane) {
    const bf16* p = tile + attn_swz(row0 + (lane & 7) + (((lane >> 3) & 1) << 3), 2 * kk + (lane >> 4));
    if (TRANS) ldmatrix_x4_trans(r, p);
    else ldmatrix_x4(r, p);
}

// B fragments {n-tile 2j: r0, r1; n-tile 2j+1: r2, r3} of n = rows [16 j, 16 j + 16),
// k = columns [16 kk, 16 kk + 16): the operand of X @ tile^T.
__device__ __forceinline__ void load_cols16(uint32_t r[4], const bf16* tile, int j, int kk, int lane) {
    ldmatrix_x4(r, tile + attn_swz(16 * j + (lane & 7) + ((lane >> 4) << 3), 2 * kk + ((lane >> 3) & 1)));
}

// Copies rows [row0, row0 + ROWS) of head h of x: [T, NH, HD] (rows ld elements apart) into
// the swizzled tile [ROWS][HD]; rows past T are zero-filled.
template <int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(bf16* tile, const bf16* x, int row0, int T, int ld, int h) {
    for (int i = threadIdx.x; i < ROWS * ATTN_CHUNKS; i += THREADS) {
        int r = i / ATTN_CHUNKS, c = i % ATTN_CHUNKS, gr = row0 + r;
        bool valid = gr < T;
        const bf16* src = x + (size_t)(valid ? gr : 0) * ld + h * ATTN_HD + c * 8;
        cp_async16(tile + attn_swz(r, c), src, valid ? 16 : 0);
    }
}

// Copies v[h * T + row0 + i] for i < ROWS into s[ROWS]; entries past T are zero-filled.
template <int ROWS>
__device__ __forceinline__ void load_row_values(float* s, const float* v, int row0, int T, int h) {
    for (int i = threadIdx.x; i < ROWS; i += blockDim.x) {
        bool valid = row0 + i < T;
        cp_async4(s + i, v + (size_t)h * T + (valid ? row0 + i : 0), valid ? 4 : 0);
    }
}

// Writes a warp's 16 staged rows (swizzled, rows [row0, row0+16) of `tile`) to rows
// [grow0, grow0 + 16) of head h of x: [T, NH, HD] (rows ld elements apart), skipping rows past
// T; 16-byte stores. With a `gate` (the gate block of gqkv, rows gate_ld apart) the rows are
// gated on the way: x = sigmoid(g) * tile (the forward's output y).
__device__ __forceinline__ void store_rows16(bf16* x, const bf16* tile, int row0, int grow0, int T, int ld, int h, int lane,
                                             const bf16* gate = nullptr, int gate_ld = 0) {
    constexpr int ITERS = 16 * ATTN_CHUNKS / 32;
    // The gate's values first, all loads in flight at once.
    bf16x8 g[ITERS];
    if (gate) {
        #pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            const int idx = it * 32 + lane, r = idx / ATTN_CHUNKS, c = idx % ATTN_CHUNKS;
            if (grow0 + r < T) g[it] = load_bf16x8(gate + (size_t)(grow0 + r) * gate_ld + h * ATTN_HD + c * 8);
        }
    }
    __syncwarp();
    #pragma unroll
    for (int it = 0; it < ITERS; ++it) {
        int idx = it * 32 + lane, r = idx / ATTN_CHUNKS, c = idx % ATTN_CHUNKS;
        if (grow0 + r < T) {
            const bf16x8 a = *reinterpret_cast<const bf16x8*>(tile + attn_swz(row0 + r, c));
            *reinterpret_cast<bf16x8*>(x + (size_t)(grow0 + r) * ld + h * ATTN_HD + c * 8) = gate ? attn_gate8(a, g[it]) : a;
        }
    }
}

// Stages a warp's fp32 accumulators acc[16 n-tiles][4] (rows row0 + g, row0 + g + 8, columns
// 8 nt + 2u, +1) as bf16 times `scale` into rows [row0, row0+16) of a swizzled tile.
__device__ __forceinline__ void stage_rows16(bf16* tile, const float acc[16][4], float scale0, float scale1, int row0, int lane) {
    int g = lane >> 2, u = lane & 3;
    #pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
        *reinterpret_cast<uint32_t*>(tile + attn_swz(row0 + g, nt) + 2 * u) = pack_bf16(acc[nt][0] * scale0, acc[nt][1] * scale0);
        *reinterpret_cast<uint32_t*>(tile + attn_swz(row0 + g + 8, nt) + 2 * u) = pack_bf16(acc[nt][2] * scale1, acc[nt][3] * scale1);
    }
}

// A bf16 A fragment (16 rows x 16 columns) from the fp32 accumulators of two adjacent n-tiles:
// the C layout of columns [16 kk, 16 kk + 16) is the A layout of a k16 step.
__device__ __forceinline__ void acc_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
    a[0] = pack_bf16(c0[0], c0[1]);
    a[1] = pack_bf16(c0[2], c0[3]);
    a[2] = pack_bf16(c1[0], c1[1]);
    a[3] = pack_bf16(c1[2], c1[3]);
}

// The union of the warps' spans, through shared memory: [*lo, *hi], empty when *lo > *hi.
// Ends with a __syncthreads.
template <int WARPS>
__device__ __forceinline__ void block_range(const WarpSpans& w, int* red, int* lo, int* hi) {
    int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
        red[warp] = w.lo;
        red[WARPS + warp] = w.hi;
    }
    __syncthreads();
    *lo = ATTN_EMPTY_LO;
    *hi = ATTN_EMPTY_HI;
    #pragma unroll
    for (int i = 0; i < WARPS; ++i) {
        *lo = min(*lo, red[i]);
        *hi = max(*hi, red[WARPS + i]);
    }
}

// ---------------------------------------------------------------------------------------
// Preparation: the span tables and the schedule.
// ---------------------------------------------------------------------------------------

// rows: [T] int2 (keys each query row sees), cols: [T] int2 (queries that see each key row),
// cu_seqlens: [S+1], prefix_lens: [S]. Block n < S fills sample n, block S the padding rows
// (before cu_seqlens[0] and from cu_seqlens[S] on). Grid: S + 1 blocks.
extern "C" __global__ void attention_spans(int2* __restrict__ rows, int2* __restrict__ cols, const int* __restrict__ cu_seqlens,
                                           const int* __restrict__ prefix_lens, int S, int T) {
    const int n = blockIdx.x;
    if (n == S) {
        const int first = min(max(cu_seqlens[0], 0), T);
        const int last = min(max(cu_seqlens[S], 0), T);
        for (int r = threadIdx.x; r < T; r += blockDim.x) {
            if (r < first || r >= last) {
                rows[r] = attn_empty_span();
                cols[r] = attn_empty_span();
            }
        }
        return;
    }
    const int a = min(max(cu_seqlens[n], 0), T);
    const int b = min(max(cu_seqlens[n + 1], a), T);
    const int p = min(max(prefix_lens[n], 0), b - a);
    for (int r = a + threadIdx.x; r < b; r += blockDim.x) {
        rows[r] = make_int2(a, a + max(r - a, p - 1));
        cols[r] = make_int2(r - a < p ? a : r, b - 1);
    }
}

// order: [ceil(T / tile)] tiles of `tile` rows sorted by decreasing work, ties by index;
// spans: [T] int2. A tile's work is the number of `step`-sized tiles of the other axis its
// spans touch. One block; dynamic shared memory: ceil(T / tile) ints. The ranking compares
// every pair of tiles: O(tiles^2 / threads), a few microseconds for tens of thousands of rows.
extern "C" __global__ void attention_schedule(int* __restrict__ order, const int2* __restrict__ spans, int T, int tile, int step) {
    extern __shared__ int cost[];
    const int ntiles = (T + tile - 1) / tile;
    for (int i = threadIdx.x; i < ntiles; i += blockDim.x) {
        int lo = ATTN_EMPTY_LO, hi = ATTN_EMPTY_HI;
        for (int r = i * tile; r < min(T, (i + 1) * tile); ++r) {
            int2 s = spans[r];
            lo = min(lo, s.x);
            hi = max(hi, s.y);
        }
        cost[i] = lo <= hi ? hi / step - lo / step + 1 : 0;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < ntiles; i += blockDim.x) {
        int rank = 0;
        for (int j = 0; j < ntiles; ++j) rank += cost[j] > cost[i] || (cost[j] == cost[i] && j < i);
        order[rank] = i;
    }
}

// ---------------------------------------------------------------------------------------
// Forward. One block of 8 warps per (query tile of 128 rows, head); warp w owns rows
// [16 w, 16 w + 16) and keeps its Q fragments in registers. Key/value tiles of 64 rows are
// double-buffered with cp.async. Online softmax in base 2, per row: running max m and sum l.
// ---------------------------------------------------------------------------------------

#define FWD_BM 128
#define FWD_BN 64
#define FWD_WARPS (FWD_BM / 16)
#define FWD_THREADS (FWD_WARPS * 32)
// sQ [BM][HD], sK [2][BN][HD], sV [2][BN][HD] bf16: 96 KB.
#define FWD_SMEM ((FWD_BM + 4 * FWD_BN) * ATTN_HD * 2)

// One key tile for one warp: S = Q K^T (16 x 64), online softmax, O += P V.
template <bool MASK>
__device__ __forceinline__ void fwd_tile(float o[16][4], float m[2], float l[2], const uint32_t qf[8][4], const bf16* sK,
                                         const bf16* sV, int k0, int2 sp0, int2 sp1, int lane) {
    float s[8][4];
    #pragma unroll
    for (int nt = 0; nt < 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
    #pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            uint32_t b[4];
            load_cols16(b, sK, j, kk, lane);
            mma_bf16(s[2 * j], qf[kk], b[0], b[1]);
            mma_bf16(s[2 * j + 1], qf[kk], b[2], b[3]);
        }
    }
    const int u = lane & 3;
    if (MASK) {
        #pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            #pragma unroll
            for (int c = 0; c < 4; ++c) {
                if (!attn_visible(c < 2 ? sp0 : sp1, k0 + 8 * nt + 2 * u + (c & 1))) s[nt][c] = -INFINITY;
            }
        }
    }
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        float mx = -INFINITY;
        #pragma unroll
        for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * i], s[nt][2 * i + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
        const float m_new = fmaxf(m[i], mx * ATTN_SCALE_LOG2);
        // A row with nothing visible yet keeps m = -inf; subtract 0 instead so no NaN appears.
        const float base = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = attn_exp2(m[i] - base);
        m[i] = m_new;
        float sum = 0.f;
        #pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            #pragma unroll
            for (int c = 2 * i; c < 2 * i + 2; ++c) {
                s[nt][c] = attn_exp2(fmaf(s[nt][c], ATTN_SCALE_LOG2, -base));
                sum += s[nt][c];
            }
        }
        l[i] = l[i] * alpha + sum;  // per-lane partial sum; the quad's lanes are added at the end
        #pragma unroll
        for (int nt = 0; nt < 16; ++nt) {
            o[nt][2 * i] *= alpha;
            o[nt][2 * i + 1] *= alpha;
        }
    }
    #pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        uint32_t a[4];
        acc_to_a(a, s[2 * kk], s[2 * kk + 1]);
        #pragma unroll
        for (int j = 0; j < 8; ++j) {
            uint32_t b[4];
            load_rows16<true>(b, sV, 16 * kk, j, lane);
            mma_bf16(o[2 * j], a, b[0], b[1]);
            mma_bf16(o[2 * j + 1], a, b[2], b[3]);
        }
    }
}

// y: [T, NH, HD] out, the gated output sigmoid(g) * o; lse: [NH, T] out; gate (g), q, k, v:
// [T, NH, HD] rows ld apart (the blocks of gqkv); rows: [T] int2 (attention_spans), order: [ceil(T / FWD_BM)]
// (attention_schedule with tile FWD_BM, step FWD_BN).
// Grid: ceil(T / FWD_BM) * NH blocks of FWD_THREADS; dynamic shared memory FWD_SMEM.
extern "C" __global__ void __launch_bounds__(FWD_THREADS, 1)
attention_fwd(bf16* __restrict__ y, float* __restrict__ lse, const bf16* __restrict__ gate, const bf16* __restrict__ q,
              const bf16* __restrict__ k, const bf16* __restrict__ v, const int2* __restrict__ rows, const int* __restrict__ order,
              int T, int NH, int ld) {
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* sQ = reinterpret_cast<bf16*>(smem);
    bf16* sK = sQ + FWD_BM * ATTN_HD;
    bf16* sV = sK + 2 * FWD_BN * ATTN_HD;
    __shared__ int red[2 * FWD_WARPS];

    const int h = blockIdx.x % NH;
    const int m0 = order[blockIdx.x / NH] * FWD_BM;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, u = lane & 3;
    const int r0 = m0 + 16 * warp + g, r1 = r0 + 8;  // this lane's two rows
    const int2 sp0 = r0 < T ? rows[r0] : attn_empty_span();
    const int2 sp1 = r1 < T ? rows[r1] : attn_empty_span();
    const WarpSpans ws(sp0, sp1);

    load_tile<FWD_BM, FWD_THREADS>(sQ, q, m0, T, ld, h);
    int key_lo, key_hi;
    block_range<FWD_WARPS>(ws, red, &key_lo, &key_hi);
    const int n_begin = key_lo <= key_hi ? key_lo / FWD_BN : 0;
    const int n_end = key_lo <= key_hi ? key_hi / FWD_BN + 1 : 0;
    if (n_begin < n_end) {
        load_tile<FWD_BN, FWD_THREADS>(sK, k, n_begin * FWD_BN, T, ld, h);
        load_tile<FWD_BN, FWD_THREADS>(sV, v, n_begin * FWD_BN, T, ld, h);
    }
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();

    uint32_t qf[8][4];
    #pragma unroll
    for (int kk = 0; kk < 8; ++kk) load_rows16<false>(qf[kk], sQ, 16 * warp, kk, lane);

    float acc[16][4];
    #pragma unroll
    for (int nt = 0; nt < 16; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    for (int n = n_begin; n < n_end; ++n) {
        const int buf = (n - n_begin) & 1;
        if (n + 1 < n_end) {  // prefetch the next tile into the other buffer
            load_tile<FWD_BN, FWD_THREADS>(sK + (buf ^ 1) * FWD_BN * ATTN_HD, k, (n + 1) * FWD_BN, T, ld, h);
            load_tile<FWD_BN, FWD_THREADS>(sV + (buf ^ 1) * FWD_BN * ATTN_HD, v, (n + 1) * FWD_BN, T, ld, h);
        }
        cp_async_commit();
        const int k0 = n * FWD_BN, k1 = k0 + FWD_BN - 1;
        const bf16* cK = sK + buf * FWD_BN * ATTN_HD;
        const bf16* cV = sV + buf * FWD_BN * ATTN_HD;
        if (ws.covers(k0, k1)) fwd_tile<false>(acc, m, l, qf, cK, cV, k0, sp0, sp1, lane);
        else if (!ws.misses(k0, k1)) fwd_tile<true>(acc, m, l, qf, cK, cV, k0, sp0, sp1, lane);
        cp_async_wait_all();  // the next tile has landed ...
        __syncthreads();      // ... for every thread, and nobody reads this buffer any more
    }

    // o = acc / l; lse = ln(sum_s exp(x)) = (m + log2 l) * ln 2. A row that saw nothing
    // (padding) has l = 0: o = 0, lse = -inf.
    float inv[2], row_lse[2];
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(FULL_MASK, l[i], 1);
        l[i] += __shfl_xor_sync(FULL_MASK, l[i], 2);
        inv[i] = l[i] > 0.f ? 1.f / l[i] : 0.f;
        row_lse[i] = l[i] > 0.f ? (m[i] + log2f(l[i])) * ATTN_LN2 : -INFINITY;
    }
    // The warp's rows of sQ are its own (read once, for qf): stage O there.
    stage_rows16(sQ, acc, inv[0], inv[1], 16 * warp, lane);
    store_rows16(y, sQ, 16 * warp, m0 + 16 * warp, T, NH * ATTN_HD, h, lane, gate, ld);
    if (u == 0) {
        if (r0 < T) lse[(size_t)h * T + r0] = row_lse[0];
        if (r1 < T) lse[(size_t)h * T + r1] = row_lse[1];
    }
}

// ---------------------------------------------------------------------------------------
// Backward. The gate's backward, which also gives delta = rowsum(dO * O); then dK, dV per
// key tile and dQ per query tile. With P = exp(scale Q K^T - lse) and dS = P * (dO V^T - delta):
//   dV = P^T dO, dK = scale dS^T Q, dQ = scale dS K.
// ---------------------------------------------------------------------------------------

// The gate's backward (attn_gate_bwd_row): da: [T, NH, HD] out (dO of the attention), dgqkv:
// the gate block of [T, 4 NH HD] out (rows ld apart), delta: [NH, T] out; dy, y: [T, NH, HD] (the
// gradient of the gated output, the gated output), gqkv: its gate block read (rows ld apart).
// One warp per (row, head).
extern "C" __global__ void attention_bwd_gate(bf16* __restrict__ da, bf16* __restrict__ dgqkv, float* __restrict__ delta,
                                              const bf16* __restrict__ dy, const bf16* __restrict__ gqkv, const bf16* __restrict__ y,
                                              int T, int NH, int ld) {
    const int64_t item = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;  // = row * NH + head
    const int lane = threadIdx.x % 32;
    if (item >= (int64_t)T * NH) return;
    const int64_t row = item / NH, h = item % NH, g_at = row * ld + h * ATTN_HD;
    const float sum = attn_gate_bwd_row(da + item * ATTN_HD, dgqkv + g_at, dy + item * ATTN_HD, gqkv + g_at, y + item * ATTN_HD, lane);
    if (lane == 0) delta[h * T + row] = sum;
}

// dK, dV: one block of 8 warps per (key tile of 128 rows, head); warp w owns keys
// [16 w, 16 w + 16) and accumulates dK, dV for them in registers. The block loops over query
// tiles of 64 rows (Q, dO, lse, delta double-buffered). Everything is computed transposed
// (keys as rows): S^T = K Q^T, P^T, dP^T = V dO^T, dS^T = P^T (dP^T - delta).
#define KV_BN 128
#define KV_BM 64
#define KV_WARPS (KV_BN / 16)
#define KV_THREADS (KV_WARPS * 32)
// sK [BN][HD], sV [BN][HD], sQ [2][BM][HD], sdO [2][BM][HD] bf16, then sLse [2][BM],
// sDelta [2][BM] fp32: 129 KB.
#define KV_SMEM ((2 * KV_BN + 4 * KV_BM) * ATTN_HD * 2 + 4 * KV_BM * 4)

// One query tile for one warp, in two halves of 32 queries so that S^T and dP^T of a half
// (16 registers each) fit beside the 128 accumulator registers of dK and dV. The halves are
// not unrolled: unrolled, their address arithmetic spilled (ptxas, nvcc 13.0).
template <bool MASK>
__device__ __forceinline__ void kv_tile(float dk[16][4], float dv[16][4], const bf16* sK, const bf16* sV, const bf16* sQ,
                                        const bf16* sdO, const float* sLse, const float* sDelta, int row0, int q0, int2 sp0,
                                        int2 sp1, int lane) {
    const int u = lane & 3;
    #pragma unroll 1
    for (int half = 0; half < 2; ++half) {
        // S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys x 32 queries.
        float st[4][4], dpt[4][4];
        #pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            #pragma unroll
            for (int c = 0; c < 4; ++c) st[nt][c] = dpt[nt][c] = 0.f;
        }
        #pragma unroll
        for (int kk = 0; kk < 8; ++kk) {
            uint32_t a[4], b[4];
            load_rows16<false>(a, sK, row0, kk, lane);
            #pragma unroll
            for (int j = 0; j < 2; ++j) {
                load_cols16(b, sQ, 2 * half + j, kk, lane);
                mma_bf16(st[2 * j], a, b[0], b[1]);
                mma_bf16(st[2 * j + 1], a, b[2], b[3]);
            }
            load_rows16<false>(a, sV, row0, kk, lane);
            #pragma unroll
            for (int j = 0; j < 2; ++j) {
                load_cols16(b, sdO, 2 * half + j, kk, lane);
                mma_bf16(dpt[2 * j], a, b[0], b[1]);
                mma_bf16(dpt[2 * j + 1], a, b[2], b[3]);
            }
        }
        // P^T = exp(scale S^T - lse[query]), dS^T = P^T (dP^T - delta[query]); masked entries are 0.
        #pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            #pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int col = 32 * half + 8 * nt + 2 * u + (c & 1);
                const bool masked = MASK && !attn_visible(c < 2 ? sp0 : sp1, q0 + col);
                const float p = attn_exp2(fmaf(st[nt][c], ATTN_SCALE_LOG2, -sLse[col] * ATTN_LOG2E));
                const float ds = p * (dpt[nt][c] - sDelta[col]);
                st[nt][c] = masked ? 0.f : p;
                dpt[nt][c] = masked ? 0.f : ds;
            }
        }
        // dV += P^T dO and dK += dS^T Q (scaled at the end), k = the half's 32 queries.
        #pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
            uint32_t p[4], ds[4];
            acc_to_a(p, st[2 * kk], st[2 * kk + 1]);
            acc_to_a(ds, dpt[2 * kk], dpt[2 * kk + 1]);
            #pragma unroll
            for (int j = 0; j < 8; ++j) {
                uint32_t b[4];
                load_rows16<true>(b, sdO, 16 * (2 * half + kk), j, lane);
                mma_bf16(dv[2 * j], p, b[0], b[1]);
                mma_bf16(dv[2 * j + 1], p, b[2], b[3]);
                load_rows16<true>(b, sQ, 16 * (2 * half + kk), j, lane);
                mma_bf16(dk[2 * j], ds, b[0], b[1]);
                mma_bf16(dk[2 * j + 1], ds, b[2], b[3]);
            }
        }
    }
}

// dk, dv: [T, NH, HD] out, rows ld apart; q, k, v: [T, NH, HD] rows ld apart; do: [T, NH, HD];
// lse, delta: [NH, T]; cols: [T] int2
// (attention_spans); order: [ceil(T / KV_BN)] (attention_schedule over cols, tile KV_BN,
// step KV_BM). Grid: ceil(T / KV_BN) * NH blocks of KV_THREADS; dynamic shared memory KV_SMEM.
extern "C" __global__ void __launch_bounds__(KV_THREADS, 1)
attention_bwd_dkv(bf16* __restrict__ dk, bf16* __restrict__ dv, const bf16* __restrict__ q, const bf16* __restrict__ k,
                  const bf16* __restrict__ v, const bf16* __restrict__ do_, const float* __restrict__ lse,
                  const float* __restrict__ delta, const int2* __restrict__ cols, const int* __restrict__ order, int T, int NH,
                  int ld) {
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* sK = reinterpret_cast<bf16*>(smem);
    bf16* sV = sK + KV_BN * ATTN_HD;
    bf16* sQ = sV + KV_BN * ATTN_HD;
    bf16* sdO = sQ + 2 * KV_BM * ATTN_HD;
    float* sLse = reinterpret_cast<float*>(sdO + 2 * KV_BM * ATTN_HD);
    float* sDelta = sLse + 2 * KV_BM;
    __shared__ int red[2 * KV_WARPS];

    const int h = blockIdx.x % NH;
    const int n0 = order[blockIdx.x / NH] * KV_BN;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2;
    const int j0 = n0 + 16 * warp + g, j1 = j0 + 8;  // this lane's two keys
    const int2 sp0 = j0 < T ? cols[j0] : attn_empty_span();
    const int2 sp1 = j1 < T ? cols[j1] : attn_empty_span();
    const WarpSpans ws(sp0, sp1);

    load_tile<KV_BN, KV_THREADS>(sK, k, n0, T, ld, h);
    load_tile<KV_BN, KV_THREADS>(sV, v, n0, T, ld, h);
    int q_lo, q_hi;
    block_range<KV_WARPS>(ws, red, &q_lo, &q_hi);
    const int m_begin = q_lo <= q_hi ? q_lo / KV_BM : 0;
    const int m_end = q_lo <= q_hi ? q_hi / KV_BM + 1 : 0;
    auto load_queries = [&](int m, int buf) {
        load_tile<KV_BM, KV_THREADS>(sQ + buf * KV_BM * ATTN_HD, q, m * KV_BM, T, ld, h);
        load_tile<KV_BM, KV_THREADS>(sdO + buf * KV_BM * ATTN_HD, do_, m * KV_BM, T, NH * ATTN_HD, h);
        load_row_values<KV_BM>(sLse + buf * KV_BM, lse, m * KV_BM, T, h);
        load_row_values<KV_BM>(sDelta + buf * KV_BM, delta, m * KV_BM, T, h);
    };
    if (m_begin < m_end) load_queries(m_begin, 0);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();

    float dk_acc[16][4], dv_acc[16][4];
    #pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
        #pragma unroll
        for (int c = 0; c < 4; ++c) dk_acc[nt][c] = dv_acc[nt][c] = 0.f;
    }
    for (int m = m_begin; m < m_end; ++m) {
        const int buf = (m - m_begin) & 1;
        if (m + 1 < m_end) load_queries(m + 1, buf ^ 1);
        cp_async_commit();
        const int q0 = m * KV_BM, q1 = q0 + KV_BM - 1;
        const bf16* cQ = sQ + buf * KV_BM * ATTN_HD;
        const bf16* cdO = sdO + buf * KV_BM * ATTN_HD;
        const float* cLse = sLse + buf * KV_BM;
        const float* cDelta = sDelta + buf * KV_BM;
        if (ws.covers(q0, q1)) kv_tile<false>(dk_acc, dv_acc, sK, sV, cQ, cdO, cLse, cDelta, 16 * warp, q0, sp0, sp1, lane);
        else if (!ws.misses(q0, q1)) kv_tile<true>(dk_acc, dv_acc, sK, sV, cQ, cdO, cLse, cDelta, 16 * warp, q0, sp0, sp1, lane);
        cp_async_wait_all();
        __syncthreads();
    }

    // The warp's rows of sK and sV are read only by the warp itself: stage dK, dV there.
    stage_rows16(sK, dk_acc, ATTN_SCALE, ATTN_SCALE, 16 * warp, lane);
    stage_rows16(sV, dv_acc, 1.f, 1.f, 16 * warp, lane);
    store_rows16(dk, sK, 16 * warp, n0 + 16 * warp, T, ld, h, lane);
    store_rows16(dv, sV, 16 * warp, n0 + 16 * warp, T, ld, h, lane);
}

// dQ: one block of 8 warps per (query tile of 128 rows, head), as the forward; warp w owns
// rows [16 w, 16 w + 16). Loops over key tiles of 64 rows (K, V double-buffered):
// S = Q K^T, P = exp(scale S - lse), dP = dO V^T, dS = P (dP - delta), dQ += dS K.
#define DQ_BM 128
#define DQ_BN 64
#define DQ_WARPS (DQ_BM / 16)
#define DQ_THREADS (DQ_WARPS * 32)
// sQ [BM][HD], sdO [BM][HD], sK [2][BN][HD], sV [2][BN][HD] bf16: 128 KB.
#define DQ_SMEM ((2 * DQ_BM + 4 * DQ_BN) * ATTN_HD * 2)

template <bool MASK>
__device__ __forceinline__ void dq_tile(float dq[16][4], const bf16* sQ, const bf16* sdO, const bf16* sK, const bf16* sV,
                                        const float lse2[2], const float dlt[2], int row0, int k0, int2 sp0, int2 sp1, int lane) {
    const int u = lane & 3;
    float s[8][4], dp[8][4];
    #pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
        #pragma unroll
        for (int c = 0; c < 4; ++c) s[nt][c] = dp[nt][c] = 0.f;
    }
    #pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
        uint32_t a[4], b[4];
        load_rows16<false>(a, sQ, row0, kk, lane);
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            load_cols16(b, sK, j, kk, lane);
            mma_bf16(s[2 * j], a, b[0], b[1]);
            mma_bf16(s[2 * j + 1], a, b[2], b[3]);
        }
        load_rows16<false>(a, sdO, row0, kk, lane);
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            load_cols16(b, sV, j, kk, lane);
            mma_bf16(dp[2 * j], a, b[0], b[1]);
            mma_bf16(dp[2 * j + 1], a, b[2], b[3]);
        }
    }
    // dS = P (dP - delta), P = exp2(scale log2(e) S - lse log2(e)); masked entries are 0.
    #pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
        #pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int i = c >> 1;
            const float p = attn_exp2(fmaf(s[nt][c], ATTN_SCALE_LOG2, -lse2[i]));
            const float ds = p * (dp[nt][c] - dlt[i]);
            s[nt][c] = MASK && !attn_visible(i == 0 ? sp0 : sp1, k0 + 8 * nt + 2 * u + (c & 1)) ? 0.f : ds;
        }
    }
    // dQ += dS K (scaled at the end), k = the 64 keys.
    #pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        uint32_t a[4];
        acc_to_a(a, s[2 * kk], s[2 * kk + 1]);
        #pragma unroll
        for (int j = 0; j < 8; ++j) {
            uint32_t b[4];
            load_rows16<true>(b, sK, 16 * kk, j, lane);
            mma_bf16(dq[2 * j], a, b[0], b[1]);
            mma_bf16(dq[2 * j + 1], a, b[2], b[3]);
        }
    }
}

// dq: [T, NH, HD] out, rows ld apart; q, k, v: [T, NH, HD] rows ld apart; do: [T, NH, HD];
// lse, delta: [NH, T]; rows: [T] int2;
// order: [ceil(T / DQ_BM)] (as the forward's). Grid: ceil(T / DQ_BM) * NH blocks of
// DQ_THREADS; dynamic shared memory DQ_SMEM.
extern "C" __global__ void __launch_bounds__(DQ_THREADS, 1)
attention_bwd_dq(bf16* __restrict__ dq, const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                 const bf16* __restrict__ do_, const float* __restrict__ lse, const float* __restrict__ delta,
                 const int2* __restrict__ rows, const int* __restrict__ order, int T, int NH, int ld) {
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* sQ = reinterpret_cast<bf16*>(smem);
    bf16* sdO = sQ + DQ_BM * ATTN_HD;
    bf16* sK = sdO + DQ_BM * ATTN_HD;
    bf16* sV = sK + 2 * DQ_BN * ATTN_HD;
    __shared__ int red[2 * DQ_WARPS];

    const int h = blockIdx.x % NH;
    const int m0 = order[blockIdx.x / NH] * DQ_BM;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2;
    const int r0 = m0 + 16 * warp + g, r1 = r0 + 8;
    const int2 sp0 = r0 < T ? rows[r0] : attn_empty_span();
    const int2 sp1 = r1 < T ? rows[r1] : attn_empty_span();
    const WarpSpans ws(sp0, sp1);
    // Rows that see nothing (padding, past T) are masked everywhere: their values are unused.
    const float lse2[2] = {r0 < T ? lse[(size_t)h * T + r0] * ATTN_LOG2E : 0.f, r1 < T ? lse[(size_t)h * T + r1] * ATTN_LOG2E : 0.f};
    const float dlt[2] = {r0 < T ? delta[(size_t)h * T + r0] : 0.f, r1 < T ? delta[(size_t)h * T + r1] : 0.f};

    load_tile<DQ_BM, DQ_THREADS>(sQ, q, m0, T, ld, h);
    load_tile<DQ_BM, DQ_THREADS>(sdO, do_, m0, T, NH * ATTN_HD, h);
    int key_lo, key_hi;
    block_range<DQ_WARPS>(ws, red, &key_lo, &key_hi);
    const int n_begin = key_lo <= key_hi ? key_lo / DQ_BN : 0;
    const int n_end = key_lo <= key_hi ? key_hi / DQ_BN + 1 : 0;
    if (n_begin < n_end) {
        load_tile<DQ_BN, DQ_THREADS>(sK, k, n_begin * DQ_BN, T, ld, h);
        load_tile<DQ_BN, DQ_THREADS>(sV, v, n_begin * DQ_BN, T, ld, h);
    }
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();

    float acc[16][4];
    #pragma unroll
    for (int nt = 0; nt < 16; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    for (int n = n_begin; n < n_end; ++n) {
        const int buf = (n - n_begin) & 1;
        if (n + 1 < n_end) {
            load_tile<DQ_BN, DQ_THREADS>(sK + (buf ^ 1) * DQ_BN * ATTN_HD, k, (n + 1) * DQ_BN, T, ld, h);
            load_tile<DQ_BN, DQ_THREADS>(sV + (buf ^ 1) * DQ_BN * ATTN_HD, v, (n + 1) * DQ_BN, T, ld, h);
        }
        cp_async_commit();
        const int k0 = n * DQ_BN, k1 = k0 + DQ_BN - 1;
        const bf16* cK = sK + buf * DQ_BN * ATTN_HD;
        const bf16* cV = sV + buf * DQ_BN * ATTN_HD;
        if (ws.covers(k0, k1)) dq_tile<false>(acc, sQ, sdO, cK, cV, lse2, dlt, 16 * warp, k0, sp0, sp1, lane);
        else if (!ws.misses(k0, k1)) dq_tile<true>(acc, sQ, sdO, cK, cV, lse2, dlt, 16 * warp, k0, sp0, sp1, lane);
        cp_async_wait_all();
        __syncthreads();
    }

    stage_rows16(sQ, acc, ATTN_SCALE, ATTN_SCALE, 16 * warp, lane);
    store_rows16(dq, sQ, 16 * warp, m0 + 16 * warp, T, ld, h, lane);
}

// ---------------------------------------------------------------------------------------
// Decode: NQ new query tokens of each of S samples against that sample's KV cache. For
// generation; correct and simple rather than fast (one warp per query and head, one key at
// a time).
// ---------------------------------------------------------------------------------------

// o: [S, NQ, NH, HD] out, q: [S, NQ, NH, HD], k_cache, v_cache: [S, C, NH, HD],
// kv_lens: [S] (cached tokens, the new ones included), prefix_lens: [S]. Query i of sample n
// sits at position pos = kv_lens[n] - NQ + i and sees cache keys 0..=max(pos, p - 1); a
// query with pos < 0 sees nothing and gets o = 0. Blocks of 128 threads, one warp per item.
extern "C" __global__ void attention_decode(bf16* __restrict__ o, const bf16* __restrict__ q, const bf16* __restrict__ k_cache,
                                            const bf16* __restrict__ v_cache, const int* __restrict__ kv_lens,
                                            const int* __restrict__ prefix_lens, int S, int NQ, int C, int NH) {
    const int64_t item = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;  // ((n * NQ) + i) * NH + h
    const int lane = threadIdx.x % 32;
    if (item >= (int64_t)S * NQ * NH) return;
    const int h = item % NH, i = (item / NH) % NQ, n = item / ((int64_t)NH * NQ);
    const int len = min(max(kv_lens[n], 0), C);
    const int pos = len - NQ + i;
    const int last = pos < 0 ? -1 : min(max(pos, prefix_lens[n] - 1), len - 1);

    const __nv_bfloat162* qp = reinterpret_cast<const __nv_bfloat162*>(q + item * ATTN_HD) + 2 * lane;
    const float2 q0 = __bfloat1622float2(qp[0]), q1 = __bfloat1622float2(qp[1]);
    float m = -INFINITY, l = 0.f, acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int s = 0; s <= last; ++s) {
        const size_t row = (((size_t)n * C + s) * NH + h) * ATTN_HD;
        const __nv_bfloat162* kp = reinterpret_cast<const __nv_bfloat162*>(k_cache + row) + 2 * lane;
        const __nv_bfloat162* vp = reinterpret_cast<const __nv_bfloat162*>(v_cache + row) + 2 * lane;
        const float2 k0 = __bfloat1622float2(kp[0]), k1 = __bfloat1622float2(kp[1]);
        float x = q0.x * k0.x + q0.y * k0.y + q1.x * k1.x + q1.y * k1.y;
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(FULL_MASK, x, off);
        x *= ATTN_SCALE_LOG2;
        const float m_new = fmaxf(m, x);
        const float alpha = attn_exp2(m - m_new), p = attn_exp2(x - m_new);
        const float2 v0 = __bfloat1622float2(vp[0]), v1 = __bfloat1622float2(vp[1]);
        l = l * alpha + p;
        acc[0] = acc[0] * alpha + p * v0.x;
        acc[1] = acc[1] * alpha + p * v0.y;
        acc[2] = acc[2] * alpha + p * v1.x;
        acc[3] = acc[3] * alpha + p * v1.y;
        m = m_new;
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    __nv_bfloat162* op = reinterpret_cast<__nv_bfloat162*>(o + item * ATTN_HD) + 2 * lane;
    op[0] = __floats2bfloat162_rn(acc[0] * inv, acc[1] * inv);
    op[1] = __floats2bfloat162_rn(acc[2] * inv, acc[3] * inv);
}
