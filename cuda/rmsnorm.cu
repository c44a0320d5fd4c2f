// rmsnorm: the input-injection add and weightless RMSNorm (SPEC §2); mirrors src/ops/rmsnorm.rs.
//
//   forward    x = z + inj;  rstd = 1/sqrt(mean(x^2) + 1e-6);  y = x * rstd
//   backward   dx += rstd * (dy - y * mean(dy * y)),  y = x * rstd
//
// Two layouts, the same arithmetic:
// - *_warp<VPL> (forward only; D <= 8 * 32 * 10 = 2560, every model size): one warp per row,
//   RMS_WARPS rows per block. Lane l holds the row's 16-byte vectors l, l+32, ... (VPL of
//   them, a compile-time count so they stay in registers) in registers, all loaded before the
//   first is used, and the row reduction is a warp butterfly with no block barrier. The
//   launcher picks the smallest instantiated VPL >= D/256: 6 at D = 1536.
//   v1 of this file ran one block of D/8 threads per row with a single 16-byte load a
//   thread: at D = 1536 only ~30 KB were in flight per SM (10 blocks of 192 threads), and
//   rmsnorm_fwd reached 73% of the copy bandwidth on an H200.
// - *_block (D <= 8192): one block per row, each thread owns one 16-byte vector, so
//   blockDim.x = round_up(D/8, 32) <= 1024; reductions through block_sum. The backward
//   always runs this one: its three loads a thread (dy, x, dx) keep enough bytes in flight,
//   where the warp layout, holding two tensors' rows in registers (117 registers at VPL 6),
//   ran 16 warps per SM and loaded dx in a second round trip after the reduction: 78% of the
//   copy bandwidth on an H200 at [16384, 1536], against 94% for the block layout.
//
// Invariants
// - D % 8 == 0, D <= 8192, all pointers 16-byte aligned. The launcher checks all of this
//   and picks the layout.
// - fp32 math. add_rmsnorm_fwd stores x rounded to bf16 and normalises that rounded x, so the
//   backward (which reads x back) differentiates exactly the function the forward computed.
// - x, y and rstd are written with `=`. dx is the residual-stream gradient: accumulated,
//   dx = bf16(float(dx) + delta).
// - Deterministic: every reduction is a fixed-shape tree (warp_sum, block_sum).

#include "common.cuh"

#define RMS_EPS 1e-6f
// Rows (warps) per block in the warp layout.
#define RMS_WARPS 4

// ---- warp per row ------------------------------------------------------------------------

// The lane's vector k of a row of n_vec vectors: index lane + 32k, present if below n_vec.
__device__ __forceinline__ bool lane_has(int k, int n_vec) { return (int)(threadIdx.x % 32) + 32 * k < n_vec; }
__device__ __forceinline__ int lane_col(int k) { return 8 * ((int)(threadIdx.x % 32) + 32 * k); }

// y = v * rstd for the lane's vectors of one row, rstd saved by lane 0.
// v: the lane's vectors as loaded, y_row: [D] bf16, rstd: [1] fp32
template <int VPL>
__device__ __forceinline__ void normalise_row_warp(const bf16x8 (&v)[VPL], bf16* __restrict__ y_row,
                                                   float* __restrict__ rstd, int D) {
    const int n_vec = D / 8;
    float sum_sq = 0.0f;
#pragma unroll
    for (int k = 0; k < VPL; k++) {
        if (!lane_has(k, n_vec)) continue;
        float f[8];
        bf16x8_to_float(v[k], f);
#pragma unroll
        for (int e = 0; e < 8; e++) sum_sq += f[e] * f[e];
    }
    const float r = 1.0f / sqrtf(warp_sum(sum_sq) / (float)D + RMS_EPS);
#pragma unroll
    for (int k = 0; k < VPL; k++) {
        if (!lane_has(k, n_vec)) continue;
        float f[8];
        bf16x8_to_float(v[k], f);
#pragma unroll
        for (int e = 0; e < 8; e++) f[e] *= r;
        *reinterpret_cast<bf16x8*>(y_row + lane_col(k)) = float_to_bf16x8(f);
    }
    if (threadIdx.x % 32 == 0) *rstd = r;
}

