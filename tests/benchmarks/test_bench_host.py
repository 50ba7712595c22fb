"""pytest-benchmark cases for the host overhead per call (eman_fused/bench/host.py): every
tensor holds one element, so what is timed is the host path. 320 tensors (ResNet-50's count)
so CI stays fast; `python -m eman_fused bench --ops host` runs 320 to 20,000 tensors and the
torch.compile peer (compiling 320 tensors takes about a minute on a 2-thread CPU, so it is left
out here).

  pytest tests/benchmarks/test_bench_host.py --benchmark-only
"""
import pytest
import torch

from eman_fused.bench import host

# group: one table of host-overhead cases; max_time: each case needs only a few hundred
# rounds of a sub-millisecond call, and 23 cases at the default 1 s would add half a minute to CI
pytestmark = pytest.mark.benchmark(group="host, 320 one-element tensors", max_time=0.25)
N = 320
# Every method of the host benchmark (its rows and their alternatives) but the compiled peer.
NAMES = list(dict.fromkeys(m for name, _, alts in host.ROWS for m in (name, *alts) if m != "foreach_compile"))


@pytest.fixture(scope="module")
def methods():
    built, skipped, errors, _ = host.build_methods(N, torch.device("cpu"), use_compile=False)
    return built, errors


@pytest.mark.parametrize("name", NAMES)
def test_host_overhead(benchmark, methods, name):
    built, errors = methods
    if name.startswith("timm") and "ModuleNotFoundError" in errors.get(name, ""):
        pytest.skip(f"timm is not installed ({errors[name]})")
    assert name in built and built[name] is not None, errors.get(name)
    benchmark(built[name])


def test_names_cover_every_method(methods):
    built, _ = methods
    assert set(built) == set(NAMES)
