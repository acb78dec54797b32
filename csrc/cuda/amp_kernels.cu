// Fused GradScaler / optimizer kernels: multi-tensor apply over a kernel-argument table (see amp_kernels.h).
//
// Pure CUDA: no torch header, so it compiles with nvcc alone against any (or no) torch install.
//
// Multi-tensor apply. Each tensor is cut into kChunk-element chunks; one block per chunk. A launch carries, BY
// VALUE as its kernel argument, a table of up to kMaxTensors tensors (pointers per list, numel) and up to
// kMaxChunks (tensor slot, chunk index) pairs. The host walks the tensors, fills the table and launches
// whenever either capacity runs out (a tensor cut by a launch boundary continues in slot 0 of the next table),
// so any number of tensors of any size takes ceil(chunks / kMaxChunks) launches and no device memory for
// metadata: nothing to copy host-to-device, nothing to keep alive, and CUDA-graph capture just records the
// arguments. The table is ~27 KB: kernel parameters above 4 KB need CUDA 12.1+ (driver and toolkit) on
// Volta or newer, which every toolkit that builds this file (sm_75+) already implies for the toolkit side.
//
// Vectorization: a block whose tensors' chunk pointers are all 16-byte aligned (any tensor torch allocates
// is) moves 16 bytes per load/store (8 fp16/bf16 or 4 fp32 values); the others, and the last n % V elements
// of a chunk, go element by element. Decided per block at run time, so one odd view costs only its own chunks.
//
// Floors, H100 (~3.0 TB/s copy-class bandwidth), compulsory bytes per element:
//   unscale_check_norm  fp16/bf16: 2 B read-only, 4 B with write-back; fp32: 4 B / 8 B.
//                       BERT-large (335M fp16 grads) read-only 0.22 ms, with write-back 0.45 ms.
//   fused_adamw         read p, g, m, v, write p, m, v: 7 x element size (fp32 28 B; 335M: 3.1 ms).
//   fused_sgd           3 x element size without momentum (read p, g; write p), 5 x with (+ read/write buf).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "amp_kernels.h"
#include "element.cuh"

