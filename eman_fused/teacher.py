"""EMATeacher: an EMA (or EMAN) copy of a student model, updated by one fused call per step."""
from __future__ import annotations

import copy
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Union

import torch
from torch import nn

from .ops import ema as ops
from .nn import convert_to_eman
from .schedules import Constant, Schedule

__all__ = ["EMATeacher", "StructureMismatchError"]

Selector = Union[str, re.Pattern, Callable[[str], bool], Iterable[Union[str, re.Pattern, Callable[[str], bool]]]]


class StructureMismatchError(ValueError):
    """The student's tensors no longer match the teacher's, name by name and shape by shape."""


# Module structure generation: bumped by torch's global registration hooks whenever any module
# gets a parameter, buffer or submodule assigned. A teacher re-matches names only when it moved,
# so the per-step cost is one integer comparison, and a swapped layer is never missed.
_generation = 0
_hooks_installed = False
_hooks_lock = threading.Lock()


def _bump_generation(*_args):
    global _generation
    _generation += 1


def _generation_now() -> int:
    return _generation


def _install_structure_hooks() -> None:
    global _hooks_installed
    with _hooks_lock:
        if _hooks_installed:
            return
        from torch.nn.modules import module as m
        m.register_module_parameter_registration_hook(_bump_generation)
        m.register_module_buffer_registration_hook(_bump_generation)
        m.register_module_module_registration_hook(_bump_generation)
        _hooks_installed = True


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def _clean(name: str) -> str:
    # A compiled submodule (model.backbone = torch.compile(...)) puts `_orig_mod.` in names.
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def named_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """name -> (tensor, is_buffer) for every parameter and buffer, wrapper prefixes removed."""
    out: dict[str, tuple[torch.Tensor, bool]] = {}
    for name, p in unwrap(model).named_parameters():
        out[_clean(name)] = (p, False)
    for name, b in unwrap(model).named_buffers():
        out[_clean(name)] = (b, True)
    return out


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def _local(t: torch.Tensor) -> torch.Tensor:
    # A DTensor's local shard (same storage: writing it updates the sharded tensor).
    return t.to_local() if _is_dtensor(t) else t


def _matcher(selector: Selector | None) -> Callable[[str], bool] | None:
    if selector is None:
        return None
    items = [selector] if isinstance(selector, (str, re.Pattern)) or callable(selector) else list(selector)
    tests = []
    for item in items:
        if isinstance(item, str):
            item = re.compile(item)
        if isinstance(item, re.Pattern):
            tests.append(item.search)
        elif callable(item):
            tests.append(item)
        else:
            raise TypeError(f"include/exclude items must be regex strings, patterns or callables, got {item!r}")
    return lambda name: any(bool(t(name)) for t in tests)


