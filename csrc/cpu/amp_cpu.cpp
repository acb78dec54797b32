// Fused loss-scaling kernels on CPU (contract in amp_cpu.h).
//
// Work list: every tensor is cut into pieces of at most kPiece elements, and consecutive pieces are grouped
// into tasks of about kPiece elements, so 10,000 tensors of 4 elements make ~5 tasks and one tensor of 100M
// elements makes ~12,000: both spread over the threads (at::parallel_for, i.e. OpenMP in the torch wheel, which
// honours torch.set_num_threads). Below kSerialBelow elements in all, the pass runs on the calling thread: an
// OpenMP fork costs more than the work.
//
// Norm accumulation: fp32 lanes inside a piece (<= 16,384 elements, so a lane sums <= 1,024 squares), fp64
// across pieces and tasks. Each task writes its own slot and the slots are summed in task order afterwards,
// so the norm does not depend on the thread count.
//
// Vectorization: the per-piece loops are `omp simd` loops over plain arithmetic (the bf16 conversions below
// are bit manipulations, not calls), compiled by target_clones for AVX-512, AVX2 and baseline x86-64 and
// picked at load time, as in distill_cpu.cpp. fp16 goes through fp32 blocks converted with F16C (half_convert.h),
// and AdamW's sqrt is a block of sqrtps: see sqrt_block for why.
//
// AdamW and SGD on AVX2 CPUs run amp_update_simd.cpp's one-pass vector kernels instead (except float32 on
// AVX-512); their code here then only takes each piece's last < 16 elements, and everything on other CPUs.
#pragma GCC optimize("no-math-errno")  // lets sqrtf vectorize; nothing here reads errno

#include "amp_cpu.h"
#include "amp_update_simd.h"
#include "half_convert.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace effikern {
namespace {

constexpr int64_t kPiece = 16384;
constexpr int64_t kSerialBelow = 1 << 16;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define EK_AMP_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define EK_AMP_INLINE inline __attribute__((always_inline))
#else
#define EK_AMP_CLONES
#define EK_AMP_INLINE inline
#endif

// fp16 / bf16 <-> fp32: half_convert.h (shared with the distillation loss).
using half_convert::bf16_to_f32;
using half_convert::f32_block_to_half;
using half_convert::f32_to_bf16;
using half_convert::half_block_to_f32;

// Storage formats: raw element type and its conversions to/from the fp32 math type.
struct F32 {
  using raw = float;
  static EK_AMP_INLINE float load(float x) { return x; }
  static EK_AMP_INLINE float store(float x) { return x; }
};
struct BF16 {
  using raw = uint16_t;
  static EK_AMP_INLINE float load(uint16_t x) { return bf16_to_f32(x); }
  static EK_AMP_INLINE uint16_t store(float x) { return f32_to_bf16(x); }
};

// Tensors in fp16 are converted in blocks of kBlock elements through fp32 buffers (4 KiB each, in L1).
constexpr int64_t kBlock = 1024;

// sqrt over a block with sqrtps where the CPU has AVX (picked at run time), as half_convert.h does for fp16 with
// F16C: GCC never vectorizes sqrtf without -fno-math-errno (sqrtf may set errno), which this file cannot set for
// itself.
#if defined(__GNUC__) && defined(__x86_64__)
#define EK_AMP_X86 1
const bool kHasAvx = [] {
  __builtin_cpu_init();
  return static_cast<bool>(__builtin_cpu_supports("avx"));
}();

__attribute__((target("avx"))) void sqrt_avx(const float* x, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_sqrt_ps(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) out[i] = std::sqrt(x[i]);
}
#endif

// out = sqrt(x), correctly rounded (the sqrtps instruction, as std::sqrt).
void sqrt_block(const float* x, float* out, int64_t n) {
  int64_t i = 0;
#ifdef EK_AMP_X86
  if (kHasAvx) return sqrt_avx(x, out, n);
  for (; i + 4 <= n; i += 4) _mm_storeu_ps(out + i, _mm_sqrt_ps(_mm_loadu_ps(x + i)));  // SSE: baseline x86-64
#endif
  for (; i < n; ++i) out[i] = std::sqrt(x[i]);
}

// The storage formats, shared with the one-pass vector kernels.
using Fmt = amp_simd::Storage;

Fmt fmt_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Fmt::kF32;
    case at::kHalf: return Fmt::kF16;
    case at::kBFloat16: return Fmt::kBF16;
    default: TORCH_CHECK(false, "effikern amp kernels take float32/float16/bfloat16 tensors, got ", t.scalar_type());
  }
}

