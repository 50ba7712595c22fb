"""ema_update_ (the fused EMA update) and FusedEMA (a fixed pair of lists, one launch per step):
argument handling, backend choice and the fake kernels of torch.ops.eman_fused.ema_update_."""
from __future__ import annotations

import numbers
from typing import Iterable, Sequence

import torch

from .. import _backends, reference
from .layout import ema_table_words

_ops = torch.ops.eman_fused if _backends._C_ERROR is None else None
_UPDATED = _backends._C.EmaHandle.UPDATED if _backends._C_ERROR is None else None
# Tensor subclasses (DTensor, FakeTensor, ...) need the dispatcher: no handle for them.
PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def ema_update_(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor],
                momentum: float | torch.Tensor, *, backend: str = "auto") -> None:
    """In place, in one pass: teacher <- m*teacher + (1-m)*student for every floating pair,
    teacher <- student for every integer pair (e.g. BatchNorm's num_batches_tracked).

    `momentum` is a float in [0, 1] or a 0-dim float32/float64 tensor on the teachers' device
    (read by the kernel, so a CUDA graph can replay the update while a schedule changes it;
    on CUDA its value is not range-checked, since that would synchronize).
    Teacher and student dtypes may differ (float32/bfloat16/float16/float64 on either side);
    math is float32 (float64 with a float64 side). Everything is validated before the first
    write. backend: 'auto' (CUDA tensors: the CUDA C++ kernels, else Triton; CPU tensors:
    the C++ CPU kernels), 'cpu', 'cuda', 'triton' or 'reference' (eager, for comparison).
    """
    teacher, student = list(teacher), list(student)
    if not teacher and not student:
        return
    device = (teacher or student)[0].device
    name = _backends.resolve(backend, device)
    if name == "reference":
        _check_teacher_autograd(teacher)  # the kernels' rule (check_teacher_grad_mode in C++)
        reference.ema_update_(teacher, student, momentum)
        return
    if not isinstance(momentum, torch.Tensor):
        if not isinstance(momentum, numbers.Real) or isinstance(momentum, bool):
            raise TypeError(f"momentum must be a float or a 0-dim tensor, got {type(momentum).__name__}")
        momentum = float(momentum)
    if name == "triton":
        _triton_update_(teacher, student, momentum)
    elif torch.compiler.is_compiling():  # the traced graph must see the op itself
        if isinstance(momentum, torch.Tensor):
            _ops.ema_update_.tensor(teacher, student, momentum)
        else:
            _ops.ema_update_.default(teacher, student, momentum)
    else:  # the same op through the dispatcher, without boxing every tensor
        _backends._C.ema_update_lists(teacher, student, momentum)


def _check_teacher_autograd(teacher) -> None:
    # Under grad mode the update refuses teachers autograd tracks, as torch's in-place ops do
    # for leaves and views of leaves; a non-leaf's recorded history would no longer hold.
    if not torch.is_grad_enabled():
        return
    for i, t in enumerate(teacher):
        if not t.requires_grad:
            continue
        if t.is_leaf:
            raise RuntimeError(f"ema_update_: teacher[{i}] is a leaf tensor that requires grad; update "
                               "under torch.no_grad() or call requires_grad_(False) on the teacher")
        if t._base is not None and t._base.is_leaf:
            raise RuntimeError(f"ema_update_: teacher[{i}] is a view of a leaf Variable that requires grad "
                               "(torch's in-place ops refuse it too); update under torch.no_grad()")
        raise RuntimeError(f"ema_update_: teacher[{i}] requires grad and has autograd history; ema_update_ "
                           "is not recorded by autograd: update under torch.no_grad() or a detached tensor")


def _triton_update_(teacher, student, momentum) -> None:
    # The per-call checks run here, outside the op: the Triton op's body runs below autograd
    # with grad mode off, where the leaf-requires-grad check could not fire.
    if isinstance(momentum, torch.Tensor):
        _ops._ema_check_call.tensor(teacher, momentum)
        torch.ops.eman_fused.ema_update_triton_tensor_(teacher, student, momentum)
    else:
        _ops._ema_check_call(teacher, momentum)
        torch.ops.eman_fused.ema_update_triton_(teacher, student, momentum)


