"""Helpers shared by the Triton kernels."""
import torch.library
import triton
import triton.language as tl

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # a Triton without the interpreter: no kernel is ever interpreted
    InterpretedFunction = ()


def wrap_triton(kernel):
    """torch.library.wrap_triton, for compiled and interpreted kernels alike.

    Under TRITON_INTERPRET=1, @triton.jit returns an InterpretedFunction, which launches
    eagerly but cannot be traced. torch >= 2.13 hands such a kernel back as it is; torch 2.11
    and 2.12 refuse it ("wrap_triton only works on functions annotated with triton.jit or
    triton.autotune"). Handing it back here gives every supported torch the >= 2.13 behaviour
    (tests/test_triton_compat.py checks both sides of this).
    """
    if isinstance(kernel, InterpretedFunction):
        return kernel
    return torch.library.wrap_triton(kernel)


@triton.jit
def fp32_to_bf16_rne(x):
    # Round to nearest even on the bits, NaN kept quiet: exact on every target. (Triton's
    # interpreter converts fp32 -> bf16 approximately, whatever rounding mode is asked for.)
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """x (fp32 or fp64) in DTYPE, rounded once through fp32 to nearest even, as torch's casts."""
    if x.dtype == tl.float64 and DTYPE != tl.float64:
        x = x.to(tl.float32, fp_downcast_rounding="rtne")
    if DTYPE == tl.bfloat16:
        x = fp32_to_bf16_rne(x)
    elif DTYPE == tl.float16:
        x = x.to(tl.float16, fp_downcast_rounding="rtne")
    elif DTYPE != x.dtype:
        x = x.to(DTYPE)
    return x


@triton.jit
def ema_lerp(t, s, w, v):
    """The teacher update of one element as every teacher-writing kernel computes it (ema_update_
    and the fused optimizers; csrc/common/ema_lerp.h): torch.lerp's two forms with w = 1 - m,
    t + w*(s - t) for w < 1/2, else s - (s - t)*v with v = 1 - w. One helper, so the two ops'
    Triton kernels compile it alike."""
    return tl.where(w < 0.5, t + w * (s - t), s - (s - t) * v)
