"""Optimizer step + EMA teacher update ('optim'): torch's optimizer followed by a separate
teacher update, against eman_fused.optim with the teacher fused into the step, in one run.

For each model (a shape table: parameters, buffers, counters; fp32, or the whole model in
bf16/fp16 with --param-dtype, teacher in the same dtype) and optimizer:
  torch_compile+foreach_lerp  the measured peer, on by default (--no-compile: left out, said
                       so): torch.compile (dynamic=False, graph breaks allowed, as PyTorch's
                       recipe for compiling the optimizer step) of one function calling
                       torch.optim.X.step() and then the foreach EMA with its weight 1-m as a
                       0-dim tensor; the learning rate is a 0-dim tensor too, so a scheduler's
                       new lr or a new momentum is a write, not a recompile. Timed after the
                       warm-up calls that compile (their wall time: its compile time). LARS:
                       none (torch has no LARS, and the eager one branches on values per tensor)
  torch+foreach_lerp   torch.optim.X (its default CPU/GPU implementation), then timm-style
                       torch._foreach_lerp_ over parameters and floating buffers + counter copies
  torch+EMATeacher     torch.optim.X, then eman_fused.EMATeacher.update() (one fused EMA call)
  torch_foreach+EMATeacher  the same with torch.optim.X(foreach=True)
  torch_fused+EMATeacher    the same with torch.optim.X(fused=True) (torch's own fused kernels)
  eager_lars+EMATeacher  (LARS: torch has none) the per-tensor eager LARS of the same formula
                       (eman_fused.reference.lars_step_: simclr; lars_you2017_step_: you2017),
                       then EMATeacher.update()
  eman_fused           eman_fused.optim.X(teacher=...): one fused pass for params, state and
                       teacher, plus the teacher's call for its buffers
  eman_fused_triton    the same with backend='triton' (GPU only: on the CPU the table says
                       it is skipped and why)
Gradients are fixed random tensors (no forward/backward: this times the update only). GB/s is
the traffic of the fused algorithm (SGD with momentum: grad read, param and buffer read+write,
teacher read+write; AdamW: grad, param, exp_avg, exp_avg_sq, teacher) over each method's time.

Optimizers (--optim): sgd (momentum, weight decay), adamw, lars (formula="simclr"),
lars_you2017 (formula="you2017", with dampening), adamw_tensor (lr and betas as 0-dim tensors).

  python benchmarks/bench_optim.py [--model resnet50,vit_b16] [--optim sgd,adamw,lars,lars_you2017]
      [--param-dtype fp32,bf16] [--device cpu|cuda] [--json out.json] [--markdown out.md]
  python -m eman_fused bench --ops optim [--model ...]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import eman_fused
from eman_fused import reference
from eman_fused.bench import shapes
from eman_fused.bench.common import (COMPILE_MAX_TENSORS, DTYPES, CompiledPeer, compile_note, compile_settings,
                                     compile_skip_reason, compile_time_cell, copy_bandwidth, environment,
                                     error_text, header, load_average, measure_rounds, noise_lines, prepare,
                                     timing_row, versus_compiled, write_result)
from eman_fused.bench.shapes import ShapeModel, make

M = 0.999


class EagerLARS:
    """The per-tensor eager LARS of eman_fused.reference (lars_step_, or lars_you2017_step_ for
    formula='you2017') as an optimizer object."""

    def __init__(self, params, lr, momentum, weight_decay, trust_coefficient, formula="simclr",
                 dampening=0.0):
        self.params, self.buffers, self.formula = list(params), {}, formula
        self.kwargs = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                           trust_coefficient=trust_coefficient)
        if formula == "you2017":
            self.kwargs["dampening"] = dampening

    def step(self):
        if self.formula == "you2017":
            reference.lars_you2017_step_(self.params, self.buffers, **self.kwargs)
        else:
            reference.lars_step_(self.params, self.buffers, **self.kwargs)


# name: (alternative optimizer, fused optimizer, arguments, passes over a param's bytes)
CONFIGS = {
    "sgd": (torch.optim.SGD, eman_fused.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-4), 7),
    "adamw": (torch.optim.AdamW, eman_fused.optim.AdamW, dict(lr=1e-3, weight_decay=0.05), 9),
    "lars": (EagerLARS, eman_fused.optim.LARS,
             dict(lr=0.1, momentum=0.9, weight_decay=1e-6, trust_coefficient=0.001), 9),
    "lars_you2017": (EagerLARS, eman_fused.optim.LARS,
                     dict(lr=0.1, momentum=0.9, weight_decay=1e-6, trust_coefficient=0.001,
                          formula="you2017", dampening=0.1), 9),
    "adamw_tensor": (torch.optim.AdamW, eman_fused.optim.AdamW,
                     dict(lr=lambda: torch.tensor(1e-3), betas=lambda: (torch.tensor(0.9), torch.tensor(0.999)),
                          weight_decay=0.05), 9),
}
DEFAULT_OPTIMS = "sgd,adamw,lars,lars_you2017"


def _kwargs(kwargs):
    """A config's arguments; tensor-valued ones fresh per optimizer (schedulers write them)."""
    return {k: v() if callable(v) else v for k, v in kwargs.items()}


