"""eman_fused.integrations.diffusers.EMAModel against the real diffusers.training_utils.EMAModel
(diffusers 0.42.1): the same shadows over 200 training steps (relative difference <= 1e-6, warm-up
settings included), state_dicts and save_pretrained directories that load both ways, the copies
in and out, the checks made before any write, and the precision rule for 16-bit shadows.

Tests that compare with diffusers skip (with the reason) where it is not installed; the others
run without it, and one checks that the module imports and says what is missing without it."""
from __future__ import annotations

import importlib
import os
import sys
import warnings

import pytest
import torch
from torch import nn

from eman_fused import integrations
from eman_fused.integrations.diffusers import EMAModel

STEPS = 200
REL = 1e-6
WORST: dict[str, float] = {}  # case -> largest relative difference from diffusers (printed at the end)

CONFIGS = {
    "default": dict(),  # decay 0.9999: (1 + k)/(10 + k) rules for 200 steps
    "decay": dict(decay=0.95),  # the decay cap reached halfway
    "warmup": dict(decay=0.999, use_ema_warmup=True, inv_gamma=2.0, power=3 / 4, update_after_step=7,
                   min_decay=0.3),
    "after_step_min_decay": dict(decay=0.98, update_after_step=20, min_decay=0.5),
}


@pytest.fixture(scope="module", autouse=True)
def report_worst():
    yield
    if WORST:
        print("\nlargest relative difference from diffusers:", {k: f"{v:.1e}" for k, v in WORST.items()})


@pytest.fixture
def DiffusersEMA():
    if os.environ.get("EMAN_FUSED_REQUIRE_EXTRAS") == "1":  # scripts/test.sh installs the extras
        return importlib.import_module("diffusers.training_utils").EMAModel
    return pytest.importorskip("diffusers.training_utils", reason="diffusers is not installed").EMAModel


def make_model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 8, 3),
                          nn.Flatten(), nn.Linear(8 * 2 * 2, 5), nn.LayerNorm(5))
    model[6].weight.requires_grad_(False)  # a frozen param: copied by step(), not averaged
    return model.to(dtype)


def _train(steps: int) -> list[list[torch.Tensor]]:
    """The params after each of `steps` AdamW steps on random data (the frozen param moved by
    hand, so that its copy is seen)."""
    model = make_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    out = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            for p in frozen:
                p.add_(torch.randn(p.shape, generator=g), alpha=0.01)
        out.append([p.detach().clone() for p in model.parameters()])
    return out


@pytest.fixture(scope="module")
def trajectory():
    """One training run, recorded once and replayed by every test (training is most of the time
    a test would take, and the EMAs only read the params). One thread: on a shared 2-core machine
    the tiny ops' parallel regions mostly wait for the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(STEPS)
    finally:
        torch.set_num_threads(threads)


def replay(model, trajectory, steps, after_step) -> None:
    """Write the recorded params of `steps` (a range) into the model (cast to its dtype), calling
    after_step() after each, as a training loop calls ema.step() after optimizer.step()."""
    for step in steps:
        with torch.no_grad():
            for p, v in zip(model.parameters(), trajectory[step]):
                p.copy_(v)
        after_step()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm of the difference over the norm (0 for two zero tensors)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_same_shadows(ours, theirs, case: str, tol=REL) -> None:
    worst = max((rel(a, b) for a, b in zip(ours.shadow_params, theirs.shadow_params)), default=0.0)
    WORST[case] = max(WORST.get(case, 0.0), worst)
    assert len(ours.shadow_params) == len(theirs.shadow_params)
    assert worst <= tol, f"{case}: relative difference {worst:.2e} > {tol}"
    for a, b in zip(ours.shadow_params, theirs.shadow_params):
        assert a.dtype == b.dtype and a.shape == b.shape


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).clone()


def snapshot(tensors) -> list[torch.Tensor]:
    return [bits(t) for t in tensors]


def assert_unchanged(tensors, before) -> None:
    for t, b in zip(tensors, before):
        assert torch.equal(bits(t), b)


# -- the same EMA as diffusers' ---------------------------------------------------------------------
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_diffusers_over_200_steps(DiffusersEMA, trajectory, config):
    """Ours and diffusers' (its loop and its foreach path) side by side on the same params."""
    model = make_model()
    kw = CONFIGS[config]
    ours = EMAModel(model.parameters(), **kw)
    theirs = {f: DiffusersEMA(model.parameters(), foreach=f, **kw) for f in (False, True)}
    assert ours.cur_decay_value is None and theirs[False].cur_decay_value is None

    def after_step():
        ours.step(model.parameters())
        for foreach, ema in theirs.items():
            ema.step(model.parameters())
            assert ours.optimization_step == ema.optimization_step
            assert ours.cur_decay_value == ema.cur_decay_value  # the same double, bit for bit
            if ours.optimization_step % 50 == 0:
                assert_same_shadows(ours, ema, f"{config} foreach={foreach}")

    replay(model, trajectory, range(STEPS), after_step)
    assert ours.optimization_step == STEPS
    for foreach, ema in theirs.items():
        assert_same_shadows(ours, ema, f"{config} foreach={foreach}")
    frozen = model[6].weight
    assert torch.equal(ours.shadow_params[-2], frozen)  # the frozen param, copied


