"""The whole-teacher-step benchmark: `python benchmarks/bench_teacher.py [options]`
(eman_fused/bench/teacher.py says what is measured and how).
Run with eman_fused importable (installed, or `PYTHONPATH=.` from the repository root)."""
from eman_fused.bench.teacher import main

if __name__ == "__main__":
    main()
