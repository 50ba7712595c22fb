"""EMAN BatchNorm modules: normalize with the running statistics always (train and eval), never
update them (the EMA teacher update does), state_dict-compatible with nn.BatchNorm*d.

`convert_to_eman` swaps every BatchNorm of a model for its EMAN counterpart through a small
registry of conversions (`register_conversion`): torch's BatchNorm1d/2d/3d and SyncBatchNorm,
timm's BatchNormAct2d / SyncBatchNormAct (their drop and act kept), and any subclass of those
(converted as its base class, with a warning naming it, since its own forward() is not kept).
"""
from __future__ import annotations

import inspect
import warnings
from typing import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase, _NormBase

from .ops.norm import NORM_BACKENDS, eman_norm

__all__ = ["EMANBatchNorm", "EMANBatchNorm1d", "EMANBatchNorm2d", "EMANBatchNorm3d",
           "EMANBatchNormAct", "convert_to_eman", "register_conversion"]

# torch 2.14's BatchNorms take bias=False (a weight without a bias); older ones do not.
_NORM_HAS_BIAS_ARG = "bias" in inspect.signature(_NormBase.__init__).parameters


class EMANBatchNorm(_NormBase):
    """BatchNorm that always uses running_mean / running_var: y = act(x*scale + shift [+ residual]).

    Same parameters and buffers as nn.BatchNorm*d (weight, bias, running_mean, running_var,
    num_batches_tracked), so state_dicts move both ways. `relu=True` fuses a following ReLU;
    `forward(x, residual)` fuses a residual add before it. Statistics that are not float32
    (a model cast to bf16) are read as float32. `bias=False` (a weight without a bias) and
    `affine=False` are supported; `eps` may be 0, as in torch. `backend` is eman_norm's:
    'auto' (CPU: C++, CUDA: CUDA C++, else Triton), 'cpu', 'cuda', 'triton' or 'reference'.
    """

    _dims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True, relu: bool = False, backend: str = "auto"):
        if not track_running_stats:
            raise ValueError("EMAN normalizes with running statistics: track_running_stats must be True")
        if backend not in ("auto", *NORM_BACKENDS):
            raise ValueError(f"backend must be 'auto' or one of {NORM_BACKENDS}, got {backend!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        extra = {"bias": bias} if _NORM_HAS_BIAS_ARG else {}
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, **extra)
        if affine and not bias and self.bias is not None:  # a torch without the bias argument
            self.register_parameter("bias", None)
        self.relu = relu
        self.backend = backend

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in self._dims:
            raise ValueError(f"{type(self).__name__} expects {' or '.join(map(str, self._dims))}-D "
                             f"input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input_dim(x)
        stats = torch.float64 if x.dtype == torch.float64 else torch.float32
        args = [t if t is None or t.dtype == stats else t.to(stats)
                for t in (self.running_mean, self.running_var, self.weight, self.bias)]
        return eman_norm(x, *args, eps=self.eps, residual=residual, relu=self.relu, backend=self.backend)

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, *, relu: bool = False, backend: str = "auto",
                       **kwargs) -> "EMANBatchNorm":
        """An EMAN module with `bn`'s configuration and a copy of its own parameters and buffers
        (dtypes and devices kept; submodules such as timm's act/drop are not copied)."""
        if not isinstance(bn, (_NormBase, EMANBatchNorm)):
            raise TypeError(f"expected a BatchNorm module, got {type(bn).__name__}")
        if isinstance(bn, _LazyNormBase) and bn.has_uninitialized_params():
            raise ValueError(f"{type(bn).__name__} has not been materialized yet: run one forward "
                             "pass first, so that it knows its number of features")
        if not bn.track_running_stats or bn.running_mean is None:
            raise ValueError("EMAN needs running statistics; this BatchNorm does not track them")
        has_bias = bn.bias is not None
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, device="meta",
                  bias=has_bias or not bn.affine, relu=relu, backend=backend, **kwargs)
        own = {**{k: v for k, v in bn._parameters.items() if v is not None},
               **{k: v for k, v in bn._buffers.items() if v is not None}}
        state = {k: v.detach().clone() for k, v in own.items()}
        if "num_batches_tracked" not in state:
            state["num_batches_tracked"] = torch.zeros((), dtype=torch.long, device=bn.running_mean.device)
        missing = new.load_state_dict(state, strict=False, assign=True).missing_keys
        if any("." not in k for k in missing):  # only submodules given to the constructor may be
            raise ValueError(f"cannot convert {type(bn).__name__}: no value for {missing}")
        for name in ("weight", "bias"):  # assign keeps our frozen/trainable flags as bn had them
            p = getattr(new, name)
            if p is not None and getattr(bn, name) is not None:
                p.requires_grad_(getattr(bn, name).requires_grad)
        new.train(bn.training)
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")


