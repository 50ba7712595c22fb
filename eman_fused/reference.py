"""Eager ground truth for every eman_fused op: plain per-tensor PyTorch, no fusion.

Tests, `python -m eman_fused check` and the benchmarks compare the kernels to these.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

# How far a kernel may stand from this reference, by the teacher's dtype. Kernels and
# reference both compute in fp32 (fp64 with a double side) and round once to the teacher's
# dtype; they may differ only in the order of fp32 operations (FMA contraction): a few fp32
# ulps, which can flip the final rounding by one ulp of the teacher's dtype.
TOLERANCES = {
    torch.float64: dict(rtol=1e-6, atol=1e-7),  # a float32 student limits the precision
    torch.float32: dict(rtol=2e-6, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-6),
    torch.float16: dict(rtol=2**-10, atol=1e-6),
}


def ema_update_(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                momentum: float | torch.Tensor) -> None:
    """teacher <- m*teacher + (1-m)*student per floating pair, teacher <- student per integer pair.

    Computed as torch.lerp does, t + w*(s - t) (s - (s - t)*(1 - w) for w >= 1/2), w = 1 - m:
    unbiased, unlike m*t + w*s with m and w each rounded. Math in float32 (float64 when either
    side is float64), written back in the teacher's dtype. momentum 1 leaves floating teachers
    untouched; momentum 0 copies the student.
    """
    m = float(momentum)
    with torch.no_grad():
        for t, s in zip(teacher, student, strict=True):
            if not t.is_floating_point():
                t.copy_(s)
            elif m == 1.0:
                continue
            elif m == 0.0:
                t.copy_(s)
            else:  # torch.lerp's two forms, with w = 1 - m rounded to the math dtype
                acc = torch.float64 if torch.float64 in (t.dtype, s.dtype) else torch.float32
                w = torch.tensor(1.0 - m, dtype=acc)
                ta, sa = t.to(acc), s.to(acc)
                t.copy_(ta + w * (sa - ta) if w < 0.5 else sa - (sa - ta) * (1 - w))


def official_eman_update_(teacher: nn.Module | Sequence[torch.Tensor],
                          student: nn.Module | Sequence[torch.Tensor], momentum: float) -> None:
    """The teacher update as the official EMAN code writes it (Cai et al., CVPR 2021): one loop
    over both state_dicts, t.copy_(t * m + (1 - m) * s) per entry in the tensors' own dtype,
    num_batches_tracked copied. Also takes two tensor lists (integer tensors copied). The
    baseline the tests and benchmarks compare EMATeacher and the fused optimizers with."""
    if isinstance(teacher, nn.Module):
        pairs = [(t, s, "num_batches_tracked" in k) for (k, t), s in
                 zip(teacher.state_dict().items(), student.state_dict().values(), strict=True)]
    else:
        pairs = [(t, s, not t.is_floating_point()) for t, s in zip(teacher, student, strict=True)]
    m = momentum
    with torch.no_grad():
        for t, s, copied in pairs:
            if copied:
                t.copy_(s)
            else:
                t.copy_(t * m + (1.0 - m) * s)


def eman_norm(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
              weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              eps: float = 1e-5, residual: torch.Tensor | None = None,
              relu: bool = False) -> torch.Tensor:
    """act(x * scale + shift + residual) with scale = weight * rsqrt(running_var + eps) and
    shift = bias - running_mean * scale, per channel (dim 1); math in float32 (float64 for
    float64 input), result in x's dtype and memory format. Differentiable by eager autograd;
    the statistics are constants."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = (1, -1) + (1,) * (x.dim() - 2)
    invstd = torch.rsqrt(running_var.to(acc) + eps)
    scale = invstd if weight is None else weight.to(acc) * invstd
    shift = -running_mean.to(acc) * scale if bias is None else bias.to(acc) - running_mean.to(acc) * scale
    y = x.to(acc) * scale.reshape(shape) + shift.reshape(shape)
    if residual is not None:
        y = y + residual.to(acc)
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype)


def lars_step_(params: Sequence[torch.Tensor], momentum_buffers: dict, lr: float, momentum: float,
               weight_decay: float, trust_coefficient: float, exclude=lambda p: p.ndim <= 1,
               maximize: bool = False) -> None:
    """LARS as SimCLR and BYOL's TensorFlow code use it (eman_fused.optim.LARS(formula="simclr")
    is held to this), one param at a time with plain tensor ops: d = g + wd·p scaled by
    trust_coefficient·|p|/|d| (1 if a norm is 0), except for `exclude`d params (plain g);
    buf = momentum·buf + d (d at first); p -= lr·buf. momentum_buffers: param -> buffer."""
    with torch.no_grad():
        for p in params:
            if p.grad is None:
                continue
            d = -p.grad if maximize else p.grad.clone()
            if not exclude(p):
                d = d + weight_decay * p
                pn, dn = p.norm(), d.norm()
                trust = trust_coefficient * pn / dn if pn > 0 and dn > 0 else torch.ones((), device=p.device)
                d = d * trust
            buf = momentum_buffers.get(p)
            momentum_buffers[p] = d.clone() if buf is None else buf.mul_(momentum).add_(d)
            p.sub_(lr * momentum_buffers[p])


def lars_you2017_step_(params: Sequence[torch.Tensor], momentum_buffers: dict, lr: float,
                       momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                       nesterov: bool = False, trust_coefficient: float = 0.001,
                       lars_exclude: bool = False, exclude=lambda p: False,
                       maximize: bool = False) -> None:
    """LARS as You, Gitman & Ginsburg (2017) define it and the official EMAN code runs it for
    BYOL-EMAN (eman_fused.optim.LARS(formula="you2017") is held to this), one param at a time
    with plain tensor ops, in the order of that code: the local learning rate
    trust_coefficient·|p| / (|g| + wd·|p|) (0 when |p| = 0 or when that denominator is 0; 1 for a
    `lars_exclude` group or an `exclude`d param: no trust ratio, weight decay kept),
    d = (g + wd·p)·(lr·local_lr); with momentum, buf = d at first, then
    momentum·buf + (1 - dampening)·d, and d = d + momentum·buf (nesterov) or buf; p -= d.
    momentum_buffers: param -> buffer. `maximize` (not in the official code) negates g."""
    with torch.no_grad():
        for p in params:
            if p.grad is None:
                continue
            g = -p.grad if maximize else p.grad
            if lars_exclude or exclude(p):
                local_lr = 1.0
            else:
                pn, gn = p.norm().item(), g.norm().item()
                denom = gn + weight_decay * pn
                local_lr = trust_coefficient * pn / denom if pn > 0 and denom > 0 else 0.0
            d = g.add(p, alpha=weight_decay).mul(lr * local_lr)
            if momentum != 0:
                buf = momentum_buffers.get(p)
                if buf is None:
                    buf = momentum_buffers[p] = d.clone()
                else:
                    buf.mul_(momentum).add_(d, alpha=1.0 - dampening)
                d = d.add(buf, alpha=momentum) if nesterov else buf
            p.sub_(d)
