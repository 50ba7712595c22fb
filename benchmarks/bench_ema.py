"""The EMA benchmark: `python benchmarks/bench_ema.py [options]` is `python -m eman_fused bench`
(eman_fused/bench/ema.py says what is measured and how).
Run with eman_fused importable (installed, or `PYTHONPATH=.` from the repository root)."""
from eman_fused.bench.cli import main

if __name__ == "__main__":
    main()
