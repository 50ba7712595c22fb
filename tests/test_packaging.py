"""The package as installed (scripts/test.sh runs the suite against a wheel in a fresh venv, from
a copy of tests/ outside the source tree, with EMAN_FUSED_SOURCE_TREE naming that tree): it is
the installed copy that is imported, every file of the source package made it into the wheel,
and each module imports. Against the source tree (plain `pytest`), the first two are skipped."""
import importlib
import importlib.metadata
import os
import pkgutil
import re
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

import eman_fused

SOURCE = os.environ.get("EMAN_FUSED_SOURCE_TREE")
PACKAGE = Path(eman_fused.__file__).resolve().parent
installed_only = pytest.mark.skipif(
    not SOURCE, reason="testing the source tree (scripts/test.sh sets EMAN_FUSED_SOURCE_TREE for the installed wheel)")


@installed_only
def test_the_installed_copy_is_what_is_imported():
    assert not PACKAGE.is_relative_to(Path(SOURCE).resolve()), PACKAGE
    assert "site-packages" in PACKAGE.parts, PACKAGE
    dist = importlib.metadata.distribution("eman_fused")
    assert dist.version == eman_fused.__version__
    assert Path(dist.locate_file("eman_fused")).resolve() == PACKAGE


def _source_package_files(root: Path) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "eman_fused"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # an unpacked sdist: no git
        out = [str(p.relative_to(root)) for p in (root / "eman_fused").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".so", ".pyc")
               and p.name != "_build_info.py"]
    return sorted(out)


@installed_only
def test_every_file_of_the_source_package_is_installed():
    files = _source_package_files(Path(SOURCE))
    assert "eman_fused/__init__.py" in files
    missing = [f for f in files if not (PACKAGE.parent / f).is_file()]
    assert not missing, f"in the source tree but not in the installed package: {missing}"
    assert list(PACKAGE.glob("_C*.so")), "the compiled extension is missing"
    from eman_fused import _build_info
    assert _build_info.TORCH_VERSION == torch.__version__
    if os.environ.get("EMAN_FUSED_BUILD_CUDA") == "1":  # CI builds the wheel it tests with CUDA
        assert _build_info.CUDA_BUILT and "+PTX" in _build_info.CUDA_ARCH_LIST


def _optional_top_level_names() -> set[str]:
    """Distributions only an extra (eman_fused[lightning], ...) brings: a module may need them."""
    try:
        requires = importlib.metadata.requires("eman_fused") or []
    except importlib.metadata.PackageNotFoundError:
        return set()
    names = {re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0] for r in requires if "extra ==" in r}
    return {n.lower().replace("-", "_") for n in names}


def test_every_module_imports():
    optional = _optional_top_level_names()
    failed = {}
    for mod in pkgutil.walk_packages(eman_fused.__path__, "eman_fused."):
        if mod.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(mod.name)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0].lower() not in optional:
                failed[mod.name] = repr(exc)
        except Exception as exc:  # noqa: BLE001 - reported below, with the module
            failed[mod.name] = repr(exc)
    assert not failed


def test_the_public_api_works_from_here():
    import eman_fused.nn
    import eman_fused.optim
    student = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    teacher = eman_fused.EMATeacher(student, momentum=0.5)
    with torch.no_grad():
        student[0].weight.add_(1.0)
    before = teacher.module[0].weight.detach().clone()
    teacher.update()
    torch.testing.assert_close(teacher.module[0].weight, 0.5 * before + 0.5 * student[0].weight.detach())
    opt = eman_fused.optim.SGD(student.parameters(), lr=0.1, teacher=teacher)
    student(torch.randn(8, 4)).sum().backward()
    opt.step()
    assert isinstance(eman_fused.nn.EMANBatchNorm1d(4), nn.Module)
