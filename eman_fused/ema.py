"""FusedEMA: a fixed pair of tensor lists updated in one launch per step."""
from __future__ import annotations

from typing import Iterable

import torch

from . import ops


class FusedEMA:
    """Holds a teacher and a student tensor list and updates them with `step(momentum)`.

    The lists are validated here, once, so a bad pair fails at construction, not mid-training.
    Each step then reuses the cached plan (device-resident pointer and chunk tables) as long
    as the tensors keep their storage, sizes, strides and dtypes; if one is re-allocated
    (e.g. `p.data = new`), the next step builds a new plan, so no write goes to stale memory.
    The first plan's table is held here, so a CUDA graph that captured a step stays valid
    even if the shared plan cache evicts it.
    """

    def __init__(self, teacher_tensors: Iterable[torch.Tensor],
                 student_tensors: Iterable[torch.Tensor], *, backend: str = "auto"):
        self.teacher = list(teacher_tensors)
        self.student = list(student_tensors)
        self.backend = backend
        self._plan = ops.ema_plan(self.teacher, self.student) if self.teacher or self.student else None

    def step(self, momentum: float | torch.Tensor) -> None:
        ops.ema_update_(self.teacher, self.student, momentum, backend=self.backend)

    def __len__(self) -> int:
        return len(self.teacher)

    @property
    def bytes_per_step(self) -> int:
        """Bytes one step moves: read teacher, read student, write teacher."""
        return sum(2 * t.nbytes + s.nbytes for t, s in zip(self.teacher, self.student))
