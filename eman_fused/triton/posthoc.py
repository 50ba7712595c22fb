"""Triton backend of posthoc_ema_update_ (K EDM2 power-function EMA profiles in one pass),
driven by the same plan table (and the same C++ validation) as the CPU and CUDA kernels.

Program p handles chunk p of the plan: it reads (tensor, start) from the chunk table and the
tensor's entry (student address, numel, kind, the K profile addresses), then walks the chunk in
BLOCK-element steps, loading each student block once and updating every profile from it
(2K + 1 tensor passes). Math in fp32 (fp64 with a double side), with torch.lerp's two forms as
the C++ kernels; integer tensors are copied as bytes into every profile.

The coefficients beta_k = (1 - 1/t)^(gamma_k + 1), t = step + 1, are formed on the device in
fp64 by torch ops from the step tensor (no host read: a CUDA graph can replay the update), then
the step is advanced, on the same stream. Their last bit can differ from the C++ kernels' pow.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.layout import POSTHOC, posthoc_counts
from ..ops.posthoc import _posthoc_fake
from ._common import launch, round_to
from .ema import _typed_ptr

BLOCK = 2048
NUM_WARPS = 4


@triton.jit
def _profiles_chunk(entry, s_addr, start, numel, betas, K: tl.constexpr, TT: tl.constexpr,
                    ST: tl.constexpr, F_PROFILES: tl.constexpr, BLOCK: tl.constexpr,
                    CHUNK: tl.constexpr):
    s_ptr = _typed_ptr(s_addr, ST)
    for off in range(0, tl.minimum(numel - start, CHUNK), BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < numel
        s_raw = tl.load(s_ptr + idx, mask=mask)  # once for all K profiles
        for j in tl.static_range(K):
            m = tl.load(betas + j)
            if m != 1.0:  # beta 1: the profile is bit-identical, not touched
                if TT == 3 or ST == 3:
                    ww = (1.0 - m).to(tl.float64)
                else:
                    ww = (1.0 - m).to(tl.float32)
                vv = 1.0 - ww
                small = ww < 0.5
                t_ptr = _typed_ptr(tl.load(entry + F_PROFILES + j), TT)
                t = tl.load(t_ptr + idx, mask=mask).to(ww.dtype)
                s = s_raw.to(ww.dtype)
                out = tl.where(small, t + ww * (s - t), s - (s - t) * vv)
                out = tl.where(m == 0.0, s, out)  # where: a NaN profile is replaced by the copy
                tl.store(t_ptr + idx, round_to(out, t_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _posthoc_kernel(table, num_entries, betas, K: tl.constexpr, BLOCK: tl.constexpr,
                    CHUNK: tl.constexpr, ENTRY_WORDS: tl.constexpr, CHUNK_WORDS: tl.constexpr,
                    KIND_COPY: tl.constexpr, F_STUDENT: tl.constexpr, F_NUMEL: tl.constexpr,
                    F_KIND: tl.constexpr, F_PROFILES: tl.constexpr):
    chunk = table + num_entries * ENTRY_WORDS + tl.program_id(0).to(tl.int64) * CHUNK_WORDS
    entry = table + tl.load(chunk) * ENTRY_WORDS
    start = tl.load(chunk + 1)
    s_addr = tl.load(entry + F_STUDENT)
    numel = tl.load(entry + F_NUMEL)
    kind = tl.load(entry + F_KIND)
    if kind == KIND_COPY:
        s_bytes = s_addr.to(tl.pointer_type(tl.uint8))
        for off in range(0, tl.minimum(numel - start, CHUNK), BLOCK):
            idx = start + off + tl.arange(0, BLOCK)
            mask = idx < numel
            v = tl.load(s_bytes + idx, mask=mask)
            for j in tl.static_range(K):
                p_bytes = tl.load(entry + F_PROFILES + j).to(tl.pointer_type(tl.uint8))
                tl.store(p_bytes + idx, v, mask=mask)
    else:
        for TT in tl.static_range(4):
            for ST in tl.static_range(4):
                if kind == TT * 4 + ST:
                    _profiles_chunk(entry, s_addr, start, numel, betas, K, TT, ST, F_PROFILES,
                                    BLOCK, CHUNK)


def power_betas(step: torch.Tensor, gammas: list[float]) -> torch.Tensor:
    """EDM2 Eq. 2's beta_k = (1 - 1/t)^(gamma_k + 1) for t = step + 1, fp64, on step's device,
    without reading the step on the host (t = 1: 0^(gamma + 1) = 0, a copy)."""
    base = 1.0 - 1.0 / (step.to(torch.float64) + 1.0)
    return torch.stack([torch.pow(base, g + 1.0) for g in gammas])


@torch.library.custom_op("eman_fused::posthoc_ema_update_triton_", mutates_args={"profiles", "step"})
def posthoc_ema_update_triton_(profiles: list[torch.Tensor], student: list[torch.Tensor],
                               step: torch.Tensor, gammas: list[float]) -> None:
    if not profiles and not student:  # as the C++ op: nothing to update, the step stays
        return
    table = torch.ops.eman_fused.posthoc_plan(profiles, student, step, gammas)  # cached plan
    entries, chunks = posthoc_counts(student)
    if chunks:
        f = POSTHOC["fields"]
        launch(_posthoc_kernel, (chunks,),
            table, entries, power_betas(step, gammas), K=len(gammas), BLOCK=BLOCK,
            CHUNK=POSTHOC["chunk_elems"], ENTRY_WORDS=POSTHOC["entry_words"],
            CHUNK_WORDS=POSTHOC["chunk_words"], KIND_COPY=POSTHOC["kind_copy_bytes"],
            F_STUDENT=f["student"], F_NUMEL=f["numel"], F_KIND=f["kind"], F_PROFILES=f["profiles"],
            num_warps=NUM_WARPS)
    step.add_(1)


@posthoc_ema_update_triton_.register_fake
def _(profiles, student, step, gammas):
    _posthoc_fake(profiles, student, step, gammas)  # the C++ op's checks; it writes in place
