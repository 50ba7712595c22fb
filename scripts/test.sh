#!/usr/bin/env bash
# Set-up (scripts/setup.sh), then the whole test suite against the package as a user installs it:
# a wheel and an sdist built from this tree into dist/ (with .venv's torch, --no-build-isolation),
# the wheel installed with its [test,bench,lightning,diffusers] extras into a fresh venv, and pytest run there from a
# copy of tests/ outside the source tree, so only the installed package can be imported
# (tests/test_packaging.py proves it, and that every file of eman_fused/ is in the wheel).
# Extra arguments go to pytest; the suite runs on one pytest-xdist worker per core
# (EMAN_FUSED_TEST_WORKERS=N sets how many, 0 none), the emulated CUDA tests in one process.
# EMAN_FUSED_TEST_LARGE=1 then also runs the `large` tier (several GiB per test, deselected by
# default) with its memory check.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
# The venv only: the wheel below compiles the extension (an in-place build first would compile
# it twice: the wheel build does not reuse its objects).
EMAN_FUSED_SETUP_INPLACE=0 bash scripts/setup.sh
# shellcheck source=scripts/_venv.sh
. scripts/_venv.sh

t0=$(date +%s)
rm -rf dist build/lib.*  # build/lib.*: modules deleted from the tree must not reach the wheel
MAX_JOBS="${MAX_JOBS:-$(nproc)}" .venv/bin/python -m pip wheel -q --disable-pip-version-check \
  --no-build-isolation --no-deps -w dist .
.venv/bin/python -c 'from setuptools import build_meta; build_meta.build_sdist("dist")' >/dev/null
wheel=$(ls dist/eman_fused-*.whl)
echo "built $(ls dist | tr '\n' ' ')in $(( $(date +%s) - t0 )) s"

work=$(mktemp -d "${TMPDIR:-/tmp}/eman_fused_test.XXXXXX")
trap 'rm -rf "$work"' EXIT
t0=$(date +%s)
fresh_venv "$work/venv"
# requirements-dev.txt pins the versions; the extras say what is installed.
wheelhouse_install "$work/venv" -c requirements-dev.txt "$wheel[test,bench,lightning,diffusers]"
echo "fresh venv with $(basename "$wheel")[test,bench,lightning,diffusers] in $(( $(date +%s) - t0 )) s"
stage_suite "$root" "$work/suite"

cd "$work/suite"
# EMAN_FUSED_REQUIRE_EXTRAS: the integration tests fail, not skip, without Lightning / diffusers.
export EMAN_FUSED_SOURCE_TREE="$root" PYTHONDONTWRITEBYTECODE=1 EMAN_FUSED_REQUIRE_EXTRAS=1
"$work/venv/bin/python" -m eman_fused info
# One pytest-xdist worker per core (EMAN_FUSED_TEST_WORKERS overrides; 0 runs in this process),
# then the emulated CUDA tests in one process of their own: their coverage check reads what
# that process executed (tests/emulated/test_emu_coverage.py).
workers="${EMAN_FUSED_TEST_WORKERS:-$(nproc)}"
"$work/venv/bin/python" -m pytest tests -n "$workers" --ignore=tests/emulated "$@"
"$work/venv/bin/python" -m pytest tests/emulated "$@"
if [ "${EMAN_FUSED_TEST_LARGE:-0}" = 1 ]; then
  # On purpose, in a process of their own (the peak-RSS check is exact there), and a test
  # that cannot get its memory fails instead of skipping.
  EMAN_FUSED_REQUIRE_LARGE=1 "$work/venv/bin/python" -m pytest tests -m large -q -rs
fi
