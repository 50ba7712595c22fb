"""Fixtures of the emulated CUDA tests (`pytest -m emulated`): the emulator, built once per
session, a clean context and fresh buffers per test, the thread orders, and the coverage line
printed at the end of any session that loaded the emulator."""
from __future__ import annotations

import pytest
import torch

from . import build, coverage, harness

# How many emulated tests -k / -m deselected (the coverage check needs a full run).
DESELECTED = pytest.StashKey[int]()

# Thread order, then seeded random orders between barriers: uniform picks, and warp priorities.
ORDERS = ["sequential", ("random", 1), ("random", 2), ("warps", 1), ("warps", 2)]

# Buffers the EMA kernels copy byte for byte (num_batches_tracked and other integer state), and
# sizes that reach both the vector loop and its tail at every byte offset the tests shift by.
INTEGER_DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool]
INTEGER_SIZES = [1, 3, 4097, 70000]


def random_values(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """n seeded values of dtype: normal for floating types, within +-1000 (and the type's
    range) for integers, 0/1 for bool."""
    if dtype.is_floating_point:
        return torch.randn(n, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=gen).bool()
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), (n,), generator=gen).to(dtype)


@pytest.fixture(scope="session")
def emu_session() -> harness.Emulator:
    try:
        emu = harness.emulator()
    except build.EmulatorUnavailable as e:
        pytest.skip(f"emulated CUDA tests: {e}")
    coverage.start(emu)
    return emu


@pytest.fixture
def emu(emu_session):
    """The emulator with a fresh context (no sticky fault) in sequential order; buffers made
    during the test are unmapped after it."""
    emu_session.reset()
    emu_session.set_order("sequential")
    # The references and copies are small: one intra-op thread avoids OpenMP hand-offs that
    # cost more than the work on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield emu_session
    finally:
        torch.set_num_threads(threads)
        emu_session.free_all()
        emu_session.reset()


@pytest.fixture(params=ORDERS, ids=lambda o: o if o == "sequential" else f"{o[0]}{o[1]}")
def order(request, emu):
    emu.set_order(request.param)
    return request.param


def pytest_collection_modifyitems(config, items):
    # The coverage check reads what the other tests executed: it runs last.
    last = [i for i in items if i.get_closest_marker("emulated_coverage")]
    items[:] = [i for i in items if i not in last] + last


def pytest_deselected(items):
    n = sum(1 for i in items if i.get_closest_marker("emulated"))
    if n and items:
        cfg = items[0].config
        cfg.stash[DESELECTED] = cfg.stash.get(DESELECTED, 0) + n


def pytest_terminal_summary(terminalreporter):
    emu = harness.loaded()
    if emu is not None:  # exactly one line, in every session that ran emulated kernels
        terminalreporter.write_line(coverage.summary_line(emu))
