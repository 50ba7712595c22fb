"""Sweep the Triton EMA kernel's BLOCK and num_warps on a GPU, against the CUDA backend, on
ResNet-50 and ViT-B/16 shapes (fp32 teacher and student). Prints a table and writes JSON.
The chosen values go into eman_fused/triton/ema.py (BLOCK, NUM_WARPS) with this table.

  python benchmarks/tune_triton_ema.py [--json out.json]   (eman_fused importable: installed or PYTHONPATH=.)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import eman_fused
from eman_fused.bench import shapes
from eman_fused.bench.common import measure
from eman_fused.bench.shapes import make_model_tensors


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not eman_fused.backends()["triton"].available:
        print("skipped: tuning needs a GPU and the triton backend:", eman_fused.backends()["triton"].detail)
        return None
    from eman_fused.triton import ema as triton_ema
    device = torch.device("cuda")
    rows = []
    for model in ("resnet50", "vit_b16"):
        teacher, student = make_model_tensors(shapes.TABLES[model](), torch.float32, torch.float32, device)
        nbytes = eman_fused.FusedEMA(teacher, student).bytes_per_step
        cuda_ms = None
        if eman_fused.backends()["cuda"].available:
            cuda_ms = measure(lambda: eman_fused.ema_update_(teacher, student, 0.999, backend="cuda"), device) * 1e3
        for block in (1024, 2048, 4096, 8192):
            for warps in (2, 4, 8, 16):
                triton_ema.BLOCK, triton_ema.NUM_WARPS = block, warps
                ms = measure(lambda: eman_fused.ema_update_(teacher, student, 0.999, backend="triton"), device) * 1e3
                rows.append({"model": model, "BLOCK": block, "num_warps": warps, "ms": ms,
                             "GB/s": nbytes / ms / 1e6, "cuda_ms": cuda_ms,
                             "vs_cuda": None if cuda_ms is None else ms / cuda_ms})
                print(f"{model:9s} BLOCK={block:5d} warps={warps:2d}: {ms:.4f} ms {nbytes / ms / 1e6:8.1f} GB/s"
                      + ("" if cuda_ms is None else f"  ({ms / cuda_ms:.3f}x the CUDA backend's {cuda_ms:.4f} ms)"),
                      flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
