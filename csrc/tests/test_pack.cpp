// int4 pack/unpack: exact round trip on random data, odd K, nibble layout, range check.
#include <random>
#include <vector>

#include "check.h"
#include "layout/pack_int4.h"

int main() {
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int> dist(-8, 7);
  for (int64_t k : {1, 2, 7, 64, 129}) {
    const int64_t n = 5;
    std::vector<int8_t> q(n * k), back(n * k);
    for (auto& v : q) v = static_cast<int8_t>(dist(rng));
    std::vector<int8_t> packed(n * tgpq::int4_packed_cols(k));
    CHECK(tgpq::pack_int4(q.data(), n, k, packed.data()));
    tgpq::unpack_int4(packed.data(), n, k, back.data());
    CHECK(q == back);
    // even element in the low nibble, two's complement
    const int8_t b = packed[0];
    CHECK(tgpq::int4_lo(b) == q[0]);
    if (k > 1) CHECK(tgpq::int4_hi(b) == q[1]);
    if (k % 2 == 1) CHECK(tgpq::int4_hi(packed[tgpq::int4_packed_cols(k) - 1]) == 0);
  }
  std::vector<int8_t> bad = {3, 9};
  std::vector<int8_t> out(1);
  CHECK(!tgpq::pack_int4(bad.data(), 1, 2, out.data()));
  std::printf("test_pack: ok\n");
  return 0;
}
