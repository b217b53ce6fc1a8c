// What the extension's source files share (linear.cpp holds the Python module).
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

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

// 8 values -> float32 (from float32, or from bfloat16: its bits in the upper half).
LLAMARUN_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
LLAMARUN_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128((const __m128i*)p);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// 8 float32 values rounded to bfloat16 as c10::BFloat16 rounds (to nearest even; a NaN becomes
// its quiet NaN 0x7FC0), kept as float32: the bfloat16 is the upper 16 bits of each lane.
LLAMARUN_AVX2 inline __m256 round_bf16(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_and_si256(
      _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))),
      _mm256_set1_epi32(int(0xFFFF0000u)));
  return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)),
                          _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

// n bfloat16 values -> float32 (exact).
LLAMARUN_AVX2 inline void load_bf16(const c10::BFloat16* x, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, load8(x + i));
  for (; i < n; ++i) out[i] = float(x[i]);
}

// 8 float32 values -> p (float32 as they are; bfloat16 rounded by round_bf16): load8's inverse.
LLAMARUN_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
LLAMARUN_AVX2 inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i r = _mm256_srli_epi32(_mm256_castps_si256(round_bf16(v)), 16);
  // 8 x 32-bit lanes -> 8 x 16-bit values (they fit: no saturation)
  _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(_mm256_castsi256_si128(r),
                                                 _mm256_extracti128_si256(r, 1)));
}

// n float32 values -> bfloat16, rounding as c10::BFloat16 does (round_bf16): load_bf16's inverse.
LLAMARUN_AVX2 inline void store_bf16(const float* x, int64_t n, c10::BFloat16* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(out + i, _mm256_loadu_ps(x + i));
  for (; i < n; ++i) out[i] = c10::BFloat16(x[i]);
}

namespace llamarun {

constexpr int64_t GRAIN = 8;  // blocks of weight rows per thread task at least

// Whether a one-row pass takes the weight rows one at a time (each thread's weights then stream
// in address order): on AMD CPUs, where that measured faster (linear.cpp says by how much). The
// same test picks the 4-bit VNNI tile's farther prefetch (linear.cpp's FAR_PREFETCH).
inline bool rows_one_at_a_time() {
  __builtin_cpu_init();
  return __builtin_cpu_is("amd");
}
inline const bool ROW_STREAM = rows_one_at_a_time();

// Whether the one-row bfloat16 and int8 kernels (linear.cpp's bf16_row, int8_row) prefetch their
// rows ahead in software: not on AMD's family 19h (Zen 4; its Zen 3 lacks the AVX-512 they
// need), whose hardware prefetcher follows one row's stream alone and whose software prefetches
// only slow it (`python benchmarks/decode_ab.py --baseline`, AMD EPYC Zen 4: 1B BF16 1.141x,
// SmolLM2 BF16 1.135x, 1B Q8_0 1.085x, SmolLM2 Q8_0 1.076x without them; a scratch bf16_row over
// 1 GiB: 0.90 -> 1.00 of a fast minute's read). Zen 5 (family 1Ah) measured the other way and
// keeps them, as do later families, unmeasured. (The 4-bit tile keeps its prefetch everywhere:
// Zen 4 without it 0.97-0.98x.)
inline bool rows_prefetched() {
  __builtin_cpu_init();
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__builtin_cpu_is("amd") || !__get_cpuid(1, &a, &b, &c, &d)) return true;
  unsigned family = (a >> 8) & 0xf;
  if (family == 0xf) family += (a >> 20) & 0xff;
  return family != 0x19;
}
inline const bool ROW_PREFETCH = rows_prefetched();

// A one-row pass's order by name, for the *_linear_by functions (tests compare the orders,
// benchmarks time them): "rows" (one at a time: true) or "blocks" (false).
inline bool rows_by_name(const std::string& order, const char* op) {
  TORCH_CHECK(order == "rows" || order == "blocks", op, ": order rows or blocks");
  return order == "rows";
}

// Checks that an op's given output `out` is contiguous, of `sizes` and `dtype` ("<op>: out").
inline void check_output(const torch::Tensor& out, at::IntArrayRef sizes, at::ScalarType dtype,
                         const char* op) {
  TORCH_CHECK(out.sizes() == sizes && out.is_contiguous() && out.scalar_type() == dtype, op,
              ": out of the result's shape (", sizes, "), contiguous, ", dtype);
}

