"""EMATeacher: an EMA (or EMAN) copy of a student model, updated by one fused call per step."""
from __future__ import annotations

import copy
import numbers
import re
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, NamedTuple, Union

import torch
from torch import nn

from . import _backends
from ._grad_mode import call_without_grad
from .ops import ema as ops
from .nn import convert_to_eman
from .schedules import Constant, Schedule

__all__ = ["EMATeacher", "StructureMismatchError"]

Selector = Union[str, re.Pattern, Callable[[str], bool], Iterable[Union[str, re.Pattern, Callable[[str], bool]]]]

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
_DEFAULT_MOMENTUM = 0.999
_EXTRA_STATE_KEY = "_extra_state"
_PROGRESS_FORMAT = 1


class StructureMismatchError(ValueError):
    """The student's tensors no longer match the teacher's, name by name and shape by shape."""


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


class _Slot(NamedTuple):
    tensor: torch.Tensor
    is_buffer: bool
    owner: nn.Module  # the module whose _parameters / _buffers hold it
    key: str


def _named_slots(model: nn.Module) -> dict[str, _Slot]:
    """name -> slot for every parameter, then every buffer (named_parameters / named_buffers
    order, shared tensors once), wrapper prefixes removed."""
    out: dict[str, _Slot] = {}
    modules = list(unwrap(model).named_modules())
    for is_buffer, attr in ((False, "_parameters"), (True, "_buffers")):
        seen: set[int] = set()
        for prefix, mod in modules:
            for key, t in getattr(mod, attr).items():
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                out[_clean(f"{prefix}.{key}" if prefix else key)] = _Slot(t, is_buffer, mod, key)
    return out


def named_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """name -> (tensor, is_buffer) for every parameter and buffer, wrapper prefixes removed."""
    return {name: (slot.tensor, slot.is_buffer) for name, slot in _named_slots(model).items()}


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def _local(t: torch.Tensor) -> torch.Tensor:
    # A DTensor's local shard (same storage: writing it updates the sharded tensor).
    return t.to_local() if _is_dtensor(t) else t


def _same_layout(t: torch.Tensor, s: torch.Tensor) -> bool:
    # The kernels' rule: equal strides on every dimension longer than 1.
    return all(n <= 1 or a == b for n, a, b in zip(t.shape, t.stride(), s.stride()))


def _items(selector: Selector | None) -> list:
    if selector is None:
        return []
    items = [selector] if isinstance(selector, (str, re.Pattern)) or callable(selector) else list(selector)
    tests = []
    for item in items:
        if isinstance(item, str):
            item = re.compile(item)
        if isinstance(item, re.Pattern):
            tests.append((item.pattern, item.search))
        elif callable(item):
            tests.append((getattr(item, "__name__", repr(item)), item))
        else:
            raise TypeError(f"include/exclude items must be regex strings, patterns or callables, got {item!r}")
    return tests


class _Watch:
    """Cheap change detection: every entry of the watched module dicts (parameters, buffers and
    submodules of the student and of the teacher) and each tensor's storage, which
    nn.Module._apply replaces on a move, cast or re-layout. `changed()` is one C walk over them
    (_C.watch_changed). The values are held, so a freed object's address cannot come back as a
    new object's while it is watched."""

    def __init__(self, modules: Iterable[nn.Module], extra: Iterable[dict] = (), storages: bool = True):
        # storages=False: the entries only (objects added, replaced or removed), for an owner
        # whose handles check every tensor it writes themselves.
        modules = list(modules)
        tensor_dicts = tuple(d for m in modules for d in (m._parameters, m._buffers))
        self.tensor_dicts = tensor_dicts if storages else ()
        self.other_dicts = tuple([m._modules for m in modules] + list(extra)) + (() if storages else tensor_dicts)
        self.values = [v for d in self.tensor_dicts + self.other_dicts for v in d.values()]
        self.state = bytearray()
        self._fast = getattr(_backends._C, "watch_changed", None)
        self._py_key = None
        self.changed()

    def changed(self) -> bool:
        if self._fast is not None:
            return self._fast(self.tensor_dicts, self.other_dicts, self.state)
        key = self._slow_key()
        if key == self._py_key:
            return False
        self._py_key = key
        return True

    def _slow_key(self) -> tuple:
        # What _C.watch_changed compares, for a build without the extension (slower).
        key = []
        for d in self.tensor_dicts + self.other_dicts:
            key.append(len(d))
            for name, v in d.items():
                key += [id(name), id(v)]
                if isinstance(v, torch.Tensor) and not _is_dtensor(v):
                    key.append(v.untyped_storage()._cdata)
        return tuple(key)


