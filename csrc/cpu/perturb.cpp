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
  at::Tensor substrate;
  try {
    substrate = substrate_in.expand_as(image);
  } catch (const c10::Error&) {
    TORCH_CHECK_VALUE(false, "fastig: substrate of shape ", substrate_in.sizes(), " does not broadcast to image shape ",
                      image.sizes());
  }
  const int64_t n = image.size(0), c = image.size(1), p = image.size(2) * image.size(3), k = counts.size(0);
  const bool cl = channels_last_order(image, 1);
  at::Tensor img = in_order(image, 1, cl);
  const bool shared = n > 1 && substrate.stride(0) == 0;  // one substrate for all images (e.g. a baseline)
  at::Tensor sub = in_order(shared ? substrate.narrow(0, 0, 1) : substrate, 1, cl);
  at::Tensor r = rank.contiguous(), cnt = counts.contiguous();
  at::Tensor out = empty_in_order({n * k, c, image.size(2), image.size(3)}, 1, cl, image.options());
  if (out.numel() == 0) return out;
  auto run = [&](auto tag) {
    using bits_t = decltype(tag);
    perturb_kernel<bits_t>(static_cast<const bits_t*>(img.const_data_ptr()),
                           static_cast<const bits_t*>(sub.const_data_ptr()), shared, r.const_data_ptr<int64_t>(),
                           cnt.const_data_ptr<int64_t>(), static_cast<bits_t*>(out.data_ptr()), n, k, c, p, cl);
  };
  switch (image.element_size()) {
    case 2: run(uint16_t{}); break;
    case 4: run(uint32_t{}); break;
    default: run(uint64_t{}); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastig, CPU, m) { m.impl("perturb", &perturb_cpu); }

}  // namespace fastig
