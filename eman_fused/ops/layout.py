"""The memory layouts the kernels walk: the multi-tensor table layouts (csrc/common/multi_tensor.h, csrc/ema/layout.h,
csrc/posthoc/layout.h,
csrc/optim/layout.h) as Python reads them: taken from the C++ structs at import
(`_C.table_layout()`), so the Triton kernels and the fake kernels cannot drift from the C++
kernels. Also the tables' sizes from shapes alone (for fake tensors: a compiled graph knows its
grid without building a table), and the memory format eman_norm's kernels use."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .. import _backends

_LAYOUT = _backends._C.table_layout() if _backends._C is not None else None

if _LAYOUT is not None:
    FLOAT_TAGS = {getattr(torch, name): tag for name, tag in _LAYOUT["float_tags"].items() if name != "absent"}
    EMA = _LAYOUT["ema"]  # chunk_elems, entry_words, chunk_words, kind_copy_bytes, fields, chunk_fields
    # chunk_elems, entry_words, chunk_words, flag_first, flag_adapt, fields, chunk_fields, and the
    # step op's: optimizers (enum values), hyper (names in order), scalars (offsets), scalar_words
    OPTIM = _LAYOUT["optim"]
    # chunk_elems, entry_words, chunk_words, kind_copy_bytes, max_profiles, fields
    POSTHOC = _LAYOUT["posthoc"]


def plan_counts(teacher: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(tensor entries, chunks) of the EMA plan of `teacher`. Empty tensors get no entry;
    integer tensors are chunked in bytes (they are copied as bytes)."""
    entries = chunks = 0
    for t in teacher:
        units = t.numel() if t.is_floating_point() else t.numel() * t.element_size()
        if units:
            entries += 1
            chunks += math.ceil(units / EMA["chunk_elems"])
    return entries, chunks


def ema_table_words(teacher: Sequence[torch.Tensor]) -> int:
    entries, chunks = plan_counts(teacher)
    return entries * EMA["entry_words"] + chunks * EMA["chunk_words"]


def posthoc_counts(student: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(tensor entries, chunks) of the post-hoc EMA plan: one entry per non-empty student
    tensor (holding all K profiles); integer tensors chunked in bytes (copied as bytes)."""
    entries = chunks = 0
    for s in student:
        units = s.numel() if s.is_floating_point() else s.numel() * s.element_size()
        if units:
            entries += 1
            chunks += math.ceil(units / POSTHOC["chunk_elems"])
    return entries, chunks


def posthoc_table_words(student: Sequence[torch.Tensor]) -> int:
    entries, chunks = posthoc_counts(student)
    return entries * POSTHOC["entry_words"] + chunks * POSTHOC["chunk_words"]


def optim_counts(params: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(entries, chunks) of an optimizer step's table for `params` (one entry per param)."""
    return len(params), sum(math.ceil(p.numel() / OPTIM["chunk_elems"]) for p in params)


def optim_table_words(params: Sequence[torch.Tensor]) -> int:
    entries, chunks = optim_counts(params)
    return entries * OPTIM["entry_words"] + chunks * OPTIM["chunk_words"]


def norm_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format eman_norm's kernels walk x in (csrc/norm/geometry.cpp's
    norm_memory_format): x's own if channels_last(_3d), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
