#!/usr/bin/env bash
# Set-up (scripts/setup.sh) then the EMA benchmark on the embedded default models
# (ResNet-50, ViT-B/16, 5,000 small tensors), against torch.compile of the foreach update as the
# measured peer (compiled before it is timed: about a minute per ResNet-50 / ViT-B/16 case on a
# 2-thread CPU; the 5,000-tensor case is not compiled, and the table says why). Results also go
# to bench_out/. Extra arguments go to `python -m eman_fused bench` (e.g. --no-compile,
# --repeats 5, --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m eman_fused bench --model resnet50,vit_b16,many_small \
  --json bench_out/ema.json --markdown bench_out/ema.md --plot bench_out/ema.png "$@"
