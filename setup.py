"""Builds eman_fused._C: CPU kernels always, CUDA kernels when torch and nvcc allow.

Metadata (name, version, dependencies, extras, packages) is in pyproject.toml; this file only
describes the extension. Build with the torch you run:
  pip install --no-build-isolation .          (or: pip wheel --no-build-isolation -w dist .)
  python setup.py build_ext --inplace         (development, in the source tree)

Switches (environment variables):
  EMAN_FUSED_BUILD_CUDA=1  the CUDA kernels, or fail saying why not; =0 never; unset: when possible.
  TORCH_CUDA_ARCH_LIST     respected; unset and no GPU visible: DEFAULT_ARCH_LIST.
  MAX_JOBS                 parallel compile jobs (ninja), as for every torch extension.
What was built, and why CUDA was not, is written next to the extension as
eman_fused/_build_info.py, so eman_fused.backends() and `python -m eman_fused info` can say it.

Sources are found, not listed: every .cpp and .cu under csrc/ (none under a tests/ folder).
CUDA-only (compiled only with the CUDA kernels, see _cuda_only): .cu files, anything in a
folder named cuda/, files named cuda_host.cpp or *_bindings.cpp (host code that includes
CUDA headers and registers CUDA kernels).
"""
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# sm_80 (A100) and sm_90 (H100) as machine code, plus sm_90 PTX, which the driver compiles
# for newer GPUs (Blackwell and later) at first launch.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _pin_cuda_home() -> None:
    # torch guesses CUDA_HOME as the parent of the first `nvcc` on PATH; a wrapper script
    # in /usr/local/bin then yields /usr/local and linking fails on -lcudart.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    if Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


_pin_cuda_home()

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _cuda_only(rel: Path) -> bool:
    """rel: a source path relative to csrc/."""
    return (rel.suffix == ".cu" or "cuda" in rel.parts[:-1] or rel.name == "cuda_host.cpp"
            or rel.name.endswith("_bindings.cpp"))


def _sources() -> tuple[list[str], list[str]]:
    """(sources of every build, CUDA-only sources), relative to this file, sorted."""
    common, cuda = [], []
    for path in sorted((ROOT / "csrc").rglob("*")):
        rel = path.relative_to(ROOT / "csrc")
        if path.suffix not in (".cpp", ".cu") or "tests" in rel.parts[:-1]:
            continue
        (cuda if _cuda_only(rel) else common).append(f"csrc/{rel.as_posix()}")
    return common, cuda


def _cuda_decision() -> tuple[bool, str]:
    """(build CUDA?, reason when not)."""
    forced = os.environ.get("EMAN_FUSED_BUILD_CUDA")
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    elif CUDA_HOME is None or not Path(CUDA_HOME, "bin", "nvcc").exists():
        reason = "nvcc was not found at build time (set CUDA_HOME)"
    else:
        reason = ""
    if forced == "0":
        return False, "disabled at build time with EMAN_FUSED_BUILD_CUDA=0"
    if forced == "1" and reason:
        raise RuntimeError(f"EMAN_FUSED_BUILD_CUDA=1 but CUDA cannot be built: {reason}")
    return not reason, reason


def _extension():
    build_cuda, reason = _cuda_decision()
    sources, cuda_sources = _sources()
    include_dirs = [str(ROOT / "csrc")]
    # -fno-trapping-math: the branch-free float16 conversions (csrc/common/convert.h) vectorize
    # only when GCC may evaluate both sides of a select (measured 4.7 -> 1.1 ns per element);
    # values are unchanged (no reassociation; only FP exception flags, which nothing reads).
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if not build_cuda:
        return CppExtension("eman_fused._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx},
                            extra_link_args=["-fopenmp"]), False, reason, ""
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or "visible GPU"
    ext = CUDAExtension("eman_fused._C", sources + cuda_sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
                        extra_link_args=["-fopenmp"])
    return ext, True, "", arch


EXT, CUDA_BUILT, NOT_BUILT_REASON, ARCH = _extension()


def _build_checks():
    # eman_fused/_build_checks.py by path: importing the package would need the extension.
    spec = importlib.util.spec_from_file_location("_eman_fused_build_checks",
                                                  ROOT / "eman_fused" / "_build_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's build_ext, then _build_info.py beside the built extension (in the source tree
    for --inplace, in the build directory, and so in the wheel, otherwise)."""

    def run(self):
        super().run()
        built = self.get_ext_fullpath(EXT.name)
        private_runtime = _build_checks().private_cxx_runtime(built)
        if private_runtime:
            print("\n*** eman_fused: the extension carries its own copy of the C++ runtime (it defines "
                  "std::locale: a statically linked libstdc++). Error messages that format numbers break "
                  "with it (cut short, or a crash instead of the error). Build with a compiler that links "
                  "libstdc++ dynamically (CXX=...). eman_fused.backends() reports it. ***\n", file=sys.stderr)
        target = Path(built).parent / "_build_info.py"
        target.write_text(
            "# Written by setup.py when this extension was built; not tracked.\n"
            f"CXX_RUNTIME_PRIVATE = {private_runtime!r}\n"
            f"CUDA_BUILT = {CUDA_BUILT!r}\n"
            f"CUDA_NOT_BUILT_REASON = {NOT_BUILT_REASON!r}\n"
            f"CUDA_ARCH_LIST = {ARCH!r}\n"
            f"TORCH_VERSION = {torch.__version__!r}\n"
            f"CUDA_VERSION = {torch.version.cuda!r}\n")


setup(ext_modules=[EXT], cmdclass={"build_ext": _BuildExt})
