// Fused knowledge-distillation loss on CPU (see distill_cpu.h for the formula and the contract).
//
// One row (token) at a time, two passes over its V logits:
//   pass 1: blockwise online softmax statistics of student/T, teacher/T and student (for the CE term);
//   pass 2: the KL terms, and the gradient written once in the logits' dtype.
// A row of bf16 logits at V = 128256 is 2 x 250 KiB, so pass 2 re-reads it from L2, not DRAM. Nothing of
// size [M, V] is allocated besides the gradient itself. Rows are independent: at::parallel_for over rows
// (OpenMP in the torch wheel), which honours torch.set_num_threads.
#include "distill_cpu.h"
#include "half_convert.h"
#include "isa_dispatch.h"
#include "output_alloc.h"
#include "simd.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace effikern {
namespace {

// Logits are converted to the math type in blocks of this many: three float buffers (12 KiB) stay in L1, and
// the running sums are rescaled at most once per block rather than once per element.
constexpr int64_t kBlock = 1024;

// Vectorization: explicit GCC vectors (simd.h) in a kernel run per ISA (isa_dispatch.h: AVX-512, AVX2+FMA,
// baseline). Until 2026-11 these loops were `omp simd` loops over scalar code in target_clones functions: GCC
// vectorized them for AVX-512 only (its masks if-convert exp's selects) and left the AVX2 copy scalar, so on an
// AVX2-only EPYC the fused step ran 0.6x the eager PyTorch formula (hand timing, 256 x 32000 fp32).

// exp for float in plain arithmetic (std::exp does not vectorize without -ffast-math): x = n*ln2 + r with
// |r| <= ln2/2, exp(r) by Cephes' degree-6 polynomial (about 1 ulp), 2^n built in the exponent bits. The
// arguments here are x - max <= 0; below -87.3 exp is a denormal or 0, and returning exactly 0 keeps p * log(p)
// at 0 where a teacher logit is -inf (so this is not VecMath::exp of dwsep_cpu_math.h, which clamps there).
// One body for a float and for a vector of floats (V = float or Simd<float, B>::V, I the matching int32 type);
// NaN propagates.
template <typename V, typename I>
EK_INLINE V exp_or_zero(V x) {
  constexpr float kLo = -87.33654f, kHi = 88.0f;
  const V lo = V{} + kLo, hi = V{} + kHi;
  V xc = x < lo ? lo : x;
  xc = hi < xc ? hi : xc;
  // round(x * log2(e)) without a rounding instruction: adding 1.5 * 2^23 leaves the integer part in the
  // mantissa (exact while |x * log2(e)| < 2^22).
  constexpr float kMagic = 12582912.0f;
  const V n = (xc * 1.44269504088896341f + kMagic) - kMagic;
  // ln2 = 0.693359375 - 2.12194440e-4: the first part has few bits, so n * it is exact.
  const V r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  V poly = V{} + 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const V exp_r = poly * r * r + r + 1.0f;
  I bits;
  if constexpr (std::is_same_v<V, float>) {
    bits = static_cast<int32_t>(n);
  } else {
    bits = __builtin_convertvector(n, I);
  }
  bits = (bits + 127) << 23;
  V two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < lo ? V{} : exp_r * two_n;
}

// The math type's vectors for a kernel of B bytes. float: Simd<float, B> and exp_or_zero. double (gradcheck,
// where exactness matters and speed does not): one lane, std::exp.
template <typename acc_t, int B>
struct RowMath {
  using W = Simd<float, B>;
  using V = typename W::V;
  typedef int32_t I __attribute__((vector_size(B)));
  static constexpr int64_t kLanes = W::kLanes;
  static EK_INLINE V load(const float* p) { return W::load(p); }
  static EK_INLINE void store(float* p, V v) { W::store(p, v); }
  static EK_INLINE V exp(V x) { return exp_or_zero<V, I>(x); }
  static EK_INLINE float exp1(float x) { return exp_or_zero<float, int32_t>(x); }
  static EK_INLINE float sum(V v) { return W::sum(v); }
  static EK_INLINE float max(V v) {
    float m = v[0];
    for (int64_t l = 1; l < kLanes; ++l) m = v[l] > m ? v[l] : m;
    return m;
  }
};

template <int B>
struct RowMath<double, B> {
  using V = double;
  static constexpr int64_t kLanes = 1;
  static EK_INLINE V load(const double* p) { return *p; }
  static EK_INLINE void store(double* p, V v) { *p = v; }
  static EK_INLINE V exp(V x) { return std::exp(x); }
  static EK_INLINE double exp1(double x) { return std::exp(x); }
  static EK_INLINE double sum(V v) { return v; }
  static EK_INLINE double max(V v) { return v; }
};

template <typename acc_t>
struct RowArgs {
  int64_t vocab;
  acc_t inv_t;      // 1 / T
  acc_t grad_q;     // coefficient of q in the gradient: soft_weight * T (the soft term is soft_weight*T*(q - p))
  acc_t grad_p;     // coefficient of p: soft_weight * T
  acc_t loss_soft;  // soft_weight * T^2
  acc_t hard;       // hard_weight; 0 when there is no target
};

// Log-sum-exp of one row's three streams, each as shift + log(sum exp(x - shift)). The two parts stay separate:
// log-probabilities are then (x - shift) - log_sum, as in at::log_softmax, and never lose the digits that
// rounding shift + log_sum to one float would cost (2e-6 absolute at a log-sum-exp of 30).
template <typename acc_t>
struct RowStats {
  acc_t shift_s, log_sum_s;        // student / T
  acc_t shift_t, log_sum_t;        // teacher / T
  acc_t shift_hard, log_sum_hard;  // student, untempered (for CE)
};

// n logits as the math type, readable up to n rounded up to L lanes: past n the lanes hold -inf, whose exp
// terms are exactly 0 in every sum and product below. Float32 blocks of whole vectors are read in place; the
// others are converted or copied into buf (kBlock + kPad entries).
constexpr int64_t kPad = 16;  // lanes of the widest vector (AVX-512 float)

template <typename scalar_t, typename acc_t>
EK_INLINE const acc_t* padded_block(const scalar_t* src, int64_t n, int64_t L, acc_t* buf) {
  const int64_t rounded = (n + L - 1) / L * L;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (rounded == n) return src;
    std::memcpy(buf, src, n * sizeof(acc_t));
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    half_convert::half_block_to_f32(reinterpret_cast<const uint16_t*>(src), buf, n);
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<acc_t>(src[j]);
  }
  std::fill(buf + n, buf + rounded, -std::numeric_limits<acc_t>::infinity());
  return buf;
}

