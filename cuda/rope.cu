// rope: split of the fused gate/query/key/value projection into heads, with rotate-half
// RoPE on queries and keys (SPEC §2); mirrors src/ops/rope.rs.
//
//   a_i = pos * inv_freq[i],  inv_freq[i] = 10000^(-2i/128), i in 0..64   (fp32, as PyTorch)
//   forward    out[i] = x[i] cos a_i - x[i+64] sin a_i;   out[i+64] = x[i+64] cos a_i + x[i] sin a_i
//   backward   the same with sin a_i -> -sin a_i (the transposed rotation); g and v are copies
//
// Invariants
// - One block per token row. Its 64 (cos, sin) pairs are computed once into shared memory,
//   then the block's threads walk the row's work items: 16-byte copies of the gate and value
//   blocks, and "pair items" that rotate 8 elements of the first half of a head with their 8
//   partners in the second half (two 16-byte loads, two stores).
// - Row layout of gqkv: [gate heads | query heads | key heads | value heads], each NH*128.
// - All outputs are written with `=`; every pointer is 16-byte aligned (the launcher checks).

#include "common.cuh"

#define HEAD_DIM 128
#define HALF_DIM 64
#define ROPE_THREADS 128

// Fills cos_a, sin_a [64] for `pos`; every thread of the block must call it.
__device__ __forceinline__ void rope_table(int pos, float* cos_a, float* sin_a) {
    if (threadIdx.x < HALF_DIM) {
        // Rounded once from double, the same fp32 table as rope_inv_freq() on the CPU.
        const float inv_freq = (float)(1.0 / pow(10000.0, (2.0 * threadIdx.x) / (double)HEAD_DIM));
        sincosf((float)pos * inv_freq, &sin_a[threadIdx.x], &cos_a[threadIdx.x]);
    }
    __syncthreads();
}

// Rotates 8 (first-half, second-half) pairs starting at column `c` of a head by +a or -a.
// dst, src: one head [128] bf16
__device__ __forceinline__ void rotate_pair_item(bf16* __restrict__ dst, const bf16* __restrict__ src, int c,
                                                 const float* cos_a, const float* sin_a, float sign) {
    float x1[8], x2[8], o1[8], o2[8];
    bf16x8_to_float(load_bf16x8(src + c), x1);
    bf16x8_to_float(load_bf16x8(src + c + HALF_DIM), x2);
#pragma unroll
    for (int e = 0; e < 8; e++) {
        const float cs = cos_a[c + e], sn = sign * sin_a[c + e];
        o1[e] = x1[e] * cs - x2[e] * sn;
        o2[e] = x2[e] * cs + x1[e] * sn;
    }
    *reinterpret_cast<bf16x8*>(dst + c) = float_to_bf16x8(o1);
    *reinterpret_cast<bf16x8*>(dst + c + HALF_DIM) = float_to_bf16x8(o2);
}

// The work items of one row, C = NH*128 columns per block of the projection:
//   [0, C/8)          copy gate vector j          [C/8, 2C/8)   copy value vector
//   [2C/8, 2C/8+C/16) rotate query pair item       then          rotate key pair item
// A pair item p covers head p/8, columns 8*(p%8) .. +8 and their +64 partners.
#define ROPE_ITEMS(C) (2 * ((C) / 8) + 2 * ((C) / 16))

// g: [T, NH*128], q, k, v: [T, NH, 128], gqkv: [T, 4*NH*128] (all bf16), pos: [T] int32
extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
qkv_rope_fwd(bf16* __restrict__ g, bf16* __restrict__ q, bf16* __restrict__ k, bf16* __restrict__ v,
             const bf16* __restrict__ gqkv, const int* __restrict__ pos, int T, int NH) {
    __shared__ float cos_a[HALF_DIM], sin_a[HALF_DIM];
    const int64_t row = blockIdx.x;
    const int C = NH * HEAD_DIM;
    rope_table(pos[row], cos_a, sin_a);
    const bf16* src = gqkv + row * 4 * C;
    for (int item = threadIdx.x; item < ROPE_ITEMS(C); item += blockDim.x) {
        if (item < C / 8) {
            reinterpret_cast<bf16x8*>(g + row * C)[item] = reinterpret_cast<const bf16x8*>(src)[item];
        } else if (item < 2 * (C / 8)) {
            const int j = item - C / 8;
            reinterpret_cast<bf16x8*>(v + row * C)[j] = reinterpret_cast<const bf16x8*>(src + 3 * C)[j];
        } else {
            const int p = item - 2 * (C / 8);
            const bool is_key = p >= C / 16;
            const int pk = is_key ? p - C / 16 : p;
            const int head = pk / 8, c = 8 * (pk % 8);
            bf16* dst = (is_key ? k : q) + row * C + head * HEAD_DIM;
            rotate_pair_item(dst, src + (is_key ? 2 : 1) * C + head * HEAD_DIM, c, cos_a, sin_a, 1.0f);
        }
    }
}

// dgqkv: [T, 4*NH*128], dg: [T, NH*128], dq, dk, dv: [T, NH, 128] (all bf16), pos: [T] int32
extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
qkv_rope_bwd(bf16* __restrict__ dgqkv, const bf16* __restrict__ dg, const bf16* __restrict__ dq,
             const bf16* __restrict__ dk, const bf16* __restrict__ dv, const int* __restrict__ pos, int T, int NH) {
    __shared__ float cos_a[HALF_DIM], sin_a[HALF_DIM];
    const int64_t row = blockIdx.x;
    const int C = NH * HEAD_DIM;
    rope_table(pos[row], cos_a, sin_a);
    bf16* dst = dgqkv + row * 4 * C;
    for (int item = threadIdx.x; item < ROPE_ITEMS(C); item += blockDim.x) {
        if (item < C / 8) {
            reinterpret_cast<bf16x8*>(dst)[item] = reinterpret_cast<const bf16x8*>(dg + row * C)[item];
        } else if (item < 2 * (C / 8)) {
            const int j = item - C / 8;
            reinterpret_cast<bf16x8*>(dst + 3 * C)[j] = reinterpret_cast<const bf16x8*>(dv + row * C)[j];
        } else {
            const int p = item - 2 * (C / 8);
            const bool is_key = p >= C / 16;
            const int pk = is_key ? p - C / 16 : p;
            const int head = pk / 8, c = 8 * (pk % 8);
            const bf16* src = (is_key ? dk : dq) + row * C + head * HEAD_DIM;
            rotate_pair_item(dst + (is_key ? 2 : 1) * C + head * HEAD_DIM, src, c, cos_a, sin_a, -1.0f);
        }
    }
}
