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

TORCH_LIBRARY(fastig, m) {}
