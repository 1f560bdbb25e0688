// Row-sparse matrix products for FFN inference (leanformer.sparsity.kernels' optional fast path).
//
// With a ReLU-family FFN most hidden units are zero for a token, so only their rows of the up/gate
// weights and their rows of the transposed down weight are needed. PyTorch can only do this by first
// copying the selected rows (index_select), which reads them twice and writes them once; these kernels
// read each selected row once, in place:
//   gather_matmul   out[t, j] = dot(x[t, :], w[idx[j], :])          (up/gate: w is out x in, row-major)
//   scatter_matmul  out[t, :] = sum_j h[t, j] * wt[idx[j], :]        (down: wt is the down weight transposed)
// and, fused so that a whole sparse FFN call is one step, with its active set found from the activations:
//   gated_down         down(a * up(x)) for a gated FFN once a = act(gate(x)) is known (or, with a
//                      threshold, once gate(x) is: the FATReLU/ReLU is then applied inside)
//   input_sparse_down  down(h) for a plain FFN
// A row is used by every token of the (small) batch while it is in cache. fp32 only; work is split
// with at::parallel_for, so torch.set_num_threads applies.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

void check_inputs(const torch::Tensor& a, const torch::Tensor& w, const torch::Tensor& idx, const char* what) {
  TORCH_CHECK(a.dim() == 2 && w.dim() == 2 && idx.dim() == 1, what, ": expected 2-D inputs and a 1-D index");
  TORCH_CHECK(a.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat, what, ": float32 only");
  TORCH_CHECK(idx.scalar_type() == torch::kLong, what, ": int64 index expected");
  TORCH_CHECK(a.is_contiguous() && w.is_contiguous() && idx.is_contiguous(), what, ": contiguous inputs expected");
  const int64_t rows = w.size(0);
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t j = 0; j < idx.numel(); ++j) {
    TORCH_CHECK(ip[j] >= 0 && ip[j] < rows, what, ": index ", ip[j], " out of range [0, ", rows, ")");
  }
}

constexpr int64_t kLine = 16;  // floats per 64-byte cache line

// dot(row, x) over d floats with 16 running sums (one vector register); while it runs, asks for the next
// row a cache line at a time: rows are picked at random, so the hardware prefetcher alone stalls at each one.
inline float dot_prefetching(const float* row, const float* x, int64_t d, const float* next) {
  float acc[kLine] = {0.f};
  int64_t c = 0;
  for (; c + kLine <= d; c += kLine) {
    if (next != nullptr) __builtin_prefetch(next + c, 0, 0);
#pragma omp simd
    for (int64_t u = 0; u < kLine; ++u) acc[u] += row[c + u] * x[c + u];
  }
  float sum = 0.f;
  for (; c < d; ++c) sum += row[c] * x[c];
  for (int64_t u = 0; u < kLine; ++u) sum += acc[u];
  return sum;
}

// Below this many multiply-adds a product runs on one thread: waking the pool costs more.
constexpr int64_t kSerialWork = 1 << 15;

// a[t, j] after an optional fused FATReLU/ReLU at thr (x if not x < thr, else 0, as FATReLU's masked_fill).
inline float activated(float v, bool fused, float thr) { return fused && v < thr ? 0.f : v; }

// Units (columns of a, b x n) nonzero for at least one of the b tokens, in increasing order.
std::vector<int64_t> union_of_nonzero_columns(const float* a, int64_t b, int64_t n, bool fused = false,
                                              float thr = 0.f) {
  std::vector<int64_t> idx;
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t t = 0; t < b; ++t) {
      if (activated(a[t * n + j], fused, thr) != 0.f) {  // NaN counts as active, as in PyTorch's a != 0
        idx.push_back(j);
        break;
      }
    }
  }
  return idx;
}

// out[t, j] = coef(t, j) applied to dot(x[t], w[idx[j]]): the selected rows of w, each read once.
template <typename Finish>
void gather_rows(const float* xp, int64_t b, int64_t d, const float* wp, const int64_t* ip, int64_t k, float* op,
                 Finish finish) {
  const int64_t grain = std::max<int64_t>(1, kSerialWork / std::max<int64_t>(1, b * d));
  at::parallel_for(0, k, grain, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const float* row = wp + ip[j] * d;
      const float* next = wp + ip[std::min(j + 1, j1 - 1)] * d;
      for (int64_t t = 0; t < b; ++t) {
        const float dot = dot_prefetching(row, xp + t * d, d, t == 0 ? next : nullptr);
        op[t * k + j] = finish(t, j, dot);
      }
    }
  });
}

// out[t, :] += sum_j coef(t, j) * wt[idx[j], :]. Threads own slices of output columns (no reduction between
// threads); 64-column blocks keep slices on cache-line boundaries. Each thread streams its slice of every row.
template <typename Coef>
void scatter_rows(const float* wp, int64_t m, const int64_t* ip, int64_t k, int64_t b, float* op, Coef coef) {
  constexpr int64_t kCols = 64;
  const int64_t blocks = (m + kCols - 1) / kCols;
  const int64_t grain = std::max<int64_t>(1, kSerialWork / std::max<int64_t>(1, b * k * kCols));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t c0 = b0 * kCols, c1 = std::min(m, b1 * kCols);
    for (int64_t j = 0; j < k; ++j) {
      const float* row = wp + ip[j] * m;
      const float* next = wp + ip[std::min(j + 1, k - 1)] * m;
      for (int64_t c = c0; c < c1; c += kLine) __builtin_prefetch(next + c, 0, 0);
      for (int64_t t = 0; t < b; ++t) {
        const float a = coef(t, j);
        if (a == 0.f) continue;  // a unit active for other tokens of the batch but not this one
        float* o = op + t * m;
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) o[c] += a * row[c];
      }
    }
  });
}

