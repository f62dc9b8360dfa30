// CPU kernels of the quantized layers over weights repacked once into the microkernels' c4 layout
// (schemas: library.cpp; layouts: layout/pack_c4.h, cpu/ukernel.h).
//
//   quantize_nhwc_u8(x, a_scale, group_index, isa, pad) float [B,C,H,W] (any layout) -> u8 [B,H,W,C]; pad
//                                                       (left, right, top, bottom): a zero border, code 128
//   qconv2d_u8(xq, ..., row_bias, residual)            u8 NHWC -> float32 channels_last [B,N,Ho,Wo],
//                                                       optional per-image bias and residual added in cache
//   qconv2d(x, w_c4, wsum, ...)                         quantize_nhwc_u8 + qconv2d_u8
//   qlinear(x, w_c4, wsum, ...)                         [..., K] float -> [..., N] float32, the
//                                                       quantization fused into the A packing
// `isa` / `variant`: -1 = the best this CPU supports; 0 scalar, 1 avx2, 2 avx512vnni.
// Threads: cpu::run_gemm over (row block, column group) tasks with at::parallel_for; each task packs its
// own A block (im2col of the u8 input, or quantize-on-pack for linear) into a thread-local buffer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/gemm.h"
#include "op_args.h"

namespace tgpq {
namespace {

using cpu::Isa;

float act_scale(const at::Tensor& a_scale, const at::Tensor& group_index) {
  const float s = read_act_scale(a_scale, group_index);
  TORCH_CHECK(s > 0.0f, "activation scale must be positive, got ", s);
  return s;
}

using cpu::PackedW;

PackedW check_packed(const at::Tensor& w_c4, const at::Tensor& wsum, int64_t bits, int64_t n, int64_t k) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  const int64_t nb = (n + cpu::kBlockN - 1) / cpu::kBlockN;
  const int64_t bstride = cpu::packed_block_bytes(k, static_cast<int>(bits));
  TORCH_CHECK(w_c4.scalar_type() == at::kChar && w_c4.is_contiguous() && w_c4.dim() == 2 &&
                  w_c4.size(0) == nb && w_c4.size(1) == bstride,
              "prepacked weight must be contiguous int8 [", nb, ", ", bstride, "] for N=", n, ", K=", k,
              ", bits=", bits, " (run tgpq.backends.cpu.prepare(layer) again)");
  TORCH_CHECK(wsum.scalar_type() == at::kInt && wsum.is_contiguous() && wsum.numel() == nb * cpu::kBlockN,
              "prepacked wsum must be contiguous int32 [", nb * cpu::kBlockN, "]");
  return {w_c4.data_ptr<int8_t>(), wsum.data_ptr<int32_t>(), n, k,
          cpu::packed_k_groups(k, static_cast<int>(bits)), bstride, static_cast<int>(bits)};
}

// scale[n] = a_scale * w_scale[n] (padded to a multiple of 16) and the bias padded likewise.
void epilogue_vectors(float as, const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias, int64_t n,
                      std::vector<float>& scale, std::vector<float>& bvec) {
  TORCH_CHECK(w_scale.dim() == 1 && w_scale.numel() == n && w_scale.scalar_type() == at::kFloat,
              "w_scale must be float32 [", n, "]");
  const int64_t np = (n + 15) / 16 * 16;
  scale.assign(np, 0.0f);
  auto ws = w_scale.contiguous();
  const float* p = ws.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) scale[i] = as * p[i];
  bvec.clear();
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == n && bias->scalar_type() == at::kFloat,
                "bias must be float32 [", n, "]");
    auto bc = bias->contiguous();
    bvec.assign(np, 0.0f);
    std::memcpy(bvec.data(), bc.data_ptr<float>(), n * sizeof(float));
  }
}

// cpu::run_gemm on torch's thread pool.
template <typename Fill, typename Post = cpu::NoPost>
void run_gemm(int64_t M, const PackedW& pw, Isa isa, const float* scale, const float* bias, float* y, Fill fill,
              Post post = Post()) {
  auto pfor = [](int64_t begin, int64_t end, int64_t grain, const auto& fn) { at::parallel_for(begin, end, grain, fn); };
  cpu::run_gemm(M, pw, isa, scale, bias, y, at::get_num_threads(), pfor, fill, post);
}

