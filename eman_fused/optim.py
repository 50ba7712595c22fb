"""Optimizers that update the EMA teacher in the same pass as the student (CPU and CUDA kernels).

`LARS` is BYOL/SimCLR's layer-wise adaptive SGD, with the same teacher fusion.

`SGD` and `AdamW` are torch.optim.SGD / torch.optim.AdamW (same constructor arguments, math,
param_groups and state_dict, so checkpoints move both ways) whose `step()` runs one fused kernel
per param group: new param, optimizer state, and, with `teacher=`, the teacher's copy of each
param from the value just computed. The teacher's other tensors (BatchNorm buffers, params
without a grad this step, tensors its include/exclude copies) get the teacher's own fused call
in the same step, so `teacher.update()` must not be called as well.

Backends (`backend=`): the C++ kernels on the CPU, the CUDA C++ kernels, and (not capturable)
Triton kernels (eman_fused/triton/optim.py) that read the same C++-built table: SGD and AdamW
compute the C++ kernels' bits, LARS agrees to float32 rounding (its norms are summed in
another order). 'auto' picks C++ for CPU params and CUDA C++, else Triton, for CUDA params.

Params may be float32, bfloat16 or float16; grads and state have the param's dtype (as in
torch.optim), the math is float32 and each stored value is rounded once (as torch's fused=True
optimizers); the teacher averages each param as stored, in its own dtype.
"""
from __future__ import annotations

import math

import torch

from . import _backends
from .schedules import Constant, Schedule
from .teacher import EMATeacher

__all__ = ["SGD", "AdamW", "LARS"]

_FUSED_TEACHER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _TeacherLink:
    """Which teacher tensor each optimizer param feeds, through EMATeacher's public interface
    (refresh, fused_pairs, momentum_for_step, update_rest)."""

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

    @staticmethod
    def _refuse_unsupported(teacher: EMATeacher) -> None:
        why = teacher.fused_step_unsupported
        if why is not None:
            raise NotImplementedError(f"the fused optimizers cannot update this teacher in their step ({why}); "
                                      "call teacher.update() after a torch optimizer instead")

    def _refresh(self) -> None:
        generation = self.teacher.refresh()  # follows moves / casts / swapped layers of either model
        if generation == self._generation:
            return
        self._refuse_unsupported(self.teacher)
        self.fused = {id(s): t for s, t in self.teacher.fused_pairs() if t.dtype in _FUSED_TEACHER_DTYPES}
        self._generation = generation

    def check_params(self, groups) -> None:
        self._refresh()
        for gi, group in enumerate(groups):
            for pi, p in enumerate(group["params"]):
                if not self.teacher.is_student_tensor(p):
                    raise ValueError(f"param {pi} of param group {gi} (shape {tuple(p.shape)}) is not a "
                                     "parameter of the teacher's student; the teacher does not match "
                                     "this optimizer")

    def momentum(self):
        self._refresh()  # first: a re-match may move the teacher (and its step tensor)
        m = self.teacher.momentum_for_step(self.schedule)
        # capturable: a float32 device scalar, computed on the device from the step tensor
        return m.to(torch.float32) if self.capturable else m

    def teacher_for(self, params) -> list[torch.Tensor]:
        self._refresh()
        return [self.fused[id(p)] for p in params]

    def split(self, params):
        """(params whose teacher is updated in the kernel, the others)."""
        self._refresh()
        inside = [p for p in params if id(p) in self.fused]
        return inside, [p for p in params if id(p) not in self.fused]

    def finish(self, fused_ids: set[int], m) -> None:
        """The teacher's tensors not updated by the optimizer kernels, then count the update."""
        self.teacher.update_rest(m, fused_ids)


