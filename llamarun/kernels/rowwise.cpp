// The per-token ops of a layer besides the products and the attention (AVX2 + FMA): RMS norm,
// out = weight * (x / sqrt(mean(x^2) + eps)), and SwiGLU's silu(gate) * up. float32, and
// bfloat16 computed in float32 with each result rounded once (in eager bfloat16 passes they
// replace 5-7 PyTorch ops a row each: eager decode of the default model measured 128 -> 139
// tok/s).
//
// Why kernels for so small ops: they are the parts of a layer whose results torch.compile's
// code and eager PyTorch compute with different roundings (the norm's float32 sums of squares
// add in different orders; silu's exp and division differ), so a prompt chunk run inside a
// compiled pass got other logits than the same prompt prefilled eagerly. Both now call these,
// and each row is computed by the same instructions whatever the number of rows, so a token's
// result depends only on its own values.

#include "kernels.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace {

// One row of D values: sum of squares with one 8-lane accumulator in order (then the tail
// one value at a time), the inverse root once, then weight * (x * r) as PyTorch's form.
LLAMARUN_AVX2 void norm_row(const float* x, const float* w, int64_t D, float eps, float* out) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 v = _mm256_loadu_ps(x + d);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float sum = hsum8(acc);
  for (; d < D; ++d) sum = std::fma(x[d], x[d], sum);
  const float r = 1.f / std::sqrt(sum / float(D) + eps);
  const __m256 rv = _mm256_set1_ps(r);
  for (d = 0; d + 8 <= D; d += 8)
    _mm256_storeu_ps(out + d, _mm256_mul_ps(_mm256_loadu_ps(w + d),
                                            _mm256_mul_ps(_mm256_loadu_ps(x + d), rv)));
  for (; d < D; ++d) out[d] = w[d] * (x[d] * r);
}

// exp(x) for any float x (exp_in_range on x clamped to [-87, 88]): never infinite or
// denormal (exp(-87) ~ 1.6e-38, exp(88) ~ 1.7e38).
LLAMARUN_AVX2 inline __m256 exp_clamped(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  return exp_in_range(x);
}

// silu(g) * u = g / (1 + exp(-g)) * u for 8 values.
LLAMARUN_AVX2 inline __m256 silu_mul8(__m256 g, __m256 u) {
  const __m256 e = exp_clamped(_mm256_sub_ps(_mm256_setzero_ps(), g));
  return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e)), u);
}

// One row: gate g and up u of H values each. The tail (H not a multiple of 8) goes through
// the same 8-wide code on a padded copy.
LLAMARUN_AVX2 void silu_mul_row(const float* g, const float* u, int64_t H, float* out) {
  int64_t h = 0;
  for (; h + 8 <= H; h += 8)
    _mm256_storeu_ps(out + h, silu_mul8(_mm256_loadu_ps(g + h), _mm256_loadu_ps(u + h)));
  if (h < H) {
    float gb[8] = {0}, ub[8] = {0}, ob[8];
    for (int64_t i = h; i < H; ++i) gb[i - h] = g[i], ub[i - h] = u[i];
    _mm256_storeu_ps(ob, silu_mul8(_mm256_loadu_ps(gb), _mm256_loadu_ps(ub)));
    for (int64_t i = h; i < H; ++i) out[i] = ob[i - h];
  }
}

// `rows` rows of x of width W (float32 or bfloat16) through f(float32 row, float32 out row) in
// float32, written to out (rows OW apart, x's dtype: bfloat16 results rounded once, from
// float32), `grain` rows a thread at least.
template <typename F>
void rows_in_float(const void* x, bool bf16, int64_t rows, int64_t W, int64_t OW, void* out,
                   int64_t grain, F&& f) {
  if (!bf16) {
    const float* xp = static_cast<const float*>(x);
    float* op = static_cast<float*>(out);
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) f(xp + r * W, op + r * OW);
    });
    return;
  }
  const auto* xp = static_cast<const c10::BFloat16*>(x);
  auto* op = static_cast<c10::BFloat16*>(out);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    float* xf = llamarun::scratch<float, struct RowIn>(W);
    float* of = llamarun::scratch<float, struct RowOut>(OW);
    for (int64_t r = r0; r < r1; ++r) {
      load_bf16(xp + r * W, W, xf);
      f(xf, of);
      store_bf16(of, OW, op + r * OW);
    }
  });
}

