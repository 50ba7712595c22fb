"""Shared test matrix: dtypes, tolerances, GPU marks."""
import pytest
import torch

import eman_fused

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
FLOAT_PAIRS = [(t, s) for t in FLOAT_DTYPES for s in FLOAT_DTYPES]
INT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]

# Kernels and reference both compute in fp32 (fp64 with a double side) and round once to the
# teacher's dtype; they may differ only by the order of fp32 operations (FMA contraction),
# i.e. a few fp32 ulps, which can flip the final rounding by one ulp of the teacher dtype.
TOLERANCES = {
    torch.float64: dict(rtol=1e-6, atol=1e-7),  # a float32 student limits the precision
    torch.float32: dict(rtol=2e-6, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-6),
    torch.float16: dict(rtol=2**-10, atol=1e-6),
}

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no GPU visible")
needs_cuda_backend = pytest.mark.skipif(
    not eman_fused.backends()["cuda"].available, reason=eman_fused.backends()["cuda"].detail)




def assert_close_to(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, equal_nan=True, **TOLERANCES[actual.dtype])


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, for bit-identity checks (NaN == NaN, -0 != +0)."""
    return t.detach().contiguous().view(torch.uint8).clone()
