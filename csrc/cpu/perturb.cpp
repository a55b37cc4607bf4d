// fastig::perturb on the CPU: insertion/deletion batches without materializing masks. Values are copied as raw
// bits (no arithmetic), so the output equals the reference exactly for every dtype.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "../common.h"

namespace fastig {
namespace {

// out[n, k] (C x P pixels, stored with channel stride cs and pixel stride ps) = image[n] where rank[n, p] < counts[k],
// substrate[n] elsewhere. One task per (n, k) output image.
template <typename bits_t>
void perturb_kernel(const bits_t* image, const bits_t* substrate, bool shared_substrate, const int64_t* rank,
                    const int64_t* counts, bits_t* out, int64_t n, int64_t k_counts, int64_t c, int64_t p,
                    bool channels_last) {
  const int64_t per_image = c * p;
  at::parallel_for(0, n * k_counts, 1, [&](int64_t begin, int64_t end) {
    // All-ones where the image shows, zero elsewhere: a branch-free select that the compiler vectorizes.
    std::vector<bits_t> shown(p);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / k_counts, k = task % k_counts;
      const int64_t count = counts[k];
      const int64_t* r = rank + i * p;
      for (int64_t q = 0; q < p; ++q) shown[q] = r[q] < count ? ~bits_t(0) : bits_t(0);
      const bits_t* img = image + i * per_image;
      const bits_t* sub = substrate + (shared_substrate ? 0 : i * per_image);
      bits_t* o = out + task * per_image;
      if (channels_last) {
        for (int64_t q = 0; q < p; ++q)
          for (int64_t ch = 0; ch < c; ++ch) {
            const int64_t at = q * c + ch;
            o[at] = (img[at] & shown[q]) | (sub[at] & ~shown[q]);
          }
      } else {
        for (int64_t ch = 0; ch < c; ++ch) {
          const bits_t* ic = img + ch * p;
          const bits_t* sc = sub + ch * p;
          bits_t* oc = o + ch * p;
          for (int64_t q = 0; q < p; ++q) oc[q] = (ic[q] & shown[q]) | (sc[q] & ~shown[q]);
        }
      }
    }
  });
}

at::Tensor perturb_cpu(const at::Tensor& image, const at::Tensor& substrate_in, const at::Tensor& rank,
                       const at::Tensor& counts) {
  check_perturb(image, substrate_in, rank, counts);
  PreparedPerturb p = prepare_perturb(image, substrate_in, rank, counts);
  if (p.out.numel() == 0) return p.out;
  auto run = [&](auto tag) {
    using bits_t = decltype(tag);
    perturb_kernel<bits_t>(static_cast<const bits_t*>(p.image.const_data_ptr()),
                           static_cast<const bits_t*>(p.substrate.const_data_ptr()), p.shared_substrate,
                           p.rank.const_data_ptr<int64_t>(), p.counts.const_data_ptr<int64_t>(),
                           static_cast<bits_t*>(p.out.data_ptr()), p.n, p.k, p.c, p.p, p.channels_last);
  };
  switch (image.element_size()) {
    case 2: run(uint16_t{}); break;
    case 4: run(uint32_t{}); break;
    default: run(uint64_t{}); break;
  }
  return p.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastig, CPU, m) { m.impl("perturb", &perturb_cpu); }

}  // namespace fastig
