"""`python -m eman_fused check`: every available backend of every op against
eman_fused.reference, on a model's real tensor shapes; a pass/fail table, exit status 1 on
any failure.

For the EMA update ('ema'), per backend, model and dtype pair: momentum 0.999 (within the
tests' tolerances, eman_fused.reference.TOLERANCES, per teacher dtype), momentum 1 (teachers
bit-identical) and momentum 0 (teachers equal to the students, exactly); integer counters
must equal the student's exactly in every case.
For eman_norm ('norm'), per backend, ResNet-50 activation site (batch 2), layout and dtype:
the output and the gradients of x, weight, bias and residual against the eager reference's
autograd (output tolerance per dtype; gradient sums relative 1e-3).

For the fused optimizers ('optim'), per backend, model and optimizer (SGD with momentum +
nesterov + weight decay; SGD with dampening, maximize and a tensor lr; AdamW with amsgrad; AdamW
with tensor lr and betas and maximize; LARS in both formulas, you2017 with dampening): 5 steps
with the teacher fused, against torch.optim.SGD / AdamW (LARS: eman_fused.reference.lars_step_ /
lars_you2017_step_); params within relative 1e-4; the teacher at momentum 1 bit-identical and at
momentum 0 equal to the student's tensors, as ema_update_.

Test hook: EMAN_FUSED_CHECK_FAULT=<backend> perturbs that backend's result after it runs,
so the tests can prove that the checker fails when a kernel is wrong.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import eman_fused
from eman_fused import reference
from eman_fused.schedules import Schedule
from eman_fused._backends import _interpreting
from eman_fused.bench import shapes
from eman_fused.bench.common import DTYPES
from eman_fused.bench.shapes import RESNET50_SITES, make, make_model_tensors

DEFAULT_PAIRS = "fp32:fp32,fp32:bf16,bf16:bf16,bf16:fp32,fp16:fp32"


def backends_for(device: torch.device) -> list[str]:
    available = {n for n, b in eman_fused.backends().items() if b.available}
    wanted = {"cpu": ["cpu"] + (["triton"] if _interpreting() else []),
              "cuda": ["cuda", "triton"]}[device.type]
    return [b for b in wanted if b in available]


def _errors(actual, expected):
    """(max abs error, max relative error, all within tolerance) over floating tensors."""
    max_abs = max_rel = 0.0
    ok = True
    for a, e in zip(actual, expected):
        if not a.is_floating_point():
            continue
        diff = (a.double() - e.double()).abs()
        if diff.numel():
            max_abs = max(max_abs, diff.max().item())
            max_rel = max(max_rel, (diff / e.double().abs().clamp_min(1e-30)).max().item())
        ok &= torch.allclose(a, e, equal_nan=True, **reference.TOLERANCES[a.dtype])
    return max_abs, max_rel, ok


def _bits_equal(xs, ys):
    return all(torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
               for x, y in zip(xs, ys))


def check_ema(backend, name, table, t_dtype, s_dtype, device) -> dict:
    teacher, student = make_model_tensors(table, DTYPES[t_dtype], DTYPES[s_dtype], device)
    fault = os.environ.get("EMAN_FUSED_CHECK_FAULT") == backend

    def run(m):
        eman_fused.ema_update_(teacher, student, m, backend=backend)
        if fault:  # test hook: a deliberately wrong kernel result
            t0 = next(t for t in teacher if t.is_floating_point() and t.numel())
            t0[(0,) * t0.dim()] += 1.0

    expected = [t.clone() for t in teacher]
    run(0.999)
    reference.ema_update_(expected, student, 0.999)
    max_abs, max_rel, ok = _errors(teacher, expected)
    before = [t.clone() for t in teacher]
    run(1.0)
    identical_at_1 = _bits_equal([t for t in teacher if t.is_floating_point()],
                                 [b for b in before if b.is_floating_point()])
    run(0.0)
    copied_at_0 = all(torch.equal(t, s.to(t.dtype)) for t, s in zip(teacher, student))
    counters = all(torch.equal(t, s) for t, s in zip(teacher, student) if not t.is_floating_point())
    return {"op": "ema", "backend": backend, "model": name, "dtypes": f"{t_dtype}:{s_dtype}",
            "tensors": len(table), "max_abs_err": max_abs, "max_rel_err": max_rel,
            "within_tolerance": ok, "identical_at_m1": identical_at_1, "copied_at_m0": copied_at_0,
            "counters_exact": counters,
            "passed": ok and identical_at_1 and copied_at_0 and counters}


NORM_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-7, atol=2**-7),
            torch.float16: dict(rtol=2**-10, atol=2**-9)}


def check_norm(backend, site, layout, dtype, device) -> dict:
    """One (backend, ResNet-50 site, layout, dtype): forward and all gradients vs the reference."""
    name, c, hw, has_res = site
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, hw, hw, generator=gen).to(device, DTYPES[dtype]).to(memory_format=fmt)
    r = torch.randn(x.shape, generator=gen).to(device, x.dtype).to(memory_format=fmt) if has_res else None
    m, v = torch.randn(c, generator=gen).to(device), (torch.rand(c, generator=gen) + 0.5).to(device)
    w, b = torch.randn(c, generator=gen).to(device), torch.randn(c, generator=gen).to(device)
    dy = torch.randn(x.shape, generator=gen).to(device, x.dtype)

    def run(fn):
        leaves = [t.detach().requires_grad_() for t in (x, w, b)] + ([r.detach().requires_grad_()] if has_res else [])
        y = fn(leaves[0], m, v, leaves[1], leaves[2], 1e-5, leaves[3] if has_res else None, True)
        return [y] + list(torch.autograd.grad(y, leaves, dy))

    ours = run(lambda *a: eman_fused.eman_norm(*a, backend=backend))
    if os.environ.get("EMAN_FUSED_CHECK_FAULT") == backend:  # test hook
        ours[0][(0,) * ours[0].dim()] += 1.0
    ref = run(reference.eman_norm)
    max_abs = max((a.double() - e.double()).abs().max().item() for a, e in zip(ours, ref))
    max_rel = max(((a.double() - e.double()).abs() / e.double().abs().clamp_min(1e-30)).max().item()
                  for a, e in zip(ours, ref))
    ok = torch.allclose(ours[0], ref[0], **NORM_TOL[x.dtype]) and torch.allclose(ours[1], ref[1], **NORM_TOL[x.dtype])
    ok &= all(torch.allclose(a, e, rtol=1e-3, atol=1e-3 * e.abs().max().item()) for a, e in zip(ours[2:4], ref[2:4]))
    if has_res:
        ok &= torch.allclose(ours[4], ref[4], **NORM_TOL[x.dtype])
    return {"op": "norm", "backend": backend, "model": f"{name.split()[0]}/{layout[:5]}", "dtypes": dtype,
            "max_abs_err": max_abs, "max_rel_err": max_rel, "within_tolerance": ok, "identical_at_m1": None,
            "copied_at_m0": None, "counters_exact": None, "passed": ok}


OPTIM_CASES = {  # name: (arguments (callables: made fresh per optimizer), class, reference)
    "sgd": (dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4), "SGD", "torch"),
    "sgd_dampening": (dict(lr=lambda: torch.tensor(0.05), momentum=0.9, dampening=0.1, weight_decay=1e-4,
                           maximize=True), "SGD", "torch"),
    "adamw": (dict(lr=1e-3, weight_decay=0.05, amsgrad=True), "AdamW", "torch"),
    "adamw_tensor": (dict(lr=lambda: torch.tensor(1e-3), betas=lambda: (torch.tensor(0.8), torch.tensor(0.99)),
                          weight_decay=0.05, maximize=True), "AdamW", "torch"),
    "lars": (dict(lr=0.1, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.01), "LARS", "lars_step_"),
    "lars_you2017": (dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-4, trust_coefficient=0.01,
                          formula="you2017"), "LARS", "lars_you2017_step_"),
}


class _Momenta(Schedule):
    """The teacher momentum of each update, from a list (the last one holds after it)."""

    def __init__(self, values):
        self.values = values

    def value(self, step):
        return self.values[min(step, len(self.values) - 1)]


def check_optim(backend, name, table, optim_name, device) -> dict:
    """Fused optimizer + teacher vs the torch optimizer (or eager LARS) + reference EMA: 3 steps
    at teacher momentum 0.9, then one at momentum 1 (teacher bit-identical) and one at 0 (teacher
    equal to the student's tensors)."""
    raw, cls_name, ref_name = OPTIM_CASES[optim_name]
    args = lambda: {k: v() if callable(v) else v for k, v in raw.items()}  # noqa: E731
    kwargs = args()
    student, ref = make(table, device), make(table, device)
    momenta = [0.9, 0.9, 0.9, 1.0, 0.0]
    teacher = eman_fused.EMATeacher(student, schedule=_Momenta(momenta), eman=False)
    ref_teacher = [t.detach().clone() for t in teacher.ema_tensors]
    opt = getattr(eman_fused.optim, cls_name)(student.parameters(), teacher=teacher, backend=backend,
                                              **kwargs)
    if ref_name == "torch":
        ref_step = getattr(torch.optim, cls_name)(ref.parameters(), **args()).step
    else:
        ref_params, bufs = list(ref.parameters()), {}
        ref_kw = {k: v for k, v in args().items() if k != "formula"}
        ref_step = lambda: getattr(reference, ref_name)(ref_params, bufs, **ref_kw)  # noqa: E731
    ref_sources = [dict(ref.named_parameters(), **dict(ref.named_buffers()))[n] for n in
                   [dict((id(v), k) for k, v in [*student.named_parameters(), *student.named_buffers()])[id(s)]
                    for s in teacher.ema_sources]]
    fault = os.environ.get("EMAN_FUSED_CHECK_FAULT") == backend  # test hook
    identical_at_1 = copied_at_0 = True
    teacher_err = []
    for k, m in enumerate(momenta):
        before = [t.clone() for t in teacher.ema_tensors]
        opt.step()
        ref_step()
        if k == 2:  # after the steps at 0.9: the teacher against the reference EMA of the reference run
            reference.ema_update_(ref_teacher, ref_sources, m)
            teacher_err = list(zip(teacher.ema_tensors, ref_teacher))
            teacher_err = [(a.clone(), e.clone()) for a, e in teacher_err]
        elif m == 1.0:
            identical_at_1 = _bits_equal(teacher.ema_tensors, before)
        elif m == 0.0:
            copied_at_0 = all(torch.equal(t, s.to(t.dtype)) for t, s in zip(teacher.ema_tensors, teacher.ema_sources))
        else:
            reference.ema_update_(ref_teacher, ref_sources, m)
        if m == 0.9 and fault:
            next(iter(student.parameters())).data.view(-1)[0] += 1.0
            fault = False
    ours = list(student.parameters()) + [a for a, _ in teacher_err]
    expected = list(ref.parameters()) + [e for _, e in teacher_err]
    max_abs = max((a.double() - e.double()).abs().max().item() for a, e in zip(ours, expected) if a.numel())
    max_rel = max(((a.double() - e.double()).abs() / e.double().abs().clamp_min(1e-30)).max().item()
                  for a, e in zip(ours, expected) if a.numel())
    ok = all(torch.allclose(a, e, rtol=1e-4, atol=1e-6) for a, e in zip(ours, expected))
    return {"op": "optim", "backend": backend, "model": name, "dtypes": optim_name,
            "max_abs_err": max_abs, "max_rel_err": max_rel, "within_tolerance": ok,
            "identical_at_m1": identical_at_1, "copied_at_m0": copied_at_0, "counters_exact": None,
            "passed": ok and identical_at_1 and copied_at_0}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", "--models", dest="models", default="resnet50",
                    help="comma-separated: resnet50, vit_b16, many_small, a .json shape file, "
                         "or package.module:callable returning an nn.Module")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", "--dtype", dest="dtypes", default=DEFAULT_PAIRS,
                    help="ema: teacher:student pairs")
    ap.add_argument("--ops", default="ema,norm,optim", help="comma-separated, of: ema, norm, optim")


