"""The precision rule for the fused optimizers: against a float64 run of the same steps, the
error of every param and state tensor is at most 2x torch's own (LARS: the eager reference's)
error in the params' dtype, on the full product of the options torch itself tests.

The product runs a few steps per combination (CI time); a representative subset runs 100 steps.
`python tests/test_optim_precision.py [steps [SGD,AdamW,LARS]]` runs the whole product at 100
steps (or `steps`) and prints the worst ratio per optimizer and dtype (reported in README). Error: the largest absolute
difference from the float64 run over all params (or all tensors of one state key), compared
with the best of torch's implementations that take the options (for-loop, foreach, fused=True).
Two param groups with different options in every run.
"""
from __future__ import annotations

import itertools
import os
import sys

import pytest
import torch
from torch import nn

from eman_fused import optim, reference

SHAPES = [(7,), (33, 17), (3, 5, 2, 2), (130,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PRODUCT_STEPS = int(os.environ.get("EMAN_FUSED_PRECISION_STEPS", "4"))
LONG_STEPS = 100
RATIO = 2.0


def inputs(dtype, steps, seed=0):
    """Initial params and per-step grads: values of `dtype` (the float64 run starts from the same)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES] for _ in range(steps)]
    return params, grads


def groups(params, opts, second):
    return [{"params": params[:2], **opts}, {"params": params[2:], **opts, **second}]


def run(factory, params0, grads, dtype):
    """factory(params) -> optimizer; the final params and state, as float64 lists by key."""
    params = [nn.Parameter(p.to(dtype, copy=True)) for p in params0]
    opt = factory(params)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.to(dtype, copy=True)
        opt.step()
    out = {"param": [p.detach().double() for p in params]}
    for p in params:
        for k, v in opt.state[p].items():
            if k != "step":
                out.setdefault(k, []).append(v.double())
    return out


def error(result, ref):
    return {k: max((a - b).abs().max().item() for a, b in zip(result[k], ref[k])) for k in ref}


def torch_errors(make_torch, params0, grads, dtype, ref):
    """torch's error per key: the best of its implementations that take these options."""
    best = None
    for impl in (dict(foreach=False), dict(foreach=True), dict(fused=True)):
        try:
            err = error(run(lambda ps: make_torch(ps, impl), params0, grads, dtype), ref)
        except (RuntimeError, ValueError, AssertionError, TypeError):
            continue  # this implementation does not take these options (or dtype) on the CPU
        best = err if best is None else {k: min(best[k], err[k]) for k in err}
    assert best is not None, "no torch implementation ran"
    return best


def ratios(ours, theirs):
    out = {}
    for k in theirs:
        if theirs[k] == 0.0:
            out[k] = 0.0 if ours[k] == 0.0 else float("inf")
        else:
            out[k] = ours[k] / theirs[k]
    return out


# --- SGD: lr float/tensor, momentum, dampening, nesterov, weight_decay, maximize, dtype.

def sgd_cases():
    for momentum, dampening, nesterov in [(0.0, 0.0, False), (0.0, 0.3, False), (0.9, 0.0, False),
                                          (0.9, 0.0, True), (0.9, 0.3, False)]:
        for lr_tensor, wd, maximize in itertools.product((False, True), (0.0, 1e-2), (False, True)):
            yield dict(momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd,
                       maximize=maximize), lr_tensor


def sgd_ratios(opts, lr_tensor, dtype, steps):
    params0, grads = inputs(dtype, steps)
    lr = 0.05

    def lr_of(value):
        return torch.tensor(value) if lr_tensor else value

    def make(cls, dt, **extra):
        def factory(ps):
            second = {"lr": lr_of(lr / 2), "weight_decay": 0.05 if opts["weight_decay"] == 0 else 0.0}
            return cls(groups(ps, {**opts, "lr": lr_of(lr)}, second), **extra)
        return factory
    # The float64 run: the same values (a tensor lr's float32 value) in float64.
    lr64 = float(torch.tensor(lr)) if lr_tensor else lr
    lr64b = float(torch.tensor(lr / 2)) if lr_tensor else lr / 2

    def make64(ps):
        second = {"lr": lr64b, "weight_decay": 0.05 if opts["weight_decay"] == 0 else 0.0}
        return torch.optim.SGD(groups(ps, {**opts, "lr": lr64}, second), foreach=False)
    ref = run(make64, params0, grads, torch.float64)
    ours = error(run(make(optim.SGD, dtype), params0, grads, dtype), ref)
    theirs = torch_errors(lambda ps, impl: make(torch.optim.SGD, dtype, **impl)(ps), params0, grads, dtype, ref)
    return ratios(ours, theirs)


# --- AdamW: betas floats/tensors, eps, weight_decay, amsgrad, maximize, lr tensor, capturable, dtype.

def adamw_cases():
    for betas_tensor, eps, wd, amsgrad, maximize, lr_tensor, capturable in itertools.product(
            (False, True), (1e-8, 1e-3), (0.0, 0.05), (False, True), (False, True), (False, True), (False, True)):
        yield dict(eps=eps, weight_decay=wd, amsgrad=amsgrad, maximize=maximize), betas_tensor, lr_tensor, capturable


def adamw_ratios(opts, betas_tensor, lr_tensor, capturable, dtype, steps):
    params0, grads = inputs(dtype, steps)
    lr, betas = 0.01, (0.9, 0.999)
    value = lambda x, tensor: torch.tensor(x) if tensor else x  # noqa: E731
    exact = lambda x, tensor: float(torch.tensor(x)) if tensor else x  # noqa: E731

    def make(cls, **extra):
        def factory(ps):
            first = {**opts, "lr": value(lr, lr_tensor),
                     "betas": tuple(value(b, betas_tensor) for b in betas)}
            second = {"lr": value(lr / 2, lr_tensor), "weight_decay": 0.1 if opts["weight_decay"] == 0 else 0.0,
                      "betas": tuple(value(b, betas_tensor) for b in (0.8, 0.99))}
            return cls(groups(ps, first, second), **extra)
        return factory

    def make64(ps):
        first = {**opts, "lr": exact(lr, lr_tensor), "betas": tuple(exact(b, betas_tensor) for b in betas)}
        second = {"lr": exact(lr / 2, lr_tensor), "weight_decay": 0.1 if opts["weight_decay"] == 0 else 0.0,
                  "betas": tuple(exact(b, betas_tensor) for b in (0.8, 0.99))}
        return torch.optim.AdamW(groups(ps, first, second), foreach=False)
    ref = run(make64, params0, grads, torch.float64)
    ours = error(run(make(optim.AdamW, capturable=capturable), params0, grads, dtype), ref)

    def make_torch(ps, impl):
        # torch's capturable step runs on GPUs only: on the CPU its non-capturable steps stand in
        # (the same math).
        return make(torch.optim.AdamW, **impl)(ps)
    theirs = torch_errors(make_torch, params0, grads, dtype, ref)
    return ratios(ours, theirs)


# --- LARS (both formulas) against its eager reference (eman_fused.reference) in the same dtype.

def lars_cases():
    for formula in ("simclr", "you2017"):
        damp_nest = [(0.0, False)] if formula == "simclr" else [(0.0, False), (0.1, False), (0.0, True)]
        for (dampening, nesterov), momentum, wd, maximize, exclude_group in itertools.product(
                damp_nest, (0.0, 0.9), (0.0, 1e-3), (False, True), (False, True)):
            if nesterov and momentum == 0:
                continue
            yield dict(formula=formula, momentum=momentum, dampening=dampening, nesterov=nesterov,
                       weight_decay=wd, maximize=maximize), exclude_group


class _EagerLars:
    """reference.lars_step_ / lars_you2017_step_ over two groups, as an optimizer object."""

    def __init__(self, groups_, formula):
        self.groups, self.formula, self.state = groups_, formula, {}

    def step(self):
        for g in self.groups:
            kw = {k: v for k, v in g.items() if k not in ("params", "lars_exclude", "formula")}
            if self.formula == "simclr":
                exclude = (lambda p: True) if g.get("lars_exclude") else (lambda p: p.ndim <= 1)
                kw.pop("dampening"), kw.pop("nesterov")
                reference.lars_step_(g["params"], self.state, exclude=exclude, **kw)
            else:
                reference.lars_you2017_step_(g["params"], self.state, lars_exclude=g.get("lars_exclude", False), **kw)


def lars_ratios(opts, exclude_group, dtype, steps):
    params0, grads = inputs(dtype, steps)
    base = dict(lr=0.5, trust_coefficient=0.02, **{k: v for k, v in opts.items() if k != "formula"})
    second = {"lr": 0.25, "lars_exclude": exclude_group}

    def make_ours(ps):
        return optim.LARS(groups(ps, base, second), formula=opts["formula"])

    def make_eager(ps):
        return _EagerLars(groups(ps, base, second), opts["formula"])

    def run_eager(dt):
        params = [nn.Parameter(p.to(dt, copy=True)) for p in params0]
        opt = make_eager(params)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.to(dt, copy=True)
            opt.step()
        out = {"param": [p.detach().double() for p in params]}
        if opts["formula"] == "simclr" or opts["momentum"] != 0:
            out["momentum_buffer"] = [opt.state[p].double() for p in params]
        return out
    ref = run_eager(torch.float64)
    ours = error(run(make_ours, params0, grads, dtype), ref)
    return ratios(ours, error(run_eager(dtype), ref))


def _assert_within(r):
    bad = {k: v for k, v in r.items() if not v <= RATIO}
    assert not bad, f"error over {RATIO}x the reference implementation's: {bad}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts,lr_tensor", list(sgd_cases()), ids=str)
def test_sgd_precision_on_the_product(opts, lr_tensor, dtype):
    _assert_within(sgd_ratios(opts, lr_tensor, dtype, PRODUCT_STEPS))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts,betas_tensor,lr_tensor,capturable", list(adamw_cases()), ids=str)
def test_adamw_precision_on_the_product(opts, betas_tensor, lr_tensor, capturable, dtype):
    _assert_within(adamw_ratios(opts, betas_tensor, lr_tensor, capturable, dtype, PRODUCT_STEPS))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts,exclude_group", list(lars_cases()), ids=str)
def test_lars_precision_on_the_product(opts, exclude_group, dtype):
    _assert_within(lars_ratios(opts, exclude_group, dtype, PRODUCT_STEPS))


# 100 steps on a representative subset (every dtype).
LONG_SGD = [(dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2, maximize=False), False),
            (dict(momentum=0.9, dampening=0.3, nesterov=False, weight_decay=0.0, maximize=True), True)]
