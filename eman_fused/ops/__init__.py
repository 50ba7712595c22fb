"""Every eman_fused op, one module each: its Python wrapper, fake kernel and autograd beside it,
and its Triton twin (eman_fused/triton/) registered here, at package import, so that no op is
first registered inside a traced step.

  ema.py    ema_update_ and FusedEMA          (C++: csrc/ema/)
  norm.py   eman_norm, forward and backward  (C++: csrc/norm/)
  optim.py  the fused optimizer steps' ops   (C++: csrc/optim/; classes: eman_fused.optim)
  posthoc.py posthoc_ema_update_, K EDM2 profiles in one pass (C++: csrc/posthoc/;
            class: eman_fused.posthoc.PostHocEMA)
  layout.py the table layouts, read from the C++ structs
"""
from .. import _backends
from . import ema, layout, norm, optim, posthoc  # noqa: F401  (registers fake kernels and autograd)
from .ema import FusedEMA, ema_plan, ema_update_
from .norm import NORM_BACKENDS, eman_norm
from .posthoc import POSTHOC_BACKENDS, posthoc_ema_update_

if _backends._AVAILABLE["triton"]:
    from ..triton import ema as _triton_ema  # noqa: F401  (registers the Triton ops)
    from ..triton import norm as _triton_norm  # noqa: F401
    from ..triton import optim as _triton_optim  # noqa: F401
    from ..triton import posthoc as _triton_posthoc  # noqa: F401

__all__ = ["FusedEMA", "NORM_BACKENDS", "POSTHOC_BACKENDS", "ema_plan", "ema_update_", "eman_norm",
           "posthoc_ema_update_"]
