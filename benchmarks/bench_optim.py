"""The optimizer benchmark: `python benchmarks/bench_optim.py [options]` (see
eman_fused/bench_optim.py for what is measured and how; also `python -m eman_fused bench --ops optim`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eman_fused.bench_optim import main  # noqa: E402

if __name__ == "__main__":
    main()
