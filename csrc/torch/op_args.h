// Argument checks shared by the CPU ops: the activation scale of the current timestep group (read on
// the host) and the ISA path the caller chose.
#pragma once
#include <ATen/ATen.h>

#include "cpu/isa.h"

namespace tgpq {

// a_scale: non-empty 1-D float32 table; group_index: one integer element in [0, a_scale.numel()).
inline float read_act_scale(const at::Tensor& a_scale, const at::Tensor& group_index) {
  TORCH_CHECK(a_scale.dim() == 1 && a_scale.scalar_type() == at::kFloat && a_scale.numel() > 0,
              "a_scale must be a non-empty 1-D float32 table");
  TORCH_CHECK(group_index.numel() == 1, "group_index must hold one element");
  const int64_t g = group_index.item<int64_t>();
  TORCH_CHECK(g >= 0 && g < a_scale.numel(), "group index ", g, " is outside the scale table of ",
              a_scale.numel(), " groups");
  return a_scale[g].item<float>();
}

// The `isa` / `variant` argument of a CPU op: -1 = the best this CPU supports; 0 scalar, 1 avx2,
// 2 avx512vnni (an unsupported one errors).
inline cpu::Isa resolve_isa(int64_t isa) {
  if (isa < 0) return cpu::best_isa();
  TORCH_CHECK(isa <= 2, "cpu backend: unknown isa id ", isa, " (0 scalar, 1 avx2, 2 avx512vnni)");
  const cpu::Isa i = static_cast<cpu::Isa>(isa);
  TORCH_CHECK(cpu::isa_supported(i), "cpu backend: this CPU does not support the ", cpu::isa_name(i), " path");
  return i;
}

// float32, bfloat16 or float16 activations (computed in float32; outputs in the input's dtype).
inline void check_cpu_float_input(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "cpu backend: input must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "cpu backend: input must be float32, bfloat16 or float16, got ", x.scalar_type());
}

// The distance between consecutive pixels' channel vectors when x [B, C, H, W] stores every pixel's C values
// contiguously at a uniform pixel stride >= C (channels_last, or a channel slice of it); -1 otherwise. Strides
// of size-1 dimensions say nothing about the layout and are not read.
inline int64_t pixel_stride(const at::Tensor& x) {
  const int64_t C = x.size(1);
  if (C > 1 && x.stride(1) != 1) return -1;
  int64_t ps = -1, span = 1;  // span: pixels covered by the dimensions checked so far
  for (int d : {3, 2, 0}) {
    if (x.size(d) == 1) continue;
    if (ps < 0) ps = x.stride(d);
    if (x.stride(d) != ps * span) return -1;
    span *= x.size(d);
  }
  if (ps < 0) return C;  // a single pixel
  return ps >= C ? ps : -1;
}

// x [B, C, H, W] float32/bfloat16/float16 as float32 NHWC rows: pixel p's C values at x + p * ld, read in place
// where x is float32 at a uniform pixel stride (channels_last, or a channel slice of it), else from a
// channels_last float32 copy that `owner` keeps alive.
struct NhwcRows {
  at::Tensor owner;
  const float* x;
  int64_t ld, C;
};
inline NhwcRows nhwc_rows(const at::Tensor& x) {
  NhwcRows r;
  r.owner = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  r.C = x.size(1);
  r.ld = pixel_stride(r.owner);
  if (r.ld < 0) {
    r.owner = r.owner.contiguous(at::MemoryFormat::ChannelsLast);
    r.ld = r.C;
  }
  r.x = r.owner.data_ptr<float>();
  return r;
}

}  // namespace tgpq