namespace effikern {
namespace cuda {
namespace amp {
namespace {

// 512 threads x 32 elements: a block streams 32 KB of fp16 (64 KB fp32) per chunk, enough work to hide a
// block's start-up, while BERT-large still splits into ~21k chunks for 132 SMs.
constexpr int kThreads = 512;
constexpr int kChunk = 16384;
constexpr int kWarps = kThreads / 32;

constexpr int kMaxTensors = 384;
constexpr int kMaxChunks = 2048;

/// Kernel-argument table of one launch: lists of kDepth tensors (e.g. param, grad, exp_avg, exp_avg_sq).
template <int kDepth>
struct ChunkTable {
  void* ptr[kDepth][kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t chunk_index[kMaxChunks];   // chunk j of its tensor starts at element chunk_index[j] * kChunk
  uint16_t chunk_slot[kMaxChunks];   // which tensor slot chunk j belongs to
  int64_t first_chunk;               // index of this launch's first chunk over all launches (norm partials)
};
static_assert(sizeof(ChunkTable<4>) <= 32764, "kernel parameters are limited to 32764 bytes (CUDA 12.1+)");
static_assert(kMaxTensors <= 65536, "chunk_slot is 16-bit");

// ---------------------------------------------------------------------------------------------------------
// Element conversion (to_f32, from_f32: element.cuh) and vector access. Every load is widened to fp32 at once.

/// Values of T in one 16-byte vector.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

/// K consecutive elements at p as fp32: one 16-byte load when K is a full vector (p 16-byte aligned).
template <int K, typename T>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[K]) {
  if constexpr (K == 1) {
    out[0] = to_f32(*p);
  } else {
    static_assert(K == kVec<T>, "vector access is exactly 16 bytes");
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < K; ++k) out[k] = to_f32(e[k]);
  }
}

template <int K, typename T>
__device__ __forceinline__ void store_f32(T* p, const float (&in)[K]) {
  if constexpr (K == 1) {
    *p = from_f32<T>(in[0]);
  } else {
    static_assert(K == kVec<T>, "vector access is exactly 16 bytes");
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int k = 0; k < K; ++k) e[k] = from_f32<T>(in[k]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <int N>
using Int = std::integral_constant<int, N>;

/// Covers the chunk's n elements with calls f(Int<K>, Int<U>, i, stride), each meaning U groups of K
/// consecutive elements starting at i, i + stride, ..., i + (U - 1) * stride. While `vec`: kU 16-byte vectors
/// per thread and call (f issues all its loads before any math or store: kU x 16 B in flight per thread and
/// list, which is what keeps HBM busy), then single vectors, then single elements for the last n % V.
/// Consecutive threads take consecutive vectors, so a warp's accesses are contiguous.
template <typename T, int kU, typename F>
__device__ __forceinline__ void for_each_element(int n, bool vec, F&& f) {
  int done = 0;
  if (vec) {
    constexpr int V = kVec<T>;
    constexpr int kGroup = kThreads * kU;  // vectors per block and iteration
    const int n_vec = n / V;
    const int n_grouped = n_vec / kGroup * kGroup;
    for (int j = threadIdx.x; j < n_grouped; j += kGroup) f(Int<V>{}, Int<kU>{}, j * V, kThreads * V);
    for (int j = n_grouped + threadIdx.x; j < n_vec; j += kThreads) f(Int<V>{}, Int<1>{}, j * V, 0);
    done = n_vec * V;
  }
  for (int i = done + threadIdx.x; i < n; i += kThreads) f(Int<1>{}, Int<1>{}, i, 0);
}

/// max that keeps NaN (fmaxf drops it): the inf-norm of a gradient holding NaN must be NaN.
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

__device__ __forceinline__ float combine(float a, float b, Norm norm) {
  return norm == Norm::kInf ? nan_max(a, b) : a + b;
}

/// Block-wide sum or NaN-keeping max; the result is valid in thread 0. Ends with a barrier.
__device__ float block_reduce(float v, Norm norm) {
  __shared__ float warp_part[kWarps];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = combine(v, __shfl_down_sync(0xffffffffu, v, o), norm);
  if ((threadIdx.x & 31) == 0) warp_part[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < kWarps ? warp_part[threadIdx.x] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = combine(v, __shfl_down_sync(0xffffffffu, v, o), norm);
  }
  __syncthreads();
  return v;
}

/// Where this block's chunk lies: tensor slot, first element, element count.
struct ChunkPos {
  int slot;
  int64_t start;
  int n;
};

template <int kDepth>
__device__ __forceinline__ ChunkPos chunk_pos(const ChunkTable<kDepth>& t) {
  ChunkPos c;
  c.slot = t.chunk_slot[blockIdx.x];
  c.start = static_cast<int64_t>(t.chunk_index[blockIdx.x]) * kChunk;
  const int64_t left = t.numel[c.slot] - c.start;
  c.n = left < kChunk ? static_cast<int>(left) : kChunk;
  return c;
}

template <typename T, int kDepth>
__device__ __forceinline__ T* list_ptr(const ChunkTable<kDepth>& t, int list, const ChunkPos& c) {
  return static_cast<T*>(t.ptr[list][c.slot]) + c.start;
}

// ---------------------------------------------------------------------------------------------------------
// unscale + inf/nan check + norm partials. Floor: 2 B (fp16 read-only) / 4 B (fp16 write-back) per element.
template <typename T, Norm kNorm, bool kWriteBack>
__global__ void __launch_bounds__(kThreads)
    unscale_check_norm_kernel(const ChunkTable<1> table, const float* __restrict__ inv_scale_ptr,
                              float* __restrict__ found_inf, float* __restrict__ partials) {
  const ChunkPos c = chunk_pos(table);
  T* g = list_ptr<T>(table, 0, c);
  const float inv_scale = *inv_scale_ptr;
  float acc = 0.0f;
  bool bad = false;
  for_each_element<T, 4>(c.n, aligned16(g), [&](auto k, auto u, int i, int stride) {
    constexpr int K = decltype(k)::value, U = decltype(u)::value;
    float v[U][K];
#pragma unroll
    for (int r = 0; r < U; ++r) load_f32<K>(g + i + r * stride, v[r]);
#pragma unroll
    for (int r = 0; r < U; ++r) {
#pragma unroll
      for (int e = 0; e < K; ++e) {
        v[r][e] *= inv_scale;
        // Checked (and measured) is what the gradient holds afterwards: with write-back the product rounded to
        // T, so an fp16 product past 65504 (a scale below 1) is an overflow, not a silent inf in the gradient.
        if constexpr (kWriteBack) v[r][e] = to_f32(from_f32<T>(v[r][e]));
        bad |= !isfinite(v[r][e]);
        if constexpr (kNorm == Norm::kL2) acc += v[r][e] * v[r][e];
        if constexpr (kNorm == Norm::kInf) acc = nan_max(acc, fabsf(v[r][e]));
      }
    }
    if constexpr (kWriteBack) {
#pragma unroll
      for (int r = 0; r < U; ++r) store_f32<K>(g + i + r * stride, v[r]);
    }
  });
  // Only a block that saw a non-finite writes found_inf (a plain store of 1.0: racing writers agree).
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1.0f;
  if constexpr (kNorm != Norm::kNone) {
    acc = block_reduce(acc, kNorm);
    if (threadIdx.x == 0) partials[table.first_chunk + blockIdx.x] = acc;
  }
}

/// One block: out = sqrt(sum) or NaN-keeping max of n partials (0 for none). A few us for BERT-large's 21k.
__global__ void __launch_bounds__(kThreads)
    norm_finish_kernel(const float* __restrict__ partials, int64_t n, Norm norm, float* __restrict__ out) {
  float acc = 0.0f;
  if (norm != Norm::kNone) {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) acc = combine(acc, partials[i], norm);
  }
  acc = block_reduce(acc, norm);
  if (threadIdx.x == 0) *out = norm == Norm::kL2 ? sqrtf(acc) : acc;
}

// ---------------------------------------------------------------------------------------------------------
// Optimizers. Hyper-parameters arrive in fp32 except what the bias corrections need in double.
struct AdamWArgs {
  float decay, one_minus_beta1, beta2, one_minus_beta2, eps;
  double lr_d, beta1_d, beta2_d, weight_decay_d;
  const void* lr_ptr;  // non-null: a tensor lr, read by every block in place of lr_d (and decay recomputed)
  bool lr_f64;
  bool maximize;
};

/// A tensor lr's current value (float32 or float64 storage), read on the device: a CUDA graph replays whatever
/// an LR scheduler last wrote there.
__device__ __forceinline__ double device_lr(const void* p, bool f64) {
  return f64 ? *static_cast<const double*>(p) : static_cast<double>(*static_cast<const float*>(p));
}

/// AdamW. Floor: 7 x sizeof(T) per element (read p, g, m, v; write p, m, v).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const ChunkTable<4> table, const float* __restrict__ step_ptr,
                 const float* __restrict__ grad_factor, const float* __restrict__ found_inf, const AdamWArgs a) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // the whole step is skipped, on the device
  const float factor = grad_factor != nullptr ? *grad_factor : 1.0f;
  // t = step + 1 as torch computes it (fp32 tensor += 1); bias corrections in double as torch's (1 - beta2
  // at t = 1 cancels three digits).
  const double t = static_cast<double>(*step_ptr + 1.0f);
  double lr = a.lr_d;
  float decay = a.decay;
  if (a.lr_ptr != nullptr) {  // as the host computes decay for a float lr: in double, rounded once
    lr = device_lr(a.lr_ptr, a.lr_f64);
    decay = static_cast<float>(1.0 - lr * a.weight_decay_d);
  }
  const float step_size = static_cast<float>(lr / (1.0 - pow(a.beta1_d, t)));
  const float inv_bc2_sqrt = static_cast<float>(1.0 / sqrt(1.0 - pow(a.beta2_d, t)));

