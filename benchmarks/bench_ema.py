"""The EMA benchmark: `python benchmarks/bench_ema.py [options]` is `python -m eman_fused bench`
(see eman_fused/bench.py for what is measured and how)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eman_fused.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