// dst[j] = scalar_t(src[j]) for j < n, rounded to nearest even.
template <typename scalar_t, typename acc_t>
EK_INLINE void store_rounded(const acc_t* src, int64_t n, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    half_convert::f32_block_to_half(src, reinterpret_cast<uint16_t*>(dst), n);
  } else if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
  }
}

// Pass 1 of a row. kHard: also the statistics of the untempered student (CE term); the caller skips them when
// no CE term exists or when T = 1 makes them those of student / T.
template <typename scalar_t, typename acc_t, int B, bool kHard>
EK_INLINE RowStats<acc_t> row_stats(const scalar_t* s, const scalar_t* t, RowArgs<acc_t> a, acc_t* sbuf,
                                    acc_t* tbuf) {
  using M = RowMath<acc_t, B>;
  using V = typename M::V;
  constexpr int64_t L = M::kLanes;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t ms = kNegInf, mt = kNegInf;  // running maxima of the raw student and teacher logits
  acc_t ds = 0, dt = 0, dh = 0;      // running sums of exp(s/T - ms/T), exp(t/T - mt/T), exp(s - ms)
  for (int64_t j0 = 0; j0 < a.vocab; j0 += kBlock) {
    const int64_t n = std::min(kBlock, a.vocab - j0), nv = (n + L - 1) / L * L;
    const acc_t* sv = padded_block(s + j0, n, L, sbuf);
    const acc_t* tv = padded_block(t + j0, n, L, tbuf);
    V vbs = M::load(sv), vbt = M::load(tv);
    for (int64_t j = L; j < nv; j += L) {
      const V x = M::load(sv + j), y = M::load(tv + j);
      vbs = x > vbs ? x : vbs;
      vbt = y > vbt ? y : vbt;
    }
    const acc_t bs = M::max(vbs), bt = M::max(vbt);  // (the padding is -inf: never above a logit)
    // T > 0, so max(s/T) = max(s)/T (rounding is monotone): one maximum serves both student streams. Each
    // sum is rescaled by exactly the change of the shift its terms use.
    if (bs > ms) {
      ds *= M::exp1(ms * a.inv_t - bs * a.inv_t);
      if constexpr (kHard) dh *= M::exp1(ms - bs);
      ms = bs;
    }
    if (bt > mt) {
      dt *= M::exp1(mt * a.inv_t - bt * a.inv_t);
      mt = bt;
    }
    // A row whose logits so far are all -inf has a -inf maximum: its terms are 0, and -inf - -inf is NaN.
    const acc_t shift_s = ms > kNegInf ? ms * a.inv_t : 0, shift_t = mt > kNegInf ? mt * a.inv_t : 0;
    const acc_t shift_h = ms > kNegInf ? ms : 0;
    V ss{}, st{}, sh{};
    for (int64_t j = 0; j < nv; j += L) {
      const V x = M::load(sv + j), y = M::load(tv + j);
      ss += M::exp(x * a.inv_t - shift_s);
      st += M::exp(y * a.inv_t - shift_t);
      if constexpr (kHard) sh += M::exp(x - shift_h);
    }
    ds += M::sum(ss);
    dt += M::sum(st);
    if constexpr (kHard) dh += M::sum(sh);
  }
  return {ms * a.inv_t, std::log(ds), mt * a.inv_t, std::log(dt), ms, std::log(dh)};
}

