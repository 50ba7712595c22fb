"""Which backends exist here, and for each missing one, why. No silent fallbacks."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

try:
    from . import _build_info
except ImportError:
    _build_info = None


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


try:
    from . import _C  # loading it registers the C++/CUDA ops
    _C_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    built_for = getattr(_build_info, "TORCH_VERSION", None)
    if built_for and _minor(built_for) != _minor(torch.__version__):
        why = (f"it was built against torch {built_for} and this is torch {torch.__version__} "
               "(torch's C++ ABI differs between minor versions)")
    else:
        why = str(exc)
    _C_ERROR = (f"eman_fused._C failed to import: {why}; rebuild it against this torch "
                "(`pip install --no-build-isolation .`, or in a source tree `python setup.py build_ext --inplace`)")


PRIVATE_RUNTIME = ("WARNING: this build of the extension carries its own C++ runtime (a statically "
                   "linked libstdc++): its error messages that format numbers are cut short or crash "
                   "the process; rebuild with a compiler that links libstdc++ dynamically")
_PRIVATE_RUNTIME_BUILD = bool(getattr(_build_info, "CXX_RUNTIME_PRIVATE", False))  # setup.py's verdict
if _C is not None and _PRIVATE_RUNTIME_BUILD:
    import warnings
    warnings.warn(f"eman_fused: {PRIVATE_RUNTIME}", RuntimeWarning, stacklevel=2)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _version(module) -> tuple[int, int]:
    return tuple(int(x) for x in module.__version__.split("+")[0].split(".")[:2])


def _interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run our kernels here, if it cannot. Triton < 3.7
    turns a loop bound loaded from memory into int() of a one-element array, which NumPy >= 2.4
    refuses ("only 0-dimensional arrays can be converted to Python scalars"); 3.7 squeezes it
    first. Compiled kernels (a GPU) are not affected."""
    import triton
    try:
        import numpy
    except ImportError:
        return "Triton's interpreter needs NumPy, which is not installed"
    if _version(triton) < (3, 7) and _version(numpy) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter does not work with NumPy {numpy.__version__} "
                "(NumPy >= 2.4 refuses int() of 1-element arrays; Triton >= 3.7 or numpy<2.4 does)")
    return None


def _triton_backend() -> Backend:
    if importlib.util.find_spec("triton") is None:
        return Backend("triton", False, "the triton package is not installed")
    if _C_ERROR:
        return Backend("triton", False, f"it reads the C++ planner's tables: {_C_ERROR}")
    import triton
    if torch.cuda.is_available() and not _interpreting():
        return Backend("triton", True, f"Triton {triton.__version__} kernels on the GPU")
    if _interpreting():
        if problem := _interpreter_problem():
            return Backend("triton", False, problem)
        return Backend("triton", True, f"Triton {triton.__version__} interpreter on the CPU "
                       "(TRITON_INTERPRET=1: for tests, slow)")
    return Backend("triton", False, "no GPU visible (TRITON_INTERPRET=1 runs the Triton "
                   "kernels in the interpreter on the CPU, for tests)")


@dataclass(frozen=True)
class Backend:
    name: str
    available: bool
    detail: str  # what it runs on when available, why not otherwise

    def __str__(self) -> str:
        return f"{self.name:<10} {'yes' if self.available else 'no ':<4} {self.detail}"


def _cuda_backend() -> Backend:
    if _C_ERROR:
        return Backend("cuda", False, _C_ERROR)
    if not torch._C._dispatch_has_kernel_for_dispatch_key("eman_fused::ema_update_", "CUDA"):
        why = getattr(_build_info, "CUDA_NOT_BUILT_REASON", "") or "unknown build"
        return Backend("cuda", False, f"extension built without CUDA kernels: {why}")
    if not torch.cuda.is_available():
        return Backend("cuda", False, "CUDA kernels are built "
                       f"({getattr(_build_info, 'CUDA_ARCH_LIST', '?')}) but no GPU is visible")
    return Backend("cuda", True, f"CUDA C++ kernels ({torch.cuda.device_count()} GPU visible)")


def backends() -> dict[str, Backend]:
    """Report every backend: available or not, and why not."""
    cpu = Backend("cpu", _C_ERROR is None, _C_ERROR or
                  f"C++ kernels ({torch.ops.eman_fused._cpu_isa()}), {torch.get_num_threads()} threads"
                  + (f"; {PRIVATE_RUNTIME}" if _PRIVATE_RUNTIME_BUILD else ""))
    ref = Backend("reference", True, "eager per-tensor PyTorch (eman_fused.reference)")
    return {b.name: b for b in (cpu, _cuda_backend(), _triton_backend(), ref)}


# Availability as plain constants, fixed for the process: the update path reads only these,
# so it costs nothing per step and torch.compile folds it away.
_AVAILABLE = {name: b.available for name, b in backends().items()}


def require(name: str) -> None:
    """Raise RuntimeError naming the reason when backend `name` is not available."""
    if name not in _AVAILABLE:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(_AVAILABLE)} or 'auto'")
    if not _AVAILABLE[name]:
        raise RuntimeError(f"backend {name!r} is not available: {backends()[name].detail}")


# 'auto', per device: the first available of these. The Triton interpreter is never chosen
# for CPU tensors (it is for tests); the C++ CPU kernels are.
_AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


def resolve(name: str, device: torch.device, op_backends=None, op: str = "ema_update_") -> str:
    """The backend that runs tensors on `device`: 'auto' takes the first available of
    _AUTO_ORDER[device.type] that the op has (op_backends; None: all); a named backend must
    be available, be one the op has, and serve that device."""
    if name in _AVAILABLE and op_backends is not None and name not in op_backends:
        raise NotImplementedError(f"{op} has no {name!r} kernel yet (it has: {', '.join(sorted(op_backends))})")
    if name == "auto":
        order = [c for c in _AUTO_ORDER.get(device.type, ()) if op_backends is None or c in op_backends]
        for candidate in order:
            if _AVAILABLE[candidate]:
                return candidate
        detail = "; ".join(f"{c}: {backends()[c].detail}" for c in order) or "none exists"
        raise RuntimeError(f"no eman_fused backend of {op} can run tensors on {device} ({detail})")
    require(name)
    if name in ("cpu", "cuda") and device.type != name:
        raise ValueError(f"backend {name!r} cannot update tensors on {device}")
    if name == "triton" and device.type == "cpu" and not _interpreting():
        raise ValueError("backend 'triton' runs CPU tensors only in the interpreter (TRITON_INTERPRET=1)")
    return name
