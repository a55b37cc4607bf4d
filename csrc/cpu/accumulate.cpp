// fastig::accumulate, squared_norms and accumulate_idgi on the CPU.
// Deterministic: every output element sums its K terms in step order whatever the thread count (no atomics).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <torch/library.h>

#include "../common.h"

namespace fastig {
namespace {

constexpr int64_t kChunk = 1024;  // features per accumulation chunk: the partial sums stay in L1 cache

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// out[j] = sum_k term(g[k, j]) * coef(k, j / row_len) over grads [K, M], k in step order for every j.
// Chunks never cross a row, so the coefficient is looked up once per chunk and step.
template <typename scalar_t, typename acc_t, typename Coef, typename Term>
void weighted_sum(const scalar_t* g, acc_t* out, int64_t k_steps, int64_t m, int64_t row_len, Coef coef_of,
                  Term term_of) {
  at::parallel_for(0, m, kChunk, [&](int64_t begin, int64_t end) {
    acc_t partial[kChunk];
    for (int64_t j0 = begin; j0 < end;) {
      const int64_t row = j0 / row_len;
      const int64_t len = std::min({kChunk, end - j0, (row + 1) * row_len - j0});
      for (int64_t j = 0; j < len; ++j) partial[j] = acc_t(0);
      for (int64_t k = 0; k < k_steps; ++k) {
        const acc_t c = coef_of(k, row);
        const scalar_t* src = g + k * m + j0;
        for (int64_t j = 0; j < len; ++j) partial[j] += term_of(src[j]) * c;
      }
      for (int64_t j = 0; j < len; ++j) out[j0 + j] = partial[j];
      j0 += len;
    }
  });
}

at::Tensor accumulate_cpu(const at::Tensor& grads, const at::Tensor& weights) {
  check_accumulate(grads, weights);
  PreparedGrads p = prepare_grads(grads);
  if (p.out.numel() == 0) return p.out;
  at::Tensor w = weights.to(p.out.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads.scalar_type(), "fastig::accumulate", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t* wp = w.const_data_ptr<acc_t>();
    weighted_sum<scalar_t, acc_t>(
        p.grads.const_data_ptr<scalar_t>(), static_cast<acc_t*>(p.out.data_ptr()), p.k_steps, p.n * p.d, p.n * p.d,
        [wp](int64_t k, int64_t) { return wp[k]; }, [](scalar_t v) { return static_cast<acc_t>(v); });
  });
  return p.out;
}

// Squared norm of each [k, n] row, summed in float64 over 8 interleaved lanes combined in a fixed order.
at::Tensor squared_norms_cpu(const at::Tensor& grads) {
  check_grads(grads);
  const bool cl = channels_last_order(grads, 2);
  at::Tensor g = in_order(grads, 2, cl);
  const int64_t rows = grads.size(0) * grads.size(1);
  int64_t d = 1;
  for (int64_t i = 2; i < grads.dim(); ++i) d *= grads.size(i);
  at::Tensor out = at::empty({grads.size(0), grads.size(1)},
                             grads.options().dtype(accumulation_type(grads.scalar_type())));
  if (rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads.scalar_type(), "fastig::squared_norms", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    {
      using out_t = acc_type<scalar_t>;
      out_t* op = static_cast<out_t*>(out.data_ptr());
      at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          const auto* row = gp + r * d;
          int64_t j = 0;
          for (; j + 8 <= d; j += 8)
            for (int l = 0; l < 8; ++l) {
              const double v = static_cast<double>(row[j + l]);
              lanes[l] += v * v;
            }
          for (; j < d; ++j) {
            const double v = static_cast<double>(row[j]);
            lanes[j % 8] += v * v;
          }
          op[r] = static_cast<out_t>(((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                                        ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])));
        }
      });
    }
  });
  return out;
}

at::Tensor accumulate_idgi_cpu(const at::Tensor& grads, const at::Tensor& outputs, const at::Tensor& sq_norms) {
  check_idgi(grads, outputs, sq_norms);
  PreparedGrads p = prepare_grads(grads);
  if (p.out.numel() == 0) return p.out;
  at::Tensor scale = idgi_scale(p, outputs, sq_norms);
  const int64_t n = p.n, d = p.d;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads.scalar_type(), "fastig::accumulate_idgi", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t* sp = scale.const_data_ptr<acc_t>();
    weighted_sum<scalar_t, acc_t>(
        p.grads.const_data_ptr<scalar_t>(), static_cast<acc_t*>(p.out.data_ptr()), p.k_steps, n * d, d,
        [sp, n](int64_t k, int64_t row) { return sp[k * n + row]; },
        [](scalar_t v) {
          const acc_t a = static_cast<acc_t>(v);
          return a * a;
        });
  });
  return p.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastig, CPU, m) {
  m.impl("accumulate", &accumulate_cpu);
  m.impl("squared_norms", &squared_norms_cpu);
  m.impl("accumulate_idgi", &accumulate_idgi_cpu);
}

}  // namespace fastig
