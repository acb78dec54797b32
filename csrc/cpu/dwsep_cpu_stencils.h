// dwsep CPU kernels: the vectorized depthwise stencils and depthwise weight-gradient loops.
// Private to dwsep_cpu.cpp (the only file that includes it): one part of the fused depthwise-separable convolution
// kernel; the design is described at the top of dwsep_cpu.cpp.
#pragma once

#include <cstdint>

#include "dwsep_cpu_tiling.h"
#include "simd.h"

namespace effikern {
namespace dwsep_cpu {

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
// stencil_interleaved_block at k = 3..7. kUniform: every run has exactly NB members (stride 1, odd k), so the loop
// bounds are constants and no load is branched around. perf had put ~12% of the tile kernel on the per-run count
// compares (240x28 k5), but removing them measured within noise: the compares were waiting on loads, not the cost.
template <int B, typename T, int64_t NP, int64_t NB, bool kUniform>
EK_INLINE void stencil_runs_block(const T* src, const Window::TapRun* runs, int64_t n_runs, const T* w,
                                  const T* init, int64_t cp, int64_t c, int64_t v, T* out) {
  using S = Simd<T, B>;
  using V = typename S::V;
  V acc[NP];
  for (int64_t p = 0; p < NP; ++p) acc[p] = init != nullptr ? S::load(init + c) : V{};
  for (int64_t r = 0; r < n_runs; ++r) {
    const Window::TapRun& run = runs[r];
    const int64_t count = kUniform ? NB : run.count;
    const T* s = src + (v + run.off) * cp + c;
    V in[NP + NB - 1] = {};
    for (int64_t k = 0; k < NP + NB - 1; ++k) {
      if (k < NP + count - 1) in[k] = S::load(s + k * cp);
    }
    const T* wr = w + run.tap * cp + c;
    const int64_t wstep = run.tap_step * cp;
    for (int64_t k = 0; k < NB; ++k) {
      if (k >= count) break;
      const V wt = S::load(wr + k * wstep);
      for (int64_t p = 0; p < NP; ++p) acc[p] += wt * in[p + k];
    }
  }
  for (int64_t p = 0; p < NP; ++p) S::store(out + p * cp + c, acc[p]);
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

// Calls f(nb, uniform) with nb = std::integral_constant >= the longest tap run (3, 5 or 7) and uniform =
// std::integral_constant<bool> (every run has exactly nb members: the run kernels' constant-bound variant), or
// returns false when the window has no runs or longer ones (then the per-tap kernels are used).
template <class F>
EK_INLINE bool with_run_bound(const Window& win, F&& f) {
  if (win.runs.empty() || win.longest_run > 7) return false;
  auto pick_uniform = [&](auto nb) __attribute__((always_inline)) {
    if (win.shortest_run == decltype(nb)::value) {
      f(nb, std::true_type{});
    } else {
      f(nb, std::false_type{});
    }
  };
  if (win.longest_run > 5) {
    pick_uniform(std::integral_constant<int64_t, 7>{});
  } else if (win.longest_run > 3) {
    pick_uniform(std::integral_constant<int64_t, 5>{});
  } else {
    pick_uniform(std::integral_constant<int64_t, 3>{});
  }
  return true;
}

// The channels-last stencil with tap runs runs[0 .. n_runs) over the pixels [v0, v1).
template <int B, typename T, int64_t NB, bool kUniform>
EK_INLINE void stencil_runs(const T* src, const Window::TapRun* runs, int64_t n_runs, const T* w, const T* init,
                            int64_t cp, int64_t v0, int64_t v1, T* out) {
  // One channel vector at a time across all the pixels, so its weights stay in L1 over the pixel blocks. This
  // measured within noise of channels-innermost order on the benchmark shapes. A warm-cache micro-benchmark of this
  // loop (fp32, C = 96, 56 wide, k7) runs at ~1 16-lane FMA per cycle, the Zen 4 core's fp32 peak: what the
  // channels_last forward still loses to oneDNN is outside this loop (staging, conversion, the GEMM).
  for (int64_t c = 0; c < cp; c += Simd<T, B>::kLanes) {
    for_pixel_blocks(v0, v1, [&](auto np, int64_t v) __attribute__((always_inline)) {
      stencil_runs_block<B, T, decltype(np)::value, NB, kUniform>(src, runs, n_runs, w, init, cp, c, v,
                                                                   out + (v - v0) * cp);
    });
  }
}

// dw[t*cp + c] += sum_{v < n} g[v*cp + c] * src[(v + off[t])*cp + c] over tap runs: the accumulators of a run's taps
// stay in registers and each input pixel is loaded once per run, not once per tap (3x fewer loads at k = 5).
template <int B, typename T, int64_t NB, bool kUniform>
EK_INLINE void weight_grad_runs(const T* g, const T* src, const Window& win, int64_t cp, int64_t n, T* dw) {
  using S = Simd<T, B>;
  using V = typename S::V;
  constexpr int64_t NP = B == 64 ? 4 : 2;  // 16-register ISAs would spill with 4 pixels at NB = 7
  for (int64_t c = 0; c < cp; c += S::kLanes) {
    for (const Window::TapRun& run : win.runs) {
      const int64_t count = kUniform ? NB : run.count;
      V acc[NB] = {};
      const T* s = src + run.off * cp + c;
      int64_t v = 0;
      for (; v + NP <= n; v += NP) {
        V gv[NP], in[NP + NB - 1] = {};
        for (int64_t p = 0; p < NP; ++p) gv[p] = S::load(g + (v + p) * cp + c);
        for (int64_t k = 0; k < NP + NB - 1; ++k) {
          if (k < NP + count - 1) in[k] = S::load(s + (v + k) * cp);
        }
        for (int64_t k = 0; k < NB; ++k) {
          if (k >= count) break;
          for (int64_t p = 0; p < NP; ++p) acc[k] += gv[p] * in[p + k];
        }
      }
      for (; v < n; ++v) {
        const V gv = S::load(g + v * cp + c);
        for (int64_t k = 0; k < NB; ++k) {
          if (k >= count) break;
          acc[k] += gv * S::load(s + (v + k) * cp);
        }
      }
      for (int64_t k = 0; k < count; ++k) {
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

}  // namespace dwsep_cpu
}  // namespace effikern
