// Masked sparse matmul on the CPU: CSR and BSR forward, grad_input and grad_values. Shapes: sparse_cpu.h.
//
// Why the layouts. At the token counts where sparsity pays on a CPU (decode, 1-64 rows of x) the forward is
// memory-bound on the sparse weight: each stored value (4 B fp32) and its column offset (1 B: CSR is panelled, see
// docs/sparse_kernels.md) are read once and used for M multiply-adds. A row is walked panel by panel: segment
// s = row * P + panel holds the row's entries in columns panel*256 .. panel*256+255, so the source pointer moves
// once per segment and every entry adds its one-byte offset. Every kernel visits each nonzero ONCE for all the tokens
// of a chunk: the dense operand is first packed "token-innermost", P[chunk][k][t] (T = up to 64 tokens, one to four SIMD vectors, fp32), and a
// nonzero (n, k, v) becomes one broadcast of v and NV vector FMAs into the register accumulators of row n,
// reading the contiguous run P[chunk][k][0:T] (a whole cache line per vector). The packed operand of one chunk is
// K x T x 4 bytes (256 KiB at K = 4096, 16 tokens): it stays in L2 while the values stream from DRAM.
// With 1-4 tokens the padding of a vector would waste most lanes, so those use a plain gather x[m][col] per nonzero
// with several partial sums (the FMA latency, not the loads, would otherwise bound it).
//
// Floors (bytes over bandwidth; the benchmark prints the measured times next to them):
//   csr_fwd:        nnz * (4 + 1) + N*P*4 + M*K*4 + M*N*4 bytes; at 4096 x 4096, 90% sparse (1.68M nnz), 1-64
//                   tokens the values + offsets + segment pointers are 8.7 MB (int32 columns: 13.4 MB): ~0.5 ms at
//                   ~17 GB/s (what dense F.linear streams on 2 cores), against 67 MB for dense F.linear.
//   csr_grad_input: the same bytes (scattered per column panel, the values read in order) + M*(N+K)*4.
//   csr_grad_values: nnz * (1 + 4 + 4) + M*(N+K)*4 (offsets read, gradient written); compute 2*M*nnz flops.
//   bsr_*:          nnzb*BR*BC*4 + nnzb*4 (+ x, y); a block is a small dense GEMM, so at >= 16 tokens these are
//                   compute-bound: 2*M*nnzb*BR*BC flops at ~1 512-bit FMA per cycle per core.
//
// Vectorization: GCC vector types, each kernel compiled for AVX-512, AVX2+FMA and a baseline, picked at run time
// (the same scheme and the same EFFIKERN_CPU_ISA cap as dwsep_cpu.cpp). float64 (gradcheck) runs the baseline.
// Threading: at::parallel_for over (token chunk, output row) or over stored entries; no two threads write the same
// output element, so there are no atomics.
#include "sparse_cpu.h"
#include "int_math.h"
#include "isa_dispatch.h"
#include "output_alloc.h"
#include "scratch.h"
#include "simd.h"
#include "sparse_gather_avx512.h"
#include "sparse_row_columns.h"
#include "sparse_row_stage.h"
#include "sparse_wide_values.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace effikern {
namespace {

// Most tokens per chunk: 4 vectors of 16 fp32 lanes, i.e. 4 accumulators per output row in registers.
constexpr int64_t kMaxVectors = 4;
// ... but a chunk of the packed operand (rows x T x 4 B) must stay within half of the 1 MiB L2: at K = 4096 and 64
// tokens (1 MiB) every nonzero's 4 cache lines came from L3 and the forward ran 2x slower than dense F.linear.
constexpr int64_t kChunkBytes = 512 * 1024;
// Entries ahead of the current segment's end that the packed forward prefetches (values and offsets): 1 KiB of fp32
// values. A microbenchmark of the loop (1 thread, 4096 x 4096 at 90%, 16 tokens, LLC emptied before each call):
// 1.50-1.57 ms without, 1.38-1.41 ms at 256, 1.39-1.49 ms at 128 or 512; warm calls unchanged.
constexpr int64_t kPrefetchAhead = 256;
// Entries of a flat row (sparse_row_columns.h) per prefetch step: one offset line, 4 lines of fp32 values.
constexpr int64_t kFlatPiece = 64;
// At most this many tokens take the gather path (no packing; see the header comment), and the forward's policy on
// an AVX2 (or older) CPU, measured on an AVX2 Zen 3 EPYC (1 thread, 4096 x 4096, densities 5-50%, min of 40 calls):
// - flat_walk: a row of short segments (<= kFlatSegment entries on average: <= 25% density) is expanded to whole
//   columns and walked flat (sparse_row_columns.h). 1 token: 0.93 -> 0.66 ms at 5% density, 1.40 -> 1.03 at 10%,
//   2.21 -> 2.12 at 20%; at 50% (128-entry segments) it lost, 4.50 -> 4.68. 16 tokens: 1.35 -> 1.16 (5%), 2.24 ->
//   2.01 (10%), even at 20%, 6.10 -> 6.57 at 30%.
// - gather_tokens: 2 (3 for long segments). 4 tokens gathered took 2-3.5x the packed forward (3.0 vs 1.6 ms at 10%,
//   9.9 vs 7.5 at 50%); 3 tokens 1.5-1.7x at <= 10% density, but 0.87-0.97x at 30-50%.
// On AVX-512 both stay as they were measured there: 4 tokens gathered (fp32 by sparse_gather_avx512.h), and the
// segment walk (the flat walk is untimed on that class).
constexpr int64_t kGatherTokens = 4;
constexpr int64_t kFlatSegment = 64;
// Output rows per register block of the BSR kernels: 8 accumulators + the x vector + a broadcast fit 16 registers.
constexpr int kRowGroup = 8;
// Rows per register block of the BSR value gradient, times two vectors of columns.
constexpr int kGradRows = 4;

// SIMD (Simd<T, B>, EK_INLINE): csrc/cpu/simd.h.

// Calls f(nv) with nv = std::integral_constant for NV = vectors in 1..4 (4 for anything larger): the token-vector
// count every packed kernel is instantiated for. f must be an always-inline lambda so that it is compiled into the
// caller's run<B> for that ISA (isa_dispatch.h), as dwsep's with_run_bound does.
template <class F>
EK_INLINE void with_token_vectors(int64_t vectors, F&& f) {
  switch (vectors) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}

// Run-time ISA choice: csrc/cpu/isa_dispatch.h.
using isa::parallel_run;
using isa::run_best_isa;
using isa::vector_bytes;

// Packed operands and accumulators live in scratch<A>(n) (csrc/cpu/scratch.h): 64-byte aligned, so a packed row of
// 16 fp32 tokens is one cache line, not two.

// src [M, R] (row stride R) -> dst [ceil(M/T)][Rp][T], accumulation type, zero past M tokens and past R.
template <typename S, typename A>
void pack_tokens(const S* src, int64_t M, int64_t R, int64_t Rp, int64_t T, A* dst) {
  constexpr int64_t kSpan = 256;  // reduction positions per task: T x 256 x 4 B <= 64 KiB written per task
  const int64_t spans = ceil_div(Rp, kSpan);
  at::parallel_for(0, ceil_div(M, T) * spans, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c = b / spans, r0 = (b % spans) * kSpan, r1 = std::min(Rp, r0 + kSpan);
      A* d = dst + c * Rp * T;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t m = c * T + t;
        const int64_t valid = m < M ? std::min(r1, R) : r0;
        const S* s = src + m * R;
        for (int64_t r = r0; r < valid; ++r) d[r * T + t] = static_cast<A>(s[r]);
        for (int64_t r = std::max(r0, valid); r < r1; ++r) d[r * T + t] = A(0);
      }
    }
  });
}

