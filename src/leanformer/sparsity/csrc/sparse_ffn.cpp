// Row-sparse matrix products for FFN inference (leanformer.sparsity.kernels' optional fast path).
//
// With a ReLU-family FFN most hidden units are zero for a token, so only their rows of the up/gate
// weights and their rows of the transposed down weight are needed. PyTorch can only do this by first
// copying the selected rows (index_select), which reads them twice and writes them once; these kernels
// read each selected row once, in place:
//   gather_matmul   out[t, j] = dot(x[t, :], w[idx[j], :])          (up/gate: w is out x in, row-major)
//   scatter_matmul  out[t, :] = sum_j h[t, j] * wt[idx[j], :]        (down: wt is the down weight transposed)
// A row is used by every token of the (small) batch while it is in cache. fp32 only; work is split
// with at::parallel_for, so torch.set_num_threads applies.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

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

// Below this many multiply-adds a product runs on one thread: waking the pool costs more.
constexpr int64_t kSerialWork = 1 << 15;

torch::Tensor gather_matmul(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& idx) {
  check_inputs(x, w, idx, "gather_matmul");
  TORCH_CHECK(x.size(1) == w.size(1), "gather_matmul: x has ", x.size(1), " features, w rows have ", w.size(1));
  const int64_t b = x.size(0), d = x.size(1), k = idx.numel();
  auto out = torch::empty({b, k}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kSerialWork / std::max<int64_t>(1, b * d));
  at::parallel_for(0, k, grain, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const float* row = wp + ip[j] * d;
      for (int64_t t = 0; t < b; ++t) {
        const float* xr = xp + t * d;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t c = 0; c < d; ++c) acc += row[c] * xr[c];
        op[t * k + j] = acc;
      }
    }
  });
  return out;
}

torch::Tensor scatter_matmul(const torch::Tensor& h, const torch::Tensor& wt, const torch::Tensor& idx) {
  check_inputs(h, wt, idx, "scatter_matmul");
  TORCH_CHECK(h.size(1) == idx.numel(), "scatter_matmul: h has ", h.size(1), " columns for ", idx.numel(), " indices");
  const int64_t b = h.size(0), k = idx.numel(), m = wt.size(1);
  auto out = torch::zeros({b, m}, h.options());
  const float* hp = h.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  // Threads own slices of output columns (no reduction between threads); 64-column blocks keep slices
  // on cache-line boundaries. Each thread streams its slice of every selected row.
  constexpr int64_t kCols = 64;
  const int64_t blocks = (m + kCols - 1) / kCols;
  const int64_t grain = std::max<int64_t>(1, kSerialWork / std::max<int64_t>(1, b * k * kCols));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t c0 = b0 * kCols, c1 = std::min(m, b1 * kCols);
    for (int64_t j = 0; j < k; ++j) {
      const float* row = wp + ip[j] * m;
      for (int64_t t = 0; t < b; ++t) {
        const float a = hp[t * k + j];
        if (a == 0.f) continue;  // a unit active for other tokens of the batch but not this one
        float* o = op + t * m;
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) o[c] += a * row[c];
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gather_matmul", &gather_matmul, "x @ w[idx].T without copying the rows (fp32)");
  m.def("scatter_matmul", &scatter_matmul, "h @ wt[idx] without copying the rows (fp32)");
}
