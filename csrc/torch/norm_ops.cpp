// CPU kernels of groupnorm_silu_quantize and groupnorm_silu_quantize_split (schemas: library.cpp): GroupNorm
// (+ SiLU) + int8 quantization in one pass that writes the u8 NHWC tensors the next quantized convs consume
// (qconv2d_u8).
//
//   groupnorm_silu_quantize(x, num_groups, weight, bias, eps, silu, a_scale, group_index, isa)
//     x: float32/bfloat16/float16 [B, C, H, W] -> uint8 [B, H, W, C]
//     u8 = clamp(rne(silu?(gn(x)) * (1 / a_scale[g])), -127, 127) + 128
//   plain_a_scales / plain_group_indices (optional, split op): also the plain quantization of the input as it
//     is, from the same read (the 1x1 shortcut's input), as further outputs laid out like the first ones
//   row_bias (optional, both ops): [B, C] added to the input first, gn(x + row_bias[:, :, None, None]) (a conv's
//     time-embedding add, never written out: it shifts the pilot values and folds into the affine offset)
//   groupnorm_silu_quantize_split(xs, num_groups, weight, bias, eps, silu, a_scales, group_indices, isa)
//     the same GroupNorm over the channel concatenation cat(xs, dim=1), never materialised (a skip connection's
//     two halves, whose groups may straddle the boundary); part i is quantized with a_scales[i] and written
//     as its own uint8 [B, H, W, C_i] (the input of part i of a split conv); with a single scale table, all
//     parts are quantized with it into one uint8 [B, H, W, sum C_i] (a plain conv's input).
// Inputs are read as NHWC rows: channels_last tensors, and channel slices of one (a view of a concatenation),
// without a copy; other layouts are made channels_last first.
// Statistics: per (batch, group) mean and biased variance in one pass: per channel, float sums of x - p and
// (x - p)^2 over 64-row chunks (p: the channel's value in the image's first row, against cancellation),
// added in double; then the group's mean and centered sum of squares follow exactly. The normalised value is
// x * A[c] + B[c] with A = rstd * weight[c], B = bias[c] - mean * A (one fma), then the row pass
// cpu::norm_silu_quantize_row (cpu/ukernel_*.cpp). The result differs from torch's GroupNorm + SiLU by
// a few float32 ulps, which moves a quantized value by one step only when v / a_scale lies within
// ~1e-6 of a rounding boundary. Work is split by image when there are at least as many images as threads
// (statistics and normalisation of an image then run back to back, while it is in cache), else by rows.
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
constexpr int64_t kChunk = 64;  // rows per float partial sum

// Where one part's quantized rows go: row r at out + r * ldo (out null: not written), with scale 1 / inv.
struct Dest {
  uint8_t* out = nullptr;
  int64_t ldo = 0;
  float inv = 0.0f;
};

// One input part: pixel (b, r) of it at rows.x + (b * HW + r) * rows.ld, channels [off, off + C) of the
// concatenation; its normalised rows go to `norm`, its plain quantization (of x as it is) to `plain`.
struct Part {
  NhwcRows rows;
  int64_t off;
  Dest norm, plain;
};

// The outputs of one kind: with one scale table per part an output per part [B, H, W, C_i]; with a single
// table, for several parts, one output [B, H, W, C] of every part's channels. Sets each part's `which`.
std::vector<at::Tensor> make_outputs(std::vector<Part>& parts, at::TensorList scales, at::TensorList groups,
                                     Dest Part::*which, at::IntArrayRef bhw, int64_t C, const at::TensorOptions& opt) {
  const bool joined = scales.size() == 1 && parts.size() > 1;
  TORCH_CHECK((joined || scales.size() == parts.size()) && groups.size() == scales.size(), "groupnorm_silu_quantize: ",
              parts.size(), " inputs need one activation scale table and group index, or one per input; got ",
              scales.size(), " and ", groups.size());
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < parts.size(); ++i) {
    Part& p = parts[i];
    Dest& d = p.*which;
    d.inv = 1.0f / read_act_scale(scales[joined ? 0 : i], groups[joined ? 0 : i]);
    if (joined) {
      if (outs.empty()) outs.push_back(at::empty({bhw[0], bhw[1], bhw[2], C}, opt));
      d.out = outs[0].data_ptr<uint8_t>() + p.off;
      d.ldo = C;
    } else {
      outs.push_back(at::empty({bhw[0], bhw[1], bhw[2], p.rows.C}, opt));
      d.out = outs.back().data_ptr<uint8_t>();
      d.ldo = p.rows.C;
    }
  }
  return outs;
}

