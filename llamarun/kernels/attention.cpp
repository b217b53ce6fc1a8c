// Attention of packed tokens over their own cache rows on x86 CPUs (AVX2 + FMA; the scores and
// the values' sums 16 lanes wide where the CPU has AVX-512, see block_scores16): every token t
// of a pass (decode rows, verifications, prompt chunks, whole prompts) attends positions
// 0..pos[t] of cache row rows[t], one call for all the pass's rows and heads. (Against one
// masked SDPA call per row it measured 1.0-1.3x SDPA's time for prompts of 512 and 2,048
// tokens and 1.3-1.7x for a 512-token chunk at position 1,536, AMD EPYC, before the work
// below. On an Intel Xeon, 2 threads, old and new alternating in one process, SmolLM2's heads:
// a 512-token prompt 5.1 -> 2.8 ms a layer, 2,048 tokens 108 -> 41, one decode row at 1,700
// 0.058 -> 0.052; float32 SDPA took 2.4 ms for the 512 tokens. What did it: the values' sums
// kept in registers, the scores 8 keys at a time, the heads of a GQA group sharing each block
// of keys and values, and each thread's tokens reading one key/value head at a time. Then
// keys past 1,024 in parts of their own (CHUNK), which a decode row's threads share: SmolLM2's
// heads, one decode row, same machine, medians of 7 over 30 layers' caches: 0.33 -> 0.28 ms a
// layer at 3,000 keys, 0.97 -> 0.56 at 6,000, the same at 1,000 and below; a 512-token chunk
// at 1,536 and a 2,048-token prompt 2-4% slower.)
//
// Row invariance: each (token, head) is computed alone, by the same instructions whatever else
// the pass holds (its scores 8 keys at a time with the tail one at a time by the same dot
// product, its softmax over each part of its keys, the parts combined in order, its values
// summed in position order), so a token's result depends only on its query and its row's
// past, bit for bit. (One SDPA call
// over padded rows does not: its result changes in the last bits with the padded length.)

#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// exp(x) for x <= 0 (exp_in_range), 0 below -87 (where float's exp is denormal or 0).
LLAMARUN_AVX2 inline __m256 exp_nonpositive(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.f);
  const __m256 under = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
  x = _mm256_max_ps(x, low);
  return _mm256_andnot_ps(under, exp_in_range(x));
}

// q . k over D values (D a multiple of 8; k float32, or bfloat16 widened as it is read): one
// accumulator, chunks in order.
template <typename CT>
LLAMARUN_AVX2 inline float dot(const float* q, const CT* k, int64_t D) {
  __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q), load8(k));
  for (int64_t d = 8; d < D; d += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), acc);
  return hsum8(acc);
}

// hsum8 of eight vectors at once: r[j] = hsum8(a[j]), by the same additions in the same order
// (lower half + upper half; then lanes 0 + 2 and 1 + 3; then those two), done for the eight
// sums together instead of one by one.
LLAMARUN_AVX2 inline __m256 hsum8x8(const __m256 (&a)[8]) {
  __m256 h[4];  // h[j]: [halves' sums of a[j] | of a[j + 4]]
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j)
    h[j] = _mm256_add_ps(_mm256_permute2f128_ps(a[j], a[j + 4], 0x20),
                         _mm256_permute2f128_ps(a[j], a[j + 4], 0x31));
  // [0 + 2, 1 + 3 of a[j], of a[j + 1] | of a[j + 4], of a[j + 5]], j = 0 and 2
  const __m256 p = _mm256_add_ps(_mm256_shuffle_ps(h[0], h[1], 0x44),
                                 _mm256_shuffle_ps(h[0], h[1], 0xEE));
  const __m256 r = _mm256_add_ps(_mm256_shuffle_ps(h[2], h[3], 0x44),
                                 _mm256_shuffle_ps(h[2], h[3], 0xEE));
  return _mm256_add_ps(_mm256_shuffle_ps(p, r, 0x88), _mm256_shuffle_ps(p, r, 0xDD));
}

// Eight keys at once (independent chains, more work in flight); each result is what dot gives.
template <typename CT>
LLAMARUN_AVX2 inline void dot8(const float* q, const CT* k, int64_t ldk, int64_t D,
                               float* out) {
  __m256 a[8];
  __m256 qv = _mm256_loadu_ps(q);
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) a[j] = _mm256_mul_ps(qv, load8(k + j * ldk));
  for (int64_t d = 8; d < D; d += 8) {
    qv = _mm256_loadu_ps(q + d);
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j)
      a[j] = _mm256_fmadd_ps(qv, load8(k + j * ldk + d), a[j]);
  }
  _mm256_storeu_ps(out, hsum8x8(a));
}

