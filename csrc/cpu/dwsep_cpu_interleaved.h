// dwsep CPU kernels: the channels_last layout (Interleaved): staging, depthwise, pointwise and their backward per tile.
// Private to dwsep_cpu.cpp (the only file that includes it): one part of the fused depthwise-separable convolution
// kernel; the design is described at the top of dwsep_cpu.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>

#include "bf16_gemm.h"
#include "dwsep_cpu_gradx.h"
#include "dwsep_cpu_math.h"
#include "dwsep_cpu_stencils.h"
#include "dwsep_cpu_tiling.h"

namespace effikern {
namespace dwsep_cpu {

// ---------------------------------------------------------------------------------------------------------------
// Channels_last. Window: [span][cp], channels innermost (padded to cp, zero). Tile matrices: Z, A, grad_Z [P x cp]
// (GEMMs use the first C columns); G [P x Cout].
struct Interleaved {
  template <typename S, typename T>
  static int64_t window_elems(const Problem<S, T>& pb) {
    return pb.win.span * pb.cp;
  }
  template <typename S, typename T>
  static int64_t fwd_scratch_elems(const Problem<S, T>&) {
    return 0;
  }
  template <typename S, typename T>
  static int64_t grad_z_elems(const Problem<S, T>& pb) {
    return (pb.win.pad + pb.win.span) * pb.cp;
  }
  template <typename S, typename T>
  static int64_t grad_win_elems(const Problem<S, T>& pb) {
    return pb.win.span * pb.cp;
  }

  static EK_INLINE void prefetch_bytes(const void* p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b);
  }

  // An input larger than this comes from memory, not the last-level cache, on every call (the 32 MiB L3 of the
  // machine it was measured on, less what the output and the scratch take).
  static constexpr int64_t kStreamedInputBytes = int64_t(16) << 20;

  // Each window pixel is written once: copied (and its padding channels zeroed) or zeroed, and input rows are read in
  // memory order; zeroing the whole window first and visiting rows phase by phase (every sw-th pixel) made stride-2
  // staging 2x slower. With stride 1 and no channel padding a window row is a single copy.
  // zeros_kept: this buffer was last staged with the same ih0, so its zeros (the padding pixels and channels) are
  // where they are needed and only the copies run (the depthwise step only reads the window). On small images the
  // padding is most of the window: 72 of the 121 pixels of a 7x7 image with a 5x5 kernel, every image alike. (Not
  // measurable above this machine's noise in the bf16 8x1152x7x7 k5 forward; it saves ~2.6 MB of stores per call.)
  template <typename scalar_t, typename T>
  static EK_INLINE void stage(const Problem<scalar_t, T>& pb, const scalar_t* x_img, int64_t ih0, T* win,
                              bool zeros_kept) {
    const Geometry& g = pb.g;
    const Window& w = pb.win;
    const int64_t cp = pb.cp;
    const int64_t lo = std::min(g.pw, w.Wq), hi = std::max(lo, std::min(g.W + g.pw, w.Wq));  // sw == 1 only
    const bool streams = g.N * g.H * g.W * g.C * static_cast<int64_t>(sizeof(scalar_t)) > kStreamedInputBytes;
    for (int64_t rho = 0; rho < g.sh; ++rho) {
      for (int64_t rr = 0; rr < w.Rq; ++rr) {
        const int64_t ih = ih0 + rr * g.sh + rho;
        const bool row_inside = ih >= 0 && ih < g.H;
        if (row_inside && g.sw == 1 && cp == g.C) {
          T* row = win + (rho * w.plane_size + rr * w.Wq) * cp;
          if (!zeros_kept) std::fill(row, row + lo * cp, T(0));
          load_converted(x_img + (ih * g.W + lo - g.pw) * g.C, (hi - lo) * g.C, row + lo * cp);
          if (!zeros_kept) std::fill(row + hi * cp, row + w.Wq * cp, T(0));
          continue;
        }
        // Pixel by pixel (strided, or channels padded to the vector width). The input row staged next (rows go phase
        // by phase: ih0 + rho, ih0 + rho + sh, ...) is prefetched one row ahead when x is too large to stay in the
        // last-level cache between calls: perf put most of the bf16 8x96x112x112 stride-2 forward's staging on
        // the loads' wait for memory (alternating hand runs, 2 threads: 2.26-3.18 -> 1.77-2.72 ms). An input that
        // stays cached takes the loop without them (with them, fp32 1x96x112x112: 0.30 -> 0.32 ms).
        const int64_t ih_next = rr + 1 < w.Rq ? ih + g.sh : (rho + 1 < g.sh ? ih0 + rho + 1 : -1);
        const scalar_t* next_row = streams && ih_next >= 0 && ih_next < g.H ? x_img + ih_next * g.W * g.C : nullptr;
        auto pixels = [&](auto prefetch) __attribute__((always_inline)) {
          for (int64_t jj = 0; jj < w.Wq; ++jj) {
            for (int64_t q = 0; q < g.sw; ++q) {  // window column jj*sw + q holds input column jj*sw + q - pw
              T* dst = win + ((rho * g.sw + q) * w.plane_size + rr * w.Wq + jj) * cp;
              const int64_t iw = jj * g.sw + q - g.pw;
              int64_t copied = 0;
              if (iw >= 0 && iw < g.W) {
                if constexpr (decltype(prefetch)::value) prefetch_bytes(next_row + iw * g.C, g.C * sizeof(scalar_t));
                if (row_inside) {
                  load_converted(x_img + (ih * g.W + iw) * g.C, g.C, dst);
                  copied = g.C;
                }
              }
              if (!zeros_kept) std::fill(dst + copied, dst + cp, T(0));
            }
          }
        };
        next_row != nullptr ? pixels(std::true_type{}) : pixels(std::false_type{});
      }
    }
    if (!zeros_kept) std::fill(win + w.positions * cp, win + w.span * cp, T(0));
  }

