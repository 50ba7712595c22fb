"""`python -m eman_fused bench`: runs the chosen ops' benchmarks in one process and writes one
result (JSON, markdown, plot). Each op's benchmark lives in its own module of this package."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import eman_fused
from eman_fused.bench import ema as bench_ema
from eman_fused.bench import shapes
from eman_fused.bench.common import copy_bandwidth, environment, prepare, write_result

OPS = {"ema": "the fused EMA teacher update", "norm": "eman_norm (BN with running stats + add + ReLU)",
       "optim": "optimizer step + teacher update (SGD, AdamW, LARS simclr and you2017) vs torch's optimizer + a separate EMA"}


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
    ap.add_argument("--optim", help="optim: comma-separated optimizers of sgd, adamw, lars, lars_you2017, "
                    "adamw_tensor (default: sgd,adamw,lars,lars_you2017)")


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
                result["cases"].append(bench_ema.run_case(name, table, t_dtype, s_dtype, device, args.compile))
        texts.append(bench_ema.markdown(result))
    if "norm" in ops:
        from eman_fused.bench import norm as bench_norm
        batch = args.batch or (32 if device.type == "cuda" else 4)
        norm = {"environment": result["environment"], "copy_GBps": result["copy_GBps"],
                "batch": batch, "cases": []}
        combos = [(site, layout, dtype) for site in shapes.RESNET50_SITES
                  for layout in ("contiguous", "channels_last") for dtype in ("fp32", "bf16")]
        for i, (site, layout, dtype) in enumerate(combos):
            say(f"[norm {i + 1}/{len(combos)}] {site[0]} {layout} {dtype} ...")
            norm["cases"].append(bench_norm.run_case(site, batch, layout, dtype, device, args.compile))
        result["norm"] = norm
        texts.append(bench_norm.markdown(norm))
    if "optim" in ops:
        from eman_fused.bench import optim as bench_optim
        optim = {"environment": result["environment"], "copy_GBps": result["copy_GBps"], "cases": []}
        models = [shapes.load_table(spec) for spec in args.models.split(",")]
        names = (args.optim or bench_optim.DEFAULT_OPTIMS).split(",")
        if unknown := [o for o in names if o not in bench_optim.CONFIGS]:
            raise SystemExit(f"bench: unknown optimizer(s) {', '.join(unknown)}; available: "
                             f"{', '.join(bench_optim.CONFIGS)}")
        combos = [(name, table, o) for name, table in models for o in names]
        for i, (name, table, o) in enumerate(combos):
            say(f"[optim {i + 1}/{len(combos)}] {name} {o} ...")
            optim["cases"].append(bench_optim.run_case(name, table, o, device))
        result["optim"] = optim
        texts.append(bench_optim.markdown(optim))
    write_result(result, "\n".join(texts), args.json, args.markdown)
    if args.plot and result["cases"]:
        bench_ema.plot(result, args.plot)
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eman_fused bench", description=bench_ema.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))