class EMATeacher(nn.Module):
    """A teacher that follows a student: t <- m*t + (1-m)*s over parameters and buffers, in one
    fused call per `update()`.

    student: the model being trained (DDP / DataParallel / torch.compile wrappers are unwrapped).
    momentum: a float in [0, 1] (default 0.999) or a schedule from eman_fused.schedules;
        schedule= is the same (give one of them, not both).
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
        left as they are (others='freeze'). A pattern that matches no name warns.
    teacher: wrap this module instead of a deep copy of the student (its values are kept; call
        `reset()` to copy the student's). teacher_dtype / device: cast / move the teacher
        (e.g. an fp32 teacher of a bf16 student, or a bf16 teacher to halve its memory).
        device= keeps the teacher there (a CPU teacher of a CUDA student is staged through
        pinned memory); without it the teacher follows the student to its device.
    train_mode: the teacher module's mode after construction (None: eval for EMAN, so dropout is
        off, train for classic so its BatchNorms use their batch; False gives timm's eval-mode
        classic teacher); `.train()` / `.eval()` change it.
    untracked_bn: with eman=True, a BatchNorm with track_running_stats=False has no statistics
        to normalize with: 'error' (default) raises naming it, 'keep' leaves it as it is.
    capturable: keep the step count and the momentum on the teacher's device, so an update can
        be captured in a CUDA graph or traced by torch.compile(fullgraph=True) without
        recompiling as the schedule moves.
    sync_buffers: 'mean': before each update, average the student's floating buffers (BatchNorm
        running statistics) over `process_group` in one all_reduce, in place, so that every
        rank's teacher gets the same statistics (DDP gives each rank its own after a forward).
        None (default): no collective.
    backend: the EMA kernels' backend ('auto', 'cpu', 'cuda', 'triton', 'reference'); the EMAN
        norm layers get the same name.

    Moves and casts (`.to()`, `.half()`, `.to(memory_format=...)`, `to_empty()`, of the teacher,
    the student or a module holding both) are followed: each update first checks, in one C call
    over the two models' parameter / buffer / submodule entries, whether a tensor was replaced,
    moved, cast or re-laid out, and re-matches by name if so. The teacher keeps its own dtype and
    takes the student's memory format.

    Sharded students and teachers (FSDP2 `fully_shard`, DTensor parameters) are updated on their
    local shards, without gathering; shard both models the same way and pass `teacher=`.

    state_dict() has the keys of the plain model (no 'module.' prefix, also when the teacher sits
    inside a larger module) plus `_extra_state`: the teacher's progress (its update count), so a
    resumed run continues its schedule. `teacher.module.state_dict()` has the plain keys alone.
    """

    def __init__(self, student: nn.Module, momentum: float | Schedule | None = None, *, eman: bool = True,
                 schedule: Schedule | None = None, include: Selector | None = None,
                 exclude: Selector | None = None, others: str = "copy", buffers: str = "ema",
                 teacher: nn.Module | None = None, teacher_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, train_mode: bool | None = None,
                 fuse_relu: bool = False, capturable: bool = False, sync_buffers: str | None = None,
                 process_group=None, backend: str = "auto", untracked_bn: str = "error"):
        super().__init__()
        # Every argument is checked before any copy or conversion.
        if momentum is not None and schedule is not None:
            raise ValueError("give a momentum or a schedule, not both")
        schedule = schedule if schedule is not None else momentum
        if schedule is None:
            schedule = Constant(_DEFAULT_MOMENTUM)
        elif not isinstance(schedule, Schedule):
            if isinstance(schedule, bool) or not isinstance(schedule, numbers.Real):
                raise TypeError(f"momentum must be a float in [0, 1] or an eman_fused.schedules.Schedule, "
                                f"got {type(schedule).__name__}")
            schedule = Constant(schedule)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        if others not in ("copy", "freeze"):
            raise ValueError(f"others must be 'copy' or 'freeze', got {others!r}")
        if buffers not in ("ema", "copy", "own"):
            raise ValueError(f"buffers must be 'ema', 'copy' or 'own', got {buffers!r}")
        if eman and buffers == "own":
            raise ValueError("eman=True normalizes with the running statistics the update EMAs; "
                             "buffers='own' would freeze them (use buffers='ema' or 'copy')")
        if sync_buffers not in (None, "mean"):
            raise ValueError(f"sync_buffers must be None or 'mean', got {sync_buffers!r}")
        if untracked_bn not in ("error", "keep"):
            raise ValueError(f"untracked_bn must be 'error' or 'keep', got {untracked_bn!r}")
        if teacher_dtype is not None and not (isinstance(teacher_dtype, torch.dtype)
                                              and teacher_dtype.is_floating_point):
            raise ValueError(f"teacher_dtype must be a floating dtype, got {teacher_dtype}")
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        device = torch.device(device) if device is not None else None
        include_tests, exclude_tests = _items(include), _items(exclude)
        student = unwrap(student)
        _refuse_uninitialized(student, "student")

        module = copy.deepcopy(student) if teacher is None else unwrap(teacher)
        if eman:
            module = convert_to_eman(module, fuse_relu=fuse_relu, backend=backend, untracked_bn=untracked_bn)
        if teacher_dtype is not None or device is not None:
            module = module.to(device=device, dtype=teacher_dtype)
        if type(unwrap(module)).get_extra_state is not nn.Module.get_extra_state:
            raise NotImplementedError(f"{type(unwrap(module)).__name__} keeps extra state at its root "
                                      "('_extra_state'), where the teacher keeps its progress; wrap it in a "
                                      "container (e.g. nn.Sequential(model)) to build its teacher")
        for p in module.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.module = module
        self.module.train(not eman if train_mode is None else train_mode)

        # Plain attributes: kept out of nn.Module's registries so that the student is not a
        # submodule of its teacher and settings never reach the state_dict.
        object.__setattr__(self, "_student", student)
        self.schedule, self.eman, self.buffers, self.others = schedule, eman, buffers, others
        self._include_tests, self._exclude_tests = include_tests, exclude_tests
        self.backend, self.capturable = backend, bool(capturable)
        self.sync_buffers, self.process_group = sync_buffers, process_group
        self._num_updates = 0
        ref = next(iter(_named_slots(module).values()), None)
        self.register_buffer("_step", torch.zeros((), dtype=torch.int64, device=ref.tensor.device if ref else None),
                             persistent=False)
        self._pending: Future | None = None
        self._mirror: _HostMirror | None = None
        self._generation = 0
        self._matched_device: torch.device | None = None
        # device=, or a given teacher= placed elsewhere than its student, pins the teacher.
        self._device = device
        if device is None and teacher is not None:
            t_dev, s_dev = _device_of(module), _device_of(student)
            if t_dev is not None and s_dev is not None and t_dev != s_dev:
                self._device = t_dev
        self._rematch()
        self._warn_unmatched_selectors()
        self.register_state_dict_post_hook(_drop_module_prefix)
        self.register_load_state_dict_pre_hook(_add_module_prefix)

    # -- matching --------------------------------------------------------------------------
    def _selected(self, name: str) -> bool:
        return ((not self._include_tests or any(bool(t(name)) for _, t in self._include_tests))
                and not any(bool(t(name)) for _, t in self._exclude_tests))

    def _warn_unmatched_selectors(self) -> None:
        for what, tests in (("include", self._include_tests), ("exclude", self._exclude_tests)):
            for label, test in tests:
                if not any(bool(test(n)) for n in self.names):
                    example = ", ".join(self.names[:3])
                    warnings.warn(f"EMATeacher: {what} pattern {label!r} matches no parameter or buffer "
                                  f"name (names look like: {example})", stacklevel=3)

    def refresh(self, checked_elsewhere: frozenset | None = None) -> int:
        """Re-match teacher and student if either changed since the last update: a tensor
        replaced, moved, cast or re-laid out (`.to()`, `.half()`, `to_empty()`, ...), a layer
        swapped or added. One C call when nothing changed. Returns the pairing's generation
        (a number that changes at each re-match), so callers can cache what they derive.
        checked_elsewhere: ids of student tensors whose pairs the caller checks itself (an
        optimizer's step plan checks the pairs its kernels update, both sides, and comes back
        here without it when one changed); the tensors of the other pairs are checked here."""
        if not torch.compiler.is_compiling() and (self._watch.changed() or
                                                  self._handles_changed(checked_elsewhere)):
            self._rematch()
        return self._generation

    def _handles_changed(self, checked_elsewhere: frozenset | None = None) -> bool:
        # With handles the watch covers the module dicts only; each handle checks its tensors
        # (storage, geometry, dtype, device), which an update learns from the step itself.
        if self._handles is None:
            return False
        if checked_elsewhere is None:
            return any(h.changed() for h, *_ in self._handles)
        # The pairs not checked elsewhere: the rest list's handle, and the copy list's.
        rest = self._rest_lists(checked_elsewhere)[2]
        return (rest is not None and rest.changed()) or any(
            h.changed() for h, _, _, is_copy in self._handles if is_copy)

    def _rematch(self) -> None:
        """Pair teacher and student tensors by name; follow the student's device and memory
        format where allowed; split them into the EMA and copy lists. Raises before any write."""
        self.wait()
        student = self._student
        t_slots, s_slots = _named_slots(self.module), _named_slots(student)
        _check_structure(t_slots, s_slots)
        _refuse_uninitialized(student, "student")
        s_dev = _single_device(s_slots, "student")
        t_dev = _single_device(t_slots, "teacher")
        mirror = False
        on_meta = "meta" in (getattr(t_dev, "type", None), getattr(s_dev, "type", None))
        if t_dev is not None and s_dev is not None and t_dev != s_dev and not on_meta:
            if self._matched_device is not None and t_dev != self._matched_device:
                self._device = t_dev  # the teacher itself was moved: it stays where it was put
            if self._device is None:
                self.to(s_dev)  # follow the student (dtypes kept)
                t_slots, t_dev = _named_slots(self.module), s_dev
            elif self._mirror_wanted(t_dev, s_dev):
                mirror = True
            else:
                name = next(iter(s_slots))
                raise ValueError(f"EMATeacher: the student's '{name}' is on {s_dev} but the teacher is kept on "
                                 f"{t_dev} (device= or an explicit move); move the teacher "
                                 f"(teacher.to('{s_dev}')) or the student back. A teacher on another device "
                                 "than its student is supported for a CPU teacher of a CUDA student only")
        self._follow_layouts(t_slots, s_slots)
        if t_dev is not None and t_dev.type in ("cpu", "cuda") and self.backend != "reference":
            _backends.resolve(self.backend, t_dev)  # a missing backend says so here, with why

        ema_t, ema_s, copy_t, copy_s = [], [], [], []
        ema_buf, copy_buf = [], []
        for name, slot in t_slots.items():
            t, is_buffer = slot.tensor, slot.is_buffer
            s = s_slots[name].tensor
            selected = self._selected(name)
            if (is_buffer and self.buffers == "own") or (not selected and self.others == "freeze"):
                continue  # never written
            if not t.is_floating_point():  # counters: copied exactly, in the EMA launch
                ema_t.append(t), ema_s.append(s), ema_buf.append(is_buffer)
            elif (is_buffer and self.buffers == "copy") or not selected:
                copy_t.append(t), copy_s.append(s), copy_buf.append(is_buffer)
            else:
                ema_t.append(t), ema_s.append(s), ema_buf.append(is_buffer)
        # Sharded (FSDP2) tensors are updated through their local shards: no all-gather. The
        # shards are re-read at each update, so a re-allocated shard is never missed.
        self._sharded_objs = (ema_t, ema_s, copy_t, copy_s) if any(map(_is_dtensor, ema_t + copy_t)) else None
        self._ema_lists = ([_local(x) for x in ema_t], [_local(x) for x in ema_s])
        self._copy_lists = ([_local(x) for x in copy_t], [_local(x) for x in copy_s])
        self._student_float_buffers = [slot.tensor for slot in s_slots.values()
                                       if slot.is_buffer and slot.tensor.is_floating_point()]
        self._student_all = [slot.tensor for slot in s_slots.values()]
        self._student_ids = {id(t) for t in self._student_all}
        self._teacher_ids = {id(slot.tensor) for slot in t_slots.values()}
        self._all_pairs = [(s_slots[name].tensor, slot.tensor) for name, slot in t_slots.items()]
        self.names = list(t_slots)
        self._rest_cache = None
        if mirror:
            if self._mirror is None:
                self._mirror = _HostMirror(s_dev)
            self._mirror.retarget(self._ema_lists[1] + self._copy_lists[1], ema_buf + copy_buf)
        else:
            self._mirror = None  # freed with its staging buffers, stream and thread
        self._matched_device, self._on_meta = t_dev, on_meta
        self._handles = self._make_handles(t_dev, mirror or on_meta)
        self._watch = _Watch([*unwrap(self.module).modules(), *unwrap(student).modules()],
                             extra=[self._modules], storages=self._handles is None)
        self._generation += 1

    def _make_handles(self, t_dev: torch.device | None, elsewhere: bool):
        """Persistent C++ plans of the EMA and the copy lists (csrc/ema/handle.h) where a C++
        backend runs the update: an update then costs one check per tensor in C++, and a tensor
        re-allocated since is re-planned before any write. None (each update calls ema_update_)
        for sharded or mirrored teachers, the meta device, Triton and the reference."""
        if elsewhere or self._sharded_objs is not None or t_dev is None or self.backend == "reference":
            return None
        if t_dev.type not in ("cpu", "cuda") or _backends.resolve(self.backend, t_dev) not in ("cpu", "cuda"):
            return None
        lists = (*self._ema_lists, *self._copy_lists)
        if any(type(x) not in ops.PLAIN_TENSOR_TYPES for side in lists for x in side):
            return None  # a tensor subclass: the storage watch and ema_update_ serve it
        # plan=False: validated at the first update, as ema_update_ would be (a re-match
        # itself never raises for what only the update checks)
        return [(_backends._C.EmaHandle(t, s, replan=False, plan=False), t, s, is_copy)
                for (t, s), is_copy in ((self._ema_lists, False), (self._copy_lists, True)) if t]

    def _mirror_wanted(self, t_dev: torch.device, s_dev: torch.device) -> bool:
        return t_dev.type == "cpu" and s_dev.type == "cuda"

    def _follow_layouts(self, t_slots: dict[str, _Slot], s_slots: dict[str, _Slot]) -> None:
        # The kernels pair elements in memory order: the teacher takes the student's strides
        # (a channels_last student makes a channels_last teacher).
        for name, slot in t_slots.items():
            t, s = slot.tensor, s_slots[name].tensor
            if _is_dtensor(t) or _is_dtensor(s) or t.layout != torch.strided or _same_layout(t, s):
                continue
            if not _dense(s):
                raise ValueError(f"EMATeacher: the student's '{name}' is not dense (strides {s.stride()}); "
                                 "the update reads dense tensors only")
            new = torch.empty_strided(s.shape, s.stride(), dtype=t.dtype, device=t.device)
            with torch.no_grad():
                new.copy_(t)
            if isinstance(t, nn.Parameter):
                t.data = new  # the same Parameter object, as nn.Module._apply does
            else:
                slot.owner._buffers[slot.key] = new
                t_slots[name] = slot._replace(tensor=new)

    @property
    def ema_tensors(self) -> list[torch.Tensor]:
        """The teacher tensors updated at the momentum (and the integer buffers copied with them)."""
        return list(self._ema_lists[0])

    @property
    def ema_sources(self) -> list[torch.Tensor]:
        """The student tensors read into `ema_tensors`, in the same order."""
        return list(self._ema_lists[1])

    @property
    def copied_tensors(self) -> list[torch.Tensor]:
        """The teacher tensors copied from the student at every update."""
        return list(self._copy_lists[0])

    # -- the interface of the fused optimizers (eman_fused.optim) ---------------------------
    @property
    def fused_step_unsupported(self) -> str | None:
        """Why an optimizer cannot update this teacher inside its own kernel (None if it can)."""
        if self._sharded_objs is not None:
            return "its tensors are sharded (DTensor)"
        if self._mirror is not None:
            return "it is on another device than its student"
        return None

    def fused_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(student tensor, teacher tensor) for every floating pair EMA'd at the update's
        momentum: the pairs an optimizer may update in its kernel, from the student's new value.
        Valid until the generation returned by `refresh()` changes."""
        return [(s, t) for t, s in zip(*self._ema_lists) if s.is_floating_point()]

    def student_tensors(self) -> list[torch.Tensor]:
        """Every parameter and buffer of the student, as matched (whether written or not)."""
        return list(self._student_all)

    def is_student_tensor(self, t: torch.Tensor) -> bool:
        """Whether `t` is one of the student's parameters or buffers (by identity)."""
        return id(t) in self._student_ids

    def is_teacher_tensor(self, t: torch.Tensor) -> bool:
        """Whether `t` is one of the teacher's own parameters or buffers (by identity): what an
        optimizer over `module.parameters()` of a module holding both models meets, frozen."""
        self.refresh()
        return id(t) in self._teacher_ids

    def matched_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(student tensor, teacher tensor) for every parameter and buffer name of the two
        models, written by the update or not: what a weight swap exchanges."""
        self.refresh()
        return list(self._all_pairs)

    def momentum_for_step(self, schedule: Schedule | None = None):
        """The momentum of the next update: `schedule` (default: the teacher's) at the update
        count, a float; with capturable=True a 0-dim float64 tensor computed on the teacher's
        device from its step tensor (no host read)."""
        schedule = schedule if schedule is not None else self.schedule
        if self.capturable:
            return schedule.tensor(self._step)
        return schedule(self._num_updates)

    def _rest_lists(self, fused_student_ids: set[int]):
        """(rest teacher, rest student, their handle or None). The optimizers pass the same
        frozenset object while their split is unchanged: then this is one identity test."""
        cache = self._rest_cache
        if cache is not None and (cache[0] is fused_student_ids or cache[0] == fused_student_ids):
            return cache[1], cache[2], cache[3]
        key = frozenset(fused_student_ids)
        rest = [(a, b) for a, b in zip(*self._ema_lists) if id(b) not in key]
        rest_t, rest_s = [a for a, _ in rest], [b for _, b in rest]
        handle = None
        if self._handles is not None and rest_t:
            handle = _backends._C.EmaHandle(rest_t, rest_s, replan=True, plan=False)
        self._rest_cache = (fused_student_ids if isinstance(fused_student_ids, frozenset) else key,
                            rest_t, rest_s, handle)
        return rest_t, rest_s, handle

    def check_rest(self, fused_student_ids: set[int]) -> None:
        """The checks of `update_rest(m, fused_student_ids)`'s calls (ema_update_'s checks of
        each list: shapes, dtypes, devices, overlaps), writing nothing. An optimizer runs them
        before its own first write, so a teacher tensor that cannot be updated raises while
        every tensor is still untouched."""
        rest_t, rest_s, handle = self._rest_lists(fused_student_ids)
        if handle is not None:
            handle.validate()
        elif rest_t:
            _backends.require("cpu")  # the checks live in the C++ extension
            _backends._C.ema_check_lists(rest_t, rest_s)
        if self._copy_lists[0]:
            _backends.require("cpu")
            _backends._C.ema_check_lists(*self._copy_lists)

    @torch.no_grad()
    def update_rest(self, momentum, fused_student_ids: set[int]) -> None:
        """Complete an update of which an optimizer did part: every EMA pair whose student is
        not in `fused_student_ids` (ids of student tensors) at `momentum`, the copied tensors,
        and then count one update. Call `refresh()` before the optimizer's part, not between."""
        rest_t, rest_s, handle = self._rest_lists(fused_student_ids)
        if self.sync_buffers == "mean":
            self._average_student_buffers()
        if handle is not None and not torch.compiler.is_compiling():
            _step_handle(handle, rest_t, rest_s, momentum, self.backend)  # re-plans on a change
            self._ema_call(momentum, [], self._copy_lists[1], ema_teacher=[])  # the copied tensors
        else:
            self._ema_call(momentum, rest_s, self._copy_lists[1], ema_teacher=rest_t)
        self._count(None)

    # -- the update ------------------------------------------------------------------------
    def update(self, step: int | None = None) -> None:
        """One EMA step: teacher <- m*teacher + (1-m)*student, m = schedule(step) (default: the
        number of updates so far). Integer buffers are copied; with include/exclude the
        unselected tensors are copied (others='copy') in a second call at momentum 0."""
        call_without_grad(self._update, step)

    def _update(self, step: int | None, rematched: bool = False) -> None:
        if not torch.compiler.is_compiling() and self._watch.changed():
            self._rematch()  # the handles' tensor checks run in the update's own steps
        if self._on_meta:
            raise ValueError("EMATeacher: the teacher's or the student's tensors are on the meta device "
                             "(not materialized); call to_empty() and load weights before updating")
        if self._sharded_objs is not None:
            ema_t, ema_s, copy_t, copy_s = self._sharded_objs
            self._ema_lists = ([_local(x) for x in ema_t], [_local(x) for x in ema_s])
            self._copy_lists = ([_local(x) for x in copy_t], [_local(x) for x in copy_s])
        if self.sync_buffers == "mean":
            # a collective: every rank calls it once, so a change is looked for before it
            if not torch.compiler.is_compiling() and self._handles_changed():
                self._rematch()
            self._average_student_buffers()
        if self.capturable:
            if step is not None:
                self._step.fill_(step)
            momentum = self.schedule.tensor(self._step)
        else:
            momentum = self.schedule(self._num_updates if step is None else step)
        if self._mirror is not None:
            self._update_from_host_mirror(momentum)
        elif self._handles is not None and not torch.compiler.is_compiling():
            if not self._step_handles(momentum):
                # A tensor changed since the match (a move, cast or re-layout); nothing was
                # written. Re-match (the teacher may follow the student, its step tensor too)
                # and run the whole update again, its checks and momentum included.
                if rematched:
                    raise RuntimeError("EMATeacher.update: the tensors changed again while re-matching")
                self._rematch()
                return self._update(step, rematched=True)
        else:
            self._ema_call(momentum, self._ema_lists[1], self._copy_lists[1])
        self._count(step)

    def _step_handles(self, momentum) -> bool:
        """The update through the handles; False, with nothing written, if a tensor changed."""
        handles = self._handles
        # The copy list's checks first (it is short): a change, or (at its first update) lists
        # the op would refuse, must show before the first write.
        for handle, *_ in handles[1:]:
            if handle.changed():
                return False
            if handle.plans_built == 0:
                handle.validate()
        for i, (handle, teacher, student, is_copy) in enumerate(handles):
            status = _step_handle(handle, teacher, student, 0.0 if is_copy else momentum, self.backend)
            if status == handle.CHANGED:
                if i == 0:
                    return False
                raise RuntimeError("EMATeacher.update: a tensor changed during the update (from another thread?)")
        return True

    def _count(self, step: int | None) -> None:
        if self.capturable:  # the count lives on the device only: nothing for a trace to guard on
            self._step.add_(1)
        else:  # straight into __dict__: nn.Module.__setattr__ costs more than the rest of the count
            self.__dict__["_num_updates"] = (self._num_updates if step is None else step) + 1

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
        reads the device counter (a synchronization). Settable, e.g. to resume from a
        checkpoint that predates the saved count."""
        return int(self._step.item()) if self.capturable else self._num_updates

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"num_updates must be an int >= 0, got {value!r}")
        self.wait()
        self._num_updates = int(value)
        with torch.no_grad():
            self._step.fill_(int(value))

    def _ema_call(self, momentum, ema_student, copy_student, ema_teacher=None) -> None:
        ema_teacher = self._ema_lists[0] if ema_teacher is None else ema_teacher
        if ema_teacher:
            ops.ema_update_(ema_teacher, ema_student, momentum, backend=self.backend)
        if self._copy_lists[0]:
            ops.ema_update_(self._copy_lists[0], copy_student, 0.0, backend=self.backend)

    @torch.no_grad()
    def reset(self) -> None:
        """Copy every matched tensor from the student (momentum 0), including the selected ones."""
        self.refresh()
        self.wait()
        for lists in (self._ema_lists, self._copy_lists):
            if lists[0]:
                src = lists[1]
                if self._mirror is not None:
                    src = [s.to(lists[0][0].device) for s in src]
                ops.ema_update_(lists[0], src, 0.0, backend=self.backend)

    # -- a teacher on another device than the student (e.g. a CPU teacher of a GPU student) --
    def _update_from_host_mirror(self, momentum) -> None:
        self.wait()  # the previous host update still reads the staging buffers
        if isinstance(momentum, torch.Tensor):
            momentum = momentum.to(self._ema_lists[0][0].device if self._ema_lists[0] else "cpu")
        mirror = self._mirror
        staged = mirror.stage()
        n_ema = len(self._ema_lists[1])

        def run():
            mirror.wait_staged()
            self._ema_call(momentum, staged[:n_ema], staged[n_ema:])

        self._pending = mirror.executor.submit(run)

    def wait(self) -> None:
        """Join an update still running in the background (a teacher on another device than the
        student). Forward, state_dict and the next update call it themselves."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    # -- checkpoints -----------------------------------------------------------------------
    # The progress travels as one int64 tensor [format, num_updates] under '_extra_state', the
    # last key of the teacher's state_dict: every value stays a tensor (safetensors, DCP and
    # torch.load(weights_only=True) read it), and code that zips the teacher's state_dict with
    # the student's still pairs the plain keys.
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([_PROGRESS_FORMAT, self.num_updates], dtype=torch.int64)

    def set_extra_state(self, state) -> None:
        if state is _NO_PROGRESS:
            warnings.warn("EMATeacher.load_state_dict: the checkpoint has no teacher progress (an older "
                          "checkpoint or a plain model's state_dict): the update count is not restored and "
                          f"stays at {self.num_updates}, so a momentum schedule restarts there. Set "
                          "teacher.num_updates = k to resume at update k.", stacklevel=4)
            return
        if not (isinstance(state, torch.Tensor) and state.shape == (2,) and not state.is_floating_point()
                and int(state[0]) == _PROGRESS_FORMAT):
            raise ValueError(f"EMATeacher.load_state_dict: '_extra_state' is not an EMATeacher's progress: {state!r}")
        self.num_updates = int(state[1])

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


