"""Host overhead per call ('host'): every tensor holds one element, so the kernels move a few
bytes and what is timed is the host path a call pays on any device (Python, argument checks,
plan lookup, dispatch, the launch itself). The metric is microseconds per call, the median of
the timed calls (common.measure); GB/s would be meaningless here and is not reported. On CUDA
(--device cuda) the tensors live on the GPU and each sample is wall-clock time over a few calls
and a synchronize (common.wall_timer): per call, the larger of the host path and the GPU's work.

For each tensor count N (--host-sizes; default 320, 1,000, 5,000, 20,000):

  on two plain lists of N one-element fp32 tensors (teacher, student):
    ema_update_        eman_fused.ema_update_(teacher, student, m): the functional call
    FusedEMA.step      eman_fused.FusedEMA(teacher, student).step(m)
    foreach_lerp       torch._foreach_lerp_(teacher, student, 1-m), eager
    foreach_compile    torch.compile (dynamic=False) of the same foreach update with its weight
                       as a 0-dim tensor (bench/ema.py's peer), timed after the calls that
                       compile; cases over --compile-max-tensors are not compiled (said why)
  on a model of N one-element tensors in ResNet-50's mix: repeated Linear(1, 1, bias=False) +
  BatchNorm1d(1) (a weight; BN weight, bias, running_mean, running_var, num_batches_tracked),
  topped up with Linear(1, 1) layers (ResNet-50's 320 tensors: 161 parameters, 106 floating
  buffers, 53 counters; here 320 gives the same split):
    EMATeacher.update  eman_fused.EMATeacher(student, momentum=m).update() (EMAN: buffers too)
    timm ModelEmaV3.update          timm.utils.ModelEmaV3(student, decay=m).update(student)
    AveragedModel.update_parameters torch.optim.swa_utils.AveragedModel(student, use_buffers=True,
                                    multi_avg_fn=get_ema_multi_avg_fn(m))
    state foreach_lerp  the model state's lists collected once, then foreach lerp + counter copy
  each fused optimizer on that model's parameters (fixed one-element gradients):
    SGD / AdamW / LARS .step, without and with teacher=EMATeacher(student, eman=False)
    against torch.optim.X(foreach=True) and torch.optim.X(fused=True) (torch has fused CPU
    kernels for SGD and AdamW), each followed by the state foreach lerp for the teacher rows;
    LARS (torch has none): eman_fused.reference's per-tensor eager LARS, likewise

The goals are issue 18's: FusedEMA.step and EMATeacher.update <= 10 us at 320 tensors and
<= 25 us at 5,000; a fused optimizer step <= 15 us + 10 ns per parameter.

  python -m eman_fused bench --ops host [--host-sizes 320,1000,5000,20000] [--no-compile]
      [--compile-max-tensors N] [--repeats R] [--json out.json] [--markdown out.md]
"""
from __future__ import annotations

import statistics

import torch
from torch import nn

import eman_fused
from eman_fused.bench.common import (CALLS_PER_SYNC, compile_note, compile_skip_reason, compile_time_cell, error_text,
                                     measure_rounds, noise_lines)
from eman_fused.bench.optim import timm_style_update  # the state's lists collected once

M = 0.999
HOST_SIZES = (320, 1000, 5000, 20000)
# The default `bench` run (no --ops) adds the host table at these sizes only: 1,000 would be
# compiled (minutes on a 2-thread CPU) and 20,000 makes the slow alternatives take seconds.
SUMMARY_SIZES = (320, 5000)

OPTIMS = ("SGD", "AdamW", "LARS")


