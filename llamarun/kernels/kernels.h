// What the extension's source files share (linear.cpp holds the Python module).
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

// Only the kernels carry target attributes: the module loads on any x86-64 CPU, and Python
// calls a kernel only after checking the CPU's features.
#define LLAMARUN_AVX2 __attribute__((target("avx2,fma,f16c")))

// The sum of a vector's 8 floats (always in the same order).
LLAMARUN_AVX2 inline float hsum8(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

// exp(x) for x in [-87, 88] (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7
// polynomial in r; about 1 ulp). The attention's softmax and SwiGLU's silu clamp into it.
LLAMARUN_AVX2 inline __m256 exp_in_range(__m256 x) {
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

namespace llamarun {

bool attend_supported();  // the CPU has what attend's code needs (AVX2, FMA)
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     const torch::Tensor& rows, const torch::Tensor& pos, double scale);
// rowwise.cpp (run where attend_supported says so: the same features)
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor silu_mul(const torch::Tensor& x);

}  // namespace llamarun
