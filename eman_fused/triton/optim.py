"""Triton backend of the fused optimizer steps (SGD, AdamW, LARS + EMA teacher): one launch per
call over the whole param list (LARS: two), driven by the table the C++ kernels read
(csrc/optim/layout.h), built and validated by the same C++ code (`_sgd_ema_table`,
`_adamw_ema_table`, `_lars_ema_table`), before anything is written.

Program p handles chunk p: it reads (tensor, start) from the chunk table, the tensor's entry
(param, grad, state and teacher addresses, numel, flags, AdamW's per-param step size and
sqrt(bias correction 2)), casts the int64 addresses to typed pointers and walks the chunk in
BLOCK-element steps. The math is the C++ kernels' (csrc/optim/cpu_loops.inc) in the same order,
in float32, with IEEE-rounded sqrt and division; params, state and teacher are rounded once per
store. Hyper-parameters arrive as float32 values rounded on the host as the C++ kernels round
them.

LARS takes two launches, as the C++ kernels take two passes: per-chunk sums of squares into a
float64 buffer, then the update, each chunk summing its tensor's chunk sums in chunk order.
Its norms are summed in another order than the C++ kernels' (float32 blocks of BLOCK elements
added into float64), so its trust ratios agree with theirs to float32 rounding, not bit for bit.
Not built here: the capturable variants (lr, teacher momentum and step counts read from
device tensors); those run on the CPU and CUDA C++ kernels.
Tuning: BLOCK=1024 elements, 4 warps.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ..ops.layout import OPTIM, optim_counts
from ._common import round_to, wrap_triton

BLOCK = 1024
NUM_WARPS = 4
# csrc/optim/layout.h, as the C++ structs define it.
OPTIM_CHUNK_ELEMS = OPTIM["chunk_elems"]
OPTIM_ENTRY_WORDS = OPTIM["entry_words"]
OPTIM_CHUNK_WORDS = OPTIM["chunk_words"]
OPTIM_FIRST = OPTIM["flag_first"]
OPTIM_ADAPT = OPTIM["flag_adapt"]
_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def f32(x: float) -> float:
    """x rounded to float32 (to nearest even), as the C++ kernels' static_cast<float>."""
    return struct.unpack("f", struct.pack("f", x))[0]


@triton.jit
def _chunk_entry(table, num_entries, ENTRY_WORDS: tl.constexpr, CHUNK_WORDS: tl.constexpr):
    chunk = table + num_entries * ENTRY_WORDS + tl.program_id(0).to(tl.int64) * CHUNK_WORDS
    entry = table + tl.load(chunk) * ENTRY_WORDS
    return entry, tl.load(chunk + 1)


@triton.jit
def _teacher_update(t_addr, idx, mask, stored, mt, wt, TT: tl.constexpr):
    t_ptr = t_addr.to(tl.pointer_type(TT))
    t = tl.load(t_ptr + idx, mask=mask).to(tl.float32)
    tl.store(t_ptr + idx, round_to(mt * t + wt * stored.to(tl.float32), TT), mask=mask)


