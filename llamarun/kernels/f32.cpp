// float32 products y = x @ w^T with AVX2 + FMA, w (N, K) as stored (no repacking).
//
// Why: oneDNN's product for a few rows (decode batches, speculative verification, prompt chunks)
// ran at a third of the weights' streaming rate, and torch.compile's one-row multiply + sum
// rounds otherwise than any batched product, so a row's logits depended on how many rows its
// pass held. Here every y[m, n] is computed by one instruction sequence whatever M is: 8 lane
// sums over k = lane, lane + 8, ... (fused multiply-adds in k order; the last partial chunk
// loaded with zeros past K) and then the same 8-to-1 tree (hsum8).

#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using llamarun::pieces_for;

constexpr int64_t NB = 12;  // weight rows per block
constexpr int64_t MT = 64;  // activation rows sharing one pass over a piece of blocks (L2)

// Lanes < n of a mask for _mm256_maskload_ps.
LLAMARUN_AVX2 inline __m256i lanes_below(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The loads of a k step: whole vectors, or the lanes below K (zeros past it).
struct Plain {
  LLAMARUN_AVX2 __m256 operator()(const float* p) const { return _mm256_loadu_ps(p); }
};
struct Masked {
  __m256i mask;
  LLAMARUN_AVX2 __m256 operator()(const float* p) const { return _mm256_maskload_ps(p, mask); }
};

// One k step of a block: acc[i][j] += x[i][k..k+8] * w[j][k..k+8]. The operand reused across
// the other's rows stays in registers with the 12 accumulators, within AVX2's 16: MR = 4 holds
// NR weight vectors (MR >= 4: 3 for 4 rows, 2 for 5-6, 1 for 7-8) and loads each row's x;
// MR < 4 holds its x vectors and loads each weight vector once (spilled accumulators made a one-row product compute-bound: measured
// 14 GB/s against 19 for a single sum chain on one core). Either way the same FMA per element.
template <int MR, int NR, typename Load>
LLAMARUN_AVX2 inline void f32_step(__m256 (&acc)[MR][NR], const float* x, int64_t ldx,
                                   const float* const (&row)[NR], int64_t k, Load&& load) {
  if constexpr (MR >= 4) {
    __m256 wv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wv[j] = load(row[j] + k);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = load(x + i * ldx + k);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  } else {
    __m256 xv[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) xv[i] = load(x + i * ldx + k);
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      const __m256 wv = load(row[j] + k);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
}

// Which part of K a block call runs: [k0, k1). A call that starts past 0 resumes each element's
// 8 lane sums from `part` (8 floats per element, element (i, j) at part + (i * ldp + j) * 8),
// and one that ends before K leaves them there: the same FMAs in the same order as in one call.
struct KRange {
  int64_t k0, k1;
  float* part;
  int64_t ldp;
};

// MR activation rows x NR weight rows (rows past nrows repeat the last; not stored).
template <int MR, int NR>
LLAMARUN_AVX2 void f32_block(const float* x, int64_t ldx, const float* w, int64_t nrows, int64_t K,
                             const float* next /* rows to prefetch, or null */, float* y,
                             int64_t ldy, const KRange& r) {
  static_assert(MR * NR <= 12, "12 accumulators at most");
  const float* row[NR];
#pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) row[j] = w + std::min<int64_t>(j, nrows - 1) * K;
  __m256 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j)
      acc[i][j] = r.k0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(r.part + (i * r.ldp + j) * 8);
  int64_t k = r.k0;
  for (; k + 8 <= r.k1; k += 8) {
    if (next != nullptr)  // short interleaved row streams: the hardware prefetcher lags
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) _mm_prefetch((const char*)(next + j * K + k), _MM_HINT_T0);
    f32_step<MR, NR>(acc, x, ldx, row, k, Plain{});
  }
  if (k < r.k1) {  // masked loads give zeros past K (only the last range has a partial chunk)
    f32_step<MR, NR>(acc, x, ldx, row, k, Masked{lanes_below(r.k1 - k)});
  }
  if (r.k1 < K) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) _mm256_storeu_ps(r.part + (i * r.ldp + j) * 8, acc[i][j]);
    return;
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j)
      if (j < nrows) y[i * ldy + j] = hsum8(acc[i][j]);
}

