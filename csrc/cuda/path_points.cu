// fastig::path_points on CUDA: every output element b + alpha_k * (x - b), one thread per element.
#include "device.cuh"

namespace fastig {
namespace cuda {
namespace {

template <typename T>
__global__ void path_points_kernel(const T* __restrict__ x, const T* __restrict__ b, bool shared_baseline,
                                   const double* __restrict__ alphas, T* __restrict__ out, int64_t k_steps, int64_t m,
                                   int64_t d) {
  using op_t = typename OpMath<T>::type;
  const int64_t total = k_steps * m;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = idx / m, j = idx - k * m;
    const op_t a = static_cast<op_t>(alphas[k]);
    const op_t bj = to_op(b[shared_baseline ? j % d : j]);
    store(out + idx, add(bj, mul(a, sub(to_op(x[j]), bj))));
  }
}

}  // namespace

const char* path_points(DType dtype, const void* input, const void* baseline, bool shared_baseline,
                        const double* alphas, void* out, int64_t k_steps, int64_t n, int64_t d, void* stream) {
  const int64_t total = k_steps * n * d;
  if (total == 0) return nullptr;
  return with_dtype(dtype, [&](auto* tag) -> const char* {
    using T = std::remove_pointer_t<decltype(tag)>;
    path_points_kernel<T><<<grid_for(total, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(input), static_cast<const T*>(baseline), shared_baseline, alphas, static_cast<T*>(out),
        k_steps, n * d, d);
    return last_error();
  });
}

}  // namespace cuda
}  // namespace fastig
