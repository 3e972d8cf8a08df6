"""The public names: exported, documented, and the module map is complete."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import shmwriter


def test_all_exports_exist_and_are_documented():
    import shmwriter.ray

    for module in (shmwriter, shmwriter.ray):
        for name in module.__all__:
            check_documented(module, name)


def check_documented(module, name):
    obj = getattr(module, name)
    assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"
    if inspect.isclass(obj):
        for attr, member in vars(obj).items():
            public = not attr.startswith("_")
            if not public or not (callable(member) or isinstance(member, property)):
                continue
            assert inspect.getdoc(member), f"{module.__name__}.{name}.{attr} has no doc"


def test_the_core_does_not_import_ray():
    code = ("import sys, shmwriter, shmwriter.cli, shmwriter.merge, shmwriter.compat.dcnum; "
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_every_module_is_in_the_module_map():
    modules = {m.name for m in pkgutil.iter_modules(shmwriter.__path__)}
    for name in modules - {"__main__"}:
        assert name in shmwriter.__doc__, f"module {name} is missing from the map in __init__"
        module = importlib.import_module(f"shmwriter.{name}")
        assert inspect.getdoc(module), f"shmwriter.{name} has no module docstring"


def test_every_room_lists_its_modules():
    for package in pkgutil.walk_packages(shmwriter.__path__, "shmwriter."):
        if not package.ispkg:
            continue
        room = importlib.import_module(package.name)
        for module in pkgutil.iter_modules(room.__path__):
            name = f"{package.name}.{module.name}"
            if module.name.startswith("_") and package.name not in ("shmwriter.compat",
                                                                    "shmwriter.bench"):
                continue
            assert inspect.getdoc(importlib.import_module(name)), f"{name} has no docstring"
            if package.name.split(".")[-1] in ("_ring", "_channel", "_write", "_queue", "ops"):
                assert f"``{module.name}``" in room.__doc__, f"{name} is missing from its room"
