// CPU kernels of tgpq::qlinear and tgpq::qconv2d (schemas in csrc/torch_ops.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/qgemm.h"
#include "pack.h"
#include "act_scale.h"

namespace tgpq {

at::Tensor unpack_int4_cpu(const at::Tensor& packed, int64_t k);

namespace {

// int8 [N, K] weight from the canonical packed form (copy for int4).
at::Tensor weight_int8(const at::Tensor& w_packed, int64_t bits, int64_t k) {
  TORCH_CHECK(w_packed.scalar_type() == at::kChar && w_packed.dim() == 2,
              "packed weight must be int8 2-D, got ", w_packed.scalar_type(), " with ", w_packed.dim(), " dims");
  if (bits == 8) {
    TORCH_CHECK(w_packed.size(1) == k, "weight has K=", w_packed.size(1), ", input has K=", k);
    return w_packed.contiguous();
  }
  TORCH_CHECK(bits == 4, "bits must be 4 or 8, got ", bits);
  return unpack_int4_cpu(w_packed, k);
}

// y [M, N] float32 = dequant(quant(x) [M, K] @ w^T) with rows split across threads.
void qgemm_rows(const float* x, int64_t m, int64_t k, const int8_t* w, int64_t n, float a_scale,
                const float* w_scale, const float* bias, float* y) {
  const float inv = 1.0f / a_scale;
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> xq(static_cast<size_t>(k));
    std::vector<int32_t> acc(static_cast<size_t>(n));
    for (int64_t i = begin; i < end; ++i) {
      quantize_act_f32(x + i * k, k, inv, xq.data());
      gemm_s8s8s32_scalar(xq.data(), k, w, k, acc.data(), n, 1, n, k);
      dequant_epilogue(acc.data(), n, a_scale, w_scale, bias, y + i * n, n, 1, n);
    }
  });
}

void check_common(const at::Tensor& x, const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias,
                  int64_t n) {
  TORCH_CHECK(x.device().is_cpu(), "cpu backend: input must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "cpu backend: input must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(w_scale.dim() == 1 && w_scale.numel() == n && w_scale.scalar_type() == at::kFloat,
              "w_scale must be float32 [", n, "]");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == n && bias->scalar_type() == at::kFloat,
                "bias must be float32 [", n, "]");
  }
}

at::Tensor qlinear_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                       const at::Tensor& a_scale, const at::Tensor& group_index,
                       const c10::optional<at::Tensor>& bias, int64_t bits, int64_t in_features) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "qlinear: input has ", x.size(-1),
              " features, the packed weight expects ", in_features);
  const int64_t n = w_packed.size(0);
  check_common(x, w_scale, bias, n);
  auto w = weight_int8(w_packed, bits, in_features);
  auto x2 = x.reshape({-1, in_features}).to(at::kFloat).contiguous();
  const int64_t m = x2.size(0);
  auto y = at::empty({m, n}, x2.options());
  const float as = read_act_scale(a_scale, group_index);
  auto ws = w_scale.contiguous();
  at::Tensor b = bias ? bias->contiguous() : at::Tensor();
  qgemm_rows(x2.data_ptr<float>(), m, in_features, w.data_ptr<int8_t>(), n, as, ws.data_ptr<float>(),
             bias ? b.data_ptr<float>() : nullptr, y.data_ptr<float>());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return y.reshape(shape).to(x.scalar_type());
}

at::Tensor qconv2d_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                       const at::Tensor& a_scale, const at::Tensor& group_index,
                       const c10::optional<at::Tensor>& bias, int64_t bits, int64_t in_channels,
                       at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4, "qconv2d: expected a 4-D input [B, C, H, W], got ", x.dim(), " dims");
  TORCH_CHECK(x.size(1) == in_channels, "qconv2d: input has ", x.size(1),
              " channels, the packed weight expects ", in_channels);
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "qconv2d: kernel_size, stride, padding, dilation must have 2 entries");
  const int64_t n = w_packed.size(0);
  check_common(x, w_scale, bias, n);
  const int64_t kh = kernel_size[0], kw = kernel_size[1];
  const int64_t k = kh * kw * in_channels;
  auto w = weight_int8(w_packed, bits, k);
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  const int64_t Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(Ho > 0 && Wo > 0, "qconv2d: output would be empty for input ", H, "x", W);
  // NHWC float32 view of the input.
  auto xh = x.to(at::kFloat).permute({0, 2, 3, 1}).contiguous();
  const float as = read_act_scale(a_scale, group_index);
  const float inv = 1.0f / as;
  // Quantize once, then gather patches (zero padding is exact: quant(0) == 0).
  auto xq = at::empty({B, H, W, in_channels}, x.options().dtype(at::kChar));
  {
    const float* src = xh.data_ptr<float>();
    int8_t* dst = xq.data_ptr<int8_t>();
    const int64_t total = xh.numel();
    at::parallel_for(0, total, 1 << 14, [&](int64_t b, int64_t e) {
      quantize_act_f32(src + b, e - b, inv, dst + b);
    });
  }
  auto y = at::empty({B, Ho, Wo, n}, x.options().dtype(at::kFloat));
  auto ws = w_scale.contiguous();
  at::Tensor bt = bias ? bias->contiguous() : at::Tensor();
  const int8_t* xqp = xq.data_ptr<int8_t>();
  const int8_t* wp = w.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  const float* wsp = ws.data_ptr<float>();
  const float* bp = bias ? bt.data_ptr<float>() : nullptr;
  const int64_t rows = B * Ho * Wo;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> patch(static_cast<size_t>(k));
    std::vector<int32_t> acc(static_cast<size_t>(n));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (Ho * Wo), oh = (r / Wo) % Ho, ow = r % Wo;
      int8_t* pp = patch.data();
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t ih = oh * stride[0] - padding[0] + i * dilation[0];
        for (int64_t j = 0; j < kw; ++j, pp += in_channels) {
          const int64_t iw = ow * stride[1] - padding[1] + j * dilation[1];
          if (ih < 0 || ih >= H || iw < 0 || iw >= W) {
            std::fill(pp, pp + in_channels, int8_t(0));
          } else {
            std::copy_n(xqp + ((b * H + ih) * W + iw) * in_channels, in_channels, pp);
          }
        }
      }
      gemm_s8s8s32_scalar(patch.data(), k, wp, k, acc.data(), n, 1, n, k);
      dequant_epilogue(acc.data(), n, as, wsp, bp, yp + r * n, n, 1, n);
    }
  });
  // [B, Ho, Wo, N] memory == channels_last [B, N, Ho, Wo].
  return y.permute({0, 3, 1, 2}).to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(tgpq, CPU, m) {
  m.impl("qlinear", &qlinear_cpu);
  m.impl("qconv2d", &qconv2d_cpu);
}

}  // namespace tgpq