  // Z[r*Wo + ow][c] = b[c] + sum_t w[t][c] * window[(r*Wq + ow + off[t])][c]
  template <int B, typename scalar_t, typename T>
  static EK_INLINE void depthwise(const Problem<scalar_t, T>& pb, const T* win, int64_t rows, T*, T* z) {
    const Geometry& g = pb.g;
    const Window& w = pb.win;
    const bool runs = with_run_bound(w, [&](auto nb, auto uniform) __attribute__((always_inline)) {
      for (int64_t r = 0; r < rows; ++r) {
        stencil_runs<B, T, decltype(nb)::value, decltype(uniform)::value>(
            win, w.runs.data(), static_cast<int64_t>(w.runs.size()), pb.w_dw, pb.b_dw, pb.cp, r * w.Wq,
            r * w.Wq + g.Wo, z + r * g.Wo * pb.cp);
      }
    });
    if (runs) return;
    for (int64_t r = 0; r < rows; ++r) {
      stencil_interleaved<B>(win, w.off.data(), g.taps(), pb.w_dw, pb.b_dw, pb.cp, r * w.Wq, r * w.Wq + g.Wo,
                             z + r * g.Wo * pb.cp);
    }
  }

  template <int B, typename scalar_t, typename T>
  static EK_INLINE void depthwise_backward(const Problem<scalar_t, T>& pb, const T* win, int64_t rows, const T* gz,
                                           T* gzv, T* gwin, T* dw_acc, const GradXTile<scalar_t, T>& gx) {
    const Geometry& g = pb.g;
    const Window& w = pb.win;
    const int64_t cp = pb.cp;
    std::fill(gzv, gzv + grad_z_elems(pb), T(0));
    T* gz_virtual = gzv + w.pad * cp;
    for (int64_t r = 0; r < rows; ++r) {
      std::copy(gz + r * g.Wo * cp, gz + (r + 1) * g.Wo * cp, gz_virtual + r * w.Wq * cp);
    }
    const int64_t planes = static_cast<int64_t>(w.plane_begin.size()) - 1;
    const bool runs = with_run_bound(w, [&](auto nb, auto uniform) __attribute__((always_inline)) {
      constexpr int64_t NB = decltype(nb)::value;
      constexpr bool kUniform = decltype(uniform)::value;
      weight_grad_runs<B, T, NB, kUniform>(gz_virtual, win, w, cp, rows * w.Wq, dw_acc);
      for (int64_t p = 0; p < planes; ++p) {
        const int64_t r0 = w.back_run_begin[p], r1 = w.back_run_begin[p + 1];
        stencil_runs<B, T, NB, kUniform>(gzv, w.back_runs.data() + r0, r1 - r0, pb.w_dw, static_cast<const T*>(nullptr),
                                         cp, 0, w.plane_size, gwin + p * w.plane_size * cp);
      }
    });
    if (!runs) {
      weight_grad_interleaved<B>(gz_virtual, win, w.off.data(), g.taps(), cp, rows * w.Wq, dw_acc);
      for (int64_t p = 0; p < planes; ++p) {
        const int64_t k0 = w.plane_begin[p], k1 = w.plane_begin[p + 1];
        stencil_interleaved<B>(gzv, w.back_shift.data() + k0, k1 - k0, pb.w_back + k0 * cp,
                               static_cast<const T*>(nullptr), cp, 0, w.plane_size, gwin + p * w.plane_size * cp);
      }
    }
    put_window(pb, gwin, gx);
  }

