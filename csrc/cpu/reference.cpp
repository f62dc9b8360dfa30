#include "reference.h"

#include <algorithm>
#include <cmath>

namespace tgpq {

void quantize_act_f32(const float* x, int64_t n, float inv_scale, int8_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    // nearbyintf rounds half to even under the default rounding mode.
    float v = std::nearbyintf(x[i] * inv_scale);
    v = std::min(127.0f, std::max(-127.0f, v));
    out[i] = static_cast<int8_t>(v);
  }
}

void gemm_s8s8s32_scalar(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int32_t* c,
                         int64_t ldc, int64_t m, int64_t n, int64_t k) {
  for (int64_t i = 0; i < m; ++i) {
    const int8_t* ar = a + i * lda;
    for (int64_t j = 0; j < n; ++j) {
      const int8_t* br = b + j * ldb;
      int32_t acc = 0;
      for (int64_t p = 0; p < k; ++p) acc += static_cast<int32_t>(ar[p]) * static_cast<int32_t>(br[p]);
      c[i * ldc + j] = acc;
    }
  }
}

void dequant_epilogue(const int32_t* acc, int64_t ldacc, float a_scale, const float* w_scale,
                      const float* bias, float* y, int64_t ldy, int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      float v = static_cast<float>(acc[i * ldacc + j]) * (a_scale * w_scale[j]);
      if (bias) v += bias[j];
      y[i * ldy + j] = v;
    }
  }
}

}  // namespace tgpq