def _split_state(teacher: nn.Module, student: nn.Module):
    t_f, s_f, t_i, s_i = [], [], [], []
    for t, s in zip(teacher.state_dict().values(), student.state_dict().values()):
        (t_f if t.is_floating_point() else t_i).append(t)
        (s_f if t.is_floating_point() else s_i).append(s)
    return t_f, s_f, t_i, s_i


def timm_style_update(teacher: nn.Module, student: nn.Module):
    t_f, s_f, t_i, s_i = _split_state(teacher, student)

    @torch.no_grad()
    def step():
        torch._foreach_lerp_(t_f, s_f, 1.0 - M)
        if t_i:
            torch._foreach_copy_(t_i, s_i)
    return step


LARS_NO_PEER = ("no torch.compile peer: torch has no LARS, and the eager LARS branches on each "
                "tensor's norms (a graph break per tensor)")


def compiled_peer(table, torch_cls, kw, device, dt):
    """torch_compile+foreach_lerp, compiled and checked (see the module's docstring):
    (peer, timed call)."""
    student = make(table, device, dt)
    teacher = ShapeModel(table, device, dt)
    kwargs = _kwargs(kw)
    if not isinstance(kwargs["lr"], torch.Tensor):
        kwargs["lr"] = torch.tensor(kwargs["lr"], device=device)
    opt = torch_cls(student.parameters(), **kwargs)
    t_f, s_f, t_i, s_i = _split_state(teacher, student)
    weight = torch.tensor(1.0 - M, device=device)

    def step(w):
        opt.step()
        torch._foreach_lerp_(t_f, s_f, w)
        if t_i:
            torch._foreach_copy_(t_i, s_i)

    def vary():  # what a scheduler does between steps: new values in the same tensors
        weight.fill_(1.0 - 0.99)
        opt.param_groups[0]["lr"].mul_(0.5)

    peer = CompiledPeer(step, device, fullgraph=False)
    call = torch.no_grad()(lambda: peer.fn(weight))
    peer.warm("compile_s", call, calls=3)  # the first step also creates the optimizer's state
    lr = opt.param_groups[0]["lr"].clone()
    peer.no_recompile(call, vary)
    weight.fill_(1.0 - M)
    opt.param_groups[0]["lr"].copy_(lr)
    return peer, call


