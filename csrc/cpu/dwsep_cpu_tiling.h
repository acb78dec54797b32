// dwsep CPU kernels: tuning constants, geometry, tiles, the polyphase window and the per-call Problem.
// Private to dwsep_cpu.cpp (the only file that includes it): one part of the fused depthwise-separable convolution
// kernel; the design is described at the top of dwsep_cpu.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "int_math.h"
#include "isa_dispatch.h"

namespace effikern {
namespace dwsep_cpu {

// ---------------------------------------------------------------------------------------------------------------
// Tuning constants.

// About this many bytes of depthwise output (P x C fp32) per tile, so that Z, the staged window and the output tile
// share the 1 MiB L2. 16..256 KiB measured within noise of each other on the benchmark shapes.
constexpr int64_t kTileBytes = 128 * 1024;
// At least this many pixels per tile (the GEMM's M or N), even for very wide C.
constexpr int64_t kMinTilePixels = 32;
// Most lanes of any vector used (fp32 in 512 bits): channel padding and window slack are sized for it.
constexpr int64_t kMaxLanes = 16;
// Pixels per register block in the channels-last stencil: 4 accumulators + the weight + a load fit 16 registers.
constexpr int64_t kPixelBlock = 4;
// Vectors per register block in the planar stencil: 4 independent FMA chains hide the FMA latency.
constexpr int64_t kVectorBlock = 4;

enum Activation : int64_t { kNone = 0, kRelu = 1, kRelu6 = 2, kSilu = 3, kGelu = 4, kHardswish = 5 };

// SIMD (Simd<T, B>, EK_INLINE): csrc/cpu/simd.h.
// Run-time ISA choice (AVX-512 / AVX2 / baseline per kernel class): csrc/cpu/isa_dispatch.h.
using isa::run_best_isa;

// ---------------------------------------------------------------------------------------------------------------
// Geometry and tiling.

struct Geometry {
  int64_t N, C, H, W, Cout, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
  int64_t taps() const { return kh * kw; }
};

inline Geometry make_geometry(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  Geometry g{};
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3), g.Cout = pw_weight.size(0);
  g.kh = dw_weight.size(2), g.kw = dw_weight.size(3);
  g.sh = stride[0], g.sw = stride[1], g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_INTERNAL_ASSERT(g.Ho >= 1 && g.Wo >= 1 && g.sh >= 1 && g.sw >= 1 && g.dh >= 1 && g.dw >= 1);
  return g;
}

// Output rows [oh0, oh0 + rows) of image n.
struct Tile {
  int64_t n, oh0, rows;
};

struct TilePlan {
  int64_t rows;       // output rows per tile; the last tile of an image may have fewer
  int64_t per_image;  // tiles per image
  Tile tile(int64_t n, int64_t t, const Geometry& g) const { return {n, t * rows, std::min(rows, g.Ho - t * rows)}; }
};

// threads: how many threads run the tiles (the backward sizes its tiles for them).
inline TilePlan plan_tiles(const Geometry& g, bool backward, int64_t threads) {
  const int64_t pixels = std::max(kMinTilePixels, kTileBytes / (4 * g.C));
  int64_t rows = ceil_div(pixels, g.Wo);
  if (backward) {
    // Tiles t and t+2 touch disjoint input rows iff rows >= (kh-1)*dh/sh (window rows: see Window): the two-phase
    // grad_x accumulation relies on it.
    const int64_t min_rows = std::max<int64_t>(1, (g.kh - 1) * g.dh / g.sh);
    // With few images, shorter tiles (down to that minimum) until each phase has a tile per thread: one 14x14
    // image in two tiles left the whole backward on one core while PyTorch's GEMMs used all of them.
    const int64_t wanted = ceil_div(2 * threads, g.N);
    if (ceil_div(g.Ho, rows) < wanted) rows = ceil_div(g.Ho, wanted);
    rows = std::max(rows, min_rows);
  }
  rows = std::min(std::max<int64_t>(rows, 1), g.Ho);
  // Same number of tiles, heights as even as possible: 7 rows at a target of 5 make tiles of 4 + 3, not 5 + 2 (a
  // 14-pixel GEMM).
  const int64_t per_image = ceil_div(g.Ho, rows);
  if (!backward) rows = ceil_div(g.Ho, per_image);
  return {rows, per_image};
}

// The polyphase window of a tile (top comment). Window positions are numbered plane * Rq*Wq + rr*Wq + jj, plane =
// rho*sw + q; output pixel (r, ow) of the tile has "virtual" position v = r*Wq + ow, and tap t reads position
// v + off[t] = v + plane_t * Rq*Wq + shift[t]. Only the taps of plane p read plane p, so the mirrored stencil
// (backward) runs plane by plane over those taps alone: grad_win[p*Rq*Wq + u] = sum_{t in p} w[t] *
// grad_z_virtual[u - shift[t]].
struct Window {
  int64_t Rq;          // rows per row phase
  int64_t Wq;          // columns per column phase (Wo valid output columns + junk)
  int64_t plane_size;  // Rq * Wq
  int64_t positions;   // sh * sw * plane_size
  int64_t pad;         // largest shift: zeros in front of the virtual grad_z for the mirrored stencil
  int64_t span;        // positions + slack for vector over-reads (per channel)
  std::vector<int64_t> off;          // per tap t = i*kw + j
  std::vector<int64_t> by_plane;     // the taps ordered by plane; plane p owns by_plane[plane_begin[p]..[p+1])
  std::vector<int64_t> plane_begin;  // sh*sw + 1 entries
  std::vector<int64_t> back_shift;   // per entry k of by_plane: pad - shift[by_plane[k]]
  // The taps of one kernel row and one column phase read consecutive positions when their column shifts are
  // consecutive (always for dilation 1): a run. Over a run, neighbouring output pixels share inputs, so the
  // channels-last stencil loads each input once per run instead of once per tap. Empty when some run has gaps.
  struct TapRun {
    int64_t off, tap, tap_step, count;  // member k reads off + k and uses the weight of tap + k * tap_step
  };
  std::vector<TapRun> runs;
  int64_t longest_run = 0, shortest_run = 0;
  // The runs of the mirrored stencil, plane by plane (plane p: back_runs[back_run_begin[p] .. [p+1])), members in
  // reverse order so that offsets still increase with k.
  std::vector<TapRun> back_runs;
  std::vector<int64_t> back_run_begin;
};

// Tap runs of the window (see Window::runs).
inline void make_tap_runs(const Geometry& g, Window& w) {
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t q = 0; q < g.sw; ++q) {
      std::vector<int64_t> taps;  // kernel row i, column phase q, by increasing column shift
      for (int64_t j = 0; j < g.kw; ++j) {
        if (j * g.dw % g.sw == q) taps.push_back(i * g.kw + j);
      }
      if (taps.empty()) continue;
      const int64_t step = taps.size() > 1 ? taps[1] - taps[0] : 1;
      for (size_t k = 1; k < taps.size(); ++k) {
        if (w.off[taps[k]] != w.off[taps[0]] + static_cast<int64_t>(k) || taps[k] - taps[k - 1] != step) {
          w.runs.clear();
          w.longest_run = w.shortest_run = 0;
          return;
        }
      }
      const int64_t count = static_cast<int64_t>(taps.size());
      w.shortest_run = w.runs.empty() ? count : std::min(w.shortest_run, count);
      w.runs.push_back({w.off[taps[0]], taps[0], step, count});
      w.longest_run = std::max(w.longest_run, count);
    }
  }
  const int64_t planes = g.sh * g.sw;
  for (int64_t p = 0; p < planes; ++p) {
    w.back_run_begin.push_back(static_cast<int64_t>(w.back_runs.size()));
    for (const Window::TapRun& run : w.runs) {
      if (run.off / w.plane_size != p) continue;
      const int64_t last_shift = run.off % w.plane_size + run.count - 1;
      w.back_runs.push_back({w.pad - last_shift, run.tap + (run.count - 1) * run.tap_step, -run.tap_step, run.count});
    }
  }
  w.back_run_begin.push_back(static_cast<int64_t>(w.back_runs.size()));
}

