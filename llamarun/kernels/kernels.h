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

namespace llamarun {

bool attend_supported();  // the CPU has what attend's code needs (AVX2, FMA)
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     const torch::Tensor& rows, const torch::Tensor& pos, double scale);
// rowwise.cpp (run where attend_supported says so: the same features)
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor silu_mul(const torch::Tensor& x);

}  // namespace llamarun