// Address of element i of a tensor's raw storage in format f.
void* element(void* base, Fmt f, int64_t i) {
  return static_cast<char*>(base) + i * (f == Fmt::kF32 ? 4 : 2);
}

// ---- the work list ---------------------------------------------------------------------------------------

struct Piece {
  int64_t tensor;
  int64_t start;
  int64_t len;
};

struct WorkList {
  std::vector<Piece> pieces;
  std::vector<int64_t> task_begin;  // task t covers pieces [task_begin[t], task_begin[t + 1])
  int64_t elems = 0;

  int64_t tasks() const { return static_cast<int64_t>(task_begin.size()) - 1; }
};

WorkList make_work(const std::vector<at::Tensor>& tensors) {
  WorkList w;
  w.task_begin.push_back(0);
  int64_t in_task = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(tensors.size()); ++i) {
    const int64_t n = tensors[i].numel();
    for (int64_t s = 0; s < n; s += kPiece) {
      const int64_t len = std::min(kPiece, n - s);
      w.pieces.push_back({i, s, len});
      w.elems += len;
      in_task += len;
      if (in_task >= kPiece) {
        w.task_begin.push_back(static_cast<int64_t>(w.pieces.size()));
        in_task = 0;
      }
    }
  }
  if (w.task_begin.back() != static_cast<int64_t>(w.pieces.size())) {
    w.task_begin.push_back(static_cast<int64_t>(w.pieces.size()));
  }
  return w;
}

// Calls f(task, piece) for every piece, tasks spread over the threads.
template <typename F>
void for_each_piece(const WorkList& w, F&& f) {
  const int64_t tasks = w.tasks();
  if (tasks <= 0) return;
  const int64_t grain = w.elems < kSerialBelow ? tasks : 1;
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t j = w.task_begin[t]; j < w.task_begin[t + 1]; ++j) f(t, w.pieces[j]);
    }
  });
}

template <typename T>
std::vector<T*> pointers(const std::vector<at::Tensor>& ts) {
  std::vector<T*> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(static_cast<T*>(t.data_ptr()));
  return out;
}

// ---- unscale + check + norm ----------------------------------------------------------------------------

struct NormPart {
  double sumsq = 0.0;
  float amax = 0.0f;
  bool nonfinite = false;  // some v is inf or nan, or overflows the dtype it is written back in
};

// v = x * inv, measured in fp32: the sum of squares and the largest |v|, from which the check follows with no work
// per element: some v is nan iff the sum is (a sum of squares of non-nan values never is), and otherwise some |v| >=
// limit iff the largest is. limit: with write-back, where storing v in the gradient's dtype gives inf
// (kHalfOverflow, kBf16Overflow), so a product that overflows only there (a scale below 1) is found instead of
// written as a silent inf; without it, infinity (inf itself counts). A per-element check that read the stored
// value back made the bf16 write-back pass 5x slower, a per-element compare-and-select 10-20%.
template <typename D>
EK_AMP_INLINE void unscale_body(typename D::raw* p, int64_t n, float inv, bool write, float limit, NormPart& out) {
  float sum = 0.0f, amax = 0.0f;
  if (write) {
#pragma omp simd reduction(+ : sum) reduction(max : amax)
    for (int64_t i = 0; i < n; ++i) {
      const float v = D::load(p[i]) * inv;
      p[i] = D::store(v);
      sum += v * v;
      const float a = std::fabs(v);
      amax = amax > a ? amax : a;
    }
  } else {
#pragma omp simd reduction(+ : sum) reduction(max : amax)
    for (int64_t i = 0; i < n; ++i) {
      const float v = D::load(p[i]) * inv;
      sum += v * v;
      const float a = std::fabs(v);
      amax = amax > a ? amax : a;
    }
  }
  out.sumsq += sum;
  out.amax = std::max(out.amax, amax);
  out.nonfinite = out.nonfinite || std::isnan(sum) || amax >= limit;
}