// Optional terms added after the epilogue, in this order: y = (fma(acc, scale, bias) + row_bias[b]) + residual.
// row_bias: float32 [B, N] (one row per image, e.g. a time-embedding projection);
// residual: float32 [B, N, Ho, Wo] of the output's shape, read in channels_last order.
// The adds are the same float32 operations a separate `y + t[:, :, None, None]` / `y + r` performs.
struct ConvExtras {
  at::Tensor row_bias, residual;  // undefined when absent (contiguous float32 when present)
  const float* rb = nullptr;
  const float* res = nullptr;

  ConvExtras(const c10::optional<at::Tensor>& row_bias_in, const c10::optional<at::Tensor>& residual_in, int64_t B,
             int64_t N, int64_t Ho, int64_t Wo) {
    if (row_bias_in && row_bias_in->defined()) {
      TORCH_CHECK(row_bias_in->dim() == 2 && row_bias_in->size(0) == B && row_bias_in->size(1) == N,
                  "qconv2d: row_bias must be [", B, ", ", N, "], got ", row_bias_in->sizes());
      row_bias = row_bias_in->to(at::kFloat).contiguous();
      rb = row_bias.data_ptr<float>();
    }
    if (residual_in && residual_in->defined()) {
      TORCH_CHECK(residual_in->dim() == 4 && residual_in->size(0) == B && residual_in->size(1) == N &&
                      residual_in->size(2) == Ho && residual_in->size(3) == Wo,
                  "qconv2d: residual must have the output's shape [", B, ", ", N, ", ", Ho, ", ", Wo, "], got ",
                  residual_in->sizes());
      residual = residual_in->to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast);
      res = residual.data_ptr<float>();
    }
  }
  bool any() const { return rb || res; }
  // rows [m0, m0 + rows) x columns [n0, n0 + nc) of y [M, N] (M = B * hw).
  void apply(float* y, int64_t N, int64_t hw, int64_t m0, int64_t rows, int64_t n0, int64_t nc) const {
    for (int64_t r = m0; r < m0 + rows; ++r) {
      float* yr = y + r * N + n0;
      if (rb) {
        const float* b = rb + (r / hw) * N + n0;
        for (int64_t c = 0; c < nc; ++c) yr[c] += b[c];
      }
      if (res) {
        const float* x = res + r * N + n0;
        for (int64_t c = 0; c < nc; ++c) yr[c] += x[c];
      }
    }
  }
};

at::Tensor quantize_nhwc_u8_cpu(const at::Tensor& x, const at::Tensor& a_scale, const at::Tensor& group_index,
                                int64_t isa_id, at::IntArrayRef pad) {
  check_cpu_float_input(x);
  TORCH_CHECK(x.dim() == 4, "quantize_nhwc_u8: expected [B, C, H, W], got ", x.dim(), " dims");
  TORCH_CHECK(pad.empty() || (pad.size() == 4 && *std::min_element(pad.begin(), pad.end()) >= 0),
              "quantize_nhwc_u8: pad must be empty or 4 non-negative sizes (left, right, top, bottom), got ", pad);
  const Isa isa = resolve_isa(isa_id);
  const float inv = 1.0f / act_scale(a_scale, group_index);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t pl = pad.empty() ? 0 : pad[0], pr = pad.empty() ? 0 : pad[1];
  const int64_t pt = pad.empty() ? 0 : pad[2], pb = pad.empty() ? 0 : pad[3];
  const int64_t Hp = H + pt + pb, Wp = W + pl + pr;
  // float32 channels_last, or a channel slice of it (a split conv's branch of a concatenation): pixel p's C
  // values are contiguous at p * ps and are read in place; anything else is brought to channels_last first.
  const NhwcRows xr = nhwc_rows(x);
  const int64_t ps = xr.ld;
  auto out = at::empty({B, Hp, Wp, C}, x.options().dtype(at::kByte));
  const float* src = xr.x;
  uint8_t* dst = out.data_ptr<uint8_t>();
  if (ps == C && Hp == H && Wp == W) {  // dense: one flat pass
    at::parallel_for(0, B * H * W * C, 1 << 15, [&](int64_t b, int64_t e) {
      cpu::quantize_u8(src + b, e - b, inv, dst + b, isa);
    });
    return out;
  }
  // One padded output row (b, h) per step: code 128 (activation 0, exact zero padding) around the quantized
  // input row, whose W pixels are one run when dense.
  at::parallel_for(0, B * Hp, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, Wp * C)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / Hp, h = r % Hp - pt;
      uint8_t* o = dst + r * Wp * C;
      if (h < 0 || h >= H) {
        std::memset(o, 128, Wp * C);
        continue;
      }
      std::memset(o, 128, pl * C);
      std::memset(o + (pl + W) * C, 128, pr * C);
      const float* s = src + (b * H + h) * W * ps;
      if (ps == C) {
        cpu::quantize_u8(s, W * C, inv, o + pl * C, isa);
      } else {
        for (int64_t w = 0; w < W; ++w) cpu::quantize_u8(s + w * ps, C, inv, o + (pl + w) * C, isa);
      }
    }
  });
  return out;
}

