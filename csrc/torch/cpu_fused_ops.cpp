// Fused producers of the cpu backend: GroupNorm (+ SiLU) + int8 quantization in one pass that writes
// the u8 NHWC tensor the next quantized conv consumes (tgpq::cpu_qconv2d_u8).
//
//   cpu_groupnorm_silu_quantize(x, num_groups, weight, bias, eps, silu, a_scale, group_index, isa)
//     x: float32/bfloat16 [B, C, H, W] (channels_last read without a copy) -> uint8 [B, H, W, C]
//     u8 = clamp(rne(silu?(gn(x)) * (1 / a_scale[g])), -127, 127) + 128
// Statistics: per (batch, group) mean and biased variance, two passes (mean, then centered squares)
// with float partial sums over 64-row chunks added in double. The normalised value is
// x * A[c] + B[c] with A = rstd * weight[c], B = bias[c] - mean * A (one fma), then
// silu(v) = v / (1 + exp(-v)) with a Cephes-style exp (relative error < 2e-7). The result differs from
// torch's GroupNorm + SiLU by a few float32 ulps, which moves a quantized value by one step only when
// v / a_scale lies within ~1e-6 of a rounding boundary.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/ukernel.h"

#define TGPQ_AVX2 __attribute__((target("avx2,fma")))

namespace tgpq {
namespace {

using cpu::Isa;

TGPQ_AVX2 inline __m256 exp256(__m256 x) {
  // exp(x) = 2^n * p(r), n = round(x / ln2), r = x - n ln2 (Cody-Waite), p: degree-6 polynomial.
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float silu_scalar(float v) { return v / (1.0f + std::exp(-v)); }

inline uint8_t quant_scalar(float v, float inv) {
  float q = std::nearbyintf(v * inv);
  q = std::min(127.0f, std::max(-127.0f, q));
  return static_cast<uint8_t>(static_cast<int>(q) + 128);
}

// One NHWC row of C channels: out = quant(silu?(x * A + B)).
TGPQ_AVX2 void apply_row_avx2(const float* x, const float* A, const float* Bv, int64_t C, bool silu, float inv,
                              uint8_t* out) {
  const __m256 vinv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256i zp = _mm256_set1_epi32(128);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) {
    __m256i q[4];
    for (int j = 0; j < 4; ++j) {
      const int64_t o = c + 8 * j;
      __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(x + o), _mm256_loadu_ps(A + o), _mm256_loadu_ps(Bv + o));
      if (silu) v = _mm256_div_ps(v, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), v))));
      v = _mm256_round_ps(_mm256_mul_ps(v, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
      q[j] = _mm256_add_epi32(_mm256_cvtps_epi32(v), zp);
    }
    const __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), _mm256_permutevar8x32_epi32(b, perm));
  }
  for (; c < C; ++c) {
    float v = std::fma(x[c], A[c], Bv[c]);
    out[c] = quant_scalar(silu ? silu_scalar(v) : v, inv);
  }
}

void apply_row_scalar(const float* x, const float* A, const float* Bv, int64_t C, bool silu, float inv,
                      uint8_t* out) {
  for (int64_t c = 0; c < C; ++c) {
    float v = std::fma(x[c], A[c], Bv[c]);
    out[c] = quant_scalar(silu ? silu_scalar(v) : v, inv);
  }
}

