// Autograd behaviour of avidfast's in-place operator memory_update_, the same as that of PyTorch's
// own in-place operators (add_, index_copy_, ...):
//  * ADInplaceOrView: after the kernel has written the bank, its version counter is bumped, so
//    that autograd refuses a backward pass whose graph saved the bank before the update ("one of
//    the variables needed for gradient computation has been modified by an inplace operation")
//    instead of computing a gradient from rows that changed after the forward pass; so does
//    torch.compile (AOTAutograd reads the same counter).
//  * Autograd: while grad mode is on, a bank that is a leaf requiring grad (an nn.Parameter) is
//    refused with PyTorch's message ("a leaf Variable that requires grad is being used in an
//    in-place operation"); so is any other bank that requires grad, because memory_update_ has no
//    derivative. Under torch.no_grad() it updates any tensor, as add_ does. No gradient flows
//    into x.
// PyTorch's stock fallbacks (autogradNotImplementedFallback and its ADInplaceOrView partner) do
// not fit: they bump only mutated *returns*, and this operator returns nothing.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

namespace avidfast {
namespace {

using UpdateSignature = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, double);

const c10::TypedOperatorHandle<UpdateSignature>& memory_update_handle() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("avidfast::memory_update_", "")
                                 .typed<UpdateSignature>();
  return handle;
}

void memory_update_autograd(c10::DispatchKeySet keys, const at::Tensor& memory,
                            const at::Tensor& idx, const at::Tensor& x, double momentum) {
  const bool grad_mode = at::GradMode::is_enabled();
  torch::autograd::check_inplace(memory, grad_mode && (memory.requires_grad() || x.requires_grad()));
  TORCH_CHECK(!(grad_mode && memory.requires_grad()),
              "memory_update_ has no derivative, but memory requires grad: update it under "
              "torch.no_grad(), or keep the bank in a buffer that does not require grad");
  at::AutoDispatchBelowAutograd guard;
  memory_update_handle().redispatch(keys & c10::after_autograd_keyset, memory, idx, x, momentum);
}

void memory_update_inplace_or_view(c10::DispatchKeySet keys, const at::Tensor& memory,
                                   const at::Tensor& idx, const at::Tensor& x, double momentum) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    memory_update_handle().redispatch(keys & c10::after_ADInplaceOrView_keyset, memory, idx, x,
                                      momentum);
  }
  torch::autograd::increment_version(memory);
}

}  // namespace

TORCH_LIBRARY_IMPL(avidfast, Autograd, m) {
  m.impl("memory_update_", TORCH_FN(memory_update_autograd));
}

TORCH_LIBRARY_IMPL(avidfast, ADInplaceOrView, m) {
  m.impl("memory_update_", TORCH_FN(memory_update_inplace_or_view));
}

}  // namespace avidfast