// acc (8 N values) += sum over t in [t0, t1) of p[t] v[t] (rows ld apart), in position order,
// the sums kept in registers through the range (N is known when compiling: a loop bound known
// only at run time had kept them in memory, each add waiting on a store, 3x slower).
template <int N, typename CT>
LLAMARUN_AVX2 inline void weigh_values(const float* p, const CT* v, int64_t ld, int64_t t0,
                                       int64_t t1, float* acc) {
  __m256 a[N];
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) a[i] = _mm256_loadu_ps(acc + 8 * i);
  for (int64_t t = t0; t < t1; ++t) {
    const __m256 pt = _mm256_set1_ps(p[t]);
    const CT* vt = v + t * ld;
#pragma GCC unroll 8
    for (int i = 0; i < N; ++i) a[i] = _mm256_fmadd_ps(pt, load8(vt + 8 * i), a[i]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) _mm256_storeu_ps(acc + 8 * i, a[i]);
}

// weigh_values over all D values of the rows (a multiple of 8), 64 at a time.
template <typename CT>
LLAMARUN_AVX2 inline void weigh_rows(const float* p, const CT* v, int64_t ld, int64_t D,
                                     int64_t t0, int64_t t1, float* acc) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) weigh_values<8, CT>(p, v + d0, ld, t0, t1, acc + d0);
  switch ((D - d0) / 8) {  // what is left of D: 8 to 56 values
    case 1: weigh_values<1, CT>(p, v + d0, ld, t0, t1, acc + d0); break;
    case 2: weigh_values<2, CT>(p, v + d0, ld, t0, t1, acc + d0); break;
    case 3: weigh_values<3, CT>(p, v + d0, ld, t0, t1, acc + d0); break;
    case 4: weigh_values<4, CT>(p, v + d0, ld, t0, t1, acc + d0); break;
    case 5: weigh_values<5, CT>(p, v + d0, ld, t0, t1, acc + d0); break;
    case 6: weigh_values<6, CT>(p, v + d0, ld, t0, t1, acc + d0); break;
    case 7: weigh_values<7, CT>(p, v + d0, ld, t0, t1, acc + d0); break;
    default: break;
  }
}

// The scores of a block of n keys (rows kld apart) for G heads (q rows D apart) into s (head g's
// at s + g * L8): 8 keys at a time by dot8, the tail by dot (the same sums).
template <typename CT>
LLAMARUN_AVX2 void block_scores(const float* q, int64_t G, int64_t D, const CT* kb, int64_t kld,
                                int64_t n, float* s, int64_t L8) {
  int64_t t = 0;
  for (; t + 8 <= n; t += 8)
    for (int64_t g = 0; g < G; ++g) dot8(q + g * D, kb + t * kld, kld, D, s + g * L8 + t);
  for (; t < n; ++t)
    for (int64_t g = 0; g < G; ++g) s[g * L8 + t] = dot(q + g * D, kb + t * kld, D);
}

// The same with AVX-512 (16 lanes: half the multiply-adds and widenings a key; the sums' order
// differs from the 8-lane code's, so a CPU's scores are always the one width's: attention_width).
#define LLAMARUN_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))

// 16 values -> float32 (from bfloat16: its bits in the upper half), or 8 of them and 8 zeros.
LLAMARUN_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
LLAMARUN_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256((const __m256i*)p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <typename T>
LLAMARUN_AVX512 inline __m512 load8_of16(const T* p) {
  return _mm512_zextps256_ps512(load8(p));
}

// A 16-lane sum: its halves added, then hsum8's tree.
LLAMARUN_AVX512 inline __m256 halves(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v),
                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

// q . k over D values (a multiple of 8): chunks of 16 in order, a last 8 zero-padded.
template <typename CT>
LLAMARUN_AVX512 inline float dot16(const float* q, const CT* k, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(load16(q + d), load16(k + d), acc);
  if (d < D) acc = _mm512_fmadd_ps(load8_of16(q + d), load8_of16(k + d), acc);
  return hsum8(halves(acc));
}

// Eight keys at once; each result is what dot16 gives.
template <typename CT>
LLAMARUN_AVX512 inline void dot8x16(const float* q, const CT* k, int64_t ldk, int64_t D,
                                    float* out) {
  __m512 a[8];
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) a[j] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m512 qv = load16(q + d);
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) a[j] = _mm512_fmadd_ps(qv, load16(k + j * ldk + d), a[j]);
  }
  if (d < D) {
    const __m512 qv = load8_of16(q + d);
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) a[j] = _mm512_fmadd_ps(qv, load8_of16(k + j * ldk + d), a[j]);
  }
  __m256 h[8];
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) h[j] = halves(a[j]);
  _mm256_storeu_ps(out, hsum8x8(h));
}

template <typename CT>
LLAMARUN_AVX512 void block_scores16(const float* q, int64_t G, int64_t D, const CT* kb,
                                    int64_t kld, int64_t n, float* s, int64_t L8) {
  int64_t t = 0;
  for (; t + 8 <= n; t += 8)
    for (int64_t g = 0; g < G; ++g) dot8x16(q + g * D, kb + t * kld, kld, D, s + g * L8 + t);
  for (; t < n; ++t)
    for (int64_t g = 0; g < G; ++g) s[g * L8 + t] = dot16(q + g * D, kb + t * kld, D);
}