@pytest.mark.parametrize("config", list(CONFIGS))
def test_get_decay_is_diffusers_formula(DiffusersEMA, config):
    p = [nn.Parameter(torch.zeros(2))]
    ours, theirs = EMAModel(p, **CONFIGS[config]), DiffusersEMA(p, **CONFIGS[config])
    assert [ours.get_decay(k) for k in range(0, 3000, 7)] == [theirs.get_decay(k) for k in range(0, 3000, 7)]


def test_foreach_changes_nothing(trajectory):
    model = make_model()
    a, b = EMAModel(model.parameters(), foreach=False), EMAModel(model.parameters(), foreach=True)
    assert (a.foreach, b.foreach) == (False, True)
    replay(model, trajectory, range(20), lambda: (a.step(model.parameters()), b.step(model.parameters())))
    for x, y in zip(a.shadow_params, b.shadow_params):
        assert torch.equal(bits(x), bits(y))


def test_module_argument_and_deprecated_kwargs_as_diffusers(DiffusersEMA):
    model = make_model()
    for cls in (EMAModel, DiffusersEMA):
        with pytest.warns(FutureWarning):
            ema = cls(model)
        assert ema.use_ema_warmup is True  # diffusers' reading of a module argument
        with pytest.warns(FutureWarning):
            ema.step(model)
        assert ema.optimization_step == 1
        with pytest.warns(FutureWarning):
            ema = cls(model.parameters(), max_value=0.5, min_value=0.25, device="cpu")
        assert (ema.decay, ema.min_decay) == (0.5, 0.25)
    with pytest.warns(UserWarning, match="ignoring the keyword arguments not_an_option"):
        EMAModel(model.parameters(), not_an_option=1)


# -- frozen params, checks before writes ------------------------------------------------------------
def test_frozen_params_are_copied_exactly():
    a, b = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3, 4), requires_grad=False)
    ema = EMAModel([a, b], decay=0.9)
    ema.optimization_step = 100  # decay 0.9
    ema.shadow_params[1].fill_(float("nan"))  # a copy replaces even a NaN
    with torch.no_grad():
        b.mul_(3)
        a.add_(1)
    before = ema.shadow_params[0].clone()
    ema.step([a, b])
    assert torch.equal(ema.shadow_params[1], b)
    torch.testing.assert_close(ema.shadow_params[0], 0.9 * before + 0.1 * a.detach(), rtol=1e-6, atol=1e-6)


def _rejected(ema, params, error, match):
    shadows_before = snapshot(ema.shadow_params)
    params_before = snapshot(params)
    step, decay = ema.optimization_step, ema.cur_decay_value
    with pytest.raises(error, match=match):
        ema.step(params)
    assert_unchanged(ema.shadow_params, shadows_before)
    assert_unchanged(params, params_before)
    assert (ema.optimization_step, ema.cur_decay_value) == (step, decay)


def test_step_refuses_before_any_write():
    model = make_model()
    params = list(model.parameters())
    ema = EMAModel(params)
    ema.step(params)
    ema.optimization_step = 500
    with torch.no_grad():
        for p in params:
            p.add_(1)
    _rejected(ema, params[:-1], ValueError, r"got 9 parameters, but the EMA holds 10")
    wrong = params[:-1] + [nn.Parameter(torch.zeros(7))]
    _rejected(ema, wrong, ValueError, r"parameters\[9\] has shape \(7,\), its shadow \(5,\)")
    ints = params[:-1] + [torch.zeros(5, dtype=torch.int64)]
    _rejected(ema, ints, TypeError, r"parameters\[9\] is torch.int64, its shadow torch.float32")
    # The frozen param's copy (the second call) is refused before the average (the first) writes.
    bad_frozen = list(params)
    bad_frozen[8] = nn.Parameter(torch.zeros(6), requires_grad=False)
    _rejected(ema, bad_frozen, ValueError, r"parameters\[8\] has shape \(6,\), its shadow \(5,\)")
    cplx = [nn.Parameter(torch.zeros(2, dtype=torch.complex64))]
    _rejected(EMAModel(cplx), cplx, TypeError, r"complex tensors are not supported")
    over = EMAModel(params, decay=1.5, min_decay=1.2)
    over.optimization_step = 500
    _rejected(over, params, ValueError, r"get_decay\(501\) = 1.2 is not in \[0, 1\]")
    ema.step(params)  # the right list still works
    assert ema.optimization_step == 501


