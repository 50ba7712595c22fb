"""eman_fused: fused EMA teacher updates and EMAN normalization for PyTorch.

Public names: EMATeacher, PostHocEMA (EDM2 post-hoc EMA), ema_update_, FusedEMA, eman_norm, backends, reference; nn (EMAN modules),
schedules (momentum schedules), optim (optimizers with the teacher update fused in). Benchmarks
and the command line (`python -m eman_fused`) live in eman_fused.bench, imported only by them.
"""
from . import _backends, ops, reference, schedules  # noqa: F401  (ops: registers every op)
from . import nn, optim  # noqa: I001  (after ops: they use its registered ops)
from ._backends import Backend, backends
from .ops import FusedEMA, ema_update_, eman_norm
from .teacher import EMATeacher, StructureMismatchError
from .posthoc import PostHocEMA  # noqa: I001  (after ops and teacher)

__all__ = ["Backend", "EMATeacher", "FusedEMA", "PostHocEMA", "StructureMismatchError", "backends", "ema_update_",
           "eman_norm", "nn", "optim", "reference", "schedules"]
__version__ = "0.1.0"
