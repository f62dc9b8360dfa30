// The int8 GEMM driver of the cpu backend: the microkernel per (ISA, bits), the tiling of one packed
// A block, and run_gemm, which splits y[M, N] = epilogue(A @ W^T) into tasks over row blocks and
// column groups for a caller-supplied parallel-for. Pure C++ (no torch): the torch ops pass
// at::parallel_for, ctest a serial loop.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/ukernel.h"

namespace tgpq {
namespace cpu {

// The microkernel for (isa, bits).
UKernel select_ukernel(Isa isa, int bits);

// Single-threaded GEMM over a packed A block of m rows (lda bytes each) and columns
// [n0, n0 + nc) of a packed weight: tiles it with `uk`. y points at column n0 of row 0.
// For an s16 kernel the block is first widened (a_u8 - 128) into a thread-local buffer.
void gemm_block(const UKernel& uk, int64_t m, int64_t n0, int64_t nc, int64_t kg, const uint8_t* a,
                int64_t lda, const int8_t* w, int64_t w_block_stride, const int32_t* wsum,
                const float* scale, const float* bias, float* y, int64_t ldy);

// A packed weight as the driver reads it (layout/pack_c4.h).
struct PackedW {
  const int8_t* w;
  const int32_t* wsum;
  int64_t n, k, kg, bstride;
  int bits;
};

constexpr int64_t kRowBlock = 64;  // rows of A packed per task step

struct NoPost {
  void operator()(int64_t, int64_t, int64_t, int64_t) const {}
};

// NaN propagation: a row of A that holds the code 0 (a NaN activation, see ukernel.h) makes its output
// row NaN, as a float GEMM would. memchr is vectorised; the scan is one byte per MAC row, ~1/N of the GEMM.
inline void mark_nan_rows(const uint8_t* a, int64_t lda, int64_t rows, int64_t row_bytes, float* y, int64_t ldy,
                          int64_t nc) {
  for (int64_t i = 0; i < rows; ++i)
    if (std::memchr(a + i * lda, 0, static_cast<size_t>(row_bytes)) != nullptr)
      std::fill(y + i * ldy, y + i * ldy + nc, std::numeric_limits<float>::quiet_NaN());
}

// y[M, N] = epilogue(A @ W^T). fill(m0, rows, buf, &lda) provides A rows [m0, m0 + rows) (packing
// them into buf, kg * 4 bytes per row, or returning a direct pointer); post(m0, rows, n0, nc) runs on
// the block just written (still in cache). parallel_for(begin, end, grain, fn(b, e)) runs the tasks;
// `threads` is how many it uses (columns are split when there are too few row blocks).
template <typename ParallelFor, typename Fill, typename Post = NoPost>
void run_gemm(int64_t M, const PackedW& pw, Isa isa, const float* scale, const float* bias, float* y,
              int64_t threads, ParallelFor parallel_for, Fill fill, Post post = Post()) {
  const UKernel uk = select_ukernel(isa, pw.bits);
  const int64_t N = pw.n;
  const int64_t row_blocks = (M + kRowBlock - 1) / kRowBlock;
  const int64_t col_tiles = (N + uk.nr - 1) / uk.nr;
  int64_t col_groups = 1;
  while (row_blocks * col_groups < 4 * threads && col_groups < col_tiles) ++col_groups;
  const int64_t tiles_per_group = (col_tiles + col_groups - 1) / col_groups;
  const int64_t row_bytes = pw.kg * 4;
  parallel_for(0, row_blocks * col_groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> buf(static_cast<size_t>(kRowBlock * row_bytes));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rb = task / col_groups, cgi = task % col_groups;
      const int64_t m0 = rb * kRowBlock, rows = std::min(kRowBlock, M - m0);
      const int64_t n0 = cgi * tiles_per_group * uk.nr;
      if (n0 >= N) continue;
      const int64_t nc = std::min(N - n0, tiles_per_group * uk.nr);
      int64_t lda = row_bytes;
      const uint8_t* a = fill(m0, rows, buf.data(), &lda);
      gemm_block(uk, rows, n0, nc, pw.kg, a, lda, pw.w, pw.bstride, pw.wsum, scale, bias, y + m0 * N + n0, N);
      mark_nan_rows(a, lda, rows, row_bytes, y + m0 * N + n0, N, nc);
      post(m0, rows, n0, nc);
    }
  });
}

}  // namespace cpu
}  // namespace tgpq
