"""The public names: exported, documented, and the module map is complete."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import shmwriter


def test_all_exports_exist_and_are_documented():
    for name in shmwriter.__all__:
        obj = getattr(shmwriter, name)
        assert inspect.getdoc(obj), f"shmwriter.{name} has no docstring"
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                public = not attr.startswith("_")
                if not public or not (callable(member) or isinstance(member, property)):
                    continue
                assert inspect.getdoc(member), f"shmwriter.{name}.{attr} has no docstring"


def test_every_module_is_in_the_module_map():
    modules = {m.name for m in pkgutil.iter_modules(shmwriter.__path__)}
    for name in modules - {"__main__"}:
        assert name in shmwriter.__doc__, f"module {name} is missing from the map in __init__"
        module = importlib.import_module(f"shmwriter.{name}")
        assert inspect.getdoc(module), f"shmwriter.{name} has no module docstring"
