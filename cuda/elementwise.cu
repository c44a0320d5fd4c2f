// elementwise: the small bf16 maps the model needs besides its op families; mirrors
// src/ops/elementwise.rs.
//
//   add_act         dst[i] = dst[i] + src[i]           gradient fan-in of a recurrent state
//   broadcast_rows  out[r, c] = row[c]                  z_L_init onto every token
//   sum_squares     partial[b] = sum of x[i]^2 over block b's elements   (gradient norm)
//
// Invariants
// - Pure element maps: only the listed outputs are written, each element once.
// - add_act adds in fp32 and rounds once to nearest even, so it is bit-exact against
//   bf16(float(a) + float(b)) on the CPU.
// - Pointers 16-byte aligned (the launcher checks): each thread moves 8 elements per iteration
//   as 16-byte accesses; add_act's last n % 8 elements go one by one, broadcast_rows needs
//   d % 8 == 0 (the launcher checks).
// - sum_squares is deterministic: a fixed grid, each thread sums a fixed strided set of
//   elements in fp64, then a fixed-order tree in shared memory; the host adds the partials
//   in order.

#include "common.cuh"

// dst: [n] bf16 (+=), src: [n] bf16
extern "C" __global__ void add_act(bf16* __restrict__ dst, const bf16* __restrict__ src, int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n / 8; i += stride) {
        float a[8], b[8];
        bf16x8_to_float(reinterpret_cast<const bf16x8*>(dst)[i], a);
        bf16x8_to_float(reinterpret_cast<const bf16x8*>(src)[i], b);
#pragma unroll
        for (int e = 0; e < 8; e++) a[e] += b[e];
        reinterpret_cast<bf16x8*>(dst)[i] = float_to_bf16x8(a);
    }
    for (int64_t i = n / 8 * 8 + (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        dst[i] = __float2bfloat16_rn(__bfloat162float(dst[i]) + __bfloat162float(src[i]));
    }
}

// out: [t, d] bf16, row: [d] bf16; d % 8 == 0
extern "C" __global__ void broadcast_rows(bf16* __restrict__ out, const bf16* __restrict__ row, int64_t t, int32_t d) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int32_t d8 = d / 8;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < t * d8; i += stride) {
        reinterpret_cast<bf16x8*>(out)[i] = reinterpret_cast<const bf16x8*>(row)[i % d8];
    }
}

// partial: [gridDim.x] fp64 (written), x: [n] fp32; blockDim.x == 256
extern "C" __global__ void sum_squares(double* __restrict__ partial, const float* __restrict__ x, int64_t n) {
    __shared__ double tree[256];
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    double acc = 0.0;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const double v = x[i];
        acc += v * v;
    }
    tree[threadIdx.x] = acc;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) tree[threadIdx.x] += tree[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = tree[0];
}
