// fastig::perturb on CUDA: one thread per output element copies the image's or the substrate's bits.
#include "device.cuh"

namespace fastig {
namespace cuda {
namespace {

template <typename bits_t>
__global__ void perturb_kernel(const bits_t* __restrict__ image, const bits_t* __restrict__ substrate,
                               bool shared_substrate, const int64_t* __restrict__ rank,
                               const int64_t* __restrict__ counts, bits_t* __restrict__ out, int64_t n,
                               int64_t k_counts, int64_t c, int64_t p, bool channels_last) {
  const int64_t per_image = c * p, total = n * k_counts * per_image;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t task = idx / per_image, e = idx - task * per_image;
    const int64_t i = task / k_counts, k = task - i * k_counts;
    const int64_t q = channels_last ? e / c : e % p;
    const bool shown = rank[i * p + q] < counts[k];
    out[idx] = shown ? image[i * per_image + e] : substrate[(shared_substrate ? 0 : i * per_image) + e];
  }
}

}  // namespace

const char* perturb(int element_size, const void* image, const void* substrate, bool shared_substrate,
                    const int64_t* rank, const int64_t* counts, void* out, int64_t n, int64_t k_counts, int64_t c,
                    int64_t p, bool channels_last, void* stream) {
  const int64_t total = n * k_counts * c * p;
  if (total == 0) return nullptr;
  auto launch = [&](auto* tag) -> const char* {
    using bits_t = std::remove_pointer_t<decltype(tag)>;
    perturb_kernel<bits_t><<<grid_for(total, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const bits_t*>(image), static_cast<const bits_t*>(substrate), shared_substrate, rank, counts,
        static_cast<bits_t*>(out), n, k_counts, c, p, channels_last);
    return last_error();
  };
  switch (element_size) {
    case 2: return launch(static_cast<uint16_t*>(nullptr));
    case 4: return launch(static_cast<uint32_t*>(nullptr));
    case 8: return launch(static_cast<uint64_t*>(nullptr));
  }
  return "fastig: perturb supports 2-, 4- and 8-byte elements";
}

}  // namespace cuda
}  // namespace fastig
