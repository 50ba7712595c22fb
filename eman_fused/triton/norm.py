"""Triton twin of eman_norm (forward and backward), same math and validation as the C++ op.

The input is walked as [outer, C, inner] in memory order (see csrc/norm/geometry.h):
- inner > 1 (contiguous N,C,*S): program (row, k-block) handles one (n, c) row segment with
  scalar channel parameters;
- inner == 1 (channels_last, or N,C): program (row-block, c-block) handles a tile of rows x
  channels with a channel vector.
The backward writes grad_x / grad_residual in the same pass and reduces its tile to one
partial sum per channel, added with atomics: a per-channel reduction in the same launch
(float32 atomics: the summation order, hence the last bits, may vary run to run). The final
grad_weight = sum * rsqrt(var + eps) is a [C]-sized torch op.
Block sizes are not tuned on a GPU yet.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..ops.layout import norm_memory_format
from ..ops.norm import _check_devices, _eman_norm_fake
from ..ops.norm import _double_backward, _setup_backward_context
from ._common import launch, round_to

ROW_BLOCK = 1024  # elements of one row segment (inner > 1)
TILE_ROWS, TILE_CHANNELS = 32, 64  # tile for inner == 1


@triton.jit
def _channel_params(mean, var, w, b, c, cmask, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    ACC: tl.constexpr):
    v = tl.load(var + c, mask=cmask, other=1.0).to(ACC) + eps
    if ACC == tl.float32:  # IEEE-rounded, as the C++ kernels: compiled fp32 sqrt and division
        invstd = tl.div_rn(tl.zeros_like(v) + 1.0, tl.sqrt_rn(v))  # are approximate otherwise
    else:  # float64's are IEEE-rounded (the _rn forms are float32-only)
        invstd = 1.0 / tl.sqrt(v)
    scale = invstd
    if HAS_W:
        scale = tl.load(w + c, mask=cmask, other=0.0).to(ACC) * invstd
    # -(mean*scale) written as a product with -1.0, an exact negation on every Triton: Triton
    # 3.6 lowers unary minus to 0 - x, which turns -(+0.0) into +0.0 (then x = -0.0 with a
    # -0.0 bias would come out +0.0, not torch's -0.0).
    shift = tl.load(mean + c, mask=cmask, other=0.0).to(ACC) * scale * -1.0
    if HAS_B:
        shift += tl.load(b + c, mask=cmask, other=0.0).to(ACC)
    return scale, shift


@triton.jit
def _walk(outer, C, inner, ROWS: tl.constexpr, COLS: tl.constexpr, INNER_ONE: tl.constexpr):
    """This program's elements (idx, mask) and their channels (c, cmask), shaped to broadcast:
    a rows x channels tile (inner == 1) or one row segment of a single channel (inner > 1)."""
    if INNER_ONE:
        o = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
        c = tl.program_id(1) * COLS + tl.arange(0, COLS)[None, :]
        idx = o * C + c
        cmask = c < C
        mask = (o < outer) & cmask
    else:
        row = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1).to(tl.int64) * COLS + tl.arange(0, COLS)
        c = row % C
        idx = row * inner + k
        cmask = c < C
        mask = k < inner
    return idx, mask, c, cmask


@triton.jit
def _norm_fwd(x, r, y, mean, var, w, b, eps, outer, C, inner, HAS_W: tl.constexpr,
              HAS_B: tl.constexpr, HAS_R: tl.constexpr, RELU: tl.constexpr, ROWS: tl.constexpr,
              COLS: tl.constexpr, INNER_ONE: tl.constexpr, ACC: tl.constexpr):
    idx, mask, c, cmask = _walk(outer, C, inner, ROWS, COLS, INNER_ONE)
    scale, shift = _channel_params(mean, var, w, b, c, cmask, eps, HAS_W, HAS_B, ACC)
    v = tl.load(x + idx, mask=mask).to(ACC) * scale + shift
    if HAS_R:
        v += tl.load(r + idx, mask=mask).to(ACC)
    if RELU:
        v = tl.where(v < 0, 0.0, v)  # as torch.relu: NaN and -0.0 pass through
    tl.store(y + idx, round_to(v, y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd(g, x, out, gx, gr, sums, mean, var, w, eps, outer, C, inner, HAS_W: tl.constexpr,
              RELU: tl.constexpr, NEED_GX: tl.constexpr, NEED_GR: tl.constexpr,
              NEED_SUMS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
              INNER_ONE: tl.constexpr, ACC: tl.constexpr):
    idx, mask, c, cmask = _walk(outer, C, inner, ROWS, COLS, INNER_ONE)
    scale, _ = _channel_params(mean, var, w, w, c, cmask, eps, HAS_W, False, ACC)
    gm = tl.load(g + idx, mask=mask, other=0.0).to(ACC)
    if RELU:
        gm = tl.where(tl.load(out + idx, mask=mask, other=0.0).to(ACC) > 0, gm, 0.0)
    if NEED_GX:
        tl.store(gx + idx, round_to(gm * scale, gx.dtype.element_ty), mask=mask)
    if NEED_GR:
        tl.store(gr + idx, round_to(gm, gr.dtype.element_ty), mask=mask)
    if NEED_SUMS:
        mu = tl.load(mean + c, mask=cmask, other=0.0).to(ACC)
        xc = tl.where(mask, tl.load(x + idx, mask=mask, other=0.0).to(ACC) - mu, 0.0)
        # one partial sum per channel of the tile (per row segment: one scalar)
        tl.atomic_add(sums + c, tl.sum(gm, axis=0, keep_dims=INNER_ONE), mask=cmask)
        tl.atomic_add(sums + C + c, tl.sum(gm * xc, axis=0, keep_dims=INNER_ONE), mask=cmask)


def _geometry(x: torch.Tensor):
    """(outer, C, inner, memory format), as csrc/norm/geometry.cpp computes it."""
    fmt = norm_memory_format(x)
    spatial = math.prod(x.shape[2:])  # not x[0, 0]: N = 0 or C = 0 has no such element
    if fmt == torch.contiguous_format:
        return x.shape[0], x.shape[1], spatial, fmt
    return x.shape[0] * spatial, x.shape[1], 1, fmt


def _grid(outer, C, inner):
    if inner == 1:
        return (triton.cdiv(outer, TILE_ROWS), triton.cdiv(C, TILE_CHANNELS)), TILE_ROWS, TILE_CHANNELS
    return (outer * C, triton.cdiv(inner, ROW_BLOCK)), 1, ROW_BLOCK


def _acc(x):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


@torch.library.custom_op("eman_fused::eman_norm_triton", mutates_args={})
def eman_norm_triton(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                     weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                     residual: torch.Tensor | None, relu: bool) -> torch.Tensor:
    torch.ops.eman_fused._eman_norm_check(x, running_mean, running_var, weight, bias, eps, residual)
    running_mean, running_var = running_mean.contiguous(), running_var.contiguous()
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    outer, C, inner, fmt = _geometry(x)
    xc = x.contiguous(memory_format=fmt)
    rc = residual.contiguous(memory_format=fmt) if residual is not None else None
    y = torch.empty_like(xc, memory_format=fmt)
    if y.numel():
        grid, rows, cols = _grid(outer, C, inner)
        launch(_norm_fwd, grid,
            xc, xc if rc is None else rc, y, running_mean, running_var,
            running_mean if weight is None else weight, running_mean if bias is None else bias,
            eps, outer, C, inner, HAS_W=weight is not None, HAS_B=bias is not None,
            HAS_R=rc is not None, RELU=relu, ROWS=rows, COLS=cols, INNER_ONE=inner == 1, ACC=_acc(x))
    return y


@torch.library.custom_op("eman_fused::eman_norm_backward_triton", mutates_args={})
def eman_norm_backward_triton(grad: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None,
                              running_mean: torch.Tensor, running_var: torch.Tensor,
                              weight: torch.Tensor | None, eps: float, relu: bool,
                              output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.ops.eman_fused._eman_norm_check(x, running_mean, running_var, weight, None, eps, None)
    running_mean, running_var = running_mean.contiguous(), running_var.contiguous()
    weight = weight.contiguous() if weight is not None else None
    outer, C, inner, fmt = _geometry(x)
    xc, gc = x.contiguous(memory_format=fmt), grad.contiguous(memory_format=fmt)
    oc = out.contiguous(memory_format=fmt) if relu else xc
    gx = torch.empty_like(xc, memory_format=fmt)  # always allocated: a schema output must be a tensor
    gr = torch.empty_like(xc, memory_format=fmt) if output_mask[1] else gx.new_empty(0)
    sums = torch.zeros(2 * C, dtype=running_mean.dtype, device=x.device)
    if x.numel():
        grid, rows, cols = _grid(outer, C, inner)
        launch(_norm_bwd, grid,
            gc, xc, oc, gx, gr, sums, running_mean, running_var,
            running_mean if weight is None else weight, eps, outer, C, inner,
            HAS_W=weight is not None, RELU=relu, NEED_GX=True, NEED_GR=bool(output_mask[1]),
            NEED_SUMS=bool(output_mask[2] or output_mask[3]), ROWS=rows, COLS=cols,
            INNER_ONE=inner == 1, ACC=_acc(x))
    gw = sums[C:] * torch.rsqrt(running_var + eps)
    return gx, gr, gw, sums[:C].clone()


def _setup_context(ctx, inputs, output):
    x, mean, var, weight, bias, eps, residual, relu = inputs
    ctx.save_for_backward(x, output if relu else None, mean, var, weight)
    ctx.eps, ctx.relu = eps, relu
    ctx.flags = (weight is not None, bias is not None, residual is not None)


def _backward(ctx, grad):
    x, out, mean, var, weight = ctx.saved_tensors
    has_w, has_b, has_r = ctx.flags
    gx, gr, gw, gb = torch.ops.eman_fused.eman_norm_backward_triton(
        grad, x, out, mean, var, weight, ctx.eps, ctx.relu, [True, has_r, has_w, has_b])
    need = ctx.needs_input_grad
    return (gx if need[0] else None, None, None, gw if has_w and need[3] else None,
            gb if has_b and need[4] else None, None, gr if has_r and need[6] else None, None)


# Fake kernels (they serve the Meta key too: a call mixing meta and real tensors must fail as
# the real op does): the C++ op's checks, this op's outputs.
@eman_norm_triton.register_fake
def _(x, running_mean, running_var, weight, bias, eps, residual, relu):
    return _eman_norm_fake(x, running_mean, running_var, weight, bias, eps, residual, relu)


@eman_norm_backward_triton.register_fake
def _(grad, x, out, running_mean, running_var, weight, eps, relu, output_mask):
    _check_devices(x, grad=grad, out=out, running_mean=running_mean, running_var=running_var, weight=weight)
    fmt = norm_memory_format(x)
    gx = torch.empty_like(x, memory_format=fmt)
    gr = torch.empty_like(x, memory_format=fmt) if output_mask[1] else gx.new_empty(0)
    C = running_mean.shape[0]
    gw = running_var.new_empty((C,), dtype=torch.promote_types(running_mean.dtype, running_var.dtype))
    return gx, gr, gw, running_mean.new_empty((C,))


eman_norm_triton.register_autograd(_backward, setup_context=_setup_context)
eman_norm_backward_triton.register_autograd(_double_backward, setup_context=_setup_backward_context)
