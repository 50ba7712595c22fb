"""The examples' --check modes (fused teacher == eager reference teacher at every step), and
proof that the check can fail."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


@pytest.mark.parametrize("script", ["fixmatch_eman.py", "byol_eman.py", "moco_eman.py"])
def test_example_check_mode(script):
    run = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "== reference" in run.stdout, run.stdout


def test_posthoc_example_check_mode():
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "posthoc_ema.py"), "--check"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "fused profiles == reference profiles" in run.stdout, run.stdout



def test_lightning_example_check_mode():
    pytest.importorskip("lightning")
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "lightning_eman.py"), "--check", "--epochs", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "teacher bit-identical to the uninterrupted run: True" in run.stdout, run.stdout
    assert "== reference: the fused teacher equals the eager reference teacher after each of 40" in run.stdout


def test_diffusers_example_check_mode():
    pytest.importorskip("diffusers")
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "diffusers_ema.py"), "--check", "--steps", "300"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "== diffusers: our shadows vs diffusers' EMAModel after 300 steps" in run.stdout, run.stdout

def test_reference_check_fails_on_a_wrong_teacher():
    import eman_fused
    from digits import ReferenceCheck
    student = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    teacher = eman_fused.EMATeacher(student, momentum=0.9)
    checker = ReferenceCheck(teacher, student, momentum=0.9)
    teacher.update(), checker.update()
    checker.compare()
    with torch.no_grad():
        teacher.module[1].running_var.add_(1e-3)
    with pytest.raises(AssertionError, match="1.running_var"):
        checker.compare()


def test_digits_augmentations_keep_shape_and_differ():
    from digits import load_digits, strong_augment, weak_augment
    x = load_digits(0)[0][:16]
    g = torch.Generator().manual_seed(0)
    for aug in (weak_augment, strong_augment):
        y = aug(x, g)
        assert y.shape == x.shape and not torch.equal(y, x)


def test_ddp_example_under_torchrun():
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(ROOT / "examples" / "ddp_teacher.py"), "--steps", "5"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "teachers identical on every rank: True" in run.stdout
