"""Installing topocoll must not clobber Jupyter's `comm` (or install a top-level `topology`)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_jupyter_comm_still_imports_beside_topocoll(tmp_path: Path) -> None:
    """In the test venv both are installed; outside the source tree `comm` is Jupyter's."""
    code = ("import comm, topocoll.comm, topocoll.topology; "
            "assert hasattr(comm, 'create_comm'), comm.__file__; "
            "assert 'site-packages' in comm.__file__, comm.__file__; "
            "print(comm.__file__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return next(out.glob("topocoll-*.whl"))


def test_wheel_installs_only_under_the_topocoll_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top <= {"topocoll", *(t for t in top if t.endswith(".dist-info"))}, top
    for module in ("topocoll/comm/__init__.py", "topocoll/topology/__init__.py",
                   "topocoll/benchmarks/__init__.py", "topocoll/reports/__init__.py",
                   "topocoll/comm/algorithms/ring.py", "topocoll/cli.py"):
        assert module in names, module


def test_pip_install_into_a_venv_with_jupyter_comm(wheel: Path, tmp_path: Path) -> None:
    """`pip install .` beside Jupyter's `comm` (copied from this venv, no network)."""
    # Locate Jupyter's comm through its distribution: `import comm` in this process may
    # find the repository's own comm/ folder when pytest runs from the checkout.
    jupyter_comm_dir = Path(str(importlib.metadata.distribution("comm").locate_file("comm")))
    assert (jupyter_comm_dir / "__init__.py").exists(), jupyter_comm_dir

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # Jupyter's comm in the new venv's own site-packages, then our wheel on top of it.
    subprocess.run(["cp", "-r", str(jupyter_comm_dir), site], check=True)
    result = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps",
                             "--no-index", str(wheel)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    check = subprocess.run(
        [str(python), "-c", "import comm, topocoll.comm; assert hasattr(comm, 'create_comm');"
                            " print(comm.__file__, topocoll.comm.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    comm_file, ours = check.stdout.split()
    assert comm_file.startswith(site) and "topocoll" in ours


def test_missing_extra_is_one_line() -> None:
    from topocoll.extras import MissingExtraError, require

    with pytest.raises(MissingExtraError, match=r"pip install 'topocoll\[report\]'"):
        require("matplotlib.this_does_not_exist", "the report")