def ema_plan(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
    """Validate the lists and return their (cached) plan table, an int64 tensor on their device."""
    _backends.require("cpu")  # the planner lives in the C++ extension
    return _ops.ema_plan(list(teacher), list(student))


class FusedEMA:
    """Holds a teacher and a student tensor list and updates them with `step(momentum)`.

    The lists are validated here, once, so a bad pair fails at construction, not mid-training.
    With the C++ backends a persistent plan handle (csrc/ema/handle.h) then serves each step:
    it re-checks every tensor's TensorImpl, data pointer, sizes, strides, dtype and device
    (a few nanoseconds each, no Python per tensor) and launches; a tensor re-allocated,
    resized or cast (e.g. `p.data = new`, `.to()`) is re-validated and re-planned before
    anything is written. The handle owns its plan's table, so a CUDA graph that captured a
    step stays valid whatever the shared plan cache evicts. `teacher` and `student` are tuples:
    the objects are fixed at construction (their tensors' storage may change, as above).
    Under torch.compile, a dispatch mode (e.g. FakeTensorMode), autocast, or with the Triton or
    reference backend, a step is a plain `ema_update_` call.
    """

    def __init__(self, teacher_tensors: Iterable[torch.Tensor],
                 student_tensors: Iterable[torch.Tensor], *, backend: str = "auto"):
        self.teacher = tuple(teacher_tensors)
        self.student = tuple(student_tensors)
        self.backend = backend
        self._plan = self._handle = None
        if self.teacher or self.student:
            self._plan = ema_plan(self.teacher, self.student)
            plain = all(type(x) in PLAIN_TENSOR_TYPES for side in (self.teacher, self.student) for x in side)
            if plain and _backends.resolve(backend, self.teacher[0].device) in ("cpu", "cuda"):
                self._handle = _backends._C.EmaHandle(self.teacher, self.student)

    def step(self, momentum: float | torch.Tensor) -> None:
        handle = self._handle
        if handle is not None and not torch.compiler.is_compiling() and handle.step(momentum) == _UPDATED:
            return
        ema_update_(self.teacher, self.student, momentum, backend=self.backend)

    @property
    def plans_built(self) -> int:
        """Plans this object's handle built: 1, plus one per step that found a tensor changed
        (0 without a handle). A test hook for invalidation."""
        return self._handle.plans_built if self._handle is not None else 0

    def __len__(self) -> int:
        return len(self.teacher)

    @property
    def bytes_per_step(self) -> int:
        """Bytes one step moves: read teacher, read student, write teacher."""
        return sum(2 * t.nbytes + s.nbytes for t, s in zip(self.teacher, self.student))


def _check_devices(teacher, student) -> None:
    # The fake kernels also serve the Meta key: a call mixing meta and real tensors lands
    # there and must fail as the real kernels do, not do nothing.
    if len(teacher) != len(student):
        raise ValueError(f"ema_update_: got {len(teacher)} teacher tensors but {len(student)} "
                         "student tensors")
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.device != teacher[0].device or s.device != t.device:
            raise ValueError(f"ema_update_: devices differ at index {i}: teacher {t.device}, "
                             f"student {s.device} (teacher[0] on {teacher[0].device})")


if _ops is not None:
    # Fake kernels: the ops mutate in place and return nothing, so tracing needs no data.
    @torch.library.register_fake("eman_fused::ema_update_")
    def _ema_update_fake(teacher, student, momentum):
        _check_devices(teacher, student)

    @torch.library.register_fake("eman_fused::ema_update_.tensor")
    def _ema_update_tensor_fake(teacher, student, momentum):
        _check_devices(teacher, student)

    # The per-call checks read a CPU momentum's value; at trace time there is none to read.
    @torch.library.register_fake("eman_fused::_ema_check_call")
    def _ema_check_call_fake(teacher, momentum):
        return None

    @torch.library.register_fake("eman_fused::_ema_check_call.tensor")
    def _ema_check_call_tensor_fake(teacher, momentum):
        return None

    @torch.library.register_fake("eman_fused::ema_plan")
    def _ema_plan_fake(teacher, student):
        _check_devices(teacher, student)
        # the table's size follows from shapes
        return teacher[0].new_empty((ema_table_words(teacher),), dtype=torch.int64)
