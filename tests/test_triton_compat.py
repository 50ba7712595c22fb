"""The version-dependent Triton launch path (eman_fused.triton._common.wrap_triton): what each
supported torch does with an interpreted kernel, and that our wrapper launches it on all."""
import pytest
import torch

from conftest import AVAILABLE, HAS_GPU, needs_gpu

pytestmark = pytest.mark.skipif("triton" not in AVAILABLE, reason="the Triton backend is not available here")

TORCH = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + idx, tl.load(x_ptr + idx, mask=idx < n) + 1.0, mask=idx < n)
    return add_one


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


@pytest.mark.skipif(HAS_GPU, reason="a GPU is visible: kernels are compiled, not interpreted")
def test_wrapper_launches_interpreted_kernels_on_every_torch():
    from eman_fused.triton._common import wrap_triton
    kernel = _kernel()
    assert wrap_triton(kernel) is kernel
    x = torch.arange(37, dtype=torch.float32)
    wrap_triton(kernel)[(3,)](x, 37, BLOCK=16)
    assert torch.equal(x, torch.arange(37, dtype=torch.float32) + 1)


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
