// Every supported microkernel (int8 and int4 weights) against a plain int64 reference on odd shapes,
// and the u8 activation quantizer against the scalar definition (ties round to even).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "cpu/gemm.h"

using namespace tgpq::cpu;

// extreme = true: every activation and weight at the end of its range (+-127, int4 -8 / 7, int8 +-127),
// with a long K: the largest int16 partial sums and int32 accumulators the kernels can meet.
static void check_gemm(Isa isa, int bits, int64_t m, int64_t n, int64_t k, std::mt19937& rng,
                       bool extreme = false) {
  const int lim = bits == 8 ? 127 : 7;
  std::uniform_int_distribution<int> dw(-lim, lim), da(-127, 127), coin(0, 1);
  std::uniform_real_distribution<float> df(0.5f, 2.0f);
  std::vector<int8_t> w(n * k);
  // extreme: even columns all at the negative end, even rows all +127 (the worst int16 partial sums
  // of the u8 x s4 path: 8 groups of 2 * 255 * -8), odd ones random among the ends.
  const int wmin = bits == 4 ? -8 : -127;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t p = 0; p < k; ++p) {
      int v = dw(rng);
      if (extreme) v = (j % 2 == 0 || coin(rng)) ? wmin : lim;
      w[j * k + p] = static_cast<int8_t>(v);
    }
  const int64_t kg = packed_k_groups(k, bits), bstride = packed_block_bytes(k, bits);
  const int64_t nb = (n + 15) / 16;
  std::vector<int8_t> wp(nb * bstride);
  std::vector<int32_t> wsum(nb * 16);
  pack_weight_c4(w.data(), n, k, bits, wp.data(), wsum.data());
  const int64_t lda = kg * 4 + 3;  // a row stride that is not a multiple of 4
  std::vector<uint8_t> a(m * lda, 128);
  std::vector<int8_t> xs(m * k);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t p = 0; p < k; ++p) {
      xs[i * k + p] = static_cast<int8_t>(extreme ? ((i % 2 == 0 || coin(rng)) ? 127 : -127) : da(rng));
      a[i * lda + p] = static_cast<uint8_t>(xs[i * k + p] + 128);
    }
  std::vector<float> scale(nb * 16), bias(nb * 16);
  for (auto& v : scale) v = df(rng) * 1e-3f;
  for (auto& v : bias) v = df(rng);
  const int64_t ldy = n + 5;
  std::vector<float> y(m * ldy, -7.0f);
  const UKernel uk = select_ukernel(isa, bits);
  gemm_block(uk, m, 0, n, kg, a.data(), lda, wp.data(), bstride, wsum.data(), scale.data(), bias.data(),
             y.data(), ldy);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      long long acc = 0;
      for (int64_t p = 0; p < k; ++p) acc += (long long)xs[i * k + p] * w[j * k + p];
      const float ref = std::fma(static_cast<float>(acc), scale[j], bias[j]);
      if (y[i * ldy + j] != ref) {
        std::fprintf(stderr, "%s bits=%d m=%lld n=%lld k=%lld: y[%lld,%lld]=%g ref=%g\n", uk.name, bits,
                     (long long)m, (long long)n, (long long)k, (long long)i, (long long)j, y[i * ldy + j], ref);
        std::exit(1);
      }
    }
    for (int64_t j = n; j < ldy; ++j) CHECK(y[i * ldy + j] == -7.0f);  // no writes past nc
  }
}

int main() {
  std::mt19937 rng(11);
  const int64_t shapes[][3] = {{1, 1, 1}, {3, 5, 7}, {7, 13, 37}, {9, 67, 130}, {5, 130, 27}, {4, 64, 8}, {13, 200, 301}};
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512Vnni}) {
    if (!isa_supported(isa)) {
      std::printf("skip %s: not supported by this CPU\n", isa_name(isa));
      continue;
    }
    for (int bits : {8, 4})
      for (auto& s : shapes) check_gemm(isa, bits, s[0], s[1], s[2], rng);
    for (int bits : {8, 4})
      for (int64_t k : {2304, 4611}) check_gemm(isa, bits, 7, 19, k, rng, /*extreme=*/true);
    // quantizer: ties to even, clamping, and the vector body + scalar tail agree
    std::vector<float> x(77);
    std::uniform_real_distribution<float> dx(-300.f, 300.f);
    for (auto& v : x) v = dx(rng);
    x[0] = 0.5f; x[1] = 1.5f; x[2] = 2.5f; x[3] = -2.5f; x[4] = 1000.f; x[5] = -1000.f;
    std::vector<uint8_t> q(x.size());
    quantize_u8(x.data(), (int64_t)x.size(), 1.0f, q.data(), isa);
    for (size_t i = 0; i < x.size(); ++i) {
      const float r = std::fmin(127.f, std::fmax(-127.f, std::nearbyintf(x[i])));
      CHECK(q[i] == static_cast<uint8_t>(static_cast<int>(r) + 128));
    }
    CHECK(q[0] == 128 && q[1] == 130 && q[2] == 130 && q[3] == 126 && q[4] == 255 && q[5] == 1);
    std::printf("ok %s\n", isa_name(isa));
  }
  return 0;
}