// src [M, R] -> dst [M, Rx] in the accumulation type, zero in columns R..Rx (so vector loads may run past R).
template <typename S, typename A>
void widen_rows(const S* src, int64_t M, int64_t R, int64_t Rx, A* dst) {
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t r = 0; r < R; ++r) dst[m * Rx + r] = static_cast<A>(src[m * R + r]);
      for (int64_t r = R; r < Rx; ++r) dst[m * Rx + r] = A(0);
    }
  });
}

// Vectors per token chunk for a packed operand of `rows` rows: as many as fit kChunkBytes, 1..kMaxVectors.
template <typename A>
int64_t chunk_vectors(int64_t M, int64_t lanes, int64_t rows) {
  const int64_t fit = kChunkBytes / (std::max<int64_t>(rows, 1) * lanes * static_cast<int64_t>(sizeof(A)));
  return std::max<int64_t>(1, std::min({kMaxVectors, ceil_div(M, lanes), fit}));
}


// Columns per panel of the CSR layout (effikern/sparse/formats.py PANEL): an offset within a panel is one byte.
constexpr int64_t kPanel = 256;

// The forward's policy (see kGatherTokens); the value gradient walks its rows the same way (measured: CsrGradValues).
bool flat_walk(int64_t R, int64_t O, int64_t P, const int32_t* crow) {
  return isa::level() < 2 && RowColumns<kPanel>::fits(R) && crow[O * P] <= kFlatSegment * O * P;
}

int64_t gather_tokens(bool flat) { return isa::level() >= 2 ? kGatherTokens : (flat ? 2 : 3); }

int64_t panels(int64_t width) {
  return std::max<int64_t>(1, ceil_div(width, kPanel));
}

// ---------------------------------------------------------------------------------------------------------------
// Panelled CSR rows (the forward): out[m, o] = bias[o] + sum over the segments s = o*P + p and j in
// crow[s]..crow[s+1] of values[j] * src[m, p*256 + idx[j]]. P = panels(R).

template <typename S>
struct CsrRows {
  using A = at::opmath_type<S>;
  static constexpr bool kVectorize = !std::is_same_v<A, double>;
  const A* src;  // gather path: [M, R]; packed path: [chunks][R][T]
  int64_t M, R, T, P;
  const int32_t* crow;  // [O*P + 1] segment pointers
  const uint8_t* idx;   // offsets within the segment's panel
  const S* values;
  const S* bias;  // [O] or nullptr
  S* out;         // [M, O]
  int64_t O;
  int64_t begin = 0, end = 0;  // gather path: output rows; packed path: (chunk, output row) pairs
  bool flat = false;

  // Up to gather_tokens() tokens read src directly; 4 partial sums per token hide the FMA latency. Where flat_walk()
  // chose it, the row's offsets are first expanded to absolute columns (sparse_row_columns.h: one loop over the row
  // instead of one per 256-column panel). (On AVX-512 with fp32 accumulation the explicit gather path of
  // sparse_gather_avx512.h runs instead. Its AVX2 counterpart, 8 entries per vgatherdps, was tried on an AVX2-only
  // EPYC and lost to the segment loop: 4096 x 4096, 90%, min of 300 calls, 2 threads: 0.94 vs 0.76 ms at 1 token,
  // 1.59 vs 0.91 at 2, 2.72 vs 1.58 at 4.)
  template <int MM>
  EK_INLINE void gather_rows() const {
    WideValues<S, A> value;
    RowColumns<kPanel> columns(crow[O * P]);
    for (int64_t o = begin; o < end; ++o) {
      A acc[MM][4] = {};
      const int64_t j0 = crow[o * P], n = crow[(o + 1) * P] - j0;
      value.load(values, j0, j0 + n);  // the row's segments are consecutive in values
      if (flat) {
        gather_entries<MM>(src, columns.expand(crow, idx, o, P), value, j0, n, acc);
      } else {
        for (int64_t s = o * P; s < (o + 1) * P; ++s) {
          gather_entries<MM>(src + (s - o * P) * kPanel, idx + crow[s], value, crow[s], crow[s + 1] - crow[s], acc);
        }
      }
      finish_row<MM>(o, acc);
    }
  }

