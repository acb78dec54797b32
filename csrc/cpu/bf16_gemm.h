// A bf16 x bf16 -> fp32 GEMM on AVX512-BF16 (vdpbf16ps), for the pointwise step of the bf16 CPU kernels.
//
// Why our own: on the Zen 4 CI machine (AVX512-BF16, no AMX) at::native::cpublas::brgemm cannot pack bf16
// (could_pack(kBFloat16) is false, the VNNI call throws), and its non-VNNI bf16 call ran at 78-90 GFLOP/s per core
// on one thread, below the fp32 brgemm's ~105 (measured on dwsep tile shapes, 2026-11-24), while PyTorch's own
// bf16 1x1 convolution reaches 130-160 there. So bf16 tiles were converted to fp32 and multiplied at the fp32
// rate, and every GEMM-bound bf16 dwsep shape ran at about half PyTorch's speed.
//
// Operands. vdpbf16ps multiplies pairs of bf16 along K, so both operands hold K in pairs:
//   A: row-major bf16 [M][lda], row m's pair p at A[m*lda + 2p], 2p+1; the caller zero-fills column K when K is odd.
//   B: "packed", [K2][ldb][2] bf16 with K2 = ceil(K/2): element (k, n) at ((k/2)*ldb + n)*2 + k%2, zero past K and
//      past N up to ldb = packed_cols(N), so the kernel loads whole vectors of columns without bounds checks.
//   C: row-major fp32 [M][ldc], written or accumulated into; only columns < N are stored.
// Products of two bf16 are exact in fp32 and the sums are fp32, as in PyTorch's bf16 GEMMs. The instruction
// flushes fp32 denormals to zero (sums below 1.2e-38 in magnitude).
#pragma once

#include <cstdint>

namespace effikern {
namespace bf16_gemm {

// True when the CPU executes AVX512-BF16 and EFFIKERN_CPU_ISA does not cap the ISA below it
// (EFFIKERN_CPU_ISA=avx512 keeps AVX-512 but turns this path off, to test and time the fp32 path).
bool available();

// Columns of packed B for N: N rounded up to whole 16-lane vectors.
int64_t packed_cols(int64_t N);

// Packs B from its transpose: bf16 B[k][n] = src[n * ld + k] (a weight [N][K], row-major), for k < K and the
// columns n0 <= n < n1 (n1 < 0: N), into dst[ceil(K/2)][packed_cols(N)][2], zero-filling the padding (the range
// ending at N also the columns past N). The column range lets threads pack one weight together.
void pack_b_from_rows_of_bt(const uint16_t* src, int64_t K, int64_t N, int64_t ld, uint16_t* dst, int64_t n0 = 0,
                            int64_t n1 = -1);

// dst[m][k] = bf16(src[m][k]) for k < K and 0 for K <= k < K_out (round to nearest even): A operands from fp32
// tiles. Rows of src at src + m * ld_src, of dst at dst + m * ld_dst. Only call when available().
void round_rows(const float* src, int64_t M, int64_t K, int64_t ld_src, int64_t K_out, uint16_t* dst,
                int64_t ld_dst);

// Packs B from an fp32 [K][N] row-major tile (ld_src between rows), rounded to nearest even (the NCHW depthwise
// output, the channels_last backward's activation tile and weight). To pack rows [2p0, 2p1) of a larger B (threads
// packing one weight together), pass src + 2*p0*ld_src, K = min(2*p1, K_total) - 2*p0 and dst + p0*ldb*2.
// Only call when available().
void pack_b_rows(const float* src, int64_t K, int64_t N, int64_t ld_src, uint16_t* dst);

// C[M x N] = A[M x K] * B[K x N] (accumulate: C += A * B) with the layouts above; single-threaded (call it per
// tile). Only call when available().
void gemm(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, float* C, int64_t ldc,
          bool accumulate = false);

// The output stage instead of fp32 C: out[m][n] = bf16(C[m][n] + col_bias[n] + row_bias[m] + res[m][n]), each
// term only where its pointer is set, added in that order in fp32 and rounded once (nearest even). A kernel's
// epilogue then costs no fp32 tile written and read back.
struct Epilogue {
  uint16_t* out;
  int64_t ld_out;
  const float* col_bias = nullptr;  // [N]
  const float* row_bias = nullptr;  // [M]
  const uint16_t* res = nullptr;    // bf16 [M][ld_res]
  int64_t ld_res = 0;
};
void gemm(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, const Epilogue& ep);

}  // namespace bf16_gemm
}  // namespace effikern
