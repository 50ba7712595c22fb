"""eman_fused: fused EMA teacher updates and EMAN normalization for PyTorch.

Public names: ema_update_, FusedEMA, backends, reference.
"""
from . import _backends, reference
from ._backends import Backend, backends
from .ema import FusedEMA
from .ops import ema_update_

if _backends._AVAILABLE["triton"]:  # register the Triton ops now, not inside a traced step
    from .triton import ema as _triton_ema  # noqa: F401

__all__ = ["Backend", "FusedEMA", "backends", "ema_update_", "reference"]
__version__ = "0.1.0"
