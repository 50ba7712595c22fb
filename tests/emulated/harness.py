"""Python side of the CUDA emulator: loads build.py's library with ctypes, hands out guarded
buffers as CPU tensors, and calls the real launchers of csrc/**/*.cu on them.

A guarded buffer has inaccessible pages on both sides and poison bytes (0xFF: NaN in every float
type) in the slack between: an access past either end faults (the launch then fails with
cudaErrorIllegalAddress and says where), a write into the slack is found after the launch, and
a read of it yields NaN. `offset` places the buffer that many bytes past a 16-byte boundary.
"""
from __future__ import annotations

import ctypes
from ctypes import c_double, c_int, c_int64, c_size_t, c_uint, c_uint64, c_void_p
from pathlib import Path

import torch

from . import build

P = c_void_p
_SIGNATURES = {
    "emu_set_order": (None, [c_int, c_uint64]),
    "emu_reset": (None, []),
    "emu_message": (ctypes.c_char_p, []),
    "emu_sticky_error": (c_int, []),
    "emu_shared_memory_bytes": (c_int64, []),
    "emu_alloc": (P, [c_size_t, c_size_t, c_int]),
    "emu_free": (None, [P]),
    "emu_error_name": (ctypes.c_char_p, [c_int]),
    "emu_error_string": (ctypes.c_char_p, [c_int]),
    "emu_coverage_dump": (c_int, []),
    "emu_layout": (c_int64, [ctypes.c_char_p]),
    "emu_optim_set_step": (None, [P, c_int64, P]),
    "emu_ema_update": (c_int, [P, P, c_int64, c_double, P, c_int]),
    "emu_posthoc_update": (c_int, [P, P, c_int64, P, c_int64, P]),
    "emu_norm_backward_workspace": (c_int64, [c_int64, c_int64, c_int64]),
    "emu_norm_forward": (c_int, [P, P, P, P, P, P, P, c_double, c_int, c_int, c_int64, c_int64,
                                 c_int64]),
    "emu_norm_backward": (c_int, [P, P, P, P, P, P, P, P, c_double, c_int, c_int64, c_int64,
                                  c_int64, P, P, P]),
    "emu_optim": (c_int, [c_int, P, P, c_int64, c_int, c_int, P, P, c_int64, P]),
    "emu_self_neighbour": (c_int, [P, c_int, c_int]),
    "emu_self_warp_sum": (c_int, [P, P, c_int]),
    "emu_self_write": (c_int, [P, c_int, c_int]),
    "emu_self_vector_copy": (c_int, [P, P]),
    "emu_self_early_exit": (c_int, [P]),
    "emu_self_unwritten_shared": (c_int, [P, c_int]),
    "emu_self_two_sums": (c_int, [P, P, c_int, c_int]),
    "emu_self_configuration": (c_int, [c_uint] * 6),
}


class EmulatedCudaError(RuntimeError):
    def __init__(self, code: int, name: str, text: str, detail: str):
        super().__init__(f"{name} ({text}): {detail}")
        self.code, self.name, self.text, self.detail = code, name, text, detail


class Buffer:
    """One guarded allocation; `tensor` is a flat CPU tensor over it (empty for 0 bytes)."""

    def __init__(self, emu: "Emulator", numel: int, dtype: torch.dtype, offset: int, at_start: bool):
        self.emu = emu
        size = torch.empty((), dtype=dtype).element_size()
        self.nbytes = numel * size
        self.ptr = emu.lib.emu_alloc(self.nbytes, offset, int(at_start))
        if self.nbytes:
            raw = (ctypes.c_char * self.nbytes).from_address(self.ptr)
            self.tensor = torch.frombuffer(raw, dtype=dtype)
        else:
            self.tensor = torch.empty(0, dtype=dtype)


class Emulator:
    def __init__(self, lib_dir: Path):
        self.dir = lib_dir
        self.lib = ctypes.CDLL(str(lib_dir / "libemu.so"))
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.restype, fn.argtypes = res, args
        self._buffers: list[Buffer] = []

    # ---- order and errors ----
    def set_order(self, order) -> None:
        """'sequential' (thread order); ('random', seed): any runnable thread next, uniformly;
        ('warps', seed): warps by random priorities, reshuffled at each barrier (one warp runs
        ahead of the others). Blocks run in a random order in both random modes."""
        if order == "sequential":
            self.lib.emu_set_order(0, 0)
        else:
            mode, seed = order
            self.lib.emu_set_order({"random": 1, "warps": 2}[mode], int(seed))

    def reset(self) -> None:
        self.lib.emu_reset()

    def message(self) -> str:
        return self.lib.emu_message().decode()

    def check(self, rc: int) -> None:
        if rc != 0:
            raise EmulatedCudaError(rc, self.lib.emu_error_name(rc).decode(),
                                    self.lib.emu_error_string(rc).decode(), self.message())

    def layout(self, name: str) -> int:
        """A constant of the kernels' headers (table sizes, dtype tags), from the C++ build."""
        v = self.lib.emu_layout(name.encode())
        assert v != -100, f"emu_layout has no {name!r}"
        return v

    def tag(self, dtype: torch.dtype | None) -> int:
        """The launchers' FloatTag of dtype (None: an absent list, e.g. no teacher)."""
        return self.layout("tag_absent" if dtype is None else "tag_" + str(dtype).replace("torch.", ""))

    # ---- memory ----
    def buffer(self, numel: int, dtype: torch.dtype, offset: int = 0, at_start: bool = False) -> Buffer:
        b = Buffer(self, numel, dtype, offset, at_start)
        self._buffers.append(b)
        return b

    def copy_in(self, src: torch.Tensor, offset: int = 0, at_start: bool = False) -> Buffer:
        """A guarded buffer holding src's elements in src's memory order (src.flatten() for a
        contiguous tensor)."""
        b = self.buffer(src.numel(), src.dtype, offset, at_start)
        if src.numel():  # memmove: no intra-op threads for a few kilobytes
            ctypes.memmove(b.ptr, src.reshape(-1).contiguous().data_ptr(), b.nbytes)
        return b

    def free_all(self) -> None:
        for b in self._buffers:
            b.tensor = None
            self.lib.emu_free(b.ptr)
        self._buffers.clear()


_EMULATOR: Emulator | None = None


def emulator() -> Emulator:
    """The session's emulator (built on first use; raises build.EmulatorUnavailable if it cannot)."""
    global _EMULATOR
    if _EMULATOR is None:
        _EMULATOR = Emulator(build.build())
    return _EMULATOR


def loaded() -> Emulator | None:
    return _EMULATOR


def ptr(b: Buffer | None) -> int | None:
    return None if b is None else b.ptr
