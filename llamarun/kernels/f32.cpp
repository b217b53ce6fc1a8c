// float32 products y = x @ w^T, w (N, K) as stored (no repacking): AVX-512 (16 lanes) on CPUs
// that have it, else AVX2 + FMA (8 lanes). The code is f32_kernel.h, included once per width.
//
// Why: oneDNN's product for a few rows (decode batches, speculative verification, prompt chunks)
// ran at a third to a half of the weights' streaming rate, and torch.compile's one-row multiply +
// sum rounds otherwise than any batched product, so a row's logits depended on how many rows its
// pass held. Here every y[m, n] is computed by one instruction sequence whatever M is (on a given
// CPU: the two widths sum in different orders).

#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#define LLAMARUN_AVX512F __attribute__((target("avx512f,avx2,fma,f16c")))

namespace {

constexpr int64_t NB = 12;  // weight rows per block
constexpr int64_t MT = 64;  // activation rows sharing one pass over a piece of blocks (L2)
constexpr int64_t GROUP = 512 * 1024;  // bytes of weights a prompt's tiles pass over in turn

namespace avx2 {

struct V {
  using vec = __m256;
  using mask = __m256i;
  static constexpr int64_t L = 8;
  static constexpr int ACC = 12;
  LLAMARUN_AVX2 static vec zero() { return _mm256_setzero_ps(); }
  LLAMARUN_AVX2 static vec load(const float* p) { return _mm256_loadu_ps(p); }
  LLAMARUN_AVX2 static vec load(const float* p, mask m) { return _mm256_maskload_ps(p, m); }
  LLAMARUN_AVX2 static mask below(int64_t n) {  // lanes < n
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  LLAMARUN_AVX2 static vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  LLAMARUN_AVX2 static void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
  LLAMARUN_AVX2 static float hsum(vec v) { return hsum8(v); }
};

#define F32_TARGET LLAMARUN_AVX2
#include "f32_kernel.h"
#undef F32_TARGET

}  // namespace avx2

namespace avx512 {

struct V {
  using vec = __m512;
  using mask = __mmask16;
  static constexpr int64_t L = 16;
  static constexpr int ACC = 24;
  LLAMARUN_AVX512F static vec zero() { return _mm512_setzero_ps(); }
  LLAMARUN_AVX512F static vec load(const float* p) { return _mm512_loadu_ps(p); }
  LLAMARUN_AVX512F static vec load(const float* p, mask m) { return _mm512_maskz_loadu_ps(m, p); }
  LLAMARUN_AVX512F static mask below(int64_t n) { return mask((1u << n) - 1); }  // n < 16
  LLAMARUN_AVX512F static vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  LLAMARUN_AVX512F static void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  LLAMARUN_AVX512F static float hsum(vec v) {  // halves added, then hsum8's tree
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return hsum8(_mm256_add_ps(_mm512_castps512_ps256(v), hi));
  }
};

#define F32_TARGET LLAMARUN_AVX512F
#include "f32_kernel.h"
#undef F32_TARGET

}  // namespace avx512

// Whether this CPU runs the AVX-512 code (else the AVX2 code).
bool has_avx512f() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}

}  // namespace

namespace llamarun {

void f32_product(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
                 bool stream) {
  static const bool wide = has_avx512f();
  (wide ? avx512::f32_product : avx2::f32_product)(x, w, y, M, K, N, stream);
}

// One-row passes of the AVX-512 code take the weight rows one at a time on AMD CPUs (ROW_STREAM,
// measured on an AVX-512 EPYC); the AVX2 code keeps its blocks of 12 everywhere: the new order
// was not measured on an AVX2-only CPU.
bool f32_streams() {
  static const bool stream = ROW_STREAM && has_avx512f();
  return stream;
}

static torch::Tensor f32_linear_on(const torch::Tensor& x, const torch::Tensor& w, bool stream) {
  const auto d = dense_operands(x, w, at::kFloat, "f32_linear", "float32");
  run_product(dense_plan(d.w, stream), d.x.data_ptr(), at::kFloat, d.M, d.y.data_ptr());
  return d.y;
}

// y (M, N) = x (M, K) @ w (N, K)^T, all float32 (a one-row pass in f32_streams' order).
torch::Tensor f32_linear(const torch::Tensor& x, const torch::Tensor& w) {
  return f32_linear_on(x, w, f32_streams());
}

// f32_linear with a one-row pass's order given: "rows" or "blocks" (tests, benchmarks).
torch::Tensor f32_linear_by(const torch::Tensor& x, const torch::Tensor& w,
                            const std::string& order) {
  return f32_linear_on(x, w, rows_by_name(order, "f32_linear_by"));
}

}  // namespace llamarun
