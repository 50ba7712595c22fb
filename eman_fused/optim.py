"""Optimizers that update the EMA teacher in the same pass as the student (CPU and CUDA kernels).

`SGD` and `AdamW` are torch.optim.SGD / torch.optim.AdamW: the same constructor arguments (and
the same errors for invalid values: torch's own constructors check them), math, param_groups and
state_dict, so checkpoints move both ways. `foreach` and `fused` are accepted and change nothing
(every step is one fused kernel call per param group); `differentiable=True` raises
NotImplementedError. `step()` runs one fused kernel per param group: new param, optimizer state,
and, with `teacher=`, the teacher's copy of each param from the value just computed (the same
bits as `ema_update_` on that value: untouched at momentum 1, a copy at momentum 0). The
teacher's other tensors (BatchNorm buffers, params without a grad this step, tensors its
include/exclude copies) get the teacher's own fused call in the same step, so `teacher.update()`
must not be called as well.

`LARS` is layer-wise adaptive SGD with the same teacher fusion, in two formulas:
`formula="simclr"` (SimCLR / BYOL's TensorFlow LARS) and `formula="you2017"` (You et al. 2017, as
the official EMAN code uses it for BYOL-EMAN).

A step is all or nothing: every group and tensor is checked before the first write, new state
is kept only when the step ran, so a rejected step leaves params, grads, teacher, optimizer state
and step counts as they were. Grads may have other strides than their params (as in torch.optim:
those are copied to the param's layout first).

Backends (`backend=`): the C++ kernels on the CPU, the CUDA C++ kernels, and (not capturable)
Triton kernels (eman_fused/triton/optim.py) that read the same C++-built table: SGD and AdamW
compute the C++ kernels' bits, LARS agrees to float32 rounding (its norms are summed in
another order). 'auto' picks C++ for CPU params and CUDA C++, else Triton, for CUDA params.

Params may be float32, bfloat16 or float16; grads and state have the param's dtype (as in
torch.optim), the math is float32 and each stored value is rounded once (as torch's fused=True
optimizers); every scalar derived from hyper-parameters (1 - beta2, 1 - lr*wd, ...) is formed in
double and rounded once, as torch does; the teacher averages each param as stored, in its own
dtype.
"""
from __future__ import annotations

import itertools
import operator

import torch
from torch.optim import optimizer as _optimizer_hooks

from . import _backends
from ._grad_mode import call_without_grad
from .schedules import Constant, Schedule
from .teacher import EMATeacher

__all__ = ["SGD", "AdamW", "LARS"]

_FUSED_TEACHER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_OPTIM_LAYOUT = None


def _layout():
    # Imported at first use, only where the extension is built (checked at construction); kept
    # in a global since a step asks for it several times.
    global _OPTIM_LAYOUT
    if _OPTIM_LAYOUT is None:
        from .ops.layout import OPTIM
        _OPTIM_LAYOUT = OPTIM
    return _OPTIM_LAYOUT


def _refuse_differentiable(differentiable: bool, name: str) -> None:
    if differentiable:
        raise NotImplementedError(
            f"eman_fused.optim.{name}(differentiable=True): the fused kernels write params, state and "
            "teacher in place below autograd, so no graph through the step is recorded and there is "
            f"nothing to differentiate; use torch.optim.{name}(differentiable=True) for that")


