// AVX2 microkernels and activation passes (quantize, widen, GroupNorm+SiLU+quantize rows).
//
// Measured on the Zen 3 CI machine: vpmaddubsw, vpmaddwd, vpsignb and vfmadd231ps all issue on the
// same two pipes (2 per cycle together), so the cost of an int8 GEMM is its count of those ops per MAC
// against fp32's 8 MACs per FMA.
//
// int8 weights, qs8_qc8w_gemm_6x8c4: AVX2 has no exact u8 x s8 -> s32 dot product (vpmaddubsw
// saturates 2 * 255 * 127 in int16), and the exact signed form (sign + maddubs + madd) costs 3 such
// ops per 32 MACs (10.7 MACs/op). Widening both operands to int16 makes one vpmaddwd do 16 exact MACs
// (16 MACs/op, 2x fp32): gemm_block widens A once per row block (a_u8 - 128); weights stay int8 in
// memory and are sign-extended per K group (vpmovsxbw), amortised over 6 rows. A c4 group of 4
// columns x 4 K is one ymm of int16; vpmaddwd against the broadcast 4 activations leaves
// [c0:k01, c0:k23, c1:k01, ...]; a horizontal add per tile finishes the sums.
// int4 weights, qs8_qc4w_gemm_4x16c4: u8 x s4 pair sums are <= 2 * 255 * 8 = 4080, so vpmaddubsw on
// the u8 activations is exact and 8 K groups sum in int16 (<= 32640) before one vpmaddwd widens them
// (1.125 ops per 32 MACs); wsum removes the zero point.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "ukernel.h"

#define TGPQ_AVX2 __attribute__((target("avx2,fma")))

namespace tgpq {
namespace cpu {
namespace {

// Stores the first `valid` (<= 8) floats of v at dst.
TGPQ_AVX2 inline void store_partial(float* dst, __m256 v, int64_t valid) {
  if (valid == 8) {
    _mm256_storeu_ps(dst, v);
  } else {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    std::memcpy(dst, tmp, static_cast<size_t>(valid) * sizeof(float));
  }
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
      store_partial(t.y + r * t.ldy + c0, v, valid);
    }
  }
}

// y = fma(float(acc - wsum), scale, bias) for rows [0, mr) of `acc` (int32 [4][16] in memory).
TGPQ_AVX2 inline void store_rows_mem(const GemmTile& t, const int32_t (*acc)[16], bool subtract_wsum) {
  __m256i v[4][2];
  for (int r = 0; r < 4; ++r)
    for (int h = 0; h < 2; ++h) v[r][h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc[r] + 8 * h));
  store_rows(t, v, subtract_wsum);
}

// One K loop of the 6x8 s16 kernel in assembly: GCC's allocator spills half of the 12 accumulators
// of the intrinsics version (a 20% loss). ymm0-11 accumulate (row r: ymm2r cols 0-3, ymm2r+1 cols 4-7,
// each lane pair [k01, k23]); ymm12-13 hold the sign-extended weights, ymm14 the broadcast row.
#define TGPQ_W8S16_ROW(R, A0, A1)                                   \
  "vpbroadcastq (%[a" #R "],%[g],8), %%ymm14\n\t"                  \
  "vpmaddwd %%ymm14, %%ymm12, %%ymm15\n\t"                          \
  "vpaddd %%ymm15, %%ymm" #A0 ", %%ymm" #A0 "\n\t"                  \
  "vpmaddwd %%ymm14, %%ymm13, %%ymm15\n\t"                          \
  "vpaddd %%ymm15, %%ymm" #A1 ", %%ymm" #A1 "\n\t"
#define TGPQ_STORE_ACC(I, OFF) "vmovdqu %%ymm" #I ", " #OFF "(%[acc])\n\t"

