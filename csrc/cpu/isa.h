// The ISA paths of the cpu backend. Pure C++ (no torch).
#pragma once

namespace tgpq {
namespace cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2 };

const char* isa_name(Isa isa);
// Whether this CPU can run `isa` (cpuid via __builtin_cpu_supports).
bool isa_supported(Isa isa);
// The fastest supported path.
Isa best_isa();

}  // namespace cpu
}  // namespace tgpq
