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
from eman_fused.bench.common import (COMPILE_MAX_TENSORS, compile_settings, copy_bandwidth, environment,
                                     load_average, prepare, write_result)

OPS = {"ema": "the fused EMA teacher update", "norm": "eman_norm (BN with running stats + add + ReLU)",
       "optim": "optimizer step + teacher update (SGD, AdamW, LARS simclr and you2017) vs torch's optimizer "
                "+ a separate EMA",
       "host": "host overhead per call on one-element tensors (ema_update_, FusedEMA, EMATeacher, the fused "
               "optimizers) vs foreach, timm, AveragedModel, torch.compile, torch's optimizers"}
# What `bench` runs without --ops: the EMA benchmark and, in its summary, the host overhead at
# bench.host.SUMMARY_SIZES (a short run; `--ops host` alone measures every size).
DEFAULT_OPS = "ema,host"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", "--models", dest="models", default="resnet50",
                    help="comma-separated: resnet50, vit_b16, many_small, a .json shape file, "
                         "or package.module:callable returning an nn.Module")
    ap.add_argument("--ops", help=f"comma-separated, of: {', '.join(OPS)} (default: {DEFAULT_OPS}, "
                    "the host table at 320 and 5,000 tensors only)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", "--dtype", dest="dtypes", default="fp32:fp32,fp32:bf16",
                    help="teacher:student pairs, e.g. fp32:fp32,fp32:bf16,bf16:bf16")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="leave out the torch.compile peers (timed by default: the foreach EMA, "
                         "eval BN + add + ReLU, torch's optimizer step + the EMA, each compiled "
                         "before it is timed, its compile time reported); the tables say they "
                         "were not run")
    ap.add_argument("--compile", dest="compile", action="store_true",
                    help="accepted for older scripts and does nothing: the torch.compile peers are "
                         "on by default")
    ap.add_argument("--compile-max-tensors", type=int, default=COMPILE_MAX_TENSORS, metavar="N",
                    help="cases with more tensors are not compiled, and the tables say so "
                         f"(default {COMPILE_MAX_TENSORS}; on a 2-thread CPU inductor took about a minute "
                         "for ResNet-50's 320 tensors, 4.6 min for 1,000 and had not finished 5,000 "
                         "after 20 min); 0 compiles every case")
    ap.add_argument("--repeats", type=int, default=1, metavar="R",
                    help="time every method R times, round-robin within each case, and report "
                         "the median (every round's time goes to the JSON); for a noisy machine")
    ap.add_argument("--note", help="a sentence for the results' markdown, under the machine load and "
                    "the spread of the rounds (e.g. what else ran on the machine)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--plot", type=Path, help="write a PNG: bars per method, log-scale time")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument("--batch", type=int, help="norm: batch size of the activations (default 32 on "
                    "CUDA, 4 on the CPU)")
    ap.add_argument("--host-sizes", metavar="N,N,...", help="host: tensor counts (default 320,1000,5000,20000 "
                    "with --ops host; 320,5000 in the default run without --ops)")
    ap.add_argument("--optim", help="optim: comma-separated optimizers of sgd, adamw, lars, lars_you2017, "
                    "adamw_tensor (default: sgd,adamw,lars,lars_you2017)")


def selected(args) -> tuple[list[str], list[int]]:
    """The ops to run and the host benchmark's tensor counts, defaults applied: without --ops,
    DEFAULT_OPS with the host table at its short SUMMARY_SIZES; --ops host alone: every size."""
    from eman_fused.bench import host as bench_host

    ops = (args.ops or DEFAULT_OPS).split(",")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise SystemExit(f"bench: unknown or not yet built op(s) {', '.join(unknown)}; available: "
                         f"{', '.join(OPS)}")
    if args.host_sizes:
        sizes = [int(n) for n in args.host_sizes.split(",")]
    else:
        sizes = list(bench_host.SUMMARY_SIZES if args.ops is None else bench_host.HOST_SIZES)
    return ops, sizes


