// attention_bwd_sm90: the PrefixLM attention backward for Hopper, in the FlashAttention-3 design,
// deterministic.
// hrm-cu: sm90a-only
//
// Same contract as attention_bwd in attention.cu (shapes, spans, schedule, invariants; read that
// file's header first): dg, dq, dk, dv written (=), padding rows 0, bitwise-identical reruns.
//
// Three launches:
// 1. attention_bwd_sm90_prep: the gate's backward (attn_gate_bwd_row: dg into the gate block of
//    dgqkv, do = dy * sigmoid(g) into a workspace, delta = rowsum(do * o) from dy and y), lse2 =
//    lse * log2(e); delta and lse2 are [NH, T_pad] (T_pad = T rounded up to 64, zero past T, so
//    that a query tile's 64 values are one aligned 256-byte bulk copy); and rank, the inverse of
//    the key-tile schedule.
// 2. attention_bwd_sm90: one block per (key tile of 128 rows, head), 3 warpgroups.
//    - Warpgroup 0: warp 0 is the producer (one thread: K, V once by TMA, then Q, dO tiles of 64
//      rows and their lse2, delta in a 2-stage ring of full/empty mbarriers); warps 1 and 2 are the
//      dQ writers (below). setmaxnreg moves registers from it (40) to the consumers (232).
//    - Warpgroups 1 and 2 are consumers, 64 keys each, dK and dV accumulated in registers
//      (2 x 64 fp32 per thread) over the query tiles the block's keys are seen by. Per query
//      tile, everything transposed (keys are the M dimension, as in attention_bwd_dkv):
//        S^T = K Q^T, dP^T = V dO^T          wgmma m64n64k16, both operands in shared memory
//        P^T = exp2(S^T c - lse2) (while dP^T is still in flight), dS^T = P^T (dP^T - delta)
//                                            in registers; masked P^T -> 0
//        dV += P^T dO, dK += dS^T Q          wgmma m64n128k16, P^T / dS^T from registers
//        dQ_part = dS K                      wgmma m64n64k16: dS^T goes through shared memory
//                                            (both warpgroups' 64 keys form the k dimension);
//                                            warpgroup w computes dims [64 w, 64 w + 64)
//      and dQ_part (fp32, 32 KB) goes to shared memory for the writer.
//    - A writer adds dQ_part into the fp32 workspace dqacc with the copy engine (a 32 KB bulk
//      reduce-add; the first contribution is a bulk store, so dqacc needs no zeroing). There are
//      two writers, one per sdQ buffer (even and odd query tiles of the block): an ordered add
//      is released to the next block only once it has completed, and a single writer would
//      spend that whole latency before it could start the next tile's add.
//      Determinism: the contributions to one query tile are added in a fixed order, the order
//      of the key tiles in the schedule. A semaphore per (query tile, head) counts the adds
//      done; the block whose key tile has `turn` lower-ranked key tiles before it in that query
//      tile's key range waits until the count equals `turn`, adds, and increments it. A block
//      only ever waits for lower-ranked blocks, which (blocks being dispatched in index order
//      in practice) are already running: no deadlock. Blocks walk their query tiles from the
//      last one down, so that the key tiles of one sample, which all end at the sample's last
//      row, reach each query tile at the same step and the chain of adds stays short.
// 3. attention_bwd_sm90_finish: dq = RoPE^-1(scale * dqacc), rows that see nothing get 0. The
//    main kernel rotates dk back in its epilogue: with RoPE's backward (the rotation of
//    qkv_rope_fwd undone, as in cuda/rope.cu) dq and dk are the gradients of the projection's q
//    and k before the forward rotated them.
//
// Invariants of the main kernel
// - Every consumer warpgroup takes part in every query tile of the block's range (dQ needs both
//   halves of dS); a warpgroup whose 64 keys see none of the tile's queries skips S, dP, dV, dK
//   and contributes zeros to dS. Skip / full / masked decisions are per warpgroup, uniform across
//   its warps, as wgmma requires; only masked tiles evaluate the mask.
// - Masked entries are selected to 0, never computed through -inf (padding queries have
//   lse = -inf).
// - sdS is single-buffered: barrier 1 (256 consumer threads) before writing it guarantees both
//   warpgroups finished the previous tile's dQ product; a second one after writing it (with
//   fence.proxy.async) hands it to the tensor cores.

