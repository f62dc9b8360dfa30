// The activation scale of the current timestep group, read on the host (CPU ops only).
#pragma once
#include <ATen/ATen.h>

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

}  // namespace tgpq
