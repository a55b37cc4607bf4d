// Torch-side helpers shared by the CPU kernels (cpu/*.cpp) and the CUDA bindings (cuda_bindings.cpp):
// argument checks with clear errors, the dense element order each op processes its tensors in, and each op's
// preparation of its tensors and output in that order.
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>
#include <vector>

namespace fastig {

inline bool is_floating(const at::Tensor& t) {
  auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

// fp64 accumulates in fp64, everything else in fp32 (as fastig._ops.accumulation_dtype).
inline at::ScalarType accumulation_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_floating(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_floating(t), "fastig: ", name, " must be float32, float64, float16 or bfloat16, got ",
                   t.scalar_type());
}

inline void check_same_device(const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "fastig: ", name, " is on ", t.device(), " but the op runs on ",
                    ref.device());
}

// Element order. Every op treats its big tensors as `lead` leading dims followed by features. The features are
// processed in memory order: standard (row-major) order, or channels-last order (C innermost) when the tensor has
// exactly lead + 3 dims [.., C, H, W] stored as [.., H, W, C]. Outputs keep that memory format, so a channels_last
// input gives a channels_last output and nothing is copied.
inline bool channels_last_order(const at::Tensor& t, int64_t lead) {
  if (t.dim() != lead + 3 || t.is_contiguous()) return false;
  std::vector<int64_t> perm;
  for (int64_t i = 0; i < lead; ++i) perm.push_back(i);
  perm.insert(perm.end(), {lead + 1, lead + 2, lead});
  return t.permute(perm).is_contiguous();
}

// `t` as a contiguous tensor in the given order (a view when it already is; a copy otherwise).
inline at::Tensor in_order(const at::Tensor& t, int64_t lead, bool channels_last) {
  if (!channels_last) return t.contiguous();
  std::vector<int64_t> perm;
  for (int64_t i = 0; i < lead; ++i) perm.push_back(i);
  perm.insert(perm.end(), {lead + 1, lead + 2, lead});
  return t.permute(perm).contiguous();
}

// A new tensor of logical shape `sizes` whose memory follows the given order.
inline at::Tensor empty_in_order(std::vector<int64_t> sizes, int64_t lead, bool channels_last,
                                 const at::TensorOptions& options) {
  if (!channels_last) return at::empty(sizes, options);
  std::vector<int64_t> stored(sizes.begin(), sizes.begin() + lead);
  stored.insert(stored.end(), {sizes[lead + 1], sizes[lead + 2], sizes[lead]});
  std::vector<int64_t> back;
  for (int64_t i = 0; i < lead; ++i) back.push_back(i);
  back.insert(back.end(), {lead + 2, lead, lead + 1});
  return at::empty(stored, options).permute(back);
}

inline std::vector<int64_t> sizes_of(const at::Tensor& t) { return t.sizes().vec(); }

// --- per-op checks (the same messages on every backend) -----------------------------------------------------

inline void check_path_points(const at::Tensor& input, const at::Tensor& baseline, const at::Tensor& alphas) {
  check_floating("input", input);
  TORCH_CHECK_VALUE(input.dim() >= 1, "fastig: input must have shape [N, ...], got a 0-dim tensor");
  TORCH_CHECK_TYPE(baseline.scalar_type() == input.scalar_type(), "fastig: baseline dtype ", baseline.scalar_type(),
                   " differs from input dtype ", input.scalar_type());
  TORCH_CHECK_VALUE(baseline.sizes() == input.sizes(), "fastig: baseline must be expanded to the input's shape ",
                    input.sizes(), ", got ", baseline.sizes());
  TORCH_CHECK_TYPE(alphas.scalar_type() == at::kDouble, "fastig: alphas must be float64, got ", alphas.scalar_type());
  TORCH_CHECK_VALUE(alphas.dim() == 1, "fastig: alphas must be 1-D [K], got shape ", alphas.sizes());
  check_same_device("baseline", baseline, input);
  check_same_device("alphas", alphas, input);
}

inline void check_grads(const at::Tensor& grads) {
  check_floating("grads", grads);
  TORCH_CHECK_VALUE(grads.dim() >= 2, "fastig: grads must have shape [K, N, ...], got ", grads.sizes());
}

inline void check_accumulate(const at::Tensor& grads, const at::Tensor& weights) {
  check_grads(grads);
  check_floating("weights", weights);
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == grads.size(0), "fastig: weights must have shape [K] = [",
                    grads.size(0), "] for grads ", grads.sizes(), ", got ", weights.sizes());
  check_same_device("weights", weights, grads);
}

