"""topocoll: topology-aware collective communication.

The package maps the repository's top-level folders under one namespace
(`topocoll.comm`, `topocoll.topology`, `topocoll.benchmarks`, `topocoll.reports`) so that
nothing named `comm` or `topology` is installed at the top level of site-packages.
"""

__version__ = "0.1.0"