inline Window make_window(const Geometry& g, int64_t rows) {
  Window w;
  const int64_t planes = g.sh * g.sw;
  const int64_t max_row_shift = (g.kh - 1) * g.dh / g.sh, max_col_shift = (g.kw - 1) * g.dw / g.sw;
  w.Rq = rows + max_row_shift;
  w.Wq = g.Wo + max_col_shift;
  w.plane_size = w.Rq * w.Wq;
  w.positions = planes * w.plane_size;
  std::vector<int64_t> plane(g.taps()), shift(g.taps());
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t t = i * g.kw + j;
      plane[t] = (i * g.dh % g.sh) * g.sw + j * g.dw % g.sw;
      shift[t] = i * g.dh / g.sh * w.Wq + j * g.dw / g.sw;
      w.off.push_back(plane[t] * w.plane_size + shift[t]);
    }
  }
  w.pad = *std::max_element(shift.begin(), shift.end());
  for (int64_t p = 0; p < planes; ++p) {
    w.plane_begin.push_back(static_cast<int64_t>(w.by_plane.size()));
    for (int64_t t = 0; t < g.taps(); ++t) {
      if (plane[t] != p) continue;
      w.by_plane.push_back(t);
      w.back_shift.push_back(w.pad - shift[t]);
    }
  }
  w.plane_begin.push_back(g.taps());
  // Vector loops round their trip counts up to kMaxLanes; reads stay below off + rows*Wq + kMaxLanes.
  const int64_t max_off = *std::max_element(w.off.begin(), w.off.end());
  w.span = std::max(w.positions, max_off + rows * w.Wq) + kMaxLanes;
  make_tap_runs(g, w);
  return w;
}

