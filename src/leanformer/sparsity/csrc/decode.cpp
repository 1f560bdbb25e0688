// Batch-1 decoding of a LLaMA-family causal LM in one compiled step per token (leanformer.sparsity.decode).
//
// At batch 1 every matrix product is a matrix-vector product: each weight is read once per token and used for
// one multiply-add, so a token costs (bytes of weights) / (memory bandwidth) and nothing else should matter.
// PyTorch's one-row fp32 product reaches a third of the bandwidth on a 2-core CPU, and the ~400 small ops per
// token of an eager forward add their dispatch. Here a Decoder holds the weights (views of the model's, or
// re-laid-out copies), a static KV cache and scratch buffers; `step(token, pos)` runs embedding, every layer and
// the LM head without returning to Python and without allocating.
//
// Two products, each streaming its weight once:
//   rows layout (out, in)   y[j] = dot(w[j], x)            four rows per pass, threads own row ranges
//   cols layout (in, out)   y += x[i] * w[i]  for each i    threads own ranges of i, partial sums reduced
// The cols layout is what input sparsity needs (TEAL: inputs with |x_i| <= t skip row i of the weight); the
// rows layout is what output sparsity needs (CATS: the up projection only for units whose gate survives). Which
// layout runs dense is the caller's choice, made by measurement.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kLine = 16;  // floats per 64-byte cache line
enum Activation : int64_t { kSiLU = 0, kGELUTanh = 1, kFATReLU = 2 };  // FATReLU at threshold 0 is ReLU

struct Linear {
  torch::Tensor weight;  // contiguous fp32, (out, in) when rows, (in, out) when cols
  torch::Tensor bias;    // (out) or undefined
  bool cols = false;
  float threshold = -1.f;  // cols only: inputs with |x| <= threshold are skipped; < 0: dense
  int64_t in = 0, out = 0;
};

Linear make_linear(const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias, bool cols,
                   const char* what) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat && weight.is_contiguous(), what,
              ": expected a contiguous 2-D float32 weight");
  Linear l;
  l.weight = weight;
  l.cols = cols;
  l.in = cols ? weight.size(0) : weight.size(1);
  l.out = cols ? weight.size(1) : weight.size(0);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == l.out && bias->scalar_type() == torch::kFloat && bias->is_contiguous(), what,
                ": bias must be a contiguous float32 vector of ", l.out);
    l.bias = *bias;
  }
  return l;
}

void check_vector(const torch::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.numel() == n && t.scalar_type() == torch::kFloat && t.is_contiguous(), what,
              ": expected a contiguous float32 vector of ", n);
}

// Threads used for a product of this many multiply-adds: below ~32k, waking the pool costs more than it saves.
int64_t threads_for(int64_t work) { return work < (1 << 15) ? 1 : at::get_num_threads(); }

// y[r] = dot(w[r], x) for r in [r0, r1) (w row-major, d columns), four rows per pass so x is read once per four.
void rows_range(const float* w, const float* x, int64_t d, int64_t r0, int64_t r1, float* y) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const float* w0 = w + r * d;
    const float* w1 = w0 + d;
    const float* w2 = w1 + d;
    const float* w3 = w2 + d;
    float a0[kLine] = {0.f}, a1[kLine] = {0.f}, a2[kLine] = {0.f}, a3[kLine] = {0.f};
    int64_t c = 0;
    for (; c + kLine <= d; c += kLine) {
#pragma omp simd
      for (int64_t u = 0; u < kLine; ++u) {
        const float xv = x[c + u];
        a0[u] += w0[c + u] * xv;
        a1[u] += w1[c + u] * xv;
        a2[u] += w2[c + u] * xv;
        a3[u] += w3[c + u] * xv;
      }
    }
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    for (; c < d; ++c) {
      s0 += w0[c] * x[c];
      s1 += w1[c] * x[c];
      s2 += w2[c] * x[c];
      s3 += w3[c] * x[c];
    }
    for (int64_t u = 0; u < kLine; ++u) {
      s0 += a0[u];
      s1 += a1[u];
      s2 += a2[u];
      s3 += a3[u];
    }
    y[r] = s0;
    y[r + 1] = s1;
    y[r + 2] = s2;
    y[r + 3] = s3;
  }
  for (; r < r1; ++r) {
    float s = 0.f;
    for (int64_t c = 0; c < d; ++c) s += w[r * d + c] * x[c];
    y[r] = s;
  }
}

