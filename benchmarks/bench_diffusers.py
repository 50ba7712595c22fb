"""diffusers' EMAModel.step (foreach=False: a loop over tensors; foreach=True: foreach ops) against
eman_fused.integrations.diffusers.EMAModel.step (one fused call), on a 100-tensor model and on
ResNet-50's tensors (torchvision), float32, in the same run, alternating, median of repeats.

  PYTHONPATH=. python benchmarks/bench_diffusers.py [--markdown out.md] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess

import torch
import torchvision
from diffusers.training_utils import EMAModel as DiffusersEMA
from torch import nn

from eman_fused.bench.common import device_name, environment, measure, prepare
from eman_fused.integrations.diffusers import EMAModel


def hundred_tensors() -> nn.Module:
    # 50 linear layers: 100 tensors (weights and biases), 256x256 each, ~13 MB.
    return nn.Sequential(*[nn.Linear(256, 256) for _ in range(50)])


MODELS = {"mlp_100_tensors": hundred_tensors, "resnet50": lambda: torchvision.models.resnet50()}


def run(name: str, rounds: int) -> dict:
    torch.manual_seed(0)
    model = MODELS[name]()
    params = list(model.parameters())
    size = sum(p.nbytes for p in params)
    emas = {"diffusers": DiffusersEMA(params, decay=0.9999),
            "diffusers_foreach": DiffusersEMA(params, decay=0.9999, foreach=True),
            "eman_fused": EMAModel(params, decay=0.9999)}
    times = {m: [] for m in emas}
    for _ in range(rounds):  # alternating: a noisy neighbour hits every method alike
        for m, ema in emas.items():
            times[m].append(measure(lambda: ema.step(params), torch.device("cpu"), min_time=0.3, warmup=2))
    med = {m: statistics.median(v) for m, v in times.items()}
    # Bytes of one EMA update: read param and shadow, write shadow.
    return {"model": name, "tensors": len(params), "MB": size / 1e6,
            "ms": {m: t * 1e3 for m, t in med.items()},
            "GBps": {m: 3 * size / t / 1e9 for m, t in med.items()},
            "ratio": {m: med[m] / med["eman_fused"] for m in med}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    device = torch.device("cpu")
    prepare(device)
    env = environment(device)
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows = [run(m, args.rounds) for m in args.model.split(",")]
    load_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    import diffusers
    lines = [f"# diffusers EMAModel.step vs eman_fused.integrations.diffusers.EMAModel.step ({device_name(device)})",
             "", f"torch {env['torch']}, diffusers {diffusers.__version__}, {env['threads']} threads; {args.rounds} "
             "alternating rounds, median; float32 params and shadows, decay 0.9999. CPU numbers (no GPU).",
             f"Load before: `{load_before}`; after: `{load_after}`.",
             f"The machine: {os.cpu_count()} CPU cores shared with other jobs, so single timings are noisy "
             "(the ratios compare methods measured alternately in the same run).", "",
             "| model | tensors | MB | diffusers (foreach=False) | diffusers (foreach=True) | eman_fused |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        cell = {m: f"{r['ms'][m]:.3f} ms ({r['GBps'][m]:.1f} GB/s, {r['ratio'][m]:.2f}x)" for m in r["ms"]}
        lines.append(f"| {r['model']} | {r['tensors']} | {r['MB']:.0f} | {cell['diffusers']} | "
                     f"{cell['diffusers_foreach']} | **{r['ms']['eman_fused']:.3f} ms** "
                     f"({r['GBps']['eman_fused']:.1f} GB/s) |")
    lines += ["", "(Nx) = that method's time / eman_fused's time, same run. GB/s: 3 x the params' bytes "
              "(read param and shadow, write shadow) over the time."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
