// The Python module fastml._C. Importing it registers the C++ kernels: csrc/cpu/<op>.cpp and
// csrc/cuda/<op>_binding.cpp attach them with TORCH_LIBRARY_IMPL to the ops that fastml/ops/<op>/schema.py
// declares (schemas and fake functions are written once, in Python, and shared with the Triton twins).
// WITH_CUDA tells Python whether the CUDA kernels were compiled in.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
#ifdef FASTML_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(m, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
