"""Triton backend of the fused optimizer steps (SGD, AdamW, LARS + teacher): table mirror, the
same bits as the C++ kernels (interpreter, CPU; LARS: to float32 rounding) or the same values
within fp32 tolerance (GPU), the optimizer classes with backend='triton', errors, opcheck."""
import math
import re
import struct

import pytest
import torch
from torch import nn

import eman_fused
from eman_fused import optim
from eman_fused.teacher import EMATeacher
from eman_fused.ops import optim as optim_ops
from conftest import AVAILABLE, HAS_GPU, bits, needs_cuda_backend
from test_optim import ADAMW_CASES, SGD_CASES, assert_close_states, batches, groups, make_model, train

pytestmark = pytest.mark.skipif("triton" not in AVAILABLE, reason=eman_fused.backends()["triton"].detail)
DEVICE = "cuda" if HAS_GPU else "cpu"
INTERPRETED = not HAS_GPU
ops = torch.ops.eman_fused

if "triton" in AVAILABLE:
    from eman_fused.triton import optim as topt
FIRST, ADAPT = optim_ops.layout.OPTIM["flag_first"], optim_ops.layout.OPTIM["flag_adapt"]
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


FIELDS = topt.OPTIM["fields"] if "triton" in AVAILABLE else {}


def step(name, backend, params, grads, state=(), teacher=(), flags=(), steps=(), **hyper):
    """The C++ op (backend 'cpu'/'cuda') or its Triton twin, with the state lists in order."""
    state = list(state) + [[]] * (3 - len(state))
    optim_ops.step_(name, params, grads, first_moments=state[0], second_moments=state[1],
                    max_second_moments=state[2], teacher=teacher, flags=flags, steps=steps,
                    backend=backend, **hyper)