class _FusedStep:
    _capturable = False
    _op = ""  # the step op's name, for messages
    _triton_op = None  # name of its Triton op (None: no Triton kernel)

    def _init_backend(self, backend: str) -> None:
        """backend='auto' (CPU params: the C++ kernels; CUDA params: the CUDA C++ kernels, else
        Triton), 'cpu', 'cuda' or 'triton'. Resolved per device now, so a missing backend is
        reported at construction, with its reason."""
        self._backend, self._resolved = backend, {}
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
            has = {"cpu", "cuda"} | ({"triton"} if self._triton_op and not self._capturable else set())
            op = self._op + (".capturable" if self._capturable else "")
            name = self._resolved[device] = _backends.resolve(self._backend, device, has, op=op)
        return name

    def _step_op(self, device):
        """The non-capturable step op of this optimizer for params on `device`."""
        triton = self._backend_for(device) == "triton"
        return getattr(torch.ops.eman_fused, self._triton_op if triton else self._op)

    def _init_teacher(self, teacher, teacher_momentum):
        self._device_scalars: dict = {}
        self._link = _TeacherLink(teacher, teacher_momentum, self._capturable) if teacher is not None else None
        if self._link is not None:
            self._link.check_params(self.param_groups)

    def _device_scalar(self, key, device, value=None) -> torch.Tensor:
        # capturable: a float32 0-dim tensor per (purpose, device), kept so its address is stable
        t = self._device_scalars.get((key, device))
        if t is None:
            t = self._device_scalars[(key, device)] = torch.zeros((), dtype=torch.float32, device=device)
        if value is not None:
            t.fill_(value)
        return t

    def _lr_tensor(self, group, device) -> torch.Tensor:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):  # a tensor lr: schedulers write it in place
            return lr.to(device=device, dtype=torch.float32)
        return self._device_scalar(("lr", id(group)), device, float(lr))

    def _teacher_momentum_tensor(self, m, device) -> torch.Tensor:
        if isinstance(m, torch.Tensor):
            return m.to(device=device)
        return self._device_scalar("no teacher", device, 0.0)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        if getattr(self, "_resolved", None) is not None:
            self._resolve_params(self.param_groups[-1:])
        if getattr(self, "_link", None) is not None:
            self._link.check_params(self.param_groups[-1:])

    def _momentum_buffers(self, params):
        """(each param's 'momentum_buffer', 1 where it is new: the kernel sets it to the first
        update, as torch.optim.SGD does)."""
        bufs, first = [], []
        for p in params:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            first.append(int(buf is None))
            if buf is None:
                buf = state["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format)
            bufs.append(buf)
        return bufs, first

    def _grads(self, group):
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if p.device.type not in ("cpu", "cuda"):
                raise NotImplementedError(f"eman_fused.optim.{type(self).__name__} has CPU and CUDA kernels; "
                                          f"got a param on {p.device}")
            self._backend_for(p.device)
            params.append(p)
            grads.append(p.grad)
        return params, grads

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        link = self._link
        m = link.momentum() if link is not None else 0.0  # capturable: a device tensor
        fused_ids: set[int] = set()
        for group in self.param_groups:
            params, grads = self._grads(group)
            if not params:
                continue
            # One kernel call per (device, param dtype, teacher dtype): params whose teacher
            # tensor the kernel can update go with it; the rest (all, without a teacher) without.
            by_id = {id(p): g for p, g in zip(params, grads)}
            inside, outside = link.split(params) if link is not None else ([], params)
            calls = [(p, t) for p, t in zip(inside, link.teacher_for(inside))] if inside else []
            calls += [(p, None) for p in outside]
            kinds = {}
            for p, t in calls:
                kinds.setdefault((p.device, p.dtype, None if t is None else t.dtype), []).append((p, t))
            for part in kinds.values():
                ps = [p for p, _ in part]
                ts = [t for _, t in part if t is not None]
                self._step_group(group, ps, [by_id[id(p)] for p in ps], ts, m)
                if ts:
                    fused_ids.update(id(p) for p in ps)
        if link is not None:
            link.finish(fused_ids, m)
        return loss


class SGD(_FusedStep, torch.optim.SGD):
    """torch.optim.SGD whose step also updates `teacher` (an EMATeacher of the model these params
    belong to) from the new params, in the same pass. `teacher_momentum`: a float or schedule
    (default: the teacher's own). foreach/fused/differentiable are not supported.

    capturable=True: lr (a 0-dim tensor to schedule it under a CUDA graph) and the teacher's
    momentum (the teacher must be capturable too) are device scalars read by the kernel.
    backend: 'auto' (CPU params: C++; CUDA params: CUDA C++, else Triton), 'cpu', 'cuda' or
    'triton' (not with capturable=True)."""

    _op, _triton_op = "sgd_ema_step_", "sgd_ema_step_triton_"

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 teacher: EMATeacher | None = None, teacher_momentum=None, capturable: bool = False,
                 backend: str = "auto"):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        self._capturable = capturable
        self._init_backend(backend)
        self._init_teacher(teacher, teacher_momentum)

    def _step_group(self, group, params, grads, teacher, m):
        bufs, first = self._momentum_buffers(params) if group["momentum"] != 0 else ([], [])
        hyper = (float(group["momentum"]), float(group["dampening"]), bool(group["nesterov"]),
                 float(group["weight_decay"]), bool(group["maximize"]))
        if self._capturable:
            device = params[0].device
            torch.ops.eman_fused.sgd_ema_step_.capturable(
                params, grads, bufs, teacher, first, self._lr_tensor(group, device), *hyper,
                self._teacher_momentum_tensor(m, device))
        else:
            self._step_op(params[0].device)(params, grads, bufs, teacher, first, float(group["lr"]),
                                            *hyper, float(m))


