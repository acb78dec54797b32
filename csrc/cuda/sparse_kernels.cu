// Sparse-weight matmul CUDA kernels and their host launchers (interface and conventions: sparse_kernels.h).
// Pure CUDA: no torch header, so it compiles with nvcc alone.
//
// Floors (H100 SXM: ~3 TB/s HBM, ~990 TFLOP/s dense fp16 tensor-core peak; no GPU measurement of these
// kernels yet, so every number here is a bound, not a result):
//
// * csr_mm_kernel (unstructured, few tokens): memory-bound. Compulsory bytes = nnz * (value + 1-byte in-panel
//   column) + 4 bytes per segment (N * ceil(K/256) + 1 int32 pointers) + M*K + M*N elements. 4096x4096 at 90%
//   sparsity, fp16, M = 1..16: nnz = 1.68 M -> 1.68 M * 3 B + 65.5 k * 4 B ~ 5.3 MB -> ~1.8 us at 3 TB/s,
//   against the dense weight's 33.5 MB (~11 us); FLOPs 2*M*nnz = 54 MFLOP at M = 16 are nothing. Unmeasured:
//   no GPU has run the panelled kernels yet. Design: a warp per output row walks its entries (coalesced
//   value/offset reads), each entry feeding TM tokens from x staged token-major in shared memory; values are
//   read exactly once.
// * bsr_mm_kernel (blocks, many tokens): compute-bound at large M. FLOPs 2*M*nnz: 4096 tokens, 4096x4096,
//   block 32 at 90% -> 13.7 GFLOP -> ~14 us at peak; compulsory bytes x + y + values = 33.5 + 33.5 + 3.4 MB
//   -> ~23 us, so the floor is ~23 us (dense: 137 GFLOP, ~139 us at peak). Design: a 64-token x OB output
//   tile per 128-thread block, walking only the block row's stored blocks, through tensor cores (WMMA,
//   fp16/bf16, fp32 accumulate) or an fp32 FMA microtile. No cp.async pipelining yet: expect well below peak.
// * csr_sddmm_kernel / bsr_sddmm_kernel (grad of the stored values): FLOPs 2*M*nnz as above; bytes
//   gy + x + indices + the gradient itself.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "sparse_kernels.h"
#include "element.cuh"

