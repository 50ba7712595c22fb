"""The in-place ops and autograd: ema_update_ refuses the teachers torch's own in-place ops refuse
(and non-leaves whose history it would falsify) before writing; eman_norm's double backward is
correct."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import eman_fused
from eman_fused import reference

from conftest import AVAILABLE, HAS_GPU, bits

EMA_BACKENDS = ["cpu", "reference"] + (["triton"] if "triton" in AVAILABLE and not HAS_GPU else [])


def teachers_autograd_tracks():
    leaf = torch.randn(8, requires_grad=True)
    return {
        "leaf": (leaf, leaf, "is a leaf tensor that requires grad"),
        "view_of_leaf": (leaf, leaf[2:5], "is a view of a leaf Variable that requires grad"),
        "non_leaf": (leaf, leaf * 1.0, "requires grad and has autograd history"),
        "view_of_non_leaf": (leaf, (leaf * 1.0)[1:4], "requires grad and has autograd history"),
    }


@pytest.mark.parametrize("backend", EMA_BACKENDS)
@pytest.mark.parametrize("case", list(teachers_autograd_tracks()))
def test_teachers_autograd_tracks_are_refused_under_grad_mode_before_any_write(backend, case):
    leaf, teacher, message = teachers_autograd_tracks()[case]
    other = torch.zeros(3)  # a valid first pair: nothing may be written to it either
    before, before_other = bits(teacher), bits(other)
    student = torch.zeros(teacher.shape)
    with pytest.raises(RuntimeError, match=message):
        eman_fused.ema_update_([other, teacher], [torch.ones(3), student], 0.5, backend=backend)
    assert torch.equal(bits(teacher), before) and torch.equal(bits(other), before_other)
    if case == "view_of_leaf":  # the same as torch's own in-place ops
        with pytest.raises(RuntimeError, match="a view of a leaf Variable that requires grad"):
            teacher.mul_(0.5)


def test_the_reported_history_case_cannot_give_a_wrong_gradient():
    # w = leaf * 1.0; ema_update_([w], [zeros], 0.5); w.sum().backward() gave leaf.grad = 1
    # (true value 0.5): now the update refuses w under grad mode.
    leaf = torch.ones(4, requires_grad=True)
    w = leaf * 1.0
    with pytest.raises(RuntimeError, match="autograd history"):
        eman_fused.ema_update_([w], [torch.zeros(4)], 0.5)
    w.sum().backward()
    assert torch.equal(leaf.grad, torch.ones(4))  # w untouched: its history is still true


@pytest.mark.parametrize("backend", EMA_BACKENDS)
def test_under_no_grad_views_and_non_leaves_update_as_torch_in_place_ops_do(backend):
    leaf = torch.randn(8, requires_grad=True)
    with torch.no_grad():
        view = leaf[2:5]
        eman_fused.ema_update_([view], [torch.zeros(3)], 0.5, backend=backend)
        expected = leaf.detach().clone()
    assert torch.equal(leaf.detach()[2:5], expected[2:5])
    # students are read as constants: a student that requires grad is fine under grad mode
    t = torch.zeros(4)
    eman_fused.ema_update_([t], [torch.ones(4, requires_grad=True)], 0.5, backend=backend)
    assert not t.requires_grad and torch.equal(t, torch.full((4,), 0.5))


NORM_BACKENDS = ["cpu"] + (["triton"] if "triton" in AVAILABLE and not HAS_GPU else [])


# Every option on the C++ kernels; one case (all inputs, ReLU) on Triton, slow in the interpreter.
GRADGRAD_CASES = [("cpu", relu, affine, residual) for relu in (False, True)
                  for affine, residual in ((True, True), (True, False), (False, False))]
GRADGRAD_CASES += [(b, True, True, True) for b in NORM_BACKENDS if b != "cpu"]


@pytest.mark.parametrize("backend,relu,affine,residual", GRADGRAD_CASES)
def test_eman_norm_double_backward_passes_gradgradcheck(backend, relu, affine, residual):
    torch.manual_seed(0)
    c = 3
    x = torch.randn(2, c, 3, 2, dtype=torch.float64, requires_grad=True)
    mean, var = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    w = torch.randn(c, dtype=torch.float64, requires_grad=True) if affine else None
    b = torch.randn(c, dtype=torch.float64, requires_grad=True) if affine else None
    r = torch.randn(2, c, 3, 2, dtype=torch.float64, requires_grad=True) if residual else None
    inputs = [t for t in (x, w, b, r) if t is not None]

    def fn(*args):
        it = iter(args)
        xx = next(it)
        ww = next(it) if affine else None
        bb = next(it) if affine else None
        rr = next(it) if residual else None
        return eman_fused.eman_norm(xx, mean, var, ww, bb, 1e-5, rr, relu, backend=backend)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@settings(max_examples=20, deadline=None)
@given(c=st.integers(1, 5), h=st.integers(1, 4), relu=st.booleans(), channels_last=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_eman_norm_second_derivatives_match_eager_autograd(c, h, relu, channels_last, dtype):
    g = torch.Generator().manual_seed(c * 31 + h)
    x = torch.randn(2, c, h, 3, generator=g).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    mean, var = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
    v, u = torch.randn(x.shape, generator=g).to(dtype), torch.randn(x.shape, generator=g).to(dtype)

    def second(norm):
        xx, ww, bb = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        y = norm(xx, mean, var, ww, bb, 1e-5, None, relu)
        gx, gw = torch.autograd.grad(y, [xx, ww], v, create_graph=True)
        # a gradient penalty-like scalar of the first gradients, then its gradients
        total = (gx.float() * u.float()).sum() + (gw * torch.arange(c, dtype=gw.dtype)).sum()
        return torch.autograd.grad(total, [xx, ww, bb], allow_unused=True)

    ours = second(lambda *a: eman_fused.eman_norm(*a))
    eager = second(reference.eman_norm)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, e in zip(ours, eager):
        if e is None:
            assert a is None or not a.abs().max() > 0
        else:
            torch.testing.assert_close(a.float(), e.float(), **tol)
