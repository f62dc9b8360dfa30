// torch bindings of the CUDA ops in this folder: TORCH_LIBRARY_IMPL(tgpq, CUDA, ...).
// Built only when a CUDA toolkit and a CUDA build of torch are present (setup.py adds
// csrc/cuda/*.cu and csrc/cuda/*_binding.cpp then). Schemas live in csrc/torch/library.cpp:
//   pack_int4(Tensor q) -> Tensor
//   unpack_int4(Tensor packed, int k) -> Tensor
//   quantize_act(Tensor x, Tensor a_scale, Tensor group_index) -> Tensor
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

extern "C" int tgpq_pack_int4(const int8_t* q, int8_t* out, int64_t n, int64_t k, int* out_of_range,
                              cudaStream_t stream);
extern "C" int tgpq_unpack_int4(const int8_t* packed, int8_t* q, int64_t n, int64_t k, cudaStream_t stream);
extern "C" int tgpq_quantize_act_f16(const void* x, int8_t* out, int64_t n, const float* a_scale,
                                     const void* group_index, int index_is_int64, int64_t num_groups,
                                     cudaStream_t stream);
extern "C" int tgpq_quantize_act_bf16(const void* x, int8_t* out, int64_t n, const float* a_scale,
                                      const void* group_index, int index_is_int64, int64_t num_groups,
                                      cudaStream_t stream);

namespace tgpq {
namespace {

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, what, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

at::Tensor pack_int4_cuda(const at::Tensor& q) {
  TORCH_CHECK(q.dim() == 2, "pack_int4: expected a 2-D int8 tensor [N, K], got ", q.dim(), " dims");
  TORCH_CHECK(q.scalar_type() == at::kChar, "pack_int4: expected int8, got ", q.scalar_type());
  c10::cuda::CUDAGuard guard(q.device());
  auto qc = q.contiguous();
  const int64_t n = qc.size(0), k = qc.size(1);
  auto out = at::empty({n, (k + 1) / 2}, qc.options());
  auto flag = at::zeros({1}, qc.options().dtype(at::kInt));
  check_launch(tgpq_pack_int4(qc.data_ptr<int8_t>(), out.data_ptr<int8_t>(), n, k, flag.data_ptr<int>(),
                              c10::cuda::getCurrentCUDAStream().stream()),
               "pack_int4");
  // load-time op: one host sync to report bad values like the CPU kernel does
  TORCH_CHECK(flag.item<int>() == 0, "pack_int4: values must lie in [-8, 7] for int4 packing");
  return out;
}

at::Tensor unpack_int4_cuda(const at::Tensor& packed, int64_t k) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kChar, "unpack_int4: expected int8 [N, ceil(K/2)]");
  TORCH_CHECK(packed.size(1) == (k + 1) / 2, "unpack_int4: packed has ", packed.size(1), " columns, expected ceil(",
              k, "/2) = ", (k + 1) / 2);
  c10::cuda::CUDAGuard guard(packed.device());
  auto pc = packed.contiguous();
  auto out = at::empty({pc.size(0), k}, pc.options());
  check_launch(tgpq_unpack_int4(pc.data_ptr<int8_t>(), out.data_ptr<int8_t>(), pc.size(0), k,
                                c10::cuda::getCurrentCUDAStream().stream()),
               "unpack_int4");
  return out;
}

at::Tensor quantize_act_cuda(const at::Tensor& x, const at::Tensor& a_scale, const at::Tensor& group_index) {
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "quantize_act: x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(a_scale.scalar_type() == at::kFloat && a_scale.dim() == 1 && a_scale.numel() >= 1,
              "quantize_act: a_scale must be a non-empty 1-D float32 tensor");
  TORCH_CHECK((group_index.scalar_type() == at::kLong || group_index.scalar_type() == at::kInt) &&
                  group_index.numel() == 1,
              "quantize_act: group_index must be one int32/int64 value");
  TORCH_CHECK(a_scale.device() == x.device() && group_index.device() == x.device(),
              "quantize_act: all tensors must be on x's device");
  c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();  // dense in x's own suggested layout would also work; contiguous is the contract
  auto sc = a_scale.contiguous();
  auto out = at::empty(xc.sizes(), xc.options().dtype(at::kChar));
  const int is64 = group_index.scalar_type() == at::kLong ? 1 : 0;
  auto fn = x.scalar_type() == at::kHalf ? tgpq_quantize_act_f16 : tgpq_quantize_act_bf16;
  check_launch(fn(xc.data_ptr(), out.data_ptr<int8_t>(), xc.numel(), sc.data_ptr<float>(), group_index.data_ptr(),
                  is64, sc.numel(), c10::cuda::getCurrentCUDAStream().stream()),
               "quantize_act");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tgpq, CUDA, m) {
  m.impl("pack_int4", &pack_int4_cuda);
  m.impl("unpack_int4", &unpack_int4_cuda);
  m.impl("quantize_act", &quantize_act_cuda);
}

}  // namespace tgpq
