#!/usr/bin/env bash
# The GPU check, sized for the lease we get: 15 GPU-minutes in all (machine start and copying the
# tree included) and 10 minutes per command, so this is ONE call of at most 8.5 minutes, the build
# included, on the machine's own software (its python3, torch, triton; no network):
#
#   EMAN_FUSED_COMMIT=<sha> bash scripts/gpu_check.sh RESULTS_DIR   on the GPU machine (the
#                                                    commit sent: the copy's git may not know it)
#   bash scripts/gpu_check.sh --dry-run RESULTS_DIR  anywhere, no GPU: checks the environment and
#                                                    the test selections, prints the steps
#
# Steps, each in a time box and never past the budget (BUDGET_S, default 500 s, counted from the
# start; a step that would not fit is skipped and says so):
#   env        versions, GPU, nvcc, compute-sanitizer, the Python modules the tests import
#   build      the extension with the CUDA kernels for sm_90 only, MAX_JOBS = cores; then the
#              compiler, ldd of the extension and torch's ABI flag into build.log
#   gpu-tests  the tests that run on the GPU: CUDA and Triton backends, GPU-only tests
#   crash-trace  only when a test worker crashed: the first crashed test's file again, one
#              process, under cuda-gdb (a C++ backtrace) with glibc's heap checks on
#   memcheck   compute-sanitizer memcheck over the CUDA kernel tests
#   racecheck  compute-sanitizer racecheck over the kernels with shared memory (norm, LARS)
#   check      python -m eman_fused check on every backend of the device (ema, norm, optim)
#   bench-*    the benchmarks, without --compile; bench-host: wall-clock µs per call of the EMA
#              and optimizer steps on one-element CUDA tensors (the host path on a GPU)
# Every step's log, the results (JSON / Markdown / PNG) and summary.md land in RESULTS_DIR; the
# summary table is printed last. Exit 0 when every step passed (a sanitizer the machine refuses
# counts as "refused", with its note), 1 otherwise, 2 on a usage error.
#
# Packages the machine lacks can travel as wheels: put them in .whl/ at the repository root
# (the device tool's README says how); they are installed into a temporary target first.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -ne 1 ] || [ "${1:0:1}" = "-" ]; then
  echo "usage: bash scripts/gpu_check.sh [--dry-run] RESULTS_DIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