// The operands of y (M, N) = x (M, K) @ w (N, K)^T with x and w both of `dtype`: checked
// ("<op>: shapes", "<op>: <dtype_name> only"), made contiguous, and y allocated in x's options.
struct DenseOperands {
  torch::Tensor x, w, y;
  int64_t M, K, N;
};
inline DenseOperands dense_operands(const torch::Tensor& x, const torch::Tensor& w,
                                    at::ScalarType dtype, const char* op,
                                    const char* dtype_name) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), op, ": shapes");
  TORCH_CHECK(x.scalar_type() == dtype && w.scalar_type() == dtype, op, ": ", dtype_name,
              " only");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  return {xc, wc, torch::empty({M, N}, xc.options()), M, K, N};
}

// n values of T for a thread's use within one call, kept from call to call (per thread and
// Tag, a type naming the use: two uses live at once need two tags), so that a decode pass's
// products and row ops allocate nothing once their buffers are large enough: a SmolLM2 token
// made hundreds of allocations of this kind (glibc's malloc and free were 7% of its main thread's
// time). The values left by the last call are kept: callers write before they read.
template <typename T, typename Tag>
T* scratch(int64_t n) {
  thread_local std::vector<T> buf;
  if (int64_t(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// A team: the threads of one parallel region that run kernels.decode_layers' ops together,
// each product's, rotation's and attention's work split between them and a barrier after it
// (the other ops: see decode_layers), where each op would otherwise open
// and join a parallel region of its own (about 1.5 us each: 1.0 until the second thread
// started, 0.4 joining, timed in SmolLM2's decode; 5 regions a layer). The team's threads
// (member t_rank of t_team, set by decode_layers) call the same kernels with the same
// arguments; pieces_for, blocks_for and split_for give each its share and wait at the barrier.
// The row ops decode_layers runs call at::parallel_for, which runs inline in the region.
struct TeamAbort {};  // a barrier's answer when another member failed
// A share's claims in a team's product (team_pieces): the product's number in the team's run
// (high bits) and the share's next unclaimed block. 128 bytes each (see pieces_for's counters).
struct alignas(128) TeamClaim {
  std::atomic<int64_t> word{0};
};
constexpr int TEAM_CLAIM_BITS = 40;  // the block's bits of a claim word (the rest: the product)
struct Team {
  std::atomic<int64_t> size{1};
  alignas(128) std::atomic<int64_t> arrived{0};
  alignas(128) std::atomic<int64_t> phase{0};
  std::atomic<bool> failed{false};
  TeamClaim* claims = nullptr;  // one per member (decode_layers' in_team provides them)
  bool pieces = false;  // large products by team_pieces (passes of few rows), else in halves
  // Waits until every member arrived (throws TeamAbort where one failed instead).
  void barrier() {
    const int64_t gen = phase.load(std::memory_order_acquire);
    const int64_t last = size.load(std::memory_order_relaxed) - 1;
    if (arrived.fetch_add(1, std::memory_order_acq_rel) == last) {
      arrived.store(0, std::memory_order_relaxed);
      phase.store(gen + 1, std::memory_order_release);
      return;
    }
    for (int64_t spins = 0; phase.load(std::memory_order_acquire) == gen; ++spins) {
      if (failed.load(std::memory_order_relaxed)) throw TeamAbort{};
      _mm_pause();
      // past ~50 us (a member descheduled, or another slower), the CPU to whoever wants it
      if (spins > (int64_t(1) << 11)) std::this_thread::yield();
    }
  }
};
inline thread_local Team* t_team = nullptr;
inline thread_local int64_t t_rank = 0;
inline thread_local int64_t t_products = 0;  // team_pieces calls of this member in its team

// This member's equal share [b0, b1) of [0, n) (outside a team all of it).
inline std::pair<int64_t, int64_t> team_range(int64_t n) {
  if (t_team == nullptr) return {0, n};
  const int64_t size = t_team->size.load(std::memory_order_relaxed);
  const int64_t chunk = (n + size - 1) / size, b0 = std::min(n, t_rank * chunk);
  return {b0, std::min(n, b0 + chunk)};
}

// In a team: f(b0, b1) over this member's share of [0, n) (team_range), then the barrier.
template <typename F>
void team_share(int64_t n, F&& f) {
  const auto [b0, b1] = team_range(n);
  if (b0 < b1) f(b0, b1);
  t_team->barrier();
}

// at::parallel_for(begin, end, grain, f), or in a team each member's share.
template <typename F>
void split_for(int64_t begin, int64_t end, int64_t grain, F&& f) {
  if (t_team != nullptr)
    team_share(end - begin, [&](int64_t b0, int64_t b1) { f(begin + b0, begin + b1); });
  else
    at::parallel_for(begin, end, grain, f);
}

// Calls f(b0, b1) over blocks [0, n) (of block_bytes bytes of weights each) in pieces. Each
// thread owns an equal contiguous share (one long stream of weights, which the memory's
// prefetchers want) and, when done with it, takes the next pieces of the shares still
// unfinished (a counter per share): a thread that another process slows down does less of the
// work instead of keeping the others waiting at the end (measured: the calling thread spent 16%
// of an 8-row decode pass waiting in the 4-bit products on a shared 2-core machine). Which
// thread computes a block changes nothing in its results.
//
// A claim is an atomic add, which on x86 waits for the thread's loads in flight: about 0.1 us
// with the weights streaming from memory (AMD EPYC, 2 threads: SmolLM2's Q/K/V product, 960 x
// 576 4-bit weights, 3 tiles a claim, took each thread 6.2-6.9 us of work, 4.3-4.5 in fixed
// halves). So a piece is 1/16 of a share but at least PIECE_MIN bytes of weights (about 6 us of
// a core's stream, of which a claim is 2%) and at most PIECE_MAX.
constexpr int64_t PIECE_MIN = int64_t(256) << 10, PIECE_MAX = int64_t(2) << 20;
// A piece of pieces_for and team_pieces, in blocks of block_bytes bytes: 1/16 of a share of
// `share` blocks, but at least PIECE_MIN bytes and at most PIECE_MAX.
inline int64_t piece_blocks(int64_t share, int64_t block_bytes) {
  const int64_t bytes = std::clamp(share * block_bytes / 16, PIECE_MIN, PIECE_MAX);
  return std::clamp<int64_t>(bytes / std::max<int64_t>(block_bytes, 1), 1, share);
}

// pieces_for's work in a team: every member calls it (the members' products come in the same
// order), each takes its own share's pieces, then the others' still unclaimed, and all wait at
// the barrier. A share's claim word starts the product at the share's first block, set by
// whichever member claims from it first (the product's number tells a word left from the last
// product). Measured (AMD EPYC Zen 4, 2 threads, the 1B shape's Q4_0 decode): in fixed halves
// each member waited at a product's barrier about a tenth of the product's time, its half of
// the weights streamed faster or slower than the other's by turns.
template <typename F>
void team_pieces(int64_t n, int64_t block_bytes, F&& f) {
  Team& team = *t_team;
  const int64_t size = team.size.load(std::memory_order_relaxed);
  const int64_t share = (n + size - 1) / size, piece = piece_blocks(share, block_bytes);
  const int64_t product = ++t_products, mask = (int64_t(1) << TEAM_CLAIM_BITS) - 1;
  for (int64_t k = 0; k < size; ++k) {  // its own share first, then the others'
    const int64_t own = (t_rank + k) % size, start = own * share, end = std::min(n, start + share);
    if (start >= end) continue;
    std::atomic<int64_t>& word = team.claims[own].word;
    const int64_t first = (product << TEAM_CLAIM_BITS) | start;
    for (int64_t w = word.load(std::memory_order_acquire); (w >> TEAM_CLAIM_BITS) != product;)
      if (word.compare_exchange_weak(w, first, std::memory_order_acq_rel)) break;
    for (int64_t b0; (b0 = word.fetch_add(piece, std::memory_order_acq_rel) & mask) < end;)
      f(b0, std::min(b0 + piece, end));
  }
  team.barrier();
}

template <typename F>
void pieces_for(int64_t n, int64_t block_bytes, F&& f) {
  if (t_team != nullptr)
    return t_team->pieces ? team_pieces(n, block_bytes, f) : team_share(n, f);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + GRAIN - 1) / GRAIN);
  if (threads <= 1 || at::in_parallel_region()) {
    f(int64_t(0), n);
    return;
  }
  const int64_t share = (n + threads - 1) / threads, piece = piece_blocks(share, block_bytes);
  // 128 bytes a counter: with 64 the threads' counters shared a pair of cache lines, which the
  // CPU moves together, and every claim of a piece pulled the pair from the other core (AMD
  // EPYC, 2 threads: SmolLM2's Q/K/V product, 960 x 576 4-bit weights from the cache, took 9.1
  // us, one thread 7.2; with 128, 5.7)
  struct alignas(128) Counter { std::atomic<int64_t> next; };
  constexpr int64_t ON_STACK = 16;  // (an aligned vector's allocation for more threads)
  Counter local[ON_STACK];
  std::vector<Counter> more(threads > ON_STACK ? threads : 0);
  Counter* shares = threads > ON_STACK ? more.data() : local;
  for (int64_t t = 0; t < threads; ++t) shares[t].next.store(t * share);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t k = 0; k < threads; ++k) {  // its own share first, then the others'
        const int64_t own = (t + k) % threads, end = std::min(n, (own + 1) * share);
        for (int64_t b0; (b0 = shares[own].next.fetch_add(piece)) < end;)
          f(b0, std::min(b0 + piece, end));
      }
  });
}

