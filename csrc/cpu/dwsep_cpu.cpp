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
// grad_x = transposed stencil of grad_Z. Neighbouring tiles of one image share input rows (the stencil halo), so
// the tiles run in two phases, even tiles then odd tiles: a tile is at least (kh-1)*dh/sh rows tall, so two tiles
// of one phase never touch the same input row, and no atomics or locks are needed. Rows of one tile alone are
// stored in x's dtype directly; a shared row is parked in a small fp32 halo buffer by the even tile and finished by
// the odd one (dwsep_cpu_gradx.h), so there is no zeroed full-size fp32 accumulator. The bf16 backward's dW GEMM
// runs over batches of tiles (Interleaved::DwBatch).
//
// Files: dwsep_cpu_tiling.h (constants, geometry, tiles, the window, Problem), dwsep_cpu_stencils.h (vector
// stencils), dwsep_cpu_math.h (activations, GEMM, small dense helpers), dwsep_cpu_gradx.h (where grad_x rows go),
// dwsep_cpu_planar.h and dwsep_cpu_interleaved.h (the two layouts' per-tile steps); this file drives the tiles and
// holds the entry points.

#if defined(__GNUC__) && !defined(__clang__)
// Vectors are passed by value only between always-inlined functions, so GCC's ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "dwsep_cpu.h"
#include "bf16_gemm.h"
#include "dwsep_cpu_gradx.h"
#include "dwsep_cpu_interleaved.h"
#include "dwsep_cpu_math.h"
#include "dwsep_cpu_planar.h"
#include "dwsep_cpu_stencils.h"
#include "dwsep_cpu_tiling.h"
#include "int_math.h"
#include "isa_dispatch.h"
#include "output_alloc.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

