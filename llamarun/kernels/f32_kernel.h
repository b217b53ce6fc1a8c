// The float32 kernel's code, written once for both vector widths: f32.cpp includes this file
// twice, in namespace avx2 and in namespace avx512, each time after defining
//   F32_TARGET  the target attribute of every function here, and
//   V           the vector operations (vec, mask, L lanes, zero, load, below, fma, store, hsum)
//               and ACC, the accumulators a block keeps in registers (12 of AVX2's 16, 24 of
//               AVX-512's 32).
// No include guard, on purpose. Every y[m, n] is L lane sums over k = lane, lane + L, ...
// (fused multiply-adds in k order; the last partial chunk loaded with zeros past K), then V's
// fixed L-to-1 tree: one instruction sequence whatever M is.

// The loads of a k step: whole vectors, or the lanes below K (zeros past it).
struct Plain {
  F32_TARGET typename V::vec operator()(const float* p) const { return V::load(p); }
};
struct Masked {
  typename V::mask mask;
  F32_TARGET typename V::vec operator()(const float* p) const { return V::load(p, mask); }
};

// One k step of a block: acc[i][j] += x[i][k..k+L] * w[j][k..k+L]. The operand reused across
// the other's rows stays in registers with the accumulators: MR >= 4 holds NR weight vectors
// (AVX2: 3 for 4 rows, 2 for 5-6, 1 for 7-8; AVX-512 twice as many) and loads each row's x;
// MR < 4 holds its x vectors and loads each weight vector once (spilled accumulators made a
// one-row product compute-bound: measured 14 GB/s against 19 for a single sum chain on one
// core). Either way the same FMA per element.
template <int MR, int NR, typename Load>
F32_TARGET inline void f32_step(typename V::vec (&acc)[MR][NR], const float* x, int64_t ldx,
                                const float* const (&row)[NR], int64_t k, Load&& load) {
  using vec = typename V::vec;
  if constexpr (MR >= 4) {
    vec wv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) wv[j] = load(row[j] + k);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const vec xv = load(x + i * ldx + k);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] = V::fma(xv, wv[j], acc[i][j]);
    }
  } else {
    vec xv[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) xv[i] = load(x + i * ldx + k);
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      const vec wv = load(row[j] + k);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][j] = V::fma(xv[i], wv, acc[i][j]);
    }
  }
}

// Which part of K a block call runs: [k0, k1). A call that starts past 0 resumes each element's
// L lane sums from `part` (L floats per element, element (i, j) at part + (i * ldp + j) * L),
// and one that ends before K leaves them there: the same FMAs in the same order as in one call.
struct KRange {
  int64_t k0, k1;
  float* part;
  int64_t ldp;
};

// MR activation rows x NR weight rows (rows past nrows repeat the last; not stored).
template <int MR, int NR>
F32_TARGET void f32_block(const float* x, int64_t ldx, const float* w, int64_t nrows, int64_t K,
                          const float* next /* rows to prefetch, or null */, float* y,
                          int64_t ldy, const KRange& r) {
  static_assert(MR * NR <= V::ACC, "accumulators in registers");
  constexpr int64_t L = V::L;
  const float* row[NR];
#pragma GCC unroll 16
  for (int j = 0; j < NR; ++j) row[j] = w + std::min<int64_t>(j, nrows - 1) * K;
  typename V::vec acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j)
      acc[i][j] = r.k0 == 0 ? V::zero() : V::load(r.part + (i * r.ldp + j) * L);
  int64_t k = r.k0;
  for (; k + L <= r.k1; k += L) {
    if (next != nullptr)  // short interleaved row streams: the hardware prefetcher lags
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) _mm_prefetch((const char*)(next + j * K + k), _MM_HINT_T0);
    f32_step<MR, NR>(acc, x, ldx, row, k, Plain{});
  }
  if (k < r.k1) {  // masked loads give zeros past K (only the last range has a partial chunk)
    f32_step<MR, NR>(acc, x, ldx, row, k, Masked{V::below(r.k1 - k)});
  }
  if (r.k1 < K) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) V::store(r.part + (i * r.ldp + j) * L, acc[i][j]);
    return;
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j)
      if (j < nrows) y[i * ldy + j] = V::hsum(acc[i][j]);
}

// Weight rows a block of MR activation rows computes at once: the most that fit V::ACC
// accumulators and divide NB (AVX2: 12 for one row, 6, 4, 3, 2, 2, 1, 1 for 2-8; AVX-512: 12,
// 12, 6, 6, 4, 4, 3, 3). Passes of 4 rows make most of a prompt's: 6 weight rows a step halve
// the activation loads per FMA of AVX2's 3, which from the L2 cache had kept the 16-lane FMAs
// waiting (measured with 3: no faster than AVX2 at 512 rows).
constexpr int nr_of(int mr) {
  int nr = 12;
  while (nr * mr > V::ACC || 12 % nr != 0) --nr;
  return nr;
}
template <int MR>
constexpr int NR_OF = nr_of(MR);

