// Weight-streaming products for x86 CPUs: bf16 and int8 weights with AVX512-BF16 / VNNI and int8
// weights with AVX2 for decode-sized M (<= 8 rows); 4-bit weights with AVX2, prefill-sized M too.
//
// Row invariance: every output element y[m, n] is computed by the same instruction sequence
// whatever M is (the same K chunks, in the same order, reduced by the same tree), so a row's
// result does not depend on the other rows of the batch. Threads split the output columns N;
// one element is never split across threads.
//
// Only the kernels carry AVX-512 / AVX2 target attributes: the module loads on any x86-64 CPU,
// and Python calls a kernel only after checking the CPU's features (cpu_features below).

#include "kernels.h"
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cpuid.h>
#include <cstdint>
#include <cstring>
#include <vector>

#include <sys/syscall.h>
#include <unistd.h>

std::vector<bool> cpu_features();

namespace {

using llamarun::GRAIN;
using llamarun::pieces_for;

constexpr int64_t NB = 8;     // weight rows (outputs) per block: one thread step
constexpr int64_t MB = 4;     // activation rows per pass over a block

#define LLAMARUN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni")))

// The block functions compute MR activation rows x NR weight rows. Both are template arguments
// so that the accumulators stay in registers. One row streams 8 weight rows at once (more
// memory requests in flight: measured 17 -> 19 GB/s on one core); 2-4 rows take 4 at a time
// (registers). Either way each output sees the same instructions in the same order.
//
// On AMD CPUs one activation row takes the weight rows one at a time instead (the *_row
// functions: the same instructions per output, so the same bits), four cache lines of a row a
// step (int8_row prefetching, the others not: see int8_row): a thread's rows lie one after
// another, so its weights then stream in address order, which AMD's prefetchers follow best.
// Measured on an AMD EPYC with AVX512-BF16 and VNNI (2 threads, the 16 layers' products of a
// 1B-shaped model in huge pages, medians of 7, interleaved): bfloat16 57-60 -> 67-76 GB/s
// against a plain read's 61-77;
// SmolLM2's shapes 55 -> 67; int8 33-34 -> 44-50 against 42-49. 2-8 rows keep the blocks: one
// weight row at a time measured slower there (the activations' reloads). Intel CPUs keep the
// blocks too: measured there, not here. (llamarun::ROW_STREAM, kernels.h: f32.cpp's AVX-512
// code does the same.)
using llamarun::ROW_PREFETCH;
using llamarun::ROW_STREAM;
constexpr int64_t STEP = 4;  // cache lines of a weight row per step of the *_row functions

// bytes ahead in a weight stream (a row, or a 4-bit tile's run; past its end: harmless)
constexpr int64_t PREFETCH = 4096;

// A block's count (at most NB) float32 results -> y as OutT, each times scale[j] where there are
// scales: 8 at once for a whole block (load8 / store8: the same product and rounding as
// OutT(out[j] * float(scale[j])) one at a time, which the compiler left scalar). `python
// benchmarks/decode_ab.py --models smollm2 --baseline 2b91072` (AMD EPYC, Zen 5, fast minutes,
// with store_tile): Q4_0 1.029x and 1.042x, Q8_0 1.032x, BF16 1.018x.
template <typename OutT, typename ScaleT = float>
LLAMARUN_AVX2 void store_block(const float* out, int64_t count, OutT* y,
                               const ScaleT* scale = nullptr) {
  if (count == NB) {
    const __m256 v = _mm256_loadu_ps(out);
    store8(y, scale != nullptr ? _mm256_mul_ps(v, load8(scale)) : v);
    return;
  }
  for (int64_t j = 0; j < count; ++j)
    y[j] = OutT(scale != nullptr ? out[j] * float(scale[j]) : out[j]);
}

// ---- bf16 weights x bf16 activations, float32 accumulation (vdpbf16ps) ----

template <int MR, int NR>
LLAMARUN_AVX512 void bf16_block(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t nrows,
                                int64_t K, const uint16_t* next /* next block's rows, or null */,
                                float* out /* (MR, NB) */) {
  const uint16_t* row[NR];  // rows past nrows repeat the last one; their results are dropped
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) row[j] = w + std::min<int64_t>(j, nrows - 1) * K;
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i wv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_si512(row[j] + k);
    if (next != nullptr)  // the hardware prefetcher misses short interleaved row streams
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) _mm_prefetch((const char*)(next + j * K + k), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512i xv = _mm512_loadu_si512(x + i * ldx + k);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j)
        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv, (__m512bh)wv[j]);
    }
  }
  if (k < K) {  // the tail: masked loads give zeros, which add exactly nothing
    const __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
    __m512i wv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_maskz_loadu_epi16(mask, row[j] + k);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + i * ldx + k);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j)
        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv, (__m512bh)wv[j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) out[i * NB + j] = _mm512_reduce_add_ps(acc[i][j]);
}

// One activation row over nrows weight rows, one row at a time (see ROW_STREAM): per output
// bf16_block<1, NR>'s instructions in its order. It prefetches 4 KiB ahead with the
// non-temporal hint (see FAR_PREFETCH: a decode's weights then push less of what the rest of the
// token reuses out of the caches): decode_ab --baseline, AMD EPYC (Zen 5), SmolLM2 BF16 1.039x,
// 1.062x, 1.030x, the 1B shape 1.043x in a slow-memory minute, 0.978x in a fast one. (Without the
// hint: 0.97 of the read against 0.95 for one product alone in a fast minute, so it had none.)
// Without PREFETCH_AHEAD none (kernels.h's ROW_PREFETCH: AMD Zen 4).
template <bool PREFETCH_AHEAD>
LLAMARUN_AVX512 void bf16_row(const uint16_t* x, const uint16_t* w, int64_t nrows, int64_t K,
                              float* out) {
  for (int64_t j = 0; j < nrows; ++j) {
    const uint16_t* row = w + j * K;
    __m512 acc = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 * STEP <= K; k += 32 * STEP)
#pragma GCC unroll 4
      for (int u = 0; u < STEP; ++u) {
        if constexpr (PREFETCH_AHEAD)
          _mm_prefetch((const char*)(row + k + 32 * u) + PREFETCH, _MM_HINT_NTA);
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x + k + 32 * u),
                               (__m512bh)_mm512_loadu_si512(row + k + 32 * u));
      }
    for (; k + 32 <= K; k += 32)
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x + k),
                             (__m512bh)_mm512_loadu_si512(row + k));
    if (k < K) {
      const __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + k),
                             (__m512bh)_mm512_maskz_loadu_epi16(mask, row + k));
    }
    out[j] = _mm512_reduce_add_ps(acc);
  }
}

// One pass: mrows (1..MB) activation rows over one block of nrows (1..NB) weight rows; one row
// by bf16_row where `stream` (ROW_STREAM, or a test's choice).
void bf16_pass(int64_t mrows, const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t nrows,
               int64_t K, const uint16_t* next, bool stream, float* out) {
  if (mrows == 1)
    return !stream         ? bf16_block<1, 8>(x, ldx, w, nrows, K, next, out)
           : ROW_PREFETCH ? bf16_row<true>(x, w, nrows, K, out)
                          : bf16_row<false>(x, w, nrows, K, out);
  for (int64_t j0 = 0; j0 < nrows; j0 += 4) {
    const uint16_t* wj = w + j0 * K;
    const uint16_t* nj = next != nullptr ? next + j0 * K : nullptr;
    const int64_t nr = std::min<int64_t>(4, nrows - j0);
    switch (mrows) {
      case 2: bf16_block<2, 4>(x, ldx, wj, nr, K, nj, out + j0); break;
      case 3: bf16_block<3, 4>(x, ldx, wj, nr, K, nj, out + j0); break;
      default: bf16_block<4, 4>(x, ldx, wj, nr, K, nj, out + j0); break;
    }
  }
}

template <typename OutT>
void bf16_linear_impl(const uint16_t* x, int64_t M, const uint16_t* w, int64_t N, int64_t K,
                      bool stream, OutT* y) {
  const int64_t nblocks = (N + NB - 1) / NB;
  const auto blocks = [&](int64_t b0, int64_t b1) {
    float out[MB * NB];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NB, nrows = std::min(NB, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int64_t mrows = std::min(MB, M - m0);
        // the first pass over a block prefetches the next one
        const uint16_t* next =
            (m0 == 0 && nrows == NB && n0 + 2 * NB <= N) ? w + (n0 + NB) * K : nullptr;
        bf16_pass(mrows, x + m0 * K, K, w + n0 * K, nrows, K, next, stream, out);
        for (int64_t i = 0; i < mrows; ++i)
          store_block(out + i * NB, nrows, y + (m0 + i) * N + n0);
      }
    }
  };
  llamarun::blocks_for(nblocks, 2 * N * K, blocks);
}