def run_case(model_name, table, optim_name, device, param_dtype="fp32", use_compile=True,
             compile_max_tensors=COMPILE_MAX_TENSORS, rounds=1):
    torch_cls, ours_cls, kw, passes = CONFIGS[optim_name]
    dt = DTYPES[param_dtype]  # params, grads, buffers and teacher
    methods = {}
    lars = optim_name.startswith("lars")
    kwargs = _kwargs(kw)
    skipped = {}
    if lars:
        s2 = make(table, device, dt)
        t2 = eman_fused.EMATeacher(s2, momentum=M, eman=False)
        o2 = torch_cls(s2.parameters(), **kwargs)
        methods["eager_lars+EMATeacher"] = lambda: (o2.step(), t2.update())
    else:
        # torch optimizer + timm-style foreach EMA
        s1 = make(table, device, dt)
        t1 = ShapeModel(table, device, dt)
        o1 = torch_cls(s1.parameters(), **_kwargs(kw))
        ema1 = timm_style_update(t1, s1)
        methods["torch+foreach_lerp"] = lambda: (o1.step(), ema1())
        # torch optimizer + EMATeacher.update
        s2 = make(table, device, dt)
        t2 = eman_fused.EMATeacher(s2, momentum=M, eman=False)
        o2 = torch_cls(s2.parameters(), **_kwargs(kw))
        methods["torch+EMATeacher"] = lambda: (o2.step(), t2.update())
        # torch's foreach implementation (its fastest on CPU tensors) + EMATeacher.update; torch
        # takes tensor hyper-parameters with foreach=True only when capturable (GPU-only)
        foreach_kw = _kwargs(kw)
        tensors = [v for v in foreach_kw.values() for v in (v if isinstance(v, tuple) else (v,))
                   if isinstance(v, torch.Tensor)]
        if not tensors:
            s4 = make(table, device, dt)
            t4 = eman_fused.EMATeacher(s4, momentum=M, eman=False)
            o4 = torch_cls(s4.parameters(), foreach=True, **foreach_kw)
            methods["torch_foreach+EMATeacher"] = lambda: (o4.step(), t4.update())
        else:
            skipped["torch_foreach+EMATeacher"] = ("torch's foreach optimizers take tensor lr/betas only "
                                                   "with capturable=True, which runs on GPUs only")
        # torch's fused implementation (CPU and CUDA kernels in torch) + EMATeacher.update
        s5 = make(table, device, dt)
        t5 = eman_fused.EMATeacher(s5, momentum=M, eman=False)
        o5 = torch_cls(s5.parameters(), fused=True, **_kwargs(kw))
        methods["torch_fused+EMATeacher"] = lambda: (o5.step(), t5.update())
    # fused
    s3 = make(table, device, dt)
    t3 = eman_fused.EMATeacher(s3, momentum=M, eman=False)
    o3 = ours_cls(s3.parameters(), teacher=t3, **_kwargs(kw))
    methods["eman_fused"] = o3.step
    triton = eman_fused.backends()["triton"]  # the Triton kernels, measured where they compile
    if device.type == "cuda" and triton.available:
        s6 = make(table, device, dt)
        t6 = eman_fused.EMATeacher(s6, momentum=M, eman=False)
        methods["eman_fused_triton"] = ours_cls(s6.parameters(), teacher=t6, backend="triton", **_kwargs(kw)).step
    else:
        skipped["eman_fused_triton"] = ("Triton kernels need a GPU (on the CPU only the interpreter "
                                        "runs them, for tests)" if device.type == "cpu" else triton.detail)
    param_bytes = sum(p.nbytes for p in s3.parameters())
    nbytes = passes * param_bytes + 3 * sum(b.nbytes for b in s3.buffers() if b.is_floating_point())
    rows, info = {}, {}
    if use_compile:
        if lars:
            skipped["torch_compile+foreach_lerp"] = LARS_NO_PEER
        elif why := compile_skip_reason(len(table), compile_max_tensors):
            skipped["torch_compile+foreach_lerp"] = why
        else:
            try:
                peer, methods["torch_compile+foreach_lerp"] = compiled_peer(table, torch_cls, kw, device, dt)
                info = peer.info()
            except Exception as exc:  # a peer that cannot compile this case says why
                rows["torch_compile+foreach_lerp"] = {"error": error_text(exc)}
    runs, errors = measure_rounds(methods, device, rounds)
    for name in methods:
        rows[name] = timing_row(runs[name], nbytes) if name in runs else {"error": errors[name]}
    if "ms" in rows.get("torch_compile+foreach_lerp", {}):
        rows["torch_compile+foreach_lerp"].update(info)
    for row in rows.values():
        if "ms" in row:
            row["eman_fused_speedup"] = row["ms"] / rows["eman_fused"]["ms"]
    label = f"{model_name} {optim_name}" + ("" if param_dtype == "fp32" else f" {param_dtype}")
    return {"case": label, "tensors": len(table), "bytes_per_step": nbytes, "param_dtype": param_dtype,
            "methods": rows, "skipped": skipped}


