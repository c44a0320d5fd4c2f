// rope: rotate-half RoPE on the query and key heads of the fused gate/query/key/value
// projection (SPEC §2), in place; mirrors src/ops/rope.rs.
//
//   forward    the rotation by a_i = pos * inv_freq[i] (cuda/rope.cuh; fp32, as PyTorch)
//   backward   the same with sin a_i -> -sin a_i (the transposed rotation)
//
// Invariants
// - One block per token row. Its 64 (cos, sin) pairs are computed once into shared memory,
//   then the block's threads walk the row's "pair items": each rotates 8 elements of the first
//   half of a query or key head with their 8 partners in the second half (two 16-byte loads,
//   two stores, in place: an item reads all it writes).
// - Row layout of gqkv: [gate heads | query heads | key heads | value heads], each NH*128; the
//   gate and value blocks are not touched.
// - Every pointer is 16-byte aligned (the launcher checks).

#include "rope.cuh"

#define HEAD_DIM ROPE_HEAD_DIM
#define HALF_DIM ROPE_HALF_DIM
#define ROPE_THREADS 256

// Fills cos_a, sin_a [64] for `pos`; every thread of the block must call it.
__device__ __forceinline__ void rope_table(int pos, float* cos_a, float* sin_a) {
    if (threadIdx.x < HALF_DIM) rope_sincos((float)pos * rope_inv_freq(threadIdx.x), &sin_a[threadIdx.x], &cos_a[threadIdx.x]);
    __syncthreads();
}

// Rotates 8 (first-half, second-half) pairs starting at column `c` of a head in place by +a or
// -a. x: one head [128] bf16
__device__ __forceinline__ void rotate_pair_item(bf16* __restrict__ x, int c, const float* cos_a, const float* sin_a, float sign) {
    float x1[8], x2[8], sn[8], o1[8], o2[8];
    bf16x8_to_float(load_bf16x8(x + c), x1);
    bf16x8_to_float(load_bf16x8(x + c + HALF_DIM), x2);
#pragma unroll
    for (int e = 0; e < 8; e++) sn[e] = sign * sin_a[c + e];
    rope_rotate8(x1, x2, cos_a + c, sn, o1, o2);
    *reinterpret_cast<bf16x8*>(x + c) = float_to_bf16x8(o1);
    *reinterpret_cast<bf16x8*>(x + c + HALF_DIM) = float_to_bf16x8(o2);
}

// Rotates the query and key blocks of row blockIdx.x of x: [T, 4*NH*128] by sign * a. The two
// blocks are one run of 2*NH heads; pair item p < C/8 (C = NH*128) covers head p / 8 of that
// run, columns 8 * (p % 8) .. +8 and their +64 partners. Blocks have C/8 threads rounded up to
// a warp, at least 64 (rope_table) and at most ROPE_THREADS (the launcher's choice).
__device__ __forceinline__ void rotate_qk_row(bf16* __restrict__ x, const int* __restrict__ pos, int NH, float sign) {
    __shared__ float cos_a[HALF_DIM], sin_a[HALF_DIM];
    const int64_t row = blockIdx.x;
    const int C = NH * HEAD_DIM;
    rope_table(pos[row], cos_a, sin_a);
    bf16* qk = x + row * 4 * C + C;  // the query block; the key block follows
    for (int p = threadIdx.x; p < C / 8; p += blockDim.x) {
        const int head = p / 8, c = 8 * (p % 8);  // heads of the query block, then of the key block
        rotate_pair_item(qk + head * HEAD_DIM, c, cos_a, sin_a, sign);
    }
}

// gqkv: [T, 4*NH*128] bf16 (in place), pos: [T] int32
extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
qkv_rope_fwd(bf16* __restrict__ gqkv, const int* __restrict__ pos, int T, int NH) {
    rotate_qk_row(gqkv, pos, NH, 1.0f);
}

// dgqkv: [T, 4*NH*128] bf16 (in place), pos: [T] int32
extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
qkv_rope_bwd(bf16* __restrict__ dgqkv, const int* __restrict__ pos, int T, int NH) {
    rotate_qk_row(dgqkv, pos, NH, -1.0f);
}
