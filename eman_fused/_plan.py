"""Python mirror of csrc/ema_plan_types.h, for backends that read the plan table from Python
(Triton). tests/test_ema_triton.py checks it against tables built by the C++ planner."""
from __future__ import annotations

import math
from typing import Sequence

import torch

CHUNK_ELEMS = 32768  # kChunkElems
ENTRY_WORDS = 4  # EmaTensorEntry: teacher ptr, student ptr, numel, kind
CHUNK_WORDS = 2  # EmaChunk: tensor index, start
KIND_COPY_BYTES = 100  # kKindCopyBytes; lerp kinds are teacher_tag * 4 + student_tag
FLOAT_TAGS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


def plan_counts(teacher: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(tensor entries, chunks) of the plan of `teacher`, from shapes alone (works on fake
    tensors, so a compiled graph knows its grid). Integer tensors are chunked in bytes."""
    entries = chunks = 0
    for t in teacher:
        units = t.numel() if t.is_floating_point() else t.numel() * t.element_size()
        if units:
            entries += 1
            chunks += math.ceil(units / CHUNK_ELEMS)
    return entries, chunks
