// int4 weight packing on the GPU (load time): the layout of tgpq's packed int4 weights.
//
// Packed layout (same as csrc/layout/pack_int4.h and kernels/qgemm.py): q int8 [N, K] with values in [-8, 7]
// -> packed int8 [N, ceil(K/2)]; byte j of row n holds q[n, 2j] in its low nibble and q[n, 2j+1]
// in its high nibble (two's complement nibbles); odd K is padded with a 0 nibble. Unpacking
// sign-extends each nibble back to int8. One thread per packed byte; rows are contiguous.
//
// Plain CUDA with extern "C" launchers; csrc/cuda/cuda_ops_binding.cpp wraps them for torch.
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

__global__ void pack_int4_kernel(const int8_t* __restrict__ q, int8_t* __restrict__ out, int64_t n, int64_t k,
                                 int* __restrict__ out_of_range) {
  const int64_t kp = (k + 1) / 2;
  const int64_t total = n * kp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t row = i / kp, j = i - row * kp;
    const int8_t* r = q + row * k;
    const int lo = r[2 * j];
    const int hi = (2 * j + 1 < k) ? r[2 * j + 1] : 0;
    if (lo < -8 || lo > 7 || hi < -8 || hi > 7) atomicOr(out_of_range, 1);
    out[i] = static_cast<int8_t>((lo & 0xF) | ((hi & 0xF) << 4));
  }
}

__global__ void unpack_int4_kernel(const int8_t* __restrict__ packed, int8_t* __restrict__ q, int64_t n, int64_t k) {
  const int64_t kp = (k + 1) / 2;
  const int64_t total = n * kp;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t row = i / kp, j = i - row * kp;
    const int b = packed[i];
    int8_t* r = q + row * k;
    r[2 * j] = static_cast<int8_t>(static_cast<int8_t>(b << 4) >> 4);  // sign-extend the low nibble
    if (2 * j + 1 < k) r[2 * j + 1] = static_cast<int8_t>(b >> 4);       // arithmetic shift: high nibble
  }
}

unsigned grid_for(int64_t total, int threads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

}  // namespace

// q: int8 [n, k] device; out: int8 [n, ceil(k/2)] device; out_of_range: one device int, set to 1
// if any value is outside [-8, 7] (zero it before the call). Returns a cudaError_t.
extern "C" int tgpq_pack_int4(const int8_t* q, int8_t* out, int64_t n, int64_t k, int* out_of_range,
                              cudaStream_t stream) {
  if (n <= 0 || k <= 0) return 0;
  pack_int4_kernel<<<grid_for(n * ((k + 1) / 2), 256), 256, 0, stream>>>(q, out, n, k, out_of_range);
  return static_cast<int>(cudaGetLastError());
}

// packed: int8 [n, ceil(k/2)] device; q: int8 [n, k] device. Returns a cudaError_t.
extern "C" int tgpq_unpack_int4(const int8_t* packed, int8_t* q, int64_t n, int64_t k, cudaStream_t stream) {
  if (n <= 0 || k <= 0) return 0;
  unpack_int4_kernel<<<grid_for(n * ((k + 1) / 2), 256), 256, 0, stream>>>(packed, q, n, k);
  return static_cast<int>(cudaGetLastError());
}
