"""eman_norm and the EMAN BatchNorm modules against eager PyTorch (CPU kernels)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import eman_fused
from eman_fused import reference
from eman_fused.nn import EMANBatchNorm1d, EMANBatchNorm2d, EMANBatchNorm3d, convert_to_eman
from conftest import BACKEND_CASES, HAS_GPU, assert_same_bits_or_both_nan

# eman_norm's kernels that run here: C++ on the CPU; Triton (GPU, or the interpreter).
NORM_CASES = [(b, d) for b, d in BACKEND_CASES if b in ("cpu", "cuda", "triton")]
NORM_BACKENDS = pytest.mark.parametrize("backend,device", NORM_CASES, ids=[b for b, _ in NORM_CASES])

ops = torch.ops.eman_fused
# Output tolerances by activation dtype: kernel and reference both compute in fp32 and round
# once; F.batch_norm orders the fp32 operations differently ((x - mean) * invstd * w + b).
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=2**-7, atol=2**-7), torch.float16: dict(rtol=2**-10, atol=2**-9)}
SHAPES = {2: (6, 7), 3: (3, 5, 9), 4: (2, 7, 5, 3), 5: (2, 3, 2, 3, 5)}  # odd channels, tails


def stats(c, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(c, generator=g, dtype=dtype), torch.rand(c, generator=g, dtype=dtype) + 0.5,
            torch.randn(c, generator=g, dtype=dtype), torch.randn(c, generator=g, dtype=dtype))


def eager(x, mean, var, w, b, eps, r, relu):
    """What users run today: eval-mode BN, then add, then ReLU, in fp32."""
    y = F.batch_norm(x.float() if x.dtype != torch.float64 else x, mean, var, w, b, False, 0.0, eps)
    if r is not None:
        y = y + r.to(y.dtype)
    return (torch.relu(y) if relu else y).to(x.dtype)


def layouts(rank):
    return ["contiguous"] + {4: ["channels_last"], 5: ["channels_last_3d"]}.get(rank, [])


CASES = [(rank, layout) for rank in SHAPES for layout in layouts(rank)]


def make_x(rank, layout, dtype, seed=1):
    x = torch.randn(SHAPES[rank], generator=torch.Generator().manual_seed(seed)).to(dtype)
    if layout != "contiguous":
        x = x.to(memory_format=getattr(torch, layout))
    return x


@pytest.mark.parametrize("rank,layout", CASES, ids=[f"{r}d-{l}" for r, l in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("relu", [True, False])
@NORM_BACKENDS
def test_forward_matches_eval_batchnorm_add_relu(rank, layout, dtype, affine, residual, relu, backend, device):
    x = make_x(rank, layout, dtype).to(device)
    mean, var, w, b = (t.to(device) for t in stats(x.shape[1]))
    if not affine:
        w = b = None
    r = make_x(rank, layout, dtype, seed=2).to(device) if residual else None
    y = eman_fused.eman_norm(x, mean, var, w, b, 1e-3, r, relu, backend=backend)
    torch.testing.assert_close(y, eager(x, mean, var, w, b, 1e-3, r, relu), **TOL[dtype])
    torch.testing.assert_close(y, reference.eman_norm(x, mean, var, w, b, 1e-3, r, relu), **TOL[dtype])
    assert y.stride() == x.stride()  # memory format kept


@pytest.mark.parametrize("shape,layout", [((2, 3, 37, 19), "contiguous"), ((3, 300, 2, 3), "channels_last"),
                                          ((5, 513), "contiguous")], ids=["nchw", "nhwc", "nc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@NORM_BACKENDS
def test_long_rows_forward_and_backward(shape, layout, dtype, backend, device):
    """Rows longer than the CPU kernels' 256-element float blocks, not a multiple of them."""
    fmt = getattr(torch, layout) if layout != "contiguous" else torch.contiguous_format

    def run(fn):
        x, r, dy = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
                    .to(device, memory_format=fmt) for seed in (4, 5, 6))
        x.requires_grad_(), r.requires_grad_()
        mean, var, w, b = (t.to(device) for t in stats(shape[1]))
        w.requires_grad_(), b.requires_grad_()
        y = fn(x, mean, var, w, b, 1e-3, r, True)
        y.backward(dy)
        return [t.cpu() for t in (y, x.grad, r.grad, w.grad, b.grad)]

    ours = run(lambda *a: eman_fused.eman_norm(*a, backend=backend))
    expected = run(eager)
    for name, a, e in zip(("y", "grad x", "grad residual"), ours, expected):
        torch.testing.assert_close(a, e, **TOL[dtype], msg=name)
    for name, a, e in zip(("grad weight", "grad bias"), ours[3:], expected[3:]):  # fp32 sums
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-3, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@NORM_BACKENDS
def test_relu_passes_nan_and_negative_zero_like_torch(dtype, backend, device):
    """ReLU of the normalized value keeps NaN and -0.0 as torch.relu does, bit for bit."""
    special = torch.tensor([-0.0, 0.0, float("nan"), -float("nan"), float("inf"), -float("inf"),
                            -1.5, 1.5, -1e-30, 1e-30])
    x = special.repeat(40).reshape(1, 1, -1).to(dtype)  # one 400-element row
    # y = x exactly: scale 1, shift -0.0 (a +0.0 shift would turn -0.0 into +0.0 before the ReLU)
    mean, var, bias = torch.zeros(1), torch.ones(1), torch.tensor([-0.0])
    y = eman_fused.eman_norm(x.to(device), mean.to(device), var.to(device), None, bias.to(device), 1e-30,
                             None, True, backend=backend).cpu()
    assert_same_bits_or_both_nan(y, torch.relu(x))