TGPQ_AVX2 void avx2_w8_s16(const GemmTile& t) {
  constexpr int MR = 6;
  const int16_t* a[MR];
  for (int r = 0; r < MR; ++r) a[r] = t.a16 + std::min<int64_t>(r, t.mr - 1) * t.lda;
  alignas(32) int32_t acc[MR][16];
  const int8_t* w = t.w;
  int64_t g = 0;
  const int64_t kg = t.kg;
  asm volatile(
      "vpxor %%ymm0, %%ymm0, %%ymm0\n\tvpxor %%ymm1, %%ymm1, %%ymm1\n\t"
      "vpxor %%ymm2, %%ymm2, %%ymm2\n\tvpxor %%ymm3, %%ymm3, %%ymm3\n\t"
      "vpxor %%ymm4, %%ymm4, %%ymm4\n\tvpxor %%ymm5, %%ymm5, %%ymm5\n\t"
      "vpxor %%ymm6, %%ymm6, %%ymm6\n\tvpxor %%ymm7, %%ymm7, %%ymm7\n\t"
      "vpxor %%ymm8, %%ymm8, %%ymm8\n\tvpxor %%ymm9, %%ymm9, %%ymm9\n\t"
      "vpxor %%ymm10, %%ymm10, %%ymm10\n\tvpxor %%ymm11, %%ymm11, %%ymm11\n\t"
      "1:\n\t"
      "vpmovsxbw (%[w]), %%ymm12\n\t"
      "vpmovsxbw 16(%[w]), %%ymm13\n\t"
      TGPQ_W8S16_ROW(0, 0, 1) TGPQ_W8S16_ROW(1, 2, 3) TGPQ_W8S16_ROW(2, 4, 5)
      TGPQ_W8S16_ROW(3, 6, 7) TGPQ_W8S16_ROW(4, 8, 9) TGPQ_W8S16_ROW(5, 10, 11)
      "add $64, %[w]\n\t"
      "inc %[g]\n\t"
      "cmp %[kg], %[g]\n\t"
      "jl 1b\n\t"
      TGPQ_STORE_ACC(0, 0) TGPQ_STORE_ACC(1, 32) TGPQ_STORE_ACC(2, 64) TGPQ_STORE_ACC(3, 96)
      TGPQ_STORE_ACC(4, 128) TGPQ_STORE_ACC(5, 160) TGPQ_STORE_ACC(6, 192) TGPQ_STORE_ACC(7, 224)
      TGPQ_STORE_ACC(8, 256) TGPQ_STORE_ACC(9, 288) TGPQ_STORE_ACC(10, 320) TGPQ_STORE_ACC(11, 352)
      : [w] "+r"(w), [g] "+r"(g)
      : [kg] "r"(kg), [a0] "r"(a[0]), [a1] "r"(a[1]), [a2] "r"(a[2]), [a3] "r"(a[3]), [a4] "r"(a[4]),
        [a5] "r"(a[5]), [acc] "r"(&acc[0][0])
      : "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
        "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
  // [c0 c0 c1 c1 | c2 c2 c3 c3] + [c4 c4 c5 c5 | c6 c6 c7 c7] -> c0..c7, then the epilogue.
  const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
  const int64_t valid = t.nc;
  alignas(32) float sc[8] = {0}, bi[8] = {0};
  for (int64_t c = 0; c < valid; ++c) {
    sc[c] = t.scale[c];
    bi[c] = t.bias ? t.bias[c] : 0.0f;
  }
  const __m256 vsc = _mm256_load_ps(sc), vbi = _mm256_load_ps(bi);
  for (int64_t r = 0; r < t.mr; ++r) {
    const __m256i lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(acc[r]));
    const __m256i hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(acc[r] + 8));
    const __m256i s = _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(lo, hi), order);
    const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), vsc, vbi);
    store_partial(t.y + r * t.ldy, v, valid);
  }
}

TGPQ_AVX2 void avx2_w4(const GemmTile& t) {
  constexpr int64_t kPairsPerFlush = 4;  // 8 K groups: |int16 sum| <= 8 * 4080 = 32640
  alignas(32) int32_t acc[4][16] = {};
  const uint8_t* a[4];
  for (int r = 0; r < 4; ++r) a[r] = t.a + std::min<int64_t>(r, t.mr - 1) * t.lda;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  // nibble -> sign-extended int8
  const __m256i lut = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1,
                                       0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  const int64_t pairs = t.kg / 2;
  const int8_t* w = t.w;
  for (int64_t p0 = 0; p0 < pairs; p0 += kPairsPerFlush) {
    const int64_t p1 = std::min(pairs, p0 + kPairsPerFlush);
    __m256i s[4][2];
    for (int r = 0; r < 4; ++r) s[r][0] = s[r][1] = _mm256_setzero_si256();
    for (int64_t p = p0; p < p1; ++p, w += 64) {
      __m256i x0[4], x1[4];
      for (int r = 0; r < 4; ++r) {
        x0[r] = _mm256_set1_epi32(load32(a[r] + 8 * p));
        x1[r] = _mm256_set1_epi32(load32(a[r] + 8 * p + 4));
      }
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * h));
        const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low4));
        const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
        for (int r = 0; r < 4; ++r)
          s[r][h] = _mm256_add_epi16(s[r][h], _mm256_add_epi16(_mm256_maddubs_epi16(x0[r], lo),
                                                               _mm256_maddubs_epi16(x1[r], hi)));
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int h = 0; h < 2; ++h) {
        __m256i* dst = reinterpret_cast<__m256i*>(acc[r] + 8 * h);
        _mm256_store_si256(dst, _mm256_add_epi32(_mm256_load_si256(dst), _mm256_madd_epi16(s[r][h], ones)));
      }
  }
  store_rows_mem(t, acc, /*subtract_wsum=*/true);
}