constexpr float kNoLimit = std::numeric_limits<float>::infinity();
// Round to nearest even sends |v| >= the midpoint between the largest finite value and 2^16 (fp16) or 2^128 (bf16)
// to inf; at the midpoint itself the even neighbour is inf.
constexpr float kHalfOverflow = 65520.0f;                  // (65504 + 65536) / 2
constexpr float kBf16Overflow = (2.0f - 0x1p-8f) * 0x1p127f;  // (bf16 max (2 - 2^-7) 2^127 + 2^128) / 2

EK_AMP_CLONES void unscale_f32(float* p, int64_t n, float inv, bool write, float limit, NormPart& out) {
  unscale_body<F32>(p, n, inv, write, limit, out);
}
void unscale_f16(uint16_t* p, int64_t n, float inv, bool write, NormPart& out) {
  alignas(64) float buf[kBlock];
  for (int64_t s = 0; s < n; s += kBlock) {
    const int64_t k = std::min(kBlock, n - s);
    half_block_to_f32(p + s, buf, k);
    unscale_f32(buf, k, inv, write, write ? kHalfOverflow : kNoLimit, out);
    if (write) f32_block_to_half(buf, p + s, k);
  }
}
EK_AMP_CLONES void unscale_bf16(uint16_t* p, int64_t n, float inv, bool write, NormPart& out) {
  unscale_body<BF16>(p, n, inv, write, write ? kBf16Overflow : kNoLimit, out);
}

// ---- AdamW ---------------------------------------------------------------------------------------------

using amp_simd::AdamConsts;  // shared with the one-pass vector kernels (amp_update_simd.h)

// Pure fp32 math, one loop per lerp form so the loops have no branch and vectorize; sqrt in a block of its own.
// Blocks of kSqrtBlock: the block's p, g, m, v and sqrt(v) (5 KiB) stay in L1 between the two loops.
constexpr int64_t kSqrtBlock = 256;

template <bool kLerpFromM>
EK_AMP_INLINE void adamw_math(float* p, const float* g, float* m, float* v, int64_t n, const AdamConsts& c) {
  alignas(64) float root[kSqrtBlock];
  for (int64_t s = 0; s < n; s += kSqrtBlock) {
    const int64_t k = std::min(kSqrtBlock, n - s);
    float* ps = p + s;
    float* ms = m + s;
    float* vs = v + s;
    const float* gs = g + s;
#pragma omp simd
    for (int64_t i = 0; i < k; ++i) {
      const float gi = gs[i] * c.grad_factor;
      // torch's lerp: the formula anchored at the nearer end, so weight 1 gives exactly g.
      const float mi = kLerpFromM ? ms[i] + c.lerp_w * (gi - ms[i]) : gi - (gi - ms[i]) * (1.0f - c.lerp_w);
      vs[i] = vs[i] * c.beta2 + c.one_minus_beta2 * gi * gi;
      ms[i] = mi;
    }
    sqrt_block(vs, root, k);
#pragma omp simd
    for (int64_t i = 0; i < k; ++i) {
      const float denom = root[i] / c.bc2_sqrt + c.eps;
      const float pi = ps[i] * c.decay;  // torch's p.mul_(1 - lr * wd), rounded to fp32, then the step
      ps[i] = pi - c.step_size * (ms[i] / denom);
    }
  }
}

template <typename D>
EK_AMP_INLINE void to_f32(const typename D::raw* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = D::load(src[i]);
}

template <typename D>
EK_AMP_INLINE void from_f32(const float* src, typename D::raw* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = D::store(src[i]);
}

// fp32 tensors are updated in place; bf16 ones go through fp32 buffers of kBlock elements (16 KiB for the four
// streams, in L1), which keeps every loop simple enough to vectorize; fp16 ones too (adamw_f16).

template <typename D>
EK_AMP_INLINE void adamw_body(typename D::raw* p, const typename D::raw* g, typename D::raw* m,
                              typename D::raw* v, int64_t n, const AdamConsts& c) {
  const bool from_m = c.lerp_w < 0.5f;
  if constexpr (std::is_same<D, F32>::value) {
    from_m ? adamw_math<true>(p, g, m, v, n, c) : adamw_math<false>(p, g, m, v, n, c);
  } else {
    alignas(64) float pb[kBlock], gb[kBlock], mb[kBlock], vb[kBlock];
    for (int64_t s = 0; s < n; s += kBlock) {
      const int64_t k = std::min(kBlock, n - s);
      to_f32<D>(p + s, pb, k);
      to_f32<D>(g + s, gb, k);
      to_f32<D>(m + s, mb, k);
      to_f32<D>(v + s, vb, k);
      from_m ? adamw_math<true>(pb, gb, mb, vb, k, c) : adamw_math<false>(pb, gb, mb, vb, k, c);
      from_f32<D>(pb, p + s, k);
      from_f32<D>(mb, m + s, k);
      from_f32<D>(vb, v + s, k);
    }
  }
}

