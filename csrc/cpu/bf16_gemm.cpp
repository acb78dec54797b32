// bf16 x bf16 -> fp32 GEMM with vdpbf16ps. Layouts and why: bf16_gemm.h.
//
// Blocking. The register block is kRows rows x kVectors vectors (48 columns) of C: 24 accumulators, 3 B vectors and
// one broadcast A pair fit the 32 zmm registers. Per pair of K it issues 3 vector loads of B, kRows broadcasts of A
// and 24 dot products, so the dot-product pipe, not the loads, is the limit: 200-225 GFLOP/s per core on the Zen 4
// CI machine (fp32 brgemm: ~110), i.e. one 512-bit vdpbf16ps (64 FLOP) per cycle at ~3.5 GHz. Outside it: a strip
// of B of kPairBlock pairs stays in cache while every row block of A streams past it; C is revisited once per K
// block.
#include "bf16_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "int_math.h"
#include "isa_dispatch.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EK_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define EK_HAVE_BF16_GEMM 1
#endif

namespace effikern {
namespace bf16_gemm {
namespace {

constexpr int64_t kLanes = 16;        // fp32 lanes of a zmm
// Register block: kRows x kVectors vectors of C. Measured on Zen 4 (1 thread, dwsep-like shapes, GFLOP/s): 12 x 2
// 180-215, 8 x 3 190-223, 6 x 4 200-224 but 6 rows leave the narrow (1-2 vector) strips latency-bound.
constexpr int64_t kRows = 8;
constexpr int kVectors = 3;
// K pairs per block: 256 measured 3-8% faster than 128 (fewer passes over C) although a 48-column strip of B
// (48 KiB) then overflows the 32 KiB L1.
constexpr int64_t kPairBlock = 256;

}  // namespace

int64_t packed_cols(int64_t N) { return ceil_div(N, kLanes) * kLanes; }

void pack_b_from_rows_of_bt(const uint16_t* src, int64_t K, int64_t N, int64_t ld, uint16_t* dst, int64_t n0,
                            int64_t n1) {
  if (n1 < 0) n1 = N;
  const int64_t ldb = packed_cols(N), K2 = ceil_div(K, 2), n_zero_end = n1 == N ? ldb : n1;
  // Zero only what the copy below leaves unwritten: the columns past N (the task whose range ends at N) and, for an
  // odd K, the second half of the last pair (it zeroed the whole range first, then copied over it).
  if (n_zero_end > n1) {
    for (int64_t q = 0; q < K2; ++q) std::memset(dst + (q * ldb + n1) * 2, 0, sizeof(uint16_t) * 2 * (n_zero_end - n1));
  }
  if (K % 2 != 0) {
    for (int64_t n = n0; n < n1; ++n) dst[((K / 2) * ldb + n) * 2 + 1] = 0;
  }
  // Each K pair is adjacent in src: copy it whole, in 16 x 16 blocks of (n, pair) so that neither the reads nor
  // the writes stride across the whole matrix (a plain loop took 7% of a 384 -> 1536 forward).
  constexpr int64_t kB = 16;
  for (int64_t nb = n0; nb < n1; nb += kB) {
    const int64_t ne = std::min(n1, nb + kB);
    for (int64_t qb = 0; qb < K / 2; qb += kB) {
      for (int64_t n = nb; n < ne; ++n) {
        for (int64_t q = qb; q < std::min(K / 2, qb + kB); ++q) {
          std::memcpy(dst + (q * ldb + n) * 2, src + n * ld + 2 * q, 4);
        }
      }
    }
    if (K % 2 != 0) {
      for (int64_t n = nb; n < ne; ++n) dst[((K / 2) * ldb + n) * 2] = src[n * ld + K - 1];
    }
  }
}

namespace {

#ifdef EK_HAVE_BF16_GEMM

// Lanes [0, n) set, n <= 16.
EK_BF16_TARGET inline __mmask16 lane_mask(int64_t n) {
  return n >= kLanes ? __mmask16(0xffff) : __mmask16((1u << n) - 1u);
}

// Where a register block's results go: fp32 C (accumulated into after the first K block), or with an epilogue
// (the only K block then) the bf16 output. C, out and res point at the block's first element; the biases at its
// first column / row.
struct Dest {
  float* C;
  int64_t ldc;
  uint16_t* out;  // nullptr: write C
  int64_t ld_out;
  const float* col_bias;
  const float* row_bias;
  const uint16_t* res;
  int64_t ld_res;

