// Run-time choice of the CPU vector ISA, shared by every C++ kernel family.
//
// A kernel is a class with `template <int B> void run() const` (B = vector width in bytes: 64 AVX-512, 32 AVX2+FMA,
// 16 baseline SSE2/NEON; both x86 vector builds also have F16C, which every AVX2 CPU has) and a
// `static constexpr bool kVectorize`. run_best_isa(k) instantiates run<B> inside a function compiled for that target, so one wheel runs on any x86-64 and still uses 512-bit registers where they
// exist. Kernels with kVectorize false (float64: gradcheck, not speed) only get the baseline build, which saves
// compile time.
//
// Everything run<B> calls that handles vectors must be inlined into it (EK_INLINE) to be compiled for the target.
// In particular an OpenMP region or at::parallel_for lambda opened INSIDE run<B> is outlined by the compiler and
// built for the baseline ISA (found in the sparse kernels: 10x slower); open the parallel loop outside and call
// run_best_isa per thread.
//
// EFFIKERN_CPU_ISA=avx2 or =baseline caps the choice (like ATEN_CPU_CAPABILITY), to test or time the other builds
// on one machine; =avx512 keeps AVX-512 but turns off the AVX512-BF16 GEMM (bf16_gemm.h).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace effikern {
namespace isa {

#if defined(__x86_64__) && defined(__GNUC__)
#define EK_X86_DISPATCH 1
template <class K>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"))) void run_avx512(const K& k) {
  k.template run<64>();
}
template <class K>
__attribute__((target("avx2,fma,f16c"))) void run_avx2(const K& k) {
  k.template run<32>();
}

// 2: AVX-512, 1: AVX2 + FMA, 0: baseline; read once per process.
inline int level() {
  static const int best_level = [] {
    __builtin_cpu_init();
    int best = 0;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("f16c")) {
      best = 2;
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
      best = 1;
    }
    const char* cap = std::getenv("EFFIKERN_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0) return std::min(best, 1);
    if (cap != nullptr && std::strcmp(cap, "baseline") == 0) return 0;
    return best;
  }();
  return best_level;
}
#else
inline int level() { return 0; }
#endif

// Vector bytes run_best_isa uses for a kernel with this kVectorize (so operands can be packed for that width first).
template <bool kVectorize>
int64_t vector_bytes() {
#ifdef EK_X86_DISPATCH
  if constexpr (kVectorize) {
    switch (level()) {
      case 2:
        return 64;
      case 1:
        return 32;
      default:
        break;
    }
  }
#endif
  return 16;
}

template <class K>
void run_best_isa(const K& k) {
#ifdef EK_X86_DISPATCH
  if constexpr (K::kVectorize) {
    switch (level()) {
      case 2:
        return run_avx512(k);
      case 1:
        return run_avx2(k);
      default:
        break;
    }
  }
#endif
  k.template run<16>();
}

// at::parallel_for over [0, n), each thread's range run by run_best_isa on a copy of `k` with begin/end set. The
// parallel loop stays outside the ISA-specific code: an OpenMP region or lambda inside a target("avx512f")
// function is compiled for the baseline ISA, its GCC vectors emulated (measured: 10x slower block kernels).
template <class K>
void parallel_run(K k, int64_t n, int64_t grain) {
  at::parallel_for(0, n, grain, [&](int64_t b0, int64_t b1) {
    K task = k;
    task.begin = b0;
    task.end = b1;
    run_best_isa(task);
  });
}

}  // namespace isa
}  // namespace effikern