#include "attention_sm90.cuh"
#include "rope.cuh"

#define BW_BN 128              // keys per block: 2 consumer warpgroups x 64
#define BW_BM 64               // queries per step
#define BW_THREADS 384
#define BW_KV_HALF (128 * 128)   // bytes of a [128 keys][64] bf16 half-tile
#define BW_Q_HALF (64 * 128)     // bytes of a [64 queries][64] bf16 half-tile
#define BW_Q_TILE (2 * BW_Q_HALF)
#define BW_DQ_BYTES (BW_BM * ATTN_HD * 4)  // one fp32 dQ partial, 32 KB
// Shared memory, from a 1024-aligned base: sK, sV [2 halves][128][64]; sQ, sdO [2 stages][2
// halves][64][64]; sdS [128 keys][64 queries] bf16; sdQ [2][64 x 128] fp32; sLse2, sDelta
// [2 stages][64] fp32. 210 KB.
#define OFF_K 0
#define OFF_V (OFF_K + 2 * BW_KV_HALF)
#define OFF_Q (OFF_V + 2 * BW_KV_HALF)
#define OFF_DO (OFF_Q + 2 * BW_Q_TILE)
#define OFF_DS (OFF_DO + 2 * BW_Q_TILE)
#define OFF_DQ (OFF_DS + BW_KV_HALF)
#define OFF_LSE (OFF_DQ + 2 * BW_DQ_BYTES)
#define OFF_DELTA (OFF_LSE + 2 * BW_BM * 4)
#define BW_SMEM (OFF_DELTA + 2 * BW_BM * 4 + 1024)  // + 1024 to align the base

// mbarrier indices
#define BB_KV 0
#define BB_FULL 1     // + stage: Q, dO, lse2, delta landed
#define BB_EMPTY 3    // + stage: the consumers are done with them
#define BB_DQFULL 5   // + buffer: a dQ partial is in sdQ
#define BB_DQEMPTY 7  // + buffer: the writer is done with it
#define BB_COUNT 9

#define BAR_CONSUMERS 1  // named barrier of the 256 consumer threads

// (x1, x2), dims j and j + 64 of a row, rotated back by angle = pos * inv_freq[j]: RoPE's
// backward, the transpose of cuda/rope.cu's rotation.
__device__ __forceinline__ void rope_back_pair(float& x1, float& x2, float angle) {
    float sn, cs;
    rope_sincos(angle, &sn, &cs);
    const float a = x1 * cs + x2 * sn, b = x2 * cs - x1 * sn;
    x1 = a;
    x2 = b;
}

// ---------------------------------------------------------------------------------------
// 1. Preparation.
// ---------------------------------------------------------------------------------------

// lse2, delta: [NH, T_pad] out; rank: [n_kv] out, rank[kv_order[i]] = i; da: [T, NH, HD] out
// (do of the attention); dgqkv: its gate block out (rows ld apart); dy, y: [T, NH, HD] (the
// gated output's gradient and the gated output); gqkv: its gate block read (rows ld apart);
// lse: [NH, T]; kv_order: [n_kv]. One warp per (row < T_pad, head); blocks of 256 threads.
extern "C" __global__ void attention_bwd_sm90_prep(float* __restrict__ lse2, float* __restrict__ delta, int* __restrict__ rank,
                                                   bf16* __restrict__ da, bf16* __restrict__ dgqkv, const bf16* __restrict__ dy,
                                                   const bf16* __restrict__ gqkv, const bf16* __restrict__ y,
                                                   const float* __restrict__ lse, const int* __restrict__ kv_order, int T,
                                                   int T_pad, int NH, int n_kv, int ld) {
    const int64_t gid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (gid < n_kv) rank[kv_order[gid]] = (int)gid;
    const int64_t item = gid / 32;  // = row * NH + head
    const int lane = threadIdx.x % 32;
    if (item >= (int64_t)T_pad * NH) return;
    const int row = (int)(item / NH), h = (int)(item % NH);
    float sum = 0.f;
    if (row < T) {
        const int64_t g_at = (int64_t)row * ld + h * ATTN_HD;
        sum = attn_gate_bwd_row(da + item * ATTN_HD, dgqkv + g_at, dy + item * ATTN_HD, gqkv + g_at, y + item * ATTN_HD, lane);
    }
    if (lane == 0) {
        delta[(size_t)h * T_pad + row] = sum;
        lse2[(size_t)h * T_pad + row] = row < T ? lse[(size_t)h * T + row] * ATTN_LOG2E : 0.f;
    }
}

