// AVX2 microkernels (4 rows x 16 columns, K in groups of 4) and the activation quantizer.
//
// int8 weights: AVX2 has no u8 x s8 -> s32 dot product without int16 saturation
// (vpmaddubsw saturates 255 * 127 * 2). The kernel therefore multiplies signed x signed exactly:
// maddubs(|w|, sign(x, w)) with x = a_u8 ^ 0x80 in [-127, 127]: pair sums <= 2 * 127 * 127 = 32258.
// It ignores wsum (no zero point in signed arithmetic).
// int4 weights: u8 x s4 pair sums are <= 2 * 255 * 8 = 4080, so vpmaddubsw on the u8 activations is
// exact; two K groups are summed in int16 (<= 8160) before widening, and wsum is subtracted.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "ukernel.h"

#define TGPQ_AVX2 __attribute__((target("avx2,fma")))

namespace tgpq {
namespace cpu {
namespace {

inline int32_t load32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

TGPQ_AVX2 inline void store_rows(const GemmTile& t, __m256i acc[4][2], bool subtract_wsum) {
  for (int h = 0; h < 2; ++h) {
    const int64_t c0 = h * 8;
    if (c0 >= t.nc) break;
    const int64_t valid = std::min<int64_t>(8, t.nc - c0);
    alignas(32) int32_t ws[8] = {0};
    alignas(32) float sc[8] = {0}, bi[8] = {0};
    for (int64_t c = 0; c < valid; ++c) {
      ws[c] = subtract_wsum ? t.wsum[c0 + c] : 0;
      sc[c] = t.scale[c0 + c];
      bi[c] = t.bias ? t.bias[c0 + c] : 0.0f;
    }
    const __m256i vws = _mm256_load_si256(reinterpret_cast<const __m256i*>(ws));
    const __m256 vsc = _mm256_load_ps(sc), vbi = _mm256_load_ps(bi);
    for (int64_t r = 0; r < t.mr; ++r) {
      const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][h], vws)), vsc, vbi);
      float* dst = t.y + r * t.ldy + c0;
      if (valid == 8) {
        _mm256_storeu_ps(dst, v);
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, v);
        std::memcpy(dst, tmp, static_cast<size_t>(valid) * sizeof(float));
      }
    }
  }
}

TGPQ_AVX2 void avx2_w8(const GemmTile& t) {
  __m256i acc[4][2];
  for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const uint8_t* a[4];
  for (int r = 0; r < 4; ++r) a[r] = t.a + std::min<int64_t>(r, t.mr - 1) * t.lda;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const int8_t* w = t.w;
  for (int64_t g = 0; g < t.kg; ++g, w += 64) {
    __m256i xa[4];
    for (int r = 0; r < 4; ++r) xa[r] = _mm256_xor_si256(_mm256_set1_epi32(load32(a[r] + 4 * g)), flip);
    for (int h = 0; h < 2; ++h) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * h));
      const __m256i aw = _mm256_abs_epi8(wv);
      for (int r = 0; r < 4; ++r) {
        const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xa[r], wv));
        acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(p, ones));
      }
    }
  }
  store_rows(t, acc, /*subtract_wsum=*/false);
}

TGPQ_AVX2 void avx2_w4(const GemmTile& t) {
  __m256i acc[4][2];
  for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const uint8_t* a[4];
  for (int r = 0; r < 4; ++r) a[r] = t.a + std::min<int64_t>(r, t.mr - 1) * t.lda;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  // nibble -> sign-extended int8
  const __m256i lut = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1,
                                       0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  const int8_t* w = t.w;
  for (int64_t p = 0; p < t.kg / 2; ++p, w += 64) {
    __m256i x0[4], x1[4];
    for (int r = 0; r < 4; ++r) {
      x0[r] = _mm256_set1_epi32(load32(a[r] + 8 * p));
      x1[r] = _mm256_set1_epi32(load32(a[r] + 8 * p + 4));
    }
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * h));
      const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low4));
      const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
      for (int r = 0; r < 4; ++r) {
        const __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(x0[r], lo), _mm256_maddubs_epi16(x1[r], hi));
        acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(s, ones));
      }
    }
  }
  store_rows(t, acc, /*subtract_wsum=*/true);
}

TGPQ_AVX2 void quantize_u8_avx2(const float* x, int64_t n, float inv, uint8_t* out) {
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i zp = _mm256_set1_epi32(128);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i q[4];
    for (int j = 0; j < 4; ++j) {
      __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), vinv);
      v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
      q[j] = _mm256_add_epi32(_mm256_cvtps_epi32(v), zp);
    }
    const __m256i s01 = _mm256_packs_epi32(q[0], q[1]);
    const __m256i s23 = _mm256_packs_epi32(q[2], q[3]);
    const __m256i b = _mm256_packus_epi16(s01, s23);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_permutevar8x32_epi32(b, perm));
  }
  for (; i < n; ++i) {
    float v = std::nearbyintf(x[i] * inv);
    v = std::min(127.0f, std::max(-127.0f, v));
    out[i] = static_cast<uint8_t>(static_cast<int>(v) + 128);
  }
}

}  // namespace

void qs8_qc8w_gemm_4x16c4__avx2(const GemmTile& t) { avx2_w8(t); }
void qs8_qc4w_gemm_4x16c4__avx2(const GemmTile& t) { avx2_w4(t); }

void quantize_u8(const float* x, int64_t n, float inv, uint8_t* out, Isa isa) {
  if (isa != Isa::kScalar) {
    quantize_u8_avx2(x, n, inv, out);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    float v = std::nearbyintf(x[i] * inv);
    v = std::min(127.0f, std::max(-127.0f, v));
    out[i] = static_cast<uint8_t>(static_cast<int>(v) + 128);
  }
}

}  // namespace cpu
}  // namespace tgpq