class _TeacherLink:
    """Which teacher tensor each optimizer param feeds, through EMATeacher's public interface
    (refresh, fused_pairs, momentum_for_step, check_rest, update_rest)."""

    def __init__(self, teacher: EMATeacher, momentum: float | Schedule | None, capturable: bool):
        if not isinstance(teacher, EMATeacher):
            raise TypeError(f"teacher must be an eman_fused.EMATeacher, got {type(teacher).__name__}")
        self._refuse_unsupported(teacher)
        if teacher.capturable != capturable:
            raise ValueError(f"a capturable={capturable} optimizer needs an EMATeacher(..., "
                             f"capturable={capturable}) (the momentum and step count must live "
                             f"{'on the device' if capturable else 'on the host'} for both)")
        self.capturable = capturable
        if momentum is not None and not isinstance(momentum, Schedule):
            momentum = Constant(momentum)
        self.teacher, self.schedule = teacher, momentum
        self._generation = None
        self.teacher_params: set[int] = set()  # ids of the teacher's own tensors among the params
        self._partitions: dict[int, tuple] = {}  # group index -> (generation, params, parts, fused)
        self._union = ((), frozenset())

    @staticmethod
    def _refuse_unsupported(teacher: EMATeacher) -> None:
        why = teacher.fused_step_unsupported
        if why is not None:
            raise NotImplementedError(f"the fused optimizers cannot update this teacher in their step ({why}); "
                                      "call teacher.update() after a torch optimizer instead")

    def _refresh(self, checked_elsewhere=None) -> None:
        # follows moves / casts / swapped layers of either model
        generation = self.teacher.refresh(checked_elsewhere)
        if generation == self._generation:
            return
        self._refuse_unsupported(self.teacher)
        self.fused = {id(s): t for s, t in self.teacher.fused_pairs() if t.dtype in _FUSED_TEACHER_DTYPES}
        self._generation = generation

    def check_params(self, groups) -> None:
        """Every param is the student's, or one of the teacher's own frozen tensors: those come
        with `self.parameters()` of a module holding both models (a LightningModule with a
        teacher attribute) and are skipped, as torch skips params without a grad."""
        self._refresh()
        for gi, group in enumerate(groups):
            for pi, p in enumerate(group["params"]):
                if self.teacher.is_student_tensor(p):
                    continue
                if self.teacher.is_teacher_tensor(p):
                    self.teacher_params.add(id(p))
                    continue
                raise ValueError(f"param {pi} of param group {gi} (shape {tuple(p.shape)}) is not a "
                                 "parameter of the teacher's student; the teacher does not match "
                                 "this optimizer")

    def refuse_teacher_grads(self, params) -> None:
        """A teacher tensor with a grad would be written twice (by the step and by the EMA):
        refused before any write."""
        for p in params:
            if id(p) in self.teacher_params:
                raise ValueError(f"a param of this optimizer (shape {tuple(p.shape)}) is one of the "
                                 "teacher's own tensors and has a grad; the teacher is written by "
                                 "its EMA only (its params are frozen: requires_grad=False)")

    def momentum(self, checked_elsewhere=None):
        """The teacher's momentum for this step, after a refresh (checked_elsewhere: as for
        EMATeacher.refresh)."""
        self._refresh(checked_elsewhere)  # first: a re-match may move the teacher (and its step tensor)
        m = self.teacher.momentum_for_step(self.schedule)
        # capturable: a float32 device scalar, computed on the device from the step tensor
        return m.to(torch.float32) if self.capturable else m

    def partition(self, group_index: int, params: list):
        """The kernel calls of a group: [(indices into params, teacher tensors or [])], one per
        (device, param dtype, teacher dtype), params whose teacher tensor the kernel can update
        first; and the ids of those params. Cached while the pairing (its generation) and the
        params with a grad are the same objects; call after momentum() (it refreshes)."""
        cached = self._partitions.get(group_index)
        if (cached is not None and cached[0] == self._generation and len(cached[1]) == len(params)
                and all(map(operator.is_, cached[1], params))):  # identity: Tensor == compares values
            return cached[2], cached[3]
        if self.teacher_params:
            self.refuse_teacher_grads(params)
        kinds: dict = {}
        for i, p in enumerate(params):
            t = self.fused.get(id(p))
            idx, ts = kinds.setdefault((t is None, p.device, p.dtype, None if t is None else t.dtype), ([], []))
            idx.append(i)
            if t is not None:
                ts.append(t)
        # inside (with a teacher) before outside, as the pairs were always ordered
        parts = [kinds[k] for k in sorted(kinds, key=lambda k: k[0])]
        parts = [(None if len(idx) == len(params) else idx, ts) for idx, ts in parts]
        fused = frozenset(id(params[i]) for idx, ts in parts if ts for i in (idx or range(len(params))))
        self._partitions[group_index] = (self._generation, list(params), parts, fused)
        return parts, fused

    def union(self, sets: list) -> frozenset:
        """The union of the groups' fused ids, the same object while the sets are the same."""
        if len(sets) == 1:
            return sets[0]
        held = self._union[0]  # the sets themselves: their ids cannot be reused while held here
        if not (len(held) == len(sets) and all(map(operator.is_, held, sets))):
            self._union = (tuple(sets), frozenset().union(*sets))
        return self._union[1]

    def validate(self, fused_ids: set[int]) -> None:
        """The checks of finish()'s updates, before the optimizer writes anything (a teacher
        tensor of the wrong shape or dtype raises here, with every tensor untouched)."""
        self.teacher.check_rest(fused_ids)

    def finish(self, fused_ids: set[int], m) -> None:
        """The teacher's tensors not updated by the optimizer kernels, then count the update."""
        self.teacher.update_rest(m, fused_ids)


