// gemm_sm90: the linear layers' products on Hopper, with the epilogues cuBLASLt cannot run
// (docs/design/gemm-epilogues.md).
// hrm-cu: sm90a-only
//
//   gemm_sm90          y [M, N] = x [M, K] @ w [N, K]^T
//   gemm_rope_sm90     gqkv [M, 4C] = x [M, K] @ w [4C, K]^T, then its query and key blocks
//                      (columns [C, 3C)) rotated by RoPE at pos [M] (cuda/rope.cuh), from the
//                      bf16-rounded product (so the bits of qkv_rope_fwd on the stored product)
//   gemm_swiglu_sm90   gu [M, 2I] = x [M, K] @ w [2I, K]^T;  act [M, I] = silu(gate) * up,
//                      gate = gu[:, :I], up = gu[:, I:], both as rounded to bf16 (so act has the
//                      bits swiglu_fwd computes from the stored gu)
//   gemm_swiglu_bwd_sm90
//                      dact [M, I] = dy [M, D] @ w [D, I]  (the down projection's input
//                      gradient, K = D), then dgu [M, 2I] = swiglu_bwd(dact, gu) from the
//                      bf16-rounded dact (so the bits of swiglu_bwd on the stored product);
//                      dact itself stored only when asked (the selftest)
//
// bf16 in and out, fp32 accumulation; M = tokens, N = out features, K = in features; w as
// nn.Linear stores it: K-major for the forward products; for the input gradient its rows are
// the K dimension (MN-major B, read through transposed descriptors). Requirements, checked by
// the launcher: N % 256 == 0 (I % 128 == 0 forward, I % 256 == 0 backward; C % 256 == 0, so a
// tile holds two whole heads of one block), K % 128 == 0; any M.
//
// Design (the attention kernels' building blocks, cuda/attention_sm90.cuh):
// - Clusters of two blocks on two SMs, one block per SM, persistent: a cluster takes pairs of
//   output tiles (tile rows 2 p and 2 p + 1, one tile column) in a fixed stride over the pairs,
//   numbered in groups of GROUP_M pair rows so that the clusters running at once share A rows
//   and B columns in L2. Output tiles are 128 x 256.
// - The two tiles of a pair share their B tile [256][64] per K step: each block copies one of
//   its two 128-row boxes of w from L2 and multicasts it into both blocks' shared memory (the
//   box of w columns [256 tn, +256) of y, or the gate rows [128 tn, +128) and the up rows
//   [I + 128 tn, +128) of the SwiGLU tile). That is 32 KB from L2 per block and K step instead
//   of 48. With MN-major B (the backward) a block's half is two [BK][64] boxes of w.
// - Warp 0, one thread: the producer. Per K step of 64 it copies its A tile [128][64] and its
//   B box by TMA (128-byte swizzle) into a ring of STAGES stages. A stage's full barrier
//   completes with the bytes of all three copies (its own two and the peer's multicast); its
//   empty barrier with one arrival from each consumer warp of *both* blocks (the peer's
//   producer writes into it). The ring runs on across tiles.
// - Warpgroups 1 and 2, the consumers: rows [64 c, 64 c + 64) of the tile, all 256 columns:
//   per K step 4 wgmma m64n256k16 (A and B from shared memory), one group kept in flight (the
//   stage of the previous step is released once its group is done). 128 fp32 accumulators a
//   thread. At the end of a tile they round them to bf16 into their hand-off buffer [64][256]
//   and go on to the next tile's products at once.
//   The input gradient's kernel runs K steps of 32 in 4 stages instead (its A tile in the
//   64-byte swizzle; 96 KB of ring instead of 144), so that 64 KB are left for gu below.
// - Warps 1..3, the epilogue: they empty each hand-off buffer while the consumers compute the
//   next tile. Its four [64][64] column blocks go out by TMA stores (y, or gu's gate and up
//   blocks); for SwiGLU the warps also compute act from the buffer's gate and up halves and
//   store it row by row (16-byte chunks); for RoPE they first rotate a query or key tile's two
//   heads in the buffer (each thread keeps one 8-column chunk of the half-head, and so its 8
//   frequencies). The buffer is handed back once the stores have read it.
//   For the SwiGLU backward the warps go through a buffer in two units of 32 rows: a unit's
//   gate and up blocks of gu ([32][256] each) come by TMA into one of two 32 KB slots, issued
//   two units ahead (as soon as the slot's previous unit is read); the warps compute dgate
//   and dup from the buffer's dact and the slot's gate and up (swiglu.cuh) and store them to
//   dgu from registers (16-byte chunks, a row's 512 bytes by one warp). gu in by TMA and the
//   SFU's sigmoid keep them ahead of the products: ~19 instructions an element (~29 with the
//   accurate sigmoid), and no load in the way of the math. Loading gu straight into
//   registers left ~6 KB in flight per SM and ran at ~370 GB/s.
// - Neither block exits before the other is done with its barriers (a cluster barrier).
// The tensor maps view x, w, y (and gu) as (128, cols / 128, rows): the attention's (HD, NH,
// T) maps, so a block of 64 columns starting at column c is (c0 = c % 128, c1 = c / 128, row).

