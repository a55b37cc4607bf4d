// A small C++ check of the CPU kernels through the dispatcher, for work on csrc without Python:
// path points and masking exactly against hand-written loops, accumulation determinism, a Guided IG step.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <cstdlib>

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
  if (!ok) ++failures;
}

at::Tensor call(const char* name, std::vector<c10::IValue> args) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  torch::jit::Stack stack(args.begin(), args.end());
  op.callBoxed(&stack);
  return stack.back().toTensor();
}

}  // namespace

int main() {
  at::manual_seed(0);
  at::Tensor x = at::randn({2, 3, 4, 5}), b = at::zeros({2, 3, 4, 5});
  at::Tensor alphas = at::rand({4}, at::kDouble);
  at::Tensor points = call("fastig::path_points", {x, b, alphas});
  at::Tensor expected = (b.unsqueeze(0) + alphas.to(at::kFloat).view({4, 1, 1, 1, 1}) * (x - b).unsqueeze(0))
                            .reshape({8, 3, 4, 5});
  check(at::equal(points, expected), "path_points == b + a (x - b), step-major");

  at::Tensor grads = at::randn({7, 2, 3, 4, 5}), weights = at::rand({7}, at::kDouble);
  at::Tensor acc = call("fastig::accumulate", {grads, weights});
  check(at::allclose(acc, (grads * weights.to(at::kFloat).view({7, 1, 1, 1, 1})).sum(0), 1e-5, 1e-6),
        "accumulate == sum_k w_k g_k");
  check(at::equal(acc, call("fastig::accumulate", {grads, weights})), "accumulate is deterministic");

  at::Tensor rank = at::randperm(20, at::kLong).view({1, 4, 5}).repeat({2, 1, 1});
  at::Tensor counts = at::tensor({0, 7, 20}, at::kLong);
  at::Tensor batch = call("fastig::perturb", {x, b, rank, counts}).view({2, 3, 3, 4, 5});
  at::Tensor shown = (rank < 7).unsqueeze(1).expand({2, 3, 4, 5});
  check(at::equal(batch.select(1, 1), at::where(shown, x, b)), "perturb shows the pixels ranked below the count");
  check(at::equal(batch.select(1, 2), x) && at::equal(batch.select(1, 0), b), "perturb with count 0 and all");

  at::Tensor xi = at::tensor({1.0f, 2.0f, 3.0f, 4.0f}).view({1, 4}), zero = at::zeros({1, 4});
  at::Tensor g = at::tensor({4.0f, 3.0f, 2.0f, 1.0f}).view({1, 4});
  at::Tensor step = call("fastig::guided_step", {zero, xi, zero, g, 0.25, 0.0, 1.0, at::full({1}, 5.0, at::kDouble)});
  check(at::allclose(step, at::tensor({0.0f, 0.0f, 1.0f, 4.0f}).view({1, 4})), "guided_step moves the lowest |grad| first");

  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
