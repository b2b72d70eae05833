#pragma once
// Run-time choice of the vector ISA for CPU inner loops. The extension is
// compiled for the baseline ISA (so one build runs everywhere); hot loops get a
// second AVX2+FMA copy, chosen once per process when the CPU supports it.

#if defined(__GNUC__)
#define SSL_OPS_ALWAYS_INLINE __attribute__((always_inline))
#else
#define SSL_OPS_ALWAYS_INLINE
#endif

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define SSL_OPS_X86_DISPATCH 1
#define SSL_OPS_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define SSL_OPS_TARGET_AVX2
#endif

namespace ssl_ops::cpu {

inline bool cpu_has_avx2_fma() {
#if defined(SSL_OPS_X86_DISPATCH)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// The ISA the CPU kernels run with in this process (for build_info()).
inline const char* cpu_kernel_isa() {
#if defined(SSL_OPS_X86_DISPATCH)
  return cpu_has_avx2_fma() ? "avx2+fma" : "x86-64 baseline";
#elif defined(__aarch64__)
  return "aarch64 (NEON baseline)";
#else
  return "baseline";
#endif
}

}  // namespace ssl_ops::cpu
