// dwsep CPU kernels: activations and their derivatives, the fp32/fp64 GEMM, transposes, sums and conversions.
// Private to dwsep_cpu.cpp (the only file that includes it): one part of the fused depthwise-separable convolution
// kernel; the design is described at the top of dwsep_cpu.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>

#include "dwsep_cpu_tiling.h"
#include "scratch.h"
#include "simd.h"

namespace effikern {
namespace dwsep_cpu {

// ---------------------------------------------------------------------------------------------------------------
// Elementwise and small dense helpers (plain loops: vectorized by the compiler for each target).

template <typename T, typename F>
EK_INLINE void map_inplace(T* v, int64_t n, F f) {
  for (int64_t i = 0; i < n; ++i) v[i] = f(v[i]);
}

template <typename T, typename F>
EK_INLINE void map2_inplace(T* __restrict g, const T* __restrict z, int64_t n, F f) {
  for (int64_t i = 0; i < n; ++i) g[i] = f(g[i], z[i]);
}

// SiLU and GELU need exp and erf, which libm only has as scalar calls: silu ran 2.5x and gelu 8x slower than relu.
// For fp32 these vector versions are used instead (fp64 is for gradcheck and keeps libm).
template <int B>
struct VecMath {
  using S = Simd<float, B>;
  using V = typename S::V;
  typedef int32_t VI __attribute__((vector_size(B)));

  // exp(x) = 2^n e^r, n = round(x / ln 2), |r| <= ln(2)/2, e^r by its degree-7 Taylor polynomial (truncation error
  // 3e-9): within 2 ulp of expf. x is clamped to [-87.3, 88.7], where 2^n stays a normal float; NaN propagates.
  static EK_INLINE V exp(V x) {
    x = x < S::splat(-87.3f) ? S::splat(-87.3f) : x;
    x = x > S::splat(88.7f) ? S::splat(88.7f) : x;
    const V t = x * 1.44269504f + 12582912.0f;  // 1.5 * 2^23: n lands in the low mantissa bits
    const V n = t - 12582912.0f;
    const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln 2 in two parts (Cody-Waite)
    V p = S::splat(1.0f / 5040);
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const VI scale = ((VI)t << 23) + (127 << 23);
    return p * (V)scale;
  }

  // erfc(x), Chebyshev-fitted form of Numerical Recipes (erfcc): relative error below 1.2e-7 on the whole line, so
  // 1 - erf(x) is accurate even where it is tiny (GELU of negative inputs).
  static EK_INLINE V erfc(V x) {
    const V ax = (V)((VI)x & 0x7fffffff);
    const V t = 1.0f / (1.0f + 0.5f * ax);
    V p = S::splat(0.17087277f);
    p = p * t - 0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t - 1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t - 0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    p = p * t - 1.26551223f;
    const V r = t * exp(p - ax * ax);
    return x < S::splat(0.0f) ? 2.0f - r : r;
  }
};

// z[i] = fs(z[i]), through fv on whole vectors when T is float.
template <int B, typename T, typename FV, typename FS>
EK_INLINE void map_vector(T* z, int64_t n, FV fv, FS fs) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    using S = Simd<float, B>;
    for (; i + S::kLanes <= n; i += S::kLanes) S::store(z + i, fv(S::load(z + i)));
  }
  for (; i < n; ++i) z[i] = fs(z[i]);
}

// g[i] = fs(g[i], z[i]), through fv on whole vectors when T is float.
template <int B, typename T, typename FV, typename FS>
EK_INLINE void map2_vector(T* __restrict g, const T* __restrict z, int64_t n, FV fv, FS fs) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    using S = Simd<float, B>;
    for (; i + S::kLanes <= n; i += S::kLanes) S::store(g + i, fv(S::load(g + i), S::load(z + i)));
  }
  for (; i < n; ++i) g[i] = fs(g[i], z[i]);
}

// Activations (codes in dwsep_cpu.h), matching torch's forward, NaN propagation included.
template <int B, typename T>
EK_INLINE void activation_forward(int64_t act, T* z, int64_t n) {
  using M = VecMath<B>;
  switch (act) {
    case kRelu:
      return map_inplace(z, n, [](T v) { return v < T(0) ? T(0) : v; });
    case kRelu6:
      return map_inplace(z, n, [](T v) { return v < T(0) ? T(0) : (v > T(6) ? T(6) : v); });
    case kSilu:
      return map_vector<B>(
          z, n, [](auto v) __attribute__((always_inline)) { return v / (1.0f + M::exp(-v)); },
          [](T v) { return v / (T(1) + std::exp(-v)); });
    case kGelu:  // 0.5 z (1 + erf(z / sqrt 2)) = 0.5 z erfc(-z / sqrt 2)
      return map_vector<B>(
          z, n, [](auto v) __attribute__((always_inline)) { return 0.5f * v * M::erfc(v * float(-M_SQRT1_2)); },
          [](T v) { return T(0.5) * v * std::erfc(v * T(-M_SQRT1_2)); });
    case kHardswish:
      return map_inplace(z, n, [](T v) {
        const T r = v + T(3);
        return v * (r < T(0) ? T(0) : (r > T(6) ? T(6) : r)) / T(6);
      });
    default:
      return;
  }
}

