"""EMAN BatchNorm modules: normalize with the running statistics always (train and eval), never
update them (the EMA teacher update does), state_dict-compatible with nn.BatchNorm*d."""
from __future__ import annotations

import torch
from torch import nn

from .ops.norm import NORM_BACKENDS, eman_norm

__all__ = ["EMANBatchNorm", "EMANBatchNorm1d", "EMANBatchNorm2d", "EMANBatchNorm3d",
           "convert_to_eman"]

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class EMANBatchNorm(nn.modules.batchnorm._NormBase):
    """BatchNorm that always uses running_mean / running_var: y = act(x*scale + shift [+ residual]).

    Same parameters and buffers as nn.BatchNorm*d (weight, bias, running_mean, running_var,
    num_batches_tracked), so state_dicts move both ways. `relu=True` fuses a following ReLU;
    `forward(x, residual)` fuses a residual add before it. Statistics that are not float32
    (a model cast to bf16) are read as float32. `backend` is eman_norm's: 'auto' (CPU: C++,
    CUDA: CUDA C++, else Triton), 'cpu', 'cuda', 'triton' or 'reference' (eager).
    """

    _dims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, relu: bool = False, backend: str = "auto"):
        if not track_running_stats:
            raise ValueError("EMAN normalizes with running statistics: track_running_stats must be True")
        if backend not in ("auto", *NORM_BACKENDS):
            raise ValueError(f"backend must be 'auto' or one of {NORM_BACKENDS}, got {backend!r}")
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
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
    def from_batchnorm(cls, bn: nn.Module, *, relu: bool = False, backend: str = "auto") -> "EMANBatchNorm":
        """An EMAN module with `bn`'s configuration, parameters and buffers (values copied)."""
        if not isinstance(bn, (*_BATCHNORMS, EMANBatchNorm)):
            raise TypeError(f"expected a BatchNorm module, got {type(bn).__name__}")
        if not bn.track_running_stats or bn.running_mean is None:
            raise ValueError("EMAN needs running statistics; this BatchNorm does not track them")
        ref = bn.running_mean
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, device=ref.device, dtype=ref.dtype,
                  relu=relu, backend=backend)
        new.load_state_dict(bn.state_dict())
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


_EMAN_FOR = {nn.BatchNorm1d: EMANBatchNorm1d, nn.BatchNorm2d: EMANBatchNorm2d,
             nn.BatchNorm3d: EMANBatchNorm3d, nn.SyncBatchNorm: EMANBatchNorm}


def convert_to_eman(model: nn.Module, *, fuse_relu: bool = False, backend: str = "auto") -> nn.Module:
    """Swap every nn.BatchNorm1d/2d/3d and SyncBatchNorm of `model` (in place, values kept) for
    its EMAN counterpart; returns `model`.

    fuse_relu: within an nn.Sequential, a BatchNorm directly followed by nn.ReLU becomes one
    EMAN module with relu=True and the ReLU becomes nn.Identity (parameter names unchanged).
    That is the only pattern fused: a ReLU applied in a forward() (torchvision's blocks), or a
    residual add, is not rewritten; use EMANBatchNorm(..., relu=True) and forward(x, residual)
    in your own blocks for those.
    """
    for name, child in list(model.named_children()):
        if type(child) in _EMAN_FOR:
            setattr(model, name, _EMAN_FOR[type(child)].from_batchnorm(child, backend=backend))
        else:
            convert_to_eman(child, fuse_relu=fuse_relu, backend=backend)
    if fuse_relu and isinstance(model, nn.Sequential):
        names = list(model._modules)
        for first, second in zip(names, names[1:]):
            bn, act = model._modules[first], model._modules[second]
            if isinstance(bn, EMANBatchNorm) and not bn.relu and type(act) is nn.ReLU:
                bn.relu = True
                model._modules[second] = nn.Identity()
    return model
