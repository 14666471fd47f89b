"""topocoll: topology-aware collective communication.

The package maps the repository's top-level folders under one namespace
(`topocoll.comm`, `topocoll.topology`, `topocoll.benchmarks`, `topocoll.reports`) so that
nothing named `comm` or `topology` is installed at the top level of site-packages.

Importing it registers the torch.distributed backend "topocoll" (when torch is there), so
`dist.init_process_group(backend="topocoll")` works after `import topocoll`; the
`torch.backends` entry point does the same without the import.
"""

import contextlib

__version__ = "0.1.0"


def _register_backend() -> None:
    try:
        from topocoll.comm.torch_backend import register
    except ImportError:  # torch missing or built without distributed: nothing to register
        return
    register()


def autoload() -> None:
    """Entry point torch calls at `import torch` (group `torch.backends`); never raises."""
    with contextlib.suppress(Exception):  # must never break `import torch`
        _register_backend()


_register_backend()