def run(args) -> int:
    device = torch.device(args.device)
    names = backends_for(device)
    if not names:
        print(f"check: no backend can run on {device}:", file=sys.stderr)
        for b in eman_fused.backends().values():
            print(" ", b, file=sys.stderr)
        return 1
    ops = args.ops.split(",")
    if unknown := [op for op in ops if op not in ("ema", "norm", "optim")]:
        print(f"check: unknown op(s) {', '.join(unknown)}; available: ema, norm, optim", file=sys.stderr)
        return 2
    rows = []
    if "ema" in ops:
        for name, table in (shapes.load_table(spec) for spec in args.models.split(",")):
            for pair in args.dtypes.split(","):
                t_dtype, s_dtype = pair.split(":")
                for backend in names:
                    rows.append(check_ema(backend, name, table, t_dtype, s_dtype, device))
    if "norm" in ops:
        for site in RESNET50_SITES:
            for layout in ("contiguous", "channels_last"):
                for dtype in ("fp32", "bf16"):
                    for backend in names:
                        rows.append(check_norm(backend, site, layout, dtype, device))
    if "optim" in ops:
        for name, table in (shapes.load_table(spec) for spec in args.models.split(",")):
            for optim_name in OPTIM_CASES:
                for backend in names:
                    rows.append(check_optim(backend, name, table, optim_name, device))
    print(f"{'op':<5} {'backend':<8} {'model':<14} {'dtypes':<16} {'max abs err':>12} "
          f"{'max rel err':>12}  {'m=1 same':<9} {'m=0 copy':<9} {'counters':<9} result")
    for r in rows:
        flag = lambda ok: "-" if ok is None else ("yes" if ok else "NO")  # noqa: E731
        print(f"{r['op']:<5} {r['backend']:<8} {r['model']:<14} {r['dtypes']:<16} {r['max_abs_err']:>12.3e} "
              f"{r['max_rel_err']:>12.3e}  {flag(r['identical_at_m1']):<9} {flag(r['copied_at_m0']):<9} "
              f"{flag(r['counters_exact']):<9} {'pass' if r['passed'] else 'FAIL'}")
    failed = [r for r in rows if not r["passed"]]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eman_fused check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))
