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

#include "attention.cuh"
#include <cuda.h>

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
// PTX wrappers: mbarriers, TMA, wgmma, setmaxnreg.
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}

// Arrives once and tells the barrier to expect `bytes` more from the copy engine.
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}

// Waits until the phase of parity `parity` has completed. A fresh barrier is in phase 0, and
// the phase "before" it (parity 1) counts as completed: the producer's first wait on an
// empty barrier passes at once.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n}\n" ::"r"(smem_u32(bar)),
        "r"(parity)
        : "memory");
}

// Copies the box at (c0, c1, c2) of `map` into shared memory; completes on `bar`.
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(
            smem_u32(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar))
        : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N committed groups of this thread are pending (groups complete in order).
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }

// Pins registers that a wgmma in flight reads or writes: the compiler may not move their
// reads or writes across this point, nor reuse them for anything else while they are live.
// Used before issue and after wait, on the accumulators and on register A operands (P).
__device__ __forceinline__ void fence_regs(float (&d)[64]) {
    #pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
__device__ __forceinline__ void fence_regs(uint32_t (&a)[8][4]) {
    #pragma unroll
    for (int i = 0; i < 32; ++i) asm volatile("" : "+r"(a[i / 4][i % 4])::"memory");
}

template <int N>
__device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }

// Shared-memory matrix descriptors for 128-byte-swizzled half-tiles (layout type 1 in bits
// 62-63; addresses and offsets in 16-byte units).
// K-major (rows of 64 contiguous k elements): 8-row groups 1024 bytes apart (SBO); the
// leading offset is unused with this swizzle (1 by convention). A k16 step inside the
// 128-byte row advances the start address by 32 bytes.
__device__ __forceinline__ uint64_t desc_k_major(uint32_t addr) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}
// MN-major (rows hold 64 contiguous n elements, k runs over rows): 8-row k groups 1024
// bytes apart (SBO), the next 64 n elements `lbo` bytes further (LBO).
__device__ __forceinline__ uint64_t desc_mn_major(uint32_t addr, uint32_t lbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}

// d[64] (+)= A[64x16] @ B[16x128]: A and B from shared memory (K-major descriptors).
// accumulate = 0 overwrites d.
__device__ __forceinline__ void wgmma_ss(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// d[64] += A[64x16] @ B[16x128]: A from registers (the mma.sync A layout per warp), B from
// shared memory through an MN-major descriptor (imm-trans-b = 1).
__device__ __forceinline__ void wgmma_rs_bt(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
}

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

// tm_q, tm_k, tm_v: tensor maps of q, k, v [T, NH, HD] bf16 as 3-D tensors (HD, NH, T), boxes
// of (64, 1, 128) with 128-byte swizzle; o: [T, NH, HD] out; lse: [NH, T] out; rows: [T] int2;
// order: [ceil(T / H_BM)] (attention_schedule with tile H_BM, step H_BN).
// Grid: ceil(T / H_BM) * NH blocks of H_THREADS; dynamic shared memory H_SMEM.
extern "C" __global__ void __launch_bounds__(H_THREADS, 1)
attention_fwd_sm90(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                   const __grid_constant__ CUtensorMap tm_v, bf16* __restrict__ o, float* __restrict__ lse,
                   const int2* __restrict__ rows, const int* __restrict__ order, int T, int NH) {
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

    mbar_wait(&bars[B_Q], 0);
    for (int j = 0; j < j_first; ++j) pass_on(j);
    if (j_first <= j_last) {
        // First tile: S, then its softmax (O is still 0).
        mbar_wait(&bars[B_KFULL + (j_first & 1)], (j_first >> 1) & 1);
        fence_regs(s);
        wgmma_fence();
        issue_qk(s, q_base, k_base + (j_first & 1) * H_TILE);
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
            wgmma_fence();
            issue_qk(s, q_base, k_base + st * H_TILE);
            issue_pv(acc, p, v_base + prev * H_TILE);
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
        wgmma_fence();
        issue_pv(acc, p, v_base + st * H_TILE);
        wgmma_wait<0>();
        fence_regs(acc);
        fence_regs(p);
        mbar_arrive(&bars[B_VEMPTY + st]);
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