// ---------------------------------------------------------------------------------------
// 2. The main kernel.
// ---------------------------------------------------------------------------------------

// The union [lo, hi] of the spans of rows [r0, r0 + 32 * N) (rows >= T are empty); every lane
// of the calling warp gets it.
template <int N>
__device__ __forceinline__ void span_union(const int2* spans, int r0, int T, int lane, int* lo, int* hi) {
    int a = ATTN_EMPTY_LO, b = ATTN_EMPTY_HI;
    #pragma unroll
    for (int i = 0; i < N; ++i) {
        const int r = r0 + 32 * i + lane;
        const int2 s = r < T ? spans[r] : attn_empty_span();
        a = min(a, s.x);
        b = max(b, s.y);
    }
    *lo = __reduce_min_sync(FULL_MASK, a);
    *hi = __reduce_max_sync(FULL_MASK, b);
}

// S^T or dP^T of one query tile for one warpgroup: X (its 64 rows of sK or sV, K-major
// descriptor x) times Y^T (the 64 rows of sQ or sdO, K-major descriptor y), 8 k16 steps over
// the head dim. One group.
__device__ __forceinline__ void issue_xyt(float (&d)[32], uint64_t x, uint64_t y) {
    #pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
        wgmma_ss_n64<0, 0>(d, desc_plus(x, (kk / 4) * BW_KV_HALF + (kk % 4) * 32), desc_plus(y, (kk / 4) * BW_Q_HALF + (kk % 4) * 32), kk > 0);
    }
    wgmma_commit();
}

// acc += A Y for one query tile: A (64 keys x 64 queries) from registers, Y (sQ or sdO, 64
// queries x 128 dims) through the MN-major descriptor y; 4 k16 steps over the queries. No commit.
__device__ __forceinline__ void issue_acc(float (&acc)[64], const uint32_t (&a)[4][4], uint64_t y) {
    #pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_rs_bt(acc, a[kk], desc_plus(y, kk * 2048));
}

// P^T of one query tile from S^T (in s, in place): this thread's entries are keys kr, kr + 8
// (spans cs0, cs1: the queries that see them) by queries q0 + 8 nt + 2u, +1. Masked entries
// are selected to exactly 0 (padding queries have lse2 = -inf: exp2 would give inf).
// `l[nt]` holds lse2 of queries 8 nt + 2u, +1 (loaded by load_lse2 before S^T lands).
template <bool MASK>
__device__ __forceinline__ void probs_t(float (&s)[32], const float2 (&lse2)[8], int q0, int2 cs0, int2 cs1, int u) {
    #pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
        const float2 l = lse2[nt];
        #pragma unroll
        for (int c = 0; c < 4; ++c) {
            const float p = attn_exp2(fmaf(s[4 * nt + c], ATTN_SCALE_LOG2, (c & 1) ? -l.y : -l.x));
            s[4 * nt + c] = MASK && !attn_visible(c < 2 ? cs0 : cs1, q0 + 8 * nt + 2 * u + (c & 1)) ? 0.f : p;
        }
    }
}

