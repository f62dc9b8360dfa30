// The cpu microkernels' packed weight layout ("c4 blocks"), built once per layer at load time.
// Pure C++ (no torch); tgpq/layout/packed_weight.py documents the same layout on the Python side.
#pragma once
#include <cstdint>

namespace tgpq {
namespace cpu {

constexpr int kBlockN = 16;  // columns of one packed weight block

// ---- packed weight layout ("c4 blocks") -------------------------------------------------------
// nb = ceil(N / 16) blocks of 16 output channels; kg = ceil(K / 4) groups of 4 (rounded up to
// an even count for int4). Padding (n >= N or k >= K) holds weight 0.
//   int8: block b, group g -> 64 bytes at w[(b * kg + g) * 64]; byte c*4 + j = W[16b + c, 4g + j].
//   int4: block b, pair p (groups 2p, 2p+1) -> 64 bytes at w[(b * kg / 2 + p) * 64];
//         byte c*4 + j holds W[16b + c, 8p + j] in its low nibble and W[16b + c, 8p + 4 + j] in its
//         high nibble (two's complement nibbles). Half the bytes of int8.
//   wsum[16b + c] = 128 * sum_k W[16b + c, k]  (int32, [nb * 16]): the zero-point compensation.
int64_t packed_k_groups(int64_t k, int bits);
// Bytes of one 16-column block (the stride between blocks).
int64_t packed_block_bytes(int64_t k, int bits);
// w: int8 [n, k] row-major (values within the int4 range when bits == 4).
// out: nb * packed_block_bytes bytes; wsum: nb * 16 int32.
void pack_weight_c4(const int8_t* w, int64_t n, int64_t k, int bits, int8_t* out, int32_t* wsum);

}  // namespace cpu
}  // namespace tgpq
