"""The Triton twin of posthoc_ema_update_ (eman_fused/triton/posthoc.py) against the eager
transcription and the C++ CPU kernel, in Triton's interpreter on the CPU (TRITON_INTERPRET=1,
set by conftest without a GPU) or on a GPU: every dtype pair, K = 1..3 (and 8), the first update
(a copy), 200 steps of the precision rule, integer buffers, chunk boundaries, the device step,
backend selection, and a rejected call that writes nothing."""
import os

import pytest
import torch

import eman_fused
from eman_fused import reference as R
from eman_fused.ops.posthoc import posthoc_ema_update_

from conftest import AVAILABLE, FLOAT_PAIRS, HAS_GPU, bits

pytestmark = pytest.mark.skipif("triton" not in AVAILABLE, reason=eman_fused.backends()["triton"].detail)
DEVICE = "cuda" if HAS_GPU else "cpu"
SIGMAS = (0.05, 0.10, 0.15, 0.2, 0.03, 0.08, 0.25, 0.12)
GAMMAS = [R.sigma_rel_to_gamma(s) for s in SIGMAS]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _lists(pair, k, shapes=((37,), (5, 7), (3000,), (1,)), seed=0):
    tdt, sdt = pair
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(sh, generator=g, dtype=torch.float64).to(sdt) for sh in shapes]
    student.append(torch.tensor([3, -1], dtype=torch.int64))  # an integer buffer: copied
    profiles = [[torch.randn(s.shape, generator=g, dtype=torch.float64).to(tdt)
                 if s.is_floating_point() else torch.zeros_like(s) for s in student] for _ in range(k)]
    return profiles, student


def _to(lists, device):
    return [[t.to(device, copy=True) for t in p] for p in lists]  # a copy on the CPU too


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("pair", FLOAT_PAIRS, ids=[f"{t}-{s}".replace("torch.", "") for t, s in FLOAT_PAIRS])
def test_triton_vs_eager_transcription(pair, k):
    """200 updates: each profile within the precision rule of a float64 run (error <= 2x the
    eager PyTorch run's error + one ulp at the values' scale), and within one ulp (of the
    profile's dtype, at the values' scale) of the C++ CPU kernel: only the device pow that forms
    beta may differ in its last bit."""
    steps = 200 if k == 2 else 40
    gammas = GAMMAS[:k]
    cpu_profiles, student = _lists(pair, k)
    tri = _to(cpu_profiles, DEVICE)
    eager = [[t.clone() for t in p] for p in cpu_profiles]
    truth = [[t.to(torch.float64, copy=True) if t.is_floating_point() else t.clone() for t in p] for p in cpu_profiles]
    step_tri = torch.zeros((), dtype=torch.int64, device=DEVICE)
    step_cpu = torch.zeros((), dtype=torch.int64)
    g = torch.Generator().manual_seed(1)
    for t in range(1, steps + 1):
        for s in student:
            if s.is_floating_point():
                s.copy_(s.double() + 0.1 * torch.randn(s.shape, generator=g, dtype=torch.float64))
            else:
                s.add_(1)
        posthoc_ema_update_(tri, [s.to(DEVICE) for s in student], step_tri, gammas, backend="triton")
        posthoc_ema_update_(cpu_profiles, student, step_cpu, gammas, backend="cpu")
        R.posthoc_ema_update_(eager, student, t, gammas)
        R.posthoc_ema_update_(truth, [s.double() if s.is_floating_point() else s for s in student], t, gammas)
    assert int(step_tri) == steps
    for kk in range(k):
        for f, c, e, tr in zip(tri[kk], cpu_profiles[kk], eager[kk], truth[kk]):
            f = f.cpu()
            if not f.is_floating_point():
                assert torch.equal(f, tr)
                continue
            err = (f.double() - tr).abs().max().item()
            err_eager = (e.double() - tr).abs().max().item()
            ulp = torch.finfo(f.dtype).eps * tr.abs().max().item()
            assert err <= 2 * err_eager + ulp, (kk, err, err_eager)
            assert (f.double() - c.double()).abs().max().item() <= ulp, kk


@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16),
                                  (torch.float64, torch.bfloat16)], ids=str)
def test_first_update_copies_and_a_nan_is_replaced(pair):
    profiles, student = _lists(pair, 3)
    profiles[2][0][4] = float("nan")
    tri = _to(profiles, DEVICE)
    step = torch.zeros((), dtype=torch.int64, device=DEVICE)
    posthoc_ema_update_(tri, [s.to(DEVICE) for s in student], step, GAMMAS[:3], backend="triton")
    assert int(step) == 1
    for p in tri:
        for a, s in zip(p, student):
            assert torch.equal(bits(a.cpu()), bits(s.to(a.dtype)))


