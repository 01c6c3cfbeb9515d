// CPU detection (CPUID + XCR0) and the choice of kernel table, made once.
#include "qkv/dispatch.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define QKV_X86 1
#endif

namespace qkv {
namespace {

#ifdef QKV_X86
unsigned long long read_xcr0() {
  unsigned int eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#ifdef QKV_X86
  unsigned int a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return f;
  const unsigned int max_leaf = a;
  char vendor[13] = {};
  std::memcpy(vendor, &b, 4);
  std::memcpy(vendor + 4, &d, 4);
  std::memcpy(vendor + 8, &c, 4);
  f.vendor = vendor;
  __get_cpuid(1, &a, &b, &c, &d);
  f.family = (a >> 8) & 0xf;
  if (f.family == 0xf) f.family += (a >> 20) & 0xff;
  const bool osxsave = c & (1u << 27);
  f.fma = c & (1u << 12);
  if (osxsave) {
    const unsigned long long xcr0 = read_xcr0();
    f.os_ymm = (xcr0 & 0x6) == 0x6;            // SSE + AVX state
    f.os_zmm = f.os_ymm && (xcr0 & 0xe0) == 0xe0;  // opmask + ZMM_Hi256 + Hi16_ZMM
  }
  if (max_leaf >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    f.avx2 = b & (1u << 5);
    f.avx512f = b & (1u << 16);
    f.avx512dq = b & (1u << 17);
    f.avx512bw = b & (1u << 30);
    f.avx512vl = b & (1u << 31);
  }
  unsigned int ext = __get_cpuid_max(0x80000000u, nullptr);
  if (ext >= 0x80000004u) {
    char brand[49] = {};
    for (unsigned int i = 0; i < 3; ++i) {
      __get_cpuid(0x80000002u + i, &a, &b, &c, &d);
      std::memcpy(brand + 16 * i, &a, 4);
      std::memcpy(brand + 16 * i + 4, &b, 4);
      std::memcpy(brand + 16 * i + 8, &c, 4);
      std::memcpy(brand + 16 * i + 12, &d, 4);
    }
    f.brand = brand;
    while (!f.brand.empty() && f.brand.back() == ' ') f.brand.pop_back();
    while (!f.brand.empty() && f.brand.front() == ' ') f.brand.erase(0, 1);
  }
#endif
  return f;
}

bool runnable(const std::string& isa) {
  const CpuFeatures& f = cpu_features();
  if (isa == "scalar") return true;
#if defined(QKV_HAVE_AVX2)
  if (isa == "avx2") return f.avx2 && f.fma && f.os_ymm;
#endif
#if defined(QKV_HAVE_AVX512)
  if (isa == "avx512") return f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.os_zmm;
#endif
  (void)f;
  return false;
}

std::atomic<const KernelTable*> g_active{nullptr};
std::mutex g_mutex;

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

bool gemv_prefetch() {
  // AMD family 19h (Zen 3, Zen 4; measured on Zen 4 only), unless QKV_NATIVE_GEMV_PREFETCH
  // is 0 or 1
  static const bool on = [] {
    const char* env = std::getenv("QKV_NATIVE_GEMV_PREFETCH");
    if (env && (std::strcmp(env, "0") == 0 || std::strcmp(env, "1") == 0)) return *env == '1';
    return cpu_features().vendor == "AuthenticAMD" && cpu_features().family == 0x19;
  }();
  return on;
}

bool misaligned_b_in_place() {
  static const bool on = cpu_features().vendor == "AuthenticAMD" && cpu_features().family == 0x1a;
  return on;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const char* name : {"scalar", "avx2", "avx512"})
    if (runnable(name)) out.emplace_back(name);
  return out;
}

const KernelTable& kernel_table_for(const std::string& isa) {
  if (isa != "scalar" && isa != "avx2" && isa != "avx512")
    throw std::invalid_argument("unknown ISA '" + isa + "': expected one of scalar, avx2, avx512");
  if (!runnable(isa))
    throw std::invalid_argument("ISA '" + isa + "' is not supported by this CPU/OS or was not compiled in; supported: " +
                                [] {
                                  std::string s;
                                  for (const auto& n : supported_isas()) s += (s.empty() ? "" : ", ") + n;
                                  return s;
                                }());
#if defined(QKV_HAVE_AVX512)
  if (isa == "avx512") return avx512::kernel_table();
#endif
#if defined(QKV_HAVE_AVX2)
  if (isa == "avx2") return avx2::kernel_table();
#endif
  return scalar::kernel_table();
}

const KernelTable& kernels() {
  const KernelTable* t = g_active.load(std::memory_order_acquire);
  if (t) return *t;
  std::lock_guard<std::mutex> lock(g_mutex);
  t = g_active.load(std::memory_order_relaxed);
  if (!t) {
    const char* env = std::getenv("QKV_NATIVE_ISA");
    if (env && *env) {
      t = &kernel_table_for(env);
    } else {
      t = &kernel_table_for(supported_isas().back());
    }
    g_active.store(t, std::memory_order_release);
  }
  return *t;
}

void set_active_isa(const std::string& isa) {
  const KernelTable* t = &kernel_table_for(isa);
  std::lock_guard<std::mutex> lock(g_mutex);
  g_active.store(t, std::memory_order_release);
}

}  // namespace qkv