def test_copy_to_and_restore_refuse_before_any_write():
    model = make_model()
    params = list(model.parameters())
    ema = EMAModel(params)
    with torch.no_grad():
        for s in ema.shadow_params:
            s.add_(1)
    before = snapshot(params)
    wrong = params[:-1] + [nn.Parameter(torch.zeros(1))]  # copy_ would broadcast into it
    with pytest.raises(ValueError, match=r"copy_to: parameters\[9\] has shape \(1,\)"):
        ema.copy_to(wrong)
    with pytest.raises(ValueError, match=r"copy_to: got 9 parameters, but 10 shadow params"):
        ema.copy_to(params[:-1])
    ema.store(params)
    with pytest.raises(ValueError, match=r"restore: parameters\[9\] has shape \(1,\)"):
        ema.restore(wrong)
    assert_unchanged(params, before)
    assert ema.temp_stored_params is not None  # kept: a later restore() can still run
    assert_unchanged(wrong[:-1], before[:-1])


def test_layouts_that_differ_from_the_shadows(DiffusersEMA):
    """diffusers averages any strides; the kernels pair elements in memory order, so a shadow
    whose layout differs from its param's takes the param's (same values), and a param that is
    not dense is staged."""
    conv = nn.Conv2d(4, 6, 3)
    strided = nn.Parameter(torch.randn(4, 8)[:, ::2])  # not dense
    params = [conv.weight, conv.bias, strided]
    ours, theirs = EMAModel(params, decay=0.9), DiffusersEMA(params, decay=0.9)
    conv.to(memory_format=torch.channels_last)
    for step in range(30):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape), alpha=0.1)
        ours.step(params)
        theirs.step(params)
    assert_same_shadows(ours, theirs, "layouts")
    assert ours.shadow_params[0].stride() == conv.weight.stride()


# -- copies in and out ------------------------------------------------------------------------------
def test_store_copy_to_restore_are_exact(DiffusersEMA, trajectory):
    model = make_model()
    params = list(model.parameters())
    ours, theirs = EMAModel(params), DiffusersEMA(params)
    replay(model, trajectory, range(10), lambda: (ours.step(model.parameters()), theirs.step(model.parameters())))
    trained = snapshot(params)
    ours.store(params)
    assert all(t.device.type == "cpu" for t in ours.temp_stored_params)
    ours.copy_to(params)
    for p, s in zip(params, ours.shadow_params):
        assert torch.equal(bits(p), bits(s))
    ours.restore(params)
    assert_unchanged(params, trained)
    assert ours.temp_stored_params is None
    for cls in (EMAModel, DiffusersEMA):  # restore without store: the same error
        with pytest.raises(RuntimeError, match="no `store\\(\\)`ed weights"):
            cls(params).restore(params)
    # copy_to casts into the target's dtype, as copy_ does
    half = make_model(torch.bfloat16)
    ours.copy_to(half.parameters())
    for p, s in zip(half.parameters(), ours.shadow_params):
        assert torch.equal(bits(p), bits(s.to(torch.bfloat16)))


def test_to_dtype_and_pin_memory(DiffusersEMA, trajectory):
    model = make_model()
    params = list(model.parameters())
    ours, theirs = EMAModel(params), DiffusersEMA(params)
    ours.to(dtype=torch.bfloat16)
    theirs.to(dtype=torch.bfloat16)
    for a, b in zip(ours.shadow_params, theirs.shadow_params):
        assert a.dtype == torch.bfloat16 and torch.equal(bits(a), bits(b))
    ints = EMAModel([torch.arange(3)])
    ints.to(dtype=torch.float16)
    assert ints.shadow_params[0].dtype == torch.int64  # integer shadows keep their dtype
    before = list(ours.shadow_params)
    with pytest.raises(ValueError, match="cannot hold a shadow"):
        ours.to(dtype=torch.int32)
    assert all(a is b for a, b in zip(ours.shadow_params, before))
    replay(model, trajectory, range(5), lambda: ours.step(model.parameters()))  # a bf16 EMA of fp32 params
    assert ours.shadow_params[0].dtype == torch.bfloat16

    if torch.cuda.is_available():
        ours.pin_memory()
        assert all(s.is_pinned() for s in ours.shadow_params)
        return
    # No accelerator runtime: torch cannot pin, so diffusers' pin_memory raises; ours does too,
    # saying why, and leaves the shadows as they were.
    with pytest.raises(RuntimeError):
        theirs.pin_memory()
    before = list(ours.shadow_params)
    with pytest.raises(RuntimeError, match="EMAModel.pin_memory: torch cannot pin the shadows here"):
        ours.pin_memory()
    assert all(a is b for a, b in zip(ours.shadow_params, before))


