// Fused CPU kernels for activation quantisation (leanformer.memory.quantize's optional fast path).
//
// The PyTorch reference in quantize.py makes several passes over each activation (min, max, scale,
// noise, clamp, cast, pack; unpack, cast, scale). Here each direction is one pass over memory:
//   group_minmax      x -> per-group min/max (a NaN makes its group's statistics NaN, as torch.amin/amax)
//   quantize_pack     x -> codes = clamp(floor((x - lo) * inv_step + u), 0, 2^bits - 1), bit-packed
//   unpack_dequantize codes -> lo + code * step, in the activation's dtype
// Layout (as in quantize.py): x is viewed as (rows, cols), contiguous; a group statistic is indexed
// by the column (per_col) or by row % period (per-head rows, or one group per row).
// Stochastic rounding uses a counter-based hash of (seed, flat index), so codes do not depend on how
// work is split between threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlock = 4096;  // elements per work item: a multiple of 8, so blocks start on byte boundaries

inline uint32_t hash32(uint32_t x) {  // "lowbias32" integer hash (C. Wellons): good avalanche, vectorisable
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

struct Layout {
  int64_t rows, cols, period;
  bool per_col;
  int64_t stat(int64_t row, int64_t col) const { return per_col ? col : row % period; }
};

Layout layout_of(int64_t rows, int64_t cols, bool per_col, int64_t period) {
  TORCH_CHECK(rows >= 0 && cols > 0 && period > 0, "bad layout");
  return Layout{rows, cols, period, per_col};
}

// Asks for 2 MB pages for a large output about to be written for the first time: a fresh multi-megabyte
// allocation is otherwise faulted in 4 KB at a time, which costs more than the kernel itself. Only the
// 2 MB-aligned interior is advised; it is a hint (ignored where transparent huge pages are off).
void advise_huge_pages(void* data, int64_t nbytes) {
  constexpr uintptr_t kHuge = 2u << 20;
  if (nbytes < static_cast<int64_t>(4 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(nbytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

// Calls f(flat_start, length, row, col) for the row segments of the flat range [e0, e1).
template <typename F>
inline void for_segments(const Layout& L, int64_t e0, int64_t e1, F&& f) {
  int64_t row = e0 / L.cols, col = e0 % L.cols;
  for (int64_t e = e0; e < e1;) {
    int64_t len = std::min(L.cols - col, e1 - e);
    f(e, len, row, col);
    e += len;
    ++row;
    col = 0;
  }
}

// Codes (< 2^BITS) into bytes, first code in the low bits; n may end mid-byte (the rest of it is zero).
template <int BITS>
inline void pack(const uint8_t* codes, int64_t n, uint8_t* dst) {
  constexpr int per = 8 / BITS;
  const int64_t full = n / per;
  for (int64_t j = 0; j < full; ++j) {
    uint8_t byte = 0;
    for (int k = 0; k < per; ++k) byte |= static_cast<uint8_t>(codes[j * per + k] << (BITS * k));
    dst[j] = byte;
  }
  if (full * per < n) {
    uint8_t byte = 0;
    for (int64_t i = full * per; i < n; ++i) byte |= static_cast<uint8_t>(codes[i] << (BITS * (i - full * per)));
    dst[full] = byte;
  }
}

template <int BITS>
inline void unpack(const uint8_t* src, int64_t n, float* codes) {
  constexpr int per = 8 / BITS, mask = (1 << BITS) - 1;
  const int64_t full = n / per;
  for (int64_t j = 0; j < full; ++j)
    for (int k = 0; k < per; ++k) codes[j * per + k] = static_cast<float>((src[j] >> (BITS * k)) & mask);
  for (int64_t i = full * per; i < n; ++i) codes[i] = static_cast<float>((src[full] >> (BITS * (i - full * per))) & mask);
}

template <typename scalar_t>
void minmax_impl(const scalar_t* x, int64_t numel, const Layout& L, int64_t n_stats, float* lo, float* hi) {
  const int64_t threads = at::get_num_threads();
  std::vector<float> tlo(threads * n_stats, std::numeric_limits<float>::infinity());
  std::vector<float> thi(threads * n_stats, -std::numeric_limits<float>::infinity());
  std::vector<float> tbad(threads * n_stats, 0.f);  // NaNs seen (min/max would skip them)
  at::parallel_for(0, numel, kBlock * 8, [&](int64_t b, int64_t e) {
    const int64_t t = at::get_thread_num();
    float* mlo = tlo.data() + t * n_stats;
    float* mhi = thi.data() + t * n_stats;
    float* bad = tbad.data() + t * n_stats;
    for_segments(L, b, e, [&](int64_t s, int64_t len, int64_t row, int64_t col) {
      const scalar_t* p = x + s;
      if (L.per_col) {
        for (int64_t i = 0; i < len; ++i) {
          float v = static_cast<float>(p[i]);
          mlo[col + i] = v < mlo[col + i] ? v : mlo[col + i];
          mhi[col + i] = v > mhi[col + i] ? v : mhi[col + i];
          bad[col + i] += v != v ? 1.f : 0.f;
        }
      } else {
        float a = std::numeric_limits<float>::infinity(), z = -a, nan_sum = 0.f;
        for (int64_t i = 0; i < len; ++i) {
          float v = static_cast<float>(p[i]);
          a = v < a ? v : a;
          z = v > z ? v : z;
          nan_sum += v != v ? 1.f : 0.f;
        }
        const int64_t g = L.stat(row, col);
        mlo[g] = std::min(mlo[g], a);
        mhi[g] = std::max(mhi[g], z);
        bad[g] += nan_sum;
      }
    });
  });
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t g = 0; g < n_stats; ++g) {
    float a = std::numeric_limits<float>::infinity(), z = -a, nan_sum = 0.f;
    for (int64_t t = 0; t < threads; ++t) {
      a = std::min(a, tlo[t * n_stats + g]);
      z = std::max(z, thi[t * n_stats + g]);
      nan_sum += tbad[t * n_stats + g];
    }
    const bool has_nan = nan_sum != 0.f;  // as torch.amin/amax: NaN wins, infinities are ordinary extremes
    lo[g] = has_nan ? nan : a;
    hi[g] = has_nan ? nan : z;
  }
}

// One run of consecutive elements sharing a row: scale, count clipping, add noise, clamp, truncate to codes,
// in a single loop (the statistics advance with the column when PER_COL, else are one group's).
template <bool PER_COL, bool STOCHASTIC, bool COUNT, typename scalar_t>
inline int64_t quantize_run(const scalar_t* p, int64_t len, const float* lo, const float* inv, float levels,
                            uint32_t first, uint32_t seed, uint8_t* codes) {
  constexpr float slack = 1e-3f, unit = 1.f / 16777216.f;
  int64_t outside = 0;
  for (int64_t i = 0; i < len; ++i) {
    const float t = (static_cast<float>(p[i]) - lo[PER_COL ? i : 0]) * inv[PER_COL ? i : 0];
    if (COUNT) outside += (t < -slack) | (t > levels + slack);
    float u = 0.5f;
    if (STOCHASTIC) {  // u in (0, 1): midpoints of 2^24 bins, unbiased up to 2^-25 of a step; int32 maths vectorises
      const uint32_t h = hash32(((first + static_cast<uint32_t>(i)) * 0x9E3779B1U) ^ seed);
      u = static_cast<float>(static_cast<int32_t>(h >> 8)) * unit + 0.5f * unit;
    }
    float v = t + u;
    v = v > 0.f ? v : 0.f;  // also maps NaN to 0
    v = v < levels ? v : levels;
    codes[i] = static_cast<uint8_t>(static_cast<int32_t>(v));  // truncation = floor for v >= 0
  }
  return outside;
}

template <bool STOCHASTIC, bool COUNT, typename scalar_t>
int64_t quantize_impl(const scalar_t* x, int64_t numel, const Layout& L, const float* lo, const float* inv,
                      int bits, uint32_t seed, uint8_t* out) {
  const int64_t n_codes = L.rows * L.cols;
  const float levels = static_cast<float>((1 << bits) - 1);
  std::vector<int64_t> clipped(at::get_num_threads(), 0);
  at::parallel_for(0, (n_codes + kBlock - 1) / kBlock, 16, [&](int64_t b0, int64_t b1) {
    alignas(64) uint8_t codes[kBlock];
    int64_t outside = 0;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t e0 = blk * kBlock, e1 = std::min(e0 + kBlock, n_codes), real = std::max(std::min(e1, numel), e0);
      for_segments(L, e0, real, [&](int64_t s, int64_t len, int64_t row, int64_t col) {
        const uint32_t first = static_cast<uint32_t>(s);
        if (L.per_col) {
          outside += quantize_run<true, STOCHASTIC, COUNT>(x + s, len, lo + col, inv + col, levels, first, seed,
                                                             codes + (s - e0));
        } else {
          const int64_t g = L.stat(row, col);
          outside += quantize_run<false, STOCHASTIC, COUNT>(x + s, len, lo + g, inv + g, levels, first, seed,
                                                              codes + (s - e0));
        }
      });
      std::fill(codes + (real - e0), codes + (e1 - e0), 0);  // padding of the last int group decodes to lo
      const int64_t n = e1 - e0;
      uint8_t* dst = out + e0 * bits / 8;
      switch (bits) {
        case 8: std::copy(codes, codes + n, dst); break;
        case 4: pack<4>(codes, n, dst); break;
        default: pack<2>(codes, n, dst); break;
      }
    }
    clipped[at::get_thread_num()] += outside;
  });
  int64_t total = 0;
  for (int64_t c : clipped) total += c;
  return total;
}

template <typename scalar_t>
void dequantize_impl(const uint8_t* packed, int64_t numel, const Layout& L, const float* lo, const float* step,
                     int bits, scalar_t* out) {
  at::parallel_for(0, (numel + kBlock - 1) / kBlock, 16, [&](int64_t b0, int64_t b1) {
    alignas(64) float codes[kBlock];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t e0 = blk * kBlock, e1 = std::min(e0 + kBlock, numel), n = e1 - e0;
      const uint8_t* src = packed + e0 * bits / 8;
      switch (bits) {
        case 8: for (int64_t i = 0; i < n; ++i) codes[i] = static_cast<float>(src[i]); break;
        case 4: unpack<4>(src, n, codes); break;
        default: unpack<2>(src, n, codes); break;
      }
      for_segments(L, e0, e1, [&](int64_t s, int64_t len, int64_t row, int64_t col) {
        const float* c = codes + (s - e0);
        scalar_t* o = out + s;
        if (L.per_col) {
          for (int64_t i = 0; i < len; ++i) o[i] = static_cast<scalar_t>(lo[col + i] + c[i] * step[col + i]);
        } else {
          const int64_t g = L.stat(row, col);
          const float l = lo[g], st = step[g];
          for (int64_t i = 0; i < len; ++i) o[i] = static_cast<scalar_t>(l + c[i] * st);
        }
      });
    }
  });
}

void check_input(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "x must be a contiguous CPU tensor");
}

void check_stats(const torch::Tensor& s, int64_t n_stats, const char* name) {
  TORCH_CHECK(s.device().is_cpu() && s.is_contiguous() && s.scalar_type() == torch::kFloat32 && s.numel() == n_stats,
              name, " must be a contiguous fp32 CPU tensor of ", n_stats, " values");
}

int64_t stats_count(const Layout& L) { return L.per_col ? L.cols : L.period; }

std::vector<torch::Tensor> group_minmax(torch::Tensor x, int64_t rows, int64_t cols, bool per_col, int64_t period) {
  check_input(x);
  const Layout L = layout_of(rows, cols, per_col, period);
  const int64_t n_stats = stats_count(L);
  auto lo = torch::empty({n_stats}, torch::kFloat32), hi = torch::empty({n_stats}, torch::kFloat32);
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, x.scalar_type(), "group_minmax", [&] {
    minmax_impl<scalar_t>(x.data_ptr<scalar_t>(), x.numel(), L, n_stats, lo.data_ptr<float>(), hi.data_ptr<float>());
  });
  return {lo, hi};
}