  const ChunkPos c = chunk_pos(table);
  T* p = list_ptr<T>(table, 0, c);
  const T* g = list_ptr<T>(table, 1, c);
  T* m = list_ptr<T>(table, 2, c);
  T* v = list_ptr<T>(table, 3, c);
  const bool vec = aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v);
  for_each_element<T, 2>(c.n, vec, [&](auto k, auto u, int i, int stride) {
    constexpr int K = decltype(k)::value, U = decltype(u)::value;
    float pv[U][K], gv[U][K], mv[U][K], vv[U][K];
#pragma unroll
    for (int r = 0; r < U; ++r) {
      const int at = i + r * stride;
      load_f32<K>(p + at, pv[r]);
      load_f32<K>(g + at, gv[r]);
      load_f32<K>(m + at, mv[r]);
      load_f32<K>(v + at, vv[r]);
    }
#pragma unroll
    for (int r = 0; r < U; ++r) {
#pragma unroll
      for (int e = 0; e < K; ++e) {
        const float grad = a.maximize ? -(gv[r][e] * factor) : gv[r][e] * factor;
        mv[r][e] = mv[r][e] + a.one_minus_beta1 * (grad - mv[r][e]);  // torch: exp_avg.lerp_(grad, 1 - beta1)
        vv[r][e] = vv[r][e] * a.beta2 + a.one_minus_beta2 * grad * grad;
        pv[r][e] = pv[r][e] * decay - step_size * mv[r][e] / (sqrtf(vv[r][e]) * inv_bc2_sqrt + a.eps);
      }
    }
#pragma unroll
    for (int r = 0; r < U; ++r) {
      const int at = i + r * stride;
      store_f32<K>(p + at, pv[r]);
      store_f32<K>(m + at, mv[r]);
      store_f32<K>(v + at, vv[r]);
    }
  });
}

struct SgdArgs {
  float lr, momentum, one_minus_dampening, weight_decay;
  const void* lr_ptr;  // non-null: a tensor lr, read by every block in place of lr
  bool lr_f64;
  bool nesterov, maximize;
};

/// SGD. Floor: 3 x sizeof(T) per element without momentum, 5 x with (the first step skips reading buf).
template <typename T, bool kMomentum>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(const ChunkTable<3> table, const float* __restrict__ step_ptr, const float* __restrict__ grad_factor,
               const float* __restrict__ found_inf, const SgdArgs a) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const float factor = grad_factor != nullptr ? *grad_factor : 1.0f;
  const bool first = *step_ptr == 0.0f;  // torch: buf = clone(grad) when there is no buffer yet
  const float lr = a.lr_ptr != nullptr ? static_cast<float>(device_lr(a.lr_ptr, a.lr_f64)) : a.lr;

