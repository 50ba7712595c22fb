"""Optimizer step + EMA teacher update ('optim'): torch's optimizer followed by a separate
teacher update, against eman_fused.optim with the teacher fused into the step, in one run.

For each model (a shape table: parameters, buffers, counters; fp32, or the whole model in
bf16/fp16 with --param-dtype, teacher in the same dtype) and optimizer:
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
from eman_fused.bench.common import DTYPES, copy_bandwidth, environment, header, measure, prepare, write_result
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


def timm_style_update(teacher: nn.Module, student: nn.Module):
    t_f, s_f, t_i, s_i = [], [], [], []
    for t, s in zip(teacher.state_dict().values(), student.state_dict().values()):
        (t_f if t.is_floating_point() else t_i).append(t)
        (s_f if t.is_floating_point() else s_i).append(s)

    @torch.no_grad()
    def step():
        torch._foreach_lerp_(t_f, s_f, 1.0 - M)
        if t_i:
            torch._foreach_copy_(t_i, s_i)
    return step


def run_case(model_name, table, optim_name, device, param_dtype="fp32"):
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
    rows = {}
    for name, fn in methods.items():
        seconds = measure(fn, device)
        rows[name] = {"ms": seconds * 1e3, "GB/s": nbytes / seconds / 1e9}

    for row in rows.values():
        row["eman_fused_speedup"] = row["ms"] / rows["eman_fused"]["ms"]
    label = f"{model_name} {optim_name}" + ("" if param_dtype == "fp32" else f" {param_dtype}")
    return {"case": label, "tensors": len(table), "bytes_per_step": nbytes, "param_dtype": param_dtype,
            "methods": rows, "skipped": skipped}


def markdown(result) -> str:
    names = ["eman_fused", "eman_fused_triton", "torch_fused+EMATeacher", "torch_foreach+EMATeacher",
             "torch+EMATeacher", "torch+foreach_lerp", "eager_lars+EMATeacher"]
    names = [n for n in names if any(n in c["methods"] for c in result["cases"])]
    lines = [header("Optimizer step + EMA teacher update", result), "",
             "| case | MB/step | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for c in result["cases"]:
        cells = []
        for n in names:
            r = c["methods"].get(n)
            if r is None:
                cells.append("—")
                continue
            cells.append(f"**{r['ms']:.3f} ms** ({r['GB/s']:.1f} GB/s)" if n == "eman_fused"
                         else f"{r['ms']:.3f} ms ({r['eman_fused_speedup']:.2f}x)")
        lines.append(f"| {c['case']} | {c['bytes_per_step'] / 1e6:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "(Nx) = that method's time / eman_fused's time, same run. Gradients are fixed; "
              "forward/backward not included."]
    skipped = {f"{name}: {why}" for c in result["cases"] for name, why in c.get("skipped", {}).items()}
    lines += [f"- skipped {line}" for line in sorted(skipped)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50,vit_b16")
    ap.add_argument("--optim", default=DEFAULT_OPTIMS)
    ap.add_argument("--param-dtype", default="fp32", help="comma list of fp32, bf16, fp16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    prepare(device)
    cases = []
    for name, table in (shapes.load_table(spec) for spec in args.model.split(",")):
        for dtype in args.param_dtype.split(","):
            for optim_name in args.optim.split(","):
                print(f"[optim] {name} {optim_name} {dtype} ...", flush=True)
                cases.append(run_case(name, table, optim_name, device, dtype))
    result = {"op": "optim", "environment": environment(device),
              "copy_GBps": copy_bandwidth(device, 1 << 28), "momentum": M, "cases": cases}
    write_result(result, markdown(result), args.json, args.markdown)
    return result
