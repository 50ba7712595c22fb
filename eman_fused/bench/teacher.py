"""The whole teacher step on a real model: eman_fused.EMATeacher.update() against the libraries a
user would otherwise call, each with its own per-step host work, measured in one run.

  eman_fused      EMATeacher(student).update(): one fused call over parameters + buffers
  timm_v3         timm.utils.ModelEmaV3(student).update(student): state_dict walk, foreach lerp
  averaged_model  torch.optim.swa_utils.AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(m),
                  use_buffers=True).update_parameters(student)
  official_eman   the EMAN paper's loop: over both state_dicts, t.copy_(t*m + (1-m)*s),
                  num_batches_tracked copied

It also reports what each leaves in num_batches_tracked when the student's counter moves from
1000 to 2000 before one more update: the counter must be copied (2000), not averaged.

  python benchmarks/bench_teacher.py [--model resnet50|vit_b_16|pkg.mod:callable] [--device cpu|cuda]
      [--json out.json] [--markdown out.md]
"""
from __future__ import annotations

import argparse
import copy
import importlib
from pathlib import Path

import torch

import eman_fused
from eman_fused.bench.common import allocator_note, copy_bandwidth, environment, measure, prepare, write_result
from eman_fused.reference import official_eman_update_

MOMENTUM = 0.999


def build_model(spec: str) -> torch.nn.Module:
    if ":" in spec:
        module, fn = spec.split(":", 1)
        return getattr(importlib.import_module(module), fn)()
    import torchvision
    return getattr(torchvision.models, spec)()


def official_eman(student):
    teacher = copy.deepcopy(student)

    return (lambda: official_eman_update_(teacher, student, MOMENTUM)), teacher


def methods(student):
    out, skipped = {}, {}
    teacher = eman_fused.EMATeacher(student, momentum=MOMENTUM)
    out["eman_fused"] = (teacher.update, teacher.module)
    try:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(student, decay=MOMENTUM)
        out["timm_v3"] = (lambda: ema.update(student), ema.module)
    except ImportError as exc:
        skipped["timm_v3"] = f"timm is not installed ({exc})"
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    avg = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(MOMENTUM), use_buffers=True)
    out["averaged_model"] = (lambda: avg.update_parameters(student), avg.module)
    out["official_eman"] = official_eman(student)
    return out, skipped


def counter(model: torch.nn.Module):
    for name, b in model.named_buffers():
        if name.endswith("num_batches_tracked"):
            return int(b)
    return None


def run(args) -> dict:
    device = torch.device(args.device)
    prepare(device)
    student = build_model(args.model).to(device)
    for name, b in student.named_buffers():
        if name.endswith("num_batches_tracked"):
            b.fill_(1000)
    tensors = [*student.parameters(), *student.buffers()]
    floats = [t for t in tensors if t.is_floating_point()]
    nbytes = 3 * sum(t.nbytes for t in floats)  # teacher read + write, student read
    fns, skipped = methods(student)
    rows = {}
    for name, (fn, teacher) in fns.items():
        seconds = measure(fn, device)
        rows[name] = {"ms": seconds * 1e3, "GB/s": nbytes / seconds / 1e9}
        print(f"{name:15s} {seconds * 1e3:8.3f} ms  {nbytes / seconds / 1e9:6.1f} GB/s", flush=True)
    # The counters: the student's move from 1000 to 2000; one more update of each teacher.
    for name, b in student.named_buffers():
        if name.endswith("num_batches_tracked"):
            b.fill_(2000)
    for name, (fn, teacher) in fns.items():
        fn()
        rows[name]["num_batches_tracked"] = counter(teacher)
    for name, row in rows.items():
        row["eman_fused_speedup"] = row["ms"] / rows["eman_fused"]["ms"]
    return {"op": "teacher", "environment": environment(device), "model": args.model, "tensors": len(tensors),
            "bytes_per_step": nbytes, "momentum": MOMENTUM, "copy_GBps": copy_bandwidth(device, nbytes // 3),
            "methods": rows, "skipped": skipped}


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"Teacher step on {result['model']} ({result['tensors']} tensors, "
             f"{result['bytes_per_step'] / 1e6:.1f} MB moved per step), {env['device_name']} "
             f"({env['device']}, {env['threads']} threads), torch {env['torch']}, {env['date']}, "
             f"commit {env.get('commit', '?')}. Copy bandwidth in the same run: {result['copy_GBps']:.1f} GB/s."
             f"{allocator_note(env)}",
             "", "| method | time per update | GB/s | eman_fused is faster by | num_batches_tracked (student: 2000) |",
             "|---|---:|---:|---:|---:|"]
    for name, row in result["methods"].items():
        lines.append(f"| {name} | {row['ms']:.3f} ms | {row['GB/s']:.1f} | {row['eman_fused_speedup']:.2f}x | "
                     f"{row['num_batches_tracked']} |")
    for name, why in result["skipped"].items():
        lines.append(f"| {name} | skipped: {why} | | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    result = run(args)
    write_result(result, markdown(result), args.json, args.markdown)
    return result


if __name__ == "__main__":
    main()