// Pass 2 of a row: returns KL(p || q); with kGrad also writes the row's gradient
//   g = grad_q * q - grad_p * p [+ hard * softmax(s) if kHard] [- hard at the target y if sub_y].
// Separate instantiations rather than branches in the loop body: each loop is one straight vector body.
// The scalars come by value: copies the gradient stores cannot alias, so they stay in registers.
template <typename scalar_t, typename acc_t, int B, bool kGrad, bool kHard>
EK_INLINE acc_t row_kl(const scalar_t* s, const scalar_t* t, scalar_t* g, int64_t y, bool sub_y, RowArgs<acc_t> a,
                       RowStats<acc_t> st, acc_t* sbuf, acc_t* tbuf, acc_t* gbuf) {
  using M = RowMath<acc_t, B>;
  using V = typename M::V;
  constexpr int64_t L = M::kLanes;
  acc_t kl = 0;
  for (int64_t j0 = 0; j0 < a.vocab; j0 += kBlock) {
    const int64_t n = std::min(kBlock, a.vocab - j0), nv = (n + L - 1) / L * L;
    const acc_t* sv = padded_block(s + j0, n, L, sbuf);
    const acc_t* tv = padded_block(t + j0, n, L, tbuf);
    // float32 blocks of whole vectors are written in place; the others go through gbuf.
    const bool direct = std::is_same_v<scalar_t, acc_t> && nv == n;
    acc_t* gv = direct ? reinterpret_cast<acc_t*>(g + j0) : gbuf;
    V part{};
    for (int64_t j = 0; j < nv; j += L) {
      const V x = M::load(sv + j), z = M::load(tv + j);
      const V log_q = (x * a.inv_t - st.shift_s) - st.log_sum_s;
      const V log_p = (z * a.inv_t - st.shift_t) - st.log_sum_t;
      const V p = M::exp(log_p);
      // F.kl_div's convention: a term with p == 0 is 0, even where log p is -inf (and on the -inf padding).
      part += p * (p > V{} ? log_p - log_q : V{});
      if constexpr (kGrad) {
        V gj = a.grad_q * M::exp(log_q) - a.grad_p * p;
        if constexpr (kHard) gj += a.hard * M::exp((x - st.shift_hard) - st.log_sum_hard);
        M::store(gv + j, gj);
      }
    }
    if constexpr (kGrad) {
      if (sub_y && y >= j0 && y < j0 + n) gv[y - j0] -= a.hard;
      if (!direct) store_rounded(gv, n, g + j0);
    }
    kl += M::sum(part);
  }
  return kl;
}