def run(args) -> dict:
    ops, host_sizes = selected(args)
    device = torch.device(args.device)
    def say(*parts, sep=" "):
        if not args.quiet:
            print(*parts, sep=sep, file=sys.stderr, flush=True)

    say("backends:", *[str(b) for b in eman_fused.backends().values()], sep="\n  ")
    prepare(device)
    compiling = compile_settings(args.compile, args.compile_max_tensors)
    result = {"environment": environment(device), "copy_GBps": copy_bandwidth(device, 256 << 20),
              "cases": []}
    parts = []  # (markdown function, record) per op, rendered once every op has run

    def record(extra: dict) -> dict:
        """One op's record: environment, yardstick, compile settings, the load at its start."""
        return {"environment": result["environment"], "copy_GBps": result["copy_GBps"], **extra,
                "compile": compiling, "load": load_average(), "cases": []}

    if "ema" in ops:
        result.update(compile=compiling, load=load_average())
        models = [shapes.load_table(spec) for spec in args.models.split(",")]
        pairs = [pair.split(":") for pair in args.dtypes.split(",")]
        total = len(models) * len(pairs)
        for name, table in models:
            for t_dtype, s_dtype in pairs:
                say(f"[ema {len(result['cases']) + 1}/{total}] {name} teacher {t_dtype}, student {s_dtype} ...")
                result["cases"].append(bench_ema.run_case(name, table, t_dtype, s_dtype, device, args.compile,
                                                          args.compile_max_tensors, args.repeats))
        result["load_after"] = load_average()
        parts.append((bench_ema.markdown, result))
    if "norm" in ops:
        from eman_fused.bench import norm as bench_norm
        norm = result["norm"] = record({"batch": args.batch or (32 if device.type == "cuda" else 4)})
        combos = [(site, layout, dtype) for site in shapes.RESNET50_SITES
                  for layout in ("contiguous", "channels_last") for dtype in ("fp32", "bf16")]
        for i, (site, layout, dtype) in enumerate(combos):
            say(f"[norm {i + 1}/{len(combos)}] {site[0]} {layout} {dtype} ...")
            norm["cases"].append(bench_norm.run_case(site, norm["batch"], layout, dtype, device, args.compile,
                                                     args.repeats))
        norm["load_after"] = load_average()
        parts.append((bench_norm.markdown, norm))
    if "optim" in ops:
        from eman_fused.bench import optim as bench_optim
        models = [shapes.load_table(spec) for spec in args.models.split(",")]
        names = (args.optim or bench_optim.DEFAULT_OPTIMS).split(",")
        if unknown := [o for o in names if o not in bench_optim.CONFIGS]:
            raise SystemExit(f"bench: unknown optimizer(s) {', '.join(unknown)}; available: "
                             f"{', '.join(bench_optim.CONFIGS)}")
        optim = result["optim"] = record({})
        combos = [(name, table, o) for name, table in models for o in names]
        for i, (name, table, o) in enumerate(combos):
            say(f"[optim {i + 1}/{len(combos)}] {name} {o} ...")
            optim["cases"].append(bench_optim.run_case(name, table, o, device, use_compile=args.compile,
                                                       compile_max_tensors=args.compile_max_tensors,
                                                       rounds=args.repeats))
        optim["load_after"] = load_average()
        parts.append((bench_optim.markdown, optim))
    if "host" in ops:
        from eman_fused.bench import host as bench_host
        host = result["host"] = record({"sizes": host_sizes, "momentum": bench_host.M})
        for i, n in enumerate(host_sizes):
            say(f"[host {i + 1}/{len(host_sizes)}] {n} one-element tensors ...")
            host["cases"].append(bench_host.run_case(n, device, args.compile, args.compile_max_tensors,
                                                     args.repeats))
        host["load_after"] = load_average()
        parts.append((bench_host.markdown, host))
    for _, r in parts:
        if args.note:
            r["note"] = args.note
    texts = [markdown(r) for markdown, r in parts]
    write_result(result, "\n".join(texts), args.json, args.markdown)
    if args.plot and result["cases"]:
        bench_ema.plot(result, args.plot)
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eman_fused bench", description=bench_ema.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))