#include "attention_sm90.cuh"
#include "rope.cuh"
#include "swiglu.cuh"

#define G_BM 128
#define G_BN 256
#define G_GROUP_M 8
#define G_THREADS 384
#define G_CONSUMER_WARPS 8                          // warps 4..11
#define G_EPILOGUE_THREADS 96                       // warps 1..3
#define G_B_BOX 128                                 // rows of w per TMA box (K-major B)
#define G_BLOCK_BYTES (64 * 64 * 2)                 // a [64 rows][64 columns] bf16 block, 8 KB
#define G_HANDOFF_BYTES (4 * G_BLOCK_BYTES)         // a consumer's [64][256] bf16, 32 KB
#define G_EPILOGUE_BARRIER 1                        // named barrier of the epilogue warps
#define G_GU_BOX_BYTES (32 * 64 * 2)                // a [32 rows][64 columns] bf16 box of gu, 4 KB
#define G_GU_SLOT_BYTES (8 * G_GU_BOX_BYTES)        // 32 rows of gate and up, [32][256] each

enum GemmEpilogue { EPI_STORE, EPI_SWIGLU, EPI_ROPE, EPI_SWIGLU_BWD };

// The shared memory of a kernel: the ring of STAGES stages (A [128][BK], then B [256][BK] or,
// MN-major, [BK][256] as four [BK][64] boxes), the two hand-off buffers, and for the SwiGLU
// backward two gu slots (G_GU_SLOT_BYTES each). The forward kernels:
// K steps of 64, 3 stages, 209 KB with the alignment slack; the backward: K steps of 32 (A in
// the 64-byte swizzle), 4 stages, 225 KB.
template <int EPI>
struct GemmLayout {
    static constexpr bool BWD = EPI == EPI_SWIGLU_BWD;
    static constexpr int BK = BWD ? 32 : 64;
    static constexpr int STAGES = BWD ? 4 : 3;
    static constexpr int A_BYTES = G_BM * BK * 2;
    static constexpr int B_BYTES = G_BN * BK * 2;
    static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
    static constexpr int OFF_HANDOFF = STAGES * STAGE_BYTES;
    static constexpr int OFF_GU = OFF_HANDOFF + 2 * G_HANDOFF_BYTES;
    static constexpr int SMEM = OFF_GU + (BWD ? 2 * G_HANDOFF_BYTES : 0) + 1024;
};

// d[128] (+)= A[64x16] @ B[16x256]: A and B from shared memory, A K-major, B K-major or (TRANS_B
// = 1) MN-major; the accumulator layout of m64n256: rows g, g + 8 of the warp's 16, columns
// 8 nt + 2u, +1 for nt < 32 (d[4 nt + c]). accumulate = 0 overwrites d.
template <int TRANS_B>
__device__ __forceinline__ void wgmma_ss_n256(float (&d)[128], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "%128, %129, p, 1, 1, 0, %131;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS_B));
}

