// CPU kernels of the packing ops and of the canonical activation quantization (schemas: library.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/reference.h"
#include "layout/pack_c4.h"
#include "layout/pack_int4.h"
#include "op_args.h"

namespace tgpq {
namespace {

at::Tensor pack_int4_cpu(const at::Tensor& q) {
  TORCH_CHECK(q.dim() == 2, "pack_int4: expected a 2-D int8 tensor [N, K], got ", q.dim(), " dims");
  TORCH_CHECK(q.scalar_type() == at::kChar, "pack_int4: expected int8, got ", q.scalar_type());
  auto qc = q.contiguous();
  const int64_t n = qc.size(0), k = qc.size(1);
  auto out = at::empty({n, int4_packed_cols(k)}, qc.options());
  TORCH_CHECK(pack_int4(qc.data_ptr<int8_t>(), n, k, out.data_ptr<int8_t>()),
              "pack_int4: values must lie in [-8, 7] for int4 packing");
  return out;
}

at::Tensor unpack_int4_cpu(const at::Tensor& packed, int64_t k) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kChar,
              "unpack_int4: expected int8 [N, ceil(K/2)]");
  TORCH_CHECK(packed.size(1) == int4_packed_cols(k), "unpack_int4: packed has ", packed.size(1),
              " columns, expected ceil(", k, "/2) = ", int4_packed_cols(k));
  auto pc = packed.contiguous();
  auto out = at::empty({pc.size(0), k}, pc.options());
  unpack_int4(pc.data_ptr<int8_t>(), pc.size(0), k, out.data_ptr<int8_t>());
  return out;
}

// Symmetric int8 quantization with the scale of the current group (numerics contract).
at::Tensor quantize_act_cpu(const at::Tensor& x, const at::Tensor& a_scale, const at::Tensor& group_index) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "quantize_act: input must be float32, bfloat16 or float16, got ", x.scalar_type());
  const float s = read_act_scale(a_scale, group_index);
  auto xf = x.to(at::kFloat).contiguous();
  auto out = at::empty(xf.sizes(), xf.options().dtype(at::kChar));
  quantize_act_f32(xf.data_ptr<float>(), xf.numel(), 1.0f / s, out.data_ptr<int8_t>());
  return out;
}

// Canonical packed weight -> the microkernels' c4 blocks and the zero-point sums (once per layer).
std::tuple<at::Tensor, at::Tensor> prepack_c4_cpu(const at::Tensor& w_packed, int64_t bits, int64_t k) {
  TORCH_CHECK(w_packed.dim() == 2 && w_packed.scalar_type() == at::kChar,
              "prepack_c4: expected the canonical int8 packed weight [N, K or ceil(K/2)]");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  at::Tensor q;
  if (bits == 8) {
    TORCH_CHECK(w_packed.size(1) == k, "prepack_c4: weight has K=", w_packed.size(1), ", expected ", k);
    q = w_packed.contiguous();
  } else {
    q = unpack_int4_cpu(w_packed, k);  // transient int8 copy for the repacking; the kernels keep int4 bytes
  }
  const int64_t n = q.size(0);
  const int64_t nb = (n + cpu::kBlockN - 1) / cpu::kBlockN;
  auto out = at::empty({nb, cpu::packed_block_bytes(k, static_cast<int>(bits))}, q.options());
  auto wsum = at::empty({nb * cpu::kBlockN}, q.options().dtype(at::kInt));
  cpu::pack_weight_c4(q.data_ptr<int8_t>(), n, k, static_cast<int>(bits), out.data_ptr<int8_t>(),
                      wsum.data_ptr<int32_t>());
  return {out, wsum};
}

}  // namespace

TORCH_LIBRARY_IMPL(tgpq, CPU, m) {
  m.impl("pack_int4", &pack_int4_cpu);
  m.impl("unpack_int4", &unpack_int4_cpu);
  m.impl("quantize_act", &quantize_act_cpu);
  m.impl("prepack_c4", &prepack_c4_cpu);
}

}  // namespace tgpq
