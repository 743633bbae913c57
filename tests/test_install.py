"""The package as operators install it.

Builds the sdist and, from the sdist, the wheel (``python -m build``, with an
isolated build environment as on a server), checks what each holds against
the source tree, installs the wheel into a fresh venv and runs the smoke tests
of tests/installed with that venv's interpreter from outside the checkout,
and installs the checkout itself with ``pip install .`` (not editable). A
subpackage without ``__init__.py``, a data file left out, a header missing
from the sdist: each fails here.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from appliance._os.files import KINDS

from procs import ROOT

pytestmark = pytest.mark.slow


def _run(argv: list, cwd: Path, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and
             not k.startswith("APPLIANCE_")}
    r = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**clean, **env})
    assert r.returncode == 0, f"{' '.join(map(str, argv))} exited {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def _venv(path: Path) -> Path:
    _run([sys.executable, "-m", "venv", path], cwd=path.parent)
    return path / "bin" / "python"


def source_modules() -> set[str]:
    """Every file of the package in the source tree that an installation needs."""
    out = set()
    for d, dirs, files in os.walk(ROOT / "appliance"):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                out.add(str((Path(d) / f).relative_to(ROOT)))
    return out


def shipped_data() -> set[str]:
    return {f"appliance/_data/{k}/{p.name}" for k in KINDS for p in (ROOT / k).iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def dist(built_dist) -> dict[str, Path]:
    return built_dist


@pytest.fixture(scope="module")
def wheel_venv(dist, tmp_path_factory) -> Path:
    python = _venv(tmp_path_factory.mktemp("wheel") / "venv")
    _run([python, "-m", "pip", "install", "-q", dist["wheel"], "pytest>=8"], cwd=python.parent)
    return python


class TestDistributions:
    def test_wheel_holds_every_module_the_c_helpers_and_the_shipped_files(self, dist):
        """Every .py of appliance/ in the source tree, the compiled extension, and a copy of
        every file of config/ and systemd/ are in the wheel."""
        names = set(zipfile.ZipFile(dist["wheel"]).namelist())
        missing = (source_modules() | shipped_data()) - names
        assert not missing, f"the wheel leaves out: {sorted(missing)}"
        assert [n for n in names if n.startswith("appliance/_cext") and n.endswith(".so")]

    def test_wheel_holds_nothing_of_the_source_tree_beyond_the_package(self, dist):
        """No C source, test, benchmark or build file reaches the wheel."""
        names = set(zipfile.ZipFile(dist["wheel"]).namelist())
        package = {n for n in names if not n.startswith("appliance-") or ".dist-info/" not in n}
        stray = {n for n in package if n not in source_modules() | shipped_data()
                 and not (n.startswith("appliance/_cext") and n.endswith(".so"))}
        assert not stray, f"the wheel holds files it does not need at run time: {sorted(stray)}"

    def test_wheel_metadata_is_complete(self, dist):
        """Version, license, Python requirement, classifiers and the entry point."""
        import appliance
        z = zipfile.ZipFile(dist["wheel"])
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = z.read(meta_name).decode()
        assert f"Version: {appliance.__version__}" in meta
        assert "License: MIT" in meta or "License-Expression: MIT" in meta
        assert "Requires-Python: >=3.11" in meta
        assert "Classifier: Topic :: Database :: Database Engines/Servers" in meta
        eps = z.read(meta_name.replace("METADATA", "entry_points.txt")).decode()
        assert "appliance = appliance.cli.__main__:main" in eps

    def test_sdist_holds_what_the_build_needs(self, dist):
        """The C sources and headers, the build script, the example configs and the units."""
        with tarfile.open(dist["sdist"]) as t:
            names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
        need = {str(p.relative_to(ROOT)) for p in (ROOT / "cext").iterdir() if p.suffix in (".c", ".h", ".py")}
        need |= {f"{k}/{p.name}" for k in KINDS for p in (ROOT / k).iterdir() if p.is_file()}
        need |= {"setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"} | source_modules()
        missing = need - names
        assert not missing, f"the sdist leaves out: {sorted(missing)}"
        assert not [n for n in names if n.startswith(("tests/", "bench/")) or n.endswith(".so")]


class TestInstalled:
    def test_wheel_in_a_fresh_venv_passes_the_smoke_tests(self, wheel_venv, tmp_path):
        """tests/installed, run by the fresh venv's interpreter from a directory outside the checkout:
        controllers, agents, a client, every subcommand and the demo from the installed package."""
        r = _run([wheel_venv, "-m", "pytest", "-q", "-p", "no:cacheprovider", ROOT / "tests" / "installed"],
                 cwd=tmp_path, APPLIANCE_TEST_INSTALLED="1")
        assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout

    def test_pip_install_of_the_checkout(self, tmp_path):
        """`pip install .` (not editable) gives a working command and package outside the checkout."""
        python = _venv(tmp_path / "venv")
        _run([python, "-m", "pip", "install", "-q", ROOT], cwd=tmp_path)
        r = _run([python.with_name("appliance"), "--version"], cwd=tmp_path)
        import appliance
        assert appliance.__version__ in r.stdout
        r = _run([python, "-c", "import appliance, appliance._native, appliance.cli.__main__, "
                  "appliance.replication, appliance.controller; print(appliance.__file__)"], cwd=tmp_path)
        assert ROOT not in Path(r.stdout.strip()).resolve().parents
        r = _run([python.with_name("appliance"), "files"], cwd=tmp_path)
        assert "appliance-controller@.service" in r.stdout and "bank.toml" in r.stdout
