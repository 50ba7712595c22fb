"""The host-overhead benchmark: `python benchmarks/bench_host.py [options]` is
`python -m eman_fused bench --ops host` (eman_fused/bench/host.py says what is measured and how).
Run with eman_fused importable (installed, or `PYTHONPATH=.` from the repository root)."""
import sys

from eman_fused.bench.cli import main

if __name__ == "__main__":
    main(["--ops", "host", *sys.argv[1:]])
