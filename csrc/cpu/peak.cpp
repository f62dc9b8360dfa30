// Ceilings of the CPU benchmark (peak.h).
#include "cpu/peak.h"

#include <immintrin.h>

#include <chrono>
#include <random>
#include <vector>

#include "cpu/gemm.h"

namespace tgpq {
namespace cpu {
namespace {

using Clock = std::chrono::steady_clock;

double elapsed(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// 12 chains x `reps` FMAs of `lanes` floats; returns MACs done (the values are kept live through `sink`).
__attribute__((target("avx2,fma"))) int64_t fma_loop_avx2(int64_t reps, float* sink) {
  __m256 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(1.0f + 1e-7f * i);
  const __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
  for (int64_t r = 0; r < reps; ++r)
    for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
  __m256 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, a[i]);
  *sink += _mm256_cvtss_f32(s);
  return reps * 12 * 8;
}

__attribute__((target("avx512f"))) int64_t fma_loop_avx512(int64_t reps, float* sink) {
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(1.0f + 1e-7f * i);
  const __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
  for (int64_t r = 0; r < reps; ++r)
    for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], b, c);
  __m512 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, a[i]);
  *sink += _mm512_reduce_add_ps(s);
  return reps * 12 * 16;
}

int64_t fma_loop_scalar(int64_t reps, float* sink) {
  float a[12];
  for (int i = 0; i < 12; ++i) a[i] = 1.0f + 1e-7f * i;
  for (int64_t r = 0; r < reps; ++r)
    for (int i = 0; i < 12; ++i) a[i] = a[i] * 0.999999f + 1e-7f;
  for (int i = 0; i < 12; ++i) *sink += a[i];
  return reps * 12;
}

// The serving kernels' multiply-accumulate instructions, 12 independent chains, registers only.
__attribute__((target("avx2"))) int64_t madd_loop_avx2_w8(int64_t reps, int32_t* sink) {
  __m256i acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_epi32(i);
  const __m256i a = _mm256_set1_epi16(3), b = _mm256_set1_epi16(-5);
  for (int64_t r = 0; r < reps; ++r)
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(a, b));  // 16 MACs
  __m256i s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_epi32(s, acc[i]);
  *sink += _mm256_extract_epi32(s, 0);
  return reps * 12 * 16;
}

__attribute__((target("avx2"))) int64_t maddubs_loop_avx2_w4(int64_t reps, int32_t* sink) {
  __m256i acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_epi16(static_cast<int16_t>(i));
  const __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-5);
  for (int64_t r = 0; r < reps; ++r)
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_add_epi16(acc[i], _mm256_maddubs_epi16(a, b));  // 32 MACs
  __m256i s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_epi16(s, acc[i]);
  *sink += _mm256_extract_epi16(s, 0);
  return reps * 12 * 32;
}

__attribute__((target("avx512f,avx512vnni"))) int64_t dpbusd_loop_avx512(int64_t reps, int32_t* sink) {
  __m512i acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_epi32(i);
  const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-5);
  for (int64_t r = 0; r < reps; ++r)
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);  // 64 MACs
  __m512i s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_epi32(s, acc[i]);
  *sink += _mm512_reduce_add_epi32(s);
  return reps * 12 * 64;
}

int64_t mac_loop_scalar(int64_t reps, int32_t* sink) {
  int32_t acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = i;
  for (int64_t r = 0; r < reps; ++r)
    for (int i = 0; i < 12; ++i) acc[i] += static_cast<int32_t>(r & 127) * (i - 6);
  for (int i = 0; i < 12; ++i) *sink += acc[i];
  return reps * 12;
}

}  // namespace

double fp32_fma_peak_gmacs(Isa isa, double seconds) {
  float sink = 0.0f;
  int64_t macs = 0;
  const auto t0 = Clock::now();
  do {
    macs += isa == Isa::kAvx512Vnni ? fma_loop_avx512(1 << 16, &sink)
            : isa == Isa::kAvx2     ? fma_loop_avx2(1 << 16, &sink)
                                    : fma_loop_scalar(1 << 14, &sink);
  } while (elapsed(t0) < seconds);
  const double s = elapsed(t0);
  return sink == 12345.678f ? 0.0 : macs / s / 1e9;  // `sink` keeps the loops alive
}

double int8_instruction_peak_gmacs(Isa isa, int bits, double seconds) {
  int32_t sink = 0;
  int64_t macs = 0;
  const auto t0 = Clock::now();
  do {
    macs += isa == Isa::kAvx512Vnni ? dpbusd_loop_avx512(1 << 16, &sink)
            : isa == Isa::kAvx2      ? (bits == 8 ? madd_loop_avx2_w8(1 << 16, &sink) : maddubs_loop_avx2_w4(1 << 16, &sink))
                                     : mac_loop_scalar(1 << 14, &sink);
  } while (elapsed(t0) < seconds);
  const double s = elapsed(t0);
  return sink == 1234567 ? 0.0 : macs / s / 1e9;
}

double ukernel_peak_gmacs(Isa isa, int bits, double seconds) {
  const UKernel uk = select_ukernel(isa, bits);
  const int64_t m = 8 * uk.mr, n = 64, k = 2304;
  const int lim = bits == 8 ? 127 : 7;
  std::mt19937 rng(0);
  std::uniform_int_distribution<int> dw(-lim, lim), da(1, 255);
  std::vector<int8_t> w(n * k);
  for (auto& v : w) v = static_cast<int8_t>(dw(rng));
  const int64_t kg = packed_k_groups(k, bits), bstride = packed_block_bytes(k, bits);
  std::vector<int8_t> wp((n + kBlockN - 1) / kBlockN * bstride);
  std::vector<int32_t> wsum((n + kBlockN - 1) / kBlockN * kBlockN);
  pack_weight_c4(w.data(), n, k, bits, wp.data(), wsum.data());
  const int64_t lda = kg * 4;
  std::vector<uint8_t> a(m * lda);
  for (auto& v : a) v = static_cast<uint8_t>(da(rng));
  std::vector<float> scale(wsum.size(), 1e-4f), bias(wsum.size(), 0.5f), y(m * n);
  int64_t macs = 0;
  const auto t0 = Clock::now();
  do {
    gemm_block(uk, m, 0, n, kg, a.data(), lda, wp.data(), bstride, wsum.data(), scale.data(), bias.data(), y.data(),
               n);
    macs += m * n * k;
  } while (elapsed(t0) < seconds);
  return macs / elapsed(t0) / 1e9;
}

}  // namespace cpu
}  // namespace tgpq