__device__ __forceinline__ void fence_regs(float (&d)[128]) {
    #pragma unroll
    for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The cluster helpers: this block's rank in its cluster of two, the peer's address of a
// shared-memory barrier, an arrival on it, a TMA copy multicast to both blocks, and a barrier
// over all threads of the cluster.
__device__ __forceinline__ uint32_t cluster_rank() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
__device__ __forceinline__ uint32_t peer_address(const void* local, uint32_t rank) {
    uint32_t a;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(a) : "r"(smem_u32(local)), "r"(rank));
    return a;
}
// (The default .release.cta: a .cluster release would also wait for this thread's earlier
// global stores, measured 24% slower.)
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t cluster_addr) {
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(cluster_addr) : "memory");
}
__device__ __forceinline__ void tma_load_multicast(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2, uint16_t mask) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%2, %3, %4}], [%5], "
        "%6;\n" ::"r"(smem_u32(dst)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar)), "h"(mask)
        : "memory");
}
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// A TMA store of the [64][64] block at `src` to (c0, c1, c2) of `map`, in this thread's bulk
// group; rows past the tensor's end are not written.
__device__ __forceinline__ void tma_store(const CUtensorMap* map, const void* src, int c0, int c1, int c2) {
    asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%1, %2, %3}], [%4];\n" ::"l"(reinterpret_cast<uint64_t>(map)),
                 "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(src))
                 : "memory");
}

// A position in a ring of STAGES stages, counted in K steps: the stage, the parity of the
// passes over the ring so far (the full barriers' phase), and the stage before.
template <int STAGES>
struct RingPosition {
    int stage = 0, previous = STAGES - 1;
    uint32_t phase = 0;
    __device__ __forceinline__ void advance() {
        previous = stage;
        if (++stage == STAGES) {
            stage = 0;
            phase ^= 1;
        }
    }
};

// Pair `p` of a grid of pairs_m x tiles_n: (pair row, tile column), in groups of G_GROUP_M
// pair rows walked column by column.
__device__ __forceinline__ void pair_coords(int p, int pairs_m, int tiles_n, int* pm, int* tn) {
    const int per_group = G_GROUP_M * tiles_n;
    const int first = (p / per_group) * G_GROUP_M;
    const int rows = min(G_GROUP_M, pairs_m - first);
    const int in_group = p % per_group;
    *pm = first + in_group % rows;
    *tn = in_group / rows;
}

// Byte offset of the 16-byte chunk (row r, columns [8 c, 8 c + 8)) of a row-major tile stored
// as column blocks of 64 (BLOCK_BYTES each) in the 128-byte swizzle (TMA's layout).
template <int BLOCK_BYTES>
__device__ __forceinline__ int swizzled_chunk(int r, int c) { return (c / 8) * BLOCK_BYTES + r * 128 + (((c % 8) ^ (r & 7)) << 4); }
// ... of a [64][256] hand-off buffer: four [64][64] blocks.
__device__ __forceinline__ int handoff_chunk(int r, int c) { return swizzled_chunk<G_BLOCK_BYTES>(r, c); }

