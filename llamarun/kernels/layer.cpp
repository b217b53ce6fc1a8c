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
// these kernels for the pass. A stack may also hold the model's embedding before its first layer
// and its final norm and output product after its last (set_embedding, set_head: see
// model.Transformer._parts): decode_logits then goes from a pass's token ids to its logits.

#include "kernels.h"

#include <omp.h>
#include <sched.h>

#include <cstring>

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

// Row r of t (a contiguous 2-D tensor).
void* at_row(const torch::Tensor& t, int64_t r) {
  return static_cast<char*>(t.data_ptr()) + r * t.size(1) * t.element_size();
}

// Rows [r0, r1) of out = a + b (out of a's shape and dtype, contiguous; a and b contiguous).
void residual_add(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& out,
                  int64_t r0, int64_t r1) {
  TORCH_CHECK(a.sizes() == b.sizes(),
              "decode_layer: a product's outputs are not the layer's width");
  const int64_t n = (r1 - r0) * a.size(1);
  if (a.scalar_type() == at::kFloat)
    add_rows(static_cast<const float*>(at_row(a, r0)), static_cast<const float*>(at_row(b, r0)),
             n, static_cast<float*>(at_row(out, r0)));
  else
    add_rows(static_cast<const c10::BFloat16*>(at_row(a, r0)),
             static_cast<const c10::BFloat16*>(at_row(b, r0)), n,
             static_cast<c10::BFloat16*>(at_row(out, r0)));
}

// The outputs of a pass's ops, allocated before its first layer and reused by all (a tensor's
// allocation cost a SmolLM2 decode layer about 0.4 us each), and by the stack's next decode pass
// of as many tokens (buffers_for). The products', the rotation's and the attention's outputs,
// which the members of a team write a share each of, are shared; the row ops' outputs are `own`,
// one set per member where each runs them whole (see decode_layers). The tensor a pass returns
// (its logits, or the last layer's output) is the caller's: fresh() allocates it anew each pass.
struct Buffers {
  torch::Tensor embedded;  // the token ids' rows of the embedding (a stack that holds one)
  torch::Tensor qkv, q, y, o, gate_up, down;
  torch::Tensor freqs;  // each token's row of the RoPE table
  torch::Tensor logits, widened;  // the head's outputs (decode_logits), bfloat16 ones widened
  struct Own {
    torch::Tensor normed, heads, hidden, out;  // (heads: bfloat16 passes)
  };
  std::vector<Own> own;
  Buffers(const llamarun::LayerStack::Layer& l, int64_t T, int64_t D, int64_t members,
          const at::TensorOptions& options, const llamarun::LayerStack::Head* head) {
    const auto& [qkv_p, o_p, up_p, down_p] = l.products;
    const int64_t H = l.n_heads, HD = l.k_cache.size(3);
    const auto f32 = options.dtype(at::kFloat);
    embedded = torch::empty({T, D}, options);
    freqs = torch::empty({T, HD / 2, 2}, f32);
    qkv = torch::empty({T, qkv_p.N}, options);
    q = torch::empty({T, H, HD}, f32);
    y = torch::empty({T, H, HD}, f32);
    o = torch::empty({T, o_p.N}, options);
    gate_up = torch::empty({T, up_p.N}, options);
    down = torch::empty({T, down_p.N}, options);
    if (head != nullptr) {
      logits = torch::empty({T, head->product.N}, options);
      widened = options.dtype() == at::kFloat ? logits : torch::empty_like(logits, f32);
    }
    own.resize(members);
    for (auto& m : own) {
      m.normed = torch::empty({T, D}, options);
      if (options.dtype() != at::kFloat) m.heads = torch::empty({T, H * HD}, options);
      m.hidden = torch::empty({T, up_p.N / 2}, options);
      m.out = torch::empty({T, D}, options);
    }
  }
  // A new tensor for what the next pass returns, the caller's own (the others are reused).
  void fresh() {
    if (!logits.defined()) {  // (no head)
      own[0].out = torch::empty_like(own[0].out);
      return;
    }
    const bool f32 = logits.scalar_type() == at::kFloat;
    if (f32) logits = torch::empty_like(logits);
    widened = f32 ? logits : torch::empty_like(widened);
  }
  // Whether a pass of T tokens by `members`, of dtype, with or without the head, fits these.
  bool fits(int64_t T, int64_t members, at::ScalarType dtype, bool headed) const {
    return qkv.size(0) == T && int64_t(own.size()) == members && qkv.scalar_type() == dtype &&
           logits.defined() == headed;
  }
  // Decode passes (at most this many tokens) keep their buffers in the stack for the next: in
  // a SmolLM2 decode token the ~17 allocations cost about 1% (their code's caches cold after
  // the weights' stream); a prompt chunk's (many MB for the 8B shape's) are freed after it.
  static constexpr int64_t REUSED = 8;
};

