// Decode-sized (M <= 8 rows) weight-streaming products for x86 CPUs with AVX512-BF16 / VNNI.
//
// Row invariance: every output element y[m, n] is computed by the same instruction sequence
// whatever M is (the same K chunks, in the same order, reduced by the same tree), so a row's
// result does not depend on the other rows of the batch. Threads split the output columns N;
// one element is never split across threads.
//
// Only the kernels carry AVX-512 target attributes: the module loads on any x86-64 CPU, and
// Python calls a kernel only after checking the CPU's features (cpu_features below).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t NB = 8;     // weight rows (outputs) per block: one thread step
constexpr int64_t MB = 4;     // activation rows per pass over a block
constexpr int64_t GRAIN = 8;  // blocks per thread task at least

#define LLAMARUN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni")))

// The block functions compute MR activation rows x NR weight rows. Both are template arguments
// so that the accumulators stay in registers. One row streams 8 weight rows at once (more
// memory requests in flight: measured 17 -> 19 GB/s on one core); 2-4 rows take 4 at a time
// (registers). Either way each output sees the same instructions in the same order.

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

// One pass: mrows (1..MB) activation rows over one block of nrows (1..NB) weight rows.
void bf16_pass(int64_t mrows, const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t nrows,
               int64_t K, const uint16_t* next, float* out) {
  if (mrows == 1) return bf16_block<1, 8>(x, ldx, w, nrows, K, next, out);
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
                      OutT* y) {
  const int64_t nblocks = (N + NB - 1) / NB;
  at::parallel_for(0, nblocks, GRAIN, [&](int64_t b0, int64_t b1) {
    float out[MB * NB];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NB, nrows = std::min(NB, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int64_t mrows = std::min(MB, M - m0);
        // the first pass over a block prefetches the next one
        const uint16_t* next =
            (m0 == 0 && nrows == NB && n0 + 2 * NB <= N) ? w + (n0 + NB) * K : nullptr;
        bf16_pass(mrows, x + m0 * K, K, w + n0 * K, nrows, K, next, out);
        for (int64_t i = 0; i < mrows; ++i)
          for (int64_t j = 0; j < nrows; ++j) y[(m0 + i) * N + n0 + j] = OutT(out[i * NB + j]);
      }
    }
  });
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
    if (next != nullptr)
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) _mm_prefetch((const char*)(next + j * K + k), _MM_HINT_T0);
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

void int8_pass(int64_t mrows, const uint8_t* xu, const float* xs, int64_t ldx, const int8_t* w,
               int64_t nrows, int64_t K, const int8_t* next, float* out) {
  if (mrows == 1) return int8_block<1, 8>(xu, xs, ldx, w, nrows, K, next, out);
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

template <typename InT, typename OutT>
void int8_linear_impl(const InT* x, int64_t M, const int8_t* w, const float* wscale, int64_t N,
                      int64_t K, OutT* y) {
  const int64_t ldx = (K + QB - 1) / QB * QB;
  std::vector<uint8_t> xu(M * ldx);
  std::vector<float> xs(M * (ldx / QB));
  for (int64_t m = 0; m < M; ++m)
    quantize_row(x + m * K, K, xu.data() + m * ldx, xs.data() + m * (ldx / QB));
  const int64_t nblocks = (N + NB - 1) / NB;
  at::parallel_for(0, nblocks, GRAIN, [&](int64_t b0, int64_t b1) {
    float out[MB * NB];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NB, nrows = std::min(NB, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int64_t mrows = std::min(MB, M - m0);
        const int8_t* next =
            (m0 == 0 && nrows == NB && n0 + 2 * NB <= N) ? w + (n0 + NB) * K : nullptr;
        int8_pass(mrows, xu.data() + m0 * ldx, xs.data() + m0 * (ldx / QB), ldx, w + n0 * K,
                  nrows, K, next, out);
        for (int64_t i = 0; i < mrows; ++i)
          for (int64_t j = 0; j < nrows; ++j)
            y[(m0 + i) * N + n0 + j] = OutT(out[i * NB + j] * wscale[n0 + j]);
      }
    }
  });
}

}  // namespace

// Which of the instructions the kernels need this CPU has: (avx512bf16, avx512vnni).
std::vector<bool> cpu_features() {
  __builtin_cpu_init();
  const bool base = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl");
  return {base && __builtin_cpu_supports("avx512bf16"),
          base && __builtin_cpu_supports("avx512vnni")};
}

// y (M, N) = x (M, K) @ w (N, K)^T; x and w bfloat16; y in x's dtype.
torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "bf16_linear: shapes");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "bf16_linear: bfloat16 only");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  auto y = torch::empty({M, N}, x.options());
  bf16_linear_impl(reinterpret_cast<const uint16_t*>(xc.data_ptr()), M,
                   reinterpret_cast<const uint16_t*>(wc.data_ptr()), N, K,
                   reinterpret_cast<c10::BFloat16*>(y.data_ptr()));
  return y;
}

// y (M, N) = x (M, K) @ (w * wscale[:, None])^T with x quantized to int8 in blocks of QB;
// wscale any float dtype; y in x's dtype (bfloat16 or float32).
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& w,
                          const torch::Tensor& wscale) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "int8_linear: shapes");
  TORCH_CHECK(w.scalar_type() == at::kChar, "int8_linear: int8 weights");
  TORCH_CHECK(wscale.numel() == w.size(0), "int8_linear: one scale per row");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto sc = wscale.to(at::kFloat).contiguous();  // exact from bfloat16
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  auto y = torch::empty({M, N}, x.options());
  const auto* wp = wc.data_ptr<int8_t>();
  if (x.scalar_type() == at::kBFloat16) {
    int8_linear_impl(reinterpret_cast<const c10::BFloat16*>(xc.data_ptr()), M, wp,
                     sc.data_ptr<float>(), N, K, reinterpret_cast<c10::BFloat16*>(y.data_ptr()));
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "int8_linear: x bfloat16 or float32");
    int8_linear_impl(xc.data_ptr<float>(), M, wp, sc.data_ptr<float>(), N, K,
                     y.data_ptr<float>());
  }
  return y;
}

// The ops' schemas are defined in Python (llamarun/kernels/__init__.py, with their fake forms
// for torch.compile) so that they exist before this library is built; this adds the CPU code,
// which torch.compile's graphs then reach through the C++ dispatcher.
TORCH_LIBRARY_IMPL(llamarun, CPU, m) {
  m.impl("bf16_linear", &bf16_linear);
  m.impl("int8_linear", &int8_linear);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_features", &cpu_features);
  m.def("bf16_linear", &bf16_linear);
  m.def("int8_linear", &int8_linear);
}