class EMATeacher(nn.Module):
    """A teacher that follows a student: t <- m*t + (1-m)*s over parameters and buffers, in one
    fused call per `update()`.

    student: the model being trained (DDP / DataParallel / torch.compile wrappers are unwrapped).
    momentum: a float in [0, 1] or a schedule from eman_fused.schedules (schedule= is the same).
    eman: True (EMAN, the default): the teacher's BatchNorm layers become EMANBatchNorm, which
        normalize with the running statistics in train and eval mode alike, and those statistics
        are EMA'd from the student's like the weights. False: a classic EMA / Mean Teacher whose
        BatchNorms stay nn.BatchNorm (in train mode they normalize with their own batch).
    buffers: 'ema' (default): floating buffers are EMA'd, integer ones (num_batches_tracked)
        copied exactly. 'copy': every buffer is copied from the student. 'own': the teacher's
        buffers are never touched (a classic teacher in train mode updates its own statistics,
        as MoCo's key encoder does); not allowed with eman=True, whose statistics would freeze.
    include / exclude: which tensors are EMA'd, by name: a regex (re.search), a callable
        name -> bool, or a list of those. A tensor is EMA'd if it matches include (default: all)
        and not exclude. The others are copied from the student (others='copy', default) or
        left as they are (others='freeze').
    teacher: wrap this module instead of a deep copy of the student (its values are kept; call
        `reset()` to copy the student's). teacher_dtype / device: cast / move the teacher
        (e.g. an fp32 teacher of a bf16 student, or a bf16 teacher to halve its memory).
    train_mode: the teacher module's mode after construction (None: eval for EMAN, so dropout is
        off, train for classic so its BatchNorms use their batch); `.train()` / `.eval()` change it.
    capturable: keep the step count and the momentum on the teacher's device, so an update can
        be captured in a CUDA graph or traced by torch.compile(fullgraph=True) without
        recompiling as the schedule moves.
    sync_buffers: 'mean': before each update, average the student's floating buffers (BatchNorm
        running statistics) over `process_group` in one all_reduce, in place, so that every
        rank's teacher gets the same statistics (DDP gives each rank its own after a forward).
        None (default): no collective.
    backend: the EMA kernels' backend ('auto', 'cpu', 'cuda', 'triton', 'reference'); the EMAN
        norm layers get the same name where it applies.

    Sharded students and teachers (FSDP2 `fully_shard`, DTensor parameters) are updated on their
    local shards, without gathering; shard both models the same way and pass `teacher=`.

    state_dict() / load_state_dict() have the keys of the plain model (no 'module.' prefix),
    also when the teacher sits inside a larger module.
    """

    def __init__(self, student: nn.Module, momentum: float | Schedule = 0.999, *, eman: bool = True,
                 schedule: Schedule | None = None, include: Selector | None = None,
                 exclude: Selector | None = None, others: str = "copy", buffers: str = "ema",
                 teacher: nn.Module | None = None, teacher_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, train_mode: bool | None = None,
                 fuse_relu: bool = False, capturable: bool = False, sync_buffers: str | None = None,
                 process_group=None, backend: str = "auto"):
        super().__init__()
        if schedule is not None and not isinstance(momentum, Schedule) and momentum != 0.999:
            raise ValueError("give a momentum or a schedule, not both")
        schedule = schedule if schedule is not None else momentum
        if not isinstance(schedule, Schedule):
            schedule = Constant(schedule)
        if others not in ("copy", "freeze"):
            raise ValueError(f"others must be 'copy' or 'freeze', got {others!r}")
        if buffers not in ("ema", "copy", "own"):
            raise ValueError(f"buffers must be 'ema', 'copy' or 'own', got {buffers!r}")
        if eman and buffers == "own":
            raise ValueError("eman=True normalizes with the running statistics the update EMAs; "
                             "buffers='own' would freeze them (use buffers='ema' or 'copy')")
        if sync_buffers not in (None, "mean"):
            raise ValueError(f"sync_buffers must be None or 'mean', got {sync_buffers!r}")
        if teacher_dtype is not None and not teacher_dtype.is_floating_point:
            raise ValueError(f"teacher_dtype must be a floating dtype, got {teacher_dtype}")
        student = unwrap(student)
        module = copy.deepcopy(student) if teacher is None else unwrap(teacher)
        if eman:
            norm_backend = backend if backend in ("auto", "cpu", "cuda", "triton", "reference") else "auto"
            module = convert_to_eman(module, fuse_relu=fuse_relu, backend=norm_backend)
        if teacher_dtype is not None or device is not None:
            module = module.to(device=device, dtype=teacher_dtype)
        for p in module.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.module = module
        self.module.train(not eman if train_mode is None else train_mode)

        # Plain attributes: kept out of nn.Module's registries so that the student is not a
        # submodule of its teacher and settings never reach the state_dict.
        object.__setattr__(self, "_student", student)
        self.schedule, self.eman, self.buffers, self.others = schedule, eman, buffers, others
        self._include, self._exclude = _matcher(include), _matcher(exclude)
        self.backend, self.capturable = backend, capturable
        self.sync_buffers, self.process_group = sync_buffers, process_group
        self._num_updates = 0
        ref = next(iter(named_tensors(module).values()), (torch.empty(0),))[0]
        self.register_buffer("_step", torch.zeros((), dtype=torch.int64, device=ref.device), persistent=False)
        self._pending: Future | None = None
        self._host_mirror: _HostMirror | None = None
        _install_structure_hooks()
        self._match()
        self.register_state_dict_post_hook(_drop_module_prefix)
        self.register_load_state_dict_pre_hook(_add_module_prefix)

    # -- matching --------------------------------------------------------------------------
    def _selected(self, name: str) -> bool:
        return ((self._include is None or self._include(name))
                and not (self._exclude is not None and self._exclude(name)))

    def _match(self) -> None:
        """Pair teacher and student tensors by name; split them into the EMA and copy lists."""
        t_named, s_named = named_tensors(self.module), named_tensors(self._student)
        missing = sorted(set(t_named) - set(s_named))
        extra = sorted(set(s_named) - set(t_named))
        problems = []
        if missing:
            problems.append(f"in the teacher only: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if extra:
            problems.append(f"in the student only: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        for name in sorted(t_named.keys() & s_named.keys()):
            t, s = t_named[name][0], s_named[name][0]
            if _is_dtensor(t) != _is_dtensor(s):
                problems.append(f"{name}: one side is sharded (DTensor), the other is not")
            elif _is_dtensor(t) and (t.placements != s.placements or t.device_mesh != s.device_mesh):
                problems.append(f"{name}: sharded differently (teacher {t.placements}, student {s.placements})")
            elif t.shape != s.shape:
                problems.append(f"{name}: teacher shape {tuple(t.shape)} vs student {tuple(s.shape)}")
            elif t.is_floating_point() != s.is_floating_point():
                problems.append(f"{name}: teacher {t.dtype} vs student {s.dtype} (floating vs integer)")
        if problems:
            raise StructureMismatchError("the student's structure does not match the teacher's: "
                                         + "; ".join(problems))
        ema_t, ema_s, copy_t, copy_s = [], [], [], []
        for name, (t, is_buffer) in t_named.items():
            s = s_named[name][0]
            selected = self._selected(name)
            if (is_buffer and self.buffers == "own") or (not selected and self.others == "freeze"):
                continue  # never written
            if not t.is_floating_point():  # counters: copied exactly, in the EMA launch
                ema_t.append(t), ema_s.append(s)
            elif (is_buffer and self.buffers == "copy") or not selected:
                copy_t.append(t), copy_s.append(s)
            else:
                ema_t.append(t), ema_s.append(s)
        # Sharded (FSDP2) tensors are updated through their local shards: no all-gather. The
        # shards are re-read at each update, so a re-allocated shard is never missed.
        self._sharded_objs = (ema_t, ema_s, copy_t, copy_s) if any(map(_is_dtensor, ema_t + copy_t)) else None
        self._ema_lists = ([_local(x) for x in ema_t], [_local(x) for x in ema_s])
        self._copy_lists = ([_local(x) for x in copy_t], [_local(x) for x in copy_s])
        ema_t, ema_s = self._ema_lists
        copy_t, copy_s = self._copy_lists
        self._student_float_buffers = [s_named[n][0] for n, (b, is_buffer) in s_named.items()
                                       if is_buffer and b.is_floating_point()]
        self.names = list(t_named)
        self._matched_generation = _generation
        devices = {t.device for t in ema_t + copy_t}
        s_devices = {s.device for s in ema_s + copy_s}
        if len(devices) > 1:
            raise ValueError(f"the teacher's tensors are on several devices: {sorted(map(str, devices))}")
        if devices and s_devices and devices != s_devices:
            self._host_mirror = _HostMirror(ema_s + copy_s, next(iter(s_devices)))
        else:
            self._host_mirror = None

    @property
    def ema_tensors(self) -> list[torch.Tensor]:
        """The teacher tensors updated at the momentum (and the integer buffers copied with them)."""
        return list(self._ema_lists[0])

    @property
    def copied_tensors(self) -> list[torch.Tensor]:
        """The teacher tensors copied from the student at every update."""
        return list(self._copy_lists[0])

    # -- the update ------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        """One EMA step: teacher <- m*teacher + (1-m)*student, m = schedule(step) (default: the
        number of updates so far). Integer buffers are copied; with include/exclude the
        unselected tensors are copied (others='copy') in a second call at momentum 0."""
        if _generation != self._matched_generation:
            self._match()
        if self._sharded_objs is not None:
            ema_t, ema_s, copy_t, copy_s = self._sharded_objs
            self._ema_lists = ([_local(x) for x in ema_t], [_local(x) for x in ema_s])
            self._copy_lists = ([_local(x) for x in copy_t], [_local(x) for x in copy_s])
        if self.sync_buffers == "mean":
            self._average_student_buffers()
        if self.capturable:
            if step is not None:
                self._step.fill_(step)
            momentum = self.schedule.tensor(self._step)
        else:
            momentum = self.schedule(self._num_updates if step is None else step)
        if self._host_mirror is not None:
            self._update_from_host_mirror(momentum)
        else:
            self._apply(momentum, self._ema_lists[1], self._copy_lists[1])
        if self.capturable:  # the count lives on the device only: nothing for a trace to guard on
            self._step.add_(1)
        else:
            self._num_updates = (self._num_updates if step is None else step) + 1

    def _average_student_buffers(self) -> None:
        # One all_reduce over every floating student buffer, flattened (not one per layer).
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("sync_buffers='mean' needs an initialized torch.distributed process group")
        world = dist.get_world_size(self.process_group)
        buffers = [_local(b) for b in self._student_float_buffers]
        if world == 1 or not buffers:
            return
        acc = torch.float64 if any(b.dtype == torch.float64 for b in buffers) else torch.float32
        flat = torch.cat([b.reshape(-1).to(acc) for b in buffers])
        dist.all_reduce(flat, group=self.process_group)
        flat.div_(world)
        for b, part in zip(buffers, flat.split([b.numel() for b in buffers])):
            b.copy_(part.view_as(b))

    @property
    def num_updates(self) -> int:
        """How many updates ran (the next update's default step). With capturable=True this
        reads the device counter (a synchronization)."""
        return int(self._step.item()) if self.capturable else self._num_updates

    def _apply(self, momentum, ema_student, copy_student, ema_teacher=None) -> None:
        ema_teacher = self._ema_lists[0] if ema_teacher is None else ema_teacher
        if ema_teacher:
            ops.ema_update_(ema_teacher, ema_student, momentum, backend=self.backend)
        if self._copy_lists[0]:
            ops.ema_update_(self._copy_lists[0], copy_student, 0.0, backend=self.backend)

    @torch.no_grad()
    def reset(self) -> None:
        """Copy every matched tensor from the student (momentum 0), including the selected ones."""
        if _generation != self._matched_generation:
            self._match()
        self.wait()
        for lists in (self._ema_lists, self._copy_lists):
            if lists[0]:
                src = lists[1]
                if self._host_mirror is not None:
                    src = [s.to(lists[0][0].device) for s in src]
                ops.ema_update_(lists[0], src, 0.0, backend=self.backend)

    # -- a teacher on another device than the student (e.g. a CPU teacher of a GPU student) --
    def _update_from_host_mirror(self, momentum) -> None:
        self.wait()  # the previous host update still reads the staging buffers
        if isinstance(momentum, torch.Tensor):
            momentum = momentum.to(self._ema_lists[0][0].device if self._ema_lists[0] else "cpu")
        staged = self._host_mirror.stage()
        n_ema = len(self._ema_lists[1])

        def run():
            self._host_mirror.wait_staged()
            self._apply(momentum, staged[:n_ema], staged[n_ema:])

        self._pending = self._host_mirror.executor.submit(run)

    def wait(self) -> None:
        """Join an update still running in the background (a teacher on another device than the
        student). Forward, state_dict and the next update call it themselves."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    # -- using the teacher -----------------------------------------------------------------
    def forward(self, *args, **kwargs):
        self.wait()
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        self.wait()
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.wait()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return (f"schedule={self.schedule!r}, eman={self.eman}, buffers={self.buffers!r}, "
                f"ema_tensors={len(self._ema_lists[0])}, copied_tensors={len(self._copy_lists[0])}")


class _HostMirror:
    """Stages the student's tensors in pinned host memory on a side stream, so that a teacher on
    the CPU can be updated by the CPU kernels while the training stream runs on. Optimizer steps
    (which write the student) first make their stream wait for the staging copy, on the GPU,
    through a global optimizer step pre-hook; other writes to the student must call wait()."""

    _live: "list[_HostMirror]" = []
    _hook = None

    def __init__(self, student: list[torch.Tensor], device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"a teacher on another device than its student is supported for a CUDA "
                             f"student only, got a student on {device}")
        self.student = student
        self.device = device
        self.staging = [torch.empty(s.shape, dtype=s.dtype, pin_memory=True) for s in student]
        self.stream = torch.cuda.Stream(device)
        self.copied = torch.cuda.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eman_fused_teacher")
        _HostMirror._live.append(self)
        if _HostMirror._hook is None:
            _HostMirror._hook = torch.optim.optimizer.register_optimizer_step_pre_hook(_HostMirror._order_writes)

    def stage(self) -> list[torch.Tensor]:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for dst, src in zip(self.staging, self.student):
                dst.copy_(src, non_blocking=True)
            self.copied.record(self.stream)
        return self.staging

    def wait_staged(self) -> None:
        self.copied.synchronize()

    @staticmethod
    def _order_writes(_optimizer, _args, _kwargs):
        for mirror in _HostMirror._live:
            torch.cuda.current_stream(mirror.device).wait_event(mirror.copied)


def _drop_module_prefix(module, state_dict, prefix, local_metadata):
    # The teacher's keys are the plain model's: 'conv.weight', not 'module.conv.weight'.
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        for key in [k for k in meta if k == inner[:-1] or k.startswith(inner)]:
            meta[prefix + key[len(inner):] if key != inner[:-1] else prefix[:-1]] = meta.pop(key)


def _add_module_prefix(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        for key in [k for k in list(meta) if (k.startswith(prefix) or not prefix) and not k.startswith(inner)]:
            meta.setdefault((inner + key[len(prefix):]).rstrip("."), meta[key])
