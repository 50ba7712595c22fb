"""Checks of a built extension that setup.py runs after the build (it loads this file by path:
no torch, no eman_fused import) and tests import."""
from __future__ import annotations

import subprocess

# std::locale's own members (mangled _ZNSt6locale...): an extension that defines them carries a
# private copy of the C++ runtime (a statically linked libstdc++, e.g. -static-libstdc++, or a
# compiler configured to link it so). Its streams then do not share the process runtime's locale
# facets, and formatting a number into an error message breaks: here the message was cut at the
# first number; on one GPU machine (an extension built with /opt/gcc/bin/g++) rejected calls whose
# messages format a number crashed the process.
_RUNTIME_MARKER = "_ZNSt6locale"


def defines_cxx_runtime(nm_output: str) -> bool:
    """Whether `nm -D --defined-only` output lists symbols of the C++ runtime itself."""
    return any(len(f := line.split()) >= 3 and f[1] in "TtWwVvDdBbRr" and f[2].startswith(_RUNTIME_MARKER)
               for line in nm_output.splitlines())


def private_cxx_runtime(library: str) -> bool | None:
    """defines_cxx_runtime for a built library, or None when `nm` cannot be run here."""
    try:
        out = subprocess.run(["nm", "-D", "--defined-only", library], capture_output=True, text=True,
                             check=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return defines_cxx_runtime(out)