EK_AMP_CLONES void adamw_f32(float* p, const float* g, float* m, float* v, int64_t n, const AdamConsts& c) {
  adamw_body<F32>(p, g, m, v, n, c);
}
void adamw_f16(uint16_t* p, const uint16_t* g, uint16_t* m, uint16_t* v, int64_t n, const AdamConsts& c) {
  alignas(64) float pb[kBlock], gb[kBlock], mb[kBlock], vb[kBlock];
  for (int64_t s = 0; s < n; s += kBlock) {
    const int64_t k = std::min(kBlock, n - s);
    half_block_to_f32(p + s, pb, k);
    half_block_to_f32(g + s, gb, k);
    half_block_to_f32(m + s, mb, k);
    half_block_to_f32(v + s, vb, k);
    adamw_f32(pb, gb, mb, vb, k, c);
    f32_block_to_half(pb, p + s, k);
    f32_block_to_half(mb, m + s, k);
    f32_block_to_half(vb, v + s, k);
  }
}
EK_AMP_CLONES void adamw_bf16(uint16_t* p, const uint16_t* g, uint16_t* m, uint16_t* v, int64_t n,
                              const AdamConsts& c) {
  adamw_body<BF16>(p, g, m, v, n, c);
}

// ---- SGD -----------------------------------------------------------------------------------------------

using amp_simd::SgdConsts;

template <typename D>
EK_AMP_INLINE void sgd_body(typename D::raw* p, const typename D::raw* g, typename D::raw* buf, int64_t n,
                            const SgdConsts& c) {
  if (!c.has_momentum) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float pi = D::load(p[i]);
      const float gi = D::load(g[i]) * c.grad_factor + c.weight_decay * pi;
      p[i] = D::store(pi + c.neg_lr * gi);
    }
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float pi = D::load(p[i]);
    const float gi = D::load(g[i]) * c.grad_factor + c.weight_decay * pi;
    // torch keeps the buffer in the param's dtype and reads it back rounded: so do we (store, then load).
    const typename D::raw b = D::store(c.first ? gi : D::load(buf[i]) * c.momentum + c.one_minus_dampening * gi);
    buf[i] = b;
    const float bi = D::load(b);
    const float step = c.nesterov ? gi + c.momentum * bi : bi;
    p[i] = D::store(pi + c.neg_lr * step);
  }
}

EK_AMP_CLONES void sgd_f32(float* p, const float* g, float* b, int64_t n, const SgdConsts& c) {
  sgd_body<F32>(p, g, b, n, c);
}
void sgd_f16(uint16_t* p, const uint16_t* g, uint16_t* b, int64_t n, const SgdConsts& c) {
  alignas(64) float pb[kBlock], gb[kBlock], bb[kBlock];
  for (int64_t s = 0; s < n; s += kBlock) {
    const int64_t k = std::min(kBlock, n - s);
    half_block_to_f32(p + s, pb, k);
    half_block_to_f32(g + s, gb, k);
    for (int64_t i = 0; i < k; ++i) gb[i] = gb[i] * c.grad_factor + c.weight_decay * pb[i];
    if (c.has_momentum) {
      if (!c.first) half_block_to_f32(b + s, bb, k);
      for (int64_t i = 0; i < k; ++i) bb[i] = c.first ? gb[i] : bb[i] * c.momentum + c.one_minus_dampening * gb[i];
      // torch keeps the buffer in fp16 and uses the rounded value: store, then read back.
      f32_block_to_half(bb, b + s, k);
      half_block_to_f32(b + s, bb, k);
      for (int64_t i = 0; i < k; ++i) gb[i] = c.nesterov ? gb[i] + c.momentum * bb[i] : bb[i];
    }
    for (int64_t i = 0; i < k; ++i) pb[i] = pb[i] + c.neg_lr * gb[i];
    f32_block_to_half(pb, p + s, k);
  }
}
EK_AMP_CLONES void sgd_bf16(uint16_t* p, const uint16_t* g, uint16_t* b, int64_t n, const SgdConsts& c) {
  sgd_body<BF16>(p, g, b, n, c);
}

