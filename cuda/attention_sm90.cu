// attention_sm90: the PrefixLM attention forward for Hopper, in the FlashAttention-3 design.
// hrm-cu: sm90a-only
//
// Same contract as attention_fwd in attention.cu (shapes, spans, schedule, invariants; read
// that file's header first); this file only changes how a block computes its tile.
//
// Design (FlashAttention-3, Shah et al. 2024, simplified):
// - A block of 3 warpgroups owns a query tile of 128 rows of one head. Warpgroup 0 is the
//   producer: one thread issues TMA copies (the copy engine moves tiles global -> shared and
//   zero-fills rows past T). Warpgroups 1 and 2 are consumers, 64 query rows each; they run
//   the matrix products on the tensor cores with wgmma (accumulators in registers) and the
//   softmax. `setmaxnreg` moves registers from the producer (40) to the consumers (232).
// - Key and value tiles of 128 rows go through a 2-stage ring. Each stage has a "full"
//   mbarrier (the producer arms it with the byte count, the copy engine completes it) and an
//   "empty" mbarrier (all 256 consumer threads arrive when done reading it).
// - Per key tile j, a consumer warpgroup issues S_j = Q K_j^T (8 wgmma, A and B from shared
//   memory) and O += P_{j-1} V_{j-1} (8 wgmma, P from registers, V through a transposed
//   descriptor) back to back, waits for the first, and runs the softmax of S_j (mask on
//   boundary tiles only) while the second is still on the tensor cores; then rescales O and
//   packs P_j. The two consumer warpgroups are independent, so one's softmax also overlaps
//   the other's products.
// - Shared memory tiles are [rows][64] bf16 half-tiles (128-byte rows) in the 128-byte
//   swizzle that both TMA (CU_TENSOR_MAP_SWIZZLE_128B) and wgmma descriptors (layout type 1)
//   use; a 128-wide row is two half-tiles 16 KB apart. Tiles start on 1024-byte boundaries
//   (the swizzle repeats every 8 rows of 128 bytes).
// - v5 and v6 add the ping-pong of the consumer warpgroups and a persistent grid (see
//   fwd_sm90 below); the backward is attention_bwd_sm90.cu.

#include "attention_sm90.cuh"

#define H_BM 128               // query rows per block: 2 consumer warpgroups x 64
#define H_BN 128               // keys per stage
#define H_THREADS 384          // producer warpgroup + 2 consumer warpgroups
#define H_HALF (128 * 128)     // bytes of one [128][64] bf16 half-tile
#define H_TILE (2 * H_HALF)    // bytes of one [128][128] tile
// sQ, sK[2], sV[2], sG (the gate block's rows of the item, for the epilogue), plus 1 KB to
// align the base to 1024 bytes: 193 KB; v6 double-buffers sQ: 225 KB.
#define H_SMEM (6 * H_TILE + 1024)
#define H_SMEM_PERSISTENT (7 * H_TILE + 1024)

// mbarrier indices
#define B_Q 0        // + Q buffer: Q landed
#define B_QEMPTY 2   // + Q buffer: both consumer warpgroups are done with it (v6)
#define B_KFULL 4    // + stage
#define B_VFULL 6    // + stage
#define B_KEMPTY 8   // + stage
#define B_VEMPTY 10  // + stage
#define B_GFULL 12   // the item's gate tile landed
#define B_GEMPTY 13  // both consumer warpgroups are done with the gate tile
#define B_COUNT 14

// ---------------------------------------------------------------------------------------
// The kernel.
// ---------------------------------------------------------------------------------------

// The key range [lo, hi] the 128 rows from m0 see; every lane of the calling warp gets it.
__device__ __forceinline__ void tile_key_range(const int2* rows, int m0, int T, int lane, int* lo, int* hi) {
    int a = ATTN_EMPTY_LO, b = ATTN_EMPTY_HI;
    #pragma unroll
    for (int i = 0; i < H_BM / 32; ++i) {
        const int r = m0 + 32 * i + lane;
        const int2 s = r < T ? rows[r] : attn_empty_span();
        a = min(a, s.x);
        b = max(b, s.y);
    }
    *lo = __reduce_min_sync(FULL_MASK, a);
    *hi = __reduce_max_sync(FULL_MASK, b);
}

