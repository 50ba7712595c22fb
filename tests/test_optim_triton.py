"""Triton backend of the fused optimizer steps (SGD, AdamW, LARS + teacher): table mirror, the
same bits as the C++ kernels (interpreter, CPU; LARS: to float32 rounding) or the same values
within fp32 tolerance (GPU), the optimizer classes with backend='triton', errors, opcheck."""
import re
import struct

import pytest
import torch
from torch import nn

import eman_fused
from eman_fused import optim
from eman_fused.teacher import EMATeacher
from conftest import AVAILABLE, HAS_GPU, bits, needs_cuda_backend
from test_optim import ADAMW_CASES, SGD_CASES, assert_close_states, batches, groups, make_model, train

pytestmark = pytest.mark.skipif("triton" not in AVAILABLE, reason=eman_fused.backends()["triton"].detail)
DEVICE = "cuda" if HAS_GPU else "cpu"
INTERPRETED = not HAS_GPU
ops = torch.ops.eman_fused

if "triton" in AVAILABLE:
    from eman_fused.triton import optim as topt
# 16,384 elements per table chunk: one short of it, one past it, two chunks and a tail, empty.
SHAPES = [(7,), (16383,), (16385,), (3, 11000), (0,), (5, 2, 3)]
HALF = [torch.bfloat16, torch.float16]