// One token: writes loss[0] and, when g is not null, the V gradient entries.
template <typename scalar_t, typename acc_t, int B>
EK_INLINE void distill_row(const scalar_t* s, const scalar_t* t, scalar_t* g, bool has_target, int64_t y,
                           bool counted, RowArgs<acc_t> a, acc_t* loss) {
  if (!counted) {
    *loss = 0;
    if (g != nullptr) std::fill(g, g + a.vocab, static_cast<scalar_t>(0));
    return;
  }
  if (has_target && (y < 0 || y >= a.vocab)) {
    // The op layer rejects such targets before calling; NaN here keeps a direct caller from reading out of
    // bounds and from getting a plausible number.
    *loss = std::numeric_limits<acc_t>::quiet_NaN();
    if (g != nullptr) std::fill(g, g + a.vocab, static_cast<scalar_t>(*loss));
    return;
  }
  const bool hard = a.hard != 0;
  // T = 1: softmax(s) is q, so the CE statistics and exp are those of the soft term (2 exps a logit saved).
  const bool shared = hard && a.inv_t == 1;
  if (shared) a.grad_q += a.hard;
  alignas(64) acc_t sbuf[kBlock + kPad];
  alignas(64) acc_t tbuf[kBlock + kPad];
  alignas(64) acc_t gbuf[kBlock + kPad];
  RowStats<acc_t> st = hard && !shared ? row_stats<scalar_t, acc_t, B, true>(s, t, a, sbuf, tbuf)
                                       : row_stats<scalar_t, acc_t, B, false>(s, t, a, sbuf, tbuf);
  if (shared) {
    st.shift_hard = st.shift_s;
    st.log_sum_hard = st.log_sum_s;
  }
  acc_t kl;
  if (g == nullptr) {
    kl = row_kl<scalar_t, acc_t, B, false, false>(s, t, g, y, false, a, st, sbuf, tbuf, gbuf);
  } else if (hard && !shared) {
    kl = row_kl<scalar_t, acc_t, B, true, true>(s, t, g, y, true, a, st, sbuf, tbuf, gbuf);
  } else {
    kl = row_kl<scalar_t, acc_t, B, true, false>(s, t, g, y, hard, a, st, sbuf, tbuf, gbuf);
  }
  acc_t out = a.loss_soft * kl;
  if (hard) out += a.hard * ((st.shift_hard - static_cast<acc_t>(s[y])) + st.log_sum_hard);
  *loss = out;
}

// Rows begin..end of the problem, run per ISA by isa::parallel_run (one call per thread's range).
template <typename scalar_t>
struct DistillRows {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kVectorize = !std::is_same_v<acc_t, double>;
  const scalar_t* s;
  const scalar_t* t;
  scalar_t* g;      // [M, V] or nullptr
  const int64_t* y;  // [M] or nullptr
  int64_t ignore_index;
  RowArgs<acc_t> args;
  acc_t* loss;
  int64_t begin = 0, end = 0;

  template <int B>
  EK_INLINE void run() const {
    const int64_t vocab = args.vocab;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t yi = y != nullptr ? y[i] : 0;
      distill_row<scalar_t, acc_t, B>(s + i * vocab, t + i * vocab, g == nullptr ? nullptr : g + i * vocab,
                                      y != nullptr, yi, y == nullptr || yi != ignore_index, args, loss + i);
    }
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> distill_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                   const std::optional<at::Tensor>& target, double temperature,
                                                   double soft_weight, double hard_weight, int64_t ignore_index,
                                                   bool compute_grad) {
  const int64_t rows = student.size(0), vocab = student.size(1);
  const bool has_target = target.has_value() && target->defined();
  const auto loss_type = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({rows}, student.options().dtype(loss_type));
  at::Tensor grad = compute_grad ? empty_output_like(student) : at::empty({0}, student.options());
  const int64_t* y = has_target ? target->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "distill_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const RowArgs<acc_t> args{vocab, static_cast<acc_t>(1.0 / temperature),
                              static_cast<acc_t>(soft_weight * temperature),
                              static_cast<acc_t>(soft_weight * temperature),
                              static_cast<acc_t>(soft_weight * temperature * temperature),
                              static_cast<acc_t>(has_target ? hard_weight : 0.0)};
    const DistillRows<scalar_t> kernel{student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(),
                                       compute_grad ? grad.data_ptr<scalar_t>() : nullptr, y, ignore_index, args,
                                       loss.data_ptr<acc_t>()};
    // Short rows are cheap: hand each thread at least ~32K logits so small-V calls do not pay for the fork.
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1));
    isa::parallel_run(kernel, rows, grain);
  });
  return {loss, grad};
}

}  // namespace effikern
