"""The optimizer benchmark: `python benchmarks/bench_optim.py [options]` (eman_fused/bench/optim.py
says what is measured and how; also `python -m eman_fused bench --ops optim`).
Run with eman_fused importable (installed, or `PYTHONPATH=.` from the repository root)."""
from eman_fused.bench.optim import main

if __name__ == "__main__":
    main()