  const ChunkPos c = chunk_pos(table);
  T* p = list_ptr<T>(table, 0, c);
  const T* g = list_ptr<T>(table, 1, c);
  T* b = kMomentum ? list_ptr<T>(table, 2, c) : nullptr;
  const bool vec = aligned16(p) && aligned16(g) && (!kMomentum || aligned16(b));
  for_each_element<T, 2>(c.n, vec, [&](auto k, auto u, int i, int stride) {
    constexpr int K = decltype(k)::value, U = decltype(u)::value;
    float pv[U][K], gv[U][K], bv[U][K] = {};  // bv is not read on the first step
#pragma unroll
    for (int r = 0; r < U; ++r) {
      const int at = i + r * stride;
      load_f32<K>(p + at, pv[r]);
      load_f32<K>(g + at, gv[r]);
      if (kMomentum && !first) load_f32<K>(b + at, bv[r]);
    }
#pragma unroll
    for (int r = 0; r < U; ++r) {
#pragma unroll
      for (int e = 0; e < K; ++e) {
        float grad = a.maximize ? -(gv[r][e] * factor) : gv[r][e] * factor;
        if (a.weight_decay != 0.0f) grad += a.weight_decay * pv[r][e];
        if constexpr (kMomentum) {
          // Rounded to T before it is used, as torch's buffer (held in the param's dtype) is.
          bv[r][e] = to_f32(from_f32<T>(first ? grad : a.momentum * bv[r][e] + a.one_minus_dampening * grad));
          grad = a.nesterov ? grad + a.momentum * bv[r][e] : bv[r][e];
        }
        pv[r][e] -= lr * grad;
      }
    }
#pragma unroll
    for (int r = 0; r < U; ++r) {
      const int at = i + r * stride;
      store_f32<K>(p + at, pv[r]);
      if constexpr (kMomentum) store_f32<K>(b + at, bv[r]);
    }
  });
}