// y[j] = dot(w[idx[j]], x) for the listed rows only (w row-major), the next row prefetched while one is read.
void rows_listed(const float* w, const float* x, int64_t d, const int32_t* idx, int64_t k, float* y) {
  at::parallel_for(0, k, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, d)), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const float* row = w + static_cast<int64_t>(idx[j]) * d;
      const float* next = w + static_cast<int64_t>(idx[std::min(j + 1, j1 - 1)]) * d;
      float acc[kLine] = {0.f};
      int64_t c = 0;
      for (; c + kLine <= d; c += kLine) {
        __builtin_prefetch(next + c, 0, 0);
#pragma omp simd
        for (int64_t u = 0; u < kLine; ++u) acc[u] += row[c + u] * x[c + u];
      }
      float s = 0.f;
      for (; c < d; ++c) s += row[c] * x[c];
      for (int64_t u = 0; u < kLine; ++u) s += acc[u];
      y[j] = s;
    }
  });
}

// p[:n] = sum over listed inputs i of x[i] * w[i, :n] (w input-major), four rows per pass. While a pass reads a
// cache line of its four rows it asks for the same line of the next pass's four: listed rows are not contiguous,
// so the hardware prefetcher alone would stall at every jump.
void cols_range(const float* w, const float* x, int64_t n, const int32_t* idx, int64_t k0, int64_t k1, float* p) {
  std::fill(p, p + n, 0.f);
  const int64_t whole = n / kLine * kLine;
  int64_t j = k0;
  for (; j + 4 <= k1; j += 4) {
    const float* r0 = w + static_cast<int64_t>(idx[j]) * n;
    const float* r1 = w + static_cast<int64_t>(idx[j + 1]) * n;
    const float* r2 = w + static_cast<int64_t>(idx[j + 2]) * n;
    const float* r3 = w + static_cast<int64_t>(idx[j + 3]) * n;
    const float x0 = x[idx[j]], x1 = x[idx[j + 1]], x2 = x[idx[j + 2]], x3 = x[idx[j + 3]];
    const bool ahead = j + 8 <= k1;
    const float* n0 = ahead ? w + static_cast<int64_t>(idx[j + 4]) * n : r0;
    const float* n1 = ahead ? w + static_cast<int64_t>(idx[j + 5]) * n : r1;
    const float* n2 = ahead ? w + static_cast<int64_t>(idx[j + 6]) * n : r2;
    const float* n3 = ahead ? w + static_cast<int64_t>(idx[j + 7]) * n : r3;
    for (int64_t c = 0; c < whole; c += kLine) {
      __builtin_prefetch(n0 + c, 0, 0);
      __builtin_prefetch(n1 + c, 0, 0);
      __builtin_prefetch(n2 + c, 0, 0);
      __builtin_prefetch(n3 + c, 0, 0);
#pragma omp simd
      for (int64_t u = c; u < c + kLine; ++u) p[u] += x0 * r0[u] + x1 * r1[u] + x2 * r2[u] + x3 * r3[u];
    }
    for (int64_t u = whole; u < n; ++u) p[u] += x0 * r0[u] + x1 * r1[u] + x2 * r2[u] + x3 * r3[u];
  }
  for (; j < k1; ++j) {
    const float* r = w + static_cast<int64_t>(idx[j]) * n;
    const float xv = x[idx[j]];
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) p[c] += xv * r[c];
  }
}

