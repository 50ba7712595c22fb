"""posthoc_ema_update_ (K power-function EMA profiles in one pass, EDM2): argument handling,
backend choice and the fake kernel of torch.ops.eman_fused.posthoc_ema_update_.
The class around it (profiles, snapshots, reconstruction): eman_fused.posthoc.PostHocEMA."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _backends, reference
from .layout import posthoc_table_words

_ops = torch.ops.eman_fused if _backends._C_ERROR is None else None

POSTHOC_BACKENDS = ("cpu", "cuda", "triton", "reference")


def posthoc_ema_update_(profiles: Sequence[Sequence[torch.Tensor]], student: Sequence[torch.Tensor],
                        step: torch.Tensor, gammas: Sequence[float], *, backend: str = "auto") -> None:
    """In place, in one pass over the student: with t = step + 1 and
    beta_k = (1 - 1/t)^(gammas[k] + 1) (EDM2 Eq. 2), profile k <- beta_k * profile k +
    (1 - beta_k) * student for floating tensors, <- student for integer ones; then step <- t.

    profiles: K lists, each matching `student` (any float32/bfloat16/float16/float64 pair with
    the student, as ema_update_; the K copies of one tensor share a dtype). step: a 0-dim int64
    tensor on the profiles' device counting the updates done (read and advanced on the device,
    so a CUDA graph can replay the update). Everything is validated before the first write.
    backend: 'auto' (CUDA tensors: the CUDA C++ kernel, else Triton; CPU tensors: the C++ CPU
    kernel), 'cpu', 'cuda', 'triton' or 'reference' (K eager updates, for comparison).
    """
    profiles = [list(p) for p in profiles]
    student = list(student)
    gammas = [float(g) for g in gammas]
    flat = [t for p in profiles for t in p]
    if len(profiles) != len(gammas):
        raise ValueError(f"posthoc_ema_update_: {len(profiles)} profile lists but {len(gammas)} gammas")
    for k, p in enumerate(profiles):
        if len(p) != len(student):
            raise ValueError(f"posthoc_ema_update_: profile {k} has {len(p)} tensors, the student "
                             f"{len(student)}")
    device = (flat or student or [step])[0].device
    name = _backends.resolve(backend, device, POSTHOC_BACKENDS, op="posthoc_ema_update_")
    if name == "reference":
        if step.dim() != 0 or step.dtype != torch.int64:
            raise ValueError("posthoc_ema_update_: step must be a 0-dim int64 tensor")
        t = int(step) + 1
        reference.posthoc_ema_update_(profiles, student, t, gammas)
        step.fill_(t)
        return
    if name == "triton":
        # every check here, outside the op: the Triton op's body runs below autograd with grad
        # mode off, where the leaf-requires-grad check could not fire
        _ops.posthoc_plan(flat, student, step, gammas)
        torch.ops.eman_fused.posthoc_ema_update_triton_(flat, student, step, gammas)
        return
    _ops.posthoc_ema_update_(flat, student, step, gammas)


if _ops is not None:
    @torch.library.register_fake("eman_fused::posthoc_ema_update_")
    def _posthoc_fake(profiles, student, step, gammas):
        k = len(gammas)
        if k < 1 or len(profiles) != k * len(student):
            raise ValueError(f"posthoc_ema_update_: got {len(profiles)} profile tensors for {k} "
                             f"profiles of {len(student)} student tensors")
        for i, p in enumerate(profiles):
            s = student[i % len(student)]
            if p.device != s.device or p.device != step.device:
                raise ValueError(f"posthoc_ema_update_: devices differ at profile tensor {i}: "
                                 f"{p.device}, student {s.device}, step {step.device}")

    @torch.library.register_fake("eman_fused::posthoc_plan")
    def _posthoc_plan_fake(profiles, student, step, gammas):
        _posthoc_fake(profiles, student, step, gammas)
        device = (profiles or student or [step])[0].device
        return torch.empty((posthoc_table_words(student),), dtype=torch.int64, device=device)
