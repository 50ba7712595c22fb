"""python -m eman_fused info | check | bench  (each has --help)."""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
from pathlib import Path

import torch


def info(args) -> int:
    import eman_fused
    from eman_fused.bench.common import device_name

    try:
        from eman_fused import _build_info as build
    except ImportError:
        build = None
    versions = {"eman_fused": eman_fused.__version__, "python": platform.python_version(),
                "torch": torch.__version__, "torch CUDA": torch.version.cuda}
    try:
        versions["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        versions["triton"] = None
    devices = ["cpu: " + device_name(torch.device("cpu"))]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    report = {"versions": versions, "devices": devices,
              "build": {k: getattr(build, k) for k in dir(build) if k.isupper()} if build else None,
              "backends": {n: {"available": b.available, "detail": b.detail}
                           for n, b in eman_fused.backends().items()}}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    for k, v in versions.items():
        print(f"{k:<11} {v}")
    for d in devices:
        print(f"device      {d}")
    if build:
        print(f"build       CUDA kernels: {'yes, ' + build.CUDA_ARCH_LIST if build.CUDA_BUILT else 'no (' + build.CUDA_NOT_BUILT_REASON + ')'}")
        print(f"build       against torch {build.TORCH_VERSION} (CUDA {build.CUDA_VERSION}); "
              f"installed at {Path(eman_fused.__file__).parent}")
    print("backends:")
    for b in eman_fused.backends().values():
        print(" ", b)
    return 0


def main(argv=None) -> int:
    from eman_fused.bench import check, cli

    ap = argparse.ArgumentParser(prog="python -m eman_fused", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, devices, and which backends exist here (and why not)")
    p_info.add_argument("--json", action="store_true")
    p_check = sub.add_parser("check", help="every available backend against eman_fused.reference")
    check.add_arguments(p_check)
    p_bench = sub.add_parser("bench", help="eman_fused vs the alternatives, one run")
    cli.add_arguments(p_bench)
    args = ap.parse_args(argv)
    if args.command == "info":
        return info(args)
    if args.command == "check":
        return check.run(args)
    cli.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