def test_forward_float64_and_mixed_layout_residual():
    x = make_x(4, "channels_last", torch.float64)
    mean, var, w, b = stats(7, torch.float64)
    r = make_x(4, "contiguous", torch.float64, seed=3)  # converted to x's layout
    torch.testing.assert_close(eman_fused.eman_norm(x, mean, var, w, b, 1e-5, r, True),
                               eager(x, mean, var, w, b, 1e-5, r, True), **TOL[torch.float64])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 40), spatial=st.lists(st.integers(1, 9), max_size=3),
       channels_last=st.booleans(), relu=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes(n, c, spatial, channels_last, relu, seed):
    x = torch.randn((n, c, *spatial), generator=torch.Generator().manual_seed(seed))
    if channels_last and len(spatial) in (2, 3):
        x = x.to(memory_format=torch.channels_last if len(spatial) == 2 else torch.channels_last_3d)
    mean, var, w, b = stats(c, seed=seed)
    expected = eager(x, mean, var, w, b, 1e-5, None, relu)
    for backend, device in NORM_CASES:
        dev = [t.to(device) for t in (x, mean, var, w, b)]
        torch.testing.assert_close(eman_fused.eman_norm(*dev, 1e-5, None, relu, backend=backend).cpu(),
                                   expected, **TOL[torch.float32])


@pytest.mark.parametrize("rank,layout", CASES, ids=[f"{r}d-{l}" for r, l in CASES])
@NORM_BACKENDS
def test_gradcheck_float64(rank, layout, backend, device):
    x = make_x(rank, layout, torch.float64).to(device).requires_grad_()
    r = make_x(rank, layout, torch.float64, seed=2).to(device).requires_grad_()
    mean, var, w, b = (t.to(device).requires_grad_(i >= 2)
                       for i, t in enumerate(stats(x.shape[1], torch.float64)))
    assert torch.autograd.gradcheck(
        lambda x, w, b, r: eman_fused.eman_norm(x, mean, var, w, b, 1e-5, r, True, backend=backend),
        (x, w, b, r))
    assert torch.autograd.gradcheck(
        lambda x: eman_fused.eman_norm(x, mean, var, None, None, 1e-5, None, False, backend=backend), (x,))