struct Norm {
  std::vector<Part> parts;
  int64_t B, HW, C, G, chunks;
  const float *w, *bias;
  const float* row_bias = nullptr;  // [B, C] added to the input before the norm, or null
  double eps;
  bool silu;
  Isa isa;
  std::vector<float> psum, psq, A, Bv;  // [B * chunks * C] partial sums; [B * C] fused affine

  void chunk_stats(int64_t b, int64_t k) {
    const int64_t r0 = k * kChunk, rows = std::min(kChunk, HW - r0);
    float* s = &psum[(b * chunks + k) * C];
    float* q = &psq[(b * chunks + k) * C];
    for (const Part& p : parts) {
      const float* xb = p.rows.x + b * HW * p.rows.ld;
      cpu::norm_stats_rows(xb + r0 * p.rows.ld, rows, p.rows.C, p.rows.ld, xb, s + p.off, q + p.off, isa);
    }
  }

  void affine(int64_t b) {  // A, B of image b from its chunks' sums, per group over the concatenated channels
    std::vector<double> s1(C, 0.0), s2(C, 0.0);
    std::vector<double> pilot(C);  // of x + row_bias: the sums of x - p are those of (x + rb) - (p + rb)
    for (const Part& p : parts)
      for (int64_t c = 0; c < p.rows.C; ++c) pilot[p.off + c] = p.rows.x[b * HW * p.rows.ld + c];
    if (row_bias)
      for (int64_t c = 0; c < C; ++c) pilot[c] += row_bias[b * C + c];
    for (int64_t k = 0; k < chunks; ++k)
      for (int64_t c = 0; c < C; ++c) {
        s1[c] += psum[(b * chunks + k) * C + c];
        s2[c] += psq[(b * chunks + k) * C + c];
      }
    const int64_t Cg = C / G;
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
        const double a = rstd * w[c];
        A[b * C + c] = static_cast<float>(a);
        // a * (x + rb) + bias - mean * a, with a * rb folded into the offset
        Bv[b * C + c] = static_cast<float>(row_bias ? bias[c] + (row_bias[b * C + c] - mean) * a : bias[c] - mean * a);
      }
    }
  }

  void rows(int64_t r0, int64_t r1) {  // flat pixel rows b * HW + r
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / HW;
      for (const Part& p : parts) {
        const float* xr = p.rows.x + r * p.rows.ld;
        cpu::norm_silu_quantize_row(xr, &A[b * C + p.off], &Bv[b * C + p.off], p.rows.C, silu, p.norm.inv,
                                    p.norm.out + r * p.norm.ldo, isa);
        if (p.plain.out) cpu::quantize_u8(xr, p.rows.C, p.plain.inv, p.plain.out + r * p.plain.ldo, isa);
      }
    }
  }

  void run() {
    psum.assign(B * chunks * C, 0.0f);
    psq.assign(B * chunks * C, 0.0f);
    A.resize(B * C);
    Bv.resize(B * C);
    if (B >= at::get_num_threads()) {
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          for (int64_t k = 0; k < chunks; ++k) chunk_stats(b, k);
          affine(b);
          rows(b * HW, (b + 1) * HW);
        }
      });
      return;
    }
    at::parallel_for(0, B * chunks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) chunk_stats(t / chunks, t % chunks);
    });
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) affine(b);
    });
    at::parallel_for(0, B * HW, 16, [&](int64_t r0, int64_t r1) { rows(r0, r1); });
  }
};