// Calls f(b0, b1) over the blocks [0, n) of a product of `bytes` bytes of weights: from
// PIECES_BYTES on by pieces_for, below it in fixed equal shares (at::parallel_for), which need
// no claims. Every product kernel splits its blocks this way. Measured (AMD EPYC, 2 threads,
// cold weights, the old and new builds in turns): the halves of a 4-16 MB int8 product ended
// 1-3 us apart; with pieces 8-32 MB products ran 1-2% faster and 1-2 MB ones 1-3% slower.
constexpr int64_t PIECES_BYTES = int64_t(8) << 20;
// In a team whose pass takes pieces (Team::pieces), products of this many bytes of weights or
// more go by team_pieces (README: "Products of 1 MB and more in pieces inside the team").
constexpr int64_t TEAM_PIECES_BYTES = int64_t(1) << 20;
template <typename F>
void blocks_for(int64_t n, int64_t bytes, F&& f) {
  if (t_team != nullptr && t_team->pieces && bytes >= TEAM_PIECES_BYTES)
    team_pieces(n, bytes / n, f);
  else if (t_team != nullptr)
    team_share(n, f);
  else if (bytes >= PIECES_BYTES)
    pieces_for(n, bytes / n, f);
  else
    at::parallel_for(0, n, GRAIN, f);
}