// The index of the largest of n float32 values, the first where several tie (as torch.max), by
// 32 running maxima (4 vectors of 8: independent chains) each keeping its first; then the
// largest, the smallest index among the lanes holding it. Sets *nan where a value is NaN
// (the caller then leaves the row to torch.max, which propagates it).
LLAMARUN_AVX2 int64_t argmax_row(const float* x, int64_t n, bool* nan) {
  constexpr int V = 4, W = 8 * V;
  float best[W];
  int32_t at[W];
  int64_t i = 0, first = 0;
  bool bad = false;
  if (n >= W) {
    __m256 m[V];
    __m256i ix[V], cur[V];
    __m256 unordered = _mm256_setzero_ps();
    for (int v = 0; v < V; ++v) {
      m[v] = _mm256_loadu_ps(x + 8 * v);
      cur[v] = ix[v] = _mm256_setr_epi32(8 * v, 8 * v + 1, 8 * v + 2, 8 * v + 3, 8 * v + 4,
                                         8 * v + 5, 8 * v + 6, 8 * v + 7);
      unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(m[v], m[v], _CMP_UNORD_Q));
    }
    const __m256i step = _mm256_set1_epi32(W);
    for (i = W; i + W <= n; i += W)
      for (int v = 0; v < V; ++v) {
        const __m256 a = _mm256_loadu_ps(x + i + 8 * v);
        cur[v] = _mm256_add_epi32(cur[v], step);
        const __m256 gt = _mm256_cmp_ps(a, m[v], _CMP_GT_OQ);
        m[v] = _mm256_blendv_ps(m[v], a, gt);
        ix[v] = _mm256_castps_si256(
            _mm256_blendv_ps(_mm256_castsi256_ps(ix[v]), _mm256_castsi256_ps(cur[v]), gt));
        unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
      }
    bad = _mm256_movemask_ps(unordered) != 0;
    for (int v = 0; v < V; ++v) {
      _mm256_storeu_ps(best + 8 * v, m[v]);
      _mm256_storeu_si256((__m256i*)(at + 8 * v), ix[v]);
    }
    for (int l = 1; l < W; ++l)
      if (best[l] > best[first] || (best[l] == best[first] && at[l] < at[first])) first = l;
    first = at[first];
  } else {
    bad = n > 0 && std::isnan(x[0]);
    i = 1;
  }
  for (; i < n; ++i) {  // the tail: later than every index above, so a tie keeps the first
    bad |= std::isnan(x[i]);
    if (x[i] > x[first]) first = i;
  }
  *nan = bad;
  return first;
}

}  // namespace

namespace llamarun {

void rms_norm_rows(const void* x, const void* w, bool bf16, int64_t rows, int64_t D, double eps,
                   void* out) {
  // a bfloat16 weight widened here (exact), not by weight.to(float): a PyTorch op costs more
  // than a decode row's norm (1.7 -> 1.1 us a call for the default model's 576 values)
  const float* wp;
  if (!bf16) {
    wp = static_cast<const float*>(w);
  } else {
    float* wf = llamarun::scratch<float, struct NormWeight>(D);
    load_bf16(static_cast<const c10::BFloat16*>(w), D, wf);
    wp = wf;
  }
  const float e = float(eps);
  // A thread takes at least 16 rows: a decode pass's few rows stay on the calling thread.
  rows_in_float(x, bf16, rows, D, D, out, 16,
                [&](const float* row, float* o) { norm_row(row, wp, D, e, o); });
}

void silu_mul_rows(const void* x, bool bf16, int64_t rows, int64_t H, void* out) {
  rows_in_float(x, bf16, rows, 2 * H, H, out, 4,
                [&](const float* row, float* o) { silu_mul_row(row, row + H, H, o); });
}

// x (..., D) float32 or bfloat16, weight (D) of the same dtype: the norm of every row of x, in
// x's shape and dtype (bfloat16 computed in float32, each value rounded once at the end).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  weight.scalar_type() == x.scalar_type(),
              "rms_norm: float32 or bfloat16 only, x and weight alike");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "rms_norm: weight of the rows' size");
  const int64_t D = x.size(-1);
  TORCH_CHECK(D > 0, "rms_norm: empty rows");
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  auto out = torch::empty(xc.sizes(), xc.options());
  rms_norm_rows(xc.data_ptr(), wc.data_ptr(), xc.scalar_type() == at::kBFloat16,
                xc.numel() / D, D, eps, out.data_ptr());
  return out;
}

// x (..., 2H) float32 or bfloat16, gate then up: silu(x[..., :H]) * x[..., H:], shape (..., H),
// x's dtype (bfloat16 computed in float32, each value rounded once at the end).
torch::Tensor silu_mul(const torch::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "silu_mul: float32 or bfloat16 only");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0 && x.size(-1) > 0,
              "silu_mul: rows of gate and up, of an even size");
  const int64_t H = x.size(-1) / 2;
  auto xc = x.contiguous();
  auto sizes = xc.sizes().vec();
  sizes.back() = H;
  auto out = torch::empty(sizes, xc.options());
  silu_mul_rows(xc.data_ptr(), xc.scalar_type() == at::kBFloat16, xc.numel() / (2 * H), H,
                out.data_ptr());
  return out;
}

// The index of each row's largest value of x (..., n) float32, the first where several tie: as
// torch.max(x, -1).indices, which it replaces for greedy decoding (torch's measured 63 us for a
// 128,256-entry row here, and up to 3x that right after the head's product; this 13). A row
// holding NaN makes the whole call torch.max's (NaN is its largest value).
torch::Tensor argmax_rows(const torch::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1 && x.size(-1) > 0,
              "argmax_rows: float32 rows");
  auto xc = x.contiguous();
  const int64_t n = xc.size(-1), rows = xc.numel() / n;
  auto sizes = xc.sizes().vec();
  sizes.pop_back();
  auto out = torch::empty(sizes, xc.options().dtype(at::kLong));
  const float* xp = xc.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  bool any_nan = false;
  for (int64_t r = 0; r < rows; ++r) {
    bool nan = false;
    op[r] = argmax_row(xp + r * n, n, &nan);
    any_nan |= nan;
  }
  if (any_nan) return std::get<1>(xc.max(-1));
  return out;
}

}  // namespace llamarun

TORCH_LIBRARY_IMPL(llamarun, CPU, m) {
  m.impl("rms_norm", &llamarun::rms_norm);
  m.impl("silu_mul", &llamarun::silu_mul);
}
