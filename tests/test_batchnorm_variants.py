"""Every BatchNorm a student may hold becomes an EMAN module that normalizes as the original does
in eval mode (forward and backward), or is refused at construction with the module named."""
import copy
import re
import warnings

import pytest
import torch
from torch import nn

from eman_fused import EMATeacher
from eman_fused import nn as enn

timm_norm_act = pytest.importorskip("timm.layers.norm_act")


class PlainSubclass(nn.BatchNorm2d):
    """A subclass that changes nothing about the math (e.g. only adds a method)."""

    def describe(self):
        return "mine"


class SyncLikeBatchNorm(nn.BatchNorm2d):
    """detectron2's NaiveSyncBatchNorm pattern: own forward in training, BatchNorm's in eval."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        raise RuntimeError("would all-reduce batch statistics")


def lazy_materialized():
    bn = nn.LazyBatchNorm2d()
    bn(torch.randn(2, 5, 3, 3))  # materializes: becomes a BatchNorm2d
    return bn


VARIANTS = {
    "bn2d": (lambda: nn.BatchNorm2d(5), 4),
    "bias_false": (lambda: nn.BatchNorm2d(5, bias=False), 4),
    "affine_false": (lambda: nn.BatchNorm2d(5, affine=False), 4),
    "momentum_none": (lambda: nn.BatchNorm2d(5, momentum=None), 4),
    "eps_zero": (lambda: nn.BatchNorm2d(5, eps=0.0), 4),
    "bn1d_2d_input": (lambda: nn.BatchNorm1d(5), 2),
    "bn1d_3d_input": (lambda: nn.BatchNorm1d(5, bias=False), 3),
    "bn3d": (lambda: nn.BatchNorm3d(5), 5),
    "lazy_materialized": (lazy_materialized, 4),
    "sync": (lambda: nn.SyncBatchNorm(5), 4),
    "plain_subclass": (lambda: PlainSubclass(5), 4),
    "sync_like_subclass": (lambda: SyncLikeBatchNorm(5), 4),
    "timm_bnact_relu": (lambda: timm_norm_act.BatchNormAct2d(5), 4),
    "timm_bnact_identity": (lambda: timm_norm_act.BatchNormAct2d(5, apply_act=False), 4),
    "timm_bnact_gelu": (lambda: timm_norm_act.BatchNormAct2d(5, act_layer=nn.GELU), 4),
    "timm_bnact_prelu": (lambda: timm_norm_act.BatchNormAct2d(5, act_layer=nn.PReLU, inplace=None), 4),
    "timm_bnact_drop": (lambda: timm_norm_act.BatchNormAct2d(5, drop_layer=nn.Dropout), 4),
    "timm_syncbnact": (lambda: timm_norm_act.convert_sync_batchnorm(
        timm_norm_act.BatchNormAct2d(5, act_layer=nn.GELU)), 4),
    "timm_syncbnact_bare": (lambda: timm_norm_act.SyncBatchNormAct(5), 4),
}


def randomized(make):
    torch.manual_seed(0)
    bn = make()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 1.5)
        if bn.bias is not None:
            bn.bias.uniform_(-1, 1)
        bn.num_batches_tracked.fill_(7)
    return bn


def forward_backward(module, x, g):
    x = x.clone().requires_grad_()
    y = module(x)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [x, *params], g)
    return y.detach(), grads


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_batchnorm_variant_normalizes_as_the_original_in_eval_mode(name):
    make, dim = VARIANTS[name]
    original = randomized(make).eval()
    shape = (4, 5) + (3,) * (dim - 2)
    x, g = torch.randn(shape) * 2, torch.randn(shape)
    want, want_grads = forward_backward(original, x, g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eman = enn.convert_to_eman(copy.deepcopy(original))
    assert isinstance(eman, enn.EMANBatchNorm)
    subclass = name in ("plain_subclass", "sync_like_subclass")
    named = [w for w in caught if "without a registered conversion" in str(w.message)]
    assert len(named) == (1 if subclass else 0), [str(w.message) for w in caught]
    if subclass:
        assert type(original).__qualname__ in str(named[0].message)
    assert list(eman.state_dict()) == list(original.state_dict())  # checkpoints move both ways
    for k, v in original.state_dict().items():
        assert torch.equal(eman.state_dict()[k], v), k
    eman.train(name != "timm_bnact_drop")  # EMAN: running statistics in train mode too
    got, got_grads = forward_backward(eman, x, g)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(got_grads) == len(want_grads)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_timm_relu_fuses_other_acts_are_kept_after_the_norm():
    relu = enn.convert_to_eman(timm_norm_act.BatchNormAct2d(5))
    assert type(relu) is enn.EMANBatchNorm2d and relu.relu
    gelu = enn.convert_to_eman(timm_norm_act.BatchNormAct2d(5, act_layer=nn.GELU))
    assert type(gelu) is enn.EMANBatchNormAct and not gelu.relu and isinstance(gelu.act, nn.GELU)
    drop = enn.convert_to_eman(timm_norm_act.BatchNormAct2d(5, drop_layer=nn.Dropout))
    assert type(drop) is enn.EMANBatchNormAct and isinstance(drop.drop, nn.Dropout)


def test_a_subclass_warns_once_per_class():
    class Once(nn.BatchNorm2d):
        pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enn.convert_to_eman(nn.Sequential(Once(3), Once(3), nn.Sequential(Once(3))))
    assert sum("Once" in str(w.message) for w in caught) == 1


def test_a_bias_false_student_gets_a_working_teacher():
    # the reported crash: Missing key(s) in state_dict: "bias"
    student = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, bias=False), nn.ReLU())
    teacher = EMATeacher(student, momentum=0.5)
    assert teacher.module[1].bias is None and teacher.module[1].weight is not None
    student(torch.randn(4, 3, 6, 6))
    teacher.update()
    torch.testing.assert_close(teacher.module[1].running_mean, 0.5 * student[1].running_mean)


def test_untracked_statistics_raise_naming_the_module_or_are_kept_on_request():
    student = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Sequential(nn.BatchNorm2d(5, track_running_stats=False)))
    with pytest.raises(ValueError, match=re.escape("'1.0' (BatchNorm2d) has track_running_stats=False")):
        EMATeacher(student)
    teacher = EMATeacher(student, untracked_bn="keep")
    assert type(teacher.module[1][0]) is nn.BatchNorm2d
    teacher.update()
    with pytest.raises(ValueError, match="untracked_bn must be"):
        EMATeacher(student, untracked_bn="drop")


def test_an_unmaterialized_lazy_batchnorm_is_refused_at_construction():
    student = nn.Sequential(nn.Conv2d(3, 5, 3), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="not initialized|not been materialized"):
        EMATeacher(student)
    with pytest.raises(ValueError, match=re.escape("'1' is a LazyBatchNorm2d that has not been materialized")):
        enn.convert_to_eman(student)


def test_register_conversion_adds_a_users_module():
    class FrozenScale(nn.Module):
        """A user's normalization layer (not a BatchNorm)."""

        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.full((3,), 2.0))

        def forward(self, x):
            return x * self.scale[:, None, None]

    class Halved(FrozenScale):
        def forward(self, x):
            return super().forward(x) / 2

    converted = []

    def to_halved(module, backend):
        converted.append(backend)
        new = Halved()
        new.load_state_dict(module.state_dict())
        return new
    enn.register_conversion(FrozenScale, to_halved)
    try:
        model = nn.Sequential(nn.Conv2d(3, 3, 1), FrozenScale())
        enn.convert_to_eman(model, backend="reference")
        assert type(model[1]) is Halved and converted == ["reference"]
        # a registration by dotted name (for classes of packages one does not want to import)
        enn.register_conversion(f"{FrozenScale.__module__}.{FrozenScale.__qualname__}", lambda m, b: m)
        enn.register_conversion(FrozenScale, lambda m, b: m)
        model = nn.Sequential(FrozenScale())
        enn.convert_to_eman(model)
        assert type(model[0]) is FrozenScale
    finally:
        enn._CONVERSIONS.pop(FrozenScale, None)
        enn._CONVERSIONS.pop(f"{FrozenScale.__module__}.{FrozenScale.__qualname__}", None)
    with pytest.raises(TypeError, match="cls must be"):
        enn.register_conversion("NoDot", lambda m, b: m)
    with pytest.raises(TypeError, match="fn must be callable"):
        enn.register_conversion(FrozenScale, None)


def test_teacher_of_a_timm_model_normalizes_with_running_statistics_in_train_mode():
    student = nn.Sequential(nn.Conv2d(3, 5, 3), timm_norm_act.BatchNormAct2d(5, act_layer=nn.GELU),
                            nn.Conv2d(5, 2, 1))
    student(torch.randn(8, 3, 6, 6))  # some statistics
    teacher = EMATeacher(student)
    teacher.train()
    x = torch.randn(2, 3, 6, 6)
    student.eval()
    torch.testing.assert_close(teacher(x), student(x), rtol=1e-5, atol=1e-5)
