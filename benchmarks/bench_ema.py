"""EMA teacher update: eman_fused vs the alternatives, measured in one run.

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

  python benchmarks/bench_ema.py [--device cpu|cuda] [--models resnet50,vit_b16,many_small]
                                 [--json out.json] [--markdown out.md] [--compile]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eman_fused  # noqa: E402
from eman_fused import shapes  # noqa: E402

MOMENTUM = 0.999
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_model_tensors(table, teacher_dtype, student_dtype, device):
    teacher, student = [], []
    gen = torch.Generator().manual_seed(0)
    for _, shape, kind in table:
        if kind == "counter":
            teacher.append(torch.zeros(shape, dtype=torch.int64, device=device))
            student.append(torch.full(shape, 1000, dtype=torch.int64, device=device))
        else:
            teacher.append(torch.randn(shape, generator=gen).to(device, teacher_dtype))
            student.append(torch.randn(shape, generator=gen).to(device, student_dtype))
    return teacher, student


def timer(device):
    if device.type == "cuda":
        def run(fn, repeats):
            start = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
            end = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
            for i in range(repeats):
                start[i].record()
                fn()
                end[i].record()
            torch.cuda.synchronize()
            return [s.elapsed_time(e) / 1e3 for s, e in zip(start, end)]
    else:
        def run(fn, repeats):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return times
    return run


def measure(fn, device, min_time=0.5, warmup=3):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    run = timer(device)
    first = run(fn, 3)
    repeats = max(5, min(200, math.ceil(min_time / max(statistics.median(first), 1e-6))))
    return statistics.median(run(fn, repeats))


def alternatives(teacher, student, device, use_compile):
    floats = [i for i, t in enumerate(teacher) if t.is_floating_point()]
    ints = [i for i, t in enumerate(teacher) if not t.is_floating_point()]
    tf, sf = [teacher[i] for i in floats], [student[i] for i in floats]
    ti, si = [teacher[i] for i in ints], [student[i] for i in ints]
    m = MOMENTUM

    def official_eman():
        for t, s in zip(teacher, student):
            if t.is_floating_point():
                t.copy_(t * m + (1.0 - m) * s)
            else:
                t.copy_(s)

    def foreach_lerp():
        torch._foreach_lerp_(tf, sf, 1.0 - m)
        if ti:
            torch._foreach_copy_(ti, si)

    fused = eman_fused.FusedEMA(teacher, student)
    flat_t = torch.randn(sum(t.numel() for t in tf), device=device).to(tf[0].dtype)
    flat_s = torch.randn(flat_t.numel(), device=device).to(sf[0].dtype)
    methods = {
        "official_eman": official_eman,
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


def copy_bandwidth(device, nbytes):
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / measure(lambda: dst.copy_(src), device) / 1e9


def run_case(name, table, t_dtype, s_dtype, device, use_compile):
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


def environment(device):
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "python": platform.python_version(), "device": str(device),
           "threads": torch.get_num_threads()}
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        pass
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        model = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
        env["device_name"] = model[0] if model else platform.processor()
    return env


def markdown(result):
    env = result["environment"]
    lines = [f"EMA update, {env['device_name']} ({env['device']}, {env['threads']} threads), "
             f"torch {env['torch']}, {env['date']}, commit {env.get('commit', '?')}. "
             f"Copy bandwidth measured in the same run: {result['copy_GBps']:.1f} GB/s.", ""]
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="resnet50,vit_b16,many_small")
    ap.add_argument("--dtypes", default="fp32:fp32,fp32:bf16",
                    help="teacher:student pairs, e.g. fp32:fp32,fp32:bf16,bf16:bf16")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(foreach_lerp)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    print("backends:", *[str(b) for b in eman_fused.backends().values()], sep="\n  ")
    result = {"environment": environment(device), "copy_GBps": copy_bandwidth(device, 256 << 20),
              "cases": []}
    for model in args.models.split(","):
        for pair in args.dtypes.split(","):
            t_dtype, s_dtype = pair.split(":")
            case = run_case(model, shapes.TABLES[model](), t_dtype, s_dtype, device, args.compile)
            result["cases"].append(case)
            print(f"{case['case']}: " + ", ".join(
                f"{m} {r['ms']:.3f} ms" if "ms" in r else f"{m} {'skipped' if 'skipped' in r else 'fails'}"
                for m, r in case["methods"].items()), flush=True)
    text = markdown(result)
    print("\n" + text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return result


if __name__ == "__main__":
    main()
