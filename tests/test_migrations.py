"""README's migration tables, row by row, against the real timm ModelEmaV3 and torch AveragedModel:
following a row literally gives the same teacher (relative difference <= 1e-6 over 100 updates)."""
import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn

from eman_fused import EMATeacher, schedules

model_ema = pytest.importorskip("timm.utils.model_ema")

STEPS = 100
REL = 1e-6
WORST: dict[str, float] = {}  # row -> largest relative difference seen (printed at the end)


@pytest.fixture(scope="module", autouse=True)
def report_worst():
    yield
    if WORST:
        print("\nlargest relative difference per row:", {k: f"{v:.1e}" for k, v in WORST.items()})


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 2 * 2, 5))


def train(model, updates) -> None:
    """100 SGD steps; after each, every (library update, eman_fused update) pair runs."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for update in updates:
            update(step + 1)  # timm's train loop passes num_updates, counted from 1


class Float64EMA:
    """The same EMA in float64, from the same student values and momenta: the ground truth
    both float32 implementations are measured against."""

    def __init__(self, model, buffers="ema"):
        self.state = {k: v.detach().double().clone() if v.is_floating_point() else v.clone()
                      for k, v in model.state_dict().items()}
        self.buffer_names = {k for k, _ in model.named_buffers()}
        self.buffers = buffers

    def update(self, model, m):
        for k, v in model.state_dict().items():
            if not v.is_floating_point() or (k in self.buffer_names and self.buffers == "copy"):
                self.state[k].copy_(v)
            else:
                self.state[k].mul_(m).add_(v.double(), alpha=1 - m)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_same_teacher(ours: dict, theirs: dict, truth: dict | None = None, integer_keys="equal") -> float:
    """Every floating tensor within REL (relative, in norm) of the library's; and, with `truth`
    (the same EMA in float64), ours no further from it than 2x the library's own float32 error."""
    assert list(ours) == list(theirs)
    worst = 0.0
    for k, b in theirs.items():
        a = ours[k]
        if not b.is_floating_point():
            if integer_keys == "equal":
                assert torch.equal(a, b), k
            continue
        r = rel(a, b)
        worst = max(worst, r)
        assert r <= REL, (k, r)
    if truth is not None:  # and as close to the float64 run as the library, over the model
        floating = [k for k, v in theirs.items() if v.is_floating_point()]
        ours_err = sum((ours[k].double() - truth[k]).square().sum() for k in floating).sqrt()
        theirs_err = sum((theirs[k].double() - truth[k]).square().sum() for k in floating).sqrt()
        assert ours_err <= 2 * theirs_err + 1e-12, (ours_err.item(), theirs_err.item())
    return worst


# (timm ModelEmaV3 kwargs, whether timm's update gets the step, EMATeacher kwargs, whether
# teacher.update gets the step): the README table's rows.
TIMM_ROWS = {
    "decay": (dict(decay=0.99), False, dict(momentum=0.99), False),
    "decay_stepped": (dict(decay=0.99), True, dict(schedule=schedules.TimmDecay(0.99)), True),
    "warmup": (dict(decay=0.999, use_warmup=True, warmup_gamma=2.0, warmup_power=0.75), True,
               dict(schedule=schedules.TimmDecay(0.999, use_warmup=True, warmup_gamma=2.0, warmup_power=0.75)), True),
    "warmup_min_decay": (dict(decay=0.9999, min_decay=0.3, use_warmup=True), True,
                         dict(schedule=schedules.TimmDecay(0.9999, min_decay=0.3, use_warmup=True)), True),
    "update_after_step": (dict(decay=0.99, update_after_step=10), True,
                          dict(schedule=schedules.TimmDecay(0.99, update_after_step=10)), True),
    "warmup_after_step": (dict(decay=0.995, update_after_step=5, use_warmup=True, min_decay=0.1), True,
                          dict(schedule=schedules.TimmDecay(0.995, min_decay=0.1, update_after_step=5,
                                                            use_warmup=True)), True),
    # timm without a step uses `decay` alone: its warm-up arguments have no effect
    "warmup_without_step": (dict(decay=0.99, use_warmup=True, update_after_step=5), False,
                            dict(momentum=0.99), False),
    "exclude_buffers": (dict(decay=0.99, exclude_buffers=True), False, dict(momentum=0.99, buffers="copy"), False),
    "no_foreach": (dict(decay=0.99, foreach=False), False, dict(momentum=0.99), False),
    "no_foreach_exclude_buffers": (dict(decay=0.99, foreach=False, exclude_buffers=True), False,
                                   dict(momentum=0.99, buffers="copy"), False),
    "device_cpu": (dict(decay=0.99, device="cpu"), False, dict(momentum=0.99, device="cpu"), False),
}