// Phase-q window columns [lo, hi) that read input columns inside the image.
inline std::pair<int64_t, int64_t> valid_cols(const Geometry& g, const Window& w, int64_t q) {
  const int64_t lo = std::min(ceil_div(g.pw - q, g.sw), w.Wq);
  const int64_t hi = std::min(ceil_div(g.W + g.pw - q, g.sw), w.Wq);
  return {lo, std::max(lo, hi)};
}

// ---------------------------------------------------------------------------------------------------------------
// Everything a tile needs, shared read-only by all threads. T is the accumulation type (float, or double).

template <typename scalar_t, typename T>
struct Problem {
  Geometry g;
  TilePlan plan;
  Window win;
  int64_t act;
  int64_t cp;  // channel stride of the channels-last buffers (C rounded up to kMaxLanes); C for NCHW
  const scalar_t* x;
  const T* w_dw;    // depthwise weight: NCHW [C][taps], channels_last [taps][cp]
  const T* w_back;  // the same with the taps in Window::by_plane order, for the mirrored stencil
  const T* b_dw;    // [C] / [cp]
  // Pointwise weight as this pass's GEMM wants it: [Cout][C], or transposed [C][Cout] for the NCHW backward
  // (grad_A = W^T G) and the channels_last forward (Y = A W^T).
  const T* w_pw;
  const T* b_pw;  // [Cout]
  // bf16 inputs on a CPU with AVX512-BF16: the pointwise GEMMs multiply bf16 (bf16_gemm.h) instead of fp32, at
  // 1.5-2x the rate, with this pass's packed weight operand: W^T for the forward (Layout::pw_weight_bf16), W for
  // the channels_last backward's grad_A = G W (Interleaved::pw_weight_bf16_backward). nullptr: the fp32 GEMMs.
  const uint16_t* w_pw16 = nullptr;
  // The forward writes an NCHW y from channels_last tiles (Layout::kNchwOutput): small NCHW images run through the
  // channels_last kernels, and converting the whole output afterwards cost up to ~15% of a forward with a large
  // output (8x384x14x14 k7 -> 1536 fp32: 13.8-17.3 -> 12.0-12.2 ms; others within noise) and a y-sized temporary.
  bool out_nchw = false;

  // The pointwise weight gradient needs one GEMM operand transposed (brgemm has no transpose flag): the smaller of
  // A (P x C) and G (P x Cout).
  bool transpose_a() const { return g.C <= g.Cout; }
  int64_t image_in() const { return g.C * g.H * g.W; }
  int64_t image_out() const { return g.Cout * g.Ho * g.Wo; }
  int64_t max_pixels() const { return plan.rows * g.Wo; }
  int64_t tile_elems() const { return max_pixels() * cp; }
};

}  // namespace dwsep_cpu
}  // namespace effikern
