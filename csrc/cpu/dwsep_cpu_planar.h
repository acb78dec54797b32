// dwsep CPU kernels: the NCHW layout (Planar): staging, depthwise, pointwise and their backward per tile.
// Private to dwsep_cpu.cpp (the only file that includes it): one part of the fused depthwise-separable convolution
// kernel; the design is described at the top of dwsep_cpu.cpp.
#pragma once

#include <ATen/ATen.h>

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
// NCHW. Window: [C][span], channel plane c at c * span. Tile matrices: Z, A, grad_Z [C x P]; G [Cout x P].
struct Planar {
  template <typename S, typename T>
  static int64_t window_elems(const Problem<S, T>& pb) {
    return pb.g.C * pb.win.span;
  }
  // Per-channel scratch: forward, the stencil output on all window positions; backward, grad_z on the virtual
  // positions (zero-padded in front for the mirrored stencil) and the channel's grad window.
  template <typename S, typename T>
  static int64_t fwd_scratch_elems(const Problem<S, T>& pb) {
    return pb.plan.rows * pb.win.Wq + kMaxLanes;
  }
  template <typename S, typename T>
  static int64_t grad_z_elems(const Problem<S, T>& pb) {
    return pb.win.pad + pb.win.span;
  }
  template <typename S, typename T>
  static int64_t grad_win_elems(const Problem<S, T>& pb) {
    return pb.win.span;
  }

  // Zero the whole window with one fill, then copy the in-image runs: rows of small images are a few elements long,
  // and per-row fills cost more than the copies. zeros_kept: last staged with the same ih0 (see the interleaved
  // layout's stage), so the fill is skipped.
  template <typename scalar_t, typename T>
  static EK_INLINE void stage(const Problem<scalar_t, T>& pb, const scalar_t* x_img, int64_t ih0, T* win,
                              bool zeros_kept) {
    const Geometry& g = pb.g;
    const Window& w = pb.win;
    if (!zeros_kept) std::fill(win, win + window_elems(pb), T(0));
    for (int64_t c = 0; c < g.C; ++c) {
      for (int64_t rho = 0; rho < g.sh; ++rho) {
        for (int64_t q = 0; q < g.sw; ++q) {
          const auto [lo, hi] = valid_cols(g, w, q);
          if (hi == lo) continue;
          for (int64_t rr = 0; rr < w.Rq; ++rr) {
            const int64_t ih = ih0 + rr * g.sh + rho;
            if (ih < 0 || ih >= g.H) continue;
            load_strided(x_img + (c * g.H + ih) * g.W + (lo * g.sw + q - g.pw), g.sw, hi - lo,
                         win + c * w.span + (rho * g.sw + q) * w.plane_size + rr * w.Wq + lo);
          }
        }
      }
    }
  }

  // Z[c][r*Wo + ow] = b[c] + sum_t w[c][t] * window_c[r*Wq + ow + off[t]]
  template <int B, typename scalar_t, typename T>
  static EK_INLINE void depthwise(const Problem<scalar_t, T>& pb, const T* win, int64_t rows, T* scratch, T* z) {
    const Geometry& g = pb.g;
    const Window& w = pb.win;
    const int64_t P = rows * g.Wo, taps = g.taps();
    for (int64_t c = 0; c < g.C; ++c) {
      stencil_planar<B>(win + c * w.span, w.off.data(), taps, pb.w_dw + c * taps, pb.b_dw[c], rows * w.Wq, scratch);
      for (int64_t r = 0; r < rows; ++r) {
        std::copy(scratch + r * w.Wq, scratch + r * w.Wq + g.Wo, z + c * P + r * g.Wo);
      }
    }
  }

  // grad_dw_w[c][t] += sum grad_z (x) window; grad_x += mirrored stencil of grad_z, channel by channel.
  template <int B, typename scalar_t, typename T>
  static EK_INLINE void depthwise_backward(const Problem<scalar_t, T>& pb, const T* win, int64_t rows, const T* gz,
                                           T* gzv, T* gwin, T* dw_acc, const GradXTile<scalar_t, T>& gx) {
    const Geometry& g = pb.g;
    const Window& w = pb.win;
    const int64_t P = rows * g.Wo, taps = g.taps();
    // Junk columns and padding stay zero for every channel: only the valid positions are rewritten below.
    std::fill(gzv, gzv + grad_z_elems(pb), T(0));
    T* gz_virtual = gzv + w.pad;
    for (int64_t c = 0; c < g.C; ++c) {
      for (int64_t r = 0; r < rows; ++r) {
        std::copy(gz + c * P + r * g.Wo, gz + c * P + (r + 1) * g.Wo, gz_virtual + r * w.Wq);
      }
      const T* plane = win + c * w.span;
      for (int64_t t = 0; t < taps; ++t) {
        dw_acc[c * taps + t] += dot<B>(gz_virtual, plane + w.off[t], rows * w.Wq);
      }
      for (size_t p = 0; p + 1 < w.plane_begin.size(); ++p) {
        const int64_t k0 = w.plane_begin[p], k1 = w.plane_begin[p + 1];
        // Rounding up to whole vectors spills into plane p + 1, which is written next (the last one into slack).
        stencil_planar<B>(gzv, w.back_shift.data() + k0, k1 - k0, pb.w_back + c * taps + k0, T(0), w.plane_size,
                          gwin + p * w.plane_size);
      }
      put_window(pb, gwin, c, gx);
    }
  }

