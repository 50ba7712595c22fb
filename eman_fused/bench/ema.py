"""Benchmarks: eman_fused vs the alternatives a user would otherwise run, measured in one run.

EMA teacher update (op 'ema'):

For each model's parameter + buffer shapes (floating tensors EMA'd, integer counters copied):
  official_eman   the official EMAN loop: t.copy_(t*m + (1-m)*s) per tensor (state_dict loop)
  foreach_lerp    torch._foreach_lerp_ over floating tensors + _foreach_copy_ over counters
                  (timm ModelEmaV3 / AveragedModel(get_ema_multi_avg_fn) style)
  foreach_compile torch.compile of foreach_lerp (with --compile)
  flat_lerp       one torch.lerp_ over flat buffers of the same size: the bandwidth ceiling of an
                  update that cannot be fused (not a drop-in: a model's tensors are not one buffer)
  eman_fused      FusedEMA.step: one pass (one launch on CUDA) over the whole list
  eman_fused_triton  the same through the Triton backend (GPU only; on the CPU: skipped, why)
GB/s counts teacher read + teacher write + student read. The copy bandwidth is measured in the
same run (flat tensor copy: read + write). CPU numbers are CPU numbers.

  python -m eman_fused bench [--model resnet50,vit_b16,many_small|shapes.json|pkg.mod:factory]
      [--ops ema] [--dtypes fp32:fp32,fp32:bf16] [--device cpu|cuda] [--compile]
      [--json out.json] [--markdown out.md] [--plot out.png]
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

import eman_fused
from eman_fused.bench.common import DTYPES, header, measure
from eman_fused.bench.shapes import make_model_tensors
from eman_fused.reference import official_eman_update_

MOMENTUM = 0.999


def alternatives(teacher, student, device, use_compile):
    floats = [i for i, t in enumerate(teacher) if t.is_floating_point()]
    ints = [i for i, t in enumerate(teacher) if not t.is_floating_point()]
    tf, sf = [teacher[i] for i in floats], [student[i] for i in floats]
    ti, si = [teacher[i] for i in ints], [student[i] for i in ints]
    m = MOMENTUM

    def foreach_lerp():
        torch._foreach_lerp_(tf, sf, 1.0 - m)
        if ti:
            torch._foreach_copy_(ti, si)

    fused = eman_fused.FusedEMA(teacher, student)
    flat_t = torch.randn(sum(t.numel() for t in tf), device=device).to(tf[0].dtype)
    flat_s = torch.randn(flat_t.numel(), device=device).to(sf[0].dtype)
    methods = {
        "official_eman": lambda: official_eman_update_(teacher, student, m),
        "foreach_lerp": foreach_lerp,
        "flat_lerp": lambda: flat_t.lerp_(flat_s, 1.0 - m),
        "eman_fused": lambda: fused.step(m),
    }
    if use_compile:
        methods["foreach_compile"] = torch.compile(foreach_lerp)
    triton_ok = eman_fused.backends()["triton"].available and device.type == "cuda"
    if triton_ok:
        fused_triton = eman_fused.FusedEMA(teacher, student, backend="triton")
        methods["eman_fused_triton"] = lambda: fused_triton.step(m)
    return methods, fused.bytes_per_step


def triton_skip_reason(device):
    if device.type != "cuda":
        return "Triton kernels need a GPU (on the CPU only the interpreter runs them, for tests)"
    backend = eman_fused.backends()["triton"]
    return None if backend.available else backend.detail


def run_case(name, table, t_dtype, s_dtype, device, use_compile):
    """Every method on one model and dtype pair; a method that cannot run says why."""
    teacher, student = make_model_tensors(table, DTYPES[t_dtype], DTYPES[s_dtype], device)
    methods, nbytes = alternatives(teacher, student, device, use_compile)
    rows = {}
    for method, fn in methods.items():
        try:
            if method == "flat_lerp" and t_dtype != s_dtype:
                raise RuntimeError("torch.lerp_ needs one dtype; no mixed-dtype flat ceiling")
            seconds = measure(fn, device)
            rows[method] = {"ms": seconds * 1e3, "GB/s": nbytes / seconds / 1e9}
        except Exception as exc:  # an alternative that cannot do this case says why
            rows[method] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    skip = triton_skip_reason(device)
    if skip:
        rows["eman_fused_triton"] = {"skipped": skip}
    fused_ms = rows["eman_fused"]["ms"]
    for method, row in rows.items():
        if "ms" in row:
            row["eman_fused_speedup"] = row["ms"] / fused_ms
    return {"case": f"{name} t={t_dtype} s={s_dtype}", "model": name, "tensors": len(table),
            "elements": sum(math.prod(s) for _, s, _ in table), "bytes_per_step": nbytes,
            "teacher_dtype": t_dtype, "student_dtype": s_dtype, "methods": rows}


def markdown(result):
    lines = [header("EMA update", result), ""]
    methods = ["eman_fused", "eman_fused_triton", "foreach_lerp", "foreach_compile", "official_eman",
               "flat_lerp"]
    lines.append("| case | tensors | MB/step | " + " | ".join(methods) + " |")
    lines.append("|---|---:|---:|" + "---:|" * len(methods))
    for case in result["cases"]:
        cells = []
        for m in methods:
            row = case["methods"].get(m)
            if row is None:
                cells.append("not run")
            elif "error" in row:
                cells.append("fails")
            elif "skipped" in row:
                cells.append("skipped")
            elif m == "eman_fused":
                cells.append(f"**{row['ms']:.3f} ms** ({row['GB/s']:.1f} GB/s, "
                             f"{100 * row['GB/s'] / result['copy_GBps']:.0f}% of copy)")
            else:
                cells.append(f"{row['ms']:.3f} ms ({row['eman_fused_speedup']:.2f}x)")
        lines.append(f"| {case['case']} | {case['tensors']} | {case['bytes_per_step'] / 1e6:.1f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "(Nx) = that method's time / eman_fused's time: how many times faster eman_fused is. "
              "flat_lerp is a bandwidth ceiling, not a drop-in alternative. On CPUs a copy also "
              "reads its destination (write-allocate) unseen by the GB/s count, so an update can "
              "exceed '100% of copy'; flat_lerp is the ceiling to compare with there."]
    errors = {(c["case"], m): r["error"] for c in result["cases"] for m, r in c["methods"].items()
              if "error" in r}
    for (case, m), err in errors.items():
        lines.append(f"- {m} on {case}: {err}")
    skips = {r["skipped"] for c in result["cases"] for r in c["methods"].values() if "skipped" in r}
    lines += [f"- skipped: {why}" for why in sorted(skips)]
    return "\n".join(lines) + "\n"


def plot(result, path: Path) -> None:
    """Bars per method for each case, log-scale time (ms)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    methods = [m for m in ("eman_fused", "eman_fused_triton", "foreach_lerp", "foreach_compile",
                           "official_eman", "flat_lerp")
               if any("ms" in c["methods"].get(m, {}) for c in cases)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        xs = [i + j * width for i, c in enumerate(cases) if "ms" in c["methods"].get(m, {})]
        ys = [c["methods"][m]["ms"] for c in cases if "ms" in c["methods"].get(m, {})]
        ax.bar(xs, ys, width, label=m)
    ax.set_yscale("log")
    ax.set_ylabel("ms per update (log)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], [c["case"] for c in cases],
                  rotation=20, ha="right", fontsize=8)
    env = result["environment"]
    ax.set_title(f"EMA update on {env['device_name']} ({env['device']}), torch {env['torch']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
