#!/usr/bin/env bash
# All set-up on a fresh machine, idempotent: .venv, pinned packages, the extension built in
# place (CUDA kernels too when nvcc is found: /usr/local/cuda, or CUDA_HOME).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ "${EMAN_FUSED_SETUP_INPLACE:-1}" = 1 ]; then  # scripts/test.sh builds a wheel instead
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" python setup.py -q build_ext --inplace
  python -c "import eman_fused; [print(' ', b) for b in eman_fused.backends().values()]"
fi
