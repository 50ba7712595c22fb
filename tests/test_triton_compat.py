"""The version-dependent Triton path: the interpreter check in eman_fused.backends() (Triton <
3.7's interpreter with NumPy >= 2.4). (The kernels are launched directly inside opaque custom
ops, so torch's wrap_triton, which torch 2.11 and 2.12 refuse for interpreted kernels, is not
used.)"""
import os

import pytest
import torch

import eman_fused

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
