// torch.library schemas of every tgpq op (defined once here), the packing kernels, and the
// Python module init of tgpq._C. Device kernels live beside this file (cpu_ops.cpp) and in csrc/cuda/.
// The Python side (tgpq/ops.py) registers fake kernels so torch.compile can trace them.
#include <torch/library.h>
#include <ATen/ATen.h>

#include "cpu/qgemm.h"
#include "pack.h"
#include "act_scale.h"

namespace tgpq {

at::Tensor unpack_int4_cpu(const at::Tensor& packed, int64_t k);

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

// Symmetric int8 quantization with the scale of the current group (numerics contract).
at::Tensor quantize_act_cpu(const at::Tensor& x, const at::Tensor& a_scale, const at::Tensor& group_index) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "quantize_act: input must be float32 or bfloat16, got ", x.scalar_type());
  const float s = read_act_scale(a_scale, group_index);
  auto xf = x.to(at::kFloat).contiguous();
  auto out = at::empty(xf.sizes(), xf.options().dtype(at::kChar));
  quantize_act_f32(xf.data_ptr<float>(), xf.numel(), 1.0f / s, out.data_ptr<int8_t>());
  return out;
}

}  // namespace

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


TORCH_LIBRARY(tgpq, m) {
  m.def("pack_int4(Tensor q) -> Tensor");
  m.def("unpack_int4(Tensor packed, int k) -> Tensor");
  m.def("quantize_act(Tensor x, Tensor a_scale, Tensor group_index) -> Tensor");
  m.def(
      "qlinear(Tensor x, Tensor w_packed, Tensor w_scale, Tensor a_scale, Tensor group_index, "
      "Tensor? bias, int bits, int in_features) -> Tensor");
  m.def(
      "qconv2d(Tensor x, Tensor w_packed, Tensor w_scale, Tensor a_scale, Tensor group_index, "
      "Tensor? bias, int bits, int in_channels, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation) -> Tensor");
}

TORCH_LIBRARY_IMPL(tgpq, CPU, m) {
  m.impl("pack_int4", &pack_int4_cpu);
  m.impl("unpack_int4", &unpack_int4_cpu);
  m.impl("quantize_act", &quantize_act_cpu);
}

}  // namespace tgpq

// Importing tgpq._C loads this library and runs the registrations above.
#include <Python.h>
static struct PyModuleDef tgpq_c_module = {PyModuleDef_HEAD_INIT, "_C", "tgpq C++ ops", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&tgpq_c_module); }