# -- checkpoints -----------------------------------------------------------------------------------
def test_state_dicts_load_both_ways(DiffusersEMA, trajectory, tmp_path):
    model = make_model()
    kw = CONFIGS["warmup"]
    ours, theirs = EMAModel(model.parameters(), **kw), DiffusersEMA(model.parameters(), **kw)
    replay(model, trajectory, range(40), lambda: (ours.step(model.parameters()), theirs.step(model.parameters())))
    sd = ours.state_dict()
    assert list(sd) == list(theirs.state_dict())
    assert sd["shadow_params"] is ours.shadow_params  # references, as diffusers returns
    torch.save(sd, tmp_path / "ours.pt")
    torch.save(theirs.state_dict(), tmp_path / "theirs.pt")

    # a fresh EMA of each class (other settings, no progress) loads the other's checkpoint
    fresh = make_model()
    theirs_from_ours = DiffusersEMA(fresh.parameters())
    theirs_from_ours.load_state_dict(torch.load(tmp_path / "ours.pt", weights_only=True))
    ours_from_theirs = EMAModel(fresh.parameters())
    ours_from_theirs.load_state_dict(torch.load(tmp_path / "theirs.pt", weights_only=True))
    for ema in (theirs_from_ours, ours_from_theirs):
        assert ema.optimization_step == 40 and ema.use_ema_warmup and ema.update_after_step == 7

    emas = (ours, theirs, theirs_from_ours, ours_from_theirs)
    replay(model, trajectory, range(40, 80), lambda: [e.step(model.parameters()) for e in emas])
    assert all(e.optimization_step == 80 for e in emas)
    assert_same_shadows(ours_from_theirs, theirs, "state_dict diffusers -> ours")
    assert_same_shadows(theirs_from_ours, ours, "state_dict ours -> diffusers")
    assert_same_shadows(ours_from_theirs, ours, "state_dict diffusers -> ours", tol=REL)


def test_load_state_dict_checks_everything_before_assigning(DiffusersEMA):
    p = [nn.Parameter(torch.ones(3))]
    ema = EMAModel(p, decay=0.9)
    loaded_shadow = [torch.zeros(3)]
    bad = {"decay": 0.5, "min_decay": 0, "shadow_params": loaded_shadow}  # min_decay must be a float
    for cls in (EMAModel, DiffusersEMA):
        with pytest.raises(ValueError, match="Invalid min_decay"):
            cls(p).load_state_dict(bad)
    with pytest.raises(ValueError, match="Invalid min_decay"):
        ema.load_state_dict(bad)
    assert ema.decay == 0.9 and torch.equal(ema.shadow_params[0], torch.ones(3))  # nothing assigned
    with pytest.raises(ValueError, match="Decay must be between 0 and 1"):
        ema.load_state_dict({"decay": 1.5})
    with pytest.raises(ValueError, match="shadow_params must all be Tensors"):
        ema.load_state_dict({"shadow_params": [1.0]})
    ema.load_state_dict({"decay": 0.5, "shadow_params": loaded_shadow})
    assert ema.decay == 0.5 and torch.equal(ema.shadow_params[0], torch.zeros(3))
    assert ema.shadow_params[0] is not loaded_shadow[0]  # a deep copy, as diffusers loads


def tiny_unet():
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))


