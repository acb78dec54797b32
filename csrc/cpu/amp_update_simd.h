// AdamW's and SGD's updates in one pass of explicit AVX2 vectors, for float32, float16 and bfloat16 storage
// (used by amp_cpu.cpp; the contracts are amp_cpu.h's amp_fused_adamw_cpu and amp_fused_sgd_cpu).
//
// Why a pass of their own: the portable path (amp_cpu.cpp) converts fp16/bf16 blocks into fp32 buffers, runs the
// math (for AdamW in two loops around a separate sqrt block: GCC does not vectorize std::sqrt there) and converts
// back. That was compute-bound: AdamW at 0.67x (fp16) and 0.87x (bf16) of torch's fused AdamW on the AVX2 EPYC.
// Here every vector is loaded in its storage format, converted in registers (F16C for fp16, an unpack for bf16),
// updated and stored back in one loop.
#pragma once

#include <cstdint>

namespace effikern {
namespace amp_simd {

struct AdamConsts {
  float grad_factor;  // grad_factor, negated for maximize
  float decay;        // 1 - lr * weight_decay
  float lerp_w;       // 1 - beta1, the weight of torch's exp_avg.lerp_(g, 1 - beta1)
  float beta2, one_minus_beta2;
  float bc2_sqrt;     // sqrt(1 - beta2^t)
  float step_size;    // lr / (1 - beta1^t)
  float eps;
};

struct SgdConsts {
  float grad_factor;  // negated for maximize
  float weight_decay, momentum, one_minus_dampening, neg_lr;
  bool has_momentum, first, nesterov;  // first: the buffers are uninitialised, this update sets buf = g
};

enum class Storage { kF32, kF16, kBF16 };

// Updates the first k elements of p, m, v (g is read) and returns k: the largest multiple of 16 <= n, or 0
// where the CPU lacks AVX2 + FMA + F16C (or EFFIKERN_CPU_ISA=baseline), and for float32 on AVX-512 CPUs, whose
// portable path runs 16-lane code measured faster than torch there. The caller updates elements [k, n) with the
// portable code. Pointers are raw storage of the given format.
int64_t adamw_simd(Storage fmt, void* p, const void* g, void* m, void* v, int64_t n, const AdamConsts& c);

// SGD's update of the first k elements of p and buf (null without momentum; g is read), as adamw_simd: returns
// k, the largest multiple of 16 <= n, or 0 where the CPU lacks AVX2 + FMA + F16C, and for float32 on AVX-512.
int64_t sgd_simd(Storage fmt, void* p, const void* g, void* buf, int64_t n, const SgdConsts& c);

}  // namespace amp_simd
}  // namespace effikern
