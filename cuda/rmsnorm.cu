// rmsnorm: the input-injection add and weightless RMSNorm (SPEC §2); mirrors src/ops/rmsnorm.rs.
//
//   forward    x = z + inj;  rstd = 1/sqrt(mean(x^2) + 1e-6);  y = x * rstd
//   backward   dx += rstd * (dy - y * mean(dy * y)),  y = x * rstd
//
// Invariants
// - One block per row; each thread owns 8 consecutive columns (one 16-byte vector), so
//   blockDim.x = round_up(D/8, 32) <= 1024: D % 8 == 0 and D <= 8192. All pointers are
//   16-byte aligned. The launcher checks all of this.
// - fp32 math. add_rmsnorm_fwd stores x rounded to bf16 and normalises that rounded x, so the
//   backward (which reads x back) differentiates exactly the function the forward computed.
// - x, y and rstd are written with `=`. dx is the residual-stream gradient: accumulated,
//   dx = bf16(float(dx) + delta).
// - Deterministic: every reduction is a fixed-shape tree (block_sum).

#include "common.cuh"

#define RMS_EPS 1e-6f

// Normalises one row held as 8 floats per thread: y = v * rstd, rstd saved by thread 0.
// y_row: [D] bf16, rstd: [1] fp32
__device__ __forceinline__ void normalise_row(const float v[8], bool active, bf16* __restrict__ y_row,
                                              float* __restrict__ rstd, int D) {
    float sum_sq = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; e++) sum_sq += v[e] * v[e];
    const float r = 1.0f / sqrtf(block_sum(sum_sq) / (float)D + RMS_EPS);
    if (active) {
        float y[8];
#pragma unroll
        for (int e = 0; e < 8; e++) y[e] = v[e] * r;
        reinterpret_cast<bf16x8*>(y_row)[threadIdx.x] = float_to_bf16x8(y);
    }
    if (threadIdx.x == 0) *rstd = r;
}

// x: [T, D] bf16 (written), y: [T, D] bf16, rstd: [T] fp32, z: [T, D] bf16,
// inj: [T, D] bf16 or null (then x is a copy of z)
extern "C" __global__ void add_rmsnorm_fwd(bf16* __restrict__ x, bf16* __restrict__ y, float* __restrict__ rstd,
                                           const bf16* __restrict__ z, const bf16* __restrict__ inj, int T, int D) {
    const int64_t row = blockIdx.x;
    const bool active = threadIdx.x < D / 8;
    const int64_t vec = row * (D / 8) + threadIdx.x;
    float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (active) {
        bf16x8 sum = reinterpret_cast<const bf16x8*>(z)[vec];
        if (inj != nullptr) {
            float a[8], b[8];
            bf16x8_to_float(sum, a);
            bf16x8_to_float(reinterpret_cast<const bf16x8*>(inj)[vec], b);
#pragma unroll
            for (int e = 0; e < 8; e++) a[e] += b[e];
            sum = float_to_bf16x8(a);
        }
        reinterpret_cast<bf16x8*>(x)[vec] = sum;
        bf16x8_to_float(sum, v);
    }
    normalise_row(v, active, y + row * D, rstd + row, D);
}

// y: [T, D] bf16, rstd: [T] fp32, x: [T, D] bf16
extern "C" __global__ void rmsnorm_fwd(bf16* __restrict__ y, float* __restrict__ rstd, const bf16* __restrict__ x,
                                       int T, int D) {
    const int64_t row = blockIdx.x;
    const bool active = threadIdx.x < D / 8;
    float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (active) bf16x8_to_float(reinterpret_cast<const bf16x8*>(x + row * D)[threadIdx.x], v);
    normalise_row(v, active, y + row * D, rstd + row, D);
}

// dx: [T, D] bf16 (+=), dy: [T, D] bf16, x: [T, D] bf16, rstd: [T] fp32
extern "C" __global__ void rmsnorm_bwd(bf16* __restrict__ dx, const bf16* __restrict__ dy, const bf16* __restrict__ x,
                                       const float* __restrict__ rstd, int T, int D) {
    const int64_t row = blockIdx.x;
    const bool active = threadIdx.x < D / 8;
    const int64_t vec = row * (D / 8) + threadIdx.x;
    const float r = rstd[row];
    float g[8] = {0, 0, 0, 0, 0, 0, 0, 0}, y[8] = {0, 0, 0, 0, 0, 0, 0, 0}, acc[8];
    if (active) {
        bf16x8_to_float(reinterpret_cast<const bf16x8*>(dy)[vec], g);
        bf16x8_to_float(reinterpret_cast<const bf16x8*>(x)[vec], y);
        bf16x8_to_float(reinterpret_cast<const bf16x8*>(dx)[vec], acc);
    }
    float dot = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; e++) {
        y[e] *= r;
        dot += g[e] * y[e];
    }
    const float mean_dy_y = block_sum(dot) / (float)D;
    if (active) {
#pragma unroll
        for (int e = 0; e < 8; e++) acc[e] += r * (g[e] - y[e] * mean_dy_y);
        reinterpret_cast<bf16x8*>(dx)[vec] = float_to_bf16x8(acc);
    }
}
