#include "norm/geometry.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace eman_fused {
namespace {

void check_channel_vector(const at::Tensor& t, const char* name, const at::Tensor& x,
                          at::ScalarType stats_dtype) {
  const int64_t c = x.size(1);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == c, "eman_norm: ", name, " must have shape [",
                    c, "] (the channels of x, dim 1), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), "eman_norm: ", name, " is on ", t.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_TYPE(t.scalar_type() == stats_dtype, "eman_norm: ", name, " must be ",
                   stats_dtype, " (", x.scalar_type() == at::kDouble ? "float64 input"
                                                                     : "statistics are float32",
                   "), got ", t.scalar_type());
}

}  // namespace

at::MemoryFormat norm_memory_format(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (x.dim() == 5 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

NormGeometry check_eman_norm(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                             const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, double eps,
                             const std::optional<at::Tensor>& residual) {
  TORCH_CHECK_VALUE(x.dim() >= 2 && x.dim() <= 5, "eman_norm: x must be N,C or N,C,L or N,C,H,W ",
                    "or N,C,D,H,W, got shape ", x.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK_TYPE(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf || xt == at::kDouble,
                   "eman_norm: x must be float32, bfloat16, float16 or float64, got ", xt);
  const auto stats_dtype = xt == at::kDouble ? at::kDouble : at::kFloat;
  check_channel_vector(mean, "running_mean", x, stats_dtype);
  check_channel_vector(var, "running_var", x, stats_dtype);
  if (weight) check_channel_vector(*weight, "weight", x, stats_dtype);
  if (bias) check_channel_vector(*bias, "bias", x, stats_dtype);
  // eps = 0 is legal in torch's BatchNorm (a zero variance then gives inf, as there).
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eman_norm: eps must be a finite number >= 0, ",
                    "got ", eps);
  if (residual) {
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), "eman_norm: residual must have x's shape ",
                      x.sizes(), ", got ", residual->sizes());
    TORCH_CHECK_VALUE(residual->device() == x.device(), "eman_norm: residual is on ",
                      residual->device(), " but x is on ", x.device());
    TORCH_CHECK_TYPE(residual->scalar_type() == xt, "eman_norm: residual must have x's dtype ",
                     xt, ", got ", residual->scalar_type());
  }
  NormGeometry g;
  g.format = norm_memory_format(x);
  g.channels = x.size(1);
  int64_t spatial = 1;
  for (int64_t d = 2; d < x.dim(); ++d) spatial *= x.size(d);
  const bool channels_last = g.format != at::MemoryFormat::Contiguous;
  g.outer = channels_last ? x.size(0) * spatial : x.size(0);
  g.inner = channels_last ? 1 : spatial;
  return g;
}

NormGeometry check_eman_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                      const std::optional<at::Tensor>& out, const at::Tensor& mean,
                                      const at::Tensor& var,
                                      const std::optional<at::Tensor>& weight, double eps,
                                      bool relu) {
  const NormGeometry g = check_eman_norm(x, mean, var, weight, std::nullopt, eps, std::nullopt);
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() &&
                        grad.device() == x.device(),
                    "eman_norm_backward: grad must match x (", x.scalar_type(), x.sizes(), " on ",
                    x.device(), "), got ", grad.scalar_type(), grad.sizes(), " on ", grad.device());
  TORCH_CHECK_VALUE(!relu || (out && out->sizes() == x.sizes() && out->device() == x.device() &&
                              out->scalar_type() == x.scalar_type()),
                    "eman_norm_backward: relu=True needs the forward output `out` (x's shape, ",
                    "dtype and device)");
  return g;
}

}  // namespace eman_fused
