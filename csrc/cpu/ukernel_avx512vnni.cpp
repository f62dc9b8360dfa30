// AVX-512 VNNI microkernels: 4 rows x 64 columns (4 zmm per row, 16 int32 accumulators), K in
// groups of 4 consumed by vpdpbusd (u8 activations x s8 weights -> s32, no intermediate saturation).
// Zero point: acc = dpbusd(a_u8, w) - wsum, wsum[n] = 128 * sum_k w[n, k].
// int4: a 64-byte load holds two K groups of 16 columns; (v << 4) & 0xF0 and v & 0xF0 are 16 * w as
// int8, so the accumulator holds 16 * acc and an exact arithmetic shift by 4 recovers it
// (|16 * acc| <= 16 * 255 * 8 * K < 2^31 for K < 65000).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "ukernel.h"

#define TGPQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq")))

namespace tgpq {
namespace cpu {
namespace {

template <int NB, bool W4>
TGPQ_AVX512 void vnni_tile(const GemmTile& t) {
  __m512i acc[4][NB];
  for (int r = 0; r < 4; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_si512();
  const uint8_t* a[4];
  for (int r = 0; r < 4; ++r) a[r] = t.a + std::min<int64_t>(r, t.mr - 1) * t.lda;
  const int8_t* wb[NB];
  for (int b = 0; b < NB; ++b) wb[b] = t.w + b * t.w_block_stride;
  if (!W4) {
    for (int64_t g = 0; g < t.kg; ++g) {
      __m512i w[NB];
      for (int b = 0; b < NB; ++b) w[b] = _mm512_loadu_si512(wb[b] + g * 64);
      for (int r = 0; r < 4; ++r) {
        const __m512i va = _mm512_set1_epi32(load32(a[r] + 4 * g));
        for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], va, w[b]);
      }
    }
  } else {
    const __m512i hi4 = _mm512_set1_epi8(static_cast<char>(0xF0));
    for (int64_t p = 0; p < t.kg / 2; ++p) {
      __m512i wl[NB], wh[NB];
      for (int b = 0; b < NB; ++b) {
        const __m512i v = _mm512_loadu_si512(wb[b] + p * 64);
        wl[b] = _mm512_and_si512(_mm512_slli_epi16(v, 4), hi4);
        wh[b] = _mm512_and_si512(v, hi4);
      }
      for (int r = 0; r < 4; ++r) {
        const __m512i v0 = _mm512_set1_epi32(load32(a[r] + 8 * p));
        const __m512i v1 = _mm512_set1_epi32(load32(a[r] + 8 * p + 4));
        for (int b = 0; b < NB; ++b) {
          acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], v0, wl[b]);
          acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], v1, wh[b]);
        }
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_srai_epi32(acc[r][b], 4);
  }
  for (int b = 0; b < NB; ++b) {
    const int64_t c0 = b * 16;
    if (c0 >= t.nc) break;
    const int64_t valid = std::min<int64_t>(16, t.nc - c0);
    const __mmask16 m = static_cast<__mmask16>(valid == 16 ? 0xFFFF : ((1u << valid) - 1));
    const __m512i ws = _mm512_maskz_loadu_epi32(m, t.wsum + c0);
    const __m512 sc = _mm512_maskz_loadu_ps(m, t.scale + c0);
    const __m512 bi = t.bias ? _mm512_maskz_loadu_ps(m, t.bias + c0) : _mm512_setzero_ps();
    for (int64_t r = 0; r < t.mr; ++r) {
      const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][b], ws)), sc, bi);
      _mm512_mask_storeu_ps(t.y + r * t.ldy + c0, m, v);
    }
  }
}

template <bool W4>
void vnni_dispatch(const GemmTile& t) {
  switch ((t.nc + 15) / 16) {
    case 1: vnni_tile<1, W4>(t); break;
    case 2: vnni_tile<2, W4>(t); break;
    case 3: vnni_tile<3, W4>(t); break;
    default: vnni_tile<4, W4>(t); break;
  }
}

