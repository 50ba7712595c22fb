"""setup.py's check of the built extension (eman_fused/_build_checks.py): an extension that
carries its own C++ runtime (a statically linked libstdc++) is reported, since its error
messages that format numbers break (cut short here; a crash on one GPU machine)."""
from pathlib import Path

import eman_fused
from eman_fused import _backends, _build_checks


def test_a_private_runtime_is_recognized_from_nm_output():
    static = ("0000000000250e90 T _ZNSt6locale7classicEv\n"
              "0000000000041e50 T _ZN10eman_fused16check_no_overlapEPKc\n")
    plain = ("                 U _ZNSt6locale7classicEv\n"  # used, not defined: the shared runtime's
             "0000000000041e50 T _ZN10eman_fused16check_no_overlapEPKc\n")
    assert _build_checks.defines_cxx_runtime(static)
    assert not _build_checks.defines_cxx_runtime(plain)
    assert not _build_checks.defines_cxx_runtime("")


def test_this_build_links_the_shared_runtime_and_says_so():
    so = next(Path(eman_fused.__file__).parent.glob("_C*.so"))
    verdict = _build_checks.private_cxx_runtime(str(so))
    assert verdict in (False, None)  # None: no nm here
    assert getattr(_backends._build_info, "CXX_RUNTIME_PRIVATE", None) in (False, None)
    assert "WARNING" not in eman_fused.backends()["cpu"].detail