// acc (D values, a multiple of 8) += sum over t in [t0, t1) of p[t] v[t] (rows ld apart), in
// position order, 16 lanes at a time: each value's multiply-adds are weigh_values' (the same
// bits); N vectors of 16 and, with HALF, 8 values more, kept in registers through the range.
template <int N, bool HALF, typename CT>
LLAMARUN_AVX512 inline void weigh_values16(const float* p, const CT* v, int64_t ld, int64_t t0,
                                           int64_t t1, float* acc) {
  __m512 a[N > 0 ? N : 1];
  __m256 b = HALF ? _mm256_loadu_ps(acc + 16 * N) : _mm256_setzero_ps();
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) a[i] = _mm512_loadu_ps(acc + 16 * i);
  for (int64_t t = t0; t < t1; ++t) {
    const CT* vt = v + t * ld;
#pragma GCC unroll 8
    for (int i = 0; i < N; ++i)
      a[i] = _mm512_fmadd_ps(_mm512_set1_ps(p[t]), load16(vt + 16 * i), a[i]);
    if constexpr (HALF) b = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), load8(vt + 16 * N), b);
  }
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) _mm512_storeu_ps(acc + 16 * i, a[i]);
  if constexpr (HALF) _mm256_storeu_ps(acc + 16 * N, b);
}

template <typename CT>
LLAMARUN_AVX512 void weigh_rows16(const float* p, const CT* v, int64_t ld, int64_t D,
                                  int64_t t0, int64_t t1, float* acc) {
  int64_t d0 = 0;
  for (; d0 + 128 <= D; d0 += 128) weigh_values16<8, false>(p, v + d0, ld, t0, t1, acc + d0);
  switch ((D - d0) / 8) {  // what is left of D: 8 to 120 values
#define LLAMARUN_WEIGH(n8) \
    case n8: weigh_values16<n8 / 2, n8 % 2 == 1>(p, v + d0, ld, t0, t1, acc + d0); break;
    LLAMARUN_WEIGH(1) LLAMARUN_WEIGH(2) LLAMARUN_WEIGH(3) LLAMARUN_WEIGH(4) LLAMARUN_WEIGH(5)
    LLAMARUN_WEIGH(6) LLAMARUN_WEIGH(7) LLAMARUN_WEIGH(8) LLAMARUN_WEIGH(9) LLAMARUN_WEIGH(10)
    LLAMARUN_WEIGH(11) LLAMARUN_WEIGH(12) LLAMARUN_WEIGH(13) LLAMARUN_WEIGH(14)
    LLAMARUN_WEIGH(15)
#undef LLAMARUN_WEIGH
    default: break;
  }
}

// The attention's lanes: 16 where the CPU has AVX-512, else 8 (attention_lanes sets them).
bool wide_supported() { return __builtin_cpu_supports("avx512f"); }
std::atomic<int64_t> attention_width{wide_supported() ? 16 : 8};

// s (L scores, room for L rounded up to 8) becomes exp(scale (s - max s)); returns their sum
// and sets m to max s. The scale is applied once, after the max (scale > 0).
LLAMARUN_AVX2 float softmax_weights(float* s, int64_t L, float scale, float& max_score) {
  const int64_t L8 = (L + 7) / 8 * 8;
  std::fill(s + L, s + L8, -std::numeric_limits<float>::infinity());
  __m256 mv = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < L8; t += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + t));
  float m8[8];
  _mm256_storeu_ps(m8, mv);
  const float m = max_score = *std::max_element(m8, m8 + 8);
  const __m256 sc = _mm256_set1_ps(scale), mx = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t t = 0; t < L8; t += 8) {
    const __m256 p = exp_nonpositive(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + t), mx), sc));
    _mm256_storeu_ps(s + t, p);
    sum = _mm256_add_ps(sum, p);
  }
  return hsum8(sum);
}

// The G query heads of one token that read the same key/value head (a GQA group; rows of q
// D apart) over L keys and values (rows ld apart; a part of the token's positions, see
// CHUNK): for each head g, m[g] = its largest score q . k, sum[g] = the sum over the keys of
// exp(scale (q . k - m[g])) and acc[g] (D values) = the sum of those weights times the values.
// Each head is computed alone: its scores (8 keys at a time, the tail one at a time, by the
// same dot product), its weights over the part, its values summed in position order, so a
// head's result depends only on its query and the keys and values, bit for bit. The heads
// share the reading: keys and values go by in blocks that every head of the group uses while
// they are in the L1 cache (read once from the L2 cache, not G times). A bfloat16 cache's
// blocks are widened to float32 once (into kf: room for a block of keys or values, `block`
// rows of D), then read as a float32 cache's are. s is scratch for G L8 floats.
inline int64_t key_block(int64_t D) { return std::max<int64_t>(8, 2048 / D); }  // 8 KiB of float32