def test_table_mirror_matches_the_cpp_table():
    params, grads, (m, v), teacher = lists(SHAPES, torch.float32, torch.bfloat16, 2)
    params, grads, m, v, teacher = ([t.cpu() for t in x] for x in (params, grads, m, v, teacher))
    n = len(params)
    steps = [torch.tensor(float(i)) for i in range(n)]
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=False,
                 maximize=False, teacher_momentum=0.99)
    table = ops._optim_ema_table(optim_ops.optimizer_id("adamw"), params, grads, m, v, [], teacher, [], steps,
                                 optim_ops.hyper("adamw", **hyper), []).tolist()
    entries, chunks = topt.optim_counts(params)
    assert (entries, chunks) == (6, 1 + 1 + 2 + 3 + 0 + 1)
    ew, cw = topt.OPTIM_ENTRY_WORDS, topt.OPTIM_CHUNK_WORDS
    assert len(table) == entries * ew + chunks * cw + topt.OPTIM["scalar_words"]
    as_double = lambda word: struct.unpack("d", struct.pack("q", word))[0]  # noqa: E731
    first_chunk = 0
    for i in range(n):
        e = table[i * ew:(i + 1) * ew]
        named = dict(param=params[i], grad=grads[i], first_moment=m[i], second_moment=v[i], teacher=teacher[i])
        for field, t in named.items():
            if t.numel():  # empty tensors may have any (or no) data pointer
                assert e[FIELDS[field]] == t.data_ptr(), field
        assert e[FIELDS["max_second_moment"]] == 0 and e[FIELDS["step"]] == 0
        n_chunks = -(-params[i].numel() // topt.OPTIM_CHUNK_ELEMS)
        assert [e[FIELDS[f]] for f in ("numel", "first_chunk", "num_chunks", "flags")] == [
            params[i].numel(), first_chunk, n_chunks, 0]
        k = i + 1  # this step's count: the steps taken so far, plus one
        assert as_double(e[FIELDS["bias_correction1"]]) == 1 - 0.9 ** k
        assert as_double(e[FIELDS["bias_correction2_sqrt"]]) == math.sqrt(1 - 0.999 ** k)
        first_chunk += n_chunks
    rows = [table[entries * ew + cw * c:entries * ew + cw * c + 2] for c in range(chunks)]
    assert rows == [[0, 0], [1, 0], [2, 0], [2, 16384], [3, 0], [3, 16384], [3, 32768], [5, 0]]
    scal = [as_double(w) for w in table[entries * ew + chunks * cw:]]
    at = topt.OPTIM["scalars"]["adamw"]
    f32 = lambda x: struct.unpack("f", struct.pack("f", x))[0]  # noqa: E731
    # Derived in double, rounded once (1 - beta2 in float32 would be 1 - 0.999f: 1e-5 off).
    assert scal[at["w2"]] == f32(1 - 0.999) and scal[at["w1"]] == f32(1 - 0.9)
    assert scal[at["decay"]] == f32(1 - 1e-3 * 0.01) and scal[at["lr"]] == 1e-3
    # the teacher's lerp weights (common/ema_lerp.h): w = 1 - m rounded once, v = 1 - w in float32
    assert scal[at["teacher_w"]] == f32(1 - 0.99) and scal[at["teacher_v"]] == f32(1 - f32(1 - 0.99))
    assert scal[at["w2"]] != f32(1 - f32(0.999))
    sgd = ops._optim_ema_table(optim_ops.optimizer_id("sgd"), params, grads, m, [], [], teacher,
                               [FIRST, 0, FIRST, 0, FIRST, 0], [], optim_ops.hyper("sgd", **SGD_HYPER),
                               []).tolist()
    assert [sgd[i * ew + FIELDS["flags"]] for i in range(n)] == [FIRST, 0] * 3


SGD_HYPER = dict(lr=0.05, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False,
                 teacher_momentum=0.99)
SGD_OP_CASES = [  # momentum, dampening, nesterov, weight_decay, maximize
    (0.0, 0.0, False, 0.0, False), (0.9, 0.0, False, 0.0, False), (0.9, 0.0, True, 1e-3, False),
    (0.8, 0.1, False, 5e-4, True)]


def sgd_hyper(case, teacher_momentum=0.99):
    momentum, dampening, nesterov, weight_decay, maximize = case
    return dict(lr=0.05, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
                maximize=maximize, teacher_momentum=teacher_momentum)


@pytest.mark.parametrize("hyper", SGD_OP_CASES, ids=str)
@pytest.mark.parametrize("dtype,teacher_dtype", [(torch.float32, torch.float32), (torch.float32, None),
                                                 (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)],
                         ids=str)
def test_sgd_step_is_the_cpp_kernels(hyper, dtype, teacher_dtype):
    momentum = hyper[0]
    params, grads, st, teacher = lists(SHAPES, dtype, teacher_dtype, 1 if momentum else 0)
    first = [FIRST * (i % 2) for i in range(len(params))] if momentum else []
    ours = [[t.clone() for t in x] for x in (params, *st, teacher)]
    theirs = [[t.cpu().clone() for t in x] for x in (params, *st, teacher)]
    for lst, gr, backend in ((ours, grads, "triton"), (theirs, [g.cpu() for g in grads], "cpu")):
        step("sgd", backend, lst[0], gr, [lst[1]] if momentum else [], lst[-1] if teacher else [], first,
             **sgd_hyper(hyper))
    assert_same(ours, theirs)


ADAMW_OP_CASES = [  # beta1, beta2, eps, weight_decay, amsgrad, maximize
    (0.9, 0.999, 1e-8, 0.01, False, False), (0.9, 0.99, 1e-8, 0.05, True, True),
    (0.3, 0.9, 1e-6, 0.0, False, False)]  # beta1 < 0.5: torch's other lerp form


def adamw_hyper(case, teacher_momentum=0.995):
    beta1, beta2, eps, weight_decay, amsgrad, maximize = case
    return dict(lr=1e-3, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                maximize=maximize, teacher_momentum=teacher_momentum)


@pytest.mark.parametrize("hyper", ADAMW_OP_CASES, ids=str)
@pytest.mark.parametrize("dtype,teacher_dtype", [(torch.float32, torch.float32), (torch.bfloat16, None),
                                                 (torch.float16, torch.float32)], ids=str)
def test_adamw_step_is_the_cpp_kernels(hyper, dtype, teacher_dtype):
    amsgrad = hyper[4]
    params, grads, st, teacher = lists(SHAPES, dtype, teacher_dtype, 3 if amsgrad else 2)
    n = len(params)
    ours = [[t.clone() for t in x] for x in (params, *st, teacher)]
    theirs = [[t.cpu().clone() for t in x] for x in (params, *st, teacher)]
    for lst, gr, backend in ((ours, grads, "triton"), (theirs, [g.cpu() for g in grads], "cpu")):
        steps = [torch.tensor(float(k)) for k in range(n)]
        step("adamw", backend, lst[0], gr, lst[1:4] if amsgrad else lst[1:3], lst[-1] if teacher else [], [],
             steps, **adamw_hyper(hyper))
        assert [s.item() for s in steps] == [k + 1.0 for k in range(n)]  # advanced by the step
    assert_same(ours, theirs)


LARS_OP_CASES = [("simclr", 0.0, False), ("you2017", 0.0, False), ("you2017", 0.1, False),
                 ("you2017", 0.0, True)]  # formula, dampening, nesterov


@pytest.mark.parametrize("formula,dampening,nesterov", LARS_OP_CASES, ids=str)
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("dtype,teacher_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                 (torch.float16, None)], ids=str)
def test_lars_step_agrees_with_the_cpp_kernels(dtype, teacher_dtype, maximize, formula, dampening, nesterov):
    params, grads, (bufs,), teacher = lists(SHAPES, dtype, teacher_dtype, 1)
    n = len(params)
    flags = [(ADAPT if p.dim() > 1 or p.numel() > 100 else 0) | FIRST * (i % 2) for i, p in enumerate(params)]
    ours = [[t.clone() for t in x] for x in (params, bufs, teacher)]
    theirs = [[t.cpu().clone() for t in x] for x in (params, bufs, teacher)]
    hyper = dict(lr=0.1, momentum=0.9, dampening=dampening, nesterov=nesterov, weight_decay=1e-4,
                 trust_coefficient=0.02, maximize=maximize, teacher_momentum=0.99)
    for lst, gr, backend in ((ours, grads, "triton"), (theirs, [g.cpu() for g in grads], "cpu")):
        step(f"lars_{formula}", backend, lst[0], gr, [lst[1]], lst[2] if teacher else [], flags, **hyper)
    # Norms summed in another order: factors agree to float32 rounding, so a 16-bit value may
    # round the other way (one 16-bit ulp), a float32 one differ in its last bits.
    for a_list, b_list in zip(ours, theirs):
        for a, b in zip(a_list, b_list):
            tol = dict(rtol=1e-5, atol=1e-6) if a.dtype == torch.float32 else dict(rtol=2**-7, atol=1e-3)
            torch.testing.assert_close(a.cpu(), b, **tol)
    for i in range(n):  # tensors not adapted (no norms involved) are bit-identical on the interpreter
        if INTERPRETED and not flags[i] & ADAPT:
            assert torch.equal(bits(ours[0][i].cpu()), bits(theirs[0][i]))


def test_many_tensors_in_one_launch():
    params, grads, (bufs,), teacher = lists([(i % 13 + 1,) for i in range(1200)], torch.float32, torch.float32, 1)
    ours = [[t.clone() for t in x] for x in (params, bufs, teacher)]
    theirs = [[t.cpu().clone() for t in x] for x in (params, bufs, teacher)]
    for lst, gr, backend in ((ours, grads, "triton"), (theirs, [g.cpu() for g in grads], "cpu")):
        step("sgd", backend, lst[0], gr, [lst[1]], lst[2], [0] * 1200, **{**SGD_HYPER, "lr": 0.1, "teacher_momentum": 0.9})
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
    with pytest.raises(NotImplementedError, match=r"\(LARS, capturable\) has no 'triton' kernel"):
        optim.LARS(params, backend="triton", capturable=True)
    with pytest.raises(NotImplementedError, match="capturable\\) has no 'triton' kernel"):
        optim.AdamW(params, backend="triton", capturable=True)
    with pytest.raises(ValueError, match="unknown backend"):
        optim.SGD(params, lr=0.1, backend="tpu")


@pytest.mark.parametrize("break_it,error,match", [
    (lambda p, g, b, t: g.pop(), ValueError, "grads has 2 tensors"),
    (lambda p, g, b, t: p.__setitem__(1, p[1].bfloat16()), TypeError, "one param dtype per call"),
    (lambda p, g, b, t: t.__setitem__(1, p[1]), ValueError, r"teacher\[1\] overlaps params\[1\]"),
    (lambda p, g, b, t: b.__setitem__(0, torch.zeros(4, device=DEVICE)), ValueError, "has shape"),
])
def test_bad_input_raises_before_any_write(break_it, error, match):
    p, g, (b,), t = lists([(5,), (6,), (7,)], torch.float32, torch.float32, 1)
    break_it(p, g, b, t)
    before = [bits(x.cpu()) for x in (*p, *b, *t)]
    with pytest.raises(error, match=match):
        step("sgd", "triton", p, g, [b], t, [0] * len(p), **{**SGD_HYPER, "teacher_momentum": 0.9})
    assert all(torch.equal(x, bits(y.cpu())) for x, y in zip(before, (*p, *b, *t)))


def test_opcheck_triton_optimizer_ops():
    kw = {}  # every check, in the interpreter too: the op is an opaque custom op with a fake kernel
    op = ops.optim_ema_step_triton_
    p, g, (b,), t = lists([(33,), (4, 5)], torch.float32, torch.bfloat16, 1)
    torch.library.opcheck(op, (optim_ops.optimizer_id("sgd"), p, g, b, [], [], t, [FIRST, 0], [],
                               optim_ops.hyper("sgd", **{**SGD_HYPER, "nesterov": True})), **kw)
    p, g, (m, v), t = lists([(33,), (4, 5)], torch.bfloat16, torch.float32, 2)
    torch.library.opcheck(op, (optim_ops.optimizer_id("adamw"), p, g, m, v, [], t, [], [torch.tensor(1.0)] * 2,
                               optim_ops.hyper("adamw", **adamw_hyper(ADAMW_OP_CASES[0]))), **kw)
    p, g, (b,), t = lists([(33,), (4, 5)], torch.float32, torch.float32, 1)
    torch.library.opcheck(op, (optim_ops.optimizer_id("lars_you2017"), p, g, b, [], [], t, [0, ADAPT | FIRST], [],
                               optim_ops.hyper("lars", lr=0.1, momentum=0.9, dampening=0.1, nesterov=False,
                                               weight_decay=1e-4, trust_coefficient=0.001, maximize=False,
                                               teacher_momentum=0.9)), **kw)


@needs_cuda_backend
def test_triton_and_cuda_kernels_agree_on_the_gpu():
    params, grads, (m, v), teacher = lists(SHAPES, torch.float32, torch.float32, 2)
    n = len(params)
    a = [[t.clone() for t in x] for x in (params, m, v, teacher)]
    b = [[t.clone() for t in x] for x in (params, m, v, teacher)]
    for lst, backend in ((a, "triton"), (b, "cuda")):
        step("adamw", backend, lst[0], grads, lst[1:3], lst[3], [], [torch.tensor(float(k)) for k in range(n)],
             **adamw_hyper(ADAMW_OP_CASES[0], 0.99))
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            torch.testing.assert_close(s, t, rtol=1e-5, atol=1e-6)


def test_the_table_is_staged_through_pinned_memory_without_blocking(monkeypatch):
    """The Triton path asks the C++ table op for page-locked memory when the params are on a GPU
    and copies the table with non_blocking=True, as the CUDA C++ path does."""
    seen = {}
    table_op = ops._optim_ema_table

    def recording_table(*args, pinned=False):
        seen["pinned"] = pinned
        return table_op(*args, pinned=False)  # (no page-locked memory without a GPU)

    class FakeTable:
        def to(self, device, non_blocking=False):
            seen["to"] = (device, non_blocking)
            return self
    monkeypatch.setattr(torch.ops.eman_fused, "_optim_ema_table", recording_table)
    p, g, (b,), t = lists([(33,)], torch.float32, torch.float32, 1)
    step("sgd", "triton", p, g, [b], t, [FIRST], **SGD_HYPER)
    assert seen["pinned"] == (DEVICE == "cuda")
    assert topt.stage_table(FakeTable(), torch.device("cuda")) is not None
    assert seen["to"] == (torch.device("cuda"), True)


@pytest.mark.skipif(not HAS_GPU, reason="page-locked memory needs a GPU")
def test_the_triton_table_is_pinned_on_the_gpu(monkeypatch):
    staged = []
    real = topt.stage_table
    monkeypatch.setattr(topt, "stage_table", lambda table, device: staged.append(table) or real(table, device))
    p, g, (b,), t = lists([(33,)], torch.float32, torch.float32, 1)
    step("sgd", "triton", p, g, [b], t, [FIRST], **SGD_HYPER)
    assert staged and staged[0].is_pinned()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU or "triton" not in AVAILABLE, reason="needs a GPU and Triton")
def test_triton_step_refuses_cuda_graph_capture():
    """Its table is copied from the host at each step: a graph would replay a stale copy."""
    p, g, (b,), t = lists([(33,), (4, 5)], torch.float32, torch.float32, 1)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured"):
        with torch.cuda.graph(graph):
            step("sgd", "triton", p, g, [b], t, [0] * len(p), **{**SGD_HYPER, "teacher_momentum": 0.9})
