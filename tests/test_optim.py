"""Fused optimizers (SGD, AdamW + EMA teacher) against torch.optim + the official EMAN update."""
import copy

import pytest
import torch
from torch import nn

import eman_fused
from eman_fused import EMATeacher, optim, schedules

from conftest import bits, needs_cuda_backend

STEPS = 50


def make_model():
    torch.manual_seed(0)
    # No bias before a BatchNorm: its gradient is rounding noise, which Adam amplifies into
    # lr-sized steps, so two correct implementations would drift apart there.
    return nn.Sequential(nn.Linear(6, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def groups(model, **second):
    return [{"params": [*model[0].parameters(), *model[1].parameters()]},
            {"params": [*model[3].parameters(), *model[4].parameters(), *model[6].parameters()], **second}]


def official_eman_update(teacher, student, m):
    with torch.no_grad():
        for (k, t), s in zip(teacher.state_dict().items(), student.state_dict().values()):
            t.copy_(s) if "num_batches_tracked" in k else t.copy_(t * m + (1 - m) * s)


def batches(n=STEPS):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)) for _ in range(n)]


def train(model, opt, data, after_step=None, scheduler=None, sign=1.0):
    for x, y in data:
        opt.zero_grad()
        (sign * nn.functional.mse_loss(model(x), y)).backward()  # sign -1 with maximize=True
        opt.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step()


def assert_close_states(a: dict, b: dict, rtol=1e-5, atol=1e-6):
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


SGD_CASES = [
    dict(lr=0.05),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=5e-4, maximize=False),
    dict(lr=0.02, momentum=0.9, maximize=True),
]
ADAMW_CASES = [
    dict(lr=0.01),
    dict(lr=0.01, amsgrad=True, weight_decay=0.05),
    dict(lr=0.005, betas=(0.5, 0.99), maximize=True),
    dict(lr=0.01, betas=(0.3, 0.9), eps=1e-6),  # beta1 < 0.5: torch's other lerp form
]


def run_pair(ours_cls, torch_cls, kwargs, second_group, teacher_m=0.9):
    data = batches()
    student, ref = make_model(), make_model()
    teacher = EMATeacher(student, momentum=teacher_m)
    ref_teacher = copy.deepcopy(ref)
    opt = ours_cls(groups(student, **second_group), teacher=teacher, **kwargs)
    ropt = torch_cls(groups(ref, **second_group), **kwargs)
    sign = -1.0 if kwargs.get("maximize") else 1.0
    train(student, opt, data, sign=sign)
    train(ref, ropt, data, lambda: official_eman_update(ref_teacher, ref, teacher_m), sign=sign)
    return student, ref, teacher, ref_teacher, opt, ropt


@pytest.mark.parametrize("kwargs", SGD_CASES, ids=str)
def test_sgd_matches_torch_and_the_teacher_matches_the_eman_loop(kwargs):
    student, ref, teacher, ref_teacher, opt, ropt = run_pair(
        optim.SGD, torch.optim.SGD, kwargs, dict(lr=0.01, weight_decay=1e-2))
    assert_close_states(student.state_dict(), ref.state_dict())
    assert_close_states(teacher.state_dict(), ref_teacher.state_dict())
    for p, q in zip(student.parameters(), ref.parameters()):
        if "momentum_buffer" in ropt.state[q]:
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], ropt.state[q]["momentum_buffer"],
                                       rtol=1e-5, atol=1e-6)
    assert teacher.num_updates == STEPS
    assert teacher.module[1].num_batches_tracked.item() == STEPS


@pytest.mark.parametrize("kwargs", ADAMW_CASES, ids=str)
def test_adamw_matches_torch_and_the_teacher_matches_the_eman_loop(kwargs):
    student, ref, teacher, ref_teacher, opt, ropt = run_pair(
        optim.AdamW, torch.optim.AdamW, kwargs, dict(lr=0.002, weight_decay=0.1))
    assert_close_states(student.state_dict(), ref.state_dict())
    assert_close_states(teacher.state_dict(), ref_teacher.state_dict())
    for p, q in zip(student.parameters(), ref.parameters()):
        for key in ropt.state[q]:
            torch.testing.assert_close(opt.state[p][key], ropt.state[q][key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", [(optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
                                                       (optim.AdamW, torch.optim.AdamW, dict(lr=0.01))])