namespace effikern {
namespace cuda {
namespace sparse {
namespace {

// Element conversion (to_f32, from_f32, load_f32) and ceil_div: element.cuh.

/// Sum over `width` consecutive lanes (a power of two <= 32); every lane of the group gets the total.
__device__ __forceinline__ float group_sum(float v, int width) {
  for (int o = width / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

int sm_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return 108;  // the error resurfaces at launch; any positive count keeps the grid valid meanwhile
  return std::max(sms, 1);
}

/// Dynamic shared memory a block may opt into on the current device: 227 KiB on sm_90, 163 KiB on sm_80, 99 KiB
/// on sm_86/89, 96 KiB on sm_70, but 64 KiB on sm_75, where asking for more makes cudaFuncSetAttribute fail.
int64_t smem_optin() {
  int device = 0, bytes = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    return 48 * 1024;  // every device allows this without opting in; the error resurfaces at launch
  return bytes;
}

// =========================================================================================================
// Unstructured (panelled CSR), few tokens.
// =========================================================================================================
constexpr int kCsrThreads = 256;
constexpr int kCsrWarps = kCsrThreads / 32;
constexpr int64_t kCsrMaxSmem = 96 * 1024;  // x chunk staged in shared memory up to this; else read via L1

/// Index loads of the helpers below, which the host emulation check in tests/test_cuda_sources_compile.py
/// also runs: the read-only cache on the device, a plain read on the host.
__host__ __device__ __forceinline__ int32_t load_index(const int32_t* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

/// Where one lane is among the P segments of the row it walks. A lane's entries (row start + lane, then + 32
/// each step) only grow, so the panel of each is found by stepping forward over the row's segment ends, never
/// by a search; the current end is cached, so a pointer is read only when the lane crosses into a later panel
/// (at most P reads per lane and row, hitting L1: a row's P + 1 pointers are adjacent).
struct PanelCursor {
  const int32_t* seg_end;  // seg_end[p] = ptr[o*P + p + 1]: one past segment p of this row
  int64_t last;            // P - 1: never reads past its own row's pointers, even when they are inconsistent
  int64_t panel;
  int32_t limit;           // seg_end[panel]

  __host__ __device__ __forceinline__ PanelCursor(const int32_t* row_ptr, int64_t panels)
      : seg_end(row_ptr + 1), last(panels - 1), panel(0), limit(load_index(row_ptr + 1)) {}

  /// The panel of entry e, for e that never decreases from one call to the next.
  __host__ __device__ __forceinline__ int64_t panel_of(int64_t e) {
    while (e >= limit && panel < last) limit = load_index(seg_end + ++panel);
    return panel;
  }
};

/// Row and column of an entry of segment s at in-panel offset `offset`, with `panels` = P; false when they
/// fall outside [rows, cols] (a segment past the last row, an offset past the width in the last panel), which
/// a well-formed weight never has. `panels` is 32-bit so the per-entry division is a 32-bit one; the launcher
/// clamps P to UINT32_MAX, which gives the same quotient and remainder for every s < 2^31.
__host__ __device__ __forceinline__ bool segment_entry(int32_t s, uint8_t offset, uint32_t panels, int64_t rows,
                                                      int64_t cols, int64_t* r, int64_t* c) {
  if (s < 0) return false;
  const uint32_t q = static_cast<uint32_t>(s) / panels;
  *r = q;
  *c = static_cast<int64_t>(static_cast<uint32_t>(s) - q * panels) * kCsrPanel + offset;
  return *r < rows && *c < cols;
}

/// Block: 8 warps; a token chunk of TM tokens (grid y, strided) x output rows (grid x, warp-strided).
/// A warp walks its row's entries ptr[o*P] .. ptr[(o+1)*P] as one range, lanes striding by 32, each lane
/// recovering its entry's panel with a PanelCursor. Why not one segment at a time: a 256-column panel holds
/// ~26 entries at 90% sparsity (~13 at 95%), so a warp sweeping a segment per step would idle a fifth (over
/// half) of its lanes; over the whole row only the row's last step is partial.
/// kSmem: the chunk a_t[:, m0 : m0+TM] is first staged in shared memory as [P*256][TM] (one entry's TM
/// tokens adjacent, rows past in_features zero), so every in-panel offset reads inside the stage, even one past
/// in_features in the last panel, without a per-entry check; otherwise it is gathered from global memory
/// (token-major, so still one sector) and an entry past in_features is skipped.
template <typename T, int TM, bool kSmem>
__global__ void __launch_bounds__(kCsrThreads)
    csr_mm_kernel(const T* __restrict__ a_t, const int M, const int64_t in_features, const int32_t* __restrict__ ptr,
                  const int64_t panels, const uint8_t* __restrict__ idx, const int32_t* __restrict__ perm,
                  const T* __restrict__ values, const T* __restrict__ bias, const int64_t out_features,
                  T* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char csr_smem[];
  T* xs = reinterpret_cast<T*>(csr_smem);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int chunks = static_cast<int>(ceil_div(M, TM));

  for (int chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
    const int m0 = chunk * TM;
    const int tm = min(TM, M - m0);
    if (kSmem) {
      __syncthreads();  // the previous chunk's readers are done
      for (int64_t q = threadIdx.x; q < panels * kCsrPanel * TM; q += kCsrThreads) {
        const int64_t i = q / TM;
        const int t = static_cast<int>(q % TM);
        xs[q] = t < tm && i < in_features ? a_t[i * M + m0 + t] : from_f32<T>(0.f);
      }
      __syncthreads();
    }
    for (int64_t o = static_cast<int64_t>(blockIdx.x) * kCsrWarps + warp; o < out_features;
         o += static_cast<int64_t>(gridDim.x) * kCsrWarps) {
      float acc[TM];
#pragma unroll
      for (int t = 0; t < TM; ++t) acc[t] = 0.f;
      const int32_t* row_ptr = ptr + o * panels;
      const int64_t end = __ldg(row_ptr + panels);
      PanelCursor cursor(row_ptr, panels);
      for (int64_t e = __ldg(row_ptr) + lane; e < end; e += 32) {
        const int64_t i = cursor.panel_of(e) * kCsrPanel + __ldg(idx + e);
        if (!kSmem && i >= in_features) continue;
        const float v = load_f32(values + (perm != nullptr ? __ldg(perm + e) : e));
#pragma unroll
        for (int t = 0; t < TM; ++t) {
          float xv;
          if (kSmem) {
            xv = to_f32(xs[i * TM + t]);
          } else {
            xv = t < tm ? load_f32(a_t + i * M + m0 + t) : 0.f;
          }
          acc[t] = fmaf(v, xv, acc[t]);
        }
      }
      const float b = bias != nullptr ? load_f32(bias + o) : 0.f;
#pragma unroll
      for (int t = 0; t < TM; ++t) {
        const float s = group_sum(acc[t], 32);
        if (lane == t && t < tm) out[static_cast<int64_t>(m0 + t) * out_features + o] = from_f32<T>(s + b);
      }
    }
  }
}

template <typename T, int TM>
cudaError_t launch_csr_mm(const T* a_t, int64_t M, int64_t in_features, const int32_t* ptr, const uint8_t* idx,
                          const int32_t* perm, const T* values, const T* bias, int64_t out_features, T* out,
                          cudaStream_t stream) {
  // The stage spans whole panels (P*256 rows, not in_features): csr_mm_kernel.
  const int64_t panels = csr_panels(in_features);
  const int64_t smem = panels * kCsrPanel * TM * static_cast<int64_t>(sizeof(T));
  const int sms = sm_count();
  const int chunks = static_cast<int>(std::min<int64_t>(ceil_div(M, TM), 65535));
  // Staging costs every block a read of the chunk (P*256*TM elements from L2): a few blocks per SM, each
  // sweeping many rows, amortise it; without staging one block per 8 rows is simplest.
  const int64_t row_blocks = ceil_div(out_features, kCsrWarps);
  // Past the device's opt-in limit (64 KiB on sm_75: fp32, 9+ tokens, K > 1024) the stage falls back to global reads.
  if (smem <= std::min(kCsrMaxSmem, smem_optin())) {
    auto kernel = csr_mm_kernel<T, TM, true>;
    if (smem > 48 * 1024) {
      const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (err != cudaSuccess) return err;
    }
    const int gx = static_cast<int>(std::min<int64_t>(row_blocks, std::max<int64_t>(1, 2 * sms / chunks)));
    kernel<<<dim3(std::max(gx, 1), chunks), kCsrThreads, static_cast<size_t>(smem), stream>>>(
        a_t, static_cast<int>(M), in_features, ptr, panels, idx, perm, values, bias, out_features, out);
  } else {
    const int gx = static_cast<int>(std::min<int64_t>(row_blocks, INT_MAX));
    csr_mm_kernel<T, TM, false><<<dim3(gx, chunks), kCsrThreads, 0, stream>>>(
        a_t, static_cast<int>(M), in_features, ptr, panels, idx, perm, values, bias, out_features, out);
  }
  return cudaGetLastError();
}

/// One group of G lanes per entry (G = tokens rounded up to a power of two, at most 32): the group's lanes
/// stride over the tokens (contiguous in the token-major inputs), then reduce. An entry is located from its
/// own segment (row[e]) and offset, so entries need no order and no walk; one outside [N, K] (never in a
/// well-formed weight) gets 0 rather than a read outside gy or x.
template <typename T>
__global__ void __launch_bounds__(kCsrThreads)
    csr_sddmm_kernel(const T* __restrict__ gy_t, const T* __restrict__ x_t, const int64_t M, const int64_t N,
                     const int64_t K, const uint32_t panels, const int32_t* __restrict__ row,
                     const uint8_t* __restrict__ col, const int64_t nnz, const int G, T* __restrict__ out) {
  const int groups_per_block = kCsrThreads / G;
  const int g = threadIdx.x / G;
  const int lane = threadIdx.x % G;
  // Trip counts are uniform across the warp (the bound is per block), so the shuffles see every lane.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * groups_per_block; base < nnz;
       base += static_cast<int64_t>(gridDim.x) * groups_per_block) {
    const int64_t e = base + g;
    float acc = 0.f;
    int64_t r = 0, c = 0;
    if (e < nnz && segment_entry(__ldg(row + e), __ldg(col + e), panels, N, K, &r, &c)) {
      const T* gy = gy_t + r * M;
      const T* xv = x_t + c * M;
      for (int64_t m = lane; m < M; m += G) acc = fmaf(load_f32(gy + m), load_f32(xv + m), acc);
    }
    acc = group_sum(acc, G);
    if (e < nnz && lane == 0) out[e] = from_f32<T>(acc);
  }
}

// =========================================================================================================
// Block-sparse (BSR): a tile engine over shared-memory operands.
// =========================================================================================================
constexpr int kBsrThreads = 128;  // 4 warps
constexpr int kTileM = 64;        // rows of the output tile (tokens in bsr_mm, block rows in bsr_sddmm)

// Operand layouts in shared memory: A (m, k) at As[m * lda + k] (row-major), B (k, n) at Bs[n * ldb + k]
// (column-major), k the reduction. Row strides padded by 16 bytes: WMMA needs 16-byte multiples, and the
// shift spreads the FMA path's column reads over banks.
template <typename S, int kK>
constexpr int kLdk = kK + 16 / static_cast<int>(sizeof(S));
template <int kN>
constexpr int kLdo = kN + 4;  // fp32 output tile stride

/// fp32 FMA: 16 x 8 threads, each 4 rows (4*ty..) x kN/8 columns (tx + 8j).
template <typename S, int kN, int kK>
struct FmaEngine {
  static constexpr int kJ = kN / 8;
  float acc[4][kJ];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < kJ; ++j) acc[i][j] = 0.f;
  }