// ---- int8 weights x int8 activations, vpdpbusd ----
// Activations are quantized in blocks of QB = 64 values with one scale each (llama.cpp's Q8
// activations use blocks of 32): a per-row scale would let one outlier channel coarsen every
// other value of the row. vpdpbusd multiplies unsigned by signed bytes, so activations travel
// as q + 128 (0..255) and each weight block's 128 * sum(w) is taken off (one more vpdpbusd per
// weight vector, shared by all rows): exact integer arithmetic. A block's 16 int32 lanes become
// float and are scaled by the block's scale; the row's weight scale comes last.

constexpr int64_t QB = 64;

template <int MR, int NR>
LLAMARUN_AVX512 void int8_block(const uint8_t* xu, const float* xs, int64_t ldx, const int8_t* w,
                                int64_t nrows, int64_t K,
                                const int8_t* next /* next block's rows, or null */,
                                float* out /* (MR, NB) */) {
  const int8_t* row[NR];  // rows past nrows repeat the last one; their results are dropped
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) row[j] = w + std::min<int64_t>(j, nrows - 1) * K;
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  const __m512i c128 = _mm512_set1_epi8((char)0x80);  // 128 as an unsigned byte
  const int64_t nq = ldx / QB;
  for (int64_t k = 0; k < K; k += QB) {
    // past K the weights load as 0 (and the activation buffer holds q = 0)
    const __mmask64 mask = K - k >= QB ? ~0ull : ((1ull << (K - k)) - 1);
    __m512i wv[NR], corr[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      wv[j] = _mm512_maskz_loadu_epi8(mask, row[j] + k);
      corr[j] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, c128, wv[j]));
    }
    // the next block's rows into L2 (not L1): the 1B shape's int8 output head (128256 x 2048)
    // 27.8-28.3 -> 28.6-29.1 GB/s at one row, +2% at 4 and 8 (Intel Xeon, 2 threads, weights
    // in huge pages, three A/B runs)
    if (next != nullptr)
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) _mm_prefetch((const char*)(next + j * K + k), _MM_HINT_T1);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512i xv = _mm512_loadu_si512(xu + i * ldx + k);
      const __m512 scale = _mm512_set1_ps(xs[i * nq + k / QB]);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) {
        const __m512i dot = _mm512_dpbusd_epi32(corr[j], xv, wv[j]);
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[i][j]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) out[i * NB + j] = _mm512_reduce_add_ps(acc[i][j]);
}

// One activation row over nrows weight rows, one row at a time (see ROW_STREAM): per output
// int8_block<1, NR>'s instructions in its order. Unlike bf16_row it prefetches: its rows
// stream through more instructions per byte (two vpdpbusd, a conversion and an FMA per cache
// line against one vdpbf16ps), so fewer loads wait at once, and the 4 KiB ahead into L1 make
// up for it. Measured on an AMD EPYC (Zen 5, 2 threads, the 65 products of a 1B-shaped model,
// 1.2 GB in huge pages, in turns with a plain read of 83-85 GB/s, medians of 15): 75-76 ->
// 80-81 GB/s (0.90 -> 0.96 of the read); 2 KiB ahead 76, 6 KiB 78, 8 KiB 79, two rows streamed
// at once (no prefetch) 81. bf16_row measured 0.97 of the read without and 0.95 with. Without
// PREFETCH_AHEAD none (kernels.h's ROW_PREFETCH: AMD Zen 4).
template <bool PREFETCH_AHEAD>
LLAMARUN_AVX512 void int8_row(const uint8_t* xu, const float* xs, const int8_t* w, int64_t nrows,
                              int64_t K, float* out) {
  const __m512i zero = _mm512_setzero_si512();
  const __m512i c128 = _mm512_set1_epi8((char)0x80);
  for (int64_t j = 0; j < nrows; ++j) {
    const int8_t* row = w + j * K;
    __m512 acc = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + QB * STEP <= K; k += QB * STEP)
#pragma GCC unroll 4
      for (int u = 0; u < STEP; ++u) {
        if constexpr (PREFETCH_AHEAD)
          _mm_prefetch((const char*)(row + k + QB * u + PREFETCH), _MM_HINT_T0);
        const __m512i wv = _mm512_loadu_si512(row + k + QB * u);
        const __m512i corr = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, c128, wv));
        const __m512i dot = _mm512_dpbusd_epi32(corr, _mm512_loadu_si512(xu + k + QB * u), wv);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(xs[k / QB + u]), acc);
      }
    for (; k < K; k += QB) {  // past K the weights load as 0 (and the activations hold q = 0)
      const __mmask64 mask = K - k >= QB ? ~0ull : ((1ull << (K - k)) - 1);
      const __m512i wv = _mm512_maskz_loadu_epi8(mask, row + k);
      const __m512i corr = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, c128, wv));
      const __m512i dot = _mm512_dpbusd_epi32(corr, _mm512_loadu_si512(xu + k), wv);
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(xs[k / QB]), acc);
    }
    out[j] = _mm512_reduce_add_ps(acc);
  }
}

void int8_pass(int64_t mrows, const uint8_t* xu, const float* xs, int64_t ldx, const int8_t* w,
               int64_t nrows, int64_t K, const int8_t* next, bool stream, float* out) {
  if (mrows == 1)
    return !stream         ? int8_block<1, 8>(xu, xs, ldx, w, nrows, K, next, out)
           : ROW_PREFETCH ? int8_row<true>(xu, xs, w, nrows, K, out)
                          : int8_row<false>(xu, xs, w, nrows, K, out);
  for (int64_t j0 = 0; j0 < nrows; j0 += 4) {
    const int8_t* wj = w + j0 * K;
    const int8_t* nj = next != nullptr ? next + j0 * K : nullptr;
    const int64_t nr = std::min<int64_t>(4, nrows - j0);
    switch (mrows) {
      case 2: int8_block<2, 4>(xu, xs, ldx, wj, nr, K, nj, out + j0); break;
      case 3: int8_block<3, 4>(xu, xs, ldx, wj, nr, K, nj, out + j0); break;
      default: int8_block<4, 4>(xu, xs, ldx, wj, nr, K, nj, out + j0); break;
    }
  }
}

LLAMARUN_AVX512 inline __m512 load16(const float* p, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, p);
}

LLAMARUN_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 mask) {
  __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// One row of x -> q + 128 (uint8) in blocks of QB with a scale each (symmetric, q in -127..127,
// round to nearest even).
template <typename InT>
LLAMARUN_AVX512 void quantize_row(const InT* row, int64_t K, uint8_t* out, float* scales) {
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  const __m512i offset = _mm512_set1_epi32(128);
  for (int64_t b = 0; b < K; b += QB) {
    __m512 v[QB / 16];
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t t = 0; t < QB / 16; ++t) {
      const int64_t k = b + 16 * t;
      const __mmask16 mask = k >= K ? 0 : K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
      v[t] = load16(row + k, mask);
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v[t]));
    }
    const float amax = _mm512_reduce_max_ps(vmax);
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    scales[b / QB] = amax / 127.f;
    for (int64_t t = 0; t < QB / 16; ++t) {
      __m512i q = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v[t], inv),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(q, lo), hi), offset);
      _mm_storeu_si128((__m128i*)(out + b + 16 * t), _mm512_cvtepi32_epi8(q));
    }
  }
}

template <typename InT, typename OutT, typename ScaleT>
void int8_linear_impl(const InT* x, int64_t M, const int8_t* w, const ScaleT* wscale, int64_t N,
                      int64_t K, bool stream, OutT* y) {
  const int64_t ldx = (K + QB - 1) / QB * QB;
  uint8_t* xu = llamarun::scratch<uint8_t, struct Int8Values>(M * ldx);
  float* xs = llamarun::scratch<float, struct Int8Scales>(M * (ldx / QB));
  for (int64_t m = 0; m < M; ++m) quantize_row(x + m * K, K, xu + m * ldx, xs + m * (ldx / QB));
  const int64_t nblocks = (N + NB - 1) / NB;
  const auto blocks = [&](int64_t b0, int64_t b1) {
    float out[MB * NB];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NB, nrows = std::min(NB, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int64_t mrows = std::min(MB, M - m0);
        const int8_t* next =
            (m0 == 0 && nrows == NB && n0 + 2 * NB <= N) ? w + (n0 + NB) * K : nullptr;
        int8_pass(mrows, xu + m0 * ldx, xs + m0 * (ldx / QB), ldx, w + n0 * K,
                  nrows, K, next, stream, out);
        for (int64_t i = 0; i < mrows; ++i)
          store_block(out + i * NB, nrows, y + (m0 + i) * N + n0, wscale + n0);
      }
    }
  };
  llamarun::blocks_for(nblocks, N * K, blocks);
}