// x: [T, D] bf16 (written), y: [T, D] bf16, rstd: [T] fp32, z: [T, D] bf16,
// inj: [T, D] bf16 or null (then x is a copy of z)
template <int VPL>
__device__ __forceinline__ void add_rmsnorm_fwd_warp(bf16* __restrict__ x, bf16* __restrict__ y, float* __restrict__ rstd, const bf16* __restrict__ z,
                     const bf16* __restrict__ inj, int T, int D) {
    const int64_t row = (int64_t)blockIdx.x * RMS_WARPS + threadIdx.x / 32;
    if (row >= T) return;
    const int n_vec = D / 8;
    bf16x8 v[VPL], b[VPL] = {};
#pragma unroll
    for (int k = 0; k < VPL; k++) {
        if (!lane_has(k, n_vec)) continue;
        v[k] = load_bf16x8(z + row * D + lane_col(k));
        if (inj != nullptr) b[k] = load_bf16x8(inj + row * D + lane_col(k));
    }
#pragma unroll
    for (int k = 0; k < VPL; k++) {
        if (!lane_has(k, n_vec)) continue;
        if (inj != nullptr) {
            float a[8], c[8];
            bf16x8_to_float(v[k], a);
            bf16x8_to_float(b[k], c);
#pragma unroll
            for (int e = 0; e < 8; e++) a[e] += c[e];
            v[k] = float_to_bf16x8(a);
        }
        *reinterpret_cast<bf16x8*>(x + row * D + lane_col(k)) = v[k];
    }
    normalise_row_warp(v, y + row * D, rstd + row, D);
}

// y: [T, D] bf16, rstd: [T] fp32, x: [T, D] bf16
template <int VPL>
__device__ __forceinline__ void rmsnorm_fwd_warp(bf16* __restrict__ y, float* __restrict__ rstd, const bf16* __restrict__ x, int T, int D) {
    const int64_t row = (int64_t)blockIdx.x * RMS_WARPS + threadIdx.x / 32;
    if (row >= T) return;
    const int n_vec = D / 8;
    bf16x8 v[VPL];
#pragma unroll
    for (int k = 0; k < VPL; k++) {
        if (lane_has(k, n_vec)) v[k] = load_bf16x8(x + row * D + lane_col(k));
    }
    normalise_row_warp(v, y + row * D, rstd + row, D);
}

// The warp-layout entry points, one per instantiated VPL: <name>_<VPL>.
#define RMS_WARP_KERNELS(VPL)                                                                                       \
    extern "C" __global__ void __launch_bounds__(RMS_WARPS * 32)                                                    \
        add_rmsnorm_fwd_warp_##VPL(bf16* __restrict__ x, bf16* __restrict__ y, float* __restrict__ rstd,            \
                                   const bf16* __restrict__ z, const bf16* __restrict__ inj, int T, int D) {        \
        add_rmsnorm_fwd_warp<VPL>(x, y, rstd, z, inj, T, D);                                                        \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(RMS_WARPS * 32)                                                    \
        rmsnorm_fwd_warp_##VPL(bf16* __restrict__ y, float* __restrict__ rstd, const bf16* __restrict__ x, int T,   \
                               int D) {                                                                             \
        rmsnorm_fwd_warp<VPL>(y, rstd, x, T, D);                                                                    \
    }
RMS_WARP_KERNELS(2)
RMS_WARP_KERNELS(4)
RMS_WARP_KERNELS(6)
RMS_WARP_KERNELS(8)
RMS_WARP_KERNELS(10)

// ---- block per row -----------------------------------------------------------------------

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
extern "C" __global__ void add_rmsnorm_fwd_block(bf16* __restrict__ x, bf16* __restrict__ y, float* __restrict__ rstd,
                                           const bf16* __restrict__ z, const bf16* __restrict__ inj, int T, int D) {
    const int64_t row = blockIdx.x;
    const bool active = threadIdx.x < D / 8;
    const int64_t vec = row * (D / 8) + threadIdx.x;
    float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (active) {
        bf16x8 sum = load_bf16x8(z + 8 * vec);
        if (inj != nullptr) {
            float a[8], b[8];
            bf16x8_to_float(sum, a);
            bf16x8_to_float(load_bf16x8(inj + 8 * vec), b);
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
extern "C" __global__ void rmsnorm_fwd_block(bf16* __restrict__ y, float* __restrict__ rstd, const bf16* __restrict__ x,
                                       int T, int D) {
    const int64_t row = blockIdx.x;
    const bool active = threadIdx.x < D / 8;
    float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (active) bf16x8_to_float(load_bf16x8(x + row * D + 8 * threadIdx.x), v);
    normalise_row(v, active, y + row * D, rstd + row, D);
}

// dx: [T, D] bf16 (+=), dy: [T, D] bf16, x: [T, D] bf16, rstd: [T] fp32
extern "C" __global__ void rmsnorm_bwd_block(bf16* __restrict__ dx, const bf16* __restrict__ dy, const bf16* __restrict__ x,
                                       const float* __restrict__ rstd, int T, int D) {
    const int64_t row = blockIdx.x;
    const bool active = threadIdx.x < D / 8;
    const int64_t vec = row * (D / 8) + threadIdx.x;
    const float r = rstd[row];
    float g[8] = {0, 0, 0, 0, 0, 0, 0, 0}, y[8] = {0, 0, 0, 0, 0, 0, 0, 0}, acc[8];
    if (active) {
        bf16x8_to_float(load_bf16x8(dy + 8 * vec), g);
        bf16x8_to_float(load_bf16x8(x + 8 * vec), y);
        bf16x8_to_float(load_bf16x8(dx + 8 * vec), acc);
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