class _Call:
    """One kernel call of a step (a param group, or its part of one device and dtype): the op,
    its arguments, and the state it creates, kept only when the call ran."""

    def __init__(self, op, args, new_state):
        self.op, self.args, self.new_state = op, args, new_state

    def check(self) -> None:
        """The op's checks, writing nothing (the table op runs them)."""
        args = self.args if len(self.args) == 11 else (*self.args, [])
        if torch.compiler.is_compiling():
            torch.ops.eman_fused._optim_ema_table(*args)
        else:  # the same op through the dispatcher, without boxing every tensor
            _backends._C.optim_step_lists(*args, True)

    def run(self, state) -> None:
        if self.op is _STEP_OP and not torch.compiler.is_compiling():
            _backends._C.optim_step_lists(*self.args, False)
        else:
            self.op(*self.args)
        for p, entries in self.new_state.items():
            state[p] = entries


class _StepPlan:
    """A step plan (csrc/optim/step_plan.h) and what it was made with: the teacher's pairing
    generation and the ids of the params whose teacher tensors the kernels update."""

    def __init__(self, native, generation, fused_ids):
        self.native, self.generation, self.fused_ids = native, generation, fused_ids
        self.steps = 0  # steps it ran

    def run(self, opt, link) -> bool:
        """One step through the plan (True), or False with nothing written."""
        if link is None:
            ran = self.native.step(opt.param_groups, opt.state, 0.0)
        else:
            # Refreshes the pairing first; the pairs the kernels update are checked by the
            # plan (both sides), and a change there brings the checked path's full refresh.
            m = link.momentum(self.fused_ids)
            if link._generation != self.generation:
                return False
            link.validate(self.fused_ids)  # the teacher's own updates' checks, before any write
            ran = self.native.step(opt.param_groups, opt.state, m)
            if ran:
                link.finish(self.fused_ids, m)
        self.steps += ran
        return ran


