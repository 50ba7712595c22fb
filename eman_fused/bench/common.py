"""What every benchmark shares: dtype names, timing, the copy-bandwidth yardstick, the CPU
allocator setting and the environment record written beside each result."""
from __future__ import annotations

import ctypes
import datetime
import json
import math
import os
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


CALLS_PER_SYNC = 8


def wall_timer(device):
    """Wall-clock seconds per call. On a CPU that is `timer`'s. On CUDA each sample is
    CALLS_PER_SYNC calls back to back, then a synchronize, over CALLS_PER_SYNC: what a loop of
    such calls costs per call, max(the host path, the device's work) plus a share of one
    synchronize. CUDA events would give neither: on an idle GPU they span the host's work
    between the two records too, on a busy one only the device's."""
    if device.type != "cuda":
        return timer(device)

    def run(fn, repeats):
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(CALLS_PER_SYNC):
                fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / CALLS_PER_SYNC)
        return times
    return run


def measure(fn, device, min_time=0.5, warmup=3, wall_clock=False):
    """The median seconds per call of `fn` after `warmup` calls, over enough calls to fill about
    `min_time` (at least 5, at most 200 samples): CUDA events per call on a GPU (`timer`), or
    wall-clock time per call with `wall_clock` (`wall_timer`)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    run = (wall_timer if wall_clock else timer)(device)
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
    # EMAN_FUSED_COMMIT names the tree's commit where the checkout's git does not know it: a
    # copy of a working tree sent to a GPU machine kept an older HEAD there.
    if os.environ.get("EMAN_FUSED_COMMIT"):
        env["commit"] = os.environ["EMAN_FUSED_COMMIT"]
    else:
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


# ---- torch.compile peers ------------------------------------------------------------------------

# Cases with more tensors than this are not compiled by default (the tables say so, and why).
# Inductor's compile time of the foreach update grows faster than the tensor count; cold, on a
# 2-thread CPU (2026-12-02, torch 2.14.1): ViT-B/16's 152 tensors 51 s, ResNet-50's 320 64 s,
# 1,000 small tensors 279 s, and 5,000 (many_small) had not finished after 20 minutes.
COMPILE_MAX_TENSORS = 1000


def compile_skip_reason(n_tensors: int, max_tensors: int) -> str | None:
    """Why a case with `n_tensors` tensors is not compiled under --compile-max-tensors, or None."""
    if max_tensors and n_tensors > max_tensors:
        return (f"not compiled: {n_tensors} tensors > --compile-max-tensors {max_tensors} "
                "(inductor's compile time grows faster than the tensor count: on a 2-thread CPU "
                "1,000 tensors took 4.6 min and 5,000 had not finished after 20 min; "
                "--compile-max-tensors 0 compiles every case)")
    return None


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class CompiledPeer:
    """One torch.compile peer, compiled before it is timed.

    Each peer starts from torch._dynamo.reset(): the benchmarks compile the same Python function
    for model after model, and dynamo, seeing new sizes for a code object it has compiled,
    would recompile it with dynamic sizes (slower kernels than a model's own static ones), and
    after its recompile limit fall back to eager without failing. dynamic=False keeps every
    size static, as a training loop with fixed shapes gets. `warm` times the calls that compile
    (tracing, inductor, the C++/Triton build, and the calls' own run time: seconds against
    milliseconds); `no_recompile` then runs the peer with recompiles turned into errors, after
    `vary` (a new momentum or learning rate written into its 0-dim tensor), so a peer that would
    recompile as the momentum moves fails instead of being timed. With fullgraph=True (the EMA
    and norm peers) a value read on the host would be a graph break, which fails as well."""

    def __init__(self, fn, device, fullgraph=True):
        import torch._dynamo
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
        self._counters = counters
        self.device = device
        self.fn = torch.compile(fn, fullgraph=fullgraph, dynamic=False)
        self.seconds = {}

    def warm(self, key: str, call, calls: int = 2) -> None:
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        _sync(self.device)
        self.seconds[key] = time.perf_counter() - t0

    def no_recompile(self, call, vary=None) -> None:
        import torch._dynamo

        if vary is not None:
            vary()
        with torch._dynamo.config.patch(error_on_recompile=True):
            call()
            call()
        _sync(self.device)

    def info(self) -> dict:
        """What compiling cost and made: seconds per warm-up, graphs, graph breaks, and whether
        inductor's on-disk cache of compiled graphs answered (a hit skips most of the work, so
        a rerun on the same machine compiles faster than the first run)."""
        c = self._counters
        return {**{k: round(v, 3) for k, v in self.seconds.items()},
                "graphs": int(c["stats"]["unique_graphs"]),
                "graph_breaks": int(sum(c["graph_break"].values())),
                "fx_graph_cache_hits": int(c["inductor"]["fxgraph_cache_hit"]),
                "fx_graph_cache_misses": int(c["inductor"]["fxgraph_cache_miss"])}


def compile_settings(enabled: bool, max_tensors: int) -> dict:
    """The result's record of how the compiled peers were run (or that they were not)."""
    if not enabled:
        return {"enabled": False, "why": "--no-compile"}
    import torch._inductor.config

    return {"enabled": True, "dynamic": False, "max_tensors": max_tensors,
            "inductor_fx_graph_cache": bool(torch._inductor.config.fx_graph_cache)}


