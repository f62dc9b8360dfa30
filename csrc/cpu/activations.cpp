// The activation passes of the cpu backend, dispatched on the ISA path the caller chose (the AVX2
// variants also serve the avx512vnni path where a pass is memory-bound; the GroupNorm+SiLU row, which
// computes an exp per value, has its own 16-lane variant).
#include "ukernel.h"

namespace tgpq {
namespace cpu {

void quantize_u8(const float* x, int64_t n, float inv, uint8_t* out, Isa isa) {
  if (isa == Isa::kScalar)
    quantize_u8_scalar(x, n, inv, out);
  else
    quantize_u8_avx2(x, n, inv, out);
}

void widen_u8_s16(const uint8_t* src, int64_t n, int16_t* dst) {
  static const bool avx2 = isa_supported(Isa::kAvx2);
  if (avx2)
    widen_u8_s16_avx2(src, n, dst);
  else
    widen_u8_s16_scalar(src, n, dst);
}

void norm_stats_rows(const float* x, int64_t rows, int64_t C, int64_t ldx, const float* pilot, float* sum, float* sumsq,
                     Isa isa) {
  if (isa == Isa::kScalar)
    norm_stats_rows_scalar(x, rows, C, ldx, pilot, sum, sumsq);
  else
    norm_stats_rows_avx2(x, rows, C, ldx, pilot, sum, sumsq);
}

void norm_silu_quantize_row(const float* x, const float* A, const float* B, int64_t C, bool silu, float inv,
                            uint8_t* out, Isa isa) {
  if (isa == Isa::kScalar)
    norm_silu_quantize_row_scalar(x, A, B, C, silu, inv, out);
  else if (isa == Isa::kAvx512Vnni)
    norm_silu_quantize_row_avx512(x, A, B, C, silu, inv, out);
  else
    norm_silu_quantize_row_avx2(x, A, B, C, silu, inv, out);
}

}  // namespace cpu
}  // namespace tgpq