class _FusedStep:
    _capturable = False
    _kind = ""  # its hyper-parameter list in the op's layout: 'sgd', 'adamw' or 'lars'
    _name = ""  # for messages

    def _init_backend(self, backend: str) -> None:
        """backend='auto' (CPU params: the C++ kernels; CUDA params: the CUDA C++ kernels, else
        Triton), 'cpu', 'cuda' or 'triton'. Resolved per device now, so a missing backend is
        reported at construction, with its reason."""
        _backends.require("cpu")  # the planner and the layouts live in the C++ extension
        self._backend, self._resolved = backend, {}
        self._plan, self._plan_wait, self._plan_misses = None, 0, 0  # the step plan (see _step)
        self._resolve_params(self.param_groups)

    def _resolve_params(self, groups) -> None:
        # Params on other devices (e.g. meta, before materialization) are refused at step().
        for group in groups:
            for p in group["params"]:
                if p.device.type in ("cpu", "cuda"):
                    self._backend_for(p.device)

    def _backend_for(self, device) -> str:
        name = self._resolved.get(device)
        if name is None:
            has = {"cpu", "cuda"} | (set() if self._capturable else {"triton"})
            op = f"optim_ema_step_ ({self._name}{', capturable' if self._capturable else ''})"
            name = self._resolved[device] = _backends.resolve(self._backend, device, has, op=op)
        return name

    def _step_op(self, device):
        """The step op for params on `device`, and whether it takes hyper_tensors."""
        if self._backend_for(device) == "triton":
            return torch.ops.eman_fused.optim_ema_step_triton_, False
        return torch.ops.eman_fused.optim_ema_step_, True

    def _init_teacher(self, teacher, teacher_momentum):
        self._link = _TeacherLink(teacher, teacher_momentum, self._capturable) if teacher is not None else None
        if self._link is not None:
            self._link.check_params(self.param_groups)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        if getattr(self, "_resolved", None) is not None:
            self._resolve_params(self.param_groups[-1:])
        if getattr(self, "_link", None) is not None:
            self._link.check_params(self.param_groups[-1:])

    def _hyper_value(self, group, name, m):
        """The value of hyper-parameter `name` (a name of the op's layout) for `group`: the group's
        key of that name unless a class maps it otherwise."""
        return m if name == "teacher_momentum" else group[name]

    def _hyper(self, group, m, device):
        """(hyper floats, hyper_tensors) of a call. A tensor value is read on the host unless the
        optimizer is capturable: then the kernel reads it on the device (no host read)."""
        values, tensors = [], []
        hyper_value = self._hyper_value
        for name in _layout()["hyper"][self._kind]:
            v = hyper_value(group, name, m)
            if self._capturable and isinstance(v, torch.Tensor):
                values.append(0.0)  # placeholder: the tensor holds
                tensors.append(v.detach().reshape(()).to(device=device, dtype=torch.float32))
            else:
                values.append(float(v))
                tensors.append(None)
        return values, tensors if any(t is not None for t in tensors) else []

    def _momentum_buffers(self, params, momentum_state: bool):
        """(each param's 'momentum_buffer', flags with FIRST where it is new, the new buffers):
        a new buffer is set by the kernel to the first update, as torch.optim.SGD does, and is
        kept in self.state only when the step ran."""
        flags = [0] * len(params)
        if not momentum_state:
            return [], flags, {}
        bufs = _backends._C.state_lookup(self.state, params, ("momentum_buffer",))[0]
        new = {}
        # the params without a buffer (none after the first step), found by a scan in C
        no_buffer = map(operator.is_, bufs, itertools.repeat(None, len(bufs)))
        missing = list(itertools.compress(itertools.count(), no_buffer))
        if missing:
            first_flag = _layout()["flag_first"]
            for i in missing:
                p = params[i]
                bufs[i] = torch.empty_like(p, memory_format=torch.preserve_format)
                new[p] = {**self.state.get(p, {}), "momentum_buffer": bufs[i]}
                flags[i] = first_flag
        return bufs, flags, new

    def _grads(self, group):
        """(params with a grad, their grads, (device, dtype) when all share one, else None)."""
        params, grads, dtype, devices, regular = _backends._C.optim_gather(group["params"])
        if not regular:  # a case the walk below handles (or refuses) param by param
            return (*self._grads_one_by_one(group), None)
        devices = [_device(*d) for d in devices]
        for device in devices:
            self._backend_for(device)
        uniform = (devices[0], dtype) if len(devices) == 1 and dtype is not None else None
        return params, grads, uniform

    def _grads_one_by_one(self, group):
        params, grads = [], []
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if p.device.type not in ("cpu", "cuda"):
                raise NotImplementedError(f"eman_fused.optim.{type(self).__name__} has CPU and CUDA kernels; "
                                          f"got a param on {p.device}")
            self._backend_for(p.device)
            if g.stride() != p.stride() and g.shape == p.shape and g.device == p.device:
                # torch.optim takes grads of any strides; the kernels walk grad and param as
                # two flat arrays in one memory order.
                g = torch.empty_like(p, dtype=g.dtype).copy_(g)
            params.append(p)
            grads.append(g)
        return params, grads

    def step(self, *args, **kwargs):
        """step(closure=None): one step of every param group (and of the teacher), as the torch
        optimizer's step; its step hooks (global and this optimizer's) run around it, inside the
        profiler range "Optimizer.step#<class>.step", as around torch's steps.

        torch.optim wraps each optimizer class's step in a function that does that, opening the
        range on every step; on the CI CPU that wrapper cost 29 µs of a 95 µs SGD step at 161
        params, most of it the range. Here the step does it itself (the `hooked` mark below tells
        torch not to wrap it) and opens the range only when something would record it: a
        profiler on this thread or on all threads, or an execution-trace observer."""
        if type(self).step is not _FusedStep.step:
            # A subclass with its own step: torch wrapped that one (hooks and range run there),
            # and this is its super().step() call.
            return self._closure_step(*args, **kwargs)
        if torch.compiler.is_compiling() or _backends._C.recording_functions():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
                return self._hooked_step(args, kwargs)
        return self._hooked_step(args, kwargs)  # no profiler or observer would record the range

    # torch.optim.Optimizer wraps a class's step unless it says it is wrapped already.
    step.hooked = True

    def _hooked_step(self, args, kwargs):
        full = (self, *args)  # the hooks see the step's arguments as torch's wrapper gives them
        pre = _optimizer_hooks._global_optimizer_pre_hooks
        if pre or self._optimizer_step_pre_hooks:
            for hook in (*pre.values(), *self._optimizer_step_pre_hooks.values()):
                result = hook(self, full, kwargs)
                if result is None:
                    continue
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"{type(self).__name__}.step: a step pre-hook must return None "
                                       f"or a tuple of (new_args, new_kwargs), but got {result}.")
                full, kwargs = result
        out = self._closure_step(*full[1:], **kwargs)
        self._optimizer_step_code()  # where torch's profiler with Python tracing looks
        post = _optimizer_hooks._global_optimizer_post_hooks
        if post or self._optimizer_step_post_hooks:
            for hook in (*self._optimizer_step_post_hooks.values(), *post.values()):
                hook(self, full, kwargs)
        return out

    def _closure_step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        return call_without_grad(self._step, loss)

    def _step(self, loss):
        link = self._link
        plan = getattr(self, "_plan", None)
        if plan is not None:
            if plan.run(self, link):
                return loss
            self._drop_plan()
        m = link.momentum() if link is not None else 0.0  # capturable: a device tensor
        group_fused: list[frozenset] = []
        calls: list[_Call] = []
        call_groups: list[int] = []
        for gi, group in enumerate(self.param_groups):
            params, grads, uniform = self._grads(group)
            if not params:
                continue
            # One kernel call per (device, param dtype, teacher dtype): params whose teacher
            # tensor the kernel can update go with it; the rest (all, without a teacher) without.
            if link is not None:
                parts, fused = link.partition(gi, params)
                group_fused.append(fused)
            else:  # params sharing one device and dtype (optim_gather says so): one call
                parts = [(None, [])] if uniform is not None else _parts_without_teacher(params)
            for idx, ts in parts:
                if idx is None:
                    calls.append(self._call(group, params, grads, ts, m))
                else:
                    calls.append(self._call(group, [params[i] for i in idx], [grads[i] for i in idx], ts, m))
                call_groups.append(gi)
        fused_ids = link.union(group_fused) if link is not None and group_fused else frozenset()
        # All or nothing: every call is checked before the first one writes (each checks itself
        # first too, so the first needs no separate check), and so are the teacher's own updates.
        for call in calls[1:]:
            call.check()
        if len(calls) > 1:  # and no call writes what another reads or writes
            lists = [call.args for call in calls]
            torch.ops.eman_fused._optim_ema_overlap(
                [p for a in lists for p in a[1]], [g for a in lists for g in a[2]],
                [s for a in lists for s in (*a[3], *a[4], *a[5])], [t for a in lists for t in a[6]],
                [s for a in lists for s in a[8]])
        if link is not None:
            link.validate(fused_ids)
        for call in calls:
            call.run(self.state)
        if link is not None:
            link.finish(fused_ids, m)
        self._plan_next_steps(calls, call_groups, fused_ids)
        return loss

    # -- the persistent plan ---------------------------------------------------------------
    # After a checked step, the next steps usually meet the same tensors: a plan of them
    # (csrc/optim/step_plan.h) checks in C++ that nothing changed but what may change between
    # steps (grads, scheduled hyper-parameters, step counts) and runs the kernels, with no
    # per-param Python. A step that finds anything else changed takes the checked path above,
    # which plans again. Plans that never run a step (something changes at every step) are
    # made less and less often: after the k-th in a row, only every 2^k checked steps.

    def _drop_plan(self) -> None:
        plan, self._plan = self._plan, None
        self._plan_missed(reset=plan.steps > 0)

    def _plan_missed(self, reset: bool = False) -> None:
        # After the k-th plan in a row that never ran (or could not be made), wait 2^k - 1
        # checked steps before the next; a plan that ran resets the count.
        self._plan_misses = 0 if reset else getattr(self, "_plan_misses", 0) + 1
        self._plan_wait = 2 ** min(self._plan_misses, 10) - 1

    def _plan_next_steps(self, calls, call_groups, fused_ids) -> None:
        wait = getattr(self, "_plan_wait", 0)
        if wait:
            self._plan_wait = wait - 1
            return
        if self._capturable or torch.compiler.is_compiling() or not calls:
            return  # device hyper-parameters and step counts: the checked path each step
        same = [self._plan_same_keys(group) for group in self.param_groups]
        if any(keys is None for keys in same):
            return
        first = ~_layout()["flag_first"]
        sources = [self._hyper_source(name) for name in _layout()["hyper"][self._kind]]
        native_calls = []
        for call, gi in zip(calls, call_groups):
            args = call.args
            params, grads = args[1], args[2]
            # The C++ kernels of a CPU call (a CUDA step copies its table to the device at each
            # step and has no plan), host values only, each grad the param's own (not a copy
            # in the param's strides).
            if (call.op is not _STEP_OP or len(args) != 11 or args[10] or params[0].device.type != "cpu"
                    or not all(map(operator.is_, grads, (p.grad for p in params)))):
                return
            native_calls.append((*args[:7], [f & first for f in args[7]], *args[8:10], gi, sources))
        try:
            native = _backends._C.OptimStepPlan(native_calls, self.param_groups, self.state, same)
        except (TypeError, ValueError, RuntimeError):
            # This step has written already, so nothing may raise now: what a plan cannot hold
            # (a group's params in a tuple, a tensor subclass) keeps the checked path, which is
            # the full step; planning is tried again less and less often, as for a plan that
            # never runs.
            self._plan_missed()
            return
        link = self._link
        self._plan = _StepPlan(native, link._generation if link is not None else None, fused_ids)

    def _plan_same_keys(self, group):
        """The keys of `group` (besides the hyper-parameters) that the kernel calls depend on, as
        a tuple: a plan holds while their values are the same objects; None: no plan."""
        return ()

    def _hyper_source(self, name):
        """Where a plan reads hyper-parameter `name` each step: (group key, index into its value
        or -1), or None for the teacher's momentum (as _hyper_value)."""
        return None if name == "teacher_momentum" else (name, -1)

    def _op_call(self, optimizer_id, group, params, grads, moments, teacher, flags, steps, m, new_state):
        device = params[0].device
        op, takes_tensors = self._step_op(device)
        hyper, hyper_tensors = self._hyper(group, m, device)
        args = (optimizer_id, params, grads, *moments, teacher, flags, steps, hyper)
        return _Call(op, (*args, hyper_tensors) if takes_tensors else args, new_state)


