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

#include <omp.h>
#include <sched.h>

namespace {

// out = a + b, elementwise, n values (out may be a: in place): float32, or bfloat16 added in
// float32 and rounded once (as PyTorch adds them).
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

// out = a + b (out of a's shape and dtype, contiguous; a and b contiguous).
void residual_add(const torch::Tensor& a, const torch::Tensor& b, torch::Tensor& out) {
  TORCH_CHECK(a.sizes() == b.sizes(),
              "decode_layer: a product's outputs are not the layer's width");
  if (a.scalar_type() == at::kFloat)
    add_rows(a.data_ptr<float>(), b.data_ptr<float>(), a.numel(), out.data_ptr<float>());
  else
    add_rows(a.data_ptr<c10::BFloat16>(), b.data_ptr<c10::BFloat16>(), a.numel(),
             out.data_ptr<c10::BFloat16>());
}

// The outputs of a pass's ops, allocated by its first layer and reused by the next ones of the
// same shapes (every layer of a model: a SmolLM2 decode layer allocated 12 tensors, about 5 us).
struct Buffers {
  torch::Tensor slot[9];
  // slot i as a tensor of `sizes` and `options`, reallocated where the last one differs
  const torch::Tensor& get(int i, at::IntArrayRef sizes, const at::TensorOptions& options) {
    auto& t = slot[i];
    if (!t.defined() || t.sizes() != sizes || t.scalar_type() != options.dtype().toScalarType())
      t = torch::empty(sizes, options);
    return t;
  }
};

// y = x @ W^T for a product of the stack, into out (x's dtype).
void product(const torch::Tensor& x, const llamarun::ProductPlan& p, const torch::Tensor& out) {
  llamarun::run_product(p, x.data_ptr(), x.scalar_type(), x.size(0), out.data_ptr());
}

// f() by member 0 of the team alone (outside one, by this thread), then the team's barrier.
template <typename F>
void solo(F&& f) {
  llamarun::Team* team = llamarun::t_team;
  if (team == nullptr) return f();
  if (llamarun::t_rank == 0) {
    llamarun::t_team = nullptr;  // its parallel loops run inline: the others are not in them
    try {
      f();
    } catch (...) {
      llamarun::t_team = team;
      throw;
    }
    llamarun::t_team = team;
  }
  team->barrier();
}

// The CPUs this process may run on (its affinity; at least 1).
int64_t cpus_allowed() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  return std::max(1, CPU_COUNT(&set));
}

// f() by a team of the threads at::get_num_threads() allows, at most one per CPU this process
// may use (one parallel region for all of f's ops), or by this thread alone where that is 1 or
// a parallel region runs already. An error of a member ends the others at their next barrier and
// is rethrown here. (More members than CPUs spin at barriers while the member they wait for
// waits for a CPU: 4 threads on this 2-CPU machine decoded SmolLM2 at 2 tok/s before the bound.)
template <typename F>
void in_team(F&& f) {
  static const int64_t cpus = cpus_allowed();
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), cpus);
  if (threads <= 1 || at::in_parallel_region()) return f();
  llamarun::Team team;
  std::exception_ptr error;
  std::atomic<bool> caught{false};
