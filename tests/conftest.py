"""Shared test matrix: backends, dtypes, tolerances, GPU marks."""
import os
import resource

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on the CPU; this must be set
# before triton compiles (decorates) any kernel, i.e. before eman_fused is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import eman_fused  # noqa: E402

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
FLOAT_PAIRS = [(t, s) for t in FLOAT_DTYPES for s in FLOAT_DTYPES]
INT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]

TOLERANCES = eman_fused.reference.TOLERANCES  # shared with `python -m eman_fused check`

HAS_GPU = torch.cuda.is_available()
AVAILABLE = {name for name, b in eman_fused.backends().items() if b.available}
# (backend, device) pairs that run here: every kernel meets the same tests.
BACKEND_CASES = [("cpu", "cpu")]
if "triton" in AVAILABLE:
    BACKEND_CASES.append(("triton", "cuda" if HAS_GPU else "cpu"))
if "cuda" in AVAILABLE:
    BACKEND_CASES.append(("cuda", "cuda"))
BACKENDS = pytest.mark.parametrize("backend,device", BACKEND_CASES, ids=[b for b, _ in BACKEND_CASES])


def _gpu_only(skip):
    """The `gpu` marker (so `-m gpu` / `-m "not gpu"` select) plus the skip naming why."""
    return lambda obj: pytest.mark.gpu(skip(obj))


needs_gpu = _gpu_only(pytest.mark.skipif(not HAS_GPU, reason="no GPU visible"))
needs_cuda_backend = _gpu_only(pytest.mark.skipif(
    not eman_fused.backends()["cuda"].available, reason=eman_fused.backends()["cuda"].detail))


def _mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) / 2**20


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


LARGE_REPORT = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A large test may grow the process by at most its declared memory_gib: the peak RSS is
    measured (exact when it is the process's first large test, as in .ci/run's `-m large`)."""
    mark = item.get_closest_marker("large")
    if mark is None or not os.path.exists("/proc/self/statm"):
        return (yield)
    start, peak_before = _rss_gib(), _peak_rss_gib()
    result = yield
    peak = _peak_rss_gib()
    grew = peak - start if peak > peak_before else None  # None: this test set no new peak
    need = mark.kwargs["memory_gib"]
    LARGE_REPORT.append(f"{item.nodeid}: peak RSS {peak:.1f} GiB, started at {start:.1f} GiB, "
                        f"declared {need} GiB")
    if grew is not None and grew > need:
        raise AssertionError(f"grew the process by {grew:.1f} GiB, more than its declared memory_gib={need}")
    return result


def pytest_terminal_summary(terminalreporter):
    for line in LARGE_REPORT:
        terminalreporter.write_line(f"large: {line}")


def pytest_runtest_setup(item):
    """A `large(memory_gib=N)` test runs only with N GiB (+ 2 GiB headroom) free: else it is
    skipped with the numbers, or fails when EMAN_FUSED_REQUIRE_LARGE=1 (CI, which runs them on
    purpose and must not report a silent skip as a pass). Deselected by default (pyproject)."""
    mark = item.get_closest_marker("large")
    if mark is None:
        return
    need = mark.kwargs.get("memory_gib")
    if need is None:
        pytest.fail("a large test must declare memory_gib=", pytrace=False)
    free = _mem_available_gib() if os.path.exists("/proc/meminfo") else float("inf")
    if free < need + 2:
        message = f"needs {need} GiB + 2 GiB headroom, {free:.1f} GiB available"
        if os.environ.get("EMAN_FUSED_REQUIRE_LARGE") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, equal_nan=True, **TOLERANCES[actual.dtype])


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, for bit-identity checks (NaN == NaN, -0 != +0)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8).clone()


def assert_same_bits_or_both_nan(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-identical except NaN payloads: torch's own casts disagree on those (its vectorized
    CPU path keeps them, its scalar one makes every NaN 0x7FC0), so only NaN-ness is compared."""
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    assert torch.equal(bits(actual[~nan]), bits(expected[~nan]))
