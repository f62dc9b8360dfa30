// Fast cpu backend ops over weights repacked once into the microkernels' c4 layout (csrc/cpu/ukernel.h).
//
//   cpu_prepack(w_packed, bits, k) -> (w_c4, wsum)       once per layer, at convert/load time
//   cpu_quantize_nhwc(x, a_scale, group_index, isa)     float [B,C,H,W] (any layout) -> u8 [B,H,W,C]
//   cpu_qconv2d_u8(xq, ..., row_bias, residual)         u8 NHWC -> float32 channels_last [B,N,Ho,Wo],
//                                                        optional per-image bias and residual added in cache
//   cpu_qconv2d(x, ...)                                  quantize_nhwc + qconv2d_u8
//   cpu_qlinear(x, ...)                                  [..., K] float -> [..., N] float32, the
//                                                        quantization fused into the A packing
// `isa`: -1 = the best this CPU supports; 0 scalar, 1 avx2, 2 avx512vnni (an unsupported one errors).
// Threads: at::parallel_for over (row block, column group) tasks; each task packs its own A block
// (im2col of the u8 input, or quantize-on-pack for linear) into a thread-local buffer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/ukernel.h"
#include "act_scale.h"

namespace tgpq {
namespace {

using cpu::Isa;

constexpr int64_t kRowBlock = 64;  // rows of A packed per task step

Isa resolve_isa(int64_t isa) {
  if (isa < 0) return cpu::best_isa();
  TORCH_CHECK(isa <= 2, "cpu backend: unknown isa id ", isa, " (0 scalar, 1 avx2, 2 avx512vnni)");
  const Isa i = static_cast<Isa>(isa);
  TORCH_CHECK(cpu::isa_supported(i), "cpu backend: this CPU does not support the ", cpu::isa_name(i), " path");
  return i;
}

float act_scale(const at::Tensor& a_scale, const at::Tensor& group_index) {
  const float s = read_act_scale(a_scale, group_index);
  TORCH_CHECK(s > 0.0f, "activation scale must be positive, got ", s);
  return s;
}

struct PackedW {
  const int8_t* w;
  const int32_t* wsum;
  int64_t n, k, kg, bstride;
  int bits;
};

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

// Runs y[M, N] = epilogue(A @ W^T) where fill(m0, rows, buf, &lda) provides A rows [m0, m0+rows)
// (packing them into buf, kg*4 bytes per row, or returning a direct pointer), then
// post(m0, rows, n0, nc) on the block just written (still in cache).
struct NoPost {
  void operator()(int64_t, int64_t, int64_t, int64_t) const {}
};

template <typename Fill, typename Post = NoPost>
void run_gemm(int64_t M, const PackedW& pw, Isa isa, const float* scale, const float* bias, float* y,
              Fill fill, Post post = Post()) {
  const cpu::UKernel uk = cpu::select_ukernel(isa, pw.bits);
  const int64_t N = pw.n;
  const int64_t row_blocks = (M + kRowBlock - 1) / kRowBlock;
  // Split the columns when there are too few row blocks to keep every thread busy.
  const int64_t threads = at::get_num_threads();
  const int64_t col_tiles = (N + uk.nr - 1) / uk.nr;
  int64_t col_groups = 1;
  while (row_blocks * col_groups < 4 * threads && col_groups < col_tiles) ++col_groups;
  const int64_t tiles_per_group = (col_tiles + col_groups - 1) / col_groups;
  const int64_t row_bytes = pw.kg * 4;
  at::parallel_for(0, row_blocks * col_groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> buf(static_cast<size_t>(kRowBlock * row_bytes));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rb = task / col_groups, cgi = task % col_groups;
      const int64_t m0 = rb * kRowBlock, rows = std::min(kRowBlock, M - m0);
      const int64_t n0 = cgi * tiles_per_group * uk.nr;
      if (n0 >= N) continue;
      const int64_t nc = std::min(N - n0, tiles_per_group * uk.nr);
      int64_t lda = row_bytes;
      const uint8_t* a = fill(m0, rows, buf.data(), &lda);
      cpu::gemm_block(uk, rows, n0, nc, pw.kg, a, lda, pw.w, pw.bstride, pw.wsum, scale, bias,
                      y + m0 * N + n0, N);
      post(m0, rows, n0, nc);
    }
  });
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

std::tuple<at::Tensor, at::Tensor> cpu_prepack(const at::Tensor& w_packed, int64_t bits, int64_t k) {
  TORCH_CHECK(w_packed.dim() == 2 && w_packed.scalar_type() == at::kChar,
              "cpu_prepack: expected the canonical int8 packed weight [N, K or ceil(K/2)]");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  at::Tensor q;
  if (bits == 8) {
    TORCH_CHECK(w_packed.size(1) == k, "cpu_prepack: weight has K=", w_packed.size(1), ", expected ", k);
    q = w_packed.contiguous();
  } else {
    // Transient int8 copy for the repacking only; the kernels keep the int4 bytes.
    q = at::empty({w_packed.size(0), k}, w_packed.options());
    auto pc = w_packed.contiguous();
    TORCH_CHECK(pc.size(1) == (k + 1) / 2, "cpu_prepack: int4 weight has ", pc.size(1), " columns, expected ",
                (k + 1) / 2);
    const uint8_t* src = reinterpret_cast<const uint8_t*>(pc.data_ptr<int8_t>());
    int8_t* dst = q.data_ptr<int8_t>();
    for (int64_t r = 0; r < pc.size(0); ++r)
      for (int64_t c = 0; c < k; ++c) {
        const uint8_t byte = src[r * pc.size(1) + c / 2];
        const int nib = (c & 1) ? (byte >> 4) : (byte & 0x0F);
        dst[r * k + c] = static_cast<int8_t>(nib >= 8 ? nib - 16 : nib);
      }
  }
  const int64_t n = q.size(0);
  const int64_t nb = (n + cpu::kBlockN - 1) / cpu::kBlockN;
  auto out = at::empty({nb, cpu::packed_block_bytes(k, static_cast<int>(bits))}, q.options());
  auto wsum = at::empty({nb * cpu::kBlockN}, q.options().dtype(at::kInt));
  cpu::pack_weight_c4(q.data_ptr<int8_t>(), n, k, static_cast<int>(bits), out.data_ptr<int8_t>(),
                      wsum.data_ptr<int32_t>());
  return {out, wsum};
}

at::Tensor cpu_quantize_nhwc(const at::Tensor& x, const at::Tensor& a_scale, const at::Tensor& group_index,
                             int64_t isa_id) {
  TORCH_CHECK(x.device().is_cpu(), "cpu backend: input must be on the CPU");
  TORCH_CHECK(x.dim() == 4, "cpu_quantize_nhwc: expected [B, C, H, W], got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "cpu backend: input must be float32 or bfloat16, got ", x.scalar_type());
  const Isa isa = resolve_isa(isa_id);
  const float inv = 1.0f / act_scale(a_scale, group_index);
  // channels_last float32 input: a flat pass; anything else is brought there first.
  auto xf = x.to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto out = at::empty({B, H, W, C}, x.options().dtype(at::kByte));
  const float* src = xf.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, xf.numel(), 1 << 15, [&](int64_t b, int64_t e) {
    cpu::quantize_u8(src + b, e - b, inv, dst + b, isa);
  });
  return out;
}

at::Tensor cpu_qconv2d_u8(const at::Tensor& xq, const at::Tensor& w_c4, const at::Tensor& wsum,
                          const at::Tensor& w_scale, const at::Tensor& a_scale, const at::Tensor& group_index,
                          const c10::optional<at::Tensor>& bias, int64_t bits, int64_t out_channels,
                          int64_t in_channels, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t isa_id,
                          const c10::optional<at::Tensor>& row_bias, const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(xq.device().is_cpu() && xq.scalar_type() == at::kByte && xq.dim() == 4 && xq.is_contiguous(),
              "cpu_qconv2d_u8: expected a contiguous uint8 NHWC tensor [B, H, W, C]");
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

at::Tensor cpu_qconv2d(const at::Tensor& x, const at::Tensor& w_c4, const at::Tensor& wsum,
                       const at::Tensor& w_scale, const at::Tensor& a_scale, const at::Tensor& group_index,
                       const c10::optional<at::Tensor>& bias, int64_t bits, int64_t out_channels,
                       int64_t in_channels, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t isa_id,
                       const c10::optional<at::Tensor>& row_bias, const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 4, "qconv2d: expected a 4-D input [B, C, H, W], got ", x.dim(), " dims");
  TORCH_CHECK(x.size(1) == in_channels, "qconv2d: input has ", x.size(1), " channels, the packed weight expects ",
              in_channels);
  auto xq = cpu_quantize_nhwc(x, a_scale, group_index, isa_id);
  auto y = cpu_qconv2d_u8(xq, w_c4, wsum, w_scale, a_scale, group_index, bias, bits, out_channels, in_channels,
                          kernel_size, stride, padding, dilation, isa_id, row_bias, residual);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor cpu_qlinear(const at::Tensor& x, const at::Tensor& w_c4, const at::Tensor& wsum, const at::Tensor& w_scale,
                       const at::Tensor& a_scale, const at::Tensor& group_index, const c10::optional<at::Tensor>& bias,
                       int64_t bits, int64_t out_features, int64_t in_features, int64_t isa_id) {
  TORCH_CHECK(x.device().is_cpu(), "cpu backend: input must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "cpu backend: input must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "qlinear: input has ", x.size(-1),
              " features, the packed weight expects ", in_features);
  const Isa isa = resolve_isa(isa_id);
  const PackedW pw = check_packed(w_c4, wsum, bits, out_features, in_features);
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

int64_t cpu_best_isa() { return static_cast<int64_t>(cpu::best_isa()); }
bool cpu_isa_supported(int64_t isa) { return isa >= 0 && isa <= 2 && cpu::isa_supported(static_cast<Isa>(isa)); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(tgpq, m) {
  m.def("cpu_best_isa() -> int", &cpu_best_isa);
  m.def("cpu_isa_supported(int isa) -> bool", &cpu_isa_supported);
  m.def("cpu_prepack(Tensor w_packed, int bits, int k) -> (Tensor, Tensor)");
  m.def("cpu_quantize_nhwc(Tensor x, Tensor a_scale, Tensor group_index, int isa) -> Tensor");
  m.def(
      "cpu_qconv2d_u8(Tensor xq, Tensor w_c4, Tensor wsum, Tensor w_scale, Tensor a_scale, Tensor group_index, "
      "Tensor? bias, int bits, int out_channels, int in_channels, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int isa, Tensor? row_bias=None, Tensor? residual=None) -> Tensor");
  m.def(
      "cpu_qconv2d(Tensor x, Tensor w_c4, Tensor wsum, Tensor w_scale, Tensor a_scale, Tensor group_index, "
      "Tensor? bias, int bits, int out_channels, int in_channels, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int isa, Tensor? row_bias=None, Tensor? residual=None) -> Tensor");
  m.def(
      "cpu_qlinear(Tensor x, Tensor w_c4, Tensor wsum, Tensor w_scale, Tensor a_scale, Tensor group_index, "
      "Tensor? bias, int bits, int out_features, int in_features, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(tgpq, CPU, m) {
  m.impl("cpu_prepack", &cpu_prepack);
  m.impl("cpu_quantize_nhwc", &cpu_quantize_nhwc);
  m.impl("cpu_qconv2d_u8", &cpu_qconv2d_u8);
  m.impl("cpu_qconv2d", &cpu_qconv2d);
  m.impl("cpu_qlinear", &cpu_qlinear);
}

}  // namespace tgpq
