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
#include "output_alloc.h"

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

// setup.py compiles for the baseline x86-64 ISA (SSE2); target_clones adds AVX2 and AVX-512 copies of the two
// passes, picked once at load time, so their exp loops vectorize 8 or 16 wide where the CPU allows. The small
// helpers are forced inline: a helper left out of line would be compiled for the baseline ISA only.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define EK_DISTILL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define EK_DISTILL_INLINE inline __attribute__((always_inline))
#else
#define EK_DISTILL_CLONES
#define EK_DISTILL_INLINE inline
#endif

// exp for float in plain arithmetic the compiler vectorizes (a call to std::exp does not vectorize without
// -ffast-math): x = n*ln2 + r with |r| <= ln2/2, exp(r) by Cephes' degree-6 polynomial (about 1 ulp), 2^n
// built in the exponent bits. The arguments here are x - max <= 0; below -87.3 exp is a denormal or 0, and
// returning exactly 0 keeps p * log(p) at 0 where a teacher logit is -inf.
EK_DISTILL_INLINE float exp_math(float x) {
  constexpr float kLo = -87.33654f, kHi = 88.0f;
  const float xc = std::min(std::max(x, kLo), kHi);
  // round(x * log2(e)) without a rounding instruction: adding 1.5 * 2^23 leaves the integer part in the
  // mantissa (exact while |x * log2(e)| < 2^22).
  constexpr float kMagic = 12582912.0f;
  const float n = (xc * 1.44269504088896341f + kMagic) - kMagic;
  // ln2 = 0.693359375 - 2.12194440e-4: the first part has few bits, so n * it is exact.
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float exp_r = poly * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < kLo ? 0.0f : exp_r * two_n;
}

// float64 logits exist for gradcheck, where exactness matters and speed does not.
EK_DISTILL_INLINE double exp_math(double x) { return std::exp(x); }

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

// n logits as the math type: float32 rows are read in place, the others converted into buf.
template <typename scalar_t, typename acc_t>
EK_DISTILL_INLINE const acc_t* as_math(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    half_convert::half_block_to_f32(reinterpret_cast<const uint16_t*>(src), buf, n);
    return buf;
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<acc_t>(src[j]);
    return buf;
  }
}

// dst[j] = scalar_t(src[j]) for j < n, rounded to nearest even.
template <typename scalar_t, typename acc_t>
EK_DISTILL_INLINE void store_rounded(const acc_t* src, int64_t n, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    half_convert::f32_block_to_half(src, reinterpret_cast<uint16_t*>(dst), n);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
  }
}

// Pass 1 of a row. kHard: also the statistics of the untempered student (CE term); the caller skips them when
// no CE term exists or when T = 1 makes them those of student / T.
template <typename scalar_t, typename acc_t, bool kHard>
EK_DISTILL_CLONES RowStats<acc_t> row_stats(const scalar_t* s, const scalar_t* t, RowArgs<acc_t> a, acc_t* sbuf,
                                            acc_t* tbuf) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t ms = kNegInf, mt = kNegInf;  // running maxima of the raw student and teacher logits
  acc_t ds = 0, dt = 0, dh = 0;      // running sums of exp(s/T - ms/T), exp(t/T - mt/T), exp(s - ms)
  for (int64_t j0 = 0; j0 < a.vocab; j0 += kBlock) {
    const int64_t n = std::min(kBlock, a.vocab - j0);
    const acc_t* sv = as_math(s + j0, n, sbuf);
    const acc_t* tv = as_math(t + j0, n, tbuf);
    acc_t bs = kNegInf, bt = kNegInf;
#pragma omp simd reduction(max : bs, bt)
    for (int64_t j = 0; j < n; ++j) {
      bs = sv[j] > bs ? sv[j] : bs;
      bt = tv[j] > bt ? tv[j] : bt;
    }
    // T > 0, so max(s/T) = max(s)/T (rounding is monotone): one maximum serves both student streams. Each
    // sum is rescaled by exactly the change of the shift its terms use.
    if (bs > ms) {
      ds *= exp_math(ms * a.inv_t - bs * a.inv_t);
      if constexpr (kHard) dh *= exp_math(ms - bs);
      ms = bs;
    }
    if (bt > mt) {
      dt *= exp_math(mt * a.inv_t - bt * a.inv_t);
      mt = bt;
    }
    // A row whose logits so far are all -inf has a -inf maximum: its terms are 0, and -inf - -inf is NaN.
    const acc_t shift_s = ms > kNegInf ? ms * a.inv_t : 0, shift_t = mt > kNegInf ? mt * a.inv_t : 0;
    const acc_t shift_h = ms > kNegInf ? ms : 0;
    acc_t ss = 0, st = 0, sh = 0;
#pragma omp simd reduction(+ : ss, st, sh)
    for (int64_t j = 0; j < n; ++j) {
      ss += exp_math(sv[j] * a.inv_t - shift_s);
      st += exp_math(tv[j] * a.inv_t - shift_t);
      if constexpr (kHard) sh += exp_math(sv[j] - shift_h);
    }
    ds += ss;
    dt += st;
    dh += sh;
  }
  return {ms * a.inv_t, std::log(ds), mt * a.inv_t, std::log(dt), ms, std::log(dh)};
}

