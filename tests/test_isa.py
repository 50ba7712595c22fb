"""The baseline and AVX2 builds of the CPU kernels give the same bits (AVX2 without FMA: the
same IEEE operations), so results do not depend on the machine."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def probe(tmp_path, isa):
    out = tmp_path / f"{isa}.pt"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "EMAN_FUSED_CPU_ISA": isa}
    subprocess.run([sys.executable, str(HERE / "isa_probe.py"), str(out)], env=env, check=True,
                   timeout=300, capture_output=True)
    return torch.load(out)


def test_baseline_and_avx2_kernels_agree_bit_for_bit(tmp_path):
    native, base = probe(tmp_path, "native"), probe(tmp_path, "baseline")
    assert base["isa"] == "baseline x86-64"
    if native["isa"] != "avx2":
        pytest.skip("this CPU has no AVX2: only the baseline kernels exist here")
    for key in native:
        if key == "isa":
            continue
        for a, b in zip(native[key], base[key]):
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), key
