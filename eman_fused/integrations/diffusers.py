"""diffusers' EMAModel (diffusers.training_utils.EMAModel, as of diffusers 0.42.1) with its API and
semantics, whose `step()` is one fused `eman_fused.ema_update_` call over every parameter that
requires grad instead of a Python loop (or a chain of foreach ops) over them.

    from eman_fused.integrations.diffusers import EMAModel
    ema = EMAModel(unet.parameters(), decay=0.9999, model_cls=UNet2DModel, model_config=unet.config)
    ...; optimizer.step(); ema.step(unet.parameters())

Importing this module does not import diffusers: only `save_pretrained`, `from_pretrained` and a
`model_cls=` need it (`pip install 'eman_fused[diffusers]'`).
"""
from __future__ import annotations

import copy
import numbers
import warnings
from typing import Any, Iterable

import torch
from torch import nn

from ..ops.ema import ema_plan, ema_update_
from ..teacher import _dense, _same_layout

__all__ = ["EMAModel"]

# The float dtypes the fused kernels read and write (either side of a pair).
_KERNEL_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# What diffusers' EMAModel.state_dict() holds, in its order: a state_dict of either class loads
# into the other.
_STATE_KEYS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup",
               "inv_gamma", "power", "shadow_params")


def _require_diffusers(what: str):
    try:
        import diffusers
    except ImportError as err:
        raise ModuleNotFoundError(
            f"eman_fused.integrations.diffusers.EMAModel.{what} needs the 'diffusers' package, which is "
            "not installed: pip install 'eman_fused[diffusers]' (or pip install diffusers)") from err
    return diffusers


def _deprecated(message: str, stacklevel: int) -> None:
    # diffusers warns with FutureWarning for the same deprecated call forms; ours does too, so a
    # script moved over keeps its warnings. stacklevel points at the user's call.
    warnings.warn(message, FutureWarning, stacklevel=stacklevel + 1)


def _as_parameters(parameters, where: str, stacklevel: int) -> list:
    if isinstance(parameters, nn.Module):
        _deprecated(f"Passing a torch.nn.Module to EMAModel{where} is deprecated (as in diffusers): "
                    "pass module.parameters() instead.", stacklevel + 1)
        parameters = parameters.parameters()
    return list(parameters)


def _refuse_zero3(params: list) -> None:
    # diffusers gathers DeepSpeed ZeRO-3 partitioned params around each update (through
    # transformers' integration); a partitioned param is an empty placeholder here, and a fused
    # update over placeholders would silently average nothing.
    if params and hasattr(params[0], "ds_id"):
        raise NotImplementedError("EMAModel: DeepSpeed ZeRO-3 partitioned parameters are not supported by the "
                                  "fused update; use diffusers.training_utils.EMAModel under ZeRO-3")


