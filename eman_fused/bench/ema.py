"""Benchmarks: eman_fused vs the alternatives a user would otherwise run, measured in one run.

EMA teacher update (op 'ema'):

For each model's parameter + buffer shapes (floating tensors EMA'd, integer counters copied):
  foreach_compile torch.compile (dynamic=False) of the foreach update with the weight 1-m as a
                  0-dim tensor: torch._foreach_lerp_(teacher, student, w) + _foreach_copy_ of the
                  counters (a student of another dtype is cast in the same compiled function).
                  A new momentum is a write into w: no recompile, no host sync. Timed after
                  the warm-up calls that compile; their wall time is reported as its compile
                  time. On the CPU inductor fuses the list into one C++ kernel for ViT-B/16's
                  152 tensors and two for ResNet-50's 320 (torch 2.14), each one OpenMP region
                  with a loop per tensor (shared by the threads for large tensors, run by one
                  thread for small ones). The measured peer, on by default (--no-compile: left
                  out; cases over --compile-max-tensors tensors: not compiled, said why)
  official_eman   the official EMAN loop: t.copy_(t*m + (1-m)*s) per tensor (state_dict loop)
  foreach_lerp    torch._foreach_lerp_ over floating tensors + _foreach_copy_ over counters
                  (timm ModelEmaV3 / AveragedModel(get_ema_multi_avg_fn) style), eager
  flat_lerp       one torch.lerp_ over flat buffers of the same size: the bandwidth ceiling of an
                  update that cannot be fused (not a drop-in: a model's tensors are not one buffer)
  eman_fused      FusedEMA.step: one pass (one launch on CUDA) over the whole list
  eman_fused_triton  the same through the Triton backend (GPU only; on the CPU: skipped, why)
GB/s counts teacher read + teacher write + student read. The copy bandwidth is measured in the
same run (flat tensor copy: read + write). CPU numbers are CPU numbers.

  python -m eman_fused bench [--model resnet50,vit_b16,many_small|shapes.json|pkg.mod:factory]
      [--ops ema,norm,optim,host] [--host-sizes 320,5000] [--dtypes fp32:fp32,fp32:bf16]
      [--device cpu|cuda] [--no-compile]
      [--compile-max-tensors N] [--json out.json] [--markdown out.md] [--plot out.png]
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

import eman_fused
from eman_fused.bench.common import (DTYPES, CompiledPeer, compile_note, compile_skip_reason,
                                     compile_time_cell, error_text, header, measure_rounds, noise_lines,
                                     timing_row, versus_compiled)
from eman_fused.bench.shapes import make_model_tensors
from eman_fused.reference import official_eman_update_

MOMENTUM = 0.999


def split(teacher, student):
    """(teacher floats, student floats, teacher integers, student integers)."""
    floats = [i for i, t in enumerate(teacher) if t.is_floating_point()]
    ints = [i for i, t in enumerate(teacher) if not t.is_floating_point()]
    return ([teacher[i] for i in floats], [student[i] for i in floats],
            [teacher[i] for i in ints], [student[i] for i in ints])


def alternatives(teacher, student, device):
    tf, sf, ti, si = split(teacher, student)
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
    triton_ok = eman_fused.backends()["triton"].available and device.type == "cuda"
    if triton_ok:
        fused_triton = eman_fused.FusedEMA(teacher, student, backend="triton")
        methods["eman_fused_triton"] = lambda: fused_triton.step(m)
    return methods, fused.bytes_per_step


def compiled_peer(teacher, student, device):
    """foreach_compile, compiled and checked (see the module's docstring): (peer, timed call)."""
    tf, sf, ti, si = split(teacher, student)
    weight = torch.tensor(1.0 - MOMENTUM, device=device)

    def foreach_ema(w):
        # torch's foreach lerp takes one dtype; a cast inside the compiled function is fused
        # into the update's kernel, so nothing extra is materialized
        torch._foreach_lerp_(tf, [s if s.dtype == t.dtype else s.to(t.dtype) for t, s in zip(tf, sf)], w)
        if ti:
            torch._foreach_copy_(ti, si)

    peer = CompiledPeer(foreach_ema, device)
    call = lambda: peer.fn(weight)  # noqa: E731
    peer.warm("compile_s", call)
    peer.no_recompile(call, vary=lambda: weight.fill_(1.0 - 0.99))
    weight.fill_(1.0 - MOMENTUM)
    return peer, call


def triton_skip_reason(device):
    if device.type != "cuda":
        return "Triton kernels need a GPU (on the CPU only the interpreter runs them, for tests)"
    backend = eman_fused.backends()["triton"]
    return None if backend.available else backend.detail


def run_case(name, table, t_dtype, s_dtype, device, use_compile=True, compile_max_tensors=0, rounds=1):
    """Every method on one model and dtype pair; a method that cannot run says why. The
    compiled peer is compiled first; then every method is timed in `rounds` round-robin rounds
    (common.measure_rounds), each one's time the median round."""
    teacher, student = make_model_tensors(table, DTYPES[t_dtype], DTYPES[s_dtype], device)
    methods, nbytes = alternatives(teacher, student, device)
    if t_dtype != s_dtype:
        methods["flat_lerp"] = None  # said below, not timed
    rows, info = {}, {}
    if use_compile:
        if skip := compile_skip_reason(len(table), compile_max_tensors):
            rows["foreach_compile"] = {"skipped": skip}
        else:
            try:
                peer, methods["foreach_compile"] = compiled_peer(teacher, student, device)
                info = peer.info()
            except Exception as exc:  # a peer that cannot compile this case says why
                rows["foreach_compile"] = {"error": error_text(exc)}
    runs, errors = measure_rounds(methods, device, rounds)
    for method in methods:
        if method in runs:
            rows[method] = timing_row(runs[method], nbytes)
        elif method in errors:
            rows[method] = {"error": errors[method]}
        elif method == "flat_lerp":
            rows[method] = {"error": "RuntimeError: torch.lerp_ needs one dtype; no mixed-dtype flat ceiling"}
    if "ms" in rows.get("foreach_compile", {}):
        rows["foreach_compile"].update(info)
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
    methods = ["eman_fused", "foreach_compile", "eman_fused_triton", "foreach_lerp", "official_eman",
               "flat_lerp"]
    heads = [m if m != "foreach_compile" else "foreach_compile | compile time" for m in methods]
    lines.append("| case | tensors | MB/step | " + " | ".join(heads) + " |")
    lines.append("|---|---:|---:|" + "---:|" * (len(methods) + 1))
    behind = []
    for case in result["cases"]:
        cells = []
        for m in methods:
            row = case["methods"].get(m)
            if row is None:
                cells.append("not run")
            elif "error" in row:
                cells.append("fails")
            elif "skipped" in row:
                cells.append("skipped" if m != "foreach_compile" else "not compiled")
            elif m == "eman_fused":
                cells.append(f"**{row['ms']:.3f} ms** ({row['GB/s']:.1f} GB/s, "
                             f"{100 * row['GB/s'] / result['copy_GBps']:.0f}% of copy)")
            elif m == "foreach_compile":
                cells.append(f"{row['ms']:.3f} ms ({row['GB/s']:.1f} GB/s, "
                             f"{versus_compiled(row['eman_fused_speedup'])})")
                if row["eman_fused_speedup"] < 1.0:
                    behind.append(case["case"])
            else:
                cells.append(f"{row['ms']:.3f} ms ({row['eman_fused_speedup']:.2f}x)")
            if m == "foreach_compile":
                cells.append(compile_time_cell(row))
        lines.append(f"| {case['case']} | {case['tensors']} | {case['bytes_per_step'] / 1e6:.1f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "(Nx) = that method's time / eman_fused's time: how many times faster eman_fused is; "
              "below 1 eman_fused is behind. flat_lerp is a bandwidth ceiling, not a drop-in "
              "alternative. On CPUs a copy also "
              "reads its destination (write-allocate) unseen by the GB/s count, so an update can "
              "exceed '100% of copy'; flat_lerp is the ceiling to compare with there."]
    lines += compile_note(result, "foreach_compile (the torch.compile peer: foreach lerp, 0-dim tensor weight)")
    if any("ms" in c["methods"].get("foreach_compile", {}) for c in result["cases"]):
        lines.append("- eman_fused behind torch.compile in: " + ", ".join(behind) if behind else
                     "- eman_fused ahead of torch.compile in every case it compiled")
    errors = {(c["case"], m): r["error"] for c in result["cases"] for m, r in c["methods"].items()
              if "error" in r}
    for (case, m), err in errors.items():
        lines.append(f"- {m} on {case}: {err}")
    lines += [f"- foreach_compile on {c['case']}: {c['methods']['foreach_compile']['skipped']}"
              for c in result["cases"] if "skipped" in c["methods"].get("foreach_compile", {})]
    skips = {r["skipped"] for c in result["cases"] for m, r in c["methods"].items()
             if "skipped" in r and m != "foreach_compile"}
    lines += [f"- skipped: {why}" for why in sorted(skips)]
    lines += noise_lines(result)
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
