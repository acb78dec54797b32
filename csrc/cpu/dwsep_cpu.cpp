// Fused depthwise-separable convolution on the CPU: y = pw(act(dw(x) + dw_bias)) + pw_bias [+ residual].
// Shapes and semantics: dwsep_cpu.h. Numbers below were measured on the 2-core AMD EPYC (Zen 4) CI machine, fp32.
//
// Tiling. The work unit is a tile: R whole output rows of one image (P = R * Wo pixels). For each tile a thread
//   1. stages the input window the tile reads, all channels, into a zero-padded fp32 (fp64) buffer: half/bf16 are
//      converted once per element instead of once per tap, and the stencil loops need no bounds checks;
//   2. runs the depthwise stencil + bias into the tile matrix Z (P x C, about kTileBytes: it stays in L2), then the
//      activation;
//   3. runs the pointwise 1x1 conv as a GEMM on the tile with oneDNN's brgemm micro-kernel
//      (at::native::cpublas::brgemm, JIT-compiled once per shape and cached): 106-117 GFLOP/s per core on these tile
//      shapes, against 87-101 for MKL sgemm through at::mm on the same tiles (and ~95 per core for the reference's
//      oneDNN 1x1 convolution, so GEMM-bound shapes can only gain what the depthwise part saves);
//      bf16 forward on a CPU with AVX512-BF16: the tile is rounded to bf16 (as the reference's depthwise output is)
//      and multiplied by our vdpbf16ps GEMM (bf16_gemm.h: ~1.9x the fp32 brgemm's rate per core), whose epilogue
//      does step 4;
//   4. adds the pointwise bias (and the residual) in fp32, rounds once to the output dtype and stores y.
// Z never leaves the cache: the DRAM traffic is x in and y (and the residual) out.
//
// Polyphase windows. Row phase rho and column phase q of the window hold input rows ih0 + rr*sh + rho and columns
// jj*sw + q - pw, so every tap reads a contiguous run of positions at a fixed offset for any stride or dilation
// (Window::off), and the transposed stencil of the backward pass is the same stencil with mirrored offsets over a
// zero-padded grad_z, run plane by plane over that plane's taps only: a gather with register accumulators, not a
// read-modify-write scatter.
//
// Memory formats, both native (no conversion of x or y). NCHW ("Planar"): one window plane per channel; the stencil
// runs over all R*Wq window positions of a channel as one long vector loop (Wq - Wo junk columns per row are
// computed and dropped, 2-36% extra depthwise work) because per-row loops over Wo = 7..28 columns spent most of
// their time in loop tails; Z is [C x P] and y_tile[Cout x P] = W[Cout x C] * Z is already NCHW. Channels_last
// ("Interleaved"): channels are innermost (padded to 16), the stencil is vectorized over channels, 4 pixels per
// register block, each input loaded once per run of taps (Window::runs); Z is [P x C] and y_tile = Z * W^T is already
// channels_last. Converting NCHW x to channels_last once, running the channels_last kernel and converting y back was
// slower at every benchmark shape but one: 4.6 vs 2.3 ms at 8x32x112x112 (k3 -> 16), 54 vs 28 ms at 8x96x56x56
// (k7 -> 384); only 8x672x14x14 (k5 -> 112) gained 5%.
//
// Vectorization. The stencils use GCC vector types sized to the ISA: each kernel is compiled three times (AVX-512,
// AVX2+FMA, baseline SSE2/NEON) and the best one the CPU supports is picked at run time, so the wheel runs on any
// x86-64 and still uses 512-bit registers where they exist. Threading: at::parallel_for over tiles.
//
// Backward recomputes Z per tile, then: G = grad_y tile; grad_pw_w += G^T A and grad_pw_b += sum G (per-thread
// partials); grad_A = G W; grad_Z = grad_A * act'(Z); grad_dw_b += sum grad_Z; grad_dw_w += grad_Z (x) window;
// grad_x += transposed stencil of grad_Z. Neighbouring tiles of one image share input rows (the stencil halo), so
// grad_x is accumulated in two phases, even tiles then odd tiles: a tile is at least (kh-1)*dh/sh rows tall, so two
// tiles of one phase never touch the same input row, and no atomics or locks are needed.
#include "dwsep_cpu.h"
#include "bf16_gemm.h"
#include "int_math.h"
#include "isa_dispatch.h"
#include "simd.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__)
// Vectors are passed by value only between always-inlined functions, so GCC's ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace effikern {
namespace {

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

Geometry make_geometry(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
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

TilePlan plan_tiles(const Geometry& g, bool backward) {
  const int64_t pixels = std::max(kMinTilePixels, kTileBytes / (4 * g.C));
  int64_t rows = ceil_div(pixels, g.Wo);
  if (backward) {
    // Tiles t and t+2 touch disjoint input rows iff rows >= (kh-1)*dh/sh (window rows: see Window): the two-phase
    // grad_x accumulation relies on it.
    rows = std::max(rows, (g.kh - 1) * g.dh / g.sh);
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
  int64_t longest_run = 0;
  // The runs of the mirrored stencil, plane by plane (plane p: back_runs[back_run_begin[p] .. [p+1])), members in
  // reverse order so that offsets still increase with k.
  std::vector<TapRun> back_runs;
  std::vector<int64_t> back_run_begin;
};

// Tap runs of the window (see Window::runs).
void make_tap_runs(const Geometry& g, Window& w) {
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
          w.longest_run = 0;
          return;
        }
      }
      w.runs.push_back({w.off[taps[0]], taps[0], step, static_cast<int64_t>(taps.size())});
      w.longest_run = std::max(w.longest_run, static_cast<int64_t>(taps.size()));
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

Window make_window(const Geometry& g, int64_t rows) {
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
std::pair<int64_t, int64_t> valid_cols(const Geometry& g, const Window& w, int64_t q) {
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

  // The pointwise weight gradient needs one GEMM operand transposed (brgemm has no transpose flag): the smaller of
  // A (P x C) and G (P x Cout).
  bool transpose_a() const { return g.C <= g.Cout; }
  int64_t image_in() const { return g.C * g.H * g.W; }
  int64_t image_out() const { return g.Cout * g.Ho * g.Wo; }
  int64_t max_pixels() const { return plan.rows * g.Wo; }
  int64_t tile_elems() const { return max_pixels() * cp; }
};

// ---------------------------------------------------------------------------------------------------------------
// Vector kernels.

// U vectors of the planar stencil at v: U independent accumulator chains, kept in registers across the taps.
template <int B, typename T, int64_t U>
EK_INLINE void stencil_planar_block(const T* src, const int64_t* off, int64_t taps, const T* w, T init, int64_t v,
                                    T* out) {
  using S = Simd<T, B>;
  using V = typename S::V;
  V acc[U];
  for (int64_t u = 0; u < U; ++u) acc[u] = S::splat(init);
  for (int64_t t = 0; t < taps; ++t) {
    const V wt = S::splat(w[t]);
    const T* s = src + off[t] + v;
    for (int64_t u = 0; u < U; ++u) acc[u] += wt * S::load(s + u * S::kLanes);
  }
  for (int64_t u = 0; u < U; ++u) S::store(out + v + u * S::kLanes, acc[u]);
}

// out[v] = init + sum_t w[t] * src[off[t] + v] for v in [0, n), n rounded up to the vector width (the caller's
// buffers have the slack). The tail is one more full block, shifted back to overlap the previous one (it rewrites
// a few outputs with the same values), or, when n is shorter than a block, a block of as many vectors as needed:
// a lone accumulator chain is latency-bound, 4x slower per FMA.
template <int B, typename T>
EK_INLINE void stencil_planar(const T* src, const int64_t* off, int64_t taps, const T* w, T init, int64_t n,
                              T* out) {
  constexpr int64_t L = Simd<T, B>::kLanes, U = kVectorBlock;
  const int64_t nr = round_up(n, L);
  if (nr < U * L) {
    switch (nr / L) {
      case 3:
        return stencil_planar_block<B, T, 3>(src, off, taps, w, init, 0, out);
      case 2:
        return stencil_planar_block<B, T, 2>(src, off, taps, w, init, 0, out);
      default:
        return stencil_planar_block<B, T, 1>(src, off, taps, w, init, 0, out);
    }
  }
  for (int64_t v = 0; v < nr; v += U * L) {
    stencil_planar_block<B, T, U>(src, off, taps, w, init, std::min(v, nr - U * L), out);
  }
}

// sum(a[i] * b[i]) for i in [0, n), n rounded up to the vector width (a is zero past n).
template <int B, typename T>
EK_INLINE T dot(const T* a, const T* b, int64_t n) {
  using S = Simd<T, B>;
  using V = typename S::V;
  constexpr int64_t L = S::kLanes, U = kVectorBlock;
  V acc[U] = {};
  int64_t i = 0;
  for (; i + U * L <= n; i += U * L) {
    for (int64_t u = 0; u < U; ++u) acc[u] += S::load(a + i + u * L) * S::load(b + i + u * L);
  }
  for (; i < n; i += L) acc[0] += S::load(a + i) * S::load(b + i);
  return S::sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

// Channels-last stencil over positions [v0, v1), all cp channels:
//   out[(v - v0)*cp + c] = init[c] + sum_t w[t*cp + c] * src[(v + off[t])*cp + c]      (init == nullptr: zero)
// kPixelBlock pixels share each weight load.
template <int B, typename T, int64_t NP>
EK_INLINE void stencil_interleaved_block(const T* src, const int64_t* off, int64_t taps, const T* w, const T* init,
                                         int64_t cp, int64_t v, T* out) {
  using S = Simd<T, B>;
  using V = typename S::V;
  for (int64_t c = 0; c < cp; c += S::kLanes) {
    V acc[NP];
    for (int64_t p = 0; p < NP; ++p) acc[p] = init != nullptr ? S::load(init + c) : V{};
    for (int64_t t = 0; t < taps; ++t) {
      const V wt = S::load(w + t * cp + c);
      const T* s = src + (v + off[t]) * cp + c;
      for (int64_t p = 0; p < NP; ++p) acc[p] += wt * S::load(s + p * cp);
    }
    for (int64_t p = 0; p < NP; ++p) S::store(out + p * cp + c, acc[p]);
  }
}

// The same over tap runs (Window::runs): per run, the NP + count - 1 input pixels are loaded once and shared by all
// its taps; NB >= the longest run is a compile-time bound, so the inputs stay in registers. 1.6-2x fewer loads than
// stencil_interleaved_block at k = 3..7.
template <int B, typename T, int64_t NP, int64_t NB>
EK_INLINE void stencil_runs_block(const T* src, const Window::TapRun* runs, int64_t n_runs, const T* w,
                                  const T* init, int64_t cp, int64_t v, T* out) {
  using S = Simd<T, B>;
  using V = typename S::V;
  for (int64_t c = 0; c < cp; c += S::kLanes) {
    V acc[NP];
    for (int64_t p = 0; p < NP; ++p) acc[p] = init != nullptr ? S::load(init + c) : V{};
    for (int64_t r = 0; r < n_runs; ++r) {
      const Window::TapRun& run = runs[r];
      const T* s = src + (v + run.off) * cp + c;
      V in[NP + NB - 1] = {};
      for (int64_t k = 0; k < NP + NB - 1; ++k) {
        if (k < NP + run.count - 1) in[k] = S::load(s + k * cp);
      }
      const T* wr = w + run.tap * cp + c;
      for (int64_t k = 0; k < NB; ++k) {
        if (k >= run.count) break;
        const V wt = S::load(wr + k * run.tap_step * cp);
        for (int64_t p = 0; p < NP; ++p) acc[p] += wt * in[p + k];
      }
    }
    for (int64_t p = 0; p < NP; ++p) S::store(out + p * cp + c, acc[p]);
  }
}

// Runs block(np, v) over the pixels [v0, v1) in blocks of np = kPixelBlock; the tail is one more full block shifted
// back to overlap the previous one (same values rewritten), or a single block of all pixels when there are fewer.
template <class F>
EK_INLINE void for_pixel_blocks(int64_t v0, int64_t v1, F&& block) {
  constexpr int64_t NP = kPixelBlock;
  if (v1 - v0 < NP) {
    switch (v1 - v0) {
      case 3:
        return block(std::integral_constant<int64_t, 3>{}, v0);
      case 2:
        return block(std::integral_constant<int64_t, 2>{}, v0);
      default:
        return block(std::integral_constant<int64_t, 1>{}, v0);
    }
  }
  for (int64_t v = v0; v < v1; v += NP) block(std::integral_constant<int64_t, NP>{}, std::min(v, v1 - NP));
}

template <int B, typename T>
EK_INLINE void stencil_interleaved(const T* src, const int64_t* off, int64_t taps, const T* w, const T* init,
                                   int64_t cp, int64_t v0, int64_t v1, T* out) {
  for_pixel_blocks(v0, v1, [&](auto np, int64_t v) __attribute__((always_inline)) {
    stencil_interleaved_block<B, T, decltype(np)::value>(src, off, taps, w, init, cp, v, out + (v - v0) * cp);
  });
}

// Calls f(nb) with nb = std::integral_constant >= the longest tap run (3, 5 or 7), or returns false when the window
// has no runs or longer ones (then the per-tap kernels are used).
template <class F>
EK_INLINE bool with_run_bound(const Window& win, F&& f) {
  if (win.runs.empty() || win.longest_run > 7) return false;
  if (win.longest_run > 5) {
    f(std::integral_constant<int64_t, 7>{});
  } else if (win.longest_run > 3) {
    f(std::integral_constant<int64_t, 5>{});
  } else {
    f(std::integral_constant<int64_t, 3>{});
  }
  return true;
}

// The channels-last stencil with tap runs runs[0 .. n_runs) over the pixels [v0, v1).
template <int B, typename T, int64_t NB>
EK_INLINE void stencil_runs(const T* src, const Window::TapRun* runs, int64_t n_runs, const T* w, const T* init,
                            int64_t cp, int64_t v0, int64_t v1, T* out) {
  for_pixel_blocks(v0, v1, [&](auto np, int64_t v) __attribute__((always_inline)) {
    stencil_runs_block<B, T, decltype(np)::value, NB>(src, runs, n_runs, w, init, cp, v, out + (v - v0) * cp);
  });
}

// dw[t*cp + c] += sum_{v < n} g[v*cp + c] * src[(v + off[t])*cp + c] over tap runs: the accumulators of a run's taps
// stay in registers and each input pixel is loaded once per run, not once per tap (3x fewer loads at k = 5).
template <int B, typename T, int64_t NB>
EK_INLINE void weight_grad_runs(const T* g, const T* src, const Window& win, int64_t cp, int64_t n, T* dw) {
  using S = Simd<T, B>;
  using V = typename S::V;
  constexpr int64_t NP = B == 64 ? 4 : 2;  // 16-register ISAs would spill with 4 pixels at NB = 7
  for (int64_t c = 0; c < cp; c += S::kLanes) {
    for (const Window::TapRun& run : win.runs) {
      V acc[NB] = {};
      const T* s = src + run.off * cp + c;
      int64_t v = 0;
      for (; v + NP <= n; v += NP) {
        V gv[NP], in[NP + NB - 1] = {};
        for (int64_t p = 0; p < NP; ++p) gv[p] = S::load(g + (v + p) * cp + c);
        for (int64_t k = 0; k < NP + NB - 1; ++k) {
          if (k < NP + run.count - 1) in[k] = S::load(s + (v + k) * cp);
        }
        for (int64_t k = 0; k < NB; ++k) {
          if (k >= run.count) break;
          for (int64_t p = 0; p < NP; ++p) acc[k] += gv[p] * in[p + k];
        }
      }
      for (; v < n; ++v) {
        const V gv = S::load(g + v * cp + c);
        for (int64_t k = 0; k < NB; ++k) {
          if (k >= run.count) break;
          acc[k] += gv * S::load(s + (v + k) * cp);
        }
      }
      for (int64_t k = 0; k < run.count; ++k) {
        T* d = dw + (run.tap + k * run.tap_step) * cp + c;
        S::store(d, S::load(d) + acc[k]);
      }
    }
  }
}

// Channels-last weight gradient: dw[t*cp + c] += sum_{v < n} g[v*cp + c] * src[(v + off[t])*cp + c].
template <int B, typename T>
EK_INLINE void weight_grad_interleaved(const T* g, const T* src, const int64_t* off, int64_t taps, int64_t cp,
                                       int64_t n, T* dw) {
  using S = Simd<T, B>;
  using V = typename S::V;
  constexpr int64_t U = kVectorBlock;
  for (int64_t c = 0; c < cp; c += S::kLanes) {
    for (int64_t t = 0; t < taps; ++t) {
      const T* s = src + off[t] * cp + c;
      V acc[U] = {};
      int64_t v = 0;
      for (; v + U <= n; v += U) {
        for (int64_t u = 0; u < U; ++u) acc[u] += S::load(g + (v + u) * cp + c) * S::load(s + (v + u) * cp);
      }
      for (; v < n; ++v) acc[0] += S::load(g + v * cp + c) * S::load(s + v * cp);
      S::store(dw + t * cp + c, S::load(dw + t * cp + c) + (acc[0] + acc[1]) + (acc[2] + acc[3]));
    }
  }
}

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
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate) {
  // oneDNN's JIT micro-kernel; it falls back to BLAS sgemm on CPUs without AVX2.
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}

void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
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

// dst[i * stride] += src[i], specialized like load_strided.
template <typename T>
EK_INLINE void add_strided(const T* __restrict src, int64_t n, int64_t stride, T* __restrict dst) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
  } else if (stride == 2) {
    for (int64_t i = 0; i < n; ++i) dst[2 * i] += src[i];
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i * stride] += src[i];
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

// Scratch memory that is always written before it is read (std::vector would zero it first).
template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(new T[n]);
}

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
  // and per-row fills cost more than the copies.
  template <typename scalar_t, typename T>
  static EK_INLINE void stage(const Problem<scalar_t, T>& pb, const scalar_t* x_img, int64_t ih0, T* win) {
    const Geometry& g = pb.g;
    const Window& w = pb.win;
    std::fill(win, win + window_elems(pb), T(0));
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
                                           int64_t ih0, T* gzv, T* gwin, T* dw_acc, T* gx_img) {
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
      add_window(pb, gwin, c, ih0, gx_img);
    }
  }

  // grad_x[c][ih][iw] += grad window of channel c, for the window positions inside the image.
  template <typename scalar_t, typename T>
  static EK_INLINE void add_window(const Problem<scalar_t, T>& pb, const T* gwin, int64_t c, int64_t ih0,
                                   T* gx_img) {
    const Geometry& g = pb.g;
    const Window& w = pb.win;
    for (int64_t rho = 0; rho < g.sh; ++rho) {
      for (int64_t q = 0; q < g.sw; ++q) {
        const auto [lo, hi] = valid_cols(g, w, q);
        for (int64_t rr = 0; rr < w.Rq; ++rr) {
          const int64_t ih = ih0 + rr * g.sh + rho;
          if (ih < 0 || ih >= g.H || hi == lo) continue;
          add_strided(gwin + (rho * g.sw + q) * w.plane_size + rr * w.Wq + lo, hi - lo, g.sw,
                      gx_img + (c * g.H + ih) * g.W + (lo * g.sw + q - g.pw));
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
  static std::unique_ptr<uint16_t[]> pw_weight_bf16(const Geometry& g, const at::Tensor& pw_weight) {
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
  // Its backward GEMMs stay fp32 (the bf16 GEMM's operands would need packing from transposed tiles): NCHW images
  // of up to kSmallImage pixels run through Interleaved, so only larger ones take this path.
  static constexpr bool kBf16Backward = false;
  template <typename S, typename T>
  static int64_t bf16_backward_elems(const Problem<S, T>&) {
    return 0;
  }
};

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

  // Each window pixel is written once: copied (and its padding channels zeroed) or zeroed, and input rows are read in
  // memory order; zeroing the whole window first and visiting rows phase by phase (every sw-th pixel) made stride-2
  // staging 2x slower. With stride 1 and no channel padding a window row is a single copy.
  template <typename scalar_t, typename T>
  static EK_INLINE void stage(const Problem<scalar_t, T>& pb, const scalar_t* x_img, int64_t ih0, T* win) {
    const Geometry& g = pb.g;
    const Window& w = pb.win;
    const int64_t cp = pb.cp;
    const int64_t lo = std::min(g.pw, w.Wq), hi = std::max(lo, std::min(g.W + g.pw, w.Wq));  // sw == 1 only
    for (int64_t rho = 0; rho < g.sh; ++rho) {
      for (int64_t rr = 0; rr < w.Rq; ++rr) {
        const int64_t ih = ih0 + rr * g.sh + rho;
        const bool row_inside = ih >= 0 && ih < g.H;
        if (row_inside && g.sw == 1 && cp == g.C) {
          T* row = win + (rho * w.plane_size + rr * w.Wq) * cp;
          std::fill(row, row + lo * cp, T(0));
          load_converted(x_img + (ih * g.W + lo - g.pw) * g.C, (hi - lo) * g.C, row + lo * cp);
          std::fill(row + hi * cp, row + w.Wq * cp, T(0));
          continue;
        }
        for (int64_t jj = 0; jj < w.Wq; ++jj) {
          for (int64_t q = 0; q < g.sw; ++q) {  // window column jj*sw + q holds input column jj*sw + q - pw
            T* dst = win + ((rho * g.sw + q) * w.plane_size + rr * w.Wq + jj) * cp;
            const int64_t iw = jj * g.sw + q - g.pw;
            int64_t copied = 0;
            if (row_inside && iw >= 0 && iw < g.W) {
              load_converted(x_img + (ih * g.W + iw) * g.C, g.C, dst);
              copied = g.C;
            }
            std::fill(dst + copied, dst + cp, T(0));
          }
        }
      }
    }
    std::fill(win + w.positions * cp, win + w.span * cp, T(0));
  }

  // Z[r*Wo + ow][c] = b[c] + sum_t w[t][c] * window[(r*Wq + ow + off[t])][c]
  template <int B, typename scalar_t, typename T>
  static EK_INLINE void depthwise(const Problem<scalar_t, T>& pb, const T* win, int64_t rows, T*, T* z) {
    const Geometry& g = pb.g;
    const Window& w = pb.win;
    const bool runs = with_run_bound(w, [&](auto nb) __attribute__((always_inline)) {
      for (int64_t r = 0; r < rows; ++r) {
        stencil_runs<B, T, decltype(nb)::value>(win, w.runs.data(), static_cast<int64_t>(w.runs.size()), pb.w_dw,
                                                pb.b_dw, pb.cp, r * w.Wq, r * w.Wq + g.Wo, z + r * g.Wo * pb.cp);
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
                                           int64_t ih0, T* gzv, T* gwin, T* dw_acc, T* gx_img) {
    const Geometry& g = pb.g;
    const Window& w = pb.win;
    const int64_t cp = pb.cp;
    std::fill(gzv, gzv + grad_z_elems(pb), T(0));
    T* gz_virtual = gzv + w.pad * cp;
    for (int64_t r = 0; r < rows; ++r) {
      std::copy(gz + r * g.Wo * cp, gz + (r + 1) * g.Wo * cp, gz_virtual + r * w.Wq * cp);
    }
    const int64_t planes = static_cast<int64_t>(w.plane_begin.size()) - 1;
    const bool runs = with_run_bound(w, [&](auto nb) __attribute__((always_inline)) {
      constexpr int64_t NB = decltype(nb)::value;
      weight_grad_runs<B, T, NB>(gz_virtual, win, w, cp, rows * w.Wq, dw_acc);
      for (int64_t p = 0; p < planes; ++p) {
        const int64_t r0 = w.back_run_begin[p], r1 = w.back_run_begin[p + 1];
        stencil_runs<B, T, NB>(gzv, w.back_runs.data() + r0, r1 - r0, pb.w_dw, static_cast<const T*>(nullptr), cp,
                               0, w.plane_size, gwin + p * w.plane_size * cp);
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
    add_window(pb, gwin, ih0, gx_img);
  }

  template <typename scalar_t, typename T>
  static EK_INLINE void add_window(const Problem<scalar_t, T>& pb, const T* gwin, int64_t ih0, T* gx_img) {
    const Geometry& g = pb.g;
    const Window& w = pb.win;
    for (int64_t rho = 0; rho < g.sh; ++rho) {
      for (int64_t q = 0; q < g.sw; ++q) {
        const auto [lo, hi] = valid_cols(g, w, q);
        for (int64_t rr = 0; rr < w.Rq; ++rr) {
          const int64_t ih = ih0 + rr * g.sh + rho;
          if (ih < 0 || ih >= g.H) continue;
          const T* src = gwin + ((rho * g.sw + q) * w.plane_size + rr * w.Wq) * pb.cp;
          for (int64_t jj = lo; jj < hi; ++jj) {
            T* __restrict dst = gx_img + (ih * g.W + jj * g.sw + q - g.pw) * g.C;
            const T* __restrict s = src + jj * pb.cp;
            for (int64_t c = 0; c < g.C; ++c) dst[c] += s[c];
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
  static std::unique_ptr<uint16_t[]> pw_weight_bf16(const Geometry& g, const at::Tensor& pw_weight) {
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
  static std::unique_ptr<uint16_t[]> pw_weight_bf16_backward(const Geometry& g, const float* w) {
    const int64_t ldb = bf16_gemm::packed_cols(g.C), pairs = ceil_div(g.Cout, 2);
    auto packed = scratch<uint16_t>(pairs * ldb * 2);
    constexpr int64_t kPairsPerTask = 32;
    at::parallel_for(0, ceil_div(pairs, kPairsPerTask), 1, [&](int64_t begin, int64_t end) {
      const int64_t p0 = begin * kPairsPerTask, p1 = std::min(pairs, end * kPairsPerTask);
      bf16_gemm::pack_b_rows(w + 2 * p0 * g.C, std::min(2 * p1, g.Cout) - 2 * p0, g.C, g.C, packed.get() + p0 * ldb * 2);
    });
    return packed;
  }
  // Scratch of the bf16 backward per thread, in uint16 elements: G^T [Cout][P rounded to pairs], A packed as B
  // [P/2][packed C][2], and G with its K padded to a pair when Cout is odd.
  template <typename scalar_t, typename T>
  static int64_t bf16_backward_elems(const Problem<scalar_t, T>& pb) {
    const int64_t P = pb.max_pixels(), Pe = round_up(P, 2);
    return pb.g.Cout * Pe + Pe * bf16_gemm::packed_cols(pb.g.C) + (pb.g.Cout % 2 != 0 ? P * (pb.g.Cout + 1) : 0);
  }
  // grad_A[P x C] = G[P x Cout] * W[Cout x C] and dW[Cout x C] += G^T[Cout x P] * A[P x C] on the bf16 GEMM. G is
  // the bf16 grad_y tile itself (exact); A, the fp32 activation tile, is rounded to bf16 as it is packed, which is
  // what PyTorch's bf16 backward multiplies (its depthwise output is bf16). Products are exact, sums fp32.
  template <typename scalar_t, typename T>
  static void pointwise_backward_bf16(const Problem<scalar_t, T>& pb, const float* a, const uint16_t* gy_tile,
                                      int64_t P, float* ga, uint16_t* buf, float* dw_pw) {
    const int64_t C = pb.g.C, Cout = pb.g.Cout, Pe = round_up(P, 2);
    uint16_t* gt = buf;                         // [Cout][Pe]
    uint16_t* a_packed = gt + Cout * Pe;        // [Pe/2][packed_cols(C)][2]
    uint16_t* g_even = a_packed + Pe * bf16_gemm::packed_cols(C);  // [P][Cout + 1] when Cout is odd
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
    transpose(gy_tile, P, Cout, Cout, gt, Pe);
    if (P % 2 != 0) {
      for (int64_t co = 0; co < Cout; ++co) gt[co * Pe + P] = 0;
    }
    bf16_gemm::pack_b_rows(a, P, C, pb.cp, a_packed);
    bf16_gemm::gemm(Cout, C, P, gt, Pe, a_packed, dw_pw, C, /*accumulate=*/true);
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
        for (int64_t co = 0; co < Cout; ++co) dst[co] = static_cast<scalar_t>(src[co] + b[co] + static_cast<T>(res[co]));
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

// ---------------------------------------------------------------------------------------------------------------
// Forward: the tiles [begin, end) (tile index = n * per_image + t).

template <class L, typename scalar_t, typename T>
struct ForwardTiles {
  static constexpr bool kVectorize = std::is_same_v<T, float>;
  const Problem<scalar_t, T>& pb;
  const scalar_t* res;  // [N, Cout, Ho, Wo] in x's layout, or nullptr
  scalar_t* y;
  int64_t begin, end;

  template <int B>
  EK_INLINE void run() const {
    const Geometry& g = pb.g;
    const auto win = scratch<T>(L::window_elems(pb)), vbuf = scratch<T>(L::fwd_scratch_elems(pb));
    constexpr bool in_place = L::kGemmIntoY && std::is_same_v<scalar_t, T>;
    const bool bf16_dot = pb.w_pw16 != nullptr;
    const auto z = scratch<T>(pb.tile_elems());
    const auto ytile = scratch<T>(in_place || bf16_dot ? 0 : pb.max_pixels() * g.Cout);
    const auto a16 = scratch<uint16_t>(bf16_dot ? L::bf16_operand_elems(pb) : 0);
    for (int64_t task = begin; task < end; ++task) {
      const Tile tile = pb.plan.tile(task / pb.plan.per_image, task % pb.plan.per_image, g);
      const int64_t P = tile.rows * g.Wo;
      L::stage(pb, pb.x + tile.n * pb.image_in(), tile.oh0 * g.sh - g.ph, win.get());
      L::template depthwise<B>(pb, win.get(), tile.rows, vbuf.get(), z.get());
      activation_forward<B>(pb.act, z.get(), P * pb.cp);
      scalar_t* y_img = y + tile.n * pb.image_out();
      const scalar_t* res_img = res != nullptr ? res + tile.n * pb.image_out() : nullptr;
      const int64_t p0 = tile.oh0 * g.Wo, ld = L::out_ld(pb, P);
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        if (bf16_dot) {
          L::pointwise_bf16(pb, z.get(), P, a16.get(), reinterpret_cast<const uint16_t*>(res_img),
                            reinterpret_cast<uint16_t*>(y_img), p0);
          continue;
        }
      }
      T* out = ytile.get();
      if constexpr (in_place) out = L::out_in_place(y_img, p0, g.Cout);
      L::pointwise(pb, z.get(), P, out, ld);
      L::store(pb, out, ld, res_img, y_img, p0, P);
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Backward.

// One chunk's partial sums of the weight and bias gradients, in the layouts the Layout accumulates them in. The
// bias gradients sum N*Ho*Wo terms one by one; in fp32 that came out 7x less accurate than torch's own reduction,
// so they are summed in double (a few hundred values per tile: free).
template <typename T>
struct GradPartials {
  std::vector<T> pw_w, dw_w;
  std::vector<double> pw_b, dw_b;
  GradPartials(const Geometry& g, int64_t cp)
      : pw_w(g.Cout * g.C, T(0)), dw_w(cp * g.taps(), T(0)), pw_b(g.Cout, 0.0), dw_b(cp, 0.0) {}
};

// The tiles t = phase, phase + 2, ... of every image, numbered n * phase_tiles + k; this chunk runs [begin, end).
template <class L, typename scalar_t, typename T>
struct BackwardTiles {
  static constexpr bool kVectorize = std::is_same_v<T, float>;
  const Problem<scalar_t, T>& pb;
  const scalar_t* grad_y;  // [N, Cout, Ho, Wo] in x's layout
  T* grad_x;               // [N, C, H, W] in x's layout, accumulated
  GradPartials<T>& part;
  int64_t phase, begin, end;

  template <int B>
  EK_INLINE void run() const {
    const Geometry& g = pb.g;
    const auto win = scratch<T>(L::window_elems(pb)), gzv = scratch<T>(L::grad_z_elems(pb));
    const auto gwin = scratch<T>(L::grad_win_elems(pb));
    const auto z = scratch<T>(pb.tile_elems()), a = scratch<T>(pb.tile_elems());
    const auto gbuf = scratch<T>(std::is_same_v<scalar_t, T> ? 0 : pb.max_pixels() * g.Cout);
    const auto tbuf = scratch<T>(pb.max_pixels() * std::min(g.C, g.Cout));
    const bool bf16_dot = pb.w_pw16 != nullptr;
    const auto b16 = scratch<uint16_t>(bf16_dot ? L::bf16_backward_elems(pb) : 0);
    // Zeroed once: the GEMM never writes the padding channels of grad_A (channels_last), which must stay finite.
    std::vector<T> ga(pb.tile_elems(), T(0));
    const int64_t phase_tiles = (pb.plan.per_image - phase + 1) / 2;
    for (int64_t task = begin; task < end; ++task) {
      const Tile tile = pb.plan.tile(task / phase_tiles, phase + 2 * (task % phase_tiles), g);
      const int64_t P = tile.rows * g.Wo, ih0 = tile.oh0 * g.sh - g.ph;
      // Recompute z and a = act(z).
      L::stage(pb, pb.x + tile.n * pb.image_in(), ih0, win.get());
      L::template depthwise<B>(pb, win.get(), tile.rows, gwin.get(), z.get());
      std::copy(z.get(), z.get() + P * pb.cp, a.get());
      activation_forward<B>(pb.act, a.get(), P * pb.cp);
      // Pointwise: grad_pw_w, grad_pw_b and grad_a.
      const MatrixView<T> G = L::load_grad(pb, grad_y + tile.n * pb.image_out(), tile.oh0 * g.Wo, P, gbuf.get());
      bool bf16_done = false;
      if constexpr (std::is_same_v<scalar_t, at::BFloat16> && L::kBf16Backward) {
        if (bf16_dot) {
          const auto* gy_img = reinterpret_cast<const uint16_t*>(grad_y + tile.n * pb.image_out());
          L::pointwise_backward_bf16(pb, a.get(), gy_img + tile.oh0 * g.Wo * g.Cout, P, ga.data(), b16.get(),
                                     part.pw_w.data());
          bf16_done = true;
        }
      }
      if (!bf16_done) L::pointwise_backward(pb, a.get(), G, P, ga.data(), tbuf.get(), part.pw_w.data());
      // Activation, then depthwise: grad_dw_b, grad_dw_w and grad_x.
      activation_backward<B>(pb.act, ga.data(), z.get(), P * pb.cp);
      L::bias_grads(pb, G, ga.data(), P, part.pw_b.data(), part.dw_b.data());
      L::template depthwise_backward<B>(pb, win.get(), tile.rows, ga.data(), ih0, gzv.get(), gwin.get(),
                                        part.dw_w.data(), grad_x + tile.n * pb.image_in());
    }
  }
};

// Sums one member of the partials in chunk order (deterministic) into a tensor of the given shape.
template <typename T, typename A>
at::Tensor reduce_partials(const std::vector<GradPartials<T>>& parts, std::vector<A> GradPartials<T>::*member,
                           at::IntArrayRef shape) {
  at::Tensor out = at::zeros(shape, at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
  A* o = out.data_ptr<A>();
  for (const auto& p : parts) {
    const std::vector<A>& v = p.*member;
    for (size_t i = 0; i < v.size(); ++i) o[i] += v[i];
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Drivers.

// The weights in T and the layouts Problem documents, in one buffer. Built with plain loops: the ATen ops this
// replaced (a transposing copy, pads, index_select) cost 100-200 us of serial time per call, 10-20% of a whole
// forward at 8 x 960 x 7 x 7.
template <typename T>
struct PreparedWeights {
  std::unique_ptr<T[]> buf;
  T *w_dw, *w_back, *b_dw, *w_pw, *b_pw;
};

template <typename scalar_t, typename T>
void prepare_weights(const Geometry& g, const Window& win, bool channels_last, bool backward, bool pw_in_T, int64_t cp,
                     const at::Tensor& dw_weight, const c10::optional<at::Tensor>& dw_bias,
                     const at::Tensor& pw_weight, const c10::optional<at::Tensor>& pw_bias, PreparedWeights<T>& p) {
  TORCH_INTERNAL_ASSERT(dw_weight.is_contiguous() && pw_weight.is_contiguous());
  const int64_t taps = g.taps(), dw_elems = channels_last ? taps * cp : g.C * taps;
  p.buf = std::unique_ptr<T[]>(new T[2 * dw_elems + cp + g.C * g.Cout + g.Cout]);
  p.w_dw = p.buf.get(), p.w_back = p.w_dw + dw_elems, p.b_dw = p.w_back + dw_elems, p.w_pw = p.b_dw + cp;
  p.b_pw = p.w_pw + g.C * g.Cout;

  const scalar_t* wd = dw_weight.data_ptr<scalar_t>();  // [C][taps]
  if (channels_last) {  // [taps][cp], zero in the padding channels
    std::fill(p.w_dw, p.w_dw + dw_elems, T(0));
    transpose(wd, g.C, taps, taps, p.w_dw, cp);
    for (int64_t k = 0; k < taps; ++k) std::copy_n(p.w_dw + win.by_plane[k] * cp, cp, p.w_back + k * cp);
  } else {
    load_converted(wd, dw_elems, p.w_dw);
    for (int64_t c = 0; c < g.C; ++c) {
      for (int64_t k = 0; k < taps; ++k) p.w_back[c * taps + k] = p.w_dw[c * taps + win.by_plane[k]];
    }
  }
  std::fill(p.b_dw, p.b_dw + cp, T(0));
  if (dw_bias.has_value()) load_converted(dw_bias->data_ptr<scalar_t>(), g.C, p.b_dw);

  const scalar_t* wp = pw_weight.data_ptr<scalar_t>();  // [Cout][C]
  if (!pw_in_T) {  // the bf16 GEMM takes its own copy (Layout::pw_weight_bf16)
    p.w_pw = nullptr;
  } else if (channels_last != backward) {  // [C][Cout]; a large weight (1536 x 384) takes ~0.5 ms on one core
    constexpr int64_t kRowsPerTask = 64;
    at::parallel_for(0, ceil_div(g.Cout, kRowsPerTask), 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t r0 = b * kRowsPerTask;
        transpose(wp + r0 * g.C, std::min(kRowsPerTask, g.Cout - r0), g.C, g.C, p.w_pw + r0, g.Cout);
      }
    });
  } else {
    load_converted(wp, g.C * g.Cout, p.w_pw);
  }
  std::fill(p.b_pw, p.b_pw + g.Cout, T(0));
  if (pw_bias.has_value()) load_converted(pw_bias->data_ptr<scalar_t>(), g.Cout, p.b_pw);
}

// The problem for x and the weights; `w` must outlive it (Problem holds raw pointers into it).
template <class L, typename scalar_t, typename T>
Problem<scalar_t, T> make_problem(const Geometry& g, bool backward, int64_t act, const at::Tensor& x,
                                  const at::Tensor& dw_weight, const c10::optional<at::Tensor>& dw_bias,
                                  const at::Tensor& pw_weight, const c10::optional<at::Tensor>& pw_bias,
                                  PreparedWeights<T>& w, bool pw_in_T = true) {
  constexpr bool cl = std::is_same_v<L, Interleaved>;
  const TilePlan plan = plan_tiles(g, backward);
  Window win = make_window(g, plan.rows);
  const int64_t cp = cl ? round_up(g.C, kMaxLanes) : g.C;
  prepare_weights<scalar_t, T>(g, win, cl, backward, pw_in_T, cp, dw_weight, dw_bias, pw_weight, pw_bias, w);
  return Problem<scalar_t, T>{g,
                              plan,
                              std::move(win),
                              act,
                              cp,
                              x.data_ptr<scalar_t>(),
                              w.w_dw,
                              w.w_back,
                              w.b_dw,
                              w.w_pw,
                              w.b_pw};
}

template <class L, typename scalar_t>
void forward_impl(const Geometry& g, const at::Tensor& x, const at::Tensor& dw_weight,
                  const c10::optional<at::Tensor>& dw_bias, const at::Tensor& pw_weight,
                  const c10::optional<at::Tensor>& pw_bias, int64_t act, const at::Tensor& res, at::Tensor& y) {
  using T = at::opmath_type<scalar_t>;
  bool bf16_dot = false;
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) bf16_dot = bf16_gemm::available();
  PreparedWeights<T> w;
  auto pb = make_problem<L, scalar_t, T>(g, /*backward=*/false, act, x, dw_weight, dw_bias, pw_weight, pw_bias, w,
                                         /*pw_in_T=*/!bf16_dot);
  std::unique_ptr<uint16_t[]> w16;
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (bf16_dot) {
      w16 = L::pw_weight_bf16(g, pw_weight);
      pb.w_pw16 = w16.get();
    }
  }
  const scalar_t* res_ptr = res.defined() ? res.data_ptr<scalar_t>() : nullptr;
  scalar_t* y_ptr = y.data_ptr<scalar_t>();
  at::parallel_for(0, g.N * pb.plan.per_image, 1, [&](int64_t begin, int64_t end) {
    run_best_isa(ForwardTiles<L, scalar_t, T>{pb, res_ptr, y_ptr, begin, end});
  });
}

template <class L, typename scalar_t>
std::vector<at::Tensor> backward_impl(const Geometry& g, const at::Tensor& gy, const at::Tensor& x,
                                      const at::Tensor& dw_weight, const c10::optional<at::Tensor>& dw_bias,
                                      const at::Tensor& pw_weight, int64_t act) {
  using T = at::opmath_type<scalar_t>;
  PreparedWeights<T> w;
  auto pb = make_problem<L, scalar_t, T>(g, /*backward=*/true, act, x, dw_weight, dw_bias, pw_weight, c10::nullopt, w);
  std::unique_ptr<uint16_t[]> w16;
  if constexpr (std::is_same_v<scalar_t, at::BFloat16> && L::kBf16Backward) {
    if (bf16_gemm::available()) {
      w16 = L::pw_weight_bf16_backward(g, pb.w_pw);
      pb.w_pw16 = w16.get();
    }
  }
  const int64_t cp = pb.cp;
  // grad_x accumulates in T: straight into the result for float/double, else into an fp32 tensor rounded at the end.
  at::Tensor gx = at::zeros_like(x, x.options().dtype(c10::CppTypeToScalarType<T>::value));
  T* gx_ptr = gx.data_ptr<T>();
  const scalar_t* gy_ptr = gy.data_ptr<scalar_t>();

  // Fixed chunks (one per thread) own the partial sums, so the reduction order does not depend on scheduling.
  const int64_t chunks = std::max<int64_t>(1, at::get_num_threads());
  std::vector<GradPartials<T>> parts(chunks, GradPartials<T>(g, cp));
  for (int64_t phase = 0; phase < std::min<int64_t>(2, pb.plan.per_image); ++phase) {
    const int64_t tasks = g.N * ((pb.plan.per_image - phase + 1) / 2);
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t ch = cb; ch < ce; ++ch) {
        run_best_isa(BackwardTiles<L, scalar_t, T>{pb, gy_ptr, gx_ptr, parts[ch], phase, tasks * ch / chunks,
                                                    tasks * (ch + 1) / chunks});
      }
    });
  }

  at::Tensor gpw = L::pw_grad_transposed(pb) ? reduce_partials(parts, &GradPartials<T>::pw_w, {g.C, g.Cout}).t()
                                             : reduce_partials(parts, &GradPartials<T>::pw_w, {g.Cout, g.C});
  at::Tensor gdw = L::kDwGradTransposed
                       ? reduce_partials(parts, &GradPartials<T>::dw_w, {g.taps(), cp}).narrow(1, 0, g.C).t()
                       : reduce_partials(parts, &GradPartials<T>::dw_w, {g.C, g.taps()});
  const at::Tensor gdb = reduce_partials(parts, &GradPartials<T>::dw_b, {cp}).narrow(0, 0, g.C);
  const at::Tensor gpb = reduce_partials(parts, &GradPartials<T>::pw_b, {g.Cout});
  const at::ScalarType dt = x.scalar_type();
  return {gx.to(dt), gdw.to(dt).contiguous().view({g.C, 1, g.kh, g.kw}), gdb.to(dt).contiguous(),
          gpw.to(dt).contiguous().view({g.Cout, g.C, 1, 1}), gpb.to(dt)};
}

// NCHW images of at most this many pixels run through the channels_last kernels, x (and grad_y) converted on the
// way in and y (grad_x) on the way out: at 7x7 and 14x14 the planar kernels were 1.8-1.9x slower than the
// channels_last ones (7-14 wide rows are mostly vector tails, and the GEMM's N is P), and the conversions cost
// 5-15% of the op. At 28x28 the two were even.
constexpr int64_t kSmallImage = 14 * 14;

at::Tensor forward(const at::Tensor& x, bool channels_last, const at::Tensor& dw_weight,
                   const c10::optional<at::Tensor>& dw_bias, const at::Tensor& pw_weight,
                   const c10::optional<at::Tensor>& pw_bias, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t activation, const c10::optional<at::Tensor>& residual) {
  const Geometry g = make_geometry(x, dw_weight, pw_weight, stride, padding, dilation);
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_INTERNAL_ASSERT(x.is_contiguous(fmt));
  const at::Tensor res = residual.has_value() ? residual->contiguous(fmt) : at::Tensor();
  at::Tensor y = at::empty({g.N, g.Cout, g.Ho, g.Wo}, x.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwsep_fwd_cpu", [&] {
    if (channels_last) {
      forward_impl<Interleaved, scalar_t>(g, x, dw_weight, dw_bias, pw_weight, pw_bias, activation, res, y);
    } else {
      forward_impl<Planar, scalar_t>(g, x, dw_weight, dw_bias, pw_weight, pw_bias, activation, res, y);
    }
  });
  return y;
}

std::vector<at::Tensor> backward(const at::Tensor& grad_y, const at::Tensor& x, bool channels_last,
                                 const at::Tensor& dw_weight, const c10::optional<at::Tensor>& dw_bias,
                                 const at::Tensor& pw_weight, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t activation) {
  const Geometry g = make_geometry(x, dw_weight, pw_weight, stride, padding, dilation);
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_INTERNAL_ASSERT(x.is_contiguous(fmt));
  const at::Tensor gy = grad_y.contiguous(fmt);
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwsep_bwd_cpu", [&] {
    out = channels_last ? backward_impl<Interleaved, scalar_t>(g, gy, x, dw_weight, dw_bias, pw_weight, activation)
                        : backward_impl<Planar, scalar_t>(g, gy, x, dw_weight, dw_bias, pw_weight, activation);
  });
  return out;
}

bool is_small_nchw(const at::Tensor& x) {
  return x.suggest_memory_format() != at::MemoryFormat::ChannelsLast && x.size(2) * x.size(3) <= kSmallImage;
}

}  // namespace

at::Tensor dwsep_fwd_cpu(const at::Tensor& x, const at::Tensor& dw_weight, const c10::optional<at::Tensor>& dw_bias,
                         const at::Tensor& pw_weight, const c10::optional<at::Tensor>& pw_bias,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                         int64_t activation, const c10::optional<at::Tensor>& residual) {
  if (is_small_nchw(x)) {
    return forward(x.contiguous(at::MemoryFormat::ChannelsLast), /*channels_last=*/true, dw_weight, dw_bias,
                   pw_weight, pw_bias, stride, padding, dilation, activation, residual)
        .contiguous();
  }
  const bool cl = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  return forward(x, cl, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation, residual);
}

std::vector<at::Tensor> dwsep_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& dw_weight,
                                      const c10::optional<at::Tensor>& dw_bias, const at::Tensor& pw_weight,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t activation) {
  if (is_small_nchw(x)) {
    std::vector<at::Tensor> grads = backward(grad_y, x.contiguous(at::MemoryFormat::ChannelsLast),
                                             /*channels_last=*/true, dw_weight, dw_bias, pw_weight, stride, padding,
                                             dilation, activation);
    grads[0] = grads[0].contiguous();
    return grads;
  }
  const bool cl = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  return backward(grad_y, x, cl, dw_weight, dw_bias, pw_weight, stride, padding, dilation, activation);
}

}  // namespace effikern
