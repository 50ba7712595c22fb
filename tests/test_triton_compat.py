"""The version-dependent Triton paths: the launch wrapper (eman_fused.triton._common.wrap_triton)
against what each supported torch does with an interpreted kernel, and the interpreter check in
eman_fused.backends() (Triton < 3.7's interpreter with NumPy >= 2.4)."""
import os

import pytest
import torch

import eman_fused
from conftest import AVAILABLE, HAS_GPU, needs_gpu

needs_triton = pytest.mark.skipif("triton" not in AVAILABLE, reason=eman_fused.backends()["triton"].detail)

TORCH = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + idx, tl.load(x_ptr + idx, mask=idx < n) + 1.0, mask=idx < n)
    return add_one


@needs_triton
@pytest.mark.skipif(HAS_GPU, reason="a GPU is visible: kernels are compiled, not interpreted")
def test_torchs_wrap_triton_on_an_interpreted_kernel_is_as_the_wrapper_assumes():
    from triton.runtime.interpreter import InterpretedFunction
    kernel = _kernel()
    assert isinstance(kernel, InterpretedFunction)
    if TORCH < (2, 13):  # torch 2.11, 2.12: refused
        with pytest.raises(RuntimeError, match="only works on functions annotated with triton.jit"):
            torch.library.wrap_triton(kernel)
    else:  # torch >= 2.13: handed back untraced
        assert torch.library.wrap_triton(kernel) is kernel


@needs_triton
@pytest.mark.skipif(HAS_GPU, reason="a GPU is visible: kernels are compiled, not interpreted")
def test_wrapper_launches_interpreted_kernels_on_every_torch():
    from eman_fused.triton._common import wrap_triton
    kernel = _kernel()
    assert wrap_triton(kernel) is kernel
    x = torch.arange(37, dtype=torch.float32)
    wrap_triton(kernel)[(3,)](x, 37, BLOCK=16)
    assert torch.equal(x, torch.arange(37, dtype=torch.float32) + 1)


@needs_triton
@needs_gpu
def test_wrapper_defers_to_torch_for_compiled_kernels():
    from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper

    from eman_fused.triton._common import wrap_triton
    kernel = _kernel()
    wrapped = wrap_triton(kernel)
    assert wrapped is kernel or isinstance(wrapped, TraceableTritonKernelWrapper)
    x = torch.arange(37, dtype=torch.float32, device="cuda")
    wrapped[(3,)](x, 37, BLOCK=16)
    assert torch.equal(x.cpu(), torch.arange(37, dtype=torch.float32) + 1)


@pytest.mark.parametrize("triton_version,numpy_version,works", [
    ("3.6.0", "2.4.6", False), ("3.6.0", "2.3.5", True), ("3.7.1", "2.4.6", True), ("3.9.0", "2.5.0.dev0", True)])
def test_interpreter_rule(monkeypatch, triton_version, numpy_version, works):
    import numpy
    import triton

    from eman_fused import _backends
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    problem = _backends._interpreter_problem()
    assert (problem is None) == works
    if problem:
        assert triton_version in problem and numpy_version in problem


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="not interpreting")
def test_the_interpreter_is_offered_exactly_when_it_can_run_here():
    import numpy
    import triton

    from eman_fused import _backends
    broken = _backends._version(triton) < (3, 7) and _backends._version(numpy) >= (2, 4)
    report = eman_fused.backends()["triton"]
    assert report.available == (not broken), report.detail
    if not broken:  # and it does run: one update through the interpreter
        t, s = [torch.zeros(40)], [torch.ones(40)]
        eman_fused.ema_update_(t, s, 0.25, backend="triton")
        assert torch.equal(t[0], torch.full((40,), 0.75))