__global__ void increment_step_kernel(float* step, const float* found_inf) {
  if (found_inf == nullptr || *found_inf == 0.0f) *step += 1.0f;
}

// ---------------------------------------------------------------------------------------------------------
// Host side.

int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

/// Walks n_tensors tensors (lists[d][i], numels[i]), filling ChunkTable<kDepth> and calling launch(table,
/// n_chunks) whenever it is full and at the end. Returns the first launch error.
template <int kDepth, typename Launch>
cudaError_t multi_tensor_apply(void* const* const (&lists)[kDepth], const int64_t* numels, int n_tensors,
                               Launch&& launch) {
  ChunkTable<kDepth> table;
  table.first_chunk = 0;
  int n_slots = 0;
  int n_chunks = 0;
  cudaError_t err = cudaSuccess;
  auto flush = [&]() {
    if (n_chunks > 0 && err == cudaSuccess) err = launch(table, n_chunks);
    table.first_chunk += n_chunks;
    n_chunks = 0;
  };
  for (int i = 0; i < n_tensors; ++i) {
    if (numels[i] <= 0) continue;
    if (n_slots == kMaxTensors) {
      flush();
      n_slots = 0;
    }
    int slot = n_slots++;
    for (int d = 0; d < kDepth; ++d) table.ptr[d][slot] = lists[d] != nullptr ? lists[d][i] : nullptr;
    table.numel[slot] = numels[i];
    const int64_t chunks = chunks_of(numels[i]);
    for (int64_t j = 0; j < chunks; ++j) {
      if (n_chunks == kMaxChunks) {
        flush();
        // The tensor goes on in a fresh table, alone in slot 0.
        for (int d = 0; d < kDepth; ++d) table.ptr[d][0] = table.ptr[d][slot];
        table.numel[0] = table.numel[slot];
        slot = 0;
        n_slots = 1;
      }
      table.chunk_slot[n_chunks] = static_cast<uint16_t>(slot);
      table.chunk_index[n_chunks] = static_cast<int32_t>(j);
      ++n_chunks;
    }
  }
  flush();
  return err;
}

template <typename T, Norm kNorm, bool kWriteBack>
cudaError_t launch_unscale(void* const* grads, const int64_t* numels, int n, const float* inv_scale,
                           float* found_inf, float* partials, cudaStream_t stream) {
  void* const* const lists[1] = {grads};
  return multi_tensor_apply<1>(lists, numels, n, [&](const ChunkTable<1>& t, int n_chunks) {
    unscale_check_norm_kernel<T, kNorm, kWriteBack><<<n_chunks, kThreads, 0, stream>>>(t, inv_scale, found_inf,
                                                                                        partials);
    return cudaGetLastError();
  });
}

template <typename T, Norm kNorm>
cudaError_t launch_unscale(bool write_back, void* const* grads, const int64_t* numels, int n,
                           const float* inv_scale, float* found_inf, float* partials, cudaStream_t stream) {
  return write_back ? launch_unscale<T, kNorm, true>(grads, numels, n, inv_scale, found_inf, partials, stream)
                    : launch_unscale<T, kNorm, false>(grads, numels, n, inv_scale, found_inf, partials, stream);
}

}  // namespace

int64_t num_chunks(const int64_t* numels, int n_tensors) {
  int64_t total = 0;
  for (int i = 0; i < n_tensors; ++i) total += numels[i] > 0 ? chunks_of(numels[i]) : 0;
  return total;
}

