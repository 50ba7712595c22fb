"""Renders README.md's performance tables from the committed results in benchmarks/results/
(JSON written by `python -m eman_fused bench --json`, benchmarks/bench_optim.py and
benchmarks/bench_teacher.py): only measured numbers, each table
with its device, date, versions and commit; GPU results first. Of the files of one series
(the same name up to its date, e.g. ema_cpu_2026-11-23.json and ema_cpu_2026-12-02.json) only
the newest is rendered; the older ones stay committed as the record of earlier runs.

  python benchmarks/results/render.py          # rewrite the block in README.md
  python benchmarks/results/render.py --check  # exit 1 if README.md is out of date
(eman_fused importable: installed, or PYTHONPATH=. from the repository root)
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from eman_fused.bench.ema import markdown
from eman_fused.bench.host import markdown as host_markdown
from eman_fused.bench.norm import markdown as norm_markdown
from eman_fused.bench.optim import markdown as optim_markdown
from eman_fused.bench.posthoc import markdown as posthoc_markdown
from eman_fused.bench.teacher import markdown as teacher_markdown

ROOT = Path(__file__).resolve().parents[2]

START = "<!-- perf-tables:start (rendered by benchmarks/results/render.py) -->"
END = "<!-- perf-tables:end -->"


DATED = re.compile(r"^(?P<series>.+)_(?P<date>\d{4}-\d{2}-\d{2})$")


def newest_of_each_series(paths) -> list[Path]:
    """The newest file of each series: files in one folder whose names differ only in their
    trailing _YYYY-MM-DD date. Undated names are a series of their own."""
    newest = {}
    for path in paths:
        match = DATED.match(path.stem)
        key = (path.parent, match["series"] if match else path.stem)
        date = match["date"] if match else ""
        if key not in newest or date > newest[key][0]:
            newest[key] = (date, path)
    return sorted(path for _, path in newest.values())


def render(results_dir: Path = ROOT / "benchmarks" / "results") -> str:
    blocks = {"GPU": [], "CPU": []}
    for path in newest_of_each_series(results_dir.rglob("*.json")):
        data = json.loads(path.read_text())
        if "environment" not in data:
            continue  # e.g. a tuning sweep
        kind = "GPU" if data["environment"]["device"].startswith("cuda") else "CPU"
        where = f"**{kind}** (`{path.relative_to(ROOT)}`): "
        if data.get("op") == "optim":  # benchmarks/bench_optim.py
            blocks[kind].append(where + optim_markdown(data))
            continue
        if data.get("op") == "posthoc":  # benchmarks/bench_posthoc.py
            blocks[kind].append(where + posthoc_markdown(data))
            continue
        if data.get("op") == "teacher":  # benchmarks/bench_teacher.py
            blocks[kind].append(where + teacher_markdown(data))
            continue
        if "cases" not in data:
            continue
        if "optim" in data:  # python -m eman_fused bench --ops optim
            blocks[kind].append(where + optim_markdown(data["optim"]))
        if data["cases"]:
            blocks[kind].append(f"**{kind}** (`{path.relative_to(ROOT)}`): " + markdown(data))
        if "norm" in data:
            blocks[kind].append(f"**{kind}** (`{path.relative_to(ROOT)}`): " + norm_markdown(data["norm"]))
        if "host" in data:  # python -m eman_fused bench --ops host
            blocks[kind].append(where + host_markdown(data["host"]))
    if not blocks["GPU"]:
        blocks["GPU"].append("**GPU**: no results committed yet; `bash scripts/gpu_check.sh` on a "
                             "GPU machine writes them here.\n")
    return "\n".join(blocks["GPU"] + blocks["CPU"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    readme = (ROOT / "README.md").read_text()
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    updated = f"{head}{START}\n{render()}{END}{tail}"
    if args.check:
        if updated != readme:
            print("README.md's performance tables are out of date: run "
                  "python benchmarks/results/render.py", file=sys.stderr)
            return 1
        return 0
    (ROOT / "README.md").write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