at::Tensor qconv2d_u8_cpu(const at::Tensor& xq, const at::Tensor& w_c4, const at::Tensor& wsum,
                          const at::Tensor& w_scale, const at::Tensor& a_scale, const at::Tensor& group_index,
                          const c10::optional<at::Tensor>& bias, int64_t bits, int64_t out_channels,
                          int64_t in_channels, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t isa_id,
                          const c10::optional<at::Tensor>& row_bias, const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(xq.device().is_cpu() && xq.scalar_type() == at::kByte && xq.dim() == 4 && xq.is_contiguous(),
              "qconv2d_u8: expected a contiguous uint8 NHWC tensor [B, H, W, C]");
  TORCH_CHECK(xq.size(3) == in_channels, "qconv2d: input has ", xq.size(3),
              " channels, the packed weight expects ", in_channels);
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "qconv2d: kernel_size, stride, padding, dilation must have 2 entries");
  const Isa isa = resolve_isa(isa_id);
  const int64_t kh = kernel_size[0], kw = kernel_size[1], C = in_channels;
  const int64_t K = kh * kw * C;
  const PackedW pw = check_packed(w_c4, wsum, bits, out_channels, K);
  const int64_t B = xq.size(0), H = xq.size(1), W = xq.size(2);
  const int64_t sh = stride[0], sw = stride[1], ph = padding[0], pwd = padding[1], dh = dilation[0], dw = dilation[1];
  const int64_t Ho = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  const int64_t Wo = (W + 2 * pwd - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(Ho > 0 && Wo > 0, "qconv2d: output would be empty for input ", H, "x", W);
  std::vector<float> scale, bvec;
  epilogue_vectors(act_scale(a_scale, group_index), w_scale, bias, out_channels, scale, bvec);
  auto y = at::empty({B, Ho, Wo, out_channels}, xq.options().dtype(at::kFloat));
  const uint8_t* xp = xq.data_ptr<uint8_t>();
  const int64_t M = B * Ho * Wo;
  const int64_t row_bytes = pw.kg * 4;
  const bool direct = kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pwd == 0 && row_bytes == C;
  auto fill = [&](int64_t m0, int64_t rows, uint8_t* buf, int64_t* lda) -> const uint8_t* {
    if (direct) {
      *lda = C;
      return xp + m0 * C;
    }
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = m0 + i;
      const int64_t b = r / (Ho * Wo), oh = (r / Wo) % Ho, ow = r % Wo;
      uint8_t* dst = buf + i * row_bytes;
      for (int64_t u = 0; u < kh; ++u) {
        const int64_t ih = oh * sh - ph + u * dh;
        for (int64_t v = 0; v < kw; ++v, dst += C) {
          const int64_t iw = ow * sw - pwd + v * dw;
          if (ih < 0 || ih >= H || iw < 0 || iw >= W) {
            std::memset(dst, 128, C);  // u8 128 == activation 0: exact zero padding
          } else {
            std::memcpy(dst, xp + ((b * H + ih) * W + iw) * C, C);
          }
        }
      }
      std::memset(dst, 128, row_bytes - K);
    }
    *lda = row_bytes;
    return buf;
  };
  const ConvExtras extras(row_bias, residual, B, out_channels, Ho, Wo);
  float* yp = y.data_ptr<float>();
  const float* bp = bvec.empty() ? nullptr : bvec.data();
  if (extras.any()) {
    run_gemm(M, pw, isa, scale.data(), bp, yp, fill, [&](int64_t m0, int64_t rows, int64_t n0, int64_t nc) {
      extras.apply(yp, out_channels, Ho * Wo, m0, rows, n0, nc);
    });
  } else {
    run_gemm(M, pw, isa, scale.data(), bp, yp, fill);
  }
  return y.permute({0, 3, 1, 2});  // [B, N, Ho, Wo] view, channels_last memory
}

