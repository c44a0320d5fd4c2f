// attention_sm90.cuh: the Hopper (sm_90a) building blocks that the forward
// (attention_sm90.cu) and the backward (attention_bwd_sm90.cu) share: mbarriers, TMA and bulk
// copies, wgmma and its shared-memory descriptors, named barriers, proxy fences.
// Include only from files marked `// hrm-cu: sm90a-only` (wgmma and setmaxnreg need sm_90a).
//
// Shared-memory tiles are [rows][64] bf16 half-tiles (128-byte rows) in the 128-byte swizzle
// that TMA (CU_TENSOR_MAP_SWIZZLE_128B) and wgmma descriptors (layout type 1) share: 16-byte
// chunk c of row r sits at chunk c ^ (r & 7). A 128-wide row is two half-tiles. Tiles start
// on 1024-byte boundaries (the swizzle repeats every 8 rows of 128 bytes).

#pragma once
#include "attention.cuh"
#include <cuda.h>

// ---------------------------------------------------------------------------------------
// PTX wrappers: mbarriers, TMA and bulk copies, wgmma, setmaxnreg, barriers and fences.
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
// K-major with 64-byte rows (32 k elements) in the 64-byte swizzle (layout type 2): 8-row
// groups 512 bytes apart; a k16 step advances the start address by 32 bytes.
__device__ __forceinline__ uint64_t desc_k_major_sw64(uint32_t addr) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((uint64_t)(512 >> 4) << 32) | (2ull << 62);
}

// The descriptor of the same layout `bytes` further on (a multiple of 16). Only the start
// address field (bits 0-13, in 16-byte units) moves, and shared addresses below 256 KB never
// carry out of it: one 32-bit add on the low word, which the compiler keeps in uniform registers
// when the base is warp-uniform (build the base once, advance it per k step).
__device__ __forceinline__ uint64_t desc_plus(uint64_t desc, uint32_t bytes) {
    return ((desc >> 32) << 32) | (uint32_t)((uint32_t)desc + (bytes >> 4));
}

// threadIdx.x / 128 as lane 0 has it: the same value, but the compiler then knows that it is
// uniform across the warp, and keeps shared addresses and wgmma descriptors derived from it in
// uniform registers instead of rebuilding them in vector registers for every wgmma.
__device__ __forceinline__ int warpgroup_index() { return __shfl_sync(0xffffffffu, threadIdx.x / 128, 0); }

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


// m64n64k16 with both operands from shared memory (32 accumulators per thread: rows g, g+8 of
// the warp's 16, columns 8 nt + 2u, +1 for nt < 8). TRANS_A / TRANS_B = 1 reads that operand
// through an MN-major descriptor (bf16 only). accumulate = 0 overwrites d.
template <int TRANS_A, int TRANS_B>
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1, %35, %36;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS_A), "n"(TRANS_B));
}

__device__ __forceinline__ void fence_regs(float (&d)[32]) {
    #pragma unroll
    for (int i = 0; i < 32; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
__device__ __forceinline__ void fence_regs(uint32_t (&a)[4][4]) {
    #pragma unroll
    for (int i = 0; i < 16; ++i) asm volatile("" : "+r"(a[i / 4][i % 4])::"memory");
}

// 1-D bulk copy of `bytes` (a multiple of 16, both addresses 16-byte aligned) global -> shared;
// completes on `bar` like a TMA tile copy.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(smem_u32(dst)),
                 "l"(src), "r"(bytes), "r"(smem_u32(bar))
                 : "memory");
}

// 1-D bulk store (REDUCE = false) or fp32 add (REDUCE = true) of `bytes` shared -> global, in
// this thread's bulk group. The copy engine performs it; `bulk_wait_all` waits until it is done.
template <bool REDUCE>
__device__ __forceinline__ void bulk_store(float* dst, const void* src, uint32_t bytes) {
    if (REDUCE) {
        asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst), "r"(smem_u32(src)),
                     "r"(bytes)
                     : "memory");
    } else {
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(dst), "r"(smem_u32(src)), "r"(bytes) : "memory");
    }
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
// Waits until this thread's bulk groups are complete: source read, destination written.
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
// Waits until this thread's bulk copies have read their shared-memory sources (the buffers may
// be reused); their writes to global memory may still be in flight.
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }

// Orders this thread's ordinary shared-memory stores before later reads by the async proxy
// (wgmma operands, bulk copies); needed before the barrier that hands the data over.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// The same between this thread's generic and async accesses to global memory.
__device__ __forceinline__ void fence_async_global() { asm volatile("fence.proxy.async.global;\n" ::: "memory"); }

// A barrier among `count` threads (a multiple of 32) on hardware barrier `id` (1..15; 0 is
// __syncthreads).
__device__ __forceinline__ void named_barrier_sync(int id, int count) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory"); }
// Arrives on named barrier `id` without waiting (the producer side of a hand-over).
__device__ __forceinline__ void named_barrier_arrive(int id, int count) { asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory"); }

__device__ __forceinline__ int ld_acquire(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void red_release_add(int* p, int v) {
    asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

// Stages this thread's part of a [64 rows][128] fp32 accumulator (wgmma m64n128 layout: rows
// row + g, row + g + 8 of the warpgroup's tile, columns 8 nt + 2u, +1) as bf16 times `scale`
// into `tile` (two swizzled [rows][64] half-tiles `half_bytes` apart), then lets each warp
// write its 16 rows to head h of x: [T, NH, HD] (rows ld elements apart) rows [grow0 + 16 warp,
// +16), skipping rows >= T. With a `gate` tile (shared memory, laid out like `tile`: the TMA
// copy of the gate block's rows) the rows are gated on the way: x = sigmoid(g) * the staged
// bf16 values (the forward's output y).
// `lrow` is the thread's first row in the tile (16 warp + g plus the warpgroup's offset).
__device__ __forceinline__ void store_acc_rows(bf16* x, unsigned char* tile, int half_bytes, const float (&acc)[64], float scale0,
                                               float scale1, int lrow, int wrow0, int grow0, int T, int ld, int h, int lane,
                                               const unsigned char* gate = nullptr) {
    const int u = lane & 3;
    #pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
        unsigned char* half = tile + (nt / 8) * half_bytes;
        const int c = nt % 8;
        *reinterpret_cast<uint32_t*>(half + lrow * 128 + ((c ^ (lrow & 7)) << 4) + 4 * u) =
            pack_bf16(acc[4 * nt] * scale0, acc[4 * nt + 1] * scale0);
        *reinterpret_cast<uint32_t*>(half + (lrow + 8) * 128 + ((c ^ ((lrow + 8) & 7)) << 4) + 4 * u) =
            pack_bf16(acc[4 * nt + 2] * scale1, acc[4 * nt + 3] * scale1);
    }
    __syncwarp();
    #pragma unroll
    for (int it = 0; it < 8; ++it) {
        const int idx = it * 32 + lane, r = idx / 16, chunk = idx % 16, c = chunk % 8;
        const int trow = wrow0 + r;
        if (grow0 + r < T) {
            const int at = (chunk / 8) * half_bytes + trow * 128 + ((c ^ (trow & 7)) << 4);
            const bf16x8 a = *reinterpret_cast<const bf16x8*>(tile + at);
            *reinterpret_cast<bf16x8*>(x + (size_t)(grow0 + r) * ld + h * ATTN_HD + chunk * 8) =
                gate ? attn_gate8(a, *reinterpret_cast<const bf16x8*>(gate + at)) : a;
        }
    }
}