  __device__ __forceinline__ void mma(const S* as, const S* bs) {
    constexpr int lda = kLdk<S, kK>;
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll 4
    for (int k = 0; k < kK; ++k) {
      float a[4], b[kJ];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = to_f32(as[(4 * ty + i) * lda + k]);
#pragma unroll
      for (int j = 0; j < kJ; ++j) b[j] = to_f32(bs[(tx + 8 * j) * lda + k]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < kJ; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* os) const {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < kJ; ++j) os[(4 * ty + i) * kLdo<kN> + tx + 8 * j] = acc[i][j];
  }
};

/// Tensor cores: warp w owns rows 16w..16w+15 and all kN columns (kN/16 fp32 accumulator fragments).
template <typename S, int kN, int kK>
struct WmmaEngine {
  static constexpr int kF = kN / 16;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[kF];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int f = 0; f < kF; ++f) nvcuda::wmma::fill_fragment(acc[f], 0.f);
  }

  __device__ __forceinline__ void mma(const S* as, const S* bs) {
    namespace w = nvcuda::wmma;
    constexpr int ld = kLdk<S, kK>;
    const int m0 = 16 * (threadIdx.x / 32);
#pragma unroll
    for (int k0 = 0; k0 < kK; k0 += 16) {
      w::fragment<w::matrix_a, 16, 16, 16, S, w::row_major> fa;  // A(m, k) at as[m*ld + k]
      w::load_matrix_sync(fa, as + m0 * ld + k0, ld);
#pragma unroll
      for (int f = 0; f < kF; ++f) {
        w::fragment<w::matrix_b, 16, 16, 16, S, w::col_major> fb;  // B(k, n) at bs[n*ld + k]
        w::load_matrix_sync(fb, bs + (16 * f) * ld + k0, ld);
        w::mma_sync(acc[f], fa, fb, acc[f]);
      }
    }
  }