// n rows of D bfloat16 values (ld apart) -> float32 rows D apart.
LLAMARUN_AVX2 inline void widen_rows(const c10::BFloat16* x, int64_t ld, int64_t n, int64_t D,
                                     float* out) {
  for (int64_t r = 0; r < n; ++r) load_bf16(x + r * ld, D, out + r * D);
}

template <typename CT>
LLAMARUN_AVX2 void attend_part(const float* q, int64_t G, const CT* k, const CT* v, int64_t ld,
                               int64_t L, int64_t D, float scale, float* s, float* kf,
                               float* acc, float* m, float* sum) {
  const int64_t L8 = (L + 7) / 8 * 8, block = key_block(D);
  // a bfloat16 block widened once where several heads read it; one head reads it as it goes
  // (the same float32 values either way: the same bits)
  constexpr bool wide = std::is_same_v<CT, float>;
  const bool direct = wide || G == 1;
  const bool lanes16 = attention_width.load(std::memory_order_relaxed) == 16;
  // acc += the weighted values of rows [t0, t1) (rows ld apart): 16 lanes or 8, the same bits
  const auto weigh = [&](const float* p, const auto* vb, int64_t vld, int64_t t0, int64_t t1,
                         float* out) {
    if (lanes16)
      weigh_rows16(p, vb, vld, D, t0, t1, out);
    else
      weigh_rows(p, vb, vld, D, t0, t1, out);
  };
  for (int64_t t0 = 0; t0 < L; t0 += block) {
    const int64_t n = std::min(block, L - t0);
    auto scores = [&](const auto* kb, int64_t kld) {  // the block's keys, rows kld apart
      if (lanes16)
        block_scores16(q, G, D, kb, kld, n, s + t0, L8);
      else
        block_scores(q, G, D, kb, kld, n, s + t0, L8);
    };
    if constexpr (!wide) {
      if (!direct) {
        widen_rows(k + t0 * ld, ld, n, D, kf);
        scores(static_cast<const float*>(kf), D);
        continue;
      }
    }
    scores(k + t0 * ld, ld);
  }
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t g = 0; g < G; ++g) sum[g] = softmax_weights(s + g * L8, L, scale, m[g]);
  for (int64_t t0 = 0; t0 < L; t0 += block) {
    const int64_t t1 = std::min(L, t0 + block);
    if constexpr (!wide) {
      if (!direct) {
        widen_rows(v + t0 * ld, ld, t1 - t0, D, kf);
        for (int64_t g = 0; g < G; ++g)
          weigh(s + g * L8 + t0, static_cast<const float*>(kf), D, 0, t1 - t0, acc + g * D);
        continue;
      }
    }
    for (int64_t g = 0; g < G; ++g) weigh(s + g * L8, v, ld, t0, t1, acc + g * D);
  }
}

// out[g] (D values) = acc[g] / sum[g] for G heads.
LLAMARUN_AVX2 void normalize(const float* acc, const float* sum, int64_t G, int64_t D,
                             float* out) {
  for (int64_t g = 0; g < G; ++g) {
    const __m256 iv = _mm256_set1_ps(1.f / sum[g]);
    for (int64_t d = 0; d < D; d += 8)
      _mm256_storeu_ps(out + g * D + d, _mm256_mul_ps(_mm256_loadu_ps(acc + g * D + d), iv));
  }
}

// A token's positions go in parts of CHUNK keys (the last shorter), each weighed against its
// own largest score (attend_part), and the parts combined in order (combine_parts). The parts
// are the same whatever the pass holds, so a token's result still depends only on its query
// and its row's past; where few tokens share a pass (a decode row) the parts of one token go
// to different threads, every head of a group reading each key once. A token of up to CHUNK
// keys is one part: its numbers are those of a plain softmax. (Measured: see this file's head.)
constexpr int64_t CHUNK = 1024;

// The floats of one part's partial results of G heads: acc (G D), then m (G), then sum (G).
inline int64_t part_floats(int64_t G, int64_t D) { return G * (D + 2); }

// The partial results of G heads over n parts (stride floats apart, each laid out as
// part_floats says) combined in order into out (G heads of D values): out[g] =
// sum_c w_c acc_c[g] / sum_c w_c sum_c[g], w_c = exp(scale (m_c[g] - max_c m_c[g])). acc is
// scratch for D floats.
LLAMARUN_AVX2 void combine_parts(const float* parts, int64_t n, int64_t stride, int64_t G,
                                 int64_t D, float scale, float* acc, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < n; ++c) top = std::max(top, parts[c * stride + G * D + g]);
    float total = 0.f;
    std::fill(acc, acc + D, 0.f);
    for (int64_t c = 0; c < n; ++c) {
      const float* part = parts + c * stride;
      const float w = std::exp(scale * (part[G * D + g] - top));
      total = std::fma(w, part[G * D + G + g], total);
      const __m256 wv = _mm256_set1_ps(w);
      for (int64_t d = 0; d < D; d += 8)
        _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(wv, _mm256_loadu_ps(part + g * D + d),
                                                  _mm256_loadu_ps(acc + d)));
    }
    normalize(acc, &total, 1, D, out + g * D);
  }
}