def test_save_pretrained_from_pretrained_round_trip(DiffusersEMA, tmp_path):
    unet = tiny_unet()
    cls = type(unet)
    kw = dict(decay=0.99, use_ema_warmup=True, power=3 / 4, update_after_step=2, min_decay=0.1)
    ours = EMAModel(unet.parameters(), model_cls=cls, model_config=unet.config, **kw)
    theirs = DiffusersEMA(unet.parameters(), model_cls=cls, model_config=unet.config, **kw)
    unet(torch.randn(2, 1, 8, 8), 3)  # it runs
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        with torch.no_grad():  # training-like moves of every param
            for p in unet.parameters():
                p.add_(torch.randn(p.shape, generator=g), alpha=0.01)
        ours.step(unet.parameters())
        theirs.step(unet.parameters())
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")

    settings = {k: v for k, v in ours.state_dict().items() if k != "shadow_params"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers' own from_config(path) deprecation
        loaded = {"ours <- ours": EMAModel.from_pretrained(tmp_path / "ours", cls),
                  "ours <- diffusers": EMAModel.from_pretrained(tmp_path / "theirs", cls, foreach=True),
                  "diffusers <- ours": DiffusersEMA.from_pretrained(tmp_path / "ours", cls)}
    for name, ema in loaded.items():
        assert {k: v for k, v in ema.state_dict().items() if k != "shadow_params"} == settings, name
        assert ema.optimization_step == 5 and ema.model_cls is cls
        saver = theirs if name.endswith("diffusers") else ours
        for a, b in zip(ema.shadow_params, saver.shadow_params):
            assert torch.equal(a, b), name
    assert loaded["ours <- diffusers"].foreach is True
    # the saved model is the EMA's weights
    saved = cls.from_pretrained(tmp_path / "ours")
    for p, s in zip(saved.parameters(), ours.shadow_params):
        assert torch.equal(p, s)
    with pytest.raises(ValueError, match="`model_cls` was defined"):
        EMAModel(unet.parameters()).save_pretrained(tmp_path / "none")


def test_imports_and_runs_without_diffusers(monkeypatch, tmp_path):
    # sys.modules[name] = None makes `import name` raise ImportError, as when it is not installed
    for name in [m for m in sys.modules if m == "diffusers" or m.startswith("diffusers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.delitem(sys.modules, "eman_fused.integrations.diffusers")
    monkeypatch.setattr(integrations, "diffusers", integrations.diffusers)  # restored afterwards
    module = importlib.import_module("eman_fused.integrations.diffusers")
    p = nn.Parameter(torch.ones(4))
    ema = module.EMAModel([p], decay=0.5)
    ema.optimization_step = 100
    with torch.no_grad():
        p.add_(2)
    ema.step([p])
    assert torch.equal(ema.shadow_params[0], torch.full((4,), 2.0))
    ema.model_cls, ema.model_config = object, {}
    for call in (lambda: ema.save_pretrained(tmp_path), lambda: module.EMAModel.from_pretrained(tmp_path, object),
                 lambda: module.EMAModel([p], model_cls=object)):
        with pytest.raises(ModuleNotFoundError, match="needs the 'diffusers' package, which is not installed"):
            call()


# -- precision: 16-bit shadows -----------------------------------------------------------------------
PRECISION_CASES = [  # (param dtype, shadow dtype)
    (torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
]


class Float64EMA:
    """diffusers' update in float64 from the same shadows, params and decays: the ground truth."""

    def __init__(self, shadows):
        self.shadows = [s.double() for s in shadows]

    def step(self, params, decay):
        for s, p in zip(self.shadows, params):
            s.sub_((1 - decay) * (s - p.detach().double()))


@pytest.mark.parametrize("param_dtype,shadow_dtype", PRECISION_CASES,
                         ids=[f"p={str(p)[6:]}-s={str(s)[6:]}" for p, s in PRECISION_CASES])
def test_precision_rule_vs_float64(DiffusersEMA, trajectory, param_dtype, shadow_dtype):
    """The project's precision rule: against a float64 run of the same steps, the error of our
    shadows is at most 2x torch's own (diffusers' EMAModel in the same dtypes, the better of its
    loop and foreach paths)."""
    model = make_model(param_dtype)
    for p in model.parameters():
        p.requires_grad_(True)  # every param averaged
    params = list(model.parameters())
    kw = dict(decay=0.995)
    ours = EMAModel(params, **kw)
    theirs = [DiffusersEMA(params, foreach=f, **kw) for f in (False, True)]
    for ema in [ours, *theirs]:
        ema.to(dtype=shadow_dtype)
    ref = Float64EMA(ours.shadow_params)

    def after_step():
        for ema in [ours, *theirs]:
            ema.step(params)
        ref.step(params, ours.cur_decay_value)

    replay(model, trajectory, range(STEPS), after_step)

    def error(ema):
        return max((s.double() - r).abs().max().item() for s, r in zip(ema.shadow_params, ref.shadows))

    ours_err, torch_err = error(ours), min(error(t) for t in theirs)
    WORST[f"precision {param_dtype}->{shadow_dtype}: ours/torch error"] = ours_err / max(torch_err, 1e-300)
    assert ours_err <= 2 * torch_err, f"error {ours_err:.3e} vs torch's {torch_err:.3e}"