  // Entries j .. j + count of one row (or one segment) into the MM tokens' 4 partial sums: values through `value`,
  // columns off[0 .. count) from base (whole-row columns from src, or panel offsets from the panel's first column).
  template <int MM, class Off>
  EK_INLINE void gather_entries(const A* base, const Off* off, const WideValues<S, A>& value, int64_t j,
                                int64_t count, A (&acc)[MM][4]) const {
    int64_t t = 0;
    for (; t + 4 <= count; t += 4) {
      for (int u = 0; u < 4; ++u) {
        const A v = value[j + t + u];
        const int64_t k = off[t + u];
        for (int m = 0; m < MM; ++m) acc[m][u] += v * base[m * R + k];
      }
    }
    for (; t < count; ++t) {
      const A v = value[j + t];
      for (int m = 0; m < MM; ++m) acc[m][0] += v * base[m * R + off[t]];
    }
  }

  template <int MM>
  EK_INLINE void finish_row(int64_t o, const A (&acc)[MM][4]) const {
    const A b = bias != nullptr ? static_cast<A>(bias[o]) : A(0);
    for (int m = 0; m < MM; ++m) {
      out[m * O + o] = static_cast<S>(b + ((acc[m][0] + acc[m][1]) + (acc[m][2] + acc[m][3])));
    }
  }

  // L consecutive entries, one token vector each (NV == 1): their values come in one vector load and each is
  // broadcast from a register, instead of one scalar load + broadcast per entry (the 16-token forward is bound by its
  // loads: the packed x vector, the offset and the value of every nonzero). Measured: 1.51 -> 1.45 ms at 4096x4096,
  // 90%, 16 tokens, 1 thread (four alternating A/B runs, every pair the same way). off: the entries' offsets from
  // base, in units of TT (panel offsets or whole-row columns).
  template <class W, class Off, size_t... U>
  EK_INLINE void group_of_lanes(const A* base, const Off* off, const S* vals, typename W::V (*acc)[1],
                                std::index_sequence<U...>) const {
    constexpr int64_t TT = W::kLanes, kSets = sizeof...(U) >= 4 ? 4 : 1;
    const typename W::V v = W::load(vals);
    ((acc[U % kSets][0] += W::template lane<U>(v) * W::load(base + static_cast<int64_t>(off[U]) * TT)), ...);
  }

  // Entries j .. j + count of one row (or one segment): values through `value`, offsets off[0 .. count) in units of
  // TT from base. U accumulator sets, entries dealt round-robin: with one set every entry waited for the previous
  // FMA (4 cycles of latency), which bounded the 16-token forward at ~4 cycles per nonzero.
  template <class W, int NV, int U, class Off>
  EK_INLINE void packed_entries(const A* base, const Off* off, const WideValues<S, A>& value, int64_t j,
                                int64_t count, typename W::V (*acc)[NV]) const {
    constexpr int64_t L = W::kLanes, TT = NV * L;
    int64_t t = 0;
    if constexpr (std::is_same_v<S, A> && NV == 1 && L >= 8) {
      for (; t + L <= count; t += L) group_of_lanes<W>(base, off + t, values + j + t, acc, std::make_index_sequence<L>{});
    }
    for (; t + U <= count; t += U) {
      for (int u = 0; u < U; ++u) {
        const typename W::V v = W::splat(value[j + t + u]);
        const A* p = base + static_cast<int64_t>(off[t + u]) * TT;
        for (int q = 0; q < NV; ++q) acc[u][q] += v * W::load(p + q * L);
      }
    }
    for (; t < count; ++t) {
      const typename W::V v = W::splat(value[j + t]);
      const A* p = base + static_cast<int64_t>(off[t]) * TT;
      for (int q = 0; q < NV; ++q) acc[0][q] += v * W::load(p + q * L);
    }
  }

