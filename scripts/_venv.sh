# Helpers sourced by scripts/test.sh and scripts/compat.sh: fresh virtual environments filled
# from a local wheelhouse, and a copy of the test suite outside the source tree.
#
# pip here may not keep what it downloads between runs, and a torch with its CUDA libraries is
# ~3 GB: each requirement set is first downloaded (pip download, which skips files already
# there) into $EMAN_FUSED_WHEELHOUSE, then installed from it alone (--no-index), so a second run
# on the same machine downloads nothing and an install cannot pick up anything unlisted.

EMAN_FUSED_WHEELHOUSE="${EMAN_FUSED_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/eman_fused/wheels}"

# fresh_venv DIR: a new, empty virtual environment at DIR (an old one is removed).
fresh_venv() {
  rm -rf "$1"
  "${PYTHON:-python3}" -m venv "$1"
}

# wheelhouse_install DIR ARG...: pip install ARG... into the venv at DIR, through the
# wheelhouse. ARGs are pip's (requirements, -c FILE, a built wheel with extras); no sdists: pip
# would have to build one to read its dependencies.
wheelhouse_install() {
  local venv="$1"; shift
  mkdir -p "$EMAN_FUSED_WHEELHOUSE"
  "$venv/bin/python" -m pip download -q --disable-pip-version-check -d "$EMAN_FUSED_WHEELHOUSE" "$@"
  rm -f "$EMAN_FUSED_WHEELHOUSE"/eman_fused-*  # a local wheel is copied there too: not a cache entry
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-compile --no-index \
    --find-links "$EMAN_FUSED_WHEELHOUSE" "$@"
}

# stage_suite SRC DEST: the tests and what they read (examples, benchmark results, scripts and
# setup.py for gpu_check.sh --dry-run, README,
# pytest's configuration) copied to DEST, which holds no eman_fused/ directory: run from DEST,
# `import eman_fused` can only find the installed package.
stage_suite() {
  rm -rf "$2"
  mkdir -p "$2"
  (cd "$1" && tar -cf - --exclude=__pycache__ tests examples benchmarks scripts setup.py README.md pyproject.toml) | tar -xf - -C "$2"
  if [ -e "$2/eman_fused" ]; then
    echo "stage_suite: $2/eman_fused exists; the source package would shadow the installed one" >&2
    return 1
  fi
}
