// Fused per-timestep-group activation quantization on the GPU: fp16/bf16 -> int8.
//
//   g   = clamp(group_index[0], 0, num_groups - 1)        (read on the device: no host sync)
//   inv = 1 / a_scale[g]                                   (correctly rounded, __frcp_rn)
//   q   = clamp(round_half_even(float(x) * inv), -127, 127) as int8
//
// Bit-exact with tgpq.numerics.quantize_act and the Triton kernels' A-load quantization.
// Layout: x and out are dense with n elements (any shape, same element order). The main kernel
// moves 8 elements per thread: one 16-byte load (LDG.E.128) and one 8-byte store (STG.E.64);
// a scalar kernel handles a tail (n % 8) or unaligned pointers.
//
// Plain CUDA with an extern "C" launcher (no torch headers), so nvcc can build and inspect it
// alone; csrc/cuda/cuda_ops_binding.cpp wraps it for torch where a CUDA build of torch exists.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ int quantize_one(float v, float inv) {
  float s = __fmul_rn(v, inv);                  // no FMA contraction: matches x * inv in fp32
  s = fminf(fmaxf(s, -127.0f), 127.0f);         // clamp first (integer bounds: same as after rounding)
  return __float2int_rn(s);                     // round half to even
}

__device__ __forceinline__ float load_inv(const float* a_scale, const void* group_index,
                                          int index_is_int64, int64_t num_groups) {
  int64_t g = index_is_int64 ? *static_cast<const int64_t*>(group_index)
                             : static_cast<int64_t>(*static_cast<const int32_t*>(group_index));
  g = g < 0 ? 0 : (g >= num_groups ? num_groups - 1 : g);
  return __frcp_rn(a_scale[g]);
}

// 8 elements per thread: 16-byte load of x, 8-byte store of out. Requires 16-byte aligned x,
// 8-byte aligned out; handles elements [0, n8 * 8).
template <typename T>
__global__ void quantize_act_vec8_kernel(const T* __restrict__ x, int8_t* __restrict__ out, int64_t n8,
                                         const float* __restrict__ a_scale, const void* __restrict__ group_index,
                                         int index_is_int64, int64_t num_groups) {
  const float inv = load_inv(a_scale, group_index, index_is_int64, num_groups);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n8; i += stride) {
    const uint4 raw = reinterpret_cast<const uint4*>(x)[i];
    const T* v = reinterpret_cast<const T*>(&raw);
    uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      lo |= (static_cast<uint32_t>(quantize_one(to_float(v[j]), inv)) & 0xFFu) << (8 * j);
      hi |= (static_cast<uint32_t>(quantize_one(to_float(v[j + 4]), inv)) & 0xFFu) << (8 * j);
    }
    reinterpret_cast<uint2*>(out)[i] = make_uint2(lo, hi);
  }
}

template <typename T>
__global__ void quantize_act_scalar_kernel(const T* __restrict__ x, int8_t* __restrict__ out, int64_t begin,
                                           int64_t n, const float* __restrict__ a_scale,
                                           const void* __restrict__ group_index, int index_is_int64,
                                           int64_t num_groups) {
  const float inv = load_inv(a_scale, group_index, index_is_int64, num_groups);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = static_cast<int8_t>(quantize_one(to_float(x[i]), inv));
  }
}

template <typename T>
int launch(const void* x, int8_t* out, int64_t n, const float* a_scale, const void* group_index,
           int index_is_int64, int64_t num_groups, cudaStream_t stream) {
  if (n <= 0) return 0;
  if (num_groups < 1) return static_cast<int>(cudaErrorInvalidValue);
  const T* xt = static_cast<const T*>(x);
  const int threads = 256;
  const bool aligned = (reinterpret_cast<uintptr_t>(x) % 16 == 0) && (reinterpret_cast<uintptr_t>(out) % 8 == 0);
  int64_t done = 0;
  if (aligned && n >= 8) {
    const int64_t n8 = n / 8;
    const int64_t blocks = (n8 + threads - 1) / threads;
    const unsigned grid = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
    quantize_act_vec8_kernel<T><<<grid, threads, 0, stream>>>(xt, out, n8, a_scale, group_index, index_is_int64,
                                                              num_groups);
    done = n8 * 8;
  }
  if (done < n) {
    const int64_t rest = n - done;
    const int64_t blocks = (rest + threads - 1) / threads;
    const unsigned grid = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
    quantize_act_scalar_kernel<T><<<grid, threads, 0, stream>>>(xt, out, done, n, a_scale, group_index,
                                                                index_is_int64, num_groups);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

// Returns a cudaError_t (0 = success). x: n fp16 (or bf16) values; out: n int8; a_scale: float32
// [num_groups]; group_index: one int64 (index_is_int64 = 1) or int32 value; all device pointers.
extern "C" int tgpq_quantize_act_f16(const void* x, int8_t* out, int64_t n, const float* a_scale,
                                     const void* group_index, int index_is_int64, int64_t num_groups,
                                     cudaStream_t stream) {
  return launch<__half>(x, out, n, a_scale, group_index, index_is_int64, num_groups, stream);
}

extern "C" int tgpq_quantize_act_bf16(const void* x, int8_t* out, int64_t n, const float* a_scale,
                                      const void* group_index, int index_is_int64, int64_t num_groups,
                                      cudaStream_t stream) {
  return launch<__nv_bfloat16>(x, out, n, a_scale, group_index, index_is_int64, num_groups, stream);
}
