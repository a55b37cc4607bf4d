// fastig::path_points on the CPU: baseline + alpha_k * (input - baseline) for K alphas, step-major [K * N, ...].
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"

namespace fastig {
namespace {

// Each chunk of features is read once and written K times; arithmetic in opmath (fp32, fp64 for fp64), one rounding
// per operation exactly like torch's `b + a * (x - b)`, so the points equal the reference bit for bit.
template <typename scalar_t>
void path_points_kernel(const scalar_t* x, const scalar_t* b, bool shared_baseline, const double* alphas,
                        scalar_t* out, int64_t k_steps, int64_t n, int64_t d) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t m = n * d;
  at::parallel_for(0, m, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t k = 0; k < k_steps; ++k) {
      const opmath_t a = static_cast<opmath_t>(alphas[k]);
      scalar_t* o = out + k * m;
      for (int64_t j = begin; j < end; ++j) {
        const opmath_t bj = static_cast<opmath_t>(b[shared_baseline ? j % d : j]);
        const opmath_t diff = static_cast<opmath_t>(x[j]) - bj;
        const opmath_t step = a * diff;
        o[j] = static_cast<scalar_t>(bj + step);
      }
    }
  });
}

at::Tensor path_points_cpu(const at::Tensor& input, const at::Tensor& baseline, const at::Tensor& alphas) {
  check_path_points(input, baseline, alphas);
  const int64_t k_steps = alphas.size(0), n = input.size(0);
  const int64_t d = n == 0 ? 0 : input.numel() / n;
  const bool cl = channels_last_order(input, 1);
  at::Tensor x = in_order(input, 1, cl);
  // A baseline broadcast over the examples is read in place instead of being materialized N times.
  const bool shared = n > 1 && baseline.stride(0) == 0;
  at::Tensor b = in_order(shared ? baseline.narrow(0, 0, 1) : baseline, 1, cl);
  at::Tensor a = alphas.contiguous();
  std::vector<int64_t> sizes = sizes_of(input);
  sizes[0] = k_steps * n;
  at::Tensor out = empty_in_order(sizes, 1, cl, input.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastig::path_points", [&] {
    path_points_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), shared,
                                 a.const_data_ptr<double>(), static_cast<scalar_t*>(out.data_ptr()), k_steps, n, d);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastig, CPU, m) { m.impl("path_points", &path_points_cpu); }

}  // namespace fastig
