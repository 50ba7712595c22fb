"""The eman_norm benchmark: `python benchmarks/bench_norm.py [options]` is
`python -m eman_fused bench --ops norm` (eman_fused/bench/norm.py says what is measured).
Run with eman_fused importable (installed, or `PYTHONPATH=.` from the repository root)."""
import sys

from eman_fused.bench.cli import main

if __name__ == "__main__":
    main(["--ops", "norm", *sys.argv[1:]])