def compile_time_cell(row: dict | None, keys=("compile_s",)) -> str:
    """A compile-time cell: seconds, '(cache hit)' when inductor's cache answered every graph."""
    if not row or not all(k in row for k in keys):
        return "—"
    text = " + ".join(f"{row[k]:.1f} s" for k in keys)
    if row.get("fx_graph_cache_hits") and not row.get("fx_graph_cache_misses"):
        text += " (cache hit)"
    return text


def versus_compiled(ratio: float) -> str:
    """How eman_fused compares with the compiled peer, from the peer's time / eman_fused's."""
    return f"{ratio:.2f}x" if ratio >= 1.0 else f"{ratio:.2f}x, **behind compiled**"


def compile_note(result: dict, peer: str) -> list[str]:
    """The lines under a table that say how the compiled peer ran, or that it did not."""
    settings = result.get("compile")
    if settings is None:
        return [f"- {peer}: not measured in this run"]
    if not settings["enabled"]:
        return [f"- {peer}: not run ({settings['why']})"]
    cache = ("inductor's graph cache on: '(cache hit)' marks a compile answered from an earlier "
             "run's cache" if settings.get("inductor_fx_graph_cache") else "inductor's graph cache off")
    return [f"- {peer}: torch.compile(dynamic=False), timed after the warm-up calls that compile "
            f"(compile time: those calls' wall time); {cache}"]


def error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def measure_rounds(methods: dict, device, rounds: int = 1, wall_clock: bool = False) -> tuple[dict, dict]:
    """Times every method (a callable, or None for one that failed before) `rounds` times,
    round-robin: each round times each method once (`measure`) before the next round starts,
    so a burst of load from other work on the machine lands on every method alike instead of
    on whichever ran during it. Returns ({name: [seconds per round]}, {name: error}); a method
    that raises is recorded with its error and left out of later rounds."""
    runs = {name: [] for name, fn in methods.items() if fn is not None}
    errors = {}
    for _ in range(max(1, rounds)):
        for name in list(runs):
            try:
                runs[name].append(measure(methods[name], device, wall_clock=wall_clock))
            except Exception as exc:  # an alternative that cannot run this case says why
                errors[name] = error_text(exc)
                del runs[name]
    return runs, errors


def timing_row(runs: list[float], nbytes: int, prefix: str = "") -> dict:
    """ms and GB/s of the median round; every round's ms too when there were several."""
    seconds = statistics.median(runs)
    row = {f"{prefix}ms": seconds * 1e3, f"{prefix}GB/s": nbytes / seconds / 1e9}
    if len(runs) > 1:
        row[f"{prefix}runs_ms"] = [round(s * 1e3, 4) for s in runs]
    return row


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def noise_lines(result: dict) -> list[str]:
    """What the reader needs to judge a result's noise: the machine's load while it ran, how
    many rounds each time is the median of and how far one method's rounds spread, and the
    note given with --note."""
    lines = []
    if result.get("load"):
        after = f"; at the end: {', '.join(map(str, result['load_after']))}" if result.get("load_after") else ""
        lines.append(f"Machine load average (1, 5, 15 min) at the start: {', '.join(map(str, result['load']))}"
                     f"{after} ({result['environment']['threads']} threads used).")
    runs = [row[k] for c in result.get("cases", []) for row in c.get("methods", {}).values()
            for k in row if k.endswith("runs_ms") and min(row[k]) > 0]
    if runs:
        spread = sorted(max(r) / min(r) for r in runs)
        lines.append(f"Each time is the median of {len(runs[0])} round-robin rounds (every method timed once "
                     f"per round, in turn); one method's rounds spread by {spread[len(spread) // 2]:.2f}x "
                     f"(median over methods and cases), at most {spread[-1]:.2f}x (max / min).")
    if result.get("note"):
        lines.append(result["note"])
    return ["", " ".join(lines)] if lines else []
