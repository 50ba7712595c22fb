"""The fused optimizers as drop-ins for torch.optim: every keyword and input torch takes (with
torch's errors for invalid values), all-or-nothing steps, one teacher semantics with ema_update_,
memory-overlap checks, and both LARS formulas against their eager transcriptions."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import eman_fused
from eman_fused import EMATeacher, optim, reference
from eman_fused.teacher import StructureMismatchError
from eman_fused.ops import optim as optim_ops

from conftest import AVAILABLE, bits

FIRST, ADAPT = optim_ops.layout.OPTIM["flag_first"], optim_ops.layout.OPTIM["flag_adapt"]
TORCH = {optim.SGD: torch.optim.SGD, optim.AdamW: torch.optim.AdamW}


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def two_groups(model, **second):
    return [{"params": [*model[0].parameters(), *model[1].parameters()]},
            {"params": list(model[3].parameters()), **second}]


def fixed_grads(model, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def snapshot(model, opt, teacher=None):
    """Bits of everything a step may write: params, grads, optimizer state, teacher, counters."""
    out = {f"p{i}": bits(p) for i, p in enumerate(model.parameters())}
    out.update({f"g{i}": bits(p.grad) for i, p in enumerate(model.parameters()) if p.grad is not None})
    for i, p in enumerate(model.parameters()):
        for k, v in opt.state.get(p, {}).items():
            out[f"s{i}.{k}"] = bits(v)
    out["state_keys"] = sorted((i, tuple(sorted(opt.state[p]))) for i, p in enumerate(model.parameters())
                               if p in opt.state)
    if teacher is not None:
        out.update({f"t.{k}": bits(v) for k, v in teacher.state_dict().items()})
        out["updates"] = teacher.num_updates
    return out


def assert_snapshot_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]), k


# --- 2. Every torch keyword and input.

@pytest.mark.parametrize("cls,kwargs", [(optim.SGD, dict(lr=0.05, momentum=0.9)),
                                        (optim.AdamW, dict(lr=0.01, amsgrad=True))], ids=str)
@pytest.mark.parametrize("flags", [dict(foreach=True), dict(foreach=False), dict(fused=True), dict(fused=False),
                                   dict(foreach=None, fused=None)], ids=str)
def test_foreach_and_fused_are_accepted_and_change_nothing(cls, kwargs, flags):
    runs = []
    for extra in ({}, flags):
        model = make_model()
        opt = cls(model.parameters(), **kwargs, **extra)
        for step in range(3):
            fixed_grads(model, step)
            opt.step()
        runs.append([bits(p) for p in model.parameters()])
        assert not opt._step_supports_amp_scaling  # GradScaler unscales for us (we take no scale)
        for k, v in extra.items():
            assert opt.param_groups[0][k] == v  # kept in param_groups, as torch keeps them
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("cls", [optim.SGD, optim.AdamW])
def test_differentiable_raises_and_says_why(cls):
    with pytest.raises(NotImplementedError, match="differentiable=True.*below autograd"):
        cls(make_model().parameters(), lr=0.1, differentiable=True)


INVALID = [
    (optim.SGD, dict(lr=-1.0)), (optim.SGD, dict(lr=0.1, momentum=-0.5)),
    (optim.SGD, dict(lr=0.1, weight_decay=-1.0)), (optim.SGD, dict(lr=0.1, nesterov=True)),
    (optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)),
    (optim.SGD, dict(lr=torch.tensor([0.1, 0.2]))), (optim.SGD, dict(lr=0.1, fused=True, foreach=True)),
    (optim.AdamW, dict(lr=-1e-3)), (optim.AdamW, dict(eps=-1.0)), (optim.AdamW, dict(betas=(1.0, 0.999))),
    (optim.AdamW, dict(betas=(0.9, -0.1))), (optim.AdamW, dict(weight_decay=-0.1)),
    (optim.AdamW, dict(betas=(torch.tensor(0.9), 0.999))),
    (optim.AdamW, dict(lr=torch.tensor(1e-3), foreach=True)),
    (optim.AdamW, dict(betas=(torch.tensor(0.9), torch.tensor(0.999)), foreach=True)),
    (optim.AdamW, dict(lr=torch.tensor([1e-3, 1e-3]))), (optim.AdamW, dict(fused=True, foreach=True)),
]


@pytest.mark.parametrize("cls,kwargs", INVALID, ids=str)
def test_invalid_values_raise_torchs_errors(cls, kwargs):
    with pytest.raises(Exception) as theirs:
        TORCH[cls](make_model().parameters(), **kwargs)
    with pytest.raises(type(theirs.value)) as ours:
        cls(make_model().parameters(), **kwargs)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("cls,kwargs", [
    (optim.SGD, dict(lr=torch.tensor(0.05), momentum=0.9, weight_decay=1e-3)),
    (optim.AdamW, dict(lr=torch.tensor(0.01), betas=(torch.tensor(0.8), torch.tensor(0.99)))),
    (optim.AdamW, dict(lr=torch.tensor(0.01), betas=(torch.tensor(0.8), torch.tensor(0.99)), capturable=True)),
], ids=str)
def test_tensor_hyper_parameters_match_torch(cls, kwargs):
    a, b = make_model(), make_model()
    ours = cls(a.parameters(), **kwargs)
    theirs = TORCH[cls](b.parameters(), **{k: v for k, v in kwargs.items() if k != "capturable"})
    for step in range(5):
        fixed_grads(a, step)
        fixed_grads(b, step)
        ours.step()
        theirs.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls,kwargs", [(optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
                                        (optim.AdamW, dict(lr=0.01, amsgrad=True)),
                                        (optim.LARS, dict(lr=0.1, trust_coefficient=0.01))], ids=str)
def test_grads_of_any_strides(cls, kwargs):
    """p.grad with other strides than p (a transposed or expanded view), as torch.optim takes."""
    runs = []
    for strided in (False, True):
        p = nn.Parameter(torch.arange(6.0).reshape(2, 3) / 7)
        q = nn.Parameter(torch.arange(8.0).reshape(2, 2, 2) / 5)
        opt = cls([p, q], **kwargs)
        for step in range(3):
            g = torch.ones(3, 2) * (step + 1)
            h = torch.linspace(-1, 1, 8).reshape(2, 2, 2) * (step + 1)
            p.grad = g.t() if strided else g.t().contiguous()  # same shape and values, strides (1, 2)
            q.grad = h.transpose(0, 2).contiguous().transpose(0, 2) if strided else h
            opt.step()
        runs.append((p.detach().clone(), q.detach().clone()))
        assert p.grad.stride() == ((1, 2) if strided else (3, 1))  # the caller's grad is untouched
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    if cls in TORCH:  # and torch agrees
        p = nn.Parameter(torch.arange(6.0).reshape(2, 3) / 7)
        ref = TORCH[cls]([p], **kwargs)
        for step in range(3):
            p.grad = (torch.ones(3, 2) * (step + 1)).t()
            ref.step()
        torch.testing.assert_close(p.detach(), runs[0][0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls,kwargs", [(optim.SGD, dict(lr=0.05, momentum=0.9, fused=True)),
                                        (optim.AdamW, dict(lr=0.01, amsgrad=True, foreach=True)),
                                        (optim.AdamW, dict(lr=torch.tensor(0.01), betas=(torch.tensor(0.9),
                                                                                          torch.tensor(0.99))))],
                         ids=str)
def test_torch_checkpoints_load_into_ours_and_back(cls, kwargs):
    a, b = make_model(), make_model()
    theirs = TORCH[cls](a.parameters(), **kwargs)
    for step in range(3):
        fixed_grads(a, step)
        theirs.step()
    ours = cls(b.parameters(), **kwargs)
    b.load_state_dict(a.state_dict())
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert ours.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]
    back = TORCH[cls](a.parameters(), **kwargs)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    assert back.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]
    for p, q in zip(a.parameters(), b.parameters()):
        for k, v in theirs.state[p].items():
            assert torch.equal(back.state[p][k], v) and torch.equal(ours.state[q][k].cpu(), v.cpu()), k


# --- 3. All or nothing.

# Each fault changes one thing a step reads and returns how to undo it.

def _set_group(opt, key, value):
    old = opt.param_groups[1][key]
    opt.param_groups[1][key] = value
    return lambda: opt.param_groups[1].__setitem__(key, old)


def _set_data(t, value):
    old = t.data
    t.data = value  # the same tensor object: the teacher and optimizer keep following it
    return lambda: setattr(t, "data", old)


def nan_lr_in_second_group(opt, model, teacher):
    return _set_group(opt, "lr", float("nan"))


def negative_weight_decay_in_second_group(opt, model, teacher):
    return _set_group(opt, "weight_decay", -1.0)


def wrong_shape_teacher_param(opt, model, teacher):
    return _set_data(teacher.module[3].weight, torch.zeros(2, 2))


def wrong_dtype_teacher_param(opt, model, teacher):
    return _set_data(teacher.module[3].weight, teacher.module[3].weight.data.to(torch.int32))


def wrong_shape_teacher_buffer(opt, model, teacher):
    return _set_data(teacher.module[1].running_mean, torch.zeros(3))


def teacher_overlapping_another_param(opt, model, teacher):
    return _set_data(teacher.module[3].weight, model[0].weight.data.view(-1)[:48].view(3, 16))


def teacher_overlapping_a_grad(opt, model, teacher):
    return _set_data(teacher.module[3].weight, model[0].weight.grad.view(-1)[:48].view(3, 16))


def _state_key(opt, p):
    return next(k for k in ("momentum_buffer", "exp_avg") if k in opt.state[p])


def teacher_overlapping_state(opt, model, teacher):
    buf = opt.state[model[0].weight][_state_key(opt, model[0].weight)]
    return _set_data(teacher.module[3].weight, buf.view(-1)[:48].view(3, 16))


def state_of_wrong_shape(opt, model, teacher):
    state, key = opt.state[model[3].weight], _state_key(opt, model[3].weight)
    old = state[key]
    state[key] = torch.zeros(5)  # e.g. a checkpoint of another model
    return lambda: state.__setitem__(key, old)


NEEDS_STATE = (teacher_overlapping_state, state_of_wrong_shape)


def overlap(a, b):
    """The overlap message naming lists a and b, in either order."""
    return rf"({a})\[\d+\] overlaps ({b})\[\d+\]|({b})\[\d+\] overlaps ({a})\[\d+\]"



FAULTS = [(nan_lr_in_second_group, ValueError, "lr must be finite"),
          (negative_weight_decay_in_second_group, ValueError, "weight_decay must be >= 0"),
          (wrong_shape_teacher_param, ValueError, "shape"),
          # (a teacher that re-matches its student first, when any module was built since, refuses
          # the same tensor as a StructureMismatchError: also before any write)
          (wrong_dtype_teacher_param, (TypeError, StructureMismatchError),
           "teachers must be float32|floating vs integer"),
          (wrong_shape_teacher_buffer, ValueError, "shapes differ|teacher shape"),
          (teacher_overlapping_another_param, ValueError, overlap("teacher", "params")),
          (teacher_overlapping_a_grad, ValueError, overlap("teacher", "grads")),
          (teacher_overlapping_state, ValueError, overlap("teacher", "momentum_buffers|exp_avgs|state")),
          (state_of_wrong_shape, ValueError, r"(momentum_buffers|exp_avgs)\[\d\] has shape")]
OPTIMIZERS = [(optim.SGD, dict(lr=0.05, momentum=0.9)), (optim.AdamW, dict(lr=0.01, amsgrad=True)),
              (optim.LARS, dict(lr=0.1, trust_coefficient=0.01, formula="you2017", dampening=0.1))]


@pytest.mark.parametrize("fault,error,match", FAULTS, ids=lambda x: getattr(x, "__name__", None))
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=str)
@pytest.mark.parametrize("first_step", [True, False], ids=["first step", "later step"])
def test_a_rejected_step_changes_nothing(cls, kwargs, fault, error, match, first_step):
    if fault in NEEDS_STATE and first_step:
        pytest.skip("no optimizer state before the first step")
    model = make_model()
    teacher = EMATeacher(model, momentum=0.9)
    opt = cls(two_groups(model, lr=kwargs["lr"] / 2), teacher=teacher, **kwargs)
    fresh_model = make_model()
    fresh_teacher = EMATeacher(fresh_model, momentum=0.9)
    fresh = cls(two_groups(fresh_model, lr=kwargs["lr"] / 2), teacher=fresh_teacher, **kwargs)
    steps = 0 if first_step else 2
    for step in range(steps):
        for m, o in ((model, opt), (fresh_model, fresh)):
            fixed_grads(m, step)
            o.step()
    fixed_grads(model, steps)
    undo = fault(opt, model, teacher)
    before = snapshot(model, opt)
    t_before = {k: bits(v) for k, v in teacher.module.state_dict().items()}
    updates = teacher.num_updates
    with pytest.raises(error, match=match):
        opt.step()
    assert_snapshot_equal(snapshot(model, opt), before)
    assert all(torch.equal(bits(v), t_before[k]) for k, v in teacher.module.state_dict().items())
    assert teacher.num_updates == updates
    # Undo the fault; the next step is what an optimizer that never saw the bad one does.
    undo()
    fixed_grads(model, steps)
    fixed_grads(fresh_model, steps)
    opt.step()
    fresh.step()
    assert_snapshot_equal(snapshot(model, opt, teacher), snapshot(fresh_model, fresh, fresh_teacher))


@given(data=st.data())
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_any_single_fault_leaves_everything_as_it_was(data):
    cls, kwargs = data.draw(st.sampled_from(OPTIMIZERS))
    fault, error, match = data.draw(st.sampled_from(FAULTS))
    steps = data.draw(st.integers(1 if fault in NEEDS_STATE else 0, 2))
    second = data.draw(st.sampled_from([{}, {"weight_decay": 0.01}, {"lr": kwargs["lr"] / 3}]))
    model = make_model(seed=data.draw(st.integers(0, 3)))
    teacher = EMATeacher(model, momentum=data.draw(st.sampled_from([0.0, 0.5, 0.99, 1.0])))
    opt = cls(two_groups(model, **second), teacher=teacher, **kwargs)
    for step in range(steps):
        fixed_grads(model, step)
        opt.step()
    fixed_grads(model, steps)
    fault(opt, model, teacher)
    before = snapshot(model, opt)
    t_before = [bits(v) for v in teacher.module.state_dict().values()]
    with pytest.raises(error, match=match):
        opt.step()
    assert_snapshot_equal(snapshot(model, opt), before)
    assert all(torch.equal(bits(v), b) for v, b in zip(teacher.module.state_dict().values(), t_before))


@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS, ids=str)
def test_a_rejected_first_step_keeps_no_state(cls, kwargs):
    model = make_model()
    opt = cls(two_groups(model, lr=float("nan")), **kwargs)
    fixed_grads(model, 0)
    with pytest.raises(ValueError, match="lr must be finite"):
        opt.step()
    assert not any(opt.state.get(p) for p in model.parameters())  # no uninitialised buffers, no counts


# --- 4. One teacher semantics: the in-step update is ema_update_ on the new params, bit for bit.

TEACHER_BACKENDS = ["cpu"] + (["triton"] if "triton" in AVAILABLE else [])


def _device(backend):
    return "cuda" if backend in ("cuda",) or (backend == "triton" and torch.cuda.is_available()) else "cpu"


# (the Triton interpreter is slow: fewer momenta there; the C++ kernels get all of them)
MOMENTA = [(b, m) for b in TEACHER_BACKENDS + (["cuda"] if "cuda" in AVAILABLE else [])
           for m in ([0.0, 1.0, 0.5, 0.999, 0.3] if b != "triton" else [0.0, 1.0, 0.999])]


@pytest.mark.parametrize("backend,m", MOMENTA, ids=str)
@pytest.mark.parametrize("name", ["sgd", "adamw", "lars_simclr", "lars_you2017"])
@pytest.mark.parametrize("param_dtype,teacher_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                       (torch.bfloat16, torch.float32), (torch.float16, torch.float16)],
                         ids=str)
def test_the_in_step_teacher_update_is_ema_update(backend, m, name, param_dtype, teacher_dtype):
    device = _device(backend)
    g = torch.Generator().manual_seed(3)
    shapes = [(5,), (20000,), (3, 7)]  # two table chunks and a tail
    params = [torch.randn(s, generator=g).to(param_dtype) for s in shapes]
    params[0][1] = float("inf")  # an inf param: momentum 1 leaves the teacher untouched
    grads = [torch.randn(s, generator=g).to(param_dtype) for s in shapes]
    teacher = [torch.randn(s, generator=g).to(teacher_dtype) for s in shapes]
    teacher[2][0, 0] = float("nan")  # momentum 0 replaces a NaN teacher (a copy, as ema_update_)
    params, grads, teacher = ([x.to(device) for x in xs] for xs in (params, grads, teacher))
    hyper = {"sgd": dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.01, maximize=False),
             "adamw": dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=False,
                           maximize=False)}.get(name, dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False,
                                                           weight_decay=1e-3, trust_coefficient=0.01,
                                                           maximize=False))
    state = dict(first_moments=[torch.zeros_like(p) for p in params],
                 second_moments=[torch.zeros_like(p) for p in params],
                 steps=[torch.tensor(0.0) for _ in params]) if name == "adamw" else (
        dict(first_moments=[torch.zeros_like(p) for p in params], flags=[ADAPT, 0, ADAPT]) if name == "lars_simclr"
        else dict(flags=[ADAPT, 0, ADAPT] if name.startswith("lars") else []))
    fused_p, fused_t = [p.clone() for p in params], [t.clone() for t in teacher]
    clone_state = lambda: {k: ([x.clone() for x in v] if k != "flags" else v) for k, v in state.items()}  # noqa: E731
    optim_ops.step_(name, fused_p, grads, teacher=fused_t, backend=backend, teacher_momentum=m, **clone_state(),
                    **hyper)
    plain_p, plain_t = [p.clone() for p in params], [t.clone() for t in teacher]
    optim_ops.step_(name, plain_p, grads, backend=backend, teacher_momentum=m, **clone_state(), **hyper)
    eman_fused.ema_update_(plain_t, plain_p, m, backend="cuda" if device == "cuda" and backend == "cuda" else
                           backend)
    for a, b in zip(fused_p, plain_p):
        assert torch.equal(bits(a), bits(b))  # the param's math does not depend on the teacher
    for a, b in zip(fused_t, plain_t):
        assert torch.equal(bits(a), bits(b))
    if m == 1.0:
        assert all(torch.equal(bits(a), bits(t)) for a, t in zip(fused_t, teacher))


def test_the_fused_teacher_follows_cosine_to_one_without_poisoning():
    """At momentum 1 (CosineToOne's end) an inf param must not reach the teacher."""
    student = nn.Sequential(nn.Linear(3, 2))
    teacher = EMATeacher(student, schedule=eman_fused.schedules.CosineToOne(0.5, 2), eman=False)
    opt = optim.SGD(student.parameters(), lr=0.1, teacher=teacher)
    for step in range(4):
        for p in student.parameters():
            p.grad = torch.ones_like(p) * (float("inf") if step == 3 else 1.0)
        opt.step()
    assert torch.isfinite(teacher.module[0].weight).all()


# --- 5. Both LARS formulas against their eager transcriptions.

def lars_groups(model):
    return [{"params": [model[0].weight, model[3].weight]},
            {"params": [model[1].weight, model[1].bias, model[3].bias], "weight_decay": 0.0, "lars_exclude": True}]


@pytest.mark.parametrize("kwargs", [
    dict(formula="you2017", momentum=0.9, dampening=0.0, weight_decay=1e-3),
    dict(formula="you2017", momentum=0.9, dampening=0.1, weight_decay=1e-3),
    dict(formula="you2017", momentum=0.9, nesterov=True, weight_decay=5e-4),
    dict(formula="you2017", momentum=0.0, weight_decay=1e-3),
    dict(formula="you2017", momentum=0.9, weight_decay=1e-3, maximize=True),
    dict(formula="simclr", momentum=0.9, weight_decay=1e-3),
    dict(formula="simclr", momentum=0.9, weight_decay=1e-3, maximize=True),
], ids=str)
@pytest.mark.parametrize("backend", TEACHER_BACKENDS)
def test_lars_formulas_match_their_eager_transcriptions(kwargs, backend):
    device = _device(backend)
    model, ref = make_model().to(device), make_model().to(device)
    teacher = EMATeacher(model, momentum=0.9)
    ref_teacher = copy.deepcopy(ref)
    opt = optim.LARS(lars_groups(model), lr=0.5, trust_coefficient=0.02, teacher=teacher, backend=backend, **kwargs)
    state = {}
    sign = -1.0 if kwargs.get("maximize") else 1.0
    for step in range(15 if backend == "cpu" else 4):  # (the Triton interpreter is slow)
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(step)).to(device)
        for m in (model, ref):
            m.zero_grad()
            (sign * m(x).square().mean()).backward()
        opt.step()
        kw = {k: v for k, v in kwargs.items() if k != "formula"}
        for group in lars_groups(ref):
            gkw = {**kw, "weight_decay": group.get("weight_decay", kw.get("weight_decay", 0.0))}
            if kwargs["formula"] == "you2017":
                reference.lars_you2017_step_(group["params"], state, 0.5, trust_coefficient=0.02,
                                             lars_exclude=group.get("lars_exclude", False), **gkw)
            else:
                gkw.pop("dampening", None), gkw.pop("nesterov", None)
                exclude = (lambda p: True) if group.get("lars_exclude") else (lambda p: p.ndim <= 1)
                reference.lars_step_(group["params"], state, 0.5, trust_coefficient=0.02, exclude=exclude, **gkw)
        reference.official_eman_update_(ref_teacher, ref, 0.9)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(teacher.state_dict().items(), ref_teacher.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_you2017_step_by_hand():
    p = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |p| = 5
    p.grad = torch.tensor([[0.0, 2.0]])  # |g| = 2
    opt = optim.LARS([p], lr=2.0, momentum=0.9, weight_decay=0.1, trust_coefficient=0.1, formula="you2017")
    opt.step()
    # local_lr = 0.1 * 5 / (2 + 0.1 * 5) = 0.2; d = (g + 0.1 p) * 2 * 0.2 = [0.12, 0.96]; buf = d; p -= d
    torch.testing.assert_close(p.detach(), torch.tensor([[2.88, 3.04]]))
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch.tensor([[0.12, 0.96]]))
    z = nn.Parameter(torch.zeros(3))  # |p| = 0: local_lr 0, no step
    z.grad = torch.ones(3)
    optim.LARS([z], lr=1.0, formula="you2017").step()
    assert torch.equal(z.detach(), torch.zeros(3))
    e = nn.Parameter(torch.tensor([1.0, 2.0]))  # lars_exclude: no trust ratio, weight decay kept
    e.grad = torch.tensor([1.0, 1.0])
    optim.LARS([{"params": [e], "lars_exclude": True}], lr=0.5, momentum=0.0, weight_decay=1.0,
               formula="you2017").step()
    torch.testing.assert_close(e.detach(), torch.tensor([0.0, 0.5]))  # p - 0.5 * (g + p)


def test_lars_arguments():
    params = [nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match="formula must be"):
        optim.LARS(params, formula="lamb")
    with pytest.raises(ValueError, match="simclr.*no dampening or nesterov"):
        optim.LARS(params, dampening=0.1)
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        optim.LARS(params, formula="you2017", momentum=0.0, nesterov=True)
    opt = optim.LARS(params, formula="you2017")
    assert opt.param_groups[0]["formula"] == "you2017" and opt.param_groups[0]["lars_exclude"] is False