  __device__ __forceinline__ void store(float* os) const {
    const int m0 = 16 * (threadIdx.x / 32);
#pragma unroll
    for (int f = 0; f < kF; ++f)
      nvcuda::wmma::store_matrix_sync(os + m0 * kLdo<kN> + 16 * f, acc[f], kLdo<kN>, nvcuda::wmma::mem_row_major);
  }
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define EFFIKERN_SPARSE_WMMA 0  // bf16 WMMA needs sm_80; keep one rule for both half types
#else
#define EFFIKERN_SPARSE_WMMA 1
#endif

template <typename T, int kN, int kK>
struct Engine {
  using type = FmaEngine<float, kN, kK>;
};
#if EFFIKERN_SPARSE_WMMA
template <int kN, int kK>
struct Engine<__half, kN, kK> {
  using type = WmmaEngine<__half, kN, kK>;
};
template <int kN, int kK>
struct Engine<__nv_bfloat16, kN, kK> {
  using type = WmmaEngine<__nv_bfloat16, kN, kK>;
};
#else
template <int kN, int kK>
struct Engine<__half, kN, kK> {
  using type = FmaEngine<__half, kN, kK>;
};
template <int kN, int kK>
struct Engine<__nv_bfloat16, kN, kK> {
  using type = FmaEngine<__nv_bfloat16, kN, kK>;
};
#endif

/// Shared tiles of one kernel: A [kTileM][lda], B [kN][lda], fp32 output [kTileM][kN + 4].
template <typename T, int kN, int kK>
struct BsrSmem {
  static constexpr int lda = kLdk<T, kK>;
  __align__(128) T as[kTileM * lda];
  __align__(128) T bs[kN * lda];
  __align__(128) float os[kTileM * kLdo<kN>];
};

/// bsr_mm tile = (64 tokens) x (kN outputs of one output block, sub-tile `sub`), walked grid-stride with the
/// output block fastest: concurrent blocks share one token tile of `a` while the stored blocks stay in L2.
template <typename T, int kN, int kK>
__global__ void __launch_bounds__(kBsrThreads)
    bsr_mm_kernel(const T* __restrict__ a, const int64_t M, const int64_t in_features, const int32_t* __restrict__ ptr,
                  const int32_t* __restrict__ idx, const int32_t* __restrict__ perm, const T* __restrict__ values,
                  const int IB, const int OB, const bool transposed, const T* __restrict__ bias,
                  const int64_t out_features, const int64_t n_out_blocks, T* __restrict__ out) {
  __shared__ BsrSmem<T, kN, kK> sm;
  constexpr int lda = BsrSmem<T, kN, kK>::lda;
  const int subs = static_cast<int>(ceil_div(OB, kN));
  const int64_t tiles = n_out_blocks * subs * ceil_div(M, kTileM);
  const int64_t block_elems = static_cast<int64_t>(IB) * OB;

  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t ob = t % n_out_blocks;
    const int64_t rest = t / n_out_blocks;
    const int o0 = static_cast<int>(rest % subs) * kN;  // first output of the tile inside its block
    const int64_t m0 = (rest / subs) * kTileM;

    typename Engine<T, kN, kK>::type eng;
    eng.zero();
    const int end = __ldg(ptr + ob + 1);
    for (int e = __ldg(ptr + ob); e < end; ++e) {
      const int64_t blk = perm != nullptr ? __ldg(perm + e) : e;
      const int64_t i0 = static_cast<int64_t>(__ldg(idx + e)) * IB;  // first column of `a` this block reads
      const T* vb = values + blk * block_elems;
      for (int kk = 0; kk < IB; kk += kK) {
        __syncthreads();  // the previous chunk's mma is done with as / bs
        // A: a[m0 + m, i0 + kk + k]; consecutive threads walk k (contiguous in a).
        for (int q = threadIdx.x; q < kTileM * kK; q += kBsrThreads) {
          const int m = q / kK, k = q % kK;
          const int64_t i = i0 + kk + k;
          const bool ok = m0 + m < M && kk + k < IB && i < in_features;
          sm.as[m * lda + k] = ok ? a[(m0 + m) * in_features + i] : from_f32<T>(0.f);
        }
        // B(k, n) = block element (o0 + n, kk + k) of values[o][i] (forward) or (kk + k, o0 + n) of values[i][o]
        // (transposed); consecutive threads walk the contiguous index of each.
        for (int q = threadIdx.x; q < kN * kK; q += kBsrThreads) {
          const int n = transposed ? q % kN : q / kK;
          const int k = transposed ? q / kN : q % kK;
          const bool ok = o0 + n < OB && kk + k < IB;
          const int64_t off = transposed ? static_cast<int64_t>(kk + k) * OB + o0 + n
                                         : static_cast<int64_t>(o0 + n) * IB + kk + k;
          sm.bs[n * lda + k] = ok ? vb[off] : from_f32<T>(0.f);
        }
        __syncthreads();
        eng.mma(sm.as, sm.bs);
      }
    }
    eng.store(sm.os);
    __syncthreads();
    for (int q = threadIdx.x; q < kTileM * kN; q += kBsrThreads) {
      const int m = q / kN, n = q % kN;
      const int64_t o = ob * OB + o0 + n;
      if (m0 + m >= M || o0 + n >= OB || o >= out_features) continue;
      float v = sm.os[m * kLdo<kN> + n];
      if (bias != nullptr) v += load_f32(bias + o);
      out[(m0 + m) * out_features + o] = from_f32<T>(v);
    }
    __syncthreads();  // os is rewritten by the next tile
  }
}

/// bsr_sddmm tile = (64 rows) x (kN cols) of one stored block, reduction over tokens in chunks of kK:
/// A(r, m) = gy[m, r0 + r], B(m, c) = x[m, c0 + c].
template <typename T, int kN, int kK>
__global__ void __launch_bounds__(kBsrThreads)
    bsr_sddmm_kernel(const T* __restrict__ gy, const T* __restrict__ x, const int64_t M, const int64_t N,
                     const int64_t K, const int32_t* __restrict__ row, const int32_t* __restrict__ col,
                     const int64_t nnzb, const int rows, const int cols, T* __restrict__ out) {
  __shared__ BsrSmem<T, kN, kK> sm;
  constexpr int lda = BsrSmem<T, kN, kK>::lda;
  const int rsubs = static_cast<int>(ceil_div(rows, kTileM));
  const int csubs = static_cast<int>(ceil_div(cols, kN));
  const int64_t tiles = nnzb * rsubs * csubs;

  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t b = t / (rsubs * csubs);
    const int sub = static_cast<int>(t % (rsubs * csubs));
    const int r0 = (sub / csubs) * kTileM, c0 = (sub % csubs) * kN;
    const int64_t n0 = static_cast<int64_t>(__ldg(row + b)) * rows + r0;  // first gy column of the tile
    const int64_t k0 = static_cast<int64_t>(__ldg(col + b)) * cols + c0;  // first x column

    typename Engine<T, kN, kK>::type eng;
    eng.zero();
    for (int64_t mm = 0; mm < M; mm += kK) {
      __syncthreads();
      // A(r, m) -> as[r*lda + m]; threads walk r, contiguous in gy.
      for (int q = threadIdx.x; q < kTileM * kK; q += kBsrThreads) {
        const int r = q % kTileM, m = q / kTileM;
        const bool ok = r0 + r < rows && n0 + r < N && mm + m < M;
        sm.as[r * lda + m] = ok ? gy[(mm + m) * N + n0 + r] : from_f32<T>(0.f);
      }
      // B(m, c) -> bs[c*lda + m]; threads walk c, contiguous in x.
      for (int q = threadIdx.x; q < kN * kK; q += kBsrThreads) {
        const int c = q % kN, m = q / kN;
        const bool ok = c0 + c < cols && k0 + c < K && mm + m < M;
        sm.bs[c * lda + m] = ok ? x[(mm + m) * K + k0 + c] : from_f32<T>(0.f);
      }
      __syncthreads();
      eng.mma(sm.as, sm.bs);
    }
    eng.store(sm.os);
    __syncthreads();
    T* ob = out + b * rows * cols;
    for (int q = threadIdx.x; q < kTileM * kN; q += kBsrThreads) {
      const int r = q / kN, c = q % kN;
      if (r0 + r < rows && c0 + c < cols) ob[static_cast<int64_t>(r0 + r) * cols + c0 + c] = from_f32<T>(sm.os[r * kLdo<kN> + c]);
    }
    __syncthreads();
  }
}

/// Smallest tile width in {16, 32, 64} covering n (64 for anything larger: the kernels then loop sub-tiles).
int tile_width(int n) { return n <= 16 ? 16 : (n <= 32 ? 32 : 64); }

/// Calls f(std::integral_constant<int, kN>, std::integral_constant<int, kK>) for kN = tile_width(n) and
/// kK = 16 when the reduction chunk k <= 16, else 32.
template <typename F>
cudaError_t with_tiles(int n, int k, F&& f) {
  const bool small_k = k <= 16;
  switch (tile_width(n)) {
    case 16: return small_k ? f(std::integral_constant<int, 16>{}, std::integral_constant<int, 16>{})
                            : f(std::integral_constant<int, 16>{}, std::integral_constant<int, 32>{});
    case 32: return small_k ? f(std::integral_constant<int, 32>{}, std::integral_constant<int, 16>{})
                            : f(std::integral_constant<int, 32>{}, std::integral_constant<int, 32>{});
    default: return small_k ? f(std::integral_constant<int, 64>{}, std::integral_constant<int, 16>{})
                            : f(std::integral_constant<int, 64>{}, std::integral_constant<int, 32>{});
  }
}

/// Grid of a grid-stride tile loop: every tile its own block up to a cap (past it, blocks loop).
unsigned grid_for(int64_t tiles) { return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(tiles, 1 << 22))); }

}  // namespace