inline void check_idgi(const at::Tensor& grads, const at::Tensor& outputs, const at::Tensor& sq_norms) {
  check_grads(grads);
  check_floating("outputs", outputs);
  check_floating("sq_norms", sq_norms);
  const int64_t k = grads.size(0), n = grads.size(1);
  TORCH_CHECK_VALUE(outputs.dim() == 2 && outputs.size(0) == k + 1 && outputs.size(1) == n,
                    "fastig: outputs must have shape [K+1, N] = [", k + 1, ", ", n, "], got ", outputs.sizes());
  TORCH_CHECK_VALUE(sq_norms.dim() == 2 && sq_norms.size(0) == k && sq_norms.size(1) == n,
                    "fastig: sq_norms must have shape [K, N] = [", k, ", ", n, "], got ", sq_norms.sizes());
  check_same_device("outputs", outputs, grads);
  check_same_device("sq_norms", sq_norms, grads);
}

inline void check_perturb(const at::Tensor& image, const at::Tensor& substrate, const at::Tensor& rank,
                          const at::Tensor& counts) {
  check_floating("image", image);
  TORCH_CHECK_VALUE(image.dim() == 4, "fastig: image must have shape [N, C, H, W], got ", image.sizes());
  TORCH_CHECK_TYPE(substrate.scalar_type() == image.scalar_type(), "fastig: substrate dtype ",
                   substrate.scalar_type(), " differs from image dtype ", image.scalar_type());
  TORCH_CHECK_TYPE(rank.scalar_type() == at::kLong, "fastig: rank must be int64, got ", rank.scalar_type());
  TORCH_CHECK_TYPE(counts.scalar_type() == at::kLong, "fastig: counts must be int64, got ", counts.scalar_type());
  TORCH_CHECK_VALUE(rank.dim() == 3 && rank.size(0) == image.size(0) && rank.size(1) == image.size(2) &&
                        rank.size(2) == image.size(3),
                    "fastig: rank must have shape [N, H, W] = [", image.size(0), ", ", image.size(2), ", ",
                    image.size(3), "], got ", rank.sizes());
  TORCH_CHECK_VALUE(counts.dim() == 1, "fastig: counts must be 1-D [K], got shape ", counts.sizes());
  check_same_device("substrate", substrate, image);
  check_same_device("rank", rank, image);
  check_same_device("counts", counts, image);
}

inline void check_guided_step(const at::Tensor& x, const at::Tensor& input, const at::Tensor& baseline,
                              const at::Tensor& grad, double fraction, double alpha_min, double alpha_max,
                              const at::Tensor& l1_target) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "fastig: guided_step needs float32 or float64 tensors, got x of ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, "fastig: x must have shape [N, ...], got a 0-dim tensor");
  const char* names[] = {"input", "baseline", "grad"};
  const at::Tensor* ts[] = {&input, &baseline, &grad};
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK_TYPE(ts[i]->scalar_type() == x.scalar_type(), "fastig: ", names[i], " dtype ", ts[i]->scalar_type(),
                     " differs from x dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(ts[i]->sizes() == x.sizes(), "fastig: ", names[i], " must have the shape of x ", x.sizes(),
                      ", got ", ts[i]->sizes());
    check_same_device(names[i], *ts[i], x);
  }
  TORCH_CHECK_TYPE(l1_target.scalar_type() == at::kDouble, "fastig: l1_target must be float64, got ",
                   l1_target.scalar_type());
  TORCH_CHECK_VALUE(l1_target.dim() == 1 && l1_target.size(0) == x.size(0), "fastig: l1_target must have shape [N] = [",
                    x.size(0), "], got ", l1_target.sizes());
  check_same_device("l1_target", l1_target, x);
  TORCH_CHECK_VALUE(fraction >= 0.0 && fraction <= 1.0, "fastig: fraction must be in [0, 1], got ", fraction);
  TORCH_CHECK_VALUE(alpha_min >= 0.0 && alpha_min <= alpha_max && alpha_max <= 1.0,
                    "fastig: need 0 <= alpha_min <= alpha_max <= 1, got ", alpha_min, ", ", alpha_max);
}

// --- per-op preparation (the same on every backend): tensors in processing order, output in their memory format ---

// path_points: input and baseline [N, ...] in processing order, the output [K * N, ...] in the same memory format.
struct PreparedPathPoints {
  at::Tensor x, b, alphas, out;
  int64_t k_steps, n, d;
  bool shared_baseline;  // a baseline broadcast over the examples is read in place, not materialized N times
};

