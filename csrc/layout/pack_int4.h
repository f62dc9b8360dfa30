// Weight packing: int4 two-per-byte along K. Pure C++ (no torch), tested standalone by ctest.
//
// Layout: q is int8 [N, K] row-major with values in [-8, 7]. The packed tensor is int8
// [N, ceil(K/2)]: byte j of row n = (q[n, 2j] & 0xF) | ((q[n, 2j+1] & 0xF) << 4), i.e. the even
// element in the low nibble, two's-complement nibbles; an odd K is padded with a zero nibble.
#pragma once
#include <cstdint>

namespace tgpq {

inline int64_t int4_packed_cols(int64_t k) { return (k + 1) / 2; }

// Returns false (and writes nothing further) if a value is outside [-8, 7].
bool pack_int4(const int8_t* q, int64_t n, int64_t k, int8_t* out);
void unpack_int4(const int8_t* packed, int64_t n, int64_t k, int8_t* out);

// Sign-extend the low / high nibble of a packed byte.
inline int8_t int4_lo(int8_t b) { return static_cast<int8_t>(static_cast<int8_t>(b << 4) >> 4); }
inline int8_t int4_hi(int8_t b) { return static_cast<int8_t>(b >> 4); }

}  // namespace tgpq
