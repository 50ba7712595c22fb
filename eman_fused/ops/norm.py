"""eman_norm: BatchNorm with running statistics (EMAN's teacher, FrozenBatchNorm), fused with an
optional residual add and ReLU, forward and backward."""
from __future__ import annotations

import torch

from .. import _backends, reference
from .layout import norm_memory_format

# eman_norm's kernels: C++ on the CPU; CUDA C++, then Triton, on the GPU (as for ema_update_).
NORM_BACKENDS = ("cpu", "cuda", "triton", "reference")


def eman_norm(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
              weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              eps: float = 1e-5, residual: torch.Tensor | None = None,
              relu: bool = False, *, backend: str = "auto") -> torch.Tensor:
    """y = act(x * scale[c] + shift[c] + residual) in one pass, where
    scale = weight * rsqrt(running_var + eps) and shift = bias - running_mean * scale.

    x: N,C / N,C,L / N,C,H,W / N,C,D,H,W, contiguous or channels_last(_3d), float32, bfloat16
    or float16 (float64 too, for gradcheck); statistics and affine: float32 (float64 with a
    float64 x), shape [C]. The output keeps x's memory format. Differentiable in x, weight,
    bias and residual, with the statistics as constants (the frozen-statistics gradient,
    dx = dy * scale on the ReLU mask, not the batch-statistics formula). backend: 'auto'
    (CPU tensors: C++; CUDA tensors: CUDA C++, else Triton), 'cpu', 'cuda', 'triton',
    'reference'.
    """
    name = _backends.resolve(backend, x.device, NORM_BACKENDS, op="eman_norm")
    if name == "reference":
        return reference.eman_norm(x, running_mean, running_var, weight, bias, eps, residual, relu)
    if name == "triton":
        op = torch.ops.eman_fused.eman_norm_triton
    else:  # cpu or cuda: one op, dispatched on the device
        op = torch.ops.eman_fused.eman_norm
    return op(x, running_mean, running_var, weight, bias, float(eps), residual, bool(relu))


def _setup_context(ctx, inputs, output):
    x, mean, var, weight, bias, eps, residual, relu = inputs
    ctx.save_for_backward(x, output if relu else None, mean, var, weight)
    ctx.eps, ctx.relu = eps, relu
    ctx.has_weight, ctx.has_bias, ctx.has_residual = weight is not None, bias is not None, residual is not None


def _backward(ctx, grad):
    x, out, mean, var, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], ctx.has_residual and need[6], ctx.has_weight and need[3], ctx.has_bias and need[4]]
    gx, gr, gw, gb = torch.ops.eman_fused.eman_norm_backward(
        grad, x, out, mean, var, weight, ctx.eps, ctx.relu, mask)
    return gx, None, None, gw, gb, None, gr, None


def _setup_backward_context(ctx, inputs, output):
    grad, x, out, mean, var, weight, eps, relu, _mask = inputs
    ctx.save_for_backward(grad, x, out if relu else None, mean, var, weight)
    ctx.eps, ctx.relu = eps, relu


def _double_backward(ctx, ggx, ggr, ggw, ggb):
    """Gradients of the backward's outputs (gx = g·m·scale, gr = g·m, gw = Σ g·m·x̂, gb = Σ g·m,
    with m the ReLU mask, x̂ = (x - μ)·rsqrt(σ² + ε)) w.r.t. grad, x and weight, in eager ops
    (themselves differentiable). The mask is piecewise constant and the statistics are
    constants, so they get no gradient. Used for create_graph=True backwards (Hessian-vector
    products, gradient penalties); the first backward is always the fused kernel."""
    grad, x, out, mean, var, weight = ctx.saved_tensors
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = (1, -1) + (1,) * (x.dim() - 2)
    dims = [d for d in range(x.dim()) if d != 1]
    inv = torch.rsqrt(var.to(acc) + ctx.eps)
    scale = inv if weight is None else weight.to(acc) * inv
    mask = (out > 0).to(acc) if ctx.relu else None

    def given(g, like):  # a gradient for an output that was used, in the accumulation dtype
        return None if g is None or g.shape != like.shape else g.to(acc)

    ggx, ggr = given(ggx, x), given(ggr, x)
    ggw, ggb = given(ggw, var), given(ggb, var)
    need = ctx.needs_input_grad
    g_grad = g_x = g_w = None
    if need[0]:
        t = torch.zeros((), dtype=acc, device=x.device)
        if ggx is not None:
            t = t + ggx * scale.reshape(shape)
        if ggr is not None:
            t = t + ggr
        if ggw is not None:
            t = t + ggw.reshape(shape) * ((x.to(acc) - mean.to(acc).reshape(shape)) * inv.reshape(shape))
        if ggb is not None:
            t = t + ggb.reshape(shape)
        g_grad = (t if mask is None else t * mask).expand(x.shape).to(grad.dtype)
    gm = grad.to(acc) if mask is None else grad.to(acc) * mask
    if need[1] and ggw is not None:
        g_x = (gm * (ggw * inv).reshape(shape)).to(x.dtype)
    if need[5] and weight is not None and ggx is not None:
        g_w = ((ggx * gm).sum(dims) * inv).to(weight.dtype)
    return g_grad, g_x, None, None, None, g_w, None, None, None


def _check_devices(x, **tensors) -> None:
    # The fake kernels also serve the Meta key: a call mixing meta and real tensors lands
    # there and must fail as the real kernels do.
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"eman_norm: {name} is on {t.device} but x is on {x.device}")


if _backends._C_ERROR is None:
    @torch.library.register_fake("eman_fused::eman_norm")
    def _eman_norm_fake(x, running_mean, running_var, weight, bias, eps, residual, relu):
        _check_devices(x, running_mean=running_mean, running_var=running_var, weight=weight,
                       bias=bias, residual=residual)
        return torch.empty_like(x, memory_format=norm_memory_format(x))

    @torch.library.register_fake("eman_fused::eman_norm_backward")
    def _eman_norm_backward_fake(grad, x, out, running_mean, running_var, weight, eps, relu, output_mask):
        _check_devices(x, grad=grad, out=out, running_mean=running_mean, running_var=running_var,
                       weight=weight)
        fmt = norm_memory_format(x)
        like_x = [torch.empty_like(x, memory_format=fmt) if output_mask[i] else None for i in (0, 1)]
        per_channel = [running_mean.new_empty(running_mean.shape) if output_mask[i] else None for i in (2, 3)]
        return (*like_x, *per_channel)

    torch.library.register_autograd("eman_fused::eman_norm", _backward, setup_context=_setup_context)
    torch.library.register_autograd("eman_fused::eman_norm_backward", _double_backward,
                                    setup_context=_setup_backward_context)