def _parts_without_teacher(params: list):
    # One call per (device, dtype), as partition() splits a group with a teacher.
    kinds: dict = {}
    for i, p in enumerate(params):
        kinds.setdefault((p.device, p.dtype), []).append(i)
    return [(None if len(idx) == len(params) else idx, []) for idx in kinds.values()]


_STEP_OP = torch.ops.eman_fused.optim_ema_step_ if _backends._C_ERROR is None else None
_DEVICES: dict = {}


def _device(kind: str, index: int) -> torch.device:
    # (type, index) as optim_gather reports it -> torch.device, made once per device
    d = _DEVICES.get((kind, index))
    if d is None:
        d = _DEVICES[(kind, index)] = torch.device(kind) if index < 0 else torch.device(kind, index)
    return d


def _torch_kwargs(foreach, fused):
    return dict(foreach=foreach, fused=fused)


class SGD(_FusedStep, torch.optim.SGD):
    """torch.optim.SGD whose step also updates `teacher` (an EMATeacher of the model these params
    belong to) from the new params, in the same pass. `teacher_momentum`: a float or schedule
    (default: the teacher's own). foreach and fused are accepted and change nothing (the step is
    always one fused kernel per param group); differentiable=True raises NotImplementedError.

    capturable=True: lr (a 0-dim tensor to schedule it under a CUDA graph) and the teacher's
    momentum (the teacher must be capturable too) are device scalars read by the kernel.
    backend: 'auto' (CPU params: C++; CUDA params: CUDA C++, else Triton), 'cpu', 'cuda' or
    'triton' (not with capturable=True)."""

    _kind, _name = "sgd", "SGD"

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float | torch.Tensor = 0.0,
                 nesterov: bool = False, *, maximize: bool = False, foreach: bool | None = None,
                 differentiable: bool = False, fused: bool | None = None,
                 teacher: EMATeacher | None = None, teacher_momentum=None, capturable: bool = False,
                 backend: str = "auto"):
        _refuse_differentiable(differentiable, "SGD")
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                         **_torch_kwargs(foreach, fused))
        # torch's fused=True has GradScaler hand the step its scale and inf flag; this step
        # does not take them, so GradScaler unscales the grads and skips inf steps itself.
        self._step_supports_amp_scaling = False
        self._capturable = capturable
        self._init_backend(backend)
        self._init_teacher(teacher, teacher_momentum)

    def _call(self, group, params, grads, teacher, m):
        bufs, flags, new = self._momentum_buffers(params, group["momentum"] != 0)
        return self._op_call(_layout()["optimizers"]["sgd"], group, params, grads, (bufs, [], []),
                             teacher, flags, [], m, new)