// The G heads of one token (as attend_part) over all its L keys and values, into out: one part
// (L <= CHUNK) normalized at once, else every part into `parts` (room for ceil(L / CHUNK) of
// part_floats(G, D)) and combined. s is scratch for G CHUNK floats, kf for a block of D-value
// rows, acc for G D.
template <typename CT>
LLAMARUN_AVX2 void attend_group(const float* q, int64_t G, const CT* k, const CT* v, int64_t ld,
                                int64_t L, int64_t D, float scale, float* s, float* kf,
                                float* acc, std::vector<float>& parts, float* out) {
  float m[64], sum[64];  // G is at most 64 (attend caps it)
  if (L <= CHUNK) {
    attend_part(q, G, k, v, ld, L, D, scale, s, kf, acc, m, sum);
    normalize(acc, sum, G, D, out);
    return;
  }
  const int64_t n = (L + CHUNK - 1) / CHUNK, stride = part_floats(G, D);
  parts.resize(n * stride);
  for (int64_t c = 0; c < n; ++c) {
    float* part = parts.data() + c * stride;
    const int64_t t0 = c * CHUNK;
    attend_part(q, G, k + t0 * ld, v + t0 * ld, ld, std::min(CHUNK, L - t0), D, scale, s, kf,
                part, part + G * D, part + G * D + G);
  }
  combine_parts(parts.data(), n, stride, G, D, scale, acc, out);
}

// One head of D values rotated pairwise: (x0, x1) -> (x0 c - x1 s, x1 c + x0 s) with (c, s)
// the pair's entry of f (D / 2 pairs). Two products and one add or subtract a value, as
// PyTorch's rope (rope.apply_rope) computes it in float32: the same bits, bfloat16 heads
// included (read as float32; the result stays float32, as the model asks apply_rope for).
template <typename InT, typename OutT>
LLAMARUN_AVX2 void rotate_head(const InT* x, const float* f, int64_t D, OutT* out) {
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 v = load8(x + d);
    const __m256 cs = _mm256_loadu_ps(f + d);  // c0 s0 c1 s1 ...
    const __m256 a = _mm256_mul_ps(v, _mm256_moveldup_ps(cs));                     // x c
    const __m256 b = _mm256_mul_ps(_mm256_permute_ps(v, 0xB1), _mm256_movehdup_ps(cs));  // x' s
    store8(out + d, _mm256_addsub_ps(a, b));  // even: x0 c - x1 s, odd: x1 c + x0 s
  }
}

template <typename InT, typename OutT>
LLAMARUN_AVX2 void copy_head(const InT* x, int64_t D, OutT* out) {
  for (int64_t d = 0; d < D; d += 8) store8(out + d, load8(x + d));
}

// t itself where it is contiguous, else a contiguous copy kept in `keep`: no new reference to
// t (the threads of a team share these tensors, and each new reference is an atomic add on a
// count both threads write: 6% of SmolLM2's decode thread before).
const torch::Tensor& contiguous_ref(const torch::Tensor& t, torch::Tensor& keep) {
  if (t.is_contiguous()) return t;
  keep = t.contiguous();
  return keep;
}

// rows and pos (T,) int64, checked against R cache rows of S positions ("<op>: rows and pos",
// "<op>: row or position"): their data (contiguous_ref's, kept in keep_r and keep_p).
std::pair<const int64_t*, const int64_t*> checked_rows_pos(
    const torch::Tensor& rows, const torch::Tensor& pos, int64_t T, int64_t R, int64_t S,
    const char* op, torch::Tensor& keep_r, torch::Tensor& keep_p) {
  TORCH_CHECK(rows.numel() == T && pos.numel() == T && rows.scalar_type() == at::kLong &&
                  pos.scalar_type() == at::kLong, op, ": rows and pos");
  const int64_t* rp = contiguous_ref(rows, keep_r).data_ptr<int64_t>();
  const int64_t* pp = contiguous_ref(pos, keep_p).data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(rp[t] >= 0 && rp[t] < R && pp[t] >= 0 && pp[t] < S, op, ": row or position");
  return {rp, pp};
}

// rope_write's checks of qkv and freqs; returns T.
int64_t rope_checks(const torch::Tensor& qkv, const torch::Tensor& freqs, int64_t H,
                    int64_t KVH) {
  TORCH_CHECK(qkv.dim() == 2 && H > 0 && KVH > 0 && H % KVH == 0 &&
                  qkv.size(1) % (H + 2 * KVH) == 0, "rope: shapes");
  const int64_t T = qkv.size(0), D = qkv.size(1) / (H + 2 * KVH);
  TORCH_CHECK(D % 8 == 0, "rope: head size");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16,
              "rope: float32 or bfloat16 only");
  TORCH_CHECK(freqs.scalar_type() == at::kFloat && freqs.dim() == 3 && freqs.size(0) == T &&
                  freqs.size(1) * 2 == D && freqs.size(2) == 2, "rope: freqs");
  return T;
}