RESULTS=$(cd "$1" && pwd)
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-500}"
START=$(date +%s)
CORES=$(nproc)
export MAX_JOBS="${MAX_JOBS:-$CORES}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export EMAN_FUSED_BUILD_CUDA=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # benchmarks/*.py import eman_fused from here
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
SANITIZER=$(command -v compute-sanitizer || { [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/compute-sanitizer" ] && echo "$CUDA_HOME/bin/compute-sanitizer"; } || true)
STAMP="$(date +%Y-%m-%d)"

# The test selections (pytest -k over these files); the dry run checks each selects something.
GPU_TESTS_K="cuda or triton or gpu"
KERNEL_TESTS=(tests/test_ema.py tests/test_norm.py tests/test_optim.py)
MEMCHECK_K="cuda and (every_dtype_pair or momentum_as_tensor or integer_tensors or channels_last or forward_matches or gradients_match or long_rows or empty or kernels_match)"
RACECHECK_K="cuda and (gradients_match or long_rows or kernels_match)"

NAMES=() STATUS=() SECS=() NOTES=()
record() { NAMES+=("$1"); STATUS+=("$2"); SECS+=("$3"); NOTES+=("$4"); }
elapsed() { echo $(( $(date +%s) - START )); }

# step NAME BOX LOG CMD...: CMD under `timeout` for at most BOX seconds (less if the budget is
# nearly spent; 15 s are kept for the summary), its output in RESULTS/LOG.
step() {
  local name=$1 box=$2 log=$3
  shift 3
  if [ $DRY -eq 1 ]; then
    local a
    for a in "$@"; do  # scripts that moved: the plan must not name them
      case $a in *.py) if [ ! -f "$a" ]; then record "$name" fail "-" "$a does not exist"; return 0; fi ;; esac
    done
    printf '  %-13s <= %3ss  %s\n' "$name" "$box" "$*"
    record "$name" planned "-" "time box ${box} s, log $log"
    return 0
  fi
  local left=$(( BUDGET_S - $(elapsed) - 15 ))
  if [ "$left" -lt 20 ]; then
    record "$name" skipped 0 "budget spent ($(elapsed) s of $BUDGET_S)"
    return 0
  fi
  [ "$box" -gt "$left" ] && box=$left
  echo "== $name (<= ${box} s): $*"
  local t0 rc
  t0=$(date +%s)
  timeout --signal=INT --kill-after=15 "$box" "$@" > "$RESULTS/$log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  tail -n 3 "$RESULTS/$log" | sed 's/^/   /'
  if [ $rc -eq 0 ]; then record "$name" pass "$dt" "$log"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then record "$name" timeout "$dt" "stopped at ${box} s: partial, see $log"
  else record "$name" fail "$dt" "exit $rc, see $log"
  fi
}

# A sanitizer run the machine refuses (gVisor: "Device not supported", error 999) is no failure
# of ours: say so instead.
sanitizer_verdict() {
  local log="$RESULTS/$1" i=$(( ${#STATUS[@]} - 1 ))
  if [ "${STATUS[$i]}" = fail ] && grep -qiE "device not supported|not supported on this|error 999|unknown error|Target application returned an error" "$log" \
     && ! grep -qE "ERROR SUMMARY: [1-9]|Invalid __global__|Race reported" "$log"; then
    STATUS[$i]=refused
    NOTES[$i]="compute-sanitizer refused this machine (e.g. gVisor); see $1"
  fi
}

summary() {
  {
    echo "| step | result | seconds | note |"
    echo "|---|---|---:|---|"
    for i in "${!NAMES[@]}"; do
      echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECS[$i]} | ${NOTES[$i]} |"
    done
  } > "$RESULTS/summary.md"
  echo
  echo "gpu_check $( [ $DRY -eq 1 ] && echo "dry run" || echo "run"): $(elapsed) s of a ${BUDGET_S} s budget; results in $RESULTS"
  cat "$RESULTS/summary.md"
}

# ---- env ----
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/eman_fused_site .whl/*.whl && export PYTHONPATH="/tmp/eman_fused_site${PYTHONPATH:+:$PYTHONPATH}"
fi
t0=$(date +%s)
"$PY" - "$DRY" > "$RESULTS/env.txt" 2>&1 <<'EOF'
import importlib.util, os, platform, shutil, sys
dry = sys.argv[1] == "1"
need = ["torch", "triton", "pytest", "hypothesis", "pytest_benchmark", "numpy", "matplotlib",
        "torchvision", "timm", "sklearn", "ninja"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
print("python", platform.python_version(), sys.executable)
problems = []
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    print("gpu", gpu or "none visible")
    if gpu is None and not dry:
        problems.append("no GPU visible")
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build: the CUDA kernels cannot be built")
except Exception as e:  # noqa: BLE001
    problems.append(f"torch does not import: {e}")
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:  # noqa: BLE001
    print("triton: not importable:", e)
nvcc = shutil.which("nvcc") or (os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)
print("nvcc", nvcc if nvcc and os.path.exists(nvcc) else "not found")
if not (nvcc and os.path.exists(nvcc)):
    problems.append("nvcc not found (set CUDA_HOME)")
print("cores", os.cpu_count(), "MAX_JOBS", os.environ.get("MAX_JOBS"),
      "TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST"))
if missing:
    problems.append("missing Python modules: " + ", ".join(missing)
                    + " (carry wheels in .whl/, see the device tool's README)")
for p in problems:
    print("PROBLEM:", p)
sys.exit(1 if problems else 0)
EOF
env_rc=$?
echo "sanitizer ${SANITIZER:-not found}" >> "$RESULTS/env.txt"
sed 's/^/   /' "$RESULTS/env.txt"
if [ $env_rc -eq 0 ]; then record env pass $(( $(date +%s) - t0 )) "env.txt"
else
  why=$(grep PROBLEM "$RESULTS/env.txt" | head -2 | cut -c10- | tr '\n' ';')
  record env fail $(( $(date +%s) - t0 )) "${why:-$(tail -n 1 "$RESULTS/env.txt")}"
fi

if [ $DRY -eq 1 ]; then
  # The selections must still name tests (files and names move): count what each collects,
  # in one process (the test modules are imported once).
  counts=$("$PY" - "$GPU_TESTS_K" "$MEMCHECK_K" "$RACECHECK_K" "${KERNEL_TESTS[@]}" 2>/dev/null <<'EOF'
import contextlib, io, sys
import pytest
gpu_k, mem_k, race_k, *kernel_tests = sys.argv[1:]
class Count:
    n = 0
    def pytest_collection_finish(self, session):
        self.n = len(session.items)
out = []
for args in (["tests", "-m", "not emulated", "-k", gpu_k], [*kernel_tests, "-k", mem_k],
             [*kernel_tests, "-k", race_k]):
    c = Count()
    with contextlib.redirect_stdout(io.StringIO()):
        pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args], plugins=[c])
    out.append(str(c.n))
print(" ".join(out))
EOF
)
  read -r n_gpu n_mem n_race <<< "${counts:-0 0 0}"
  for sel in "gpu-tests:$n_gpu" "memcheck:$n_mem" "racecheck:$n_race"; do
    name=${sel%%:*} n=${sel##*:}
    if [ "$n" -gt 0 ]; then record "select-$name" pass "-" "$n tests collected here (more on a GPU)"
    else record "select-$name" fail "-" "the selection collects no test: update gpu_check.sh"
    fi
  done
  echo "steps on a GPU machine (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS, budget ${BUDGET_S} s):"
elif [ $env_rc -ne 0 ]; then
  summary
  exit 1
fi

# ---- build, tests, sanitizers, check, benchmarks ----
step build 120 build.log "$PY" setup.py -q build_ext --inplace
if [ $DRY -eq 0 ] && [ "${STATUS[-1]}" != pass ]; then summary; exit 1; fi
if [ $DRY -eq 0 ]; then  # what a crash in the extension would be read against
  { echo "== compiler"; "${CXX:-c++}" --version | head -1; g++ --version 2>/dev/null | head -1
    echo "== ldd"; ldd eman_fused/_C*.so
    echo "== std:: symbols the extension defines (a statically linked libstdc++ defines thousands)"
    nm -DC --defined-only eman_fused/_C*.so | grep -c " std::"
    grep CXX_RUNTIME_PRIVATE eman_fused/_build_info.py  # setup.py's verdict (eman_fused/_build_checks.py)
    "$PY" -c "import torch; print('torch CXX11 ABI', torch._C._GLIBCXX_USE_CXX11_ABI); print(torch.__config__.show())"
  } >> "$RESULTS/build.log" 2>&1
fi
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "${TEST_WORKERS:-8}")
step gpu-tests 150 gpu_tests.log "$PY" -m pytest tests -q -rs --durations=25 -p no:cacheprovider "${XDIST[@]}" \
  -m "not emulated" -k "$GPU_TESTS_K"
# A worker that crashed (a segfault) says only which test it was running: run that test's file
# once more in one process under cuda-gdb for the C++ stack, glibc's heap checks on
# (MALLOC_CHECK_=3 aborts at the first corrupted free instead of at some later allocation).
CUDA_GDB=$(command -v cuda-gdb || { [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/cuda-gdb" ] && echo "$CUDA_HOME/bin/cuda-gdb"; } || true)
crashed=""
[ $DRY -eq 0 ] && crashed=$(grep -o "crashed while running '[^']*'" "$RESULTS/gpu_tests.log" 2>/dev/null | head -1 | cut -d"'" -f2)
if [ $DRY -eq 1 ]; then
  step crash-trace 40 crash_trace.log "${CUDA_GDB:-cuda-gdb}" -q -batch -ex run -ex bt --args "$PY" -m pytest -q -p no:cacheprovider FILE
elif [ -n "$crashed" ] && [ -n "$CUDA_GDB" ]; then
  echo "first crash: $crashed" > "$RESULTS/crash_trace.log"
  step crash-trace 40 crash_trace_gdb.log env MALLOC_CHECK_=3 PYTHONFAULTHANDLER=1 "$CUDA_GDB" -q -batch \
    -ex "set pagination off" -ex run -ex bt -ex "info sharedlibrary" \
    --args "$PY" -m pytest -q -p no:cacheprovider -p no:xdist "${crashed%%::*}"
elif [ -n "$crashed" ]; then
  record crash-trace refused 0 "a worker crashed ($crashed) but cuda-gdb is not on this machine"
fi
if [ -n "$SANITIZER" ] || [ $DRY -eq 1 ]; then
  step memcheck 45 memcheck.log "${SANITIZER:-compute-sanitizer}" --tool memcheck --error-exitcode 86 \
    "$PY" -m pytest "${KERNEL_TESTS[@]}" -q -x -p no:cacheprovider -k "$MEMCHECK_K"
  [ $DRY -eq 0 ] && sanitizer_verdict memcheck.log
  step racecheck 45 racecheck.log "${SANITIZER:-compute-sanitizer}" --tool racecheck --error-exitcode 86 \
    "$PY" -m pytest "${KERNEL_TESTS[@]}" -q -x -p no:cacheprovider -k "$RACECHECK_K"
  [ $DRY -eq 0 ] && sanitizer_verdict racecheck.log
else
  record memcheck refused 0 "compute-sanitizer not found on this machine"
  record racecheck refused 0 "compute-sanitizer not found on this machine"
fi
GPU=gpu
[ $DRY -eq 0 ] && GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
step check 30 "check_${GPU}_${STAMP}.log" "$PY" -m eman_fused check --device cuda --ops ema,norm,optim \
  --model resnet50,many_small
E="$RESULTS/ema_${GPU}_${STAMP}"
step bench-ema 45 bench_ema.log "$PY" -m eman_fused bench --device cuda --ops ema,norm \
  --model resnet50,many_small --dtypes fp32:fp32,fp32:bf16 --no-compile --quiet \
  --json "$E.json" --markdown "$E.md" --plot "$E.png"
O="$RESULTS/optim_${GPU}_${STAMP}"
step bench-optim 30 bench_optim.log "$PY" benchmarks/bench_optim.py --device cuda --param-dtype fp32,bf16 --no-compile \
  --json "$O.json" --markdown "$O.md"
T="$RESULTS/teacher_${GPU}_${STAMP}"
step bench-teacher 15 bench_teacher.log "$PY" benchmarks/bench_teacher.py --device cuda \
  --json "$T.json" --markdown "$T.md"

H="$RESULTS/host_${GPU}_${STAMP}"
step bench-host 30 bench_host.log "$PY" -m eman_fused bench --device cuda --ops host --host-sizes 320 \
  --no-compile --quiet --json "$H.json" --markdown "$H.md"

summary
if [ $DRY -eq 0 ]; then
  echo "to publish: copy $RESULTS/*_${GPU}_${STAMP}.* into benchmarks/results/${GPU}/, run benchmarks/results/render.py, commit"
fi
for s in "${STATUS[@]}"; do
  case $s in pass|planned|refused) ;; *) exit 1 ;; esac
done
exit 0
