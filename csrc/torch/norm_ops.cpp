// CPU kernel of groupnorm_silu_quantize (schema: library.cpp): GroupNorm (+ SiLU) + int8 quantization in
// one pass that writes the u8 NHWC tensor the next quantized conv consumes (qconv2d_u8).
//
//   groupnorm_silu_quantize(x, num_groups, weight, bias, eps, silu, a_scale, group_index, isa)
//     x: float32/bfloat16 [B, C, H, W] (channels_last read without a copy) -> uint8 [B, H, W, C]
//     u8 = clamp(rne(silu?(gn(x)) * (1 / a_scale[g])), -127, 127) + 128
// Statistics: per (batch, group) mean and biased variance, two passes (mean, then centered squares)
// with float partial sums over 64-row chunks added in double. The normalised value is
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
      cpu::norm_silu_quantize_row(xp + r * C, &Aall[b * C], &Ball[b * C], C, silu, inv, op + r * C, isa);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tgpq, CPU, m) { m.impl("groupnorm_silu_quantize", &groupnorm_silu_quantize_cpu); }

}  // namespace tgpq