// Buffers a product needs besides its output: per-thread partial sums (cols layout) and the list of inputs used.
struct Scratch {
  torch::Tensor partial;  // (threads, widest output)
  std::vector<int32_t> index;
  std::vector<int32_t> every;  // 0, 1, 2, ...: the list of a dense cols product
  int64_t used = 0, total = 0;  // inputs read / inputs offered by thresholded products, for the report

  void reserve(int64_t widest, int64_t inputs) {
    if (!partial.defined() || partial.size(0) < at::get_num_threads() || partial.size(1) < widest) {
      partial = torch::zeros({at::get_num_threads(), widest}, torch::kFloat);
    }
    if (static_cast<int64_t>(index.size()) < inputs) {
      index.assign(static_cast<size_t>(inputs), 0);
      every.resize(static_cast<size_t>(inputs));
      for (int64_t i = 0; i < inputs; ++i) every[i] = static_cast<int32_t>(i);
    }
  }
};

// y = sum over the k listed inputs of x[i] * w[i] (cols layout): per-thread partial sums, then one reduction.
void cols_listed(const Linear& l, const float* x, const int32_t* idx, int64_t k, float* y, Scratch& s) {
  const float* w = l.weight.data_ptr<float>();
  const int64_t n = l.out;
  const int64_t threads = std::min<int64_t>(threads_for(k * n), s.partial.size(0));
  const int64_t chunk = (k + threads - 1) / threads;
  float* partial = s.partial.data_ptr<float>();
  const int64_t stride = s.partial.size(1);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      cols_range(w, x, n, idx, std::min(t * chunk, k), std::min((t + 1) * chunk, k), partial + t * stride);
    }
  });
  std::copy(partial, partial + n, y);
  for (int64_t t = 1; t < threads; ++t) {
    const float* p = partial + t * stride;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) y[c] += p[c];
  }
}

// y = l(x), dense or with l's input threshold; y may not alias x.
void product(const Linear& l, const float* x, float* y, Scratch& s) {
  const float* w = l.weight.data_ptr<float>();
  if (!l.cols) {
    const int64_t threads = threads_for(l.in * l.out);
    const int64_t chunk = ((l.out + threads - 1) / threads + 3) / 4 * 4;
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) rows_range(w, x, l.in, std::min(t * chunk, l.out),
                                                   std::min((t + 1) * chunk, l.out), y);
    });
  } else {
    if (l.threshold < 0) {
      cols_listed(l, x, s.every.data(), l.in, y, s);
    } else {
      int64_t k = 0;
      for (int64_t i = 0; i < l.in; ++i) {
        if (!(std::fabs(x[i]) <= l.threshold)) s.index[k++] = static_cast<int32_t>(i);
      }
      s.used += k;
      s.total += l.in;
      cols_listed(l, x, s.index.data(), k, y, s);
    }
  }
  if (l.bias.defined()) {
    const float* b = l.bias.data_ptr<float>();
    for (int64_t j = 0; j < l.out; ++j) y[j] += b[j];
  }
}

// One dense product in either layout, for timing the layouts against each other (leanformer.sparsity.tune).
torch::Tensor matvec(const torch::Tensor& weight, const torch::Tensor& x, bool cols, double threshold) {
  Linear l = make_linear(weight, c10::nullopt, cols, "matvec");
  TORCH_CHECK(threshold < 0 || cols, "matvec: an input threshold needs the cols layout");
  l.threshold = static_cast<float>(threshold);
  check_vector(x, l.in, "matvec x");
  Scratch s;
  s.reserve(l.out, l.in);
  auto y = torch::empty({l.out}, x.options());
  product(l, x.data_ptr<float>(), y.data_ptr<float>(), s);
  return y;
}