  // grad_x of the window's positions inside the image, each row to its sink (dwsep_cpu_gradx.h).
  template <typename scalar_t, typename T>
  static EK_INLINE void put_window(const Problem<scalar_t, T>& pb, const T* gwin, const GradXTile<scalar_t, T>& gx) {
    const Geometry& g = pb.g;
    const Window& w = pb.win;
    for (int64_t rho = 0; rho < g.sh; ++rho) {
      for (int64_t q = 0; q < g.sw; ++q) {
        const auto [lo, hi] = valid_cols(g, w, q);
        for (int64_t rr = 0; rr < w.Rq; ++rr) {
          const int64_t ih = gx.ih0 + rr * g.sh + rho;
          if (ih < 0 || ih >= g.H) continue;
          T* halo = nullptr;
          int64_t halo_row = 0;
          const RowSink sink = gx.sink(ih, &halo, &halo_row);
          if (halo != nullptr) halo += halo_row * g.W * g.C;  // [halo_rows][W][C]
          const T* src = gwin + ((rho * g.sw + q) * w.plane_size + rr * w.Wq) * pb.cp;
          for (int64_t jj = lo; jj < hi; ++jj) {
            const int64_t iw = jj * g.sw + q - g.pw;
            put_values(sink, src + jj * pb.cp, g.C, 1, gx.img + (ih * g.W + iw) * g.C,
                       halo != nullptr ? halo + iw * g.C : nullptr);
          }
        }
      }
    }
  }

  // The output tile [P x Cout] is contiguous in y, so when y is in T the GEMM writes it there directly (one tile copy
  // less); otherwise into a buffer with the same row stride.
  static constexpr bool kGemmIntoY = true;
  template <typename scalar_t, typename T>
  static int64_t out_ld(const Problem<scalar_t, T>& pb, int64_t) {
    return pb.g.Cout;
  }
  template <typename T>
  static T* out_in_place(T* y_img, int64_t p0, int64_t Cout) {
    return y_img + p0 * Cout;
  }

  // Y[P x Cout] = A[P x C] * W^T[C x Cout]
  template <typename scalar_t, typename T>
  static void pointwise(const Problem<scalar_t, T>& pb, const T* a, int64_t P, T* y, int64_t ld) {
    gemm(P, pb.g.Cout, pb.g.C, a, pb.cp, pb.w_pw, pb.g.Cout, y, ld, /*accumulate=*/false);
  }

