// Register-tiled int8 GEMM microkernels of the cpu backend (XNNPACK-style names are contracts).
// Pure C++ (no torch): the standalone ctest build covers them.
//
// Numerics (tgpq/numerics.py):
//   activations are stored as u8 with zero point 128:  a_u8 = clamp(rne(x * inv), -127, 127) + 128
//   acc[m, n] = sum_k (a_u8[m, k] - 128) * w[n, k]                     (exact int32)
//   y[m, n]   = fma(float(acc), scale[n], bias[n])     scale[n] = a_scale * w_scale[n] (float32)
// Every ISA path produces the same int32 accumulators and the same fma epilogue, so all paths are
// bit-identical; they differ from the contract's mul-then-add only by the single fma rounding.
//
// Microkernel names:  qs8_qc{8,4}w_gemm_{MR}x{NR}c4__{isa}
//   qs8   : signed 8-bit activations (carried as u8 + 128)
//   qc8w  : per-channel int8 weights;  qc4w : per-channel int4 weights unpacked in registers
//   MRxNR : output tile (rows x columns); c4: K consumed in groups of 4 (one 32-bit lane)
#pragma once
#include <cstdint>

namespace tgpq {
namespace cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2 };

const char* isa_name(Isa isa);
// Whether this CPU can run `isa` (cpuid via __builtin_cpu_supports).
bool isa_supported(Isa isa);
// The fastest supported path.
Isa best_isa();

constexpr int kBlockN = 16;  // columns of one packed weight block

// ---- packed weight layout ("c4 blocks") -------------------------------------------------------
// nb = ceil(N / 16) blocks of 16 output channels; kg = ceil(K / 4) groups of 4 (rounded up to
// an even count for int4). Padding (n >= N or k >= K) holds weight 0.
//   int8: block b, group g -> 64 bytes at w[(b * kg + g) * 64]; byte c*4 + j = W[16b + c, 4g + j].
//   int4: block b, pair p (groups 2p, 2p+1) -> 64 bytes at w[(b * kg / 2 + p) * 64];
//         byte c*4 + j holds W[16b + c, 8p + j] in its low nibble and W[16b + c, 8p + 4 + j] in its
//         high nibble (two's complement nibbles). Half the bytes of int8.
//   wsum[16b + c] = 128 * sum_k W[16b + c, k]  (int32, [nb * 16]): the zero-point compensation.
int64_t packed_k_groups(int64_t k, int bits);
// Bytes of one 16-column block (the stride between blocks).
int64_t packed_block_bytes(int64_t k, int bits);
// w: int8 [n, k] row-major (values within the int4 range when bits == 4).
// out: nb * packed_block_bytes bytes; wsum: nb * 16 int32.
void pack_weight_c4(const int8_t* w, int64_t n, int64_t k, int bits, int8_t* out, int32_t* wsum);

// ---- activation quantization -------------------------------------------------------------------
// out[i] = clamp(rne(x[i] * inv), -127, 127) + 128 as u8.
void quantize_u8(const float* x, int64_t n, float inv, uint8_t* out, Isa isa);

// dst[i] = int16(src[i]) - 128 (the s16 kernels' activation rows).
void widen_u8_s16(const uint8_t* src, int64_t n, int16_t* dst);

// ---- microkernels --------------------------------------------------------------------------------
// One output tile: rows [0, mr) x columns [0, nc) with mr <= MR and nc <= NR of the kernel.
struct GemmTile {
  int64_t mr, nc, kg;              // rows, valid columns, K groups (packed_k_groups)
  const uint8_t* a;                // u8 kernels: row r at a + r * lda; kg * 4 readable bytes per row
  const int16_t* a16;              // s16 kernels: row r at a16 + r * lda; kg * 4 values a_u8 - 128
  int64_t lda;                     // elements between rows of a (or a16)
  const int8_t* w;                 // first packed block of the tile
  int64_t w_block_stride;          // bytes between 16-column blocks (packed_block_bytes)
  const int32_t* wsum;             // [nc] at the tile's first column
  const float* scale;              // [nc]
  const float* bias;               // [nc] or null
  float* y;                        // row r at y + r * ldy
  int64_t ldy;
};
using UKernelFn = void (*)(const GemmTile&);
struct UKernel {
  UKernelFn fn;
  int mr, nr;
  const char* name;
  bool a_s16;  // reads GemmTile::a16 (gemm_block widens the u8 block once) instead of GemmTile::a
};

void qs8_qc8w_gemm_4x64c4__avx512vnni(const GemmTile& t);
void qs8_qc4w_gemm_4x64c4__avx512vnni(const GemmTile& t);
void qs8_qc8w_gemm_6x8c4__avx2(const GemmTile& t);  // s16 activations (vpmaddwd)
void qs8_qc4w_gemm_4x16c4__avx2(const GemmTile& t);
void qs8_qc8w_gemm_4x16c4__scalar(const GemmTile& t);
void qs8_qc4w_gemm_4x16c4__scalar(const GemmTile& t);

// The microkernel for (isa, bits).
UKernel select_ukernel(Isa isa, int bits);

// Single-threaded GEMM over a packed A block of m rows (lda bytes each) and columns
// [n0, n0 + nc) of a packed weight: tiles it with `uk`. y points at column n0 of row 0.
// For an s16 kernel the block is first widened (a_u8 - 128) into a thread-local buffer.
void gemm_block(const UKernel& uk, int64_t m, int64_t n0, int64_t nc, int64_t kg, const uint8_t* a,
                int64_t lda, const int8_t* w, int64_t w_block_stride, const int32_t* wsum,
                const float* scale, const float* bias, float* y, int64_t ldy);

}  // namespace cpu
}  // namespace tgpq
