"""A Lightning Callback that keeps an EMA / EMAN teacher of the LightningModule (or of one of
its submodules) with one fused update per optimizer step.

    from eman_fused.integrations.lightning import EMATeacherCallback
    trainer = L.Trainer(callbacks=[EMATeacherCallback(momentum=0.999, student="net")])
    trainer.fit(module)                        # module.net is trained, the callback's teacher EMA'd
    callback.teacher                           # an eman_fused.EMATeacher

What it does, and why that way:
- One update per *optimizer* step: Lightning calls on_train_batch_end after every batch, also
  between the batches of an accumulated step; `trainer.global_step` counts optimizer steps, so
  the teacher is updated when it has advanced, at schedule step `global_step - 1` (the index of
  the optimizer step just taken), so a resumed or late-attached run feeds the schedule the right
  step.
- Nothing when a fused optimizer (eman_fused.optim.SGD / AdamW / LARS with teacher=) already
  updated this teacher in its step().
- The teacher is in the checkpoint: a teacher the callback built goes into the callback's
  state (its state_dict, progress included); a teacher that is an attribute of the
  LightningModule (`teacher="teacher"`) is in the module's state_dict already. Resuming gives
  the teacher of an uninterrupted run, bit for bit.
- swap=("validate", "test", "predict"): during those loops the student's tensors hold the
  teacher's values (EMA weights in); afterwards the student's own values come back exactly
  (they are kept in a stash of the student's dtype, and restored by copy). Integer buffers are
  copied, so they are exact both ways.
- A teacher the callback builds is built in on_fit_start (or before the first swapped loop),
  after Lightning's strategy has moved the model and its precision plugin has converted it
  ("64-true" gives a float64 teacher); a teacher attribute follows moves and casts of the module.

`lightning` (or `pytorch_lightning`) is imported when this module is.
"""
from __future__ import annotations

import operator
from typing import Any, Iterable

import torch

from ..teacher import EMATeacher

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name of the same library
    try:
        import pytorch_lightning as pl
    except ImportError as e:
        raise ModuleNotFoundError("eman_fused.integrations.lightning needs Lightning: "
                                  "pip install 'eman_fused[lightning]' (or lightning>=2.6)", name="lightning") from e

__all__ = ["EMATeacherCallback"]

_SWAP_STAGES = ("validate", "test", "predict")
_STATE_FORMAT = 1


