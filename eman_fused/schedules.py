"""Momentum schedules for the EMA teacher.

Each schedule gives the momentum of update k (k = 0 for the first update) two ways:
`schedule(k)` returns a Python float from the formula (no device work), and
`schedule.tensor(step)` computes it with torch ops from a 0-dim step tensor on the teacher's
device, returning a 0-dim float64 tensor there. The tensor form never reads a value back to the
host, so a CUDA graph that captured `teacher.update()` replays with the momentum moving as the
step tensor counts up.
"""
from __future__ import annotations

import math

import torch

__all__ = ["Schedule", "Constant", "CosineToOne", "MeanTeacherRamp", "Warmup", "Cyclical", "CopyFirst",
           "TimmDecay"]


def _check_momentum(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


class Schedule:
    """Base class: subclasses define `value(k)` (float) and `_tensor(k)` (torch ops)."""

    def __call__(self, step: int) -> float:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        return self.value(step)

    def tensor(self, step: torch.Tensor) -> torch.Tensor:
        if not isinstance(step, torch.Tensor) or step.dim() != 0:
            raise ValueError("step must be a 0-dim tensor")
        return self._tensor(step.to(torch.float64))

    def value(self, step: int) -> float:
        raise NotImplementedError

    def _tensor(self, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Constant(Schedule):
    """m_k = m."""

    def __init__(self, momentum: float):
        self.momentum = _check_momentum("momentum", momentum)

    def value(self, step):
        return self.momentum

    def _tensor(self, k):
        return torch.full_like(k, self.momentum)

    def __repr__(self):
        return f"Constant({self.momentum})"


class CosineToOne(Schedule):
    """BYOL: m_k = 1 - (1 - m0)·(cos(π·k/K) + 1)/2, rising from m0 to 1 over K updates (then 1)."""

    def __init__(self, base: float, total_steps: int):
        self.base = _check_momentum("base", base)
        if int(total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = int(total_steps)

    def value(self, step):
        k = min(step, self.total_steps)
        return 1.0 - (1.0 - self.base) * (math.cos(math.pi * k / self.total_steps) + 1.0) / 2.0

    def _tensor(self, k):
        k = k.clamp(max=self.total_steps)
        return 1.0 - (1.0 - self.base) * (torch.cos(k * (math.pi / self.total_steps)) + 1.0) / 2.0

    def __repr__(self):
        return f"CosineToOne(base={self.base}, total_steps={self.total_steps})"


class MeanTeacherRamp(Schedule):
    """Mean Teacher: m_k = min(1 - 1/(k+1), m): a plain running average early, then m."""

    def __init__(self, momentum: float):
        self.momentum = _check_momentum("momentum", momentum)

    def value(self, step):
        return min(1.0 - 1.0 / (step + 1), self.momentum)

    def _tensor(self, k):
        return (1.0 - 1.0 / (k + 1.0)).clamp(max=self.momentum)

    def __repr__(self):
        return f"MeanTeacherRamp({self.momentum})"


class Warmup(Schedule):
    """timm-style warm-up: m_k = 1 - (1 + k/γ)^(-p), capped at `max_momentum` (timm's decay).

    With γ = 1, p = 3/4 the momentum is 0.999 near k = 10k; p = 2/3 reaches it near 30k.
    """

    def __init__(self, gamma: float = 1.0, power: float = 0.75, max_momentum: float = 1.0):
        if not gamma > 0 or not power > 0:
            raise ValueError(f"gamma and power must be > 0, got gamma={gamma}, power={power}")
        self.gamma, self.power = float(gamma), float(power)
        self.max_momentum = _check_momentum("max_momentum", max_momentum)

    def value(self, step):
        return min(1.0 - (1.0 + step / self.gamma) ** (-self.power), self.max_momentum)

    def _tensor(self, k):
        return (1.0 - torch.pow(1.0 + k / self.gamma, -self.power)).clamp(max=self.max_momentum)

    def __repr__(self):
        return f"Warmup(gamma={self.gamma}, power={self.power}, max_momentum={self.max_momentum})"


class Cyclical(Schedule):
    """Triangular cycles between `low` and `high`: m starts at `low`, reaches `high` at half a
    period, returns to `low` at the end of each period of `period` updates.
    m_k = low + (high - low)·(1 - |2·(k mod P)/P - 1|)."""

    def __init__(self, low: float, high: float, period: int):
        self.low = _check_momentum("low", low)
        self.high = _check_momentum("high", high)
        if int(period) < 2:
            raise ValueError(f"period must be >= 2, got {period}")
        self.period = int(period)

    def value(self, step):
        phase = (step % self.period) / self.period
        return self.low + (self.high - self.low) * (1.0 - abs(2.0 * phase - 1.0))

    def _tensor(self, k):
        phase = torch.remainder(k, self.period) / self.period
        return self.low + (self.high - self.low) * (1.0 - torch.abs(2.0 * phase - 1.0))

    def __repr__(self):
        return f"Cyclical(low={self.low}, high={self.high}, period={self.period})"


class CopyFirst(Schedule):
    """m_k = 0 (the teacher becomes a copy of the student) for the first `updates` updates,
    then `schedule(k)`. torch's AveragedModel copies the model at its first update:
    AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d)) is CopyFirst(Constant(d))."""

    def __init__(self, schedule: Schedule, updates: int = 1):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
        if isinstance(updates, bool) or int(updates) != updates or updates < 0:
            raise ValueError(f"updates must be an int >= 0, got {updates!r}")
        self.schedule, self.updates = schedule, int(updates)

    def value(self, step):
        return 0.0 if step < self.updates else self.schedule.value(step)

    def _tensor(self, k):
        return torch.where(k < self.updates, torch.zeros_like(k), self.schedule._tensor(k))

    def __repr__(self):
        return f"CopyFirst({self.schedule!r}, updates={self.updates})"


class TimmDecay(Schedule):
    """timm's ModelEmaV3.get_decay(step), argument for argument, for `teacher.update(step)` with
    the step given to timm's `ema.update(model, step)`:
    j = max(0, step - update_after_step - 1); m = 0 (a copy) if j == 0; otherwise
    clamp(1 - (1 + j/warmup_gamma)^(-warmup_power), min_decay, decay) with use_warmup,
    else decay. (timm without a step uses `decay` alone: that is Constant(decay).)"""

    def __init__(self, decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
                 use_warmup: bool = False, warmup_gamma: float = 1.0, warmup_power: float = 2 / 3):
        self.decay = _check_momentum("decay", decay)
        self.min_decay = _check_momentum("min_decay", min_decay)
        if isinstance(update_after_step, bool) or int(update_after_step) != update_after_step \
                or update_after_step < 0:
            raise ValueError(f"update_after_step must be an int >= 0, got {update_after_step!r}")
        if not warmup_gamma > 0 or not warmup_power > 0:
            raise ValueError(f"warmup_gamma and warmup_power must be > 0, got {warmup_gamma}, {warmup_power}")
        self.update_after_step, self.use_warmup = int(update_after_step), bool(use_warmup)
        self.warmup_gamma, self.warmup_power = float(warmup_gamma), float(warmup_power)

    def value(self, step):
        j = max(0, step - self.update_after_step - 1)
        if j <= 0:
            return 0.0
        if not self.use_warmup:
            return self.decay
        m = 1 - (1 + j / self.warmup_gamma) ** -self.warmup_power
        return max(min(m, self.decay), self.min_decay)

    def _tensor(self, k):
        j = (k - (self.update_after_step + 1)).clamp(min=0)
        if self.use_warmup:
            m = (1 - torch.pow(1 + j / self.warmup_gamma, -self.warmup_power))
            m = m.clamp(max=self.decay).clamp(min=self.min_decay)
        else:
            m = torch.full_like(j, self.decay)
        return torch.where(j <= 0, torch.zeros_like(m), m)

    def __repr__(self):
        return (f"TimmDecay(decay={self.decay}, min_decay={self.min_decay}, "
                f"update_after_step={self.update_after_step}, use_warmup={self.use_warmup}, "
                f"warmup_gamma={self.warmup_gamma}, warmup_power={self.warmup_power})")
