// The Python module avidfast._C: importing it loads this library, which runs the operator
// registrations (avidfast.cpp, ops/cpu, ops/cuda). Its attributes describe the build, for
// `avidfast info` and for the version check in avidfast/ops/_extension.py.
#include <Python.h>
#include <torch/version.h>

#include "ops/cpu/agreement_tiles.h"
#include "ops/cpu/rows.h"

// setup.py passes the archs as bare tokens (e.g. 8.0,9.0+PTX); this spells them as a string.
#define AVF_STRINGIFY(...) #__VA_ARGS__
#define AVF_STRING(...) AVF_STRINGIFY(__VA_ARGS__)
#if defined(AVIDFAST_CUDA_ARCH_TOKENS)
#define AVIDFAST_CUDA_ARCHS AVF_STRING(AVIDFAST_CUDA_ARCH_TOKENS)
#else
#define AVIDFAST_CUDA_ARCHS ""
#endif

namespace {

PyObject* cpu_kernels(PyObject*, PyObject*) {
  return Py_BuildValue(
      "{s:s,s:s}", "row_loops", avidfast::cpu::row_loop_variant(), "cma_tiles",
      avidfast::cpu::similarity_kernel_name());
}

PyMethodDef methods[] = {
    {"cpu_kernels", cpu_kernels, METH_NOARGS,
     "The CPU kernel variants chosen on this processor at load time: {'row_loops', 'cma_tiles'}."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "avidfast's compiled operators.", -1, methods};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#if defined(AVIDFAST_WITH_CUDA)
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
#if defined(_OPENMP)
  const long with_openmp = 1;
#else
  const long with_openmp = 0;
#endif
  if (PyModule_AddStringConstant(module, "torch_version", TORCH_VERSION) < 0 ||
      PyModule_AddIntConstant(module, "with_cuda", with_cuda) < 0 ||
      PyModule_AddStringConstant(module, "cuda_archs", AVIDFAST_CUDA_ARCHS) < 0 ||
      PyModule_AddIntConstant(module, "with_openmp", with_openmp) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