// This thread's lse2 values of the tile (see probs_t), read from shared memory while the
// S^T and dP^T products are in flight.
__device__ __forceinline__ void load_lse2(float2 (&l)[8], const float* lse2, int u) {
    #pragma unroll
    for (int nt = 0; nt < 8; ++nt) l[nt] = *reinterpret_cast<const float2*>(lse2 + 8 * nt + 2 * u);
}

// dS^T = P^T (dP^T - delta) (masked entries have P^T = 0, and dP^T, delta are finite), then P^T
// and dS^T packed as bf16 A fragments: k16 step kk covers queries [16 kk, 16 kk + 16).
__device__ __forceinline__ void pack_grads(uint32_t (&pf)[4][4], uint32_t (&dsf)[4][4], const float (&p)[32], const float (&dp)[32],
                                           const float* dlt, int u) {
    float ds[32];
    #pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
        const float2 d = *reinterpret_cast<const float2*>(dlt + 8 * nt + 2 * u);
        #pragma unroll
        for (int c = 0; c < 4; ++c) ds[4 * nt + c] = p[4 * nt + c] * (dp[4 * nt + c] - ((c & 1) ? d.y : d.x));
    }
    #pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            pf[kk][i] = pack_bf16(p[8 * kk + 2 * i], p[8 * kk + 2 * i + 1]);
            dsf[kk][i] = pack_bf16(ds[8 * kk + 2 * i], ds[8 * kk + 2 * i + 1]);
        }
    }
}