class EMANBatchNorm1d(EMANBatchNorm):
    _dims = (2, 3)


class EMANBatchNorm2d(EMANBatchNorm):
    _dims = (4,)


class EMANBatchNorm3d(EMANBatchNorm):
    _dims = (5,)


class EMANBatchNormAct(EMANBatchNorm):
    """EMAN normalization followed by `drop` and `act` submodules (timm's BatchNormAct2d layout:
    act(drop(norm(x)))), with the original's submodule names, so state_dicts match."""

    def __init__(self, num_features: int, *args, drop: nn.Module | None = None,
                 act: nn.Module | None = None, dims: tuple[int, ...] = (2, 3, 4, 5), **kwargs):
        super().__init__(num_features, *args, **kwargs)
        self._dims = tuple(dims)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.act(self.drop(super().forward(x, residual)))


# -- conversions ---------------------------------------------------------------------------
# class (or "module.QualName" for classes of optional packages, so they are never imported
# here) -> fn(module, backend) -> the EMAN module, or the module itself to keep it.
Conversion = Callable[[nn.Module, str], nn.Module]
_CONVERSIONS: dict[type | str, Conversion] = {}
_BUILTIN: set[type | str] = set()
_warned: set[type] = set()


def register_conversion(cls: type | str, fn: Conversion) -> None:
    """Make `convert_to_eman` (and so `EMATeacher(eman=True)`) turn modules of class `cls` (or
    of a subclass without its own entry) into `fn(module, backend)`. `cls` may be a class or its
    "package.module.QualName" (to name a class of a package you do not want to import). `fn`
    returns the replacement (e.g. `EMANBatchNorm2d.from_batchnorm(module, backend=backend)`),
    or `module` itself to leave it as it is. A later registration for the same class wins."""
    if not (isinstance(cls, type) or (isinstance(cls, str) and "." in cls)):
        raise TypeError(f"cls must be a class or a 'module.QualName' string, got {cls!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    _CONVERSIONS[cls] = fn
    _BUILTIN.discard(cls)


def _lookup(module: nn.Module) -> tuple[type | None, type | str | None, Conversion | None]:
    """(the class in module's MRO that has a conversion, its registry key, the conversion)."""
    for klass in type(module).__mro__:
        for key in (klass, f"{klass.__module__}.{klass.__qualname__}"):
            fn = _CONVERSIONS.get(key)
            if fn is not None:
                return klass, key, fn
    return None, None, None


def _plain(target: type[EMANBatchNorm]) -> Conversion:
    def convert(bn, backend):
        return target.from_batchnorm(bn, backend=backend)
    return convert


def _timm_norm_act(dims: tuple[int, ...], fused_cls: type[EMANBatchNorm]) -> Conversion:
    # timm's BatchNormAct2d / SyncBatchNormAct: y = act(drop(bn(x))). A plain ReLU (no drop)
    # fuses into the kernel; any other act / drop runs after the EMAN normalization.
    def convert(bn, backend):
        # SyncBatchNormAct gets its drop / act set by timm's convert_sync_batchnorm, or has none
        drop, act = getattr(bn, "drop", None) or nn.Identity(), getattr(bn, "act", None) or nn.Identity()
        if type(drop) is nn.Identity and type(act) in (nn.ReLU, nn.Identity):
            return fused_cls.from_batchnorm(bn, relu=type(act) is nn.ReLU, backend=backend)
        return EMANBatchNormAct.from_batchnorm(bn, backend=backend, drop=drop, act=act, dims=dims)
    return convert


for _cls, _target in ((nn.BatchNorm1d, EMANBatchNorm1d), (nn.BatchNorm2d, EMANBatchNorm2d),
                      (nn.BatchNorm3d, EMANBatchNorm3d), (nn.SyncBatchNorm, EMANBatchNorm),
                      (_BatchNorm, EMANBatchNorm)):
    register_conversion(_cls, _plain(_target))
register_conversion("timm.layers.norm_act.BatchNormAct2d", _timm_norm_act((4,), EMANBatchNorm2d))
register_conversion("timm.layers.norm_act.SyncBatchNormAct", _timm_norm_act((2, 3, 4, 5), EMANBatchNorm))
_BUILTIN.update(_CONVERSIONS)
del _cls, _target


def _convert_one(path: str, child: nn.Module, backend: str, untracked: str) -> nn.Module | None:
    """The replacement of `child`, or None when it is not a module to convert."""
    if isinstance(child, EMANBatchNorm):
        return None
    klass, key, fn = _lookup(child)
    if fn is None:
        return None
    if isinstance(child, _LazyNormBase) and child.has_uninitialized_params():
        raise ValueError(f"'{path}' is a {type(child).__name__} that has not been materialized: run one "
                         "forward pass of the student before building its EMAN teacher")
    if isinstance(child, _NormBase) and not child.track_running_stats:
        if untracked == "keep":
            return None
        raise ValueError(f"'{path}' ({type(child).__name__}) has track_running_stats=False: it has no "
                         "running statistics for EMAN to normalize with and to average. Pass "
                         "untracked_bn='keep' to leave such layers normalizing with batch statistics")
    if key in _BUILTIN and type(child) is not klass and type(child) not in _warned:
        _warned.add(type(child))
        warnings.warn(f"eman_fused: {type(child).__module__}.{type(child).__qualname__} is a "
                      f"{klass.__name__} subclass without a registered conversion; it is converted "
                      f"as a {klass.__name__} (running statistics, as in eval mode), and anything its "
                      "own forward() adds is dropped. Register one with "
                      "eman_fused.nn.register_conversion(cls, fn) to change this.", stacklevel=4)
    return fn(child, backend)


def convert_to_eman(model: nn.Module, *, fuse_relu: bool = False, backend: str = "auto",
                    untracked_bn: str = "error") -> nn.Module:
    """Swap every BatchNorm of `model` (in place, values kept) for its EMAN counterpart; returns
    `model` (or its replacement, when `model` itself is a BatchNorm).

    Conversions come from `register_conversion`: torch's BatchNorm1d/2d/3d / SyncBatchNorm
    (LazyBatchNorm once materialized), timm's BatchNormAct2d / SyncBatchNormAct (a ReLU act
    fused, any other act and drop kept after the normalization), and subclasses of those
    (converted as the base class, with a warning once per class). A BatchNorm with
    track_running_stats=False raises (it has no statistics), unless untracked_bn='keep' leaves it.

    fuse_relu: within an nn.Sequential, a BatchNorm directly followed by nn.ReLU becomes one
    EMAN module with relu=True and the ReLU becomes nn.Identity (parameter names unchanged).
    That is the only pattern fused: a ReLU applied in a forward() (torchvision's blocks), or a
    residual add, is not rewritten; use EMANBatchNorm(..., relu=True) and forward(x, residual)
    in your own blocks for those.
    """
    if untracked_bn not in ("error", "keep"):
        raise ValueError(f"untracked_bn must be 'error' or 'keep', got {untracked_bn!r}")
    if backend not in ("auto", *NORM_BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {NORM_BACKENDS}, got {backend!r}")
    root = _convert_one(type(model).__name__, model, backend, untracked_bn)
    if root is not None:
        return root
    _convert_children(model, "", fuse_relu, backend, untracked_bn)
    return model


def _convert_children(model: nn.Module, prefix: str, fuse_relu: bool, backend: str, untracked: str) -> None:
    for name, child in list(model.named_children()):
        new = _convert_one(prefix + name, child, backend, untracked)
        if new is not None and new is not child:
            setattr(model, name, new)
        elif new is None:
            _convert_children(child, f"{prefix}{name}.", fuse_relu, backend, untracked)
    if fuse_relu and isinstance(model, nn.Sequential):
        names = list(model._modules)
        for first, second in zip(names, names[1:]):
            bn, act = model._modules[first], model._modules[second]
            if type(bn) in (EMANBatchNorm, EMANBatchNorm1d, EMANBatchNorm2d, EMANBatchNorm3d) \
                    and not bn.relu and type(act) is nn.ReLU:
                bn.relu = True
                model._modules[second] = nn.Identity()
