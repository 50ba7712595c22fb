// Autograd kernels of the in-place ops that have no differentiable output (the EMA update, the
// optimizer steps): step below autograd and call the op again. Registered explicitly so an
// unboxed call stays unboxed (the autograd fallback would box every tensor of the lists).
#pragma once
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace eman_fused {

constexpr char kDefaultOverload[] = "";
constexpr char kCapturableOverload[] = "capturable";
constexpr char kTensorOverload[] = "tensor";

template <const char* Name, const char* Overload, typename Sig>
struct BelowAutograd;
template <const char* Name, const char* Overload, typename... Args>
struct BelowAutograd<Name, Overload, void(Args...)> {
  static void call(Args... args) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow(Name, Overload)
                               .typed<void(Args...)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(args...);
  }
};

}  // namespace eman_fused