// tm_q, tm_do: tensor maps of q, do [T, NH, HD] bf16 as (HD, NH, T), boxes (64, 1, 64);
// tm_k, tm_v: the same of k, v with boxes (64, 1, 128); all 128-byte swizzled. q, k, v have rows
// ld elements apart (blocks of the fused projection), do is contiguous.
// dk, dv: [T, NH, HD] out, rows ld apart (blocks of the projection's gradient); dqacc: [NH, T_pad / 64, 64 x 128] fp32 out (each query tile's block in
// the consumers' fragment order, see attention_bwd_sm90_finish); sem: [NH, T_pad / 64] zeroed;
// lse2, delta: [NH, T_pad]; rows, cols: [T] int2; order: [ceil(T / 128)] key tiles by decreasing
// work (attention_schedule over cols, tile 128, step 64); rank: its inverse; pos: [T] RoPE's
// positions and inv_freq: [64] its frequencies, for RoPE's backward on dk in the epilogue.
// Grid: ceil(T / 128) * NH blocks of BW_THREADS, head fastest; dynamic shared memory BW_SMEM.
// The tensor maps are __grid_constant__ parameters, which TMA reads in place.
extern "C" __global__ void __launch_bounds__(BW_THREADS, 1)
attention_bwd_sm90(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                   const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ CUtensorMap tm_do, bf16* __restrict__ dk,
                   bf16* __restrict__ dv, float* __restrict__ dqacc, int* __restrict__ sem, const float* __restrict__ lse2,
                   const float* __restrict__ delta, const int2* __restrict__ rows, const int2* __restrict__ cols,
                   const int* __restrict__ order, const int* __restrict__ rank, const int* __restrict__ pos,
                   const float* __restrict__ inv_freq, int T, int T_pad, int NH, int ld) {
    extern __shared__ unsigned char smem_raw[];
    __shared__ __align__(8) uint64_t bars[BB_COUNT];
    unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
    float* sLse = reinterpret_cast<float*>(smem + OFF_LSE);
    float* sDelta = reinterpret_cast<float*>(smem + OFF_DELTA);

    const int h = blockIdx.x % NH;
    const int my_rank = blockIdx.x / NH;
    const int n0 = order[my_rank] * BW_BN;
    const int n_q = T_pad / BW_BM;
    const int lane = threadIdx.x % 32;

    if (threadIdx.x == 0) {
        mbar_init(&bars[BB_KV], 1);
        for (int st = 0; st < 2; ++st) {
            mbar_init(&bars[BB_FULL + st], 1);
            mbar_init(&bars[BB_EMPTY + st], 2 * 128);
            mbar_init(&bars[BB_DQFULL + st], 2 * 128);
            mbar_init(&bars[BB_DQEMPTY + st], 1);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    // The query tiles the block's 128 keys are seen by: [m_hi - n_steps + 1, m_hi], walked down.
    int q_lo, q_hi;
    span_union<BW_BN / 32>(cols, n0, T, lane, &q_lo, &q_hi);
    const int m_hi = q_lo <= q_hi ? q_hi / BW_BM : 0;
    const int n_steps = q_lo <= q_hi ? q_hi / BW_BM - q_lo / BW_BM + 1 : 0;

    if (threadIdx.x < 128) {
        setmaxnreg_dec<40>();
        const int warp = threadIdx.x / 32;
        if (warp == 0 && lane == 0 && n_steps > 0) {
            // Producer.
            mbar_expect_tx(&bars[BB_KV], 4 * BW_KV_HALF);
            tma_load(smem + OFF_K, &tm_k, &bars[BB_KV], 0, h, n0);
            tma_load(smem + OFF_K + BW_KV_HALF, &tm_k, &bars[BB_KV], 64, h, n0);
            tma_load(smem + OFF_V, &tm_v, &bars[BB_KV], 0, h, n0);
            tma_load(smem + OFF_V + BW_KV_HALF, &tm_v, &bars[BB_KV], 64, h, n0);
            for (int i = 0; i < n_steps; ++i) {
                const int st = i & 1, m0 = (m_hi - i) * BW_BM;
                mbar_wait(&bars[BB_EMPTY + st], ((i >> 1) & 1) ^ 1);
                uint64_t* full = &bars[BB_FULL + st];
                mbar_expect_tx(full, 2 * BW_Q_TILE + 2 * BW_BM * 4);
                tma_load(smem + OFF_Q + st * BW_Q_TILE, &tm_q, full, 0, h, m0);
                tma_load(smem + OFF_Q + st * BW_Q_TILE + BW_Q_HALF, &tm_q, full, 64, h, m0);
                tma_load(smem + OFF_DO + st * BW_Q_TILE, &tm_do, full, 0, h, m0);
                tma_load(smem + OFF_DO + st * BW_Q_TILE + BW_Q_HALF, &tm_do, full, 64, h, m0);
                bulk_load(sLse + st * BW_BM, lse2 + (size_t)h * T_pad + m0, BW_BM * 4, full);
                bulk_load(sDelta + st * BW_BM, delta + (size_t)h * T_pad + m0, BW_BM * 4, full);
            }
        } else if (warp == 1 || warp == 2) {
            // dQ writers: warp 1 + b adds the partials of sdQ buffer b, those of the tiles i
            // with i & 1 == b, so that one's add can complete while the other's is issued.
            // Query tile m's contributions come from the key tiles [n_lo, n_hi] its rows see;
            // this block's turn is the number of them ranked before it.
            const int b = warp - 1;
            for (int i = b; i < n_steps; i += 2) {
                const int m = m_hi - i;
                int k_lo, k_hi;
                span_union<BW_BM / 32>(rows, m * BW_BM, T, lane, &k_lo, &k_hi);
                int before = 0;
                for (int n = k_lo / BW_BN + lane; n <= k_hi / BW_BN; n += 32) before += rank[n] < my_rank;
                const int turn = __reduce_add_sync(FULL_MASK, before);
                mbar_wait(&bars[BB_DQFULL + b], (i >> 1) & 1);
                if (lane == 0) {
                    float* dst = dqacc + ((size_t)h * n_q + m) * (BW_BM * ATTN_HD);
                    const unsigned char* src = smem + OFF_DQ + b * BW_DQ_BYTES;
                    int* lock = sem + (size_t)h * n_q + m;
                    while (ld_acquire(lock) != turn) __nanosleep(64);
                    fence_async_global();
                    if (turn == 0) bulk_store<false>(dst, src, BW_DQ_BYTES);
                    else bulk_store<true>(dst, src, BW_DQ_BYTES);
                    // sdQ is free once read; the next block's turn waits for the writes.
                    bulk_wait_read();
                    mbar_arrive(&bars[BB_DQEMPTY + b]);
                    bulk_wait_all();
                    fence_async_global();
                    red_release_add(lock, 1);
                }
                __syncwarp();
            }
        }
        return;
    }

    // Consumers: warpgroup wg owns keys [64 wg, 64 wg + 64) of the tile.
    setmaxnreg_inc<232>();
    const int wg = warpgroup_index() - 1, tid = threadIdx.x % 128;
    const int warp = tid / 32, g = lane >> 2, u = lane & 3;
    const int kr = 64 * wg + 16 * warp + g;  // this thread's first key row in the tile (and kr + 8)
    const int2 cs0 = n0 + kr < T ? cols[n0 + kr] : attn_empty_span();
    const int2 cs1 = n0 + kr + 8 < T ? cols[n0 + kr + 8] : attn_empty_span();
    const int2 wa = n0 + 64 * wg + lane < T ? cols[n0 + 64 * wg + lane] : attn_empty_span();
    const int2 wb = n0 + 64 * wg + 32 + lane < T ? cols[n0 + 64 * wg + 32 + lane] : attn_empty_span();
    const WarpSpans ws(wa, wb);  // the warpgroup's 64 keys, reduced alike by its 4 warps

    // Descriptors, built once: this warpgroup's 64 rows of sK and sV (K-major), its half of the
    // head dims of sK (MN-major, for dQ), sdS (MN-major), and stage 0 of sQ and sdO (stage st is
    // BW_Q_TILE further on).
    const uint32_t k_base = smem_u32(smem + OFF_K), v_base = smem_u32(smem + OFF_V);
    const uint64_t kw_k = desc_k_major(k_base + 64 * wg * 128), vw_k = desc_k_major(v_base + 64 * wg * 128);
    const uint64_t kh_mn = desc_mn_major(k_base + wg * BW_KV_HALF, BW_KV_HALF), ds_mn = desc_mn_major(smem_u32(smem + OFF_DS), BW_KV_HALF);
    const uint64_t q_k = desc_k_major(smem_u32(smem + OFF_Q)), q_mn = desc_mn_major(smem_u32(smem + OFF_Q), BW_Q_HALF);
    const uint64_t do_k = desc_k_major(smem_u32(smem + OFF_DO)), do_mn = desc_mn_major(smem_u32(smem + OFF_DO), BW_Q_HALF);
    float acc_dk[64], acc_dv[64];
    #pragma unroll
    for (int i = 0; i < 64; ++i) acc_dk[i] = acc_dv[i] = 0.f;

    if (n_steps > 0) mbar_wait(&bars[BB_KV], 0);
    for (int i = 0; i < n_steps; ++i) {
        const int st = i & 1, b = i & 1;
        const uint32_t phase = (i >> 1) & 1;
        const int q0 = (m_hi - i) * BW_BM;
        const uint32_t stage_off = st * BW_Q_TILE;
        const bool skip = ws.misses(q0, q0 + BW_BM - 1);
        unsigned char* sdS = smem + OFF_DS;
        uint32_t pf[4][4], dsf[4][4];

        mbar_wait(&bars[BB_FULL + st], phase);
        if (!skip) {
            float s[32], dp[32];
            fence_regs(s);
            fence_regs(dp);
            wgmma_fence();
            issue_xyt(s, kw_k, desc_plus(q_k, stage_off));
            issue_xyt(dp, vw_k, desc_plus(do_k, stage_off));
            float2 l2[8];
            load_lse2(l2, sLse + st * BW_BM, u);
            wgmma_wait<1>();  // S^T is done; P^T is computed while dP^T is still in flight
            fence_regs(s);
            if (ws.covers(q0, q0 + BW_BM - 1)) probs_t<false>(s, l2, q0, cs0, cs1, u);
            else probs_t<true>(s, l2, q0, cs0, cs1, u);
            wgmma_wait<0>();
            fence_regs(dp);
            pack_grads(pf, dsf, s, dp, sDelta + st * BW_BM, u);
        } else {
            #pragma unroll
            for (int i2 = 0; i2 < 16; ++i2) pf[i2 / 4][i2 % 4] = dsf[i2 / 4][i2 % 4] = 0u;
        }

        // dS^T into sdS ([128 keys][64 queries], swizzled): row kr (and kr + 8), queries
        // 16 kk + 2u, +1 (fragment entries 0, 1) and 16 kk + 8 + 2u, +1 (entries 2, 3).
        named_barrier_sync(BAR_CONSUMERS, 256);  // both warpgroups' previous dQ products are done
        #pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = kr + 8 * (e & 1), chunk = 2 * kk + (e >> 1);
                *reinterpret_cast<uint32_t*>(sdS + row * 128 + ((chunk ^ (row & 7)) << 4) + 4 * u) = dsf[kk][e];
            }
        }
        fence_async_shared();

        // dV += P^T dO, dK += dS^T Q (unscaled; scale applied at the end).
        if (!skip) {
            fence_regs(acc_dv);
            fence_regs(acc_dk);
            fence_regs(pf);
            fence_regs(dsf);
            wgmma_fence();
            issue_acc(acc_dv, pf, desc_plus(do_mn, stage_off));
            issue_acc(acc_dk, dsf, desc_plus(q_mn, stage_off));
            wgmma_commit();
        }

        // dQ_part = dS K over all 128 keys, dims [64 wg, 64 wg + 64): A = sdS read as
        // [query][key] (MN-major), B = sK half wg read as [key][dim] (MN-major).
        named_barrier_sync(BAR_CONSUMERS, 256);
        float dq[32];
        fence_regs(dq);
        wgmma_fence();
        #pragma unroll
        for (int kk = 0; kk < 8; ++kk) {
            wgmma_ss_n64<1, 1>(dq, desc_plus(ds_mn, kk * 2048), desc_plus(kh_mn, kk * 2048), kk > 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(dq);
        fence_regs(acc_dv);
        fence_regs(acc_dk);
        fence_regs(pf);
        fence_regs(dsf);
        mbar_arrive(&bars[BB_EMPTY + st]);

        // The partial to the writer, in fragment order: float4 c of thread tid of warpgroup wg
        // at ((wg * 8 + c) * 128 + tid) * 16 bytes (conflict-free, and the layout of dqacc).
        mbar_wait(&bars[BB_DQEMPTY + b], phase ^ 1);
        float4* sdq = reinterpret_cast<float4*>(smem + OFF_DQ + b * BW_DQ_BYTES);
        #pragma unroll
        for (int c = 0; c < 8; ++c) sdq[(wg * 8 + c) * 128 + tid] = make_float4(dq[4 * c], dq[4 * c + 1], dq[4 * c + 2], dq[4 * c + 3]);
        fence_async_shared();
        mbar_arrive(&bars[BB_DQFULL + b]);
    }

    // RoPE's backward on dK, in registers: this thread's columns j = 8 nt + 2u + e (nt < 8) and
    // their partners j + 64 are acc_dk[4 nt + c] and acc_dk[4 (nt + 8) + c], c = 2 rr + e, on
    // key rows kr + 8 rr of the tile; each pair is rotated back by pos * inv_freq[j].
    {
        const int r0 = n0 + kr;
        const int p[2] = {r0 < T ? pos[r0] : 0, r0 + 8 < T ? pos[r0 + 8] : 0};
        #pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            #pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float f = inv_freq[8 * nt + 2 * u + e];
                #pragma unroll
                for (int rr = 0; rr < 2; ++rr) rope_back_pair(acc_dk[4 * nt + 2 * rr + e], acc_dk[4 * (nt + 8) + 2 * rr + e], (float)p[rr] * f);
            }
        }
    }

    // dK = scale * acc_dk, dV = acc_dv, staged through this warpgroup's rows of sK and sV (once
    // both warpgroups are done reading sK in the dQ products).
    named_barrier_sync(BAR_CONSUMERS, 256);
    store_acc_rows(dk, smem + OFF_K, BW_KV_HALF, acc_dk, ATTN_SCALE, ATTN_SCALE, kr, 64 * wg + 16 * warp, n0 + 64 * wg + 16 * warp, T, ld, h, lane);
    store_acc_rows(dv, smem + OFF_V, BW_KV_HALF, acc_dv, 1.f, 1.f, kr, 64 * wg + 16 * warp, n0 + 64 * wg + 16 * warp, T, ld, h, lane);
}

