// The fused optimizer step's schema (SGD, AdamW, LARS + EMA teacher, optimizers as an enum,
// hyper-parameters as one float list: optim/hyper.h), its Autograd kernel, and the table op the
// Triton kernels read. CPU and CUDA kernels: optim/cpu.cpp, optim/cuda_host.cpp; fake kernels:
// eman_fused/ops/optim.py.
#include <torch/library.h>

#include "common/below_autograd.h"
#include "optim/plan.h"

namespace eman_fused {
namespace {

constexpr char kStepName[] = "eman_fused::optim_ema_step_";
using StepSig = void(int64_t, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                     at::TensorList, at::TensorList, c10::ArrayRef<int64_t>, at::TensorList,
                     c10::ArrayRef<double>, const c10::List<std::optional<at::Tensor>>&);

at::Tensor optim_ema_table(int64_t optimizer, at::TensorList params, at::TensorList grads,
                           at::TensorList first_moments, at::TensorList second_moments,
                           at::TensorList max_second_moments, at::TensorList teacher,
                           c10::ArrayRef<int64_t> flags, at::TensorList steps,
                           c10::ArrayRef<double> hyper,
                           const c10::List<std::optional<at::Tensor>>& hyper_tensors, bool pinned) {
  const OptimLists lists{params, grads, first_moments, second_moments, max_second_moments,
                         teacher, steps, flags};
  return check_optim_call(optimizer, lists, hyper, hyper_tensors, pinned).table.table;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(eman_fused, m) {
  // One fused optimizer step: the student's params and state, and (teacher non-empty) the EMA
  // teacher of each param from its new value, in one pass. `optimizer`: 0 SGD, 1 AdamW, 2 LARS
  // (simclr formula), 3 LARS (you2017 formula). `hyper`: that optimizer's hyper-parameters in
  // the order of optim/hyper.h (_C.table_layout()["optim"]["hyper"]; flags as 0/1).
  // `hyper_tensors`: none, or per hyper-parameter None or a 0-dim float32 tensor on the params'
  // device read instead of the float (on a GPU, by the kernel: capturable). State lists:
  // first_moments (SGD/LARS momentum_buffers, AdamW exp_avgs), second_moments (AdamW
  // exp_avg_sqs), max_second_moments (AdamW with amsgrad). flags[i]: kOptimFirst (a new
  // momentum buffer, set to the first update as torch.optim.SGD does), kOptimAdapt (LARS: the
  // trust ratio applies). steps (AdamW): each param's step count, advanced by one.
  m.def("optim_ema_step_(int optimizer, Tensor(a!)[] params, Tensor[] grads, "
        "Tensor(b!)[] first_moments, Tensor(c!)[] second_moments, Tensor(d!)[] max_second_moments, "
        "Tensor(e!)[] teacher, int[] flags, Tensor(f!)[] steps, float[] hyper, "
        "Tensor?[] hyper_tensors) -> ()");
  m.impl("optim_ema_step_", c10::DispatchKey::Autograd,
         &BelowAutograd<kStepName, kDefaultOverload, StepSig>::call);
  // The same checks and table without writing anything (host int64; pinned: page-locked, for
  // an asynchronous copy to a GPU): for backends that launch from Python (Triton), and for
  // validating every call of a multi-group step before the first one writes.
  m.def("_optim_ema_table(int optimizer, Tensor[] params, Tensor[] grads, Tensor[] first_moments, "
        "Tensor[] second_moments, Tensor[] max_second_moments, Tensor[] teacher, int[] flags, "
        "Tensor[] steps, float[] hyper, Tensor?[] hyper_tensors, bool pinned=False) -> Tensor");
  m.impl("_optim_ema_table", c10::DispatchKey::CompositeExplicitAutograd, &optim_ema_table);
  // A step of several calls (param groups): no tensor written by one call may share memory
  // with any tensor of another (each call checks its own lists).
  m.def("_optim_ema_overlap(Tensor[] params, Tensor[] grads, Tensor[] state, Tensor[] teacher, "
        "Tensor[] steps) -> ()");
  m.impl("_optim_ema_overlap", c10::DispatchKey::CompositeExplicitAutograd, &check_step_overlap);
}

}  // namespace eman_fused
