// Ceilings for the CPU benchmark, measured on this machine (single thread; run one per core):
//   fp32_fma_peak_gmacs: the fp32 FMA instruction's throughput (12 independent accumulator chains,
//                        registers only): the most any fp32 GEMM can reach with that vector width;
//   int8_instruction_peak_gmacs: the serving microkernel's multiply instruction with its accumulate, in
//                        12 independent register chains (no loads): AVX2 W8 vpmaddwd + vpaddd (16 MACs), AVX2
//                        W4 vpmaddubsw + vpaddw (32 MACs), AVX-512 VNNI vpdpbusd (64 MACs): the kernel runs
//                        at least these per MAC, so no layer can exceed it (the ceiling);
//   amx_int8_peak_gmacs: AMX's tile dot product (tdpbusd, 16,384 MACs) in four independent accumulator tiles,
//                        tiles only: the ceiling of oneDNN's int8 kernels on an AMX CPU; 0 where the CPU or the
//                        kernel offers no AMX;
//   ukernel_peak_gmacs:  the serving int8 microkernel (select_ukernel(isa, bits)) itself on a GEMM whose
//                        operands stay in the core's L2 (m = 8 row tiles, n = 64, k = 2304, the largest K
//                        of the DDPM UNet's convs): what the kernel reaches in practice.
// Pure C++ (no torch).
#pragma once
#include <cstdint>

#include "cpu/isa.h"

namespace tgpq {
namespace cpu {

// `isa` picks the vector width: kAvx512Vnni -> zmm, kAvx2 -> ymm, kScalar -> one float FMA chain set.
double fp32_fma_peak_gmacs(Isa isa, double seconds);
double int8_instruction_peak_gmacs(Isa isa, int bits, double seconds);
double amx_int8_peak_gmacs(double seconds);
double ukernel_peak_gmacs(Isa isa, int bits, double seconds);

}  // namespace cpu
}  // namespace tgpq