  // grad_x[c] of the window's positions inside the image, each row to its sink (dwsep_cpu_gradx.h).
  template <typename scalar_t, typename T>
  static EK_INLINE void put_window(const Problem<scalar_t, T>& pb, const T* gwin, int64_t c,
                                   const GradXTile<scalar_t, T>& gx) {
    const Geometry& g = pb.g;
    const Window& w = pb.win;
    for (int64_t rho = 0; rho < g.sh; ++rho) {
      for (int64_t q = 0; q < g.sw; ++q) {
        const auto [lo, hi] = valid_cols(g, w, q);
        for (int64_t rr = 0; rr < w.Rq; ++rr) {
          const int64_t ih = gx.ih0 + rr * g.sh + rho;
          if (ih < 0 || ih >= g.H || hi == lo) continue;
          T* halo = nullptr;
          int64_t halo_row = 0;
          const RowSink sink = gx.sink(ih, &halo, &halo_row);
          const int64_t iw = lo * g.sw + q - g.pw;
          if (halo != nullptr) halo += (c * gx.halo_rows + halo_row) * g.W + iw;  // [C][halo_rows][W]
          put_values(sink, gwin + (rho * g.sw + q) * w.plane_size + rr * w.Wq + lo, hi - lo, g.sw,
                     gx.img + (c * g.H + ih) * g.W + iw, halo);
        }
      }
    }
  }

  // The GEMM writes the output tile [Cout x P] into a buffer: straight into y (row stride Ho*Wo) was 7% slower at
  // 384 -> 1536 channels, 14 x 14.
  static constexpr bool kGemmIntoY = false;
  template <typename scalar_t, typename T>
  static int64_t out_ld(const Problem<scalar_t, T>&, int64_t P) {
    return P;
  }

  // Y[Cout x P] = W[Cout x C] * A[C x P]
  template <typename scalar_t, typename T>
  static void pointwise(const Problem<scalar_t, T>& pb, const T* a, int64_t P, T* y, int64_t ld) {
    gemm(pb.g.Cout, P, pb.g.C, pb.w_pw, pb.g.C, a, P, y, ld, /*accumulate=*/false);
  }

  // The bf16 GEMM's A operand, W [Cout][C] with each row padded to an even C; its B, the tile A[C x P], is packed
  // per tile into bf16_operand_elems().
  static Scratch<uint16_t> pw_weight_bf16(const Geometry& g, const at::Tensor& pw_weight) {
    const int64_t ce = round_up(g.C, 2);
    auto w = scratch<uint16_t>(g.Cout * ce);
    const auto* src = reinterpret_cast<const uint16_t*>(pw_weight.data_ptr<at::BFloat16>());
    for (int64_t co = 0; co < g.Cout; ++co) {
      std::copy_n(src + co * g.C, g.C, w.get() + co * ce);
      if (ce != g.C) w[co * ce + g.C] = 0;
    }
    return w;
  }
  template <typename scalar_t, typename T>
  static int64_t bf16_operand_elems(const Problem<scalar_t, T>& pb) {
    return ceil_div(pb.g.C, 2) * bf16_gemm::packed_cols(pb.max_pixels()) * 2;
  }
  // y[co][p0 + p] = bf16(W[Cout x C] * A[C x P] + b[co] (+ res[co][p0 + p])), A rounded to bf16 first (the
  // reference's depthwise output is bf16 too); the GEMM's epilogue stores y.
  template <typename scalar_t, typename T>
  static void pointwise_bf16(const Problem<scalar_t, T>& pb, const float* a, int64_t P, uint16_t* a16,
                             const uint16_t* res_img, uint16_t* y_img, int64_t p0) {
    const int64_t HWo = pb.g.Ho * pb.g.Wo;
    bf16_gemm::pack_b_rows(a, pb.g.C, P, P, a16);
    bf16_gemm::Epilogue ep{y_img + p0, HWo};
    ep.row_bias = pb.b_pw;
    if (res_img != nullptr) ep.res = res_img + p0, ep.ld_res = HWo;
    bf16_gemm::gemm(pb.g.Cout, P, pb.g.C, pb.w_pw16, round_up(pb.g.C, 2), a16, ep);
  }

