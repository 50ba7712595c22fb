"""Triton backend: plan mirror, cross-backend agreement, registration. (The full EMA matrix
of test_ema.py runs against Triton too, through conftest's BACKENDS.)"""
import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import eman_fused
from eman_fused import reference
from eman_fused.ops import layout
from conftest import AVAILABLE, HAS_GPU, assert_close_to, bits, needs_cuda_backend
from test_ema import make_lists, random_lists

pytestmark = pytest.mark.skipif("triton" not in AVAILABLE,
                                reason=eman_fused.backends()["triton"].detail)
DEVICE = "cuda" if HAS_GPU else "cpu"


def test_python_plan_mirror_matches_the_cpp_planner():
    shapes = [(5,), (0,), (70_000,), (3, 4), (32768,), (2,)]
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float32, torch.int64]
    sdtypes = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float16, torch.int64]
    teacher, student = make_lists(shapes, dtypes, sdtypes, "cpu")
    table = eman_fused.ops.ema_plan(teacher, student).tolist()
    entries, chunks = layout.plan_counts(teacher)
    assert (entries, chunks) == (5, 1 + 3 + 1 + 1 + 1)
    assert len(table) == entries * layout.EMA["entry_words"] + chunks * layout.EMA["chunk_words"]
    nonempty = [(t, s) for t, s in zip(teacher, student) if t.numel()]
    for i, (t, s) in enumerate(nonempty):
        t_ptr, s_ptr, numel, kind = table[i * 4:(i + 1) * 4]
        assert (t_ptr, s_ptr) == (t.data_ptr(), s.data_ptr())
        if t.is_floating_point():
            assert numel == t.numel()
            assert kind == layout.FLOAT_TAGS[t.dtype] * 4 + layout.FLOAT_TAGS[s.dtype]
        else:
            assert (numel, kind) == (t.numel() * t.element_size(), layout.EMA["kind_copy_bytes"])
    chunk_rows = [table[entries * 4 + 2 * c: entries * 4 + 2 * c + 2] for c in range(chunks)]
    assert chunk_rows == [[0, 0], [1, 0], [1, 32768], [1, 65536], [2, 0], [3, 0], [4, 0]]


@settings(max_examples=30, deadline=None)
@given(x=st.one_of(st.just(0.0), st.floats(2**-40, 1.0)))
def test_momentum_split_is_exact(x):
    from eman_fused.triton.ema import _split
    terms = _split(x)
    assert all(struct.unpack("f", struct.pack("f", t))[0] == t for t in terms)
    assert math.fsum(terms) == x


@settings(max_examples=15, deadline=None)
@given(case=random_lists(max_tensors=8, max_dim=70, max_rank=3))
def test_cpu_extension_triton_and_reference_agree(case):
    teacher, student, momentum = case
    by_cpu = [t.clone() for t in teacher]
    by_ref = [t.clone() for t in teacher]
    by_triton = [t.to(DEVICE) for t in teacher]
    eman_fused.ema_update_(by_cpu, student, momentum, backend="cpu")
    reference.ema_update_(by_ref, student, momentum)
    eman_fused.ema_update_(by_triton, [s.to(DEVICE) for s in student], momentum, backend="triton")
    for c, r, tr in zip(by_cpu, by_ref, by_triton):
        assert_close_to(c, r)
        assert_close_to(tr.cpu(), r)
        if not HAS_GPU:  # same fp32 operations in the same order: bit-identical
            assert torch.equal(bits(c), bits(tr))


def test_opcheck_triton_ops():
    teacher, student = make_lists([(33,), (4, 5), (3,)], [torch.float32, torch.bfloat16, torch.int64],
                                  [torch.float16, torch.float32, torch.int64], DEVICE)
    torch.library.opcheck(torch.ops.eman_fused.ema_update_triton_, (teacher, student, 0.9))
    torch.library.opcheck(torch.ops.eman_fused.ema_update_triton_tensor_,
                          (teacher, student, torch.tensor(0.9, device=DEVICE)))


def test_triton_compiles_fullgraph():
    """Under torch.compile the Triton op is called, not traced: its kernel writes the teachers
    through the plan table's addresses, which only the op's declared mutation tells torch about.
    (A traced triton_op left the teachers as they were under aot_eager on a GPU.)"""
    teacher, student = make_lists([(33,), (4, 5), (2,)], [torch.float32, torch.float32, torch.int64],
                                  [torch.float32, torch.bfloat16, torch.int64], DEVICE)
    expected = [t.clone() for t in teacher]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(m):
        eman_fused.ema_update_(teacher, student, m, backend="triton")

    for m in (0.5, 0.25):
        step(torch.tensor(m, device=DEVICE))
        reference.ema_update_(expected, student, m)
    for t, e in zip(teacher, expected):
        torch.testing.assert_close(t, e)


def test_triton_launches_without_fused_multiply_adds(monkeypatch):
    """Every Triton launch passes enable_fp_fusion=False (eman_fused/triton/_common.py): the
    kernels then round each operation once, as the C++ kernels do."""
    from eman_fused.triton import _common, ema as triton_ema
    seen = []

    def recording_launch(kernel, grid, *args, **kwargs):
        seen.append(kernel)
        return _common.launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(triton_ema, "launch", recording_launch)
    monkeypatch.setattr(_common, "LAUNCH_OPTIONS", {"enable_fp_fusion": False})
    teacher, student = make_lists([(33,)], [torch.float32], [torch.float32], DEVICE)
    eman_fused.ema_update_(teacher, student, 0.5, backend="triton")
    assert seen == [triton_ema._ema_update_kernel]


def test_fused_ema_on_triton_bumps_versions():
    t, s = torch.zeros(10, device=DEVICE), torch.ones(10, device=DEVICE)
    ema = eman_fused.FusedEMA([t], [s], backend="triton")
    v = t._version
    ema.step(0.5)
    assert t._version > v and torch.equal(t, torch.full_like(t, 0.5))


def test_auto_never_picks_the_interpreter_for_cpu_tensors():
    from eman_fused._backends import resolve
    assert resolve("auto", torch.device("cpu")) == "cpu"


@needs_cuda_backend
def test_triton_matches_the_cuda_backend():
    teacher, student = make_lists([(n,) for n in (1, 4097, 100_003, 32768)],
                                  [torch.float32, torch.bfloat16, torch.float16, torch.float32],
                                  [torch.bfloat16, torch.float32, torch.float32, torch.float16], "cuda")
    by_cuda = [t.clone() for t in teacher]
    eman_fused.ema_update_(by_cuda, student, 0.999, backend="cuda")
    eman_fused.ema_update_(teacher, student, 0.999, backend="triton")
    for a, b in zip(teacher, by_cuda):
        assert_close_to(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no GPU visible")
def test_triton_update_is_one_kernel_launch():
    teacher, student = make_lists([(n,) for n in range(1, 1001)], [torch.float32] * 1000,
                                  [torch.bfloat16] * 1000, "cuda")
    eman_fused.ema_update_(teacher, student, 0.9, backend="triton")
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        eman_fused.ema_update_(teacher, student, 0.9, backend="triton")
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]
