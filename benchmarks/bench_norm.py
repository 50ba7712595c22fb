"""The eman_norm benchmark: `python benchmarks/bench_norm.py [options]` is
`python -m eman_fused bench --ops norm` (see eman_fused/bench_norm.py for what is measured)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eman_fused.bench import main  # noqa: E402

if __name__ == "__main__":
    main(["--ops", "norm", *sys.argv[1:]])
