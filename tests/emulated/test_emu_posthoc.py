"""The CUDA post-hoc EMA kernels (posthoc_ema_kernel, advance_step_kernel) on the CPU emulator,
against eman_fused's CPU kernel: the same plan table (built by the C++ planner), every dtype
pair, K = 1 / 2 / 3 / 8 profiles, sizes 0 / 1 / 3 / 4097 / multi-chunk, aligned and misaligned
student and profile pointers (vector and scalar paths), the first update (a copy), later ones,
integer copies, several thread orders. Both kernels do the same float32 (float64) operations in
the same order, so results must agree bit for bit; the step counter is read on the device and
advanced by one."""
import math

import pytest
import torch

from conftest import FLOAT_PAIRS, assert_same_bits_or_both_nan, bits
from eman_fused import reference as R

from .conftest import INTEGER_DTYPES, INTEGER_SIZES, random_values

pytestmark = pytest.mark.emulated
COVERS = {"posthoc_ema_kernel", "advance_step_kernel"}
ops = torch.ops.eman_fused

# 32,768 elements per chunk: 0, 1, 3, one odd tail, two chunks and a tail.
SIZES = [0, 1, 3, 4097, 2 * 32768 + 5]
SIGMA_RELS = [0.05, 0.10, 0.15, 0.2, 0.03, 0.08, 0.25, 0.12]
GAMMAS = [R.sigma_rel_to_gamma(s) for s in SIGMA_RELS]


def counts(emu, student):
    """(entries, chunks) of the post-hoc plan: one entry per non-empty student tensor, chunks of
    posthoc_chunk_elems elements (bytes for integer tensors)."""
    chunk = emu.layout("posthoc_chunk_elems")
    units = [s.numel() if s.is_floating_point() else s.nbytes for s in student]
    return sum(u > 0 for u in units), sum(math.ceil(u / chunk) for u in units)


def run(emu, profiles_cpu, student_cpu, step, gammas, p_offsets=None, s_offset=0):
    """Copies the lists into guarded buffers (profile k's tensors `p_offsets[k]` bytes past a
    16-byte boundary), runs the emulated kernels on the C++ planner's table and returns the
    profiles and the step after the update."""
    k = len(gammas)
    p_offsets = p_offsets or [0] * k
    profiles = [[emu.copy_in(t, offset=p_offsets[j]).tensor for t in prof]
                for j, prof in enumerate(profiles_cpu)]
    student = [emu.copy_in(s, offset=s_offset).tensor for s in student_cpu]
    step_buf = emu.copy_in(torch.tensor([step], dtype=torch.int64))
    flat = [t for p in profiles for t in p]
    table = ops.posthoc_plan(flat, student, torch.tensor(step), gammas)
    entries, chunks = counts(emu, student)
    assert table.numel() == entries * emu.layout("posthoc_entry_words") + chunks * emu.layout("chunk_words")
    table_buf = emu.copy_in(table)
    chunks_ptr = table_buf.ptr + 8 * entries * emu.layout("posthoc_entry_words")
    g = emu.copy_in(torch.tensor(gammas, dtype=torch.float64))
    emu.check(emu.lib.emu_posthoc_update(table_buf.ptr, chunks_ptr, chunks, g.ptr, k, step_buf.ptr))
    return profiles, int(step_buf.tensor[0])


def reference(profiles_cpu, student_cpu, step, gammas):
    """The CPU kernel on copies."""
    profiles = [[t.clone() for t in p] for p in profiles_cpu]
    s = torch.tensor(step, dtype=torch.int64)
    ops.posthoc_ema_update_([t for p in profiles for t in p], [x.clone() for x in student_cpu], s, gammas)
    assert int(s) == step + 1
    return profiles


def check(got, expected):
    for gp, ep in zip(got, expected, strict=True):
        for g, e in zip(gp, ep, strict=True):
            assert_same_bits_or_both_nan(g, e)


def test_layout_is_the_one_the_extension_builds(emu):
    from eman_fused.ops import layout
    assert emu.layout("posthoc_entry_words") == layout.POSTHOC["entry_words"]
    assert emu.layout("posthoc_chunk_elems") == layout.POSTHOC["chunk_elems"]
    assert emu.layout("posthoc_max_profiles") == layout.POSTHOC["max_profiles"]


