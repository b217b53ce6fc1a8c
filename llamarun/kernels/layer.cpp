// Consecutive transformer layers of a pass in one call, each: the norm, the Q/K/V product, the
// rotation and cache write, the attention, the output product and residual add, the second
// norm, the gate/up product, SwiGLU, the down product and the second residual add, by the same
// kernels in the same order as the layer's modules call them one by one, so with the same bits.
// What it saves is the work between them in eager passes: about 15 Python-level ops a layer
// (SmolLM2's eager decode measured 14-45% faster, Q4_0 the most), and, with all layers in one
// call, the Python between the layers. Compiled passes keep the ops (see kernels.layer_pass:
// inductor's code between them measured faster than this).
//
// A LayerStack holds each layer's operands that stay the same from pass to pass (made once per
// kind of pass by model.Transformer), among them its 4 products as (kind, a, b, c, group, n):
// kind 0 dense (a the weight; float32 or bfloat16 as x), 1 int8 (a the weight, b its scales),
// 2 4-bit (a, b, c: int4_linear's weight, scales and zeros; n outputs). Python
// (model.TransformerBlock.fused_operands) checks that each product is one its module would give
// these kernels for the pass.

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

torch::Tensor product(const torch::Tensor& x, const llamarun::Product& p) {
  switch (p.kind) {
    case 0:
      return x.scalar_type() == at::kFloat ? llamarun::f32_linear(x, p.a) : bf16_linear(x, p.a);
    case 1:
      return int8_linear(x, p.a, p.b);
    case 2:
      return int4_linear(x, p.a, p.b, p.c, p.group, p.n);
  }
  TORCH_CHECK(false, "decode_layers: product kind 0 (dense), 1 (int8) or 2 (4-bit)");
}

}  // namespace

namespace llamarun {

void LayerStack::add(const torch::Tensor& attn_norm, const torch::Tensor& ffn_norm, double eps,
                     const std::vector<ProductArgs>& products, const torch::Tensor& k_cache,
                     const torch::Tensor& v_cache, int64_t n_heads, double scale) {
  TORCH_CHECK(products.size() == 4, "decode_layers: a layer has 4 products (Q/K/V, output, "
              "gate/up, down)");
  Layer layer{attn_norm, ffn_norm, eps, {}, k_cache, v_cache, n_heads, scale};
  for (int i = 0; i < 4; ++i) {
    const auto& [kind, a, b, c, group, n] = products[i];
    layer.products[i] = {kind, a, b, c, group, n};
  }
  layers.push_back(std::move(layer));
}

torch::Tensor decode_layers(const torch::Tensor& x, const LayerStack& stack,
                            const torch::Tensor& freqs, const torch::Tensor& rows,
                            const torch::Tensor& pos) {
  TORCH_CHECK(x.dim() >= 1 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "decode_layers: x float32 or bfloat16");
  const int64_t D = x.size(-1), T = x.numel() / D;
  auto h = x.contiguous().view({T, D});
  for (const auto& l : stack.layers) {
    auto k_cache = l.k_cache, v_cache = l.v_cache;
    const auto& [qkv_p, o_p, up_p, down_p] = l.products;
    auto qkv = product(rms_norm(h, l.attn_norm, l.eps), qkv_p);
    auto q = rope_write(qkv, freqs, k_cache, v_cache, rows, pos, l.n_heads);
    auto y = attend(q, k_cache, v_cache, rows, pos, l.scale);
    auto heads = to_dtype(y.view({T, y.size(1) * y.size(2)}), x.scalar_type());
    h = residual_add(h, product(heads, o_p));
    auto gate_up = product(rms_norm(h, l.ffn_norm, l.eps), up_p);
    auto hidden = silu_mul(gate_up);
    h = residual_add(h, product(hidden, down_p));
  }
  return h.view(x.sizes());
}

}  // namespace llamarun
