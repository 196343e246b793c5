// The Python module avidfast._C: importing it loads this library, which runs the operator
// registrations (avidfast.cpp, ops/cpu, ops/cuda). Its attributes describe the build, for
// `avidfast info` and for the version check in avidfast/ops/_extension.py.
//
// Functions whose names start with an underscore are test hooks, not API (no operator schema,
// not exported by avidfast.ops): _plan_rows, _plan_rows_splits, _plan_memory_update,
// _plan_cma_topk and _launch_constants run the pure launch planners of ops/launch_plan.h on the
// CPU, for tests/test_launch_plan.py. _set_value_checks, _value_checks, _treat_cpu_as_device,
// _host_reads, _inject_device_error drive the value checks (ops/device_errors.h) from tests and
// benchmarks, and mock their host syncs without CUDA (tests/test_value_checks.py).
// _take_device_error is what avidfast.ops.check_errors() calls.
#include <Python.h>
#include <torch/version.h>

#include <cstdint>

#include <c10/util/Exception.h>

#include "ops/cpu/agreement_tiles.h"
#include "ops/cpu/rows.h"
#include "ops/device_errors.h"
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

// _plan_rows(terms, dim, acc_bytes, mem_bytes, aligned, needs_dot, accumulate, static_shared,
//            shared_limit=48 KiB): the shape of a rows-kernel launch (plan_rows_shape) as
// (vec, warps, dynamic shared bytes, global fallback); with a sequence of dims, four lists
// (vecs, warps, shared bytes, fallbacks), one entry per dim.
PyObject* plan_rows_hook(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"terms", "dim", "acc_bytes", "mem_bytes", "aligned", "needs_dot",
                                   "accumulate", "static_shared", "shared_limit", nullptr};
  long long terms, static_shared;
  long long shared_limit = plan::kDefaultSharedBytes;
  PyObject* dims = nullptr;
  int acc_bytes, mem_bytes, aligned, needs_dot, accumulate;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "LOiipppL|L", const_cast<char**>(keywords), &terms,
                                   &dims, &acc_bytes, &mem_bytes, &aligned, &needs_dot, &accumulate,
                                   &static_shared, &shared_limit)) {
    return nullptr;
  }
  if (terms < 1 || (acc_bytes != 4 && acc_bytes != 8) ||
      (mem_bytes != 2 && mem_bytes != 4 && mem_bytes != 8)) {
    PyErr_SetString(PyExc_ValueError,
                    "_plan_rows: terms >= 1; acc_bytes 4 or 8; mem_bytes 2, 4 or 8");
    return nullptr;
  }
  plan::RowsProblem problem;
  problem.terms = terms;
  problem.acc_bytes = acc_bytes;
  problem.mem_bytes = mem_bytes;
  problem.aligned = aligned != 0;
  problem.needs_dot = needs_dot != 0;
  problem.accumulate = accumulate != 0;
  if (PyLong_Check(dims)) {
    problem.dim = PyLong_AsLongLong(dims);
    if (problem.dim < 1) {
      PyErr_SetString(PyExc_ValueError, "_plan_rows: dim >= 1");
      return nullptr;
    }
    const plan::RowsPlan result = plan::plan_rows_shape(problem, static_shared, shared_limit);
    return Py_BuildValue("(iiLO)", result.vec, result.warps, static_cast<long long>(result.smem),
                         result.global ? Py_True : Py_False);
  }
  PyObject* seq = PySequence_Fast(dims, "_plan_rows: dim must be an int or a sequence of ints");
  if (seq == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject* lists[4] = {PyList_New(n), PyList_New(n), PyList_New(n), PyList_New(n)};
  bool ok = lists[0] && lists[1] && lists[2] && lists[3];
  for (Py_ssize_t i = 0; ok && i < n; ++i) {
    problem.dim = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
    if (problem.dim < 1) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "_plan_rows: dim >= 1");
      ok = false;
      break;
    }
    const plan::RowsPlan result = plan::plan_rows_shape(problem, static_shared, shared_limit);
    PyList_SET_ITEM(lists[0], i, PyLong_FromLong(result.vec));
    PyList_SET_ITEM(lists[1], i, PyLong_FromLong(result.warps));
    PyList_SET_ITEM(lists[2], i, PyLong_FromLongLong(static_cast<long long>(result.smem)));
    PyList_SET_ITEM(lists[3], i, PyBool_FromLong(result.global ? 1 : 0));
  }
  Py_DECREF(seq);
  if (!ok) {
    for (PyObject* list : lists) Py_XDECREF(list);
    return nullptr;
  }
  return Py_BuildValue("(NNNN)", lists[0], lists[1], lists[2], lists[3]);
}

