// Shared helpers for every kernel family.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

// Eight bf16 values moved as one 16-byte access.
struct __align__(16) bf16x8 {
    bf16 v[8];
};
