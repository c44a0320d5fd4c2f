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
// Not (yet) done from FA3: explicit ping-pong scheduling of the two consumer warpgroups
// (named barriers), and the backward pass.

#include "attention_sm90.cuh"

#define H_BM 128               // query rows per block: 2 consumer warpgroups x 64
#define H_BN 128               // keys per stage
#define H_THREADS 384          // producer warpgroup + 2 consumer warpgroups
#define H_HALF (128 * 128)     // bytes of one [128][64] bf16 half-tile
#define H_TILE (2 * H_HALF)    // bytes of one [128][128] tile
// sQ, sK[2], sV[2], plus 1 KB to align the base to 1024 bytes: 161 KB.
#define H_SMEM (5 * H_TILE + 1024)

// mbarrier indices
#define B_Q 0
#define B_KFULL 1   // + stage
#define B_VFULL 3   // + stage
#define B_KEMPTY 5  // + stage
#define B_VEMPTY 7  // + stage
#define B_COUNT 9

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

// S = Q K^T for one key tile: 8 k16 steps over the head dim, 4 in each half-tile. One group.
__device__ __forceinline__ void issue_qk(float (&s)[64], uint32_t q_base, uint32_t k_base) {
    #pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
        const uint32_t off = (kk / 4) * H_HALF + (kk % 4) * 32;
        wgmma_ss(s, desc_k_major(q_base + off), desc_k_major(k_base + off), kk > 0);
    }
    wgmma_commit();
}

