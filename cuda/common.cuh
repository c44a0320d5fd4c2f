// Shared helpers for every kernel family.
#pragma once
#include <cuda_bf16.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

// Eight bf16 values moved as one 16-byte access.
struct __align__(16) bf16x8 {
    bf16 v[8];
};

// One 16-byte load of the 8 bf16 at p (16-byte aligned). Going through a uint4 pins the
// width: reading a bf16x8 through a reference to global memory (`f(ptr[i])` with a `const
// bf16x8&` parameter) let nvcc split the access into eight 2-byte loads (LDG.E.U16 in SASS),
// which cost rmsnorm_fwd, gate_fwd and embedding_fwd 10-15% of their bandwidth.
__device__ __forceinline__ bf16x8 load_bf16x8(const bf16* p) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    bf16x8 out;
    memcpy(&out, &raw, sizeof(out));
    return out;
}

// Widening and narrowing of eight values at once (fp32 math on bf16 storage). A bf16 is the
// high half of its fp32: the widening shifts or masks each 32-bit pair (one instruction a
// value; __bfloat162float on the high half extracted, then shifted, took two).
__device__ __forceinline__ void bf16x8_to_float(const bf16x8 in, float out[8]) {
    uint32_t pairs[4];
    memcpy(pairs, &in, sizeof(pairs));
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[2 * i] = __uint_as_float(pairs[i] << 16);
        out[2 * i + 1] = __uint_as_float(pairs[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ bf16x8 float_to_bf16x8(const float in[8]) {
    bf16x8 out;
#pragma unroll
    for (int i = 0; i < 8; i++) out.v[i] = __float2bfloat16_rn(in[i]);
    return out;
}

// sigmoid(x) = 1 / (1 + exp(-x)). The accurate expf (not __expf) saturates to 0 and inf
// without NaN. The reciprocal is __fdividef's (MUFU.RCP and a multiply, 2 ulp): it gives 0
// for denominators above 2^126 (x < -87, where the sigmoid is below fp32's normal range
// anyway) and avoids the IEEE division's slow-path call, whose calling convention pushed
// gate_fwd to 67 registers (spilling once capped) when unrolled.
__device__ __forceinline__ float sigmoid(float x) { return __fdividef(1.0f, 1.0f + expf(-x)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over a 1-D block whose size is a multiple of 32 (<= 1024); every thread gets the total.
// A fixed-shape tree (warp butterflies, then the warp totals in warp order), so the result
// is the same on every run. Must be reached by every thread of the block.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float warp_totals[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();  // the previous call's readers are done with warp_totals
    if (lane == 0) warp_totals[warp] = v;
    __syncthreads();
    v = lane < n_warps ? warp_totals[lane] : 0.0f;
    return warp_sum(v);
}

// Same as block_sum for the maximum.
__device__ __forceinline__ float block_max(float v) {
    __shared__ float warp_maxima[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) warp_maxima[warp] = v;
    __syncthreads();
    v = lane < n_warps ? warp_maxima[lane] : -INFINITY;
    return warp_max(v);
}