at::Tensor qconv2d_cpu(const at::Tensor& x, const at::Tensor& w_c4, const c10::optional<at::Tensor>& wsum,
                       const at::Tensor& w_scale, const at::Tensor& a_scale, const at::Tensor& group_index,
                       const c10::optional<at::Tensor>& bias, int64_t bits, int64_t out_channels,
                       int64_t in_channels, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t isa_id,
                       const c10::optional<at::Tensor>& row_bias, const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 4, "qconv2d: expected a 4-D input [B, C, H, W], got ", x.dim(), " dims");
  TORCH_CHECK(x.size(1) == in_channels, "qconv2d: input has ", x.size(1), " channels, the packed weight expects ",
              in_channels);
  TORCH_CHECK(wsum && wsum->defined(), "qconv2d on the CPU needs w_sum from prepack_c4");
  auto xq = quantize_nhwc_u8_cpu(x, a_scale, group_index, isa_id, {});
  auto y = qconv2d_u8_cpu(xq, w_c4, *wsum, w_scale, a_scale, group_index, bias, bits, out_channels, in_channels,
                          kernel_size, stride, padding, dilation, isa_id, row_bias, residual);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor qlinear_cpu(const at::Tensor& x, const at::Tensor& w_c4, const c10::optional<at::Tensor>& wsum,
                       const at::Tensor& w_scale,
                       const at::Tensor& a_scale, const at::Tensor& group_index, const c10::optional<at::Tensor>& bias,
                       int64_t bits, int64_t out_features, int64_t in_features, int64_t isa_id) {
  check_cpu_float_input(x);
  TORCH_CHECK(wsum && wsum->defined(), "qlinear on the CPU needs w_sum from prepack_c4");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "qlinear: input has ", x.size(-1),
              " features, the packed weight expects ", in_features);
  const Isa isa = resolve_isa(isa_id);
  const PackedW pw = check_packed(w_c4, *wsum, bits, out_features, in_features);
  const float as = act_scale(a_scale, group_index);
  const float inv = 1.0f / as;
  std::vector<float> scale, bvec;
  epilogue_vectors(as, w_scale, bias, out_features, scale, bvec);
  auto x2 = x.reshape({-1, in_features}).to(at::kFloat).contiguous();
  const int64_t M = x2.size(0), K = in_features;
  auto y = at::empty({M, out_features}, x2.options());
  const float* xp = x2.data_ptr<float>();
  const int64_t row_bytes = pw.kg * 4;
  auto fill = [&](int64_t m0, int64_t rows, uint8_t* buf, int64_t* lda) -> const uint8_t* {
    for (int64_t i = 0; i < rows; ++i) {
      uint8_t* dst = buf + i * row_bytes;
      cpu::quantize_u8(xp + (m0 + i) * K, K, inv, dst, isa);
      std::memset(dst + K, 128, row_bytes - K);
    }
    *lda = row_bytes;
    return buf;
  };
  if (M > 0) run_gemm(M, pw, isa, scale.data(), bvec.empty() ? nullptr : bvec.data(), y.data_ptr<float>(), fill);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  auto out = y.reshape(shape);
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(tgpq, CPU, m) {
  m.impl("quantize_nhwc_u8", &quantize_nhwc_u8_cpu);
  m.impl("qconv2d_u8", &qconv2d_u8_cpu);
  m.impl("qconv2d", &qconv2d_cpu);
  m.impl("qlinear", &qlinear_cpu);
}

}  // namespace tgpq