def _rows() -> list[tuple[str, str | None, list[str]]]:
    """The table's eman_fused rows: (name, goal kind, the alternatives it is compared with)."""
    rows = [("ema_update_", None, ["foreach_lerp", "foreach_compile"]),
            ("FusedEMA.step", "ema", ["foreach_lerp", "foreach_compile"]),
            ("EMATeacher.update", "ema", ["timm ModelEmaV3.update", "AveragedModel.update_parameters",
                                          "state foreach_lerp"])]
    for o in OPTIMS:  # torch has no LARS: the per-tensor eager one stands in for its foreach/fused
        alts = [f"torch {o}(foreach)", f"torch {o}(fused)"] if o != "LARS" else ["eager LARS"]
        rows += [(f"{o}.step", "optim", alts),
                 (f"{o}(teacher=).step", "optim", [f"{a} + state foreach_lerp" for a in alts])]
    return rows


ROWS = _rows()
EMA_GOALS_US = {320: 10.0, 5000: 25.0}


def goal_us(kind: str | None, tensors: int, params: int) -> float | None:
    """Issue 18's goal for a row, in us per call, or None where it sets none."""
    if kind == "ema":
        return EMA_GOALS_US.get(tensors)
    if kind == "optim":
        return 15.0 + 0.01 * params
    return None