// S = Q K^T for one key tile: 8 k16 steps over the head dim, 4 in each half-tile (q, k: K-major
// descriptors of the warpgroup's Q rows and of the key tile). One group.
__device__ __forceinline__ void issue_qk(float (&s)[64], uint64_t q, uint64_t k) {
    #pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
        const uint32_t off = (kk / 4) * H_HALF + (kk % 4) * 32;
        wgmma_ss(s, desc_plus(q, off), desc_plus(k, off), kk > 0);
    }
    wgmma_commit();
}

// O += P V for one key tile: 8 k16 steps over the keys (16 rows = 2048 bytes each); v: the
// MN-major descriptor of the value tile, its dims 64..127 one half-tile further. One group.
__device__ __forceinline__ void issue_pv(float (&acc)[64], const uint32_t (&p)[8][4], uint64_t v) {
    #pragma unroll
    for (int kk = 0; kk < 8; ++kk) wgmma_rs_bt(acc, p[kk], desc_plus(v, kk * 2048));
    wgmma_commit();
}

// The softmax of one tile, first half (it runs while the previous tile's P V is in flight, so
// it touches neither O nor P): masks (boundary tiles only), updates the row maxima m and sums
// l, turns S (64 rows x 128 keys; this thread's part: rows g and g+8 of its warp, keys
// 8 nt + 2u, +1) into unnormalised probabilities in place, and returns the factors by which
// O must be rescaled.
template <bool MASK>
__device__ __forceinline__ void softmax_probs(float (&s)[64], float (&m)[2], float (&l)[2], float (&alpha)[2], int k0, int2 sp0,
                                              int2 sp1, int u) {
    if (MASK) {
        #pragma unroll
        for (int nt = 0; nt < 16; ++nt) {
            #pragma unroll
            for (int c = 0; c < 4; ++c) {
                if (!attn_visible(c < 2 ? sp0 : sp1, k0 + 8 * nt + 2 * u + (c & 1))) s[4 * nt + c] = -INFINITY;
            }
        }
    }
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        float mx = -INFINITY;
        #pragma unroll
        for (int nt = 0; nt < 16; ++nt) mx = fmaxf(mx, fmaxf(s[4 * nt + 2 * i], s[4 * nt + 2 * i + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
        const float m_new = fmaxf(m[i], mx * ATTN_SCALE_LOG2);
        const float base = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: no NaN
        alpha[i] = attn_exp2(m[i] - base);
        m[i] = m_new;
        float sum = 0.f;
        #pragma unroll
        for (int nt = 0; nt < 16; ++nt) {
            #pragma unroll
            for (int c = 2 * i; c < 2 * i + 2; ++c) {
                s[4 * nt + c] = attn_exp2(fmaf(s[4 * nt + c], ATTN_SCALE_LOG2, -base));
                sum += s[4 * nt + c];
            }
        }
        l[i] = l[i] * alpha[i] + sum;  // per-thread partial sum; the quad is added at the end
    }
}

// The softmax of one tile, second half (once O is no longer being written): O *= alpha, and P
// as bf16 A fragments p[k16 step][4]; the accumulator layout of keys [16 kk, 16 kk + 16) is
// the A layout of a k16 step.
__device__ __forceinline__ void rescale_and_pack(float (&acc)[64], uint32_t (&p)[8][4], const float (&s)[64], const float (&alpha)[2]) {
    #pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
        acc[4 * nt] *= alpha[0];
        acc[4 * nt + 1] *= alpha[0];
        acc[4 * nt + 2] *= alpha[1];
        acc[4 * nt + 3] *= alpha[1];
    }
    #pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
        p[kk][0] = pack_bf16(s[8 * kk + 0], s[8 * kk + 1]);
        p[kk][1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
        p[kk][2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
        p[kk][3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
    }
}

// The kernel body, for three versions (docs/attention.md):
//   v3 <false, false>: one block per (query tile, head), the warpgroups free-running;
//   v5 <true, false>:  plus FlashAttention-3's ping-pong of the two consumer warpgroups;
//   v6 <true, true>:   plus persistence: one block per SM takes (query tile, head) items from a
//                      queue in schedule order (longest first), with Q double-buffered so that
//                      the next item's Q and first K/V tiles load during this item's last tiles.
// The tensor maps are the kernels' __grid_constant__ parameters, passed by reference so that
// TMA reads them in place. `next_item` (v6 only): a zeroed counter, the head of the queue.
template <bool PINGPONG, bool PERSISTENT>
__device__ __forceinline__ void fwd_sm90(const CUtensorMap& tm_q, const CUtensorMap& tm_k, const CUtensorMap& tm_v,
                                         const CUtensorMap& tm_g, bf16* __restrict__ y, float* __restrict__ lse,
                                         const int2* __restrict__ rows, const int* __restrict__ order, int T, int NH,
                                         int* __restrict__ next_item) {
    constexpr int Q_BUFS = PERSISTENT ? 2 : 1;
    extern __shared__ unsigned char smem_raw[];
    __shared__ __align__(8) uint64_t bars[B_COUNT];
    __shared__ int item_slot[2];  // v6: the item in each Q buffer, -1 when the queue is empty
    unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
    unsigned char* sQ = smem;                     // [Q_BUFS]
    unsigned char* sK = smem + Q_BUFS * H_TILE;   // [2 stages]
    unsigned char* sV = sK + 2 * H_TILE;          // [2 stages]
    unsigned char* sG = sV + 2 * H_TILE;          // the gate tile of the item in its epilogue
    const int n_items = (T + H_BM - 1) / H_BM * NH;
    const int lane = threadIdx.x % 32;

    if (threadIdx.x == 0) {
        for (int st = 0; st < 2; ++st) {
            mbar_init(&bars[B_Q + st], 1);
            mbar_init(&bars[B_QEMPTY + st], 2 * 128);
            mbar_init(&bars[B_KFULL + st], 1);
            mbar_init(&bars[B_VFULL + st], 1);
            mbar_init(&bars[B_KEMPTY + st], 2 * 128);
            mbar_init(&bars[B_VEMPTY + st], 2 * 128);
        }
        mbar_init(&bars[B_GFULL], 1);
        mbar_init(&bars[B_GEMPTY], 2 * 128);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    // Item k of this block: (query tile order[item / NH], head item % NH) in Q buffer k % Q_BUFS.
    // Its key tiles are numbered on from the previous items' (jbase), so that the K/V ring's
    // stages and phases run on across items.
    if (threadIdx.x < 128) {
        // Producer warp: one thread issues every copy; K before V so S = Q K^T can start early.
        // v6's producer also runs the queue and the ring across items: 56 registers, not 40.
        setmaxnreg_dec<PERSISTENT ? 56 : 40>();
        if (threadIdx.x >= 32) return;
        int jbase = 0;
        for (int k = 0;; ++k) {
            const int b = k % Q_BUFS;
            int item = k == 0 ? (int)blockIdx.x : -1;
            if (PERSISTENT) {
                item = lane == 0 ? atomicAdd(next_item, 1) : 0;
                item = __shfl_sync(FULL_MASK, item, 0);
                if (item >= n_items) item = -1;
                if (lane == 0) {
                    // Buffer b is free once both consumer warpgroups are done with item k - 2.
                    mbar_wait(&bars[B_QEMPTY + b], ((k >> 1) & 1) ^ 1);
                    item_slot[b] = item;
                    if (item < 0) mbar_arrive(&bars[B_Q + b]);  // "no more items", no copy
                }
            }
            if (item < 0) break;
            const int h = item % NH, m0 = order[item / NH] * H_BM;
            int key_lo, key_hi;
            tile_key_range(rows, m0, T, lane, &key_lo, &key_hi);
            const int n_begin = key_lo <= key_hi ? key_lo / H_BN : 0;
            const int n_tiles = key_lo <= key_hi ? key_hi / H_BN + 1 - n_begin : 0;
            if (lane == 0) {
                mbar_expect_tx(&bars[B_Q + b], H_TILE);
                tma_load(sQ + b * H_TILE, &tm_q, &bars[B_Q + b], 0, h, m0);
                tma_load(sQ + b * H_TILE + H_HALF, &tm_q, &bars[B_Q + b], 64, h, m0);
                for (int j = 0; j < n_tiles; ++j) {
                    const int st = (jbase + j) & 1;
                    const uint32_t phase = ((jbase + j) >> 1) & 1;
                    const int row = (n_begin + j) * H_BN;
                    mbar_wait(&bars[B_KEMPTY + st], phase ^ 1);
                    mbar_expect_tx(&bars[B_KFULL + st], H_TILE);
                    tma_load(sK + st * H_TILE, &tm_k, &bars[B_KFULL + st], 0, h, row);
                    tma_load(sK + st * H_TILE + H_HALF, &tm_k, &bars[B_KFULL + st], 64, h, row);
                    mbar_wait(&bars[B_VEMPTY + st], phase ^ 1);
                    mbar_expect_tx(&bars[B_VFULL + st], H_TILE);
                    tma_load(sV + st * H_TILE, &tm_v, &bars[B_VFULL + st], 0, h, row);
                    tma_load(sV + st * H_TILE + H_HALF, &tm_v, &bars[B_VFULL + st], 64, h, row);
                }
                // The gate tile, once the previous item's epilogue is done with sG: after the
                // key tiles, it lands while the consumers work through their last ones.
                mbar_wait(&bars[B_GEMPTY], (k & 1) ^ 1);
                mbar_expect_tx(&bars[B_GFULL], H_TILE);
                tma_load(sG, &tm_g, &bars[B_GFULL], 0, h, m0);
                tma_load(sG + H_HALF, &tm_g, &bars[B_GFULL], 64, h, m0);
            }
            jbase += n_tiles;
            __syncwarp();
        }
        return;
    }

    // Consumers: warpgroup wg owns rows [64 wg, 64 wg + 64) of each item's tile.
    setmaxnreg_inc<PERSISTENT ? 224 : 232>();  // 128 x 56 + 256 x 224 = 64,512 of 65,536
    const int wg = warpgroup_index() - 1;
    const int warp = (threadIdx.x % 128) / 32, g = lane >> 2, u = lane & 3;
    // Descriptors, built once: stage 0 of the K ring (K-major) and the V ring (MN-major), and
    // this warpgroup's 64 rows of Q buffer 0 (stage / buffer i is i * H_TILE further on).
    const uint64_t k_desc = desc_k_major(smem_u32(sK)), v_desc = desc_mn_major(smem_u32(sV), H_HALF);
    const uint64_t q_desc = desc_k_major(smem_u32(sQ) + 64 * wg * 128);

    // Ping-pong (v5, v6): the two warpgroups take turns issuing their products, so that one's
    // softmax runs while the other's products occupy the tensor cores. A turn of warpgroup wg
    // waits on named barrier 1 + wg until the other warpgroup has issued its previous turn
    // (warpgroup 1 arrives once up front, so warpgroup 0 goes first), and ends by arriving on
    // the other's barrier. Both take n_tiles + 1 turns per item (one per key tile of the block,
    // passed-on tiles included, plus the last P V), whatever tiles they see, so the turns pair
    // up; at the end warpgroup 0 absorbs warpgroup 1's last arrival.
    auto turn_begin = [&]() {
        if (PINGPONG) named_barrier_sync(1 + wg, 256);
    };
    auto turn_end = [&]() {
        if (PINGPONG) named_barrier_arrive(2 - wg, 256);
    };
    if (PINGPONG && wg == 1) named_barrier_arrive(1, 256);

    int jbase = 0;
    for (int k = 0;; ++k) {
        const int b = k % Q_BUFS;
        int item = blockIdx.x;
        if (PERSISTENT) {
            mbar_wait(&bars[B_Q + b], (k >> 1) & 1);
            item = item_slot[b];
            if (item < 0) break;
        } else if (k > 0) {
            break;
        }
        const int h = item % NH, m0 = order[item / NH] * H_BM;
        int key_lo, key_hi;
        tile_key_range(rows, m0, T, lane, &key_lo, &key_hi);
        const int n_begin = key_lo <= key_hi ? key_lo / H_BN : 0;
        const int n_tiles = key_lo <= key_hi ? key_hi / H_BN + 1 - n_begin : 0;

        const int row0 = m0 + 64 * wg;
        const int r0 = row0 + 16 * warp + g, r1 = r0 + 8;  // this thread's two rows
        const int2 sp0 = r0 < T ? rows[r0] : attn_empty_span();
        const int2 sp1 = r1 < T ? rows[r1] : attn_empty_span();
        // The warpgroup's 64 spans, reduced by every warp alike: skip/full/mask decisions are
        // uniform across the warpgroup, as wgmma requires.
        const int2 wa = row0 + lane < T ? rows[row0 + lane] : attn_empty_span();
        const int2 wb = row0 + 32 + lane < T ? rows[row0 + 32 + lane] : attn_empty_span();
        const WarpSpans ws(wa, wb);

        unsigned char* sQb = sQ + b * H_TILE;
        const uint64_t qb_desc = desc_plus(q_desc, b * H_TILE);  // this warpgroup's 64 rows of buffer b
        float acc[64], s[64], alpha[2], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
        uint32_t p[8][4];
        #pragma unroll
        for (int i = 0; i < 64; ++i) acc[i] = 0.f;

        // The tiles this warpgroup sees, [j_first, j_last] counted from n_begin: contiguous,
        // since every row sees itself. It passes the others on (waits until full, marks empty)
        // so that the ring's phases stay in step with the producer and the other warpgroup.
        int j_first = n_tiles, j_last = n_tiles - 1;
        if (ws.lo <= ws.hi) {
            j_first = ws.lo / H_BN - n_begin;
            j_last = ws.hi / H_BN - n_begin;
        }
        auto stage = [&](int j) { return (jbase + j) & 1; };
        auto phase = [&](int j) { return (uint32_t)((jbase + j) >> 1) & 1; };
        auto pass_on = [&](int j) {
            turn_begin();
            turn_end();
            mbar_wait(&bars[B_KFULL + stage(j)], phase(j));
            mbar_arrive(&bars[B_KEMPTY + stage(j)]);
            mbar_wait(&bars[B_VFULL + stage(j)], phase(j));
            mbar_arrive(&bars[B_VEMPTY + stage(j)]);
        };
        auto probs = [&](int j) {
            const int k0 = (n_begin + j) * H_BN;
            if (ws.covers(k0, k0 + H_BN - 1)) softmax_probs<false>(s, m, l, alpha, k0, sp0, sp1, u);
            else softmax_probs<true>(s, m, l, alpha, k0, sp0, sp1, u);
        };

        if (!PERSISTENT) mbar_wait(&bars[B_Q], 0);
        for (int j = 0; j < j_first; ++j) pass_on(j);
        if (j_first <= j_last) {
            // First tile: S, then its softmax (O is still 0).
            mbar_wait(&bars[B_KFULL + stage(j_first)], phase(j_first));
            fence_regs(s);
            turn_begin();
            wgmma_fence();
            issue_qk(s, qb_desc, desc_plus(k_desc, stage(j_first) * H_TILE));
            turn_end();
            wgmma_wait<0>();
            fence_regs(s);
            mbar_arrive(&bars[B_KEMPTY + stage(j_first)]);
            probs(j_first);
            rescale_and_pack(acc, p, s, alpha);

            // Tile j: issue S_j = Q K_j^T and O += P_{j-1} V_{j-1}; the softmax of S_j runs
            // while the second product is still in flight (FlashAttention-3's intra-warpgroup
            // overlap).
            for (int j = j_first + 1; j <= j_last; ++j) {
                const int st = stage(j), prev = stage(j - 1);
                // V_{j-1} was requested before K_j, so waiting for both first costs nothing, and
                // keeps the two issues adjacent (nothing between them for ptxas to fence).
                mbar_wait(&bars[B_KFULL + st], phase(j));
                mbar_wait(&bars[B_VFULL + prev], phase(j - 1));
                fence_regs(s);
                fence_regs(acc);
                fence_regs(p);
                turn_begin();
                wgmma_fence();
                issue_qk(s, qb_desc, desc_plus(k_desc, st * H_TILE));
                issue_pv(acc, p, desc_plus(v_desc, prev * H_TILE));
                turn_end();
                wgmma_wait<1>();  // S_j is done; P V may still run
                fence_regs(s);
                mbar_arrive(&bars[B_KEMPTY + st]);
                probs(j);
                wgmma_wait<0>();
                fence_regs(acc);
                fence_regs(p);
                mbar_arrive(&bars[B_VEMPTY + prev]);
                rescale_and_pack(acc, p, s, alpha);
            }

            // Last tile's O += P V.
            const int st = stage(j_last);
            mbar_wait(&bars[B_VFULL + st], phase(j_last));
            fence_regs(acc);
            fence_regs(p);
            turn_begin();
            wgmma_fence();
            issue_pv(acc, p, desc_plus(v_desc, st * H_TILE));
            turn_end();
            wgmma_wait<0>();
            fence_regs(acc);
            fence_regs(p);
            mbar_arrive(&bars[B_VEMPTY + st]);
        } else {
            turn_begin();  // the turn of the last P V, empty
            turn_end();
        }
        for (int j = j_last + 1; j < n_tiles; ++j) pass_on(j);

        // o = acc / l, lse = (m + log2 l) ln 2; rows that saw nothing get o = 0, lse = -inf.
        float inv[2], row_lse[2];
        #pragma unroll
        for (int i = 0; i < 2; ++i) {
            l[i] += __shfl_xor_sync(FULL_MASK, l[i], 1);
            l[i] += __shfl_xor_sync(FULL_MASK, l[i], 2);
            inv[i] = l[i] > 0.f ? 1.f / l[i] : 0.f;
            row_lse[i] = l[i] > 0.f ? (m[i] + log2f(l[i])) * ATTN_LN2 : -INFINITY;
        }
        // Stage O as bf16 in this warp's 16 rows of the Q buffer (no longer read), in the same
        // swizzle, then write whole 16-byte chunks gated by the gate tile (same layout); then
        // hand sG and (v6) the Q buffer back.
        mbar_wait(&bars[B_GFULL], k & 1);
        store_acc_rows(y, sQb, H_HALF, acc, inv[0], inv[1], 64 * wg + 16 * warp + g, 64 * wg + 16 * warp, row0 + 16 * warp, T, NH * ATTN_HD, h, lane,
                       sG);
        mbar_arrive(&bars[B_GEMPTY]);
        if (u == 0) {
            if (r0 < T) lse[(size_t)h * T + r0] = row_lse[0];
            if (r1 < T) lse[(size_t)h * T + r1] = row_lse[1];
        }
        if (PERSISTENT) mbar_arrive(&bars[B_QEMPTY + b]);
        jbase += n_tiles;
    }
    if (PINGPONG && wg == 0) named_barrier_sync(1, 256);  // warpgroup 1's last arrival
}

// tm_q, tm_k, tm_v, tm_g: tensor maps of q, k, v and the gate g [T, NH, HD] bf16 as 3-D tensors
// (HD, NH, T) (rows 4 NH HD elements apart: blocks of the fused projection), boxes of
// (64, 1, 128) with 128-byte swizzle; y: [T, NH, HD] out, the gated output sigmoid(g) * o;
// lse: [NH, T] out; rows: [T] int2;
// order: [ceil(T / H_BM)] (attention_schedule with tile H_BM, step H_BN).
// Grid: ceil(T / H_BM) * NH blocks of H_THREADS, head fastest; dynamic shared memory H_SMEM.
extern "C" __global__ void __launch_bounds__(H_THREADS, 1)
attention_fwd_sm90(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                   const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ CUtensorMap tm_g, bf16* __restrict__ y,
                   float* __restrict__ lse, const int2* __restrict__ rows, const int* __restrict__ order, int T, int NH) {
    fwd_sm90<false, false>(tm_q, tm_k, tm_v, tm_g, y, lse, rows, order, T, NH, nullptr);
}

// v5: the same with the ping-pong schedule; same arguments.
extern "C" __global__ void __launch_bounds__(H_THREADS, 1)
attention_fwd_sm90_pingpong(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                            const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ CUtensorMap tm_g,
                            bf16* __restrict__ y, float* __restrict__ lse, const int2* __restrict__ rows,
                            const int* __restrict__ order, int T, int NH) {
    fwd_sm90<true, false>(tm_q, tm_k, tm_v, tm_g, y, lse, rows, order, T, NH, nullptr);
}

// v6: ping-pong and persistent. Same arguments plus next_item: [1] int, zeroed. Grid:
// min(items, SMs) blocks of H_THREADS (items = ceil(T / H_BM) * NH, item i = query tile
// order[i / NH] of head i % NH); dynamic shared memory H_SMEM_PERSISTENT.
extern "C" __global__ void __launch_bounds__(H_THREADS, 1)
attention_fwd_sm90_persistent(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                              const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ CUtensorMap tm_g,
                              bf16* __restrict__ y, float* __restrict__ lse, const int2* __restrict__ rows,
                              const int* __restrict__ order, int T, int NH, int* __restrict__ next_item) {
    fwd_sm90<true, true>(tm_q, tm_k, tm_v, tm_g, y, lse, rows, order, T, NH, next_item);
}
