// swiglu.cuh: SwiGLU's math on 8 columns, shared by swiglu.cu (its own passes) and gemm_sm90.cu
// (the gate_up product's epilogue and the down projection's input-gradient epilogue), so that
// the fused and the separate routes round the same way (SPEC §2, src/ops/swiglu.rs).
//
//   out = silu(gate) * up,  silu(x) = x * s,  s = sigmoid(x)
//   dup = dout * silu(gate);  dgate = dout * up * s * (1 + gate * (1 - s))

#pragma once
#include "common.cuh"

// s = 1 / (1 + 2^(-x log2(e))) from the special function unit's exp2 and reciprocal (relative
// error ~1e-7, far below the bf16 rounding of every output): 4 instructions against ~13 for
// common.cuh's sigmoid (the accurate expf, __fdividef's range checks). The SwiGLU backward in
// the down projection's epilogue issues ~30 instructions an element with the accurate one,
// more than the epilogue warps can hide under the product. Saturates without NaN: 2^big =
// inf gives 1 / inf = 0, 2^-big = 0 gives 1.
__device__ __forceinline__ float swiglu_sigmoid(float x) {
    float e, s;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(-1.44269504088896341f * x));
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(s) : "f"(1.0f + e));
    return s;
}

__device__ __forceinline__ void swiglu_fwd8(const float (&gate)[8], const float (&up)[8], float (&out)[8]) {
    #pragma unroll
    for (int e = 0; e < 8; e++) out[e] = gate[e] * swiglu_sigmoid(gate[e]) * up[e];
}

__device__ __forceinline__ void swiglu_bwd8(const float (&dout)[8], const float (&gate)[8], const float (&up)[8], float (&dgate)[8], float (&dup)[8]) {
    #pragma unroll
    for (int e = 0; e < 8; e++) {
        const float s = swiglu_sigmoid(gate[e]);
        dup[e] = dout[e] * gate[e] * s;
        dgate[e] = dout[e] * up[e] * s * (1.0f + gate[e] * (1.0f - s));
    }
}