  // The bf16 GEMM's B operand, W^T [C x Cout] packed (bf16_gemm.h); its A, the tile A[P x C], is rounded per tile
  // into bf16_operand_elems().
  static Scratch<uint16_t> pw_weight_bf16(const Geometry& g, const at::Tensor& pw_weight) {
    auto w = scratch<uint16_t>(ceil_div(g.C, 2) * bf16_gemm::packed_cols(g.Cout) * 2);
    const auto* src = reinterpret_cast<const uint16_t*>(pw_weight.data_ptr<at::BFloat16>());
    // In parallel: one thread took 0.3-0.8 ms for 1536 x 384, doubling small-batch forwards.
    constexpr int64_t kColsPerTask = 64;
    at::parallel_for(0, ceil_div(g.Cout, kColsPerTask), 1, [&](int64_t begin, int64_t end) {
      bf16_gemm::pack_b_from_rows_of_bt(src, /*K=*/g.C, /*N=*/g.Cout, /*ld=*/g.C, w.get(), begin * kColsPerTask,
                                        std::min(g.Cout, end * kColsPerTask));
    });
    return w;
  }
  template <typename scalar_t, typename T>
  static int64_t bf16_operand_elems(const Problem<scalar_t, T>& pb) {
    return pb.max_pixels() * round_up(pb.g.C, 2);
  }
  // y[p0 + p][co] = bf16(A[P x C] * W^T[C x Cout] + b[co] (+ res[p0 + p][co])), A rounded to bf16 first (the
  // reference's depthwise output is bf16 too); the GEMM's epilogue stores y.
  template <typename scalar_t, typename T>
  static void pointwise_bf16(const Problem<scalar_t, T>& pb, const float* a, int64_t P, uint16_t* a16,
                             const uint16_t* res_img, uint16_t* y_img, int64_t p0) {
    const int64_t ce = round_up(pb.g.C, 2), Cout = pb.g.Cout;
    bf16_gemm::round_rows(a, P, pb.g.C, pb.cp, ce, a16, ce);
    bf16_gemm::Epilogue ep{y_img + p0 * Cout, Cout};
    ep.col_bias = pb.b_pw;
    if (res_img != nullptr) ep.res = res_img + p0 * Cout, ep.ld_res = Cout;
    bf16_gemm::gemm(P, Cout, pb.g.C, a16, ce, pb.w_pw16, ep);
  }

  // Y[P x Cout] (fp32, row stride ld) = A[P x C] * W^T on the bf16 GEMM, A rounded to bf16 first: the NCHW-output
  // forward, which transposes Y as it stores it (store_nchw).
  template <typename scalar_t, typename T>
  static void pointwise_bf16_to_f32(const Problem<scalar_t, T>& pb, const float* a, int64_t P, uint16_t* a16,
                                    float* Y, int64_t ld) {
    const int64_t ce = round_up(pb.g.C, 2);
    bf16_gemm::round_rows(a, P, pb.g.C, pb.cp, ce, a16, ce);
    bf16_gemm::gemm(P, pb.g.Cout, pb.g.C, a16, ce, pb.w_pw16, Y, ld);
  }

  // NCHW y[co][p0 + p] = Y[p][co] + b[co] (+ res[co][p0 + p]), rounded once: the tile's pixels are whole output rows
  // of one image, so each channel's are contiguous in y. Transposed in 16 x 16 blocks that stay in L1.
  static constexpr bool kNchwOutput = true;
  template <typename scalar_t, typename T>
  static EK_INLINE void store_nchw(const Problem<scalar_t, T>& pb, const T* Y, int64_t ld, const scalar_t* res_img,
                                   scalar_t* y_img, int64_t p0, int64_t P) {
    const int64_t Cout = pb.g.Cout, plane = pb.g.Ho * pb.g.Wo;
    constexpr int64_t kB = 16;
    for (int64_t c0 = 0; c0 < Cout; c0 += kB) {
      for (int64_t q0 = 0; q0 < P; q0 += kB) {
        const int64_t c1 = std::min(Cout, c0 + kB), q1 = std::min(P, q0 + kB);
        for (int64_t co = c0; co < c1; ++co) {
          const T b = pb.b_pw[co];
          scalar_t* dst = y_img + co * plane + p0;
          if (res_img != nullptr) {
            const scalar_t* res = res_img + co * plane + p0;
            for (int64_t p = q0; p < q1; ++p) {
              dst[p] = static_cast<scalar_t>(Y[p * ld + co] + b + static_cast<T>(res[p]));
            }
          } else {
            for (int64_t p = q0; p < q1; ++p) dst[p] = static_cast<scalar_t>(Y[p * ld + co] + b);
          }
        }
      }
    }
  }

  // grad_A[P x C] = G[P x Cout] * W[Cout x C], and either dW^T[C x Cout] += A^T * G or dW[Cout x C] += G^T * A.
  template <typename scalar_t, typename T>
  static EK_INLINE void pointwise_backward(const Problem<scalar_t, T>& pb, const T* a, MatrixView<T> G, int64_t P,
                                           T* ga, T* tbuf, T* dw_pw) {
    const Geometry& g = pb.g;
    gemm(P, g.C, g.Cout, G.data, G.ld, pb.w_pw, g.C, ga, pb.cp, /*accumulate=*/false);
    if (pb.transpose_a()) {
      transpose(a, P, g.C, pb.cp, tbuf, P);
      gemm(g.C, g.Cout, P, tbuf, P, G.data, G.ld, dw_pw, g.Cout, /*accumulate=*/true);
    } else {
      transpose(G.data, P, g.Cout, G.ld, tbuf, P);
      gemm(g.Cout, g.C, P, tbuf, P, a, pb.cp, dw_pw, g.C, /*accumulate=*/true);
    }
  }
  template <typename scalar_t, typename T>
  static bool pw_grad_transposed(const Problem<scalar_t, T>& pb) {
    return pb.transpose_a() && pb.w_pw16 == nullptr;  // the bf16 backward accumulates dW as [Cout][C]
  }

