// CPU detection and the choice of kernel table (made once, cached).
#pragma once
#include <string>
#include <vector>
#include "qkv/kernels.h"

namespace qkv {

struct CpuFeatures {
  bool avx2 = false, fma = false, avx512f = false, avx512bw = false, avx512vl = false,
       avx512dq = false, os_ymm = false, os_zmm = false;
  unsigned int family = 0;  // CPUID display family (base + extended)
  std::string vendor, brand;
};

const CpuFeatures& cpu_features();
// Whether the one-row product (KernelTable::gemv) prefetches its B rows ahead in
// software, Note [streaming prefetch] in cpp/src/kernels/kernels.cpp: on AMD family
// 19h; QKV_NATIVE_GEMV_PREFETCH=0 or 1 overrides (read once).
bool gemv_prefetch();
// Whether the few-row GEMM reads rows of B that start inside cache lines where they
// lie (Note [misaligned operands] in cpp/src/gemm.cpp): on AMD family 1Ah (Zen 5),
// whose split loads cost less than the copy; elsewhere they are copied into lines.
bool misaligned_b_in_place();
// Names of the variants compiled into this module and runnable on this CPU, best last.
std::vector<std::string> supported_isas();
// The table for a named variant; throws std::invalid_argument if unknown or unsupported.
const KernelTable& kernel_table_for(const std::string& isa);
// The active table: QKV_NATIVE_ISA if set, else the best supported (chosen once).
const KernelTable& kernels();
// Overrides the active table (tests run every variant); throws like kernel_table_for.
void set_active_isa(const std::string& isa);

}  // namespace qkv
