"""FedLaDa: federated reasoning distillation with learnability-aware data allocation (LaDa).

The library never imports ``flwr``; the Flower app lives in ``fedlada_app``. The names a script needs most are
importable from here (loaded on first use, so ``import fedlada`` stays cheap)::

    import fedlada

    cfg = fedlada.load_config("configs/smoke.toml", ["threads=1", "out_dir=runs/smoke"])
    result = fedlada.run(cfg)            # resumes an interrupted run in out_dir
    fedlada.write_report(result.run_dir)
    print(result.summary["final"])
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_config": "fedlada.config", "RunConfig": "fedlada.config",
    "run": "fedlada.runner", "RunResult": "fedlada.runner", "Events": "fedlada.runner",
    "write_report": "fedlada.report", "run_table": "fedlada.compare", "export_model": "fedlada.export",
    "register_rule": "fedlada.selection", "Candidates": "fedlada.selection",
    "Record": "fedlada.data", "read_records": "fedlada.data", "write_records": "fedlada.data",
    "validate_files": "fedlada.data", "make_benchmark": "fedlada.data",
    "FedLadaError": "fedlada.errors", "ConfigError": "fedlada.errors", "DataError": "fedlada.errors",
    "ModelError": "fedlada.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedlada' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