def test_chunk_boundaries_and_eight_profiles_match_the_cpu_kernel():
    """Tensors over several plan chunks (32,768 elements) and the most profiles an entry holds;
    a float32 pair at a late step, where fp32-rounded betas agree: bit for bit."""
    shapes = ((2 * 32768 + 5,), (32768,), (3,))
    profiles, student = _lists((torch.float32, torch.bfloat16), 8, shapes=shapes, seed=3)
    tri = _to(profiles, DEVICE)
    step_tri = torch.tensor(12_345, dtype=torch.int64, device=DEVICE)
    step_cpu = torch.tensor(12_345, dtype=torch.int64)
    posthoc_ema_update_(tri, [s.to(DEVICE) for s in student], step_tri, GAMMAS, backend="triton")
    posthoc_ema_update_(profiles, student, step_cpu, GAMMAS, backend="cpu")
    assert int(step_tri) == int(step_cpu) == 12_346
    betas_dev = eman_fused.triton.posthoc.power_betas(torch.tensor(12_345), GAMMAS)
    same_betas = all(float(torch.tensor(1.0 - float(b), dtype=torch.float32)) ==
                     float(torch.tensor(1.0 - R.power_beta(12_346, gm), dtype=torch.float32))
                     for b, gm in zip(betas_dev, GAMMAS))
    for p_t, p_c in zip(tri, profiles):
        for a, c in zip(p_t, p_c):
            if same_betas:
                assert torch.equal(bits(a.cpu()), bits(c))
            else:
                torch.testing.assert_close(a.cpu(), c, rtol=2e-7, atol=0)


def test_power_betas_on_the_device():
    step = torch.tensor(999, dtype=torch.int64, device=DEVICE)
    got = eman_fused.triton.posthoc.power_betas(step, GAMMAS[:3])
    assert got.device.type == DEVICE and got.dtype == torch.float64
    for b, g in zip(got.tolist(), GAMMAS[:3]):
        assert b == pytest.approx(R.power_beta(1000, g), rel=1e-15)
    zero = eman_fused.triton.posthoc.power_betas(torch.zeros((), dtype=torch.int64, device=DEVICE), GAMMAS[:2])
    assert zero.tolist() == [0.0, 0.0]  # t = 1: a copy


def test_backend_selection():
    profiles, student = _lists((torch.float32, torch.float32), 2)
    step = torch.zeros((), dtype=torch.int64)
    # CPU tensors: 'auto' is the C++ CPU kernel, never the interpreter
    from eman_fused import _backends
    assert _backends.resolve("auto", torch.device("cpu"), eman_fused.ops.POSTHOC_BACKENDS) == "cpu"
    if HAS_GPU:
        assert _backends.resolve("auto", torch.device("cuda"), eman_fused.ops.POSTHOC_BACKENDS) in ("cuda", "triton")
    if INTERPRETED:
        posthoc_ema_update_(profiles, student, step, GAMMAS[:2], backend="triton")  # runs on CPU
        assert int(step) == 1
    with pytest.raises(ValueError, match="unknown backend"):
        posthoc_ema_update_(profiles, student, step, GAMMAS[:2], backend="tpu")


@pytest.mark.parametrize("case", ["grad", "shape", "gamma", "alias"])
def test_rejected_call_writes_nothing(case):
    profiles, student = _lists((torch.float32, torch.bfloat16), 2)
    profiles, student = _to(profiles, DEVICE), [s.to(DEVICE) for s in student]
    gammas = GAMMAS[:2]
    if case == "grad":
        profiles[1][0].requires_grad_(True)
    elif case == "shape":
        profiles[1][2] = torch.zeros(2999, device=DEVICE)
    elif case == "gamma":
        gammas = [GAMMAS[0], -1.0]
    elif case == "alias":
        profiles[1][0] = profiles[0][0]
    step = torch.tensor(5, dtype=torch.int64, device=DEVICE)
    before = [[bits(t.detach().cpu()) for t in p] for p in profiles]
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        posthoc_ema_update_(profiles, student, step, gammas, backend="triton")
    for p, q in zip(profiles, before):
        for a, b in zip(p, q):
            assert torch.equal(bits(a.detach().cpu()), b)
    assert int(step) == 5


def test_empty_lists_do_nothing():
    step = torch.tensor(3, dtype=torch.int64, device=DEVICE)
    posthoc_ema_update_([[], []], [], step, GAMMAS[:2], backend="triton")
    assert int(step) == 3  # as the C++ op: no tensors, no update


def test_opcheck_triton_op():
    profiles, student = _lists((torch.float32, torch.bfloat16), 2)
    flat = [t.to(DEVICE) for p in profiles for t in p]
    torch.library.opcheck(torch.ops.eman_fused.posthoc_ema_update_triton_,
                          (flat, [s.to(DEVICE) for s in student],
                           torch.tensor(3, dtype=torch.int64, device=DEVICE), GAMMAS[:2]))


def test_posthoc_plan_fake_gives_the_table_size():
    from torch._subclasses.fake_tensor import FakeTensorMode
    profiles, student = _lists((torch.float32, torch.float32), 2)
    real = torch.ops.eman_fused.posthoc_plan([t for p in profiles for t in p], student,
                                             torch.tensor(0), GAMMAS[:2])
    with FakeTensorMode() as mode:
        fp = [[mode.from_tensor(t) for t in p] for p in profiles]
        fs = [mode.from_tensor(s) for s in student]
        fake = torch.ops.eman_fused.posthoc_plan([t for p in fp for t in p], fs,
                                                 mode.from_tensor(torch.tensor(0)), GAMMAS[:2])
        assert fake.shape == real.shape and fake.dtype == torch.int64