def markdown(result) -> str:
    names = ["eman_fused", "torch_compile+foreach_lerp", "eman_fused_triton", "torch_fused+EMATeacher",
             "torch_foreach+EMATeacher", "torch+EMATeacher", "torch+foreach_lerp", "eager_lars+EMATeacher"]
    peer = "torch_compile+foreach_lerp"
    names = [n for n in names if n == peer or any(n in c["methods"] for c in result["cases"])]
    heads = [n if n != peer else f"{n} | compile time" for n in names]
    lines = [header("Optimizer step + EMA teacher update", result), "",
             "| case | MB/step | " + " | ".join(heads) + " |", "|---|---:|" + "---:|" * (len(names) + 1)]
    behind = []
    for c in result["cases"]:
        cells = []
        for n in names:
            r = c["methods"].get(n)
            if r is None or "error" in r:
                cells.append("—" if r is None else "fails")
            elif n == "eman_fused":
                cells.append(f"**{r['ms']:.3f} ms** ({r['GB/s']:.1f} GB/s)")
            elif n == peer:
                cells.append(f"{r['ms']:.3f} ms ({r['GB/s']:.1f} GB/s, {versus_compiled(r['eman_fused_speedup'])})")
                if r["eman_fused_speedup"] < 1.0:
                    behind.append(c["case"])
            else:
                cells.append(f"{r['ms']:.3f} ms ({r['eman_fused_speedup']:.2f}x)")
            if n == peer:
                cells.append(compile_time_cell(r))
        lines.append(f"| {c['case']} | {c['bytes_per_step'] / 1e6:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "(Nx) = that method's time / eman_fused's time, same run; below 1 eman_fused is behind. "
              "Gradients are fixed; forward/backward not included."]
    lines += compile_note(result, f"{peer} (the torch.compile peer: optimizer step + foreach EMA)")
    if any("ms" in c["methods"].get(peer, {}) for c in result["cases"]):
        lines.append("- eman_fused behind torch.compile in: " + ", ".join(behind) if behind else
                     "- eman_fused ahead of torch.compile in every case it compiled")
    lines += [f"- {peer} on {c['case']}: {c['methods'][peer]['error']}"
              for c in result["cases"] if "error" in c["methods"].get(peer, {})]
    lines += [f"- {name} on {c['case']}: {why}" for c in result["cases"]
              for name, why in c.get("skipped", {}).items() if name == peer]
    skipped = {f"{name}: {why}" for c in result["cases"] for name, why in c.get("skipped", {}).items()
               if name != peer}
    lines += [f"- skipped {line}" for line in sorted(skipped)]
    lines += noise_lines(result)
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50,vit_b16")
    ap.add_argument("--optim", default=DEFAULT_OPTIMS)
    ap.add_argument("--param-dtype", default="fp32", help="comma list of fp32, bf16, fp16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="leave out torch_compile+foreach_lerp (timed by default); the table says so")
    ap.add_argument("--compile", dest="compile", action="store_true",
                    help="accepted for older scripts and does nothing: the compiled peer is on by default")
    ap.add_argument("--compile-max-tensors", type=int, default=COMPILE_MAX_TENSORS, metavar="N",
                    help="models with more tensors are not compiled, said so; 0: no limit")
    ap.add_argument("--repeats", type=int, default=1, metavar="R",
                    help="R round-robin rounds per case, the median reported")
    ap.add_argument("--note", help="a sentence for the markdown (e.g. what else ran on the machine)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    prepare(device)
    load = load_average()
    cases = []
    for name, table in (shapes.load_table(spec) for spec in args.model.split(",")):
        for dtype in args.param_dtype.split(","):
            for optim_name in args.optim.split(","):
                print(f"[optim] {name} {optim_name} {dtype} ...", flush=True)
                cases.append(run_case(name, table, optim_name, device, dtype, args.compile,
                                      args.compile_max_tensors, args.repeats))
    result = {"op": "optim", "environment": environment(device),
              "copy_GBps": copy_bandwidth(device, 1 << 28), "momentum": M,
              "compile": compile_settings(args.compile, args.compile_max_tensors), "load": load,
              "load_after": load_average(), **({"note": args.note} if args.note else {}), "cases": cases}
    write_result(result, markdown(result), args.json, args.markdown)
    return result
