"""Eager ground truth for every eman_fused op: plain per-tensor PyTorch, no fusion.

Tests, `python -m eman_fused check` and the benchmarks compare the kernels to these.
"""
from __future__ import annotations

from typing import Sequence

import torch

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

    Math in float32 (float64 when either side is float64), written back in the teacher's
    dtype. momentum 1 leaves floating teachers untouched; momentum 0 copies the student.
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
            else:
                acc = torch.float64 if torch.float64 in (t.dtype, s.dtype) else torch.float32
                t.copy_(t.to(acc).mul_(m).add_(s.to(acc), alpha=1.0 - m))
