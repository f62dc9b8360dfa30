// Portable int8 GEMM, activation quantization and epilogue against plain references.
#include <cmath>
#include <random>
#include <vector>

#include "check.h"
#include "cpu/reference.h"

int main() {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> d8(-127, 127);
  const int64_t m = 7, n = 13, k = 37;
  std::vector<int8_t> a(m * k), b(n * k);
  for (auto& v : a) v = static_cast<int8_t>(d8(rng));
  for (auto& v : b) v = static_cast<int8_t>(d8(rng));
  std::vector<int32_t> c(m * n);
  tgpq::gemm_s8s8s32_scalar(a.data(), k, b.data(), k, c.data(), n, m, n, k);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      long long ref = 0;
      for (int64_t p = 0; p < k; ++p) ref += (long long)a[i * k + p] * b[j * k + p];
      CHECK(c[i * n + j] == ref);
    }
  // round half to even and clamping
  const float x[] = {0.5f, 1.5f, 2.5f, -0.5f, -2.5f, 1000.f, -1000.f, 3.49f};
  int8_t q[8];
  tgpq::quantize_act_f32(x, 8, 1.0f, q);
  const int8_t expect[] = {0, 2, 2, 0, -2, 127, -127, 3};
  for (int i = 0; i < 8; ++i) CHECK(q[i] == expect[i]);
  // epilogue
  std::vector<float> ws(n), bias(n), y(m * n);
  for (int64_t j = 0; j < n; ++j) { ws[j] = 0.01f * (j + 1); bias[j] = 0.5f * j; }
  tgpq::dequant_epilogue(c.data(), n, 0.02f, ws.data(), bias.data(), y.data(), n, m, n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const double ref = (double)c[i * n + j] * 0.02 * ws[j] + bias[j];
      CHECK(std::fabs(y[i * n + j] - ref) <= 1e-5 * std::fabs(ref) + 1e-5);
    }
  std::printf("test_qgemm: ok\n");
  return 0;
}