// ---- 4-bit weights x int8 activations, AVX2 vpmaddubsw ----
// A weight w[n, k] = (q - 8) * d[n, g] + z[n, g] with q in 0..15 and g = k / group. Activations
// are quantized in blocks of Q4B = 32 values with one scale each (as llama.cpp's Q8_0), x ~ s * a.
// Then y[n] = sum_b d[n, g(b)] s_b (q_b . a_b - 8 sum(a_b)) + sum_g z[n, g] X_g, where X_g is the
// sum of x over the group (float): the first sum is the stream over the weights (the -8 of
// every value folded into each block's exact integer sum, as llama.cpp's Q4_0 x Q8_0 does), the
// second a short dot product over groups, left out for a weight without zeros. vpmaddubsw multiplies
// the unsigned nibbles by the signed activations (|pair sum| <= 2 * 15 * 127: no saturation).
//
// Layout (kernels.int4_pack in Python): rows in tiles of T4 = 16 (N padded with zero rows), each
// row's K padded to a multiple of 64. A tile is a run of 512-byte pairs, one per 64 values p: 8
// vectors of 64 bytes, vector v holding for row r of the tile the doubleword at byte 4r, whose
// byte j has value 64p + 4v + j in its low nibble and 64p + 32 + 4v + j in its high one. So a
// vector's low nibbles times 4 activations broadcast to every doubleword make the 16 rows'
// partial sums at once, each in its row's lane (vpdpbusd; AVX2: vpmaddubsw on each 32-byte half,
// 8 rows), a block's 32 products of a row end in that row's lane with nothing to rearrange, and a
// tile streams as one contiguous run. The scales d and zeros z are float16, per tile (G', T4),
// row r in lane r (kernels.int4_pack_groups: one load and one conversion a block), G' the groups
// of the padded K (a zero group past the last when K % 64 == 32: the last pair's upper block).
//
// Before 2026-12-06 a tile held 8 rows, each row's 8 values of a chunk in a quadword: a pair
// then needed the activations broadcast 8 bytes at a time (a separate instruction each) and
// about 17 instructions a row to bring each row's two doublewords of both blocks together and in
// order. Measured on an AMD EPYC Zen 4 (which runs each AVX-512 instruction in two 256-bit
// halves), the old and new builds in turns in one process, the same outputs: the VNNI tiles
// 1.37-1.68x for 4-512 rows (prefill: SmolLM2 Q4_0 pp512 1.35x, the 1B shape's pp128 1.22x,
// benchmarks/compare.py), one row 1.19-1.27x from the cache; decoding from memory about the same
// (decode_ab --baseline-tree: 1B Q4_0 1.032x in a fast minute, SmolLM2 Q4_0 0.991x in a slow
// one). On an AMD EPYC Zen 5 a scratch build of this layout had measured no faster from memory
// (README).
constexpr int64_t T4 = 16;              // weight rows per 4-bit tile
constexpr int64_t PAIR_BYTES = T4 * 32;  // a tile's bytes per 64 values

constexpr int64_t Q4B = 32;

// The 8 cache lines of the 64-value pair AHEAD bytes after wp (a 4-bit tile's run), into the
// cache level HINT says.
template <enum _mm_hint HINT, int64_t AHEAD = PREFETCH>
inline void prefetch_pair(const uint8_t* wp) {
  for (int line = 0; line < PAIR_BYTES / 64; ++line)
    _mm_prefetch((const char*)(wp + AHEAD + 64 * line), HINT);
}

// On AMD CPUs (kernels.h's ROW_STREAM: the same test) int4_tile_vnni prefetches twice as far
// ahead, into L1: one row 72-79 -> 80-86 GB/s of 4-bit weights (0.86-0.89 -> 0.92-0.96 of a plain
// read of 84-92 GB/s), 4 rows 52-59 -> 58-61 (AMD EPYC, Zen 5, 2 threads, 128 MiB of K = 2048,
// 4096 and 8192 tiles in huge pages, scratch A/B in turns with the read; 6 KiB ahead in between,
// 16 KiB and 2 KiB slower, no prefetch 65-70). Intel CPUs keep 4 KiB into L2 (measured there).
// With the non-temporal hint (_MM_HINT_NTA) rather than T0: one product alone streams as fast
// (0.98-1.005x), but a whole decode is faster, the weights no longer pushing out of the caches
// what the rest of the token reuses (decode_ab --baseline, Zen 5: SmolLM2 Q4_0 1.061x, 1.024x,
// 1.027x, the 1B shape 1.002x and 1.043x; 4 KiB ahead then 0.985x / 1.018x, 16 KiB 0.97x /
// 0.98x; the int8 rows' prefetch with the hint 0.95-1.03x: they keep T0; float32 rows with a
// prefetch 0.97-1.08x by the minute: they keep none). Those were the 8-row tiles' numbers, 8
// KiB ahead. The 16-row tiles (AMD EPYC Zen 4, 2 threads, decode_ab --baseline 04b7e45, 8 rounds
// in turns): 4 KiB ahead against 8, 1B Q4_0 1.025x, SmolLM2 Q4_0 1.054x (slow minutes).
constexpr int64_t FAR_PREFETCH = 4096;

// MR activation rows x one tile of T4 = 16 weight rows, over every pair of blocks (layout: see
// above): out[i * T4 + r] = sum_b d[r, g(b)] s[i, b] (q . a - 8 as[i, b]) (as: the sum of the
// block's activations). Within a block the 32 products of a row are summed in int32 (exact:
// vpmaddubsw pair sums of at most 2 * 15 * 127, eight of them added in int16, then vpmaddwd,
// then the -8 as), so each block costs a row one float multiply-add, and the 8 rows of a 32-byte
// half share every instruction (one lane each). Each row i takes the tile's pair again from L1
// (with AVX2's 16 registers a block's 8 vectors of nibbles kept for all rows spilled: 0.83-0.93x
// the 8-row tiles for 4-64 rows; this way 0.92-1.07x, the AVX2 code on an AMD EPYC Zen 4, in
// turns in one process). Each output's lane sees the same instructions in the same order
// whatever MR is, so a row's result does not depend on the batch.
template <int MR>
LLAMARUN_AVX2 void int4_tile(const int8_t* a, const float* s, const int32_t* as, int64_t lda,
                             const uint8_t* w, const uint16_t* dt /* (G', T4) */, int shift,
                             int64_t pairs, float* out /* (MR, T4) */) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t nb = lda / Q4B;
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const uint8_t* wp = w + p * PAIR_BYTES;
    prefetch_pair<_MM_HINT_T0>(wp);
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half) {  // block 2p (low nibbles), then 2p + 1 (high)
      const int64_t b = 2 * p + half;
      // the block's scales of rows 0-7 and 8-15
      const __m256 d_rows0 =
          _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(dt + (b >> shift) * T4)));
      const __m256 d_rows8 =
          _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(dt + (b >> shift) * T4 + 8)));
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const int8_t* ab = a + i * lda + b * Q4B;
        __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int v = 0; v < 8; ++v) {  // (the weights from L1 again for each row i)
          const __m256i x0 = _mm256_loadu_si256((const __m256i*)(wp + 64 * v));
          const __m256i x1 = _mm256_loadu_si256((const __m256i*)(wp + 64 * v + 32));
          int32_t chunk;
          std::memcpy(&chunk, ab + 4 * v, 4);
          const __m256i av = _mm256_set1_epi32(chunk);
          s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(
              _mm256_and_si256(half ? _mm256_srli_epi16(x0, 4) : x0, low), av));
          s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(
              _mm256_and_si256(half ? _mm256_srli_epi16(x1, 4) : x1, low), av));
        }
        const __m256i offset = _mm256_set1_epi32(8 * as[i * nb + b]);
        const __m256 ds = _mm256_set1_ps(s[i * nb + b]);
        acc[i][0] = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_madd_epi16(s0, ones), offset)),
            _mm256_mul_ps(d_rows0, ds), acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_madd_epi16(s1, ones), offset)),
            _mm256_mul_ps(d_rows8, ds), acc[i][1]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(out + i * T4, acc[i][0]);
    _mm256_storeu_ps(out + i * T4 + 8, acc[i][1]);
  }
}

#define LLAMARUN_AVX512_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