class AdamW(_FusedStep, torch.optim.AdamW):
    """torch.optim.AdamW whose step also updates `teacher` from the new params, in the same pass.
    amsgrad and maximize supported; foreach/fused/differentiable are not.

    capturable=True: step counts on the params' device, lr (give a 0-dim tensor to schedule it
    under a CUDA graph) and the teacher's momentum (the teacher must be capturable too) read by
    the kernel, which computes the bias corrections itself: no host value per step.
    backend: as for SGD."""

    _op, _triton_op = "adamw_ema_step_", "adamw_ema_step_triton_"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 teacher: EMATeacher | None = None, teacher_momentum=None, capturable: bool = False,
                 backend: str = "auto"):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, capturable=capturable)
        self._capturable = capturable
        self._init_backend(backend)
        self._init_teacher(teacher, teacher_momentum)

    def _step_group(self, group, params, grads, teacher, m):
        beta1, beta2 = group["betas"]
        exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], []
        for p in params:
            state = self.state[p]
            if len(state) == 0:  # capturable: the step count lives on the param's device
                state["step"] = torch.zeros((), dtype=torch.float32,
                                            device=p.device if self._capturable else None)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_sqs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
        torch._foreach_add_(steps, 1.0)
        if self._capturable:  # bias corrections computed by the kernel from the step tensors
            device = params[0].device
            torch.ops.eman_fused.adamw_ema_step_.capturable(
                params, grads, exp_avgs, exp_avg_sqs, max_sqs, teacher,
                [st.to(device) for st in steps], self._lr_tensor(group, device), float(beta1),
                float(beta2), float(group["eps"]), float(group["weight_decay"]),
                bool(group["amsgrad"]), bool(group["maximize"]), self._teacher_momentum_tensor(m, device))
            return
        lr = float(group["lr"])
        step_sizes, bc2_sqrts = [], []
        for k in torch.stack(steps).tolist():
            step_sizes.append(lr / (1 - beta1 ** k))
            bc2_sqrts.append(math.sqrt(1 - beta2 ** k))
        self._step_op(params[0].device)(
            params, grads, exp_avgs, exp_avg_sqs, max_sqs, teacher, step_sizes, bc2_sqrts, lr,
            float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]),
            bool(group["amsgrad"]), bool(group["maximize"]), float(m))


class LARS(_FusedStep, torch.optim.Optimizer):
    """LARS as BYOL and SimCLR use it: for each param p with gradient g,
    d = g + weight_decay·p, scaled by the trust ratio trust_coefficient·|p|/|d| (1 if either
    norm is 0); buf = momentum·buf + d; p -= lr·buf. Params for which `exclude(p)` is true
    (default: 1-D params, i.e. biases and BatchNorm weights) get neither weight decay nor the
    trust ratio: plain momentum SGD. A group may set its own `exclude`. With `teacher=`, the
    teacher's copy of each param is updated in the same pass.

    Two passes per step (documented cost): per-tensor norms of p and d, then the update.
    capturable=True: lr (a 0-dim tensor to schedule it) and the teacher's momentum (the teacher
    must be capturable too) are device scalars read by the kernels, as for SGD.
    backend: as for SGD (Triton: two launches, as the two passes).
    """

    _op, _triton_op = "lars_ema_step_", "lars_ema_step_triton_"

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, *, maximize: bool = False, exclude=None,
                 teacher: EMATeacher | None = None, teacher_momentum=None, capturable: bool = False,
                 backend: str = "auto"):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient < 0:
            raise ValueError("lr, momentum, weight_decay and trust_coefficient must be >= 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, maximize=maximize,
                        exclude=exclude if exclude is not None else _one_dim)
        super().__init__(params, defaults)
        self._capturable = capturable
        self._init_backend(backend)
        self._init_teacher(teacher, teacher_momentum)

    def _step_group(self, group, params, grads, teacher, m):
        bufs, first = self._momentum_buffers(params)
        adapt = [int(not group["exclude"](p)) for p in params]
        hyper = (float(group["momentum"]), float(group["weight_decay"]),
                 float(group["trust_coefficient"]), bool(group["maximize"]))
        if self._capturable:
            device = params[0].device
            torch.ops.eman_fused.lars_ema_step_.capturable(
                params, grads, bufs, teacher, adapt, first, self._lr_tensor(group, device), *hyper,
                self._teacher_momentum_tensor(m, device))
        else:
            self._step_op(params[0].device)(params, grads, bufs, teacher, adapt, first,
                                            float(group["lr"]), *hyper, float(m))


def _one_dim(p: torch.Tensor) -> bool:
    return p.ndim <= 1
