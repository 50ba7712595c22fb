"""Line coverage of the CUDA sources (csrc/**/*.cu, *.cuh) by the emulated tests, from gcov's data of the emulated
build (build.py compiles the kernels with --coverage at -O0)."""
from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from . import build

GLOBAL_KERNEL = re.compile(
    r"__global__\s+(?:void\s+)?(?:__launch_bounds__\s*\([^)]*\)\s*)?(?:void\s+)?(\w+)\s*\(")


def kernels_in_sources() -> dict[str, Path]:
    """Every __global__ function named in csrc/**/*.cu -> its file."""
    found = {}
    for src in build.kernel_sources():
        text = re.sub(r"//[^\n]*", "", src.read_text())
        for name in GLOBAL_KERNEL.findall(text):
            found[name] = src
    return found


@dataclass
class Coverage:
    lines: dict[Path, dict[int, int]] = field(default_factory=dict)  # file -> line -> count
    functions: dict[str, int] = field(default_factory=dict)  # demangled name -> calls

    @property
    def executed(self) -> int:
        return sum(sum(c > 0 for c in f.values()) for f in self.lines.values())

    @property
    def total(self) -> int:
        return sum(len(f) for f in self.lines.values())

    @property
    def percent(self) -> float:
        return 100.0 * self.executed / self.total if self.total else 0.0

    def missed(self) -> dict[str, list[int]]:
        return {str(p.relative_to(build.ROOT)): sorted(n for n, c in f.items() if c == 0)
                for p, f in self.lines.items()}

    def kernel_calls(self, kernel: str) -> int:
        """Executions of every instantiation of `kernel` (a __global__ function's name)."""
        pat = re.compile(rf"(?:^|::){re.escape(kernel)}(?:<[^(]*>)?\(")
        return sum(n for name, n in self.functions.items() if pat.search(name))


_state: dict[str, Coverage] = {}


def start(emu) -> None:
    """Drops gcov data of earlier processes: gcov would add this session's counts to them."""
    for f in Path(emu.dir).glob("*.gcda"):
        f.unlink(missing_ok=True)  # another pytest-xdist worker may have dropped it first
    _state.clear()


def measure(emu) -> Coverage:
    """Writes this process's counts (gcov dump) and reads them back for the csrc .cu files."""
    emu.lib.emu_coverage_dump()
    cov = Coverage()
    sources = {p.resolve() for p in build.coverage_sources()}
    for gcda in sorted(Path(emu.dir).glob("csrc__*.gcda")):
        r = subprocess.run([build.GCOV, "--json-format", "--stdout", str(gcda)], cwd=emu.dir,
                           capture_output=True, text=True, check=True)
        for doc in r.stdout.splitlines():
            if not doc.strip():
                continue
            for f in json.loads(doc)["files"]:
                path = Path(f["file"])
                path = (path if path.is_absolute() else Path(emu.dir) / path).resolve()
                if path not in sources:
                    continue
                lines = cov.lines.setdefault(path, {})
                for ln in f["lines"]:
                    n = ln["line_number"]
                    lines[n] = lines.get(n, 0) + ln["count"]
                for fn in f["functions"]:
                    name = fn.get("demangled_name", fn["name"])
                    cov.functions[name] = cov.functions.get(name, 0) + fn["execution_count"]
    for p in sources:  # listed even without executable lines (a header of macros)
        cov.lines.setdefault(p, {})
    _state["last"] = cov
    return cov


def summary_line(emu) -> str:
    try:
        cov = measure(emu)
    except (OSError, subprocess.CalledProcessError, ValueError) as e:  # no gcov, unreadable data
        return f"emulated CUDA line coverage: not measured ({type(e).__name__}: {e})"
    return f"emulated CUDA line coverage: {cov.percent:.1f}%"