// O += P V for one key tile: 8 k16 steps over the keys (16 rows = 2048 bytes each); V is
// MN-major, its dims 64..127 one half-tile further. One group.
__device__ __forceinline__ void issue_pv(float (&acc)[64], const uint32_t (&p)[8][4], uint32_t v_base) {
    #pragma unroll
    for (int kk = 0; kk < 8; ++kk) wgmma_rs_bt(acc, p[kk], desc_mn_major(v_base + kk * 2048, H_HALF));
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
        alpha[i] = exp2f(m[i] - base);
        m[i] = m_new;
        float sum = 0.f;
        #pragma unroll
        for (int nt = 0; nt < 16; ++nt) {
            #pragma unroll
            for (int c = 2 * i; c < 2 * i + 2; ++c) {
                s[4 * nt + c] = exp2f(fmaf(s[4 * nt + c], ATTN_SCALE_LOG2, -base));
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

// The kernel body; PINGPONG adds FlashAttention-3's ping-pong schedule of the two consumer
// warpgroups (v5, see the kernel versions in docs/attention.md). The tensor maps are the
// kernels' __grid_constant__ parameters, passed by reference so that TMA reads them in place.
template <bool PINGPONG>
__device__ __forceinline__ void fwd_sm90(const CUtensorMap& tm_q, const CUtensorMap& tm_k, const CUtensorMap& tm_v, bf16* __restrict__ o,
                                         float* __restrict__ lse, const int2* __restrict__ rows, const int* __restrict__ order, int T,
                                         int NH) {
    extern __shared__ unsigned char smem_raw[];
    __shared__ __align__(8) uint64_t bars[B_COUNT];
    unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
    unsigned char* sQ = smem;
    unsigned char* sK = smem + H_TILE;      // [2 stages]
    unsigned char* sV = smem + 3 * H_TILE;  // [2 stages]

    const int h = blockIdx.x % NH;
    const int m0 = order[blockIdx.x / NH] * H_BM;
    const int lane = threadIdx.x % 32;

    if (threadIdx.x == 0) {
        mbar_init(&bars[B_Q], 1);
        for (int st = 0; st < 2; ++st) {
            mbar_init(&bars[B_KFULL + st], 1);
            mbar_init(&bars[B_VFULL + st], 1);
            mbar_init(&bars[B_KEMPTY + st], 2 * 128);
            mbar_init(&bars[B_VEMPTY + st], 2 * 128);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    int key_lo, key_hi;
    tile_key_range(rows, m0, T, lane, &key_lo, &key_hi);
    const int n_begin = key_lo <= key_hi ? key_lo / H_BN : 0;
    const int n_tiles = key_lo <= key_hi ? key_hi / H_BN + 1 - n_begin : 0;

    if (threadIdx.x < 128) {
        // Producer. One thread issues every copy; K before V so S = Q K^T can start early.
        setmaxnreg_dec<40>();
        if (threadIdx.x == 0) {
            mbar_expect_tx(&bars[B_Q], H_TILE);
            tma_load(sQ, &tm_q, &bars[B_Q], 0, h, m0);
            tma_load(sQ + H_HALF, &tm_q, &bars[B_Q], 64, h, m0);
            for (int j = 0; j < n_tiles; ++j) {
                const int st = j & 1;
                const uint32_t phase = (j >> 1) & 1;
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
        }
        return;
    }

    // Consumers: warpgroup wg owns rows [64 wg, 64 wg + 64) of the tile.
    setmaxnreg_inc<232>();
    const int wg = threadIdx.x / 128 - 1;
    const int warp = (threadIdx.x % 128) / 32, g = lane >> 2, u = lane & 3;
    const int row0 = m0 + 64 * wg;
    const int r0 = row0 + 16 * warp + g, r1 = r0 + 8;  // this thread's two rows
    const int2 sp0 = r0 < T ? rows[r0] : attn_empty_span();
    const int2 sp1 = r1 < T ? rows[r1] : attn_empty_span();
    // The warpgroup's 64 spans, reduced by every warp alike: skip/full/mask decisions are
    // uniform across the warpgroup, as wgmma requires.
    const int2 wa = row0 + lane < T ? rows[row0 + lane] : attn_empty_span();
    const int2 wb = row0 + 32 + lane < T ? rows[row0 + 32 + lane] : attn_empty_span();
    const WarpSpans ws(wa, wb);

    const uint32_t q_base = smem_u32(sQ) + 64 * wg * 128;  // this warpgroup's 64 rows
    const uint32_t k_base = smem_u32(sK), v_base = smem_u32(sV);
    float acc[64], s[64], alpha[2], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    uint32_t p[8][4];
    #pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;

    // The tiles this warpgroup sees, [j_first, j_last] counted from n_begin: contiguous, since
    // every row sees itself. It passes the others on (waits until full, marks empty) so that
    // the ring's phases stay in step with the producer and the other warpgroup.
    int j_first = n_tiles, j_last = n_tiles - 1;
    if (ws.lo <= ws.hi) {
        j_first = ws.lo / H_BN - n_begin;
        j_last = ws.hi / H_BN - n_begin;
    }
    auto pass_on = [&](int j) {
        const int st = j & 1;
        const uint32_t phase = (j >> 1) & 1;
        mbar_wait(&bars[B_KFULL + st], phase);
        mbar_arrive(&bars[B_KEMPTY + st]);
        mbar_wait(&bars[B_VFULL + st], phase);
        mbar_arrive(&bars[B_VEMPTY + st]);
    };
    auto probs = [&](int j) {
        const int k0 = (n_begin + j) * H_BN;
        if (ws.covers(k0, k0 + H_BN - 1)) softmax_probs<false>(s, m, l, alpha, k0, sp0, sp1, u);
        else softmax_probs<true>(s, m, l, alpha, k0, sp0, sp1, u);
    };

    // Ping-pong (v5): the two warpgroups take turns issuing their products, so that one's
    // softmax runs while the other's products occupy the tensor cores. Turn k of warpgroup wg
    // waits on named barrier 1 + wg until the other warpgroup has issued its turn k - 1 (or,
    // for warpgroup 0's turn 0, has started), and ends by arriving on the other's barrier.
    // Both take n_tiles + 1 turns (one per key tile, passed-on tiles included, plus the last
    // P V), whatever tiles they see, so the counts match; warpgroup 1 skips its last arrival,
    // which nobody waits for.
    int turn = 0;
    auto turn_begin = [&]() {
        if (PINGPONG) named_barrier_sync(1 + wg, 256);
    };
    auto turn_end = [&]() {
        if (PINGPONG && !(wg == 1 && turn == n_tiles)) named_barrier_arrive(2 - wg, 256);
        ++turn;
    };
    auto pass_turn = [&](int j) {
        turn_begin();
        turn_end();
        pass_on(j);
    };
    if (PINGPONG && wg == 1) named_barrier_arrive(1, 256);

    mbar_wait(&bars[B_Q], 0);
    for (int j = 0; j < j_first; ++j) pass_turn(j);
    if (j_first <= j_last) {
        // First tile: S, then its softmax (O is still 0).
        mbar_wait(&bars[B_KFULL + (j_first & 1)], (j_first >> 1) & 1);
        fence_regs(s);
        turn_begin();
        wgmma_fence();
        issue_qk(s, q_base, k_base + (j_first & 1) * H_TILE);
        turn_end();
        wgmma_wait<0>();
        fence_regs(s);
        mbar_arrive(&bars[B_KEMPTY + (j_first & 1)]);
        probs(j_first);
        rescale_and_pack(acc, p, s, alpha);

        // Tile j: issue S_j = Q K_j^T and O += P_{j-1} V_{j-1}; the softmax of S_j runs while
        // the second product is still in flight (FlashAttention-3's intra-warpgroup overlap).
        for (int j = j_first + 1; j <= j_last; ++j) {
            const int st = j & 1, prev = (j - 1) & 1;
            // V_{j-1} was requested before K_j, so waiting for both first costs nothing, and
            // keeps the two issues adjacent (nothing between them for ptxas to fence).
            mbar_wait(&bars[B_KFULL + st], (j >> 1) & 1);
            mbar_wait(&bars[B_VFULL + prev], ((j - 1) >> 1) & 1);
            fence_regs(s);
            fence_regs(acc);
            fence_regs(p);
            turn_begin();
            wgmma_fence();
            issue_qk(s, q_base, k_base + st * H_TILE);
            issue_pv(acc, p, v_base + prev * H_TILE);
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
        const int st = j_last & 1;
        mbar_wait(&bars[B_VFULL + st], (j_last >> 1) & 1);
        fence_regs(acc);
        fence_regs(p);
        turn_begin();
        wgmma_fence();
        issue_pv(acc, p, v_base + st * H_TILE);
        turn_end();
        wgmma_wait<0>();
        fence_regs(acc);
        fence_regs(p);
        mbar_arrive(&bars[B_VEMPTY + st]);
    } else {
        turn_begin();  // the turn of the last P V, empty
        turn_end();
    }
    for (int j = j_last + 1; j < n_tiles; ++j) pass_turn(j);

    // o = acc / l, lse = (m + log2 l) ln 2; rows that saw nothing get o = 0, lse = -inf.
    float inv[2], row_lse[2];
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(FULL_MASK, l[i], 1);
        l[i] += __shfl_xor_sync(FULL_MASK, l[i], 2);
        inv[i] = l[i] > 0.f ? 1.f / l[i] : 0.f;
        row_lse[i] = l[i] > 0.f ? (m[i] + log2f(l[i])) * ATTN_LN2 : -INFINITY;
    }
    // Stage O as bf16 in this warp's 16 rows of sQ (no longer read), in the same swizzle, then
    // write whole 16-byte chunks.
    const int lrow = 64 * wg + 16 * warp + g;  // row within the tile
    #pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
        unsigned char* half = sQ + (nt / 8) * H_HALF;
        const int c = nt % 8;
        *reinterpret_cast<uint32_t*>(half + lrow * 128 + ((c ^ (lrow & 7)) << 4) + 4 * u) =
            pack_bf16(acc[4 * nt] * inv[0], acc[4 * nt + 1] * inv[0]);
        *reinterpret_cast<uint32_t*>(half + (lrow + 8) * 128 + ((c ^ ((lrow + 8) & 7)) << 4) + 4 * u) =
            pack_bf16(acc[4 * nt + 2] * inv[1], acc[4 * nt + 3] * inv[1]);
    }
    __syncwarp();
    #pragma unroll
    for (int it = 0; it < 8; ++it) {
        const int idx = it * 32 + lane, r = idx / 16, chunk = idx % 16, c = chunk % 8;
        const int trow = 64 * wg + 16 * warp + r;
        if (m0 + trow < T) {
            *reinterpret_cast<uint4*>(o + ((size_t)(m0 + trow) * NH + h) * ATTN_HD + chunk * 8) =
                *reinterpret_cast<const uint4*>(sQ + (chunk / 8) * H_HALF + trow * 128 + ((c ^ (trow & 7)) << 4));
        }
    }
    if (u == 0) {
        if (r0 < T) lse[(size_t)h * T + r0] = row_lse[0];
        if (r1 < T) lse[(size_t)h * T + r1] = row_lse[1];
    }
}

// tm_q, tm_k, tm_v: tensor maps of q, k, v [T, NH, HD] bf16 as 3-D tensors (HD, NH, T), boxes
// of (64, 1, 128) with 128-byte swizzle; o: [T, NH, HD] out; lse: [NH, T] out; rows: [T] int2;
// order: [ceil(T / H_BM)] (attention_schedule with tile H_BM, step H_BN).
// Grid: ceil(T / H_BM) * NH blocks of H_THREADS; dynamic shared memory H_SMEM.
extern "C" __global__ void __launch_bounds__(H_THREADS, 1)
attention_fwd_sm90(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                   const __grid_constant__ CUtensorMap tm_v, bf16* __restrict__ o, float* __restrict__ lse,
                   const int2* __restrict__ rows, const int* __restrict__ order, int T, int NH) {
    fwd_sm90<false>(tm_q, tm_k, tm_v, o, lse, rows, order, T, NH);
}

// The same with the ping-pong schedule (v5); same arguments.
extern "C" __global__ void __launch_bounds__(H_THREADS, 1)
attention_fwd_sm90_pingpong(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                            const __grid_constant__ CUtensorMap tm_v, bf16* __restrict__ o, float* __restrict__ lse,
                            const int2* __restrict__ rows, const int* __restrict__ order, int T, int NH) {
    fwd_sm90<true>(tm_q, tm_k, tm_v, o, lse, rows, order, T, NH);
}
