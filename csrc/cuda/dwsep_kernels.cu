// Fused depthwise-separable convolution, CUDA kernels and their host launchers (see dwsep_kernels.h).
//
//     z = dw(x) + dw_b,  a = act(z),  y = pw(a) + pw_b [+ residual]
//
// Pure CUDA: no torch header, so it compiles with nvcc alone against any (or no) torch install.
//
// Both the forward and the two pointwise GEMMs of the backward are one tile shape: a 64x64 fp32 output tile
// per 256-thread block, K walked in chunks of 32, both operands staged in shared memory K-major
// (element (m, k) of A at A[k*LD + m], (k, n) of B at B[k*LD + n]). The staged depthwise result never
// leaves the chip: that is the point of the fusion (dw(x) is N*C*Ho*Wo values written and read back
// otherwise). fp16/bf16 tiles go through tensor cores (WMMA, fp32 accumulate) on sm_80+; fp32 tiles,
// and fp16/bf16 below sm_80, use an fp32 FMA 4x4 register microtile.
//
// Backward (recomputes z from x; nothing but the inputs is saved):
//   gradz kernel: grad_a = grad_y x pw_w (K = Cout), grad_z = grad_a * act'(z) -> fp32 scratch,
//                 grad_dw_b += column sums of grad_z.
//   pw kernel:    grad_pw_w = grad_y^T x act(z) (K = pixels, split over blocks), grad_pw_b = sum grad_y.
//   dww kernel:   grad_dw_w[c, tap] = sum over pixels of grad_z * shifted x.
//   gx kernel:    grad_x = transposed depthwise conv of grad_z, a gather over taps (no atomics).
//
// Index math: anything that can span images (flattened pixel index, tensor offsets) is int64; one image's
// coordinates (c, h, w) are int. Pixels are flattened over N*Ho*Wo so a 7x7 map does not waste most of
// a 64-pixel tile.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "dwsep_kernels.h"
#include "element.cuh"

namespace effikern {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Tile shape. 64x64 outputs over 256 threads = a 4x4 fp32 microtile per thread (FMA path), or 8 warps of
// 16x32 (WMMA path). K chunk 32 = two 16-deep MMA steps; it also bounds the recomputed depthwise tile to
// 64x32 values per sync.
constexpr int kThreads = 256;
constexpr int kBM = 64;  // rows of the output tile (pixels in fwd/gradz, Cout in pw)
constexpr int kBN = 64;  // cols of the output tile (Cout in fwd, C in gradz/pw)
constexpr int kBK = 32;  // K chunk (C in fwd, Cout in gradz, pixels in pw)
constexpr int kLdo = kBN + 4;  // fp32 output tile row stride: multiple of 4 for float4 / WMMA stores

static_assert(kThreads == 256 && kBM == 64 && kBN == 64, "the microtile mappings below assume 256 threads, 64x64");
static_assert(kThreads % kBN == 0, "gradz epilogue: a thread's channel must not change across its elements");
static_assert(kBM % 32 == 0 && kThreads % kBM == 0, "gradz epilogue: a warp's channel must be uniform");
static_assert((kBM * kBN) % kThreads == 0, "uniform epilogue trip count (warp shuffles inside)");

// Shared-memory row stride of a K-major operand tile. The padding (16 bytes) shifts consecutive rows by
// 4 banks, which keeps WMMA fragment loads conflict-free and the transposing stores at most 4-way.
// Rows stay 16-byte multiples: needed by float4 loads and by WMMA (ldm multiple of 8 halves).
template <typename S>
constexpr int kLd = kBM + 16 / static_cast<int>(sizeof(S));  // 68 floats or 72 halves


// Element conversion (to_f32, from_f32, load_f32) and ceil_div: element.cuh.

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---------------------------------------------------------------------------------------------------------
// Activations (codes shared with effikern/ops/activation.py). Derivatives follow torch autograd exactly,
// including the boundary conventions and NaN behaviour (a NaN z passes the gradient through, as torch's
// threshold/hardtanh/hardswish backward comparisons do).
enum Activation : int { kNone = 0, kRelu = 1, kRelu6 = 2, kSilu = 3, kGelu = 4, kHardswish = 5 };

constexpr float kInvSqrt2 = 0.70710678118654752f;    // gelu: Phi(z) = (1 + erf(z / sqrt 2)) / 2
constexpr float kInvSqrt2Pi = 0.39894228040143268f;  // gelu': phi(z) = exp(-z^2/2) / sqrt(2 pi)

__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + expf(-z)); }

__device__ __forceinline__ float act_fwd(float z, int act) {
  switch (act) {
    case kRelu: return z < 0.f ? 0.f : z;  // not fmaxf: keeps NaN like torch.relu
    case kRelu6: return z < 0.f ? 0.f : (z > 6.f ? 6.f : z);
    case kSilu: return z * sigmoid(z);
    case kGelu: return 0.5f * z * (1.f + erff(z * kInvSqrt2));  // exact erf form, F.gelu's default
    case kHardswish: return z * fminf(fmaxf(z + 3.f, 0.f), 6.f) * (1.f / 6.f);
    default: return z;
  }
}