float scalar_of(const c10::optional<at::Tensor>& t, float otherwise) {
  return t.has_value() ? t->item<float>() : otherwise;
}

// The learning rate: lr_tensor's value when given (float32 or float64, read once per call: a CPU tensor, so no
// device sync; an LR scheduler changes it in place between steps), else lr.
double lr_of(double lr, const c10::optional<at::Tensor>& lr_tensor) {
  return lr_tensor.has_value() && lr_tensor->defined() ? lr_tensor->item<double>() : lr;
}

}  // namespace

at::Tensor amp_unscale_check_norm_cpu(const std::vector<at::Tensor>& grads, const at::Tensor& inv_scale,
                                      const at::Tensor& found_inf, double norm_type, bool write_back) {
  const float inv = inv_scale.item<float>();
  const WorkList w = make_work(grads);
  std::vector<NormPart> parts(std::max<int64_t>(w.tasks(), 0));
  std::vector<Fmt> fmts;
  for (const auto& g : grads) fmts.push_back(fmt_of(g));
  const auto ptrs = pointers<void>(grads);
  for_each_piece(w, [&](int64_t task, const Piece& pc) {
    void* base = ptrs[pc.tensor];
    switch (fmts[pc.tensor]) {
      case Fmt::kF32: unscale_f32(static_cast<float*>(base) + pc.start, pc.len, inv, write_back, kNoLimit, parts[task]); break;
      case Fmt::kF16: unscale_f16(static_cast<uint16_t*>(base) + pc.start, pc.len, inv, write_back, parts[task]); break;
      case Fmt::kBF16: unscale_bf16(static_cast<uint16_t*>(base) + pc.start, pc.len, inv, write_back, parts[task]); break;
    }
  });
  NormPart total;
  for (const auto& p : parts) {
    total.sumsq += p.sumsq;
    total.amax = std::max(total.amax, p.amax);
    total.nonfinite = total.nonfinite || p.nonfinite;
  }
  const bool nonfinite = total.nonfinite;
  if (nonfinite) found_inf.data_ptr<float>()[0] = 1.0f;
  float norm = 0.0f;
  if (norm_type == 2.0) {
    norm = static_cast<float>(std::sqrt(total.sumsq));
  } else if (std::isinf(norm_type)) {
    norm = total.amax;
  }
  // A non-finite value makes the norm non-finite (the contract), as torch's: NaN when one was NaN (then the sum of
  // squares is NaN too; inf * inf is not), else inf. The vectorized max alone may drop a NaN.
  if (norm_type != 0.0 && nonfinite) {
    norm = std::isnan(total.sumsq) ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  }
  return at::full({}, norm, inv_scale.options());
}

void amp_fused_adamw_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                         const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                         const at::Tensor& step, double lr, double beta1, double beta2, double eps,
                         double weight_decay, bool maximize, const c10::optional<at::Tensor>& grad_factor,
                         const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& lr_tensor) {
  if (scalar_of(found_inf, 0.0f) != 0.0f) return;  // an overflow step: nothing changes, step included
  lr = lr_of(lr, lr_tensor);
  float* step_ptr = step.data_ptr<float>();
  const double t = static_cast<double>(step_ptr[0]) + 1.0;
  AdamConsts c;
  const float gf = scalar_of(grad_factor, 1.0f);
  c.grad_factor = maximize ? -gf : gf;
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  c.lerp_w = static_cast<float>(1.0 - beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, t)));
  c.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, t)));
  c.eps = static_cast<float>(eps);
  const WorkList w = make_work(params);
  std::vector<Fmt> fmts;
  for (const auto& p : params) fmts.push_back(fmt_of(p));
  const auto p = pointers<void>(params), g = pointers<void>(grads), m = pointers<void>(exp_avgs),
             v = pointers<void>(exp_avg_sqs);
  for_each_piece(w, [&](int64_t, const Piece& pc) {
    const int64_t i = pc.tensor;
    // The one-pass vector kernel takes 16-element steps where the CPU has it; the portable code below the rest.
    const int64_t done = amp_simd::adamw_simd(fmts[i], element(p[i], fmts[i], pc.start),
                                              element(g[i], fmts[i], pc.start), element(m[i], fmts[i], pc.start),
                                              element(v[i], fmts[i], pc.start), pc.len, c);
    const int64_t s = pc.start + done, len = pc.len - done;
    if (len == 0) return;
    switch (fmts[i]) {
      case Fmt::kF32:
        adamw_f32(static_cast<float*>(p[i]) + s, static_cast<const float*>(g[i]) + s, static_cast<float*>(m[i]) + s,
                  static_cast<float*>(v[i]) + s, len, c);
        break;
      case Fmt::kF16:
        adamw_f16(static_cast<uint16_t*>(p[i]) + s, static_cast<const uint16_t*>(g[i]) + s,
                  static_cast<uint16_t*>(m[i]) + s, static_cast<uint16_t*>(v[i]) + s, len, c);
        break;
      case Fmt::kBF16:
        adamw_bf16(static_cast<uint16_t*>(p[i]) + s, static_cast<const uint16_t*>(g[i]) + s,
                   static_cast<uint16_t*>(m[i]) + s, static_cast<uint16_t*>(v[i]) + s, len, c);
        break;
    }
  });
  step_ptr[0] += 1.0f;
}

