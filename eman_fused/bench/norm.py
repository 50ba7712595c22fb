"""eman_norm benchmark: EMAN/frozen BatchNorm (+ residual add + ReLU) vs what users run today,
measured in one run, forward and backward, on ResNet-50's activation shapes.

  eman_fused      eman_norm(x, stats, w, b, residual, relu=True): one pass
  eager           F.batch_norm(training=False) -> + residual -> relu (three passes forward)
  eager_compile   torch.compile (dynamic=False) of `eager`: the measured peer, on by default
                  (--no-compile: left out, said so). Compiled before it is timed: forward
                  (inference graph), then forward with gradients and backward (AOT autograd's
                  training graphs); both compile times are reported
GB/s counts the bytes each op must move once: forward x (+ residual) read and y written;
backward dy and x read (and y for the ReLU mask), dx (+ d residual) written.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import eman_fused
from eman_fused.bench.common import (DTYPES, CompiledPeer, allocator_note, compile_note, compile_time_cell,
                                     error_text, measure_rounds, noise_lines, timing_row, versus_compiled)

# (name, channels, spatial at 224x224 input, residual add?) for ResNet-50's BN -> (add) -> ReLU sites.
def _eager(x, m, v, w, b, r):
    y = F.batch_norm(x, m, v, w, b, False, 0.0, 1e-5)
    return torch.relu(y + r if r is not None else y)


def run_case(site, batch, layout, dtype, device, use_compile=True, rounds=1):
    name, c, hw, has_res = site
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, hw, hw, generator=gen).to(device, DTYPES[dtype]).to(memory_format=fmt)
    r = torch.randn(x.shape, generator=gen).to(device, x.dtype).to(memory_format=fmt) if has_res else None
    m, v = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    w, b = torch.randn(c, device=device), torch.randn(c, device=device)
    dy = torch.randn(x.shape, generator=gen).to(device, x.dtype).to(memory_format=fmt)
    n = x.numel() * x.element_size()
    fwd_bytes = n * (3 if has_res else 2)
    bwd_bytes = n * (6 if has_res else 5)  # dy, x, y read; dx (+ dr) written
    rows, calls, info = {}, {}, {}

    def phases(fn):
        """(forward, backward, forward with gradients) calls of one method; the backward replays
        one graph."""
        xg = x.detach().requires_grad_()
        rg = r.detach().requires_grad_() if r is not None else None
        wg, bg = w.detach().requires_grad_(), b.detach().requires_grad_()
        inputs = [t for t in (xg, wg, bg, rg) if t is not None]
        graph = {}

        def backward():
            if "y" not in graph:
                graph["y"] = fn(xg, m, v, wg, bg, rg)
            return torch.autograd.grad(graph["y"], inputs, dy, retain_graph=True)
        return (lambda: fn(x, m, v, w, b, r)), backward, (lambda: fn(xg, m, v, wg, bg, rg))

    eager = {"eman_fused": lambda x, m, v, w, b, r: eman_fused.eman_norm(x, m, v, w, b, 1e-5, r, True),
             "eager": _eager}
    for method, fn in eager.items():
        calls[f"{method}:fwd"], calls[f"{method}:bwd"], _ = phases(fn)
    if use_compile:
        try:
            peer = CompiledPeer(_eager, device)
            fwd, bwd, fwd_train = phases(peer.fn)
            peer.warm("compile_fwd_s", fwd)
            peer.warm("compile_bwd_s", bwd)
            peer.no_recompile(fwd)
            peer.no_recompile(fwd_train)
            calls["eager_compile:fwd"], calls["eager_compile:bwd"] = fwd, bwd
            info = peer.info()
        except Exception as exc:  # a peer that cannot compile this case says why
            rows["eager_compile"] = {"error": error_text(exc)}
    runs, errors = measure_rounds(calls, device, rounds)
    for method in [k.split(":")[0] for k in calls if k.endswith(":fwd")]:
        if f"{method}:fwd" in runs and f"{method}:bwd" in runs:
            rows[method] = {**timing_row(runs[f"{method}:fwd"], fwd_bytes, "fwd_"),
                            **timing_row(runs[f"{method}:bwd"], bwd_bytes, "bwd_")}
        else:
            rows[method] = {"error": errors.get(f"{method}:fwd") or errors[f"{method}:bwd"]}
    if "fwd_ms" in rows.get("eager_compile", {}):
        rows["eager_compile"].update(info)
    base = rows["eman_fused"]
    for row in rows.values():
        if "fwd_ms" in row and "fwd_ms" in base:
            row["fwd_speedup"] = row["fwd_ms"] / base["fwd_ms"]
            row["bwd_speedup"] = row["bwd_ms"] / base["bwd_ms"]
    return {"case": f"{name} {layout} {dtype}", "shape": list(x.shape), "methods": rows}


def markdown(result) -> str:
    env = result["environment"]
    lines = [f"EMAN norm, {env['device_name']} ({env['device']}, {env['threads']} threads), torch "
             f"{env['torch']}, {env['date']}, commit {env.get('commit', '?')}; batch {result['batch']}. "
             f"Copy bandwidth in the same run: {result['copy_GBps']:.1f} GB/s.{allocator_note(env)}", "",
             "| case | eman_fused fwd | eman_fused bwd | compile fwd | compile bwd | compile time (fwd + bwd) "
             "| eager fwd | eager bwd |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    behind = []
    for case in result["cases"]:
        cells = []
        for m in ("eman_fused", "eager_compile", "eager"):
            row = case["methods"].get(m)
            if row is None or "error" in row:
                cells += ["not run" if row is None else "fails"] * 2
            elif m == "eman_fused":
                cells += [f"**{row['fwd_ms']:.3f} ms** ({row['fwd_GB/s']:.1f} GB/s)",
                          f"**{row['bwd_ms']:.3f} ms** ({row['bwd_GB/s']:.1f} GB/s)"]
            elif m == "eager_compile":
                cells += [f"{row[f'{p}_ms']:.3f} ms ({row[f'{p}_GB/s']:.1f} GB/s, "
                          f"{versus_compiled(row[f'{p}_speedup'])})" for p in ("fwd", "bwd")]
                behind += [f"{case['case']} {p}" for p in ("fwd", "bwd") if row[f"{p}_speedup"] < 1.0]
            else:
                cells += [f"{row['fwd_ms']:.3f} ms ({row['fwd_speedup']:.2f}x)",
                          f"{row['bwd_ms']:.3f} ms ({row['bwd_speedup']:.2f}x)"]
            if m == "eager_compile":
                cells.append(compile_time_cell(row, ("compile_fwd_s", "compile_bwd_s")))
        lines.append(f"| {case['case']} | " + " | ".join(cells) + " |")
    lines += ["", "(Nx) = that method's time / eman_fused's time, same run; below 1 eman_fused is behind. "
              "Backward includes grad x, weight, bias (and residual)."]
    lines += compile_note(result, "compile (torch.compile of eval BN + add + ReLU)")
    if any("fwd_ms" in c["methods"].get("eager_compile", {}) for c in result["cases"]):
        lines.append("- eman_fused behind torch.compile in: " + ", ".join(behind) if behind else
                     "- eman_fused ahead of torch.compile in every case, forward and backward")
    lines += [f"- eager_compile on {c['case']}: {c['methods']['eager_compile']['error']}"
              for c in result["cases"] if "error" in c["methods"].get("eager_compile", {})]
    lines += noise_lines(result)
    return "\n".join(lines) + "\n"
