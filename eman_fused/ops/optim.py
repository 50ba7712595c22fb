"""The fused optimizer steps' ops (torch.ops.eman_fused.{sgd,adamw,lars}_ema_step_ and their
table ops): fake kernels, so torch.compile and opcheck can trace them. The optimizer classes
(torch.optim-compatible) are eman_fused.optim; the Triton twins eman_fused/triton/optim.py."""
from __future__ import annotations

import torch

from .. import _backends
from .layout import optim_table_words

STEP_OPS = ("sgd_ema_step_", "sgd_ema_step_.capturable", "adamw_ema_step_",
            "adamw_ema_step_.capturable", "lars_ema_step_", "lars_ema_step_.capturable")
TABLE_OPS = ("_sgd_ema_table", "_adamw_ema_table", "_lars_ema_table")


def _writes_only(*args):
    # The steps return nothing and only write their inputs: a fake kernel has nothing to compute.
    return None


def _table_fake(params, *args):
    # Host int64, sized from shapes alone.
    if params:
        return params[0].new_empty(optim_table_words(params), dtype=torch.int64, device="cpu")
    return torch.empty(0, dtype=torch.int64)


if _backends._C is not None:
    for _name in STEP_OPS:
        torch.library.register_fake(f"eman_fused::{_name}")(_writes_only)
    for _name in TABLE_OPS:
        torch.library.register_fake(f"eman_fused::{_name}")(_table_fake)
