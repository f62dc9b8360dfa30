// Weight packing into the cpu microkernels' c4 blocks (layout in pack_c4.h). Pure C++ (no torch).
#include "pack_c4.h"

#include <cstring>

namespace tgpq {
namespace cpu {

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
    wsum[col] = static_cast<int32_t>(128 * s);
  }
}

}  // namespace cpu
}  // namespace tgpq
