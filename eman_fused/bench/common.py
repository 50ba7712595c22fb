"""What every benchmark shares: dtype names, timing, the copy-bandwidth yardstick, the CPU
allocator setting and the environment record written beside each result."""
from __future__ import annotations

import ctypes
import datetime
import json
import math
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def copy_bandwidth(device, nbytes):
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / measure(lambda: dst.copy_(src), device) / 1e9


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
    env["device_name"] = device_name(device)
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    else:
        env["cpu_allocator"] = _CPU_ALLOCATOR
    return env


def device_name(device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    model = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return model[0] if model else platform.processor()


def header(title: str, result: dict) -> str:
    """The first line of a results table: what, where, which versions, and the yardstick."""
    env = result["environment"]
    return (f"{title}, {env['device_name']} ({env['device']}, {env['threads']} threads), "
            f"torch {env['torch']}, {env['date']}, commit {env.get('commit', '?')}. "
            f"Copy bandwidth measured in the same run: {result['copy_GBps']:.1f} GB/s."
            f"{allocator_note(env)}")


def write_result(result: dict, text: str, json_path: Path | None, markdown_path: Path | None) -> None:
    """Print a benchmark's markdown and write the files asked for (JSON, markdown)."""
    print(text)
    for path, content in ((json_path, lambda: json.dumps(result, indent=1)), (markdown_path, lambda: text)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content())
