// CPU kernel of groupnorm_silu_quantize (schema: library.cpp): GroupNorm (+ SiLU) + int8 quantization in
// one pass that writes the u8 NHWC tensor the next quantized conv consumes (qconv2d_u8).
//
//   groupnorm_silu_quantize(x, num_groups, weight, bias, eps, silu, a_scale, group_index, isa)
//     x: float32/bfloat16 [B, C, H, W] (channels_last read without a copy) -> uint8 [B, H, W, C]
//     u8 = clamp(rne(silu?(gn(x)) * (1 / a_scale[g])), -127, 127) + 128
// Statistics: per (batch, group) mean and biased variance in one pass: per channel, float sums of x - p and
// (x - p)^2 over 64-row chunks (p: the channel's value in the image's first row, against cancellation),
// added in double; then the group's mean and centered sum of squares follow exactly. The normalised value is
// x * A[c] + B[c] with A = rstd * weight[c], B = bias[c] - mean * A (one fma), then the row pass
// cpu::norm_silu_quantize_row (cpu/ukernel_*.cpp). The result differs from torch's GroupNorm + SiLU by
// a few float32 ulps, which moves a quantized value by one step only when v / a_scale lies within
// ~1e-6 of a rounding boundary.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/ukernel.h"
#include "op_args.h"

namespace tgpq {
namespace {

using cpu::Isa;

at::Tensor groupnorm_silu_quantize_cpu(const at::Tensor& x, int64_t num_groups, const c10::optional<at::Tensor>& weight,
                                       const c10::optional<at::Tensor>& bias, double eps, bool silu,
                                       const at::Tensor& a_scale, const at::Tensor& group_index, int64_t isa_id) {
  check_cpu_float_input(x);
  TORCH_CHECK(x.dim() == 4, "groupnorm_silu_quantize: expected [B, C, H, W], got ", x.dim(), " dims");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0, "groupnorm: ", C, " channels do not split into ", num_groups,
              " groups");
  for (const auto* t : {&weight, &bias}) {
    if (*t && (*t)->defined())
      TORCH_CHECK((*t)->dim() == 1 && (*t)->numel() == C && (*t)->is_floating_point(),
                  "groupnorm affine parameters must be floating [", C, "]");
  }
  const float inv = 1.0f / read_act_scale(a_scale, group_index);
  const Isa isa = resolve_isa(isa_id);
  auto xf = x.to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast);
  const float* xp = xf.data_ptr<float>();
  // affine parameters of a float16 / bfloat16 model are read in float32
  at::Tensor wc = weight && weight->defined() ? weight->to(at::kFloat).contiguous() : at::ones({C}, xf.options());
  at::Tensor bc = bias && bias->defined() ? bias->to(at::kFloat).contiguous() : at::zeros({C}, xf.options());
  const float* wp = wc.data_ptr<float>();
  const float* bp = bc.data_ptr<float>();
  const int64_t G = num_groups, Cg = C / G;
  // One statistics pass: tasks of (image, 64-row chunk) accumulate shifted sums in float (pilot = the
  // image's first row), added per image in double; mean and variance follow exactly from them.
  constexpr int64_t kChunk = 64;
  const int64_t chunks = (HW + kChunk - 1) / kChunk;
  std::vector<float> psum(B * chunks * C, 0.0f), psq(B * chunks * C, 0.0f);
  at::parallel_for(0, B * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / chunks, r0 = (t % chunks) * kChunk;
      const float* xb = xp + b * HW * C;
      cpu::norm_stats_rows(xb + r0 * C, std::min(kChunk, HW - r0), C, xb, &psum[t * C], &psq[t * C], isa);
    }
  });
  // Per (b, c): the fused affine A, B, from sum_r (x - p) and sum_r (x - p)^2 of each channel.
  std::vector<float> Aall(B * C), Ball(B * C);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> s1(C), s2(C);
    for (int64_t b = b0; b < b1; ++b) {
      const float* pilot = xp + b * HW * C;
      std::fill(s1.begin(), s1.end(), 0.0);
      std::fill(s2.begin(), s2.end(), 0.0);
      for (int64_t k = 0; k < chunks; ++k)
        for (int64_t c = 0; c < C; ++c) {
          s1[c] += psum[(b * chunks + k) * C + c];
          s2[c] += psq[(b * chunks + k) * C + c];
        }
      const double n = static_cast<double>(HW), ng = static_cast<double>(Cg * HW);
      for (int64_t gi = 0; gi < G; ++gi) {
        double total = 0.0;
        for (int64_t c = gi * Cg; c < (gi + 1) * Cg; ++c) total += s1[c] + n * pilot[c];
        const double mean = total / ng;
        double sq = 0.0;  // sum over the group of (x - mean)^2 = sum of s2 + 2 (p - mean) s1 + n (p - mean)^2
        for (int64_t c = gi * Cg; c < (gi + 1) * Cg; ++c) {
          const double dp = pilot[c] - mean;
          sq += s2[c] + 2.0 * dp * s1[c] + n * dp * dp;
        }
        const double rstd = 1.0 / std::sqrt(std::max(sq / ng, 0.0) + eps);
        for (int64_t c = gi * Cg; c < (gi + 1) * Cg; ++c) {
          const double a = rstd * wp[c];
          Aall[b * C + c] = static_cast<float>(a);
          Ball[b * C + c] = static_cast<float>(bp[c] - mean * a);
        }
      }
    }
  });
  auto out = at::empty({B, H, W, C}, x.options().dtype(at::kByte));
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, B * HW, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / HW;
      cpu::norm_silu_quantize_row(xp + r * C, &Aall[b * C], &Ball[b * C], C, silu, inv, op + r * C, isa);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tgpq, CPU, m) { m.impl("groupnorm_silu_quantize", &groupnorm_silu_quantize_cpu); }

}  // namespace tgpq
