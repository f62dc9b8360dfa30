#include "pack_int4.h"

namespace tgpq {

bool pack_int4(const int8_t* q, int64_t n, int64_t k, int8_t* out) {
  const int64_t kp = int4_packed_cols(k);
  for (int64_t r = 0; r < n; ++r) {
    const int8_t* row = q + r * k;
    int8_t* dst = out + r * kp;
    for (int64_t j = 0; j < kp; ++j) {
      const int8_t lo = row[2 * j];
      const int8_t hi = (2 * j + 1 < k) ? row[2 * j + 1] : 0;
      if (lo < -8 || lo > 7 || hi < -8 || hi > 7) return false;
      dst[j] = static_cast<int8_t>((lo & 0x0F) | ((hi & 0x0F) << 4));
    }
  }
  return true;
}

void unpack_int4(const int8_t* packed, int64_t n, int64_t k, int8_t* out) {
  const int64_t kp = int4_packed_cols(k);
  for (int64_t r = 0; r < n; ++r) {
    const int8_t* src = packed + r * kp;
    int8_t* row = out + r * k;
    for (int64_t j = 0; j < kp; ++j) {
      row[2 * j] = int4_lo(src[j]);
      if (2 * j + 1 < k) row[2 * j + 1] = int4_hi(src[j]);
    }
  }
}

}  // namespace tgpq
