"""The package's top-level names: each resolves to the module's own object, lazily (``import fedlada`` imports
neither torch nor flwr)."""

from __future__ import annotations

import subprocess
import sys

import fedlada


def test_top_level_names_are_the_modules_objects():
    import importlib

    for name, module in fedlada._EXPORTS.items():
        assert getattr(fedlada, name) is getattr(importlib.import_module(module), name), name
    assert set(fedlada.__all__) == {"__version__", *fedlada._EXPORTS}
    try:
        fedlada.no_such_name
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("an unknown name resolved")


def test_importing_the_package_is_cheap():
    code = "import sys, fedlada; print('torch' in sys.modules, 'flwr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