// int4_tile with AVX512-VNNI, giving the same bits: a block's 32 products of a row are the same
// int32 (vpdpbusd sums four products exactly where vpmaddubsw sums two), and each block then
// costs the row the same float multiply-add, in the same block order. A 64-byte vector is a
// chunk of 4 values of a block for all 16 rows, so one vpdpbusd multiplies it by the 4
// activations broadcast to every doubleword (the broadcast a load of the instruction's own).
//
// The high nibbles stay in place (x & 0xF0: 16 q, at most 240, a sum of four products at most
// 4 * 240 * 127 in magnitude), and one arithmetic shift by 4 per block and row, after the
// offset 16 * 8 * sum(a) is taken off (exact: every term is a multiple of 16), gives the same
// int32 as shifting each vector's bytes first.
template <int MR, bool FAR>
LLAMARUN_AVX512_VNNI void int4_tile_vnni(const int8_t* a, const float* s, const int32_t* as,
                                         int64_t lda, const uint8_t* w, const uint16_t* dt,
                                         int shift, int64_t pairs, float* out /* (MR, T4) */) {
  __m512 acc[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F), high = _mm512_set1_epi8((char)0xF0);
  const int64_t nb = lda / Q4B;
  for (int64_t p = 0; p < pairs; ++p) {
    const uint8_t* wp = w + p * PAIR_BYTES;
    // into L2, not L1 as int4_tile does: one row 0.87-0.89 -> 0.80-0.82 ms for 16384 x 2048
    // weights streamed from memory (Intel Xeon, 2 threads; 4 rows the same within 2%); FAR (AMD):
    // see FAR_PREFETCH
    if constexpr (FAR)
      prefetch_pair<_MM_HINT_NTA, FAR_PREFETCH>(wp);
    else
      prefetch_pair<_MM_HINT_T1>(wp);
    const int64_t b = 2 * p;  // block b (low nibbles) and b + 1 (high)
    __m512i sl[MR], sh[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) sl[i] = sh[i] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) {
      const __m512i x = _mm512_loadu_si512((const void*)(wp + 64 * v));
      const __m512i ql = _mm512_and_si512(x, low);
      const __m512i qh = _mm512_and_si512(x, high);  // 16 q: the high nibbles left in place
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const int8_t* ab = a + i * lda + b * Q4B + 4 * v;
        int32_t cl, ch;
        std::memcpy(&cl, ab, 4);
        std::memcpy(&ch, ab + Q4B, 4);
        sl[i] = _mm512_dpbusd_epi32(sl[i], ql, _mm512_set1_epi32(cl));
        sh[i] = _mm512_dpbusd_epi32(sh[i], qh, _mm512_set1_epi32(ch));
      }
    }
    const __m512 d0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(dt + (b >> shift) * T4)));
    const __m512 d1 =
        _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(dt + ((b + 1) >> shift) * T4)));
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512i l = _mm512_sub_epi32(sl[i], _mm512_set1_epi32(8 * as[i * nb + b]));
      const __m512i hh = _mm512_srai_epi32(
          _mm512_sub_epi32(sh[i], _mm512_set1_epi32(128 * as[i * nb + b + 1])), 4);
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(l),
                               _mm512_mul_ps(d0, _mm512_set1_ps(s[i * nb + b])), acc[i]);
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hh),
                               _mm512_mul_ps(d1, _mm512_set1_ps(s[i * nb + b + 1])), acc[i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) _mm512_storeu_ps(out + i * T4, acc[i]);
}

// Calls block(MR, NR, j0, left) (MR and NR as std::integral_constant) over the nrows weight rows
// of a pass in steps of NR, with MR = mrows (1..MB): 4 weight rows at a time for 1-2 activation
// rows, 2 for 3-4 (registers).
template <typename Block>
void avx2_pass(int64_t mrows, int64_t nrows, Block&& block) {
  using std::integral_constant;
  const int nr = mrows <= 2 ? 4 : 2;
  for (int64_t j0 = 0; j0 < nrows; j0 += nr) {
    const int64_t left = nrows - j0;
    switch (mrows) {
      case 1: block(integral_constant<int, 1>(), integral_constant<int, 4>(), j0, left); break;
      case 2: block(integral_constant<int, 2>(), integral_constant<int, 4>(), j0, left); break;
      case 3: block(integral_constant<int, 3>(), integral_constant<int, 2>(), j0, left); break;
      default: block(integral_constant<int, 4>(), integral_constant<int, 2>(), j0, left); break;
    }
  }
}

// sum_g z[g] x[g], the zeros' term of one activation row, for a tile's T4 = 16 outputs (one per
// lane, 8 at a time; zt the tile's float16 zeros, (G', T4)): per output, the same sum in group
// order whatever the tile or the batch holds.
LLAMARUN_AVX2 void zero_terms(const uint16_t* zt, const float* x, int64_t G,
                              float* out /* (T4) */) {
  __m256 acc0 = _mm256_setzero_ps(), acc8 = _mm256_setzero_ps();  // rows 0-7, rows 8-15
  for (int64_t g = 0; g < G; ++g) {
    const __m256 xg = _mm256_set1_ps(x[g]);
    acc0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(zt + g * T4))), xg,
                           acc0);
    acc8 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(zt + g * T4 + 8))),
                           xg, acc8);
  }
  _mm256_storeu_ps(out, acc0);
  _mm256_storeu_ps(out + 8, acc8);
}

// One activation row -> int8 values a (ldk, zero past K) in blocks of Q4B with a scale each
// (symmetric, round to nearest even), per block the sum of its int8 values, and per group X_g
// (see above). `v` is scratch
// for ldk floats.
template <typename InT>
LLAMARUN_AVX2 void quantize_row_q4(const InT* x, int64_t K, int64_t ldk, int64_t group, float* v,
                                   int8_t* a, float* s, int32_t* asum, float* xsum) {
  for (int64_t k = 0; k < K; ++k) v[k] = float(x[k]);
  std::fill(v + K, v + ldk, 0.f);
  std::fill(xsum, xsum + K / group, 0.f);
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < ldk / Q4B; ++b) {
    const float* vb = v + b * Q4B;
    __m256 f[4], amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
    for (int t = 0; t < 4; ++t) {
      f[t] = _mm256_loadu_ps(vb + 8 * t);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, f[t]));
      sum = _mm256_add_ps(sum, f[t]);
    }
    float m8[8], s8[8];
    _mm256_storeu_ps(m8, amax);
    _mm256_storeu_ps(s8, sum);
    float m = 0.f, total = 0.f;
    for (int t = 0; t < 8; ++t) {
      m = std::max(m, m8[t]);
      total += s8[t];
    }
    const __m256 inv = _mm256_set1_ps(m > 0.f ? 127.f / m : 0.f);
    __m256i q[4];  // |v * inv| <= 127 (rounded: at most 127)
    for (int t = 0; t < 4; ++t) q[t] = _mm256_cvtps_epi32(_mm256_mul_ps(f[t], inv));
    const __m256i q16 = _mm256_packs_epi32(q[0], q[1]), r16 = _mm256_packs_epi32(q[2], q[3]);
    const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16, r16), order);
    _mm256_storeu_si256((__m256i*)(a + b * Q4B), q8);
    const __m256i w16 = _mm256_madd_epi16(_mm256_add_epi16(q16, r16), _mm256_set1_epi16(1));
    int32_t i8[8], qsum = 0;
    _mm256_storeu_si256((__m256i*)i8, w16);
    for (int t = 0; t < 8; ++t) qsum += i8[t];
    s[b] = m / 127.f;
    asum[b] = qsum;  // (0 past K: the values there are 0)
    if (b * Q4B < K) xsum[b * Q4B / group] += total;
  }
}

// quantize_row_q4 over M rows (a: ldk per row, s and asum: ldk / Q4B, xsum: K / group), rows
// split over threads (each row's numbers are its own).
template <typename InT>
void quantize_rows_q4(const InT* x, int64_t M, int64_t K, int64_t ldk, int64_t group, int8_t* a,
                      float* s, int32_t* asum, float* xsum) {
  const int64_t nb = ldk / Q4B, G = K / group;
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / ldk), [&](int64_t m0, int64_t m1) {
    float* v = llamarun::scratch<float, struct Q4Row>(ldk);
    for (int64_t m = m0; m < m1; ++m)
      quantize_row_q4(x + m * K, K, ldk, group, v, a + m * ldk, s + m * nb, asum + m * nb,
                      xsum + m * G);
  });
}

// ---- int8 weights x int8 activations, AVX2 vpmaddubsw (CPUs without AVX512-VNNI) ----
// Activations as for the 4-bit kernel (int8 in blocks of Q4B = 32 with a scale each). vpmaddubsw
// takes one unsigned operand: |w| times x with w's sign (vpsignb), as llama.cpp does; a pair
// sums to at most 2 * 128 * 127 (no saturation). A block's 8 int32 lanes become float, scaled by
// the block's scale; the row's weight scale comes last.

template <int MR, int NR>
LLAMARUN_AVX2 void int8_avx2_block(const int8_t* a, const float* s, int64_t lda, const int8_t* w,
                                   int64_t nrows, int64_t K, float* out /* (MR, NB) */) {
  const int8_t* row[NR];
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) row[j] = w + std::min<int64_t>(j, nrows - 1) * K;
  __m256 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t nb = lda / Q4B;
  alignas(32) int8_t tail[NR][Q4B];
  for (int64_t k = 0; k < K; k += Q4B) {
    __m256i wv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      if (K - k >= Q4B) {
        _mm_prefetch((const char*)(row[j] + k + PREFETCH), _MM_HINT_T0);
        wv[j] = _mm256_loadu_si256((const __m256i*)(row[j] + k));
      } else {  // the row's last, partial block (the activations past K are 0)
        std::fill(tail[j], tail[j] + Q4B, 0);
        std::copy(row[j] + k, row[j] + K, tail[j]);
        wv[j] = _mm256_load_si256((const __m256i*)tail[j]);
      }
    }
    __m256i wabs[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wabs[j] = _mm256_abs_epi8(wv[j]);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256i xv = _mm256_loadu_si256((const __m256i*)(a + i * lda + k));
      const __m256 scale = _mm256_set1_ps(s[i * nb + k / Q4B]);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) {
        const __m256i prod =
            _mm256_madd_epi16(_mm256_maddubs_epi16(wabs[j], _mm256_sign_epi8(xv, wv[j])), ones);
        acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(prod), scale, acc[i][j]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) out[i * NB + j] = hsum8(acc[i][j]);
}

