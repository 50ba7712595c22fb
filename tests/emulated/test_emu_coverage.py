"""Every __global__ kernel of csrc/**/*.cu has emulated tests, and they executed it; the emulated
tests execute >= 90% of the .cu sources' lines (gcov on the emulated build)."""
import importlib
import os
import re
from pathlib import Path

import pytest

from . import build, coverage
from .conftest import DESELECTED

pytestmark = pytest.mark.emulated
HERE = Path(__file__).parent
MIN_LINE_COVERAGE = 90.0


def covered_by_tests() -> dict[str, str]:
    """kernel name -> the emulated test module that declares it in COVERS."""
    out = {}
    for f in sorted(HERE.glob("test_emu_*.py")):
        mod = importlib.import_module(f"{__package__}.{f.stem}")
        for k in getattr(mod, "COVERS", ()):
            out[k] = f.name
    return out


def test_every_kernel_in_the_sources_has_an_emulated_test():
    kernels = coverage.kernels_in_sources()
    # discovery misses none: one name per __global__ declaration outside comments
    declared = sum(re.sub(r"//[^\n]*", "", p.read_text()).count("__global__")
                   for p in build.kernel_sources())
    assert len(kernels) == declared >= 9, f"kernel discovery found {sorted(kernels)} of {declared}"
    missing = sorted(set(kernels) - set(covered_by_tests()))
    assert not missing, f"__global__ kernels without an emulated test: {missing}"
    stale = sorted(set(covered_by_tests()) - set(kernels))
    assert not stale, f"emulated tests name kernels the sources no longer have: {stale}"


def test_kernel_discovery_reads_declarations():
    src = "__global__ void __launch_bounds__(256)\n    foo_kernel(int* p) {}\n" \
          "template <typename T> __global__ void bar(T x);\n// __global__ void commented_out()\n"
    text = re.sub(r"//[^\n]*", "", src)
    assert coverage.GLOBAL_KERNEL.findall(text) == ["foo_kernel", "bar"]


@pytest.mark.emulated_coverage
def test_line_coverage_and_every_kernel_executed(request, emu_session):
    """Runs after the other tests (conftest orders it last) and reads what they executed."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        pytest.skip("pytest-xdist spreads the emulated tests over several processes: coverage is "
                    "checked on a run of tests/emulated in one process (as scripts/test.sh runs it)")
    files = {Path(str(i.fspath)).name for i in request.session.items}
    expected = {f.name for f in HERE.glob("test_emu_*.py")}
    if not expected <= files or request.config.stash.get(DESELECTED, 0):
        pytest.skip("only part of the emulated tests was selected: coverage is checked on a full run")
    cov = coverage.measure(emu_session)
    not_run = sorted(k for k in coverage.kernels_in_sources() if cov.kernel_calls(k) == 0)
    assert not not_run, f"kernels no emulated test executed: {not_run}"
    assert cov.percent >= MIN_LINE_COVERAGE, (
        f"emulated CUDA line coverage {cov.percent:.1f}% < {MIN_LINE_COVERAGE}%; "
        f"lines never executed: {cov.missed()}")