// The buffers of a pass of T tokens through `stack`: its last pass's where they fit and nobody
// uses them (then held by `lock` until the pass ends), else new ones (kept for the next pass
// where T is a decode pass's).
std::shared_ptr<Buffers> buffers_for(const llamarun::LayerStack& stack, int64_t T, int64_t D,
                                     int64_t members, const at::TensorOptions& options,
                                     const llamarun::LayerStack::Head* head,
                                     std::unique_lock<std::mutex>& lock) {
  if (T <= Buffers::REUSED) {
    lock = std::unique_lock<std::mutex>(stack.scratch_mutex, std::try_to_lock);
    if (lock.owns_lock()) {
      auto kept = std::static_pointer_cast<Buffers>(stack.scratch);
      if (kept && kept->fits(T, members, options.dtype().toScalarType(), head != nullptr)) {
        kept->fresh();
        return kept;
      }
      auto made = std::make_shared<Buffers>(stack.layers[0], T, D, members, options, head);
      stack.scratch = made;
      return made;
    }
  }
  return std::make_shared<Buffers>(stack.layers[0], T, D, members, options, head);
}

// y = x @ W^T for a product of the stack (x: rows of the plan's inputs, of dtype), into out.
void product(const torch::Tensor& x, at::ScalarType dtype, const llamarun::ProductPlan& p,
             const torch::Tensor& out) {
  llamarun::run_product(p, x.data_ptr(), dtype, out.size(0), out.data_ptr());
}

// The CPUs this process may run on (its affinity; at least 1).
int64_t cpus_allowed() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  return std::max(1, CPU_COUNT(&set));
}

// The members in_team's team would have: the threads at::get_num_threads() allows, at most one
// per CPU this process may use (more members than CPUs spin at barriers while the member they
// wait for waits for a CPU: 4 threads on this 2-CPU machine decoded SmolLM2 at 2 tok/s before
// the bound); 1 where a parallel region runs already.
int64_t team_size() {
  static const int64_t cpus = cpus_allowed();
  if (at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), cpus));
}