@triton.jit
def _sgd_kernel(table, num_entries, lr, mom, damp, wd, sign, mt, wt,
                PT: tl.constexpr, TT: tl.constexpr, HAS_TEACHER: tl.constexpr,
                DECAY: tl.constexpr, HAS_BUF: tl.constexpr, NESTEROV: tl.constexpr,
                BLOCK: tl.constexpr, CHUNK: tl.constexpr, ENTRY_WORDS: tl.constexpr,
                CHUNK_WORDS: tl.constexpr, FIRST: tl.constexpr):
    entry, start = _chunk_entry(table, num_entries, ENTRY_WORDS, CHUNK_WORDS)
    p_ptr = tl.load(entry).to(tl.pointer_type(PT))
    g_ptr = tl.load(entry + 1).to(tl.pointer_type(PT))
    b_ptr = tl.load(entry + 2).to(tl.pointer_type(PT))
    t_addr = tl.load(entry + 5)
    numel = tl.load(entry + 6)
    first_flag = tl.load(entry + 9) & FIRST
    first = first_flag != 0
    for off in range(0, tl.minimum(numel - start, CHUNK), BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < numel
        pi = tl.load(p_ptr + idx, mask=mask).to(tl.float32)
        d = sign * tl.load(g_ptr + idx, mask=mask).to(tl.float32)
        if DECAY:
            d = d + wd * pi
        if HAS_BUF:
            b = tl.load(b_ptr + idx, mask=mask & (first_flag == 0)).to(tl.float32)
            b = tl.where(first, d, mom * b + damp * d)  # a new buffer is the first update
            tl.store(b_ptr + idx, round_to(b, PT), mask=mask)
            if NESTEROV:
                d = d + mom * b
            else:
                d = b
        stored = round_to(pi - lr * d, PT)  # the teacher averages the param as stored
        tl.store(p_ptr + idx, stored, mask=mask)
        if HAS_TEACHER:
            _teacher_update(t_addr, idx, mask, stored, mt, wt, TT)


@triton.jit
def _adamw_kernel(table, num_entries, decay, w1, w1c, b2, w2, eps, sign, mt, wt,
                  PT: tl.constexpr, TT: tl.constexpr, HAS_TEACHER: tl.constexpr,
                  AMSGRAD: tl.constexpr, LERP_SMALL: tl.constexpr,
                  BLOCK: tl.constexpr, CHUNK: tl.constexpr, ENTRY_WORDS: tl.constexpr,
                  CHUNK_WORDS: tl.constexpr):
    entry, start = _chunk_entry(table, num_entries, ENTRY_WORDS, CHUNK_WORDS)
    p_ptr = tl.load(entry).to(tl.pointer_type(PT))
    g_ptr = tl.load(entry + 1).to(tl.pointer_type(PT))
    m_ptr = tl.load(entry + 2).to(tl.pointer_type(PT))
    v_ptr = tl.load(entry + 3).to(tl.pointer_type(PT))
    vmax_ptr = tl.load(entry + 4).to(tl.pointer_type(PT))
    t_addr = tl.load(entry + 5)
    numel = tl.load(entry + 6)
    # The per-param doubles, rounded to float32 as the C++ kernels do.
    step_size = tl.load(entry + 10).to(tl.float64, bitcast=True).to(tl.float32, fp_downcast_rounding="rtne")
    bc2_sqrt = tl.load(entry + 11).to(tl.float64, bitcast=True).to(tl.float32, fp_downcast_rounding="rtne")
    for off in range(0, tl.minimum(numel - start, CHUNK), BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < numel
        gi = sign * tl.load(g_ptr + idx, mask=mask).to(tl.float32)
        pi = tl.load(p_ptr + idx, mask=mask).to(tl.float32) * decay
        m0 = tl.load(m_ptr + idx, mask=mask).to(tl.float32)
        if LERP_SMALL:  # torch's lerp: the form depends on the weight
            mi = m0 + w1 * (gi - m0)
        else:
            mi = gi - (gi - m0) * w1c
        vi = tl.load(v_ptr + idx, mask=mask).to(tl.float32) * b2 + w2 * gi * gi
        tl.store(m_ptr + idx, round_to(mi, PT), mask=mask)
        tl.store(v_ptr + idx, round_to(vi, PT), mask=mask)
        s = vi
        if AMSGRAD:
            v0 = tl.load(vmax_ptr + idx, mask=mask).to(tl.float32)
            s = tl.where(v0 > vi, v0, vi)
            tl.store(vmax_ptr + idx, round_to(s, PT), mask=mask)
        denom = tl.div_rn(tl.sqrt_rn(s), bc2_sqrt) + eps
        stored = round_to(pi - step_size * tl.div_rn(mi, denom), PT)
        tl.store(p_ptr + idx, stored, mask=mask)
        if HAS_TEACHER:
            _teacher_update(t_addr, idx, mask, stored, mt, wt, TT)


@triton.jit
def _lars_sumsq_kernel(table, num_entries, partial, wd, sign, PT: tl.constexpr, BLOCK: tl.constexpr,
                       CHUNK: tl.constexpr, ENTRY_WORDS: tl.constexpr, CHUNK_WORDS: tl.constexpr,
                       ADAPT: tl.constexpr):
    """Pass 1: this chunk's sums of p^2 and d^2 (d = sign*g + wd*p), float32 per block added
    into float64, written to partial[2k], partial[2k + 1] (0 for tensors not adapted)."""
    entry, start = _chunk_entry(table, num_entries, ENTRY_WORDS, CHUNK_WORDS)
    k = tl.program_id(0).to(tl.int64)
    p_ptr = tl.load(entry).to(tl.pointer_type(PT))
    g_ptr = tl.load(entry + 1).to(tl.pointer_type(PT))
    numel = tl.load(entry + 6)
    adapt = (tl.load(entry + 9) & ADAPT) != 0
    sp = tl.zeros((), dtype=tl.float64)
    sd = tl.zeros((), dtype=tl.float64)
    if adapt:
        for off in range(0, tl.minimum(numel - start, CHUNK), BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < numel
            pi = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            d = sign * tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32) + wd * pi
            sp += tl.sum(pi * pi, axis=0).to(tl.float64)
            sd += tl.sum(d * d, axis=0).to(tl.float64)
    tl.store(partial + 2 * k, sp)
    tl.store(partial + 2 * k + 1, sd)


@triton.jit
def _lars_kernel(table, num_entries, partial, lr, mom, wd, trust_coefficient, sign, mt, wt,
                 PT: tl.constexpr, TT: tl.constexpr, HAS_TEACHER: tl.constexpr, BLOCK: tl.constexpr,
                 CHUNK: tl.constexpr, ENTRY_WORDS: tl.constexpr, CHUNK_WORDS: tl.constexpr,
                 FIRST: tl.constexpr, ADAPT: tl.constexpr):
    """Pass 2: the tensor's trust ratio from its chunks' sums (in chunk order: every chunk of a
    tensor computes the same value), then the C++ lars_loop's update and the teacher."""
    entry, start = _chunk_entry(table, num_entries, ENTRY_WORDS, CHUNK_WORDS)
    p_ptr = tl.load(entry).to(tl.pointer_type(PT))
    g_ptr = tl.load(entry + 1).to(tl.pointer_type(PT))
    b_ptr = tl.load(entry + 2).to(tl.pointer_type(PT))
    t_addr = tl.load(entry + 5)
    numel = tl.load(entry + 6)
    first_chunk = tl.load(entry + 7)
    num_chunks = tl.load(entry + 8)
    flags = tl.load(entry + 9)
    adapt = (flags & ADAPT) != 0
    first_flag = flags & FIRST
    first = first_flag != 0
    p2 = tl.zeros((), dtype=tl.float64)
    d2 = tl.zeros((), dtype=tl.float64)
    for c in range(first_chunk, first_chunk + num_chunks):
        p2 += tl.load(partial + 2 * c)
        d2 += tl.load(partial + 2 * c + 1)
    pn = tl.sqrt(p2)  # float64: sqrt and division are IEEE-rounded (the _rn forms are float32-only)
    dn = tl.sqrt(d2)
    scaled = adapt & (pn > 0.0) & (dn > 0.0)  # else 1, and no 0/0 computed
    trust = tl.where(scaled, tl.cast(trust_coefficient, tl.float64) * pn / tl.where(scaled, dn, 1.0), 1.0)
    trust = trust.to(tl.float32, fp_downcast_rounding="rtne")
    for off in range(0, tl.minimum(numel - start, CHUNK), BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < numel
        pi = tl.load(p_ptr + idx, mask=mask).to(tl.float32)
        d = sign * tl.load(g_ptr + idx, mask=mask).to(tl.float32)
        d = tl.where(adapt, (d + wd * pi) * trust, d)
        b = tl.load(b_ptr + idx, mask=mask & (first_flag == 0)).to(tl.float32)
        b = tl.where(first, d, mom * b + d)
        tl.store(b_ptr + idx, round_to(b, PT), mask=mask)
        stored = round_to(pi - lr * b, PT)
        tl.store(p_ptr + idx, stored, mask=mask)
        if HAS_TEACHER:
            _teacher_update(t_addr, idx, mask, stored, mt, wt, TT)


class _Launch:
    """What every step's launch needs after the C++ checks built `table`: the table on the
    params' device, element types, teacher flag, grid, and the teacher weights in float32."""

    def __init__(self, table, params, teacher, teacher_momentum: float):
        self.table = table.to(params[0].device)
        self.pt = _DTYPES[params[0].dtype]
        self.tt = _DTYPES[teacher[0].dtype] if teacher else tl.float32
        self.has_teacher = bool(teacher)
        self.grid = (optim_counts(params)[1],)
        self.mt = f32(teacher_momentum)
        self.wt = f32(1.0 - self.mt)


def _launch(table, params, teacher, teacher_momentum) -> _Launch | None:
    """None when there is nothing to launch (no params, or only empty ones)."""
    if not params or optim_counts(params)[1] == 0:
        return None
    return _Launch(table, params, teacher, teacher_momentum)


@triton_op("eman_fused::sgd_ema_step_triton_", mutates_args={"params", "momentum_buffers", "teacher"})
def sgd_ema_step_triton_(params: list[torch.Tensor], grads: list[torch.Tensor],
                         momentum_buffers: list[torch.Tensor], teacher: list[torch.Tensor],
                         first: list[int], lr: float, momentum: float, dampening: float,
                         nesterov: bool, weight_decay: float, maximize: bool,
                         teacher_momentum: float) -> None:
    table = torch.ops.eman_fused._sgd_ema_table(
        params, grads, momentum_buffers, teacher, first, lr, momentum, dampening, nesterov,
        weight_decay, maximize, teacher_momentum)
    if (go := _launch(table, params, teacher, teacher_momentum)) is None:
        return
    wrap_triton(_sgd_kernel)[go.grid](
        go.table, len(params), f32(lr), f32(momentum), f32(1.0 - f32(dampening)),
        f32(weight_decay), -1.0 if maximize else 1.0, go.mt, go.wt,
        PT=go.pt, TT=go.tt, HAS_TEACHER=go.has_teacher, DECAY=weight_decay != 0.0,
        HAS_BUF=bool(momentum_buffers), NESTEROV=nesterov, BLOCK=BLOCK, CHUNK=OPTIM_CHUNK_ELEMS,
        ENTRY_WORDS=OPTIM_ENTRY_WORDS, CHUNK_WORDS=OPTIM_CHUNK_WORDS, FIRST=OPTIM_FIRST,
        num_warps=NUM_WARPS)


@triton_op("eman_fused::adamw_ema_step_triton_",
           mutates_args={"params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "teacher"})
def adamw_ema_step_triton_(params: list[torch.Tensor], grads: list[torch.Tensor],
                           exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                           max_exp_avg_sqs: list[torch.Tensor], teacher: list[torch.Tensor],
                           step_sizes: list[float], bias_correction2_sqrts: list[float], lr: float,
                           beta1: float, beta2: float, eps: float, weight_decay: float,
                           amsgrad: bool, maximize: bool, teacher_momentum: float) -> None:
    table = torch.ops.eman_fused._adamw_ema_table(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, teacher, step_sizes,
        bias_correction2_sqrts, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
        teacher_momentum)
    if (go := _launch(table, params, teacher, teacher_momentum)) is None:
        return
    w1 = f32(1.0 - f32(beta1))
    b2 = f32(beta2)
    wrap_triton(_adamw_kernel)[go.grid](
        go.table, len(params), f32(1.0 - f32(lr * weight_decay)), w1,
        f32(1.0 - w1), b2, f32(1.0 - b2), f32(eps), -1.0 if maximize else 1.0, go.mt, go.wt,
        PT=go.pt, TT=go.tt, HAS_TEACHER=go.has_teacher, AMSGRAD=bool(max_exp_avg_sqs),
        LERP_SMALL=abs(w1) < 0.5, BLOCK=BLOCK, CHUNK=OPTIM_CHUNK_ELEMS,
        ENTRY_WORDS=OPTIM_ENTRY_WORDS, CHUNK_WORDS=OPTIM_CHUNK_WORDS, num_warps=NUM_WARPS)


@triton_op("eman_fused::lars_ema_step_triton_", mutates_args={"params", "momentum_buffers", "teacher"})
def lars_ema_step_triton_(params: list[torch.Tensor], grads: list[torch.Tensor],
                          momentum_buffers: list[torch.Tensor], teacher: list[torch.Tensor],
                          adapt: list[int], first: list[int], lr: float, momentum: float,
                          weight_decay: float, trust_coefficient: float, maximize: bool,
                          teacher_momentum: float) -> None:
    """Two launches (as the C++ kernels: two passes): per-chunk sums of squares, then the update."""
    table = torch.ops.eman_fused._lars_ema_table(
        params, grads, momentum_buffers, teacher, adapt, first, lr, momentum, weight_decay,
        trust_coefficient, maximize, teacher_momentum)
    if (go := _launch(table, params, teacher, teacher_momentum)) is None:
        return
    partial = torch.empty(2 * go.grid[0], dtype=torch.float64, device=params[0].device)
    sign = -1.0 if maximize else 1.0
    wrap_triton(_lars_sumsq_kernel)[go.grid](
        go.table, len(params), partial, f32(weight_decay), sign, PT=go.pt, BLOCK=BLOCK,
        CHUNK=OPTIM_CHUNK_ELEMS, ENTRY_WORDS=OPTIM_ENTRY_WORDS, CHUNK_WORDS=OPTIM_CHUNK_WORDS,
        ADAPT=OPTIM_ADAPT, num_warps=NUM_WARPS)
    wrap_triton(_lars_kernel)[go.grid](
        go.table, len(params), partial, f32(lr), f32(momentum), f32(weight_decay), trust_coefficient,
        sign, go.mt, go.wt, PT=go.pt, TT=go.tt, HAS_TEACHER=go.has_teacher, BLOCK=BLOCK,
        CHUNK=OPTIM_CHUNK_ELEMS, ENTRY_WORDS=OPTIM_ENTRY_WORDS, CHUNK_WORDS=OPTIM_CHUNK_WORDS, FIRST=OPTIM_FIRST,
        ADAPT=OPTIM_ADAPT, num_warps=NUM_WARPS)