// A product's weights as its kernel reads them, checked once (linear.cpp: dense_plan,
// int8_plan, int4_plan, or plan_product by decode_layers' kinds); run_product then runs it on rows
// of activations without touching a tensor. Every product runs through a plan: the tensor
// functions (int4_linear, ...) make one per call, a LayerStack one per product when it is made
// (a decode pass's weights push the tensors' own data out of the cache: SmolLM2's Q/K/V
// product spent 1.3 us of its 8.4 in the tensor checks around the kernel).
struct ProductPlan {
  int64_t kind = -1;               // 0 dense, 1 int8, 2 4-bit
  at::ScalarType dtype = at::kFloat;  // dense: the weight's (the activations' it takes)
  torch::Tensor w, scales, zeros;  // held: the pointers below point into them
  const void* wp = nullptr;
  const void* sp = nullptr;
  const uint16_t* zp = nullptr;
  bool bf16_scales = false;  // int8: bfloat16 scales (else float32)
  bool stream = true;        // dense and int8: a one-row pass's order (ROW_STREAM's)
  int code = -1;             // 4-bit: Int4Code, or -1: by the rows (int4_linear's choice)
  int64_t N = 0, K = 0, Gp = 0, group = 0;
};
ProductPlan dense_plan(const torch::Tensor& w, bool stream);
ProductPlan int8_plan(const torch::Tensor& w, const torch::Tensor& wscale, bool stream);
ProductPlan int4_plan(const torch::Tensor& w, const torch::Tensor& d, const torch::Tensor& z,
                      int64_t group, int64_t N, int64_t K, int code);
// (kind, a, b, c, group, n) as decode_layers' products, for inputs of width K
ProductPlan plan_product(int64_t kind, const torch::Tensor& a, const torch::Tensor& b,
                         const torch::Tensor& c, int64_t group, int64_t n, int64_t K);
// y (M, N) = x (M, K) @ W^T; x and y contiguous, of xtype (bfloat16 or float32)
void run_product(const ProductPlan& p, const void* x, at::ScalarType xtype, int64_t M, void* y);
// f32.cpp: the float32 product on pointers, and the one-row order f32_linear takes
void f32_product(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
                 bool stream);
bool f32_streams();

// linear.cpp's products (Python's checks first: see llamarun/kernels/__init__.py)
}  // namespace llamarun
torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& w);
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& w,
                          const torch::Tensor& wscale);
torch::Tensor int4_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& d,
                          const torch::Tensor& z, int64_t group, int64_t N);
namespace llamarun {

bool attend_supported();  // the CPU has what attend's code needs (AVX2, FMA)
// the attention's vector lanes from now on (8; 16 where the CPU has AVX-512, its choice: the
// scores' sums differ in their last bits between the two), for tests; returns the lanes before
int64_t attention_lanes(int64_t lanes);
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     const torch::Tensor& rows, const torch::Tensor& pos, double scale);
torch::Tensor rope_write(const torch::Tensor& qkv, const torch::Tensor& freqs,
                         torch::Tensor& k_cache, torch::Tensor& v_cache,
                         const torch::Tensor& rows, const torch::Tensor& pos, int64_t H);