cudaError_t csr_mm(DType dtype, const void* a_t, int64_t M, int64_t in_features, const int32_t* ptr,
                   const uint8_t* idx, const int32_t* perm, const void* values, const void* bias,
                   int64_t out_features, void* out, cudaStream_t stream) {
  if (M <= 0 || out_features <= 0) return cudaSuccess;
  if (M > INT_MAX) return cudaErrorInvalidValue;
  return dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const auto* at = static_cast<const T*>(a_t);
    const auto* v = static_cast<const T*>(values);
    const auto* b = static_cast<const T*>(bias);
    auto* y = static_cast<T*>(out);
    // TM = tokens per pass, up to 16 (16 fp32 accumulators a lane); more tokens take several chunks.
    if (M <= 1) return launch_csr_mm<T, 1>(at, M, in_features, ptr, idx, perm, v, b, out_features, y, stream);
    if (M <= 2) return launch_csr_mm<T, 2>(at, M, in_features, ptr, idx, perm, v, b, out_features, y, stream);
    if (M <= 4) return launch_csr_mm<T, 4>(at, M, in_features, ptr, idx, perm, v, b, out_features, y, stream);
    if (M <= 8) return launch_csr_mm<T, 8>(at, M, in_features, ptr, idx, perm, v, b, out_features, y, stream);
    return launch_csr_mm<T, 16>(at, M, in_features, ptr, idx, perm, v, b, out_features, y, stream);
  });
}

