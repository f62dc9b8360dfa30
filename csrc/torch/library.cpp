// Every torch.library schema of tgpq, defined once here, and the Python module init of tgpq._C.
// Implementations: CPU in pack_ops.cpp, gemm_ops.cpp, norm_ops.cpp; CUDA in csrc/cuda/ (pack_int4,
// unpack_int4, quantize_act) and, for qlinear / qconv2d, the Triton launchers registered from Python
// (tgpq/backends/triton.py). Fake kernels: tgpq/backends/library.py.
//
// Weights reach qlinear / qconv2d in the layout of the device's kernels (tgpq/layout): on the CPU the
// c4 blocks and w_sum from prepack_c4, on CUDA the canonical packed weight (w_sum None). `variant` /
// `isa` is the kernel variant the backend chose once: the ISA path on the CPU (-1 best, 0 scalar,
// 1 avx2, 2 avx512vnni), the GEMM variant on CUDA (0 tl.dot, 1 Gluon wgmma).
#include <torch/library.h>

#include <thread>
#include <vector>

#include "cpu/isa.h"
#include "cpu/peak.h"
#include "op_args.h"

namespace tgpq {
namespace {

int64_t cpu_best_isa() { return static_cast<int64_t>(cpu::best_isa()); }

// Runs `probe` on `threads` threads at once (std::thread, so each lands on its own core) and sums the rates.
template <typename Probe>
double on_threads(int64_t threads, Probe probe) {
  TORCH_CHECK(threads >= 1, "threads must be >= 1");
  std::vector<double> rate(threads, 0.0);
  std::vector<std::thread> pool;
  for (int64_t i = 0; i < threads; ++i) pool.emplace_back([&, i] { rate[i] = probe(); });
  for (auto& t : pool) t.join();
  double sum = 0.0;
  for (double r : rate) sum += r;
  return sum;
}

double cpu_fp32_peak(int64_t isa, double seconds, int64_t threads) {
  const cpu::Isa i = resolve_isa(isa);
  return on_threads(threads, [&] { return cpu::fp32_fma_peak_gmacs(i, seconds); });
}

double cpu_int8_instruction_peak(int64_t isa, int64_t bits, double seconds, int64_t threads) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  const cpu::Isa i = resolve_isa(isa);
  return on_threads(threads, [&] { return cpu::int8_instruction_peak_gmacs(i, static_cast<int>(bits), seconds); });
}

double cpu_amx_int8_peak(double seconds, int64_t threads) {
  return on_threads(threads, [&] { return cpu::amx_int8_peak_gmacs(seconds); });
}

double cpu_ukernel_peak(int64_t isa, int64_t bits, double seconds, int64_t threads) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  const cpu::Isa i = resolve_isa(isa);
  return on_threads(threads, [&] { return cpu::ukernel_peak_gmacs(i, static_cast<int>(bits), seconds); });
}
bool cpu_isa_supported(int64_t isa) { return isa >= 0 && isa <= 2 && cpu::isa_supported(static_cast<cpu::Isa>(isa)); }

}  // namespace

TORCH_LIBRARY(tgpq, m) {
  // packing (canonical int4 layout) and the canonical int8 activation quantization
  m.def("pack_int4(Tensor q) -> Tensor");
  m.def("unpack_int4(Tensor packed, int k) -> Tensor");
  m.def("quantize_act(Tensor x, Tensor a_scale, Tensor group_index) -> Tensor");
  // the quantized layers
  m.def(
      "qlinear(Tensor x, Tensor w, Tensor? w_sum, Tensor w_scale, Tensor a_scale, Tensor group_index, "
      "Tensor? bias, int bits, int out_features, int in_features, int variant) -> Tensor");
  m.def(
      "qconv2d(Tensor x, Tensor w, Tensor? w_sum, Tensor w_scale, Tensor a_scale, Tensor group_index, "
      "Tensor? bias, int bits, int out_channels, int in_channels, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int variant, Tensor? row_bias=None, Tensor? residual=None) -> Tensor");
  // the CPU kernels' layouts: c4 weights, uint8 NHWC activations (zero point 128) and their producers
  m.def("prepack_c4(Tensor w_packed, int bits, int k) -> (Tensor, Tensor)");
  m.def("quantize_nhwc_u8(Tensor x, Tensor a_scale, Tensor group_index, int isa, int[] pad=[]) -> Tensor");
  m.def(
      "qconv2d_u8(Tensor xq, Tensor w_c4, Tensor wsum, Tensor w_scale, Tensor a_scale, Tensor group_index, "
      "Tensor? bias, int bits, int out_channels, int in_channels, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int isa, Tensor? row_bias=None, Tensor? residual=None) -> Tensor");
  m.def(
      "groupnorm_silu_quantize(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, bool silu, "
      "Tensor a_scale, Tensor group_index, int isa, Tensor? row_bias=None) -> Tensor");
  m.def(
      "groupnorm_silu_quantize_split(Tensor[] xs, int num_groups, Tensor? weight, Tensor? bias, float eps, bool silu, "
      "Tensor[] a_scales, Tensor[] group_indices, int isa, Tensor? row_bias, Tensor[] plain_a_scales, "
      "Tensor[] plain_group_indices) -> Tensor[]");
  // what this CPU can run, and its ceilings (GMAC/s summed over `threads` threads, each for `seconds`)
  m.def("cpu_best_isa() -> int", &cpu_best_isa);
  m.def("cpu_isa_supported(int isa) -> bool", &cpu_isa_supported);
  m.def("cpu_fp32_peak(int isa, float seconds, int threads) -> float", &cpu_fp32_peak);
  m.def("cpu_amx_int8_peak(float seconds, int threads) -> float", &cpu_amx_int8_peak);
  m.def("cpu_ukernel_peak(int isa, int bits, float seconds, int threads) -> float", &cpu_ukernel_peak);
  m.def("cpu_int8_instruction_peak(int isa, int bits, float seconds, int threads) -> float",
        &cpu_int8_instruction_peak);
}

}  // namespace tgpq

// Importing tgpq._C loads this library and runs the registrations of every op file linked into it.
#include <Python.h>
static struct PyModuleDef tgpq_c_module = {PyModuleDef_HEAD_INIT, "_C", "tgpq C++ ops", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&tgpq_c_module); }