std::vector<at::Tensor> groupnorm_silu_quantize_split_cpu(at::TensorList xs, int64_t num_groups,
                                                          const c10::optional<at::Tensor>& weight,
                                                          const c10::optional<at::Tensor>& bias, double eps, bool silu,
                                                          at::TensorList a_scales, at::TensorList group_indices,
                                                          int64_t isa_id, const c10::optional<at::Tensor>& row_bias,
                                                          at::TensorList plain_a_scales,
                                                          at::TensorList plain_group_indices) {
  TORCH_CHECK(!xs.empty(), "groupnorm_silu_quantize: no input");
  const at::Tensor& x0 = xs[0];
  Norm nm;
  int64_t C = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& x = xs[i];
    check_cpu_float_input(x);
    TORCH_CHECK(x.dim() == 4, "groupnorm_silu_quantize: expected [B, C, H, W], got ", x.dim(), " dims");
    TORCH_CHECK(x.size(0) == x0.size(0) && x.size(2) == x0.size(2) && x.size(3) == x0.size(3),
                "groupnorm_silu_quantize: the parts differ in batch or spatial size: ", x0.sizes(), " vs ", x.sizes());
    nm.parts.push_back({nhwc_rows(x), C, {}, {}});
    C += x.size(1);
  }
  const int64_t B = x0.size(0), H = x0.size(2), W = x0.size(3);
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0, "groupnorm: ", C, " channels do not split into ", num_groups,
              " groups");
  for (const auto* t : {&weight, &bias}) {
    if (*t && (*t)->defined())
      TORCH_CHECK((*t)->dim() == 1 && (*t)->numel() == C && (*t)->is_floating_point(),
                  "groupnorm affine parameters must be floating [", C, "]");
  }
  // affine parameters of a float16 / bfloat16 model are read in float32
  const auto fopt = at::TensorOptions().dtype(at::kFloat);
  at::Tensor wc = weight && weight->defined() ? weight->to(at::kFloat).contiguous() : at::ones({C}, fopt);
  at::Tensor bc = bias && bias->defined() ? bias->to(at::kFloat).contiguous() : at::zeros({C}, fopt);
  at::Tensor rbc;
  if (row_bias && row_bias->defined()) {
    TORCH_CHECK(row_bias->dim() == 2 && row_bias->size(0) == B && row_bias->size(1) == C &&
                    row_bias->is_floating_point(),
                "groupnorm_silu_quantize: row_bias must be floating [", B, ", ", C, "], got ", row_bias->sizes());
    rbc = row_bias->to(at::kFloat).contiguous();
    nm.row_bias = rbc.data_ptr<float>();
  }
  const auto u8 = x0.options().dtype(at::kByte);
  std::vector<at::Tensor> outs = make_outputs(nm.parts, a_scales, group_indices, &Part::norm, {B, H, W}, C, u8);
  if (!plain_a_scales.empty()) {
    std::vector<at::Tensor> plain =
        make_outputs(nm.parts, plain_a_scales, plain_group_indices, &Part::plain, {B, H, W}, C, u8);
    outs.insert(outs.end(), plain.begin(), plain.end());
  }
  nm.B = B;
  nm.HW = H * W;
  nm.C = C;
  nm.G = num_groups;
  nm.chunks = (nm.HW + kChunk - 1) / kChunk;
  nm.w = wc.data_ptr<float>();
  nm.bias = bc.data_ptr<float>();
  nm.eps = eps;
  nm.silu = silu;
  nm.isa = resolve_isa(isa_id);
  if (B * nm.HW > 0) nm.run();
  return outs;
}

at::Tensor groupnorm_silu_quantize_cpu(const at::Tensor& x, int64_t num_groups, const c10::optional<at::Tensor>& weight,
                                       const c10::optional<at::Tensor>& bias, double eps, bool silu,
                                       const at::Tensor& a_scale, const at::Tensor& group_index, int64_t isa_id,
                                       const c10::optional<at::Tensor>& row_bias) {
  return groupnorm_silu_quantize_split_cpu({x}, num_groups, weight, bias, eps, silu, {a_scale}, {group_index},
                                           isa_id, row_bias, {}, {})[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(tgpq, CPU, m) {
  m.impl("groupnorm_silu_quantize", &groupnorm_silu_quantize_cpu);
  m.impl("groupnorm_silu_quantize_split", &groupnorm_silu_quantize_split_cpu);
}

}  // namespace tgpq
