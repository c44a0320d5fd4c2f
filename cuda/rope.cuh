// rope.cuh: the rotate-half RoPE math that rope.cu (its own pass), gemm_sm90.cu (the qkv
// product's epilogue) and attention_bwd_sm90.cu (RoPE's backward on dq, dk) share, so that all
// round the same way (SPEC §2, src/ops/rope.rs).
//
//   inv_freq[i] = 10000^(-2i/128), i in 0..64 (rounded once from double);  a_i = pos * inv_freq[i]
//   out[i] = x[i] cos a_i - x[i+64] sin a_i;   out[i+64] = x[i+64] cos a_i + x[i] sin a_i

#pragma once
#include "common.cuh"

#define ROPE_HEAD_DIM 128
#define ROPE_HALF_DIM 64

// inv_freq[i] in fp32, the same table as rope_inv_freq() on the CPU.
__device__ __forceinline__ float rope_inv_freq(int i) { return (float)(1.0 / pow(10000.0, (2.0 * i) / (double)ROPE_HEAD_DIM)); }

// sin and cos of an angle x >= 0 (a position times a RoPE frequency, in fp32) to ~4e-7: x
// reduced to [-pi, pi] by one Cody-Waite step (the fma keeps k * 2pi_hi exact, 2pi_lo carries
// the rest of 2pi), then the special function unit's approximation, accurate there. sincosf
// spends ~30 instructions on each angle and this a few: the qkv product's epilogue forms the
// 64 angles of a row once per q/k tile (12 tiles a row at XL), which with sincosf grew its
// instruction count by a quarter.
__device__ __forceinline__ void rope_sincos(float x, float* s, float* c) {
    const float two_pi_hi = 6.28318548202514648f, two_pi_lo = -1.7484556e-7f;  // 2pi = hi + lo
    const float k = rintf(x * 0.159154943091895336f);
    float r = fmaf(-k, two_pi_hi, x);
    r = fmaf(-k, two_pi_lo, r);
    __sincosf(r, s, c);
}

// Rotates 8 (first-half, second-half) pairs by the angles whose cosines and sines are cs, sn.
__device__ __forceinline__ void rope_rotate8(const float (&x1)[8], const float (&x2)[8], const float* cs, const float* sn, float (&o1)[8],
                                             float (&o2)[8]) {
#pragma unroll
    for (int e = 0; e < 8; e++) {
        o1[e] = x1[e] * cs[e] - x2[e] * sn[e];
        o2[e] = x2[e] * cs[e] + x1[e] * sn[e];
    }
}