  // The bf16 backward's operand for grad_A = G W: W [Cout x C] (fp32 here, bf16 values) packed as B, in parallel
  // ranges of row pairs like the forward's weight.
  static Scratch<uint16_t> pw_weight_bf16_backward(const Geometry& g, const float* w) {
    const int64_t ldb = bf16_gemm::packed_cols(g.C), pairs = ceil_div(g.Cout, 2);
    auto packed = scratch<uint16_t>(pairs * ldb * 2);
    constexpr int64_t kPairsPerTask = 32;
    at::parallel_for(0, ceil_div(pairs, kPairsPerTask), 1, [&](int64_t begin, int64_t end) {
      const int64_t p0 = begin * kPairsPerTask, p1 = std::min(pairs, end * kPairsPerTask);
      bf16_gemm::pack_b_rows(w + 2 * p0 * g.C, std::min(2 * p1, g.Cout) - 2 * p0, g.C, g.C,
                             packed.get() + p0 * ldb * 2);
    });
    return packed;
  }
  // The bf16 backward's dW += G^T A runs over batches of tiles, not tile by tile: its K is the tile's pixel count,
  // and a tile of a small image (7x7 at 960 channels: 14-35 pixels) made each call read and write the whole fp32 dW
  // [Cout x C] for a few MFLOP (8x960x7x7 k3 -> 160 backward at 1 thread: ~1 ms of ~4). The batch holds G^T and
  // the packed A of its tiles side by side along K (each tile's pixels rounded up to a pair, the pad zero) until
  // about kDwBatchPixels are in, then one GEMM accumulates them.
  static constexpr int64_t kDwBatchPixels = 256;
  struct DwBatch {
    uint16_t* gt;  // G^T [Cout][cap]
    uint16_t* a;   // A packed as B: [cap / 2][packed_cols(C)][2]
    int64_t cap, k = 0;
  };
  template <typename scalar_t, typename T>
  static int64_t dw_batch_cap(const Problem<scalar_t, T>& pb) {
    return std::max(round_up(pb.max_pixels(), 2), kDwBatchPixels);
  }
  // Scratch of the bf16 backward per thread, in uint16 elements: the DwBatch, and G with its K padded to a pair when
  // Cout is odd.
  template <typename scalar_t, typename T>
  static int64_t bf16_backward_elems(const Problem<scalar_t, T>& pb) {
    const int64_t P = pb.max_pixels(), cap = dw_batch_cap(pb);
    return pb.g.Cout * cap + cap * bf16_gemm::packed_cols(pb.g.C) + (pb.g.Cout % 2 != 0 ? P * (pb.g.Cout + 1) : 0);
  }
  template <typename scalar_t, typename T>
  static DwBatch dw_batch(const Problem<scalar_t, T>& pb, uint16_t* buf) {
    const int64_t cap = dw_batch_cap(pb);
    return {buf, buf + pb.g.Cout * cap, cap};
  }
  // dW[Cout x C] += the batch's G^T * A; empties it.
  template <typename scalar_t, typename T>
  static void flush_dw_batch(const Problem<scalar_t, T>& pb, DwBatch& batch, float* dw_pw) {
    if (batch.k == 0) return;
    bf16_gemm::gemm(pb.g.Cout, pb.g.C, batch.k, batch.gt, batch.cap, batch.a, dw_pw, pb.g.C, /*accumulate=*/true);
    batch.k = 0;
  }
  // grad_A[P x C] = G[P x Cout] * W[Cout x C] now, and dW[Cout x C] += G^T[Cout x P] * A[P x C] through the batch
  // (flush_dw_batch after the last tile). G is the bf16 grad_y tile itself (exact); A, the fp32 activation tile, is
  // rounded to bf16 as it is packed, which is what PyTorch's bf16 backward multiplies (its depthwise output is
  // bf16). Products are exact, sums fp32.
  template <typename scalar_t, typename T>
  static void pointwise_backward_bf16(const Problem<scalar_t, T>& pb, const float* a, const uint16_t* gy_tile,
                                      int64_t P, float* ga, DwBatch& batch, float* dw_pw) {
    const int64_t C = pb.g.C, Cout = pb.g.Cout, Pe = round_up(P, 2);
    uint16_t* g_even = batch.a + batch.cap * bf16_gemm::packed_cols(C);  // [P][Cout + 1] when Cout is odd
    const uint16_t* g_rows = gy_tile;
    int64_t ld_g = Cout;
    if (Cout % 2 != 0) {  // K of grad_A must come in pairs: pad each row with a zero
      for (int64_t p = 0; p < P; ++p) {
        std::copy(gy_tile + p * Cout, gy_tile + (p + 1) * Cout, g_even + p * (Cout + 1));
        g_even[p * (Cout + 1) + Cout] = 0;
      }
      g_rows = g_even, ld_g = Cout + 1;
    }
    bf16_gemm::gemm(P, C, Cout, g_rows, ld_g, pb.w_pw16, ga, pb.cp);
    if (batch.k + Pe > batch.cap) flush_dw_batch(pb, batch, dw_pw);
    transpose(gy_tile, P, Cout, Cout, batch.gt + batch.k, batch.cap);
    if (P % 2 != 0) {
      for (int64_t co = 0; co < Cout; ++co) batch.gt[co * batch.cap + batch.k + P] = 0;
    }
    bf16_gemm::pack_b_rows(a, P, C, pb.cp, batch.a + batch.k / 2 * bf16_gemm::packed_cols(C) * 2);
    batch.k += Pe;
  }

