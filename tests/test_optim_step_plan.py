"""The fused optimizers' persistent step plan (csrc/optim/step_plan.h): after a checked step the
next steps run through a plan that re-checks every tensor in C++. Each test runs the same steps
on two copies, one planned and one whose every step takes the checked path, changes something
between steps, and asserts the same bits afterwards, whether the plan was kept or dropped, and
that rejected steps leave everything untouched."""
import copy

import pytest
import torch
from torch import nn

from eman_fused import EMATeacher, optim

from conftest import bits as _bits


def bits(t):
    return _bits(t).tolist()

NEVER = 10**9  # _plan_wait: checked steps before the next plan


def unplanned(opt):
    opt._plan_wait = NEVER
    return opt


def params(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (4,), (2, 3, 2), (5,), (1,), (7,)][:n]
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def set_grads(ps, seed, fresh=True):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        new = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g))  # in the param's layout
        if fresh or p.grad is None:
            p.grad = new  # a new tensor, as after zero_grad(set_to_none=True) and backward
        else:
            p.grad.copy_(new)


FACTORIES = {
    "sgd": lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd_nesterov": lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    "sgd_plain": lambda ps: optim.SGD(ps, lr=0.05),
    "adamw": lambda ps: optim.AdamW(ps, lr=1e-2, weight_decay=0.05),
    "adamw_amsgrad": lambda ps: optim.AdamW(ps, lr=1e-2, amsgrad=True, maximize=True),
    "lars": lambda ps: optim.LARS(ps, lr=0.1, weight_decay=1e-4),
    "lars_you2017": lambda ps: optim.LARS(ps, lr=0.1, weight_decay=1e-4, formula="you2017", nesterov=True),
}


class Twins:
    """The same optimizer over two copies of the params: `a` planned, `b` checked every step."""

    def __init__(self, kind, n=6, groups=None):
        self.pa, self.pb = params(n), params(n)
        make = FACTORIES[kind]
        if groups is None:
            self.a, self.b = make(self.pa), unplanned(make(self.pb))
        else:
            self.a = make([{"params": self.pa[:groups]}, {"params": self.pa[groups:], "lr": 0.02}])
            self.b = unplanned(make([{"params": self.pb[:groups]}, {"params": self.pb[groups:], "lr": 0.02}]))
        self.seed = 0

    def step(self, fresh=True):
        self.seed += 1
        for ps in (self.pa, self.pb):
            set_grads(ps, self.seed, fresh)
        self.a.step()
        self.b.step()
        self.check()

    def both(self, f):
        f(self.a, self.pa)
        f(self.b, self.pb)

    def check(self):
        for x, y in zip(self.pa, self.pb):
            assert bits(x) == bits(y)
        sa, sb = self.a.state_dict()["state"], self.b.state_dict()["state"]
        assert sa.keys() == sb.keys()
        for k in sa:
            for name in sa[k]:
                assert bits(sa[k][name]) == bits(sb[k][name]), (k, name)

    @property
    def plan(self):
        return self.a._plan


@pytest.mark.parametrize("kind", sorted(FACTORIES))
@pytest.mark.parametrize("fresh", [True, False], ids=["new_grads", "grads_in_place"])
def test_planned_steps_match_checked_steps(kind, fresh):
    t = Twins(kind, groups=3)
    t.step(fresh)
    assert t.plan is not None and getattr(t.b, '_plan', None) is None
    for _ in range(5):
        t.step(fresh)
    assert t.plan.steps == 5  # every step after the first ran through the plan


@pytest.mark.parametrize("kind", ["sgd", "adamw", "lars"])
def test_scheduled_hyper_parameters_are_read_at_every_step(kind):
    t = Twins(kind)
    sched = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (t.a, t.b)]
    t.step()
    for i in range(4):
        for s in sched:
            s.step()
        if kind == "adamw":
            t.both(lambda o, ps: o.param_groups[0].update(betas=(0.8 + 0.01 * i, 0.99), eps=1e-6 * (i + 1)))
        else:
            t.both(lambda o, ps: o.param_groups[0].update(weight_decay=1e-3 * (i + 1)))
        t.step()
    assert t.plan.steps == 4


