"""Shared by the Flower tests: a fast tiny config, the in-process reference run, and metric comparison.

Parity runs use no gold paths: ``conftest.gold_sampler`` patches this process only, and the ClientApps of the
Flower engines run in other processes (Ray workers, SuperNode subprocesses). Every comparison is exact: each
client's computation is the same deterministic code on the same number of CPU threads (the default ``threads=0``,
which every engine resolves to the cores of its machine), and the only fields allowed to differ are wall-clock
ones and the model cache's bookkeeping.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import TINY

from fedlada.runner import RunDir, comparable_metrics

# TINY with less generation per round (the Flower tests pay engine start-up on top)
# and the default threads=0: parity must hold with the default thread setting, not only with a pinned count
FAST = [o for o in TINY if not o.startswith("threads=")] + [
    "threads=0", "data.eval_limit=6", "lada.candidates_per_round=8", "lada.max_new_tokens=16"]

_REFERENCE: dict[str, Path] = {}


def rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return RunDir(run_dir).read(name)


strip = comparable_metrics


def overrides_dict(overrides: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in overrides)


def reference_run(base: Path, overrides: list[str] = FAST) -> Path:
    """The in-process run of ``overrides`` (once per pytest run): the numbers every engine must reproduce."""
    from fedlada.config import load_config
    from fedlada.runner import run

    key = json.dumps(overrides)
    if key not in _REFERENCE:
        out = base / f"inprocess-{len(_REFERENCE)}"
        res = run(load_config(overrides=overrides + [f"out_dir={out}"]))
        assert res.summary["rounds_done"] == load_config(overrides=overrides).rounds
        _REFERENCE[key] = res.run_dir
    return _REFERENCE[key]
