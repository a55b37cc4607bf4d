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
  PreparedPathPoints p = prepare_path_points(input, baseline, alphas);
  if (p.out.numel() == 0) return p.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastig::path_points", [&] {
    path_points_kernel<scalar_t>(p.x.const_data_ptr<scalar_t>(), p.b.const_data_ptr<scalar_t>(), p.shared_baseline,
                                 p.alphas.const_data_ptr<double>(), static_cast<scalar_t*>(p.out.data_ptr()),
                                 p.k_steps, p.n, p.d);
  });
  return p.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastig, CPU, m) { m.impl("path_points", &path_points_cpu); }

}  // namespace fastig