LONG_ADAMW = [(dict(eps=1e-8, weight_decay=0.05, amsgrad=False, maximize=False), False, False, False),
              (dict(eps=1e-8, weight_decay=0.05, amsgrad=True, maximize=True), True, True, True)]
LONG_LARS = [(dict(formula="simclr", momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-3,
                   maximize=False), False),
             (dict(formula="you2017", momentum=0.9, dampening=0.1, nesterov=False, weight_decay=1e-3,
                   maximize=False), True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts,lr_tensor", LONG_SGD, ids=str)
def test_sgd_precision_over_100_steps(opts, lr_tensor, dtype):
    _assert_within(sgd_ratios(opts, lr_tensor, dtype, LONG_STEPS))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts,betas_tensor,lr_tensor,capturable", LONG_ADAMW, ids=str)
def test_adamw_precision_over_100_steps(opts, betas_tensor, lr_tensor, capturable, dtype):
    _assert_within(adamw_ratios(opts, betas_tensor, lr_tensor, capturable, dtype, LONG_STEPS))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts,exclude_group", LONG_LARS, ids=str)
def test_lars_precision_over_100_steps(opts, exclude_group, dtype):
    _assert_within(lars_ratios(opts, exclude_group, dtype, LONG_STEPS))


def main(steps: int, which: str = "SGD,AdamW,LARS") -> None:
    """The worst ratio per optimizer (and dtype) over the whole product at `steps` steps."""
    runs = {"SGD": (sgd_cases, sgd_ratios), "AdamW": (adamw_cases, adamw_ratios), "LARS": (lars_cases, lars_ratios)}
    for name in which.split(","):
        cases, fn = runs[name]
        for dtype in DTYPES:
            worst, where = 0.0, None
            n = 0
            for case in cases():
                r = fn(*case, dtype, steps)
                n += 1
                k, v = max(r.items(), key=lambda kv: kv[1])
                if v > worst:
                    worst, where = v, (case, k)
            print(f"{name:6} {str(dtype):15} {n:4} combinations x {steps} steps: worst ratio {worst:.3f} ({where})",
                  flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else LONG_STEPS, *sys.argv[2:3])