// Quantizes 32 floats v[0..3] (8 each, already in activation units: x * inv) to u8 + 128 at out; NaN -> 0.
TGPQ_AVX2 inline void quantize_store32(const __m256 v[4], uint8_t* out) {
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i zp = _mm256_set1_epi32(128);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i q[4];
  for (int j = 0; j < 4; ++j) {
    const __m256 r = _mm256_round_ps(v[j], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i c = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi)), zp);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v[j], v[j], _CMP_UNORD_Q));
    q[j] = _mm256_andnot_si256(nan, c);  // the NaN code 0
  }
  const __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permutevar8x32_epi32(b, perm));
}

TGPQ_AVX2 inline __m256 exp256(__m256 x) {  // exp_poly (ukernel.h) on 8 lanes
  using namespace exp_poly;
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kLo)), _mm256_set1_ps(kHi));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kPoly[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

}  // namespace

TGPQ_AVX2 void quantize_u8_avx2(const float* x, int64_t n, float inv, uint8_t* out) {
  const __m256 vinv = _mm256_set1_ps(inv);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256 v[4];
    for (int j = 0; j < 4; ++j) v[j] = _mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), vinv);
    quantize_store32(v, out + i);
  }
  for (; i < n; ++i) out[i] = quantize_one_u8(x[i], inv);
}

// Four 8-channel columns at a time: eight independent add / fma chains hide the adders' latency (one chain
// of 8 channels was latency-bound at ~2 floats per cycle). Each channel still sums its rows in order, so
// the result is the same whatever the column width.
TGPQ_AVX2 void norm_stats_rows_avx2(const float* x, int64_t rows, int64_t C, int64_t ldx, const float* pilot,
                                    float* sum, float* sumsq) {
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) {
    __m256 p[4], s[4], q[4];
    for (int j = 0; j < 4; ++j) {
      p[j] = _mm256_loadu_ps(pilot + c + 8 * j);
      s[j] = _mm256_loadu_ps(sum + c + 8 * j);
      q[j] = _mm256_loadu_ps(sumsq + c + 8 * j);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * ldx + c;
      for (int j = 0; j < 4; ++j) {
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(xr + 8 * j), p[j]);
        s[j] = _mm256_add_ps(s[j], d);
        q[j] = _mm256_fmadd_ps(d, d, q[j]);
      }
    }
    for (int j = 0; j < 4; ++j) {
      _mm256_storeu_ps(sum + c + 8 * j, s[j]);
      _mm256_storeu_ps(sumsq + c + 8 * j, q[j]);
    }
  }
  for (; c + 8 <= C; c += 8) {
    const __m256 p = _mm256_loadu_ps(pilot + c);
    __m256 s = _mm256_loadu_ps(sum + c), q = _mm256_loadu_ps(sumsq + c);
    for (int64_t r = 0; r < rows; ++r) {
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + r * ldx + c), p);
      s = _mm256_add_ps(s, d);
      q = _mm256_fmadd_ps(d, d, q);
    }
    _mm256_storeu_ps(sum + c, s);
    _mm256_storeu_ps(sumsq + c, q);
  }
  for (; c < C; ++c)
    for (int64_t r = 0; r < rows; ++r) {
      const float d = x[r * ldx + c] - pilot[c];
      sum[c] += d;
      sumsq[c] = std::fma(d, d, sumsq[c]);
    }
}

// One NHWC row of C channels: out = quant(silu?(x * A + B)). silu(v) = v / (1 + exp(-v)) with a
// Cephes-style exp (relative error < 2e-7).
TGPQ_AVX2 void norm_silu_quantize_row_avx2(const float* x, const float* A, const float* Bv, int64_t C, bool silu,
                                           float inv, uint8_t* out) {
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) {
    __m256 v[4];
    for (int j = 0; j < 4; ++j) {
      const int64_t o = c + 8 * j;
      v[j] = _mm256_fmadd_ps(_mm256_loadu_ps(x + o), _mm256_loadu_ps(A + o), _mm256_loadu_ps(Bv + o));
      if (silu) v[j] = _mm256_div_ps(v[j], _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), v[j]))));
      v[j] = _mm256_mul_ps(v[j], vinv);
    }
    quantize_store32(v, out + c);
  }
  for (; c < C; ++c) {
    const float v = std::fma(x[c], A[c], Bv[c]);
    out[c] = quantize_one_u8(silu ? silu_scalar(v) : v, inv);
  }
}

void qs8_qc8w_gemm_6x8c4__avx2(const GemmTile& t) { avx2_w8_s16(t); }
void qs8_qc4w_gemm_4x16c4__avx2(const GemmTile& t) { avx2_w4(t); }

TGPQ_AVX2 void widen_u8_s16_avx2(const uint8_t* src, int64_t n, int16_t* dst) {
  const __m256i zp = _mm256_set1_epi16(128);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_sub_epi16(v, zp));
  }
  for (; i < n; ++i) dst[i] = static_cast<int16_t>(src[i] - 128);
}

}  // namespace cpu
}  // namespace tgpq
