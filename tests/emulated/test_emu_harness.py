"""The emulator catches the bug classes it is there for (kernels with planted bugs in
selftest.cu): a missing barrier, shared memory read before anything wrote it, a warp shuffle
over lanes that do not exist, out-of-bounds accesses (guard pages and guard bytes), misaligned
vector loads, a barrier some threads skip, and the driver's launch-configuration errors."""
import pytest
import torch

from .harness import EmulatedCudaError

pytestmark = pytest.mark.emulated
THREADS = 128


def expect_error(emu, rc, name, *words):
    with pytest.raises(EmulatedCudaError) as info:
        emu.check(rc)
    assert info.value.name == name
    for w in words:
        assert w in str(info.value)
    return info.value


def test_barrier_orders_shared_memory(emu, order):
    out = emu.buffer(3 * THREADS, torch.float32)
    emu.check(emu.lib.emu_self_neighbour(out.ptr, 3, 1))
    expected = torch.tensor([(t + 1) % THREADS + 1 for t in range(THREADS)] * 3, dtype=torch.float32)
    assert torch.equal(out.tensor, expected)


def test_missing_barrier_changes_the_result(emu):
    out = emu.buffer(3 * THREADS, torch.float32)
    expected = torch.tensor([(t + 1) % THREADS + 1 for t in range(THREADS)] * 3, dtype=torch.float32)
    results = []
    for order in ["sequential", ("random", 1), ("random", 2), ("warps", 1)]:
        emu.set_order(order)
        emu.check(emu.lib.emu_self_neighbour(out.ptr, 3, 0))
        results.append(out.tensor.clone())
        assert not torch.equal(out.tensor, expected), order
    # in thread order, thread t reads shared[t + 1] before thread t + 1 wrote it: poison (NaN)
    assert results[0][:THREADS - 1].isnan().all()
    # random orders: some reads come before, some after the write, differently per seed
    assert not torch.equal(results[1].nan_to_num(-1), results[2].nan_to_num(-1))


def test_reused_shared_memory_needs_its_barrier(emu):
    """Two block sums through one shared array: with the barrier before the reuse every order
    gives the sums; without it, a warp that runs ahead (warp-priority order) overwrites a partial
    sum warp 0 has not read yet. Thread order and uniform picks almost never produce that
    schedule: the warp-priority mode is there for it."""
    x = torch.arange(256, dtype=torch.float32) / 7
    inp, out = emu.copy_in(x), emu.buffer(2, torch.float32)
    exact = []
    for order in ["sequential", ("random", 1), ("warps", 1), ("warps", 2), ("warps", 3)]:
        emu.set_order(order)
        emu.check(emu.lib.emu_self_two_sums(inp.ptr, out.ptr, 256, 1))
        exact.append(out.tensor.clone())
        assert torch.equal(exact[-1], exact[0])
    torch.testing.assert_close(exact[0], torch.stack([x.sum(), 2 * x.sum()]))
    wrong = 0
    for seed in range(1, 6):
        emu.set_order(("warps", seed))
        emu.check(emu.lib.emu_self_two_sums(inp.ptr, out.ptr, 256, 0))
        wrong += not torch.equal(out.tensor, exact[0])
    assert wrong >= 3, f"only {wrong} of 5 warp orders exposed the missing barrier"


def test_shared_memory_starts_poisoned_in_every_block(emu):
    assert emu.lib.emu_shared_memory_bytes() > 0
    out = emu.buffer(3 * THREADS, torch.float32)
    emu.check(emu.lib.emu_self_unwritten_shared(out.ptr, 3))
    assert (out.tensor[:THREADS] == 1).all()  # block 0 wrote its own
    assert out.tensor[THREADS:].isnan().all()  # blocks 1, 2 do not see block 0's values


