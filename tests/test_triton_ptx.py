"""The Triton kernels as a GPU compiles them, checked on the CPU: the SGD and EMA kernels are
compiled for sm_90 (Triton's own ptxas; no GPU needed) with the launch options every eman_fused
launch passes (eman_fused/triton/_common.py LAUNCH_OPTIONS), and their PTX holds no fused
multiply-add, while the same kernels with Triton's default options do (Triton contracts
a*b + c; the C++ kernels round each operation once), and the norm's 1/sqrt is IEEE-rounded (no
sqrt.approx / div.full). And every launch of every Triton op passes those options. Run as a script, this file prints the FMA counts (it compiles in a process
without TRITON_INTERPRET, which turns @triton.jit into the interpreter)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import eman_fused
from conftest import AVAILABLE, HAS_GPU

needs_triton = pytest.mark.skipif("triton" not in AVAILABLE, reason=eman_fused.backends()["triton"].detail)


def _fma_counts() -> dict:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from eman_fused.ops.layout import EMA
    from eman_fused.triton import _common, ema, norm, optim

    def ptx(fn, sig, consts, options, pattern=r"\bfma\.rn\.f(32|64)\b"):
        names = fn.arg_names
        full = {n: sig.get(n, "constexpr") for n in names}
        src = ASTSource(fn=fn, signature=full, constexprs={(names.index(k),): v for k, v in consts.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, **options})
        return len(re.findall(pattern, kernel.asm["ptx"]))

    sgd_sig = {"table": "*i64", "num_entries": "i32", "scalars_at": "i32", "partial": "*i64"}
    offsets = optim._offsets("sgd", ("teacher_w", "teacher_v", "lr", "momentum", "dampening_weight",
                                     "weight_decay", "sign"))
    ema_sig = {"table": "*i64", "num_entries": "i32", **{k: "fp32" for k in ("m0", "m1", "m2", "w0", "w1", "w2")},
               "m_ptr": "*i64"}
    ema_consts = dict(MOMENTUM_FROM_PTR=False, BLOCK=ema.BLOCK, CHUNK=EMA["chunk_elems"],
                      ENTRY_WORDS=EMA["entry_words"], CHUNK_WORDS=EMA["chunk_words"],
                      KIND_COPY=EMA["kind_copy_bytes"])
    out = {}
    for label, options in (("ours", _common.LAUNCH_OPTIONS), ("triton_default", {})):
        for teacher in (0, 2):
            consts = dict(PT=tl.float32, TT=tl.bfloat16, TEACHER=teacher, DECAY=1, LARS=0, HAS_BUF=True,
                          NESTEROV=False, S_TRUST_COEFFICIENT=0, S_WEIGHT_DECAY_D=0, S_LR_D=0,
                          BLOCK=optim.BLOCK, CHUNK=optim.OPTIM_CHUNK_ELEMS, ENTRY_WORDS=optim.OPTIM_ENTRY_WORDS,
                          CHUNK_WORDS=optim.OPTIM_CHUNK_WORDS, **offsets)
            out[f"{label} sgd teacher={teacher}"] = ptx(optim._momentum_kernel, sgd_sig, consts, options)
        out[f"{label} ema"] = ptx(ema._ema_update_kernel, ema_sig, ema_consts, options)
    # The norm's 1/sqrt(var + eps): IEEE-rounded (sqrt.rn, div.rn), as the C++ kernels; plain
    # fp32 sqrt and division compile to approximations (sqrt.approx, div.full).
    norm_sig = {**{k: "*fp32" for k in ("x", "r", "y", "mean", "var", "w", "b")}, "eps": "fp32",
                "outer": "i32", "C": "i32", "inner": "i32"}
    norm_consts = dict(HAS_W=True, HAS_B=True, HAS_R=False, RELU=True, ROWS=1, COLS=norm.ROW_BLOCK,
                       INNER_ONE=False, ACC=tl.float32)
    out["approx norm"] = ptx(norm._norm_fwd, norm_sig, norm_consts, _common.LAUNCH_OPTIONS,
                             r"\b(sqrt\.approx|div\.full|div\.approx|rsqrt\.approx)\.")
    return out


@needs_triton
@pytest.mark.skipif(HAS_GPU, reason="compiled on a GPU machine by the GPU tests themselves")
def test_kernels_compile_without_fused_multiply_adds():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0 and "ptxas" in r.stderr and "not found" in r.stderr:
        pytest.skip("Triton's ptxas is not available here")
    assert r.returncode == 0, r.stderr[-3000:]
    counts = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(n == 0 for k, n in counts.items() if k.startswith("ours")), counts
    assert counts["approx norm"] == 0, counts
    # the check can fail: Triton's defaults do contract these kernels
    assert all(n > 0 for k, n in counts.items() if k.startswith("triton_default")), counts


@needs_triton
def test_every_triton_launch_passes_the_launch_options(monkeypatch):
    """Each op's launches, recorded at the kernel's run(): enable_fp_fusion=False every time."""
    from eman_fused import reference as R
    from eman_fused.ops import optim as optim_ops
    from eman_fused.ops.posthoc import posthoc_ema_update_
    from eman_fused.triton import ema as triton_ema, norm as triton_norm  # noqa: F401  (registers the Triton norm op)

    kernel_type = type(triton_ema._ema_update_kernel)  # JITFunction, or the interpreter's
    seen = []
    original = kernel_type.run

    def run(self, *args, **kwargs):
        seen.append((self.fn.__name__ if hasattr(self, "fn") else str(self), kwargs.get("enable_fp_fusion")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(kernel_type, "run", run)
    device = "cuda" if HAS_GPU else "cpu"
    t, s = [torch.zeros(40, device=device)], [torch.ones(40, device=device)]
    eman_fused.ema_update_(t, s, 0.25, backend="triton")
    x = torch.randn(2, 3, 4, device=device)
    stats = [torch.rand(3, device=device) + 0.5 for _ in range(4)]
    eman_fused.eman_norm(x, *stats, 1e-5, None, True, backend="triton")
    xg = x.clone().requires_grad_()
    eman_fused.eman_norm(xg, *stats, 1e-5, None, True, backend="triton").sum().backward()
    p, g = [torch.randn(40, device=device)], [torch.randn(40, device=device)]
    for name, extra in (("sgd", dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                                     maximize=False)),
                        ("adamw", dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                                       amsgrad=False, maximize=False, first_moments=[torch.zeros_like(p[0])],
                                       second_moments=[torch.zeros_like(p[0])],
                                       steps=[torch.tensor(0.0)])),
                        ("lars_you2017", dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False,
                                              weight_decay=1e-3, trust_coefficient=0.01, maximize=False,
                                              flags=[optim_ops.layout.OPTIM["flag_adapt"]]))):
        optim_ops.step_(name, p, g, backend="triton", teacher_momentum=1.0, **extra)
    step = torch.zeros((), dtype=torch.int64, device=device)
    posthoc_ema_update_([[torch.zeros(40, device=device)]], s, step, [R.sigma_rel_to_gamma(0.1)], backend="triton")
    names = {n for n, _ in seen}
    assert {"_ema_update_kernel", "_norm_fwd", "_norm_bwd", "_momentum_kernel", "_adamw_kernel",
            "_lars_sumsq_kernel", "_posthoc_kernel"} <= names, names
    assert all(fusion is False for _, fusion in seen), seen


if __name__ == "__main__":
    print(json.dumps(_fma_counts()))