@pytest.mark.parametrize("pdt,sdt", FLOAT_PAIRS, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("offsets", [((0, 0), 0), ((1, 1), 0), ((0, 0), 1), ((0, 1), 0)],
                         ids=["aligned", "profiles+1", "student+1", "profile1+1"])
def test_every_pair_size_and_alignment(emu, pdt, sdt, offsets):
    gen = torch.Generator().manual_seed(hash((pdt, sdt)) % 1000)
    gammas = GAMMAS[:2]
    profiles = [[random_values(n, pdt, gen) for n in SIZES] for _ in gammas]
    student = [random_values(n, sdt, gen) for n in SIZES]
    # an offset of one element: 16-byte vectors impossible for the whole chunk, scalar path
    p_off = [o * profiles[0][0].element_size() for o in offsets[0]]
    s_off = offsets[1] * student[0].element_size()
    step = 9_999
    got, new_step = run(emu, profiles, student, step, gammas, p_off, s_off)
    assert new_step == step + 1
    check(got, reference(profiles, student, step, gammas))


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("step", [0, 1, 2, 12_345_678])
def test_profile_counts_and_steps(emu, k, step):
    """step 0: the first update copies (beta_1 = 0); NaN in a profile is replaced then and
    carried afterwards, as the CPU kernel does."""
    gen = torch.Generator().manual_seed(17 * k + step % 97)
    gammas = GAMMAS[:k]
    profiles = [[random_values(n, torch.float32, gen) for n in (1, 3, 4097, 40000)] for _ in gammas]
    student = [random_values(n, torch.bfloat16, gen) for n in (1, 3, 4097, 40000)]
    profiles[-1][2][5] = float("nan")
    got, new_step = run(emu, profiles, student, step, gammas)
    assert new_step == step + 1
    expected = reference(profiles, student, step, gammas)
    check(got, expected)
    if step == 0:
        for prof in got:
            for g, s in zip(prof, student):
                assert torch.equal(bits(g), bits(s.to(g.dtype)))


def test_thread_orders_give_the_same_bits(emu, order):
    gen = torch.Generator().manual_seed(5)
    gammas = GAMMAS[:3]
    profiles = [[random_values(n, torch.float16, gen) for n in SIZES] for _ in gammas]
    student = [random_values(n, torch.float32, gen) for n in SIZES]
    got, _ = run(emu, profiles, student, 77, gammas)
    for gp, ep in zip(got, reference(profiles, student, 77, gammas)):
        for g, e in zip(gp, ep):
            assert torch.equal(bits(g), bits(e))


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_integer_buffers_copied_to_every_profile(emu, dtype, offset):
    gen = torch.Generator().manual_seed(2)
    gammas = GAMMAS[:2]
    profiles = [[random_values(n, dtype, gen) for n in INTEGER_SIZES] for _ in gammas]
    student = [random_values(n, dtype, gen) for n in INTEGER_SIZES]
    got, _ = run(emu, profiles, student, 50, gammas, p_offsets=[offset, 0])
    for prof in got:
        for g, s in zip(prof, student):
            assert torch.equal(g, s)


def test_many_tensors_mixed_kinds(emu, order):
    gen = torch.Generator().manual_seed(9)
    kinds = [(torch.float32, torch.float32), (torch.int64, torch.int64), (torch.float16, torch.bfloat16),
             (torch.float64, torch.float32), (torch.bool, torch.bool), (torch.bfloat16, torch.float64)] * 6
    sizes = [(k * 997) % 5000 for k in range(len(kinds))]
    gammas = GAMMAS[:2]
    profiles = [[random_values(n, t, gen) for n, (t, _) in zip(sizes, kinds)] for _ in gammas]
    student = [random_values(n, s, gen) for n, (_, s) in zip(sizes, kinds)]
    got, _ = run(emu, profiles, student, 3, gammas)
    check(got, reference(profiles, student, 3, gammas))


def test_untouched_memory_stays_untouched(emu):
    """The guard slack around every buffer is checked by the emulator after the launch; here also
    a zero-size tensor's neighbours and the student itself."""
    gen = torch.Generator().manual_seed(4)
    gammas = GAMMAS[:2]
    student = [random_values(n, torch.float32, gen) for n in (5, 0, 33)]
    profiles = [[random_values(n, torch.float32, gen) for n in (5, 0, 33)] for _ in gammas]
    s_before = [bits(s) for s in student]
    s_bufs = [emu.copy_in(s) for s in student]
    p_bufs = [[emu.copy_in(t) for t in p] for p in profiles]
    step = emu.copy_in(torch.tensor([8], dtype=torch.int64))
    flat = [b.tensor for p in p_bufs for b in p]
    table = emu.copy_in(ops.posthoc_plan(flat, [b.tensor for b in s_bufs], torch.tensor(8), gammas))
    entries, chunks = counts(emu, student)
    g = emu.copy_in(torch.tensor(gammas, dtype=torch.float64))
    emu.check(emu.lib.emu_posthoc_update(table.ptr, table.ptr + 8 * entries * emu.layout("posthoc_entry_words"),
                                         chunks, g.ptr, 2, step.ptr))
    for b, before in zip(s_bufs, s_before):
        assert torch.equal(bits(b.tensor), before)


def test_no_chunks_still_advances_the_step(emu):
    step = emu.copy_in(torch.tensor([41], dtype=torch.int64))
    g = emu.copy_in(torch.tensor(GAMMAS[:2], dtype=torch.float64))
    emu.check(emu.lib.emu_posthoc_update(None, None, 0, g.ptr, 2, step.ptr))
    assert int(step.tensor[0]) == 42


def test_too_many_chunks_is_refused_before_any_work(emu):
    # more blocks than a 1-D grid can hold: refused by the launcher; the step is not advanced
    step = emu.copy_in(torch.tensor([7], dtype=torch.int64))
    g = emu.copy_in(torch.tensor(GAMMAS[:2], dtype=torch.float64))
    rc = emu.lib.emu_posthoc_update(None, None, 2**31, g.ptr, 2, step.ptr)
    assert emu.lib.emu_error_name(rc) == b"cudaErrorInvalidConfiguration"
    assert int(step.tensor[0]) == 7
