"""pytest-benchmark cases for the whole teacher step (EMATeacher vs timm's ModelEmaV3,
AveragedModel, the official EMAN loop) on a small conv-BN stack, so CI stays fast;
`benchmarks/bench_teacher.py` runs real models.

  pytest tests/benchmarks --benchmark-only
"""
import copy

import pytest
import torch
from torch import nn

import eman_fused
from eman_fused.reference import official_eman_update_

pytestmark = pytest.mark.benchmark
M = 0.999


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    layers = []
    for c_in, c_out in [(3, 16), (16, 32), (32, 32), (32, 64)]:
        layers += [nn.Conv2d(c_in, c_out, 3, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, 10))


def test_teacher_eman_fused(benchmark, student):
    teacher = eman_fused.EMATeacher(student, momentum=M)
    benchmark(teacher.update)


def test_teacher_timm_model_ema_v3(benchmark, student):
    timm_utils = pytest.importorskip("timm.utils")
    ema = timm_utils.ModelEmaV3(student, decay=M)
    benchmark(ema.update, student)


def test_teacher_averaged_model(benchmark, student):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    avg = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(M), use_buffers=True)
    benchmark(avg.update_parameters, student)


def test_teacher_official_eman_loop(benchmark, student):
    teacher = copy.deepcopy(student)

    benchmark(official_eman_update_, teacher, student, M)