def _step_handle(handle, teacher, student, momentum, backend: str) -> int:
    """One update of a handle's lists (teacher, student: the objects it was built from):
    EmaHandle.UPDATED, or EmaHandle.CHANGED with nothing written."""
    status = handle.step(momentum)
    if status == handle.USE_OP:  # a dispatch mode, autocast, inference mode: the op routes it
        ops.ema_update_(teacher, student, momentum, backend=backend)
        return handle.UPDATED
    return status


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill one block of memory, in some dim order."""
    if t.layout != torch.strided:
        return False
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _device_of(model: nn.Module) -> torch.device | None:
    for slot in _named_slots(model).values():
        return slot.tensor.device
    return None


def _single_device(slots: dict[str, _Slot], side: str) -> torch.device | None:
    first: tuple[str, torch.device] | None = None
    for name, slot in slots.items():
        dev = slot.tensor.device
        if first is None:
            first = (name, dev)
        elif dev != first[1]:
            raise ValueError(f"EMATeacher: the {side}'s tensors are on several devices ('{first[0]}' on "
                             f"{first[1]}, '{name}' on {dev}); the update runs on one device")
    return first[1] if first else None


def _refuse_uninitialized(model: nn.Module, side: str) -> None:
    for name, slot in _named_slots(model).items():
        if isinstance(slot.tensor, nn.parameter.UninitializedTensorMixin):
            raise ValueError(f"EMATeacher: the {side}'s '{name}' is not initialized (a lazy module): run "
                             "one forward pass before building or updating the teacher")


def _check_structure(t_named: dict[str, _Slot], s_named: dict[str, _Slot]) -> None:
    missing = sorted(set(t_named) - set(s_named))
    extra = sorted(set(s_named) - set(t_named))
    problems = []
    if missing:
        problems.append(f"in the teacher only: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"in the student only: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    for name in sorted(t_named.keys() & s_named.keys()):
        t, s = t_named[name].tensor, s_named[name].tensor
        if _is_dtensor(t) != _is_dtensor(s):
            problems.append(f"{name}: one side is sharded (DTensor), the other is not")
        elif _is_dtensor(t) and (t.placements != s.placements or t.device_mesh != s.device_mesh):
            problems.append(f"{name}: sharded differently (teacher {t.placements}, student {s.placements})")
        elif t.shape != s.shape:
            problems.append(f"{name}: teacher shape {tuple(t.shape)} vs student {tuple(s.shape)}")
        elif t.is_floating_point() != s.is_floating_point():
            problems.append(f"{name}: teacher {t.dtype} vs student {s.dtype} (floating vs integer)")
        elif not t.is_floating_point() and t.dtype != s.dtype:
            problems.append(f"{name}: teacher {t.dtype} vs student {s.dtype} (integer dtypes differ)")
    if problems:
        raise StructureMismatchError("the student's structure does not match the teacher's: "
                                     + "; ".join(problems))


class _CudaSide:
    """The CUDA calls of a host mirror (streams, events, pinned memory), in one place."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def current(self):
        return torch.cuda.current_stream(self.device)

    def event(self):
        return torch.cuda.Event()

    def on_side(self):
        return torch.cuda.stream(self.stream)

    def alloc(self, like: torch.Tensor) -> torch.Tensor:
        # Staging in the student's memory format (its strides), pinned for async copies.
        return torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, pin_memory=True)


