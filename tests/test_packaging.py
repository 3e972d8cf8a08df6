"""Packaging: the wheel's contents and metadata, the hdf5plugin pin, the README's set-up commands.

The wheel is built from a copy of the project's files with the installed setuptools
(``pip wheel --no-build-isolation``: offline, a few seconds), so the checkout is left alone.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

from packaging.requirements import Requirement
from packaging.version import Version

import shmwriter

ROOT = pathlib.Path(__file__).resolve().parents[1]


def build_wheel(tmp_path: pathlib.Path) -> tuple[pathlib.Path, str]:
    """Build the wheel of a copy of the project; returns it and everything the build printed."""
    setuptools = importlib.metadata.version("setuptools")
    assert Version(setuptools) >= Version("77"), \
        f"setuptools {setuptools} is older than the test extra asks: pip install -e '.[test]'"
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "shmwriter", source / "shmwriter",
                    ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-v", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    (wheel,) = (tmp_path / "dist").glob("shmwriter-*.whl")
    return wheel, output


def test_wheel_ships_the_license_and_py_typed_with_an_spdx_license(tmp_path):
    wheel, output = build_wheel(tmp_path)
    version = shmwriter.__version__
    info = f"shmwriter-{version}.dist-info"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(f"{info}/METADATA").decode()
        license_text = zf.read(f"{info}/licenses/LICENSE").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    assert "shmwriter/py.typed" in names
    assert "shmwriter/cli.py" in names
    headers = metadata.split("\n\n", 1)[0].splitlines()
    assert f"Version: {version}" in headers
    assert "License-Expression: MIT" in headers
    assert "License-File: LICENSE" in headers
    assert not [line for line in headers if line.startswith("License:")], headers
    assert license_text.startswith("MIT License\n\nCopyright (c) 2026 the shmwriter developers\n")
    assert license_text == (ROOT / "LICENSE").read_text()
    assert "shmwriter = shmwriter.cli:main" in entry_points
    # the table form (license = { text = "MIT" }) made setuptools warn, "`project.license` as
    # a TOML table is deprecated", that such builds stop working after 2027-02-18
    warnings = [line for line in output.splitlines() if re.search(r"deprecat|2027", line, re.I)]
    assert warnings == []


def test_installed_hdf5plugin_satisfies_the_core_pin():
    """dclab needs hdf5plugin<5; the core dependency says so, and the tests run on such a one."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (pin,) = [Requirement(r) for r in project["dependencies"]
              if Requirement(r).name == "hdf5plugin"]
    assert any(spec.operator == "<" for spec in pin.specifier), f"not pinned: {pin}"
    installed = importlib.metadata.version("hdf5plugin")
    assert pin.specifier.contains(installed), f"hdf5plugin {installed} does not satisfy {pin}"
    declared = [Requirement(r) for r in importlib.metadata.requires("shmwriter") or []]
    stale = f"shmwriter was installed from another pyproject.toml ({declared}): reinstall it"
    assert pin in declared, stale


def readme_setup_commands() -> list[str]:
    """The command lines of the bash block in README's "Set-up: two commands" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Set-up: two commands\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("\n```", 1)[0]
    return [line.strip() for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def ci_variable(text: str, name: str) -> str:
    (value,) = re.findall(rf"^{name}='([^']*)'$", text, re.M)
    return value


def test_readme_setup_commands_are_what_ci_runs():
    setup, test = readme_setup_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci_variable(ci, "SETUP_COMMAND") == setup
    assert ci_variable(ci, "TEST_COMMAND") == test
    lines = [line.strip() for line in ci.splitlines()]
    assert lines.count('run "$SETUP_COMMAND"') == 1
    assert lines.count('run "$TEST_COMMAND"') == 2  # Python 3.11, then 3.13
    assert 'run "rm -rf .venv && ${SETUP_COMMAND/#python3 /$PYTHON313 }"' in lines
    assert "activate" not in ci  # the commands work as written, with no venv active
    # the first command makes its own venv and uses only it, so it works on a fresh machine
    # (no venv active, a system Python that refuses pip install under PEP 668)
    first, *rest = setup.split(" && ")
    assert first == "python3 -m venv .venv"
    assert rest and all(part.startswith(".venv/bin/") for part in rest), rest
    assert '.venv/bin/pip install -e ".[test]"' in rest
    assert test.startswith(".venv/bin/python -m pytest")