template <typename InT, typename OutT, typename ScaleT>
void int8_avx2_impl(const InT* x, int64_t M, const int8_t* w, const ScaleT* wscale, int64_t N,
                    int64_t K, OutT* y) {
  const int64_t ldk = (K + 63) / 64 * 64;
  const int64_t nb = ldk / Q4B;
  int8_t* a = llamarun::scratch<int8_t, struct Q4Values>(M * ldk);
  float* s = llamarun::scratch<float, struct Q4Scales>(M * nb);
  float* v = llamarun::scratch<float, struct Q4Row>(ldk);
  float* xsum = llamarun::scratch<float, struct Q4GroupSums>(M);
  int32_t* asum = llamarun::scratch<int32_t, struct Q4Sums>(M * nb);
  for (int64_t m = 0; m < M; ++m)  // (one "group" of all K; the sums are not used)
    quantize_row_q4(x + m * K, K, ldk, K, v, a + m * ldk, s + m * nb, asum + m * nb, xsum + m);
  const int64_t nblocks = (N + NB - 1) / NB;
  llamarun::blocks_for(nblocks, N * K, [&](int64_t b0, int64_t b1) {
    float out[MB * NB];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NB, nrows = std::min(NB, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int64_t mrows = std::min(MB, M - m0);
        const int8_t* a0 = a + m0 * ldk;
        const float* s0 = s + m0 * nb;
        avx2_pass(mrows, nrows, [&](auto mr, auto nr, int64_t j0, int64_t left) {
          int8_avx2_block<mr(), nr()>(a0, s0, ldk, w + (n0 + j0) * K, left, K, out + j0);
        });
        for (int64_t i = 0; i < mrows; ++i)
          store_block(out + i * NB, nrows, y + (m0 + i) * N + n0, wscale + n0);
      }
    }
  });
}

// s with group = Q4B << s (a group is 32 times a power of two).
inline int group_shift(int64_t group) {
  int shift = 0;
  while ((Q4B << shift) < group) ++shift;
  return shift;
}

// One tile of MR = 1..4 rows: int4_tile_vnni where the CPU has AVX512-VNNI (vnni), else int4_tile.
template <int MR>
inline void int4_tile_any(bool vnni, const int8_t* a, const float* s, const int32_t* as,
                          int64_t lda, const uint8_t* w, const uint16_t* dt, int shift,
                          int64_t pairs, float* out) {
  if (vnni && ROW_STREAM)
    int4_tile_vnni<MR, true>(a, s, as, lda, w, dt, shift, pairs, out);
  else if (vnni)
    int4_tile_vnni<MR, false>(a, s, as, lda, w, dt, shift, pairs, out);
  else
    int4_tile<MR>(a, s, as, lda, w, dt, shift, pairs, out);
}

// One activation row's T4 = 16 outputs of a tile, in the rows' order (as the 4-bit tiles and the
// AMX panels leave them) -> y[0..count) as OutT, plus the zeros' terms where zt is given. 8 at
// once, the same float additions and roundings as one output at a time.
template <typename OutT>
LLAMARUN_AVX2 void store_tile(const float* acc, const uint16_t* zt, const float* xsum, int64_t G,
                              OutT* y, int64_t count) {
  alignas(32) float terms[T4];
  if (zt != nullptr) zero_terms(zt, xsum, G, terms);
  for (int64_t h = 0; h < 2 && 8 * h < count; ++h) {
    __m256 v = _mm256_loadu_ps(acc + 8 * h);
    if (zt != nullptr) v = _mm256_add_ps(v, _mm256_load_ps(terms + 8 * h));
    if (count >= 8 * (h + 1)) {
      store8(y + 8 * h, v);
      continue;
    }
    alignas(32) float o[8];
    _mm256_store_ps(o, v);
    for (int64_t r = 8 * h; r < count; ++r) y[r] = OutT(o[r - 8 * h]);
  }
}

template <typename InT, typename OutT>
void int4_linear_impl(const InT* x, int64_t M, const uint8_t* w, const uint16_t* d,
                      const uint16_t* z, int64_t Gp, int64_t N, int64_t K, int64_t group, OutT* y,
                      bool vnni) {
  const int64_t ldk = (K + 63) / 64 * 64, ldw = ldk / 2, G = K / group, pairs = ldk / 64;
  const int shift = group_shift(group);
  const int64_t nb = ldk / Q4B;
  int8_t* a = llamarun::scratch<int8_t, struct Q4Values>(M * ldk);
  float* s = llamarun::scratch<float, struct Q4Scales>(M * nb);
  float* xsum = llamarun::scratch<float, struct Q4GroupSums>(M * G);
  int32_t* asum = llamarun::scratch<int32_t, struct Q4Sums>(M * nb);
  quantize_rows_q4(x, M, K, ldk, group, a, s, asum, xsum);
  const int64_t tiles = (N + T4 - 1) / T4;
  llamarun::blocks_for(tiles, tiles * T4 * ldw, [&](int64_t t0, int64_t t1) {
    alignas(64) float out[MB * T4];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * T4, nrows = std::min(T4, N - n0);
      const uint16_t* dt = d + t * Gp * T4;
      const uint16_t* zt = z != nullptr ? z + t * Gp * T4 : nullptr;
      const uint8_t* wt = w + t * T4 * ldw;
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int64_t mrows = std::min(MB, M - m0);
        const int8_t* a0 = a + m0 * ldk;
        const float* s0 = s + m0 * nb;
        const int32_t* q0 = asum + m0 * nb;
        switch (mrows) {
          case 1: int4_tile_any<1>(vnni, a0, s0, q0, ldk, wt, dt, shift, pairs, out); break;
          case 2: int4_tile_any<2>(vnni, a0, s0, q0, ldk, wt, dt, shift, pairs, out); break;
          case 3: int4_tile_any<3>(vnni, a0, s0, q0, ldk, wt, dt, shift, pairs, out); break;
          default: int4_tile_any<4>(vnni, a0, s0, q0, ldk, wt, dt, shift, pairs, out); break;
        }
        for (int64_t i = 0; i < mrows; ++i)
          store_tile(out + i * T4, zt, xsum + (m0 + i) * G, G, y + (m0 + i) * N + n0, nrows);
      }
    }
  });
}

// ---- 4-bit weights x int8 activations on AMX tiles (prompt-sized M) ----
// The same numbers as int4_tile_vnni, bit for bit: a block's 32 products of a row are the same
// exact int32, (q - 8) . a (here one `tdpbssd` makes them for 16 rows x 16 outputs at once, the
// weights unpacked to q - 8), and each block then costs an output the same float multiply-add,
// (d * s) times that sum, in the same block order. So which of the two computes a row (by the
// pass's row count) changes nothing in it: a prompt's numbers do not depend on the size of the
// pass that carries it.
//
// The weights of a panel of AMX_N = 16 outputs (one of the layout's tiles) are unpacked once per
// call into B tiles, 8 rows of 64 bytes per block of 32 values, row r holding per output the
// block's values 4r..4r+3 (the layout's vector r, its nibbles made q - 8); the activations are
// A tiles read straight from the quantized rows (16 rows of a block's 32 bytes). A C tile (16 x 16 int32) goes through memory to the float
// multiply-adds, whose accumulators stay in registers; the next block's tile product runs
// meanwhile (two sets of tiles, alternating).

#define LLAMARUN_AMX \
  __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

constexpr int64_t AMX_N = 16;  // outputs per panel: a B tile's columns
constexpr int64_t AMX_M = 16;  // activation rows per pass over a panel: an A tile's rows
constexpr int64_t AMX_TILE_BYTES = 512;  // a B tile: 8 rows x 64 bytes

// Whether this CPU has AMX-TILE and AMX-INT8 and the OS lets this process use the tiles
// (Linux >= 5.16 gives the tile data state to a process that asks for it).
bool amx_ready() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1, int8 = (d >> 25) & 1;
    if (!tile || !int8 || !cpu_features()[1]) return false;  // the float part: AVX-512
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Two sets of tiles: tmm0-1 A (16 activation rows x a block's 32 bytes), tmm2-3 B (8 x 64
// bytes: 16 outputs), tmm4-5 C (16 x 16 int32), C[i] = A[i] x B[i].
TileConfig amx_config() {
  TileConfig c;
  for (int t = 0; t < 6; ++t) {
    c.rows[t] = t == 2 || t == 3 ? 8 : 16;
    c.colsb[t] = t < 2 ? Q4B : 64;
  }
  return c;
}

static_assert(AMX_N == T4, "an AMX panel is one tile of the 4-bit layout");

// A panel's weights (one tile of the layout from wt) as B tiles of q - 8, (blocks, 8, 64) bytes:
// the layout's vector v of pair p, its low nibbles row v of block 2p's B tile, its high ones row
// v of block 2p + 1's.
LLAMARUN_AMX void amx_unpack(const uint8_t* wt, int64_t pairs, int8_t* B) {
  const __m512i low = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  for (int64_t p = 0; p < pairs; ++p) {
    int8_t* blo = B + 2 * p * AMX_TILE_BYTES;
    int8_t* bhi = blo + AMX_TILE_BYTES;
    for (int v = 0; v < 8; ++v) {
      const __m512i x = _mm512_loadu_si512((const void*)(wt + p * PAIR_BYTES + 64 * v));
      _mm512_storeu_si512((void*)(blo + 64 * v), _mm512_sub_epi8(_mm512_and_si512(x, low), eight));
      _mm512_storeu_si512((void*)(bhi + 64 * v),
                          _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(x, 4), low), eight));
    }
  }
}

