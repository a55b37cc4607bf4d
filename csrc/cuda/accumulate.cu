// fastig::accumulate, squared_norms and accumulate_idgi on CUDA. No atomics: each output element sums its terms in
// a fixed order (steps in order; norms through a fixed reduction tree), so results are bitwise reproducible.
#include "device.cuh"

namespace fastig {
namespace cuda {
namespace {

constexpr int kNormThreads = 256;

template <typename T>
__global__ void accumulate_kernel(const T* __restrict__ g, const typename OpMath<T>::type* __restrict__ w,
                                  typename OpMath<T>::type* __restrict__ out, int64_t k_steps, int64_t m) {
  using acc_t = typename OpMath<T>::type;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < m; j += int64_t(gridDim.x) * blockDim.x) {
    acc_t acc = 0;
    for (int64_t k = 0; k < k_steps; ++k) acc = add(acc, mul(static_cast<acc_t>(to_op(g[k * m + j])), w[k]));
    out[j] = acc;
  }
}

template <typename T>
__global__ void accumulate_idgi_kernel(const T* __restrict__ g, const typename OpMath<T>::type* __restrict__ scale,
                                       typename OpMath<T>::type* __restrict__ out, int64_t k_steps, int64_t n,
                                       int64_t d) {
  using acc_t = typename OpMath<T>::type;
  const int64_t m = n * d;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < m; j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = j / d;
    acc_t acc = 0;
    for (int64_t k = 0; k < k_steps; ++k) {
      const acc_t v = static_cast<acc_t>(to_op(g[k * m + j]));
      acc = add(acc, mul(mul(v, v), scale[k * n + i]));
    }
    out[j] = acc;
  }
}

// One block per row: each thread sums a fixed strided subset in double, then a fixed tree combines the threads.
template <typename T>
__global__ void squared_norms_kernel(const T* __restrict__ g, typename OpMath<T>::type* __restrict__ out, int64_t d) {
  __shared__ double partial[kNormThreads];
  const T* row = g + blockIdx.x * d;
  double s = 0.0;
  for (int64_t j = threadIdx.x; j < d; j += kNormThreads) {
    const double v = static_cast<double>(to_op(row[j]));
    s = __dadd_rn(s, __dmul_rn(v, v));
  }
  partial[threadIdx.x] = s;
  __syncthreads();
  for (int width = kNormThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) partial[threadIdx.x] = __dadd_rn(partial[threadIdx.x], partial[threadIdx.x + width]);
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<typename OpMath<T>::type>(partial[0]);
}

}  // namespace

const char* accumulate(DType grad_dtype, const void* grads, const void* weights, void* out, int64_t k_steps,
                       int64_t m, void* stream) {
  if (m == 0) return nullptr;
  return with_dtype(grad_dtype, [&](auto* tag) -> const char* {
    using T = std::remove_pointer_t<decltype(tag)>;
    using acc_t = typename OpMath<T>::type;
    accumulate_kernel<T><<<grid_for(m, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(grads), static_cast<const acc_t*>(weights), static_cast<acc_t*>(out), k_steps, m);
    return last_error();
  });
}

const char* squared_norms(DType grad_dtype, const void* grads, void* out, int64_t rows, int64_t d, void* stream) {
  if (rows == 0) return nullptr;
  return with_dtype(grad_dtype, [&](auto* tag) -> const char* {
    using T = std::remove_pointer_t<decltype(tag)>;
    using acc_t = typename OpMath<T>::type;
    squared_norms_kernel<T><<<static_cast<unsigned>(rows), kNormThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(grads), static_cast<acc_t*>(out), d);
    return last_error();
  });
}

const char* accumulate_idgi(DType grad_dtype, const void* grads, const void* scale, void* out, int64_t k_steps,
                            int64_t n, int64_t d, void* stream) {
  if (n * d == 0) return nullptr;
  return with_dtype(grad_dtype, [&](auto* tag) -> const char* {
    using T = std::remove_pointer_t<decltype(tag)>;
    using acc_t = typename OpMath<T>::type;
    accumulate_idgi_kernel<T><<<grid_for(n * d, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(grads), static_cast<const acc_t*>(scale), static_cast<acc_t*>(out), k_steps, n, d);
    return last_error();
  });
}

}  // namespace cuda
}  // namespace fastig