def host_model(n: int, device=None) -> nn.Module:
    """A model of exactly `n` one-element tensors (parameters + buffers), mostly Linear(1, 1) +
    BatchNorm1d(1) pairs: real BatchNorm modules, so EMATeacher's EMAN path, timm and
    AveragedModel each walk them as they would a ResNet's."""
    layers = [nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1)) for _ in range(n // 6)]
    rest = n - 6 * len(layers)
    layers += [nn.Linear(1, 1) for _ in range(rest // 2)]
    if rest % 2:
        layers.append(nn.Linear(1, 1, bias=False))
    model = nn.ModuleList(layers)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("num_batches_tracked"):
                b.fill_(1000)
    return model.to(device) if device is not None else model


def student_with_grads(n: int, device=None) -> nn.Module:
    model = host_model(n, device)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(p.device)
    return model


def plain_lists(n: int, device=None):
    g = torch.Generator().manual_seed(0)
    t, s = [torch.randn(1, generator=g) for _ in range(n)], [torch.randn(1, generator=g) for _ in range(n)]
    if device is not None:
        t, s = [x.to(device) for x in t], [x.to(device) for x in s]
    return t, s


def _optim_methods(n: int, add, device) -> None:
    from eman_fused.bench.optim import CONFIGS, EagerLARS, _kwargs

    for o in OPTIMS:
        torch_cls, ours_cls, kw, _ = CONFIGS[o.lower()]

        def ours(teacher, cls=ours_cls, kw=kw):
            s = student_with_grads(n, device)
            t = eman_fused.EMATeacher(s, momentum=M, eman=False) if teacher else None
            return cls(s.parameters(), **({"teacher": t} if t is not None else {}), **_kwargs(kw)).step

        add(f"{o}.step", lambda ours=ours: ours(False))
        add(f"{o}(teacher=).step", lambda ours=ours: ours(True))
        impls = {"eager LARS": {}} if o == "LARS" else {f"torch {o}(foreach)": {"foreach": True},
                                                        f"torch {o}(fused)": {"fused": True}}
        for name, flag in impls.items():
            def theirs(teacher, cls=EagerLARS if o == "LARS" else torch_cls, flag=flag, kw=kw):
                s = student_with_grads(n, device)
                opt = cls(s.parameters(), **flag, **_kwargs(kw))
                if not teacher:
                    return opt.step
                ema = timm_style_update(host_model(n, device), s)  # a fresh model: cheaper than a deepcopy
                return lambda: (opt.step(), ema())

            add(name, lambda theirs=theirs: theirs(False))
            add(f"{name} + state foreach_lerp", lambda theirs=theirs: theirs(True))


def build_methods(n: int, device, use_compile: bool = True, compile_max_tensors: int = 0):
    """({name: callable or None}, {name: why it was not run}, {name: error}, compile info) for
    one size. A method that cannot be built is recorded with its error instead of failing the run."""
    from eman_fused.bench.ema import compiled_peer

    methods, skipped, errors = {}, {}, {}

    def add(name, build):
        try:
            methods[name] = build()
        except Exception as exc:
            methods[name], errors[name] = None, error_text(exc)

    def functional():
        t, s = plain_lists(n, device)
        return lambda: eman_fused.ema_update_(t, s, M)

    def fused_ema():
        fused = eman_fused.FusedEMA(*plain_lists(n, device))
        return lambda: fused.step(M)

    def foreach():
        t, s = plain_lists(n, device)
        return lambda: torch._foreach_lerp_(t, s, 1.0 - M)

    add("ema_update_", functional)
    add("FusedEMA.step", fused_ema)
    add("foreach_lerp", foreach)
    info = {}
    if not use_compile:
        skipped["foreach_compile"] = "not run (--no-compile)"
    elif why := compile_skip_reason(n, compile_max_tensors):
        skipped["foreach_compile"] = why
    else:
        try:
            peer, methods["foreach_compile"] = compiled_peer(*plain_lists(n, device), device)
            info = peer.info()
        except Exception as exc:  # a peer that cannot compile this case says why
            methods["foreach_compile"], errors["foreach_compile"] = None, error_text(exc)

    student = host_model(n, device)  # the EMA rows only read it: one student for all of them

    def teacher():
        return eman_fused.EMATeacher(student, momentum=M).update

    def timm_v3():
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(student, decay=M)
        return lambda: ema.update(student)

    def averaged():
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        avg = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(M), use_buffers=True)
        return lambda: avg.update_parameters(student)

    add("EMATeacher.update", teacher)
    add("timm ModelEmaV3.update", timm_v3)
    add("AveragedModel.update_parameters", averaged)
    add("state foreach_lerp", lambda: timm_style_update(host_model(n, device), student))
    _optim_methods(n, add, device)
    return methods, skipped, errors, info


def run_case(n: int, device, use_compile: bool = True, compile_max_tensors: int = 0, rounds: int = 1) -> dict:
    """Every method at one tensor count, timed in `rounds` round-robin rounds (common.measure_rounds);
    each row's us is its median round."""
    methods, skipped, errors, info = build_methods(n, device, use_compile, compile_max_tensors)
    runs, failed = measure_rounds({k: v for k, v in methods.items() if v is not None}, device, rounds,
                                  wall_clock=True)
    errors.update(failed)
    rows = {name: {"skipped": why} for name, why in skipped.items()}
    for name in methods:
        if name in runs:
            rows[name] = {"us": statistics.median(runs[name]) * 1e6,
                          "runs_ms": [round(s * 1e3, 6) for s in runs[name]]}
        else:
            rows[name] = {"error": errors[name]}
    if info and "us" in rows.get("foreach_compile", {}):
        rows["foreach_compile"].update(info)
    params = sum(1 for _ in host_model(n).parameters())
    return {"case": f"{n} tensors", "tensors": n, "params": params, "methods": rows}


def _us(x: float) -> str:
    return f"{x:.1f} µs" if x < 1000 else f"{x / 1000:.2f} ms"


SPREAD_FLAG = 3.0


def _spread(row: dict) -> str:
    """' (rounds a-b µs)' when a row's rounds differ by more than SPREAD_FLAG: the median is then
    not a steady-state time (e.g. another process held the second core for some rounds, and
    every call that opens a thread team waited for it), and the fastest round is shown too."""
    runs = row.get("runs_ms", [])
    if len(runs) > 1 and min(runs) > 0 and max(runs) / min(runs) > SPREAD_FLAG:
        return f" (rounds {_us(min(runs) * 1e3)}–{_us(max(runs) * 1e3)})"
    return ""


def markdown(result: dict) -> str:
    env = result["environment"]
    if env["device"] == "cpu":
        what = ("The metric is µs per call (median): the kernels move a few bytes, so this is the host "
                "path (Python, checks, plan lookup, dispatch) every call pays on any device; no GB/s. "
                "CPU numbers are CPU numbers.")
    else:
        what = (f"The metric is wall-clock µs per call (median of samples of {CALLS_PER_SYNC} calls then "
                "a synchronize): with one-element tensors that is the larger of the host path (Python, "
                "checks, plan lookup, launches) and the GPU's launch-bound work; no GB/s.")
    lines = [f"Host overhead per call, one-element tensors, {env['device_name']} ({env['device']}, "
             f"{env['threads']} threads), torch {env['torch']}, {env['date']}, commit {env.get('commit', '?')}. "
             + what, "",
             "| tensors | eman_fused | µs per call | ns per tensor | goal | met | alternatives: µs per call "
             "(their time / eman_fused's) |", "|---:|---|---:|---:|---:|:---:|---|"]
    for case in result["cases"]:
        n, params, rows = case["tensors"], case["params"], case["methods"]
        for name, kind, alts in ROWS:
            row = rows.get(name)
            if row is None:
                continue
            optim = kind == "optim"
            label = f"{name} ({params} params)" if optim else name
            if "us" not in row:
                lines.append(f"| {n} | {label} | fails | | | | {row.get('error', row.get('skipped'))} |")
                continue
            us = row["us"]
            per = us * 1e3 / (params if optim else n)
            goal = goal_us(kind, n, params)
            goal_cell = "—" if goal is None else f"≤ {goal:.1f} µs"
            met = "—" if goal is None else ("yes" if us <= goal else f"no ({us / goal:.1f}x)")
            cells = []
            for alt in alts:
                a = rows.get(alt)
                if a is None:
                    continue
                if "us" in a:
                    cells.append(f"{alt} {_us(a['us'])} ({a['us'] / us:.2f}x)")
                elif "skipped" in a:
                    cells.append(f"{alt}: not compiled" if a["skipped"].startswith("not compiled")
                                 else f"{alt}: not run")
                else:
                    cells.append(f"{alt}: fails")
            lines.append(f"| {n} | {label} | **{us:.1f}**{_spread(row)} | {per:.0f} | {goal_cell} | {met} | "
                         + "; ".join(cells) + " |")
    lines += ["", "(Nx) = that alternative's time / eman_fused's in the same run: above 1 eman_fused "
              "is faster. ns per tensor: µs per call / tensors (optimizer rows: per parameter). "
              f"(rounds a–b): that row's rounds differ by more than {SPREAD_FLAG:.0f}x, so its median "
              "is not a steady state (e.g. another process held the second core in some rounds). "
              "Goals (issue 18): FusedEMA.step and EMATeacher.update ≤ 10 µs at 320 tensors and "
              "≤ 25 µs at 5,000 (no goal set at other sizes, nor for the functional ema_update_); "
              "a fused optimizer step ≤ 15 µs + 10 ns per parameter, with or without teacher=.",
              "- lists: N one-element fp32 tensors per side. Model: N one-element tensors in "
              "ResNet-50's mix, Linear(1, 1, bias=False) + BatchNorm1d(1) pairs topped up with "
              "Linear(1, 1) (at 320: 161 parameters, 106 floating buffers, 53 counters); the "
              "optimizers step its parameters with fixed gradients, teacher= an EMATeacher(eman=False) "
              "of it; state foreach_lerp: the model state's lists collected once, foreach lerp + "
              "counter copy (what follows torch's optimizer in the unfused alternative)"]
    lines += compile_note(result, "foreach_compile (torch.compile of the foreach lerp, 0-dim tensor weight)")
    for case in result["cases"]:
        peer = case["methods"].get("foreach_compile", {})
        if "us" in peer:
            lines.append(f"- foreach_compile at {case['tensors']} tensors: compile time {compile_time_cell(peer)}")
        elif peer.get("skipped", "").startswith("not compiled"):
            lines.append(f"- foreach_compile at {case['tensors']} tensors: {peer['skipped']}")
    errors = sorted({(c["tensors"], m, r["error"]) for c in result["cases"] for m, r in c["methods"].items()
                     if "error" in r})
    lines += [f"- {m} at {n} tensors: {err}" for n, m, err in errors]
    lines += noise_lines(result)
    return "\n".join(lines) + "\n"