// mrows (1..8) activation rows over one block of nrows (1..NB) weight rows, 8-12 accumulators
// (the FMA's latency times its throughput needs 8 or more in flight). One row streams all 12
// weight rows at once (memory requests in flight: it gains nothing from prefetching); more rows
// share each weight load, and prefetch the next block.
void f32_pass(int64_t mrows, const float* x, int64_t K, const float* w, int64_t nrows,
              const float* next, float* y, int64_t ldy, const KRange& r) {
  static_assert(NB == 12, "12 / nr weight rows a block");
  if (mrows == 1) return f32_block<1, 12>(x, K, w, nrows, K, nullptr, y, ldy, r);
  const int64_t nr = mrows <= 4 ? 12 / mrows : mrows <= 6 ? 2 : 1;
  for (int64_t j0 = 0; j0 < nrows; j0 += nr) {
    const float* wj = w + j0 * K;
    const float* nj = next != nullptr ? next + j0 * K : nullptr;
    const int64_t left = nrows - j0;
    const KRange rj{r.k0, r.k1, r.part != nullptr ? r.part + j0 * 8 : nullptr, r.ldp};
    switch (mrows) {
      case 2: f32_block<2, 6>(x, K, wj, left, K, nj, y + j0, ldy, rj); break;
      case 3: f32_block<3, 4>(x, K, wj, left, K, nj, y + j0, ldy, rj); break;
      case 4: f32_block<4, 3>(x, K, wj, left, K, nj, y + j0, ldy, rj); break;
      case 5: f32_block<5, 2>(x, K, wj, left, K, nj, y + j0, ldy, rj); break;
      case 6: f32_block<6, 2>(x, K, wj, left, K, nj, y + j0, ldy, rj); break;
      case 7: f32_block<7, 1>(x, K, wj, left, K, nj, y + j0, ldy, rj); break;
      default: f32_block<8, 1>(x, K, wj, left, K, nj, y + j0, ldy, rj); break;
    }
  }
}

}  // namespace

namespace llamarun {

// y (M, N) = x (M, K) @ w (N, K)^T, all float32.
torch::Tensor f32_linear(const torch::Tensor& x, const torch::Tensor& w) {
  const auto d = dense_operands(x, w, at::kFloat, "f32_linear", "float32");
  const int64_t M = d.M, K = d.K, N = d.N;
  const float* xp = d.x.data_ptr<float>();
  const float* wp = d.w.data_ptr<float>();
  float* yp = d.y.data_ptr<float>();
  // Passes of more than 8 rows over long rows (K > 1024) run K in ranges of KC: a block's
  // activation and weight rows then stay in the L1 cache through a pass (measured 0.85x
  // oneDNN's time for 512 rows of K = 1536 in one range).
  const int64_t KC = K > 1024 ? 512 : K;
  pieces_for((N + NB - 1) / NB, [&](int64_t b0, int64_t b1) {
    const int64_t prow = (b1 - b0) * NB;  // weight rows of this piece
    thread_local std::vector<float> part;
    for (int64_t t0 = 0; t0 < M; t0 += MT) {
      const int64_t t1 = std::min(M, t0 + MT), n = t1 - t0;
      const int64_t kc = n > 8 ? KC : K;
      if (kc < K && int64_t(part.size()) < n * prow * 8) part.resize(n * prow * 8);
      // Up to 8 rows (decode batches, verifications) in one pass over the weights while their
      // x rows fit the L1 cache beside the weight rows (24 KiB: 8 rows of K = 576, 4 of 1536;
      // measured 14.6 against 18.7 GB/s for 8 rows of 1536 in one pass); more rows in passes
      // of at most 4 (fewer loads per FMA). Passes as even as can be (5 rows: 3 + 2).
      const int64_t most = n <= 8 ? std::clamp<int64_t>(6144 / K, 4, 8) : 4;
      const int64_t passes = (n + most - 1) / most, base = n / passes;
      for (int64_t k0 = 0; k0 < K; k0 += kc) {
        const int64_t k1 = std::min(K, k0 + kc);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t n0 = b * NB, nrows = std::min(NB, N - n0);
          // the first pass over a block prefetches the next one
          const bool ahead = t0 == 0 && nrows == NB && n0 + 2 * NB <= N;
          for (int64_t p = 0, m0 = t0; p < passes; ++p) {
            const int64_t rows = base + (p < n % passes ? 1 : 0);
            const KRange r{k0, k1,
                           kc < K ? part.data() + ((m0 - t0) * prow + (n0 - b0 * NB)) * 8 : nullptr,
                           prow};
            f32_pass(rows, xp + m0 * K, K, wp + n0 * K, nrows,
                     ahead && m0 == 0 ? wp + (n0 + NB) * K : nullptr, yp + m0 * N + n0, N, r);
            m0 += rows;
          }
        }
      }
    }
  });
  return d.y;
}

}  // namespace llamarun
