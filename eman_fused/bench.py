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

import argparse
import ctypes
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

import eman_fused
from eman_fused import shapes

OPS = {"ema": "the fused EMA teacher update", "norm": "eman_norm (BN with running stats + add + ReLU)",
       "optim": "optimizer step + teacher update (SGD, AdamW, LARS) vs torch's optimizer + a separate EMA"}

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


_CPU_ALLOCATOR = "glibc malloc defaults"


def prepare(device) -> None:
    """Before a CPU benchmark: ask glibc's malloc to keep freed memory (no trimming, no mmap for
    large blocks) so the timings are of the kernels, not of page faults on output buffers that
    the allocator handed back to the OS after the previous call. Without it the same eager BN
    forward on ResNet-50 layer1 activations measured 1.7 or 8.5 ms within one process, depending
    on where glibc's adaptive thresholds had drifted. Every method runs under the same setting,
    and the results record it (environment "cpu_allocator")."""
    global _CPU_ALLOCATOR
    if device.type != "cpu":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers
        ok = libc.mallopt(m_trim_threshold, 2**31 - 1) == 1 and libc.mallopt(m_mmap_max, 0) == 1
    except (OSError, AttributeError):
        ok = False
    _CPU_ALLOCATOR = ("glibc malloc keeps freed memory (mallopt: no trim, no mmap)" if ok
                      else "glibc malloc defaults (mallopt not available here)")


def allocator_note(env: dict) -> str:
    """The sentence for a results header (empty for GPU results and older files)."""
    return f" CPU allocator: {env['cpu_allocator']}." if "cpu_allocator" in env else ""


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
        env["cpu_allocator"] = _CPU_ALLOCATOR
    return env


def markdown(result):
    env = result["environment"]
    lines = [f"EMA update, {env['device_name']} ({env['device']}, {env['threads']} threads), "
             f"torch {env['torch']}, {env['date']}, commit {env.get('commit', '?')}. "
             f"Copy bandwidth measured in the same run: {result['copy_GBps']:.1f} GB/s."
             f"{allocator_note(env)}", ""]
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


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", "--models", dest="models", default="resnet50",
                    help="comma-separated: resnet50, vit_b16, many_small, a .json shape file, "
                         "or package.module:callable returning an nn.Module")
    ap.add_argument("--ops", default="ema", help=f"comma-separated, of: {', '.join(OPS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", "--dtype", dest="dtypes", default="fp32:fp32,fp32:bf16",
                    help="teacher:student pairs, e.g. fp32:fp32,fp32:bf16,bf16:bf16")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile(foreach_lerp) (minutes of compiling on a CPU)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--plot", type=Path, help="write a PNG: bars per method, log-scale time")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument("--batch", type=int, help="norm: batch size of the activations (default 32 on "
                    "CUDA, 4 on the CPU)")


def run(args) -> dict:
    unknown = [op for op in args.ops.split(",") if op not in OPS]
    if unknown:
        raise SystemExit(f"bench: unknown or not yet built op(s) {', '.join(unknown)}; available: "
                         f"{', '.join(OPS)}")
    device = torch.device(args.device)
    def say(*parts, sep=" "):
        if not args.quiet:
            print(*parts, sep=sep, file=sys.stderr, flush=True)

    say("backends:", *[str(b) for b in eman_fused.backends().values()], sep="\n  ")
    ops = args.ops.split(",")
    prepare(device)
    result = {"environment": environment(device), "copy_GBps": copy_bandwidth(device, 256 << 20),
              "cases": []}
    texts = []
    if "ema" in ops:
        models = [shapes.load_table(spec) for spec in args.models.split(",")]
        pairs = [pair.split(":") for pair in args.dtypes.split(",")]
        total = len(models) * len(pairs)
        for name, table in models:
            for t_dtype, s_dtype in pairs:
                say(f"[ema {len(result['cases']) + 1}/{total}] {name} teacher {t_dtype}, student {s_dtype} ...")
                result["cases"].append(run_case(name, table, t_dtype, s_dtype, device, args.compile))
        texts.append(markdown(result))
    if "norm" in ops:
        from . import bench_norm
        batch = args.batch or (32 if device.type == "cuda" else 4)
        norm = {"environment": result["environment"], "copy_GBps": result["copy_GBps"],
                "batch": batch, "cases": []}
        combos = [(site, layout, dtype) for site in bench_norm.RESNET50_SITES
                  for layout in ("contiguous", "channels_last") for dtype in ("fp32", "bf16")]
        for i, (site, layout, dtype) in enumerate(combos):
            say(f"[norm {i + 1}/{len(combos)}] {site[0]} {layout} {dtype} ...")
            norm["cases"].append(bench_norm.run_case(site, batch, layout, dtype, device, args.compile))
        result["norm"] = norm
        texts.append(bench_norm.markdown(norm))
    if "optim" in ops:
        from . import bench_optim
        optim = {"environment": result["environment"], "copy_GBps": result["copy_GBps"], "cases": []}
        models = [shapes.load_table(spec) for spec in args.models.split(",")]
        combos = [(name, table, o) for name, table in models for o in bench_optim.CONFIGS]
        for i, (name, table, o) in enumerate(combos):
            say(f"[optim {i + 1}/{len(combos)}] {name} {o} ...")
            optim["cases"].append(bench_optim.run_case(name, table, o, device))
        result["optim"] = optim
        texts.append(bench_optim.markdown(optim))
    text = "\n".join(texts)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    if args.plot and result["cases"]:
        plot(result, args.plot)
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eman_fused bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))
