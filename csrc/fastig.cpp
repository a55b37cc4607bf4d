// fastig's compiled op library: the op schemas (TORCH_LIBRARY) and the Python module init.
// Kernels register their implementations per backend with TORCH_LIBRARY_IMPL in cpu/ and cuda_bindings.cpp.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fastig._C loads this library, whose static initializers register the ops with the dispatcher.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// The schemas. Semantics, shapes and dtypes are documented on the pure-torch references in fastig/_ops.py.
TORCH_LIBRARY(fastig, m) {
  m.def("path_points(Tensor input, Tensor baseline, Tensor alphas) -> Tensor");
  m.def("accumulate(Tensor grads, Tensor weights) -> Tensor");
  m.def("squared_norms(Tensor grads) -> Tensor");
  m.def("accumulate_idgi(Tensor grads, Tensor outputs, Tensor sq_norms) -> Tensor");
  m.def("perturb(Tensor image, Tensor substrate, Tensor rank, Tensor counts) -> Tensor");
  m.def(
      "guided_step(Tensor x, Tensor input, Tensor baseline, Tensor grad, float fraction, float alpha_min, "
      "float alpha_max, Tensor l1_target) -> Tensor");
}
