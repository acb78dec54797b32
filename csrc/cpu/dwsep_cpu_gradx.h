// dwsep CPU kernels: where the backward's grad_x goes, without a full-size accumulator.
// Private to dwsep_cpu.cpp (the only file that includes it): one part of the fused depthwise-separable convolution
// kernel; the design is described at the top of dwsep_cpu.cpp.
//
// A tile's grad window covers input rows [ih0, ih0 + Rq*sh) of its image. Neighbouring tiles share the last
// (Rq - rows)*sh of them (the stencil halo); every other row of the window belongs to that tile alone. So a row
// either gets its final value from one tile, stored straight into grad_x in the output dtype, or is shared by tile t
// and t + 1, which run in different phases (even tiles, then odd tiles): the even tile stores its part into a small
// halo buffer (T, one per tile boundary), and the odd tile adds its own, rounds once and stores the final value.
// Before this, grad_x accumulated in a zeroed fp32 image (read-modify-write per tile) converted at the end: for bf16
// at 8x144x56x56 that was, counted, ~65 MB of memory traffic (zero-fill, read-modify-write, convert) for a 7 MB
// result.
#pragma once

#include <algorithm>
#include <cstdint>

#include "dwsep_cpu_tiling.h"
#include "simd.h"

namespace effikern {
namespace dwsep_cpu {

enum class RowSink {
  kStore,     // the tile's own row: y = convert(g)
  kToHalo,    // shared, first half (even tile): halo = g
  kFromHalo,  // shared, second half (odd tile): y = convert(halo + g)
};

// The halo rows of the whole call: one block of halo_rows input rows per tile boundary (N * (per_image - 1)),
// each block [C][halo_rows][W] (NCHW) or [halo_rows][W][C] (channels_last); elements of rows outside the image are
// never touched.
struct GradXPlan {
  int64_t step;       // rows * sh: how far apart neighbouring tiles' windows start
  int64_t span;       // Rq * sh: input rows of a window
  int64_t halo_rows;  // span - step
  int64_t per_image;
  int64_t block_elems;  // halo_rows * W * C

  // True when the windows of the tiles cover every input row and column, so that every element of grad_x is
  // stored by some tile; otherwise grad_x must start zeroed (rows or columns no output pixel reads, e.g. kernel 3
  // at stride 4 over a 10-wide image).
  bool covers_image = true;
};

inline GradXPlan make_gradx_plan(const Geometry& g, const TilePlan& plan, const Window& w) {
  GradXPlan p;
  p.step = plan.rows * g.sh;
  p.span = w.Rq * g.sh;
  p.halo_rows = p.span - p.step;
  p.per_image = plan.per_image;
  p.block_elems = p.halo_rows * g.W * g.C;
  const int64_t last_row_end = (plan.per_image - 1) * p.step - g.ph + p.span;
  p.covers_image = last_row_end >= g.H && (g.W - 1 + g.pw) / g.sw < w.Wq;
  return p;
}

inline int64_t halo_elems(const GradXPlan& p, int64_t N) { return N * (p.per_image - 1) * p.block_elems; }

// The sink of one tile: for each input row of its window, where its values go.
template <typename scalar_t, typename T>
struct GradXTile {
  scalar_t* img;  // grad_x of the tile's image
  T* halo_prev;   // the halo block shared with tile t - 1 (rows [ih0, ih0 + halo_rows)), or nullptr
  T* halo_next;   // the block shared with tile t + 1 (rows [ih0 + step, ih0 + span)), or nullptr
  int64_t ih0, step, halo_rows;
  bool odd;  // phase 1: shared rows are finished here

  // The sink of input row ih and the row of the halo block it uses (index in [0, halo_rows)), if any.
  EK_INLINE RowSink sink(int64_t ih, T** halo, int64_t* halo_row) const {
    if (halo_prev != nullptr && ih < ih0 + halo_rows) {
      *halo = halo_prev, *halo_row = ih - ih0;
    } else if (halo_next != nullptr && ih >= ih0 + step) {
      *halo = halo_next, *halo_row = ih - ih0 - step;
    } else {
      return RowSink::kStore;
    }
    return odd ? RowSink::kFromHalo : RowSink::kToHalo;
  }
};

template <typename scalar_t, typename T>
GradXTile<scalar_t, T> gradx_tile(const GradXPlan& p, scalar_t* grad_x, T* halo, int64_t image_elems, const Tile& t,
                                  int64_t tile_index, int64_t ih0) {
  T* blocks = halo + t.n * (p.per_image - 1) * p.block_elems;  // boundary b sits between tiles b and b + 1
  return {grad_x + t.n * image_elems,
          tile_index > 0 ? blocks + (tile_index - 1) * p.block_elems : nullptr,
          tile_index + 1 < p.per_image ? blocks + tile_index * p.block_elems : nullptr,
          ih0,
          p.step,
          p.halo_rows,
          tile_index % 2 == 1};
}

// n values of the grad window (src) to their places, dst[i * stride] and halo[i * stride], by the row's sink.
template <typename scalar_t, typename T>
EK_INLINE void put_values(RowSink sink, const T* __restrict src, int64_t n, int64_t stride, scalar_t* __restrict dst,
                          T* __restrict halo) {
  switch (sink) {
    case RowSink::kStore:
      if (stride == 1) {
        for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
      } else {
        for (int64_t i = 0; i < n; ++i) dst[i * stride] = static_cast<scalar_t>(src[i]);
      }
      return;
    case RowSink::kToHalo:
      for (int64_t i = 0; i < n; ++i) halo[i * stride] = src[i];
      return;
    case RowSink::kFromHalo:
      for (int64_t i = 0; i < n; ++i) dst[i * stride] = static_cast<scalar_t>(halo[i * stride] + src[i]);
      return;
  }
}

}  // namespace dwsep_cpu
}  // namespace effikern
