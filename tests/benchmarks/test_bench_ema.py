"""pytest-benchmark cases for the EMA update: eman_fused and the alternatives, on a small
ResNet-like list (CPU-sized so CI stays fast; `python -m eman_fused bench` for real sizes).

  pytest tests/benchmarks --benchmark-only    (--benchmark-skip leaves them out)
"""
import pytest
import torch

import eman_fused
from eman_fused.bench.shapes import make_model_tensors, resnet50
from eman_fused.reference import official_eman_update_

pytestmark = pytest.mark.benchmark
# ResNet-50's tensor list at 1/64 of the channels: 320 tensors, the same structure.
TABLE = [(n, tuple(max(1, d // 8) if i < 2 else d for i, d in enumerate(s)), k) for n, s, k in resnet50()]
M = 0.999


@pytest.fixture(scope="module")
def lists():
    return make_model_tensors(TABLE, torch.float32, torch.float32, torch.device("cpu"))


def test_eman_fused(benchmark, lists):
    ema = eman_fused.FusedEMA(*lists)
    benchmark(ema.step, M)


def test_foreach_lerp(benchmark, lists):
    teacher, student = lists
    tf = [t for t in teacher if t.is_floating_point()]
    sf = [s for t, s in zip(teacher, student) if t.is_floating_point()]
    ti = [t for t in teacher if not t.is_floating_point()]
    si = [s for t, s in zip(teacher, student) if not t.is_floating_point()]

    def step():
        torch._foreach_lerp_(tf, sf, 1 - M)
        torch._foreach_copy_(ti, si)
    benchmark(step)


def test_foreach_compile(benchmark, lists):
    """The compiled peer of `python -m eman_fused bench` (compiled before it is timed), on the
    first 16 tensors only: compiling all 320 takes about a minute on a 2-thread CPU."""
    from eman_fused.bench.ema import compiled_peer
    teacher, student = lists
    _, call = compiled_peer(teacher[:16], student[:16], torch.device("cpu"))
    benchmark(call)


def test_official_eman_loop(benchmark, lists):
    teacher, student = lists

    benchmark(official_eman_update_, teacher, student, M)
