// Portable int8 GEMM building blocks for the cpu backend. Pure C++ (no torch): ctest covers them.
//
// Numerics (shared with tgpq/numerics.py and the Triton kernels):
//   x_q = clamp(round_half_even(x * inv_scale), -127, 127)      (inv_scale = 1.0f / a_scale)
//   acc[m, n] = sum_k x_q[m, k] * w_q[n, k]                       (exact int32)
//   y[m, n] = float(acc) * (a_scale * w_scale[n]) + bias[n]
#pragma once
#include <cstdint>

namespace tgpq {

// x float32 [n] -> int8 [n].
void quantize_act_f32(const float* x, int64_t n, float inv_scale, int8_t* out);

// C int32 [M, N] (ldc) = A int8 [M, K] (lda) x B int8 [N, K] (ldb)^T. Scalar reference path.
void gemm_s8s8s32_scalar(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int32_t* c,
                         int64_t ldc, int64_t m, int64_t n, int64_t k);

// y float32 [M, N] = float(acc) * (a_scale * w_scale[n]) + bias[n]; bias may be null.
void dequant_epilogue(const int32_t* acc, int64_t ldacc, float a_scale, const float* w_scale,
                      const float* bias, float* y, int64_t ldy, int64_t m, int64_t n);

}  // namespace tgpq