def test_without_a_teacher_it_is_the_torch_optimizer(ours_cls, torch_cls, kwargs):
    data = batches(20)
    a, b = make_model(), make_model()
    train(a, ours_cls(a.parameters(), **kwargs), data)
    train(b, torch_cls(b.parameters(), **kwargs), data)
    assert_close_states(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", [(optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
                                                       (optim.AdamW, torch.optim.AdamW, dict(lr=0.01, amsgrad=True))])
def test_state_dicts_move_both_ways_with_torch(ours_cls, torch_cls, kwargs):
    data = batches(20)
    a, b = make_model(), make_model()
    ta, tb = torch_cls(a.parameters(), **kwargs), ours_cls(b.parameters(), **kwargs)
    train(a, ta, data[:10])
    b.load_state_dict(a.state_dict())
    tb.load_state_dict(copy.deepcopy(ta.state_dict()))  # torch -> ours (a saved copy), then both continue
    train(a, ta, data[10:])
    train(b, tb, data[10:])
    assert_close_states(a.state_dict(), b.state_dict())
    back = torch_cls(a.parameters(), **kwargs)
    back.load_state_dict(copy.deepcopy(tb.state_dict()))  # ours -> torch
    assert back.state_dict()["param_groups"] == ta.state_dict()["param_groups"]


def test_lr_scheduler_drives_the_fused_step():
    data = batches(30)
    a, b = make_model(), make_model()
    oa, ob = optim.SGD(a.parameters(), lr=0.1, momentum=0.9), torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    train(a, oa, data, scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(oa, T_max=30))
    train(b, ob, data, scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(ob, T_max=30))
    assert oa.param_groups[0]["lr"] == ob.param_groups[0]["lr"]
    assert_close_states(a.state_dict(), b.state_dict())


def test_params_without_grad_are_still_averaged_into_the_teacher():
    student = make_model()
    student[0].weight.requires_grad_(False)  # frozen: no grad, but the teacher follows it
    teacher = EMATeacher(student, momentum=0.5)
    opt = optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1, teacher=teacher)
    before = teacher.module[0].weight.clone()
    with torch.no_grad():
        student[0].weight.add_(1.0)
    x, y = batches(1)[0]
    nn.functional.mse_loss(student(x), y).backward()
    opt.step()
    torch.testing.assert_close(teacher.module[0].weight, 0.5 * before + 0.5 * student[0].weight)
    torch.testing.assert_close(teacher.module[6].weight, 0.5 * make_model()[6].weight + 0.5 * student[6].weight)


def test_teacher_momentum_schedule_overrides_the_teachers():
    data = batches(5)
    student, ref = make_model(), make_model()
    schedule = schedules.MeanTeacherRamp(0.99)
    teacher = EMATeacher(student, momentum=0.999)
    ref_teacher = copy.deepcopy(ref)
    opt = optim.SGD(student.parameters(), lr=0.05, teacher=teacher, teacher_momentum=schedule)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.05)
    train(student, opt, data)
    step = iter(range(5))
    train(ref, ropt, data, lambda: official_eman_update(ref_teacher, ref, schedule(next(step))))
    assert_close_states(teacher.state_dict(), ref_teacher.state_dict())


