// Ceilings of the CPU benchmark (peak.h).
#include "cpu/peak.h"

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

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

// AMX: the tile unit's u8 x s8 dot product (tdpbusd: C[16x16 int32] += A[16 rows x 64 u8] . B[16 x 64 s8], 16,384
// MACs), four independent accumulator tiles fed from two A and two B tiles (oneDNN's 2x2 blocking), tiles only.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// cpuid leaf 7 EDX bits 24 (AMX-TILE) and 25 (AMX-INT8); and Linux keeps AMX's tile data off until a process
// asks (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA), as oneDNN does before its first AMX kernel.
bool amx_int8_usable() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 25) & 1)) return false;
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
}

__attribute__((target("amx-tile,amx-int8"))) int64_t dpbusd_loop_amx(int64_t reps, int32_t* sink) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  alignas(64) static thread_local uint8_t a[16 * 64];
  alignas(64) static thread_local int32_t c[16 * 16];
  for (int i = 0; i < 16 * 64; ++i) a[i] = static_cast<uint8_t>(i * 7 + 1);
  for (int i = 0; i < 16 * 16; ++i) c[i] = i;
  _tile_loadd(0, c, 64);
  _tile_loadd(1, c, 64);
  _tile_loadd(2, c, 64);
  _tile_loadd(3, c, 64);
  _tile_loadd(4, a, 64);
  _tile_loadd(5, a, 64);
  _tile_loadd(6, a, 64);
  _tile_loadd(7, a, 64);
  for (int64_t r = 0; r < reps; ++r) {
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  _tile_stored(0, c, 64);
  _tile_release();
  *sink += c[0];
  return reps * 4 * 16 * 16 * 64;
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

double amx_int8_peak_gmacs(double seconds) {
  if (!amx_int8_usable()) return 0.0;
  int32_t sink = 0;
  int64_t macs = 0;
  const auto t0 = Clock::now();
  do {
    macs += dpbusd_loop_amx(1 << 12, &sink);
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