// _plan_rows_splits(vec, warps, batch, terms, slots) -> (splits, per_split) (plan_rows_splits)
PyObject* plan_rows_splits_hook(PyObject*, PyObject* args) {
  int vec, warps;
  long long batch, terms, slots;
  if (!PyArg_ParseTuple(args, "iiLLL", &vec, &warps, &batch, &terms, &slots)) return nullptr;
  plan::RowsPlan result;
  result.vec = vec;
  result.warps = warps;
  plan::plan_rows_splits(result, batch, terms, slots);
  return Py_BuildValue("(LL)", static_cast<long long>(result.splits),
                       static_cast<long long>(result.per_split));
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

PyObject* treat_cpu_as_device_hook(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  avidfast::set_treat_cpu_as_device(on != 0);
  Py_RETURN_NONE;
}

PyObject* host_reads_hook(PyObject*, PyObject*) {
  return PyLong_FromLongLong(static_cast<long long>(avidfast::host_reads()));
}

// _set_value_checks(mode): -1 the environment's, 0 host (synchronous), 1 device, 2 off.
PyObject* set_value_checks_hook(PyObject*, PyObject* arg) {
  const long mode = PyLong_AsLong(arg);
  if (mode == -1 && PyErr_Occurred()) return nullptr;
  if (mode < -1 || mode > 2) {
    PyErr_SetString(PyExc_ValueError, "_set_value_checks: mode must be -1, 0, 1 or 2");
    return nullptr;
  }
  avidfast::set_value_checks_override(static_cast<int>(mode));
  Py_RETURN_NONE;
}

PyObject* value_checks_hook(PyObject*, PyObject*) {
  return PyLong_FromLong(static_cast<long>(avidfast::cuda_value_checks()));
}

// _take_device_error(synchronize) -> the message of the first recorded failure (cleared), or None.
PyObject* take_device_error_hook(PyObject*, PyObject* arg) {
  const int synchronize = PyObject_IsTrue(arg);
  if (synchronize < 0) return nullptr;
  try {
    avidfast::raise_device_errors(synchronize != 0);
  } catch (const c10::ValueError& error) {
    return PyUnicode_FromString(error.msg().c_str());
  } catch (const c10::Error& error) {  // a failed sync: the device's own error
    PyErr_SetString(PyExc_RuntimeError, error.msg().c_str());
    return nullptr;
  }
  Py_RETURN_NONE;
}

// _inject_device_error(device, check, value, limit): records a failure as a kernel would.
PyObject* inject_device_error_hook(PyObject*, PyObject* args) {
  int device, check;
  long long value, limit;
  if (!PyArg_ParseTuple(args, "iiLL", &device, &check, &value, &limit)) return nullptr;
  try {
    avidfast::inject_device_error(device, check, value, limit);
  } catch (const c10::Error& error) {
    PyErr_SetString(PyExc_ValueError, error.msg().c_str());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"cpu_kernels", cpu_kernels, METH_NOARGS,
     "The CPU kernel variants chosen on this processor at load time: {'row_loops', 'cma_tiles'}."},
    {"_plan_rows", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plan_rows_hook)),
     METH_VARARGS | METH_KEYWORDS,
     "Test hook: the shape of a rows-kernel launch (ops/launch_plan.h, plan_rows_shape): "
     "(vec, warps, dynamic shared bytes, global fallback), or four lists of them for a sequence "
     "of dims."},
    {"_plan_rows_splits", plan_rows_splits_hook, METH_VARARGS,
     "Test hook: the splits of a rows-kernel launch (plan_rows_splits): (splits, per_split)."},
    {"_plan_memory_update",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plan_memory_update_hook)),
     METH_VARARGS | METH_KEYWORDS,
     "Test hook: memory_update_'s launch plan: {'threads', 'smem', 'workspace', 'sorted'}."},
    {"_plan_cma_topk",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plan_cma_topk_hook)),
     METH_VARARGS | METH_KEYWORDS,
     "Test hook: cma_topk's shared-memory plan: {'ok', 'capacity', 'lists_on_chip', 'smem', "
     "'dynamic_limit', 'needed'}."},
    {"_treat_cpu_as_device", treat_cpu_as_device_hook, METH_O,
     "Test hook: CPU tensors take the value checks' path of device tensors (a CUDA-free mock)."},
    {"_host_reads", host_reads_hook, METH_NOARGS,
     "Test hook: device-to-host reads (stream syncs) the value checks have made so far."},
    {"_set_value_checks", set_value_checks_hook, METH_O,
     "Test hook: the value checks of CUDA tensors: -1 the environment's, 0 host (synchronous), "
     "1 device (lazy), 2 off."},
    {"_value_checks", value_checks_hook, METH_NOARGS,
     "The value checks of CUDA tensors now: 0 host (synchronous), 1 device (lazy), 2 off."},
    {"_take_device_error", take_device_error_hook, METH_O,
     "The message of the first failure the kernels recorded (cleared), or None; with True, after "
     "synchronising every device used. avidfast.ops.check_errors() raises it."},
    {"_inject_device_error", inject_device_error_hook, METH_VARARGS,
     "Test hook: record a failure (device, check, value, limit) as a kernel would."},
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
