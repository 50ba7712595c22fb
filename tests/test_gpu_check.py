"""scripts/gpu_check.sh --dry-run on the CPU: it checks the environment and that every test
selection still collects tests, and prints each step the GPU run would take, in the budget's
order, with the summary table last. (The GPU run itself needs the machine.)"""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["env", "select-gpu-tests", "select-memcheck", "select-racecheck", "build", "gpu-tests",
         "crash-trace", "memcheck", "racecheck", "check", "bench-ema", "bench-optim", "bench-teacher", "bench-host"]


def run(*args, python=sys.executable):
    env = {**os.environ, "PYTHON": python}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=900)


def summary_rows(text):
    table = text[text.index("| step | result |"):]
    return {row.split("|")[1].strip(): row.split("|")[2].strip()
            for row in table.strip().splitlines()[2:]}, table


def test_dry_run_plans_every_step(tmp_path):
    r = run("--dry-run", str(tmp_path / "results"))
    assert r.returncode == 0, r.stdout + r.stderr
    rows, table = summary_rows(r.stdout)
    assert list(rows) == STEPS
    assert all(rows[s] == "pass" for s in STEPS[:4]), table
    assert all(rows[s] == "planned" for s in STEPS[4:]), table
    assert r.stdout.rstrip().endswith(table.rstrip())  # the table comes last
    assert (tmp_path / "results" / "summary.md").read_text().strip() == table.strip()
    assert "torch" in (tmp_path / "results" / "env.txt").read_text()
    plan = r.stdout
    assert "TORCH_CUDA_ARCH_LIST=9.0" in plan and "500 s budget" in plan
    assert "--tool memcheck" in plan and "--tool racecheck" in plan
    assert "eman_fused check --device cuda --ops ema,norm,optim" in plan
    assert "--compile" not in plan  # the budget has no room for torch.compile
    results = str(tmp_path / "results")
    for line in plan.splitlines():  # every benchmark writes under the directory it was given
        if "--json" in line:
            assert re.search(r"--json " + re.escape(results) + r"/\S+\.json", line), line


def test_dry_run_reports_an_unusable_environment(tmp_path):
    r = run("--dry-run", str(tmp_path), python="/nonexistent/python3")
    assert r.returncode == 1
    rows, _ = summary_rows(r.stdout)
    assert rows["env"] == "fail" and rows["select-gpu-tests"] == "fail"


def test_usage():
    for args in ((), ("--dry-run",), ("--bogus",)):
        r = run(*args)
        assert r.returncode == 2 and "usage: bash scripts/gpu_check.sh" in r.stderr