torch::Tensor gather_matmul(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& idx) {
  check_inputs(x, w, idx, "gather_matmul");
  TORCH_CHECK(x.size(1) == w.size(1), "gather_matmul: x has ", x.size(1), " features, w rows have ", w.size(1));
  const int64_t b = x.size(0), k = idx.numel();
  auto out = torch::empty({b, k}, x.options());
  gather_rows(x.data_ptr<float>(), b, x.size(1), w.data_ptr<float>(), idx.data_ptr<int64_t>(), k,
              out.data_ptr<float>(), [](int64_t, int64_t, float dot) { return dot; });
  return out;
}

torch::Tensor scatter_matmul(const torch::Tensor& h, const torch::Tensor& wt, const torch::Tensor& idx) {
  check_inputs(h, wt, idx, "scatter_matmul");
  TORCH_CHECK(h.size(1) == idx.numel(), "scatter_matmul: h has ", h.size(1), " columns for ", idx.numel(), " indices");
  const int64_t b = h.size(0), k = idx.numel();
  auto out = torch::zeros({b, wt.size(1)}, h.options());
  const float* hp = h.data_ptr<float>();
  scatter_rows(wt.data_ptr<float>(), wt.size(1), idx.data_ptr<int64_t>(), k, b, out.data_ptr<float>(),
               [&](int64_t t, int64_t j) { return hp[t * k + j]; });
  return out;
}

void check_dense(const torch::Tensor& t, int64_t rows, int64_t cols, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.scalar_type() == torch::kFloat &&
                  t.is_contiguous(),
              what, ": expected a contiguous float32 tensor of shape (", rows, ", ", cols, ")");
}

// The rest of an exact gated FFN once a = act(gate(x)) is known: down(a * up(x)) over the units active for
// some token, or (undefined, count) when more than max_units are active (the caller runs dense). With a
// threshold, a is gate(x) itself and the FATReLU/ReLU is applied here, to the units it reads.
std::tuple<torch::Tensor, int64_t> gated_down(const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& wu,
                                              const c10::optional<torch::Tensor>& bu, const torch::Tensor& wdt,
                                              int64_t max_units, c10::optional<double> threshold) {
  const int64_t b = x.size(0), d = x.size(1), n = wu.size(0), m = wdt.size(1);
  check_dense(x, b, d, "gated_down x");
  check_dense(a, b, n, "gated_down a");
  check_dense(wu, n, d, "gated_down up weight");
  check_dense(wdt, n, m, "gated_down down weight (transposed)");
  const float* bp = nullptr;
  if (bu.has_value() && bu->defined()) {
    TORCH_CHECK(bu->numel() == n && bu->is_contiguous() && bu->scalar_type() == torch::kFloat, "gated_down: bad bias");
    bp = bu->data_ptr<float>();
  }
  const float* ap = a.data_ptr<float>();
  const bool fused = threshold.has_value();
  const float thr = fused ? static_cast<float>(*threshold) : 0.f;
  const std::vector<int64_t> idx = union_of_nonzero_columns(ap, b, n, fused, thr);
  const int64_t k = static_cast<int64_t>(idx.size());
  if (k > max_units) return {torch::Tensor(), k};
  auto h = torch::empty({b, k}, x.options());
  gather_rows(x.data_ptr<float>(), b, d, wu.data_ptr<float>(), idx.data(), k, h.data_ptr<float>(),
              [&](int64_t t, int64_t j, float dot) {
                return activated(ap[t * n + idx[j]], fused, thr) * (bp ? dot + bp[idx[j]] : dot);
              });
  auto out = torch::zeros({b, m}, x.options());
  const float* hp = h.data_ptr<float>();
  scatter_rows(wdt.data_ptr<float>(), m, idx.data(), k, b, out.data_ptr<float>(),
               [&](int64_t t, int64_t j) { return hp[t * k + j]; });
  return {out, k};
}

// A plain FFN's down projection of h (b x n) over the units nonzero for some token (no bias), or
// (undefined, count) when more than max_units are.
std::tuple<torch::Tensor, int64_t> input_sparse_down(const torch::Tensor& h, const torch::Tensor& wdt,
                                                     int64_t max_units) {
  const int64_t b = h.size(0), n = wdt.size(0), m = wdt.size(1);
  check_dense(h, b, n, "input_sparse_down h");
  check_dense(wdt, n, m, "input_sparse_down weight (transposed)");
  const float* hp = h.data_ptr<float>();
  const std::vector<int64_t> idx = union_of_nonzero_columns(hp, b, n);
  const int64_t k = static_cast<int64_t>(idx.size());
  if (k > max_units) return {torch::Tensor(), k};
  auto out = torch::zeros({b, m}, h.options());
  scatter_rows(wdt.data_ptr<float>(), m, idx.data(), k, b, out.data_ptr<float>(),
               [&](int64_t t, int64_t j) { return hp[t * n + idx[j]]; });
  return {out, k};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gather_matmul", &gather_matmul, "x @ w[idx].T without copying the rows (fp32)");
  m.def("scatter_matmul", &scatter_matmul, "h @ wt[idx] without copying the rows (fp32)");
  m.def("gated_down", &gated_down, "exact gated FFN after the gate: down(a * up(x)) over the active units",
        py::arg("x"), py::arg("a"), py::arg("wu"), py::arg("bu"), py::arg("wdt"), py::arg("max_units"),
        py::arg("threshold") = py::none());
  m.def("input_sparse_down", &input_sparse_down, "down(h) over the units nonzero for some token (no bias)");
}