@pytest.mark.parametrize("row", list(TIMM_ROWS))
def test_timm_model_ema_v3_rows(row):
    timm_kwargs, timm_step, our_kwargs, our_step = TIMM_ROWS[row]
    model = make_model()
    ema = model_ema.ModelEmaV3(model, **timm_kwargs)
    truth = Float64EMA(model, "copy" if timm_kwargs.get("exclude_buffers") else "ema")
    # the eval-mode classic teacher timm has: eman=False, train_mode=False
    teacher = EMATeacher(model, eman=False, train_mode=False, **our_kwargs)
    train(model, [lambda s: ema.update(model, step=s) if timm_step else ema.update(model),
                  lambda s: truth.update(model, ema.get_decay(s if timm_step else None)),
                  lambda s: teacher.update(s) if our_step else teacher.update()])
    WORST[f"timm {row}"] = assert_same_teacher(teacher.module.state_dict(), ema.module.state_dict(), truth.state)
    # ema(x) and teacher(x): both in eval mode, so neither moves its BatchNorm statistics
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), ema(x), rtol=1e-5, atol=1e-6)
    assert_same_teacher(teacher.module.state_dict(), ema.module.state_dict(), truth.state)


def test_timm_set_is_reset_and_state_dicts_load_both_ways():
    model = make_model()
    ema = model_ema.ModelEmaV3(model, decay=0.9)
    teacher = EMATeacher(model, momentum=0.9, eman=False, train_mode=False)
    train(model, [lambda s: ema.update(model), lambda s: teacher.update()])
    ema.set(model)
    teacher.reset()
    assert_same_teacher(teacher.module.state_dict(), ema.module.state_dict())
    fresh = EMATeacher(make_model(), momentum=0.9, eman=False, train_mode=False)
    with pytest.warns(UserWarning, match="no teacher progress"):
        fresh.load_state_dict(ema.state_dict())  # timm's 'module.' keys
    assert_same_teacher(fresh.module.state_dict(), ema.module.state_dict())
    ema.load_state_dict({"module." + k: v for k, v in teacher.module.state_dict().items()})


def test_the_old_table_did_not_reproduce_timm():
    # what the issue measured: Warmup at k = step and no first-update copy vs timm's stepped update
    model = make_model()
    ema = model_ema.ModelEmaV3(model, decay=0.999, use_warmup=True)
    old = EMATeacher(model, schedule=schedules.Warmup(1.0, 2 / 3, max_momentum=0.999), eman=False,
                     train_mode=False)
    train(model, [lambda s: ema.update(model, step=s), lambda s: old.update(s)])
    with pytest.raises(AssertionError):
        assert_same_teacher(old.module.state_dict(), ema.module.state_dict())


def swa_rows():
    d = 0.95
    return {
        # AveragedModel copies the model at its first update: CopyFirst
        "ema_multi_use_buffers": (dict(multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=True),
                                  dict(schedule=schedules.CopyFirst(schedules.Constant(d)), buffers="ema")),
        "ema_multi_params_only": (dict(multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=False),
                                  dict(schedule=schedules.CopyFirst(schedules.Constant(d)), buffers="copy")),
        "ema_avg_fn": (dict(avg_fn=get_ema_avg_fn(d), use_buffers=True),
                       dict(schedule=schedules.CopyFirst(schedules.Constant(d)), buffers="ema")),
        # no avg_fn: SWA's running mean, m_k = 1 - 1/(k+1)
        "swa_mean": (dict(use_buffers=False), dict(schedule=schedules.MeanTeacherRamp(1.0), buffers="copy")),
        "device_cpu": (dict(multi_avg_fn=get_ema_multi_avg_fn(d), device="cpu"),
                       dict(schedule=schedules.CopyFirst(schedules.Constant(d)), buffers="copy", device="cpu")),
    }


@pytest.mark.parametrize("row", list(swa_rows()))
def test_averaged_model_rows(row):
    swa_kwargs, our_kwargs = swa_rows()[row]
    model = make_model()
    averaged = AveragedModel(model, **swa_kwargs)
    truth = Float64EMA(model, "ema" if swa_kwargs.get("use_buffers") else "copy")
    teacher = EMATeacher(model, eman=False, **our_kwargs)
    swa_mean = "avg_fn" not in swa_kwargs and "multi_avg_fn" not in swa_kwargs

    def truth_update(step):  # AveragedModel's momentum at its n-th update (n = step - 1)
        n = step - 1
        truth.update(model, 0.0 if n == 0 else (n / (n + 1) if swa_mean else 0.95))
    train(model, [lambda s: averaged.update_parameters(model), truth_update, lambda s: teacher.update()])
    # use_buffers=True averages num_batches_tracked as a float and truncates it (it ends at
    # about 1/(1-d) below the student's count); EMATeacher copies the student's count.
    integers = "skip" if swa_kwargs.get("use_buffers") else "equal"
    WORST[f"AveragedModel {row}"] = assert_same_teacher(
        teacher.module.state_dict(), averaged.module.state_dict(), truth.state, integer_keys=integers)
    if integers == "skip":
        assert teacher.module[1].num_batches_tracked.item() == model[1].num_batches_tracked.item() == STEPS
        assert averaged.module[1].num_batches_tracked.item() < STEPS


def test_averaged_model_checkpoint_loads():
    model = make_model()
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    averaged.update_parameters(model)
    teacher = EMATeacher(copy.deepcopy(model), eman=False)
    sd = {k: v for k, v in averaged.state_dict().items() if k != "n_averaged"}
    with pytest.warns(UserWarning, match="no teacher progress"):
        teacher.load_state_dict(sd)  # 'module.' keys
    teacher.num_updates = int(averaged.n_averaged)  # AveragedModel's count, where the schedule resumes
    assert teacher.num_updates == 1
    assert_same_teacher(teacher.module.state_dict(), averaged.module.state_dict())
