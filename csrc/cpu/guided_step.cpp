// fastig::guided_step on the CPU: one Guided IG step (PAIR saliency's inner loop) per example, examples in parallel.
// The |grad| quantile is found with std::nth_element (linear time), never a sort. See guided_step_reference in
// fastig/_ops.py for the exact rules; every element-wise expression below mirrors it operation for operation.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "../common.h"

namespace fastig {
namespace {

template <typename scalar_t>
void guided_step_one(scalar_t* x, const scalar_t* input, const scalar_t* baseline, const scalar_t* grad, int64_t d,
                     double fraction, scalar_t a_min, scalar_t a_max, double target) {
  const scalar_t inf = std::numeric_limits<scalar_t>::infinity();
  const int64_t kth = lower_quantile_index(fraction, d);
  // uninitialized buffers (every round writes them before reading): keys, their copy for nth_element, and the
  // indices of the features selected in a round
  std::unique_ptr<scalar_t[]> key(new scalar_t[d]), scratch(new scalar_t[d]);
  std::unique_ptr<int64_t[]> chosen(new int64_t[d]);
  auto x_min = [&](int64_t j) { return baseline[j] + (input[j] - baseline[j]) * a_min; };
  auto x_max = [&](int64_t j) { return baseline[j] + (input[j] - baseline[j]) * a_max; };
  for (int64_t round = 0; round < d + 2; ++round) {
    // One pass: 1. laggards behind alpha_min jump to x_min; 2. the L1 distance left to the input; 3. the keys of
    // the threshold, features already at x_max (and non-finite gradients) keyed +inf.
    double l1 = 0.0;
    for (int64_t j = 0; j < d; ++j) {
      const scalar_t diff = input[j] - baseline[j];
      const scalar_t alpha = diff != scalar_t(0) ? (x[j] - baseline[j]) / diff : a_max;
      const scalar_t xj = alpha < a_min ? x_min(j) : x[j];  // written as selects: the branches are unpredictable
      x[j] = xj;
      l1 += static_cast<double>(std::abs(xj - input[j]));
      const scalar_t g = std::abs(grad[j]);
      key[j] = scratch[j] = (xj == x_max(j) || !std::isfinite(g)) ? inf : g;
    }
    const double tol = std::max(kGuidedEpsilon * std::max(std::abs(l1), std::abs(target)), kGuidedEpsilon);
    if (l1 - target <= tol) return;
    // The threshold: the kth smallest key.
    std::nth_element(scratch.get(), scratch.get() + kth, scratch.get() + d);
    const scalar_t threshold = scratch[kth];
    // 4. Move the selected features toward x_max: all the way, or by the fraction gamma that meets the target.
    double l1_s = 0.0;
    int64_t n_chosen = 0;
    for (int64_t j = 0; j < d; ++j) {  // branch-free compaction of the selected indices
      const bool selected = key[j] <= threshold && key[j] != inf;
      chosen[n_chosen] = j;
      n_chosen += selected;
      l1_s += selected ? static_cast<double>(std::abs(x[j] - x_max(j))) : 0.0;
    }
    if (!(l1_s > 0.0)) return;  // nothing left to move
    const double gamma = (l1 - target) / l1_s;
    const bool full = gamma > 1.0;
    const scalar_t g = static_cast<scalar_t>(gamma);
    for (int64_t c = 0; c < n_chosen; ++c) {
      const int64_t j = chosen[c];
      const scalar_t top = x_max(j);
      x[j] = full ? top : x[j] + (top - x[j]) * g;
    }
    if (!full) return;
  }
}

at::Tensor guided_step_cpu(const at::Tensor& x, const at::Tensor& input, const at::Tensor& baseline,
                           const at::Tensor& grad, double fraction, double alpha_min, double alpha_max,
                           const at::Tensor& l1_target) {
  check_guided_step(x, input, baseline, grad, fraction, alpha_min, alpha_max, l1_target);
  const bool cl = channels_last_order(x, 1);  // the step is order-independent: process memory order
  at::Tensor out = empty_in_order(sizes_of(x), 1, cl, x.options());
  at::Tensor flat = in_order(out, 1, cl);  // a view of out's memory
  flat.copy_(in_order(x, 1, cl));
  at::Tensor inp = in_order(input, 1, cl), base = in_order(baseline, 1, cl), g = in_order(grad, 1, cl);
  at::Tensor target = l1_target.contiguous();
  const int64_t n = x.size(0);
  if (x.numel() == 0) return out;
  const int64_t d = x.numel() / n;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastig::guided_step", [&] {
    scalar_t* xp = static_cast<scalar_t*>(flat.data_ptr());
    const scalar_t *ip = inp.const_data_ptr<scalar_t>(), *bp = base.const_data_ptr<scalar_t>(),
                   *gp = g.const_data_ptr<scalar_t>();
    const double* tp = target.const_data_ptr<double>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        guided_step_one<scalar_t>(xp + i * d, ip + i * d, bp + i * d, gp + i * d, d, fraction,
                                  static_cast<scalar_t>(alpha_min), static_cast<scalar_t>(alpha_max), tp[i]);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastig, CPU, m) { m.impl("guided_step", &guided_step_cpu); }

}  // namespace fastig
