"""eman_fused: fused EMA teacher updates and EMAN normalization for PyTorch.

Public names: EMATeacher, ema_update_, FusedEMA, eman_norm, backends, reference; nn (EMAN modules),
schedules (momentum schedules), optim (optimizers with the teacher update fused in).
"""
from . import _backends, nn, optim, reference, schedules
from ._backends import Backend, backends
from .ema import FusedEMA
from .norm import eman_norm
from .ops import ema_update_
from .teacher import EMATeacher, StructureMismatchError

if _backends._AVAILABLE["triton"]:  # register the Triton ops now, not inside a traced step
    from .triton import ema as _triton_ema  # noqa: F401

__all__ = ["Backend", "EMATeacher", "FusedEMA", "StructureMismatchError", "backends", "ema_update_",
           "eman_norm", "nn", "optim", "reference", "schedules"]
__version__ = "0.1.0"