// f() by a team of team_size() members (one parallel region for all of f's ops), or by this
// thread alone where that is 1. An error of a member ends the others at their next barrier and
// is rethrown here. `pieces`: the team takes products of 1 MB and more in pieces (Team::pieces).
template <typename F>
void in_team(F&& f, bool pieces) {
  const int64_t threads = team_size();
  if (threads <= 1) return f();
  llamarun::Team team;
  std::vector<llamarun::TeamClaim> claims(threads);
  team.claims = claims.data();
  team.pieces = pieces;
  std::exception_ptr error;
  std::atomic<bool> caught{false};
#pragma omp parallel num_threads(threads)
  {
    team.size.store(omp_get_num_threads(), std::memory_order_relaxed);
    llamarun::t_team = &team;
    llamarun::t_rank = omp_get_thread_num();
    llamarun::t_products = 0;
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
  TORCH_CHECK(attn_norm.dim() == 1 && ffn_norm.sizes() == attn_norm.sizes() &&
                  (attn_norm.scalar_type() == at::kFloat ||
                   attn_norm.scalar_type() == at::kBFloat16) &&
                  ffn_norm.scalar_type() == attn_norm.scalar_type() && k_cache.dim() == 4,
              "decode_layers: norms and caches");
  Layer layer{attn_norm.contiguous(), ffn_norm.contiguous(), eps, {}, k_cache, v_cache, n_heads,
              scale};
  // the products' input widths: the layer's, the heads', the layer's, half the gate/up's
  const int64_t D = attn_norm.size(0);
  int64_t K[4] = {D, n_heads * k_cache.size(3), D, 0};
  for (int i = 0; i < 4; ++i) {
    const auto& [kind, a, b, c, group, n] = products[i];
    if (i == 3) K[3] = layer.products[2].N / 2;
    layer.products[i] = plan_product(kind, a, b, c, group, n, K[i]);
  }
  // decode_layers allocates its buffers for the first layer: the others' shapes must be its
  if (!layers.empty()) {
    const Layer& first = layers.front();
    bool same = first.n_heads == n_heads && first.k_cache.size(3) == k_cache.size(3) &&
                first.attn_norm.size(0) == D && first.attn_norm.scalar_type() ==
                attn_norm.scalar_type();
    for (int i = 0; i < 4; ++i) same = same && first.products[i].N == layer.products[i].N;
    TORCH_CHECK(same, "decode_layers: a stack's layers are of one shape and dtype");
  }
  layers.push_back(std::move(layer));
}

void LayerStack::set_head(const torch::Tensor& norm, double eps, const ProductArgs& product) {
  TORCH_CHECK(!layers.empty() && norm.dim() == 1 && norm.sizes() == layers[0].attn_norm.sizes() &&
                  norm.scalar_type() == layers[0].attn_norm.scalar_type(),
              "decode_logits: the head's norm is not of the layers' width and dtype");
  const auto& [kind, a, b, c, group, n] = product;
  head = Head{norm.contiguous(), eps, plan_product(kind, a, b, c, group, n, norm.size(0))};
}

void LayerStack::set_embedding(const torch::Tensor& table, const torch::Tensor& scales) {
  TORCH_CHECK(!layers.empty() && table.dim() == 2 && table.is_contiguous() &&
                  table.size(1) == layers[0].attn_norm.size(0),
              "decode_layers: the embedding is not a table of the layers' width");
  const bool int8 = table.scalar_type() == at::kChar;
  TORCH_CHECK(int8 ? scales.scalar_type() == at::kFloat && scales.dim() == 1 &&
                         scales.size(0) == table.size(0) && scales.is_contiguous()
                   : table.scalar_type() == layers[0].attn_norm.scalar_type() &&
                         scales.numel() == 0,
              "decode_layers: the embedding's rows are not of the layers' dtype, nor int8 with a "
              "float32 scale each");
  embedding = Embedding{table, scales};
}

namespace {

// The rows of e's table for the T ids (as the model's embedding module computes them: int8 rows
// times their scale in x's dtype, scale rounded first, as Int8Embedding does).
void embed_rows(const LayerStack::Embedding& e, const int64_t* ids, int64_t T,
                const torch::Tensor& out) {
  const int64_t V = e.table.size(0), D = e.table.size(1);
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(ids[t] >= 0 && ids[t] < V, "decode_layers: a token id past the embedding's ",
                V, " rows");
    void* o = at_row(out, t);
    if (e.scales.numel() == 0) {
      std::memcpy(o, at_row(e.table, ids[t]), D * out.element_size());
      continue;
    }
    const int8_t* q = static_cast<const int8_t*>(e.table.data_ptr()) + ids[t] * D;
    const float s = e.scales.data_ptr<float>()[ids[t]];
    if (bf16) {
      const float sb = float(c10::BFloat16(s));
      auto* ob = static_cast<c10::BFloat16*>(o);
      for (int64_t d = 0; d < D; ++d) ob[d] = c10::BFloat16(float(q[d]) * sb);
    } else {
      auto* of = static_cast<float*>(o);
      for (int64_t d = 0; d < D; ++d) of[d] = float(q[d]) * s;
    }
  }
}

// decode_layers' work, then with `logits` the stack's head (decode_logits).
torch::Tensor run_layers(const torch::Tensor& x, const LayerStack& stack,
                         const torch::Tensor& freqs, const torch::Tensor& rows,
                         const torch::Tensor& pos, bool logits) {
  if (stack.layers.empty()) return x;
  const auto& norm = stack.layers[0].attn_norm;  // (every layer's of one size and dtype)
  const bool ids = x.scalar_type() == at::kLong;  // token ids: their rows of the embedding first
  TORCH_CHECK(!ids || stack.embedding.has_value(), "decode_layers: token ids, but no embedding");
  TORCH_CHECK(ids || (x.dim() >= 1 && (x.scalar_type() == at::kFloat ||
                                       x.scalar_type() == at::kBFloat16)),
              "decode_layers: x float32 or bfloat16");
  TORCH_CHECK(!logits || stack.head.has_value(), "decode_logits: the stack has no head");
  const LayerStack::Head* head = logits ? &*stack.head : nullptr;
  TORCH_CHECK(ids || (x.size(-1) == norm.size(0) && x.scalar_type() == norm.scalar_type()),
              "decode_layers: x of the layers' width and dtype");
  const at::ScalarType dtype = norm.scalar_type();
  const bool bf16 = dtype == at::kBFloat16;
  const int64_t D = norm.size(0), T = ids ? x.numel() : x.numel() / D;
  auto sizes = x.sizes().vec();  // the hidden states' (..., D)
  if (ids) sizes.push_back(D);
  // The layers, by every member of a team alike (or by this thread alone). The products, the
  // rotation and the attention are split between the members, a barrier after each. The other
  // ops (the norms, the residual adds, SwiGLU, the heads' rounding to bfloat16) go by rows: in
  // passes of fewer than WHOLE_ROWS tokens (decode) each member runs them on all rows, on its
  // own copy of the residual stream (the same numbers in each); where one member ran them while
  // the others waited, a layer had 5 barriers more, and the others read each op's output from
  // that member's cache before their share of the next product (SmolLM2's decode 3-7% faster
  // this way). Longer passes split their rows between the members, a barrier after each op
  // (whole, every member would repeat a prompt's row ops, in buffers of its own: a 512-token
  // chunk of the 8B shape's 14,336-wide SwiGLU is 14 MB; a 512-token prefill of SmolLM2 Q8_0,
  // separate processes in turns, measured the same either way).
  constexpr int64_t WHOLE_ROWS = 4, PIECES_ROWS = 8;
  const int64_t members = team_size();
  const bool whole = T < WHOLE_ROWS;
  std::unique_lock<std::mutex> lock;
  const auto kept = buffers_for(stack, T, D, whole ? members : 1, norm.options(), head, lock);
  Buffers& b = *kept;
  torch::Tensor xc;
  if (ids) {
    const auto idc = x.contiguous();
    embed_rows(*stack.embedding, idc.data_ptr<int64_t>(), T, b.embedded);
    xc = b.embedded;
  } else {
    xc = x.contiguous().view({T, D});
  }
  // each token's (cos, sin) pairs: row pos[t] of the table (in Python an indexing op: 13 us of
  // a SmolLM2 decode token, its caches cold after the weights' stream)
  const int64_t half = b.freqs.size(1);
  TORCH_CHECK(freqs.scalar_type() == at::kFloat && freqs.dim() == 3 && freqs.size(1) == half &&
                  freqs.size(2) == 2 && freqs.is_contiguous(),
              "decode_layers: freqs, the RoPE table (positions, head size / 2, 2) float32");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.numel() == T && pos.is_contiguous(),
              "decode_layers: a position per token");
  for (int64_t t = 0; t < T; ++t) {
    const int64_t p = pos.data_ptr<int64_t>()[t];
    TORCH_CHECK(p >= 0 && p < freqs.size(0), "decode_layers: a position past the RoPE table");
    std::memcpy(b.freqs.data_ptr<float>() + t * half * 2, freqs.data_ptr<float>() + p * half * 2,
                half * 2 * sizeof(float));
  }
  const auto layers = [&]() {
    auto& me = b.own[whole && llamarun::t_team != nullptr ? llamarun::t_rank : 0];
    // f(r0, r1) over the rows [0, T): all of them by each member, or a share each
    const auto by_rows = [&](auto&& f) {
      if (whole || llamarun::t_team == nullptr)
        f(int64_t(0), T);
      else
        llamarun::team_share(T, f);
    };
    const torch::Tensor* h = &xc;  // the residual stream: x, then (from the first add) me.out
    const torch::Tensor* pending = nullptr;  // the last layer's down product, not yet added to h
    for (const auto& l : stack.layers) {
      const auto& [qkv_p, o_p, up_p, down_p] = l.products;
      llamarun::attend_prefetch(l.k_cache, l.v_cache, rows, pos, l.n_heads);
      by_rows([&](int64_t r0, int64_t r1) {
        if (pending != nullptr) residual_add(*h, *pending, me.out, r0, r1);
        llamarun::rms_norm_rows(at_row(*h, r0), l.attn_norm.data_ptr(), bf16, r1 - r0, D,
                                l.eps, at_row(me.normed, r0));
      });
      product(me.normed, dtype, qkv_p, b.qkv);
      llamarun::rope_write_to(b.qkv, b.freqs, l.k_cache, l.v_cache, rows, pos, l.n_heads, b.q);
      llamarun::attend_to(b.q, l.k_cache, l.v_cache, rows, pos, l.scale, b.y);
      if (bf16)  // (rounded once, as .to() rounds)
        by_rows([&](int64_t r0, int64_t r1) {
          const int64_t width = b.y.size(1) * b.y.size(2);
          store_bf16(b.y.data_ptr<float>() + r0 * width, (r1 - r0) * width,
                     static_cast<c10::BFloat16*>(at_row(me.heads, r0)));
        });
      product(bf16 ? me.heads : b.y, dtype, o_p, b.o);
      by_rows([&](int64_t r0, int64_t r1) {
        residual_add(*h, b.o, me.out, r0, r1);
        llamarun::rms_norm_rows(at_row(me.out, r0), l.ffn_norm.data_ptr(), bf16, r1 - r0, D,
                                l.eps, at_row(me.normed, r0));
      });
      h = &me.out;
      product(me.normed, dtype, up_p, b.gate_up);
      by_rows([&](int64_t r0, int64_t r1) {
        llamarun::silu_mul_rows(at_row(b.gate_up, r0), bf16, r1 - r0, up_p.N / 2,
                                at_row(me.hidden, r0));
      });
      product(me.hidden, dtype, down_p, b.down);
      pending = &b.down;
    }
    by_rows([&](int64_t r0, int64_t r1) {
      residual_add(*h, b.down, me.out, r0, r1);
      if (head != nullptr)  // the final norm, as the model's RMSNorm calls it
        llamarun::rms_norm_rows(at_row(me.out, r0), head->norm.data_ptr(), bf16, r1 - r0, D,
                                head->eps, at_row(me.normed, r0));
    });
    if (head == nullptr) return;
    product(me.normed, dtype, head->product, b.logits);
    if (bf16) {  // widened as .float() does, each member a share of the columns of every row
      const int64_t N = head->product.N;
      const auto [c0, c1] = llamarun::team_range(N);
      for (int64_t r = 0; r < T; ++r)
        load_bf16(static_cast<const c10::BFloat16*>(at_row(b.logits, r)) + c0, c1 - c0,
                  b.widened.data_ptr<float>() + r * N + c0);
    }
  };
  // Products of passes of a few rows stream their weights from memory, in pieces: see
  // kernels.h's team_pieces. A prompt chunk's compute, and measured slower in pieces (SmolLM2
  // BF16 pp512 0.96-0.97x), keep the halves.
  in_team(layers, T <= PIECES_ROWS);
  if (head == nullptr) return b.own[0].out.view(sizes);
  sizes.back() = head->product.N;
  return b.widened.view(sizes);
}

}  // namespace

torch::Tensor decode_layers(const torch::Tensor& x, const LayerStack& stack,
                            const torch::Tensor& freqs, const torch::Tensor& rows,
                            const torch::Tensor& pos) {
  return run_layers(x, stack, freqs, rows, pos, false);
}

torch::Tensor decode_logits(const torch::Tensor& x, const LayerStack& stack,
                            const torch::Tensor& freqs, const torch::Tensor& rows,
                            const torch::Tensor& pos) {
  return run_layers(x, stack, freqs, rows, pos, true);
}

}  // namespace llamarun
