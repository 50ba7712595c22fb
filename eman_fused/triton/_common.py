"""Helpers shared by the Triton kernels."""
import triton
import triton.language as tl

# Every kernel is compiled without fused multiply-adds. Triton contracts a*b + c into one FMA by
# default (one rounding instead of two), and whether it does depends on the code around the
# expression: the SGD kernel with a teacher rounded its params differently from the one without,
# and both differed from the C++ kernels (CPU and CUDA), which round each operation once. The
# interpreter (TRITON_INTERPRET=1) ignores the option: it never contracts.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs) with LAUNCH_OPTIONS. The kernels run inside opaque custom
    ops (torch.library.custom_op): torch.compile calls the op, it does not trace the kernels. The
    table-driven kernels write through addresses read from their plan table, writes torch's
    kernel analysis could not see; declared on the op (mutates_args), they are functionalized
    correctly."""
    return kernel[grid](*args, **LAUNCH_OPTIONS, **kwargs)


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
