"""eman_norm benchmark: EMAN/frozen BatchNorm (+ residual add + ReLU) vs what users run today,
measured in one run, forward and backward, on ResNet-50's activation shapes.

  eman_fused      eman_norm(x, stats, w, b, residual, relu=True): one pass
  eager           F.batch_norm(training=False) -> + residual -> relu (three passes forward)
  eager_compile   torch.compile of `eager` (with --compile)
GB/s counts the bytes each op must move once: forward x (+ residual) read and y written;
backward dy and x read (and y for the ReLU mask), dx (+ d residual) written.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import eman_fused
from eman_fused.bench.common import DTYPES, allocator_note, measure

# (name, channels, spatial at 224x224 input, residual add?) for ResNet-50's BN -> (add) -> ReLU sites.
def _eager(x, m, v, w, b, r):
    y = F.batch_norm(x, m, v, w, b, False, 0.0, 1e-5)
    return torch.relu(y + r if r is not None else y)


def run_case(site, batch, layout, dtype, device, use_compile):
    name, c, hw, has_res = site
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, hw, hw, generator=gen).to(device, DTYPES[dtype]).to(memory_format=fmt)
    r = torch.randn(x.shape, generator=gen).to(device, x.dtype).to(memory_format=fmt) if has_res else None
    m, v = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    w, b = torch.randn(c, device=device), torch.randn(c, device=device)
    dy = torch.randn(x.shape, generator=gen).to(device, x.dtype).to(memory_format=fmt)
    methods = {"eman_fused": lambda x, m, v, w, b, r: eman_fused.eman_norm(x, m, v, w, b, 1e-5, r, True),
               "eager": _eager}
    if use_compile:
        methods["eager_compile"] = torch.compile(_eager)
    n = x.numel() * x.element_size()
    fwd_bytes = n * (3 if has_res else 2)
    bwd_bytes = n * (6 if has_res else 5)  # dy, x, y read; dx (+ dr) written
    rows = {}
    for method, fn in methods.items():
        try:
            fwd = measure(lambda: fn(x, m, v, w, b, r), device)
            xg = x.detach().requires_grad_()
            rg = r.detach().requires_grad_() if r is not None else None
            wg, bg = w.detach().requires_grad_(), b.detach().requires_grad_()
            y = fn(xg, m, v, wg, bg, rg)
            inputs = [t for t in (xg, wg, bg, rg) if t is not None]
            bwd = measure(lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True), device)
            rows[method] = {"fwd_ms": fwd * 1e3, "fwd_GB/s": fwd_bytes / fwd / 1e9,
                            "bwd_ms": bwd * 1e3, "bwd_GB/s": bwd_bytes / bwd / 1e9}
        except Exception as exc:  # an alternative that cannot run says why
            rows[method] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
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
             "| case | eman_fused fwd | eman_fused bwd | eager fwd | eager bwd | compile fwd | compile bwd |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for case in result["cases"]:
        cells = []
        for m in ("eman_fused", "eager", "eager_compile"):
            row = case["methods"].get(m)
            if row is None or "error" in row:
                cells += ["not run" if row is None else "fails"] * 2
            elif m == "eman_fused":
                cells += [f"**{row['fwd_ms']:.3f} ms** ({row['fwd_GB/s']:.1f} GB/s)",
                          f"**{row['bwd_ms']:.3f} ms** ({row['bwd_GB/s']:.1f} GB/s)"]
            else:
                cells += [f"{row['fwd_ms']:.3f} ms ({row['fwd_speedup']:.2f}x)",
                          f"{row['bwd_ms']:.3f} ms ({row['bwd_speedup']:.2f}x)"]
        lines.append(f"| {case['case']} | " + " | ".join(cells) + " |")
    lines += ["", "(Nx) = that method's time / eman_fused's time, same run. Backward includes "
              "grad x, weight, bias (and residual)."]
    return "\n".join(lines) + "\n"
