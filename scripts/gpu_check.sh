#!/usr/bin/env bash
# One call on a machine with a GPU and this repository: build with CUDA, run every test
# (the GPU ones included), `check` every backend on the GPU, run the benchmark and the Triton
# tuning sweep, and write files that can be committed as they are, then re-render README.md:
#   $RESULTS/gpu_tests.log, check_<gpu>_<date>.log, ema_<gpu>_<date>.{json,md,png},
#   optim_<gpu>_<date>.{json,md}, teacher_<gpu>_<date>.{json,md}, tune_triton_ema_<gpu>_<date>.json
# Uses the Python it is given ($PYTHON, default python3) with its own torch: GPU machines
# may have no network, so nothing is installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
RESULTS="${1:-benchmarks/results}"
mkdir -p "$RESULTS"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export EMAN_FUSED_BUILD_CUDA=1 PYTHONUNBUFFERED=1
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; print(torch.__version__, torch.cuda.get_device_name())"
MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PYTHON" setup.py -q build_ext --inplace
status=0  # a failing test must not cost the lease its numbers: go on, fail at the end
"$PYTHON" -m pytest tests -q -rs 2>&1 | tee "$RESULTS/gpu_tests.log" || status=1
name=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
stamp="ema_${name}_$(date +%Y-%m-%d)"
"$PYTHON" -m eman_fused check --device cuda --ops ema,norm --model resnet50,vit_b16,many_small 2>&1 \
  | tee "$RESULTS/check_${name}_$(date +%Y-%m-%d).log" || status=1
"$PYTHON" -m eman_fused bench --device cuda --ops ema,norm --model resnet50,vit_b16,many_small --dtypes fp32:fp32,fp32:bf16,bf16:bf16 --compile \
  --json "$RESULTS/$stamp.json" --markdown "$RESULTS/$stamp.md" --plot "$RESULTS/$stamp.png"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/bench_optim.py --device cuda --param-dtype fp32,bf16 --json "$RESULTS/optim_${name}_$(date +%Y-%m-%d).json" \
  --markdown "$RESULTS/optim_${name}_$(date +%Y-%m-%d).md" || status=1
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/bench_teacher.py --device cuda --json "$RESULTS/teacher_${name}_$(date +%Y-%m-%d).json" \
  --markdown "$RESULTS/teacher_${name}_$(date +%Y-%m-%d).md" || status=1
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/tune_triton_ema.py --json "$RESULTS/tune_triton_ema_${name}_$(date +%Y-%m-%d).json"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/results/render.py
exit $status