def test_tensor_lr_is_read_at_every_step():
    t = Twins("adamw")
    t.both(lambda o, ps: o.param_groups[0].update(lr=torch.tensor(0.01)))
    t.step()
    t.both(lambda o, ps: o.param_groups[0]["lr"].fill_(0.003))
    t.step()
    assert t.plan.steps == 1


CHANGES = {
    # each changes what a plan was made from: the next step takes the checked path and plans again
    "momentum": lambda o, ps: o.param_groups[0].update(momentum=0.5),
    "nesterov": lambda o, ps: o.param_groups[0].update(nesterov=True),
    "param data": lambda o, ps: setattr(ps[0], "data", ps[0].data.clone()),
    "param resized": lambda o, ps: (setattr(ps[1], "data", torch.ones(6)),
                                    o.state[ps[1]].update(momentum_buffer=torch.zeros(6))),
    "param re-laid out": lambda o, ps: (setattr(ps[0], "data", ps[0].data.t().contiguous().t()),
                                        o.state[ps[0]].update(momentum_buffer=torch.zeros_like(ps[0]))),
    "buffer replaced": lambda o, ps: o.state[ps[2]].update(momentum_buffer=torch.full_like(ps[2], 0.5)),
    "buffer dropped": lambda o, ps: o.state[ps[3]].clear(),
    "state dropped": lambda o, ps: o.state.clear(),
    "buffer data": lambda o, ps: setattr(o.state[ps[4]]["momentum_buffer"], "data", torch.full((1,), 2.0)),
    "params list edited": lambda o, ps: o.param_groups[0]["params"].reverse(),
    "group added": lambda o, ps: o.add_param_group({"params": [nn.Parameter(torch.ones(3))]}),
    "state_dict loaded": lambda o, ps: o.load_state_dict(copy.deepcopy(o.state_dict())),
    "swap_tensors": lambda o, ps: torch.utils.swap_tensors(ps[1], nn.Parameter(ps[1].detach() * 2)),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_between_steps_is_seen(change):
    t = Twins("sgd")
    t.step()
    t.step()
    before = t.plan
    assert before is not None and before.steps == 1
    t.both(CHANGES[change])
    t.step()
    assert t.plan is not before  # dropped; the checked step planned again
    t.step()
    assert t.plan.steps == 1


def test_a_param_without_grad_drops_the_plan():
    t = Twins("adamw")
    t.step()
    before = t.plan
    t.seed += 1
    for ps in (t.pa, t.pb):
        set_grads(ps, t.seed)
        ps[2].grad = None  # skipped by this step, as torch skips it
    t.a.step()
    t.b.step()
    t.check()
    assert t.plan is not before


def test_a_grad_sharing_memory_with_a_written_tensor_is_refused_untouched():
    t = Twins("sgd")
    t.step()
    t.step()
    for ps, o in ((t.pa, t.a), (t.pb, t.b)):
        ps[1].grad = o.state[ps[1]]["momentum_buffer"]  # a grad that is the buffer the step writes
    snapshot = [bits(p) for p in t.pa] + [bits(s["momentum_buffer"]) for s in t.a.state.values()]
    for o in (t.a, t.b):
        with pytest.raises(ValueError, match="overlaps"):
            o.step()
    assert [bits(p) for p in t.pa] + [bits(s["momentum_buffer"]) for s in t.a.state.values()] == snapshot


def test_an_invalid_value_after_planning_is_refused_untouched():
    t = Twins("adamw")
    t.step()
    t.step()
    snapshot = [bits(p) for p in t.pa]
    steps = [float(s["step"]) for s in t.a.state.values()]
    t.seed += 1
    set_grads(t.pa, t.seed)
    t.a.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr must be >= 0"):
        t.a.step()
    t.a.param_groups[0]["betas"] = (1.0, 0.999)
    t.a.param_groups[0]["lr"] = 0.01
    with pytest.raises(ValueError, match="beta1 must be in"):
        t.a.step()
    assert [bits(p) for p in t.pa] == snapshot
    assert [float(s["step"]) for s in t.a.state.values()] == steps


def test_lars_exclude_is_part_of_the_plan():
    t = Twins("lars")
    t.step()
    t.step()
    assert t.plan.steps == 1
    t.both(lambda o, ps: o.param_groups[0].update(exclude=lambda p: p.shape == (5,)))
    t.step()
    assert t.plan is None and t.a._plan_wait == 0  # a custom exclude: every step is checked
    t.step()


@pytest.mark.skipif(not hasattr(torch, "_lazy_clone"), reason="this torch has no copy-on-write clones")
def test_a_param_made_copy_on_write_after_planning_keeps_its_clone():
    t = Twins("sgd")
    t.step()
    t.step()
    clone = torch._lazy_clone(t.pa[0].detach())
    kept = bits(clone)
    t.step()
    assert bits(clone) == kept


def test_plans_that_never_run_are_made_less_often():
    opt = optim.SGD(ps := params(), lr=0.1, momentum=0.9)
    waits = []
    for i in range(12):
        set_grads(ps, i)
        if i % 2:
            ps[0].grad = None  # the params with a grad change at every step
        opt.step()
        waits.append(getattr(opt, "_plan_wait", 0))
    assert max(waits) >= 3  # backs off


def test_profiler_and_hooks_still_see_planned_steps():
    t = Twins("sgd")
    t.step()
    calls = []
    t.a.register_step_post_hook(lambda o, a, k: calls.append(1))
    with torch.profiler.profile() as prof:
        t.step()
    assert calls == [1] and t.plan.steps == 1
    assert any(e.name == "Optimizer.step#SGD.step" for e in prof.events())


def test_teacher_updates_through_the_plan_match_checked_steps():
    torch.manual_seed(0)
    sa = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    sb = copy.deepcopy(sa)
    ta, tb = EMATeacher(sa, momentum=0.9), EMATeacher(sb, momentum=0.9)
    oa = optim.SGD(sa.parameters(), lr=0.1, momentum=0.9, teacher=ta)
    ob = unplanned(optim.SGD(sb.parameters(), lr=0.1, momentum=0.9, teacher=tb))
    x = torch.randn(8, 4)
    for i in range(6):
        for s, o in ((sa, oa), (sb, ob)):
            o.zero_grad()
            s(x).square().mean().backward()
            o.step()
        if i == 1:  # new memory under a teacher tensor the kernels update, and under a buffer
            for t, s in ((ta, sa), (tb, sb)):
                t.module[0].weight.data = t.module[0].weight.data.clone()
                s[1].running_var.data = s[1].running_var.data.clone()
        if i == 3:  # the teacher's tensor replaced: the pairing changes, the plan is dropped
            assert oa._plan.steps == 1  # planned again after i == 1's change
            for t in (ta, tb):
                t.module[2].weight = nn.Parameter(t.module[2].weight.detach().clone(), requires_grad=False)
        for a, b in zip([*sa.state_dict().values(), *ta.state_dict().values()],
                        [*sb.state_dict().values(), *tb.state_dict().values()]):
            if isinstance(a, torch.Tensor):
                assert bits(a) == bits(b)
    assert oa._plan is not None and oa._plan.steps == 1  # planned again after the change


def test_lists_a_plan_cannot_hold_keep_the_checked_path_and_the_step_raises_nothing():
    """The plan is made after the step has written: a group it cannot hold (params in a tuple)
    must not make that step raise (a retried step would be applied twice); the steps go on
    checked, with the same bits as an optimizer that never plans."""
    t = Twins("sgd")
    for opt in (t.a, t.b):
        opt.param_groups[0]["params"] = tuple(opt.param_groups[0]["params"])
    for _ in range(4):
        t.step()  # raises nothing
    assert t.plan is None
    assert t.a._plan_misses >= 1  # tried, and backs off


def test_a_zero_lr_changing_sign_takes_the_new_bits():
    """0.0 and -0.0 compare equal but form other scalars: the plan compares the values' bits."""
    t = Twins("sgd_plain", n=2)
    for ps in (t.pa, t.pb):
        with torch.no_grad():
            for p in ps:
                p.fill_(-0.0)
    for lr in (0.0, 0.0, -0.0, -0.0, 0.0):
        t.both(lambda opt, _, lr=lr: opt.param_groups[0].__setitem__("lr", lr))
        t.step()

