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


# ---- Post-hoc EMA: the power-function EMA of EDM2 ------------------------------------------
# Karras, Aittala, Lehtinen, Hellsten, Aila, Laine: "Analyzing and Improving the Training
# Dynamics of Diffusion Models", CVPR 2024 (arXiv:2312.02696), Sec. 3.1 and Appendix C.
# Formulas only, transcribed from the paper; equation numbers as in that paper.
#
# Eq. 1:  theta_hat_gamma(t) = (gamma + 1) / t^(gamma + 1) * integral_0^t tau^gamma theta(tau) dtau
#         (the averaging profile p(tau; t, gamma) = (gamma + 1) tau^gamma / t^(gamma + 1), 0<tau<t)
# Eq. 2:  theta_hat(t) = beta_gamma(t) theta_hat(t - 1) + (1 - beta_gamma(t)) theta(t),
#         beta_gamma(t) = (1 - 1/t)^(gamma + 1)           (t = 1 at the first update: a copy)
# Eq. 3:  sigma_rel = (gamma + 1)^(1/2) (gamma + 2)^(-1) (gamma + 3)^(-1/2)
# With the discrete update of Eq. 2, the weight of theta(tau) in theta_hat(t) is
# (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1) = integral_{tau-1}^{tau} p(u; t, gamma) du:
# the discrete EMA is exactly the continuous profile of Eq. 1 over a piecewise-constant
# theta, which is why the least-squares fit below (App. C) can work in the continuous form.

SIGMA_REL_MAX = 12 ** -0.5  # Eq. 3 at gamma = 0 (a uniform average); gamma > 0 gives less


def gamma_to_sigma_rel(gamma: float) -> float:
    """Eq. 3."""
    g = float(gamma)
    return (g + 1) ** 0.5 / ((g + 2) * (g + 3) ** 0.5)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Eq. 3 solved for gamma: squaring gives the cubic
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0,
    whose largest real root is the (only) gamma > 0 for 0 < sigma_rel < 12^-1/2."""
    import numpy as np

    s = float(sigma_rel)
    if not (0.0 < s < SIGMA_REL_MAX):
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.6f}) (12^-1/2, a uniform "
                         f"average, is the widest power-function EMA), got {sigma_rel}")
    inv = s ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    gamma = float(max(r.real for r in roots if abs(r.imag) < 1e-9))
    # one Newton step on Eq. 3 itself polishes what the polynomial root finder left
    for _ in range(3):
        f = gamma_to_sigma_rel(gamma) - s
        h = 1e-6 * max(1.0, gamma)
        d = (gamma_to_sigma_rel(gamma + h) - gamma_to_sigma_rel(gamma - h)) / (2 * h)
        gamma -= f / d
    return gamma


def power_beta(t: int, gamma: float) -> float:
    """Eq. 2's coefficient beta_gamma(t) = (1 - 1/t)^(gamma + 1), t >= 1 (in double)."""
    if t < 1:
        raise ValueError(f"t counts updates from 1, got {t}")
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def posthoc_ema_update_(profiles: Sequence[Sequence[torch.Tensor]], student: Sequence[torch.Tensor],
                        t: int, gammas: Sequence[float]) -> None:
    """Eq. 2 for every profile k (gamma_k), update number t: K separate EMA updates."""
    for prof, g in zip(profiles, gammas, strict=True):
        ema_update_(prof, student, power_beta(t, g))


def _log_inner(t_a: float, g_a: float, t_b: float, g_b: float) -> float:
    # App. C: <p_a, p_b> = integral_0^min(t_a,t_b) p(tau; t_a, g_a) p(tau; t_b, g_b) dtau
    #       = (g_a+1)(g_b+1) min^(g_a+g_b+1) / ((g_a+g_b+1) t_a^(g_a+1) t_b^(g_b+1)),
    # in logs: t^(gamma+1) overflows double for long runs and sharp profiles.
    import math

    m = min(t_a, t_b)
    return (math.log((g_a + 1) * (g_b + 1) / (g_a + g_b + 1)) + (g_a + g_b + 1) * math.log(m)
            - (g_a + 1) * math.log(t_a) - (g_b + 1) * math.log(t_b))


def posthoc_coefficients(snapshot_steps: Sequence[int], snapshot_gammas: Sequence[float],
                         t_r: float, gamma_r: float):
    """App. C: the weights x of the snapshot profiles p_i (step t_i, exponent gamma_i) whose sum
    is closest in L2 to the requested profile p_r (t_r, gamma_r): A x = b with
    A_ij = <p_i, p_j>, b_i = <p_i, p_r>, solved by least squares (A is often ill-conditioned).
    Returns (x, relative residual ||p_r - sum_i x_i p_i|| / ||p_r||)."""
    import math

    import numpy as np

    ts = [float(t) for t in snapshot_steps]
    gs = [float(g) for g in snapshot_gammas]
    n = len(ts)
    # times in units of the latest one keep every power in range
    scale = max(ts + [float(t_r)])
    ts = [t / scale for t in ts]
    tr = float(t_r) / scale
    a = np.empty((n, n))
    b = np.empty(n)
    for i in range(n):
        b[i] = math.exp(_log_inner(ts[i], gs[i], tr, gamma_r))
        for j in range(n):
            a[i, j] = math.exp(_log_inner(ts[i], gs[i], ts[j], gs[j]))
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    rr = math.exp(_log_inner(tr, gamma_r, tr, gamma_r))
    err2 = rr - 2 * float(x @ b) + float(x @ a @ x)
    return x, math.sqrt(max(err2, 0.0) / rr)
