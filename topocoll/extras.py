"""Optional dependencies, decided in one place: which extra provides what.

A missing extra is reported in one line that names the extra to install, never as an
ImportError traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {
    "mpi4py": "mpi",
    "ucxx": "ucx",
    "cupy": "gpu",
    "matplotlib": "report",
    "rich": "progress",
    "hypothesis": "dev",
}


class MissingExtraError(ImportError):
    """Raised with a one-line, actionable message."""


def require(module: str, purpose: str = "") -> ModuleType:
    """Import `module` or raise `MissingExtraError` naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = EXTRAS.get(top)
        what = f" for {purpose}" if purpose else ""
        hint = (f"pip install 'topocoll[{extra}]'" if extra else f"pip install {top}")
        raise MissingExtraError(f"{top} is needed{what} but is not installed ({exc}); "
                                f"install it with: {hint}") from exc


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