  template <int B, int NV>
  EK_INLINE void packed_rows() const {
    using W = Simd<A, B>;
    constexpr int64_t L = W::kLanes, TT = NV * L;
    constexpr int U = NV >= 4 ? 1 : 4 / NV;
    // Rows of short segments run as one flat walk (flat_walk(), sparse_row_columns.h), the others panel by panel.
    RowColumns<kPanel> columns(crow[O * P]);
    RowStage<S, A, TT> stage(out, M, O);
    WideValues<S, A> value;
    int64_t c = begin / O, o = begin % O - 1;  // (chunk, row) of pair i, stepped without a division per row
    for (int64_t i = begin; i < end; ++i) {
      if (++o == O) o = 0, ++c;
      const A* Pc = src + c * R * TT;
      typename W::V acc[U][NV] = {};
      const int64_t j0 = crow[o * P], n = crow[(o + 1) * P] - j0;
      value.load(values, j0, j0 + n);
      // The weight streams from DRAM when it is not cached (a model's layers); the hardware prefetcher alone left
      // a 16-token call 0.3 ms slower cold than warm. Values and offsets are fetched kPrefetchAhead entries ahead,
      // spread over the walk: per segment, or per kFlatPiece entries of a flat row. (Prefetching a row's whole range
      // at its start, a burst of up to ~100 prefetches, made the packed forward at 70% sparsity 5-10% slower: 1
      // thread, best of 4 alternating runs, 5.46 -> 6.09 ms at 4096x4096 16 tokens, 2.97 -> 3.20 at 768x3072 64.)
      if (flat) {
        const uint16_t* col = columns.expand(crow, idx, o, P);
        for (int64_t t = 0; t < n; t += kFlatPiece) {
          const int64_t j = j0 + t + kPrefetchAhead;
          for (int64_t l = 0; l < kFlatPiece * static_cast<int64_t>(sizeof(S)); l += 64) {
            __builtin_prefetch(reinterpret_cast<const char*>(values + j) + l);
          }
          __builtin_prefetch(idx + j);
          packed_entries<W, NV, U>(Pc, col + t, value, j0 + t, std::min(kFlatPiece, n - t), acc);
        }
      } else {
        for (int64_t s = o * P; s < (o + 1) * P; ++s) {
          const int64_t j = crow[s], j1 = crow[s + 1];
          __builtin_prefetch(values + j1 + kPrefetchAhead);
          __builtin_prefetch(values + j1 + kPrefetchAhead + 64 / static_cast<int64_t>(sizeof(S)));
          __builtin_prefetch(idx + j1 + kPrefetchAhead);
          packed_entries<W, NV, U>(Pc + (s - o * P) * kPanel * TT, idx + j, value, j, j1 - j, acc);
        }
      }
      const A b = bias != nullptr ? static_cast<A>(bias[o]) : A(0);
      A* lanes = stage.slot(c, o);
      for (int q = 0; q < NV; ++q) {
        typename W::V total = W::splat(b);
        for (int u = 0; u < U; ++u) total += acc[u][q];
        W::store(lanes + q * L, total);
      }
      stage.done();
    }
  }

  // The gather path on AVX-512: csrc/cpu/sparse_gather_avx512.h (16 entries per gather instruction).
  void gather_rows_avx512() const {
#ifdef EK_X86_DISPATCH
    if constexpr (std::is_same_v<A, float>) {
      switch (M) {
        case 1: return sparse_avx512::gather_rows<S, 1>(src, R, P, crow, idx, values, bias, out, O, begin, end);
        case 2: return sparse_avx512::gather_rows<S, 2>(src, R, P, crow, idx, values, bias, out, O, begin, end);
        case 3: return sparse_avx512::gather_rows<S, 3>(src, R, P, crow, idx, values, bias, out, O, begin, end);
        default: return sparse_avx512::gather_rows<S, 4>(src, R, P, crow, idx, values, bias, out, O, begin, end);
      }
    }
#endif
  }

  template <int B>
  EK_INLINE void run() const {
    if (T == 0) {  // gather path
      if constexpr (B == 64 && std::is_same_v<A, float>) {
        return gather_rows_avx512();
      } else {
        switch (M) {
          case 1: return gather_rows<1>();
          case 2: return gather_rows<2>();
          case 3: return gather_rows<3>();
          default: return gather_rows<4>();
        }
      }
    }
    with_token_vectors(T / Simd<A, B>::kLanes, [&](auto nv) __attribute__((always_inline)) {
      packed_rows<B, decltype(nv)::value>();
    });
  }
};

// Runs CsrRows over x [M, K]: the forward.
template <typename S>
void csr_rows(const S* src, int64_t M, int64_t R, const int32_t* crow, const uint8_t* idx, const S* values,
              const S* bias, S* out, int64_t O) {
  using A = at::opmath_type<S>;
  CsrRows<S> k{nullptr, M, R, 0, panels(R), crow, idx, values, bias, out, O};
  k.flat = flat_walk(R, O, k.P, crow);
  if (M <= gather_tokens(k.flat)) {
    Scratch<A> own;
    if constexpr (std::is_same_v<S, A>) {
      k.src = src;
    } else {
      own = scratch<A>(M * R);
      widen_rows(src, M, R, R, own.get());
      k.src = own.get();
    }
    parallel_run(k, O, 64);
    return;
  }
  const int64_t L = vector_bytes<CsrRows<S>::kVectorize>() / static_cast<int64_t>(sizeof(A));
  k.T = chunk_vectors<A>(M, L, R) * L;
  auto P = scratch<A>(ceil_div(M, k.T) * R * k.T);
  pack_tokens(src, M, R, R, k.T, P.get());
  k.src = P.get();
  parallel_run(k, ceil_div(M, k.T) * O, 16);
}

// grad_input from the row-major arrays: gx[m, p*256 + c] = sum over the rows o of sum over the entries j of segment
// o*P + p with idx[j] == c of values[j] * gy[m, o]. One task owns a (token chunk, column panel) pair and scatters
// into an L1-resident accumulator tile acc[256][T], so no two tasks write the same output and every value is read
// in order. Why not the transposed view (the forward's row walk over t_crow/t_row, values through t_perm, as the
// GPU backends do): that reads each value through a random permutation, one cache miss per nonzero (measured 0.5x
// torch CSR at 16 tokens).
template <typename S>
struct CsrScatterPanels {
  using A = at::opmath_type<S>;
  static constexpr bool kVectorize = !std::is_same_v<A, double>;
  const A* Pg;  // gy packed [chunks][N][T]
  int64_t M, N, K, T, P;
  const int32_t* crow;  // [N*P + 1]
  const uint8_t* idx;
  const S* values;
  S* out;  // [M, K]
  int64_t begin = 0, end = 0;  // (chunk, panel) pairs