// A panel's scales (one tile of int4_pack_groups' layout from dt) as float, (G', AMX_N).
LLAMARUN_AMX void amx_panel_scales(const uint16_t* dt, int64_t Gp, float* dn) {
  for (int64_t g = 0; g < Gp; ++g)
    _mm512_storeu_ps(dn + g * AMX_N,
                     _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(dt + g * T4))));
}

// acc[i] += (d * s[i, b]) times row i of buf (block b's sums), as int4_tile_vnni's lanes do.
#define LLAMARUN_AMX_BLOCK(buf, b)                                                     \
  do {                                                                                 \
    const __m512 dv = _mm512_loadu_ps(dn + ((b) >> shift) * AMX_N);                    \
    _Pragma("GCC unroll 16") for (int i = 0; i < AMX_M; ++i) acc[i] = _mm512_fmadd_ps( \
        _mm512_cvtepi32_ps(_mm512_load_si512(buf[i])),                                 \
        _mm512_mul_ps(dv, _mm512_set1_ps(s[i * nb + (b)])), acc[i]);                   \
  } while (0)

// Block b's tile product C = A x B (tile numbers: literals, which the intrinsics paste).
#define LLAMARUN_AMX_ISSUE(A, Bt, C, b)                \
  do {                                                 \
    _tile_loadd(A, a + (b) * Q4B, ldk);                \
    _tile_loadd(Bt, B + (b) * AMX_TILE_BYTES, 64);     \
    _tile_zero(C);                                     \
    _tile_dpbssd(C, A, Bt);                            \
  } while (0)

// AMX_M activation rows (a: zero rows past the batch) x one panel -> out (AMX_M, AMX_N). The
// tiles work two blocks ahead of the float code: block b + 1's product runs while block b's
// sums go to memory and block b - 1's (stored one step before: no wait for the store) to the
// accumulators.
LLAMARUN_AMX void amx_panel_rows(const int8_t* a, const float* s, int64_t ldk, const int8_t* B,
                                 const float* dn /* (G', AMX_N) */, int shift,
                                 float* out /* (AMX_M, AMX_N) */) {
  const int64_t nb = ldk / Q4B;  // even: ldk is a multiple of 64
  alignas(64) int32_t even[16][16], odd[16][16];
  __m512 acc[AMX_M];
#pragma GCC unroll 16
  for (int i = 0; i < AMX_M; ++i) acc[i] = _mm512_setzero_ps();
  LLAMARUN_AMX_ISSUE(0, 2, 4, 0);
  for (int64_t b = 0; b < nb; b += 2) {
    LLAMARUN_AMX_ISSUE(1, 3, 5, b + 1);
    _tile_stored(4, even, 64);
    if (b > 0) LLAMARUN_AMX_BLOCK(odd, b - 1);
    if (b + 2 < nb) LLAMARUN_AMX_ISSUE(0, 2, 4, b + 2);
    _tile_stored(5, odd, 64);
    LLAMARUN_AMX_BLOCK(even, b);
  }
  LLAMARUN_AMX_BLOCK(odd, nb - 1);
#pragma GCC unroll 16
  for (int i = 0; i < AMX_M; ++i) _mm512_storeu_ps(out + i * AMX_N, acc[i]);
}

LLAMARUN_AMX void amx_load_config(const TileConfig* c) { _tile_loadconfig(c); }
LLAMARUN_AMX void amx_release() { _tile_release(); }

// int4_linear_impl's product on AMX tiles (amx_ready() must hold), the same bits.
template <typename InT, typename OutT>
void int4_amx_impl(const InT* x, int64_t M, const uint8_t* w, const uint16_t* d,
                   const uint16_t* z, int64_t Gp, int64_t N, int64_t K, int64_t group, OutT* y) {
  const int64_t ldk = (K + 63) / 64 * 64, ldw = ldk / 2, G = K / group, pairs = ldk / 64;
  const int64_t nb = ldk / Q4B, Mp = (M + AMX_M - 1) / AMX_M * AMX_M;
  const int shift = group_shift(group);
  std::vector<int8_t> a(Mp * ldk, 0);  // rows past M: zeros (their results are dropped)
  std::vector<float> s(Mp * nb, 0.f), xsum(M * G);
  std::vector<int32_t> asum(Mp * nb, 0);
  quantize_rows_q4(x, M, K, ldk, group, a.data(), s.data(), asum.data(), xsum.data());
  const int64_t tiles = (N + T4 - 1) / T4;  // = panels
  static const TileConfig config = amx_config();
  pieces_for(tiles, T4 * ldw, [&](int64_t p0, int64_t p1) {
    amx_load_config(&config);
    std::vector<int8_t> B(nb * AMX_TILE_BYTES);
    std::vector<float> dn(Gp * AMX_N);
    alignas(64) float out[AMX_M * AMX_N];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * T4;
      amx_unpack(w + p * T4 * ldw, pairs, B.data());
      amx_panel_scales(d + p * Gp * T4, Gp, dn.data());
      for (int64_t m0 = 0; m0 < M; m0 += AMX_M) {
        amx_panel_rows(a.data() + m0 * ldk, s.data() + m0 * nb, ldk, B.data(), dn.data(), shift,
                       out);
        for (int64_t i = 0; i < std::min(AMX_M, M - m0); ++i)
          store_tile(out + i * AMX_N, z != nullptr ? z + p * Gp * T4 : nullptr,
                     xsum.data() + (m0 + i) * G, G, y + (m0 + i) * N + n0, std::min(T4, N - n0));
      }
    }
    amx_release();
  });
}

// float32 -> bfloat16, rounded to nearest even (finite values: weights).
LLAMARUN_AVX2 inline __m128i to_bf16(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// The weight of int4_linear's layout as bfloat16 rows (N, K): for products of many rows, where a
// bfloat16 GEMM of the CPU's own (AMX) beats the kernel's stream. A row's doublewords in
// vectors v and v + 1 of a pair (v even) hold 8 consecutive values of a block in their low
// nibbles and the 8 values 32 further on in their high ones (see the layout above); 8
// consecutive values never straddle a group.
LLAMARUN_AVX2 void int4_dequant_tile(const uint8_t* wt, const uint16_t* dt, const uint16_t* zt,
                                     int64_t n0, int64_t N, int64_t K, int shift, uint16_t* out) {
  const int64_t pairs = (K + 63) / 64;
  const __m256i low = _mm256_set1_epi32(0x0F);
  const __m256 eight = _mm256_set1_ps(8.0f);
  for (int64_t r = 0; r < T4 && n0 + r < N; ++r) {
    uint16_t* o = out + (n0 + r) * K;
    for (int64_t p = 0; p < pairs; ++p) {
      for (int v = 0; v < 8; v += 2) {
        const int64_t k = 64 * p + 4 * v;
        uint32_t first, second;
        std::memcpy(&first, wt + p * PAIR_BYTES + 64 * v + 4 * r, 4);
        std::memcpy(&second, wt + p * PAIR_BYTES + 64 * (v + 1) + 4 * r, 4);
        const __m256i bytes = _mm256_cvtepu8_epi32(
            _mm_cvtsi64_si128(int64_t(first) | (int64_t(second) << 32)));
        const __m256i qs[2] = {_mm256_and_si256(bytes, low), _mm256_srli_epi32(bytes, 4)};
        for (int half = 0; half < 2; ++half) {
          const int64_t kk = k + 32 * half;
          if (kk >= K) break;
          const int64_t g = kk >> (5 + shift);  // group = 32 << shift
          const __m256 val = _mm256_fmadd_ps(
              _mm256_sub_ps(_mm256_cvtepi32_ps(qs[half]), eight),
              _mm256_set1_ps(_cvtsh_ss(dt[g * T4 + r])),
              zt != nullptr ? _mm256_set1_ps(_cvtsh_ss(zt[g * T4 + r])) : _mm256_setzero_ps());
          _mm_storeu_si128((__m128i*)(o + kk), to_bf16(val));
        }
      }
    }
  }
}

// Rows of int8 weights times their scales, as bfloat16: the product's rounding of
// q.to(bfloat16) * scale (a float product rounded once).
LLAMARUN_AVX2 void int8_dequant_rows(const int8_t* q, const float* s, int64_t r0, int64_t r1,
                                     int64_t K, uint16_t* out) {
  for (int64_t n = r0; n < r1; ++n) {
    const __m256 sv = _mm256_set1_ps(s[n]);
    const int8_t* qn = q + n * K;
    uint16_t* o = out + n * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(qn + k)));
      _mm_storeu_si128((__m128i*)(o + k), to_bf16(_mm256_mul_ps(_mm256_cvtepi32_ps(v), sv)));
    }
    for (; k < K; ++k) o[k] = c10::BFloat16(float(qn[k]) * s[n]).x;  // the tail: the same rounding
  }
}