  Dest at(int64_t m, int64_t n) const {
    return {C == nullptr ? nullptr : C + m * ldc + n,
            ldc,
            out == nullptr ? nullptr : out + m * ld_out + n,
            ld_out,
            col_bias == nullptr ? nullptr : col_bias + n,
            row_bias == nullptr ? nullptr : row_bias + m,
            res == nullptr ? nullptr : res + m * ld_res + n,
            ld_res};
  }
};

// Rows [0, R) x vectors [0, NV) of C (+)= A[R x 2*K2] * B[2*K2 x 16*NV]; the last vector of each row loads and
// stores only `last` lanes.
template <int R, int NV>
EK_BF16_TARGET inline void block(int64_t K2, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
                                 const Dest& d, __mmask16 last, bool accumulate) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      const __mmask16 m = v == NV - 1 ? last : __mmask16(0xffff);
      acc[r][v] = accumulate ? _mm512_maskz_loadu_ps(m, d.C + r * d.ldc + v * kLanes) : _mm512_setzero_ps();
    }
  }
  for (int64_t p = 0; p < K2; ++p) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(B + (p * ldb + v * kLanes) * 2);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * p, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      const __mmask16 m = v == NV - 1 ? last : __mmask16(0xffff);
      if (d.out == nullptr) {
        _mm512_mask_storeu_ps(d.C + r * d.ldc + v * kLanes, m, acc[r][v]);
        continue;
      }
      __m512 y = acc[r][v];
      if (d.col_bias != nullptr) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, d.col_bias + v * kLanes));
      if (d.row_bias != nullptr) y = _mm512_add_ps(y, _mm512_set1_ps(d.row_bias[r]));
      if (d.res != nullptr) {  // bf16 -> fp32 is a 16-bit shift
        const __m256i h = _mm256_maskz_loadu_epi16(m, d.res + r * d.ld_res + v * kLanes);
        y = _mm512_add_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
      }
      _mm256_mask_storeu_epi16(d.out + r * d.ld_out + v * kLanes, m, (__m256i)_mm512_cvtneps_pbh(y));
    }
  }
}

// One row block of R rows (R = 1..kRows, the tail of M) at every kRows-row step.
template <int NV, int R = kRows>
EK_BF16_TARGET inline void rows_block(int64_t rows, int64_t K2, const uint16_t* A, int64_t lda, const uint16_t* B,
                                      int64_t ldb, const Dest& d, __mmask16 last, bool accumulate) {
  if constexpr (R > 1) {
    if (rows < R) return rows_block<NV, R - 1>(rows, K2, A, lda, B, ldb, d, last, accumulate);
  }
  block<R, NV>(K2, A, lda, B, ldb, d, last, accumulate);
}

// The columns of one strip of B (NV vectors) for every row. With an epilogue K runs as one block: no fp32 partial
// sums to keep, and a strip of B of a whole K (at most ~110 KiB here) still sits in L2.
template <int NV>
EK_BF16_TARGET void strip(int64_t M, int64_t K2, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
                          const Dest& d, __mmask16 last, bool accumulate) {
  const int64_t pair_block = d.out != nullptr ? std::max<int64_t>(K2, 1) : kPairBlock;
  for (int64_t p0 = 0; p0 == 0 || p0 < K2; p0 += pair_block) {
    const int64_t pairs = std::min(pair_block, K2 - p0);
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {
      rows_block<NV>(std::min(kRows, M - m0), pairs, A + m0 * lda + 2 * p0, lda, B + p0 * ldb * 2, ldb,
                     d.at(m0, 0), last, /*accumulate=*/accumulate || p0 > 0);
    }
  }
}

EK_BF16_TARGET void gemm_avx512bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda,
                                    const uint16_t* B, const Dest& d, bool accumulate) {
  const int64_t K2 = ceil_div(K, 2), ldb = packed_cols(N);
  for (int64_t n0 = 0; n0 < N; n0 += kVectors * kLanes) {
    const int64_t cols = std::min(kVectors * kLanes, N - n0);
    const uint16_t* Bn = B + n0 * 2;
    const __mmask16 last = lane_mask(cols - (ceil_div(cols, kLanes) - 1) * kLanes);  // lanes of the last vector
    static_assert(kVectors == 3, "the switch below covers 1..3 vectors");
    switch (ceil_div(cols, kLanes)) {
      case 1:
        strip<1>(M, K2, A, lda, Bn, ldb, d.at(0, n0), last, accumulate);
        break;
      case 2:
        strip<2>(M, K2, A, lda, Bn, ldb, d.at(0, n0), last, accumulate);
        break;
      default:
        strip<kVectors>(M, K2, A, lda, Bn, ldb, d.at(0, n0), last, accumulate);
        break;
    }
  }
}