// ---------------------------------------------------------------------------------------
// 3. dq from the fp32 workspace, with RoPE's backward.
// ---------------------------------------------------------------------------------------

// dq: [T, NH, HD] out (rows ld elements apart) = RoPE^-1(scale * dqacc), bf16; dqacc: [NH,
// T_pad / 64, 64 x 128] fp32 in fragment order: float4 c (< 16) of thread tid (< 128) of tile m
// holds, with w = c / 8 (the warpgroup, dims [64 w, 64 w + 64)), nt = c % 8, warp = tid / 32,
// g = tid % 32 / 4, u = tid % 4: rows 16 warp + g (x, y) and 16 warp + g + 8 (z, w) of the
// tile, dims 64 w + 8 nt + 2u, +1. pos: [T] the RoPE positions, inv_freq: [64] RoPE's
// frequencies. Rows whose span is empty (padding: no dQ partial was written for tiles of only
// such rows) get 0. One block of 256 threads per (query tile of 64 rows, head); each thread
// then rotates back two items of (row, dims j0 .. j0 + 8 and their +64 partners).
extern "C" __global__ void __launch_bounds__(256)
attention_bwd_sm90_finish(bf16* __restrict__ dq, const float* __restrict__ dqacc, const int2* __restrict__ rows,
                          const int* __restrict__ pos, const float* __restrict__ inv_freq, int T, int T_pad, int NH, int ld) {
    __shared__ float tile[BW_BM][ATTN_HD + 4];
    const int n_q = T_pad / BW_BM;
    const int m = blockIdx.x / NH, h = blockIdx.x % NH;
    const float4* src = reinterpret_cast<const float4*>(dqacc + ((size_t)h * n_q + m) * (BW_BM * ATTN_HD));
    #pragma unroll
    for (int it = 0; it < BW_BM * ATTN_HD / 4 / 256; ++it) {
        const int f = it * 256 + threadIdx.x, c = f / 128, tid = f % 128;
        const int w = c / 8, nt = c % 8, warp = tid / 32, g = (tid % 32) / 4, u = tid % 4;
        const float4 x = src[f];
        const int r = 16 * warp + g, col = 64 * w + 8 * nt + 2 * u;
        *reinterpret_cast<float2*>(&tile[r][col]) = make_float2(x.x, x.y);
        *reinterpret_cast<float2*>(&tile[r + 8][col]) = make_float2(x.z, x.w);
    }
    __syncthreads();
    #pragma unroll
    for (int it = 0; it < BW_BM * (ATTN_CHUNKS / 2) / 256; ++it) {
        const int idx = it * 256 + threadIdx.x, r = idx / (ATTN_CHUNKS / 2), j0 = 8 * (idx % (ATTN_CHUNKS / 2));
        const int row = m * BW_BM + r;
        if (row >= T) continue;
        const bool seen = attn_visible(rows[row], row);  // a real row sees itself; padding sees nothing
        const float p = (float)pos[row];
        float x1[8], x2[8];
        #pragma unroll
        for (int e = 0; e < 8; ++e) {
            float a = seen ? tile[r][j0 + e] * ATTN_SCALE : 0.f, b = seen ? tile[r][ATTN_HD / 2 + j0 + e] * ATTN_SCALE : 0.f;
            rope_back_pair(a, b, p * inv_freq[j0 + e]);
            x1[e] = a;
            x2[e] = b;
        }
        bf16* q_row = dq + (size_t)row * ld + h * ATTN_HD;
        *reinterpret_cast<bf16x8*>(q_row + j0) = float_to_bf16x8(x1);
        *reinterpret_cast<bf16x8*>(q_row + ATTN_HD / 2 + j0) = float_to_bf16x8(x2);
    }
}
