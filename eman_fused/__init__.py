"""eman_fused: fused EMA teacher updates and EMAN normalization for PyTorch.

Public names: ema_update_, FusedEMA, eman_norm, backends, reference; nn (EMAN modules).
"""
from . import _backends, nn, reference
from ._backends import Backend, backends
from .ema import FusedEMA
from .norm import eman_norm
from .ops import ema_update_

if _backends._AVAILABLE["triton"]:  # register the Triton ops now, not inside a traced step
    from .triton import ema as _triton_ema  # noqa: F401

__all__ = ["Backend", "FusedEMA", "backends", "ema_update_", "eman_norm", "nn", "reference"]
__version__ = "0.1.0"