class AdamW(_FusedStep, torch.optim.AdamW):
    """torch.optim.AdamW whose step also updates `teacher` from the new params, in the same pass.
    Every argument of torch.optim.AdamW: amsgrad, maximize, tensor lr and betas; foreach and fused
    are accepted and change nothing; differentiable=True raises NotImplementedError.

    capturable=True: step counts on the params' device, lr and betas (give 0-dim tensors to
    schedule them under a CUDA graph) and the teacher's momentum (the teacher must be capturable
    too) read by the kernel, which computes the bias corrections itself: no host value per step.
    backend: as for SGD."""

    _kind, _name = "adamw", "AdamW"

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, teacher: EMATeacher | None = None, teacher_momentum=None,
                 backend: str = "auto"):
        _refuse_differentiable(differentiable, "AdamW")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, capturable=capturable,
                         **_torch_kwargs(foreach, fused))
        self._step_supports_amp_scaling = False  # as for SGD
        self._capturable = capturable
        self._init_backend(backend)
        self._init_teacher(teacher, teacher_momentum)

    def _hyper_value(self, group, name, m):
        if name in ("beta1", "beta2"):
            return group["betas"][name == "beta2"]
        return super()._hyper_value(group, name, m)

    def _hyper_source(self, name):
        if name in ("beta1", "beta2"):
            return ("betas", int(name == "beta2"))
        return super()._hyper_source(name)

    def _call(self, group, params, grads, teacher, m):
        triton = self._backend_for(params[0].device) == "triton"
        if not triton:
            steps, exp_avgs, exp_avg_sqs, max_sqs = _backends._C.state_lookup(
                self.state, params, ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"))
            lists = (steps, exp_avgs, exp_avg_sqs, max_sqs) if group["amsgrad"] else (steps, exp_avgs, exp_avg_sqs)
            if all(x is not None for values in lists for x in values):
                # every param has its state: the lists as they are
                if not group["amsgrad"]:
                    max_sqs = []
                return self._op_call(_layout()["optimizers"]["adamw"], group, params, grads,
                                     (exp_avgs, exp_avg_sqs, max_sqs), teacher, [], steps, m, {})
        exp_avgs, exp_avg_sqs, max_sqs, steps, new = [], [], [], [], {}
        for p in params:
            state = self.state.get(p)
            if not state:  # capturable: the step count lives on the param's device
                state = new[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device if self._capturable else None),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif triton and state["step"].device.type != "cpu":
                # A checkpoint of torch's fused/capturable AdamW keeps step counts on the GPU; the
                # Triton kernels read host counts (one copy, then they stay on the host).
                state["step"] = state["step"].cpu()
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_sqs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
        return self._op_call(_layout()["optimizers"]["adamw"], group, params, grads,
                             (exp_avgs, exp_avg_sqs, max_sqs), teacher, [], steps, m, new)


class LARS(_FusedStep, torch.optim.Optimizer):
    """LARS (layer-wise adaptive rate scaling) with the teacher's copy of each param updated in
    the same pass. Two formulas, each held to an eager transcription in eman_fused.reference:

    formula="simclr" (default; SimCLR's and BYOL's TensorFlow LARS): d = g + weight_decay·p,
    scaled by the trust ratio trust_coefficient·|p|/|d| (1 if a norm is 0); buf = momentum·buf
    + d; p -= lr·buf. Excluded params get neither weight decay nor the trust ratio (plain
    momentum SGD). No dampening or nesterov.

    formula="you2017" (You, Gitman & Ginsburg 2017, as the official EMAN code's LARS for
    BYOL-EMAN): local_lr = trust_coefficient·|p| / (|g| + weight_decay·|p|) (0 when |p| = 0),
    d = (g + weight_decay·p)·lr·local_lr; buf = d at first, then momentum·buf +
    (1 - dampening)·d; d = d + momentum·buf with nesterov, else buf; p -= d. Excluded params
    skip the trust ratio (local_lr = 1) and keep weight decay, as the official code does.

    Which params are excluded: a group's `lars_exclude=True` (the official code's key) excludes
    all its params; `exclude(p)` (default for simclr: 1-D params, i.e. biases and BatchNorm; for
    you2017: none) excludes more. Two passes per step (documented cost): per-tensor norms, then
    the update. capturable=True: lr (a 0-dim tensor to schedule it) and the teacher's momentum
    (the teacher must be capturable too) are device scalars read by the kernels, as for SGD.
    backend: as for SGD (Triton: two launches, as the two passes).
    """

    _kind, _name = "lars", "LARS"

    def __init__(self, params, lr: float | torch.Tensor = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, trust_coefficient: float = 0.001, *,
                 dampening: float = 0.0, nesterov: bool = False, formula: str = "simclr",
                 maximize: bool = False, exclude=None, teacher: EMATeacher | None = None,
                 teacher_momentum=None, capturable: bool = False, backend: str = "auto"):
        if formula not in ("simclr", "you2017"):
            raise ValueError(f"formula must be 'simclr' or 'you2017', got {formula!r}")
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient < 0:
            raise ValueError("lr, momentum, weight_decay and trust_coefficient must be >= 0")
        if formula == "simclr" and (dampening != 0 or nesterov):
            raise ValueError("formula='simclr' has no dampening or nesterov (formula='you2017' has)")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, trust_coefficient=trust_coefficient, maximize=maximize,
                        formula=formula, lars_exclude=False,
                        exclude=exclude if exclude is not None else
                        (_one_dim if formula == "simclr" else _nothing))
        super().__init__(params, defaults)
        self._capturable = capturable
        self._init_backend(backend)
        self._init_teacher(teacher, teacher_momentum)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # checkpoints of the one-formula LARS
            group.setdefault("formula", "simclr")
            group.setdefault("lars_exclude", False)
            group.setdefault("dampening", 0.0)
            group.setdefault("nesterov", False)

    def _plan_same_keys(self, group):
        # The formula picks the kernel; lars_exclude and exclude(p) give each param's flag,
        # and only the default exclude functions are known to depend on nothing but p.ndim
        # (which the plan's checks cover).
        if group.get("exclude") not in (_one_dim, _nothing):
            return None
        return ("formula", "lars_exclude", "exclude")

    def _call(self, group, params, grads, teacher, m):
        you2017 = group["formula"] == "you2017"
        # simclr keeps a buffer at momentum 0 too (buf = d); you2017, as torch's SGD, none.
        bufs, flags, new = self._momentum_buffers(params, not you2017 or group["momentum"] != 0)
        adapt = _layout()["flag_adapt"]
        flags = [f | (0 if group["lars_exclude"] or group["exclude"](p) else adapt)
                 for f, p in zip(flags, params)]
        kind = _layout()["optimizers"]["lars_you2017" if you2017 else "lars_simclr"]
        return self._op_call(kind, group, params, grads, (bufs, [], []), teacher, flags, [], m, new)


def _one_dim(p: torch.Tensor) -> bool:
    return p.ndim <= 1


def _nothing(p: torch.Tensor) -> bool:
    return False