def test_a_teacher_of_another_model_is_refused():
    student, other = make_model(), make_model()
    teacher = EMATeacher(other)
    with pytest.raises(ValueError, match="not a parameter of the teacher's student"):
        optim.SGD(student.parameters(), lr=0.1, teacher=teacher)
    opt = optim.AdamW(student.parameters(), lr=0.1, teacher=EMATeacher(student))
    with pytest.raises(ValueError, match="not a parameter of the teacher's student"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    with pytest.raises(TypeError, match="EMATeacher"):
        optim.SGD(student.parameters(), lr=0.1, teacher=copy.deepcopy(student))


def op_args_sgd(n=3, dtype=torch.float32, teacher=True):
    torch.manual_seed(0)
    p = [torch.randn(5 + i, dtype=dtype) for i in range(n)]
    g = [torch.randn_like(x) for x in p]
    b = [torch.randn_like(x) for x in p]
    t = [torch.randn_like(x) for x in p] if teacher else []
    return p, g, b, t


@pytest.mark.parametrize("break_it,error,match", [
    (lambda p, g, b, t: g.pop(), ValueError, "grads has 2 tensors"),
    (lambda p, g, b, t: p.__setitem__(1, p[1].double()), TypeError, "float32"),
    (lambda p, g, b, t: t.__setitem__(2, t[2].double()), TypeError, "teachers must be"),
    (lambda p, g, b, t: b.__setitem__(0, torch.zeros(4)), ValueError, r"momentum_buffers\[0\] has shape"),
    (lambda p, g, b, t: t.__setitem__(1, p[1]), ValueError, "is params"),
    (lambda p, g, b, t: g.__setitem__(2, torch.randn(14)[::2]), ValueError, "strides"),
])
def test_bad_input_raises_before_any_write(break_it, error, match):
    p, g, b, t = op_args_sgd()
    break_it(p, g, b, t)
    before = [bits(x) for x in (*p, *b, *t)]
    with pytest.raises(error, match=match):
        torch.ops.eman_fused.sgd_ema_step_(p, g, b, t, [0] * len(p), 0.1, 0.9, 0.0, False, 0.0, False, 0.9)
    assert all(torch.equal(x, bits(y)) for x, y in zip(before, (*p, *b, *t)))


def test_bad_hyper_parameters_raise():
    p, g, b, t = op_args_sgd()
    with pytest.raises(ValueError, match="teacher_momentum"):
        torch.ops.eman_fused.sgd_ema_step_(p, g, b, t, [0] * 3, 0.1, 0.9, 0.0, False, 0.0, False, 1.5)
    with pytest.raises(ValueError, match="beta1"):
        torch.ops.eman_fused.adamw_ema_step_(p, g, b, [x.clone() for x in b], [], t, [0.1] * 3, [1.0] * 3,
                                             0.1, 1.0, 0.99, 1e-8, 0.0, False, False, 0.9)


def test_bf16_and_fp16_teachers():
    for dtype in (torch.bfloat16, torch.float16):
        p, g, b, t = op_args_sgd()
        t = [x.to(dtype) for x in t]
        expected = [(0.9 * x.float() + 0.1 * (y - 0.1 * gg)).to(dtype) for x, y, gg in zip(t, p, g)]
        torch.ops.eman_fused.sgd_ema_step_(p, g, [], t, [], 0.1, 0.0, 0.0, False, 0.0, False, 0.9)
        for a, e in zip(t, expected):
            torch.testing.assert_close(a, e, **eman_fused.reference.TOLERANCES[dtype])


def test_opcheck_on_both_ops():
    p, g, b, t = op_args_sgd()
    torch.library.opcheck(torch.ops.eman_fused.sgd_ema_step_.default,
                          (p, g, b, t, [1, 0, 0], 0.1, 0.9, 0.0, True, 1e-4, False, 0.9))
    p, g, m, t = op_args_sgd()
    v = [x.abs() for x in m]
    torch.library.opcheck(torch.ops.eman_fused.adamw_ema_step_.default,
                          (p, g, m, v, [x.clone() for x in v], t, [0.1] * 3, [0.5] * 3, 0.1, 0.9,
                           0.999, 1e-8, 0.01, True, False, 0.9))
    p, g, b, t = op_args_sgd()
    torch.library.opcheck(torch.ops.eman_fused.lars_ema_step_.default,
                          (p, g, b, t, [1, 0, 1], [0, 1, 0], 0.1, 0.9, 1e-4, 0.001, False, 0.9))


def test_lars_matches_the_eager_reference_and_feeds_the_teacher():
    data = batches(30)
    student, ref = make_model(), make_model()
    teacher = EMATeacher(student, momentum=0.9)
    ref_teacher = copy.deepcopy(ref)
    opt = optim.LARS(student.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3,
                     trust_coefficient=0.02, teacher=teacher)
    train(student, opt, data)
    state = {}
    for x, y in data:
        for p in ref.parameters():
            p.grad = None
        nn.functional.mse_loss(ref(x), y).backward()
        eman_fused.reference.lars_step_(list(ref.parameters()), state, 0.5, 0.9, 1e-3, 0.02)
        official_eman_update(ref_teacher, ref, 0.9)
    assert_close_states(student.state_dict(), ref.state_dict(), rtol=1e-4, atol=1e-5)
    assert_close_states(teacher.state_dict(), ref_teacher.state_dict(), rtol=1e-4, atol=1e-5)


def test_lars_trust_ratio_of_one_step_by_hand():
    p = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |p| = 5
    p.grad = torch.tensor([[0.0, 1.0]])
    opt = optim.LARS([p], lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=0.1)
    opt.step()  # d = g * 0.1 * 5 / 1 = [0, 0.5]; buf = d; p -= buf
    torch.testing.assert_close(p.detach(), torch.tensor([[3.0, 3.5]]))
    b = nn.Parameter(torch.tensor([1.0, 2.0]))  # 1-D: excluded, plain momentum SGD
    b.grad = torch.tensor([1.0, 1.0])
    optim.LARS([b], lr=0.5, weight_decay=1.0, trust_coefficient=0.1).step()
    torch.testing.assert_close(b.detach(), torch.tensor([0.5, 1.5]))


@needs_cuda_backend
@pytest.mark.parametrize("cls,kwargs", [(optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
                                        (optim.AdamW, dict(lr=0.01, amsgrad=True)),
                                        (optim.LARS, dict(lr=0.5, weight_decay=1e-3, trust_coefficient=0.02))])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_the_cpu_kernels(cls, kwargs, teacher_dtype):
    data = batches(10)
    results = []
    for device in ("cpu", "cuda"):
        student = make_model().to(device)
        teacher = EMATeacher(student, momentum=0.9, teacher_dtype=teacher_dtype)
        opt = cls(student.parameters(), teacher=teacher, **kwargs)
        train(student, opt, [(x.to(device), y.to(device)) for x, y in data])
        results.append(({k: v.cpu() for k, v in student.state_dict().items()},
                        {k: v.cpu() for k, v in teacher.state_dict().items()}))
    assert_close_states(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    assert_close_states(results[1][1], results[0][1], rtol=2e-2 if teacher_dtype == torch.bfloat16 else 1e-4,
                        atol=1e-5)


@pytest.mark.parametrize("cls,kwargs", [(optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
                                        (optim.AdamW, dict(lr=0.01, amsgrad=True, weight_decay=0.05)),
                                        (optim.LARS, dict(lr=0.5, weight_decay=1e-3, trust_coefficient=0.02))])
def test_capturable_gives_the_same_steps_and_teacher(cls, kwargs):
    data = batches(20)
    schedule = schedules.CosineToOne(0.9, 20)
    runs = []
    for capturable in (False, True):
        student = make_model()
        teacher = EMATeacher(student, schedule=schedule, capturable=capturable)
        opt = cls(groups(student, lr=0.002), teacher=teacher, capturable=capturable, **kwargs)
        train(student, opt, data)
        runs.append((student.state_dict(), teacher.state_dict(), teacher.num_updates))
    assert_close_states(runs[1][0], runs[0][0])
    assert_close_states(runs[1][1], runs[0][1])
    assert runs[0][2] == runs[1][2] == 20


@pytest.mark.parametrize("cls", [optim.SGD, optim.AdamW, optim.LARS])
def test_capturable_step_reads_no_value_on_the_host(cls, monkeypatch):
    student = make_model()
    teacher = EMATeacher(student, schedule=schedules.MeanTeacherRamp(0.99), capturable=True)
    opt = cls(student.parameters(), lr=torch.tensor(0.01), teacher=teacher, capturable=True,
              **({"momentum": 0.9} if cls is not optim.AdamW else {}))
    data = batches(3)
    train(student, opt, data[:1])  # state and device scalars exist from here on

    def refuse(*args, **kwargs):
        raise AssertionError("a host read of a tensor value in the capturable step")
    x, y = data[1]
    opt.zero_grad()
    nn.functional.mse_loss(student(x), y).backward()
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    opt.step()  # the Python side of the step: no .item(), .tolist(), float(), bool() on tensors
    monkeypatch.undo()
    assert teacher.num_updates == 2


def test_a_tensor_lr_follows_the_scheduler_in_capturable_mode():
    data = batches(10)
    a, b = make_model(), make_model()
    oa = optim.AdamW(a.parameters(), lr=torch.tensor(0.01), capturable=True)
    ob = optim.AdamW(b.parameters(), lr=0.01)
    train(a, oa, data, scheduler=torch.optim.lr_scheduler.StepLR(oa, step_size=3, gamma=0.5))
    train(b, ob, data, scheduler=torch.optim.lr_scheduler.StepLR(ob, step_size=3, gamma=0.5))
    assert_close_states(a.state_dict(), b.state_dict())


def test_capturable_optimizer_and_teacher_must_agree():
    student = make_model()
    with pytest.raises(ValueError, match="capturable=True optimizer needs an EMATeacher"):
        optim.SGD(student.parameters(), lr=0.1, teacher=EMATeacher(student), capturable=True)
    with pytest.raises(ValueError, match="capturable=False optimizer needs"):
        optim.AdamW(student.parameters(), teacher=EMATeacher(student, capturable=True))


def test_opcheck_capturable_overloads():
    p, g, b, t = op_args_sgd()
    lr, mt = torch.tensor(0.1), torch.tensor(0.9)
    torch.library.opcheck(torch.ops.eman_fused.sgd_ema_step_.capturable,
                          (p, g, b, t, [1, 0, 0], lr, 0.9, 0.0, False, 1e-4, False, mt))
    p, g, m, t = op_args_sgd()
    v = [x.abs() for x in m]
    steps = [torch.tensor(3.0) for _ in p]
    torch.library.opcheck(torch.ops.eman_fused.adamw_ema_step_.capturable,
                          (p, g, m, v, [], t, steps, lr, 0.9, 0.999, 1e-8, 0.01, False, False, mt))
    p, g, b, t = op_args_sgd()
    torch.library.opcheck(torch.ops.eman_fused.lars_ema_step_.capturable,
                          (p, g, b, t, [1, 0, 1], [0, 1, 0], lr, 0.9, 1e-4, 0.001, False, mt))
    with pytest.raises(TypeError, match="lr must be float32"):
        torch.ops.eman_fused.sgd_ema_step_.capturable(p, g, b, t, [0] * 3, torch.tensor(0.1, dtype=torch.float64),
                                                      0.9, 0.0, False, 0.0, False, mt)
    with pytest.raises(ValueError, match="teacher_momentum"):
        torch.ops.eman_fused.sgd_ema_step_.capturable(p, g, b, t, [0] * 3, lr, 0.9, 0.0, False, 0.0, False,
                                                      torch.tensor(1.5))


@needs_cuda_backend
@pytest.mark.parametrize("cls,kwargs", [(optim.SGD, dict(momentum=0.9)), (optim.AdamW, dict(amsgrad=True)),
                                        (optim.LARS, dict(trust_coefficient=0.02))])
def test_capturable_step_replays_in_a_cuda_graph(cls, kwargs):
    data = [(x.cuda(), y.cuda()) for x, y in batches(8)]
    schedule = schedules.CosineToOne(0.9, 8)
    runs = []
    for use_graph in (False, True):
        student = make_model().cuda()
        teacher = EMATeacher(student, schedule=schedule, capturable=True)
        lr = torch.tensor(0.01, device="cuda")
        opt = cls(student.parameters(), lr=lr, teacher=teacher, capturable=True, **kwargs)
        train(student, opt, data[:2])  # warm-up: state, buffers and device tables exist
        if use_graph:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
        for x, y in data[2:]:
            for p in student.parameters():
                p.grad = None if not use_graph else p.grad
            loss = nn.functional.mse_loss(student(x), y)
            grads = torch.autograd.grad(loss, list(student.parameters()))
            for p, g in zip(student.parameters(), grads):
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.copy_(g)  # the graph reads the same grad tensors
            graph.replay() if use_graph else opt.step()
            lr.mul_(0.9)  # a schedule moving a device scalar between replays
        torch.cuda.synchronize()
        runs.append(({k: v.cpu() for k, v in student.state_dict().items()},
                     {k: v.cpu() for k, v in teacher.state_dict().items()}))
    assert_close_states(runs[1][0], runs[0][0], rtol=1e-4, atol=1e-5)
    assert_close_states(runs[1][1], runs[0][1], rtol=1e-4, atol=1e-5)