inline PreparedPathPoints prepare_path_points(const at::Tensor& input, const at::Tensor& baseline,
                                              const at::Tensor& alphas) {
  PreparedPathPoints p;
  p.k_steps = alphas.size(0);
  p.n = input.size(0);
  p.d = p.n == 0 ? 0 : input.numel() / p.n;
  const bool cl = channels_last_order(input, 1);
  p.x = in_order(input, 1, cl);
  p.shared_baseline = p.n > 1 && baseline.stride(0) == 0;
  p.b = in_order(p.shared_baseline ? baseline.narrow(0, 0, 1) : baseline, 1, cl);
  p.alphas = alphas.contiguous();
  std::vector<int64_t> sizes = sizes_of(input);
  sizes[0] = p.k_steps * p.n;
  p.out = empty_in_order(sizes, 1, cl, input.options());
  return p;
}

// accumulate, squared_norms, accumulate_idgi: grads [K, N, ...] in processing order, plus the [N, ...] output
// (accumulation dtype) in the same memory format.
struct PreparedGrads {
  at::Tensor grads, out;
  int64_t k_steps, n, d;
};

inline PreparedGrads prepare_grads(const at::Tensor& grads) {
  const bool cl = channels_last_order(grads, 2);
  PreparedGrads p;
  p.grads = in_order(grads, 2, cl);
  p.k_steps = grads.size(0);
  p.n = grads.size(1);
  p.d = 1;
  for (int64_t i = 2; i < grads.dim(); ++i) p.d *= grads.size(i);
  std::vector<int64_t> sizes(grads.sizes().begin() + 1, grads.sizes().end());
  p.out = empty_in_order(sizes, 1, cl, grads.options().dtype(accumulation_type(grads.scalar_type())));
  return p;
}

// accumulate_idgi's per-step scale (f_{k+1} - f_k) / ||g_k||^2, 0 for a zero norm: [K, N] contiguous, in the
// accumulation dtype, computed exactly as fastig._ops.accumulate_idgi_reference does (every backend uses this one).
inline at::Tensor idgi_scale(const PreparedGrads& p, const at::Tensor& outputs, const at::Tensor& sq_norms) {
  const auto acc = p.out.scalar_type();
  at::Tensor df = (outputs.narrow(0, 1, p.k_steps) - outputs.narrow(0, 0, p.k_steps)).to(acc);
  at::Tensor norms = sq_norms.to(acc);
  at::Tensor positive = norms > 0;
  return at::where(positive, df / at::where(positive, norms, at::ones_like(norms)), at::zeros_like(norms))
      .contiguous();
}

// perturb: image and substrate (broadcast to the image) [N, C, H, W] in processing order, rank and counts
// contiguous, the output [N * K, C, H, W] in the image's memory format.
struct PreparedPerturb {
  at::Tensor image, substrate, rank, counts, out;
  int64_t n, c, p, k;  // p: pixels per channel (H * W)
  bool channels_last;
  bool shared_substrate;  // one substrate for all images (e.g. a baseline)
};

inline PreparedPerturb prepare_perturb(const at::Tensor& image, const at::Tensor& substrate_in, const at::Tensor& rank,
                                       const at::Tensor& counts) {
  at::Tensor substrate;
  try {
    substrate = substrate_in.expand_as(image);
  } catch (const c10::Error&) {
    TORCH_CHECK_VALUE(false, "fastig: substrate of shape ", substrate_in.sizes(), " does not broadcast to image shape ",
                      image.sizes());
  }
  PreparedPerturb p;
  p.n = image.size(0);
  p.c = image.size(1);
  p.p = image.size(2) * image.size(3);
  p.k = counts.size(0);
  p.channels_last = channels_last_order(image, 1);
  p.image = in_order(image, 1, p.channels_last);
  p.shared_substrate = p.n > 1 && substrate.stride(0) == 0;
  p.substrate = in_order(p.shared_substrate ? substrate.narrow(0, 0, 1) : substrate, 1, p.channels_last);
  p.rank = rank.contiguous();
  p.counts = counts.contiguous();
  p.out = empty_in_order({p.n * p.k, p.c, image.size(2), image.size(3)}, 1, p.channels_last, image.options());
  return p;
}

// 0-based rank of np.quantile(..., interpolation='lower'): floor(fraction * (D - 1)).
inline int64_t lower_quantile_index(double fraction, int64_t n_features) {
  return static_cast<int64_t>(std::floor(fraction * static_cast<double>(n_features - 1)));
}

// PAIR's EPSILON: math.isclose(l1_target, l1, rel_tol=EPSILON, abs_tol=EPSILON).
constexpr double kGuidedEpsilon = 1e-9;

}  // namespace fastig
