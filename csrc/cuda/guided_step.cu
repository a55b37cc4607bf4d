// fastig::guided_step on CUDA: one thread block per example runs the whole step (all rounds) on the device.
// The |grad| quantile is an exact radix select over the keys' IEEE bits (non-negative floats order like their bit
// patterns), 8 bits per pass with a shared-memory histogram: no sort, no host round trip. Sums use a fixed
// thread-to-element mapping and a fixed reduction tree, so the step is bitwise reproducible.
// Every element-wise expression mirrors guided_step_reference in fastig/_ops.py operation for operation.
#include "device.cuh"

namespace fastig {
namespace cuda {
namespace {

constexpr int kThreads = 512;

template <typename T>
struct KeyBits;
template <>
struct KeyBits<float> {
  using type = unsigned int;
  __device__ static type of(float v) { return __float_as_uint(v); }
  __device__ static float value(type b) { return __uint_as_float(b); }
};
template <>
struct KeyBits<double> {
  using type = unsigned long long;
  __device__ static type of(double v) { return static_cast<type>(__double_as_longlong(v)); }
  __device__ static double value(type b) { return __longlong_as_double(static_cast<long long>(b)); }
};

// Sum of one value per thread through a fixed tree (all threads get the result).
__device__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) shared[threadIdx.x] = __dadd_rn(shared[threadIdx.x], shared[threadIdx.x + width]);
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    guided_step_kernel(T* __restrict__ x_all, const T* __restrict__ input_all, const T* __restrict__ base_all,
                       const T* __restrict__ grad_all, const double* __restrict__ l1_target, int64_t d, int64_t kth,
                       double epsilon, T a_min, T a_max) {
  using bits_t = typename KeyBits<T>::type;
  __shared__ double reduce[kThreads];
  __shared__ unsigned int hist[256];
  __shared__ bits_t chosen_prefix;
  __shared__ long long chosen_rank;

  const int64_t offset = static_cast<int64_t>(blockIdx.x) * d;
  T* x = x_all + offset;
  const T *input = input_all + offset, *base = base_all + offset, *grad = grad_all + offset;
  const double target = l1_target[blockIdx.x];
  const T inf = static_cast<T>(INFINITY);
  auto x_max = [&](int64_t j) { return add(base[j], mul(sub(input[j], base[j]), a_max)); };
  // Features at x_max and non-finite gradients are keyed +inf (never selected).
  auto key = [&](int64_t j) {
    const T g = fabs(grad[j]);
    return (x[j] == x_max(j) || !isfinite(g)) ? inf : g;
  };

  for (int64_t round = 0; round < d + 2; ++round) {
    // 1. Laggards jump to x_min; 2. L1 distance to the input.
    double l1 = 0.0;
    for (int64_t j = threadIdx.x; j < d; j += kThreads) {
      const T diff = sub(input[j], base[j]);
      const T alpha = diff != T(0) ? div(sub(x[j], base[j]), diff) : a_max;
      if (alpha < a_min) x[j] = add(base[j], mul(diff, a_min));
      l1 = __dadd_rn(l1, static_cast<double>(fabs(sub(x[j], input[j]))));
    }
    l1 = block_sum(l1, reduce);
    const double tol = fmax(epsilon * fmax(fabs(l1), fabs(target)), epsilon);
    if (l1 - target <= tol) return;

    // 3. Radix select of the kth smallest key, most significant byte first.
    bits_t prefix = 0, mask = 0;
    long long rank = kth;
    for (int shift = static_cast<int>(sizeof(bits_t)) * 8 - 8; shift >= 0; shift -= 8) {
      for (int b = threadIdx.x; b < 256; b += kThreads) hist[b] = 0;
      __syncthreads();
      for (int64_t j = threadIdx.x; j < d; j += kThreads) {
        const bits_t u = KeyBits<T>::of(key(j));
        if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 0xFF], 1u);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        long long below = 0;
        int b = 0;
        for (; b < 255 && below + hist[b] <= rank; ++b) below += hist[b];
        chosen_prefix = prefix | (static_cast<bits_t>(b) << shift);
        chosen_rank = rank - below;
      }
      __syncthreads();
      prefix = chosen_prefix;
      rank = chosen_rank;
      mask |= static_cast<bits_t>(0xFF) << shift;
      __syncthreads();
    }
    const T threshold = KeyBits<T>::value(prefix);

    // 4. Move the selected features toward x_max: all the way, or by gamma to meet the target.
    double l1_s = 0.0;
    for (int64_t j = threadIdx.x; j < d; j += kThreads) {
      const T k = key(j);
      if (k <= threshold && k != inf) l1_s = __dadd_rn(l1_s, static_cast<double>(fabs(sub(x[j], x_max(j)))));
    }
    l1_s = block_sum(l1_s, reduce);
    if (!(l1_s > 0.0)) return;
    const double gamma = (l1 - target) / l1_s;
    const bool full = gamma > 1.0;
    const T g = static_cast<T>(gamma);
    for (int64_t j = threadIdx.x; j < d; j += kThreads) {
      const T k = key(j);
      if (!(k <= threshold && k != inf)) continue;
      const T top = x_max(j);
      x[j] = full ? top : add(x[j], mul(sub(top, x[j]), g));
    }
    if (!full) return;
    __syncthreads();
  }
}

}  // namespace

const char* guided_step(DType dtype, void* x, const void* input, const void* baseline, const void* grad,
                        const double* l1_target, int64_t n, int64_t d, double fraction, double alpha_min,
                        double alpha_max, void* stream) {
  if (n == 0 || d == 0) return nullptr;
  const int64_t kth = static_cast<int64_t>(floor(fraction * static_cast<double>(d - 1)));
  const double epsilon = 1e-9;  // PAIR saliency's EPSILON (math.isclose tolerances)
  auto launch = [&](auto* tag) -> const char* {
    using T = std::remove_pointer_t<decltype(tag)>;
    guided_step_kernel<T><<<static_cast<unsigned>(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<T*>(x), static_cast<const T*>(input), static_cast<const T*>(baseline),
        static_cast<const T*>(grad), l1_target, d, kth, epsilon, static_cast<T>(alpha_min), static_cast<T>(alpha_max));
    return last_error();
  };
  switch (dtype) {
    case DType::f32: return launch(static_cast<float*>(nullptr));
    case DType::f64: return launch(static_cast<double*>(nullptr));
    default: return "fastig: guided_step supports float32 and float64";
  }
}

}  // namespace cuda
}  // namespace fastig