  template <int B, int NV>
  EK_INLINE void panels_of() const {
    using W = Simd<A, B>;
    constexpr int64_t L = W::kLanes, TT = NV * L;
    alignas(64) A acc[kPanel * TT];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = i / P, p = i % P;
      std::fill(acc, acc + kPanel * TT, A(0));
      const A* g = Pg + c * N * TT;
      for (int64_t o = 0; o < N; ++o) {
        const int64_t j0 = crow[o * P + p], j1 = crow[o * P + p + 1];
        if (j0 == j1) continue;
        typename W::V gv[NV];
        for (int q = 0; q < NV; ++q) gv[q] = W::load(g + o * TT + q * L);
        for (int64_t j = j0; j < j1; ++j) {
          const typename W::V v = W::splat(widen_value<B, A>(values[j]));
          A* a = acc + static_cast<int64_t>(idx[j]) * TT;
          for (int q = 0; q < NV; ++q) W::store(a + q * L, W::load(a + q * L) + v * gv[q]);
        }
      }
      const int64_t tokens = std::min<int64_t>(TT, M - c * TT), cols = std::min<int64_t>(kPanel, K - p * kPanel);
      for (int64_t t = 0; t < tokens; ++t) {
        S* dst = out + (c * TT + t) * K + p * kPanel;
        for (int64_t col = 0; col < cols; ++col) dst[col] = static_cast<S>(acc[col * TT + t]);
      }
    }
  }

  template <int B>
  EK_INLINE void run() const {
    with_token_vectors(T / Simd<A, B>::kLanes, [&](auto nv) __attribute__((always_inline)) {
      panels_of<B, decltype(nv)::value>();
    });
  }
};

template <typename S>
void csr_scatter_grad_input(const S* gy, int64_t M, int64_t N, int64_t K, const int32_t* crow, const uint8_t* idx,
                            const S* values, S* out) {
  using A = at::opmath_type<S>;
  const int64_t L = vector_bytes<CsrScatterPanels<S>::kVectorize>() / static_cast<int64_t>(sizeof(A));
  const int64_t T = chunk_vectors<A>(M, L, N) * L, chunks = ceil_div(M, T), P = panels(K);
  auto Pg = scratch<A>(chunks * N * T);
  pack_tokens(gy, M, N, N, T, Pg.get());
  parallel_run(CsrScatterPanels<S>{Pg.get(), M, N, K, T, P, crow, idx, values, out}, chunks * P, 1);
}

// CSR value gradient from the forward arrays: g[j] = sum_m gy[m, o] * x[m, p*256 + idx[j]] for every entry j of
// segment o*P + p. A task owns a range of rows (so it needs no per-entry row index, which the transposed-view
// interface of the GPU backends keeps in row[]); each row's gy column is loaded once for all its entries. Where
// flat_walk() chose it, a row's offsets are expanded to whole columns and walked as one run, as in the forward.
// Each entry's dot product over the chunk's tokens is one vector of lane products; L of them are reduced together
// (Simd::sum_lanes) and stored as one vector. Measured against per-segment walks with 4-entry reductions (sum4 and
// scalar stores), 4096 x 4096 at 90%, 1 thread, AVX2 EPYC, min of 25 calls, three alternating runs: fp32 16 tokens
// 3.6-5.1 -> 2.2-2.7 ms, 64 tokens 13.1-17.9 -> 8.1-10.5; bf16 16 tokens 3.6-5.8 -> 2.4-2.6. (fp16 also lost ~3 ms
// to c10::Half's software narrowing of the 1.68M gradients: narrow_block, 6.2 -> 2.3-3.8 ms.)
template <typename S>
struct CsrGradValues {
  using A = at::opmath_type<S>;
  static constexpr bool kVectorize = !std::is_same_v<A, double>;
  const A* Pg;  // [chunks][N][T]
  const A* Px;  // [chunks][K][T]
  int64_t N, K, T, P, c;  // c: the chunk this pass adds
  const int32_t* crow;
  const uint8_t* idx;
  A* acc;  // [nnz]
  bool flat = false;
  int64_t begin = 0, end = 0;  // rows

  // Entries j .. j + count of one row (or one segment) against the row's gy vectors gv: offsets off[0 .. count)
  // in units of TT from base (whole-row columns from x, or panel offsets from the panel's first column).
  template <class W, int NV, class Off>
  EK_INLINE void entries(const A* base, const Off* off, const typename W::V (&gv)[NV], int64_t j,
                         int64_t count) const {
    constexpr int64_t L = W::kLanes;
    int64_t t = 0;
    for (; t + L <= count; t += L) {  // L entries' dot products reduced into one vector (Simd::sum_lanes)
      typename W::V s[L];
      for (int64_t u = 0; u < L; ++u) s[u] = dot<W>(base, off[t + u], gv);
      typename W::V g = W::sum_lanes(s);
      if (c != 0) g += W::load(acc + j + t);
      W::store(acc + j + t, g);
    }
    for (; t + 4 <= count; t += 4) {  // then four at a time (Simd::sum4)
      typename W::V s[4];
      for (int u = 0; u < 4; ++u) s[u] = dot<W>(base, off[t + u], gv);
      A dots[4];
      W::sum4(s[0], s[1], s[2], s[3], dots);
      for (int u = 0; u < 4; ++u) acc[j + t + u] = (c == 0 ? A(0) : acc[j + t + u]) + dots[u];
    }
    for (; t < count; ++t) acc[j + t] = (c == 0 ? A(0) : acc[j + t]) + W::sum(dot<W>(base, off[t], gv));
  }

