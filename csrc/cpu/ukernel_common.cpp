// ISA detection, weight packing into c4 blocks, the scalar microkernels and the tiling loop.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "ukernel.h"

namespace tgpq {
namespace cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512Vnni: return "avx512vnni";
  }
  return "unknown";
}

bool isa_supported(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512Vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }
  return false;
#else
  return isa == Isa::kScalar;
#endif
}

Isa best_isa() {
  if (isa_supported(Isa::kAvx512Vnni)) return Isa::kAvx512Vnni;
  if (isa_supported(Isa::kAvx2)) return Isa::kAvx2;
  return Isa::kScalar;
}

int64_t packed_k_groups(int64_t k, int bits) {
  int64_t kg = (k + 3) / 4;
  if (bits == 4) kg += kg & 1;
  return kg;
}

int64_t packed_block_bytes(int64_t k, int bits) {
  const int64_t kg = packed_k_groups(k, bits);
  return bits == 4 ? kg * 32 : kg * 64;
}

void pack_weight_c4(const int8_t* w, int64_t n, int64_t k, int bits, int8_t* out, int32_t* wsum) {
  const int64_t nb = (n + kBlockN - 1) / kBlockN;
  const int64_t kg = packed_k_groups(k, bits);
  const int64_t bstride = packed_block_bytes(k, bits);
  std::memset(out, 0, static_cast<size_t>(nb * bstride));
  for (int64_t col = 0; col < nb * kBlockN; ++col) {
    const int64_t b = col / kBlockN, c = col % kBlockN;
    int64_t s = 0;
    if (col < n) {
      for (int64_t kk = 0; kk < k; ++kk) {
        const int8_t v = w[col * k + kk];
        s += v;
        const int64_t g = kk / 4, j = kk % 4;
        if (bits == 8) {
          out[b * bstride + g * 64 + c * 4 + j] = v;
        } else {
          const int64_t p = g / 2;
          uint8_t& byte = reinterpret_cast<uint8_t&>(out[b * bstride + p * 64 + c * 4 + j]);
          const uint8_t nib = static_cast<uint8_t>(v) & 0x0F;
          byte = (g & 1) ? static_cast<uint8_t>((byte & 0x0F) | (nib << 4))
                         : static_cast<uint8_t>((byte & 0xF0) | nib);
        }
      }
    }
    (void)kg;
    wsum[col] = static_cast<int32_t>(128 * s);
  }
}

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

UKernel select_ukernel(Isa isa, int bits) {
  const bool w4 = bits == 4;
  switch (isa) {
    case Isa::kAvx512Vnni:
      return w4 ? UKernel{qs8_qc4w_gemm_4x64c4__avx512vnni, 4, 64, "qs8_qc4w_gemm_4x64c4__avx512vnni"}
                : UKernel{qs8_qc8w_gemm_4x64c4__avx512vnni, 4, 64, "qs8_qc8w_gemm_4x64c4__avx512vnni"};
    case Isa::kAvx2:
      return w4 ? UKernel{qs8_qc4w_gemm_4x16c4__avx2, 4, 16, "qs8_qc4w_gemm_4x16c4__avx2"}
                : UKernel{qs8_qc8w_gemm_6x8c4__avx2, 6, 8, "qs8_qc8w_gemm_6x8c4__avx2", /*a_s16=*/true};
    case Isa::kScalar:
    default:
      return w4 ? UKernel{qs8_qc4w_gemm_4x16c4__scalar, 4, 16, "qs8_qc4w_gemm_4x16c4__scalar"}
                : UKernel{qs8_qc8w_gemm_4x16c4__scalar, 4, 16, "qs8_qc8w_gemm_4x16c4__scalar"};
  }
}

void gemm_block(const UKernel& uk, int64_t m, int64_t n0, int64_t nc, int64_t kg, const uint8_t* a,
                int64_t lda, const int8_t* w, int64_t w_block_stride, const int32_t* wsum,
                const float* scale, const float* bias, float* y, int64_t ldy) {
  // n0 must be a multiple of 16 (the packed block width).
  const int16_t* a16 = nullptr;
  if (uk.a_s16) {
    thread_local std::vector<int16_t> wide;
    wide.resize(static_cast<size_t>(m * kg * 4));
    for (int64_t i = 0; i < m; ++i) widen_u8_s16(a + i * lda, kg * 4, wide.data() + i * kg * 4);
    a16 = wide.data();
    lda = kg * 4;
  }
  for (int64_t j = 0; j < nc; j += uk.nr) {
    const int64_t col = n0 + j;
    GemmTile t;
    t.nc = std::min<int64_t>(uk.nr, nc - j);
    t.kg = kg;
    t.lda = lda;
    // a column's 4 bytes sit at offset 4 * (col % 16) of every 64-byte K group of its block
    t.w = w + (col / kBlockN) * w_block_stride + 4 * (col % kBlockN);
    t.w_block_stride = w_block_stride;
    t.wsum = wsum + col;
    t.scale = scale + col;
    t.bias = bias ? bias + col : nullptr;
    t.ldy = ldy;
    t.a16 = nullptr;
    for (int64_t i = 0; i < m; i += uk.mr) {
      t.mr = std::min<int64_t>(uk.mr, m - i);
      t.a = a + i * lda;
      if (a16) t.a16 = a16 + i * lda;
      t.y = y + i * ldy + j;
      uk.fn(t);
    }
  }
}

}  // namespace cpu
}  // namespace tgpq