int64_t quantize_pack(torch::Tensor x, int64_t rows, int64_t cols, bool per_col, int64_t period, torch::Tensor lo,
                      torch::Tensor inv_step, int64_t bits, bool stochastic, int64_t seed, bool count_clipped,
                      torch::Tensor out) {
  check_input(x);
  const Layout L = layout_of(rows, cols, per_col, period);
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 2, "bits must be 8, 4 or 2");
  TORCH_CHECK(x.numel() <= rows * cols, "x has more elements than rows * cols");
  check_stats(lo, stats_count(L), "lo");
  check_stats(inv_step, stats_count(L), "inv_step");
  TORCH_CHECK(out.scalar_type() == torch::kUInt8 && out.is_contiguous() && out.numel() == (rows * cols * bits + 7) / 8,
              "out must be a contiguous uint8 tensor of ceil(rows * cols * bits / 8) bytes");
  advise_huge_pages(out.data_ptr(), out.numel());
  int64_t clipped = 0;
  const uint32_t seed32 = static_cast<uint32_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, x.scalar_type(), "quantize_pack", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    const float *plo = lo.data_ptr<float>(), *pinv = inv_step.data_ptr<float>();
    uint8_t* po = out.data_ptr<uint8_t>();
    const int b = static_cast<int>(bits);
    if (stochastic && count_clipped) clipped = quantize_impl<true, true>(px, x.numel(), L, plo, pinv, b, seed32, po);
    else if (stochastic) clipped = quantize_impl<true, false>(px, x.numel(), L, plo, pinv, b, seed32, po);
    else if (count_clipped) clipped = quantize_impl<false, true>(px, x.numel(), L, plo, pinv, b, seed32, po);
    else clipped = quantize_impl<false, false>(px, x.numel(), L, plo, pinv, b, seed32, po);
  });
  return clipped;
}

