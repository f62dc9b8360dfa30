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

}  // namespace tgpq