// rope_write's work on checked operands: token t of x (T rows of W values: its H query heads,
// KVH key heads, KVH value heads of D values) with f (T rows of D (cos, sin) values) -> its
// query heads rotated into q (T, H, D), its key heads rotated and its value heads copied into
// the caches (KVH rows of S positions of D values for each of R rows) at position pp[t] of row
// rp[t]. The units of work are a token's heads (a query head, or a key head with its value
// head), split between the threads (split_for: a prompt's tokens, in a team a decode row's
// heads too); each unit's values are the same whoever computes them.
template <typename InT, typename CT>
void rope_units(const InT* x, int64_t W, const float* f, int64_t T, int64_t H, int64_t KVH,
                int64_t D, const int64_t* rp, const int64_t* pp, int64_t S, float* q, CT* k,
                CT* v) {
  const int64_t U = H + KVH;
  llamarun::split_for(0, T * U, 64 * U, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t t = u / U, j = u % U;
      const InT* xt = x + t * W;
      const float* ft = f + t * D;
      if (j < H) {
        rotate_head(xt + j * D, ft, D, q + (t * H + j) * D);
        continue;
      }
      const int64_t h = j - H, entry = ((rp[t] * KVH + h) * S + pp[t]) * D;
      rotate_head(xt + (H + h) * D, ft, D, k + entry);
      copy_head(xt + (H + KVH + h) * D, D, v + entry);
    }
  });
}

// The work items of a pass's attention, (token, key/value head, part of its group, part of its
// keys), and which query heads each computes: attend_tokens' plan, and attend_prefetch's.
struct AttendItems {
  int64_t T, H, KVH, group, most, split, G, parts, slots;
  // For T tokens (their positions pp) of H query heads over KVH key/value heads.
  AttendItems(int64_t T_, int64_t H_, int64_t KVH_, const int64_t* pp)
      : T(T_), H(H_), KVH(KVH_), group(H_ / KVH_) {
    most = 1;  // the most parts (CHUNK keys) a token of the pass has
    for (int64_t t = 0; t < T; ++t) most = std::max(most, (pp[t] + CHUNK) / CHUNK);
    // Where the pass has too few tokens to keep every thread busy (a decode row), a token's
    // parts of keys go to items of their own (its heads sharing each key), and then, if still
    // too few, its groups are cut (one decode row of 3 key/value heads and 1,024 keys or fewer
    // on 2 threads).
    const int64_t busy = 4 * at::get_num_threads();
    // parts of keys a token's items take (in a team none: their combining needs a buffer shared
    // by the members)
    split = T * KVH < busy && llamarun::t_team == nullptr ? most : 1;
    G = std::min<int64_t>(group, 64);
    while (G > 1 && T * KVH * ((group + G - 1) / G) * split < busy) G = (G + 1) / 2;
    parts = (group + G - 1) / G;
    slots = T * parts * split;
  }
  int64_t count() const { return KVH * slots; }
  // (token, key/value head, first query head, query heads) of item i
  void locate(int64_t i, int64_t& t, int64_t& kvh, int64_t& h0, int64_t& g) const {
    // Items by key/value head, so that a thread's run of them reads one head's keys and
    // values (a long prompt's heads together outgrow the L2 cache), and within a head by
    // tokens from both ends in turn (t = 0, T - 1, 1, T - 2, ...: a prompt's later tokens
    // attend longer), so that both threads' halves are about as long.
    kvh = i / slots;
    const int64_t j = i % slots / (parts * split);
    t = j % 2 == 0 ? j / 2 : T - 1 - j / 2;
    h0 = kvh * group + i % (parts * split) / split * G;
    g = std::min(G, (kvh + 1) * group - h0);
  }
};