// g *= act'(z), matching torch autograd at the kinks: relu'(0) = 0; relu6' = 1 only strictly inside (0, 6);
// hardswish' = 0 at and below -3, 1 at and above 3, z/3 + 1/2 strictly between (torch >= 2.7).
template <int B, typename T>
EK_INLINE void activation_backward(int64_t act, T* g, const T* z, int64_t n) {
  using M = VecMath<B>;
  constexpr double kInvSqrt2Pi = 0.5 * M_2_SQRTPI * M_SQRT1_2;
  switch (act) {
    case kRelu:
      return map2_inplace(g, z, n, [](T d, T v) { return v <= T(0) ? T(0) : d; });
    case kRelu6:
      return map2_inplace(g, z, n, [](T d, T v) { return (v <= T(0) || v >= T(6)) ? T(0) : d; });
    case kSilu:
      return map2_vector<B>(
          g, z, n,
          [](auto d, auto v) __attribute__((always_inline)) {
            const auto s = 1.0f / (1.0f + M::exp(-v));
            return d * s * (1.0f + v * (1.0f - s));
          },
          [](T d, T v) {
            const T s = T(1) / (T(1) + std::exp(-v));
            return d * s * (T(1) + v * (T(1) - s));
          });
    case kGelu:  // d/dz = Phi(z) + z phi(z)
      return map2_vector<B>(
          g, z, n,
          [](auto d, auto v) __attribute__((always_inline)) {
            return d * (0.5f * M::erfc(v * float(-M_SQRT1_2)) + v * M::exp(-0.5f * v * v) * float(kInvSqrt2Pi));
          },
          [](T d, T v) {
            return d * (T(0.5) * std::erfc(v * T(-M_SQRT1_2)) + v * std::exp(T(-0.5) * v * v) * T(kInvSqrt2Pi));
          });
    case kHardswish:
      return map2_inplace(g, z, n, [](T d, T v) {
        return v <= T(-3) ? T(0) : (v >= T(3) ? d : d * (v / T(3) + T(0.5)));
      });
    default:
      return;
  }
}

// C[M x N] (+)= A[M x K] * B[K x N]; row-major, leading dimensions given.
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate) {
  // oneDNN's JIT micro-kernel; it falls back to BLAS sgemm on CPUs without AVX2.
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}

inline void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
          int64_t ldc, bool accumulate) {
  // float64 is for gradcheck, not speed: BLAS dgemm through at::mm on views of the buffers.
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor a = at::from_blob(const_cast<double*>(A), {M, K}, {lda, 1}, opts);
  const at::Tensor b = at::from_blob(const_cast<double*>(B), {K, N}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (accumulate) {
    c.addmm_(a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

// dst[j * ld_dst + i] = D(src[i * ld_src + j]) for i < rows, j < cols, in 16 x 16 blocks that stay in L1.
template <typename S, typename D>
EK_INLINE void transpose(const S* __restrict src, int64_t rows, int64_t cols, int64_t ld_src, D* __restrict dst,
                         int64_t ld_dst) {
  constexpr int64_t kB = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kB) {
    for (int64_t j0 = 0; j0 < cols; j0 += kB) {
      const int64_t i1 = std::min(rows, i0 + kB), j1 = std::min(cols, j0 + kB);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) dst[j * ld_dst + i] = static_cast<D>(src[i * ld_src + j]);
      }
    }
  }
}

// dst[i] = T(src[i * stride]). Strides 1 and 2 get their own loops: with a run-time stride the compiler emits
// scalar code, and staging an NCHW window then cost 2-8x the depthwise stencil itself.
template <typename scalar_t, typename T>
EK_INLINE void load_strided(const scalar_t* __restrict src, int64_t stride, int64_t n, T* __restrict dst) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  } else if (stride == 2) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[2 * i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i * stride]);
  }
}

// A row-major matrix: element (i, j) at data[i * ld + j].
template <typename T>
struct MatrixView {
  const T* data;
  int64_t ld;
};

// out[i] += sum_j m[i * ld + j] for j < cols, summed in double (bias gradients: see GradPartials)
template <typename T>
EK_INLINE void add_row_sums(const T* m, int64_t rows, int64_t cols, int64_t ld, double* out) {
  for (int64_t i = 0; i < rows; ++i) {
    double acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < cols; ++j) acc += m[i * ld + j];
    out[i] += acc;
  }
}

// out[j] += sum_i m[i * ld + j] for j < cols, summed in double
template <typename T>
EK_INLINE void add_col_sums(const T* m, int64_t rows, int64_t cols, int64_t ld, double* __restrict out) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) out[j] += m[i * ld + j];
  }
}

// dst[i] = T(src[i])
template <typename scalar_t, typename T>
EK_INLINE void load_converted(const scalar_t* __restrict src, int64_t n, T* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// Scratch, scratch<T>(n): csrc/cpu/scratch.h (64-byte aligned, uninitialized).
using effikern::Scratch;
using effikern::scratch;

}  // namespace dwsep_cpu
}  // namespace effikern