// attend into out ((T, H, D) float32, contiguous), making no new reference to any operand (a
// team's threads call it together: see contiguous_ref in attention.cpp)
void attend_to(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
               const torch::Tensor& rows, const torch::Tensor& pos, double scale,
               const torch::Tensor& out);
// called before attend_to: the first keys and values of the calling thread's share of its work
// (attention.cpp says which) fetched into its cache; the same operands but for q, H its heads
void attend_prefetch(const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& rows,
                     const torch::Tensor& pos, int64_t H);
// rope_write into q ((T, H, D) float32, contiguous), making no new reference to any operand (as
// attend_to)
void rope_write_to(const torch::Tensor& qkv, const torch::Tensor& freqs,
                   const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                   const torch::Tensor& rows, const torch::Tensor& pos, int64_t H,
                   const torch::Tensor& q);
// rowwise.cpp (run where attend_supported says so: the same features)
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor silu_mul(const torch::Tensor& x);
// the same on rows of pointers (float32, or bfloat16: bf16), unchecked: x (rows, D), w (D) and
// out (rows, D) for the norm; x (rows, 2H), out (rows, H) for SwiGLU
void rms_norm_rows(const void* x, const void* w, bool bf16, int64_t rows, int64_t D, double eps,
                   void* out);
void silu_mul_rows(const void* x, bool bf16, int64_t rows, int64_t H, void* out);
torch::Tensor argmax_rows(const torch::Tensor& x);
// f32.cpp (AVX-512 where the CPU has it, else AVX2 + FMA, as attend)
torch::Tensor f32_linear(const torch::Tensor& x, const torch::Tensor& w);
torch::Tensor f32_linear_by(const torch::Tensor& x, const torch::Tensor& w, const std::string& order);
// layer.cpp: consecutive layers of a pass (where attend_supported says so), each by the
// operands it keeps from pass to pass: its norms' weights, its 4 products (Q/K/V, output,
// gate/up, down), its KV cache, its head count and attention scale.
using ProductArgs = std::tuple<int64_t, torch::Tensor, torch::Tensor, torch::Tensor, int64_t,
                               int64_t>;
struct LayerStack {
  struct Layer {
    torch::Tensor attn_norm, ffn_norm;
    double eps;
    ProductPlan products[4];  // (plan_product's)
    torch::Tensor k_cache, v_cache;
    int64_t n_heads;
    double scale;
  };
  std::vector<Layer> layers;
  // The model's final norm and output product, after the last layer (decode_logits)
  struct Head {
    torch::Tensor norm;
    double eps;
    ProductPlan product;
  };
  std::optional<Head> head;
  // The model's embedding table before the first layer (set_embedding: decode_layers then takes
  // token ids): rows of the layers' dtype, or int8 rows with a float32 scale each
  struct Embedding {
    torch::Tensor table, scales;
  };
  std::optional<Embedding> embedding;
  // The buffers of the stack's last decode pass (layer.cpp's Buffers), which the next pass of
  // as many tokens reuses: a pass is one call at a time per stack (the mutex: a second caller
  // meanwhile allocates its own)
  mutable std::shared_ptr<void> scratch;
  mutable std::mutex scratch_mutex;
  void add(const torch::Tensor& attn_norm, const torch::Tensor& ffn_norm, double eps,
           const std::vector<ProductArgs>& products, const torch::Tensor& k_cache,
           const torch::Tensor& v_cache, int64_t n_heads, double scale);
  void set_head(const torch::Tensor& norm, double eps, const ProductArgs& product);
  void set_embedding(const torch::Tensor& table, const torch::Tensor& scales);
};
// x (..., D): the pass's hidden states, or its token ids (int64, where the stack holds the
// embedding); freqs the RoPE table (positions, head size / 2, 2), row pos[t] for token t
torch::Tensor decode_layers(const torch::Tensor& x, const LayerStack& stack,
                            const torch::Tensor& freqs, const torch::Tensor& rows,
                            const torch::Tensor& pos);
// decode_layers, then the stack's head: float32 logits (..., N) of x's rows
torch::Tensor decode_logits(const torch::Tensor& x, const LayerStack& stack,
                            const torch::Tensor& freqs, const torch::Tensor& rows,
                            const torch::Tensor& pos);

}  // namespace llamarun