class Decoder {
 public:
  Decoder(torch::Tensor embed, double embed_scale, torch::Tensor final_norm, torch::Tensor lm_head,
          torch::Tensor cos, torch::Tensor sin, int64_t heads, int64_t kv_heads, int64_t head_dim, double eps,
          double attn_scale, int64_t window)
      : embed_(embed), final_norm_(final_norm), cos_(cos), sin_(sin), embed_scale_(embed_scale), eps_(eps),
        attn_scale_(attn_scale), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), window_(window) {
    TORCH_CHECK(embed.dim() == 2 && embed.scalar_type() == torch::kFloat && embed.is_contiguous(),
                "Decoder: embedding must be a contiguous (vocab, hidden) float32 matrix");
    vocab_ = embed.size(0);
    d_ = embed.size(1);
    check_vector(final_norm, d_, "Decoder final norm");
    lm_head_ = make_linear(lm_head, c10::nullopt, false, "Decoder lm_head");
    TORCH_CHECK(lm_head_.in == d_, "Decoder: lm_head takes ", lm_head_.in, " features, the model has ", d_);
    TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "Decoder: heads must be a multiple of kv_heads");
    TORCH_CHECK(cos.dim() == 2 && cos.size(1) == head_dim && sin.sizes() == cos.sizes() && cos.is_contiguous() &&
                    sin.is_contiguous() && cos.scalar_type() == torch::kFloat && sin.scalar_type() == torch::kFloat,
                "Decoder: cos/sin must be contiguous float32 (positions, head_dim) tables");
    max_len_ = cos.size(0);
  }

  void add_layer(torch::Tensor in_norm, torch::Tensor qkv, c10::optional<torch::Tensor> qkv_bias, bool qkv_cols,
                 c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm, torch::Tensor o,
                 bool o_cols, torch::Tensor post_norm, torch::Tensor gate, bool gate_cols, torch::Tensor up,
                 bool up_cols, torch::Tensor down, bool down_cols, int64_t activation, double act_threshold) {
    TORCH_CHECK(activation >= kSiLU && activation <= kFATReLU, "Decoder: unknown activation ", activation);
    Layer l;
    l.activation = static_cast<int>(activation);
    l.act_threshold = static_cast<float>(act_threshold);
    check_vector(in_norm, d_, "Decoder input norm");
    check_vector(post_norm, d_, "Decoder post-attention norm");
    l.in_norm = in_norm;
    l.post_norm = post_norm;
    l.qkv = make_linear(qkv, qkv_bias, qkv_cols, "Decoder qkv");
    TORCH_CHECK(l.qkv.in == d_ && l.qkv.out == (heads_ + 2 * kv_heads_) * head_dim_,
                "Decoder: qkv weight has the wrong shape");
    if (q_norm.has_value() && q_norm->defined()) {
      check_vector(*q_norm, head_dim_, "Decoder q norm");
      check_vector(*k_norm, head_dim_, "Decoder k norm");
      l.q_norm = *q_norm;
      l.k_norm = *k_norm;
    }
    l.o = make_linear(o, c10::nullopt, o_cols, "Decoder o_proj");
    l.gate = make_linear(gate, c10::nullopt, gate_cols, "Decoder gate_proj");
    l.up = make_linear(up, c10::nullopt, up_cols, "Decoder up_proj");
    l.down = make_linear(down, c10::nullopt, down_cols, "Decoder down_proj");
    TORCH_CHECK(l.o.in == heads_ * head_dim_ && l.o.out == d_ && l.gate.in == d_ && l.up.in == d_ &&
                    l.gate.out == l.up.out && l.down.in == l.gate.out && l.down.out == d_,
                "Decoder: projection shapes do not chain");
    l.k_cache = torch::zeros({kv_heads_, max_len_, head_dim_}, embed_.options());
    l.v_cache = torch::zeros({kv_heads_, max_len_, head_dim_}, embed_.options());
    layers_.push_back(std::move(l));
    ff_ = std::max(ff_, layers_.back().gate.out);
    allocate();
  }

  // Input sparsity per projection (TEAL), -1 for dense; the projection must be in the cols layout.
  void set_input_thresholds(int64_t layer, double qkv, double o, double gate_up, double down) {
    TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers_.size()), "layer ", layer, " out of range");
    Layer& l = layers_[layer];
    set_threshold(l.qkv, qkv, "qkv");
    set_threshold(l.o, o, "o_proj");
    set_threshold(l.gate, gate_up, "gate_proj");
    set_threshold(l.up, gate_up, "up_proj");
    set_threshold(l.down, down, "down_proj");
  }

  // CATS: units whose |act(gate)| <= threshold are zero; up then runs for the others only (rows layout) and down
  // reads only their rows (cols layout). -1: dense.
  void set_ffn_threshold(int64_t layer, double threshold) {
    TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers_.size()), "layer ", layer, " out of range");
    Layer& l = layers_[layer];
    TORCH_CHECK(threshold < 0 || (!l.up.cols && l.down.cols),
                "Decoder: an FFN threshold needs up_proj in the rows layout and down_proj in the cols layout");
    l.ffn_threshold = static_cast<float>(threshold);
  }

  // Deja Vu-style prediction for a ReLU-family FFN: logits = fc2(fc1(h)) + bias; the units with logits > threshold
  // are the only ones whose gate is computed (gate rows layout), and of those the nonzero ones run through up (rows)
  // and down (cols). A unit the predictor misses is taken as zero: approximate, by design.
  void set_predictor(int64_t layer, torch::Tensor fc1, torch::Tensor fc2_cols, torch::Tensor bias, double threshold) {
    TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers_.size()), "layer ", layer, " out of range");
    Layer& l = layers_[layer];
    TORCH_CHECK(l.activation == kFATReLU, "Decoder: a predictor needs a ReLU or FATReLU FFN activation");
    TORCH_CHECK(!l.gate.cols && !l.up.cols && l.down.cols && l.ffn_threshold < 0 && l.gate.threshold < 0 &&
                    l.down.threshold < 0,
                "Decoder: a predictor needs gate_proj and up_proj in the rows layout, down_proj in the cols layout "
                "and no other FFN threshold");
    l.pred_in = make_linear(fc1, c10::nullopt, false, "predictor fc1");
    l.pred_out = make_linear(fc2_cols, bias, true, "predictor fc2");
    TORCH_CHECK(l.pred_in.in == d_ && l.pred_out.in == l.pred_in.out && l.pred_out.out == l.gate.out,
                "Decoder: predictor shapes (", l.pred_in.out, "x", l.pred_in.in, ", ", l.pred_out.in, "x",
                l.pred_out.out, ") do not fit hidden ", d_, " and FFN width ", l.gate.out);
    l.pred_threshold = static_cast<float>(threshold);
    l.predicted = true;
    rank_ = std::max(rank_, l.pred_in.out);
    allocate();
  }

  // Positions below this run predicted layers exactly (dense gate) rather than predicted: see decode.py.
  void set_exact_prefix(int64_t positions) {
    TORCH_CHECK(positions >= 0, "Decoder: exact_prefix must be >= 0");
    exact_prefix_ = positions;
  }

  torch::Tensor step(int64_t token, int64_t pos) {
    TORCH_CHECK(token >= 0 && token < vocab_, "Decoder.step: token ", token, " out of range [0, ", vocab_, ")");
    TORCH_CHECK(pos >= 0 && pos < max_len_, "Decoder.step: position ", pos, " outside the cache of ", max_len_);
    const auto t0 = Clock::now();
    float* x = x_.data_ptr<float>();
    const float* e = embed_.data_ptr<float>() + token * d_;
    for (int64_t c = 0; c < d_; ++c) x[c] = e[c] * static_cast<float>(embed_scale_);
    auto t = Clock::now();
    rest_ns_ += ns(t0, t);
    const bool predict = pos >= exact_prefix_;
    for (Layer& l : layers_) {
      attention(l, pos);
      auto t2 = Clock::now();
      attention_ns_ += ns(t, t2);
      ffn(l, predict);
      t = Clock::now();
      ffn_ns_ += ns(t2, t);
    }
    rms_norm(x, final_norm_.data_ptr<float>(), h_.data_ptr<float>());
    auto logits = torch::empty({vocab_}, embed_.options());
    product(lm_head_, h_.data_ptr<float>(), logits.data_ptr<float>(), scratch_);
    lm_head_ns_ += ns(t, Clock::now());
    ++tokens_;
    return logits;
  }

  // Seconds spent per part since the last reset, and the tokens stepped; the fraction of inputs (cols layouts with
  // a threshold) or units (FFN threshold) each sparse product computed.
  std::vector<double> timings() const {
    return {attention_ns_ * 1e-9, ffn_ns_ * 1e-9, lm_head_ns_ * 1e-9, rest_ns_ * 1e-9, static_cast<double>(tokens_),
            scratch_.total ? static_cast<double>(scratch_.used) / static_cast<double>(scratch_.total) : 1.0};
  }

  void reset_timings() {
    attention_ns_ = ffn_ns_ = lm_head_ns_ = rest_ns_ = 0;
    tokens_ = scratch_.used = scratch_.total = 0;
  }

  int64_t max_len() const { return max_len_; }

 private:
  using Clock = std::chrono::steady_clock;
  static int64_t ns(Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(b - a).count();
  }

  struct Layer {
    torch::Tensor in_norm, post_norm, q_norm, k_norm, k_cache, v_cache;
    Linear qkv, o, gate, up, down;
    int activation = kSiLU;
    float act_threshold = 0.f;  // FATReLU: x if x >= act_threshold, else 0
    float ffn_threshold = -1.f;
    Linear pred_in, pred_out;  // predictor fc1 (rows) and fc2 (cols), when predicted
    float pred_threshold = 0.f;
    bool predicted = false;
  };

  static void set_threshold(Linear& l, double t, const char* what) {
    TORCH_CHECK(t < 0 || l.cols, "Decoder: an input threshold on ", what, " needs its weight in the cols layout");
    l.threshold = static_cast<float>(t);
  }

  void allocate() {
    const auto opt = embed_.options();
    const int64_t widest = std::max({d_, ff_, rank_, (heads_ + 2 * kv_heads_) * head_dim_});
    x_ = torch::zeros({d_}, opt);
    h_ = torch::zeros({widest}, opt);
    qkv_ = torch::zeros({(heads_ + 2 * kv_heads_) * head_dim_}, opt);
    att_ = torch::zeros({heads_ * head_dim_}, opt);
    gate_ = torch::zeros({ff_}, opt);
    up_ = torch::zeros({ff_}, opt);
    logits_ = torch::zeros({ff_}, opt);
    z_ = torch::zeros({std::max<int64_t>(rank_, 1)}, opt);
    scores_ = torch::zeros({heads_, max_len_}, opt);
    scratch_.reserve(widest, std::max(widest, ff_));
  }

  // RMSNorm in fp32 as HF computes it: x * rsqrt(mean(x^2) + eps) * weight.
  void rms_norm(const float* x, const float* w, float* out) const { rms_norm_n(x, w, out, d_); }
  void rms_norm_n(const float* x, const float* w, float* out, int64_t n) const {
    float ss = 0.f;
    for (int64_t c = 0; c < n; ++c) ss += x[c] * x[c];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + static_cast<float>(eps_));
    for (int64_t c = 0; c < n; ++c) out[c] = w[c] * (x[c] * inv);
  }

  void rope(float* v, int64_t pos) const {
    const float* cs = cos_.data_ptr<float>() + pos * head_dim_;
    const float* sn = sin_.data_ptr<float>() + pos * head_dim_;
    const int64_t half = head_dim_ / 2;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cs[i] - b * sn[i];
      v[i + half] = b * cs[i + half] + a * sn[i + half];
    }
  }

  void attention(Layer& l, int64_t pos) {
    float* x = x_.data_ptr<float>();
    float* h = h_.data_ptr<float>();
    float* qkv = qkv_.data_ptr<float>();
    rms_norm(x, l.in_norm.data_ptr<float>(), h);
    product(l.qkv, h, qkv, scratch_);
    const int64_t hd = head_dim_;
    float* q = qkv;
    float* k = qkv + heads_ * hd;
    float* v = k + kv_heads_ * hd;
    if (l.q_norm.defined()) {
      for (int64_t i = 0; i < heads_; ++i) rms_norm_n(q + i * hd, l.q_norm.data_ptr<float>(), q + i * hd, hd);
      for (int64_t i = 0; i < kv_heads_; ++i) rms_norm_n(k + i * hd, l.k_norm.data_ptr<float>(), k + i * hd, hd);
    }
    for (int64_t i = 0; i < heads_; ++i) rope(q + i * hd, pos);
    float* kc = l.k_cache.data_ptr<float>();
    float* vc = l.v_cache.data_ptr<float>();
    for (int64_t g = 0; g < kv_heads_; ++g) {
      rope(k + g * hd, pos);
      std::copy(k + g * hd, k + (g + 1) * hd, kc + (g * max_len_ + pos) * hd);
      std::copy(v + g * hd, v + (g + 1) * hd, vc + (g * max_len_ + pos) * hd);
    }
    const int64_t start = window_ > 0 ? std::max<int64_t>(0, pos - window_ + 1) : 0;
    const int64_t group = heads_ / kv_heads_;
    float* att = att_.data_ptr<float>();
    float* scores = scores_.data_ptr<float>();
    at::parallel_for(0, heads_, threads_for(heads_ * (pos + 1) * hd) > 1 ? 1 : heads_, [&](int64_t h0, int64_t h1) {
      for (int64_t i = h0; i < h1; ++i) {
        const float* qi = q + i * hd;
        const float* keys = kc + (i / group) * max_len_ * hd;
        const float* vals = vc + (i / group) * max_len_ * hd;
        float* s = scores + i * max_len_;
        float top = -INFINITY;
        for (int64_t p = start; p <= pos; ++p) {
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t c = 0; c < hd; ++c) dot += qi[c] * keys[p * hd + c];
          s[p] = dot * static_cast<float>(attn_scale_);
          top = std::max(top, s[p]);
        }
        float total = 0.f;
        for (int64_t p = start; p <= pos; ++p) {
          s[p] = std::exp(s[p] - top);
          total += s[p];
        }
        float* out = att + i * hd;
        std::fill(out, out + hd, 0.f);
        for (int64_t p = start; p <= pos; ++p) {
          const float a = s[p] / total;
#pragma omp simd
          for (int64_t c = 0; c < hd; ++c) out[c] += a * vals[p * hd + c];
        }
      }
    });
    product(l.o, att, h, scratch_);
    for (int64_t c = 0; c < d_; ++c) x[c] += h[c];
  }

  static float activation(const Layer& l, float g) {
    if (l.activation == kGELUTanh) {
      const float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
      return 0.5f * g * (1.f + std::tanh(inner));
    }
    if (l.activation == kFATReLU) return g < l.act_threshold ? 0.f : g;
    return g / (1.f + std::exp(-g));
  }

  void ffn(Layer& l, bool predict) {
    float* x = x_.data_ptr<float>();
    float* h = h_.data_ptr<float>();
    float* gate = gate_.data_ptr<float>();
    float* up = up_.data_ptr<float>();
    const int64_t n = l.gate.out;
    rms_norm(x, l.post_norm.data_ptr<float>(), h);
    if (l.predicted && predict) {
      predicted_ffn(l, h);
      for (int64_t c = 0; c < d_; ++c) x[c] += h[c];
      return;
    }
    product(l.gate, h, gate, scratch_);
    for (int64_t j = 0; j < n; ++j) gate[j] = activation(l, gate[j]);
    if (l.ffn_threshold >= 0) {
      std::vector<int32_t>& index = scratch_.index;
      int64_t k = 0;
      for (int64_t j = 0; j < n; ++j) {
        if (!(std::fabs(gate[j]) <= l.ffn_threshold)) index[k++] = static_cast<int32_t>(j);
      }
      scratch_.used += k;
      scratch_.total += n;
      rows_listed(l.up.weight.data_ptr<float>(), h, l.up.in, index.data(), k, up);
      // up[j] now holds unit index[j]; scale in place and hand the same list to down (its rows are the units)
      for (int64_t j = 0; j < k; ++j) gate[index[j]] *= up[j];
      cols_listed(l.down, gate, index.data(), k, h, scratch_);
    } else {
      product(l.up, h, up, scratch_);
      for (int64_t j = 0; j < n; ++j) gate[j] *= up[j];
      product(l.down, gate, h, scratch_);
    }
    for (int64_t c = 0; c < d_; ++c) x[c] += h[c];
  }

  // The FFN of a predicted layer on its normed input h, the result left in h.
  void predicted_ffn(Layer& l, float* h) {
    float* logits = logits_.data_ptr<float>();
    float* up = up_.data_ptr<float>();
    float* gate = gate_.data_ptr<float>();
    std::vector<int32_t>& index = scratch_.index;
    const int64_t n = l.gate.out;
    product(l.pred_in, h, z_.data_ptr<float>(), scratch_);
    product(l.pred_out, z_.data_ptr<float>(), logits, scratch_);
    int64_t k = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (logits[j] > l.pred_threshold) index[k++] = static_cast<int32_t>(j);
    }
    rows_listed(l.gate.weight.data_ptr<float>(), h, l.gate.in, index.data(), k, logits);  // logits[m]: unit index[m]
    int64_t active = 0;
    for (int64_t m = 0; m < k; ++m) {
      const float a = activation(l, logits[m]);
      if (a != 0.f) {
        index[active] = index[m];
        logits[active++] = a;
      }
    }
    scratch_.used += active;
    scratch_.total += n;
    rows_listed(l.up.weight.data_ptr<float>(), h, l.up.in, index.data(), active, up);
    for (int64_t m = 0; m < active; ++m) gate[index[m]] = logits[m] * up[m];
    cols_listed(l.down, gate, index.data(), active, h, scratch_);
  }

  torch::Tensor embed_, final_norm_, cos_, sin_, x_, h_, qkv_, att_, gate_, up_, logits_, z_, scores_;
  Linear lm_head_;
  std::vector<Layer> layers_;
  Scratch scratch_;
  double embed_scale_, eps_, attn_scale_;
  int64_t heads_, kv_heads_, head_dim_, window_, vocab_ = 0, d_ = 0, ff_ = 0, max_len_ = 0, rank_ = 0;
  int64_t exact_prefix_ = 0;
  int64_t attention_ns_ = 0, ffn_ns_ = 0, lm_head_ns_ = 0, rest_ns_ = 0, tokens_ = 0;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matvec", &matvec, "one fp32 matrix-vector product, weight (out, in) or with cols (in, out), optionally "
        "skipping the inputs with |x| <= threshold (cols)", py::arg("weight"), py::arg("x"), py::arg("cols"),
        py::arg("threshold") = -1.0);
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<torch::Tensor, double, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t,
                    int64_t, int64_t, double, double, int64_t>())
      .def("add_layer", &Decoder::add_layer)
      .def("set_input_thresholds", &Decoder::set_input_thresholds)
      .def("set_ffn_threshold", &Decoder::set_ffn_threshold)
      .def("set_predictor", &Decoder::set_predictor)
      .def("set_exact_prefix", &Decoder::set_exact_prefix)
      .def("step", &Decoder::step, py::call_guard<py::gil_scoped_release>())
      .def("timings", &Decoder::timings)
      .def("reset_timings", &Decoder::reset_timings)
      .def("max_len", &Decoder::max_len);
}
