"""`python -m eman_fused info | check | bench` end to end on the CPU, on a tiny model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eman_fused.bench import shapes
from eman_fused.bench.check import backends_for

ROOT = Path(__file__).resolve().parents[1]
TINY = [{"name": "w", "shape": [64, 3, 3, 3]}, {"name": "b", "shape": [64]},
        {"name": "bn.running_mean", "shape": [64], "kind": "buffer"},
        {"name": "bn.num_batches_tracked", "shape": [], "kind": "counter"}]


def cli(*args, env=None):
    full_env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **(env or {})}
    return subprocess.run([sys.executable, "-m", "eman_fused", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def tiny_json(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def test_info_reports_versions_and_backends():
    out = cli("info", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["versions"]["torch"] and set(report["backends"]) >= {"cpu", "cuda", "triton", "reference"}
    assert all(b["detail"] for b in report["backends"].values())


def test_check_passes_and_covers_every_dtype_pair(tiny_json):
    out = cli("check", "--model", str(tiny_json), "--device", "cpu", "--ops", "ema")
    assert out.returncode == 0, out.stdout + out.stderr
    backends = backends_for(torch.device("cpu"))  # cpu, and triton when interpreting
    assert f"{5 * len(backends)} passed, 0 failed" in out.stdout


def test_check_fails_when_a_backend_is_wrong(tiny_json):
    out = cli("check", "--model", str(tiny_json), "--device", "cpu", "--dtypes", "fp32:fp32",
              "--ops", "ema", env={"EMAN_FUSED_CHECK_FAULT": "cpu"})
    assert out.returncode == 1
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("ema ")]
    assert {r[1]: r[-1] for r in rows} == {b: "FAIL" if b == "cpu" else "pass"
                                           for b in backends_for(torch.device("cpu"))}


def test_check_covers_eman_norm_and_fails_when_wrong():
    ok = cli("check", "--device", "cpu", "--ops", "norm", env={"TRITON_INTERPRET": "0"})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "20 passed, 0 failed" in ok.stdout  # 5 sites x 2 layouts x 2 dtypes, CPU backend
    bad = cli("check", "--device", "cpu", "--ops", "norm", env={"TRITON_INTERPRET": "0",
                                                               "EMAN_FUSED_CHECK_FAULT": "cpu"})
    assert bad.returncode == 1 and "0 passed, 20 failed" in bad.stdout


def test_bench_writes_json_markdown_and_png(tiny_json, tmp_path):
    out = cli("bench", "--ops", "ema", "--model", f"{tiny_json},tiny_model:make", "--device", "cpu",
              "--no-compile", "--dtypes", "fp32:fp32,fp32:bf16", "--json", str(tmp_path / "r.json"),
              "--markdown", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png"))
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert [c["case"] for c in result["cases"]] == [
        "tiny t=fp32 s=fp32", "tiny t=fp32 s=bf16", "make t=fp32 s=fp32", "make t=fp32 s=bf16"]
    for case in result["cases"]:
        fused = case["methods"]["eman_fused"]
        assert fused["ms"] > 0 and fused["GB/s"] > 0
        assert case["methods"]["official_eman"]["eman_fused_speedup"] > 0
        assert "skipped" in case["methods"]["eman_fused_triton"]  # CPU: said, not a number
    assert "error" in result["cases"][1]["methods"]["foreach_lerp"]  # mixed dtypes: foreach refuses
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| tiny t=fp32 s=fp32 |" in (tmp_path / "r.md").read_text()
    assert "[ema 4/4]" in out.stderr  # progress
    # --no-compile: no compiled peer measured, and the table says it was not run
    assert result["compile"] == {"enabled": False, "why": "--no-compile"}
    assert not any("foreach_compile" in c["methods"] for c in result["cases"])
    assert "- foreach_compile (the torch.compile peer: foreach lerp, 0-dim tensor weight): not run (--no-compile)" \
        in (tmp_path / "r.md").read_text()


def test_bench_times_the_compiled_peers_by_default(tiny_json, tmp_path):
    """The default bench compiles its torch.compile peers (EMA, optimizer step + EMA; eval BN +
    add + ReLU below, in-process on one small site), times them after compiling, reports the
    compile time, and says which case it did not compile and why."""
    out = cli("bench", "--ops", "ema,optim", "--model", f"{tiny_json},tiny_model:make", "--device", "cpu",
              "--dtypes", "fp32:fp32,fp32:bf16", "--optim", "sgd,lars", "--compile-max-tensors", "5",
              "--repeats", "2", "--json", str(tmp_path / "c.json"), "--markdown", str(tmp_path / "c.md"))
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["compile"]["enabled"] and result["optim"]["compile"]["enabled"]
    tiny_same, tiny_mixed, make_same, _ = result["cases"]
    for case in (tiny_same, tiny_mixed):  # mixed dtypes too: the cast is part of the compiled update
        peer = case["methods"]["foreach_compile"]
        assert peer["ms"] > 0 and peer["GB/s"] > 0 and peer["eman_fused_speedup"] > 0, peer
        assert peer["compile_s"] > 0 and peer["graphs"] == 1 and peer["graph_breaks"] == 0
        assert len(peer["runs_ms"]) == 2
    assert "9 tensors > --compile-max-tensors 5" in make_same["methods"]["foreach_compile"]["skipped"]
    sgd, lars = result["optim"]["cases"][:2]
    peer = sgd["methods"]["torch_compile+foreach_lerp"]
    assert peer["ms"] > 0 and peer["compile_s"] > 0 and peer["eman_fused_speedup"] > 0
    assert "torch has no LARS" in lars["skipped"]["torch_compile+foreach_lerp"]
    md = (tmp_path / "c.md").read_text()
    assert "| foreach_compile | compile time |" in md and "| torch_compile+foreach_lerp | compile time |" in md
    assert "- foreach_compile on make t=fp32 s=fp32: not compiled: 9 tensors" in md
    assert "eman_fused behind torch.compile in" in md or "eman_fused ahead of torch.compile in every" in md
    assert "median of 2 round-robin rounds" in md

    from eman_fused.bench import norm
    from eman_fused.bench.common import compile_settings, prepare
    prepare(torch.device("cpu"))
    case = norm.run_case(("tiny bn+add+relu", 8, 4, True), 2, "channels_last", "fp32", torch.device("cpu"))
    peer = case["methods"]["eager_compile"]
    assert peer["fwd_ms"] > 0 and peer["bwd_ms"] > 0 and peer["bwd_speedup"] > 0, peer
    assert peer["compile_fwd_s"] > 0 and peer["compile_bwd_s"] > 0
    text = norm.markdown({"environment": result["environment"], "copy_GBps": 1.0, "batch": 2,
                          "compile": compile_settings(True, 1000), "cases": [case]})
    assert "| compile fwd | compile bwd | compile time (fwd + bwd) |" in text


def test_bench_host_overhead(tmp_path):
    """--ops host on tiny sizes: every eman_fused row and alternative timed in µs per call, the
    compiled peer timed where the size is within --compile-max-tensors and said why where not,
    the goals and their verdict in the table."""
    out = cli("bench", "--ops", "host", "--host-sizes", "8,16", "--device", "cpu", "--compile-max-tensors", "8",
              "--repeats", "2", "--json", str(tmp_path / "h.json"), "--markdown", str(tmp_path / "h.md"))
    assert out.returncode == 0, out.stderr
    host = json.loads((tmp_path / "h.json").read_text())["host"]
    assert [c["tensors"] for c in host["cases"]] == [8, 16] and host["sizes"] == [8, 16]
    small, large = host["cases"]
    assert small["params"] == 5 and large["params"] == 10  # Linear + BN pairs, topped up with Linear(1, 1)
    from eman_fused.bench.host import ROWS
    for case in host["cases"]:
        for name, _, alts in ROWS:
            for method in (name, *alts):
                if method == "foreach_compile" or method.startswith("timm") and "error" in case["methods"][method]:
                    continue
                row = case["methods"][method]
                assert row["us"] > 0 and len(row["runs_ms"]) == 2, (case["tensors"], method, row)
    peer = small["methods"]["foreach_compile"]
    assert peer["us"] > 0 and peer["compile_s"] > 0 and peer["graph_breaks"] == 0
    assert "16 tensors > --compile-max-tensors 8" in large["methods"]["foreach_compile"]["skipped"]
    md = (tmp_path / "h.md").read_text()
    assert "| tensors | eman_fused | µs per call | ns per tensor | goal | met |" in md
    assert "| 8 | SGD(teacher=).step (5 params) | **" in md and "≤ 15.1 µs" in md  # 15 µs + 10 ns x 5
    assert "foreach_compile: not compiled" in md and "- foreach_compile at 16 tensors: not compiled" in md
    assert "[host 2/2] 16 one-element tensors" in out.stderr


def test_bench_default_run_includes_a_short_host_table():
    import argparse

    from eman_fused.bench import cli as bench_cli, host
    ap = argparse.ArgumentParser()
    bench_cli.add_arguments(ap)
    assert bench_cli.selected(ap.parse_args(["--device", "cpu"])) == (["ema", "host"], list(host.SUMMARY_SIZES))
    assert bench_cli.selected(ap.parse_args(["--ops", "host", "--device", "cpu"])) == (["host"],
                                                                                     list(host.HOST_SIZES))
    assert bench_cli.selected(ap.parse_args(["--ops", "host", "--host-sizes", "8,16"]))[1] == [8, 16]
    # On a GPU too: there the host table is wall-clock per call (common.wall_timer).
    assert bench_cli.selected(ap.parse_args(["--device", "cuda", "--quiet"]))[0] == ["ema", "host"]


def test_wall_timer_on_cuda_times_calls_between_synchronizes(monkeypatch):
    """The CUDA host table's timer: CALLS_PER_SYNC calls, then a synchronize, per sample, the
    sample divided by the calls (checked here with a fake synchronize: no GPU needed)."""
    from eman_fused.bench import common
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("sync"))
    clock = iter(range(0, 1000, 4))  # each perf_counter call 4 s later
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    times = common.wall_timer(torch.device("cuda"))(lambda: events.append("call"), 2)
    per = ["sync"] + ["call"] * common.CALLS_PER_SYNC + ["sync"]
    assert events == per * 2
    assert times == [4 / common.CALLS_PER_SYNC] * 2


def test_bench_refuses_unknown_ops():
    out = cli("bench", "--ops", "ema,layernorm", "--device", "cpu")
    assert out.returncode != 0 and "layernorm" in out.stderr


def test_check_covers_the_fused_optimizers_and_fails_when_wrong(tiny_json):
    n = len(backends_for(torch.device("cpu")))  # the C++ kernels, and the Triton interpreter
    ok = cli("check", "--model", f"{tiny_json},tiny_model:make", "--device", "cpu", "--ops", "optim")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # 2 models x (sgd, sgd_dampening, adamw, adamw_tensor, lars, lars_you2017) per backend
    assert f"{12 * n} passed, 0 failed" in ok.stdout
    for broken in backends_for(torch.device("cpu")):
        bad = cli("check", "--model", str(tiny_json), "--device", "cpu", "--ops", "optim",
                  env={"EMAN_FUSED_CHECK_FAULT": broken})
        assert bad.returncode == 1 and f"{6 * (n - 1)} passed, 6 failed" in bad.stdout


def test_bench_optim(tiny_json, tmp_path):
    out = cli("bench", "--ops", "optim", "--model", str(tiny_json), "--device", "cpu", "--no-compile",
              "--json", str(tmp_path / "o.json"))
    assert out.returncode == 0, out.stderr
    cases = json.loads((tmp_path / "o.json").read_text())["optim"]["cases"]
    assert [c["case"] for c in cases] == ["tiny sgd", "tiny adamw", "tiny lars", "tiny lars_you2017"]
    assert set(cases[0]["methods"]) == {"eman_fused", "torch+EMATeacher", "torch_foreach+EMATeacher",
                                        "torch_fused+EMATeacher", "torch+foreach_lerp"}
    assert set(cases[2]["methods"]) == set(cases[3]["methods"]) == {"eman_fused", "eager_lars+EMATeacher"}
    tensors = cli("bench", "--ops", "optim", "--model", str(tiny_json), "--device", "cpu", "--optim",
                  "adamw_tensor", "--no-compile", "--json", str(tmp_path / "t.json"))
    assert tensors.returncode == 0, tensors.stderr
    case, = json.loads((tmp_path / "t.json").read_text())["optim"]["cases"]
    assert case["case"] == "tiny adamw_tensor" and "torch_foreach+EMATeacher" in case["skipped"]
    assert all(m["ms"] > 0 for m in case["methods"].values())
    for c in cases:
        assert all(m["ms"] > 0 and m["eman_fused_speedup"] > 0 for m in c["methods"].values())


def test_bench_posthoc_measures_every_arm_or_says_why_not(tiny_json, tmp_path):
    from eman_fused.bench import posthoc
    result = posthoc.main(["--model", str(tiny_json), "--k", "2", "--dtypes", "fp32:fp32,bf16:fp32",
                           "--device", "cpu", "--json", str(tmp_path / "p.json"),
                           "--markdown", str(tmp_path / "p.md")])
    same, mixed = result["cases"]
    assert same["bytes_ratio_fused_vs_separate"] < 1
    for case, methods in ((same, ("eman_fused_posthoc", "k_ema_update", "k_foreach_lerp")),
                          (mixed, ("eman_fused_posthoc", "k_ema_update"))):
        for m in methods:
            assert case["methods"][m]["ms"] > 0 and case["methods"][m]["GB/s"] > 0, (case["case"], m)
    assert "error" in mixed["methods"]["k_foreach_lerp"]  # torch's lerp takes one dtype
    try:
        import ema_pytorch  # noqa: F401
        assert same["methods"]["ema_pytorch"]["ms"] > 0
    except ImportError:
        assert "not installed" in same["methods"]["ema_pytorch"]["error"]
    # ema-pytorch keeps its profiles in the model's dtype: a bf16 profile of an fp32 model is
    # reported as not measured, with the reason.
    assert "model's dtype" in mixed["methods"]["ema_pytorch"]["error"]
    md = (tmp_path / "p.md").read_text()
    assert "not measured" in md and "ema_pytorch on tiny K=2 p=bf16 s=fp32" in md


def test_bench_norm_forward_and_backward(tmp_path):
    out = cli("bench", "--ops", "norm", "--device", "cpu", "--batch", "1", "--no-compile",
              "--json", str(tmp_path / "n.json"))
    assert out.returncode == 0, out.stderr
    norm = json.loads((tmp_path / "n.json").read_text())["norm"]
    assert len(norm["cases"]) == 20  # 5 ResNet-50 sites x 2 layouts x 2 dtypes
    for case in norm["cases"]:
        for method in ("eman_fused", "eager"):
            row = case["methods"][method]
            assert row["fwd_ms"] > 0 and row["bwd_ms"] > 0 and row["fwd_GB/s"] > 0
        assert case["methods"]["eager"]["fwd_speedup"] > 0
    assert "| stem bn1+relu channels_last bf16 |" in out.stdout


def test_model_specs():
    name, table = shapes.load_table("tiny_model:make")
    assert name == "make"
    kinds = {n: k for n, _, k in table}
    assert kinds["1.running_mean"] == "buffer" and kinds["1.num_batches_tracked"] == "counter"
    assert kinds["0.weight"] == "param"
    with pytest.raises(ValueError, match="unknown model"):
        shapes.load_table("alexnet")


def test_readme_performance_tables_are_rendered_from_committed_results():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "results" / "render.py"), "--check"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