at::Tensor cpu_groupnorm_silu_quantize(const at::Tensor& x, int64_t num_groups, const c10::optional<at::Tensor>& weight,
                                       const c10::optional<at::Tensor>& bias, double eps, bool silu,
                                       const at::Tensor& a_scale, const at::Tensor& group_index, int64_t isa_id) {
  TORCH_CHECK(x.device().is_cpu(), "cpu backend: input must be on the CPU");
  TORCH_CHECK(x.dim() == 4, "groupnorm_silu_quantize: expected [B, C, H, W], got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "cpu backend: input must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0, "groupnorm: ", C, " channels do not split into ", num_groups,
              " groups");
  for (const auto* t : {&weight, &bias}) {
    if (*t && (*t)->defined())
      TORCH_CHECK((*t)->dim() == 1 && (*t)->numel() == C && (*t)->scalar_type() == at::kFloat,
                  "groupnorm affine parameters must be float32 [", C, "]");
  }
  TORCH_CHECK(a_scale.dim() == 1 && a_scale.scalar_type() == at::kFloat && group_index.numel() == 1,
              "a_scale must be a 1-D float32 table and group_index one element");
  const int64_t g = group_index.item<int64_t>();
  TORCH_CHECK(g >= 0 && g < a_scale.numel(), "group index ", g, " is outside the scale table");
  const float inv = 1.0f / a_scale[g].item<float>();
  Isa isa = cpu::best_isa();
  if (isa_id >= 0) {
    TORCH_CHECK(isa_id <= 2 && cpu::isa_supported(static_cast<Isa>(isa_id)), "cpu backend: isa ", isa_id,
                " is not supported by this CPU");
    isa = static_cast<Isa>(isa_id);
  }
  auto xf = x.to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast);
  const float* xp = xf.data_ptr<float>();
  at::Tensor wc = weight && weight->defined() ? weight->contiguous() : at::ones({C}, xf.options());
  at::Tensor bc = bias && bias->defined() ? bias->contiguous() : at::zeros({C}, xf.options());
  const float* wp = wc.data_ptr<float>();
  const float* bp = bc.data_ptr<float>();
  const int64_t G = num_groups, Cg = C / G;
  // Per (b, c): the fused affine A, B.
  std::vector<float> Aall(B * C), Ball(B * C);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> part(C);
    std::vector<double> sum(C), mean_g(G), var_g(G);
    for (int64_t b = b0; b < b1; ++b) {
      const float* xb = xp + b * HW * C;
      // pass 1: channel sums
      std::fill(sum.begin(), sum.end(), 0.0);
      for (int64_t r0 = 0; r0 < HW; r0 += 64) {
        std::fill(part.begin(), part.end(), 0.0f);
        for (int64_t r = r0; r < std::min(HW, r0 + 64); ++r)
          for (int64_t c = 0; c < C; ++c) part[c] += xb[r * C + c];
        for (int64_t c = 0; c < C; ++c) sum[c] += part[c];
      }
      for (int64_t gi = 0; gi < G; ++gi) {
        double s = 0;
        for (int64_t c = gi * Cg; c < (gi + 1) * Cg; ++c) s += sum[c];
        mean_g[gi] = s / static_cast<double>(Cg * HW);
      }
      // pass 2: centered squares
      std::vector<float> mg(C);
      for (int64_t c = 0; c < C; ++c) mg[c] = static_cast<float>(mean_g[c / Cg]);
      std::fill(sum.begin(), sum.end(), 0.0);
      for (int64_t r0 = 0; r0 < HW; r0 += 64) {
        std::fill(part.begin(), part.end(), 0.0f);
        for (int64_t r = r0; r < std::min(HW, r0 + 64); ++r)
          for (int64_t c = 0; c < C; ++c) {
            const float d = xb[r * C + c] - mg[c];
            part[c] += d * d;
          }
        for (int64_t c = 0; c < C; ++c) sum[c] += part[c];
      }
      for (int64_t gi = 0; gi < G; ++gi) {
        double s = 0;
        for (int64_t c = gi * Cg; c < (gi + 1) * Cg; ++c) s += sum[c];
        var_g[gi] = s / static_cast<double>(Cg * HW);
      }
      for (int64_t c = 0; c < C; ++c) {
        const double rstd = 1.0 / std::sqrt(var_g[c / Cg] + eps);
        const double a = rstd * wp[c];
        Aall[b * C + c] = static_cast<float>(a);
        Ball[b * C + c] = static_cast<float>(bp[c] - mean_g[c / Cg] * a);
      }
    }
  });
  auto out = at::empty({B, H, W, C}, x.options().dtype(at::kByte));
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, B * HW, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / HW;
      if (isa == Isa::kScalar)
        apply_row_scalar(xp + r * C, &Aall[b * C], &Ball[b * C], C, silu, inv, op + r * C);
      else
        apply_row_avx2(xp + r * C, &Aall[b * C], &Ball[b * C], C, silu, inv, op + r * C);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tgpq, m) {
  m.def(
      "cpu_groupnorm_silu_quantize(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, bool silu, "
      "Tensor a_scale, Tensor group_index, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(tgpq, CPU, m) { m.impl("cpu_groupnorm_silu_quantize", &cpu_groupnorm_silu_quantize); }

}  // namespace tgpq