@pytest.mark.parametrize("rank,layout", CASES, ids=[f"{r}d-{l}" for r, l in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@NORM_BACKENDS
def test_gradients_match_eager_autograd(rank, layout, dtype, backend, device):
    def grads(fn):
        x = make_x(rank, layout, dtype).to(device).requires_grad_()
        r = make_x(rank, layout, dtype, seed=2).to(device).requires_grad_()
        mean, var, w, b = (t.to(device) for t in stats(x.shape[1]))
        w.requires_grad_(), b.requires_grad_()
        y = fn(x, mean, var, w, b, 1e-5, r, True)
        y.backward(make_x(rank, layout, dtype, seed=4).to(device))
        return x.grad, r.grad, w.grad, b.grad
    ours = grads(lambda *a: eman_fused.eman_norm(*a, backend=backend))
    theirs = grads(eager)
    for a, e in zip(ours, theirs):
        tol = TOL[a.dtype] if a.dtype != torch.float32 or a.dim() > 1 else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a, e, **tol)


EMPTY_CASES = [((0, 3, 4, 4), "contiguous"), ((2, 0, 4, 4), "contiguous"), ((0, 3, 4, 4), "channels_last"),
               ((2, 0, 4, 4), "channels_last"), ((0, 0, 2, 2), "contiguous"), ((0, 3), "contiguous"),
               ((3, 0), "contiguous")]


@pytest.mark.parametrize("shape,layout", EMPTY_CASES,
                         ids=["x".join(map(str, s)) + f"-{l}" for s, l in EMPTY_CASES])
@NORM_BACKENDS
def test_empty_batch_or_no_channels(shape, layout, backend, device):
    """N = 0 or C = 0: empty outputs and, as eager autograd gives, zero weight / bias gradients."""
    def grads(fn):
        x = torch.randn(shape)
        if layout != "contiguous":
            x = x.to(memory_format=torch.channels_last)
        x = x.to(device).requires_grad_()
        mean, var, w, b = (t.to(device) for t in stats(shape[1]))
        w.requires_grad_(), b.requires_grad_()
        y = fn(x, mean, var, w, b, 1e-5, None, True)
        assert y.shape == x.shape
        y.sum().backward()
        return x.grad, w.grad, b.grad
    # the reference's plain tensor ops (F.batch_norm itself refuses C = 0)
    for a, e in zip(grads(lambda *a: eman_fused.eman_norm(*a, backend=backend)), grads(reference.eman_norm)):
        assert a.shape == e.shape and torch.equal(a.cpu(), e.cpu())


@NORM_BACKENDS
def test_gradient_uses_frozen_statistics_not_batch_statistics(backend, device):
    # Some public BN kernels apply the batch-statistics backward even in eval mode. Ours must be
    # dx = dy * weight * rsqrt(var + eps): the statistics are constants.
    x = torch.randn(8, 4, 5, 5, device=device, requires_grad=True)
    mean, var, w, b = (t.to(device) for t in stats(4))
    dy = torch.randn(8, 4, 5, 5, device=device)
    (gx,) = torch.autograd.grad(eman_fused.eman_norm(x, mean, var, w, b, 1e-5, backend=backend), x, dy)
    frozen = dy * (w * torch.rsqrt(var + 1e-5)).reshape(1, -1, 1, 1)
    torch.testing.assert_close(gx, frozen)
    xb = x.detach().requires_grad_()  # batch-statistics formula: what training-mode BN would give
    (gb,) = torch.autograd.grad(F.batch_norm(xb, None, None, w, b, True, 0.0, 1e-5), xb, dy)
    assert (gx - gb).abs().max() > 0.1


def test_opcheck_forward_and_backward():
    x = make_x(4, "channels_last", torch.float32)
    r = make_x(4, "channels_last", torch.float32, seed=2)
    mean, var, w, b = stats(7)
    torch.library.opcheck(ops.eman_norm, (x, mean, var, w, b, 1e-5, r, True))
    torch.library.opcheck(ops.eman_norm, (x.requires_grad_(), mean, var, w.requires_grad_(),
                                          b.requires_grad_(), 1e-5, None, False))
    out = eman_fused.eman_norm(x.detach(), mean, var, w.detach(), b.detach(), 1e-5, None, True)
    torch.library.opcheck(ops.eman_norm_backward,
                          (torch.randn_like(out), x.detach(), out, mean, var, w.detach(), 1e-5, True,
                           [True, True, True, True]))


def test_compiles_fullgraph():
    x = make_x(4, "contiguous", torch.float32)
    mean, var, w, b = stats(7)
    fn = torch.compile(lambda x: eman_fused.eman_norm(x, mean, var, w, b, 1e-5, None, True),
                       fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(x), eager(x, mean, var, w, b, 1e-5, None, True))


BAD = {
    "channels": (lambda x, m, v, w, b: (x, m[:6], v[:6], w, b, 1e-5, None), ValueError, "running_mean must have shape [7]"),
    "stat_dtype": (lambda x, m, v, w, b: (x, m, v.double(), w, b, 1e-5, None), TypeError, "running_var must be"),
    "stat_device": (lambda x, m, v, w, b: (x, m, v, w.to("meta"), b, 1e-5, None), ValueError, "weight is on meta"),
    "weight_shape": (lambda x, m, v, w, b: (x, m, v, w[None], b, 1e-5, None), ValueError, "weight must have shape"),
    "residual_shape": (lambda x, m, v, w, b: (x, m, v, w, b, 1e-5, x[:1]), ValueError, "residual must have x's shape"),
    "residual_dtype": (lambda x, m, v, w, b: (x, m, v, w, b, 1e-5, x.double()), TypeError, "residual must have x's dtype"),
    "eps_negative": (lambda x, m, v, w, b: (x, m, v, w, b, -1e-5, None), ValueError, "eps must be a finite number >= 0"),
    "eps_inf": (lambda x, m, v, w, b: (x, m, v, w, b, float("inf"), None), ValueError, "eps must be"),
    "rank": (lambda x, m, v, w, b: (x[0, 0, 0], m[:3], v[:3], None, None, 1e-5, None), ValueError, "N,C or"),
    "int_input": (lambda x, m, v, w, b: (x.long(), m, v, w, b, 1e-5, None), TypeError, "x must be float32"),
}


@pytest.mark.parametrize("name", list(BAD))
@NORM_BACKENDS
def test_bad_input(name, backend, device):
    make, exc, fragment = BAD[name]
    x = make_x(4, "contiguous", torch.float32).to(device)
    args = make(x, *(t.to(device) for t in stats(7)))
    with pytest.raises(exc, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        eman_fused.eman_norm(*args, backend=backend)


def test_opcheck_triton_ops():
    if "triton" not in [b for b, _ in NORM_CASES]:
        pytest.skip("triton backend not available here")
    from eman_fused.triton import norm as _  # noqa: F401
    device = "cuda" if HAS_GPU else "cpu"
    x = make_x(4, "channels_last", torch.float32).to(device).requires_grad_()
    mean, var, w, b = (t.to(device) for t in stats(7))
    kw = {}  # every check, in the interpreter too: the ops are opaque custom ops with fake kernels
    torch.library.opcheck(ops.eman_norm_triton, (x, mean, var, w.requires_grad_(), b, 1e-5, None, True), **kw)
    out = eman_fused.eman_norm(x.detach(), mean, var, w.detach(), b, 1e-5, None, True, backend="triton")
    torch.library.opcheck(ops.eman_norm_backward_triton, (torch.randn_like(out), x.detach(), out, mean, var,
                                                          w.detach(), 1e-5, True, [True, True, True, True]), **kw)


# ------------------------------------------------------------------ modules


@pytest.mark.parametrize("cls,bn_cls,rank", [(EMANBatchNorm1d, nn.BatchNorm1d, 3),
                                             (EMANBatchNorm2d, nn.BatchNorm2d, 4),
                                             (EMANBatchNorm3d, nn.BatchNorm3d, 5)])
def test_module_loads_batchnorm_state_and_matches_eval_bn_in_train_mode_too(cls, bn_cls, rank):
    bn = bn_cls(SHAPES[rank][1])
    bn.train()
    for _ in range(3):  # real running statistics and num_batches_tracked
        bn(make_x(rank, "contiguous", torch.float32, seed=_) * 3 + 1)
    eman = cls(bn.num_features)
    eman.load_state_dict(bn.state_dict())
    x = make_x(rank, "contiguous", torch.float32, seed=9)
    bn.eval()
    expected = bn(x)
    before = {k: v.clone() for k, v in eman.state_dict().items()}
    for mode in (True, False):
        eman.train(mode)
        torch.testing.assert_close(eman(x), expected)
    for k, v in eman.state_dict().items():  # never updates its own statistics
        assert torch.equal(v, before[k]), k
    assert eman.num_batches_tracked.item() == 3
    assert set(bn.state_dict()) == set(eman.state_dict())
    bn.load_state_dict(eman.state_dict())  # and back


def test_module_rejects_wrong_rank_and_untracked_stats():
    with pytest.raises(ValueError, match="expects 4-D"):
        EMANBatchNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="track_running_stats"):
        EMANBatchNorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        EMANBatchNorm2d.from_batchnorm(nn.BatchNorm2d(3, track_running_stats=False))


def test_module_reads_bf16_statistics_as_float32():
    bn = EMANBatchNorm2d(7).to(torch.bfloat16)
    x = make_x(4, "channels_last", torch.bfloat16)
    ref = reference.eman_norm(x, bn.running_mean.float(), bn.running_var.float(), bn.weight.float(),
                              bn.bias.float(), bn.eps)
    torch.testing.assert_close(bn(x), ref, **TOL[torch.bfloat16])


class BasicBlock(nn.Module):
    """torchvision's BasicBlock structure: conv-bn-relu-conv-bn, add identity, relu."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


def small_resnet():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         BasicBlock(8), BasicBlock(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5), nn.BatchNorm1d(5))


@pytest.mark.parametrize("fuse_relu", [False, True])
def test_convert_to_eman_on_a_resnet(fuse_relu):
    torch.manual_seed(0)
    model = small_resnet()
    model.train()
    for _ in range(3):
        model(torch.randn(4, 3, 8, 8))
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    expected = model(x)
    keys = list(model.state_dict())
    convert_to_eman(model, fuse_relu=fuse_relu)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(isinstance(m, eman_fused.nn.EMANBatchNorm) for m in model.modules()) == 6
    assert isinstance(model[2], nn.Identity if fuse_relu else nn.ReLU) and model[1].relu == fuse_relu
    assert list(model.state_dict()) == keys
    model.train()  # EMAN: running statistics in training mode too
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    fresh = small_resnet()
    fresh.load_state_dict(model.state_dict())  # an EMAN checkpoint loads into the plain model


def test_convert_swaps_syncbatchnorm():
    model = nn.Sequential(nn.SyncBatchNorm(4))
    convert_to_eman(model)
    assert type(model[0]) is eman_fused.nn.EMANBatchNorm
    torch.testing.assert_close(model(torch.ones(2, 4, 3, 3)), torch.ones(2, 4, 3, 3) / (1 + 1e-5) ** 0.5)


@NORM_BACKENDS
def test_strided_statistics(backend, device):
    x = make_x(4, "channels_last", torch.float32).to(device)
    m, v, w, b = (torch.stack([t, t], 1).reshape(-1)[::2].to(device) for t in stats(7))  # strided views
    assert not m.is_contiguous() or m.stride() == (1,)
    ref = reference.eman_norm(x, m, v, w, b)
    torch.testing.assert_close(eman_fused.eman_norm(x, m, v, w, b, backend=backend), ref)


def test_backend_choice():
    x = make_x(4, "contiguous", torch.float32)
    mean, var, w, b = stats(7)
    # without a GPU: not available; with one: cannot run CPU tensors
    with pytest.raises((RuntimeError, ValueError), match="backend 'cuda' (is not available|cannot update)"):
        eman_fused.eman_norm(x, mean, var, w, b, backend="cuda")
    torch.testing.assert_close(eman_fused.eman_norm(x, mean, var, w, b, backend="reference"),
                               reference.eman_norm(x, mean, var, w, b))
    bn = EMANBatchNorm2d(7, backend="reference")
    torch.testing.assert_close(bn(x), reference.eman_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no GPU visible")
def test_cuda_tensors_under_auto():
    x = torch.randn(2, 3, 4, 4, device="cuda")
    mean, var, w, b = (t.cuda() for t in stats(3))
    torch.testing.assert_close(eman_fused.eman_norm(x, mean, var, w, b), reference.eman_norm(x, mean, var, w, b))


def test_cuda_norm_kernels_registered_when_built_with_cuda():
    from eman_fused import _build_info
    for op in ("eman_fused::eman_norm", "eman_fused::eman_norm_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") == _build_info.CUDA_BUILT