class EMAModel:
    """An exponential moving average of a model's parameters: diffusers' EMAModel, fused.

    Names and meanings are diffusers' (diffusers.training_utils.EMAModel, 0.42.1):

    | diffusers EMAModel | here |
    |---|---|
    | `EMAModel(parameters, decay, min_decay, update_after_step, use_ema_warmup, inv_gamma, power, foreach, model_cls, model_config, **kwargs)` | the same arguments, defaults and attributes |
    | `EMAModel(module)` (deprecated) | the same: warns, uses `module.parameters()` and turns `use_ema_warmup` on |
    | kwargs `max_value=`, `min_value=`, `device=` (deprecated) | the same: `decay`, `min_decay`, `to(device)`; other kwargs are ignored with a warning |
    | `step(parameters)`: a Python loop (`foreach=False`) or foreach ops (`foreach=True`) | one `ema_update_` call over the params that require grad, plus one call at momentum 0 (a copy) over those that do not, when there are any |
    | `foreach=` | accepted and kept as the attribute `foreach`; changes nothing: `step` is fused, `copy_to` / `restore` are one foreach copy, either way |
    | `get_decay(k)`, `cur_decay_value`, `optimization_step` | the same formula (in double, on the host) and bookkeeping |
    | `copy_to`, `store`, `restore`, `to`, `pin_memory` | the same |
    | `state_dict()` / `load_state_dict(sd)` | the same keys and checks: checkpoints load both ways |
    | `save_pretrained(path)` / `from_pretrained(path, model_cls, foreach=False)` | the same (needs diffusers) |
    | `shadow_params`, `temp_stored_params`, `model_cls`, `model_config` | the same |
    | DeepSpeed ZeRO-3 parameter gathering | not done: `NotImplementedError` for partitioned params |

    Stricter than diffusers, all before any tensor is written: a parameter list whose length
    differs from the shadows' (diffusers' zip would drop the tail silently), a shape, device or
    integer/floating mismatch, a `get_decay` outside [0, 1], complex parameters (the kernels do
    not take them) and a `to(dtype=)` the kernels cannot read raise, naming the parameter's
    index; a rejected `step` leaves `optimization_step` as it was.
    """

    def __init__(self, parameters: Iterable[torch.Tensor] | nn.Module, decay: float = 0.9999,
                 min_decay: float = 0.0, update_after_step: int = 0, use_ema_warmup: bool = False,
                 inv_gamma: float | int = 1.0, power: float | int = 2 / 3, foreach: bool = False,
                 model_cls: Any | None = None, model_config: dict[str, Any] | None = None, **kwargs):
        if isinstance(parameters, nn.Module):
            # diffusers' backward-compatible reading of a module: warm-up on.
            use_ema_warmup = True
        params = _as_parameters(parameters, "()", 2)
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"EMAModel: parameters[{i}] is a {type(p).__name__}, not a tensor")
        _refuse_zero3(params)
        if kwargs.get("max_value") is not None:
            _deprecated("EMAModel(max_value=) is deprecated (as in diffusers): use decay=.", 2)
            decay = kwargs["max_value"]
        if kwargs.get("min_value") is not None:
            _deprecated("EMAModel(min_value=) is deprecated (as in diffusers): use min_decay=.", 2)
            min_decay = kwargs["min_value"]
        unknown = sorted(set(kwargs) - {"max_value", "min_value", "device"})
        if unknown:
            warnings.warn(f"EMAModel: ignoring the keyword arguments {', '.join(unknown)} (diffusers' EMAModel "
                          "ignores them too)", UserWarning, stacklevel=2)
        if model_cls is not None:
            _require_diffusers("model_cls")

        # A detached copy in the parameter's own dtype, device and strides.
        self.shadow_params: list[torch.Tensor] = [p.detach().clone() for p in params]
        if kwargs.get("device") is not None:
            _deprecated("EMAModel(device=) is deprecated (as in diffusers): call ema.to(device).", 2)
            self.to(device=kwargs["device"])
        self.temp_stored_params: list[torch.Tensor] | None = None

        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_ema_warmup = use_ema_warmup
        self.inv_gamma = inv_gamma
        self.power = power
        self.optimization_step = 0
        self.cur_decay_value: float | None = None  # set by step()
        self.foreach = foreach  # kept for compatibility; see the class docstring
        self.model_cls = model_cls
        self.model_config = model_config

    # -- the decay -----------------------------------------------------------------------------
    def get_decay(self, optimization_step: int) -> float:
        """The decay of update number `optimization_step` (1 for the first): 0 (a copy) until
        `update_after_step` updates have passed, then, with j = optimization_step -
        update_after_step - 1, 1 - (1 + j/inv_gamma)^-power with warm-up or (1 + j)/(10 + j)
        without, clamped to [min_decay, decay]. Python floats, as diffusers computes it."""
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_ema_warmup:
            value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            value = (1 + step) / (10 + step)
        return max(min(value, self.decay), self.min_decay)

    # -- the update ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, parameters: Iterable[torch.Tensor] | nn.Module) -> None:
        """shadow <- d*shadow + (1-d)*param for every param that requires grad, shadow <- param
        for the others, with d = get_decay(optimization_step + 1); then optimization_step and
        cur_decay_value advance. Nothing is written (and nothing advances) if it raises."""
        params = _as_parameters(parameters, ".step()", 3)  # under no_grad's wrapper
        shadows = self.shadow_params
        if len(params) != len(shadows):
            raise ValueError(f"EMAModel.step: got {len(params)} parameters, but the EMA holds {len(shadows)} "
                             "shadow params (one per parameter it was built from, in that order)")
        _refuse_zero3(params)
        step = self.optimization_step + 1
        decay = self.get_decay(step)
        if not isinstance(decay, numbers.Real) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMAModel.step: get_decay({step}) = {decay!r} is not in [0, 1] "
                             f"(decay={self.decay!r}, min_decay={self.min_decay!r})")
        decay = float(decay)
        # The fast path hands the lists to the kernels as they are: they validate every pair
        # before writing anything, so a Python check per tensor per step is not needed. Only
        # when they refuse do we look, pair by pair, to name the parameter at fault (or to
        # re-lay out a shadow whose strides differ from its param's, which diffusers accepts).
        lists = _split(shadows, params)
        try:
            _write(lists, decay)
        except (ValueError, TypeError):
            _write(self._checked_lists(params, "step"), decay)
        self.optimization_step = step
        self.cur_decay_value = decay

    def _checked_lists(self, params: list, where: str):
        """Every pair checked, with the parameter's index in the message; shadows whose memory
        layout differs from their param's are replaced by copies in the param's layout (same
        values: the kernels pair elements in memory order), and params the kernels cannot read
        in place (not dense) are staged in the shadow's layout for this call."""
        shadows = self.shadow_params
        relaid: dict[int, torch.Tensor] = {}
        sources: list[torch.Tensor] = []
        for i, (s, p) in enumerate(zip(shadows, params)):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"EMAModel.{where}: parameters[{i}] is a {type(p).__name__}, not a tensor")
            if p.shape != s.shape:
                raise ValueError(f"EMAModel.{where}: parameters[{i}] has shape {tuple(p.shape)}, its shadow "
                                 f"{tuple(s.shape)}: the parameters must be the ones the EMA was built from, "
                                 "in the same order")
            if p.device != s.device:
                raise ValueError(f"EMAModel.{where}: parameters[{i}] is on {p.device}, its shadow on {s.device}: "
                                 "move the EMA with ema.to(device) first")
            if p.is_complex() or s.is_complex():
                raise TypeError(f"EMAModel.{where}: parameters[{i}] ({p.dtype}, shadow {s.dtype}): complex "
                                "tensors are not supported by the fused update")
            if p.is_floating_point() != s.is_floating_point():
                raise TypeError(f"EMAModel.{where}: parameters[{i}] is {p.dtype}, its shadow {s.dtype} "
                                "(floating vs integer)")
            if p.is_floating_point():
                for side, t in (("parameters", p), ("shadow_params", s)):
                    if t.dtype not in _KERNEL_FLOATS:
                        raise TypeError(f"EMAModel.{where}: {side}[{i}] is {t.dtype}; the fused update takes "
                                        "float32, bfloat16, float16 and float64")
            elif p.dtype != s.dtype:
                raise TypeError(f"EMAModel.{where}: parameters[{i}] is {p.dtype}, its shadow {s.dtype} "
                                "(integer dtypes must match)")
            if not _dense(s) or (_dense(p) and not _same_layout(s, p)):
                layout = p if _dense(p) else s.contiguous()
                s = torch.empty_like(layout, dtype=s.dtype, device=s.device).copy_(s)
                relaid[i] = s
            sources.append(p if _dense(p) and _same_layout(s, p) else torch.empty_like(s, dtype=p.dtype).copy_(p))
        # Only now that every pair passed: the re-laid-out shadows replace the old ones.
        for i, s in relaid.items():
            shadows[i] = s
        return _split(shadows, params, sources)

    # -- copies in and out ---------------------------------------------------------------------
    def _check_pairs(self, where: str, ours: list, params: list, what: str) -> None:
        if len(params) != len(ours):
            raise ValueError(f"EMAModel.{where}: got {len(params)} parameters, but {len(ours)} {what}")
        for i, (o, p) in enumerate(zip(ours, params)):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"EMAModel.{where}: parameters[{i}] is a {type(p).__name__}, not a tensor")
            if p.shape != o.shape:
                # copy_ would broadcast a smaller tensor silently
                raise ValueError(f"EMAModel.{where}: parameters[{i}] has shape {tuple(p.shape)}, the "
                                 f"{what} {tuple(o.shape)}")

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.Tensor]) -> None:
        """Write the moving averages into `parameters` (cast to their dtypes, moved to their
        devices), through `.data` as diffusers does, so autograd's version counters are untouched."""
        params = list(parameters)
        self._check_pairs("copy_to", self.shadow_params, params, "shadow params")
        _copy([p.data for p in params], self.shadow_params)

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Keep a CPU copy of `parameters`, for `restore()` after evaluating with `copy_to()`."""
        self.temp_stored_params = [p.detach().cpu().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Write the copies `store()` kept back into `parameters`, then drop them."""
        if self.temp_stored_params is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to `restore()`")
        params = list(parameters)
        self._check_pairs("restore", self.temp_stored_params, params, "stored tensors")
        _copy([p.data for p in params], self.temp_stored_params)
        self.temp_stored_params = None

    # -- where the shadows live ----------------------------------------------------------------
    def to(self, device=None, dtype=None, non_blocking: bool = False) -> None:
        """Move the shadows to `device` and cast the floating ones to `dtype` (integer shadows
        keep theirs), as diffusers does."""
        if dtype is not None and dtype not in _KERNEL_FLOATS:
            raise ValueError(f"EMAModel.to: dtype {dtype} cannot hold a shadow the fused update reads; "
                             "use float32, bfloat16, float16 or float64")
        self.shadow_params = [
            s.to(device=device, dtype=dtype, non_blocking=non_blocking) if s.is_floating_point()
            else s.to(device=device, non_blocking=non_blocking)
            for s in self.shadow_params]

    def pin_memory(self) -> None:
        """Move the shadows to pinned host memory (for non-blocking copies to an accelerator).
        Pinning needs an accelerator runtime: without one this raises RuntimeError, as
        diffusers' does (torch refuses), and the shadows stay as they were."""
        try:
            pinned = [s.pin_memory() for s in self.shadow_params]
        except RuntimeError as err:
            raise RuntimeError(f"EMAModel.pin_memory: torch cannot pin the shadows here ({err}); pinned "
                               "memory needs CPU shadows and an accelerator runtime (e.g. a CUDA driver)") from err
        self.shadow_params = pinned

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """diffusers' keys; `shadow_params` is the list itself (references, as torch's
        state_dicts hold), so copy it before changing it."""
        return {"decay": self.decay, "min_decay": self.min_decay, "optimization_step": self.optimization_step,
                "update_after_step": self.update_after_step, "use_ema_warmup": self.use_ema_warmup,
                "inv_gamma": self.inv_gamma, "power": self.power, "shadow_params": self.shadow_params}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict of this class or of diffusers' EMAModel (a deep copy of it). Missing
        keys keep their current values; the values are checked as diffusers checks them, all
        before anything is assigned."""
        state = copy.deepcopy(state_dict)
        new = {key: state.get(key, getattr(self, key)) for key in _STATE_KEYS[:-1]}
        if not 0.0 <= new["decay"] <= 1.0:
            raise ValueError("Decay must be between 0 and 1")
        checks = (("min_decay", float), ("optimization_step", int), ("update_after_step", int),
                  ("use_ema_warmup", bool), ("inv_gamma", (float, int)), ("power", (float, int)))
        for key, kind in checks:
            if not isinstance(new[key], kind):
                raise ValueError(f"Invalid {key}")
        shadows = state.get("shadow_params")
        if shadows is not None:
            if not isinstance(shadows, list):
                raise ValueError("shadow_params must be a list")
            if not all(isinstance(s, torch.Tensor) for s in shadows):
                raise ValueError("shadow_params must all be Tensors")
            new["shadow_params"] = shadows
        for key, value in new.items():
            setattr(self, key, value)

    def save_pretrained(self, path) -> None:
        """Save a `model_cls` model holding the averaged weights, with the EMA's settings and
        progress in its config (what `from_pretrained` reads back)."""
        _require_diffusers("save_pretrained")
        if self.model_cls is None:
            raise ValueError("`save_pretrained` can only be used if `model_cls` was defined at __init__.")
        if self.model_config is None:
            raise ValueError("`save_pretrained` can only be used if `model_config` was defined at __init__.")
        model = self.model_cls.from_config(self.model_config)
        settings = {k: v for k, v in self.state_dict().items() if k != "shadow_params"}
        model.register_to_config(**settings)
        self.copy_to(model.parameters())
        model.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path, model_cls, foreach: bool = False) -> "EMAModel":
        """An EMAModel from a directory `save_pretrained` (ours or diffusers') wrote: the shadows
        are the saved model's parameters, the settings and progress come from its config."""
        _require_diffusers("from_pretrained")
        # The config entries the model's constructor does not take are the EMA's (diffusers
        # passes the path to from_config, a deprecated form of these two calls).
        _, ema_settings = model_cls.from_config(model_cls.load_config(path), return_unused_kwargs=True)
        model = model_cls.from_pretrained(path)
        ema = cls(model.parameters(), model_cls=model_cls, model_config=model.config, foreach=foreach)
        ema.load_state_dict(ema_settings)
        return ema


def _split(shadows: list, params: list, sources: list | None = None):
    """(EMA'd shadows, their sources, copied shadows, their sources): a param that requires
    grad is averaged, any other is copied, as diffusers does."""
    sources = params if sources is None else sources
    ema_t, ema_s, copy_t, copy_s = [], [], [], []
    for s, p, src in zip(shadows, params, sources):
        if p.requires_grad:
            ema_t.append(s)
            ema_s.append(src)
        else:
            copy_t.append(s)
            copy_s.append(src)
    return ema_t, ema_s, copy_t, copy_s


def _write(lists, decay: float) -> None:
    # Two calls at most: the averaged params at momentum `decay`, then the copied ones at
    # momentum 0 (the kernels' exact copy, a NaN or inf shadow replaced too). The copy call's
    # lists are validated (ema_plan, no write) before the first call writes, so the step is all
    # or nothing; a model whose params all require grad (the usual case) is one call.
    ema_t, ema_s, copy_t, copy_s = lists
    if copy_t:
        ema_plan(copy_t, copy_s)
    if ema_t:
        ema_update_(ema_t, ema_s, decay)
    if copy_t:
        ema_update_(copy_t, copy_s, 0.0)


def _copy(dst: list, src: list) -> None:
    # One foreach copy, as diffusers' foreach path does; sources on another device are moved first.
    if dst:
        torch._foreach_copy_(dst, [s.to(d.device) if s.device != d.device else s for d, s in zip(dst, src)])