#pragma omp parallel num_threads(threads)
  {
    team.size.store(omp_get_num_threads(), std::memory_order_relaxed);
    llamarun::t_team = &team;
    llamarun::t_rank = omp_get_thread_num();
    try {
      f();
    } catch (const llamarun::TeamAbort&) {
    } catch (...) {
      if (!caught.exchange(true)) error = std::current_exception();
      team.failed.store(true, std::memory_order_relaxed);
    }
    llamarun::t_team = nullptr;
    llamarun::t_rank = 0;
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace

namespace llamarun {

void LayerStack::add(const torch::Tensor& attn_norm, const torch::Tensor& ffn_norm, double eps,
                     const std::vector<ProductArgs>& products, const torch::Tensor& k_cache,
                     const torch::Tensor& v_cache, int64_t n_heads, double scale) {
  TORCH_CHECK(products.size() == 4, "decode_layers: a layer has 4 products (Q/K/V, output, "
              "gate/up, down)");
  TORCH_CHECK(attn_norm.dim() == 1 && k_cache.dim() == 4, "decode_layers: norms and caches");
  Layer layer{attn_norm, ffn_norm, eps, {}, k_cache, v_cache, n_heads, scale};
  // the products' input widths: the layer's, the heads', the layer's, half the gate/up's
  const int64_t D = attn_norm.size(0);
  int64_t K[4] = {D, n_heads * k_cache.size(3), D, 0};
  for (int i = 0; i < 4; ++i) {
    const auto& [kind, a, b, c, group, n] = products[i];
    if (i == 3) K[3] = layer.products[2].N / 2;
    layer.products[i] = plan_product(kind, a, b, c, group, n, K[i]);
  }
  layers.push_back(std::move(layer));
}

torch::Tensor decode_layers(const torch::Tensor& x, const LayerStack& stack,
                            const torch::Tensor& freqs, const torch::Tensor& rows,
                            const torch::Tensor& pos) {
  TORCH_CHECK(x.dim() >= 1 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "decode_layers: x float32 or bfloat16");
  const int64_t D = x.size(-1), T = x.numel() / D;
  const auto options = x.options();
  const auto f32 = options.dtype(at::kFloat);
  auto h = x.contiguous().view({T, D});  // the input, then (after the first add) out's rows
  auto out = torch::empty({T, D}, options);
  Buffers b;
  torch::Tensor heads;
  // The layers, by every member of a team alike (or by this thread alone): the products and the
  // attention split between the members, the other ops run by one (solo: the others wait).
  const auto layers = [&]() {
    for (const auto& l : stack.layers) {
      const auto& k_cache = l.k_cache;  // (no new references: see attend_to)
      const auto& v_cache = l.v_cache;
      const auto& [qkv_p, o_p, up_p, down_p] = l.products;
      const int64_t H = l.n_heads, HD = k_cache.size(3);
      solo([&]() {
        b.get(1, {T, qkv_p.N}, options);
        b.get(2, {T, H, HD}, f32);
        b.get(3, {T, H, HD}, f32);
        if (x.scalar_type() != at::kFloat) b.get(4, {T, H * HD}, options);
        b.get(5, {T, o_p.N}, options);
        b.get(6, {T, up_p.N}, options);
        b.get(7, {T, up_p.N / 2}, options);
        b.get(8, {T, down_p.N}, options);
        llamarun::rms_norm_into(h, l.attn_norm, l.eps, b.get(0, {T, D}, options));
      });
      const auto& [normed, qkv, q, y, heads_bf16, o, gate_up, hidden, down] = b.slot;
      product(normed, qkv_p, qkv);
      solo([&]() { rope_write_into(qkv, freqs, k_cache, v_cache, rows, pos, H, q); });
      attend_to(q, k_cache, v_cache, rows, pos, l.scale, y);
      solo([&]() {
        if (x.scalar_type() != at::kFloat) {  // (rounded once, as .to() rounds)
          store_bf16(y.data_ptr<float>(), y.numel(), heads_bf16.data_ptr<c10::BFloat16>());
          if (!heads.is_same(heads_bf16)) heads = heads_bf16;
        } else if (!heads.defined() || heads.data_ptr() != y.data_ptr() ||
                   heads.size(1) != H * HD) {
          heads = y.view({T, H * HD});  // (made again only where y is another tensor)
        }
      });
      product(heads, o_p, o);
      solo([&]() {
        residual_add(h, o, out);
        if (!h.is_same(out)) h = out;
        llamarun::rms_norm_into(h, l.ffn_norm, l.eps, normed);
      });
      product(normed, up_p, gate_up);
      solo([&]() { llamarun::silu_mul_into(gate_up, hidden); });
      product(hidden, down_p, down);
      solo([&]() { residual_add(h, down, out); });
    }
  };
  in_team(layers);
  return h.view(x.sizes());
}

}  // namespace llamarun
