// One transformer layer of a pass in one call: the norm, the Q/K/V product, the rotation and
// cache write, the attention, the output product and residual add, the second norm, the
// gate/up product, SwiGLU, the down product and the second residual add, by the same kernels in
// the same order as the layer's modules call them one by one, so with the same bits. What it
// saves is the work between them in eager passes: about 15 Python-level ops a layer (SmolLM2's
// eager decode measured 14-45% faster, Q4_0 the most). Compiled passes keep the ops (see
// kernels.layer_pass: inductor's code between them measured faster than this).
//
// Each product comes as (kind, a, b, c, group, n): kind 0 dense (a the weight; float32 or
// bfloat16 as x), 1 int8 (a the weight, b its scales), 2 4-bit (a, b, c: int4_linear's weight,
// scales and zeros; n outputs). Python (llamarun.kernels.decode_layer) checks that each product
// is one its module would give these kernels for this pass.

#include "kernels.h"

namespace {

// out = a + b, elementwise, n values: float32, or bfloat16 added in float32 and rounded once
// (as PyTorch adds them).
LLAMARUN_AVX2 void add_rows(const float* a, const float* b, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
  for (; i < n; ++i) out[i] = a[i] + b[i];
}
LLAMARUN_AVX2 void add_rows(const c10::BFloat16* a, const c10::BFloat16* b, int64_t n,
                            c10::BFloat16* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(out + i, _mm256_add_ps(load8(a + i), load8(b + i)));
  for (; i < n; ++i) out[i] = c10::BFloat16(float(a[i]) + float(b[i]));
}

torch::Tensor residual_add(const torch::Tensor& a, const torch::Tensor& b) {
  TORCH_CHECK(a.sizes() == b.sizes(),
              "decode_layer: a product's outputs are not the layer's width");
  auto out = torch::empty_like(a);
  if (a.scalar_type() == at::kFloat)
    add_rows(a.data_ptr<float>(), b.data_ptr<float>(), a.numel(), out.data_ptr<float>());
  else
    add_rows(a.data_ptr<c10::BFloat16>(), b.data_ptr<c10::BFloat16>(), a.numel(),
             out.data_ptr<c10::BFloat16>());
  return out;
}

// float32 values in `dtype` (bfloat16: rounded as c10::BFloat16 rounds, as .to() does).
torch::Tensor to_dtype(const torch::Tensor& x, at::ScalarType dtype) {
  if (dtype == at::kFloat) return x;
  auto out = torch::empty(x.sizes(), x.options().dtype(dtype));
  store_bf16(x.data_ptr<float>(), x.numel(), out.data_ptr<c10::BFloat16>());
  return out;
}

torch::Tensor product(const torch::Tensor& x, int64_t kind, const torch::Tensor& a,
                      const torch::Tensor& b, const torch::Tensor& c, int64_t group, int64_t n) {
  switch (kind) {
    case 0:
      return x.scalar_type() == at::kFloat ? llamarun::f32_linear(x, a) : bf16_linear(x, a);
    case 1:
      return int8_linear(x, a, b);
    case 2:
      return int4_linear(x, a, b, c, group, n);
  }
  TORCH_CHECK(false, "decode_layer: product kind 0 (dense), 1 (int8) or 2 (4-bit)");
}

}  // namespace

namespace llamarun {

torch::Tensor decode_layer(
    const torch::Tensor& x, const torch::Tensor& attn_norm, const torch::Tensor& ffn_norm,
    double eps,
    int64_t qkv_kind, const torch::Tensor& qkv_a, const torch::Tensor& qkv_b,
    const torch::Tensor& qkv_c, int64_t qkv_group, int64_t qkv_n,
    int64_t o_kind, const torch::Tensor& o_a, const torch::Tensor& o_b,
    const torch::Tensor& o_c, int64_t o_group, int64_t o_n,
    int64_t up_kind, const torch::Tensor& up_a, const torch::Tensor& up_b,
    const torch::Tensor& up_c, int64_t up_group, int64_t up_n,
    int64_t down_kind, const torch::Tensor& down_a, const torch::Tensor& down_b,
    const torch::Tensor& down_c, int64_t down_group, int64_t down_n,
    const torch::Tensor& freqs, torch::Tensor k_cache, torch::Tensor v_cache,
    const torch::Tensor& rows, const torch::Tensor& pos, int64_t n_heads, double scale) {
  TORCH_CHECK(x.dim() >= 1 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "decode_layer: x float32 or bfloat16");
  const int64_t D = x.size(-1), T = x.numel() / D;
  auto h = x.contiguous().view({T, D});
  auto qkv = product(rms_norm(h, attn_norm, eps), qkv_kind, qkv_a, qkv_b, qkv_c, qkv_group, qkv_n);
  auto q = rope_write(qkv, freqs, k_cache, v_cache, rows, pos, n_heads);
  auto y = attend(q, k_cache, v_cache, rows, pos, scale);
  auto heads = to_dtype(y.view({T, y.size(1) * y.size(2)}), x.scalar_type());
  h = residual_add(h, product(heads, o_kind, o_a, o_b, o_c, o_group, o_n));
  auto gate_up = product(rms_norm(h, ffn_norm, eps), up_kind, up_a, up_b, up_c, up_group, up_n);
  auto hidden = silu_mul(gate_up);
  auto out =
      residual_add(h, product(hidden, down_kind, down_a, down_b, down_c, down_group, down_n));
  return out.view(x.sizes());
}

}  // namespace llamarun