void int4_dequant_impl(const uint8_t* w, const uint16_t* d, const uint16_t* z, int64_t Gp,
                       int64_t N, int64_t K, int shift, uint16_t* out) {
  const int64_t ldw = (K + 63) / 64 * 32, tiles = (N + T4 - 1) / T4;
  pieces_for(tiles, T4 * ldw, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      int4_dequant_tile(w + t * T4 * ldw, d + t * Gp * T4, z != nullptr ? z + t * Gp * T4 : nullptr,
                        t * T4, N, K, shift, out);
  });
}

}  // namespace

// Which of the instructions the kernels need this CPU has: (avx512bf16, avx512vnni, avx2+fma+f16c).
std::vector<bool> cpu_features() {
  __builtin_cpu_init();
  const bool base = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl");
  return {base && __builtin_cpu_supports("avx512bf16"),
          base && __builtin_cpu_supports("avx512vnni"),
          __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
              __builtin_cpu_supports("f16c")};
}

// From this many rows on, int4_linear runs on AMX tiles where it can (the same bits as the VNNI
// tiles). Measured on an Intel Xeon with AMX, 2 threads, the 4 products of a 1B-shaped layer
// (Q4_0-like, bfloat16 activations, medians of 5): VNNI tiles 2.0 ms at 8 rows, 4.0 at 16, 17.0 at
// 64, 33.8 at 128; AMX 3.6, 3.9, 10.0 and 20.0 (kernels.INT4_GEMM_ROWS: where a GEMM takes over).
constexpr int64_t INT4_AMX_ROWS = 16;
int64_t int4_amx_rows() { return INT4_AMX_ROWS; }

// Checks int4_linear's and int4_dequant's weight operands (w by kernels.int4_pack, d and z by
// kernels.int4_pack_groups, for an (N, K) weight in groups of `group`); returns G', the groups
// of the padded K.
static int64_t check_int4_operands(const torch::Tensor& w, const torch::Tensor& d,
                                   const torch::Tensor& z, int64_t group, int64_t N, int64_t K,
                                   const char* op) {
  const int64_t tiles = (N + T4 - 1) / T4;
  const int64_t ldk = (K + 63) / 64 * 64, Gp = (ldk + group - 1) / group;
  TORCH_CHECK(w.dim() == 2 && d.dim() == 3 && w.scalar_type() == at::kByte, op, ": shapes");
  TORCH_CHECK(group >= Q4B && group % Q4B == 0 && (group & (group - 1)) == 0 && K % group == 0 &&
                  N > 0 && w.size(1) == ldk / 2 && w.size(0) == tiles * T4,
              op, ": group (32 times a power of two), K and N");
  TORCH_CHECK(d.scalar_type() == at::kHalf && z.scalar_type() == at::kHalf &&
                  d.size(0) == tiles && d.size(1) == Gp && d.size(2) == T4 &&
                  (z.numel() == 0 || z.sizes() == d.sizes()),
              op, ": float16 scales and zeros in tiles (kernels.int4_pack_groups; no zeros: "
              "an empty tensor)");
  return Gp;
}

// Which code computes a 4-bit product (the same bits whichever).
enum class Int4Code { avx2, vnni, amx };

namespace llamarun {

ProductPlan dense_plan(const torch::Tensor& w, bool stream) {
  TORCH_CHECK(w.dim() == 2 && (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat),
              "dense product: a 2-D bfloat16 or float32 weight");
  ProductPlan p;
  p.kind = 0;
  p.dtype = w.scalar_type();
  p.w = w.contiguous();
  p.wp = p.w.data_ptr();
  p.stream = stream;
  p.N = w.size(0);
  p.K = w.size(1);
  return p;
}

ProductPlan int8_plan(const torch::Tensor& w, const torch::Tensor& wscale, bool stream) {
  TORCH_CHECK(w.dim() == 2, "int8_linear: shapes");
  TORCH_CHECK(w.scalar_type() == at::kChar, "int8_linear: int8 weights");
  TORCH_CHECK(wscale.numel() == w.size(0), "int8_linear: one scale per row");
  ProductPlan p;
  p.kind = 1;
  p.w = w.contiguous();
  p.wp = p.w.data_ptr();
  // bfloat16 scales (Int8Linear's on CPU) are read as they are, each converted where it is
  // used (exact): converting them all on every call cost an allocation and a pass over N values
  // (the 1B shape's int8 head: 128256, a 0.5 MB buffer per token). Other dtypes: float32.
  p.bf16_scales = wscale.scalar_type() == at::kBFloat16;
  p.scales = p.bf16_scales ? wscale.contiguous() : wscale.to(at::kFloat).contiguous();
  p.sp = p.scales.data_ptr();
  p.stream = stream;
  p.N = w.size(0);
  p.K = w.size(1);
  return p;
}

ProductPlan int4_plan(const torch::Tensor& w, const torch::Tensor& d, const torch::Tensor& z,
                      int64_t group, int64_t N, int64_t K, int code) {
  ProductPlan p;
  p.kind = 2;
  p.Gp = check_int4_operands(w, d, z, group, N, K, "int4_linear");
  p.w = w.contiguous();
  p.scales = d.contiguous();
  p.zeros = z.contiguous();
  p.wp = p.w.data_ptr();
  p.sp = p.scales.data_ptr();
  p.zp = p.zeros.numel() ? reinterpret_cast<const uint16_t*>(p.zeros.data_ptr()) : nullptr;
  p.code = code;
  p.group = group;
  p.N = N;
  p.K = K;
  return p;
}

ProductPlan plan_product(int64_t kind, const torch::Tensor& a, const torch::Tensor& b,
                         const torch::Tensor& c, int64_t group, int64_t n, int64_t K) {
  ProductPlan p;
  switch (kind) {
    case 0:
      p = dense_plan(a, a.scalar_type() == at::kFloat ? f32_streams() : ROW_STREAM);
      break;
    case 1:
      p = int8_plan(a, b, ROW_STREAM);
      break;
    case 2:
      return int4_plan(a, b, c, group, n, K, -1);
    default:
      TORCH_CHECK(false, "decode_layers: product kind 0 (dense), 1 (int8) or 2 (4-bit)");
  }
  TORCH_CHECK(p.K == K, "decode_layers: a product's inputs are not the width before it");
  return p;
}

void run_product(const ProductPlan& p, const void* x, at::ScalarType xtype, int64_t M, void* y) {
  static const bool vnni = cpu_features()[1];  // else AVX2 (Python checked that it has that)
  const bool bf16 = xtype == at::kBFloat16;
  TORCH_CHECK(bf16 || xtype == at::kFloat, "products: x bfloat16 or float32");
  // f(x, y) as typed pointers (both bfloat16 or both float32)
  const auto typed = [&](auto&& f) {
    if (bf16)
      f(static_cast<const c10::BFloat16*>(x), static_cast<c10::BFloat16*>(y));
    else
      f(static_cast<const float*>(x), static_cast<float*>(y));
  };
  switch (p.kind) {
    case 0:
      TORCH_CHECK(p.dtype == xtype, "dense product: x and the weight of one dtype");
      if (bf16)
        bf16_linear_impl(static_cast<const uint16_t*>(x), M, static_cast<const uint16_t*>(p.wp),
                         p.N, p.K, p.stream, static_cast<c10::BFloat16*>(y));
      else
        f32_product(static_cast<const float*>(x), static_cast<const float*>(p.wp),
                    static_cast<float*>(y), M, p.K, p.N, p.stream);
      return;
    case 1: {
      const auto* wp = static_cast<const int8_t*>(p.wp);
      typed([&](const auto* xp, auto* yp) {
        const auto run = [&](const auto* sp) {
          if (vnni)
            int8_linear_impl(xp, M, wp, sp, p.N, p.K, p.stream, yp);
          else
            int8_avx2_impl(xp, M, wp, sp, p.N, p.K, yp);
        };
        if (p.bf16_scales)
          run(static_cast<const c10::BFloat16*>(p.sp));
        else
          run(static_cast<const float*>(p.sp));
      });
      return;
    }
    case 2: {
      const int code = p.code >= 0 ? p.code
                       : M >= INT4_AMX_ROWS && amx_ready() ? int(Int4Code::amx)
                       : vnni ? int(Int4Code::vnni) : int(Int4Code::avx2);
      const auto* wp = static_cast<const uint8_t*>(p.wp);
      const auto* dp = static_cast<const uint16_t*>(p.sp);
      typed([&](const auto* xp, auto* yp) {
        if (code == int(Int4Code::amx))
          int4_amx_impl(xp, M, wp, dp, p.zp, p.Gp, p.N, p.K, p.group, yp);
        else
          int4_linear_impl(xp, M, wp, dp, p.zp, p.Gp, p.N, p.K, p.group, yp,
                           code == int(Int4Code::vnni));
      });
      return;
    }
  }
  TORCH_CHECK(false, "decode_layers: product kind 0 (dense), 1 (int8) or 2 (4-bit)");
}

}  // namespace llamarun