// exp(-v) by exp_poly (ukernel.h) on U vectors of 16 lanes: exp256(-v)'s bits in fewer instructions. The negation
// is folded into the clamp (v to [-kHi, -kLo]), the reduction (n = round(v * -log2e), r = -v - n * ln2 as fnmsub)
// and the scaling by 2^n (vscalefps, exact like exp256's multiply by the built power of two, as n >= -126).
// Every step runs on all U vectors before the next (the loops over j unroll): U independent dependency chains
// side by side, for the out-of-order core to overlap. Measured on the Xeon (rdtsc, a row of 384 in L1): the same
// 18-21 cycles per 16 values as one vector at a time on a quiet core (there the row is bound by its ~24 vector
// uops on the two 512-bit ports), 29-31 instead of 39 when the host loaded the core.
template <int U>
TGPQ_AVX512 inline void exp512_neg(const __m512 (&v)[U], __m512 (&e)[U]) {
  using namespace exp_poly;
  __m512 n[U], r[U], p[U];
  for (int j = 0; j < U; ++j) {
    const __m512 c = _mm512_min_ps(_mm512_max_ps(v[j], _mm512_set1_ps(-kHi)), _mm512_set1_ps(-kLo));
    n[j] = _mm512_roundscale_ps(_mm512_mul_ps(c, _mm512_set1_ps(-kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r[j] = _mm512_fnmsub_ps(n[j], _mm512_set1_ps(kLn2Hi), c);
  }
  for (int j = 0; j < U; ++j) {
    r[j] = _mm512_fnmadd_ps(n[j], _mm512_set1_ps(kLn2Lo), r[j]);
    p[j] = _mm512_set1_ps(kPoly[0]);
  }
  for (int i = 1; i < 6; ++i)
    for (int j = 0; j < U; ++j) p[j] = _mm512_fmadd_ps(p[j], r[j], _mm512_set1_ps(kPoly[i]));
  for (int j = 0; j < U; ++j) {
    p[j] = _mm512_fmadd_ps(p[j], _mm512_mul_ps(r[j], r[j]), _mm512_add_ps(r[j], _mm512_set1_ps(1.0f)));
    e[j] = _mm512_scalef_ps(p[j], n[j]);
  }
}

// U vectors of one row at x + c (lane masks m[j]): normalise (x * A + B), SiLU, quantize, store.
template <int U>
TGPQ_AVX512 inline void norm_silu_quantize_vecs(const float* x, const float* A, const float* Bv, const __mmask16 (&m)[U],
                                                bool silu, float inv, uint8_t* out) {
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 v[U];
  for (int j = 0; j < U; ++j)
    v[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m[j], x + 16 * j), _mm512_maskz_loadu_ps(m[j], A + 16 * j),
                           _mm512_maskz_loadu_ps(m[j], Bv + 16 * j));
  if (silu) {  // v / d as v * (1 / d): rcp14 and one Newton step (< 1 ulp off; a zmm divide is ~10x slower)
    __m512 e[U];
    exp512_neg<U>(v, e);
    for (int j = 0; j < U; ++j) {
      const __m512 d = _mm512_add_ps(one, e[j]);
      __m512 r = _mm512_rcp14_ps(d);
      r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, one), r);
      v[j] = _mm512_mul_ps(v[j], r);
    }
  }
  for (int j = 0; j < U; ++j) {
    const __m512 y = _mm512_mul_ps(v[j], _mm512_set1_ps(inv));
    const __mmask16 finite = static_cast<__mmask16>(~_mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q));
    const __m512i q = _mm512_add_epi32(
        _mm512_cvt_roundps_epi32(_mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f)),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
        _mm512_set1_epi32(128));
    _mm_mask_storeu_epi8(out + 16 * j, m[j], _mm512_maskz_cvtepi32_epi8(finite, q));  // NaN -> code 0
  }
}

}  // namespace

// One NHWC row, 64 channels per step as four interleaved vectors, then 16 per step (the tail masked): the AVX2
// row's arithmetic on 16 lanes, except the SiLU's division (a reciprocal), so values can differ from the AVX2
// path's in the last bit. Quantization: clamp, then the conversion rounds to nearest even (embedded rounding)
// like a round-then-clamp; a NaN (which the clamp would hide) is written as code 0 by the conversion's zeroing
// mask.
TGPQ_AVX512 void norm_silu_quantize_row_avx512(const float* x, const float* A, const float* Bv, int64_t C, bool silu,
                                               float inv, uint8_t* out) {
  int64_t c = 0;
  const __mmask16 full4[4] = {0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF};
  for (; c + 64 <= C; c += 64) norm_silu_quantize_vecs<4>(x + c, A + c, Bv + c, full4, silu, inv, out + c);
  for (; c < C; c += 16) {
    const __mmask16 m[1] = {static_cast<__mmask16>(C - c >= 16 ? 0xFFFF : ((1u << (C - c)) - 1))};
    norm_silu_quantize_vecs<1>(x + c, A + c, Bv + c, m, silu, inv, out + c);
  }
}

void qs8_qc8w_gemm_4x64c4__avx512vnni(const GemmTile& t) { vnni_dispatch<false>(t); }
void qs8_qc4w_gemm_4x64c4__avx512vnni(const GemmTile& t) { vnni_dispatch<true>(t); }

}  // namespace cpu
}  // namespace tgpq