cudaError_t csr_sddmm(DType dtype, const void* gy_t, const void* x_t, int64_t M, int64_t out_features,
                      int64_t in_features, const int32_t* row, const uint8_t* col, int64_t nnz, void* out,
                      cudaStream_t stream) {
  if (nnz <= 0) return cudaSuccess;
  // segment_entry divides in 32 bits: a larger P exceeds every int32 segment, which UINT32_MAX does too.
  const auto panels = static_cast<uint32_t>(std::min<int64_t>(csr_panels(in_features), UINT32_MAX));
  int G = 1;
  while (G < 32 && G < M) G *= 2;
  const int64_t blocks = ceil_div(nnz, kCsrThreads / G);
  return dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    csr_sddmm_kernel<T><<<grid_for(blocks), kCsrThreads, 0, stream>>>(
        static_cast<const T*>(gy_t), static_cast<const T*>(x_t), M, out_features, in_features, panels, row, col,
        nnz, G, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

cudaError_t bsr_mm(DType dtype, const void* a, int64_t M, int64_t in_features, const int32_t* ptr,
                   const int32_t* idx, const int32_t* perm, const void* values, int rows, int cols, bool transposed,
                   const void* bias, int64_t out_features, void* out, cudaStream_t stream) {
  if (M <= 0 || out_features <= 0) return cudaSuccess;
  if (rows <= 0 || cols <= 0) return cudaErrorInvalidValue;
  const int IB = transposed ? rows : cols;
  const int OB = transposed ? cols : rows;
  const int64_t n_out_blocks = ceil_div(out_features, OB);
  const int64_t tiles = n_out_blocks * ceil_div(OB, tile_width(OB)) * ceil_div(M, kTileM);
  return dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    return with_tiles(OB, IB, [&](auto n, auto k) -> cudaError_t {
      bsr_mm_kernel<T, decltype(n)::value, decltype(k)::value><<<grid_for(tiles), kBsrThreads, 0, stream>>>(
          static_cast<const T*>(a), M, in_features, ptr, idx, perm, static_cast<const T*>(values), IB, OB,
          transposed, static_cast<const T*>(bias), out_features, n_out_blocks, static_cast<T*>(out));
      return cudaGetLastError();
    });
  });
}

cudaError_t bsr_sddmm(DType dtype, const void* gy, const void* x, int64_t M, int64_t N, int64_t K,
                      const int32_t* row, const int32_t* col, int64_t nnzb, int rows, int cols, void* out,
                      cudaStream_t stream) {
  if (nnzb <= 0) return cudaSuccess;
  if (rows <= 0 || cols <= 0) return cudaErrorInvalidValue;
  const int64_t tiles = nnzb * ceil_div(rows, kTileM) * ceil_div(cols, tile_width(cols));
  return dispatch(dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    // Reduction over tokens: chunks of 32 (16 only when there are at most 16 tokens).
    return with_tiles(cols, static_cast<int>(std::min<int64_t>(M, 32)), [&](auto n, auto k) -> cudaError_t {
      bsr_sddmm_kernel<T, decltype(n)::value, decltype(k)::value><<<grid_for(tiles), kBsrThreads, 0, stream>>>(
          static_cast<const T*>(gy), static_cast<const T*>(x), M, N, K, row, col, nnzb, rows, cols,
          static_cast<T*>(out));
      return cudaGetLastError();
    });
  });
}

}  // namespace sparse
}  // namespace cuda
}  // namespace effikern