// attend's work on checked operands (caches of float32 or bfloat16 CT; see attend).
template <typename CT>
void attend_tokens(const float* qp, const CT* kp, const CT* vp, const int64_t* rp,
                   const int64_t* pp, int64_t T, int64_t H, int64_t D, int64_t KVH, int64_t S,
                   float scale, float* op) {
  const AttendItems items(T, H, KVH, pp);
  const int64_t split = items.split, G = items.G, slots = items.slots, most = items.most;
  const int64_t stride = part_floats(G, D);
  // split > 1: the partial results of each item's part of keys, combined after
  float* partial = llamarun::scratch<float, struct AttendParts>(
      split > 1 ? T * KVH * items.parts * split * stride : 0);
  llamarun::split_for(0, items.count(), 1, [&](int64_t i0, int64_t i1) {
    float* s = llamarun::scratch<float, struct AttendScores>(G * std::min<int64_t>(CHUNK, S + 7));
    float* acc = llamarun::scratch<float, struct AttendSums>(G * D);
    float* kf = llamarun::scratch<float, struct AttendRows>(
        std::is_same_v<CT, float> ? 0 : key_block(D) * D);
    std::vector<float> own;  // (a token of more than CHUNK keys, its parts not split)
    for (int64_t i = i0; i < i1; ++i) {
      int64_t t, kvh, h0, g;
      items.locate(i, t, kvh, h0, g);
      const int64_t L = pp[t] + 1, base = (rp[t] * KVH + kvh) * S * D;
      const float* qh = qp + (t * H + h0) * D;
      if (split == 1 || L <= CHUNK) {  // the whole token (its one item when split)
        if (i % split == 0)
          attend_group(qh, g, kp + base, vp + base, D, L, D, scale, s, kf, acc, own,
                       op + (t * H + h0) * D);
        continue;
      }
      const int64_t t0 = i % split * CHUNK;
      if (t0 >= L) continue;  // this token has fewer parts
      float* part = partial + i * stride;
      attend_part(qh, g, kp + base + t0 * D, vp + base + t0 * D, D, std::min(CHUNK, L - t0), D,
                  scale, s, kf, part, part + g * D, part + g * D + g);
    }
  });
  if (split > 1 && most > 1) {  // combine the parts of tokens of more than CHUNK keys
    at::parallel_for(0, KVH * slots / split, 1, [&](int64_t i0, int64_t i1) {
      float* acc = llamarun::scratch<float, struct AttendSums>(D);
      for (int64_t i = i0; i < i1; ++i) {
        int64_t t, kvh, h0, g;
        items.locate(i * split, t, kvh, h0, g);
        const int64_t L = pp[t] + 1;
        if (L > CHUNK)
          combine_parts(partial + i * split * stride, (L + CHUNK - 1) / CHUNK, stride, g,
                        D, scale, acc, op + (t * H + h0) * D);
      }
    });
  }
}

}  // namespace

namespace llamarun {

// qkv (T, (H + 2 KVH) D) float32 or bfloat16, each token's query, key and value heads in a row;
// freqs (T, D / 2, 2) float32, each token's (cos, sin) pairs; caches (R, KVH, S, D) float32 or
// bfloat16. Rotates the query and key heads pairwise (rope) in float32 (bfloat16 heads too, the
// result float32, as rope.apply_rope into float32 does), writes token t's key and value heads
// at position pos[t] of row rows[t] of the caches (rounded once into a bfloat16 cache, as
// .to(bfloat16) rounds) and writes its queries into q (T, H, D), float32, contiguous. Makes no
// new reference to any operand (as attend_to: a team's members call it together, each doing its
// share of the heads).
void rope_write_to(const torch::Tensor& qkv, const torch::Tensor& freqs,
                   const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                   const torch::Tensor& rows, const torch::Tensor& pos, int64_t H,
                   const torch::Tensor& q) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() &&
                  (k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16) &&
                  v_cache.scalar_type() == k_cache.scalar_type() &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(), "rope_write: caches");
  const int64_t R = k_cache.size(0), KVH = k_cache.size(1), S = k_cache.size(2);
  const int64_t T = rope_checks(qkv, freqs, H, KVH), D = qkv.size(1) / (H + 2 * KVH);
  TORCH_CHECK(k_cache.size(3) == D, "rope_write: head size");
  llamarun::check_output(q, {T, H, D}, at::kFloat, "rope_write");
  torch::Tensor keep_r, keep_p, keep_x, keep_f;
  const auto [rp, pp] = checked_rows_pos(rows, pos, T, R, S, "rope_write", keep_r, keep_p);
  const auto& xc = contiguous_ref(qkv, keep_x);
  const float* fp = contiguous_ref(freqs, keep_f).data_ptr<float>();
  float* qp = q.data_ptr<float>();
  const auto write = [&](const auto* xp) {
    if (k_cache.scalar_type() == at::kFloat)
      rope_units(xp, qkv.size(1), fp, T, H, KVH, D, rp, pp, S, qp, k_cache.data_ptr<float>(),
                 v_cache.data_ptr<float>());
    else
      rope_units(xp, qkv.size(1), fp, T, H, KVH, D, rp, pp, S, qp,
                 k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>());
  };
  if (xc.scalar_type() == at::kFloat)
    write(xc.data_ptr<float>());
  else
    write(xc.data_ptr<c10::BFloat16>());
}

// rope_write_to into a new q
torch::Tensor rope_write(const torch::Tensor& qkv, const torch::Tensor& freqs,
                         torch::Tensor& k_cache, torch::Tensor& v_cache,
                         const torch::Tensor& rows, const torch::Tensor& pos, int64_t H) {
  TORCH_CHECK(k_cache.dim() == 4, "rope_write: caches");
  const int64_t KVH = k_cache.size(1);
  const int64_t T = rope_checks(qkv, freqs, H, KVH), D = qkv.size(1) / (H + 2 * KVH);
  auto q = torch::empty({T, H, D}, qkv.options().dtype(at::kFloat));
  rope_write_to(qkv, freqs, k_cache, v_cache, rows, pos, H, q);
  return q;
}

