// Scalar microkernels (the portable path and the ISA-independent oracle of the others) and the scalar
// activation passes.
#include <algorithm>
#include <cmath>

#include "ukernel.h"

namespace tgpq {
namespace cpu {

namespace {

inline int8_t weight_at(const int8_t* blk, int64_t g, int64_t c, int64_t j, bool w4) {
  if (!w4) return blk[g * 64 + c * 4 + j];
  const uint8_t byte = static_cast<uint8_t>(blk[(g / 2) * 64 + c * 4 + j]);
  const int nib = (g & 1) ? (byte >> 4) : (byte & 0x0F);
  return static_cast<int8_t>(nib >= 8 ? nib - 16 : nib);
}

template <bool W4>
void scalar_tile(const GemmTile& t) {
  for (int64_t r = 0; r < t.mr; ++r) {
    const uint8_t* a = t.a + r * t.lda;
    for (int64_t c = 0; c < t.nc; ++c) {
      const int8_t* blk = t.w + (c / kBlockN) * t.w_block_stride;
      const int64_t cc = c % kBlockN;
      int32_t acc = 0;
      for (int64_t g = 0; g < t.kg; ++g)
        for (int64_t j = 0; j < 4; ++j)
          acc += static_cast<int32_t>(a[g * 4 + j]) * static_cast<int32_t>(weight_at(blk, g, cc, j, W4));
      acc -= t.wsum[c];
      t.y[r * t.ldy + c] = std::fma(static_cast<float>(acc), t.scale[c], t.bias ? t.bias[c] : 0.0f);
    }
  }
}

}  // namespace

void qs8_qc8w_gemm_4x16c4__scalar(const GemmTile& t) { scalar_tile<false>(t); }
void qs8_qc4w_gemm_4x16c4__scalar(const GemmTile& t) { scalar_tile<true>(t); }

void quantize_u8_scalar(const float* x, int64_t n, float inv, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = quantize_one_u8(x[i], inv);
}

void widen_u8_s16_scalar(const uint8_t* src, int64_t n, int16_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<int16_t>(src[i] - 128);
}

void norm_stats_rows_scalar(const float* x, int64_t rows, int64_t C, int64_t ldx, const float* pilot, float* sum,
                            float* sumsq) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const float d = x[r * ldx + c] - pilot[c];
      sum[c] += d;
      sumsq[c] += d * d;
    }
}

void norm_silu_quantize_row_scalar(const float* x, const float* A, const float* Bv, int64_t C, bool silu, float inv,
                                   uint8_t* out) {
  for (int64_t c = 0; c < C; ++c) {
    const float v = std::fma(x[c], A[c], Bv[c]);
    out[c] = quantize_one_u8(silu ? silu_scalar(v) : v, inv);
  }
}

}  // namespace cpu
}  // namespace tgpq
