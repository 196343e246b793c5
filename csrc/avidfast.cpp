// Every avidfast operator schema, in one place. Kernels live in ops/cpu and ops/cuda; the Python
// faces (argument conversion, fake kernels, autograd) live in avidfast/ops; the Python module
// that carries this library (and its build description) is defined in module.cpp.
//
// Each schema names, with set_python_module, the Python module that registers its fake kernel
// (torch.library.register_fake requires it to be exactly that module). A process that loads this
// library alone (torch.ops.load_library) has the operators without fake or autograd kernels:
// FakeTensor tracing (torch.compile, torch.export) then fails with an error that names the
// module to import. torch imports nothing by itself.
#include <torch/library.h>

namespace {
constexpr const char* kImportHint =
    "`import avidfast.ops` registers the fake and autograd kernels of every avidfast operator.";
}  // namespace

TORCH_LIBRARY(avidfast, m) {
  m.set_python_module("avidfast.ops.sampling", kImportHint);
  // (B,) int64 own indices, optional (B, P) sorted exclusions -> (B, K) int64 negatives drawn
  // uniformly from {0..num_items-1} minus the row's own index and its exclusions. Counter-based:
  // draw k of row b depends only on (seed, step, row_offset + b, k).
  m.def(
      "sample_negatives(Tensor pos, int num_items, int num_negatives, int seed, Tensor step, "
      "int row_offset, Tensor? exclude) -> Tensor");
  m.set_python_module("avidfast.ops.scores", kImportHint);
  // x (B, D), memory (N, D), idx (B, M) -> (B, M) scores <x[b], memory[idx[b, m]]> / temperature.
  m.def("memory_scores(Tensor x, Tensor memory, Tensor idx, float temperature) -> Tensor");
  // grad_scores (B, M) -> (B, D) gradient of memory_scores in x (float32, or float64 for float64 grads).
  m.def(
      "memory_scores_backward(Tensor grad_scores, Tensor memory, Tensor idx, float temperature) "
      "-> Tensor");
  m.set_python_module("avidfast.ops.nce", kImportHint);
  // Per-row NCE loss (B,) of x against its positives pos_idx (B, P) and negatives neg_idx (B, K),
  // and its gradient in x (B, D), computed in the same pass over the memory rows.
  m.def(
      "nce_memory_loss(Tensor x, Tensor memory, Tensor pos_idx, Tensor neg_idx, float temperature, "
      "Tensor partition) -> (Tensor, Tensor)");
  m.set_python_module("avidfast.ops.update", kImportHint);
  // In place: memory[idx[b]] <- normalize(momentum * memory[idx[b]] + (1 - momentum) * x[b]),
  // repeated indices applied in batch order.
  m.def("memory_update_(Tensor(a!) memory, Tensor idx, Tensor x, float momentum) -> ()");
  m.set_python_module("avidfast.ops.cma", kImportHint);
  // Cross-modal agreement mining over video/audio banks (N, D): for each query row (all rows,
  // or the int64 rows in `queries`), the k items j != query with the highest agreement
  // (mode: consensus | union | video | audio) -> values (Q, k) float32, indices (Q, k) int64,
  // each row by descending agreement, ties by ascending index. precision: highest | high
  // (high lets CUDA use TF32 tensor cores for float32 banks).
  m.def(
      "cma_topk(Tensor video_memory, Tensor audio_memory, int k, str mode, Tensor? queries, "
      "str precision) -> (Tensor, Tensor)");
}