/// d act / d z at z.
__device__ __forceinline__ float act_grad(float z, int act) {
  switch (act) {
    case kRelu: return z <= 0.f ? 0.f : 1.f;                 // threshold_backward: relu'(0) = 0
    case kRelu6: return (z <= 0.f || z >= 6.f) ? 0.f : 1.f;  // hardtanh_backward: 1 strictly inside (0, 6)
    case kSilu: {
      const float s = sigmoid(z);
      return s * (1.f + z * (1.f - s));
    }
    case kGelu: return 0.5f * (1.f + erff(z * kInvSqrt2)) + z * kInvSqrt2Pi * expf(-0.5f * z * z);
    case kHardswish: return z <= -3.f ? 0.f : (z >= 3.f ? 1.f : z * (1.f / 3.f) + 0.5f);  // torch >= 2.7: 0 at -3, 1 at 3
    default: return 1.f;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Pixels. A tile's pixels are decoded once into shared memory: the int64 division happens per pixel per
// tile, not per tap.
struct PixInfo {
  int n, oh, ow;  // n < 0: slot past the last pixel (tile tail)
};

__host__ __device__ __forceinline__ int64_t num_pixels(const DwsepGeometry& g) {
  return static_cast<int64_t>(g.N) * g.Ho * g.Wo;
}

/// pix[i] = coordinates of flattened output pixel p0 + i, for i < count. Caller syncs.
__device__ void decode_pixels(PixInfo* pix, int64_t p0, int count, const DwsepGeometry& g) {
  const int64_t hw = static_cast<int64_t>(g.Ho) * g.Wo;
  const int64_t m = num_pixels(g);
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    const int64_t p = p0 + i;
    PixInfo q{-1, 0, 0};
    if (p < m) {
      const int64_t n = p / hw;
      const int r = static_cast<int>(p - n * hw);
      q.n = static_cast<int>(n);
      q.oh = r / g.Wo;
      q.ow = r - q.oh * g.Wo;
    }
    pix[i] = q;
  }
}

__device__ __forceinline__ int64_t offset_of(const Strides4& s, int n, int c, int h, int w) {
  return static_cast<int64_t>(n) * s.n + static_cast<int64_t>(c) * s.c + static_cast<int64_t>(h) * s.h +
         static_cast<int64_t>(w) * s.w;
}

/// True when channels are the innermost dimension (channels_last): threads then walk channels for
/// coalescing; otherwise (NCHW) they walk pixels. Only speed depends on it, never correctness.
__device__ __forceinline__ bool channels_inner(const Strides4& s) { return s.c < s.w; }

/// z = sum over taps of dw_w[c, i, j] * x[n, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw] (+ dw_b[c]);
/// taps falling in the zero padding are skipped.
template <typename T>
__device__ __forceinline__ float dw_point(const T* __restrict__ x, const DwsepGeometry& g,
                                          const float* __restrict__ dw_w, const float* __restrict__ dw_b,
                                          const PixInfo& q, int c) {
  const T* xc = x + static_cast<int64_t>(q.n) * g.x.n + static_cast<int64_t>(c) * g.x.c;
  const float* wc = dw_w + static_cast<int64_t>(c) * g.kh * g.kw;
  const int ih0 = q.oh * g.sh - g.ph;
  const int iw0 = q.ow * g.sw - g.pw;
  float z = 0.f;
  for (int i = 0; i < g.kh; ++i) {
    const int ih = ih0 + i * g.dh;
    if (ih < 0 || ih >= g.H) continue;
    const T* row = xc + static_cast<int64_t>(ih) * g.x.h;
    for (int j = 0; j < g.kw; ++j) {
      const int iw = iw0 + j * g.dw;
      if (iw < 0 || iw >= g.W) continue;
      z = fmaf(__ldg(wc + i * g.kw + j), load_f32(row + static_cast<int64_t>(iw) * g.x.w), z);
    }
  }
  return dw_b != nullptr ? z + __ldg(dw_b + c) : z;  // bias after the taps, as F.conv2d
}

// ---------------------------------------------------------------------------------------------------------
// Shared-memory tile loaders. Each writes zeros outside the problem: padded K rows must contribute nothing
// to the GEMM (a pixel past the end, a channel past C), whatever the other operand holds there.

/// dst[p*sp + c*sc] = act(z[pixel p, channel c0 + c]) for p < kP, c < kC.
template <typename T, typename S, int kP, int kC>
__device__ void load_dw_tile(S* dst, int sp, int sc, const T* __restrict__ x, const DwsepGeometry& g,
                             const float* __restrict__ dw_w, const float* __restrict__ dw_b, const PixInfo* pix,
                             int c0, int act) {
  const bool ci = channels_inner(g.x);
  for (int e = threadIdx.x; e < kP * kC; e += kThreads) {
    const int p = ci ? e / kC : e % kP;
    const int c = ci ? e % kC : e / kP;
    const PixInfo q = pix[p];
    float v = 0.f;
    if (q.n >= 0 && c0 + c < g.C) v = act_fwd(dw_point(x, g, dw_w, dw_b, q, c0 + c), act);
    dst[p * sp + c * sc] = from_f32<S>(v);
  }
}

/// dst[p*sp + k*sk] = t[pixel p, channel k0 + k] for p < kP, k < kK; t is [N, Ct, Ho, Wo] with strides s.
template <typename T, typename S, int kP, int kK>
__device__ void load_pixel_tile(S* dst, int sp, int sk, const T* __restrict__ t, const Strides4& s, int ct,
                                const PixInfo* pix, int k0) {
  const bool ci = channels_inner(s);
  for (int e = threadIdx.x; e < kP * kK; e += kThreads) {
    const int p = ci ? e / kK : e % kP;
    const int k = ci ? e % kK : e / kP;
    const PixInfo q = pix[p];
    float v = 0.f;
    if (q.n >= 0 && k0 + k < ct) v = load_f32(t + offset_of(s, q.n, k0 + k, q.oh, q.ow));
    dst[p * sp + k * sk] = from_f32<S>(v);
  }
}

/// dst[k*ld + n] = w[(k0 + k) * ldw + n0 + n] for k < kK, n < kN; zero outside [0, rows) x [0, cols).
template <typename S, int kK, int kN>
__device__ void load_weight_tile(S* dst, int ld, const float* __restrict__ w, int64_t ldw, int k0, int rows, int n0,
                                 int cols) {
  for (int e = threadIdx.x; e < kK * kN; e += kThreads) {
    const int k = e / kN;
    const int n = e % kN;  // fastest: coalesced global reads, conflict-free shared stores
    const float v = (k0 + k < rows && n0 + n < cols) ? __ldg(w + (k0 + k) * ldw + n0 + n) : 0.f;
    dst[k * ld + n] = from_f32<S>(v);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Tile GEMM engines: O[kBM x kBN] (fp32) += A^T B over one K chunk, both operands K-major in shared memory.
// Interface: zero(); mma(A, B) once per K chunk (between the caller's syncs); store(O) writes the tile to
// shared O[m*kLdo + n], which every epilogue reads.

/// fp32 FMA, 4x4 microtile per thread at rows (tid/16)*4.., cols (tid%16)*4... Per K step one 16-byte load
/// of each operand feeds 16 FMAs; a warp's A loads are 2 broadcasts, its B loads 256 contiguous bytes.
template <typename S>
struct FmaTile {
  float acc[4][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  }

  __device__ __forceinline__ static void load4(const S* p, float v[4]) {
    if constexpr (sizeof(S) == 4) {
      const float4 f = *reinterpret_cast<const float4*>(p);
      v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = to_f32(p[i]);
    }
  }

  __device__ __forceinline__ void mma(const S* a, const S* b) {
    constexpr int ld = kLd<S>;
    const int m0 = (threadIdx.x / 16) * 4;
    const int n0 = (threadIdx.x % 16) * 4;
#pragma unroll 8
    for (int k = 0; k < kBK; ++k) {
      float av[4], bv[4];
      load4(a + k * ld + m0, av);
      load4(b + k * ld + n0, bv);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* o) const {
    const int m0 = (threadIdx.x / 16) * 4;
    const int n0 = (threadIdx.x % 16) * 4;
#pragma unroll
    for (int i = 0; i < 4; ++i)
      *reinterpret_cast<float4*>(o + (m0 + i) * kLdo + n0) = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
  }
};

/// Tensor cores (sm_80+ for bf16): warp w owns rows 16*(w%4).., cols 32*(w/4).. as two 16x16 fp32
/// accumulators; fp16/bf16 operands are exact copies of the inputs (or, for the activation, its rounding
/// to the input dtype, which is what PyTorch's own two-kernel path feeds its pointwise conv).
template <typename S>
struct WmmaTile {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2];

  __device__ __forceinline__ void zero() {
    nvcuda::wmma::fill_fragment(acc[0], 0.f);
    nvcuda::wmma::fill_fragment(acc[1], 0.f);
  }

  __device__ __forceinline__ void mma(const S* a, const S* b) {
    namespace w = nvcuda::wmma;
    constexpr int ld = kLd<S>;
    const int warp = threadIdx.x / 32;
    const int m0 = 16 * (warp % 4);
    const int n0 = 32 * (warp / 4);
#pragma unroll
    for (int k0 = 0; k0 < kBK; k0 += 16) {
      w::fragment<w::matrix_a, 16, 16, 16, S, w::col_major> fa;  // A[m][k] at a[k*ld + m]
      w::load_matrix_sync(fa, a + k0 * ld + m0, ld);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        w::fragment<w::matrix_b, 16, 16, 16, S, w::row_major> fb;  // B[k][n] at b[k*ld + n]
        w::load_matrix_sync(fb, b + k0 * ld + n0 + 16 * f, ld);
        w::mma_sync(acc[f], fa, fb, acc[f]);
      }
    }
  }

  __device__ __forceinline__ void store(float* o) const {
    const int warp = threadIdx.x / 32;
    const int m0 = 16 * (warp % 4);
    const int n0 = 32 * (warp / 4);
    nvcuda::wmma::store_matrix_sync(o + m0 * kLdo + n0, acc[0], kLdo, nvcuda::wmma::mem_row_major);
    nvcuda::wmma::store_matrix_sync(o + m0 * kLdo + n0 + 16, acc[1], kLdo, nvcuda::wmma::mem_row_major);
  }
};

// Per element type: S = the shared-memory operand type, Engine = the GEMM. fp16/bf16 operands stay in
// their own type in shared memory (exact for inputs and weights, half the bytes of fp32).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define EFFIKERN_DWSEP_WMMA 0
#else
#define EFFIKERN_DWSEP_WMMA 1
#endif

template <typename T>
struct TileTraits {
  using S = float;
  using Engine = FmaTile<float>;
};
template <>
struct TileTraits<__half> {
  using S = __half;
#if EFFIKERN_DWSEP_WMMA
  using Engine = WmmaTile<__half>;
#else
  using Engine = FmaTile<__half>;
#endif
};
template <>
struct TileTraits<__nv_bfloat16> {
  using S = __nv_bfloat16;
#if EFFIKERN_DWSEP_WMMA
  using Engine = WmmaTile<__nv_bfloat16>;
#else
  using Engine = FmaTile<__nv_bfloat16>;
#endif
};

// ---------------------------------------------------------------------------------------------------------
// Forward. Block = (64 flattened output pixels) x (64 output channels); tiles walked grid-stride with the
// Cout tile fastest, so blocks that recompute the same depthwise rows run together and share x in L2.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    dwsep_fwd_kernel(const DwsepGeometry g, const T* __restrict__ x, const float* __restrict__ dw_w,
                     const float* __restrict__ dw_b, const float* __restrict__ pw_wT, const float* __restrict__ pw_b,
                     const T* __restrict__ res, const Strides4 rs, T* __restrict__ y, const int act) {
  using S = typename TileTraits<T>::S;
  constexpr int ld = kLd<S>;
  __shared__ __align__(128) S as[kBK * ld];     // a[c][p]: act(dw(x)) for a C chunk
  __shared__ __align__(128) S ws[kBK * ld];     // pw_w^T[c][co]
  __shared__ __align__(128) float os[kBM * kLdo];  // y[p][co] before bias / residual
  __shared__ PixInfo pix[kBM];

  const int co_tiles = static_cast<int>(ceil_div(g.Cout, kBN));
  const int64_t tiles = ceil_div(num_pixels(g), kBM) * co_tiles;
  const bool y_ci = channels_inner(g.y);

  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int co0 = static_cast<int>(t % co_tiles) * kBN;
    decode_pixels(pix, (t / co_tiles) * kBM, kBM, g);
    __syncthreads();

    typename TileTraits<T>::Engine eng;
    eng.zero();
    for (int c0 = 0; c0 < g.C; c0 += kBK) {
      load_dw_tile<T, S, kBM, kBK>(as, 1, ld, x, g, dw_w, dw_b, pix, c0, act);
      load_weight_tile<S, kBK, kBN>(ws, ld, pw_wT, g.Cout, c0, g.C, co0, g.Cout);
      __syncthreads();
      eng.mma(as, ws);
      __syncthreads();  // as / ws are overwritten by the next chunk
    }
    eng.store(os);
    __syncthreads();

    // Epilogue in y's layout order: consecutive threads store consecutive addresses.
    for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
      const int p = y_ci ? e / kBN : e % kBM;
      const int co = y_ci ? e % kBN : e / kBM;
      const PixInfo q = pix[p];
      if (q.n < 0 || co0 + co >= g.Cout) continue;
      float v = os[p * kLdo + co];
      if (pw_b != nullptr) v += __ldg(pw_b + co0 + co);
      if (res != nullptr) v += load_f32(res + offset_of(rs, q.n, co0 + co, q.oh, q.ow));
      y[offset_of(g.y, q.n, co0 + co, q.oh, q.ow)] = from_f32<T>(v);
    }
    __syncthreads();  // pix and os are rewritten by the next tile
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward 1/4: grad_z. Block = (64 pixels) x (64 input channels), K = Cout in chunks of 32:
// grad_a[p][c] = sum_co grad_y[p][co] * pw_w[co][c]. The epilogue recomputes z for its (p, c) (the taps
// are read right there, no staging needed), writes grad_z = grad_a * act'(z) in fp32 and reduces it over
// the tile's pixels into grad_dw_b.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    dwsep_bwd_gradz_kernel(const DwsepGeometry g, const T* __restrict__ gy, const T* __restrict__ x,
                           const float* __restrict__ dw_w, const float* __restrict__ dw_b,
                           const float* __restrict__ pw_w, const int act, float* __restrict__ gz, const Strides4 gzs,
                           float* __restrict__ grad_dw_b) {
  using S = typename TileTraits<T>::S;
  constexpr int ld = kLd<S>;
  __shared__ __align__(128) S gs[kBK * ld];        // grad_y[co][p]
  __shared__ __align__(128) S ws[kBK * ld];        // pw_w[co][c]
  __shared__ __align__(128) float os[kBM * kLdo];  // grad_a[p][c]
  __shared__ PixInfo pix[kBM];
  __shared__ float bias_part[kBN];

  const int c_tiles = static_cast<int>(ceil_div(g.C, kBN));
  const int64_t tiles = ceil_div(num_pixels(g), kBM) * c_tiles;
  const bool x_ci = channels_inner(g.x);  // grad_z scratch has x's memory format
  const int lane = threadIdx.x % 32;

  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int c0 = static_cast<int>(t % c_tiles) * kBN;
    decode_pixels(pix, (t / c_tiles) * kBM, kBM, g);
    if (threadIdx.x < kBN) bias_part[threadIdx.x] = 0.f;
    __syncthreads();

    typename TileTraits<T>::Engine eng;
    eng.zero();
    for (int co0 = 0; co0 < g.Cout; co0 += kBK) {
      load_pixel_tile<T, S, kBM, kBK>(gs, 1, ld, gy, g.y, g.Cout, pix, co0);
      load_weight_tile<S, kBK, kBN>(ws, ld, pw_w, g.C, co0, g.Cout, c0, g.C);
      __syncthreads();
      eng.mma(gs, ws);
      __syncthreads();
    }
    eng.store(os);
    __syncthreads();

    // Channels-inner order: a thread's channel is tid % 64 for all its elements -> register sum.
    // Pixels-inner order: a warp's 32 elements share one channel -> warp shuffle sum.
    float bsum = 0.f;
#pragma unroll 1
    for (int k = 0; k < kBM * kBN / kThreads; ++k) {  // uniform trip count: every lane reaches warp_sum
      const int e = threadIdx.x + k * kThreads;
      const int p = x_ci ? e / kBN : e % kBM;
      const int c = x_ci ? e % kBN : e / kBM;
      const PixInfo q = pix[p];
      float v = 0.f;
      if (q.n >= 0 && c0 + c < g.C) {
        // Without an activation grad_z is grad_a: skip recomputing z (kh*kw reads of x per element).
        const float z = act == kNone ? 0.f : dw_point(x, g, dw_w, dw_b, q, c0 + c);
        v = os[p * kLdo + c] * act_grad(z, act);
        gz[offset_of(gzs, q.n, c0 + c, q.oh, q.ow)] = v;
      }
      if (x_ci) {
        bsum += v;
      } else {
        v = warp_sum(v);
        if (lane == 0) atomicAdd(&bias_part[c], v);
      }
    }
    if (x_ci) atomicAdd(&bias_part[threadIdx.x % kBN], bsum);
    __syncthreads();
    if (threadIdx.x < kBN && c0 + static_cast<int>(threadIdx.x) < g.C)
      atomicAdd(grad_dw_b + c0 + threadIdx.x, bias_part[threadIdx.x]);
    __syncthreads();  // pix, os and bias_part are rewritten by the next tile
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward 2/4: grad_pw_w[co][c] = sum_p grad_y[p][co] * act(z)[p][c], grad_pw_b[co] = sum_p grad_y[p][co].
// Block = (64 Cout) x (64 C) x (one split of the pixels), K = pixels in chunks of 32; act(z) is recomputed
// per chunk (kh*kw FMAs per value against 64 of GEMM per value: cheap, and no N*C*Ho*Wo buffer).
// Each block adds its partial tile to the fp32 outputs with atomics; the host picks the split count so
// there are a few blocks per SM and each split still covers >= 256 pixels.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    dwsep_bwd_pw_kernel(const DwsepGeometry g, const T* __restrict__ gy, const T* __restrict__ x,
                        const float* __restrict__ dw_w, const float* __restrict__ dw_b, const int act,
                        const int64_t chunks_per_split, const int splits, float* __restrict__ grad_pw_w,
                        float* __restrict__ grad_pw_b) {
  using S = typename TileTraits<T>::S;
  constexpr int ld = kLd<S>;
  __shared__ __align__(128) S gs[kBK * ld];        // grad_y[p][co]
  __shared__ __align__(128) S as[kBK * ld];        // act(z)[p][c]
  __shared__ __align__(128) float os[kBM * kLdo];  // grad_pw_w[co][c] partial
  __shared__ PixInfo pix[kBK];

  const int c_tiles = static_cast<int>(ceil_div(g.C, kBN));
  const int co_tiles = static_cast<int>(ceil_div(g.Cout, kBM));
  const int64_t tiles = static_cast<int64_t>(c_tiles) * co_tiles * splits;
  const int64_t chunks = ceil_div(num_pixels(g), kBK);

  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    // (c, co) tile fastest: neighbouring blocks read the same pixels of x and grad_y.
    const int c0 = static_cast<int>(t % c_tiles) * kBN;
    const int co0 = static_cast<int>((t / c_tiles) % co_tiles) * kBM;
    const int64_t split = t / (static_cast<int64_t>(c_tiles) * co_tiles);
    const int64_t chunk_end = (split + 1) * chunks_per_split < chunks ? (split + 1) * chunks_per_split : chunks;
    const bool sums_bias = c0 == 0 && threadIdx.x < kBM;  // one block column owns grad_pw_b

    typename TileTraits<T>::Engine eng;
    eng.zero();
    float bsum = 0.f;
    for (int64_t chunk = split * chunks_per_split; chunk < chunk_end; ++chunk) {
      decode_pixels(pix, chunk * kBK, kBK, g);
      __syncthreads();
      load_pixel_tile<T, S, kBK, kBM>(gs, ld, 1, gy, g.y, g.Cout, pix, co0);
      load_dw_tile<T, S, kBK, kBN>(as, ld, 1, x, g, dw_w, dw_b, pix, c0, act);
      __syncthreads();
      if (sums_bias) {
        for (int k = 0; k < kBK; ++k) bsum += to_f32(gs[k * ld + threadIdx.x]);
      }
      eng.mma(gs, as);
      __syncthreads();  // pix, gs, as are rewritten by the next chunk
    }
    eng.store(os);
    __syncthreads();

    for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
      const int co = e / kBN;
      const int c = e % kBN;  // grad_pw_w is [Cout][C]: c fastest
      if (co0 + co < g.Cout && c0 + c < g.C)
        atomicAdd(grad_pw_w + static_cast<int64_t>(co0 + co) * g.C + c0 + c, os[co * kLdo + c]);
    }
    if (sums_bias && co0 + static_cast<int>(threadIdx.x) < g.Cout) atomicAdd(grad_pw_b + co0 + threadIdx.x, bsum);
    __syncthreads();  // os is rewritten by the next tile
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward 3/4: grad_dw_w[c][tap] = sum over (n, oh, ow) of grad_z[n,c,oh,ow] * x[n, c, oh*sh-ph+i*dh, ...].
// Block = 512 flattened pixels x a channel group. Channels-inner: lanes = 32 channels, warps split the
// pixels; pixels-inner: warps = 8 channels, lanes split the pixels. Taps go in passes of 8 with register
// accumulators (any kh*kw works; grad_z is read once per pass, the shifted x mostly hits L1), then one
// block reduction and one atomic per (channel, tap) per pass.
constexpr int kDwwPixels = 512;
constexpr int kTapsPerPass = 8;
static_assert(kThreads == kTapsPerPass * 32, "the cross-warp reduction maps one thread per (tap, lane)");

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    dwsep_bwd_dww_kernel(const DwsepGeometry g, const float* __restrict__ gz, const Strides4 gzs,
                         const T* __restrict__ x, float* __restrict__ grad_dw_w) {
  constexpr int kWarps = kThreads / 32;
  __shared__ PixInfo pix[kDwwPixels];
  __shared__ float red[kWarps][kTapsPerPass][32];

  const bool ci = channels_inner(g.x);
  const int group = ci ? 32 : kWarps;  // channels per block
  const int c_groups = static_cast<int>(ceil_div(g.C, group));
  const int64_t tiles = ceil_div(num_pixels(g), kDwwPixels) * c_groups;
  const int taps = g.kh * g.kw;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int slot0 = ci ? warp : lane;
  const int slot_step = ci ? kWarps : 32;

  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int cg0 = static_cast<int>(t % c_groups) * group;
    const int c = cg0 + (ci ? lane : warp);
    const bool c_ok = c < g.C;
    decode_pixels(pix, (t / c_groups) * kDwwPixels, kDwwPixels, g);
    __syncthreads();

    for (int tap0 = 0; tap0 < taps; tap0 += kTapsPerPass) {
      int dy[kTapsPerPass], dx[kTapsPerPass];  // tap offsets from (oh*sh - ph, ow*sw - pw)
      float acc[kTapsPerPass];
#pragma unroll
      for (int u = 0; u < kTapsPerPass; ++u) {
        const int tap = min(tap0 + u, taps - 1);  // past the last tap: any offset, the tap is never loaded
        dy[u] = (tap / g.kw) * g.dh;
        dx[u] = (tap % g.kw) * g.dw;
        acc[u] = 0.f;
      }
      if (c_ok) {
        for (int s = slot0; s < kDwwPixels; s += slot_step) {
          const PixInfo q = pix[s];
          if (q.n < 0) break;  // the tail slots are all past the last pixel
          const float gv = __ldg(gz + offset_of(gzs, q.n, c, q.oh, q.ow));
          const T* xc = x + static_cast<int64_t>(q.n) * g.x.n + static_cast<int64_t>(c) * g.x.c;
          const int ih0 = q.oh * g.sh - g.ph;
          const int iw0 = q.ow * g.sw - g.pw;
#pragma unroll
          for (int u = 0; u < kTapsPerPass; ++u) {
            const int ih = ih0 + dy[u];
            const int iw = iw0 + dx[u];
            if (tap0 + u < taps && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W)
              acc[u] = fmaf(gv, load_f32(xc + static_cast<int64_t>(ih) * g.x.h + static_cast<int64_t>(iw) * g.x.w),
                            acc[u]);
          }
        }
      }
      if (ci) {  // threads sharing a channel sit in different warps: reduce through shared memory
#pragma unroll
        for (int u = 0; u < kTapsPerPass; ++u) red[warp][u][lane] = acc[u];
        __syncthreads();
        const int u = threadIdx.x / 32;  // this thread sums tap tap0 + u of channel cg0 + lane
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum += red[w][u][lane];
        if (cg0 + lane < g.C && tap0 + u < taps)
          atomicAdd(grad_dw_w + static_cast<int64_t>(cg0 + lane) * taps + tap0 + u, sum);
        __syncthreads();  // red is rewritten by the next pass
      } else {  // the whole warp shares a channel: shuffle-reduce (all lanes take part, c_ok is warp-uniform)
#pragma unroll
        for (int u = 0; u < kTapsPerPass; ++u) {
          const float sum = warp_sum(acc[u]);
          if (lane == 0 && c_ok && tap0 + u < taps) atomicAdd(grad_dw_w + static_cast<int64_t>(c) * taps + tap0 + u, sum);
        }
      }
    }
    __syncthreads();  // pix is rewritten by the next tile
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward 4/4: grad_x[n,c,ih,iw] = sum over taps (i, j) whose output (oh, ow) = ((ih+ph-i*dh)/sh, ...) is
// an integer inside the output, of grad_z[n,c,oh,ow] * dw_w[c,i,j]. One thread per grad_x element in
// memory order (coalesced stores, and grad_z has the same layout); a gather, so no atomics.

/// v / s if s divides v exactly (v >= 0), else -1.
__device__ __forceinline__ int exact_div(int v, int s) {
  if (s == 1) return v;
  const int q = v / s;
  return q * s == v ? q : -1;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dwsep_bwd_gx_kernel(const DwsepGeometry g, const float* __restrict__ gz, const Strides4 gzs,
                        const float* __restrict__ dw_w, T* __restrict__ gx) {
  const int64_t per_image = static_cast<int64_t>(g.C) * g.H * g.W;
  const bool ci = channels_inner(g.x);
  const bool wide = per_image > INT_MAX;  // one image past 2^31 elements: decode in int64
  for (int n = blockIdx.y; n < g.N; n += gridDim.y) {
    for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < per_image;
         e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      int c, ih, iw;
      if (!wide) {
        const int e32 = static_cast<int>(e);
        if (ci) {
          c = e32 % g.C;
          const int r = e32 / g.C;
          iw = r % g.W;
          ih = r / g.W;
        } else {
          iw = e32 % g.W;
          const int r = e32 / g.W;
          ih = r % g.H;
          c = r / g.H;
        }
      } else if (ci) {
        c = static_cast<int>(e % g.C);
        const int64_t r = e / g.C;
        iw = static_cast<int>(r % g.W);
        ih = static_cast<int>(r / g.W);
      } else {
        iw = static_cast<int>(e % g.W);
        const int64_t r = e / g.W;
        ih = static_cast<int>(r % g.H);
        c = static_cast<int>(r / g.H);
      }
      const float* gzc = gz + static_cast<int64_t>(n) * gzs.n + static_cast<int64_t>(c) * gzs.c;
      const float* wc = dw_w + static_cast<int64_t>(c) * g.kh * g.kw;
      float acc = 0.f;
      for (int i = 0; i < g.kh; ++i) {
        const int ohs = ih + g.ph - i * g.dh;
        if (ohs < 0) break;  // decreases with i
        const int oh = exact_div(ohs, g.sh);
        if (oh < 0 || oh >= g.Ho) continue;
        for (int j = 0; j < g.kw; ++j) {
          const int ows = iw + g.pw - j * g.dw;
          if (ows < 0) break;
          const int ow = exact_div(ows, g.sw);
          if (ow < 0 || ow >= g.Wo) continue;
          acc = fmaf(__ldg(wc + i * g.kw + j),
                     __ldg(gzc + static_cast<int64_t>(oh) * gzs.h + static_cast<int64_t>(ow) * gzs.w), acc);
        }
      }
      gx[offset_of(g.x, n, c, ih, iw)] = from_f32<T>(acc);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// dtype conversions for weights (to fp32, optionally transposed) and fp32 gradients (back to the input dtype).
template <typename T>
__global__ void to_f32_kernel(const T* __restrict__ src, float* __restrict__ dst, int64_t rows, int64_t cols,
                              bool transpose) {
  const int64_t count = rows * cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / cols;
    const int64_t c = e - r * cols;
    dst[transpose ? c * rows + r : e] = to_f32(src[e]);
  }
}

template <typename T>
__global__ void from_f32_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t count) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[e] = from_f32<T>(src[e]);
}

// ---------------------------------------------------------------------------------------------------------
// Host side.

/// Grid size for a grid-stride loop over `work` items (kernels loop, so capping never loses work).
unsigned int grid_for(int64_t work, int64_t cap = INT_MAX) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(work, cap)));
}

int sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return 0;
  return sms;
}

}  // namespace

cudaError_t dwsep_forward(const DwsepGeometry& g, DType dtype, const void* x, const float* dw_w, const float* dw_b,
                          const float* pw_wT, const float* pw_b, const void* residual, Strides4 res_strides,
                          void* y, int activation, cudaStream_t stream) {
  const int64_t tiles = ceil_div(num_pixels(g), kBM) * ceil_div(g.Cout, kBN);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    dwsep_fwd_kernel<T><<<grid_for(tiles), kThreads, 0, stream>>>(
        g, static_cast<const T*>(x), dw_w, dw_b, pw_wT, pw_b, static_cast<const T*>(residual), res_strides,
        static_cast<T*>(y), activation);
    return cudaGetLastError();
  });
}

cudaError_t dwsep_backward(const DwsepGeometry& g, DType dtype, const void* grad_y, const void* x, const float* dw_w,
                           const float* dw_b, const float* pw_w, int activation, float* grad_z, Strides4 gz_strides,
                           void* grad_x, float* grad_dw_w, float* grad_dw_b, float* grad_pw_w, float* grad_pw_b,
                           cudaStream_t stream) {
  const int64_t taps = static_cast<int64_t>(g.kh) * g.kw;
  const struct {
    float* p;
    int64_t n;
  } zeroed[] = {{grad_dw_w, g.C * taps}, {grad_dw_b, g.C}, {grad_pw_w, static_cast<int64_t>(g.Cout) * g.C},
                {grad_pw_b, g.Cout}};
  for (const auto& z : zeroed) {
    const cudaError_t err = cudaMemsetAsync(z.p, 0, z.n * sizeof(float), stream);
    if (err != cudaSuccess) return err;
  }

  const int64_t pixels = num_pixels(g);
  const int sms = std::max(1, sm_count());

  // Split K (pixels) of the pointwise-weight GEMM: about 4 blocks per SM in all, but >= 8 chunks (256
  // pixels) per split, past which the per-block atomics would cost more than the GEMM they finish.
  const int64_t chunks = ceil_div(pixels, kBK);
  const int64_t pw_tiles = ceil_div(g.Cout, kBM) * ceil_div(g.C, kBN);
  int64_t splits = std::min(ceil_div(4 * sms, pw_tiles), ceil_div(chunks, 8));
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, INT_MAX / pw_tiles));
  const int64_t chunks_per_split = ceil_div(chunks, splits);
  splits = ceil_div(chunks, chunks_per_split);  // no empty split

  const int64_t gradz_tiles = ceil_div(pixels, kBM) * ceil_div(g.C, kBN);
  const bool x_ci = g.x.c < g.x.w;  // as channels_inner() in the kernels
  const int64_t dww_tiles = ceil_div(pixels, kDwwPixels) * ceil_div(g.C, x_ci ? 32 : kThreads / 32);
  const dim3 gx_grid(grid_for(ceil_div(static_cast<int64_t>(g.C) * g.H * g.W, kThreads), 1 << 20),
                     grid_for(g.N, 65535));

  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* gy = static_cast<const T*>(grad_y);
    const T* xt = static_cast<const T*>(x);
    dwsep_bwd_gradz_kernel<T><<<grid_for(gradz_tiles), kThreads, 0, stream>>>(g, gy, xt, dw_w, dw_b, pw_w, activation,
                                                                              grad_z, gz_strides, grad_dw_b);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    dwsep_bwd_pw_kernel<T><<<grid_for(pw_tiles * splits), kThreads, 0, stream>>>(
        g, gy, xt, dw_w, dw_b, activation, chunks_per_split, static_cast<int>(splits), grad_pw_w, grad_pw_b);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    dwsep_bwd_dww_kernel<T><<<grid_for(dww_tiles), kThreads, 0, stream>>>(g, grad_z, gz_strides, xt, grad_dw_w);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    dwsep_bwd_gx_kernel<T><<<gx_grid, kThreads, 0, stream>>>(g, grad_z, gz_strides, dw_w, static_cast<T*>(grad_x));
    return cudaGetLastError();
  });
}

cudaError_t convert_to_f32(const void* src, DType dtype, float* dst, int64_t rows, int64_t cols, bool transpose,
                           cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    to_f32_kernel<T><<<grid_for(ceil_div(rows * cols, kThreads), 4096), kThreads, 0, stream>>>(
        static_cast<const T*>(src), dst, rows, cols, transpose);
    return cudaGetLastError();
  });
}

cudaError_t convert_from_f32(const float* src, void* dst, DType dtype, int64_t count, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    from_f32_kernel<T><<<grid_for(ceil_div(count, kThreads), 4096), kThreads, 0, stream>>>(src, static_cast<T*>(dst),
                                                                                          count);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace effikern