class EMATeacherCallback(pl.Callback):
    """Keeps an EMATeacher of a LightningModule's student, updated once per optimizer step.

    momentum / schedule / **teacher_kwargs: passed to EMATeacher when the callback builds the
        teacher (e.g. eman=False, buffers='copy', teacher_dtype=torch.bfloat16).
    student: attribute path of the student inside the LightningModule ("net", "model.backbone");
        None: the LightningModule itself.
    teacher: None (the callback builds and owns the teacher; it is in the callback's checkpoint
        state), an attribute path of an EMATeacher the LightningModule holds (the module's
        checkpoint has it), or an EMATeacher object (kept in the callback's state).
    swap: the loops ("validate", "test", "predict") that run with the teacher's values in the
        student; () for none.
    """

    def __init__(self, momentum=None, *, student: str | None = None, teacher: str | EMATeacher | None = None,
                 swap: Iterable[str] = _SWAP_STAGES, **teacher_kwargs: Any):
        super().__init__()
        swap = tuple(swap)
        unknown = [s for s in swap if s not in _SWAP_STAGES]
        if unknown:
            raise ValueError(f"swap takes {_SWAP_STAGES}, got {unknown}")
        if teacher is not None and not isinstance(teacher, (str, EMATeacher)):
            raise TypeError(f"teacher must be None, an attribute name or an EMATeacher, got {type(teacher).__name__}")
        if isinstance(teacher, str) and (momentum is not None or teacher_kwargs):
            raise ValueError("teacher= names an existing EMATeacher: give its momentum and options "
                             "where it is built, not to the callback")
        self.momentum, self.student_attr, self.swap = momentum, student, swap
        self.teacher_kwargs = teacher_kwargs
        self._teacher_spec = teacher
        self._teacher: EMATeacher | None = teacher if isinstance(teacher, EMATeacher) else None
        self._pending_state: dict | None = None  # a checkpoint's teacher, loaded once it is built
        self._last_step: int | None = None
        self._fused_by_optimizer = False
        self._stash: list[torch.Tensor] | None = None  # the student's values during a swap
        self._swapped: list[torch.Tensor] | None = None

    # -- the teacher -------------------------------------------------------------------------
    @property
    def teacher(self) -> EMATeacher | None:
        """The EMATeacher (None before fit has started, for a teacher the callback builds)."""
        return self._teacher

    @property
    def owns_teacher(self) -> bool:
        """Whether the teacher travels in the callback's checkpoint state (not an attribute
        of the LightningModule)."""
        return not isinstance(self._teacher_spec, str)

    def _student(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        return pl_module if self.student_attr is None else operator.attrgetter(self.student_attr)(pl_module)

    def _ensure_teacher(self, pl_module: pl.LightningModule) -> EMATeacher:
        if isinstance(self._teacher_spec, str):
            teacher = operator.attrgetter(self._teacher_spec)(pl_module)
            if not isinstance(teacher, EMATeacher):
                raise TypeError(f"EMATeacherCallback: pl_module.{self._teacher_spec} is a "
                                f"{type(teacher).__name__}, not an eman_fused.EMATeacher")
            self._teacher = teacher
        elif self._teacher is None:
            student = self._student(pl_module)
            if student is pl_module:
                # A LightningModule refers to its Trainer: the teacher's deep copy must not.
                teacher = _teacher_of_lightning_module(pl_module, self.momentum, self.teacher_kwargs)
            else:
                teacher = EMATeacher(student, self.momentum, **self.teacher_kwargs)
            self._teacher = teacher
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._teacher.load_state_dict(state)
        return self._teacher

    # -- training ----------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_teacher(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the checkpoint's training state is restored: global_step is the resumed one.
        teacher = self._ensure_teacher(pl_module)
        self._last_step = trainer.global_step
        self._fused_by_optimizer = any(_updates_teacher(opt, teacher) for opt in trainer.optimizers)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self._last_step is None or step <= self._last_step:
            return  # no optimizer step since the last update (gradient accumulation)
        self._last_step = step
        if not self._fused_by_optimizer:
            self._teacher.update(step=step - 1)

    # -- the weight swap ---------------------------------------------------------------------
    def _swap_in(self, stage: str, pl_module: pl.LightningModule) -> None:
        if stage not in self.swap:
            return
        pairs = self._ensure_teacher(pl_module).matched_pairs()
        students = [s for s, _ in pairs]
        # A stash of the student's own dtype and layout: restoring it is an exact copy. It is
        # freed after the loop (a model's worth of memory is not held through training).
        self._stash = [torch.empty_like(s, memory_format=torch.preserve_format) for s in students]
        with torch.no_grad():
            self._teacher.wait()
            torch._foreach_copy_(self._stash, students)
            torch._foreach_copy_(students, [t for _, t in pairs])
        self._swapped = students

    def _swap_out(self, stage: str) -> None:
        if stage in self.swap:
            self._restore_student()

    def _restore_student(self) -> None:
        if self._swapped is None:
            return
        with torch.no_grad():
            torch._foreach_copy_(self._swapped, self._stash)
        self._swapped = self._stash = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._swap_in("validate", pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._swap_out("validate")

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._swap_in("test", pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._swap_out("test")

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self._swap_in("predict", pl_module)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self._swap_out("predict")

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_student()  # a loop that raised mid-way leaves the student's own values

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"format": _STATE_FORMAT}
        if self.owns_teacher:
            if self._teacher is not None:
                state["teacher"] = self._teacher.state_dict()
            elif self._pending_state is not None:
                state["teacher"] = self._pending_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != _STATE_FORMAT:
            raise ValueError(f"EMATeacherCallback.load_state_dict: not this callback's state: {sorted(state_dict)}")
        teacher_state = state_dict.get("teacher")
        if teacher_state is None:
            return
        if not self.owns_teacher:
            raise ValueError("EMATeacherCallback.load_state_dict: the checkpoint holds a teacher the callback "
                             "built, but this callback uses the LightningModule's attribute "
                             f"{self._teacher_spec!r}")
        if self._teacher is not None:
            self._teacher.load_state_dict(teacher_state)
        else:
            self._pending_state = teacher_state  # the teacher is built in on_fit_start

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # validate / test / predict with ckpt_path restore no callback state; the teacher's is
        # taken from the checkpoint here so that a swapped loop evaluates the saved EMA.
        if trainer.state.fn != "fit" and self.owns_teacher:
            state = checkpoint.get("callbacks", {}).get(self.state_key)
            if state is not None:
                self.load_state_dict(state)


def _updates_teacher(optimizer, teacher: EMATeacher) -> bool:
    """Whether `optimizer` (or the optimizer a LightningOptimizer wraps) is a fused optimizer
    whose step() updates `teacher`."""
    opt = getattr(optimizer, "_optimizer", optimizer)
    link = getattr(opt, "_link", None)
    return link is not None and getattr(link, "teacher", None) is teacher


def _teacher_of_lightning_module(pl_module, momentum, kwargs) -> EMATeacher:
    """EMATeacher(pl_module) without deep-copying what a LightningModule refers to beyond its
    own tensors: its Trainer (and through it the data, loggers and callbacks)."""
    memo = {}
    trainer = getattr(pl_module, "_trainer", None)
    if trainer is not None:
        memo[id(trainer)] = None
    fabric = getattr(pl_module, "_fabric", None)
    if fabric is not None:
        memo[id(fabric)] = None
    import copy
    copied = copy.deepcopy(pl_module, memo)
    return EMATeacher(pl_module, momentum, teacher=copied, **kwargs)
