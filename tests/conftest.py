"""Shared test matrix: backends, dtypes, tolerances, GPU marks."""
import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on the CPU; this must be set
# before triton compiles (decorates) any kernel, i.e. before eman_fused is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import eman_fused  # noqa: E402

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
FLOAT_PAIRS = [(t, s) for t in FLOAT_DTYPES for s in FLOAT_DTYPES]
INT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]

TOLERANCES = eman_fused.reference.TOLERANCES  # shared with `python -m eman_fused check`

HAS_GPU = torch.cuda.is_available()
AVAILABLE = {name for name, b in eman_fused.backends().items() if b.available}
# (backend, device) pairs that run here: every kernel meets the same tests.
BACKEND_CASES = [("cpu", "cpu")]
if "triton" in AVAILABLE:
    BACKEND_CASES.append(("triton", "cuda" if HAS_GPU else "cpu"))
if "cuda" in AVAILABLE:
    BACKEND_CASES.append(("cuda", "cuda"))
BACKENDS = pytest.mark.parametrize("backend,device", BACKEND_CASES, ids=[b for b, _ in BACKEND_CASES])
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no GPU visible")
needs_cuda_backend = pytest.mark.skipif(
    not eman_fused.backends()["cuda"].available, reason=eman_fused.backends()["cuda"].detail)




def assert_close_to(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, equal_nan=True, **TOLERANCES[actual.dtype])


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, for bit-identity checks (NaN == NaN, -0 != +0)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8).clone()


def assert_same_bits_or_both_nan(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-identical except NaN payloads: torch's own casts disagree on those (its vectorized
    CPU path keeps them, its scalar one makes every NaN 0x7FC0), so only NaN-ness is compared."""
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    assert torch.equal(bits(actual[~nan]), bits(expected[~nan]))