class _HostMirror:
    """Stages a CUDA student's tensors in pinned host memory, so that a teacher on the CPU is
    updated by the CPU kernels while the training stream runs on. One per teacher, reused
    across re-matches (a staging buffer is kept for every tensor of the same shape, dtype and
    strides) and freed with the teacher (stream, buffers and worker thread).

    Ordering: buffers (BatchNorm statistics, small, written by every forward) are copied on the
    training stream itself, so the next forward's writes come after the copy; parameters are
    copied on a side stream that first waits for the training stream, and optimizer steps
    (torch.optim's global step pre-hook) make their stream wait for that copy. Other writes to
    the student's parameters must call teacher.wait() first."""

    _live: "weakref.WeakSet[_HostMirror]" = weakref.WeakSet()
    _hook = None
    _side_factory = _CudaSide  # tests put a CPU stand-in here, to check the bookkeeping

    def __init__(self, device: torch.device):
        if device.type != "cuda" and self._side_factory is _CudaSide:
            raise ValueError(f"a teacher on another device than its student is supported for a CUDA "
                             f"student only, got a student on {device}")
        self.device = device
        self.side = self._side_factory(device)
        self.params_copied, self.buffers_copied = self.side.event(), self.side.event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eman_fused_teacher")
        weakref.finalize(self, self.executor.shutdown, wait=False)
        self.staging: list[torch.Tensor] = []
        self.student: list[torch.Tensor] = []
        self.is_buffer: list[bool] = []
        self.allocations = 0
        _HostMirror._live.add(self)
        if _HostMirror._hook is None:
            from torch.optim.optimizer import register_optimizer_step_pre_hook
            _HostMirror._hook = register_optimizer_step_pre_hook(_order_optimizer_writes)

    def retarget(self, student: list[torch.Tensor], is_buffer: list[bool]) -> None:
        """Follow the student's current tensors, reusing staging buffers of the same layout."""
        free: dict[tuple, list[torch.Tensor]] = {}
        for b in self.staging:
            free.setdefault(_layout_key(b), []).append(b)
        staging = []
        for s in student:
            pool = free.get(_layout_key(s))
            if pool:
                staging.append(pool.pop())
            else:
                staging.append(self.side.alloc(s))
                self.allocations += 1
        self.staging, self.student, self.is_buffer = staging, list(student), list(is_buffer)

    def stage(self) -> list[torch.Tensor]:
        current = self.side.current()
        self.side.stream.wait_stream(current)
        with self.side.on_side():
            for dst, src, buf in zip(self.staging, self.student, self.is_buffer):
                if not buf:
                    dst.copy_(src, non_blocking=True)
            self.params_copied.record(self.side.stream)
        for dst, src, buf in zip(self.staging, self.student, self.is_buffer):
            if buf:
                dst.copy_(src, non_blocking=True)
        self.buffers_copied.record(current)
        return self.staging

    def wait_staged(self) -> None:
        self.params_copied.synchronize()
        self.buffers_copied.synchronize()


