// The GEMM driver's single-threaded part: microkernel choice per (ISA, bits) and the tiling of one
// packed A block over a range of output columns. Pure C++ (no torch).
#include "gemm.h"

#include <algorithm>
#include <vector>

namespace tgpq {
namespace cpu {

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