  // One entry's products with the row's gy vectors, lane-wise: its dot product is the lane sum.
  template <class W, int NV>
  static EK_INLINE typename W::V dot(const A* base, int64_t offset, const typename W::V (&gv)[NV]) {
    constexpr int64_t L = W::kLanes;
    const A* b = base + offset * NV * L;
    typename W::V s = gv[0] * W::load(b);
    for (int q = 1; q < NV; ++q) s += gv[q] * W::load(b + q * L);
    return s;
  }

  template <int B, int NV>
  EK_INLINE void rows() const {
    using W = Simd<A, B>;
    constexpr int64_t L = W::kLanes, TT = NV * L;
    const A* g = Pg + c * N * TT;
    const A* x = Px + c * K * TT;
    RowColumns<kPanel> columns(crow[N * P]);
    for (int64_t o = begin; o < end; ++o) {
      typename W::V gv[NV];
      for (int q = 0; q < NV; ++q) gv[q] = W::load(g + o * TT + q * L);
      if (flat) {
        const int64_t j0 = crow[o * P];
        entries<W, NV>(x, columns.expand(crow, idx, o, P), gv, j0, crow[(o + 1) * P] - j0);
      } else {
        for (int64_t p = 0; p < P; ++p) {
          const int64_t j = crow[o * P + p];
          entries<W, NV>(x + p * kPanel * TT, idx + j, gv, j, crow[o * P + p + 1] - j);
        }
      }
    }
  }

  template <int B>
  EK_INLINE void run() const {
    with_token_vectors(T / Simd<A, B>::kLanes, [&](auto nv) __attribute__((always_inline)) {
      rows<B, decltype(nv)::value>();
    });
  }
};