// tm_x: x [M, K] as (128, K / 128, M), box (64, 1, 128), or for EPI_SWIGLU_BWD box (32, 1, 128)
// in the 64-byte swizzle; tm_w: w [N, K] (w [2I, K] for EPI_SWIGLU), box (64, 1, 128), or for
// EPI_SWIGLU_BWD w [K, N] as (128, N / 128, K), box (64, 1, 32); tm_y: EPI_STORE y [M, N],
// EPI_SWIGLU gu [M, 2I] (N = I), EPI_SWIGLU_BWD dact [M, N]; box (64, 1, 64); store_y = 0
// leaves gu or dact out. act: [M, I] for EPI_SWIGLU. pos: [M], rope_c = C for EPI_ROPE.
// EPI_SWIGLU_BWD: tm_gu: gu [M, 2N], box (64, 1, 32); dgu: [M, 2N]. All maps but the
// backward's x 128-byte swizzled. Grid: clusters of 2 blocks of G_THREADS, at most as many
// clusters as tile pairs; dynamic shared memory GemmLayout<EPI>::SMEM.
template <int EPI>
__device__ __forceinline__ void gemm_sm90_body(const CUtensorMap& tm_x, const CUtensorMap& tm_w, const CUtensorMap& tm_y, int store_y,
                                               bf16* __restrict__ act, const int* __restrict__ pos, int rope_c,
                                               const CUtensorMap& tm_gu, bf16* __restrict__ dgu, int M, int N, int K) {
    using L = GemmLayout<EPI>;
    extern __shared__ unsigned char smem_raw[];
    __shared__ __align__(8) uint64_t full[L::STAGES], empty[L::STAGES], handoff_full[2], handoff_empty[2], gu_full[2];
    unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
    // tile columns: 256 columns of y (or dact), or 128 columns of act
    const int tile_cols = EPI == EPI_SWIGLU ? G_BN / 2 : G_BN;
    const int tiles_m = (M + G_BM - 1) / G_BM, tiles_n = N / tile_cols;
    // pairs of tile rows (the last pair's second row may lie past M: zeros in, nothing out)
    const int pairs_m = (tiles_m + 1) / 2, pairs = pairs_m * tiles_n;
    const int cluster = blockIdx.x / 2, clusters = gridDim.x / 2;
    const uint32_t rank = cluster_rank();
    const int k_steps = K / L::BK;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    if (threadIdx.x == 0) {
        for (int s = 0; s < L::STAGES; ++s) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], 2 * G_CONSUMER_WARPS);
        }
        for (int c = 0; c < 2; ++c) {
            mbar_init(&handoff_full[c], 4);  // the consumer's four warps
            mbar_init(&handoff_empty[c], 1);
        }
        mbar_init(&gu_full[0], 1);
        mbar_init(&gu_full[1], 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    // The peer's barriers are initialised before anything arrives on them.
    cluster_sync();

    if (warp < 4) setmaxnreg_dec<96>();  // the whole warpgroup 0: producer and epilogue
    if (warp == 0) {
        if (lane == 0) {
            RingPosition<L::STAGES> ring;  // the K steps issued by this block so far
            for (int p = cluster; p < pairs; p += clusters) {
                int pm, tn;
                pair_coords(p, pairs_m, tiles_n, &pm, &tn);
                const int tm = 2 * pm + rank;
                // this block's B box: the w rows of half `rank` of the tile's B
                const int b_row = EPI == EPI_SWIGLU ? rank * N + tn * G_B_BOX : tn * G_BN + rank * G_B_BOX;
                for (int k = 0; k < k_steps; ++k, ring.advance()) {
                    const int s = ring.stage;
                    mbar_wait(&empty[s], ring.phase ^ 1);
                    mbar_expect_tx(&full[s], L::STAGE_BYTES);
                    unsigned char* stage = smem + s * L::STAGE_BYTES;
                    // x columns [BK k, +BK): (c0, c1) = (BK k % 128, BK k / 128)
                    tma_load(stage, &tm_x, &full[s], (L::BK * k) % 128, (L::BK * k) / 128, tm * G_BM);
                    if (L::BWD) {
                        // w rows [32 k, +32), columns 256 tn + 128 rank + [0, 128): two [32][64] boxes
                        #pragma unroll
                        for (int b = 0; b < 2; ++b)
                            tma_load_multicast(stage + L::A_BYTES + (2 * rank + b) * (L::BK * 128), &tm_w, &full[s], 64 * b, 2 * tn + rank, L::BK * k, 0x3);
                    } else {
                        tma_load_multicast(stage + L::A_BYTES + rank * G_B_BOX * 128, &tm_w, &full[s], 64 * (k % 2), k / 2, b_row, 0x3);
                    }
                }
            }
        }
    } else if (warp < 4) {
        // The epilogue: hand-off buffer c of each tile holds rows tm * 128 + [64 c, 64 c + 64).
        const int e = threadIdx.x - 32;  // 0..95
        // RoPE: this thread's chunk of a half-head, columns [8 rc, 8 rc + 8), and its rows
        // r0 + 12 i of a buffer; the chunk's 8 frequencies
        const int rc = e % 8, r0 = e / 8;
        float inv_freq[8];
        #pragma unroll
        for (int i = 0; i < 8; ++i) inv_freq[i] = EPI == EPI_ROPE ? rope_inv_freq(8 * rc + i) : 0.f;
        // SwiGLU backward: units of 32 rows, u = 4 n + 2 c + h (this block's tile n, hand-off
        // buffer c, its half h). Unit u's gu comes by TMA into slot u % 2 two units ahead
        // (thread e = 0): gate columns 256 tn + 64 b, up columns N + 256 tn + 64 b, as [32][64]
        // boxes, gate's four then up's.
        unsigned char* staging = smem + L::OFF_GU;
        auto load_unit = [&](int u) {
            const int p = cluster + (u / 4) * clusters;
            if (p >= pairs) return;
            int pm, tn;
            pair_coords(p, pairs_m, tiles_n, &pm, &tn);
            const int row = (2 * pm + rank) * G_BM + 32 * (u % 4);
            uint64_t* bar = &gu_full[u % 2];
            unsigned char* slot = staging + (u % 2) * G_GU_SLOT_BYTES;
            mbar_expect_tx(bar, G_GU_SLOT_BYTES);
            #pragma unroll
            for (int b = 0; b < 8; ++b) {
                const int col = (b / 4) * N + tn * G_BN + 64 * (b % 4);
                tma_load(slot + b * G_GU_BOX_BYTES, &tm_gu, bar, col % 128, col / 128, row);
            }
        };
        if (L::BWD && e == 0) {
            load_unit(0);
            load_unit(1);
        }
        int n = 0;                       // tiles done: the hand-off barriers' phase
        for (int p = cluster; p < pairs; p += clusters, ++n) {
            int pm, tn;
            pair_coords(p, pairs_m, tiles_n, &pm, &tn);
            const int tm = 2 * pm + rank;
            for (int c = 0; c < 2; ++c) {
                unsigned char* buf = smem + L::OFF_HANDOFF + c * G_HANDOFF_BYTES;
                const int row0 = tm * G_BM + 64 * c;
                mbar_wait(&handoff_full[c], n & 1);
                if (EPI == EPI_ROPE && tn * G_BN >= rope_c && tn * G_BN < 3 * rope_c) {
                    // a query or key tile: heads h = 0, 1 are blocks (2 h, 2 h + 1), rotated in
                    // place, then handed to the TMA stores (the async-proxy fence)
                    for (int r = r0; r < 64 && row0 + r < M; r += G_EPILOGUE_THREADS / 8) {
                        float cs[8], sn[8];
                        const float p = (float)pos[row0 + r];
                        #pragma unroll
                        for (int i = 0; i < 8; ++i) rope_sincos(p * inv_freq[i], &sn[i], &cs[i]);
                        #pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            bf16x8* lo = reinterpret_cast<bf16x8*>(buf + handoff_chunk(r, 16 * h + rc));
                            bf16x8* hi = reinterpret_cast<bf16x8*>(buf + handoff_chunk(r, 16 * h + 8 + rc));
                            float x1[8], x2[8], o1[8], o2[8];
                            bf16x8_to_float(*lo, x1);
                            bf16x8_to_float(*hi, x2);
                            rope_rotate8(x1, x2, cs, sn, o1, o2);
                            *lo = float_to_bf16x8(o1);
                            *hi = float_to_bf16x8(o2);
                        }
                    }
                    fence_async_shared();
                    named_barrier_sync(G_EPILOGUE_BARRIER, G_EPILOGUE_THREADS);
                }
                if (e == 0 && store_y) {
                    // y (or dact) columns 256 tn + 64 b; or gu's gate columns 128 tn + 64 b
                    // (b < 2) and up columns I + 128 tn + 64 (b - 2)
                    #pragma unroll
                    for (int b = 0; b < 4; ++b) {
                        const int col = EPI == EPI_SWIGLU ? (b / 2) * N + tn * 128 + 64 * (b % 2) : tn * G_BN + 64 * b;
                        tma_store(&tm_y, buf + b * G_BLOCK_BYTES, col % 128, col / 128, row0);
                    }
                    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
                }
                if (EPI == EPI_SWIGLU) {
                    // act rows row0 + r, columns 128 tn + 8 j: chunk j of the gate half with
                    // chunk j of the up half (columns 128 + 8 j)
                    for (int item = e; item < 64 * 16; item += G_EPILOGUE_THREADS) {
                        const int r = item / 16, j = item % 16;
                        if (row0 + r >= M) break;  // items run row by row
                        float gate[8], up[8], out[8];
                        bf16x8_to_float(*reinterpret_cast<const bf16x8*>(buf + handoff_chunk(r, j)), gate);
                        bf16x8_to_float(*reinterpret_cast<const bf16x8*>(buf + handoff_chunk(r, 16 + j)), up);
                        swiglu_fwd8(gate, up, out);
                        *reinterpret_cast<bf16x8*>(act + (size_t)(row0 + r) * N + tn * 128 + 8 * j) = float_to_bf16x8(out);
                    }
                }
                if (L::BWD) {
                    // dgu rows row0 + 32 h + r: gate columns 256 tn + 8 j and up columns N + 256
                    // tn + 8 j, from chunk j of the buffer's dact and of the staged gate and up.
                    // A thread keeps its chunk column j (the row stride, 96 / 32, keeps it).
                    const int j = e % 32;
                    for (int h = 0; h < 2; ++h) {
                        const int u = 4 * n + 2 * c + h;
                        const unsigned char* slot = staging + (u % 2) * G_GU_SLOT_BYTES;
                        mbar_wait(&gu_full[u % 2], (u / 2) & 1);
                        for (int r = e / 32; r < 32 && row0 + 32 * h + r < M; r += G_EPILOGUE_THREADS / 32) {
                            // chunk j of row r in the slot's [32][64] boxes
                            const int at = swizzled_chunk<G_GU_BOX_BYTES>(r, j);
                            float d[8], gate[8], up[8], dgate[8], dup[8];
                            bf16x8_to_float(*reinterpret_cast<const bf16x8*>(buf + handoff_chunk(32 * h + r, j)), d);
                            bf16x8_to_float(*reinterpret_cast<const bf16x8*>(slot + at), gate);
                            bf16x8_to_float(*reinterpret_cast<const bf16x8*>(slot + 4 * G_GU_BOX_BYTES + at), up);
                            swiglu_bwd8(d, gate, up, dgate, dup);
                            bf16* dst = dgu + (size_t)(row0 + 32 * h + r) * 2 * N + tn * G_BN + 8 * j;
                            *reinterpret_cast<bf16x8*>(dst) = float_to_bf16x8(dgate);
                            *reinterpret_cast<bf16x8*>(dst + N) = float_to_bf16x8(dup);
                        }
                        // The slot is read: unit u + 2's gu into it.
                        named_barrier_sync(G_EPILOGUE_BARRIER, G_EPILOGUE_THREADS);
                        if (e == 0) load_unit(u + 2);
                    }
                }
                // The buffer goes back once the stores have read it and every chunk is read.
                if (e == 0) bulk_wait_read();
                named_barrier_sync(G_EPILOGUE_BARRIER, G_EPILOGUE_THREADS);
                if (e == 0) mbar_arrive(&handoff_empty[c]);
            }
        }
        // The stores finish before the block exits.
        if (e == 0) bulk_wait_all();
    } else {
        setmaxnreg_inc<200>();
        // consumer 0 or 1 (through a shuffle, so the compiler sees it uniform and keeps the
        // descriptors in uniform registers), its warp 0..3
        const int c = __shfl_sync(0xffffffff, warp / 4 - 1, 0), cw = warp % 4;
        const int g = lane >> 2, u = lane & 3;
        unsigned char* buf = smem + L::OFF_HANDOFF + c * G_HANDOFF_BYTES;
        // a stage is released to both producers: this block's and the peer's empty barriers
        const uint32_t peer_empty = peer_address(&empty[0], rank ^ 1);
        // stage 0's descriptors of this consumer's 64 A rows and of B: stage s lies s *
        // STAGE_BYTES further (the address field counts 16-byte units). The next 16 columns of
        // K: 32 bytes along A's rows; 32 bytes along B's rows (K-major), or 16 rows of 128
        // bytes down its four [BK][64] boxes (MN-major)
        const uint64_t desc_a0 = L::BWD ? desc_k_major_sw64(smem_u32(smem) + 64 * c * (2 * L::BK)) : desc_k_major(smem_u32(smem) + 64 * c * (2 * L::BK));
        const uint64_t desc_b0 = L::BWD ? desc_mn_major(smem_u32(smem + L::A_BYTES), L::BK * 128) : desc_k_major(smem_u32(smem + L::A_BYTES));
        constexpr uint32_t b_k16 = L::BWD ? 2048 >> 4 : 2;
        RingPosition<L::STAGES> ring;
        int n = 0;
        for (int p = cluster; p < pairs; p += clusters, ++n) {
            float acc[128];
            for (int k = 0; k < k_steps; ++k) {
                const int s = ring.stage;
                mbar_wait(&full[s], ring.phase);
                const uint64_t step = (uint64_t)(s * (L::STAGE_BYTES >> 4));
                fence_regs(acc);
                wgmma_fence();
                // the first K step overwrites the accumulators (the previous tile's are in
                // the hand-off buffer)
                wgmma_ss_n256<L::BWD>(acc, desc_a0 + step, desc_b0 + step, k > 0);
                #pragma unroll
                for (int kk = 1; kk < L::BK / 16; ++kk) wgmma_ss_n256<L::BWD>(acc, desc_a0 + step + 2 * kk, desc_b0 + step + b_k16 * kk, 1);
                wgmma_commit();
                // The previous step's group is done once at most this one is in flight: its
                // stage goes back to both producers, one arrival per warp.
                wgmma_wait<1>();
                fence_regs(acc);
                if (k > 0 && lane == 0) {
                    mbar_arrive(&empty[ring.previous]);
                    mbar_arrive_cluster(peer_empty + 8 * ring.previous);
                }
                ring.advance();
            }
            wgmma_wait<0>();
            fence_regs(acc);
            if (lane == 0) {
                mbar_arrive(&empty[ring.previous]);
                mbar_arrive_cluster(peer_empty + 8 * ring.previous);
            }
            // Rows 16 cw + g and + 8 of the buffer, columns 8 nt + 2 u, +1, as bf16; then the
            // buffer goes to the epilogue (its TMA stores read it: the async-proxy fence).
            mbar_wait(&handoff_empty[c], (n & 1) ^ 1);
            const int r = 16 * cw + g;
            #pragma unroll
            for (int nt = 0; nt < 32; ++nt) {
                *reinterpret_cast<uint32_t*>(buf + handoff_chunk(r, nt) + 4 * u) = pack_bf16(acc[4 * nt], acc[4 * nt + 1]);
                *reinterpret_cast<uint32_t*>(buf + handoff_chunk(r + 8, nt) + 4 * u) = pack_bf16(acc[4 * nt + 2], acc[4 * nt + 3]);
            }
            fence_async_shared();
            __syncwarp();
            if (lane == 0) mbar_arrive(&handoff_full[c]);
        }
    }
    // The peer still arrives on this block's barriers until its last stage is consumed.
    cluster_sync();
}

extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(G_THREADS, 1)
gemm_sm90(const __grid_constant__ CUtensorMap tm_x, const __grid_constant__ CUtensorMap tm_w, const __grid_constant__ CUtensorMap tm_y,
          int M, int N, int K) {
    gemm_sm90_body<EPI_STORE>(tm_x, tm_w, tm_y, 1, nullptr, nullptr, 0, tm_y, nullptr, M, N, K);
}

// tm_gu: gu, written unless store_gu = 0; N = I.
extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(G_THREADS, 1)
gemm_swiglu_sm90(const __grid_constant__ CUtensorMap tm_x, const __grid_constant__ CUtensorMap tm_w, const __grid_constant__ CUtensorMap tm_gu,
                 int store_gu, bf16* __restrict__ act, int M, int I, int K) {
    gemm_sm90_body<EPI_SWIGLU>(tm_x, tm_w, tm_gu, store_gu, act, nullptr, 0, tm_gu, nullptr, M, I, K);
}

// tm_y: gqkv [M, 4C]; pos: [M]; N = 4C.
extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(G_THREADS, 1)
gemm_rope_sm90(const __grid_constant__ CUtensorMap tm_x, const __grid_constant__ CUtensorMap tm_w, const __grid_constant__ CUtensorMap tm_y,
               const int* __restrict__ pos, int M, int N, int K, int C) {
    gemm_sm90_body<EPI_ROPE>(tm_x, tm_w, tm_y, 1, nullptr, pos, C, tm_y, nullptr, M, N, K);
}

// tm_dy: dy [M, K] (64-byte swizzle, box (32, 1, 128)); tm_w: w [K, I] (the down
// projection's weight, K = D; box (64, 1, 32)); tm_dact: dact [M, I], written unless
// store_dact = 0; tm_gu: gu [M, 2I], box (64, 1, 32); dgu: [M, 2I].
extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(G_THREADS, 1)
gemm_swiglu_bwd_sm90(const __grid_constant__ CUtensorMap tm_dy, const __grid_constant__ CUtensorMap tm_w,
                     const __grid_constant__ CUtensorMap tm_dact, const __grid_constant__ CUtensorMap tm_gu, int store_dact,
                     bf16* __restrict__ dgu, int M, int I, int K) {
    gemm_sm90_body<EPI_SWIGLU_BWD>(tm_dy, tm_w, tm_dact, store_dact, nullptr, nullptr, 0, tm_gu, dgu, M, I, K);
}