void unpack_dequantize(torch::Tensor packed, int64_t rows, int64_t cols, bool per_col, int64_t period,
                       torch::Tensor lo, torch::Tensor step, int64_t bits, torch::Tensor out) {
  const Layout L = layout_of(rows, cols, per_col, period);
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous(), "packed must be contiguous uint8");
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 2, "bits must be 8, 4 or 2");
  check_input(out);
  TORCH_CHECK(out.numel() <= rows * cols && packed.numel() * 8 >= out.numel() * bits, "out does not fit the codes");
  check_stats(lo, stats_count(L), "lo");
  check_stats(step, stats_count(L), "step");
  advise_huge_pages(out.data_ptr(), out.numel() * out.element_size());
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, out.scalar_type(), "unpack_dequantize", [&] {
    dequantize_impl<scalar_t>(packed.data_ptr<uint8_t>(), out.numel(), L, lo.data_ptr<float>(),
                              step.data_ptr<float>(), static_cast<int>(bits), out.data_ptr<scalar_t>());
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("group_minmax", &group_minmax, "per-group min and max (fp32)");
  m.def("quantize_pack", &quantize_pack, "quantise and bit-pack into out; returns the clipped count");
  m.def("unpack_dequantize", &unpack_dequantize, "unpack and decode into out");
}