def test_warp_shuffle_sums_each_warp(emu, order):
    x = torch.arange(256, dtype=torch.float32)
    inp, out = emu.copy_in(x), emu.buffer(8, torch.float32)
    emu.check(emu.lib.emu_self_warp_sum(inp.ptr, out.ptr, 256))
    assert torch.equal(out.tensor, x.view(8, 32).sum(1))


def test_warp_shuffle_over_missing_lanes_fails(emu):
    inp, out = emu.copy_in(torch.ones(48)), emu.buffer(2, torch.float32)
    expect_error(emu, emu.lib.emu_self_warp_sum(inp.ptr, out.ptr, 48), "cudaErrorLaunchFailure",
                 "__shfl_down_sync", "lanes that do not exist")


@pytest.mark.parametrize("at_start", [False, True], ids=["end-guard", "start-guard"])
def test_out_of_bounds_accesses_fault(emu, at_start):
    p = emu.buffer(100, torch.float32, at_start=at_start)
    emu.check(emu.lib.emu_self_write(p.ptr, 100, 0))
    assert (p.tensor == 1).all()
    e = expect_error(emu, emu.lib.emu_self_write(p.ptr, 100, 1 if not at_start else -1),
                     "cudaErrorIllegalAddress", "out-of-bounds")
    assert "byte 400 of a 400-byte buffer" in e.detail or "byte -4 of a 400-byte buffer" in e.detail
    # the fault is sticky, as a GPU context's: the next launch fails too, until a reset
    expect_error(emu, emu.lib.emu_self_write(p.ptr, 1, 0), "cudaErrorIllegalAddress")
    emu.reset()
    emu.check(emu.lib.emu_self_write(p.ptr, 1, 0))


@pytest.mark.parametrize("shift", [1, -1])
def test_writes_into_guard_bytes_are_found(emu, shift):
    p = emu.buffer(99, torch.float32)  # 396 bytes: 12 guard bytes before the next 16
    expect_error(emu, emu.lib.emu_self_write(p.ptr, 99, shift), "cudaErrorIllegalAddress",
                 "out-of-bounds write", "396-byte buffer")


def test_empty_buffers_fault_on_any_access(emu):
    p = emu.buffer(0, torch.float32)
    expect_error(emu, emu.lib.emu_self_write(p.ptr, 1, 0), "cudaErrorIllegalAddress", "out-of-bounds")


def test_misaligned_vector_loads_fault(emu):
    src, dst = emu.buffer(64, torch.uint8), emu.buffer(64, torch.uint8)
    emu.check(emu.lib.emu_self_vector_copy(src.ptr + 16, dst.ptr))
    expect_error(emu, emu.lib.emu_self_vector_copy(src.ptr + 4, dst.ptr), "cudaErrorMisalignedAddress",
                 "16-byte-aligned", "selftest.cu")


def test_barrier_after_a_divergent_exit_fails(emu):
    out = emu.buffer(THREADS, torch.float32)
    expect_error(emu, emu.lib.emu_self_early_exit(out.ptr), "cudaErrorLaunchFailure",
                 "__syncthreads reached by 123 threads while 5 have exited")


@pytest.mark.parametrize("config", [
    (0, 1, 1, 1, 1, 1), (1, 0, 1, 1, 1, 1), (1, 1, 1, 0, 1, 1),  # no blocks / threads
    (1, 1, 1, 1025, 1, 1), (1, 1, 1, 32, 32, 2), (1, 1, 1, 1, 1, 65),  # too many threads
    (1, 65536, 1, 1, 1, 1), (1, 1, 65536, 1, 1, 1), (2**31, 1, 1, 1, 1, 1)])  # grid too large
def test_launch_configuration_errors_as_the_driver(emu, config):
    expect_error(emu, emu.lib.emu_self_configuration(*config), "cudaErrorInvalidConfiguration",
                 "invalid configuration argument")
    # not sticky: cudaGetLastError returned it once, the next launch runs
    emu.check(emu.lib.emu_self_configuration(2, 1, 1, 1024, 1, 1))
