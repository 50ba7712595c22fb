#!/usr/bin/env bash
# One more torch of the declared range (pyproject.toml), as a user of that torch installs us:
# a fresh venv with that torch (its own triton), eman_fused built against it from dist/'s sdist
# (CPU kernels: the CUDA compile is proven by scripts/test.sh), then the smoke set from a copy
# of tests/ outside the source tree: every op (EMA, EMAN norm, SGD/AdamW/LARS steps) on every
# backend here (C++ CPU and Triton under its interpreter), the teacher, the optimizers, the
# version-dependent paths, and `python -m eman_fused check`.
#   bash scripts/compat.sh TORCH_VERSION [REQUIREMENT...]     (after scripts/test.sh built dist/)
#   e.g. bash scripts/compat.sh 2.11.0 torchvision==0.26.0
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
# shellcheck source=scripts/_venv.sh
. scripts/_venv.sh
version="$1"; shift
sdist=$(ls "$root"/dist/eman_fused-*.tar.gz)
work=$(mktemp -d "${TMPDIR:-/tmp}/eman_fused_compat.XXXXXX")
trap 'rm -rf "$work"' EXIT
py="$work/venv/bin/python"

t0=$(date +%s)
fresh_venv "$work/venv"
# ===: exactly this release (a bare == would also take a local +cpu build, without triton).
wheelhouse_install "$work/venv" "torch===$version" "$@" pytest pytest-xdist hypothesis expecttest numpy ninja setuptools wheel
t1=$(date +%s)
# --no-index: pip may not swap torch for another one to satisfy our declared range; the check
# after it proves the torch under test is the one asked for.
EMAN_FUSED_BUILD_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$py" -m pip install -q --disable-pip-version-check \
  --no-compile --no-build-isolation --no-index --find-links "$EMAN_FUSED_WHEELHOUSE" "$sdist"
t2=$(date +%s)
"$py" -m pip check
"$py" -c "import sys, torch; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '$version' else f'torch {v} installed, $version asked for')"
echo "torch $version: venv $(( t1 - t0 )) s, eman_fused built from $(basename "$sdist") in $(( t2 - t1 )) s"

stage_suite "$root" "$work/suite"
cd "$work/suite"
export EMAN_FUSED_SOURCE_TREE="$root" PYTHONDONTWRITEBYTECODE=1 TRITON_INTERPRET=1
"$py" -m eman_fused info
# Every backend of the smoke set is really there (a missing one would only skip its tests).
"$py" -c "import eman_fused, sys; b = eman_fused.backends(); sys.exit(next((f'{n}: {b[n].detail}' for n in ('cpu', 'triton') if not b[n].available), 0))"
# The CLI check: EMA and the three optimizers on every backend (C++ and the Triton interpreter)
# over a small model; EMAN norm over the ResNet-50 sites on the C++ kernels (the interpreter
# would take minutes there; the norm tests below run it).
PYTHONPATH=tests "$py" -m eman_fused check --model tiny_model:make --ops ema,optim
TRITON_INTERPRET=0 "$py" -m eman_fused check --ops norm | tail -1
SMOKE=(
  tests/test_packaging.py tests/test_triton_compat.py tests/test_schedules.py
  tests/test_ema_triton.py tests/test_optim_triton.py tests/test_optim.py
  tests/test_teacher.py::test_matches_the_official_eman_update_over_20_training_steps
  tests/test_teacher.py::test_teacher_is_frozen_converted_and_outputs_no_grad
  tests/test_teacher.py::test_include_exclude_selects_the_ema_tensors
  tests/test_teacher.py::test_teacher_dtype
  tests/test_teacher.py::test_state_dict_loads_into_a_torchvision_resnet_and_back
  tests/test_teacher.py::test_structure_change_is_seen_at_the_next_update
  tests/test_teacher.py::test_compiled_student_and_compiled_submodule_match_every_tensor
  tests/test_teacher.py::test_update_traces_with_fullgraph_compile_and_no_recompiles
  tests/test_ema.py::test_every_dtype_pair_and_size
  tests/test_ema.py::test_momentum_one_is_bit_identical_and_zero_copies
  tests/test_ema.py::test_integer_tensors_are_copied_in_the_same_call
  tests/test_ema.py::test_memory_around_the_tensors_is_untouched
  tests/test_ema.py::test_bad_input_raises_before_any_write
  tests/test_ema.py::test_opcheck_float_and_tensor_momentum
  tests/test_ema.py::test_compiles_fullgraph_without_graph_breaks
  tests/test_ema.py::test_backends_report_and_no_silent_fallback
  tests/test_norm.py::test_gradients_match_eager_autograd
  tests/test_norm.py::test_relu_passes_nan_and_negative_zero_like_torch
  tests/test_norm.py::test_opcheck_forward_and_backward
  tests/test_norm.py::test_opcheck_triton_ops
  tests/test_norm.py::test_compiles_fullgraph
  tests/test_norm.py::test_bad_input
  tests/test_norm.py::test_module_loads_batchnorm_state_and_matches_eval_bn_in_train_mode_too
  tests/test_norm.py::test_convert_to_eman_on_a_resnet
)
"$py" -m pytest -q -rs -n "${EMAN_FUSED_TEST_WORKERS:-$(nproc)}" "${SMOKE[@]}"