  // y[p0 + p][co] = Y[p][co] + b[co] (+ res[p0 + p][co]), rounded once; Y may be y itself.
  template <typename scalar_t, typename T>
  static EK_INLINE void store(const Problem<scalar_t, T>& pb, const T* Y, int64_t ld, const scalar_t* res_img,
                              scalar_t* y_img, int64_t p0, int64_t P) {
    const int64_t Cout = pb.g.Cout;
    for (int64_t p = 0; p < P; ++p) {
      const T* src = Y + p * ld;
      const T* b = pb.b_pw;
      scalar_t* dst = y_img + (p0 + p) * Cout;
      if (res_img != nullptr) {
        const scalar_t* res = res_img + (p0 + p) * Cout;
        for (int64_t co = 0; co < Cout; ++co) {
          dst[co] = static_cast<scalar_t>(src[co] + b[co] + static_cast<T>(res[co]));
        }
      } else {
        for (int64_t co = 0; co < Cout; ++co) dst[co] = static_cast<scalar_t>(src[co] + b[co]);
      }
    }
  }

  // G[P x Cout] of the grad_y tile: read in place when it is already in T, else converted into buf.
  template <typename scalar_t, typename T>
  static EK_INLINE MatrixView<T> load_grad(const Problem<scalar_t, T>& pb, const scalar_t* gy_img, int64_t p0,
                                           int64_t P, T* buf) {
    if constexpr (std::is_same_v<scalar_t, T>) {
      return {gy_img + p0 * pb.g.Cout, pb.g.Cout};
    } else {
      load_converted(gy_img + p0 * pb.g.Cout, P * pb.g.Cout, buf);
      return {buf, pb.g.Cout};
    }
  }

  // grad_pw_b += column sums of G; grad_dw_b += column sums of grad_Z.
  template <typename scalar_t, typename T>
  static EK_INLINE void bias_grads(const Problem<scalar_t, T>& pb, MatrixView<T> G, const T* gz, int64_t P,
                                   double* db_pw, double* db_dw) {
    add_col_sums(G.data, P, pb.g.Cout, G.ld, db_pw);
    add_col_sums(gz, P, pb.g.C, pb.cp, db_dw);
  }

  // The depthwise weight-gradient partial is kept as [taps][cp].
  static constexpr bool kDwGradTransposed = true;
  // The bf16 backward's pointwise GEMMs run on the bf16 GEMM (pointwise_backward_bf16).
  static constexpr bool kBf16Backward = true;
};

}  // namespace dwsep_cpu
}  // namespace effikern
