"""The CUDA EMA kernel (ema_update_kernel) on the CPU emulator, against eman_fused's CPU kernel:
the same plan table (built by the C++ planner), every dtype pair, sizes 0 / 1 / 3 / 4097 /
multi-chunk, aligned and misaligned pointers (vector and scalar paths), momentum 0 / 1 / a
device scalar, integer copies, several thread orders. Both kernels do the same float32 (float64)
operations, so results must agree bit for bit."""
import pytest
import torch

from conftest import FLOAT_DTYPES, FLOAT_PAIRS, assert_same_bits_or_both_nan, bits
from eman_fused.ops.layout import plan_counts

from .conftest import INTEGER_DTYPES, INTEGER_SIZES, random_values

pytestmark = pytest.mark.emulated
COVERS = {"ema_update_kernel"}
ops = torch.ops.eman_fused

# 32,768 elements per chunk: 0, 1, 3, one odd tail, two chunks and a tail.
SIZES = [0, 1, 3, 4097, 2 * 32768 + 5]


def run(emu, teacher_cpu, student_cpu, momentum, t_offset=0, s_offset=0, m_tensor=None):
    """Copies the lists into guarded buffers, runs the emulated kernel on the C++ planner's table,
    and returns the teachers after the update (and the buffers, still mapped)."""
    t_bufs = [emu.copy_in(t, offset=t_offset) for t in teacher_cpu]
    s_bufs = [emu.copy_in(s, offset=s_offset) for s in student_cpu]
    teacher = [b.tensor for b in t_bufs]
    student = [b.tensor for b in s_bufs]
    table = ops.ema_plan(teacher, student)
    entries, chunks = plan_counts(teacher)
    table_buf = emu.copy_in(table)
    chunks_ptr = table_buf.ptr + 8 * entries * emu.layout("ema_entry_words")
    m_ptr, is_double = None, 0
    if m_tensor is not None:
        m_ptr = emu.copy_in(m_tensor).ptr
        is_double = int(m_tensor.dtype == torch.float64)
    emu.check(emu.lib.emu_ema_update(table_buf.ptr, chunks_ptr, chunks, momentum, m_ptr, is_double))
    return teacher


def reference(teacher_cpu, student_cpu, momentum):
    t = [x.clone() for x in teacher_cpu]
    ops.ema_update_(t, [s.clone() for s in student_cpu], momentum)
    return t


def test_layout_is_the_one_python_reads(emu):
    from eman_fused.ops import layout
    assert emu.layout("ema_entry_words") == layout.EMA["entry_words"]
    assert emu.layout("chunk_words") == layout.EMA["chunk_words"]
    assert emu.layout("ema_chunk_elems") == layout.EMA["chunk_elems"]
    assert {d: emu.tag(d) for d in layout.FLOAT_TAGS} == layout.FLOAT_TAGS


@pytest.mark.parametrize("tdt,sdt", FLOAT_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("offsets", [(0, 0), (1, 0), (0, 1)], ids=["aligned", "t+1", "s+1"])
def test_every_pair_size_and_alignment(emu, tdt, sdt, offsets):
    gen = torch.Generator().manual_seed(hash((tdt, sdt)) % 1000)
    teacher = [random_values(n, tdt, gen) for n in SIZES]
    student = [random_values(n, sdt, gen) for n in SIZES]
    # an offset of one element: 16-byte vectors impossible, the scalar path runs
    t_off = offsets[0] * teacher[0].element_size()
    s_off = offsets[1] * student[0].element_size()
    got = run(emu, teacher, student, 0.9, t_off, s_off)
    for g, e in zip(got, reference(teacher, student, 0.9)):
        assert_same_bits_or_both_nan(g, e)


@pytest.mark.parametrize("order_", ["sequential", ("random", 1), ("random", 2), ("warps", 1)], ids=str)
def test_thread_orders_give_the_same_bits(emu, order_):
    emu.set_order(order_)
    gen = torch.Generator().manual_seed(5)
    teacher = [random_values(n, torch.bfloat16, gen) for n in SIZES]
    student = [random_values(n, torch.float32, gen) for n in SIZES]
    got = run(emu, teacher, student, 0.99)
    for g, e in zip(got, reference(teacher, student, 0.99)):
        assert torch.equal(bits(g), bits(e))


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("tdt", FLOAT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_momentum_zero_copies_one_skips(emu, momentum, tdt):
    gen = torch.Generator().manual_seed(3)
    teacher = [random_values(n, tdt, gen) for n in (1, 3, 4097)]
    student = [random_values(n, torch.float32, gen) for n in (1, 3, 4097)]
    teacher[2][7] = float("nan")  # momentum 0 replaces a NaN teacher; momentum 1 keeps it
    got = run(emu, teacher, student, momentum)
    for g, t, s, e in zip(got, teacher, student, reference(teacher, student, momentum)):
        assert_same_bits_or_both_nan(g, e)
        if momentum == 1.0:
            assert torch.equal(bits(g), bits(t))
        if momentum == 0.0:
            assert torch.equal(bits(g), bits(s.to(tdt)))


@pytest.mark.parametrize("mdt", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.0, 0.75, 1.0])
def test_momentum_from_device_scalar(emu, mdt, value):
    gen = torch.Generator().manual_seed(11)
    teacher = [random_values(n, torch.float32, gen) for n in (3, 4097)]
    student = [random_values(n, torch.float16, gen) for n in (3, 4097)]
    m = torch.tensor(value, dtype=mdt)
    got = run(emu, teacher, student, 0.123, m_tensor=m)  # the scalar wins over the argument
    for g, e in zip(got, reference(teacher, student, float(m))):
        assert torch.equal(bits(g), bits(e))


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_integer_buffers_copied_as_bytes(emu, dtype, offset):
    gen = torch.Generator().manual_seed(2)
    teacher = [random_values(n, dtype, gen) for n in INTEGER_SIZES]
    student = [random_values(n, dtype, gen) for n in INTEGER_SIZES]
    got = run(emu, teacher, student, 0.9, t_offset=offset, s_offset=0)
    for g, s in zip(got, student):
        assert torch.equal(g, s)


def test_many_tensors_mixed_kinds(emu, order):
    gen = torch.Generator().manual_seed(9)
    kinds = [(torch.float32, torch.float32), (torch.int64, torch.int64), (torch.float16, torch.bfloat16),
             (torch.float64, torch.float32), (torch.bool, torch.bool)] * 8
    sizes = [(k * 997) % 5000 for k in range(len(kinds))]
    teacher = [random_values(n, t, gen) for n, (t, _) in zip(sizes, kinds)]
    student = [random_values(n, s, gen) for n, (_, s) in zip(sizes, kinds)]
    got = run(emu, teacher, student, 0.7)
    for g, e in zip(got, reference(teacher, student, 0.7)):
        assert_same_bits_or_both_nan(g, e)


def test_too_many_chunks_is_refused_before_any_work(emu):
    # more blocks than a 1-D grid can hold: refused by the launcher, nothing read or written
    rc = emu.lib.emu_ema_update(None, None, 2**31, 0.5, None, 0)
    assert emu.lib.emu_error_name(rc) == b"cudaErrorInvalidConfiguration"
    assert emu.lib.emu_ema_update(None, None, 0, 0.5, None, 0) == 0  # nothing to do: no launch