def lists(shapes, dtype, teacher_dtype, states, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(s, dt, positive=False):
        x = torch.randn(s, generator=g)
        return (x.abs() if positive else x).to(dt).to(DEVICE)
    params = [rand(s, dtype) for s in shapes]
    grads = [rand(s, dtype) for s in shapes]
    st = [[rand(s, dtype, positive=k > 0) for s in shapes] for k in range(states)]
    teacher = [rand(s, teacher_dtype) for s in shapes] if teacher_dtype is not None else []
    return params, grads, st, teacher


def assert_same(a_lists, b_lists):
    for a_list, b_list in zip(a_lists, b_lists):
        for a, b in zip(a_list, b_list):
            if INTERPRETED:  # the same fp32 operations in the same order: bit-identical
                assert torch.equal(bits(a.cpu()), bits(b.cpu()))
            else:  # the GPU may contract multiply-adds: within a rounding or two
                torch.testing.assert_close(a.cpu(), b.cpu(), rtol=2e-2 if a.dtype in HALF else 1e-5,
                                           atol=1e-5)


def test_table_mirror_matches_the_cpp_table():
    params, grads, (m, v), teacher = lists(SHAPES, torch.float32, torch.bfloat16, 2)
    params, grads, m, v, teacher = ([t.cpu() for t in x] for x in (params, grads, m, v, teacher))
    n = len(params)
    step_sizes, bc2 = [0.1 * (i + 1) for i in range(n)], [0.5 + 0.01 * i for i in range(n)]
    table = ops._adamw_ema_table(params, grads, m, v, [], teacher, step_sizes, bc2, 1e-3, 0.9, 0.999,
                                 1e-8, 0.01, False, False, 0.99).tolist()
    entries, chunks = topt.optim_counts(params)
    assert (entries, chunks) == (6, 1 + 1 + 2 + 3 + 0 + 1)
    assert len(table) == entries * topt.OPTIM_ENTRY_WORDS + chunks * topt.OPTIM_CHUNK_WORDS
    first_chunk = 0
    for i in range(n):
        e = table[i * topt.OPTIM_ENTRY_WORDS:(i + 1) * topt.OPTIM_ENTRY_WORDS]
        ptr = [t.data_ptr() if t.numel() else e[k] for k, t in enumerate((params[i], grads[i], m[i], v[i]))]
        assert e[:4] == ptr and e[4] == 0 and e[5] == (teacher[i].data_ptr() if teacher[i].numel() else e[5])
        n_chunks = -(-params[i].numel() // topt.OPTIM_CHUNK_ELEMS)
        assert e[6:10] == [params[i].numel(), first_chunk, n_chunks, 0]
        assert struct.unpack("dd", struct.pack("qq", e[10], e[11])) == (step_sizes[i], bc2[i])
        first_chunk += n_chunks
    rows = [table[entries * 13 + 2 * c:entries * 13 + 2 * c + 2] for c in range(chunks)]
    assert rows == [[0, 0], [1, 0], [2, 0], [2, 16384], [3, 0], [3, 16384], [3, 32768], [5, 0]]
    sgd = ops._sgd_ema_table(params, grads, m, teacher, [1, 0, 1, 0, 1, 0], 0.1, 0.9, 0.0, False,
                             0.0, False, 0.9).tolist()
    assert [sgd[i * 13 + 9] for i in range(n)] == [topt.OPTIM_FIRST, 0] * 3


SGD_OP_CASES = [  # momentum, dampening, nesterov, weight_decay, maximize
    (0.0, 0.0, False, 0.0, False), (0.9, 0.0, False, 0.0, False), (0.9, 0.0, True, 1e-3, False),
    (0.8, 0.1, False, 5e-4, True)]


@pytest.mark.parametrize("hyper", SGD_OP_CASES, ids=str)
@pytest.mark.parametrize("dtype,teacher_dtype", [(torch.float32, torch.float32), (torch.float32, None),
                                                 (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)],
                         ids=str)
def test_sgd_step_is_the_cpp_kernels(hyper, dtype, teacher_dtype):
    momentum = hyper[0]
    params, grads, st, teacher = lists(SHAPES, dtype, teacher_dtype, 1 if momentum else 0)
    first = [i % 2 for i in range(len(params))] if momentum else []
    ours = [[t.clone() for t in x] for x in (params, *st, teacher)]
    theirs = [[t.cpu().clone() for t in x] for x in (params, *st, teacher)]
    bufs = ours[1] if momentum else []
    ops.sgd_ema_step_triton_(ours[0], grads, bufs, ours[-1] if teacher else [], first, 0.05, *hyper, 0.99)
    ops.sgd_ema_step_(theirs[0], [g.cpu() for g in grads], theirs[1] if momentum else [],
                      theirs[-1] if teacher else [], first, 0.05, *hyper, 0.99)
    assert_same(ours, theirs)


ADAMW_OP_CASES = [  # beta1, beta2, eps, weight_decay, amsgrad, maximize
    (0.9, 0.999, 1e-8, 0.01, False, False), (0.9, 0.99, 1e-8, 0.05, True, True),
    (0.3, 0.9, 1e-6, 0.0, False, False)]  # beta1 < 0.5: torch's other lerp form


@pytest.mark.parametrize("hyper", ADAMW_OP_CASES, ids=str)
@pytest.mark.parametrize("dtype,teacher_dtype", [(torch.float32, torch.float32), (torch.bfloat16, None),
                                                 (torch.float16, torch.float32)], ids=str)
def test_adamw_step_is_the_cpp_kernels(hyper, dtype, teacher_dtype):
    amsgrad = hyper[4]
    params, grads, st, teacher = lists(SHAPES, dtype, teacher_dtype, 3 if amsgrad else 2)
    n = len(params)
    step_sizes, bc2 = [1e-3 / (1 - 0.9 ** (k + 1)) for k in range(n)], [(1 - 0.999 ** (k + 1)) ** 0.5 for k in range(n)]
    ours = [[t.clone() for t in x] for x in (params, *st, teacher)]
    theirs = [[t.cpu().clone() for t in x] for x in (params, *st, teacher)]
    for lst, gr in ((ours, grads), (theirs, [g.cpu() for g in grads])):
        op = ops.adamw_ema_step_triton_ if lst is ours else ops.adamw_ema_step_
        op(lst[0], gr, lst[1], lst[2], lst[3] if amsgrad else [], lst[-1] if teacher else [], step_sizes,
           bc2, 1e-3, *hyper, 0.995)
    assert_same(ours, theirs)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("dtype,teacher_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                 (torch.float16, None)], ids=str)
def test_lars_step_agrees_with_the_cpp_kernels(dtype, teacher_dtype, maximize):
    params, grads, (bufs,), teacher = lists(SHAPES, dtype, teacher_dtype, 1)
    n = len(params)
    adapt, first = [int(p.dim() > 1 or p.numel() > 100) for p in params], [i % 2 for i in range(n)]
    ours = [[t.clone() for t in x] for x in (params, bufs, teacher)]
    theirs = [[t.cpu().clone() for t in x] for x in (params, bufs, teacher)]
    hyper = (0.1, 0.9, 1e-4, 0.02, maximize, 0.99)
    ops.lars_ema_step_triton_(ours[0], grads, ours[1], ours[2] if teacher else [], adapt, first, *hyper)
    ops.lars_ema_step_(theirs[0], [g.cpu() for g in grads], theirs[1], theirs[2] if teacher else [], adapt,
                       first, *hyper)
    # Norms summed in another order: trust ratios agree to float32 rounding, so a 16-bit value
    # may round the other way (one 16-bit ulp), a float32 one differ in its last bits.
    for a_list, b_list in zip(ours, theirs):
        for a, b in zip(a_list, b_list):
            tol = dict(rtol=1e-5, atol=1e-6) if a.dtype == torch.float32 else dict(rtol=2**-7, atol=1e-3)
            torch.testing.assert_close(a.cpu(), b, **tol)
    for i in range(n):  # tensors not adapted (no norms involved) are bit-identical on the interpreter
        if INTERPRETED and not adapt[i]:
            assert torch.equal(bits(ours[0][i].cpu()), bits(theirs[0][i]))


def test_many_tensors_in_one_launch():
    params, grads, (bufs,), teacher = lists([(i % 13 + 1,) for i in range(1200)], torch.float32, torch.float32, 1)
    ours = [[t.clone() for t in x] for x in (params, bufs, teacher)]
    theirs = [[t.cpu().clone() for t in x] for x in (params, bufs, teacher)]
    ops.sgd_ema_step_triton_(ours[0], grads, ours[1], ours[2], [0] * 1200, 0.1, 0.9, 0.0, False, 0.0,
                             False, 0.9)
    ops.sgd_ema_step_(theirs[0], [g.cpu() for g in grads], theirs[1], theirs[2], [0] * 1200, 0.1, 0.9, 0.0,
                      False, 0.0, False, 0.9)
    assert_same(ours, theirs)


def _train(cls, kwargs, backend, steps=8):
    data = batches(steps)
    student = make_model().to(DEVICE)
    teacher = EMATeacher(student, momentum=0.9)
    opt = cls(groups(student, lr=0.01, weight_decay=1e-2), teacher=teacher, backend=backend, **kwargs)
    train(student, opt, [(x.to(DEVICE), y.to(DEVICE)) for x, y in data],
          sign=-1.0 if kwargs.get("maximize") else 1.0)
    return student, teacher, opt


@pytest.mark.parametrize("cls,kwargs", [(optim.SGD, SGD_CASES[2]), (optim.SGD, SGD_CASES[4]),
                                        (optim.AdamW, ADAMW_CASES[1]), (optim.AdamW, ADAMW_CASES[3]),
                                        (optim.LARS, dict(lr=0.1, momentum=0.9, trust_coefficient=0.01))],
                         ids=str)
def test_optimizer_with_backend_triton_is_the_cpp_one(cls, kwargs):
    student, teacher, opt = _train(cls, kwargs, "triton")
    ref_student, ref_teacher, ref_opt = _train(cls, kwargs, "cuda" if HAS_GPU else "cpu")
    exact = INTERPRETED and cls is not optim.LARS  # LARS: norms summed in another order
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    assert_close_states(student.state_dict(), ref_student.state_dict(), **tol)
    assert_close_states(teacher.state_dict(), ref_teacher.state_dict(), **tol)
    assert_close_states(opt.state_dict()["state"][0], ref_opt.state_dict()["state"][0], **tol)


def test_backend_choice_and_what_has_no_triton_kernel():
    params = [nn.Parameter(torch.randn(3, device=DEVICE))]
    assert optim.SGD(params, lr=0.1, backend="triton")._backend_for(torch.device(DEVICE)) == "triton"
    if not HAS_GPU:  # CPU params: 'auto' is the C++ kernels, never the interpreter
        assert optim.SGD(params, lr=0.1)._backend_for(torch.device("cpu")) == "cpu"
        why = re.escape(eman_fused.backends()["cuda"].detail)  # no GPU, or a build without CUDA
        with pytest.raises(RuntimeError, match=f"backend 'cuda' is not available: {why}"):
            optim.AdamW(params, backend="cuda")
    with pytest.raises(NotImplementedError, match="lars_ema_step_.capturable has no 'triton' kernel"):
        optim.LARS(params, backend="triton", capturable=True)
    with pytest.raises(NotImplementedError, match="capturable has no 'triton' kernel"):
        optim.AdamW(params, backend="triton", capturable=True)
    with pytest.raises(ValueError, match="unknown backend"):
        optim.SGD(params, lr=0.1, backend="tpu")


@pytest.mark.parametrize("break_it,error,match", [
    (lambda p, g, b, t: g.pop(), ValueError, "grads has 2 tensors"),
    (lambda p, g, b, t: p.__setitem__(1, p[1].bfloat16()), TypeError, "one param dtype per call"),
    (lambda p, g, b, t: t.__setitem__(1, p[1]), ValueError, "is params"),
    (lambda p, g, b, t: b.__setitem__(0, torch.zeros(4, device=DEVICE)), ValueError, "has shape"),
])
def test_bad_input_raises_before_any_write(break_it, error, match):
    p, g, (b,), t = lists([(5,), (6,), (7,)], torch.float32, torch.float32, 1)
    break_it(p, g, b, t)
    before = [bits(x.cpu()) for x in (*p, *b, *t)]
    with pytest.raises(error, match=match):
        ops.sgd_ema_step_triton_(p, g, b, t, [0] * len(p), 0.1, 0.9, 0.0, False, 0.0, False, 0.9)
    assert all(torch.equal(x, bits(y.cpu())) for x, y in zip(before, (*p, *b, *t)))


def test_opcheck_triton_optimizer_ops():
    checks = ("test_schema", "test_autograd_registration") if INTERPRETED else None
    kw = {"test_utils": checks} if checks else {}
    p, g, (b,), t = lists([(33,), (4, 5)], torch.float32, torch.bfloat16, 1)
    torch.library.opcheck(ops.sgd_ema_step_triton_, (p, g, b, t, [1, 0], 0.1, 0.9, 0.0, True, 1e-4,
                                                     False, 0.9), **kw)
    p, g, (m, v), t = lists([(33,), (4, 5)], torch.bfloat16, torch.float32, 2)
    torch.library.opcheck(ops.adamw_ema_step_triton_, (p, g, m, v, [], t, [0.1, 0.2], [0.5, 0.6], 0.1,
                                                       0.9, 0.999, 1e-8, 0.01, False, False, 0.9), **kw)
    p, g, (b,), t = lists([(33,), (4, 5)], torch.float32, torch.float32, 1)
    torch.library.opcheck(ops.lars_ema_step_triton_, (p, g, b, t, [0, 1], [1, 0], 0.1, 0.9, 1e-4, 0.001,
                                                      False, 0.9), **kw)


@needs_cuda_backend
def test_triton_and_cuda_kernels_agree_on_the_gpu():
    params, grads, (m, v), teacher = lists(SHAPES, torch.float32, torch.float32, 2)
    n = len(params)
    a = [[t.clone() for t in x] for x in (params, m, v, teacher)]
    b = [[t.clone() for t in x] for x in (params, m, v, teacher)]
    args = ([0.01] * n, [0.9] * n, 1e-3, 0.9, 0.999, 1e-8, 0.01, False, False, 0.99)
    ops.adamw_ema_step_triton_(a[0], grads, a[1], a[2], [], a[3], *args)
    ops.adamw_ema_step_(b[0], grads, b[1], b[2], [], b[3], *args)
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            torch.testing.assert_close(s, t, rtol=1e-5, atol=1e-6)