def _order_optimizer_writes(_optimizer, _args, _kwargs) -> None:
    for mirror in list(_HostMirror._live):
        mirror.side.current().wait_event(mirror.params_copied)


def _layout_key(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.stride(), t.dtype


class _NoProgress:
    def __repr__(self):
        return "<no EMATeacher progress in this checkpoint>"


_NO_PROGRESS = _NoProgress()


def _drop_module_prefix(module, state_dict, prefix, local_metadata):
    # The teacher's keys are the plain model's: 'conv.weight', not 'module.conv.weight'. A
    # teacher's progress goes last.
    inner = prefix + "module."
    own_key = prefix + _EXTRA_STATE_KEY
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)
    if own_key in state_dict:
        state_dict[own_key] = state_dict.pop(own_key)
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        for key in [k for k in meta if k == inner[:-1] or k.startswith(inner)]:
            meta[prefix + key[len(inner):] if key != inner[:-1] else prefix[:-1]] = meta.pop(key)


def _add_module_prefix(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    inner = prefix + "module."
    own_key = prefix + _EXTRA_STATE_KEY
    own = state_dict.pop(own_key, _NO_PROGRESS)
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)
    state_dict[own_key] = own
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        for key in [k for k in list(meta) if (k.startswith(prefix) or not prefix) and not k.startswith(inner)]:
            meta.setdefault((inner + key[len(prefix):]).rstrip("."), meta[key])