namespace effikern {
namespace dwsep_cpu {
namespace {

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
    constexpr bool kInPlace = L::kGemmIntoY && std::is_same_v<scalar_t, T>;
    const bool nchw_out = L::kNchwOutput && pb.out_nchw;
    const bool in_place = kInPlace && !nchw_out;
    const bool bf16_dot = pb.w_pw16 != nullptr;
    const auto z = scratch<T>(pb.tile_elems());
    const auto ytile = scratch<T>(in_place || (bf16_dot && !nchw_out) ? 0 : pb.max_pixels() * g.Cout);
    const auto a16 = scratch<uint16_t>(bf16_dot ? L::bf16_operand_elems(pb) : 0);
    int64_t staged_ih0 = std::numeric_limits<int64_t>::min();  // the first row win was last staged from
    for (int64_t task = begin; task < end; ++task) {
      const Tile tile = pb.plan.tile(task / pb.plan.per_image, task % pb.plan.per_image, g);
      const int64_t P = tile.rows * g.Wo, ih0 = tile.oh0 * g.sh - g.ph;
      L::stage(pb, pb.x + tile.n * pb.image_in(), ih0, win.get(), /*zeros_kept=*/ih0 == staged_ih0);
      staged_ih0 = ih0;
      L::template depthwise<B>(pb, win.get(), tile.rows, vbuf.get(), z.get());
      activation_forward<B>(pb.act, z.get(), P * pb.cp);
      scalar_t* y_img = y + tile.n * pb.image_out();
      const scalar_t* res_img = res != nullptr ? res + tile.n * pb.image_out() : nullptr;
      const int64_t p0 = tile.oh0 * g.Wo, ld = L::out_ld(pb, P);
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        if (bf16_dot && !nchw_out) {
          L::pointwise_bf16(pb, z.get(), P, a16.get(), reinterpret_cast<const uint16_t*>(res_img),
                            reinterpret_cast<uint16_t*>(y_img), p0);
          continue;
        }
      }
      // Otherwise the pointwise result goes through an fp32 tile (y itself when in_place), then the store step.
      T* out = ytile.get();
      if constexpr (kInPlace) {
        if (in_place) out = L::out_in_place(y_img, p0, g.Cout);
      }
      bool multiplied = false;
      if constexpr (std::is_same_v<scalar_t, at::BFloat16> && L::kNchwOutput) {
        if (bf16_dot) {  // NCHW output only: the other bf16_dot calls stored through the epilogue above
          L::pointwise_bf16_to_f32(pb, z.get(), P, a16.get(), out, ld);
          multiplied = true;
        }
      }
      if (!multiplied) L::pointwise(pb, z.get(), P, out, ld);
      if constexpr (L::kNchwOutput) {
        if (nchw_out) {
          L::store_nchw(pb, out, ld, res_img, y_img, p0, P);
          continue;
        }
      }
      L::store(pb, out, ld, res_img, y_img, p0, P);
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Backward.

// One chunk's partial sums of the weight and bias gradients, in the layouts the Layout accumulates them in. The
// bias gradients sum N*Ho*Wo terms one by one; in fp32 that came out 7x less accurate than torch's own reduction,
// so they are summed in double (a few hundred values per tile: free).
// The weight partials are scratch (kept between calls when large, scratch.h): as std::vectors, one 384 -> 1536
// pointwise weight's 2.4 MB partial came back from the kernel as fresh pages on every call.
template <typename T>
struct GradPartials {
  Scratch<T> pw_w, dw_w;  // [Cout][C] or [C][Cout] (Layout::pw_grad_transposed); [C][taps] or [taps][cp]
  int64_t pw_elems, dw_elems;
  std::vector<double> pw_b, dw_b;
  GradPartials(const Geometry& g, int64_t cp)
      : pw_w(scratch<T>(g.Cout * g.C)),
        dw_w(scratch<T>(cp * g.taps())),
        pw_elems(g.Cout * g.C),
        dw_elems(cp * g.taps()),
        pw_b(g.Cout, 0.0),
        dw_b(cp, 0.0) {}
  // Called by the thread that accumulates into them, before its first tile (the scratch is uninitialized).
  void zero() {
    std::fill(pw_w.get(), pw_w.get() + pw_elems, T(0));
    std::fill(dw_w.get(), dw_w.get() + dw_elems, T(0));
  }
};

// The tiles t = phase, phase + 2, ... of every image, numbered n * phase_tiles + k; this chunk runs [begin, end).
template <class L, typename scalar_t, typename T>
struct BackwardTiles {
  static constexpr bool kVectorize = std::is_same_v<T, float>;
  const Problem<scalar_t, T>& pb;
  const scalar_t* grad_y;  // [N, Cout, Ho, Wo] in x's layout
  scalar_t* grad_x;        // [N, C, H, W] in x's layout
  const GradXPlan& gx_plan;
  T* halo;  // the halo rows shared by neighbouring tiles (dwsep_cpu_gradx.h)
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
    typename L::DwBatch dw_batch{};
    if constexpr (L::kBf16Backward) {
      if (bf16_dot) dw_batch = L::dw_batch(pb, b16.get());
    }
    // Zeroed once: the GEMM never writes the padding channels of grad_A (channels_last), which must stay finite.
    const auto ga = scratch<T>(pb.tile_elems());
    std::fill(ga.get(), ga.get() + pb.tile_elems(), T(0));
    const int64_t phase_tiles = (pb.plan.per_image - phase + 1) / 2;
    int64_t staged_ih0 = std::numeric_limits<int64_t>::min();  // the first row win was last staged from
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile_index = phase + 2 * (task % phase_tiles);
      const Tile tile = pb.plan.tile(task / phase_tiles, tile_index, g);
      const int64_t P = tile.rows * g.Wo, ih0 = tile.oh0 * g.sh - g.ph;
      // Recompute z and a = act(z).
      L::stage(pb, pb.x + tile.n * pb.image_in(), ih0, win.get(), /*zeros_kept=*/ih0 == staged_ih0);
      staged_ih0 = ih0;
      L::template depthwise<B>(pb, win.get(), tile.rows, gwin.get(), z.get());
      std::copy(z.get(), z.get() + P * pb.cp, a.get());
      activation_forward<B>(pb.act, a.get(), P * pb.cp);
      // Pointwise: grad_pw_w, grad_pw_b and grad_a.
      const MatrixView<T> G = L::load_grad(pb, grad_y + tile.n * pb.image_out(), tile.oh0 * g.Wo, P, gbuf.get());
      bool bf16_done = false;
      if constexpr (std::is_same_v<scalar_t, at::BFloat16> && L::kBf16Backward) {
        if (bf16_dot) {
          const auto* gy_img = reinterpret_cast<const uint16_t*>(grad_y + tile.n * pb.image_out());
          L::pointwise_backward_bf16(pb, a.get(), gy_img + tile.oh0 * g.Wo * g.Cout, P, ga.get(), dw_batch,
                                     part.pw_w.get());
          bf16_done = true;
        }
      }
      if (!bf16_done) L::pointwise_backward(pb, a.get(), G, P, ga.get(), tbuf.get(), part.pw_w.get());
      // Activation, then depthwise: grad_dw_b, grad_dw_w and grad_x.
      activation_backward<B>(pb.act, ga.get(), z.get(), P * pb.cp);
      L::bias_grads(pb, G, ga.get(), P, part.pw_b.data(), part.dw_b.data());
      L::template depthwise_backward<B>(pb, win.get(), tile.rows, ga.get(), gzv.get(), gwin.get(), part.dw_w.get(),
                                        gradx_tile(gx_plan, grad_x, halo, pb.image_in(), tile, tile_index, ih0));
    }
    if constexpr (std::is_same_v<scalar_t, at::BFloat16> && L::kBf16Backward) {
      if (bf16_dot) L::flush_dw_batch(pb, dw_batch, part.pw_w.get());
    }
  }
};

// out[i] = sum over chunks, in chunk order (deterministic), of part(chunk)[i], for i < n.
template <typename T, typename A, typename Get>
void sum_partials(const std::vector<GradPartials<T>>& parts, Get part, int64_t n, A* out) {
  std::fill(out, out + n, A(0));
  for (const auto& p : parts) {
    const auto* v = part(p);
    for (int64_t i = 0; i < n; ++i) out[i] += v[i];
  }
}

// The partials of one member in a new tensor of the given shape and the member's element type.
template <typename T, typename A, typename Get>
at::Tensor reduce_partials(const std::vector<GradPartials<T>>& parts, Get part, at::IntArrayRef shape) {
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
  sum_partials<T, A>(parts, part, out.numel(), out.data_ptr<A>());
  return out;
}

// The pointwise weight's gradient [Cout, C] in T, summed over the chunks straight into that layout: from [C][Cout]
// partials the sum is also the transpose, in 32 x 32 blocks summed in a local tile (partials read along Cout, the
// result written along C), in parallel over blocks of Cout. (A zeroed sum, then a transposing copy, each a fresh
// 2.4 MB tensor at 384 -> 1536, cost more than the kernel's own dW GEMMs at N = 1.)
template <typename T>
at::Tensor pw_weight_grad(const std::vector<GradPartials<T>>& parts, const Geometry& g, bool transposed) {
  at::Tensor out = empty_output({g.Cout, g.C}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* o = out.data_ptr<T>();
  if (!transposed) {
    sum_partials<T, T>(parts, [](const GradPartials<T>& p) { return p.pw_w.get(); }, g.Cout * g.C, o);
    return out;
  }
  constexpr int64_t kB = 32;
  at::parallel_for(0, ceil_div(g.Cout, kB), 1, [&](int64_t b0, int64_t b1) {
    T acc[kB][kB];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t co0 = b * kB, nco = std::min(kB, g.Cout - co0);
      for (int64_t c0 = 0; c0 < g.C; c0 += kB) {
        const int64_t nc = std::min(kB, g.C - c0);
        for (int64_t i = 0; i < nc; ++i) std::fill(acc[i], acc[i] + nco, T(0));
        for (const auto& p : parts) {
          for (int64_t i = 0; i < nc; ++i) {
            const T* row = p.pw_w.get() + (c0 + i) * g.Cout + co0;
            for (int64_t j = 0; j < nco; ++j) acc[i][j] += row[j];
          }
        }
        for (int64_t j = 0; j < nco; ++j) {
          for (int64_t i = 0; i < nc; ++i) o[(co0 + j) * g.C + c0 + i] = acc[i][j];
        }
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Drivers.

// The weights in T and the layouts Problem documents, in one buffer. Built with plain loops: the ATen ops this
// replaced (a transposing copy, pads, index_select) cost 100-200 us of serial time per call, 10-20% of a whole
// forward at 8 x 960 x 7 x 7.
template <typename T>
struct PreparedWeights {
  Scratch<T> buf;
  T *w_dw, *w_back, *b_dw, *w_pw, *b_pw;
};

template <typename scalar_t, typename T>
void prepare_weights(const Geometry& g, const Window& win, bool channels_last, bool backward, bool pw_in_T, int64_t cp,
                     const at::Tensor& dw_weight, const c10::optional<at::Tensor>& dw_bias,
                     const at::Tensor& pw_weight, const c10::optional<at::Tensor>& pw_bias, PreparedWeights<T>& p) {
  TORCH_INTERNAL_ASSERT(dw_weight.is_contiguous() && pw_weight.is_contiguous());
  const int64_t taps = g.taps(), dw_elems = channels_last ? taps * cp : g.C * taps;
  p.buf = scratch<T>(2 * dw_elems + cp + g.C * g.Cout + g.Cout);
  p.w_dw = p.buf.get(), p.w_back = p.w_dw + dw_elems, p.b_dw = p.w_back + dw_elems, p.w_pw = p.b_dw + cp;
  p.b_pw = p.w_pw + g.C * g.Cout;

  const scalar_t* wd = dw_weight.data_ptr<scalar_t>();  // [C][taps]
  if (channels_last) {  // [taps][cp], zero in the padding channels (the transpose writes the others)
    transpose(wd, g.C, taps, taps, p.w_dw, cp);
    for (int64_t k = 0; k < taps; ++k) std::fill(p.w_dw + k * cp + g.C, p.w_dw + (k + 1) * cp, T(0));
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
                                  PreparedWeights<T>& w, bool pw_in_T = true,
                                  int64_t threads = at::get_num_threads()) {
  constexpr bool cl = std::is_same_v<L, Interleaved>;
  const TilePlan plan = plan_tiles(g, backward, threads);
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
                  const c10::optional<at::Tensor>& pw_bias, int64_t act, const at::Tensor& res, at::Tensor& y,
                  bool y_nchw) {
  using T = at::opmath_type<scalar_t>;
  bool bf16_dot = false;
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) bf16_dot = bf16_gemm::available();
  PreparedWeights<T> w;
  auto pb = make_problem<L, scalar_t, T>(g, /*backward=*/false, act, x, dw_weight, dw_bias, pw_weight, pw_bias, w,
                                         /*pw_in_T=*/!bf16_dot);
  pb.out_nchw = y_nchw;
  Scratch<uint16_t> w16;
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

// threads: how many threads the tiles run on (1: serially, as one channel group of backward_by_channel_groups).
template <class L, typename scalar_t>
std::vector<at::Tensor> backward_impl(const Geometry& g, const at::Tensor& gy, const at::Tensor& x,
                                      const at::Tensor& dw_weight, const c10::optional<at::Tensor>& dw_bias,
                                      const at::Tensor& pw_weight, int64_t act, int64_t threads) {
  using T = at::opmath_type<scalar_t>;
  PreparedWeights<T> w;
  auto pb = make_problem<L, scalar_t, T>(g, /*backward=*/true, act, x, dw_weight, dw_bias, pw_weight, c10::nullopt, w,
                                         /*pw_in_T=*/true, threads);
  Scratch<uint16_t> w16;
  if constexpr (std::is_same_v<scalar_t, at::BFloat16> && L::kBf16Backward) {
    if (bf16_gemm::available()) {
      w16 = L::pw_weight_bf16_backward(g, pb.w_pw);
      pb.w_pw16 = w16.get();
    }
  }
  const int64_t cp = pb.cp;
  // Every element of grad_x is stored once, in x's dtype; only rows shared by two tiles pass through the halo
  // buffer (dwsep_cpu_gradx.h).
  const GradXPlan gx_plan = make_gradx_plan(g, pb.plan, pb.win);
  at::Tensor gx = empty_output_like(x);
  if (!gx_plan.covers_image) gx.zero_();
  scalar_t* gx_ptr = gx.data_ptr<scalar_t>();
  const auto halo = scratch<T>(halo_elems(gx_plan, g.N));
  const scalar_t* gy_ptr = gy.data_ptr<scalar_t>();

  // Fixed chunks (one per thread) own the partial sums, so the reduction order does not depend on scheduling.
  const int64_t chunks = std::max<int64_t>(1, threads);
  std::vector<GradPartials<T>> parts;
  parts.reserve(chunks);
  for (int64_t ch = 0; ch < chunks; ++ch) parts.emplace_back(g, cp);
  for (int64_t phase = 0; phase < std::min<int64_t>(2, pb.plan.per_image); ++phase) {
    const int64_t tasks = g.N * ((pb.plan.per_image - phase + 1) / 2);
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t ch = cb; ch < ce; ++ch) {
        if (phase == 0) parts[ch].zero();
        run_best_isa(BackwardTiles<L, scalar_t, T>{pb, gy_ptr, gx_ptr, gx_plan, halo.get(), parts[ch], phase,
                                                    tasks * ch / chunks, tasks * (ch + 1) / chunks});
      }
    });
  }

  const at::Tensor gpw = pw_weight_grad(parts, g, L::pw_grad_transposed(pb));
  const auto dw_w = [](const GradPartials<T>& p) { return p.dw_w.get(); };
  at::Tensor gdw = L::kDwGradTransposed ? reduce_partials<T, T>(parts, dw_w, {g.taps(), cp}).narrow(1, 0, g.C).t()
                                        : reduce_partials<T, T>(parts, dw_w, {g.C, g.taps()});
  const at::Tensor gdb =
      reduce_partials<T, double>(parts, [](const GradPartials<T>& p) { return p.dw_b.data(); }, {cp}).narrow(0, 0, g.C);
  const at::Tensor gpb =
      reduce_partials<T, double>(parts, [](const GradPartials<T>& p) { return p.pw_b.data(); }, {g.Cout});
  const at::ScalarType dt = x.scalar_type();
  return {gx, gdw.to(dt).contiguous().view({g.C, 1, g.kh, g.kw}), gdb.to(dt).contiguous(),
          gpw.to(dt).contiguous().view({g.Cout, g.C, 1, 1}), gpb.to(dt)};
}

// ---------------------------------------------------------------------------------------------------------------
// Channel groups for a backward with too few tiles.
//
// The backward's tiles run in two phases, and a tile must be at least (kh-1)*dh/sh rows tall, so a small batch of
// small images has few tiles per phase: one 14x14 image with a 7x7 kernel is three tiles (6 + 6 + 2 rows), phases of
// two tiles and one, and on two threads 12 of its 14 rows ran one after the other while PyTorch's GEMMs used both
// cores. Every step of the backward is separable by input channel, though: the depthwise parts are per channel, and
// for a channel slice S, grad_A[:, S] = G W[:, S] and grad_W_pw[:, S] = G^T A[:, S] need only that slice of A and
// W. So such a backward runs as independent problems over channel slices, one per thread, each serially over all
// its tiles; the only duplicated work is reading grad_y (and summing it for the pointwise bias) once per slice.

// Rows on the critical path of the two-phase tile-parallel backward (chunks as backward_impl assigns them).
inline int64_t tile_parallel_rows(const Geometry& g, const TilePlan& plan, int64_t threads) {
  int64_t total = 0;
  for (int64_t phase = 0; phase < std::min<int64_t>(2, plan.per_image); ++phase) {
    const int64_t phase_tiles = (plan.per_image - phase + 1) / 2, tasks = g.N * phase_tiles;
    int64_t longest = 0;
    for (int64_t ch = 0; ch < threads; ++ch) {
      int64_t rows = 0;
      for (int64_t task = tasks * ch / threads; task < tasks * (ch + 1) / threads; ++task) {
        rows += plan.tile(task / phase_tiles, phase + 2 * (task % phase_tiles), g).rows;
      }
      longest = std::max(longest, rows);
    }
    total += longest;
  }
  return total;
}

// How many channel slices the backward should run as (1: tile-parallel as usual). Slices are whole 16-channel
// vectors. The split must shorten the critical path by a quarter, a margin for the slices' duplicated grad_y work
// and narrower GEMMs.
inline int64_t backward_channel_groups(const Geometry& g, int64_t threads) {
  const int64_t groups = std::min(threads, g.C / kMaxLanes);
  if (groups < 2 || g.N == 0) return 1;
  const int64_t tiled = tile_parallel_rows(g, plan_tiles(g, /*backward=*/true, threads), threads);
  const double split = static_cast<double>(g.N * g.Ho) / static_cast<double>(groups);
  return 1.25 * split < static_cast<double>(tiled) ? groups : 1;
}

// The backward over `groups` channel slices, in parallel; each slice is a whole problem run on one thread. The
// results are the same as backward_impl's up to the order of fp32 sums.
template <class L, typename scalar_t>
std::vector<at::Tensor> backward_by_channel_groups(const Geometry& g, int64_t groups, const at::Tensor& gy,
                                                   const at::Tensor& x, const at::Tensor& dw_weight,
                                                   const c10::optional<at::Tensor>& dw_bias,
                                                   const at::Tensor& pw_weight, int64_t act) {
  const at::MemoryFormat fmt = std::is_same_v<L, Interleaved> ? at::MemoryFormat::ChannelsLast
                                                              : at::MemoryFormat::Contiguous;
  const int64_t blocks = ceil_div(g.C, kMaxLanes);
  std::vector<std::vector<at::Tensor>> slices(groups);
  std::vector<int64_t> first(groups + 1);
  for (int64_t i = 0; i <= groups; ++i) first[i] = std::min(g.C, blocks * i / groups * kMaxLanes);
  at::Tensor gx = empty_output_like(x);
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c0 = first[i], cs = first[i + 1] - c0;
      Geometry gs = g;
      gs.C = cs;
      c10::optional<at::Tensor> db;
      if (dw_bias.has_value()) db = dw_bias->narrow(0, c0, cs);
      slices[i] = backward_impl<L, scalar_t>(gs, gy, x.narrow(1, c0, cs).contiguous(fmt), dw_weight.narrow(0, c0, cs),
                                             db, pw_weight.narrow(1, c0, cs).contiguous(), act, /*threads=*/1);
      gx.narrow(1, c0, cs).copy_(slices[i][0]);
    }
  });
  auto gather = [&](size_t k, int64_t dim) {
    std::vector<at::Tensor> parts;
    for (const auto& s : slices) parts.push_back(s[k]);
    return at::cat(parts, dim);
  };
  // grad of the pointwise bias: every slice summed the same grad_y in the same order; take the first.
  return {gx, gather(1, 0), gather(2, 0), gather(3, 1), slices[0][4]};
}

// NCHW images of at most this many pixels run through the channels_last kernels, x (and grad_y) converted on the
// way in: at 7x7 and 14x14 the planar kernels were 1.8-1.9x slower than the channels_last ones (7-14 wide rows are
// mostly vector tails, and the GEMM's N is P). The forward writes NCHW y directly (Problem::out_nchw) rather than
// converting it afterwards. The backward still converts grad_x on the way out. At 28x28 the two layouts' kernels
// were even.
constexpr int64_t kSmallImage = 14 * 14;

// y_nchw (channels_last x only): y is NCHW, written transposed tile by tile (small NCHW images, see kSmallImage).
at::Tensor forward(const at::Tensor& x, bool channels_last, const at::Tensor& dw_weight,
                   const c10::optional<at::Tensor>& dw_bias, const at::Tensor& pw_weight,
                   const c10::optional<at::Tensor>& pw_bias, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t activation, const c10::optional<at::Tensor>& residual,
                   bool y_nchw = false) {
  const Geometry g = make_geometry(x, dw_weight, pw_weight, stride, padding, dilation);
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_INTERNAL_ASSERT(x.is_contiguous(fmt) && (channels_last || !y_nchw));
  const auto out_fmt = y_nchw ? at::MemoryFormat::Contiguous : fmt;
  const at::Tensor res = residual.has_value() ? residual->contiguous(out_fmt) : at::Tensor();
  at::Tensor y = empty_output({g.N, g.Cout, g.Ho, g.Wo}, x.options().memory_format(out_fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwsep_fwd_cpu", [&] {
    if (channels_last) {
      forward_impl<Interleaved, scalar_t>(g, x, dw_weight, dw_bias, pw_weight, pw_bias, activation, res, y, y_nchw);
    } else {
      forward_impl<Planar, scalar_t>(g, x, dw_weight, dw_bias, pw_weight, pw_bias, activation, res, y, false);
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
  const int64_t threads = at::get_num_threads(), groups = backward_channel_groups(g, threads);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dwsep_bwd_cpu", [&] {
    if (groups > 1) {
      out = channels_last ? backward_by_channel_groups<Interleaved, scalar_t>(g, groups, gy, x, dw_weight, dw_bias,
                                                                              pw_weight, activation)
                          : backward_by_channel_groups<Planar, scalar_t>(g, groups, gy, x, dw_weight, dw_bias,
                                                                         pw_weight, activation);
    } else {
      out = channels_last
                ? backward_impl<Interleaved, scalar_t>(g, gy, x, dw_weight, dw_bias, pw_weight, activation, threads)
                : backward_impl<Planar, scalar_t>(g, gy, x, dw_weight, dw_bias, pw_weight, activation, threads);
    }
  });
  return out;
}

bool is_small_nchw(const at::Tensor& x) {
  return x.suggest_memory_format() != at::MemoryFormat::ChannelsLast && x.size(2) * x.size(3) <= kSmallImage;
}

}  // namespace
}  // namespace dwsep_cpu

int64_t dwsep_bwd_channel_groups_cpu(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t threads) {
  const auto g = dwsep_cpu::make_geometry(x, dw_weight, pw_weight, stride, padding, dilation);
  return dwsep_cpu::backward_channel_groups(g, threads);
}

using dwsep_cpu::backward;
using dwsep_cpu::forward;
using dwsep_cpu::is_small_nchw;

at::Tensor dwsep_fwd_cpu(const at::Tensor& x, const at::Tensor& dw_weight, const c10::optional<at::Tensor>& dw_bias,
                         const at::Tensor& pw_weight, const c10::optional<at::Tensor>& pw_bias,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                         int64_t activation, const c10::optional<at::Tensor>& residual) {
  if (is_small_nchw(x)) {
    return forward(x.contiguous(at::MemoryFormat::ChannelsLast), /*channels_last=*/true, dw_weight, dw_bias,
                   pw_weight, pw_bias, stride, padding, dilation, activation, residual, /*y_nchw=*/true);
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