// Pass 2 of a row: returns KL(p || q); with kGrad also writes the row's gradient
//   g = grad_q * q - grad_p * p [+ hard * softmax(s) if kHard] [- hard at the target y if sub_y].
// Separate instantiations rather than branches in the loop body: each loop is one straight vector body.
// The scalars come by value: copies the gradient stores cannot alias, so they stay in registers.
template <typename scalar_t, typename acc_t, bool kGrad, bool kHard>
EK_DISTILL_CLONES acc_t row_kl(const scalar_t* s, const scalar_t* t, scalar_t* g, int64_t y, bool sub_y,
                               RowArgs<acc_t> a, RowStats<acc_t> st, acc_t* sbuf, acc_t* tbuf, acc_t* gbuf) {
  acc_t kl = 0;
  for (int64_t j0 = 0; j0 < a.vocab; j0 += kBlock) {
    const int64_t n = std::min(kBlock, a.vocab - j0);
    const acc_t* sv = as_math(s + j0, n, sbuf);
    const acc_t* tv = as_math(t + j0, n, tbuf);
    acc_t* gv = gbuf;
    if constexpr (std::is_same_v<scalar_t, acc_t>) gv = g + j0;  // float32: write the output directly
    acc_t part = 0;
#pragma omp simd reduction(+ : part)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t log_q = (sv[j] * a.inv_t - st.shift_s) - st.log_sum_s;
      const acc_t log_p = (tv[j] * a.inv_t - st.shift_t) - st.log_sum_t;
      const acc_t p = exp_math(log_p);
      // F.kl_div's convention: a term with p == 0 is 0, even where log p is -inf.
      part += p * (p > 0 ? log_p - log_q : acc_t(0));
      if constexpr (kGrad) {
        acc_t gj = a.grad_q * exp_math(log_q) - a.grad_p * p;
        if constexpr (kHard) gj += a.hard * exp_math((sv[j] - st.shift_hard) - st.log_sum_hard);
        gv[j] = gj;
      }
    }
    if constexpr (kGrad) {
      if (sub_y && y >= j0 && y < j0 + n) gv[y - j0] -= a.hard;
      if constexpr (!std::is_same_v<scalar_t, acc_t>) {
        store_rounded(gv, n, g + j0);
      }
    }
    kl += part;
  }
  return kl;
}

// One token: writes loss[0] and, when g is not null, the V gradient entries.
template <typename scalar_t, typename acc_t>
void distill_row(const scalar_t* s, const scalar_t* t, scalar_t* g, bool has_target, int64_t y, bool counted,
                 RowArgs<acc_t> a, acc_t* loss) {
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
  alignas(64) acc_t sbuf[kBlock];
  alignas(64) acc_t tbuf[kBlock];
  alignas(64) acc_t gbuf[kBlock];
  RowStats<acc_t> st = hard && !shared ? row_stats<scalar_t, acc_t, true>(s, t, a, sbuf, tbuf)
                                       : row_stats<scalar_t, acc_t, false>(s, t, a, sbuf, tbuf);
  if (shared) {
    st.shift_hard = st.shift_s;
    st.log_sum_hard = st.log_sum_s;
  }
  acc_t kl;
  if (g == nullptr) {
    kl = row_kl<scalar_t, acc_t, false, false>(s, t, g, y, false, a, st, sbuf, tbuf, gbuf);
  } else if (hard && !shared) {
    kl = row_kl<scalar_t, acc_t, true, true>(s, t, g, y, true, a, st, sbuf, tbuf, gbuf);
  } else {
    kl = row_kl<scalar_t, acc_t, true, false>(s, t, g, y, hard, a, st, sbuf, tbuf, gbuf);
  }
  acc_t out = a.loss_soft * kl;
  if (hard) out += a.hard * ((st.shift_hard - static_cast<acc_t>(s[y])) + st.log_sum_hard);
  *loss = out;
}

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
    const scalar_t* s = student.data_ptr<scalar_t>();
    const scalar_t* t = teacher.data_ptr<scalar_t>();
    scalar_t* g = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    acc_t* out = loss.data_ptr<acc_t>();
    // Short rows are cheap: hand each thread at least ~32K logits so small-V calls do not pay for the fork.
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t yi = has_target ? y[i] : 0;
        distill_row<scalar_t, acc_t>(s + i * vocab, t + i * vocab, g == nullptr ? nullptr : g + i * vocab,
                                     has_target, yi, !has_target || yi != ignore_index, args, out + i);
      }
    });
  });
  return {loss, grad};
}

}  // namespace effikern