  // grad_A[C x P] = W^T[C x Cout] * G[Cout x P], and either dW[Cout x C] += G * A^T or dW^T[C x Cout] += A * G^T.
  template <typename scalar_t, typename T>
  static EK_INLINE void pointwise_backward(const Problem<scalar_t, T>& pb, const T* a, MatrixView<T> G, int64_t P,
                                           T* ga, T* tbuf, T* dw_pw) {
    const Geometry& g = pb.g;
    gemm(g.C, P, g.Cout, pb.w_pw, g.Cout, G.data, G.ld, ga, P, /*accumulate=*/false);
    if (pb.transpose_a()) {
      transpose(a, g.C, P, P, tbuf, g.C);
      gemm(g.Cout, g.C, P, G.data, G.ld, tbuf, g.C, dw_pw, g.C, /*accumulate=*/true);
    } else {
      transpose(G.data, g.Cout, P, G.ld, tbuf, g.Cout);
      gemm(g.C, g.Cout, P, a, P, tbuf, g.Cout, dw_pw, g.Cout, /*accumulate=*/true);
    }
  }
  template <typename scalar_t, typename T>
  static bool pw_grad_transposed(const Problem<scalar_t, T>& pb) {
    return !pb.transpose_a();
  }

  // y[co][p0 + p] = Y[co][p] + b[co] (+ res[co][p0 + p]), rounded once; Y may be y itself (see out_ld).
  template <typename scalar_t, typename T>
  static EK_INLINE void store(const Problem<scalar_t, T>& pb, const T* Y, int64_t ld, const scalar_t* res_img,
                              scalar_t* y_img, int64_t p0, int64_t P) {
    const Geometry& g = pb.g;
    const int64_t HWo = g.Ho * g.Wo;
    for (int64_t co = 0; co < g.Cout; ++co) {
      const T* src = Y + co * ld;
      const T b = pb.b_pw[co];
      scalar_t* dst = y_img + co * HWo + p0;
      if (res_img != nullptr) {
        const scalar_t* res = res_img + co * HWo + p0;
        for (int64_t p = 0; p < P; ++p) dst[p] = static_cast<scalar_t>(src[p] + b + static_cast<T>(res[p]));
      } else {
        for (int64_t p = 0; p < P; ++p) dst[p] = static_cast<scalar_t>(src[p] + b);
      }
    }
  }

  // G[Cout x P] of the grad_y tile: read in place when it is already in T, else converted into buf.
  template <typename scalar_t, typename T>
  static EK_INLINE MatrixView<T> load_grad(const Problem<scalar_t, T>& pb, const scalar_t* gy_img, int64_t p0,
                                           int64_t P, T* buf) {
    const int64_t HWo = pb.g.Ho * pb.g.Wo;
    if constexpr (std::is_same_v<scalar_t, T>) {
      return {gy_img + p0, HWo};
    } else {
      for (int64_t co = 0; co < pb.g.Cout; ++co) load_converted(gy_img + co * HWo + p0, P, buf + co * P);
      return {buf, P};
    }
  }

  // grad_pw_b += row sums of G; grad_dw_b += row sums of grad_Z.
  template <typename scalar_t, typename T>
  static EK_INLINE void bias_grads(const Problem<scalar_t, T>& pb, MatrixView<T> G, const T* gz, int64_t P,
                                   double* db_pw, double* db_dw) {
    add_row_sums(G.data, pb.g.Cout, P, G.ld, db_pw);
    add_row_sums(gz, pb.g.C, P, P, db_dw);
  }

  // The depthwise weight-gradient partial is kept as [C][taps].
  static constexpr bool kDwGradTransposed = false;
  // Its output is NCHW already (Problem::out_nchw is for Interleaved).
  static constexpr bool kNchwOutput = false;
  // Its backward GEMMs stay fp32 (the bf16 GEMM's operands would need packing from transposed tiles): NCHW images
  // of up to kSmallImage pixels run through Interleaved, so only larger ones take this path.
  static constexpr bool kBf16Backward = false;
  struct DwBatch {};  // the bf16 backward's state (Interleaved::DwBatch): none here
  template <typename S, typename T>
  static int64_t bf16_backward_elems(const Problem<S, T>&) {
    return 0;
  }
};

}  // namespace dwsep_cpu
}  // namespace effikern
