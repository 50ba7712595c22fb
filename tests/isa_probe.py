"""Runs the CPU kernels (EMA, eman_norm, fused optimizers) on fixed inputs and saves every result (used by test_isa.py, run
once per instruction set in a subprocess)."""
import sys

import torch

import eman_fused
from eman_fused.ops import optim as optim_ops

results = {"isa": torch.ops.eman_fused._cpu_isa()}
gen = torch.Generator().manual_seed(0)
dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
teacher = [torch.randn(40_003, generator=gen).to(t) for t in dtypes for _ in dtypes]
student = [torch.randn(40_003, generator=gen).to(s) for _ in dtypes for s in dtypes]
eman_fused.ema_update_(teacher, student, 0.999, backend="cpu")
results["ema"] = teacher
for layout in (torch.contiguous_format, torch.channels_last):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(2, 37, 9, 11, generator=gen).to(dtype).to(memory_format=layout).requires_grad_()
        r = torch.randn(2, 37, 9, 11, generator=gen).to(dtype).to(memory_format=layout).requires_grad_()
        m, v = torch.randn(37, generator=gen), torch.rand(37, generator=gen) + 0.5
        w = torch.randn(37, generator=gen).requires_grad_()
        b = torch.randn(37, generator=gen).requires_grad_()
        y = eman_fused.eman_norm(x, m, v, w, b, 1e-5, r, True, backend="cpu")
        grads = torch.autograd.grad(y, (x, w, b, r), torch.randn(y.shape, generator=gen).to(dtype))
        results[f"norm {layout} {dtype}"] = [y.detach(), *grads]
for tdtype in (torch.float32, torch.bfloat16, torch.float16):
    for nesterov in (False, True):
        p = [torch.randn(20_011, generator=gen) for _ in range(3)]
        g = [torch.randn(20_011, generator=gen) for _ in range(3)]
        buf = [torch.randn(20_011, generator=gen) for _ in range(3)]
        t = [torch.randn(20_011, generator=gen).to(tdtype) for _ in range(3)]
        optim_ops.step_("sgd", p, g, first_moments=buf, teacher=t, flags=[1, 0, 0], lr=0.1, momentum=0.9,
                        dampening=0.0, nesterov=nesterov, weight_decay=1e-4, maximize=False,
                        teacher_momentum=0.99)
        results[f"sgd {tdtype} {nesterov}"] = [*p, *buf, *t]
    for amsgrad in (False, True):
        p = [torch.randn(20_011, generator=gen) for _ in range(2)]
        g = [torch.randn(20_011, generator=gen) for _ in range(2)]
        m = [torch.randn(20_011, generator=gen) for _ in range(2)]
        v = [torch.rand(20_011, generator=gen) for _ in range(2)]
        vmax = [x.clone() for x in v] if amsgrad else []
        t = [torch.randn(20_011, generator=gen).to(tdtype) for _ in range(2)]
        optim_ops.step_("adamw", p, g, first_moments=m, second_moments=v, max_second_moments=vmax, teacher=t,
                        steps=[torch.tensor(3.0), torch.tensor(10.0)], lr=0.01, beta1=0.9, beta2=0.999,
                        eps=1e-8, weight_decay=0.01, amsgrad=amsgrad, maximize=False, teacher_momentum=0.99)
        results[f"adamw {tdtype} {amsgrad}"] = [*p, *m, *v, *vmax, *t]
    for formula in ("simclr", "you2017"):
        p = [torch.randn(20_011, generator=gen) for _ in range(3)]
        g = [torch.randn(20_011, generator=gen) for _ in range(3)]
        buf = [torch.randn(20_011, generator=gen) for _ in range(3)]
        t = [torch.randn(20_011, generator=gen).to(tdtype) for _ in range(3)]
        optim_ops.step_(f"lars_{formula}", p, g, first_moments=buf, teacher=t, flags=[2, 0, 3], lr=0.1,
                        momentum=0.9, dampening=0.1 if formula == "you2017" else 0.0, nesterov=False,
                        weight_decay=1e-4, trust_coefficient=0.001, maximize=False, teacher_momentum=0.99)
        results[f"lars {formula} {tdtype}"] = [*p, *buf, *t]
torch.save(results, sys.argv[1])