// y (M, N) = x (M, K) @ W^T by a plan of W, a new tensor: x checked ("<op>: shapes", "<op>: x
// bfloat16 or float32").
static torch::Tensor run_on(const llamarun::ProductPlan& p, const torch::Tensor& x,
                            const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == p.K, op, ": shapes");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, op,
              ": x bfloat16 or float32");
  auto xc = x.contiguous();
  auto y = torch::empty({xc.size(0), p.N}, xc.options());
  llamarun::run_product(p, xc.data_ptr(), xc.scalar_type(), xc.size(0), y.data_ptr());
  return y;
}

static torch::Tensor bf16_linear_on(const torch::Tensor& x, const torch::Tensor& w, bool stream) {
  auto d = llamarun::dense_operands(x, w, at::kBFloat16, "bf16_linear", "bfloat16");
  llamarun::run_product(llamarun::dense_plan(d.w, stream), d.x.data_ptr(), at::kBFloat16, d.M,
                        d.y.data_ptr());
  return d.y;
}

// y (M, N) = x (M, K) @ w (N, K)^T; x and w bfloat16; y in x's dtype.
torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& w) {
  return bf16_linear_on(x, w, ROW_STREAM);
}

torch::Tensor bf16_linear_by(const torch::Tensor& x, const torch::Tensor& w,
                             const std::string& order) {
  return bf16_linear_on(x, w, llamarun::rows_by_name(order, "bf16_linear_by"));
}

static torch::Tensor int8_linear_on(const torch::Tensor& x, const torch::Tensor& w,
                                    const torch::Tensor& wscale, bool stream) {
  return run_on(llamarun::int8_plan(w, wscale, stream), x, "int8_linear");
}

// y (M, N) = x (M, K) @ (w * wscale[:, None])^T with x quantized to int8 in blocks of QB;
// wscale any float dtype; y in x's dtype (bfloat16 or float32).
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& w,
                          const torch::Tensor& wscale) {
  return int8_linear_on(x, w, wscale, ROW_STREAM);
}

// int8_linear with a one-row pass's order given (AVX512-VNNI; AVX2 has one order).
torch::Tensor int8_linear_by(const torch::Tensor& x, const torch::Tensor& w,
                             const torch::Tensor& wscale, const std::string& order) {
  return int8_linear_on(x, w, wscale, llamarun::rows_by_name(order, "int8_linear_by"));
}

// y (M, N) = x (M, K) @ W^T, W[n, k] = (q - 8) * d[n, k / group] + z[n, k / group] with q packed
// by kernels.int4_pack and d, z float16 by kernels.int4_pack_groups (z empty: no zeros); x
// bfloat16 or float32, y in x's dtype; by the AVX2 tiles, the AVX512-VNNI ones or AMX (code -1:
// by the rows, AMX from INT4_AMX_ROWS where it can, else VNNI where the CPU has it).
static torch::Tensor int4_linear_on(const torch::Tensor& x, const torch::Tensor& w,
                                    const torch::Tensor& d, const torch::Tensor& z, int64_t group,
                                    int64_t N, int code) {
  TORCH_CHECK(x.dim() == 2, "int4_linear: shapes");
  return run_on(llamarun::int4_plan(w, d, z, group, N, x.size(1), code), x, "int4_linear");
}

torch::Tensor int4_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& d,
                          const torch::Tensor& z, int64_t group, int64_t N) {
  return int4_linear_on(x, w, d, z, group, N, -1);
}

// int4_linear by the given code whatever the row count: "avx2", "vnni" or "amx" (tests compare
// them; benchmarks time them), which the CPU must have (cpu_features, amx_ready).
torch::Tensor int4_linear_by(const torch::Tensor& x, const torch::Tensor& w,
                             const torch::Tensor& d, const torch::Tensor& z, int64_t group,
                             int64_t N, const std::string& code) {
  const auto features = cpu_features();
  if (code == "avx2") {
    TORCH_CHECK(features[2], "int4_linear_by: this CPU lacks AVX2");
    return int4_linear_on(x, w, d, z, group, N, int(Int4Code::avx2));
  }
  if (code == "vnni") {
    TORCH_CHECK(features[1], "int4_linear_by: this CPU lacks AVX512-VNNI");
    return int4_linear_on(x, w, d, z, group, N, int(Int4Code::vnni));
  }
  TORCH_CHECK(code == "amx", "int4_linear_by: code avx2, vnni or amx");
  TORCH_CHECK(amx_ready(), "int4_linear_by: no AMX here (CPU or OS)");
  return int4_linear_on(x, w, d, z, group, N, int(Int4Code::amx));
}

// int4_linear's weight (w, d, z as there) dequantized into out, bfloat16 (N, K); K a multiple of 8.
torch::Tensor int4_dequant(const torch::Tensor& w, const torch::Tensor& d, const torch::Tensor& z,
                           int64_t group, int64_t N, int64_t K, torch::Tensor out) {
  const int64_t Gp = check_int4_operands(w, d, z, group, N, K, "int4_dequant");
  TORCH_CHECK(w.is_contiguous() && d.is_contiguous() && z.is_contiguous() && K % 8 == 0,
              "int4_dequant: contiguous operands, K a multiple of 8");
  const int shift = group_shift(group);
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.dim() == 2 &&
                  out.size(0) == N && out.size(1) == K,
              "int4_dequant: out (N, K) bfloat16");
  int4_dequant_impl(w.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(d.data_ptr()),
                    z.numel() ? reinterpret_cast<const uint16_t*>(z.data_ptr()) : nullptr, Gp, N,
                    K, shift,
                    reinterpret_cast<uint16_t*>(out.data_ptr()));
  return out;
}

// q (N, K) int8 times scales (N,) into out, bfloat16 (N, K).
torch::Tensor int8_dequant(const torch::Tensor& q, const torch::Tensor& scales, torch::Tensor out) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous() &&
                  scales.dim() == 1 && scales.size(0) == q.size(0),
              "int8_dequant: shapes");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.sizes() == q.sizes(),
              "int8_dequant: out (N, K) bfloat16");
  const int64_t N = q.size(0), K = q.size(1);
  auto s = scales.to(at::kFloat).contiguous();
  const auto* qp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  pieces_for(N, K, [&](int64_t r0, int64_t r1) { int8_dequant_rows(qp, sp, r0, r1, K, op); });
  return out;
}

// The ops' schemas are defined in Python (llamarun/kernels/__init__.py, with their fake forms
// for torch.compile) so that they exist before this library is built; this adds the CPU code,
// which torch.compile's graphs then reach through the C++ dispatcher.
TORCH_LIBRARY_IMPL(llamarun, CPU, m) {
  m.impl("bf16_linear", &bf16_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
  m.impl("f32_linear", &llamarun::f32_linear);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_features", &cpu_features);
  m.def("bf16_linear", &bf16_linear);
  m.def("bf16_linear_by", &bf16_linear_by);
  m.def("int8_linear", &int8_linear);
  m.def("int8_linear_by", &int8_linear_by);
  m.def("int4_linear", &int4_linear);
  m.def("int4_linear_by", &int4_linear_by);
  m.def("amx_ready", &amx_ready);
  m.def("int4_amx_rows", &int4_amx_rows);
  m.def("int4_dequant", &int4_dequant);
  m.def("int8_dequant", &int8_dequant);
  m.def("f32_linear", &llamarun::f32_linear);
  m.def("f32_linear_by", &llamarun::f32_linear_by);
  m.def("attention_lanes", &llamarun::attention_lanes);
  m.def("attend_supported", &llamarun::attend_supported);
  m.def("attend", &llamarun::attend);
  m.def("rope_write", &llamarun::rope_write);
  m.def("rms_norm", &llamarun::rms_norm);
  m.def("silu_mul", &llamarun::silu_mul);
  m.def("argmax_rows", &llamarun::argmax_rows);
  // module_local: another build of these kernels (benchmarks/decode_ab.py --baseline) may load
  // beside this one, and pybind11 otherwise registers a C++ type once per process
  py::class_<llamarun::LayerStack>(m, "LayerStack", py::module_local())
      .def(py::init<>())
      .def("add", &llamarun::LayerStack::add)
      .def("set_head", &llamarun::LayerStack::set_head)
      .def("set_embedding", &llamarun::LayerStack::set_embedding)
      .def("__len__", [](const llamarun::LayerStack& s) { return s.layers.size(); });
  m.def("decode_layers", &llamarun::decode_layers);
  m.def("decode_logits", &llamarun::decode_logits);
}
