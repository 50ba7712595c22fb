"""Triton backend of ema_update_: one launch over the whole list, driven by the same
device-resident plan table (and the same C++ validation) as the CUDA kernel.

Program p handles chunk p of the plan: it reads (tensor, start) from the chunk table, the
tensor's entry (teacher and student addresses, numel, kind), casts the int64 addresses to
typed pointers and walks the chunk in BLOCK-element steps. Math in fp32 (fp64 with a double
side), like the CUDA kernel; integer pairs are copied as bytes.

Tuning: BLOCK=2048 elements, 4 warps (see README for what has been measured on a GPU;
benchmarks/tune_triton_ema.py sweeps both).
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from ..ops.ema import _check_devices
from ..ops.layout import EMA, plan_counts
from ._common import ema_lerp, launch, round_to

BLOCK = 2048
NUM_WARPS = 4
# The plan entry's fields (csrc/ema/layout.h), as the C++ struct lays them out.
F_TEACHER = tl.constexpr(EMA["fields"]["teacher"])
F_STUDENT = tl.constexpr(EMA["fields"]["student"])
F_NUMEL = tl.constexpr(EMA["fields"]["numel"])
F_KIND = tl.constexpr(EMA["fields"]["kind"])
C_TENSOR = tl.constexpr(EMA["chunk_fields"]["tensor"])
C_START = tl.constexpr(EMA["chunk_fields"]["start"])


@triton.jit
def _typed_ptr(addr, TAG: tl.constexpr):
    if TAG == 0:
        return addr.to(tl.pointer_type(tl.float32))
    elif TAG == 1:
        return addr.to(tl.pointer_type(tl.bfloat16))
    elif TAG == 2:
        return addr.to(tl.pointer_type(tl.float16))
    else:
        return addr.to(tl.pointer_type(tl.float64))


@triton.jit
def _lerp_chunk(t_addr, s_addr, start, numel, m, w, copy, TT: tl.constexpr, ST: tl.constexpr,
                BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t_ptr = _typed_ptr(t_addr, TT)
    s_ptr = _typed_ptr(s_addr, ST)
    if TT == 3 or ST == 3:
        ww = w.to(tl.float64)
    else:
        ww = w.to(tl.float32)
    vv = 1.0 - ww
    for off in range(0, tl.minimum(numel - start, CHUNK), BLOCK):  # a small tensor: one step
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < numel
        t = tl.load(t_ptr + idx, mask=mask).to(ww.dtype)
        s = tl.load(s_ptr + idx, mask=mask).to(ww.dtype)
        out = tl.where(copy, s, ema_lerp(t, s, ww, vv))  # where, not arithmetic: a NaN teacher is replaced at m = 0
        tl.store(t_ptr + idx, round_to(out, t_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ema_update_kernel(table, num_entries, m0, m1, m2, w0, w1, w2, m_ptr, MOMENTUM_FROM_PTR: tl.constexpr,
                       BLOCK: tl.constexpr, CHUNK: tl.constexpr, ENTRY_WORDS: tl.constexpr,
                       CHUNK_WORDS: tl.constexpr, KIND_COPY: tl.constexpr):
    chunk = table + num_entries * ENTRY_WORDS + tl.program_id(0).to(tl.int64) * CHUNK_WORDS
    entry = table + tl.load(chunk + C_TENSOR) * ENTRY_WORDS
    start = tl.load(chunk + C_START)
    t_addr = tl.load(entry + F_TEACHER)
    s_addr = tl.load(entry + F_STUDENT)
    numel = tl.load(entry + F_NUMEL)
    kind = tl.load(entry + F_KIND)
    if kind == KIND_COPY:
        t_bytes = t_addr.to(tl.pointer_type(tl.uint8))
        s_bytes = s_addr.to(tl.pointer_type(tl.uint8))
        for off in range(0, tl.minimum(numel - start, CHUNK), BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < numel
            tl.store(t_bytes + idx, tl.load(s_bytes + idx, mask=mask), mask=mask)
    else:
        # Momentum in fp64 here; each pair rounds it to its math type, as the C++ kernels do.
        if MOMENTUM_FROM_PTR:
            m = tl.load(m_ptr).to(tl.float64)
            w = 1.0 - m
        else:  # float kernel arguments are fp32: a double arrives as three fp32 terms
            m = tl.cast(m0, tl.float64) + tl.cast(m1, tl.float64) + tl.cast(m2, tl.float64)
            w = tl.cast(w0, tl.float64) + tl.cast(w1, tl.float64) + tl.cast(w2, tl.float64)
        if m != 1.0:  # momentum 1: teacher bit-identical, nothing touched
            copy = m == 0.0
            for TT in tl.static_range(4):
                for ST in tl.static_range(4):
                    if kind == TT * 4 + ST:
                        _lerp_chunk(t_addr, s_addr, start, numel, m, w, copy, TT, ST, BLOCK, CHUNK)


def _split(x: float) -> tuple[float, float, float]:
    """x as the sum of three fp32 values: exact for 0 and |x| >= 2**-40, where 3 x 24 bits
    cover a double's 53 (smaller momenta lose low bits; only float64 pairs could notice)."""
    terms = []
    for _ in range(3):
        terms.append(float(struct.unpack("f", struct.pack("f", x))[0]))
        x -= terms[-1]
    return tuple(terms)


def _launch(teacher, student, momentum: float, m_tensor):
    table = torch.ops.eman_fused.ema_plan(teacher, student)  # validation + cached plan
    entries, chunks = plan_counts(teacher)
    if chunks == 0:
        return
    launch(_ema_update_kernel, (chunks,),
        table, entries, *_split(momentum), *_split(1.0 - momentum),
        table if m_tensor is None else m_tensor,
        MOMENTUM_FROM_PTR=m_tensor is not None, BLOCK=BLOCK, CHUNK=EMA["chunk_elems"],
        ENTRY_WORDS=EMA["entry_words"], CHUNK_WORDS=EMA["chunk_words"], KIND_COPY=EMA["kind_copy_bytes"],
        num_warps=NUM_WARPS)


@torch.library.custom_op("eman_fused::ema_update_triton_", mutates_args={"teacher"})
def ema_update_triton_(teacher: list[torch.Tensor], student: list[torch.Tensor],
                       momentum: float) -> None:
    torch.ops.eman_fused._ema_check_call(teacher, momentum)
    _launch(teacher, student, momentum, None)


@torch.library.custom_op("eman_fused::ema_update_triton_tensor_", mutates_args={"teacher"})
def ema_update_triton_tensor_(teacher: list[torch.Tensor], student: list[torch.Tensor],
                              momentum: torch.Tensor) -> None:
    torch.ops.eman_fused._ema_check_call.tensor(teacher, momentum)
    _launch(teacher, student, 0.0, momentum)


# Fake kernels: the ops write their teachers in place and return nothing. They serve the Meta
# key too, where a call mixing meta and real tensors lands: it must fail as the real op does.
@ema_update_triton_.register_fake
def _(teacher, student, momentum):
    _check_devices(teacher, student)


@ema_update_triton_tensor_.register_fake
def _(teacher, student, momentum):
    _check_devices(teacher, student)
