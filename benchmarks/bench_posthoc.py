"""The post-hoc EMA benchmark: `python benchmarks/bench_posthoc.py [options]`
(eman_fused/bench/posthoc.py says what is measured and how).
Run with eman_fused importable (installed, or `PYTHONPATH=.` from the repository root)."""
from eman_fused.bench.posthoc import main

if __name__ == "__main__":
    main()