void amp_fused_sgd_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                       const std::vector<at::Tensor>& momentum_buffers, const at::Tensor& step, double lr,
                       double momentum, double dampening, bool nesterov, double weight_decay, bool maximize,
                       const c10::optional<at::Tensor>& grad_factor, const c10::optional<at::Tensor>& found_inf,
                       const c10::optional<at::Tensor>& lr_tensor) {
  if (scalar_of(found_inf, 0.0f) != 0.0f) return;
  lr = lr_of(lr, lr_tensor);
  float* step_ptr = step.data_ptr<float>();
  SgdConsts c;
  const float gf = scalar_of(grad_factor, 1.0f);
  c.grad_factor = maximize ? -gf : gf;
  c.weight_decay = static_cast<float>(weight_decay);
  c.momentum = static_cast<float>(momentum);
  c.one_minus_dampening = static_cast<float>(1.0 - dampening);
  c.neg_lr = static_cast<float>(-lr);
  c.has_momentum = momentum != 0.0;
  c.first = step_ptr[0] == 0.0f;
  c.nesterov = nesterov;
  TORCH_CHECK(!c.has_momentum || momentum_buffers.size() == params.size(),
              "amp_fused_sgd_cpu: momentum != 0 needs one momentum buffer per param");
  const WorkList w = make_work(params);
  std::vector<Fmt> fmts;
  for (const auto& p : params) fmts.push_back(fmt_of(p));
  const auto p = pointers<void>(params), g = pointers<void>(grads);
  const auto b = c.has_momentum ? pointers<void>(momentum_buffers) : std::vector<void*>(params.size(), nullptr);
  for_each_piece(w, [&](int64_t, const Piece& pc) {
    const int64_t i = pc.tensor;
    const int64_t done = amp_simd::sgd_simd(fmts[i], element(p[i], fmts[i], pc.start),
                                            element(g[i], fmts[i], pc.start),
                                            b[i] ? element(b[i], fmts[i], pc.start) : nullptr, pc.len, c);
    const int64_t s = pc.start + done, len = pc.len - done;
    if (len == 0) return;
    switch (fmts[i]) {
      case Fmt::kF32:
        sgd_f32(static_cast<float*>(p[i]) + s, static_cast<const float*>(g[i]) + s,
                b[i] ? static_cast<float*>(b[i]) + s : nullptr, len, c);
        break;
      case Fmt::kF16:
        sgd_f16(static_cast<uint16_t*>(p[i]) + s, static_cast<const uint16_t*>(g[i]) + s,
                b[i] ? static_cast<uint16_t*>(b[i]) + s : nullptr, len, c);
        break;
      case Fmt::kBF16:
        sgd_bf16(static_cast<uint16_t*>(p[i]) + s, static_cast<const uint16_t*>(g[i]) + s,
                 b[i] ? static_cast<uint16_t*>(b[i]) + s : nullptr, len, c);
        break;
    }
  });
  step_ptr[0] += 1.0f;
}

}  // namespace effikern
