// swiglu.cuh: SwiGLU's math on 8 columns, shared by swiglu.cu (its own passes) and gemm_sm90.cu
// (the gate_up product's epilogue and the down projection's input-gradient epilogue), so that
// the fused and the separate routes round the same way (SPEC §2, src/ops/swiglu.rs).
//
//   out = silu(gate) * up,  silu(x) = x * s,  s = sigmoid(x)
//   dup = dout * silu(gate);  dgate = dout * up * s * (1 + gate * (1 - s))

#pragma once
#include "common.cuh"

__device__ __forceinline__ void swiglu_fwd8(const float (&gate)[8], const float (&up)[8], float (&out)[8]) {
    #pragma unroll
    for (int e = 0; e < 8; e++) out[e] = gate[e] * sigmoid(gate[e]) * up[e];
}

__device__ __forceinline__ void swiglu_bwd8(const float (&dout)[8], const float (&gate)[8], const float (&up)[8], float (&dgate)[8], float (&dup)[8]) {
    #pragma unroll
    for (int e = 0; e < 8; e++) {
        const float s = sigmoid(gate[e]);
        dup[e] = dout[e] * gate[e] * s;
        dgate[e] = dout[e] * up[e] * s * (1.0f + gate[e] * (1.0f - s));
    }
}