// One activation row over nrows weight rows, one row at a time, 4 vectors of a row a step (where
// `stream`: AMD CPUs' AVX-512 code, see kernels.h's ROW_STREAM): per output f32_block<1, NR>'s
// fused multiply-adds in its order, over the whole of K.
F32_TARGET void f32_row(const float* x, const float* w, int64_t nrows, int64_t K, float* y) {
  constexpr int64_t L = V::L;
  for (int64_t j = 0; j < nrows; ++j) {
    const float* row = w + j * K;
    typename V::vec acc = V::zero();
    int64_t k = 0;
    for (; k + 4 * L <= K; k += 4 * L)
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) acc = V::fma(V::load(x + k + u * L), V::load(row + k + u * L), acc);
    for (; k + L <= K; k += L) acc = V::fma(V::load(x + k), V::load(row + k), acc);
    if (k < K) {
      const typename V::mask mask = V::below(K - k);
      acc = V::fma(V::load(x + k, mask), V::load(row + k, mask), acc);
    }
    y[j] = V::hsum(acc);
  }
}

// mrows (1..8) activation rows over one block of nrows (1..NB) weight rows, 8 or more
// accumulators (the FMA's latency times its throughput needs 8 or more in flight). One row
// streams all 12 weight rows at once (memory requests in flight: it gains nothing from
// prefetching); more rows share each weight load, and prefetch the next block.
inline void f32_pass(int64_t mrows, const float* x, int64_t K, const float* w, int64_t nrows,
                     const float* next, float* y, int64_t ldy, const KRange& r, bool stream) {
  static_assert(NB == 12, "blocks of 12 weight rows");
  if (mrows == 1 && stream && r.k0 == 0 && r.k1 == K) return f32_row(x, w, nrows, K, y);
  if (mrows == 1) return f32_block<1, 12>(x, K, w, nrows, K, nullptr, y, ldy, r);
  constexpr int nrs[9] = {0, 12, NR_OF<2>, NR_OF<3>, NR_OF<4>, NR_OF<5>, NR_OF<6>, NR_OF<7>, NR_OF<8>};
  const int64_t nr = nrs[std::min<int64_t>(mrows, 8)];
  for (int64_t j0 = 0; j0 < nrows; j0 += nr) {
    const float* wj = w + j0 * K;
    const float* nj = next != nullptr ? next + j0 * K : nullptr;
    const int64_t left = nrows - j0;
    const KRange rj{r.k0, r.k1, r.part != nullptr ? r.part + j0 * V::L : nullptr, r.ldp};
    switch (mrows) {
      case 2: f32_block<2, NR_OF<2>>(x, K, wj, left, K, nj, y + j0, ldy, rj); break;
      case 3: f32_block<3, NR_OF<3>>(x, K, wj, left, K, nj, y + j0, ldy, rj); break;
      case 4: f32_block<4, NR_OF<4>>(x, K, wj, left, K, nj, y + j0, ldy, rj); break;
      case 5: f32_block<5, NR_OF<5>>(x, K, wj, left, K, nj, y + j0, ldy, rj); break;
      case 6: f32_block<6, NR_OF<6>>(x, K, wj, left, K, nj, y + j0, ldy, rj); break;
      case 7: f32_block<7, NR_OF<7>>(x, K, wj, left, K, nj, y + j0, ldy, rj); break;
      default: f32_block<8, NR_OF<8>>(x, K, wj, left, K, nj, y + j0, ldy, rj); break;
    }
  }
}

// y (M, N) = x (M, K) @ w (N, K)^T, all float32, y preallocated.
inline void f32_product(const float* xp, const float* wp, float* yp, int64_t M, int64_t K,
                        int64_t N, bool stream) {
  constexpr int64_t L = V::L;
  // Passes of more than 8 rows over long rows (K > 1024) run K in ranges of KC: a block's
  // activation and weight rows then stay in the L1 cache through a pass (measured 0.85x
  // oneDNN's time for 512 rows of K = 1536 in one range, AVX2).
  const int64_t KC = K > 1024 ? 512 : K;
  static_assert(512 % L == 0, "ranges of whole vectors");
  // Passes of more than MT rows (prompts) run a piece's blocks in groups of about GROUP bytes
  // of weights, each group kept in the L2 cache while every tile of MT rows passes over it
  // (before, each tile streamed the whole piece from memory again).
  const int64_t group = M > MT ? std::max<int64_t>(1, GROUP / (NB * K * 4)) : N;
  llamarun::blocks_for((N + NB - 1) / NB, N * K * 4, [&](int64_t p0, int64_t p1) {
    thread_local std::vector<float> part;
    for (int64_t b0 = p0; b0 < p1; b0 += group) {
      const int64_t b1 = std::min(p1, b0 + group);
      const int64_t prow = (b1 - b0) * NB;  // weight rows of this group
      for (int64_t t0 = 0; t0 < M; t0 += MT) {
        const int64_t t1 = std::min(M, t0 + MT), n = t1 - t0;
        const int64_t kc = n > 8 ? KC : K;
        if (kc < K && int64_t(part.size()) < n * prow * L) part.resize(n * prow * L);
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
              const KRange r{
                  k0, k1,
                  kc < K ? part.data() + ((m0 - t0) * prow + (n0 - b0 * NB)) * L : nullptr,
                  prow};
              f32_pass(rows, xp + m0 * K, K, wp + n0 * K, nrows,
                       ahead && m0 == 0 ? wp + (n0 + NB) * K : nullptr, yp + m0 * N + n0, N, r,
                       stream);
              m0 += rows;
            }
          }
        }
      }
    }
  });
}