template <typename S>
void csr_grad_values(const S* gy, const S* x, int64_t M, int64_t N, int64_t K, const int32_t* crow,
                     const uint8_t* idx, S* out) {
  using A = at::opmath_type<S>;
  const int64_t P = panels(K), nnz = crow[N * P];
  if (M <= kGatherTokens) {  // a few tokens: a plain dot product per entry, no packing
    at::parallel_for(0, N, 16, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        for (int64_t p = 0; p < P; ++p) {
          for (int64_t j = crow[o * P + p], j1 = crow[o * P + p + 1]; j < j1; ++j) {
            const int64_t k = p * kPanel + idx[j];
            A s = 0;
            for (int64_t m = 0; m < M; ++m) s += static_cast<A>(gy[m * N + o]) * static_cast<A>(x[m * K + k]);
            out[j] = static_cast<S>(s);
          }
        }
      }
    });
    return;
  }
  const int64_t L = vector_bytes<CsrGradValues<S>::kVectorize>() / static_cast<int64_t>(sizeof(A));
  const int64_t T = chunk_vectors<A>(M, L, N + K) * L, chunks = ceil_div(M, T);
  auto Pg = scratch<A>(chunks * N * T);
  auto Px = scratch<A>(chunks * K * T);
  auto acc = scratch<A>(nnz);
  const bool flat = flat_walk(K, N, P, crow);
  pack_tokens(gy, M, N, N, T, Pg.get());
  pack_tokens(x, M, K, K, T, Px.get());
  // Chunk-outer: one chunk of the packed operands stays in L2 while every entry visits it.
  for (int64_t c = 0; c < chunks; ++c) {
    parallel_run(CsrGradValues<S>{Pg.get(), Px.get(), N, K, T, P, c, crow, idx, acc.get(), flat}, N, 16);
  }
  at::parallel_for(0, nnz, 16384, [&](int64_t i0, int64_t i1) {
    narrow_block(acc.get() + i0, out + i0, i1 - i0);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// BSR block rows: out[m, ob*OB + r] = bias + sum over the stored blocks j of block row ob and c < RB of
// V_j(r, c) * src[m, idx[j]*RB + c], where V_j(r, c) = values[blk(j)][r*so + c*sr]. Forward: (OB, RB) = (BR, BC),
// (so, sr) = (BC, 1). grad_input uses the same loop on the transposed blocks: (OB, RB) = (BC, BR), (so, sr) =
// (1, BC), blocks through t_perm. src is packed [chunks][Rp][L], one vector of tokens per chunk.

template <typename S>
struct BsrRows {
  using A = at::opmath_type<S>;
  static constexpr bool kVectorize = !std::is_same_v<A, double>;
  const A* P;  // [chunks][Rp][L]
  int64_t M, Rp;
  const int32_t* crow;
  const int32_t* idx;
  const int32_t* perm;
  const S* values;
  const S* bias;
  S* out;  // [M, O]
  int64_t O, OB, RB, so, sr, block_rows;
  int64_t begin = 0, end = 0;  // (chunk, block row) pairs

  // Rows r0 .. r0+RG of one stored block into the accumulator tile acc [OB][L] (L1-resident).
  template <int B, int RG, typename VT>
  EK_INLINE void row_group(const VT* blk, const A* p, A* acc, int64_t r0) const {
    using W = Simd<A, B>;
    constexpr int64_t L = W::kLanes;
    typename W::V a[RG];
    for (int g = 0; g < RG; ++g) a[g] = W::load(acc + (r0 + g) * L);
    const VT* v0 = blk + r0 * so;
    for (int64_t cc = 0; cc < RB; ++cc) {
      const typename W::V xv = W::load(p + cc * L);
      const VT* v = v0 + cc * sr;
      for (int g = 0; g < RG; ++g) a[g] += W::splat(static_cast<A>(v[g * so])) * xv;
    }
    for (int g = 0; g < RG; ++g) W::store(acc + (r0 + g) * L, a[g]);
  }

  // One stored block (OB x RB values from blk) into the accumulator tile, kRowGroup rows at a time.
  template <int B, typename VT>
  EK_INLINE void block(const VT* blk, const A* p, A* acc) const {
    int64_t r0 = 0;
    for (; r0 + kRowGroup <= OB; r0 += kRowGroup) row_group<B, kRowGroup>(blk, p, acc, r0);
    switch (OB - r0) {  // the rest of the block's rows, without reading past the block
      case 7: row_group<B, 7>(blk, p, acc, r0); break;
      case 6: row_group<B, 6>(blk, p, acc, r0); break;
      case 5: row_group<B, 5>(blk, p, acc, r0); break;
      case 4: row_group<B, 4>(blk, p, acc, r0); break;
      case 3: row_group<B, 3>(blk, p, acc, r0); break;
      case 2: row_group<B, 2>(blk, p, acc, r0); break;
      case 1: row_group<B, 1>(blk, p, acc, r0); break;
      default: break;
    }
  }

  template <int B>
  EK_INLINE void run() const {
    using W = Simd<A, B>;
    constexpr int64_t L = W::kLanes;
    // Block-outer: each stored block is read once, front to back, while the OB x L accumulators live in L1. Row
    // groups outer (accumulators in registers) re-read every block of the row once per group with a 128 B stride
    // across 4 KiB blocks, which the prefetchers did not follow: 2.7 GB/s, slower than dense F.linear at 50%.
    std::vector<A> tile(OB * L);
    A* acc = tile.data();
    WideValues<S, A> wide;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = i / block_rows, ob = i % block_rows;
      const A* Pc = P + c * Rp * L;
      for (int64_t r = 0; r < OB; ++r) {
        const int64_t o = ob * OB + r;
        W::store(acc + r * L, W::splat(bias != nullptr && o < O ? static_cast<A>(bias[o]) : A(0)));
      }
      for (int64_t j = crow[ob], j1 = crow[ob + 1]; j < j1; ++j) {
        const int64_t b = (perm != nullptr ? perm[j] : j) * OB * RB;
        const A* p = Pc + static_cast<int64_t>(idx[j]) * RB * L;
        if constexpr (WideValues<S, A>::kWidens) {  // fp16: the block widened once (sparse_wide_values.h)
          wide.load(values, b, b + OB * RB);
          block<B>(wide.widened(), p, acc);
        } else {
          block<B>(values + b, p, acc);
        }
      }
      const int64_t tokens = std::min<int64_t>(L, M - c * L), rows = std::min<int64_t>(OB, O - ob * OB);
      for (int64_t t = 0; t < tokens; ++t) {
        S* y = out + (c * L + t) * O + ob * OB;
        for (int64_t r = 0; r < rows; ++r) y[r] = static_cast<S>(acc[r * L + t]);
      }
    }
  }
};

template <typename S>
void bsr_rows(const S* src, int64_t M, int64_t R, int64_t RB, const int32_t* crow, const int32_t* idx,
              const int32_t* perm, const S* values, const S* bias, S* out, int64_t O, int64_t OB, int64_t so,
              int64_t sr, int64_t block_rows) {
  using A = at::opmath_type<S>;
  const int64_t L = vector_bytes<BsrRows<S>::kVectorize>() / static_cast<int64_t>(sizeof(A));
  const int64_t Rp = ceil_div(R, RB) * RB, chunks = ceil_div(M, L);
  auto P = scratch<A>(chunks * Rp * L);
  pack_tokens(src, M, R, Rp, L, P.get());
  BsrRows<S> k{P.get(), M, Rp, crow, idx, perm, values, bias, out, O, OB, RB, so, sr, block_rows};
  parallel_run(k, chunks * block_rows, 1);
}

// BSR value gradient: g[b][r][c] = sum_m gy[m, row[b]*BR + r] * x[m, col[b]*BC + c]; a register-blocked outer
// product over tokens, kGradRows rows x 2 vectors of columns at a time. gy and x are first widened into rows padded
// past Np / Kp, so the last row group and column vector may read (never store) past the block.
template <typename S>
struct BsrGradValues {
  using A = at::opmath_type<S>;
  static constexpr bool kVectorize = !std::is_same_v<A, double>;
  const A* G;  // [M, Nx]
  const A* X;  // [M, Kx]
  int64_t M, Nx, Kx, BR, BC;
  const int32_t* row;
  const int32_t* col;
  S* out;
  int64_t begin = 0, end = 0;  // blocks

  template <int B>
  EK_INLINE void run() const {
    using W = Simd<A, B>;
    constexpr int64_t L = W::kLanes;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = static_cast<int64_t>(row[b]) * BR, k0 = static_cast<int64_t>(col[b]) * BC;
      S* dst = out + b * BR * BC;
      for (int64_t r0 = 0; r0 < BR; r0 += kGradRows) {
        for (int64_t c0 = 0; c0 < BC; c0 += 2 * L) {
          typename W::V acc[kGradRows][2] = {};
          for (int64_t m = 0; m < M; ++m) {
            const A* xr = X + m * Kx + k0 + c0;
            const typename W::V x0 = W::load(xr), x1 = W::load(xr + L);
            const A* gr = G + m * Nx + n0 + r0;
            for (int g = 0; g < kGradRows; ++g) {
              const typename W::V gv = W::splat(gr[g]);
              acc[g][0] += gv * x0;
              acc[g][1] += gv * x1;
            }
          }
          A lanes[kGradRows][2 * L];
          for (int g = 0; g < kGradRows; ++g) {
            W::store(lanes[g], acc[g][0]);
            W::store(lanes[g] + L, acc[g][1]);
          }
          const int64_t rows = std::min<int64_t>(kGradRows, BR - r0), cols = std::min<int64_t>(2 * L, BC - c0);
          for (int64_t g = 0; g < rows; ++g)
            for (int64_t cc = 0; cc < cols; ++cc) dst[(r0 + g) * BC + c0 + cc] = narrow_value<B, S>(lanes[g][cc]);
        }
      }
    }
  }
};

