#!/usr/bin/env bash
# Set-up (scripts/setup.sh) then the EMA benchmark on the embedded default models
# (ResNet-50, ViT-B/16, 5,000 small tensors). Results also go to bench_out/.
# Extra arguments go to benchmarks/bench_ema.py (e.g. --compile, --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m eman_fused bench --model resnet50,vit_b16,many_small \
  --json bench_out/ema.json --markdown bench_out/ema.md --plot bench_out/ema.png "$@"
