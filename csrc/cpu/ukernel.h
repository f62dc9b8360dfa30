// Register-tiled int8 GEMM microkernels and activation passes of the cpu backend (XNNPACK-style
// names are contracts). Pure C++ (no torch): the standalone ctest build covers them.
//
// Numerics (tgpq/numerics):
//   activations are stored as u8 with zero point 128:  a_u8 = clamp(rne(x * inv), -127, 127) + 128;
//   the code 0 (never a quantized value) marks a NaN activation, and a GEMM row that reads one is NaN
//   (cpu/gemm.h), so NaN propagates as in a float layer; +-Inf saturate to +-127 like any large value
//   acc[m, n] = sum_k (a_u8[m, k] - 128) * w[n, k]                     (exact int32)
//   y[m, n]   = fma(float(acc), scale[n], bias[n])     scale[n] = a_scale * w_scale[n] (float32)
// Every ISA path produces the same int32 accumulators and the same fma epilogue, so all paths are
// bit-identical; they differ from the contract's mul-then-add only by the single fma rounding.
//
// Microkernel names:  qs8_qc{8,4}w_gemm_{MR}x{NR}c4__{isa}
//   qs8   : signed 8-bit activations (carried as u8 + 128)
//   qc8w  : per-channel int8 weights;  qc4w : per-channel int4 weights unpacked in registers
//   MRxNR : output tile (rows x columns); c4: K consumed in groups of 4 (one 32-bit lane)
// One file per ISA: ukernel_scalar.cpp, ukernel_avx2.cpp, ukernel_avx512vnni.cpp.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/isa.h"
#include "layout/pack_c4.h"

namespace tgpq {
namespace cpu {

// ---- activation passes (dispatched per call on the `isa` argument; activations.cpp) ---------------
// out[i] = clamp(rne(x[i] * inv), -127, 127) + 128 as u8.
void quantize_u8(const float* x, int64_t n, float inv, uint8_t* out, Isa isa);
// dst[i] = int16(src[i]) - 128 (the s16 kernels' activation rows).
void widen_u8_s16(const uint8_t* src, int64_t n, int16_t* dst);
// GroupNorm statistics of `rows` NHWC rows of C channels (row r at x + r * ldx, ldx >= C), shifted by a
// per-channel pilot value (cancellation): sum[c] += sum_r (x[r, c] - pilot[c]), sumsq[c] += sum_r (x[r, c] -
// pilot[c])^2, in float (callers keep `rows` small, e.g. 64, and add the partial sums in double).
void norm_stats_rows(const float* x, int64_t rows, int64_t C, int64_t ldx, const float* pilot, float* sum,
                     float* sumsq, Isa isa);
// One NHWC row of C channels: out[c] = quantize_u8(silu?(fma(x[c], A[c], B[c]))) (GroupNorm folded into A, B).
void norm_silu_quantize_row(const float* x, const float* A, const float* B, int64_t C, bool silu, float inv,
                            uint8_t* out, Isa isa);

// The per-ISA variants behind them.
void quantize_u8_scalar(const float* x, int64_t n, float inv, uint8_t* out);
void quantize_u8_avx2(const float* x, int64_t n, float inv, uint8_t* out);
void widen_u8_s16_scalar(const uint8_t* src, int64_t n, int16_t* dst);
void widen_u8_s16_avx2(const uint8_t* src, int64_t n, int16_t* dst);
void norm_stats_rows_scalar(const float* x, int64_t rows, int64_t C, int64_t ldx, const float* pilot, float* sum,
                            float* sumsq);
void norm_stats_rows_avx2(const float* x, int64_t rows, int64_t C, int64_t ldx, const float* pilot, float* sum,
                          float* sumsq);
void norm_silu_quantize_row_scalar(const float* x, const float* A, const float* B, int64_t C, bool silu, float inv,
                                   uint8_t* out);
void norm_silu_quantize_row_avx2(const float* x, const float* A, const float* B, int64_t C, bool silu, float inv,
                                 uint8_t* out);
void norm_silu_quantize_row_avx512(const float* x, const float* A, const float* B, int64_t C, bool silu, float inv,
                                   uint8_t* out);

// Scalar building blocks shared by every path's remainder loop.
inline uint8_t quantize_one_u8(float v, float inv) {
  if (std::isnan(v)) return 0;
  float q = std::nearbyintf(v * inv);
  q = std::min(127.0f, std::max(-127.0f, q));
  return static_cast<uint8_t>(static_cast<int>(q) + 128);
}
inline float silu_scalar(float v) { return v / (1.0f + std::exp(-v)); }

// The vector exp of the SiLU rows (exp256 / exp512, one per ISA file), from these constants only, so that
// both widths compute the same bits: exp(x) = 2^n * p(r), x clamped to [kLo, kHi], n = round(x * kLog2e),
// r = x - n * (kLn2Hi + kLn2Lo) (Cody-Waite), p(r) = 1 + r + r^2 * (kPoly[0] r^5 + ... + kPoly[5]).
namespace exp_poly {
constexpr float kLo = -87.3f, kHi = 88.3f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace exp_poly
inline int32_t load32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---- microkernels --------------------------------------------------------------------------------
// One output tile: rows [0, mr) x columns [0, nc) with mr <= MR and nc <= NR of the kernel.
struct GemmTile {
  int64_t mr, nc, kg;              // rows, valid columns, K groups (packed_k_groups)
  const uint8_t* a;                // u8 kernels: row r at a + r * lda; kg * 4 readable bytes per row
  const int16_t* a16;              // s16 kernels: row r at a16 + r * lda; kg * 4 values a_u8 - 128
  int64_t lda;                     // elements between rows of a (or a16)
  const int8_t* w;                 // first packed block of the tile
  int64_t w_block_stride;          // bytes between 16-column blocks (packed_block_bytes)
  const int32_t* wsum;             // [nc] at the tile's first column
  const float* scale;              // [nc]
  const float* bias;               // [nc] or null
  float* y;                        // row r at y + r * ldy
  int64_t ldy;
};
using UKernelFn = void (*)(const GemmTile&);
struct UKernel {
  UKernelFn fn;
  int mr, nr;
  const char* name;
  bool a_s16;  // reads GemmTile::a16 (gemm_block widens the u8 block once) instead of GemmTile::a
};

void qs8_qc8w_gemm_4x64c4__avx512vnni(const GemmTile& t);
void qs8_qc4w_gemm_4x64c4__avx512vnni(const GemmTile& t);
void qs8_qc8w_gemm_6x8c4__avx2(const GemmTile& t);  // s16 activations (vpmaddwd)
void qs8_qc4w_gemm_4x16c4__avx2(const GemmTile& t);
void qs8_qc8w_gemm_4x16c4__scalar(const GemmTile& t);
void qs8_qc4w_gemm_4x16c4__scalar(const GemmTile& t);

}  // namespace cpu
}  // namespace tgpq