template <typename S>
void bsr_grad_values(const S* gy, const S* x, int64_t M, int64_t N, int64_t K, int64_t BR, int64_t BC,
                     int64_t nnzb, const int32_t* row, const int32_t* col, S* out) {
  using A = at::opmath_type<S>;
  const int64_t L = vector_bytes<BsrGradValues<S>::kVectorize>() / static_cast<int64_t>(sizeof(A));
  const int64_t Nx = ceil_div(N, BR) * BR + kGradRows, Kx = ceil_div(K, BC) * BC + 2 * L;
  auto gyf = scratch<A>(M * Nx);
  auto xf = scratch<A>(M * Kx);
  widen_rows(gy, M, N, Nx, gyf.get());
  widen_rows(x, M, K, Kx, xf.get());
  parallel_run(BsrGradValues<S>{gyf.get(), xf.get(), M, Nx, Kx, BR, BC, row, col, out}, nnzb, 1);
}

template <typename S>
const S* bias_ptr(const std::optional<at::Tensor>& bias) {
  return bias.has_value() && bias->defined() ? bias->data_ptr<S>() : nullptr;
}

}  // namespace

at::Tensor sparse_csr_fwd_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                              const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t N, int64_t K) {
  const int64_t M = x.size(0);
  at::Tensor y = empty_output({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_csr_fwd_cpu", [&] {
    csr_rows(x.data_ptr<scalar_t>(), M, K, crow.data_ptr<int32_t>(), col.data_ptr<uint8_t>(),
             values.data_ptr<scalar_t>(), bias_ptr<scalar_t>(bias), y.data_ptr<scalar_t>(), N);
  });
  return y;
}

at::Tensor sparse_csr_grad_input_rowwise_cpu(const at::Tensor& gy, const at::Tensor& crow, const at::Tensor& col,
                                             const at::Tensor& values, int64_t N, int64_t K) {
  const int64_t M = gy.size(0);
  at::Tensor gx = empty_output({M, K}, gy.options());
  if (M == 0 || K == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gy.scalar_type(), "sparse_csr_grad_input_cpu", [&] {
    csr_scatter_grad_input(gy.data_ptr<scalar_t>(), M, N, K, crow.data_ptr<int32_t>(), col.data_ptr<uint8_t>(),
                           values.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>());
  });
  return gx;
}

at::Tensor sparse_csr_grad_values_rowwise_cpu(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& crow,
                                              const at::Tensor& col) {
  const int64_t M = gy.size(0), nnz = col.numel();
  at::Tensor g = empty_output({nnz}, gy.options());
  if (nnz == 0) return g;
  if (M == 0) return g.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gy.scalar_type(), "sparse_csr_grad_values_cpu", [&] {
    csr_grad_values(gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), M, gy.size(1), x.size(1),
                    crow.data_ptr<int32_t>(), col.data_ptr<uint8_t>(), g.data_ptr<scalar_t>());
  });
  return g;
}

at::Tensor sparse_bsr_fwd_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                              const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t N, int64_t K) {
  const int64_t M = x.size(0), BR = values.size(1), BC = values.size(2);
  at::Tensor y = empty_output({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_bsr_fwd_cpu", [&] {
    bsr_rows(x.data_ptr<scalar_t>(), M, K, BC, crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), nullptr,
             values.data_ptr<scalar_t>(), bias_ptr<scalar_t>(bias), y.data_ptr<scalar_t>(), N, BR, BC, 1,
             crow.numel() - 1);
  });
  return y;
}

at::Tensor sparse_bsr_grad_input_cpu(const at::Tensor& gy, const at::Tensor& t_crow, const at::Tensor& t_row,
                                     const at::Tensor& t_perm, const at::Tensor& values, int64_t N, int64_t K) {
  const int64_t M = gy.size(0), BR = values.size(1), BC = values.size(2);
  at::Tensor gx = empty_output({M, K}, gy.options());
  if (M == 0 || K == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gy.scalar_type(), "sparse_bsr_grad_input_cpu", [&] {
    bsr_rows(gy.data_ptr<scalar_t>(), M, N, BR, t_crow.data_ptr<int32_t>(), t_row.data_ptr<int32_t>(),
             t_perm.data_ptr<int32_t>(), values.data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr),
             gx.data_ptr<scalar_t>(), K, BC, 1, BC, t_crow.numel() - 1);
  });
  return gx;
}

at::Tensor sparse_bsr_grad_values_cpu(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& row,
                                      const at::Tensor& col, at::IntArrayRef values_shape) {
  const int64_t M = gy.size(0), nnzb = values_shape[0], BR = values_shape[1], BC = values_shape[2];
  at::Tensor g = empty_output(values_shape, gy.options());
  if (nnzb == 0) return g;
  if (M == 0) return g.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gy.scalar_type(), "sparse_bsr_grad_values_cpu", [&] {
    bsr_grad_values(gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), M, gy.size(1), x.size(1), BR, BC, nnzb,
                    row.data_ptr<int32_t>(), col.data_ptr<int32_t>(), g.data_ptr<scalar_t>());
  });
  return g;
}

}  // namespace effikern
