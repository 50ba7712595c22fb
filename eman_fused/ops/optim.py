"""The fused optimizer step op (torch.ops.eman_fused.optim_ema_step_, one op for SGD, AdamW and
both LARS formulas) and its table op: fake kernels, so torch.compile and opcheck can trace them,
and `step_`, a keyword front end for calling the op directly (tests, benchmarks). The optimizer
classes (torch.optim-compatible) are eman_fused.optim; the Triton twin eman_fused/triton/optim.py.

The op takes the optimizer as an enum and its hyper-parameters as one float list, in the order
csrc/optim/math.h lists them (exported as OPTIM["hyper"], flags as 0/1)."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _backends
from . import layout

STEP_OP = "optim_ema_step_"
TABLE_OP = "_optim_ema_table"
OVERLAP_OP = "_optim_ema_overlap"


def optimizer_id(name: str) -> int:
    """'sgd', 'adamw', 'lars_simclr' or 'lars_you2017' -> the op's optimizer enum value."""
    return layout.OPTIM["optimizers"][name]


def hyper_names(name: str) -> list[str]:
    """The hyper-parameter names of optimizer `name`, in the op's order."""
    return list(layout.OPTIM["hyper"]["lars" if name.startswith("lars") else name])


def hyper(name: str, **values) -> list[float]:
    """The op's `hyper` list for optimizer `name` from keyword values (bools for the flags);
    every hyper-parameter must be given, and nothing else."""
    names = hyper_names(name)
    missing, unknown = [n for n in names if n not in values], sorted(set(values) - set(names))
    if missing or unknown:
        raise TypeError(f"{name} hyper-parameters: missing {missing}, unknown {unknown}; it takes {names}")
    return [float(values[n]) for n in names]


def step_(name: str, params, grads, *, first_moments=(), second_moments=(), max_second_moments=(),
          teacher=(), flags=(), steps=(), hyper_tensors=(), backend: str = "cpu", **values) -> None:
    """torch.ops.eman_fused.optim_ema_step_ (backend 'cpu'/'cuda': the C++ op; 'triton': its
    Triton twin) with the hyper-parameters by keyword, e.g.
    step_("sgd", p, g, first_moments=bufs, flags=[1, 0], lr=0.1, momentum=0.9, dampening=0,
          weight_decay=0, nesterov=False, maximize=False, teacher_momentum=0.99)."""
    args = (optimizer_id(name), list(params), list(grads), list(first_moments), list(second_moments),
            list(max_second_moments), list(teacher), list(flags), list(steps), hyper(name, **values))
    if backend == "triton":
        if hyper_tensors:
            raise NotImplementedError("the Triton kernels take no device hyper-parameters (not capturable)")
        torch.ops.eman_fused.optim_ema_step_triton_(*args)
    else:
        torch.ops.eman_fused.optim_ema_step_(*args, list(hyper_tensors))


def _writes_only(*args):
    # The step returns nothing and only writes its inputs: a fake kernel has nothing to compute.
    return None


def table_words(params: Sequence[torch.Tensor]) -> int:
    """Words of a step's table for `params`: entries, chunks, the scalar block."""
    return layout.optim_table_words(params) + layout.OPTIM["scalar_words"]


def _table_fake(optimizer, params, *args, **kwargs):
    # Host int64, sized from shapes alone.
    if params:
        return params[0].new_empty(table_words(params), dtype=torch.int64, device="cpu")
    return torch.empty(layout.OPTIM["scalar_words"], dtype=torch.int64)


if _backends._C is not None:
    torch.library.register_fake(f"eman_fused::{STEP_OP}")(_writes_only)
    torch.library.register_fake(f"eman_fused::{TABLE_OP}")(_table_fake)
    torch.library.register_fake(f"eman_fused::{OVERLAP_OP}")(_writes_only)  # checks only