cudaError_t unscale_check_norm(DType dtype, void* const* grads, const int64_t* numels, int n_tensors,
                               const float* inv_scale, float* found_inf, Norm norm, bool write_back,
                               float* partials, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    switch (norm) {
      case Norm::kL2:
        return launch_unscale<T, Norm::kL2>(write_back, grads, numels, n_tensors, inv_scale, found_inf, partials,
                                            stream);
      case Norm::kInf:
        return launch_unscale<T, Norm::kInf>(write_back, grads, numels, n_tensors, inv_scale, found_inf,
                                             partials, stream);
      default:
        return launch_unscale<T, Norm::kNone>(write_back, grads, numels, n_tensors, inv_scale, found_inf,
                                              partials, stream);
    }
  });
}

cudaError_t norm_finish(const float* partials, int64_t n, Norm norm, float* out, cudaStream_t stream) {
  norm_finish_kernel<<<1, kThreads, 0, stream>>>(partials, n, norm, out);
  return cudaGetLastError();
}

cudaError_t fused_adamw(DType dtype, void* const* params, void* const* grads, void* const* exp_avgs,
                        void* const* exp_avg_sqs, const int64_t* numels, int n_tensors, const float* step,
                        const float* grad_factor, const float* found_inf, const AdamWHyper& h,
                        cudaStream_t stream) {
  AdamWArgs a;
  a.decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  a.one_minus_beta1 = static_cast<float>(1.0 - h.beta1);
  a.beta2 = static_cast<float>(h.beta2);
  a.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  a.eps = static_cast<float>(h.eps);
  a.lr_d = h.lr;
  a.beta1_d = h.beta1;
  a.beta2_d = h.beta2;
  a.weight_decay_d = h.weight_decay;
  a.lr_ptr = h.lr_ptr;
  a.lr_f64 = h.lr_f64;
  a.maximize = h.maximize;
  void* const* const lists[4] = {params, grads, exp_avgs, exp_avg_sqs};
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    return multi_tensor_apply<4>(lists, numels, n_tensors, [&](const ChunkTable<4>& t, int n_chunks) {
      adamw_kernel<T><<<n_chunks, kThreads, 0, stream>>>(t, step, grad_factor, found_inf, a);
      return cudaGetLastError();
    });
  });
}

cudaError_t fused_sgd(DType dtype, void* const* params, void* const* grads, void* const* momentum_buffers,
                      const int64_t* numels, int n_tensors, const float* step, const float* grad_factor,
                      const float* found_inf, const SgdHyper& h, cudaStream_t stream) {
  SgdArgs a;
  a.lr = static_cast<float>(h.lr);
  a.momentum = static_cast<float>(h.momentum);
  a.one_minus_dampening = static_cast<float>(1.0 - h.dampening);
  a.weight_decay = static_cast<float>(h.weight_decay);
  a.lr_ptr = h.lr_ptr;
  a.lr_f64 = h.lr_f64;
  a.nesterov = h.nesterov;
  a.maximize = h.maximize;
  const bool momentum = h.momentum != 0.0;
  if (momentum && momentum_buffers == nullptr) return cudaErrorInvalidValue;
  void* const* const lists[3] = {params, grads, momentum ? momentum_buffers : nullptr};
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    return multi_tensor_apply<3>(lists, numels, n_tensors, [&](const ChunkTable<3>& t, int n_chunks) {
      if (momentum) {
        sgd_kernel<T, true><<<n_chunks, kThreads, 0, stream>>>(t, step, grad_factor, found_inf, a);
      } else {
        sgd_kernel<T, false><<<n_chunks, kThreads, 0, stream>>>(t, step, grad_factor, found_inf, a);
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t increment_step(float* step, const float* found_inf, cudaStream_t stream) {
  increment_step_kernel<<<1, 1, 0, stream>>>(step, found_inf);
  return cudaGetLastError();
}

}  // namespace amp
}  // namespace cuda
}  // namespace effikern
