"""The CUDA eman_norm kernels (forward_rows / forward_channels, backward_rows / backward_channels,
finalize_sums) on the CPU emulator, against eman_fused's CPU kernels on the same tensors: every
activation dtype, NCHW (row path) and channels_last / N,C (channel path), rows longer than a
block's segment, more rows than row groups, C = 0 / N = 0 / one channel, misaligned pointers,
every combination of weight, bias, residual, ReLU and backward output, several thread orders.
Elementwise outputs agree bit for bit (same float operations); the per-channel sums, added in
another order, agree to float rounding."""
import pytest
import torch

from conftest import assert_same_bits_or_both_nan

pytestmark = pytest.mark.emulated
COVERS = {"forward_rows", "forward_channels", "backward_rows", "backward_channels", "finalize_sums"}
ops = torch.ops.eman_fused
EPS = 1e-5

# name -> (shape, channels_last). Rows path: inner = H*W > 1; channel path: inner == 1.
SHAPES = {
    "nchw": ((2, 3, 5, 7), False),
    "long_rows": ((2, 3, 4097), False),         # two 4,096-element segments per row
    "one_channel": ((4, 1, 3, 3), False),
    "nhwc": ((2, 5, 3, 7), True),
    "nc_wide": ((3, 300), False),               # N,C: channel path, two channel blocks
    "nhwc_tall": ((1, 2, 1, 4097), True),       # 4,097 rows: more than the 4,096 row groups
    "single": ((1, 1, 1, 1), False),
    "c0": ((2, 0, 3, 3), False),
    "c0_nhwc": ((2, 0, 3, 3), True),
    "n0": ((0, 3, 2, 2), False),
    "n0_nhwc": ((0, 3, 2, 2), True),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SUM_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10)}


def stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make(name, dtype, seed=0):
    shape, cl = SHAPES[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    C = shape[1]
    sd = stats_dtype(dtype)
    mean = torch.randn(C, generator=g).to(sd)
    var = (torch.rand(C, generator=g) + 0.5).to(sd)
    weight = torch.randn(C, generator=g).to(sd)
    bias = torch.randn(C, generator=g).to(sd)
    return x, mean, var, weight, bias, g


def geometry(name):
    """(outer, C, inner) as csrc's check_eman_norm computes it for SHAPES[name]."""
    shape, cl = SHAPES[name]
    spatial = 1
    for s in shape[2:]:
        spatial *= s
    return (shape[0] * spatial, shape[1], 1) if cl else (shape[0], shape[1], spatial)


def memory_order(t):
    """t's elements in memory order (t is dense in some memory format)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def like(x, other):
    return other.contiguous(memory_format=torch.channels_last) if (
        x.dim() == 4 and not x.is_contiguous()) else other.contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("opts", [(True, True, False, False), (True, True, True, True),
                                  (False, False, False, True), (True, False, True, False)],
                         ids=["affine", "affine+res+relu", "relu", "w+res"])
def test_forward(emu, name, dtype, opts):
    has_w, has_b, has_r, relu = opts
    x, mean, var, w, b, g = make(name, dtype)
    r = like(x, torch.randn(x.shape, generator=g).to(dtype)) if has_r else None
    w, b = (w if has_w else None), (b if has_b else None)
    expected = ops.eman_norm(x, mean, var, w, b, EPS, r, relu)
    outer, C, inner = geometry(name)
    assert memory_order(expected).numel() == outer * C * inner
    xb, yb = emu.copy_in(memory_order(x)), emu.buffer(x.numel(), dtype)
    rb = emu.copy_in(memory_order(r)) if has_r else None
    ptr = lambda t: None if t is None else emu.copy_in(t).ptr  # noqa: E731
    emu.check(emu.lib.emu_norm_forward(xb.ptr, rb.ptr if rb else None, yb.ptr, ptr(mean), ptr(var),
                                       ptr(w), ptr(b), EPS, int(relu), emu.tag(dtype),
                                       outer, C, inner))
    assert_same_bits_or_both_nan(yb.tensor, memory_order(expected))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("relu", [False, True])
def test_backward_every_output(emu, name, dtype, relu):
    check_backward(emu, name, dtype, relu, (True, True, True, True), has_w=True)


@pytest.mark.parametrize("name", ["nchw", "long_rows", "nhwc", "nc_wide", "c0", "n0"])
@pytest.mark.parametrize("mask", [(True, False, False, False), (False, True, False, False),
                                  (False, False, True, False), (False, False, False, True),
                                  (True, False, True, True)], ids=str)
def test_backward_output_masks(emu, name, mask):
    check_backward(emu, name, torch.float32, True, mask, has_w=False)


@pytest.mark.parametrize("name", ["nchw", "long_rows", "nhwc", "nhwc_tall", "nc_wide"])
def test_backward_thread_orders(emu, order, name):
    check_backward(emu, name, torch.bfloat16, True, (True, True, True, True), has_w=True)


@pytest.mark.parametrize("offset", [2, 4, 8])
def test_misaligned_pointers(emu, offset):
    """Element-aligned but not 16-byte aligned tensors (a view at an offset) on both paths."""
    for name in ("nchw", "nhwc"):
        x, mean, var, w, b, g = make(name, torch.float16, seed=offset)
        outer, C, inner = geometry(name)
        xb = emu.copy_in(memory_order(x), offset=offset)
        yb = emu.buffer(x.numel(), torch.float16, offset=offset)
        emu.check(emu.lib.emu_norm_forward(xb.ptr, None, yb.ptr, emu.copy_in(mean).ptr,
                                           emu.copy_in(var).ptr, emu.copy_in(w).ptr,
                                           emu.copy_in(b).ptr, EPS, 1, emu.tag(torch.float16),
                                           outer, C, inner))
        assert_same_bits_or_both_nan(yb.tensor, memory_order(ops.eman_norm(x, mean, var, w, b, EPS,
                                                                           None, True)))
        check_backward(emu, name, torch.float16, True, (True, True, True, True), has_w=True,
                       offset=offset)


def check_backward(emu, name, dtype, relu, mask, has_w, offset=0):
    x, mean, var, w, _, g = make(name, dtype, seed=1)
    w = w if has_w else None
    grad = like(x, torch.randn(x.shape, generator=g).to(dtype))
    out = ops.eman_norm(x, mean, var, w, None, EPS, None, True) if relu else None
    exp = ops.eman_norm_backward(grad, x, out, mean, var, w, EPS, relu, list(mask))
    outer, C, inner = geometry(name)
    sd = stats_dtype(dtype)
    gb_, xb = emu.copy_in(memory_order(grad), offset=offset), emu.copy_in(memory_order(x), offset=offset)
    ob = emu.copy_in(memory_order(out), offset=offset) if relu else None
    gx = emu.buffer(x.numel(), dtype, offset=offset) if mask[0] else None
    gr = emu.buffer(x.numel(), dtype, offset=offset) if mask[1] else None
    gw = emu.buffer(C, sd) if mask[2] else None
    gbias = emu.buffer(C, sd) if mask[3] else None
    ws = None
    if mask[2] or mask[3]:  # exactly the size the launcher asks for: a larger index faults
        ws = emu.buffer(emu.lib.emu_norm_backward_workspace(outer, C, inner), sd)
    p = lambda b: None if b is None else b.ptr  # noqa: E731
    emu.check(emu.lib.emu_norm_backward(
        gb_.ptr, xb.ptr, p(ob), p(gx), p(gr), emu.copy_in(mean).ptr, emu.copy_in(var).ptr,
        None if w is None else emu.copy_in(w).ptr, EPS, emu.tag(dtype), outer, C, inner,
        p(gw), p(gbias), p(ws)))
    if mask[0]:
        assert_same_bits_or_both_nan(gx.tensor, memory_order(exp[0]))
    if mask[1]:
        assert_same_bits_or_both_nan(gr.tensor, memory_order(exp[1]))
    tol = SUM_TOL.get(dtype, dict(rtol=1e-4, atol=1e-4))
    if mask[2]:
        torch.testing.assert_close(gw.tensor, exp[2], **tol)
    if mask[3]:
        torch.testing.assert_close(gbias.tensor, exp[3], **tol)


def test_configurations_beyond_the_grid_are_refused(emu):
    # 65,536 row segments (grid.y > 65,535) and > 2^31 rows: refused by the launchers before any
    # memory is touched (null pointers here would fault otherwise)
    for outer, C, inner in ((1, 1, 4096 * 65536), (2**31, 1, 2)):
        rc = emu.lib.emu_norm_forward(None, None, None, None, None, None, None, EPS, 0, 0, outer, C, inner)
        assert emu.lib.emu_error_name(rc) == b"cudaErrorInvalidConfiguration"
        rc = emu.lib.emu_norm_backward(None, None, None, None, None, None, None, None, EPS, 0, outer, C,
                                       inner, None, None, None)
        assert emu.lib.emu_error_name(rc) == b"cudaErrorInvalidConfiguration"


def test_unknown_dtype_is_refused(emu):
    for tag in (emu.tag(None), 7):  # no activation type: refused before any launch
        rc = emu.lib.emu_norm_forward(None, None, None, None, None, None, None, EPS, 0, tag, 2, 3, 4)
        assert emu.lib.emu_error_name(rc) == b"cudaErrorInvalidValue"
        rc = emu.lib.emu_norm_backward(None, None, None, None, None, None, None, None, EPS, tag, 2, 3, 4,
                                       None, None, None)
        assert emu.lib.emu_error_name(rc) == b"cudaErrorInvalidValue"
