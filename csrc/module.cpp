// The Python module avidfast._C: importing it loads this library, which runs the operator
// registrations (avidfast.cpp, ops/cpu, ops/cuda). Its attributes describe the build, for
// `avidfast info` and for the version check in avidfast/ops/_extension.py.
//
// Functions whose names start with an underscore are test hooks, not API (no operator schema, not
// exported by avidfast.ops): _plan_rows, _plan_memory_update, _plan_cma_topk and
// _launch_constants run the pure launch planners of ops/launch_plan.h on the CPU, for
// tests/test_launch_plan.py.
#include <Python.h>
#include <torch/version.h>

#include <cstdint>

#include "ops/cpu/agreement_tiles.h"
#include "ops/cpu/rows.h"
#include "ops/launch_plan.h"

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

namespace plan = avidfast::gpu;

// _plan_rows(batch, terms, dim, acc_bytes, mem_bytes, aligned, needs_dot, accumulate,
//            static_shared, blocks_per_sm, sms, shared_limit=48 KiB) -> dict
PyObject* plan_rows_hook(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"batch", "terms", "dim", "acc_bytes", "mem_bytes", "aligned",
                                   "needs_dot", "accumulate", "static_shared", "blocks_per_sm",
                                   "sms", "shared_limit", nullptr};
  long long batch, terms, dim, static_shared, blocks_per_sm, sms;
  long long shared_limit = plan::kDefaultSharedBytes;
  int acc_bytes, mem_bytes, aligned, needs_dot, accumulate;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "LLLiipppLLL|L", const_cast<char**>(keywords),
                                   &batch, &terms, &dim, &acc_bytes, &mem_bytes, &aligned,
                                   &needs_dot, &accumulate, &static_shared, &blocks_per_sm, &sms,
                                   &shared_limit)) {
    return nullptr;
  }
  if (terms < 1 || dim < 1 || batch < 1 || (acc_bytes != 4 && acc_bytes != 8) ||
      (mem_bytes != 2 && mem_bytes != 4 && mem_bytes != 8)) {
    PyErr_SetString(PyExc_ValueError, "_plan_rows: batch, terms, dim >= 1; acc_bytes 4 or 8; "
                                      "mem_bytes 2, 4 or 8");
    return nullptr;
  }
  plan::RowsProblem problem;
  problem.terms = terms;
  problem.dim = dim;
  problem.acc_bytes = acc_bytes;
  problem.mem_bytes = mem_bytes;
  problem.aligned = aligned != 0;
  problem.needs_dot = needs_dot != 0;
  problem.accumulate = accumulate != 0;
  plan::RowsPlan result = plan::plan_rows_shape(problem, static_shared, shared_limit);
  plan::plan_rows_splits(result, batch, terms, blocks_per_sm * sms);
  return Py_BuildValue("{s:i,s:i,s:i,s:L,s:L,s:L,s:O}", "vec", result.vec, "warps", result.warps,
                       "threads", result.warps * plan::kWarp, "splits",
                       static_cast<long long>(result.splits), "per_split",
                       static_cast<long long>(result.per_split), "smem",
                       static_cast<long long>(result.smem), "global",
                       result.global ? Py_True : Py_False);
}

// _plan_memory_update(batch, dim, row_bytes, static_shared, shared_limit=48 KiB) -> dict
PyObject* plan_memory_update_hook(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"batch", "dim", "row_bytes", "static_shared", "shared_limit",
                                   nullptr};
  long long batch, dim, static_shared;
  long long shared_limit = plan::kDefaultSharedBytes;
  int row_bytes;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "LLiL|L", const_cast<char**>(keywords), &batch,
                                   &dim, &row_bytes, &static_shared, &shared_limit)) {
    return nullptr;
  }
  const plan::UpdatePlan result =
      plan::plan_memory_update(batch, dim, row_bytes, static_shared, shared_limit);
  return Py_BuildValue("{s:i,s:L,s:O,s:O}", "threads", result.threads, "smem",
                       static_cast<long long>(result.smem), "workspace",
                       result.workspace ? Py_True : Py_False, "sorted",
                       result.sorted ? Py_True : Py_False);
}

// _plan_cma_topk(k, max_optin, static_shared) -> dict
PyObject* plan_cma_topk_hook(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"k", "max_optin", "static_shared", nullptr};
  long long k, max_optin, static_shared;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "LLL", const_cast<char**>(keywords), &k,
                                   &max_optin, &static_shared)) {
    return nullptr;
  }
  const plan::cma::SharedPlan result = plan::cma::plan_shared(k, max_optin, static_shared);
  return Py_BuildValue("{s:O,s:i,s:O,s:L,s:L,s:L}", "ok", result.ok ? Py_True : Py_False,
                       "capacity", result.capacity, "lists_on_chip",
                       result.lists_on_chip ? Py_True : Py_False, "smem",
                       static_cast<long long>(result.smem), "dynamic_limit",
                       static_cast<long long>(result.dynamic_limit), "needed",
                       static_cast<long long>(result.needed));
}

PyObject* launch_constants(PyObject*, PyObject*) {
  return Py_BuildValue(
      "{s:i,s:L,s:L,s:L,s:i,s:i,s:i,s:L,s:i,s:i}", "warp", plan::kWarp, "default_shared_bytes",
      static_cast<long long>(plan::kDefaultSharedBytes), "max_grid_x",
      static_cast<long long>(plan::kMaxGridX), "max_grid_y",
      static_cast<long long>(plan::kMaxGridY), "rows_max_warps", plan::kMaxWarps,
      "update_max_threads", plan::kUpdateMaxThreads, "update_scan_per_thread",
      plan::kUpdateScanPerThread, "update_scan_batch",
      static_cast<long long>(plan::kUpdateScanBatch), "cma_threads", plan::cma::kThreads,
      "cma_max_candidates", plan::cma::kMaxCandidates);
}

PyMethodDef methods[] = {
    {"cpu_kernels", cpu_kernels, METH_NOARGS,
     "The CPU kernel variants chosen on this processor at load time: {'row_loops', 'cma_tiles'}."},
    {"_plan_rows", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plan_rows_hook)),
     METH_VARARGS | METH_KEYWORDS,
     "Test hook: the rows kernel's launch plan (ops/launch_plan.h) for the given problem, static "
     "shared bytes and occupancy: {'vec', 'warps', 'threads', 'splits', 'per_split', 'smem', "
     "'global'}."},
    {"_plan_memory_update",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plan_memory_update_hook)),
     METH_VARARGS | METH_KEYWORDS,
     "Test hook: memory_update_'s launch plan: {'threads', 'smem', 'workspace', 'sorted'}."},
    {"_plan_cma_topk", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plan_cma_topk_hook)),
     METH_VARARGS | METH_KEYWORDS,
     "Test hook: cma_topk's shared-memory plan: {'ok', 'capacity', 'lists_on_chip', 'smem', "
     "'dynamic_limit', 'needed'}."},
    {"_launch_constants", launch_constants, METH_NOARGS,
     "Test hook: the constants of ops/launch_plan.h the planners use."},
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