int64_t attention_lanes(int64_t lanes) {
  TORCH_CHECK(lanes == 8 || (lanes == 16 && wide_supported()),
              "attention_lanes: 8, or 16 on a CPU with AVX-512");
  return attention_width.exchange(lanes);
}

bool attend_supported() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// q (T, H, D) float32; k, v (R, KVH, S, D) float32 or bfloat16 caches (computed in float32: a
// bfloat16 cache's values widened exactly; H a multiple of KVH, D of 8);
// rows, pos (T,) int64. Returns (T, H, D): token t's query heads attend positions 0..pos[t] of
// cache row rows[t] (query head h reads key/value head h / (H / KVH)).
void attend_to(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
               const torch::Tensor& rows, const torch::Tensor& pos, double scale,
               const torch::Tensor& out) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes(), "attend: shapes");
  TORCH_CHECK(q.scalar_type() == at::kFloat &&
                  (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16) &&
                  v.scalar_type() == k.scalar_type(),
              "attend: float32 queries, float32 or bfloat16 caches");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t R = k.size(0), KVH = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(3) == D && D % 8 == 0 && KVH > 0 && H % KVH == 0, "attend: head sizes");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "attend: contiguous caches");
  llamarun::check_output(out, {T, H, D}, at::kFloat, "attend");
  torch::Tensor keep_r, keep_p, keep_q;
  const auto [rp, pp] = checked_rows_pos(rows, pos, T, R, S, "attend", keep_r, keep_p);
  const float* qp = contiguous_ref(q, keep_q).data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (k.scalar_type() == at::kFloat)
    attend_tokens(qp, k.data_ptr<float>(), v.data_ptr<float>(), rp, pp, T, H, D, KVH, S,
                  float(scale), op);
  else
    attend_tokens(qp, k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(), rp, pp, T, H, D,
                  KVH, S, float(scale), op);
}

// attend_prefetch: at most this many bytes of keys, and as many of values, per token and
// key/value head, and only for passes of up to PREFETCH_ROWS tokens (decode rows: a prompt's
// attention is long enough to stream its keys at the memory's pace). A decode row's attention
// read its keys and values from memory (evicted by the token's weights since they were last
// read), 9-18 KB per head in SmolLM2's first 128 positions: short streams whose every line
// waited the memory's latency, the hardware's prefetchers not yet started. Fetched by
// decode_layers before the layer's first product, they arrive while it streams its weights.
constexpr int64_t PREFETCH_BYTES = int64_t(16) << 10, PREFETCH_ROWS = 16;

void attend_prefetch(const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& rows,
                     const torch::Tensor& pos, int64_t H) {
  const int64_t T = rows.numel();
  // (a hint: operands attend_to would refuse are left to it)
  if (T == 0 || T > PREFETCH_ROWS || pos.numel() != T || rows.scalar_type() != at::kLong ||
      pos.scalar_type() != at::kLong || !rows.is_contiguous() || !pos.is_contiguous() ||
      k.dim() != 4 || v.sizes() != k.sizes() || !k.is_contiguous() || !v.is_contiguous() ||
      k.size(1) <= 0 || H % k.size(1) != 0)
    return;
  const int64_t R = k.size(0), KVH = k.size(1), S = k.size(2), row_bytes = k.size(3) *
                                                                            k.element_size();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    if (rp[t] < 0 || rp[t] >= R || pp[t] < 0 || pp[t] >= S) return;
  const AttendItems items(T, H, KVH, pp);
  const auto [i0, i1] = llamarun::team_range(items.count());
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  int64_t last = -1;
  for (int64_t i = i0; i < i1; ++i) {
    int64_t t, kvh, h0, g;
    items.locate(i, t, kvh, h0, g);
    const int64_t base = (rp[t] * KVH + kvh) * S * row_bytes;
    if (base == last) continue;  // (the item before read the same head)
    last = base;
    const int64_t bytes = std::min((pp[t] + 1) * row_bytes, PREFETCH_BYTES);
    for (int64_t o = 0; o < bytes; o += 64) {
      _mm_prefetch(kp + base + o, _MM_HINT_T1);
      _mm_prefetch(vp + base + o, _MM_HINT_T1);
    }
  }
}

// attend_to into a new tensor
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     const torch::Tensor& rows, const torch::Tensor& pos, double scale) {
  TORCH_CHECK(q.dim() == 3, "attend: shapes");
  auto out = torch::empty(q.sizes(), q.options());  // (attend_to checks the rest)
  attend_to(q, k, v, rows, pos, scale, out);
  return out;
}

}  // namespace llamarun

TORCH_LIBRARY_IMPL(llamarun, CPU, m) {
  m.impl("attend", &llamarun::attend);
}
