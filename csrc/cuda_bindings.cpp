// Torch glue for the CUDA kernels: the same checks and element order as the CPU kernels (common.h), then a call to
// the plain launchers of cuda/launchers.h on the current stream. Built only when torch has CUDA
// (-DFASTIG_WITH_CUDA). It includes no CUDA headers: the stream comes from c10's device-generic interface.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include "common.h"
#include "cuda/launchers.h"

namespace fastig {
namespace {

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::f32;
    case at::kDouble: return cuda::DType::f64;
    case at::kHalf: return cuda::DType::f16;
    case at::kBFloat16: return cuda::DType::bf16;
    default: TORCH_CHECK_TYPE(false, "fastig: unsupported dtype ", t.scalar_type());
  }
}

void* current_stream(const at::Tensor& t) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(t.device()).native_handle();
}

void check_launch(const char* error, const char* op) {
  TORCH_CHECK(error == nullptr, "fastig::", op, " CUDA kernel failed: ", error ? error : "");
}

at::Tensor path_points_cuda(const at::Tensor& input, const at::Tensor& baseline, const at::Tensor& alphas) {
  check_path_points(input, baseline, alphas);
  c10::DeviceGuard guard(input.device());
  PreparedPathPoints p = prepare_path_points(input, baseline, alphas);
  if (p.out.numel() == 0) return p.out;
  check_launch(cuda::path_points(dtype_of(input), p.x.const_data_ptr(), p.b.const_data_ptr(), p.shared_baseline,
                                 p.alphas.const_data_ptr<double>(), p.out.data_ptr(), p.k_steps, p.n, p.d,
                                 current_stream(input)),
               "path_points");
  return p.out;
}

at::Tensor accumulate_cuda(const at::Tensor& grads, const at::Tensor& weights) {
  check_accumulate(grads, weights);
  c10::DeviceGuard guard(grads.device());
  PreparedGrads p = prepare_grads(grads);
  if (p.out.numel() == 0) return p.out;
  at::Tensor w = weights.to(p.out.scalar_type()).contiguous();
  check_launch(cuda::accumulate(dtype_of(grads), p.grads.const_data_ptr(), w.const_data_ptr(), p.out.data_ptr(),
                                p.k_steps, p.n * p.d, current_stream(grads)),
               "accumulate");
  return p.out;
}

at::Tensor squared_norms_cuda(const at::Tensor& grads) {
  check_grads(grads);
  c10::DeviceGuard guard(grads.device());
  PreparedGrads p = prepare_grads(grads);
  at::Tensor out = at::empty({p.k_steps, p.n}, p.out.options());
  if (out.numel() == 0) return out;
  check_launch(cuda::squared_norms(dtype_of(grads), p.grads.const_data_ptr(), out.data_ptr(), p.k_steps * p.n, p.d,
                                   current_stream(grads)),
               "squared_norms");
  return out;
}

at::Tensor accumulate_idgi_cuda(const at::Tensor& grads, const at::Tensor& outputs, const at::Tensor& sq_norms) {
  check_idgi(grads, outputs, sq_norms);
  c10::DeviceGuard guard(grads.device());
  PreparedGrads p = prepare_grads(grads);
  if (p.out.numel() == 0) return p.out;
  at::Tensor scale = idgi_scale(p, outputs, sq_norms);
  check_launch(cuda::accumulate_idgi(dtype_of(grads), p.grads.const_data_ptr(), scale.const_data_ptr(),
                                     p.out.data_ptr(), p.k_steps, p.n, p.d, current_stream(grads)),
               "accumulate_idgi");
  return p.out;
}

at::Tensor perturb_cuda(const at::Tensor& image, const at::Tensor& substrate_in, const at::Tensor& rank,
                        const at::Tensor& counts) {
  check_perturb(image, substrate_in, rank, counts);
  c10::DeviceGuard guard(image.device());
  PreparedPerturb p = prepare_perturb(image, substrate_in, rank, counts);
  if (p.out.numel() == 0) return p.out;
  check_launch(cuda::perturb(static_cast<int>(image.element_size()), p.image.const_data_ptr(),
                             p.substrate.const_data_ptr(), p.shared_substrate, p.rank.const_data_ptr<int64_t>(),
                             p.counts.const_data_ptr<int64_t>(), p.out.data_ptr(), p.n, p.k, p.c, p.p, p.channels_last,
                             current_stream(image)),
               "perturb");
  return p.out;
}

at::Tensor guided_step_cuda(const at::Tensor& x, const at::Tensor& input, const at::Tensor& baseline,
                            const at::Tensor& grad, double fraction, double alpha_min, double alpha_max,
                            const at::Tensor& l1_target) {
  check_guided_step(x, input, baseline, grad, fraction, alpha_min, alpha_max, l1_target);
  c10::DeviceGuard guard(x.device());
  const bool cl = channels_last_order(x, 1);
  at::Tensor out = empty_in_order(sizes_of(x), 1, cl, x.options());
  at::Tensor flat = in_order(out, 1, cl);  // a view of out's memory
  flat.copy_(in_order(x, 1, cl));
  if (x.numel() == 0) return out;
  at::Tensor inp = in_order(input, 1, cl), base = in_order(baseline, 1, cl), g = in_order(grad, 1, cl);
  at::Tensor target = l1_target.contiguous();
  const int64_t n = x.size(0), d = x.numel() / n;
  check_launch(cuda::guided_step(dtype_of(x), flat.data_ptr(), inp.const_data_ptr(), base.const_data_ptr(),
                                 g.const_data_ptr(), target.const_data_ptr<double>(), n, d, fraction, alpha_min,
                                 alpha_max, current_stream(x)),
               "guided_step");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastig, CUDA, m) {
  m.impl("path_points", &path_points_cuda);
  m.impl("accumulate", &accumulate_cuda);
  m.impl("squared_norms", &squared_norms_cuda);
  m.impl("accumulate_idgi", &accumulate_idgi_cuda);
  m.impl("perturb", &perturb_cuda);
  m.impl("guided_step", &guided_step_cuda);
}

}  // namespace fastig