// 16 floats from p (only `n` lanes read), rounded to bf16.
EK_BF16_TARGET inline __m256i round16(const float* p, __mmask16 m) {
  return (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, p));
}

EK_BF16_TARGET void round_rows_avx512bf16(const float* src, int64_t M, int64_t K, int64_t ld_src, int64_t K_out,
                                          uint16_t* dst, int64_t ld_dst) {
  for (int64_t m = 0; m < M; ++m) {
    const float* s = src + m * ld_src;
    uint16_t* d = dst + m * ld_dst;
    for (int64_t k = 0; k < K_out; k += kLanes) {
      const int64_t n = std::min(kLanes, K_out - k);
      // Lanes at or past K read nothing (zero) and store 0.
      const __m256i v = round16(s + k, lane_mask(std::max<int64_t>(0, std::min(kLanes, K - k))));
      _mm256_mask_storeu_epi16(d + k, lane_mask(n), v);
    }
  }
}

EK_BF16_TARGET void pack_b_rows_avx512bf16(const float* src, int64_t K, int64_t N, int64_t ld_src, uint16_t* dst) {
  const int64_t ldb = packed_cols(N), K2 = ceil_div(K, 2);
  // Output word 2j is row 2p's lane j and word 2j+1 row 2p+1's: the two halves of cvtne2ps_pbh interleaved.
  alignas(64) static constexpr uint16_t kInterleave[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                                           21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                                           11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kInterleave);
  for (int64_t p = 0; p < K2; ++p) {
    const float* r0 = src + 2 * p * ld_src;
    const float* r1 = r0 + ld_src;
    const bool has_r1 = 2 * p + 1 < K;
    uint16_t* d = dst + p * ldb * 2;
    for (int64_t n = 0; n < ldb; n += kLanes) {
      const __mmask16 m = lane_mask(std::max<int64_t>(0, std::min(kLanes, N - n)));
      const __m512 lo = _mm512_maskz_loadu_ps(m, r0 + n);
      const __m512 hi = has_r1 ? _mm512_maskz_loadu_ps(m, r1 + n) : _mm512_setzero_ps();
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // words 0-15 from lo, 16-31 from hi
      _mm512_storeu_si512(d + 2 * n, _mm512_permutexvar_epi16(idx, both));
    }
  }
}

#endif  // EK_HAVE_BF16_GEMM

}  // namespace

bool available() {
#ifdef EK_HAVE_BF16_GEMM
  static const bool ok = [] {
    if (isa::level() < 2) return false;
    const char* cap = std::getenv("EFFIKERN_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "avx512") == 0) return false;
    __builtin_cpu_init();
    return static_cast<bool>(__builtin_cpu_supports("avx512bf16"));
  }();
  return ok;
#else
  return false;
#endif
}


#ifdef EK_HAVE_BF16_GEMM
void round_rows(const float* src, int64_t M, int64_t K, int64_t ld_src, int64_t K_out, uint16_t* dst,
                int64_t ld_dst) {
  round_rows_avx512bf16(src, M, K, ld_src, K_out, dst, ld_dst);
}
void pack_b_rows(const float* src, int64_t K, int64_t N, int64_t ld_src, uint16_t* dst) {
  pack_b_rows_avx512bf16(src, K, N, ld_src, dst);
}
void gemm(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, float* C, int64_t ldc,
          bool accumulate) {
  gemm_avx512bf16(M, N, K, A, lda, B, Dest{C, ldc, nullptr, 0, nullptr, nullptr, nullptr, 0}, accumulate);
}
void gemm(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, const Epilogue& ep) {
  gemm_avx512bf16(M, N, K, A, lda, B, Dest{nullptr, 0, ep.out, ep.ld_out, ep.col_bias, ep.row_bias, ep.res, ep.ld_res},
                  /*accumulate=*/false);
}
#else
// Never called: available() is false on these targets.
void round_rows(const float*, int64_t, int64_t, int64_t, int64_t, uint16_t*, int64_t) { std::abort(); }
void pack_b_rows(const float*, int64_t, int64_t, int64_t, uint16_t*) { std::abort(); }
void gemm(int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, float*, int64_t, bool) { std::abort(); }
void gemm(int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, const Epilogue&) { std::abort(); }
#endif

}  // namespace bf16_gemm
}  // namespace effikern
