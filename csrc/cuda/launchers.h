// The launcher API of fastig's CUDA kernels: plain C++ (no torch, no CUDA headers), so that the kernels compile
// with nvcc alone and the torch glue (csrc/cuda_bindings.cpp) compiles with a host compiler.
// All pointers are device pointers of contiguous arrays; `stream` is a cudaStream_t. Every launcher returns
// nullptr on success or the CUDA error message. Semantics: see the references in fastig/_ops.py.
#pragma once

#include <cstdint>

namespace fastig {
namespace cuda {

enum class DType : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

// out[k, j] = b[j] + alphas[k] * (x[j] - b[j]) for j < n * d (b indexed j % d when shared_baseline), in fp32
// (fp64 for f64), one rounding per operation. out is [k_steps, n * d] of the input dtype.
const char* path_points(DType dtype, const void* input, const void* baseline, bool shared_baseline,
                        const double* alphas, void* out, int64_t k_steps, int64_t n, int64_t d, void* stream);

// out[j] = sum_k weights[k] * g[k, j] over grads [k_steps, m]; weights and out in the accumulation type
// (double for f64 grads, float otherwise). Each output sums its terms in step order: bitwise deterministic.
const char* accumulate(DType grad_dtype, const void* grads, const void* weights, void* out, int64_t k_steps,
                       int64_t m, void* stream);

// out[r] = sum_j g[r, j]^2 over grads [rows, d], summed in double with a fixed reduction tree; out in the
// accumulation type.
const char* squared_norms(DType grad_dtype, const void* grads, void* out, int64_t rows, int64_t d, void* stream);

// out[i, j] = sum_k g[k, i, j]^2 * scale[k, i] over grads [k_steps, n, d]; scale [k_steps, n] and out in the
// accumulation type. Step order: bitwise deterministic.
const char* accumulate_idgi(DType grad_dtype, const void* grads, const void* scale, void* out, int64_t k_steps,
                            int64_t n, int64_t d, void* stream);

// out[i, k] = image[i] where rank[i, q] < counts[k], substrate[i] (substrate[0] when shared) elsewhere, for images
// of c channels and p pixels stored channel-major ([c, p]) or channels-last ([p, c]); values copied as raw bits of
// element_size (2, 4 or 8) bytes.
const char* perturb(int element_size, const void* image, const void* substrate, bool shared_substrate,
                    const int64_t* rank, const int64_t* counts, void* out, int64_t n, int64_t k_counts, int64_t c,
                    int64_t p, bool channels_last, void* stream);

// One Guided IG step in place on x [n, d] (f32 or f64), one thread block per example; the |grad| quantile is a
// radix select in shared memory.
const char* guided_step(DType dtype, void* x, const void* input, const void* baseline, const void* grad,
                        const double* l1_target, int64_t n, int64_t d, double fraction, double alpha_min,
                        double alpha_max, void* stream);

}  // namespace cuda
}  // namespace fastig
